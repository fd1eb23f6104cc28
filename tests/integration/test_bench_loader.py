"""The image-path benchmark runs end to end in quick mode (behaviour only; timings are not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CPU_METHODS = {"pil", "torchvision-cpu", "dali-cpu"}


@pytest.mark.slow
def test_loader_benchmark_quick_mode_writes_table_json_and_plot(tmp_path):
    pytest.importorskip("nvidia.dali")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_loader.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (md,) = tmp_path.glob("loader_*.md")
    assert md.with_suffix(".png").stat().st_size > 1000
    data = json.loads(md.with_suffix(".json").read_text())
    rows = {(row["setting"], row["method"]): row for row in data["rows"]}
    assert {setting for setting, _ in rows} == {"224/384", "800/1333"}
    for (setting, method), row in rows.items():
        if method in CPU_METHODS:
            assert row["status"] == "ok", row
            assert row["images/s"] > 0 and row["ms/batch"] > 0
            # same sizes and masks as the PIL path, pixels within the filters' gap
            assert row["max abs diff vs pil (levels)"] <= 16
        elif "images/s" not in row:
            assert row["status"].startswith("not measured")
            assert row["status"] in md.read_text()
    assert rows[("224/384", "pil")]["vs pil"] == 1.0
