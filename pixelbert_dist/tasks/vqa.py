"""VQA 2.0: an MLP on [CLS] scores the answer vocabulary; binary cross-entropy against soft
scores min(#annotators giving the answer / 3, 1); evaluated with the official VQA accuracy."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch.nn.functional as F

from pixelbert_dist import distributed, evaluate
from pixelbert_dist.config import ConfigError, ModelConfig, TaskConfig
from pixelbert_dist.data.task_batch import TaskBatchBuilder
from pixelbert_dist.data.types import TaskBatch
from pixelbert_dist.spec import JobSpec, ResolvedRun
from pixelbert_dist.tasks import base

log = logging.getLogger("pixelbert_dist.tasks.vqa")


class PixelBertForVQA(base.PixelBertForTask):
    def __init__(self, model_cfg: ModelConfig, task: TaskConfig, num_answers: int = 0) -> None:
        super().__init__(model_cfg, task)
        if num_answers <= 0:
            raise ValueError("task.name=vqa needs an answer vocabulary (task.answer_vocab)")
        self.head = base.mlp(model_cfg.hidden_size, 2 * model_cfg.hidden_size, num_answers)

    def forward(self, batch: TaskBatch) -> base.TaskOutput:
        logits = self.head(self.pooled(batch.input_ids, batch.attention_mask, *self.sequence_visuals(batch))).float()
        if batch.labels is None:
            return base.TaskOutput(logits.new_zeros(()), logits.new_zeros(()), logits)
        # mean over answers x the answer count: the sum over answers, as VQA models train it
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels) * logits.shape[1]
        top = logits.argmax(-1, keepdim=True)
        return base.TaskOutput(loss, 100.0 * batch.labels.gather(1, top).mean(), logits)


class VqaAccuracy:
    """The official VQA accuracy over all ranks, and every question's predicted answer."""

    def __init__(self, answers: tuple[str, ...]) -> None:
        self.answers = answers

    def reset(self) -> None:
        self.predictions: list[dict] = []
        self.scores: list[float] = []

    def process(self, pairs, logits) -> None:
        for pair, index in zip(pairs, logits.argmax(-1).tolist()):
            answer = self.answers[index]
            self.predictions.append({"question_id": pair.target.get("question_id"), "answer": answer})
            if pair.target.get("answers"):
                self.scores.append(evaluate.vqa_accuracy(answer, pair.target["answers"]))

    def result(self) -> dict[str, float]:
        total, count = evaluate.sum_over_ranks([sum(self.scores), len(self.scores)])
        self.all_predictions = [p for part in distributed.gather_objects(self.predictions) for p in part]
        metrics = {"vqa_accuracy": 100.0 * total / count} if count else {}
        metrics["questions"] = float(len(self.all_predictions))
        return metrics


def resolve(cfg, tokenizer) -> ResolvedRun:
    try:
        answers = tuple(json.loads(Path(cfg.task.answer_vocab).read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"task.answer_vocab={cfg.task.answer_vocab}: {err}") from None
    return base.resolve(cfg, tokenizer, answers)


def run_evaluation(model, pairs, run: ResolvedRun, device) -> dict[str, float]:
    task = run.cfg.task
    builder = TaskBatchBuilder(run.tokenizer, run.cfg.data, task, list(run.answers))
    evaluator = VqaAccuracy(run.answers)
    with evaluate.inference_context(model):
        metrics = evaluate.run(evaluator, evaluate.classify(model, builder, pairs, device, task.eval_batch_size))
    if task.predictions and distributed.rank_and_world()[0] == 0:
        Path(task.predictions).parent.mkdir(parents=True, exist_ok=True)
        Path(task.predictions).write_text(json.dumps(evaluator.all_predictions))
    return metrics


SPEC = JobSpec(
    name="vqa",
    resolve=resolve,
    build_model=lambda run, pretrained: base.build_model(PixelBertForVQA, run, pretrained, log),
    batch_builder=base.batch_builder,
    flops_per_sample=lambda model, run, device: base.flops_per_sample(
        model, run, device, target={"answers": [run.answers[0]] * 10}),
    evaluate=run_evaluation,
    eval_prefix="eval",
    output_keys=base.OUTPUT_KEYS,
    tokenizer=base.tokenizer,
)
