"""Look at runs in MLflow's own UI: `mlflow server` on 127.0.0.1, two short trainings of the tiny
config against it with the same seed (MLflow's own random names would collide), then:

- the REST API: the two run names differ and follow the trainer's naming (job, backbone,
  layers, start time), the experiment carries `mlflow.experimentKind`, and every metric key
  sits in one of the trainer's sections (train/, eval/, perf/, phase/, lr/, progress/, data/)
  or MLflow's own system/;
- headless Chromium: screenshots and rendered text of the experiment page as a fresh browser
  opens it (the product means it to open on the training runs, not on GenAI traces) and with
  the sidebar's "Model training" switch (`?workflowType=machine_learning`), the compare-runs
  page of the two runs, the experiment's charts (both runs, one section per metric prefix),
  the first run's charts, its overview and its artifacts.

    make mlflow-ui-check     # installs Debian's chromium if absent, then runs this
    .venv/bin/python benchmarks/mlflow_ui.py [--out benchmarks/results] [--steps 4] [--docs docs/images]

Writes benchmarks/results/mlflow_ui_<date>.md (each check, pass or FAIL) and its PNGs; when the
compare page's checks pass, copies its screenshot to docs/images/mlflow-compare.png for docs/tracking.md.
"""

from __future__ import annotations

import argparse
import datetime
import html.parser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from pixelbert_dist.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = REPO / "benchmarks" / "results"
DOCS_IMAGES = REPO / "docs" / "images"
EXPERIMENT = "ui-check"
# The browser reaches the server by a name that is not loopback, as a shared server's users do:
# on localhost MLflow opens its local-only Assistant panel over a quarter of every page.
HOST = "mlflow-ui-check.test"
ML_VIEW = "workflowType=machine_learning"  # the sidebar's "Model training" switch, as a URL parameter
TABLE_NAME_CHARS = 24  # what the runs table shows of a name at its default column width, then "..."
METRICS = ("train/loss", "train/mlm_loss", "train/itm_loss", "perf/samples_per_s")  # what the run page must show
SECTIONS = ("train", "eval", "perf", "phase", "lr", "progress", "data")  # pixelbert_dist.tracking.metric_name
KIND = ("mlflow.experimentKind", "custom_model_development")
WINDOW = (1400, 900)


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
                             "--artifacts-destination", str(root / "artifacts"),
                             "--allowed-hosts", f"127.0.0.1:{port},{HOST}:{port}",
                             "--cors-allowed-origins", f"http://{HOST}:{port}"],
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


def _module(root: Path, *args) -> str:
    """Run `python -m ARGS` in `root`; its stderr (shown, and returned)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=root, env=env, stderr=subprocess.PIPE,
                          text=True)
    sys.stderr.write(done.stderr)
    if done.returncode:
        raise SystemExit(f"python -m {args[0]} failed ({done.returncode})")
    return done.stderr


def prepare(root: Path) -> None:
    """Synthetic pairs to train on, 32 held-out images for the zero-shot eval, a vocabulary."""
    for name, count, seed in (("syn", 64, 0), ("heldout", 32, 1)):
        _module(root, "data_pipeline.synthetic", "--out", name, "--num-images", count, "--seed", seed)
        _module(root, "data_pipeline.shard", "--out", f"{name}-shards", "--shard-size", 32, "--max-short-side", 128,
                "--max-long-side", 192, "--no-progress",
                "--source", f"coco:captions={name}/annotations/captions.json,images={name}/images")
    _module(root, "pixelbert_dist.tokenizer", "--captions", "syn/annotations/captions.json", "--out", "vocab")


def train(root: Path, url: str, steps: int, checkpoints: str) -> str:
    """The tiny config with its default seed and no tracking.run_name: the trainer names the run.
    Each run has its own checkpoint folder, or the second would resume the first's run. Returns
    the link to the run that the trainer logs."""
    log = _module(root, "pixelbert_dist.pretrain", "--config", REPO / "configs/pretrain/tiny-cpu.yaml",
            f"--deepspeed.config={REPO / 'configs/deepspeed/zero2.json'}", "--data.train_manifest=syn-shards",
            "--data.eval_manifest=heldout-shards", "--data.tokenizer=vocab/vocab.txt", "--data.num_workers=0",
            "--train.global_batch_size=8", "--train.micro_batch_size=8", f"--train.max_steps={steps}",
            "--train.log_every=1", f"--checkpoint.dir={checkpoints}", f"--tracking.uri={url}",
            f"--tracking.experiment={EXPERIMENT}", "--tracking.register_model=pixelbert-ui-check")
    found = re.search(r"MLflow run '[^']*': (\S+)", log)
    return found[1] if found else ""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no chromium on PATH: `make mlflow-ui-check` installs Debian's package")


class _Text(html.parser.HTMLParser):
    """The page's text nodes, stripped, in order (scripts and styles left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.nodes.append(" ".join(data.split()))


def look(url: str, screenshot: Path) -> list[str]:
    """Render `url` headless in a fresh profile (nothing remembered from an earlier page); save a
    screenshot of the window; return the rendered page's text nodes, the page title first."""
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=20000",
             "--run-all-compositor-stages-before-draw",  # else a loaded machine saves half-painted tables
             f"--host-resolver-rules=MAP {HOST} 127.0.0.1", "--disable-features=HttpsUpgrades",
             f"--user-data-dir={tempfile.mkdtemp()}"]
    subprocess.run([chromium(), *flags, f"--screenshot={screenshot}", url], check=True, capture_output=True,
                   timeout=180)
    parser = _Text()
    parser.feed(subprocess.run([chromium(), *flags, "--dump-dom", url], check=True, capture_output=True, text=True,
                               timeout=180).stdout)
    return parser.nodes


def name_checks(runs: list[dict]) -> dict[str, bool]:
    """Run names as pixelbert_dist.tracking.run_name makes them: `<MMDD-HHMMSS> <job> <backbone>-L<layers>`,
    the time the run started (local time, as the trainer writes it)."""
    names = [run["info"]["run_name"] for run in runs]
    checks = {f"the two run names differ ({' / '.join(f'`{n}`' for n in names)})": len(set(names)) == len(names)}
    for run in runs:
        params = {p["key"]: p["value"] for p in run["data"].get("params", [])}
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        name = run["info"]["run_name"]
        match = re.fullmatch(rf"(\d{{4}}-\d{{6}}) {re.escape(tags.get('job', '?'))} "
                             rf"{re.escape(params.get('model.backbone', '?'))}-L{re.escape(params.get('model.num_layers', '?'))}",
                             name)
        started = datetime.datetime.fromtimestamp(run["info"]["start_time"] / 1000)
        named_at = match and datetime.datetime.strptime(f"{started.year}{match[1]}", "%Y%m%d-%H%M%S")
        checks[f"`{name}` is job, backbone, layers and start time"] = bool(
            named_at and abs((started - named_at).total_seconds()) < 5)
    shown = [n[:TABLE_NAME_CHARS] for n in names]
    checks[f"the names differ in their first {TABLE_NAME_CHARS} characters, what the runs table shows "
           f"(`{'` / `'.join(shown)}`)"] = len(set(shown)) == len(shown)
    return checks


def section_checks(runs: list[dict]) -> dict[str, bool]:
    checks = {}
    for run in runs:
        keys = sorted(m["key"] for m in run["data"].get("metrics", []))
        outside = [k for k in keys if "/" not in k or k.split("/")[0] not in (*SECTIONS, "system")]
        checks[f"`{run['info']['run_name']}`: all {len(keys)} metric keys in a section"
               + (f" (outside: {', '.join(outside)})" if outside else "")] = not outside
        missing = [s for s in SECTIONS if not any(k.startswith(f"{s}/") for k in keys)]
        checks[f"`{run['info']['run_name']}`: logs every section"
               + (f" (missing: {', '.join(missing)})" if missing else "")] = not missing
    return checks


def chart_sections(nodes: list[str]) -> list[str]:
    """The section headers of a charts page: a title followed by its chart count, `train` `(5)`."""
    return [title for title, count in zip(nodes, nodes[1:]) if re.fullmatch(r"\(\d+\)", count)]


def compare_url(url: str, run_ids: list[str], experiment: str) -> str:
    """MLflow 3's route, from its JS build: `/compare-runs?runs=<JSON list>&experiments=<JSON list>`."""
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment])})
    return f"{url}/#/compare-runs?{query}&{ML_VIEW}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--docs", type=Path, default=DOCS_IMAGES, help="where the docs' screenshots go")
    args = parser.parse_args(argv)
    date = datetime.date.today().isoformat()
    root = Path(tempfile.mkdtemp(prefix="mlflow-ui-"))
    server, url = start_server(root / "server")
    try:
        (root / "run").mkdir()
        prepare(root / "run")
        links = [train(root / "run", url, args.steps, f"checkpoints-{index}") for index in (1, 2)]
        api = f"{url}/api/2.0/mlflow"
        experiment = rest(f"{api}/experiments/get-by-name?experiment_name={EXPERIMENT}")["experiment"]
        experiment_id = experiment["experiment_id"]
        runs = rest(f"{api}/runs/search", {"experiment_ids": [experiment_id],
                                           "order_by": ["attributes.start_time ASC"]})["runs"]
        checks = {"two runs in the experiment": len(runs) == 2}
        kind = {t["key"]: t["value"] for t in experiment.get("tags", [])}.get(KIND[0])
        checks[f"experiment tag `{KIND[0]}` is `{KIND[1]}` (found `{kind}`)"] = kind == KIND[1]
        checks |= name_checks(runs)
        checks |= section_checks(runs)

        names = [run["info"]["run_name"] for run in runs]
        run_ids = [run["info"]["run_id"] for run in runs]
        ui = url.replace("//127.0.0.1:", f"//{HOST}:")
        experiment_page = f"{ui}/#/experiments/{experiment_id}"
        first = f"{experiment_page}/runs/{run_ids[0]}"
        logged = links[0].replace("//127.0.0.1:", f"//{HOST}:")
        checks[f"the trainer logs the run's link (`{links[0].removeprefix(url)}`)"] = (
            links[0].startswith(f"{first.replace(ui, url)}") and ML_VIEW in links[0])
        pages = {  # screenshot name: (page, what it shows)
            "experiment_default": (experiment_page, "experiment page, fresh browser, no parameter"),
            "logged_link": (logged, "the link the trainer logs, fresh browser"),
            "experiment": (f"{experiment_page}?{ML_VIEW}", "experiment page, Model training"),
            "compare": (compare_url(ui, run_ids, experiment_id), "compare-runs page"),
            "charts": (f"{experiment_page}/runs?{ML_VIEW}&compareRunsMode=CHART", "experiment's charts"),
            "run_charts": (f"{first}/model-metrics?{ML_VIEW}", "first run's charts"),
            "run": (f"{first}?{ML_VIEW}", "first run's overview"),
            "artifacts": (f"{first}/artifacts?{ML_VIEW}", "first run's artifacts"),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        shots = {key: args.out / f"mlflow_ui_{key}_{date}.png" for key in pages}
        text = {key: look(page, shots[key]) for key, (page, _) in pages.items()}
        joined = {key: " ".join(nodes) for key, nodes in text.items()}

        opened = {key: text[key][0].split(" - ")[0] for key in ("experiment_default", "experiment")}
        ui_checks = {
            "the trainer's link, in a fresh browser, opens the run in the training view (run name, "
            "`train/loss` and the `Model metrics` tab shown)": all(
                shown in joined["logged_link"] for shown in (names[0], "train/loss", "Model metrics")),
            f"experiment page, Model training, opens on the runs (opened on `{opened['experiment']}`)":
                opened["experiment"] == "Runs",
            "experiment page, Model training, lists both runs by name": all(n in joined["experiment"] for n in names),
            "compare page names both runs": all(n in joined["compare"] for n in names),
            "compare page plots `train/loss`": "train/loss" in text["compare"],
        }
        # The compare page's metrics table draws its first rows only: check those are sectioned.
        compared = _between(text["compare"], "Metrics", "Artifacts")
        compared = [k for k in compared if re.fullmatch(r"[a-z_]+(/[a-z0-9_]+)+", k)]
        ui_checks[f"compare page's metrics table shows sectioned names ({len(compared)} rows drawn, "
                  f"first `{compared[0] if compared else None}`)"] = bool(compared) and all(
            k.split("/")[0] in SECTIONS for k in compared)
        for key in ("charts", "run_charts"):
            found = chart_sections(text[key])
            missing = [s for s in SECTIONS if not any(f == s or f.startswith(f"{s}/") for f in found)]
            ui_checks[f"{pages[key][1]}: a section for each of {', '.join(SECTIONS)} (shown: "
                      f"{', '.join(f'`{f}`' for f in found)})"] = not missing
        ui_checks["experiment's charts draw both runs"] = all(n in joined["charts"] for n in names)
        ui_checks |= {f"run page shows metric `{m}`": m in joined["run"] for m in METRICS}
        ui_checks["run page shows the run name"] = names[0] in joined["run"]
        ui_checks |= {f"artifacts page lists `{a}`": a in text["artifacts"] for a in ("model", "config")}
        checks |= ui_checks

        # docs/tracking.md shows the compare view: copied there when what it shows was checked.
        shown_in_docs = all(ok for name, ok in ui_checks.items() if name.startswith("compare page"))
        if shown_in_docs:
            args.docs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shots["compare"], args.docs / "mlflow-compare.png")
        lines = [f"# MLflow UI check, {date}", "",
                 f"`mlflow server` (MLflow {_mlflow_version()}) on 127.0.0.1; two {args.steps}-step tiny pre-training "
                 f"runs with the same seed and no `tracking.run_name`, with a zero-shot eval at the end, logging to "
                 f"it; the REST API; then headless Chromium ({_chromium_version()}, window {WINDOW[0]}x{WINDOW[1]}, "
                 f"a fresh profile per page, the server reached as `{HOST}`) on {len(pages)} pages. A check on a page "
                 f"looks for the text in the rendered DOM (`--dump-dom`); the page a URL opened on is the "
                 f"document's title.", "", "| check | result |", "|---|---|"]
        lines += [f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in checks.items()]
        lines += ["", f"Not a check: without `?{ML_VIEW}` a fresh browser opened the experiment on "
                      f"`{opened['experiment_default']}` (MLflow {_mlflow_version()} does not read the experiment's "
                      f"`{KIND[0]}` tag), hence the parameter in the link the trainer logs."]
        lines += ["", "## Pages", ""]
        for key, (page, what) in pages.items():
            lines += [f"{what}: `{page.removeprefix(ui)}`", "", f"![{what}]({shots[key].name})", ""]
        lines += [f"Compare screenshot copied to `{_shown(args.docs / 'mlflow-compare.png')}`." if shown_in_docs else
                  "A check on the compare page failed: the docs' screenshot was left as it was.", ""]
        (args.out / f"mlflow_ui_{date}.md").write_text("\n".join(lines))
        print("\n".join(lines))
        return 0 if all(checks.values()) else 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def _between(nodes: list[str], start: str, end: str) -> list[str]:
    """The text nodes after the heading `start` and before the heading `end`."""
    if start not in nodes:
        return []
    rest = nodes[nodes.index(start) + 1:]
    return rest[:rest.index(end)] if end in rest else rest


def _shown(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def _mlflow_version() -> str:
    import mlflow
    return mlflow.__version__


def _chromium_version() -> str:
    return subprocess.run([chromium(), "--version"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
