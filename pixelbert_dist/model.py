"""Pixel-BERT (Huang et al., 2020): a CNN's pixels and BERT's words in one transformer.

    images -> ResNet (backbone.py) -> 1x1 conv -> 2x2 max-pool -> visual tokens (+ semantic embedding)
    words  -> BERT embeddings
    [CLS] w1..wn [SEP] v1..vk -> BERT encoder -> MLM head (words), ITM head ([CLS])

The backbone has stride 32 and the pool doubles it: one visual token per 64x64 pixels.
Images arrive as uint8 pixels and are normalized here, on the model's device: a quarter of
the bytes of float images between loader processes and over PCIe, and no float arithmetic
in the loader. Images of different sizes are padded at the bottom and right and carry a
pixel mask; the trunk zeroes the padding wherever it could leak into a valid pixel, so a
valid token's features are the same as for the unpadded image, and padded tokens are never
attended to or sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, BertForPreTraining
from transformers.masking_utils import create_bidirectional_mask

from pixelbert_dist.backbone import build_trunk
from pixelbert_dist.config import ModelConfig, TrainConfig
# The batch contract lives with the data path's types; pad_images, pixel_mask_from_sizes and
# PretrainBatch stay importable from here for existing callers.
from pixelbert_dist.data.types import (  # noqa: F401
    BACKBONE_STRIDE, IGNORE_INDEX, TOKEN_STRIDE, PretrainBatch, image_sizes, pad_images, pixel_mask_from_sizes)
from pixelbert_dist.data.wire import check_image_sizes
from pixelbert_dist.pretrained import PretrainedMixin

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics torchvision's ImageNet weights were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PixelBertOutput:
    """Losses and accuracies; each one alone is there for logging. Accuracies are in percent
    (0-100), like every accuracy and recall the evaluations and the paper's tables report."""

    loss: Tensor
    mlm_loss: Tensor
    mlm_accuracy: Tensor
    itm_loss: Tensor
    itm_accuracy: Tensor
    itm_logits: Tensor
    pooled: Tensor  # (B, hidden): pooled [CLS]


# ---------------------------------------------------------------------------- visual tokens

class VisualEmbedding(nn.Module):
    """Pixels -> visual tokens: CNN, 1x1 conv to the hidden size, 2x2 max-pool, semantic embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cnn = build_trunk(cfg)
        self.proj = nn.Conv2d(self.cnn.out_channels, cfg.hidden_size, kernel_size=1)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.semantic_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)
        # BERT's text embeddings end in a LayerNorm; the visual tokens get one too, so both
        # kinds enter the transformer at the same scale whatever the CNN's output scale is.
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=1e-12)
        self.max_grid = cfg.max_visual_grid
        if cfg.visual_position_embedding:
            self.row_embedding = nn.Parameter(torch.randn(cfg.max_visual_grid, cfg.hidden_size) * 0.02)
            self.col_embedding = nn.Parameter(torch.randn(cfg.max_visual_grid, cfg.hidden_size) * 0.02)
        else:
            self.row_embedding = self.col_embedding = None
        # Plain tensors, not buffers: DeepSpeed casts a bf16 model's buffers, and the mean
        # 123.675 would become 123.5. One fp32 copy per device, made on first use.
        self._pixel_stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def normalize(self, images: Tensor, pixel_mask: Tensor) -> Tensor:
        """uint8 pixels -> ImageNet-normalized values in the CNN's dtype, zero where padded."""
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 pixels (0..255), not {images.dtype}; the model "
                            f"normalizes them itself")
        if images.device not in self._pixel_stats:
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            self._pixel_stats[images.device] = (mean.to(images.device), std.to(images.device))
        mean, std = self._pixel_stats[images.device]
        # torchvision's to_dtype(scale=True) + normalize, bit for bit, in place on one fp32 copy
        # (half the time of the out-of-place form on a CPU)
        normalized = images.float().div_(255.0).sub_(mean).div_(std)
        normalized.masked_fill_(~pixel_mask.unsqueeze(1), 0.0)
        return normalized.to(self.cnn.conv1.weight.dtype)

    def cnn_features(self, images: Tensor, pixel_mask: Tensor | None = None) -> Tensor:
        """Stage-4 features (B, C, H/32, W/32), zero outside each image's valid region."""
        # The mask is applied even when nothing is padded (a multiply by ones, the same values):
        # asking the GPU whether anything is padded would make the host wait for it every step.
        return self.cnn(images, pixel_mask)

    def forward(self, images: Tensor, pixel_mask: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images -> visual tokens (B, N, hidden) and their validity (B, N), N = cells of 64x64 px."""
        images, pixel_mask = _pad_to_multiple(images, pixel_mask, TOKEN_STRIDE)
        if not pixel_mask.is_cuda:  # on a GPU the host checks sizes before the copy (data/wire.py)
            check_image_sizes(image_sizes(pixel_mask))
        features = self.proj(self.cnn_features(self.normalize(images, pixel_mask), pixel_mask))
        cell_mask = pixel_mask[:, ::BACKBONE_STRIDE, ::BACKBONE_STRIDE]
        # -inf outside the image so a pooling window on the border takes only valid cells.
        features = features.masked_fill(~cell_mask.unsqueeze(1), float("-inf"))
        grid = self.pool(features)
        token_mask = pixel_mask[:, ::TOKEN_STRIDE, ::TOKEN_STRIDE]
        rows, cols = grid.shape[-2:]
        if self.row_embedding is not None:
            if max(rows, cols) > self.max_grid:
                raise ValueError(f"visual grid {rows}x{cols} exceeds model.max_visual_grid={self.max_grid}")
            position = self.row_embedding[:rows, None, :] + self.col_embedding[None, :cols, :]
            grid = grid + position.permute(2, 0, 1).unsqueeze(0)
        token_mask = token_mask.flatten(1)
        # cells wholly in the padding hold -inf: clear them before the norm, or its gradient is NaN
        tokens = grid.flatten(2).transpose(1, 2).masked_fill(~token_mask.unsqueeze(-1), 0.0)
        tokens = self.norm(tokens + self.semantic_embedding)
        return tokens.masked_fill(~token_mask.unsqueeze(-1), 0.0), token_mask


def _pad_to_multiple(images: Tensor, pixel_mask: Tensor, multiple: int) -> tuple[Tensor, Tensor]:
    pad_h = -images.shape[-2] % multiple
    pad_w = -images.shape[-1] % multiple
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
        pixel_mask = F.pad(pixel_mask, (0, pad_w, 0, pad_h), value=False)
    return images, pixel_mask


def sample_visual_tokens(tokens: Tensor, token_mask: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Random pixel sampling: `count` valid tokens per image, uniformly, without replacement.

    Each image draws on its own and anew at every call. An image with fewer valid tokens
    than `count` keeps all of them; the extra slots are padding (mask False).
    """
    count = min(count, tokens.shape[1])
    scores = torch.rand(token_mask.shape, device=tokens.device).masked_fill(~token_mask, -1.0)
    index = scores.topk(count, dim=1).indices
    picked = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return picked, token_mask.gather(1, index)


# ---------------------------------------------------------------------------- Pixel-BERT

def bert_config(cfg: ModelConfig) -> BertConfig:
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size is 0: set it, or let the trainer take the tokenizer's size")
    return BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=2,
        tie_word_embeddings=True)


class PixelBert(PretrainedMixin, nn.Module):
    """Pixel-BERT with its two pre-training heads. `bert.*` and `cls.*` use BERT's own names."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        text = BertForPreTraining(bert_config(cfg))
        self.bert = text.bert        # embeddings, encoder, pooler
        self.cls = text.cls          # MLM head (decoder tied to word embeddings) and a 2-way head
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.visual = VisualEmbedding(cfg)
        if cfg.text_weights != "none":
            self.load_text_weights(cfg.text_weights)

    def load_text_weights(self, name_or_path: str) -> None:
        """Load BERT weights (hub name or folder) into the text side by parameter name."""
        source = BertForPreTraining.from_pretrained(name_or_path).state_dict()
        own = self.state_dict()
        for key, value in source.items():
            if key in own and own[key].shape != value.shape:
                raise ValueError(f"{name_or_path}: {key} has shape {tuple(value.shape)}, the model "
                                 f"expects {tuple(own[key].shape)}; check model.hidden_size/vocab_size")
        self.load_state_dict({k: v for k, v in source.items() if k in own}, strict=False)

    def fuse(self, input_ids: Tensor, attention_mask: Tensor,
               visual: Tensor | None = None, visual_mask: Tensor | None = None) -> Tensor:
        """Hidden states of [CLS] w1..wn [SEP] v1..vk; text-only when `visual` is None."""
        hidden = self.bert.embeddings(input_ids=input_ids)
        mask = attention_mask.bool()
        if visual is not None:
            hidden = torch.cat([hidden, visual.to(hidden.dtype)], dim=1)
            mask = torch.cat([mask, visual_mask], dim=1)
        # The same mask BertModel builds, for whichever attention kernel the config selects.
        # No skip for an all-valid mask: finding out would make the host wait for the GPU every step.
        attention = create_bidirectional_mask(config=self.bert.config, inputs_embeds=hidden,
                                              attention_mask=mask, allow_is_bidirectional_skip=False)
        return self.bert.encoder(hidden, attention_mask=attention).last_hidden_state

    def forward(self, batch: PretrainBatch) -> PixelBertOutput:
        visual, visual_mask = self.visual(batch.images, batch.pixel_mask)
        if batch.image_index is not None:  # several captions of one image: one CNN pass, tokens shared
            visual, visual_mask = visual[batch.image_index], visual_mask[batch.image_index]
        if self.training and self.cfg.pixel_sample_count > 0:
            visual, visual_mask = sample_visual_tokens(visual, visual_mask, self.cfg.pixel_sample_count)
        hidden = self.fuse(batch.input_ids, batch.attention_mask, visual, visual_mask)
        pooled = self.bert.pooler(hidden)
        itm_logits = self.cls.seq_relationship(pooled)

        zero = hidden.new_zeros(())
        mlm_loss = mlm_accuracy = itm_loss = itm_accuracy = zero
        if batch.mlm_labels is not None:
            mlm_loss, mlm_accuracy = self.mlm(hidden[:, : batch.input_ids.shape[1]], batch.mlm_labels,
                                              batch.itm_labels)
        if batch.itm_labels is not None:
            itm_loss = F.cross_entropy(itm_logits.float(), batch.itm_labels)
            itm_accuracy = 100.0 * (itm_logits.argmax(-1) == batch.itm_labels).float().mean()
        return PixelBertOutput(loss=mlm_loss + itm_loss, mlm_loss=mlm_loss, mlm_accuracy=mlm_accuracy,
                               itm_loss=itm_loss, itm_accuracy=itm_accuracy,
                               itm_logits=itm_logits, pooled=pooled)

    def mlm(self, text: Tensor, labels: Tensor, itm_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Masked-token loss and accuracy (in %), each averaged over the positions it counts.

        Every caption arrives masked, mismatched ones too (targets.py: otherwise [MASK] tells ITM
        the answer), but the loss counts the masked words of matched pairs only, unless
        `model.mlm_on_mismatched`: a word of a caption paired with another image can only be
        guessed from the text, which is not what MLM is here to teach (UNITER, ViLT and ALBEF do
        the same; benchmarks/bench_objectives.py compares both). The accuracy is always over
        matched pairs, so both objectives report the same measure. Without ITM labels every
        pair counts as matched.

        Every text position goes through the head, and the sums run over the counted ones:
        picking them out first (boolean indexing) has a size only the GPU knows, so the host
        would wait for it in every step. The price is the head on all B x T positions (~2% more
        FLOPs and ~1 GB of fp32 logits at micro batch 64 with BERT's vocabulary). With no
        counted token the loss is a zero that still reaches every head parameter, so
        data-parallel reduction matches on all ranks.
        """
        matched = labels if itm_labels is None else torch.where(itm_labels.bool()[:, None], labels, IGNORE_INDEX)
        trained = labels if self.cfg.mlm_on_mismatched else matched
        logits = self.cls.predictions(text).float()
        losses = F.cross_entropy(logits.flatten(0, 1), trained.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        hits = (logits.argmax(-1) == matched) & (matched != IGNORE_INDEX)
        return (losses.sum() / (trained != IGNORE_INDEX).sum().clamp(min=1),
                100.0 * hits.sum() / (matched != IGNORE_INDEX).sum().clamp(min=1))


def prepare_for_training(model: "PixelBert", train: TrainConfig, device: torch.device) -> None:
    """The training step's speed and memory options, applied in place (parameter names unchanged)."""
    if train.activation_checkpointing in ("transformer", "all"):
        model.bert.activation_checkpointing_enable()  # per layer, non-reentrant
    model.visual.cnn.checkpoint_stages = train.activation_checkpointing in ("cnn", "all")
    if device.type == "cuda":
        model.visual.cnn.channels_last = True  # cuDNN's fastest conv kernels read NHWC
        torch.backends.cudnn.benchmark = True  # autotuned once per canvas shape: data.pad_multiple keeps them few
    if train.compile:
        # Module.compile, not torch.compile(module): the modules stay where they are, so state-dict
        # keys, checkpoints and DeepSpeed's per-parameter hooks see the same names and tensors.
        model.visual.cnn.compile()
        for layer in model.bert.encoder.layer:
            layer.compile()
