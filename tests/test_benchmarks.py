"""The benchmarks run end to end in quick mode (behaviour only; timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sharding_benchmark_quick_mode_writes_table_json_and_plot(tmp_path):
    # its own process: the benchmark starts and stops a Ray cluster of its own
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_sharding.py"), "--quick",
                           "--scenarios", "downscale", "--img2dataset", str(tmp_path / "absent"),
                           "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (md,) = tmp_path.glob("sharding_*.md")
    data = json.loads(md.with_suffix(".json").read_text())
    assert md.with_suffix(".png").stat().st_size > 1000
    tools = {row["tool"]: row for row in data["rows"]}
    assert set(tools) == {"baseline", "ours"}
    assert tools["ours"]["images"] == tools["baseline"]["images"] == 60
    assert "img2dataset: not installed, not measured" in md.read_text()
