"""How tests start things: a free port on loopback, and a training job in its own processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's torchrun, deepspeed, ray, moto_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
