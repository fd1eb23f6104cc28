"""Security: credentials in URLs of the run config are never recorded (issue 21, hole 6).

A `tracking.uri` with a password is the config's one secret on purpose; any URL field may
carry user info or a presigned query. Every recorded copy of the config (MLflow params, the
`config/resolved.yaml` artifact, checkpoints' client_state.json, the model's config.json, the
CLI's print, error messages, log lines) shows `***` in its place and still names the host;
the live config keeps the real URI to connect with. The health check and MLflow's own
requests carry credentials in the Authorization header, never in a URL. Each test records
one row of the fault table (tests/faults.py). The tracked run's check (a real run against
`mlflow server`, every file it wrote searched for the password) lives in test_pretrain.py's
MLflow-server test, which runs that job anyway.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from pixelbert_dist import config as config_module
from pixelbert_dist.config import ConfigError, load_config
from tests.conftest import TINY
from tests.faults import record_fault

SECRET = "S3cr3t-d0-not-record"  # one distinctive string: any file or line holding it leaks


def _hostile_overrides() -> list[str]:
    return [f"--tracking.uri=postgresql://mlflow:{SECRET}@db.internal:5432/mlflow",
            f"--checkpoint.mirror=mysql+pymysql://ops:{SECRET}@mirror.internal:3306/ckpt",  # any URL field
            f"--data.eval_manifest=https://{SECRET}@data.internal/eval",                     # a token as user
            "--data.train_manifest=https://bucket.s3.amazonaws.com/train/manifest.json?X-Amz-Algorithm=AWS4"
            f"&X-Amz-Credential=AKIA%2F{SECRET}&X-Amz-Signature={SECRET}&X-Amz-Expires=600"]


def test_credentials_in_config_urls_are_redacted_in_every_recorded_form_but_not_in_the_live_config(capsys):
    cfg = load_config(TINY, _hostile_overrides())
    recorded = {
        "to_dict (resolved.yaml, client_state.json, config.json)": yaml.safe_dump(cfg.to_dict()),
        "flat_dict (MLflow params)": json.dumps(cfg.flat_dict()),
    }
    assert config_module.main([str(TINY), *_hostile_overrides()]) == 0
    recorded["python -m pixelbert_dist.config"] = capsys.readouterr().out
    with pytest.raises(ConfigError) as refused:  # a space instead of '=': the URL is quoted in the error
        load_config(TINY, [f"postgresql://mlflow:{SECRET}@db.internal:5432/mlflow"])
    recorded["ConfigError"] = str(refused.value)
    leaks = [where for where, text in recorded.items() if SECRET in text]
    shown = cfg.to_dict()
    names_hosts = (shown["tracking"]["uri"] == "postgresql://***@db.internal:5432/mlflow"
                   and shown["checkpoint"]["mirror"] == "mysql+pymysql://***@mirror.internal:3306/ckpt"
                   and shown["data"]["eval_manifest"] == "https://***@data.internal/eval"
                   and "X-Amz-Signature=***&X-Amz-Expires=600" in shown["data"]["train_manifest"]
                   and "db.internal:5432" in recorded["ConfigError"])
    live = cfg.tracking.uri == f"postgresql://mlflow:{SECRET}@db.internal:5432/mlflow"
    passed = not leaks and names_hosts and live
    record_fault({"section": "security", "fault": "credentials in config URLs recorded",
                  "what_was_done": "tracking.uri postgresql://user:PASSWORD@host, a mysql+pymysql mirror with a "
                                   "password, an https token as user info, a presigned S3 manifest URL; config "
                                   "dumped, flattened, printed by the CLI, and quoted in a ConfigError",
                  "expected": "user info and signature values shown as ***, host/port/path kept; the live "
                              "config keeps the real URI",
                  "pairs_lost": None, "pairs_repeated": None, "recovery_s": None, "passed": passed})
    assert not leaks, f"the secret is in: {leaks}"
    assert names_hosts, shown
    assert live


class _Recorder(BaseHTTPRequestHandler):
    """Answers /health like an MLflow server; every other request 404 (MLflow then gives up)."""

    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self._answer()

    def do_POST(self):  # noqa: N802
        self._answer()

    def _answer(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        ok = self.path == "/prefix/health"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"not here")

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def mlflow_env():
    """Tracker.start moves credentials into MLflow's variables and MLflow sets its URI variable:
    both are put back afterwards."""
    import mlflow
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI")
    saved = {name: os.environ.pop(name, None) for name in names}
    yield
    mlflow.set_tracking_uri(None)
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


def test_health_check_and_mlflow_send_credentials_in_a_header_never_in_a_url(recorder, mlflow_env, caplog):
    from pixelbert_dist.config import TrackingConfig
    from pixelbert_dist.tracking import Tracker

    caplog.set_level(logging.WARNING, logger="pixelbert_dist.tracking")
    basic = "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()
    seen = {}
    for label, userinfo, header in (("password", f"alice:{SECRET}", basic), ("token", SECRET, f"Bearer {SECRET}")):
        _Recorder.seen = []
        tracker = Tracker(TrackingConfig(uri=f"http://{userinfo}@127.0.0.1:{recorder}/prefix/"), enabled=True)
        run_id = tracker.start(None, {"tracking.uri": tracker.cfg.uri}, {})
        seen[label] = (run_id, list(_Recorder.seen), header)
    logged = caplog.text
    paths = [path for _, requests, _ in seen.values() for path, _ in requests]
    health_first = all(requests and requests[0] == ("/prefix/health", header) for _, requests, header in seen.values())
    mlflow_too = all(any(p.startswith("/prefix/api/") and h == header for p, h in requests)
                     for _, requests, header in seen.values())
    gave_up_quietly = all(run_id is None for run_id, _, _ in seen.values()) and "training continues" in logged
    passed = (health_first and mlflow_too and gave_up_quietly and not any(SECRET in p for p in paths)
              and SECRET not in logged and f"127.0.0.1:{recorder}" in os.environ.get("MLFLOW_TRACKING_URI", "")
              and SECRET not in os.environ.get("MLFLOW_TRACKING_URI", ""))
    record_fault({"section": "security", "fault": "credentials of an http tracking URI sent in the URL",
                  "what_was_done": "tracking.uri http://alice:PASSWORD@host/prefix/ and http://TOKEN@host/prefix/ "
                                   "against a server recording each request's path and Authorization header",
                  "expected": "GET /prefix/health and MLflow's API calls with Basic (or Bearer) auth in the "
                              "header; no credentials in any path, log line or MLFLOW_TRACKING_URI",
                  "pairs_lost": None, "pairs_repeated": None, "recovery_s": None, "passed": passed})
    assert health_first and mlflow_too, seen
    assert not any(SECRET in p for p in paths), paths
    assert SECRET not in logged and gave_up_quietly, logged
    assert SECRET not in os.environ.get("MLFLOW_TRACKING_URI", "")
