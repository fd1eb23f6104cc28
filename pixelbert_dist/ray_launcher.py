"""`--launcher ray`: the same training function in Ray Train workers (TorchTrainer).

    ray job submit --working-dir . -- python -m pixelbert_dist.pretrain --launcher ray --num-workers 8 --config ...

Ray Train makes the process group (gloo on CPU, NCCL on GPU); DeepSpeed wraps it. A worker
that dies makes Ray restart the whole group (FailureConfig.max_failures), and every start
resumes from the newest complete checkpoint: with several nodes, checkpoint.dir must be on
storage every node sees.
"""

from __future__ import annotations

import os


def _worker(config: dict) -> None:
    os.environ["PIXELBERT_LAUNCHER"] = "ray"
    from pixelbert_dist.pretrain import run

    code = run(config["argv"], resume=config["resume"], job=config["job"])
    if code != 0:
        raise RuntimeError(f"{config['job']} exited with code {code}")


def launch(argv: list[str], num_workers: int, max_failures: int, resume: str, job: str = "pretrain") -> int:
    import ray
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level="WARNING")
    storage = os.path.abspath(os.environ.get("PIXELBERT_RAY_STORAGE", "ray_results"))
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"argv": argv, "resume": resume, "job": job},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=torch.cuda.is_available()),
        run_config=RunConfig(name=f"pixelbert-{job}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    return 0 if result.error is None else 1
