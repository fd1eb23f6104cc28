import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from pixelbert_dist import metrics
from pixelbert_dist.metrics import StepTimer, datasheet_peak, device_peak, mfu
from tests.launch import REPO


def test_mfu_of_known_numbers():
    # 574 GFLOP per sample at 100 samples/s is 57.4 TFLOP/s: 5.8% of an H100's 989.5 TFLOP/s
    assert mfu(574e9, 100.0, 989.5e12) == pytest.approx(0.058009, rel=1e-4)
    assert mfu(1e12, 2.0, 4e12) == 0.5
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


@pytest.mark.parametrize("name, precision, row, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", "H100 SXM", 989.5),
    ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "fp16", "H100 NVL", 835.5),
    ("NVIDIA H200", "bf16", "H200 SXM", 989.5),
    ("NVIDIA H100 80GB HBM3", "fp32", "H100 SXM", 67.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "tf32", "A100", 156.0),
    ("Tesla V100-SXM2-32GB", "fp16", "V100 SXM2", 125.0),
    ("Tesla V100S-PCIE-32GB", "fp32", "V100S PCIe", 16.4),
])
def test_datasheet_table_matches_device_names(name, precision, row, tflops):
    found = datasheet_peak(name, precision)
    assert found is not None and found[0] == row
    assert found[1] == pytest.approx(tflops * 1e12)


def test_unknown_gpu_or_precision_is_not_in_the_table():
    assert datasheet_peak("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores
    assert datasheet_peak("Some Future GPU", "bf16") is None


def test_cpu_peak_is_positive_and_measured_once_per_process():
    metrics.measured_peak.cache_clear()
    began = time.perf_counter()
    first = device_peak("fp32", "cpu")
    measuring = time.perf_counter() - began
    began = time.perf_counter()
    second = device_peak("fp32", "cpu")
    cached = time.perf_counter() - began
    assert first.flops > 1e8 and first.source.startswith("measured")
    assert second == first
    assert metrics.measured_peak.cache_info().hits >= 1
    assert cached < measuring / 10


def _timed_steps(timer, steps, naps):
    for _ in range(steps):
        for name, seconds in naps.items():
            with timer.phase(name):
                time.sleep(seconds)
        time.sleep(0.005)  # outside any phase: "other"
        timer.end_step(samples=8)


def test_breakdown_sums_to_the_step_time():
    timer = StepTimer(flops_per_sample=1e9, peak_flops=1e12, world_size=2, device="cpu")
    naps = {"data": 0.01, "forward": 0.02, "backward": 0.03, "optimizer": 0.01}
    _timed_steps(timer, 4, naps)
    out = timer.summary()
    assert out["steps"] == 4
    fractions = sum(v for k, v in out.items() if k.startswith("frac."))
    assert fractions == pytest.approx(1.0, abs=1e-9)
    phases = sum(v for k, v in out.items() if k.startswith("time."))
    assert phases == pytest.approx(out["step_time_s"], rel=1e-9)
    for name, seconds in naps.items():  # sleeps overshoot a little, never undershoot
        assert seconds <= out[f"time.{name}_s"] < seconds + 0.02
    assert out["time.other_s"] >= 0.004
    assert out["samples_per_s_per_device"] == pytest.approx(8 / out["step_time_s"])
    assert out["samples_per_s"] == pytest.approx(2 * out["samples_per_s_per_device"])
    assert out["images_per_s"] == out["samples_per_s"]
    assert out["mfu"] == pytest.approx(1e9 * out["samples_per_s_per_device"] / 1e12)
    assert out["memory_peak_gib"] > 0


def test_summary_starts_a_new_window_and_phases_must_not_nest():
    timer = StepTimer(device="cpu")
    _timed_steps(timer, 2, {"forward": 0.001})
    assert timer.summary()["steps"] == 2
    assert timer.summary() == {"steps": 0.0}
    _timed_steps(timer, 1, {"forward": 0.001})
    assert "mfu" not in timer.summary()  # no FLOPs or peak given: no MFU
    with pytest.raises(RuntimeError):
        with timer.phase("forward"):
            with timer.phase("backward"):
                pass
    with pytest.raises(ValueError):
        with timer.phase("other"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_gpu_peak_comes_from_the_table_and_memory_from_torch():
    peak = device_peak("bf16")
    assert peak.flops > 1e13
    assert metrics.peak_memory_gib() >= 0


# A process with a tracked run (rank 0's tracker, a real MLflow sqlite store) that forks a child, as
# the loader forks its workers after the run started, then is sent SIGTERM, as torchrun and the
# deepspeed launcher stop their ranks.
_SIGTERMED = """
import os, signal, sys
from mlflow import MlflowClient
from pixelbert_dist.config import TrackingConfig
from pixelbert_dist.tracking import Tracker

tracker = Tracker(TrackingConfig(uri=sys.argv[1], experiment="sigterm"), enabled=True)
run_id = tracker.start(None, {"train.seed": 1}, {"job": "pretrain"})
worker = os.fork()
if worker == 0:
    os.kill(os.getpid(), signal.SIGTERM)
    os._exit(0)  # not reached: it dies of the signal
_, status = os.waitpid(worker, 0)
print("worker died of", os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, "run",
      MlflowClient().get_run(run_id).info.status, flush=True)
os.kill(os.getpid(), signal.SIGTERM)
signal.pause()  # not reached
"""


def test_sigterm_ends_the_mlflow_run_killed_and_the_process_still_dies_of_it(tmp_path):
    done = subprocess.run([sys.executable, "-c", _SIGTERMED, f"sqlite:///{tmp_path / 'mlruns.db'}"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    with sqlite3.connect(tmp_path / "mlruns.db") as con:
        ended = con.execute("select status, (select value from tags where key = 'failure') from runs").fetchall()
    assert done.returncode == -signal.SIGTERM, done.stdout + done.stderr[-3000:]
    assert f"worker died of {signal.SIGTERM.value} run RUNNING" in done.stdout  # the child left the run alone
    assert ended == [("KILLED", "stopped by SIGTERM")]
