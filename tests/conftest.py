import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# DeepSpeed JIT-builds its shm comm op (18 s) at init (`make venv` builds it ahead). It was rebuilt over and over: ninja from
# the venv (1.13) and the system's (1.11) hash commands differently, so jobs started with and
# without the venv on PATH each found the other's build stale; and ~/.cache/torch_extensions is
# shared with other checkouts. The venv first on PATH, as if activated, and one folder per venv:
# built once for the suite.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

from pixelbert_dist.config import load_config  # noqa: E402
from tests.launch import REPO, free_port, start_moto, wait_until_answering  # noqa: E402
TINY = REPO / "configs" / "pretrain" / "tiny-cpu.yaml"


@pytest.fixture
def tiny_cfg():
    """The shipped tiny config, so tests exercise what users run (with a fixed vocab size)."""
    torch.manual_seed(0)
    return load_config(TINY, ["--model.vocab_size=1000"])


def mlflow_metrics(db: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric in an MLflow sqlite store: key -> [(step, value), ...] in step order."""
    import sqlite3
    with sqlite3.connect(db) as con:
        rows = con.execute("select key, step, value from metrics order by step").fetchall()
    out: dict[str, list[tuple[int, float]]] = {}
    for key, step, value in rows:
        out.setdefault(key, []).append((step, value))
    return out


@pytest.fixture
def one_rank_group():
    """A one-process gloo group (checkpoint mirror code gathers over ranks), unless one is up."""
    import torch.distributed as dist
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", world_size=1, rank=0, init_method=f"tcp://127.0.0.1:{free_port()}")
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server as a real process on 127.0.0.1; code reaches it only through boto3."""
    proc, endpoint, env = start_moto()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket per test."""
    import re
    import uuid

    from data_pipeline.storage import s3_client
    name = re.sub(r"[^a-z0-9-]", "-", f"t-{request.node.name.lower()}")[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One real local Ray cluster for the session (started after the S3 env is set, so workers see it)."""
    import ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 as its own process tree; yields the job-submission address.

    Started with --block and stopped by signalling that process, not `ray stop`, which would
    also kill the session's in-process cluster.
    """
    import subprocess
    import sys
    import time
    import urllib.request

    bin_dir = Path(sys.executable).parent
    port, dashboard = free_port(), free_port()
    # Token authentication as docs/training.md sets it up: RAY_AUTH_MODE=token for the head and the
    # client, and one token made by `ray get-auth-token --generate` in ~/.ray/auth_token (a home of
    # its own here, so the user's token is neither read nor overwritten).
    home = tmp_path_factory.mktemp("ray-home")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "HOME": str(home)}
    for inherited in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(inherited, None)
    subprocess.run([str(bin_dir / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    assert (home / ".ray" / "auth_token").stat().st_size > 0
    proc = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         # agents default to fixed ports that the session's in-process cluster already holds
         *(f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "metrics-export-port", "runtime-env-agent-port",
                                                    "ray-client-server-port")),
         "--disable-usage-stats", f"--temp-dir={tmp_path_factory.mktemp('ray')}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    import signal
    import urllib.error
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 under Ray's token auth: the server is up
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError("ray start --head did not come up")
            time.sleep(0.5)
    # The dashboard answers before its job agent is ready: wait until a trivial job runs.
    while True:
        probe = subprocess.run([str(bin_dir / "ray"), "job", "submit", "--address", address, "--",
                                "python", "-c", "pass"], env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            break
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"the Ray head never accepted a job: {probe.stdout[-1500:]} {probe.stderr[-1500:]}")
        time.sleep(1)
    yield {"jobs": address, "gcs": f"127.0.0.1:{port}", "env": env}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` as a real process on 127.0.0.1 with a sqlite backend store and served
    artifacts; yields its URL."""
    import signal
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"), start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job-runner processes: not used
    wait_until_answering(proc, f"{url}/health", "mlflow server", 120, log=root / "server.log")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
