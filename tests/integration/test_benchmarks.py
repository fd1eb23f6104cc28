"""The benchmarks run end to end in quick mode (behaviour only; timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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


def test_downstream_noise_bound_counts_images_and_captions_as_retrieval_queries():
    from benchmarks.bench_downstream import noise
    # 2 x sqrt(2 x 0.25 / 100) = 0.1414: two standard errors of a difference at p = 0.5, n = 100
    assert noise({"questions": 100}) == pytest.approx(14.142, abs=1e-3)
    assert noise({"examples": 100}) == noise({"questions": 100})
    # r_mean = half image-query recalls (60), half caption-query recalls (300):
    # 2 x sqrt(2 x (0.25 / 4) x (1/60 + 1/300)) = 2 x sqrt(0.0025) = 0.1
    assert noise({"images": 60, "captions": 300}) == pytest.approx(10.0)


def test_objectives_runs_logged_before_accuracies_were_percentages_are_read_back_in_percent():
    from benchmarks.bench_objectives import in_percent
    old = {"variant": "matched", "seed": 0, "itm_accuracy": 0.67, "mlm_accuracy": 0.57, "r_mean": 15.5}
    new = in_percent(old)
    assert new["itm_accuracy"] == pytest.approx(67) and new["mlm_accuracy"] == pytest.approx(57)
    assert new["r_mean"] == 15.5 and new["accuracy_unit"] == "%"
    assert in_percent(new) == new  # a row already in % is left as it is


@pytest.mark.slow
def test_data_scale_benchmark_quick_mode_measures_fresh_processes_and_writes_results(tmp_path):
    # 5 shards of 10,000 (hard links of one tar): 512 parts of ~98 pairs, so the worker makes its 3 batches
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_data_scale.py"), "--quick", "--sizes",
                           "50000", "--repeats", "1", "--v1-max", "0", "--index-tars", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (md,) = tmp_path.glob("data_scale_*.md")
    data = json.loads(md.with_suffix(".json").read_text())
    assert md.with_suffix(".png").stat().st_size > 1000
    (row,) = data["rows"]
    assert "error" not in row and "worker error" not in row, row
    assert (row["format"], row["pairs"], row["shards"]) == ("v2", 50_000, 5)
    (rank,) = data["runs"]["v2-50000-rank"]
    (worker,) = data["runs"]["v2-50000-worker"]
    # the rank planned every pair over 512 x 4 parts; the worker read its first 3 batches from the real tar
    assert (rank["pairs"], rank["parts"]) == (50_000, 2048)
    assert (worker["batches"], worker["pairs_read"]) == (3, 96)
    assert all(isinstance(row[k], float) for k in ("rank s", "rank PSS MB", "rank RSS MB", "worker PSS MB"))
    assert "400M pairs: not run" in md.read_text()


@pytest.mark.slow
def test_objectives_benchmark_quick_mode_runs_both_variants_resumes_and_counts_only_real_differences(tmp_path):
    from benchmarks.bench_objectives import compare
    argv = [sys.executable, str(REPO / "benchmarks/bench_objectives.py"), "--quick", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (md,) = tmp_path.glob("objectives_*.md")
    data = json.loads(md.with_suffix(".json").read_text())
    assert md.with_suffix(".png").stat().st_size > 1000
    assert sorted((r["variant"], r["seed"]) for r in data["runs"]) == [("every", 0), ("matched", 0)]
    # accuracies in % like the recalls: ITM has balanced labels, so even untrained it is far above 1
    assert all(10 <= r["itm_accuracy"] <= 90 and 0 <= r["r_mean"] <= 100 for r in data["runs"])
    # a rerun finds both runs finished and trains nothing
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*-seed0/log.txt")}
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(logs) == 2 and {p: p.stat().st_mtime_ns for p in logs} == logs
    assert len((tmp_path / "work/runs.jsonl").read_text().splitlines()) == 2
    # a difference counts only beyond two standard errors of the difference of the means
    runs = [{"variant": v, "seed": s, "itm_accuracy": a, "mlm_accuracy": 50.0, "image_r1": 1.0, "image_r5": 1.0,
             "image_r10": 1.0, "text_r1": 1.0, "text_r5": 1.0, "text_r10": 1.0, "r_mean": r}
            for v, values in (("matched", [(70, 20), (72, 30), (74, 40)]),
                              ("every", [(60, 25), (62, 35), (64, 45)]))
            for s, (a, r) in enumerate(values)]
    rows = {row["metric"]: row for row in compare(runs)}
    assert rows["itm_accuracy"]["difference"] == pytest.approx(10)
    assert rows["itm_accuracy"]["2 se"] == pytest.approx(2 * (2 * (2 / 3**0.5) ** 2) ** 0.5)  # se = sd / sqrt(3)
    assert rows["itm_accuracy"]["verdict"] == "matched better"
    assert rows["r_mean"]["verdict"] == "no real difference"  # -5 within 2 x 8.2
    assert compare(runs[:1] + runs[3:4])[0]["verdict"] == "too few seeds"
