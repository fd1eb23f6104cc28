"""Downstream tasks of the paper, one module each: a head and loss on the shared pre-trained
body (base.py), its evaluator, and its job spec.

    vqa        MLP on [CLS] -> answer scores; BCE against soft scores; VQA accuracy
    nlvr2      [CLS] of the sentence with each image, concatenated -> MLP -> true/false; accuracy
    retrieval  FC on [CLS] -> match score; softmax over the true caption and hard negatives; Recall@K
"""

from __future__ import annotations

from pathlib import Path

import torch

from pixelbert_dist.config import ModelConfig, TaskConfig
from pixelbert_dist.pretrained import find_tokenizer, fine_tuned, load_weights, read_run_config
from pixelbert_dist.spec import JobSpec
from pixelbert_dist.tasks import base, nlvr2, retrieval, vqa
from pixelbert_dist.tasks.base import PixelBertForTask, TaskOutput

TASKS: dict[str, JobSpec] = {module.SPEC.name: module.SPEC for module in (vqa, nlvr2, retrieval)}
MODELS: dict[str, type[PixelBertForTask]] = {
    "vqa": vqa.PixelBertForVQA, "nlvr2": nlvr2.PixelBertForNLVR2, "retrieval": retrieval.PixelBertForRetrieval}


def task_model(model_cfg: ModelConfig, task: TaskConfig, num_answers: int = 0) -> PixelBertForTask:
    """The task model `task.name` names, with a randomly initialised head."""
    return MODELS[task.name](model_cfg, task, num_answers)


def from_pretrained(path: str | Path, device: str | torch.device = "cpu") -> PixelBertForTask:
    """A fine-tuned model in eval mode, head included: save_pretrained's folder (export's, the MLflow
    `model/` artifact) or a fine-tuning checkpoint; its tokenizer and VQA's answers with it."""
    path = Path(path)
    if not fine_tuned(path):
        raise ValueError(f"{path} holds a pre-trained Pixel-BERT, no task head: PixelBert.from_pretrained "
                         f"loads it, or fine-tune from it with --task.init={path}")
    run_config, is_checkpoint = read_run_config(path)
    task = TaskConfig(**run_config["task"])
    answers = base.saved_answers(path, run_config, is_checkpoint)
    model = task_model(ModelConfig(**{**run_config["model"], "text_weights": "none", "backbone_weights": "none"}),
                       task, len(answers))
    model.adopt_pretraining_heads()  # a fine-tuned model has none
    load_weights(model, path, is_checkpoint)
    model.tokenizer = find_tokenizer(path, run_config, is_checkpoint)
    model.run_config, model.answers = run_config, answers
    return model.to(device).eval()


__all__ = ["MODELS", "TASKS", "PixelBertForTask", "TaskOutput", "from_pretrained", "task_model"]
