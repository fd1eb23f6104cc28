"""NLVR2: the sentence with each of its two images; the two [CLS] vectors concatenated -> MLP
-> true / false; cross-entropy; evaluated by accuracy."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pixelbert_dist import evaluate
from pixelbert_dist.config import ConfigError, ModelConfig, TaskConfig
from pixelbert_dist.data.task_batch import TaskBatchBuilder
from pixelbert_dist.data.types import TaskBatch
from pixelbert_dist.spec import JobSpec, ResolvedRun
from pixelbert_dist.tasks import base

log = logging.getLogger("pixelbert_dist.tasks.nlvr2")


class PixelBertForNLVR2(base.PixelBertForTask):
    def __init__(self, model_cfg: ModelConfig, task: TaskConfig, num_answers: int = 0) -> None:
        super().__init__(model_cfg, task)
        self.head = base.mlp(2 * model_cfg.hidden_size, 2 * model_cfg.hidden_size, 2)

    def forward(self, batch: TaskBatch) -> base.TaskOutput:
        pooled = self.pooled(batch.input_ids, batch.attention_mask, *self.sequence_visuals(batch))
        # sequences come as (sentence, left), (sentence, right) per example
        logits = self.head(pooled.reshape(-1, 2 * pooled.shape[-1])).float()
        if batch.labels is None:
            return base.TaskOutput(logits.new_zeros(()), logits.new_zeros(()), logits)
        loss = F.cross_entropy(logits, batch.labels)
        return base.TaskOutput(loss, 100.0 * (logits.argmax(-1) == batch.labels).float().mean(), logits)


class Nlvr2Accuracy:
    """Accuracy of the true/false predictions over all ranks."""

    def reset(self) -> None:
        self.correct, self.count = 0.0, 0

    def process(self, pairs, logits) -> None:
        truth = torch.tensor([int(p.target["label"]) for p in pairs], dtype=torch.long)
        self.correct += float((logits.argmax(-1) == truth).sum())
        self.count += len(pairs)

    def result(self) -> dict[str, float]:
        correct, count = evaluate.sum_over_ranks([self.correct, self.count])
        return {"nlvr2_accuracy": 100.0 * correct / max(count, 1), "examples": count}


def resolve(cfg, tokenizer) -> ResolvedRun:
    # A statement names its left and right image ("the left image shows two dogs"): a flipped
    # pair would need its images swapped too, and a flipped image alone makes it false.
    if cfg.data.augment_flip > 0:
        raise ConfigError(f"task.name=nlvr2: data.augment_flip must be 0 (got {cfg.data.augment_flip}); its "
                          f"sentences name the left and right image, which a flip does not swap")
    return base.resolve(cfg, tokenizer)


def run_evaluation(model, pairs, run: ResolvedRun, device) -> dict[str, float]:
    builder = TaskBatchBuilder(run.tokenizer, run.cfg.data, run.cfg.task)
    with evaluate.inference_context(model):
        return evaluate.run(Nlvr2Accuracy(), evaluate.classify(model, builder, pairs, device,
                                                                 run.cfg.task.eval_batch_size))


SPEC = JobSpec(
    name="nlvr2",
    resolve=resolve,
    build_model=lambda run, pretrained: base.build_model(PixelBertForNLVR2, run, pretrained, log),
    batch_builder=base.batch_builder,
    flops_per_sample=lambda model, run, device: base.flops_per_sample(model, run, device, target={"label": True}),
    evaluate=run_evaluation,
    eval_prefix="eval",
    output_keys=base.OUTPUT_KEYS,
    tokenizer=base.tokenizer,
)
