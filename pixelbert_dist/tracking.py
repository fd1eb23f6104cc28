"""MLflow tracking from rank 0; a tracking server that is down costs a warning, never the run.

URI: tracking.uri, else MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working folder.
A resumed job passes the run id it saved in its checkpoint and continues the same run.
The run is the home of what it made: params and metrics, the resolved config and the
DeepSpeed JSON under `config/`, the trained model under `model/` (optionally registered).

Credentials: an http(s) URI's user info (`https://user:pw@host`, or `https://TOKEN@host`) is
moved into MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD (or MLFLOW_TRACKING_TOKEN) before
MLflow sees the URI, so no URL MLflow prints or raises holds them; the health check sends
them as MLflow will, in an Authorization header. Everything logged here is redacted.

A run ends FINISHED, FAILED (an error: its one line in the tag `failure`) or KILLED (Ctrl-C,
SIGTERM), never left RUNNING by a run that stopped: the entry point (cli.py) ends it with
the error, and SIGTERM ends it before the process dies of it.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import signal
import socket
import threading
import time
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


# MLflow draws a chart section for each part of a metric's name before its first '/'. The code
# keeps short names (loss, samples_per_s, time.forward); what MLflow shows is sectioned here.
_SECTIONS = {
    "perf": {"samples_per_s", "images_per_s", "samples_per_s_per_device", "tflops_per_device", "mfu",
             "memory_peak_gib", "data_wait_fraction", "step_time_s", "step_time_median_s"},
    "progress": {"epoch", "run_fraction", "pairs_seen", "pairs_total", "eta_h", "projected_device_hours"},
    "data": {"skipped_samples", "truncated_captions"},
}


def metric_name(key: str) -> str:
    """The sectioned name MLflow shows for a metric: train/loss, eval/zeroshot/text_r1,
    perf/mfu, phase/forward_s, lr/cnn, progress/eta_h, data/skipped_samples."""
    if "/" in key:
        return key
    head, dot, rest = key.partition(".")
    if dot and head == "time":  # time.forward_s
        return f"phase/{rest}"
    if dot and head == "frac":
        return f"phase/{rest}_fraction"
    if dot and head == "lr":
        return f"lr/{rest}"
    if dot and head in ("eval", "zeroshot"):
        return f"eval/{key.replace('.', '/')}" if head == "zeroshot" else f"eval/{rest}"
    for section, names in _SECTIONS.items():
        if key in names:
            return f"{section}/{key}"
    if key == "lr" or key.startswith("lr_"):
        return f"lr/{key}"
    return f"train/{key}"  # the job's outputs: losses and accuracies


def run_name(tags: dict, params: dict, started: float) -> str:
    """A name a person can tell apart in a list of runs: start time, job, model. The time comes
    first: MLflow's runs table and chart legends cut names at ~20 characters."""
    model = f"{params.get('model.backbone', 'model')}-L{params.get('model.num_layers', '?')}"
    return f"{time.strftime('%m%d-%H%M%S', time.localtime(started))} {tags.get('job', 'run')} {model}"


def ui_link(uri: str, experiment_id: str, run_id: str) -> str:
    """Where to see the run: its page on the tracking server, or how to serve a local store.
    `workflowType=machine_learning` opens MLflow 3's training view (runs, charts); without it
    the UI opens on the GenAI one unless the browser remembers the switch."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):  # (move_credentials has taken any user info out)
        parts = urlsplit(uri)
        return f"{urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip('/'), '', ''))}/{path}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{path}"


class Tracker:
    """Rank 0 logs; other ranks hold a tracker that does nothing."""

    def __init__(self, cfg: TrackingConfig, enabled: bool) -> None:
        self.cfg, self.enabled, self.run_id = cfg, enabled, None
        self._sigterm_before = None  # the SIGTERM handler start() replaced; end() puts it back

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
                experiment = mlflow.set_experiment(self.cfg.experiment)
                if "mlflow.experimentKind" not in experiment.tags:  # the UI then opens on runs and charts
                    mlflow.set_experiment_tag("mlflow.experimentKind", "custom_model_development")
                run = mlflow.start_run(run_name=self.cfg.run_name or run_name(tags, params, time.time()),
                                       log_system_metrics=True)
                mlflow.log_params({k: str(v)[:500] for k, v in redact(params).items()})
            mlflow.set_tags(redact(tags))
            log.info("MLflow run %r: %s", run.info.run_name, ui_link(redact(uri), run.info.experiment_id,
                                                                     run.info.run_id))
            return run.info.run_id

        self.run_id = self._call("start", begin)
        if self.run_id is not None and threading.current_thread() is threading.main_thread():
            # (Ray Train runs the job in a thread of its worker: Ray owns that process's signals)
            self._pid = os.getpid()
            self._sigterm_before = signal.signal(signal.SIGTERM, self._on_sigterm) or signal.SIG_DFL
        return self.run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        import mlflow
        self._call("log_metrics", mlflow.log_metrics, {metric_name(k): v for k, v in values.items()}, step=step)

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

    def end(self, failure: str | None = None, killed: bool = False) -> None:
        """End the run (once): FINISHED; with `failure`, the one line that says why, FAILED, or
        KILLED if `killed` (Ctrl-C, SIGTERM), the line in the tag `failure`."""
        if self.run_id is None or not self.enabled:
            return  # no run started here, or it already ended (a tag now would start a new one)
        import mlflow
        status = "FINISHED" if failure is None else "KILLED" if killed else "FAILED"
        with _signals_held():
            if failure is not None:
                self.tag("failure", failure[:_TAG_CHARS])
            self._call("end_run", mlflow.end_run, status)
        self.enabled = False
        if self._sigterm_before is not None:
            signal.signal(signal.SIGTERM, self._sigterm_before)

    def _on_sigterm(self, signum: int, frame) -> None:
        """SIGTERM (a launcher stopping its ranks, a scheduler's preemption): the run ends KILLED,
        then the signal goes to the handler there was before start(): the process dies of it."""
        if os.getpid() == self._pid:  # not a loader worker forked after start(): it has no run
            self.end(failure="stopped by SIGTERM", killed=True)
        signal.signal(signum, self._sigterm_before)
        os.kill(os.getpid(), signum)


_TAG_CHARS = 5000  # MLflow refuses a tag value over 8,000 characters (and would leave the run RUNNING)


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM ignored inside, in the main thread: a second Ctrl-C, or the SIGTERM
    torchrun sends its ranks after one, must not cut short the record of why the run ended."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


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
