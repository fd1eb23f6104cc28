"""Which job spec a config runs: pre-training, or the downstream task it names."""

from __future__ import annotations

from pixelbert_dist.config import FinetuneConfig, PretrainConfig
from pixelbert_dist.spec import JobSpec


def job_spec(cfg: PretrainConfig) -> JobSpec:
    if isinstance(cfg, FinetuneConfig):
        from pixelbert_dist.tasks import TASKS

        return TASKS[cfg.task.name]
    from pixelbert_dist.pretraining import PRETRAINING

    return PRETRAINING
