"""Does pre-training help? Each synthetic downstream task fine-tuned from a pre-trained
checkpoint and from scratch, on the same budget, side by side.

    python benchmarks/bench_downstream.py --pretrained runs/demo/checkpoints --tokenizer runs/demo/vocab/vocab.txt
    make downstream      # after make demo

Steps: synthetic VQA / NLVR2 / retrieval data in their real file formats
(data_pipeline.synthetic_tasks, images the pre-training never saw) -> the sharding job ->
`python -m pixelbert_dist.finetune` twice per task (task.init = the newest complete
checkpoint, then none), same config, steps and seed -> each run's evaluation on the held-out
split, read back from its MLflow run. Writes benchmarks/results/downstream_<hardware>_<date>
.md/.json/.png and a run in the MLflow experiment "benchmarks".
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, log_mlflow, markdown_table, write_results  # noqa: E402

# task -> (headline metric, held-out split index in the task's source specs, extra overrides)
TASKS = {
    "vqa": ("vqa_accuracy", -1, []),
    "nlvr2": ("nlvr2_accuracy", -1, []),
    "retrieval": ("r_mean", -1, ["--task.freeze_cnn=true"]),
}


def prepare(work: Path, num_images: int, seed: int) -> dict[str, tuple[Path, Path]]:
    """Synthetic task files -> shards (one Ray session for all splits); (train, held-out) per task."""
    import ray

    from data_pipeline import shard
    from data_pipeline.synthetic_tasks import generate_tasks

    specs = generate_tasks(work / "raw", num_images, seed)
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    try:
        out = {}
        for task, task_specs in specs.items():
            train, held_out = task_specs[0], task_specs[TASKS[task][1]]
            for split, spec in (("train", train), ("eval", held_out)):
                code = shard.main(["--source", spec, "--out", str(work / f"{task}-{split}"), "--shard-size", "100",
                                   "--max-short-side", "128", "--max-long-side", "192", "--no-progress"])
                if code:
                    raise SystemExit(f"sharding {spec} failed ({code})")
            out[task] = (work / f"{task}-train", work / f"{task}-eval")
        return out
    finally:
        ray.shutdown()


def finetune(task: str, init: str, shards: tuple[Path, Path], args, work: Path) -> dict[str, float]:
    """One fine-tuning run; its last evaluation metrics and wall time."""
    name = f"{task}-{'pretrained' if init else 'scratch'}"
    folder = work / name
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # a fresh run: a used folder is refused
    folder.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pixelbert_dist.finetune", "--config", str(REPO / "configs/finetune/tiny-cpu.yaml"),
            f"--task.name={task}", f"--task.init={init}", f"--data.train_manifest={shards[0]}",
            f"--data.eval_manifest={shards[1]}", f"--data.tokenizer={args.tokenizer}",
            f"--train.max_steps={args.steps}", f"--checkpoint.dir={folder / 'checkpoints'}",
            f"--tracking.uri={args.tracking_uri}", f"--tracking.run_name={name}",
            f"--deepspeed.config={REPO / 'configs/deepspeed/zero2.json'}", *TASKS[task][2]]
    if task == "vqa":
        argv.append(f"--task.answer_vocab={work / 'raw' / 'vqa' / 'answers.json'}")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(os.cpu_count()), "PYTHONPATH": str(REPO)}
    start = time.time()
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True)
    (folder / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"{name} failed ({done.returncode}); see {folder / 'log.txt'}")
    import mlflow
    client = mlflow.MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name("pixelbert-finetune-tiny")
    run = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{name}'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    metrics = {k[5:]: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    metrics["train_loss"] = run.data.metrics["train/loss"]
    metrics["wall_s"] = time.time() - start
    return metrics


def newest_checkpoint(path: Path) -> Path:
    from pixelbert_dist.checkpoint import COMPLETE, complete_tags
    from pixelbert_dist.export import WEIGHTS
    if (path / COMPLETE).is_file() or (path / WEIGHTS).is_file():  # one checkpoint, or an export
        return path
    tags = complete_tags(path)
    if not tags:
        raise SystemExit(f"no complete checkpoint under {path}: run `make demo` first")
    return path / tags[-1]


def plot(rows: list[dict]):
    def draw(path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["scratch"] for r in rows], 0.4, label="from scratch")
        ax.bar([i + 0.2 for i in x], [r["pretrained"] for r in rows], 0.4, label="pre-trained")
        ax.set_xticks(list(x), [f"{r['task']}\n{r['metric']}" for r in rows])
        ax.set_ylabel("held-out score (%)")
        ax.set_title("Fine-tuning on the same budget")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    return draw


def noise(metrics: dict) -> float:
    """Two standard errors of the difference of two runs' scores, each a proportion at p = 0.5.

    A smaller gain is noise, not help. VQA and NLVR2 average over questions or sentences.
    Retrieval's r_mean is half recalls over image queries (text R@K) and half over caption
    queries (image R@K); recalls at K = 1, 5, 10 share their queries, so they count once.
    """
    if "questions" in metrics or "examples" in metrics:
        variance = 0.25 / (metrics.get("questions") or metrics["examples"])
    else:
        variance = 0.25 * (0.25 / metrics["images"] + 0.25 / metrics["captions"])
    return 100.0 * 2 * math.sqrt(2 * variance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True,
                        help="a checkpoint folder, a folder of them (newest taken), or an export")
    parser.add_argument("--tokenizer", required=True, help="the pre-training vocab.txt")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "downstream")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run (32 pairs each)")
    parser.add_argument("--num-images", type=int, default=600, help="synthetic images per task")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    init = newest_checkpoint(Path(args.pretrained).resolve())
    args.tokenizer = str(Path(args.tokenizer).resolve())
    args.work = args.work.resolve()
    args.tracking_uri = f"sqlite:///{args.work / 'mlruns.db'}"
    started = time.time()
    shards = prepare(args.work, args.num_images, args.seed)
    rows = []
    for task in args.tasks.split(","):
        metric = TASKS[task][0]
        scores = {kind: finetune(task, str(init) if kind == "pretrained" else "", shards[task], args, args.work)
                  for kind in ("scratch", "pretrained")}
        examples = scores["scratch"].get("questions") or scores["scratch"].get("examples") or scores["scratch"]["images"]
        rows.append({"case": task, "task": task, "metric": metric, "scratch": scores["scratch"][metric],
                     "pretrained": scores["pretrained"][metric],
                     "gain": scores["pretrained"][metric] - scores["scratch"][metric],
                     "noise": noise(scores["scratch"]), "examples": int(examples),
                     "scratch_wall_s": scores["scratch"]["wall_s"], "pretrained_wall_s": scores["pretrained"]["wall_s"],
                     "details": scores})
        print(f"{task}: {metric} scratch {rows[-1]['scratch']:.2f} pre-trained {rows[-1]['pretrained']:.2f}", flush=True)
    table = markdown_table(rows, ["task", "metric", "examples", "scratch", "pretrained", "gain", "noise",
                                  "scratch_wall_s", "pretrained_wall_s"])
    helped = sum(r["gain"] > r["noise"] for r in rows)
    body = (f"Pre-trained checkpoint: `{init}`. Each task fine-tuned for {args.steps} steps of 32 pairs "
            f"(configs/finetune/tiny-cpu.yaml, one process, seed fixed) from that checkpoint and from random "
            f"weights, then evaluated on its held-out split (VQA: official accuracy on val; NLVR2: accuracy on "
            f"dev; retrieval: mean of Recall@1/5/10 both ways on test, CNN frozen).\n\n{table}\n\n"
            f"Pre-training helped (a gain above `noise`: two standard errors of the difference at p = 0.5 over "
            f"the held-out queries; for retrieval, images and captions each weigh half) on {helped} of {len(rows)} tasks. Whole run: {time.time() - started:.0f} s.\n")
    data = {"config": {"pretrained": str(init), "steps": args.steps, "num_images": args.num_images, "tasks": args.tasks,
                       "seed": args.seed, "finetune_config": "configs/finetune/tiny-cpu.yaml"},
            "rows": rows}
    md = write_results("downstream", "Synthetic downstream tasks: pre-trained vs from scratch", body, data,
                       plot(rows), out_dir=args.out)
    print(body)
    print(f"results: {md}")
    log_mlflow("downstream", args.out, data["config"], [{k: v for k, v in r.items() if k != "details"} for r in rows],
               {"tasks_helped": helped}, [md, md.with_suffix(".json"), md.with_suffix(".png")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
