"""One typed config tree for a run: YAML file, then `--section.key=value` overrides.

    cfg = load_config("configs/pretrain/tiny-cpu.yaml", ["--model.num_layers=4"])
    cfg.to_dict()        # nested plain dict, for logging

Every field has one docstring line; `python -m pixelbert_dist.config --help` prints them.
Errors name the file and the dotted key: an unknown key with the closest valid one, a wrong
type with the expected type, an invalid value with the rule it breaks.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    backbone: Literal["resnet50", "resnext152_32x8d", "custom"] = "resnet50"
    """CNN: torchvision ResNet-50, ResNeXt-152 32x8d (the paper's X152), or `custom` widths."""
    backbone_block: Literal["basic", "bottleneck"] = "basic"
    """Residual block of a `custom` backbone."""
    backbone_blocks: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    """Blocks per stage of a `custom` backbone (four stages)."""
    backbone_widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    """Channel width per stage of a `custom` backbone (before block expansion)."""
    backbone_weights: str = "none"
    """`none` (random init), `imagenet` (torchvision weights) or a path to a state-dict file."""
    train_backbone_norm: bool = False
    """Train the backbone's batch norms; default frozen (per-GPU batches are a few images)."""
    hidden_size: int = 768
    """Transformer width; visual tokens are projected to it by a 1x1 conv."""
    num_layers: int = 12
    """Transformer layers."""
    num_heads: int = 12
    """Attention heads per layer."""
    intermediate_size: int = 3072
    """Feed-forward width inside each transformer layer."""
    vocab_size: int = 30522
    """WordPiece vocabulary size; must match the tokenizer (0: take the tokenizer's size)."""
    max_position_embeddings: int = 512
    """Longest text sequence the position table covers."""
    dropout: float = 0.1
    """Dropout on hidden states and attention probabilities."""
    text_weights: str = "none"
    """`none` (random init) or a hub name / folder of BERT weights, e.g. `bert-base-uncased`."""
    pixel_sample_count: int = 100
    """Visual tokens drawn per image in pre-training (random pixel sampling); 0 keeps all."""
    visual_position_embedding: bool = False
    """Add a learned 2-D position embedding to visual tokens (not in the paper)."""
    max_visual_grid: int = 32
    """Rows and columns the 2-D position table covers (1333 px / stride 64 = 21)."""

    def __post_init__(self) -> None:
        _require(len(self.backbone_blocks) == 4 and all(b > 0 for b in self.backbone_blocks),
                 f"model.backbone_blocks must be 4 positive counts, got {self.backbone_blocks}")
        _require(len(self.backbone_widths) == 4 and all(w > 0 for w in self.backbone_widths),
                 f"model.backbone_widths must be 4 positive widths, got {self.backbone_widths}")
        _require(self.hidden_size > 0 and self.hidden_size % self.num_heads == 0,
                 f"model.hidden_size ({self.hidden_size}) must be a positive multiple of "
                 f"model.num_heads ({self.num_heads})")
        _require(self.num_layers > 0, f"model.num_layers must be positive, got {self.num_layers}")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _require(self.pixel_sample_count >= 0,
                 f"model.pixel_sample_count must be >= 0, got {self.pixel_sample_count}")
        _require(self.max_visual_grid > 0,
                 f"model.max_visual_grid must be positive, got {self.max_visual_grid}")


@dataclass
class DataConfig:
    train_manifest: str = ""
    """Folder or s3:// URL of the training shards' manifest.json."""
    eval_manifest: str = ""
    """Held-out shards: zero-shot retrieval in pre-training, the task's evaluation in fine-tuning."""
    tokenizer: str = "bert-base-uncased"
    """WordPiece vocab: hub name, folder with vocab.txt, or a vocab.txt path."""
    max_text_len: int = 40
    """Text tokens per caption including [CLS] and [SEP]; longer captions are truncated and counted."""
    image_short_side: int = 800
    """Resize so the shorter image side is this many pixels."""
    image_long_side: int = 1333
    """...unless that makes the longer side exceed this many pixels."""
    mlm_probability: float = 0.15
    """Fraction of caption tokens selected for masked language modelling."""
    itm_negative_fraction: float = 0.5
    """Fraction of pairs in a batch whose caption is swapped for another image's."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0: read in the training process)."""
    open_shards: int = 4
    """Shards each worker reads at once, interleaved at random (the shuffle)."""
    captions_per_image: int = 1
    """G captions of one image kept together in a batch: the CNN runs once for all G (SOHO: 4)."""
    decoder: Literal["cpu", "dali", "auto"] = "auto"
    """Image decode and resize: PIL in the loader workers, NVIDIA DALI (GPU), or DALI when a GPU is there."""
    pad_multiple: int = 64
    """Pad a batch's height and width up to a multiple of this (of 64); 128: fewer shapes, more padding."""

    def __post_init__(self) -> None:
        _require(self.max_text_len >= 3, f"data.max_text_len must be >= 3, got {self.max_text_len}")
        _require(0 < self.image_short_side <= self.image_long_side,
                 f"data.image_short_side ({self.image_short_side}) must be positive and at most "
                 f"data.image_long_side ({self.image_long_side})")
        _require(0.0 < self.mlm_probability < 1.0,
                 f"data.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        _require(0.0 <= self.itm_negative_fraction < 1.0,
                 f"data.itm_negative_fraction must be in [0, 1), got {self.itm_negative_fraction}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.open_shards >= 1, f"data.open_shards must be >= 1, got {self.open_shards}")
        _require(self.pad_multiple > 0 and self.pad_multiple % 64 == 0,
                 f"data.pad_multiple must be a positive multiple of 64 (one visual token cell), "
                 f"got {self.pad_multiple}")
        _require(self.captions_per_image >= 1,
                 f"data.captions_per_image must be >= 1, got {self.captions_per_image}")


@dataclass
class OptimConfig:
    cnn_optimizer: Literal["sgd", "adamw"] = "sgd"
    """CNN algorithm: SGD as the paper (an ImageNet-initialised CNN); AdamW for a CNN from scratch."""
    cnn_lr: float = 1e-2
    """Learning rate of the CNN backbone and its 1x1 projection."""
    cnn_momentum: float = 0.9
    """SGD momentum of the CNN (with cnn_optimizer=adamw the transformer's betas apply)."""
    cnn_weight_decay: float = 5e-4
    """Weight decay of the CNN (never on biases or norms)."""
    transformer_lr: float = 1e-4
    """AdamW learning rate of the transformer, embeddings and heads."""
    transformer_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    transformer_eps: float = 1e-8
    """AdamW epsilon."""
    transformer_weight_decay: float = 1e-2
    """AdamW decoupled weight decay (never on biases or norms)."""
    warmup_steps: int = 1000
    """Steps of linear warmup from 0 to the base learning rates."""
    lr_decay_epochs: list[int] = field(default_factory=lambda: [25, 35])
    """Epochs after which every learning rate is multiplied by lr_decay_factor."""
    lr_decay_factor: float = 0.1
    """Multiplier applied at each lr_decay_epochs boundary."""

    def __post_init__(self) -> None:
        for name in ("cnn_lr", "transformer_lr"):
            _require(getattr(self, name) > 0, f"optim.{name} must be positive, got {getattr(self, name)}")
        _require(len(self.transformer_betas) == 2 and all(0 <= b < 1 for b in self.transformer_betas),
                 f"optim.transformer_betas must be two numbers in [0, 1), got {self.transformer_betas}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.lr_decay_epochs == sorted(self.lr_decay_epochs),
                 f"optim.lr_decay_epochs must be increasing, got {self.lr_decay_epochs}")


@dataclass
class TrainConfig:
    epochs: int = 40
    """Passes over the image-caption pairs."""
    global_batch_size: int = 4096
    """Image-caption pairs per optimizer step, summed over ranks and accumulation."""
    micro_batch_size: int = 64
    """Pairs per rank per forward pass."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision; fills the DeepSpeed config."""
    grad_clip: float = 1.0
    """Gradient norm clip; 0 disables."""
    activation_checkpointing: Literal["none", "transformer", "cnn", "all"] = "none"
    """Recompute these layers' activations in backward instead of storing them: memory for time."""
    compile: bool = False
    """torch.compile the CNN trunk and each transformer layer (in place: names and checkpoints unchanged)."""
    seed: int = 42
    """Seed for model init, masking, ITM negatives, sampling and shard order."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: train all epochs)."""
    log_every: int = 10
    """Optimizer steps between metric logs."""
    log_pairs_to: str = ""
    """Folder where each rank appends the (shard, pair) of every batch it trains on (audits, tests)."""
    eval_every: int = 0
    """Optimizer steps between evaluations on data.eval_manifest (0: at the end only, if it is set)."""
    eval_images: int = 100
    """Pre-training: images of data.eval_manifest (with all their captions) in the zero-shot retrieval."""

    def __post_init__(self) -> None:
        _require(self.epochs > 0, f"train.epochs must be positive, got {self.epochs}")
        _require(self.micro_batch_size > 0 and self.global_batch_size % self.micro_batch_size == 0,
                 f"train.global_batch_size ({self.global_batch_size}) must be a positive multiple "
                 f"of train.micro_batch_size ({self.micro_batch_size})")
        _require(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        _require(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _require(self.log_every > 0, f"train.log_every must be positive, got {self.log_every}")
        _require(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
        _require(self.eval_images > 1, f"train.eval_images must be > 1, got {self.eval_images}")


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    """Folder the ranks write checkpoints to (node-local or shared)."""
    mirror: str = ""
    """s3:// URL (or folder) each complete checkpoint is copied to; `--resume auto` looks there too."""
    every_steps: int = 1000
    """Save every this many optimizer steps (and at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted."""

    def __post_init__(self) -> None:
        _require(self.every_steps > 0, f"checkpoint.every_steps must be positive, got {self.every_steps}")
        _require(self.keep_last > 0, f"checkpoint.keep_last must be positive, got {self.keep_last}")


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty means MLFLOW_TRACKING_URI, else sqlite:///mlruns.db here."""
    experiment: str = "pixelbert-pretrain"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name; empty lets MLflow pick one."""


@dataclass
class DeepSpeedConfig:
    config: str = "configs/deepspeed/zero2.json"
    """DeepSpeed JSON; batch sizes and precision come from train.* and must not conflict."""
    zero_stage: int = 2
    """ZeRO stage 0-3; overrides the JSON's zero_optimization.stage."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO-Offload)."""

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage must be 0-3, got {self.zero_stage}")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Pixel-BERT network."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, tokenizer, image sizes and pre-training targets."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The two-algorithm optimizer and its schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch, precision, length of training."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Where and how often to save."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat_dict(self) -> dict[str, Any]:
        """`{"model.hidden_size": 768, ...}`: one entry per leaf, for MLflow params."""
        return {f"{section}.{key}": value
                for section, values in self.to_dict().items() for key, value in values.items()}


@dataclass
class TaskConfig:
    name: Literal["vqa", "nlvr2", "retrieval"] = "retrieval"
    """Downstream task: VQA 2.0, NLVR2, or image-text retrieval (Flickr30K / COCO)."""
    init: str = ""
    """Pre-trained weights: a checkpoint folder (checkpoints/stepN) or an export; empty: from scratch."""
    answer_vocab: str = ""
    """VQA: JSON list of the answers to classify over (python -m data_pipeline.answers makes it)."""
    negatives: int = 20
    """Retrieval: other captions scored against each image's true caption in training."""
    hard_negatives: int = 5
    """Retrieval: the highest-scoring negatives that give gradients."""
    freeze_cnn: bool = False
    """Keep the CNN's weights and norm statistics as pre-trained (the paper does for retrieval)."""
    eval_folds: int = 1
    """Retrieval: also report Recall@K averaged over this many equal folds of the images (COCO 1K: 5)."""
    eval_batch_size: int = 64
    """Text sequences per forward pass in evaluation."""
    predictions: str = ""
    """VQA: write [{question_id, answer}] here (the format of the evaluation server)."""

    def __post_init__(self) -> None:
        _require(self.negatives >= 1, f"task.negatives must be >= 1, got {self.negatives}")
        _require(1 <= self.hard_negatives <= self.negatives,
                 f"task.hard_negatives must be in [1, task.negatives={self.negatives}], got {self.hard_negatives}")
        _require(self.eval_batch_size > 0, f"task.eval_batch_size must be positive, got {self.eval_batch_size}")
        _require(self.eval_folds >= 1, f"task.eval_folds must be >= 1, got {self.eval_folds}")
        _require(self.name != "vqa" or bool(self.answer_vocab),
                 "task.name=vqa needs task.answer_vocab (python -m data_pipeline.answers makes it)")


@dataclass
class FinetuneConfig(PretrainConfig):
    task: TaskConfig = field(default_factory=TaskConfig)
    """The downstream task, its head and where it starts from."""


# ---------------------------------------------------------------------------- loading

def load_config(path: str | Path | None = None, overrides: list[str] = (),
                schema: type = PretrainConfig) -> Any:
    """Build `schema` from a YAML file (optional) and `--section.key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        _require(isinstance(loaded, (dict, type(None))), f"{path}: top level must be a mapping")
        raw = loaded or {}
    for override in overrides:
        dotted, value = _parse_override(override)
        section, _, key = dotted.partition(".")
        _require(bool(section and key), f"override {override!r}: expected --section.key=value")
        target = raw.setdefault(section, {})
        _require(isinstance(target, dict), f"{path}: section {section} must be a mapping")
        target[key] = value
    where = " + ".join(filter(None, [str(path) if path else "", "overrides" if overrides else ""]))
    try:
        return _build(schema, raw, prefix="")
    except ConfigError as err:
        raise ConfigError(f"{where or 'defaults'}: {err}") from None


def _parse_override(arg: str) -> tuple[str, Any]:
    _require(arg.startswith("--") and "=" in arg, f"override {arg!r}: expected --section.key=value")
    dotted, text = arg[2:].split("=", 1)
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text  # not YAML: keep the literal string and let the type check judge it
    return dotted, value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    _require(isinstance(raw, dict), f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else \
                f"; valid keys: {', '.join(prefix + n for n in names)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            kwargs[key] = _build(expected, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, expected)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "None" if tp is type(None) else tp.__name__


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_type(name: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp` (int -> float only) or raise naming the field."""
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{name}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name}: invalid value {value!r}; choose one of {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(name, value, option)
            except ConfigError:
                continue
        raise wrong
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        (item_tp,) = typing.get_args(tp)
        return [_check_type(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise wrong
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _SCIENTIFIC.fullmatch(value):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise wrong
    return value


# ---------------------------------------------------------------------------- help

def field_docs(cls: type) -> dict[str, str]:
    """The docstring line under each field of a dataclass (and its dataclass bases), from source."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
                docs[node.target.id] = str(nxt.value.value).strip()
    return docs


def describe(schema: type = PretrainConfig) -> str:
    """Every key with its type, default and docstring line: the CLI's --help."""
    lines = []
    defaults = schema()
    for section in dataclasses.fields(schema):
        section_cls = typing.get_type_hints(schema)[section.name]
        lines.append(f"{section.name}: {field_docs(schema).get(section.name, '')}")
        docs = field_docs(section_cls)
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            default = getattr(getattr(defaults, section.name), f.name)
            lines.append(f"  --{section.name}.{f.name}={default!r}  ({_type_name(hints[f.name])})")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m pixelbert_dist.config [CONFIG.yaml] [--section.key=value ...]`: print it resolved."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(describe())
        return 0
    path = argv[0] if argv and not argv[0].startswith("--") else None
    try:
        cfg = load_config(path, argv[1:] if path else argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
