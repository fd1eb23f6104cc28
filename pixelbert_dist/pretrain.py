"""Pre-train Pixel-BERT.

    # one process
    python -m pixelbert_dist.pretrain --config configs/pretrain/tiny-cpu.yaml --data.train_manifest=data/shards
    # 2 processes on this machine
    torchrun --nproc_per_node 2 -m pixelbert_dist.pretrain --config ... [--section.key=value ...]
    deepspeed --hostfile cluster/hosts --no_ssh --node_rank 0 --master_addr 127.0.0.1 --module pixelbert_dist.pretrain --config ...
    # resume from the newest complete checkpoint under checkpoint.dir (or start fresh)
    ... --resume auto

Recipe: parse config -> join the process group -> build the trainer (checks data and
config before any step) -> train -> leave cleanly.
"""

from __future__ import annotations

import argparse
import logging
import sys

from data_pipeline.storage import StorageError
from pixelbert_dist import distributed
from pixelbert_dist.config import ConfigError, FinetuneConfig, PretrainConfig, load_config


def parse_args(argv: list[str], job: str = "pretrain") -> tuple[argparse.Namespace, list[str]]:
    module = sys.modules[f"pixelbert_dist.{job}"] if f"pixelbert_dist.{job}" in sys.modules else None
    parser = argparse.ArgumentParser(prog=f"python -m pixelbert_dist.{job}",
                                     description=module.__doc__ if module else __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"YAML run config (configs/{job}/*.yaml)")
    parser.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint folder")
    parser.add_argument("--launcher", choices=["env", "ray"], default="env",
                        help="env: torchrun/deepspeed/single process; ray: Ray Train workers")
    parser.add_argument("--num-workers", type=int, default=1, help="with --launcher ray: training processes")
    parser.add_argument("--max-failures", type=int, default=3, help="with --launcher ray: restarts from the last checkpoint")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def main(argv: list[str] | None = None, job: str = "pretrain") -> int:
    """`job`: "pretrain", or "finetune" (pixelbert_dist.finetune: the same recipe for a task)."""
    argv = sys.argv[1:] if argv is None else argv
    args, _ = parse_args(argv, job)
    if args.launcher == "ray":
        from pixelbert_dist import ray_launcher
        passthrough = _without(argv, ("--launcher", "--num-workers", "--max-failures", "--resume"))
        # under Ray every (re)start resumes: a restarted group continues from the last checkpoint
        return ray_launcher.launch(passthrough, args.num_workers, args.max_failures, args.resume or "auto", job)
    return run(argv, resume=args.resume, job=job)


def run(argv: list[str], resume: str | None, job: str = "pretrain") -> int:
    """Configure, join the group (or wrap the launcher's), train; the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args, overrides = parse_args(argv, job)
    schema = FinetuneConfig if job == "finetune" else PretrainConfig
    try:
        cfg = load_config(args.config, overrides, schema=schema)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = distributed.init()
    # after init: DeepSpeed reads DS_ACCELERATOR on import
    if job == "finetune":
        from pixelbert_dist.finetune import TaskTrainer as trainer_class
    else:
        from pixelbert_dist.train import Trainer as trainer_class

    try:
        trainer = trainer_class(cfg, info, resume=resume)
    except (ConfigError, StorageError, FileNotFoundError, ValueError) as err:
        logging.getLogger(f"pixelbert_dist.{job}").error("%s", err)
        return 2
    metrics = trainer.train()
    if info.is_main:
        print(f"done at step {trainer.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return 0


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in flags:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


if __name__ == "__main__":
    code = main()
    if parse_args(sys.argv[1:])[0].launcher == "ray":
        sys.exit(code)
    distributed.finish(code)
