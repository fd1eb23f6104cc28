"""The typed config tree: one dataclass per section, one docstring line per field, and the
rules each value must follow in `__post_init__`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pixelbert_dist.config.errors import _require

SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
from pixelbert_dist.config.redact import redact


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
    mlm_on_mismatched: bool = False
    """MLM loss on captions paired with another image too (ITM label 0); off: matched pairs only."""
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
class MixtureEntry:
    name: str
    """The dataset's name in logs and metrics (letters, digits, '_', '-', '.')."""
    manifest: str
    """Folder or s3:// URL of its manifest.json."""
    weight: float = 1.0
    """Passes over it per epoch: 2 reads every pair twice; 0.25 a quarter of its shards, others next epoch."""

    def __post_init__(self) -> None:
        _require(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)),
                 f"data.mixture: name {self.name!r} must be letters, digits, '_', '-' or '.'")
        _require(self.weight >= 0, f"data.mixture: {self.name}'s weight must be >= 0, got {self.weight}")


@dataclass
class DataConfig:
    train_manifest: str = ""
    """Folder or s3:// URL of the training shards' manifest.json."""
    mixture: list[MixtureEntry] = field(default_factory=list)
    """Several datasets instead of train_manifest: [{name: coco-vg, manifest: URL, weight: 1}, ...]."""
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
    augment_short_sides: list[int] = field(default_factory=list)
    """Training augmentation: each image's shorter side drawn from these (multi-scale); image_long_side still caps."""
    augment_flip: float = 0.0
    """Training augmentation: chance of a horizontal flip; the text's "left" and "right" swap with it."""
    augment_color_jitter: float = 0.0
    """Training augmentation: brightness, contrast and saturation each scaled by a factor in [1 - x, 1 + x]."""
    augment_randaugment: int = 0
    """Training augmentation: RandAugment ops per image (ViLT: 2), none that erase or invert colours; 0: off."""
    augment_randaugment_magnitude: int = 9
    """Strength of those ops, 0-30 (torchvision's scale; ViLT: 9)."""
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
    shard_roots: list[str] = field(default_factory=list)
    """Folders or s3:// prefixes an index manifest's tar urls may also lie in (another bucket, say)."""
    max_skipped_fraction: float = 0.001
    """Damaged or undecodable pairs an epoch may skip, as a fraction of its pairs, before the run stops (0: none)."""

    def __post_init__(self) -> None:
        _require(not (self.train_manifest and self.mixture), "data: give train_manifest or mixture, not both")
        names = [entry.name for entry in self.mixture]
        _require(len(set(names)) == len(names), f"data.mixture: dataset names must differ, got {names}")
        _require(not self.mixture or sum(entry.weight for entry in self.mixture) > 0,
                 "data.mixture: at least one dataset needs a weight above 0")
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
        _require(0.0 <= self.max_skipped_fraction <= 1.0,
                 f"data.max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")
        _require(all(0 < side <= self.image_long_side for side in self.augment_short_sides),
                 f"data.augment_short_sides must be in (0, data.image_long_side={self.image_long_side}], "
                 f"got {self.augment_short_sides}")
        _require(0.0 <= self.augment_flip <= 1.0, f"data.augment_flip must be in [0, 1], got {self.augment_flip}")
        _require(0.0 <= self.augment_color_jitter < 1.0,
                 f"data.augment_color_jitter must be in [0, 1), got {self.augment_color_jitter}")
        _require(0 <= self.augment_randaugment <= 4,
                 f"data.augment_randaugment must be 0-4 ops per image, got {self.augment_randaugment}")
        _require(0 <= self.augment_randaugment_magnitude <= 30,
                 f"data.augment_randaugment_magnitude must be 0-30, got {self.augment_randaugment_magnitude}")


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
    """Training precision; fills the DeepSpeed config (bf16: gradients summed and frozen norms kept in fp32)."""
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
    collective_timeout_s: float = 300.0
    """Seconds a rank waits for the others in one collective before it stops (a node lost, sockets left open)."""

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
        _require(self.collective_timeout_s > 0,
                 f"train.collective_timeout_s must be positive, got {self.collective_timeout_s}")


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
    log_model: bool = True
    """At the end, log the trained model (save_pretrained's folder) as the run's `model` artifact."""
    register_model: str = ""
    """Also register that artifact in MLflow's model registry under this name (empty: do not)."""


@dataclass
class DeepSpeedConfig:
    config: str = str(SHIPPED_CONFIGS / "deepspeed" / "zero2.json")
    """DeepSpeed JSON (in a YAML file: relative to that file); batch sizes and precision come from train.*."""
    zero_stage: int = 2
    """ZeRO stage 0-3; overrides the JSON's zero_optimization.stage."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory and step it there with our optimizer (ZeRO-Offload; zero_stage 1-3)."""

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
        """The nested plain dict every recorded copy of the config is made from (MLflow, checkpoints,
        config.json, the CLI): URLs' credentials are redacted; the dataclass keeps the real values."""
        return redact(dataclasses.asdict(self))

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
