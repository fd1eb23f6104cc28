"""Shared by the benchmarks: hardware tag, memory sampling, and result files a person can read.

Every benchmark writes benchmarks/results/<theme>_<hardware>_<date>.{md,json,png}.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def hardware_tag() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-").lower()
    except ImportError:
        pass
    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


class MemoryPeak:
    """Peak rise of the machine's used memory while the block runs (all processes it starts)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, (psutil.virtual_memory().used - self._start) / 2**20)
            time.sleep(self.interval)

    def __enter__(self) -> "MemoryPeak":
        self._start = psutil.virtual_memory().used
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(value) -> str:
        return f"{value:,.2f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def result_stem(theme: str, out_dir: Path = RESULTS) -> Path:
    """<out_dir>/<theme>_<hardware>_<date>: the result files' names without their suffix."""
    return out_dir / f"{theme}_{hardware_tag()}_{datetime.date.today().isoformat()}"


def append_row(path: Path, row: dict) -> None:
    """One measured row as a JSON line, on disk at once: a run cut off by its deadline keeps
    every row it measured (the .md/.json come only at the end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out:
        out.write(json.dumps(row) + "\n")
        out.flush()
        os.fsync(out.fileno())


def write_results(theme: str, title: str, body_md: str, data: dict, plot=None,
                  out_dir: Path = RESULTS) -> Path:
    """Write <theme>_<hardware>_<date>.md/.json (and .png when `plot(path)` is given)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(theme, out_dir)
    data = {"theme": theme, "hardware": hardware_tag(), "date": datetime.date.today().isoformat(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), **data}
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    if plot is not None:
        plot(stem.with_suffix(".png"))
    config = "```json\n" + json.dumps(data.get("config", {}), indent=1) + "\n```"
    image = f"\n![{theme}]({stem.with_suffix('.png').name})\n" if plot is not None else ""
    stem.with_suffix(".md").write_text(f"# {title}\n\n{hardware_tag()}, {data['date']}\n\n{body_md}\n"
                                       f"{image}\n## Configuration\n\n{config}\n")
    return stem.with_suffix(".md")


def log_mlflow(benchmark: str, out: Path, params: dict, rows: list[dict], targets: dict,
               files: list[Path]) -> str | None:
    """One run in the experiment "benchmarks" (rows keyed by their "case"); a failing MLflow costs a warning."""
    try:
        import mlflow
    except ImportError:
        print("mlflow not installed: run not logged")
        return None
    try:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlruns.db').resolve()}"
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_experiment_by_name("benchmarks")
        if experiment is None:
            # artifacts beside the database (ignored by git as mlruns/), not in the working folder
            location = (out / "mlruns").resolve().as_uri() if uri.startswith("sqlite") else None
            experiment_id = mlflow.create_experiment("benchmarks", artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        from pixelbert_dist.tracking import flatten
        with mlflow.start_run(experiment_id=experiment_id, run_name=files[0].stem) as run:
            mlflow.set_tag("benchmark", benchmark)
            mlflow.log_params({k: str(v)[:500] for k, v in flatten("", params).items()})
            metrics = {f"{row['case']}.{key}": float(value) for row in rows if "error" not in row
                       for key, value in row.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool)}
            metrics.update({k: float(v) for k, v in targets.items()})
            mlflow.log_metrics(metrics)
            for path in files:
                if path.exists():
                    mlflow.log_artifact(str(path))
            return run.info.run_id
    except Exception as err:  # tracking never fails a benchmark
        print(f"MLflow logging failed ({err}); results are in the files")
        return None


def timed_step(timer, forward, backward, step, batch):
    """One training step timed by phase (forward, backward, optimizer) on `timer`; the model's output."""
    with timer.phase("forward"):
        out = forward(batch)
    with timer.phase("backward"):
        backward(out.loss)
    with timer.phase("optimizer"):
        step()
    timer.end_step(samples=batch.input_ids.shape[0])
    return out
