"""The training benchmark end to end in quick mode (behaviour only; timings are not asserted)."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks import bench_train  # noqa: E402
from benchmarks.bench_train import Case  # noqa: E402


def _bench(tmp_path, *args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the run lands in tmp_path
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_train.py"), "--quick", "--out",
                           str(tmp_path), *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (md,) = tmp_path.glob("train_*.md")
    return md, json.loads(md.with_suffix(".json").read_text())


@pytest.mark.slow
def test_quick_run_one_and_two_ranks_and_the_loader_writes_table_json_plot_and_an_mlflow_run(tmp_path):
    # one run covers every kind of case: each process start and shard preparation costs the suite time
    md, data = _bench(tmp_path, "--world-sizes", "1,2", "--e2e", "--large-micro-batch", "32", timeout=500)
    assert md.with_suffix(".png").stat().st_size > 1000
    rows = {row["case"]: row for row in data["rows"]}
    assert {"plain-ws1", "zero2-ws1", "plain-ddp-ws2", "zero2-ws2", "zero2-ws1-loader",
            "plain-ws1-mb32", "zero2-ws1-mb32"} <= set(rows)
    assert rows["zero2-ws1-mb32"]["micro_batch"] == 32 and rows["zero2-ws1-mb32"]["vs_plain"] > 0
    for name in ("plain-ws1", "zero2-ws1"):
        row = rows[name]
        assert row["samples_per_s"] > 0 and row["step_s"] > 0 and row["memory_peak_gib"] > 0
        assert 0 < row["mfu"] < 1
        assert sum(v for k, v in row.items() if k.startswith("frac.")) == pytest.approx(1.0)
    assert rows["zero2-ws1"]["vs_plain"] > 0 and rows["zero2-ws2"]["vs_plain"] > 0
    micro = rows["zero2-ws1"]["micro_batch"]
    assert {f"zero2_ws1_mb{micro}_met", "zero2_ws1_mb32_met", "data_wait_zero2-ws1-loader"} <= set(data["targets"])
    loader = rows["zero2-ws1-loader"]
    assert loader["samples_per_s"] > 0 and 0 <= loader["frac.data"] < 1
    assert data["config"]["run"]["model"]["vocab_size"] == 1000
    text = md.read_text()
    assert "ZeRO-2 step time vs plain PyTorch" in text and "Cost projection" in text
    assert "Data wait, zero2-ws1-loader" in text
    with sqlite3.connect(tmp_path / "mlruns.db") as db:
        (experiment,) = db.execute("select experiment_id from experiments where name = 'benchmarks'").fetchone()
        assert db.execute("select count(*) from runs where experiment_id = ?", (experiment,)).fetchone()[0] == 1


def _run(case: Case, medians: list[float]) -> list[dict]:
    return [{"case": case.label, "engine": case.engine, "stage": case.stage, "world_size": case.world_size,
             "data": case.data, "case_micro_batch": case.micro_batch, "micro_batch": case.micro_batch or 10,
             "step_time_median_s": m, "samples_per_s": 9 / m,
             "gflops_per_sample": 1.0, "peak_tflops": 0.1 * (i + 1), "frac.data": 0.01 * i}
            for i, m in enumerate(medians)]


def test_rows_take_the_median_round_and_pair_ratios_by_round():
    plain, zero = Case("plain"), Case("zero", 2)
    rows = {r["case"]: r for r in bench_train.aggregate({
        "plain-ws1": _run(plain, [1.0, 2.0, 1.1]),        # round 2 was slow for everyone
        "zero2-ws1": _run(zero, [1.05, 2.1, 1.155])})}
    assert rows["plain-ws1"]["step_s"] == 1.1 and rows["zero2-ws1"]["step_s"] == 1.155
    assert rows["zero2-ws1"]["vs_plain"] == pytest.approx(1.05)
    assert (rows["plain-ws1"]["step_s_min"], rows["plain-ws1"]["step_s_max"]) == (1.0, 2.0)
    # throughput from the median step, MFU against the best peak any round measured
    assert rows["plain-ws1"]["samples_per_s"] == pytest.approx(10 / 1.1)
    assert rows["plain-ws1"]["mfu"] == pytest.approx(1e9 * 10 / 1.1 / 0.3e12)
    assert rows["plain-ws1"]["data_wait_median"] == pytest.approx(0.01)


def test_a_large_micro_batch_zero_case_is_compared_with_plain_at_the_same_micro_batch():
    plain, zero, plain_large, zero_large = Case("plain"), Case("zero", 2), Case("plain", micro_batch=40), \
        Case("zero", 2, micro_batch=40)
    rows = {r["case"]: r for r in bench_train.aggregate({
        "plain-ws1": _run(plain, [1.0]), "zero2-ws1": _run(zero, [1.2]),
        "plain-ws1-mb40": _run(plain_large, [4.0]), "zero2-ws1-mb40": _run(zero_large, [4.2])})}
    assert rows["zero2-ws1"]["vs_plain"] == pytest.approx(1.2)
    assert rows["zero2-ws1-mb40"]["vs_plain"] == pytest.approx(1.05)
    assert rows["zero2-ws1-mb40"]["added_s"] == pytest.approx(0.2)
    assert rows["zero2-ws1-mb40"]["samples_per_s"] == pytest.approx(40 / 4.2)


def test_projection_shows_the_arithmetic():
    text, data = bench_train.projection({"samples_per_s": 100.0, "case": "zero2-ws1", "micro_batch": 8,
                                         "device": "NVIDIA H100 80GB HBM3", "source_file": "x.json"}, [64])
    samples = sum(bench_train.PAPER_PAIRS.values()) * 40
    assert data["gpu_hours"] == pytest.approx(samples / 100 / 3600)
    assert data["days"][64] == pytest.approx(data["gpu_hours"] / 64 / 24)
    assert f"{data['gpu_hours']:,.0f} GPU-hours" in text
    assert bench_train.projection(None, [64])[1]["measured"] is False
