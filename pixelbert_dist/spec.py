"""What differs between training jobs: a JobSpec of builders (torchtitan's TrainSpec, for our few jobs).

The trainer (train.py) runs every job the same way: resolve the config, build the model,
stream batches, step, evaluate, checkpoint. Pre-training (pretraining.py) and each
downstream task (tasks/<name>.py) fill in one JobSpec; jobs.py picks it from the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from pixelbert_dist.config import PretrainConfig
from pixelbert_dist.data.stream import Pair


@dataclass(frozen=True)
class ResolvedRun:
    """The loaded config with its derived values filled in, and what they came from.

    Resolution returns a new config (vocabulary size from the tokenizer, a task's network
    shape from its pre-trained model); the config as loaded is never written to.
    """

    cfg: PretrainConfig
    """The run config with derived values resolved (a FinetuneConfig for a task)."""
    tokenizer: PreTrainedTokenizerBase
    """The run's tokenizer, loaded from cfg.data.tokenizer (which says where it is)."""
    answers: tuple[str, ...] = ()
    """VQA's answer vocabulary, in the order of the head's outputs."""


@dataclass(frozen=True)
class JobSpec:
    """The builders of one job; every field is a plain function."""

    name: str
    """pretrain, vqa, nlvr2 or retrieval: the logger name and the MLflow `job` tag."""
    resolve: Callable[[PretrainConfig, PreTrainedTokenizerBase], ResolvedRun]
    """Config + tokenizer -> the resolved run; raises ConfigError before anything is built."""
    build_model: Callable[[ResolvedRun, bool], torch.nn.Module]
    """(run, pretrained) -> the model; pretrained=False when a checkpoint will overwrite it."""
    batch_builder: Callable[[ResolvedRun], Callable]
    """run -> the loader's `make_builder(tokenizer, data_cfg)` (data/batch.py, data/task_batch.py)."""
    flops_per_sample: Callable[[torch.nn.Module, ResolvedRun, torch.device], float]
    """Training FLOPs of one pair at the configured image size: MFU's numerator."""
    evaluate: Callable[[torch.nn.Module, list[Pair], ResolvedRun, torch.device], dict[str, float]]
    """Held-out metrics of the model on data.eval_manifest's pairs (every rank calls it)."""
    eval_prefix: str
    """Prefix of the evaluation's metric names in MLflow: `zeroshot` or `eval`."""
    output_keys: tuple[str, ...]
    """Fields of the model's output averaged into the training metrics."""
    eval_images: Callable[[PretrainConfig], int] = lambda cfg: 0
    """How many held-out images to evaluate on (0: all)."""
    tokenizer: Callable[[PretrainConfig], PreTrainedTokenizerBase] = lambda cfg: data_tokenizer(cfg)
    """Config -> the tokenizer `resolve` takes: data.tokenizer's (a task: its pre-trained model's)."""


def data_tokenizer(cfg: PretrainConfig) -> PreTrainedTokenizerBase:
    from pixelbert_dist.tokenizer import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer)
