"""Image-text retrieval (Flickr30K / COCO): an FC on [CLS] gives a match score; the true caption
against `negatives` others under softmax cross-entropy, gradients from the `hard_negatives`
highest-scoring ones; evaluated by Recall@K of the full cross-encoder ranking."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixelbert_dist import evaluate
from pixelbert_dist.config import ConfigError, ModelConfig, TaskConfig
from pixelbert_dist.data.types import TaskBatch
from pixelbert_dist.spec import JobSpec, ResolvedRun
from pixelbert_dist.tasks import base

log = logging.getLogger("pixelbert_dist.tasks.retrieval")


class PixelBertForRetrieval(base.PixelBertForTask):
    def __init__(self, model_cfg: ModelConfig, task: TaskConfig, num_answers: int = 0) -> None:
        super().__init__(model_cfg, task)
        self.head = nn.Linear(model_cfg.hidden_size, 1)

    def adopt_pretraining_heads(self) -> None:
        """Start from the ITM head, whose match probability softmax([no, yes]) is a sigmoid of (yes - no)."""
        itm = self.body.cls.seq_relationship
        with torch.no_grad():
            self.head.weight.copy_(itm.weight[1:] - itm.weight[:1])
            self.head.bias.copy_(itm.bias[1:] - itm.bias[:1])
        super().adopt_pretraining_heads()

    def match_scores(self, input_ids: Tensor, attention_mask: Tensor, visual: Tensor,
                     visual_mask: Tensor) -> Tensor:
        """Retrieval score of each (text, visual tokens) row."""
        return self.head(self.pooled(input_ids, attention_mask, visual, visual_mask)).squeeze(-1)

    def forward(self, batch: TaskBatch) -> base.TaskOutput:
        # Sequences come per image as [true caption, negatives...]. Score all without a graph,
        # then only the true caption and the hardest negatives again with one.
        visual, visual_mask = self.sequence_visuals(batch)
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
        return base.TaskOutput(loss, 100.0 * (scores.argmax(-1) == 0).float().mean(), logits)


def resolve(cfg, tokenizer) -> ResolvedRun:
    if cfg.train.micro_batch_size < 2:
        raise ConfigError("task.name=retrieval draws negatives from the batch: train.micro_batch_size must be >= 2")
    return base.resolve(cfg, tokenizer)


def run_evaluation(model, pairs, run: ResolvedRun, device) -> dict[str, float]:
    task = run.cfg.task
    with evaluate.inference_context(model):
        return evaluate.retrieval(model.visual_tokens, model.match_scores, pairs, run.tokenizer, run.cfg.data,
                                  device, task.eval_batch_size, folds=base.usable_folds(task.eval_folds, pairs, log))


SPEC = JobSpec(
    name="retrieval",
    resolve=resolve,
    build_model=lambda run, pretrained: base.build_model(PixelBertForRetrieval, run, pretrained, log),
    batch_builder=base.batch_builder,
    flops_per_sample=base.flops_per_sample,
    evaluate=run_evaluation,
    eval_prefix="eval",
    output_keys=base.OUTPUT_KEYS,
    tokenizer=base.tokenizer,
)
