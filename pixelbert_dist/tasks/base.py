"""What the three downstream tasks share: the pre-trained body, its start, the config resolution, FLOPs.

A task model is `PixelBertForTask` (the body: `body.bert`, `body.visual`) plus the task's
`head` and `forward` (tasks/vqa.py, nlvr2.py, retrieval.py). Fine-tuning and evaluation use
every valid visual token: no random pixel sampling.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from pixelbert_dist import checkpoint
from pixelbert_dist.config import ConfigError, ModelConfig, PretrainConfig, TaskConfig
from pixelbert_dist.data.stream import Pair
from pixelbert_dist.data.task_batch import TaskBatchBuilder
from pixelbert_dist.data.types import TaskBatch
from pixelbert_dist.flops import measure_flops
from pixelbert_dist.model import PixelBert
from pixelbert_dist.pretrained import CONFIG, WEIGHTS, load_weights, read_run_config
from pixelbert_dist.spec import ResolvedRun

OUTPUT_KEYS = ("loss", "accuracy")  # TaskOutput's fields logged in training


@dataclasses.dataclass
class TaskOutput:
    loss: Tensor
    accuracy: Tensor  # vqa: soft score of the top answer; nlvr2: accuracy; retrieval: true caption ranked first
    logits: Tensor    # vqa (B, answers); nlvr2 (B, 2); retrieval (B, 1 + hard negatives)


def mlp(width_in: int, width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12),
                         nn.Linear(width, out))


class PixelBertForTask(nn.Module):
    """The pre-trained body under a task head (subclasses set `self.head` and `forward`)."""

    def __init__(self, model_cfg: ModelConfig, task: TaskConfig) -> None:
        super().__init__()
        self.task = task
        self.body = PixelBert(model_cfg)
        self.freeze_cnn = task.freeze_cnn
        if self.freeze_cnn:
            self.body.visual.cnn.requires_grad_(False)

    def adopt_pretraining_heads(self) -> None:
        """After loading pre-trained weights: drop the MLM and ITM heads; a parameter without a
        gradient would stall ZeRO's gradient reduction."""
        self.body.cls = None

    def train(self, mode: bool = True) -> "PixelBertForTask":
        super().train(mode)
        if self.freeze_cnn:  # frozen also means its batch-norm statistics stay as pre-trained
            self.body.visual.cnn.eval()
        return self

    def visual_tokens(self, images: Tensor, pixel_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Every valid visual token of each image (I, N, hidden) and their mask."""
        return self.body.visual(images, pixel_mask)

    def sequence_visuals(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """The visual tokens each text sequence sees (S, N, hidden), CNN run once per image."""
        visual, visual_mask = self.visual_tokens(batch.images, batch.pixel_mask)
        return visual[batch.image_index], visual_mask[batch.image_index]

    def pooled(self, input_ids: Tensor, attention_mask: Tensor, visual: Tensor, visual_mask: Tensor) -> Tensor:
        """[CLS] after the transformer and BERT's pooler, one row per text sequence."""
        hidden = self.body.fuse(input_ids, attention_mask, visual, visual_mask)
        return self.body.bert.pooler(hidden)


# ---------------------------------------------------------------------------- starting from pre-training

def pretrained_model_config(init: str) -> dict:
    """The model section a pre-trained checkpoint or export was trained with."""
    try:
        return read_run_config(Path(init))[0]["model"]
    except FileNotFoundError:
        raise ConfigError(f"task.init={init}: neither an exported model ({WEIGHTS} + {CONFIG}) nor a complete "
                          f"checkpoint ({checkpoint.COMPLETE})") from None


def load_pretrained(model: PixelBertForTask, init: str) -> None:
    """Pre-trained Pixel-BERT weights (all of them, heads included) into the task model's body."""
    path = Path(init)
    load_weights(model.body, path, read_run_config(path)[1])


def resolve(cfg: PretrainConfig, tokenizer, answers: tuple[str, ...] = ()) -> ResolvedRun:
    """The network's shape is the pre-trained one (the run config must not redefine it); the
    vocabulary must be the one it was pre-trained with."""
    model = cfg.model
    if cfg.task.init:
        model = ModelConfig(**{**pretrained_model_config(cfg.task.init), "text_weights": "none",
                               "backbone_weights": "none"})
        if len(tokenizer) != model.vocab_size:
            raise ConfigError(f"data.tokenizer {cfg.data.tokenizer} has {len(tokenizer)} entries; "
                              f"{cfg.task.init} was pre-trained with a vocabulary of {model.vocab_size}")
    elif model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=len(tokenizer))
    if len(tokenizer) != model.vocab_size:
        raise ConfigError(f"model.vocab_size is {model.vocab_size} but the tokenizer "
                          f"{cfg.data.tokenizer} has {len(tokenizer)} entries")
    return ResolvedRun(dataclasses.replace(cfg, model=model), tokenizer, answers)


def build_model(model_class: type[PixelBertForTask], run: ResolvedRun, pretrained: bool, log=None):
    model = model_class(run.cfg.model, run.cfg.task, len(run.answers))
    if pretrained and run.cfg.task.init:
        load_pretrained(model, run.cfg.task.init)
        if log is not None:
            log.info("%s: starting from %s", run.cfg.task.name, run.cfg.task.init)
    model.adopt_pretraining_heads()
    return model


def batch_builder(run: ResolvedRun):
    return functools.partial(TaskBatchBuilder, task=run.cfg.task, answers=list(run.answers))


def flops_per_sample(model: nn.Module, run: ResolvedRun, device: torch.device, target=None) -> float:
    """Training FLOPs of one pair at the configured image size, counted on a two-pair batch
    the task's own builder makes (so NLVR2's two images and retrieval's negatives are in it)."""
    data = run.cfg.data
    canvas = io.BytesIO()
    Image.new("RGB", (data.image_long_side, data.image_short_side), (120, 90, 60)).save(canvas, "JPEG")
    pairs = [Pair("flops", i, f"image{i}", canvas.getvalue(), "a caption", target,
                  canvas.getvalue() if run.cfg.task.name == "nlvr2" else None) for i in range(2)]
    builder = batch_builder(run)(run.tokenizer, data)
    batch = builder(pairs, [builder.image(p) for p in pairs], torch.Generator().manual_seed(0)).to(device)
    probe = copy.deepcopy(model).to(device).train()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        per_sequence = measure_flops(probe, batch).training
    return per_sequence * batch.input_ids.shape[0] / len(pairs)
