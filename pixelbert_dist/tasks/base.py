"""What the three downstream tasks share: the pre-trained body, its start, the config resolution, FLOPs.

A task model is `PixelBertForTask` (the body: `body.bert`, `body.visual`) plus the task's
`head` and `forward` (tasks/vqa.py, nlvr2.py, retrieval.py). Fine-tuning and evaluation use
every valid visual token: no random pixel sampling. A fine-tuned model saves as a pre-trained one
does (save_pretrained: its task, head and VQA's answers too); tasks.from_pretrained loads it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import json
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from pixelbert_dist import checkpoint
from pixelbert_dist.config import ConfigError, DataConfig, ModelConfig, PretrainConfig, TaskConfig
from pixelbert_dist.data.stream import Pair
from pixelbert_dist.data.task_batch import TaskBatchBuilder
from pixelbert_dist.data.types import TaskBatch
from pixelbert_dist.flops import measure_flops
from pixelbert_dist.model import PixelBert
from pixelbert_dist.pretrained import CONFIG, WEIGHTS, fine_tuned, load_weights, read_run_config, run_places
from pixelbert_dist.pretrained import tokenizer_source as model_tokenizer_source
from pixelbert_dist.spec import ResolvedRun
from pixelbert_dist.tokenizer import load_tokenizer

OUTPUT_KEYS = ("loss", "accuracy")  # TaskOutput's fields logged in training
ANSWERS = "answers.json"  # a saved VQA model's answer vocabulary


@dataclasses.dataclass
class TaskOutput:
    loss: Tensor
    # in % (0-100), as evaluation reports it; vqa: soft score of the top answer; nlvr2: accuracy;
    # retrieval: true caption ranked first
    accuracy: Tensor
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

    # set by tasks.from_pretrained, or by the trainer before save_pretrained (its MLflow `model/`)
    tokenizer = None
    run_config: dict | None = None
    answers: tuple[str, ...] = ()  # VQA: the head's outputs, in order

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """model.safetensors + config.json (the run config, this model and task) + answers.json + tokenizer."""
        from safetensors.torch import save_model

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_model(self, str(out / WEIGHTS))
        run_config = {**(self.run_config or {}), "model": dataclasses.asdict(self.body.cfg),
                      "task": dataclasses.asdict(self.task)}
        (out / CONFIG).write_text(json.dumps(run_config, indent=1))
        if self.answers:
            (out / ANSWERS).write_text(json.dumps(list(self.answers)))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out))
        return out

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


def usable_folds(folds: int, pairs: list[Pair], log) -> int:
    """task.eval_folds, or 1 when the held-out set is too small for it (with a warning): a fold of
    one image ranks it against its own captions only, so every recall would read 100."""
    images = len({pair.key for pair in pairs})
    if folds > 1 and images // folds < 2:
        log.warning("task.eval_folds=%d on %d held-out images: folds of %d image(s) would score 100 whatever the "
                    "model; reporting the recalls over all images only (a fold needs >= 2 images; COCO 1K: 5 "
                    "folds of 1,000)", folds, images, images // folds)
        return 1
    return folds


# ---------------------------------------------------------------------------- starting from pre-training

def pretrained_model_config(init: str) -> dict:
    """The model section a pre-trained checkpoint or export was trained with."""
    try:
        run_config = read_run_config(Path(init))[0]
    except FileNotFoundError:
        raise ConfigError(f"task.init={init}: neither an exported model ({WEIGHTS} + {CONFIG}) nor a complete "
                          f"checkpoint ({checkpoint.COMPLETE})") from None
    task = fine_tuned(Path(init))
    if task:  # its weights are body.* + head.*: not a pre-trained Pixel-BERT's
        raise ConfigError(f"task.init={init}: a fine-tuned {task} model; start from the "
                          f"pre-trained one it was fine-tuned from, or continue its run with --resume")
    return run_config["model"]


def load_pretrained(model: PixelBertForTask, init: str) -> None:
    """Pre-trained Pixel-BERT weights (all of them, heads included) into the task model's body."""
    path = Path(init)
    load_weights(model.body, path, read_run_config(path)[1])


def tokenizer_source(cfg: PretrainConfig) -> str:
    """data.tokenizer when set; else (left at its default) the pre-trained model's own tokenizer,
    the vocabulary its embeddings were trained on."""
    if not cfg.task.init or cfg.data.tokenizer != DataConfig().tokenizer:
        return cfg.data.tokenizer
    path = Path(cfg.task.init)
    try:
        run_config, is_checkpoint = read_run_config(path)
    except FileNotFoundError:
        return cfg.data.tokenizer  # resolve names the missing model
    return model_tokenizer_source(path, run_config, is_checkpoint) or cfg.data.tokenizer


def tokenizer(cfg: PretrainConfig):
    """The task's tokenizer (JobSpec.tokenizer): tokenizer_source's, loaded."""
    source = tokenizer_source(cfg)
    try:
        return load_tokenizer(source)
    except ConfigError as err:
        if not cfg.task.init or source != cfg.data.tokenizer:
            raise
        raise ConfigError(f"{err}; task.init={cfg.task.init} has no tokenizer of its own or of its run: set "
                          f"--data.tokenizer to the vocab it was pre-trained with") from None


def saved_answers(path: Path, run_config: dict, is_checkpoint: bool) -> tuple[str, ...]:
    """VQA's answer vocabulary: the folder's answers.json, else the run's task.answer_vocab."""
    task = run_config["task"]
    if task.get("name") != "vqa":
        return ()
    written = task.get("answer_vocab", "")
    places = [path / ANSWERS, *run_places(path, run_config, is_checkpoint, written)]
    for place in places:
        if place.is_file():
            return tuple(json.loads(place.read_text()))
    raise FileNotFoundError(f"{path}: a VQA model needs its answer vocabulary; not found at "
                            f"{', '.join(map(str, places))} (run from the fine-tuning run's folder)")


def resolve(cfg: PretrainConfig, tokenizer, answers: tuple[str, ...] = ()) -> ResolvedRun:
    """The network's shape is the pre-trained one (the run config must not redefine it); the
    vocabulary must be the one it was pre-trained with. data.tokenizer becomes tokenizer_source's,
    so that the loader's workers load the same one."""
    model, source = cfg.model, tokenizer_source(cfg)
    if cfg.task.init:
        model = ModelConfig(**{**pretrained_model_config(cfg.task.init), "text_weights": "none",
                               "backbone_weights": "none"})
        if len(tokenizer) != model.vocab_size:
            raise ConfigError(f"tokenizer {source} has {len(tokenizer)} entries; {cfg.task.init} was "
                              f"pre-trained with a vocabulary of {model.vocab_size}: leave data.tokenizer "
                              f"unset to use the pre-trained model's, or set it to the vocab it was trained with")
    elif model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=len(tokenizer))
    if len(tokenizer) != model.vocab_size:
        raise ConfigError(f"model.vocab_size is {model.vocab_size} but the tokenizer "
                          f"{source} has {len(tokenizer)} entries")
    data = dataclasses.replace(cfg.data, tokenizer=source)
    return ResolvedRun(dataclasses.replace(cfg, model=model, data=data), tokenizer, answers)


def build_model(model_class: type[PixelBertForTask], run: ResolvedRun, pretrained: bool, log=None):
    model = model_class(run.cfg.model, run.cfg.task, len(run.answers))
    model.answers = run.answers
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
