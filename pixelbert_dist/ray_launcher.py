"""`--launcher ray`: a job's run function in Ray Train workers (TorchTrainer).

    ray job submit --working-dir . -- python -m pixelbert_dist.pretrain --launcher ray --num-workers 8 --config ...

Ray Train makes the process group (gloo on CPU; NCCL for CUDA tensors and gloo for CPU ones
on GPUs); DeepSpeed wraps it. A worker that dies makes Ray restart the whole group
(FailureConfig.max_failures), and every start resumes from the newest complete checkpoint:
with several nodes, checkpoint.dir must be on storage every node sees.

GPU or CPU workers: the cluster's resources decide, not this driver's machine (`ray job
submit` runs the driver on the head node, often one without a GPU). PIXELBERT_RAY_GPU=1 or
=0 decides instead. A worker asked to use a GPU that sees none stops the job with an error
naming its host, rather than training on its CPU.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

GPU_ENV = "PIXELBERT_RAY_GPU"


def use_gpu(cluster: dict[str, float], num_workers: int, wanted: bool | None) -> bool:
    """Whether the workers train on GPUs: `wanted` (from PIXELBERT_RAY_GPU) if set, else the cluster's GPUs.

    `cluster` is ray.cluster_resources(). With too few GPUs for one per worker Ray would wait
    for them without a word: an error says so instead.
    """
    if wanted is not None:
        return wanted
    gpus = cluster.get("GPU", 0)
    if 0 < gpus < num_workers:
        raise RuntimeError(f"the Ray cluster has {gpus:g} GPUs for {num_workers} workers: use --num-workers "
                           f"{int(gpus)}, or set {GPU_ENV}=1 (wait for more GPU nodes) or {GPU_ENV}=0 (CPU workers)")
    return gpus > 0


def wanted_from_env(value: str | None) -> bool | None:
    """PIXELBERT_RAY_GPU: "1"/"true" GPU workers, "0"/"false" CPU workers, unset or "auto" the cluster decides."""
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    if value.strip().lower() in ("1", "true", "yes"):
        return True
    if value.strip().lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"{GPU_ENV}={value!r}: use 1, 0 or auto")


def check_worker_device(gpu: bool) -> None:
    """In a worker: a GPU run whose worker sees no GPU fails here, naming the host."""
    import torch

    if gpu and not torch.cuda.is_available():
        raise RuntimeError(f"Ray worker on {socket.gethostname()} was started to train on a GPU but torch sees "
                           f"none (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch "
                           f"{torch.__version__}): check the node's driver and torch's CUDA build, or set "
                           f"{GPU_ENV}=0 to train on CPUs")


def enter_callers_folder(folder: str) -> None:
    """In a worker: run in the folder the job was started from, so relative paths in the command
    line (config, data, checkpoints) mean what they meant there. Ray starts workers in its own
    session folder; under `ray job submit --working-dir` the driver's folder is the unpacked copy,
    which every node holds at the same path. A node without the folder keeps Ray's and says so."""
    if os.path.isdir(folder):
        os.chdir(folder)
    else:
        print(f"Ray worker on {socket.gethostname()}: the job's folder {folder} is not on this node; relative "
              f"paths resolve against {os.getcwd()} (use absolute paths, shared storage, or ray job submit "
              f"--working-dir)", flush=True)


def _worker(config: dict) -> None:
    enter_callers_folder(config["cwd"])
    check_worker_device(config["gpu"])
    code = config["run"](launcher="ray")
    if code != 0:
        raise RuntimeError(f"{config['job']} exited with code {code}")


def launch(run: Callable[..., int], job: str, num_workers: int, max_failures: int) -> int:
    """Run `run(launcher="ray")` in `num_workers` Ray Train workers; 0 if the group finished."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    wanted = wanted_from_env(os.environ.get(GPU_ENV))  # a bad value fails before Ray starts
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level="WARNING")
    storage = os.path.abspath(os.environ.get("PIXELBERT_RAY_STORAGE", "ray_results"))
    gpu = use_gpu(ray.cluster_resources(), num_workers, wanted)
    print(f"Ray Train: {num_workers} {'GPU' if gpu else 'CPU'} workers "
          f"({GPU_ENV}={os.environ.get(GPU_ENV, 'auto')}; cluster {ray.cluster_resources().get('GPU', 0):g} GPUs)",
          flush=True)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"run": run, "job": job, "gpu": gpu, "cwd": os.getcwd()},
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu),
        run_config=RunConfig(name=f"pixelbert-{job}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as error:  # Ray Train v2 raises where v1 returned result.error
        print(f"{job}: the Ray Train group failed after {max_failures} restart(s): {error}", file=sys.stderr,
              flush=True)
        return 1
    return 0 if result.error is None else 1
