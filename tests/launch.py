"""How tests start things: a free port on loopback, and a training job in its own processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pixelbert_dist.distributed import free_port  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's torchrun, deepspeed, ray, moto_server


def job_env(**extra: str) -> dict[str, str]:
    """One thread per process (2 cores), DeepSpeed on the CPU, the repo importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), **extra}


def job_command(job: str, nproc: int = 1, launcher: str = "torchrun") -> list[str]:
    """`python -m pixelbert_dist.<job>` under torchrun (on a free port) or as one plain process."""
    if launcher == "python":
        assert nproc == 1, "a plain process is one rank"
        return [sys.executable, "-m", f"pixelbert_dist.{job}"]
    return [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", f"pixelbert_dist.{job}"]


def run_job(job: str, argv: Sequence[str], workdir: Path, nproc: int = 1, launcher: str = "torchrun",
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a job to its end in `workdir`; stdout and stderr captured."""
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run([*job_command(job, nproc, launcher), *map(str, argv)], cwd=workdir, env=job_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_job(job: str, argv: Sequence[str], workdir: Path, nproc: int = 1, **popen) -> subprocess.Popen:
    """Start a job and return at once (for tests that kill it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([*job_command(job, nproc), *map(str, argv)], cwd=workdir, env=job_env(), **popen)


def wait_until_answering(proc: subprocess.Popen, url: str, what: str, timeout_s: float,
                         log: Path | None = None) -> None:
    """Return once `url` answers; if `proc` exits or `timeout_s` passes first, kill it (its
    whole session when it has one of its own) and raise, with the tail of `log` if given."""
    import signal
    import time
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                if proc.poll() is None:
                    if os.getpgid(proc.pid) == proc.pid:  # started with a session of its own
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.kill()
                raise RuntimeError(f"{what} did not come up" + (f": {log.read_text()[-2000:]}" if log else ""))
            time.sleep(0.2)


def start_moto() -> tuple[subprocess.Popen, str, dict[str, str]]:
    """moto's S3 server as a process on a free loopback port, answering: (process, endpoint,
    the AWS environment that points boto3 at it)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_answering(proc, endpoint, "moto_server", 30)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    return proc, endpoint, env


def spawn_ranks(target, world: int, timeout_s: float = 120) -> dict[int, object]:
    """`target(rank, world, port, queue)` in `world` spawned processes that meet at a free
    loopback port; each puts (rank, result) on the queue. The results by rank, once every
    process has exited 0."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=target, args=(rank, world, port, queue)) for rank in range(world)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=timeout_s) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0, f"rank {procs.index(proc)} exited with {proc.exitcode}"
    return results
