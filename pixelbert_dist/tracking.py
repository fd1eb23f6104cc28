"""MLflow tracking from rank 0; a tracking server that is down costs a warning, never the run.

URI: tracking.uri, else MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working folder.
A resumed job passes the run id it saved in its checkpoint and continues the same run.
The run is the home of what it made: params and metrics, the resolved config and the
DeepSpeed JSON under `config/`, the trained model under `model/` (optionally registered).

Credentials: an http(s) URI's user info (`https://user:pw@host`, or `https://TOKEN@host`) is
moved into MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD (or MLFLOW_TRACKING_TOKEN) before
MLflow sees the URI, so no URL MLflow prints or raises holds them; the health check sends
them as MLflow will, in an Authorization header. Everything logged here is redacted.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import urllib.request
from urllib.parse import unquote, urlsplit, urlunsplit

from data_pipeline.version import code_version
from pixelbert_dist.config import TrackingConfig, redact

log = logging.getLogger("pixelbert_dist.tracking")


def tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlruns.db"


def move_credentials(uri: str) -> str:
    """An http(s) URI without its user info, which goes to MLflow's variables: `user:password`
    to MLFLOW_TRACKING_USERNAME/PASSWORD (basic auth), a lone `TOKEN` to MLFLOW_TRACKING_TOKEN
    (bearer). Other URIs (sqlite, postgresql, ...) go to their driver unchanged."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, colon, password = (unquote(p) for p in userinfo.partition(":"))
    if colon:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, password
    else:  # MLflow prefers username + password to a token: the URI's token must win
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
        os.environ["MLFLOW_TRACKING_TOKEN"] = user
    return urlunsplit(parts._replace(netloc=hostport))


def check_health(uri: str) -> None:
    """GET the server's /health: the URL from scheme, host, port and path only; credentials, as
    MLflow sends them (username + password, else token), in the Authorization header."""
    parts = urlsplit(uri)
    if not parts.hostname:
        raise ValueError(f"tracking URI {redact(uri)!r} names no host")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    url = urlunsplit((parts.scheme, netloc, f"{parts.path.rstrip('/')}/health", "", ""))
    headers = {}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    elif token:
        headers["Authorization"] = f"Bearer {token}"
    urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5).close()


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
            log.warning("MLflow %s failed (%s); training continues without tracking", what, redact(str(err)))
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
            uri = move_credentials(tracking_uri(self.cfg))
            if uri.startswith(("http://", "https://")):
                check_health(uri)
            mlflow.set_tracking_uri(uri)
            if run_id:
                run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
            else:
                mlflow.set_experiment(self.cfg.experiment)
                run = mlflow.start_run(run_name=self.cfg.run_name or None, log_system_metrics=True)
                mlflow.log_params({k: str(v)[:500] for k, v in redact(params).items()})
            mlflow.set_tags(redact(tags))
            return run.info.run_id

        self.run_id = self._call("start", begin)
        return self.run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        import mlflow
        self._call("log_metrics", mlflow.log_metrics, values, step=step)

    def tag(self, key: str, value: str) -> None:
        import mlflow
        self._call("set_tag", mlflow.set_tag, key, redact(value))

    def log_dict(self, value: dict, artifact_file: str) -> None:
        """`value` as a JSON or YAML artifact (by the file's extension), redacted."""
        import mlflow
        self._call("log_dict", mlflow.log_dict, redact(value), artifact_file)

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
