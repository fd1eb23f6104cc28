"""The training-step lever benchmark in quick mode (behaviour only; timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks import bench_step  # noqa: E402


@pytest.mark.slow
def test_quick_run_writes_lever_rows_with_ratios_and_the_same_losses(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_step.py"), "--quick", "--out", str(tmp_path),
                           "--rows", "+fused,zero2-today", "--checkpoint-batches", ""],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (md,) = tmp_path.glob("step_*.md")
    rows = {r["name"]: r for r in json.loads(md.with_suffix(".json").read_text())["rows"]}
    # one lever row (+fold and the rest run the same code path; folding itself: test_backbone.py)
    assert set(rows) == {"today", "+fused", "zero2-today"}
    assert rows["+fused"]["levers"] == ["fused"] and rows["+fused"]["speedup_vs_today"] > 0
    assert rows["zero2-today"]["zero2_vs_plain"] > 0
    # the levers change the cost, not the step: the same losses on the same batches
    assert rows["+fused"]["loss_vs_today"] < 1e-4
    assert "| +fused | fused |" in md.read_text()


def test_padding_cost_grows_with_the_multiple_and_shapes_stay_few():
    cost = {r["pad multiple"]: r for r in bench_step.padding_cost(800, 1333, 8, batches=300)}
    plain, buckets = cost["64 (one token cell)"], cost["128 (buckets)"]
    assert 1.0 < plain["canvas / valid pixels"] <= buckets["canvas / valid pixels"]
    assert buckets["distinct canvas shapes"] <= plain["distinct canvas shapes"]
