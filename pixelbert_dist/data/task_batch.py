"""Pairs -> TaskBatch for the downstream tasks: the fine-tuning counterpart of batch.py.

A pair is one (image, text, target) of a task shard: a VQA question and its ten answers, an
NLVR2 sentence about an image pair and its truth, a retrieval caption. The builders plug
into the same streaming loader as pre-training (exact resume, ranks, workers); evaluation
feeds them the pairs of a held-out split.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, OrderedDict

import torch

from data_pipeline.answers import normalize_answer
from pixelbert_dist.config import ConfigError, DataConfig, TaskConfig
from pixelbert_dist.data.augment import Draw, apply, mirror_text
from pixelbert_dist.data.batch import decode_resize, image_rows
from pixelbert_dist.data.stream import Pair
from pixelbert_dist.data.types import TaskBatch, pad_images
from pixelbert_dist.tokenizer import encode_captions


def vqa_soft_scores(answers: list[str], vocab: dict[str, int]) -> dict[int, float]:
    """Answer index -> min(#annotators who gave it / 3, 1), over the normalised answers."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {vocab[a]: min(n / 3.0, 1.0) for a, n in counts.items() if a in vocab}


class TaskBatchBuilder:
    """Decodes images on the CPU (one image per pair, two for NLVR2) and builds TaskBatches."""

    def __init__(self, tokenizer, cfg: DataConfig, task: TaskConfig, answers: list[str] | None = None) -> None:
        self.tokenizer, self.cfg, self.task = tokenizer, cfg, task
        self.vocab = {a: i for i, a in enumerate(answers or [])}
        self._decoded: OrderedDict[tuple, object] = OrderedDict()
        self.truncated = 0

    def image(self, pair: Pair, draw: Draw | None = None):
        """The pair's decoded image; for NLVR2 (left, right), both augmented by `draw` in training
        (evaluation gives none). ValueError if one does not decode."""
        if (pair.key, draw) not in self._decoded:
            short = draw.short_side if draw else self.cfg.image_short_side
            decode = lambda data: apply(decode_resize(data, short, self.cfg.image_long_side), draw)  # noqa: E731
            if self.task.name == "nlvr2":
                if pair.jpeg2 is None:
                    raise ValueError(f"NLVR2 sample {pair.key} of {pair.shard} has no right image (right.jpg)")
                self._decoded[pair.key, draw] = (decode(pair.jpeg), decode(pair.jpeg2))
            else:
                self._decoded[pair.key, draw] = decode(pair.jpeg)
            while len(self._decoded) > 64:
                self._decoded.popitem(last=False)
        return self._decoded[pair.key, draw]

    def mirror(self, pair: Pair) -> Pair:
        """The pair as it reads of its horizontally flipped image: the question or caption, and VQA's
        answers, with "left" and "right" swapped."""
        if self.task.name == "nlvr2":  # tasks/nlvr2.py refuses the config; this guards direct use
            raise ConfigError(f"NLVR2 sample {pair.key} of {pair.shard}: its sentence names the left and right "
                              f"image, which a flip does not swap; NLVR2 trains with data.augment_flip=0")
        target = pair.target
        if self.task.name == "vqa" and isinstance(target, dict) and isinstance(target.get("answers"), list):
            target = {**target, "answers": [mirror_text(a) if isinstance(a, str) else a for a in target["answers"]]}
        return dataclasses.replace(pair, caption=mirror_text(pair.caption), target=target)

    def _encode(self, texts: list[str], keys: list[str]):
        encoded = encode_captions(self.tokenizer, texts, self.cfg.max_text_len, keys=keys)
        self.truncated += encoded.num_truncated
        return encoded

    def __call__(self, pairs: list[Pair], images: list, generator: torch.Generator) -> TaskBatch:
        keys = [p.key for p in pairs]
        firsts, index = image_rows(keys)
        index = torch.arange(len(pairs)) if index is None else index
        name = self.task.name
        if name == "nlvr2":  # image rows: left, right of each distinct pair; each sentence sees both
            pixels, mask = pad_images([side for i in firsts for side in images[i]], self.cfg.pad_multiple)
            encoded = self._encode([p.caption for p in pairs], keys)
            sides = torch.stack([2 * index, 2 * index + 1], dim=1).flatten()
            labels = torch.tensor([_truth(p) for p in pairs], dtype=torch.long)
            return TaskBatch(pixels, mask, encoded.input_ids.repeat_interleave(2, 0),
                             encoded.attention_mask.repeat_interleave(2, 0), sides, labels)
        pixels, mask = pad_images([images[i] for i in firsts], self.cfg.pad_multiple)
        if name == "vqa":
            encoded = self._encode([p.caption for p in pairs], keys)
            labels = torch.zeros(len(pairs), len(self.vocab))
            for row, pair in enumerate(pairs):
                for column, score in vqa_soft_scores(_answers(pair), self.vocab).items():
                    labels[row, column] = score
            return TaskBatch(pixels, mask, encoded.input_ids, encoded.attention_mask, index, labels)
        texts, rows = self._retrieval_candidates(pairs, generator)
        encoded = self._encode(texts, [keys[r] for r in rows])
        return TaskBatch(pixels, mask, encoded.input_ids, encoded.attention_mask, index[rows])

    def _retrieval_candidates(self, pairs: list[Pair], generator: torch.Generator) -> tuple[list[str], list[int]]:
        """Per pair: its caption, then `negatives` captions of other images in the batch."""
        texts, rows = [], []
        for i, pair in enumerate(pairs):
            others = [j for j, p in enumerate(pairs) if p.key != pair.key]
            if not others:
                raise ValueError(f"retrieval batch of {pair.shard} holds one image only: no negatives for {pair.key}")
            # without replacement while the batch has enough other captions
            if len(others) >= self.task.negatives:
                picks = torch.randperm(len(others), generator=generator)[: self.task.negatives]
            else:
                picks = torch.randint(len(others), (self.task.negatives,), generator=generator)
            texts += [pair.caption] + [pairs[others[k]].caption for k in picks.tolist()]
            rows += [i] * (1 + self.task.negatives)
        return texts, rows


def _answers(pair: Pair) -> list[str]:
    if not isinstance(pair.target, dict) or not isinstance(pair.target.get("answers"), list):
        raise ValueError(f"VQA sample {pair.key} of {pair.shard}: question {pair.caption!r} has no answers list")
    return pair.target["answers"]


def _truth(pair: Pair) -> int:
    if not isinstance(pair.target, dict) or not isinstance(pair.target.get("label"), bool):
        raise ValueError(f"NLVR2 sample {pair.key} of {pair.shard}: sentence {pair.caption!r} has no true/false label")
    return int(pair.target["label"])
