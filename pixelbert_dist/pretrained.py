"""Load, save and run a trained Pixel-BERT the way a Hugging Face model is used.

    model = PixelBert.from_pretrained("exported/pixelbert-r50")   # or checkpoints/step00040000
    probs = model.score(["cat.jpg", "dog.jpg"], ["a cat on a mat", "a dog in the snow"])
    features = model.encode(["cat.jpg"], ["a cat on a mat"])  # .pooled, .text, .visual + masks
    model.save_pretrained("exported/mine")

`PixelBert` inherits `PretrainedMixin`. A model folder is `model.safetensors` + `config.json`
(the run config) + the tokenizer's files; a DeepSpeed checkpoint folder (with complete.json)
loads too, its weights consolidated by DeepSpeed's zero-to-fp32. Inference applies the
model's own preprocessing, taken from the run config's data section: the training resize rule,
padding to `pad_multiple` (pad_images), captions cut at `max_text_len` (encode_captions).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF
from transformers import BertTokenizer, PreTrainedTokenizerBase

from pixelbert_dist.config import DataConfig, ModelConfig
from pixelbert_dist.data.batch import image_rows, resized_size
from pixelbert_dist.data.types import TOKEN_STRIDE, PretrainBatch, pad_images
from pixelbert_dist.evaluate import inference_context
from pixelbert_dist.tokenizer import SPECIAL_TOKENS, encode_captions, load_tokenizer

log = logging.getLogger("pixelbert_dist.pretrained")

WEIGHTS = "model.safetensors"
CONFIG = "config.json"

ImageInput = Union[str, Path, Image.Image]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What inference does to its inputs: the run config's data settings the model was trained with."""

    image_short_side: int
    image_long_side: int
    pad_multiple: int
    max_text_len: int

    @classmethod
    def from_run_config(cls, data: dict) -> "Preprocessing":
        """From a run config's `data` section; a key it lacks (an older run) takes DataConfig's default."""
        known = {f.name for f in dataclasses.fields(DataConfig)}
        cfg = DataConfig(**{k: v for k, v in data.items() if k in known})  # validated as in training
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class PairFeatures:
    """What the transformer makes of each (image, caption) pair; padding is zero, masks False."""

    pooled: Tensor       # (N, hidden): [CLS] through BERT's pooler, what the ITM head reads
    text: Tensor         # (N, T, hidden): token features, [CLS] first, then the caption and [SEP]
    text_mask: Tensor    # (N, T) bool
    visual: Tensor       # (N, rows, cols, hidden): one visual token per 64x64 px, image at the top left
    visual_mask: Tensor  # (N, rows, cols) bool


def load_image(image: ImageInput, pre: Preprocessing) -> Tensor:
    """(3, h, w) uint8 RGB, resized by the training rule (batch.resized_size: shorter side S unless
    the longer would exceed L; bicubic).

    A path and a PIL image of the same file give the same pixels: both are decoded at full size.
    (The CPU loader's decode_resize may decode a JPEG at 1/2..1/8 scale first, a speed trick the
    DALI loader does not use: a probability can differ from the zero-shot evaluation's in the
    third decimal for files at least twice the target size.)
    """
    if isinstance(image, Image.Image):
        return _resized(image, pre)
    if not isinstance(image, (str, Path)):
        raise TypeError(f"an image is a path or a PIL image, not {type(image).__name__}")
    try:
        with Image.open(image) as opened:
            return _resized(opened, pre)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying the file is no image
        raise ValueError(f"{image}: does not decode as an image: {err}") from None


def _resized(image: Image.Image, pre: Preprocessing) -> Tensor:
    height, width = resized_size(image.height, image.width, pre.image_short_side, pre.image_long_side)
    return TF.pil_to_tensor(image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC))


def _image_key(image: ImageInput) -> str:
    """Equal keys: one image, decoded and run through the CNN once per batch."""
    return f"path:{Path(image).resolve()}" if isinstance(image, (str, Path)) else f"object:{id(image)}"


def run_places(path: Path, run_config: dict, is_checkpoint: bool, written: str) -> list[Path]:
    """Where a path the run config names may be: as written (absolute, or from the working
    directory) and, for a checkpoint, from the run's working directory."""
    places = [Path(written)]
    checkpoint_dir = Path(run_config.get("checkpoint", {}).get("dir", ""))
    if is_checkpoint and not Path(written).is_absolute() and not checkpoint_dir.is_absolute():
        run_dir = path.resolve().parent  # the run's working directory: the root minus checkpoint.dir
        for _ in checkpoint_dir.parts:
            run_dir = run_dir.parent
        places.append(run_dir / written)
    return places


def tokenizer_source(path: Path, run_config: dict, is_checkpoint: bool) -> str | None:
    """Where the tokenizer of a model folder is, as load_tokenizer takes it: its own files, else the
    run's `data.tokenizer` (a path from the working directory or, for a checkpoint, from the run's,
    or a hub name in the local cache). Never the network."""
    if (path / "vocab.txt").is_file() or (path / "tokenizer_config.json").is_file():  # export's, save_pretrained's
        return str(path)
    name = run_config.get("data", {}).get("tokenizer", "")
    if not name:
        return None
    for place in run_places(path, run_config, is_checkpoint, name):
        if place.is_file() or (place / "vocab.txt").is_file():
            return str(place)
    try:  # a hub name: only when the cache holds it (transformers answers 5 special tokens if not)
        if len(BertTokenizer.from_pretrained(name, local_files_only=True)) > len(SPECIAL_TOKENS):
            return name
    except (OSError, ValueError):
        pass
    return None


def find_tokenizer(path: Path, run_config: dict, is_checkpoint: bool) -> PreTrainedTokenizerBase | None:
    """The tokenizer tokenizer_source finds, loaded; None where there is none."""
    source = tokenizer_source(path, run_config, is_checkpoint)
    return load_tokenizer(source) if source is not None else None


def fine_tuned(path: Path) -> str | None:
    """The task of a fine-tuned model folder or checkpoint (its weights: body.* + head.*); None for
    a pre-trained Pixel-BERT. A checkpoint says so by its run config's task section."""
    from safetensors import safe_open

    run_config, is_checkpoint = read_run_config(path)
    if is_checkpoint:
        return run_config.get("task", {}).get("name")
    with safe_open(str(path / WEIGHTS), framework="pt") as weights:
        is_task = any(key.startswith("body.") for key in weights.keys())
    return run_config.get("task", {}).get("name", "task") if is_task else None


def read_run_config(path: Path) -> tuple[dict, bool]:
    """(the run config, is it a checkpoint) of a model folder or a complete DeepSpeed checkpoint."""
    from pixelbert_dist import checkpoint

    if not (path / WEIGHTS).is_file() and (path / checkpoint.COMPLETE).is_file():
        return checkpoint.read_client_state(path.parent, path.name)["config"], True
    if (path / WEIGHTS).is_file() and (path / CONFIG).is_file():
        return json.loads((path / CONFIG).read_text()), False
    raise FileNotFoundError(f"{path}: neither a model folder ({WEIGHTS} + {CONFIG}) nor a complete "
                            f"checkpoint ({checkpoint.COMPLETE})")


def load_weights(model: torch.nn.Module, path: Path, is_checkpoint: bool) -> None:
    """The folder's weights into `model`: a checkpoint's consolidated fp32, or model.safetensors."""
    from safetensors.torch import load_model

    from pixelbert_dist import checkpoint

    if is_checkpoint:
        checkpoint.load_weights_only(model, path.parent, path.name)
    else:
        load_model(model, str(path / WEIGHTS))  # the tied MLM decoder / word embeddings stay tied


class PretrainedMixin:
    """`from_pretrained`, `save_pretrained`, `score` and `encode` for PixelBert.

    Set by from_pretrained: `tokenizer`, `preprocessing` and `run_config` (written back by
    save_pretrained). A PixelBert built from a config has no tokenizer until one is assigned.
    """

    tokenizer: PreTrainedTokenizerBase | None = None
    preprocessing: Preprocessing | None = None
    run_config: dict | None = None

    # ------------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, path: str | Path, *, tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
                        device: str | torch.device = "cpu"):
        """A model folder (save_pretrained's or export's) or a DeepSpeed checkpoint folder, in eval mode.

        `tokenizer` overrides the one found with the model (a tokenizer, or what load_tokenizer takes).
        """
        path = Path(path)
        run_config, is_checkpoint = read_run_config(path)
        task = fine_tuned(path)
        if task:
            raise ValueError(f"{path} holds a fine-tuned {task} model (body and head): "
                             f"load it with pixelbert_dist.export.load_exported({str(path)!r})")
        # the weights come from the folder: never fetch BERT's or ImageNet's
        model = cls(ModelConfig(**{**run_config["model"], "text_weights": "none", "backbone_weights": "none"}))
        load_weights(model, path, is_checkpoint)

        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(str(tokenizer))
        elif tokenizer is None:
            tokenizer = find_tokenizer(path, run_config, is_checkpoint)
            if tokenizer is None:
                log.warning("%s: no tokenizer found (data.tokenizer=%r); pass from_pretrained(..., tokenizer=) "
                            "before score() or encode()", path, run_config.get("data", {}).get("tokenizer"))
        if tokenizer is not None and len(tokenizer) != model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} entries; {path} was trained with a "
                             f"vocabulary of {model.cfg.vocab_size}")
        model.tokenizer = tokenizer
        model.preprocessing = Preprocessing.from_run_config(run_config.get("data", {}))
        model.run_config = run_config
        return model.to(device).eval()

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """model.safetensors + config.json (the run config, data section = `preprocessing`) + tokenizer files."""
        from safetensors.torch import save_model

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_model(self, str(out / WEIGHTS))  # handles the tied MLM decoder / word embeddings
        run_config = dict(self.run_config or {})
        run_config["model"] = dataclasses.asdict(self.cfg)
        if self.preprocessing is not None:
            run_config["data"] = {**run_config.get("data", {}), **dataclasses.asdict(self.preprocessing)}
        (out / CONFIG).write_text(json.dumps(run_config, indent=1))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out))
        return out

    # ------------------------------------------------------------------------ inference

    def score(self, images: Sequence[ImageInput], captions: Sequence[str], batch_size: int = 32) -> Tensor:
        """(N,) float: the ITM head's probability that caption i describes image i."""
        probs = []
        with inference_context(self):
            for batch in self._pair_batches(images, captions, batch_size):
                probs.append(self(batch).itm_logits.float().softmax(-1)[:, 1].cpu())
        return torch.cat(probs)

    def encode(self, images: Sequence[ImageInput], captions: Sequence[str],
                     batch_size: int = 32) -> PairFeatures:
        """The transformer's output for each (image i, caption i): pooled [CLS], token features, masks."""
        parts = []
        with inference_context(self):
            for batch in self._pair_batches(images, captions, batch_size):
                visual, visual_mask = self.visual(batch.images, batch.pixel_mask)
                if batch.image_index is not None:
                    visual, visual_mask = visual[batch.image_index], visual_mask[batch.image_index]
                hidden = self.fuse(batch.input_ids, batch.attention_mask, visual, visual_mask)
                pooled = self.bert.pooler(hidden)
                mask = torch.cat([batch.attention_mask.bool(), visual_mask], dim=1)
                hidden = hidden.float().masked_fill(~mask.unsqueeze(-1), 0.0).cpu()  # padding: zero
                length = batch.input_ids.shape[1]
                rows, cols = (-(-side // TOKEN_STRIDE) for side in batch.images.shape[-2:])
                grid = (len(hidden), rows, cols)
                parts.append(PairFeatures(
                    pooled=pooled.float().cpu(), text=hidden[:, :length], text_mask=mask[:, :length].cpu(),
                    visual=hidden[:, length:].reshape(*grid, -1), visual_mask=visual_mask.reshape(grid).cpu()))
        return _concat(parts)

    def _pair_batches(self, images: Sequence[ImageInput], captions: Sequence[str],
                      batch_size: int) -> Iterator[PretrainBatch]:
        """Preprocessed batches on the model's device; a repeated image is decoded once per batch."""
        if isinstance(captions, str) or len(images) != len(captions):
            raise ValueError(f"one caption per image: got {len(images)} images and "
                             f"{1 if isinstance(captions, str) else len(captions)} captions (both lists)")
        if not images:
            raise ValueError("no images given")
        if self.tokenizer is None or self.preprocessing is None:
            raise RuntimeError("this model has no tokenizer or preprocessing: load it with "
                               "PixelBert.from_pretrained, or set model.tokenizer and model.preprocessing")
        pre, device = self.preprocessing, next(self.parameters()).device
        for first in range(0, len(images), batch_size):
            chunk = list(images[first:first + batch_size])
            firsts, image_index = image_rows([_image_key(image) for image in chunk])
            pixels, pixel_mask = pad_images([load_image(chunk[i], pre) for i in firsts], pre.pad_multiple)
            text = encode_captions(self.tokenizer, list(captions[first:first + batch_size]), pre.max_text_len)
            yield PretrainBatch(pixels, pixel_mask, text.input_ids, text.attention_mask,
                                image_index=image_index).to(device)


def _concat(parts: list[PairFeatures]) -> PairFeatures:
    """Batches of different widths, zero-padded to the widest (masks False there)."""
    if len(parts) == 1:
        return parts[0]
    length = max(p.text.shape[1] for p in parts)
    rows = max(p.visual.shape[1] for p in parts)
    cols = max(p.visual.shape[2] for p in parts)

    def pad(t: Tensor, *sizes: int) -> Tensor:  # a zero canvas `sizes` wide in dims 1.., t at its start
        out = t.new_zeros(t.shape[0], *sizes, *t.shape[1 + len(sizes):])
        out[tuple(slice(0, size) for size in t.shape)] = t
        return out

    return PairFeatures(
        pooled=torch.cat([p.pooled for p in parts]),
        text=torch.cat([pad(p.text, length) for p in parts]),
        text_mask=torch.cat([pad(p.text_mask, length) for p in parts]),
        visual=torch.cat([pad(p.visual, rows, cols) for p in parts]),
        visual_mask=torch.cat([pad(p.visual_mask, rows, cols) for p in parts]))
