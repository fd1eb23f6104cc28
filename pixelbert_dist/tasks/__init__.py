"""Downstream tasks of the paper, one module each: a head and loss on the shared pre-trained
body (base.py), its evaluator, and its job spec.

    vqa        MLP on [CLS] -> answer scores; BCE against soft scores; VQA accuracy
    nlvr2      [CLS] of the sentence with each image, concatenated -> MLP -> true/false; accuracy
    retrieval  FC on [CLS] -> match score; softmax over the true caption and hard negatives; Recall@K
"""

from __future__ import annotations

from pixelbert_dist.config import ModelConfig, TaskConfig
from pixelbert_dist.spec import JobSpec
from pixelbert_dist.tasks import nlvr2, retrieval, vqa
from pixelbert_dist.tasks.base import PixelBertForTask, TaskOutput

TASKS: dict[str, JobSpec] = {module.SPEC.name: module.SPEC for module in (vqa, nlvr2, retrieval)}
MODELS: dict[str, type[PixelBertForTask]] = {
    "vqa": vqa.PixelBertForVQA, "nlvr2": nlvr2.PixelBertForNLVR2, "retrieval": retrieval.PixelBertForRetrieval}


def task_model(model_cfg: ModelConfig, task: TaskConfig, num_answers: int = 0) -> PixelBertForTask:
    """The task model `task.name` names, with a randomly initialised head."""
    return MODELS[task.name](model_cfg, task, num_answers)


__all__ = ["MODELS", "TASKS", "PixelBertForTask", "TaskOutput", "task_model"]
