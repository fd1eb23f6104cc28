"""The command line of the training jobs: parse once, load the config, run the job.

    python -m pixelbert_dist.pretrain --config C [--section.key=value ...] [--resume auto]
    python -m pixelbert_dist.finetune --config C ... [--launcher ray --num-workers 8]

`pretrain.py` and `finetune.py` are `__main__` modules over `main(argv, job)`. Under
`--launcher ray` this process starts Ray Train and hands it `run_job` itself
(ray_launcher.py); each worker calls it with `launcher="ray"`.

A run that cannot go on (its data past the damage bound, a lost rank, an object store that
stays down) ends with one line on stderr saying why and where, its traceback in the log at
debug level; any other error with its traceback. Either way the process leaves at once
(distributed.finish): no teardown waits on loader workers or on ranks that are gone. Rank 0
first ends its MLflow run FAILED with that line (KILLED after Ctrl-C; tracking.py: SIGTERM).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from dataclasses import dataclass

from data_pipeline.storage import StorageError
from pixelbert_dist import distributed
from pixelbert_dist.config import ConfigError, FinetuneConfig, PretrainConfig, load_config, redact

SCHEMAS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}  # job name -> its config schema


@dataclass(frozen=True)
class Invocation:
    """What one command line asked for, parsed once."""

    config: str
    """The YAML run config."""
    overrides: tuple[str, ...]
    """`--section.key=value` arguments, applied over the file."""
    resume: str | None
    """`auto`, a checkpoint folder, or None (start fresh)."""
    launcher: str
    """`env` (single process, torchrun, deepspeed) or `ray` (Ray Train workers)."""
    num_workers: int
    """With the Ray launcher: training processes."""
    max_failures: int
    """With the Ray launcher: group restarts from the last checkpoint."""


def parse_args(argv: list[str], job: str, usage: str | None = None) -> Invocation:
    parser = argparse.ArgumentParser(prog=f"python -m pixelbert_dist.{job}", description=usage,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"YAML run config (configs/{job}/*.yaml)")
    parser.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint folder")
    parser.add_argument("--launcher", choices=["env", "ray"], default="env",
                        help="env: torchrun/deepspeed/single process; ray: Ray Train workers")
    parser.add_argument("--num-workers", type=int, default=1, help="with --launcher ray: training processes")
    parser.add_argument("--max-failures", type=int, default=3, help="with --launcher ray: restarts from the last checkpoint")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args, overrides = parser.parse_known_args(argv)
    return Invocation(args.config, tuple(overrides), args.resume, args.launcher, args.num_workers, args.max_failures)


def main(argv: list[str] | None, job: str, usage: str | None = None) -> int:
    """Run `job` ("pretrain" or "finetune") as the command line says; the exit code."""
    call = parse_args(sys.argv[1:] if argv is None else argv, job, usage)
    if call.launcher == "ray":
        from pixelbert_dist import ray_launcher

        # under Ray every (re)start resumes: a restarted group continues from the last checkpoint
        worker = functools.partial(run_job, job, call.config, call.overrides, call.resume or "auto")
        return ray_launcher.launch(worker, job, call.num_workers, call.max_failures)
    return run_job(job, call.config, call.overrides, call.resume)


def run_job(job: str, config: str, overrides: tuple[str, ...], resume: str | None,
            launcher: str | None = None) -> int:
    """Configure, join the process group (or wrap the launcher's), train; the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(config, list(overrides), schema=SCHEMAS[job])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = distributed.init(launcher, cfg.train.collective_timeout_s)
    from pixelbert_dist.data.loader import DataDamageError
    from pixelbert_dist.jobs import job_spec  # after init: DeepSpeed reads DS_ACCELERATOR on import
    from pixelbert_dist.train import Trainer

    log = logging.getLogger(f"pixelbert_dist.{job}")
    try:
        trainer = Trainer(job_spec(cfg), cfg, info, resume)
    except (ConfigError, StorageError, FileNotFoundError, ValueError) as err:
        log.error("%s", redact(str(err)))  # may quote a URL
        return 2
    try:
        metrics = trainer.train()
    except (DataDamageError, distributed.PeerLost, StorageError, OSError) as err:
        log.debug("the run stopped:", exc_info=True)
        print(f"error: {redact(_one_line(err))}", file=sys.stderr, flush=True)
        trainer.tracker.end(failure=_one_line(err))  # the MLflow run: FAILED, with that line
        return 1
    except Exception as err:  # noqa: BLE001 - a bug: its traceback, then the same prompt exit
        log.exception("the run failed at step %d", trainer.step)
        trainer.tracker.end(failure=f"step {trainer.step}: {type(err).__name__}: {_one_line(err)}")
        return 1
    except KeyboardInterrupt:
        trainer.tracker.end(failure=f"interrupted (Ctrl-C) at step {trainer.step}", killed=True)
        raise
    if info.is_main:
        print(f"done at step {trainer.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return 0


def _one_line(err: BaseException) -> str:
    """The error's message on one line; a loader worker's (torch re-raises it with the worker's
    traceback in the message) is its last line."""
    text = str(err).strip()
    if "Original Traceback" in text:
        return f"in a loader worker: {text.splitlines()[-1]}"
    return " ".join(text.split())


def entry_point(job: str, usage: str | None) -> None:
    """`python -m pixelbert_dist.<job>`: run, then leave the way the launcher needs."""
    code = main(None, job, usage)
    if parse_args(sys.argv[1:], job).launcher == "ray":
        sys.exit(code)  # this process only drove Ray: no process group to leave
    distributed.finish(code)
