"""Evaluation split over ranks: one Evaluator interface, the inference loops that feed it, the metrics.

    pairs = read_pairs(Manifest("s3://bucket/vqa-val"))         # every (image, text, target); .skipped: damaged
    with inference_context(model):                              # eval mode, no graph; restored after
        metrics = run(evaluator, classify(model, builder, pairs, device, batch_size))
    retrieval(visual_tokens, match_scores, pairs, tokenizer, data_cfg, device, batch_size)  # Recall@K

An evaluator (detectron2's DatasetEvaluator) is reset, fed (inputs, outputs) of this rank's
batches, and reduces over ranks in `result()`. The task evaluators live with their task
(tasks/vqa.py, tasks/nlvr2.py); Recall@K is here because pre-training's zero-shot check
and the retrieval task both rank with it.

Every rank runs the same number of forward passes (a short rank repeats its last batch and
drops the result): under ZeRO-3 each forward gathers parameters collectively, and a rank
that stopped early would leave the others waiting.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor

from data_pipeline.answers import normalize_answer
from pixelbert_dist import distributed
from pixelbert_dist.config import DataConfig, redact
from pixelbert_dist.data.batch import decode_resize
from pixelbert_dist.data.loader import DataDamageError, count_damage, past_the_bound
from pixelbert_dist.data.plan import Manifest, Segment
from pixelbert_dist.data.stream import Pair, read_segment_skipping
from pixelbert_dist.data.types import TOKEN_STRIDE, pad_images
from pixelbert_dist.tokenizer import encode_captions

log = logging.getLogger("pixelbert_dist.evaluate")
RECALL_AT = (1, 5, 10)


# ---------------------------------------------------------------------------- metrics

def vqa_accuracy(predicted: str, answers: list[str]) -> float:
    """The official VQA accuracy of one answer: min(#humans that gave it / 3, 1), averaged over
    the ten leave-one-annotator-out subsets, on normalised answers."""
    if not answers:
        raise ValueError("vqa_accuracy needs the annotators' answers")
    guess = normalize_answer(predicted)
    truth = [normalize_answer(a) for a in answers]
    per_subset = [min(1.0, sum(a == guess for a in truth[:i] + truth[i + 1:]) / 3.0) for i in range(len(truth))]
    return sum(per_subset) / len(per_subset)


def recall_at_k(scores: Tensor, caption_image: Tensor, ks: tuple[int, ...] = RECALL_AT) -> dict[str, float]:
    """Recall@K in percent from a (images x captions) score matrix.

    text_r@K: images whose best-ranked true caption is among their top K captions;
    image_r@K: captions whose image is among their top K images.
    """
    images = torch.arange(scores.shape[0]).unsqueeze(1)
    text_hits = caption_image[scores.argsort(dim=1, descending=True)] == images       # (N, M)
    text_rank = text_hits.float().argmax(dim=1)
    image_hits = scores.argsort(dim=0, descending=True) == caption_image.unsqueeze(0)  # (N, M)
    image_rank = image_hits.float().argmax(dim=0)
    out = {}
    for k in ks:
        out[f"text_r{k}"] = 100.0 * (text_rank < k).float().mean().item()
        out[f"image_r{k}"] = 100.0 * (image_rank < k).float().mean().item()
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def recall_over_folds(scores: Tensor, caption_image: Tensor, folds: int) -> dict[str, float]:
    """Recall@K averaged over `folds` equal blocks of images, each ranked against its own
    captions only: COCO's "1K test" figures are the 5K test in 5 folds of 1,000. Images past
    the last full fold are left out."""
    size = scores.shape[0] // folds
    parts = []
    for fold in range(folds):
        first, last = fold * size, (fold + 1) * size
        columns = ((caption_image >= first) & (caption_image < last)).nonzero().flatten()
        parts.append(recall_at_k(scores[first:last][:, columns], caption_image[columns] - first))
    return {f"folds{folds}.{key}": sum(part[key] for part in parts) / folds for key in parts[0]}


# ---------------------------------------------------------------------------- data

class HeldOut(list):
    """The held-out pairs that could be read, in shard order (a list of Pair), and what was not."""

    skipped = 0
    """Pairs left out as damaged (the loader's reasons: data/stream.py SKIP_REASONS)."""


def read_pairs(manifest: Manifest, max_images: int = 0,
               max_skipped_fraction: float = DataConfig.max_skipped_fraction) -> HeldOut:
    """Every pair of a (held-out) dataset, shard by shard; the first `max_images` images if > 0.

    Damage costs its pairs as in training (the same reading, data/stream.py): each shard's
    first bad sample is logged, the pairs counted in `skipped`; more than
    `max_skipped_fraction` (data.max_skipped_fraction) of the pairs read stops with
    DataDamageError naming the shards."""
    pairs, damaged = HeldOut(), {}  # damaged: shard -> pairs and reasons, as the loader reports it
    images: set[str] = set()
    logs = distributed.rank_and_world()[0] == 0  # every rank reads the whole set: one says what it skipped
    for shard in manifest.shard_names():
        for pair in read_segment_skipping(manifest, Segment(shard, 0, manifest.num_pairs(shard))):
            if max_images and pair.key not in images and len(images) == max_images:
                continue  # (a damaged pair's key is "": past the images asked for, not counted)
            if pair.damage is not None:
                first = " ".join(str(pair.damage.error).split())
                if count_damage(damaged, shard, pair.damage.reason, 1, first) and logs:
                    log.warning("skipping damaged held-out data in %s (%s; more in this shard is counted, not "
                                "logged): %s", shard, pair.damage.reason, first)
                continue
            images.add(pair.key)
            pairs.append(pair)
        if max_images and len(images) == max_images:
            break
    pairs.skipped = sum(d["pairs"] for d in damaged.values())
    bound = int(max_skipped_fraction * (len(pairs) + pairs.skipped))
    if pairs.skipped > bound:
        raise DataDamageError(f"held-out set {manifest.url}: pairs skipped: "
                              f"{past_the_bound([damaged], pairs.skipped, bound, max_skipped_fraction)}")
    if pairs.skipped and logs:
        log.warning("held-out set %s: %d pairs skipped as damaged, %d evaluated", redact(manifest.url),
                    pairs.skipped, len(pairs))
    if not pairs:
        raise ValueError(f"{manifest.url} holds no pairs to evaluate on")
    return pairs


def _even_chunks(items: list, size: int, rank: int, world: int) -> Iterator[tuple[list, bool]]:
    """This rank's share in batches of `size`; every rank yields the same number of batches,
    padding ones (True: drop the result) repeating the last real batch."""
    share = math.ceil(len(items) / world)
    mine = items[rank * share:(rank + 1) * share]
    batches = [mine[i:i + size] for i in range(0, len(mine), size)]
    for i in range(math.ceil(share / size)):
        if i < len(batches):
            yield batches[i], False
        else:
            yield (batches[-1] if batches else items[:size]), True


# ---------------------------------------------------------------------------- the interface

class Evaluator(Protocol):
    """Accumulates this rank's outputs; `result()` reduces over all ranks (every rank calls it)."""

    def reset(self) -> None: ...

    def process(self, inputs, outputs) -> None: ...

    def result(self) -> dict[str, float]: ...


@contextmanager
def inference_context(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd graph inside; the model's previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def run(evaluator: Evaluator, outputs: Iterable[tuple]) -> dict[str, float]:
    """Feed `evaluator` every (inputs, outputs) of this rank, then reduce over ranks."""
    evaluator.reset()
    for inputs, out in outputs:
        evaluator.process(inputs, out)
    return evaluator.result()


def sum_over_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


# ---------------------------------------------------------------------------- classification tasks

def classify(model, builder, pairs: list[Pair], device, batch_size: int) -> Iterator[tuple[list[Pair], Tensor]]:
    """(pairs, logits) of this rank's share of `pairs`, batch by batch (all ranks take part)."""
    rank, world = distributed.rank_and_world()
    generator = torch.Generator().manual_seed(0)
    for chunk, padding in _even_chunks(pairs, batch_size, rank, world):
        batch = builder(chunk, [builder.image(p) for p in chunk], generator).to(device)
        batch.labels = None
        logits = model(batch).logits.float().cpu()
        if not padding:
            yield chunk, logits


# ---------------------------------------------------------------------------- retrieval

class RecallAtK:
    """Recall@K of a full ranking, fed rows of (image row indices, their scores against every caption)."""

    def __init__(self, num_images: int, caption_image: Tensor, folds: int = 1) -> None:
        self.num_images, self.caption_image, self.folds = num_images, caption_image, folds

    def reset(self) -> None:
        self.rows: list[Tensor] = []
        self.scores: list[Tensor] = []

    def process(self, rows: Tensor, scores: Tensor) -> None:
        self.rows.append(rows)
        self.scores.append(scores)

    def result(self) -> dict[str, float]:
        mine = (torch.cat(self.rows), torch.cat(self.scores)) if self.rows else \
            (torch.zeros(0, dtype=torch.long), torch.zeros(0, len(self.caption_image)))
        full = torch.full((self.num_images, len(self.caption_image)), float("-inf"))
        for rows, scores in distributed.gather_objects(mine):
            full[rows] = scores
        metrics = recall_at_k(full, self.caption_image)
        if self.folds > 1:
            metrics.update(recall_over_folds(full, self.caption_image, self.folds))
        return metrics


def retrieval_scores(visual_tokens: Callable, match_scores: Callable, pairs: list[Pair], tokenizer,
                     data: DataConfig, device, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(image rows, scores against every caption) for this rank's images: a full cross-encoder ranking.

    Images are split over ranks; each rank decodes its images and runs the CNN once per image
    (the visual tokens are kept), then scores them against all captions `batch_size` at a time.
    `visual_tokens(images, mask)` and `match_scores(ids, attention, visual, visual_mask)` are
    the model's (a fine-tuned head, or the ITM head for zero-shot retrieval).
    """
    rank, world = distributed.rank_and_world()
    keys = list(dict.fromkeys(p.key for p in pairs))
    jpegs = {p.key: p.jpeg for p in pairs}
    text = encode_captions(tokenizer, [p.caption for p in pairs], data.max_text_len, keys=[p.key for p in pairs])
    ids, attention = text.input_ids.to(device), text.attention_mask.to(device)

    cached: list[tuple[Tensor, Tensor]] = []  # this rank's images' visual tokens, CNN run once each
    for chunk, padding in _even_chunks(keys, batch_size, rank, world):
        images = [decode_resize(jpegs[k], data.image_short_side, data.image_long_side) for k in chunk]
        pixels, mask = pad_images(images, data.pad_multiple)
        tokens, token_mask = visual_tokens(pixels.to(device), mask.to(device))
        if not padding:
            cached.extend((tokens[i:i + 1], token_mask[i:i + 1]) for i in range(len(chunk)))
    share = math.ceil(len(keys) / world)
    first_row = rank * share
    for i in range(share):  # every rank runs `share` images' forward passes (ZeRO-3 gathers in each)
        tokens, token_mask = cached[min(i, len(cached) - 1)] if cached else (None, None)
        if tokens is None:  # this rank owns no image: it still joins every forward pass
            tokens, token_mask = visual_tokens(*_blank_image(device))
        row = torch.zeros(len(pairs))
        for first in range(0, len(pairs), batch_size):
            last = min(first + batch_size, len(pairs))
            n = last - first
            row[first:last] = match_scores(ids[first:last], attention[first:last], tokens.expand(n, -1, -1),
                                           token_mask.expand(n, -1)).float().cpu()
        if i < len(cached):
            yield torch.tensor([first_row + i]), row.unsqueeze(0)


def retrieval(visual_tokens: Callable, match_scores: Callable, pairs: list[Pair], tokenizer, data: DataConfig,
              device, batch_size: int, folds: int = 1) -> dict[str, float]:
    """Recall@K of every image against every caption of `pairs` (with `folds` > 1 also the
    recalls averaged over that many folds of the images), with the counts and the time taken."""
    start = time.perf_counter()
    keys = list(dict.fromkeys(p.key for p in pairs))
    row = {key: i for i, key in enumerate(keys)}
    caption_image = torch.tensor([row[p.key] for p in pairs])
    evaluator = RecallAtK(len(keys), caption_image, folds)
    metrics = run(evaluator, retrieval_scores(visual_tokens, match_scores, pairs, tokenizer, data, device,
                                              batch_size))
    metrics.update(images=float(len(keys)), captions=float(len(pairs)), seconds=time.perf_counter() - start)
    return metrics


def _blank_image(device) -> tuple[Tensor, Tensor]:
    return (torch.zeros(1, 3, TOKEN_STRIDE, TOKEN_STRIDE, device=device, dtype=torch.uint8),
            torch.ones(1, TOKEN_STRIDE, TOKEN_STRIDE, dtype=torch.bool, device=device))
