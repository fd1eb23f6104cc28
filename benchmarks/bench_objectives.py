"""Which pre-training objective? MLM on matched pairs only (UNITER, ViLT, ALBEF) vs MLM on every
caption, mismatched ones too: the demo's data and budget, several seeds per variant.

    python benchmarks/bench_objectives.py                # 2 variants x 3 seeds x 2,200 steps (~1 h idle)
    python benchmarks/bench_objectives.py --quick        # a few steps on a few images, 1 seed

Steps: the demo's data (data_pipeline.synthetic + data_pipeline.shard: 2,000 images, 100
held-out ones; a WordPiece vocab) made once under --work -> per variant and seed, the demo's
training run (configs/pretrain/tiny-cpu.yaml, 2 processes by torchrun, ZeRO-2, same seed for
both variants: same initial weights, batches and masks), `--model.mlm_on_mismatched` the only
difference, and zero-shot retrieval on the held-out images at the end -> its metrics read back
from the run's MLflow store. Each finished run is appended to <work>/runs.jsonl at once; a
rerun skips the runs found there. Writes benchmarks/results/objectives_<hardware>_<date>
.md/.json/.png (from whatever runs finished) and a run in the MLflow experiment "benchmarks".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, append_row, log_mlflow, markdown_table, write_results  # noqa: E402

VARIANTS = {"matched": False, "every": True}  # name -> model.mlm_on_mismatched
VARIANT_TEXT = {"matched": "MLM on matched pairs only", "every": "MLM on every caption"}
# reported metric -> the MLflow key it is read from; "train/..." ones average the last windows.
# All in percent: the trainer logs accuracies in %, as the recalls (older runs.jsonl rows: in_percent).
METRICS = {
    "itm_accuracy": "train/itm_accuracy", "mlm_accuracy": "train/mlm_accuracy",
    "image_r1": "eval/zeroshot/image_r1", "image_r5": "eval/zeroshot/image_r5",
    "image_r10": "eval/zeroshot/image_r10", "text_r1": "eval/zeroshot/text_r1",
    "text_r5": "eval/zeroshot/text_r5", "text_r10": "eval/zeroshot/text_r10", "r_mean": "eval/zeroshot/r_mean",
}
FINAL_FRACTION = 0.1  # training accuracies: the mean of the windows logged in the last 10% of steps
LEFT_CHANCE = 60.0  # final ITM accuracy (%) above this: the run broke out of chance (50%) in its budget
ACCURACIES = ("itm_accuracy", "mlm_accuracy")


def prepare(work: Path, num_images: int, heldout_images: int) -> Path:
    """The demo's data under `work` (once; a complete earlier one is reused). Returns `work`."""
    done = work / "data.json"
    wanted = {"num_images": num_images, "heldout_images": heldout_images}
    if done.is_file() and json.loads(done.read_text()) == wanted:
        return work
    import ray

    from data_pipeline import shard, synthetic
    from pixelbert_dist import tokenizer
    settings = ["--shard-size", "100", "--max-short-side", "128", "--max-long-side", "192", "--no-progress",
                "--overwrite"]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")  # one cluster for both sharding jobs
    try:
        for name, images, seed in (("synthetic", num_images, 0), ("heldout", heldout_images, 1)):
            _check(synthetic.main, ["--out", str(work / name), "--num-images", str(images), "--seed", str(seed)])
            _check(shard.main, ["--out", str(work / f"{name}-shards"), *settings, "--source",
                                f"coco:captions={work / name}/annotations/captions.json,images={work / name}/images"])
    finally:
        ray.shutdown()
    _check(tokenizer.main, ["--captions", str(work / "synthetic/annotations/captions.json"), "--out",
                            str(work / "vocab")])
    done.write_text(json.dumps(wanted))
    return work


def _check(main, argv: list[str]) -> None:
    """A job's `main(argv)`, in this process; a non-zero exit stops the benchmark, naming the job."""
    code = main(argv)
    if code:
        raise SystemExit(f"{main.__module__} {' '.join(argv[:2])} failed ({code})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(variant: str, seed: int, args) -> dict:
    """One demo training run; its final metrics (METRICS) and wall time."""
    folder = args.work / f"{variant}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlruns.db"
    db.unlink(missing_ok=True)  # a run cut off earlier starts again from scratch
    argv = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "pixelbert_dist.pretrain",
            "--config", str(REPO / "configs/pretrain/tiny-cpu.yaml"),
            f"--deepspeed.config={REPO / 'configs/deepspeed/zero2.json'}", "--deepspeed.zero_stage=2",
            f"--model.mlm_on_mismatched={str(VARIANTS[variant]).lower()}", f"--train.seed={seed}",
            f"--data.train_manifest={args.work / 'synthetic-shards'}",
            f"--data.tokenizer={args.work / 'vocab/vocab.txt'}",
            f"--data.eval_manifest={args.work / 'heldout-shards'}", "--data.num_workers=1",
            f"--train.max_steps={args.steps}", "--train.log_every=25", "--train.eval_every=0",
            f"--checkpoint.dir={folder / 'checkpoints'}", f"--checkpoint.every_steps={args.steps}",
            f"--tracking.uri=sqlite:///{db}", f"--tracking.run_name={variant}-seed{seed}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO)}
    start = time.time()
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True)
    (folder / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"{variant} seed {seed} failed ({done.returncode}); see {folder / 'log.txt'}")
    return {"variant": variant, "seed": seed, "steps": args.steps, **final_metrics(db, args.steps),
            "accuracy_unit": "%", "wall_s": time.time() - start}


def in_percent(run: dict) -> dict:
    """A runs.jsonl row with its accuracies in %: rows without "accuracy_unit" were written when
    the trainer logged them as fractions, and mixing the two would compare 0.6 with 60."""
    if run.get("accuracy_unit") == "%":
        return run
    return {**run, **{name: 100.0 * run[name] for name in ACCURACIES}, "accuracy_unit": "%"}


def final_metrics(db: Path, steps: int) -> dict[str, float]:
    with sqlite3.connect(db) as con:
        rows = con.execute("select key, step, value from metrics order by step").fetchall()
    history: dict[str, list[tuple[int, float]]] = {}
    for key, step, value in rows:
        history.setdefault(key, []).append((step, value))
    out = {}
    for name, key in METRICS.items():
        points = history.get(key)
        if not points:
            raise SystemExit(f"{db}: no metric {key}")
        last = [v for s, v in points if s > steps * (1 - FINAL_FRACTION)] or [points[-1][1]]
        out[name] = sum(last) / len(last) if key.startswith("train/") else points[-1][1]
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n); 0 with one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def compare(runs: list[dict]) -> list[dict]:
    """Per metric: each variant's mean and standard error over seeds, and their difference
    (matched - every), counted as real only beyond two standard errors of the difference."""
    rows = []
    for name in METRICS:
        row = {"case": name, "metric": name}
        stats = {}
        for variant in VARIANTS:
            values = [r[name] for r in runs if r["variant"] == variant]
            if values:
                stats[variant] = mean_se(values)
                row[f"{variant} mean"], row[f"{variant} se"], row[f"{variant} n"] = *stats[variant], len(values)
        if len(stats) == 2:
            (a, sa), (b, sb) = stats["matched"], stats["every"]
            row["difference"], row["2 se"] = a - b, 2 * math.sqrt(sa**2 + sb**2)
            enough = min(row["matched n"], row["every n"]) >= 2
            row["verdict"] = (("matched better" if a > b else "every better") if enough and abs(a - b) > row["2 se"]
                              else "no real difference" if enough else "too few seeds")
        rows.append(row)
    return rows


def plot(rows: list[dict]):
    def draw(path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (acc, ret) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 7]})
        for ax, names, label in ((acc, ACCURACIES, "training accuracy (%), last windows"),
                                 (ret, [n for n in METRICS if "_r" in n], "zero-shot retrieval (%)")):
            picked = [r for r in rows if r["metric"] in names]
            x = range(len(picked))
            for offset, variant in ((-0.2, "matched"), (0.2, "every")):
                ax.bar([i + offset for i in x], [r.get(f"{variant} mean", 0) for r in picked], 0.4,
                       yerr=[2 * r.get(f"{variant} se", 0) for r in picked], capsize=3,
                       label=VARIANT_TEXT[variant])
            ax.set_xticks(list(x), [r["metric"] for r in picked], rotation=30)
            ax.set_ylabel(label)
        ret.legend()
        fig.suptitle("Pre-training objective: mean over seeds, bars = 2 standard errors")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    return draw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "objectives",
                        help="data and runs; runs.jsonl there lists the finished runs (a rerun skips them)")
    parser.add_argument("--steps", type=int, default=2200, help="training steps per run (the demo's 2,200)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--heldout-images", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="4 steps on 60 images (20 held out), seed 0")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="a paragraph for the results under the table (how seeds were chosen)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.num_images, args.heldout_images = 4, "0", 60, 20
    args.work = args.work.resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.time()
    prepare(args.work, args.num_images, args.heldout_images)
    log = args.work / "runs.jsonl"
    runs = [in_percent(json.loads(line)) for line in log.read_text().splitlines()] if log.is_file() else []
    runs = [r for r in runs if r["steps"] == args.steps]
    for seed in seeds:  # seed by seed, both variants: a run cut short still compares like with like
        for variant in VARIANTS:
            if any(r["variant"] == variant and r["seed"] == seed for r in runs):
                continue
            runs.append(train(variant, seed, args))
            append_row(log, runs[-1])
            print(f"{variant} seed {seed}: " + ", ".join(f"{k} {runs[-1][k]:.3f}" for k in METRICS), flush=True)
    runs = [r for r in runs if r["seed"] in seeds]
    rows = compare(runs)
    columns = ["metric", "matched mean", "matched se", "every mean", "every se", "difference", "2 se", "verdict"]
    counts = {v: sum(r["variant"] == v for r in runs) for v in VARIANTS}
    left_chance = {v: sum(r["variant"] == v and r["itm_accuracy"] > LEFT_CHANCE for r in runs) for v in VARIANTS}
    body = (f"The demo's data and budget: {args.num_images:,} synthetic images (5 captions each), "
            f"{args.steps:,} steps of 32 pairs, configs/pretrain/tiny-cpu.yaml, 2 processes (torchrun, ZeRO-2); "
            f"seeds {args.seeds} (`train.seed`: initial weights, batches and masks, the same for both variants); "
            f"runs per variant: {counts}. Every caption is masked in both (else [MASK] would give ITM the answer); "
            f"`matched` = {VARIANT_TEXT['matched']} (`model.mlm_on_mismatched: false`), `every` = "
            f"{VARIANT_TEXT['every']} (`true`).\n\n"
            f"ITM and MLM accuracy (%): training batches, the mean of the windows logged (every 25 steps) in the last "
            f"{FINAL_FRACTION:.0%} of steps; MLM accuracy over matched pairs' masked words in both variants. "
            f"Retrieval: zero-shot on the {args.heldout_images} held-out images and their captions at the last step "
            f"(ITM head scores, recalls in %). `se`: standard error of the mean over seeds; a difference is real "
            f"only beyond `2 se` = two standard errors of the difference.\n\n"
            f"{markdown_table(rows, columns)}\n\n"
            f"ITM left chance (final training accuracy above {LEFT_CHANCE:.0f}%) in " +
            ", ".join(f"{left_chance[v]} of {counts[v]} `{v}` runs" for v in VARIANTS) + ".\n\n"
            + (f"{args.note}\n\n" if args.note else "") +
            f"Per run:\n\n{markdown_table(runs, ['variant', 'seed', *METRICS, 'wall_s'])}\n\n"
            f"Training, all runs: {sum(r['wall_s'] for r in runs):.0f} s; this invocation: "
            f"{time.time() - started:.0f} s (finished runs are read back, not rerun).\n")
    data = {"config": {"steps": args.steps, "seeds": args.seeds, "num_images": args.num_images,
                       "heldout_images": args.heldout_images, "config": "configs/pretrain/tiny-cpu.yaml",
                       "processes": 2, "final_fraction": FINAL_FRACTION, "left_chance": LEFT_CHANCE,
                       "note": args.note},
            "rows": rows, "left_chance": left_chance, "runs": runs}
    md = write_results("objectives", "Pre-training objective: MLM on matched pairs only vs on every caption",
                       body, data, plot(rows), out_dir=args.out)
    print(body)
    print(f"results: {md}")
    log_mlflow("objectives", args.out, data["config"], [{k: v for k, v in r.items() if k != "verdict"} for r in rows],
               {}, [md, md.with_suffix(".json"), md.with_suffix(".png")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
