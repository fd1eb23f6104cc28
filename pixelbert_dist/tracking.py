"""MLflow tracking from rank 0; a tracking server that is down costs a warning, never the run.

URI: tracking.uri, else MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working folder.
A resumed job passes the run id it saved in its checkpoint and continues the same run.
The run is the home of what it made: params and metrics, the resolved config and the
DeepSpeed JSON under `config/`, the trained model under `model/` (optionally registered).
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.request

from data_pipeline.version import code_version
from pixelbert_dist.config import TrackingConfig

log = logging.getLogger("pixelbert_dist.tracking")


def tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlruns.db"


class Tracker:
    """Rank 0 logs; other ranks hold a tracker that does nothing."""

    def __init__(self, cfg: TrackingConfig, enabled: bool) -> None:
        self.cfg, self.enabled, self.run_id = cfg, enabled, None

    def _call(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # tracking must never stop training
            log.warning("MLflow %s failed (%s); training continues without tracking", what, err)
            self.enabled = False
            return None

    def start(self, run_id: str | None, params: dict, tags: dict) -> str | None:
        if not self.enabled:
            return None
        # MLflow's HTTP client retries for minutes by default; a tracking outage must cost
        # seconds of training, not minutes per logged step.
        for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
                            ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")):
            os.environ.setdefault(name, value)
        import mlflow

        def begin():
            uri = tracking_uri(self.cfg)
            if uri.startswith(("http://", "https://")):
                urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5).close()
            mlflow.set_tracking_uri(uri)
            if run_id:
                run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
            else:
                mlflow.set_experiment(self.cfg.experiment)
                run = mlflow.start_run(run_name=self.cfg.run_name or None, log_system_metrics=True)
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.set_tags(tags)
            return run.info.run_id

        self.run_id = self._call("start", begin)
        return self.run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        import mlflow
        self._call("log_metrics", mlflow.log_metrics, values, step=step)

    def tag(self, key: str, value: str) -> None:
        import mlflow
        self._call("set_tag", mlflow.set_tag, key, value)

    def log_dict(self, value: dict, artifact_file: str) -> None:
        """`value` as a JSON or YAML artifact (by the file's extension)."""
        import mlflow
        self._call("log_dict", mlflow.log_dict, value, artifact_file)

    def log_folder(self, local_dir: str, artifact_path: str) -> None:
        import mlflow
        self._call("log_artifacts", mlflow.log_artifacts, local_dir, artifact_path)

    def register(self, name: str, artifact_path: str) -> str | None:
        """A new version of registered model `name` from this run's `artifact_path`; its version."""
        def create():
            from mlflow import MlflowClient

            client = MlflowClient()
            try:
                client.get_registered_model(name)
            except Exception:  # not registered yet (MLflow raises RestException / MlflowException)
                client.create_registered_model(name)
            source = f"{client.get_run(self.run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
            return client.create_model_version(name, source, run_id=self.run_id).version
        return self._call("register_model", create)

    def end(self) -> None:
        import mlflow
        self._call("end_run", mlflow.end_run)


def run_tags(launcher: str, hosts: list[str]) -> dict[str, str]:
    return {"git_commit": code_version()["git_commit"], "launcher": launcher,
            "hosts": ",".join(sorted(set(hosts))),
            "host": socket.gethostname()}


def flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: value}
