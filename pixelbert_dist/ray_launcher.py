"""`--launcher ray`: a job's run function in Ray Train workers (TorchTrainer).

    ray job submit --working-dir . -- python -m pixelbert_dist.pretrain --launcher ray --num-workers 8 --config ...

Ray Train makes the process group (gloo on CPU; NCCL for CUDA tensors and gloo for CPU ones
on GPUs); DeepSpeed wraps it. A worker that dies makes Ray restart the whole group
(FailureConfig.max_failures), and every start resumes from the newest complete checkpoint:
with several nodes, checkpoint.dir must be on storage every node sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def _worker(config: dict) -> None:
    code = config["run"](launcher="ray")
    if code != 0:
        raise RuntimeError(f"{config['job']} exited with code {code}")


def launch(run: Callable[..., int], job: str, num_workers: int, max_failures: int) -> int:
    """Run `run(launcher="ray")` in `num_workers` Ray Train workers; 0 if the group finished."""
    import ray
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level="WARNING")
    storage = os.path.abspath(os.environ.get("PIXELBERT_RAY_STORAGE", "ray_results"))
    gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"run": run, "job": job},
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu),
        run_config=RunConfig(name=f"pixelbert-{job}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    return 0 if result.error is None else 1
