"""Look at a run in MLflow's own UI: `mlflow server` on 127.0.0.1, a short training against it,
then headless Chromium on the run's page: a screenshot, and a check that the page shows the
run's metrics and its model artifact.

    make mlflow-ui-check     # installs Debian's chromium if absent, then runs this
    .venv/bin/python benchmarks/mlflow_ui.py [--out benchmarks/results] [--steps 6]

Writes benchmarks/results/mlflow_ui_<date>.png (the run page) and .md (what was checked).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pixelbert_dist.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = REPO / "benchmarks" / "results"
METRICS = ("train/loss", "train/mlm_loss", "train/itm_loss", "perf/samples_per_s")  # what the run page must show


def rest(url: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return proc, url
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError("mlflow server did not come up")
            time.sleep(0.5)


def train(root: Path, url: str, steps: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO)}
    python = [sys.executable, "-m"]
    run = lambda *args: subprocess.run([*python, *map(str, args)], cwd=root, env=env, check=True)  # noqa: E731
    run("data_pipeline.synthetic", "--out", "syn", "--num-images", 64, "--seed", 0)
    run("data_pipeline.shard", "--out", "shards", "--shard-size", 32, "--max-short-side", 128,
        "--max-long-side", 192, "--no-progress",
        "--source", "coco:captions=syn/annotations/captions.json,images=syn/images")
    run("pixelbert_dist.tokenizer", "--captions", "syn/annotations/captions.json", "--out", "vocab")
    run("pixelbert_dist.pretrain", "--config", REPO / "configs/pretrain/tiny-cpu.yaml",
        f"--deepspeed.config={REPO / 'configs/deepspeed/zero2.json'}", "--data.train_manifest=shards",
        "--data.tokenizer=vocab/vocab.txt", "--data.num_workers=0", "--train.global_batch_size=8",
        "--train.micro_batch_size=8", f"--train.max_steps={steps}", "--train.log_every=1",
        "--checkpoint.dir=checkpoints", f"--tracking.uri={url}", "--tracking.experiment=ui-check",
        "--tracking.run_name=ui-check", "--tracking.register_model=pixelbert-ui-check")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no chromium on PATH: `make mlflow-ui-check` installs Debian's package")


def look(url: str, screenshot: Path) -> str:
    """Render `url` headless; save a screenshot; return the rendered DOM."""
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1500,1100",
             "--virtual-time-budget=20000", f"--user-data-dir={tempfile.mkdtemp()}"]
    subprocess.run([chromium(), *flags, f"--screenshot={screenshot}", url], check=True, capture_output=True,
                   timeout=180)
    return subprocess.run([chromium(), *flags, "--dump-dom", url], check=True, capture_output=True, text=True,
                          timeout=180).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    date = datetime.date.today().isoformat()
    root = Path(tempfile.mkdtemp(prefix="mlflow-ui-"))
    server, url = start_server(root / "server")
    try:
        (root / "run").mkdir()
        train(root / "run", url, args.steps)
        api = f"{url}/api/2.0/mlflow"
        experiment = rest(f"{api}/experiments/get-by-name?experiment_name=ui-check")["experiment"]["experiment_id"]
        [run] = rest(f"{api}/runs/search", {"experiment_ids": [experiment]})["runs"]
        run_id = run["info"]["run_id"]
        page = f"{url}/#/experiments/{experiment}/runs/{run_id}"
        args.out.mkdir(parents=True, exist_ok=True)
        shot = args.out / f"mlflow_ui_{date}.png"
        dom = look(page, shot)
        artifacts = look(f"{page}/artifacts", args.out / f"mlflow_ui_artifacts_{date}.png")
        checks = {f"run page shows metric `{m}`": m in dom for m in METRICS}
        checks["run page shows the run name"] = "ui-check" in dom
        checks["artifacts page lists `model`"] = "model" in artifacts
        checks["artifacts page lists `config`"] = "config" in artifacts
        lines = [f"# MLflow UI check, {date}", "", f"`mlflow server` (MLflow {_mlflow_version()}) on 127.0.0.1, a "
                 f"{args.steps}-step tiny pre-training run logging to it, then headless Chromium "
                 f"({_chromium_version()}) on the run page `#/experiments/{experiment}/runs/{run_id}`.", "",
                 f"![run page]({shot.name})", "", "| check | result |", "|---|---|"]
        lines += [f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in checks.items()]
        lines += ["", f"Artifacts page: `{Path(args.out / f'mlflow_ui_artifacts_{date}.png').name}`.", ""]
        (args.out / f"mlflow_ui_{date}.md").write_text("\n".join(lines))
        print("\n".join(lines))
        return 0 if all(checks.values()) else 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)


def _mlflow_version() -> str:
    import mlflow
    return mlflow.__version__


def _chromium_version() -> str:
    return subprocess.run([chromium(), "--version"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
