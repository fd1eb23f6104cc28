"""Downstream tasks of the paper: one Pixel-BERT body, a head and a loss per task.

    vqa        MLP on [CLS] -> scores over the answer vocabulary; binary cross-entropy against
               soft scores min(#annotators giving the answer / 3, 1)
    nlvr2      the sentence with each of the two images; the two [CLS] vectors concatenated
               -> MLP -> true / false; cross-entropy
    retrieval  FC on [CLS] -> a match score; the true caption against `negatives` others under
               softmax cross-entropy, gradients from the `hard_negatives` highest-scoring ones

Fine-tuning and evaluation use every valid visual token: no random pixel sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixelbert_dist.config import ModelConfig, TaskConfig
from pixelbert_dist.model import PixelBert

TASKS = ("vqa", "nlvr2", "retrieval")


@dataclass
class TaskBatch:
    """Images (one row per distinct image) and the text sequences that look at them."""

    images: Tensor          # (I, 3, H, W) uint8 RGB, zero where padded (the model normalizes)
    pixel_mask: Tensor      # (I, H, W) bool
    input_ids: Tensor       # (S, T) long: [CLS] text [SEP] [PAD]...
    attention_mask: Tensor  # (S, T)
    image_index: Tensor     # (S,) long: the image row each sequence sees
    labels: Tensor | None = None  # vqa (B, answers) soft scores; nlvr2 (B,) 0/1; retrieval unused

    def to(self, device: torch.device | str) -> "TaskBatch":
        return TaskBatch(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})


@dataclass
class TaskOutput:
    loss: Tensor
    accuracy: Tensor  # vqa: soft score of the top answer; nlvr2: accuracy; retrieval: true caption ranked first
    logits: Tensor    # vqa (B, answers); nlvr2 (B, 2); retrieval (B, 1 + hard negatives)


def _mlp(width_in: int, width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12),
                         nn.Linear(width, out))


class PixelBertForTask(nn.Module):
    """The pre-trained body (`body.bert`, `body.visual`) under a task head."""

    def __init__(self, model_cfg: ModelConfig, task: TaskConfig, num_answers: int = 0) -> None:
        super().__init__()
        self.task = task
        self.body = PixelBert(model_cfg)
        hidden = model_cfg.hidden_size
        if task.name == "vqa":
            if num_answers <= 0:
                raise ValueError("task.name=vqa needs an answer vocabulary (task.answer_vocab)")
            self.head = _mlp(hidden, 2 * hidden, num_answers)
        elif task.name == "nlvr2":
            self.head = _mlp(2 * hidden, 2 * hidden, 2)
        else:
            self.head = nn.Linear(hidden, 1)
        self.freeze_cnn = task.freeze_cnn
        if self.freeze_cnn:
            self.body.visual.cnn.requires_grad_(False)

    def adopt_pretraining_heads(self) -> None:
        """After loading pre-trained weights: retrieval starts from the ITM head, whose match
        probability softmax([no, yes]) is a sigmoid of (yes - no). The MLM and ITM heads are
        then dropped: a parameter without a gradient would stall ZeRO's gradient reduction."""
        if self.task.name == "retrieval":
            itm = self.body.cls.seq_relationship
            with torch.no_grad():
                self.head.weight.copy_(itm.weight[1:] - itm.weight[:1])
                self.head.bias.copy_(itm.bias[1:] - itm.bias[:1])
        self.body.cls = None

    def train(self, mode: bool = True) -> "PixelBertForTask":
        super().train(mode)
        if self.freeze_cnn:  # frozen also means its batch-norm statistics stay as pre-trained
            self.body.visual.cnn.eval()
        return self

    # ------------------------------------------------------------------ shared pieces

    def visual_tokens(self, images: Tensor, pixel_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Every valid visual token of each image (I, N, hidden) and their mask."""
        return self.body.visual(images, pixel_mask)

    def pooled(self, input_ids: Tensor, attention_mask: Tensor, visual: Tensor, visual_mask: Tensor) -> Tensor:
        """[CLS] after the transformer and BERT's pooler, one row per text sequence."""
        hidden = self.body.encode(input_ids, attention_mask, visual, visual_mask)
        return self.body.bert.pooler(hidden)

    def match_scores(self, input_ids: Tensor, attention_mask: Tensor, visual: Tensor,
                     visual_mask: Tensor) -> Tensor:
        """Retrieval score of each (text, visual tokens) row."""
        return self.head(self.pooled(input_ids, attention_mask, visual, visual_mask)).squeeze(-1)

    # ------------------------------------------------------------------ forward

    def forward(self, batch: TaskBatch) -> TaskOutput:
        visual, visual_mask = self.visual_tokens(batch.images, batch.pixel_mask)
        visual, visual_mask = visual[batch.image_index], visual_mask[batch.image_index]
        if self.task.name == "retrieval":
            return self._retrieval(batch, visual, visual_mask)
        pooled = self.pooled(batch.input_ids, batch.attention_mask, visual, visual_mask)
        if self.task.name == "vqa":
            logits = self.head(pooled).float()
            if batch.labels is None:
                return TaskOutput(logits.new_zeros(()), logits.new_zeros(()), logits)
            # mean over answers x the answer count: the sum over answers, as VQA models train it
            loss = F.binary_cross_entropy_with_logits(logits, batch.labels) * logits.shape[1]
            top = logits.argmax(-1, keepdim=True)
            return TaskOutput(loss, batch.labels.gather(1, top).mean(), logits)
        # nlvr2: sequences come as (sentence, left), (sentence, right) per example
        logits = self.head(pooled.reshape(-1, 2 * pooled.shape[-1])).float()
        if batch.labels is None:
            return TaskOutput(logits.new_zeros(()), logits.new_zeros(()), logits)
        loss = F.cross_entropy(logits, batch.labels)
        return TaskOutput(loss, (logits.argmax(-1) == batch.labels).float().mean(), logits)

    def _retrieval(self, batch: TaskBatch, visual: Tensor, visual_mask: Tensor) -> TaskOutput:
        # Sequences come per image as [true caption, negatives...]. Score all without a graph,
        # then only the true caption and the hardest negatives again with one.
        candidates = 1 + self.task.negatives
        with torch.no_grad():
            scores = self.match_scores(batch.input_ids, batch.attention_mask, visual, visual_mask)
        scores = scores.reshape(-1, candidates)
        hard = scores[:, 1:].topk(min(self.task.hard_negatives, candidates - 1), dim=1).indices + 1
        keep = torch.cat([torch.zeros_like(hard[:, :1]), hard], dim=1)
        rows = (keep + torch.arange(len(keep), device=keep.device).unsqueeze(1) * candidates).flatten()
        logits = self.match_scores(batch.input_ids[rows], batch.attention_mask[rows], visual[rows],
                                   visual_mask[rows]).float().reshape(len(keep), -1)
        target = torch.zeros(len(keep), dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, target)
        return TaskOutput(loss, (scores.argmax(-1) == 0).float().mean(), logits)
