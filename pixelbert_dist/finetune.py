"""Fine-tune Pixel-BERT on a downstream task and evaluate it: VQA 2.0, NLVR2, retrieval.

    python -m pixelbert_dist.finetune --config configs/finetune/vqa.yaml \\
        --task.init=runs/pretrain/checkpoints/step00040000 \\
        --data.train_manifest=s3://bucket/vqa-train --data.eval_manifest=s3://bucket/vqa-val
    torchrun --nproc_per_node 8 -m pixelbert_dist.finetune --config ...   # or deepspeed / --launcher ray
    ... --resume auto                                                     # continue this fine-tuning run

The same engine, launchers, checkpoints and MLflow tracking as pre-training: only the model
(the pre-trained body under a task head), the batches and the evaluation differ. The model's
shape comes from `task.init` (a checkpoint folder or a `pixelbert_dist.export` folder); the
evaluation on data.eval_manifest runs every train.eval_every steps and at the end.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import torch

from pixelbert_dist import checkpoint, distributed, evaluate
from pixelbert_dist.config import ConfigError, ModelConfig
from pixelbert_dist.data.task_batch import TaskBatchBuilder
from pixelbert_dist.tasks import PixelBertForTask
from pixelbert_dist.train import Trainer

log = logging.getLogger("pixelbert_dist.finetune")


def pretrained_model_config(init: str) -> dict:
    """The model section a pre-trained checkpoint or export was trained with."""
    from pixelbert_dist.export import CONFIG

    path = Path(init)
    if (path / CONFIG).is_file():
        return json.loads((path / CONFIG).read_text())["model"]
    if (path / checkpoint.COMPLETE).is_file():
        return checkpoint.read_client_state(path.parent, path.name)["config"]["model"]
    raise ConfigError(f"task.init={init}: neither an exported model ({CONFIG}) nor a complete checkpoint "
                      f"({checkpoint.COMPLETE})")


def load_pretrained(model: PixelBertForTask, init: str) -> None:
    """Pre-trained Pixel-BERT weights (all of them, heads included) into the task model's body."""
    from safetensors.torch import load_model

    from pixelbert_dist.export import WEIGHTS

    path = Path(init)
    if (path / WEIGHTS).is_file():
        load_model(model.body, str(path / WEIGHTS))
    else:
        checkpoint.load_weights_only(model.body, path.parent, path.name)


class TaskTrainer(Trainer):
    OUTPUT_KEYS = ("loss", "accuracy")

    def prepare(self) -> None:
        task, cfg = self.cfg.task, self.cfg
        if task.init:  # the network's shape is the pre-trained one; the run config must not redefine it
            model = pretrained_model_config(task.init)
            cfg.model = ModelConfig(**{**model, "text_weights": "none", "backbone_weights": "none"})
            if len(self.tokenizer) != cfg.model.vocab_size:
                raise ConfigError(f"data.tokenizer {cfg.data.tokenizer} has {len(self.tokenizer)} entries; "
                                  f"{task.init} was pre-trained with a vocabulary of {cfg.model.vocab_size}")
        self.answers: list[str] = []
        if task.name == "vqa":
            try:
                self.answers = json.loads(Path(task.answer_vocab).read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigError(f"task.answer_vocab={task.answer_vocab}: {err}") from None
        if task.name == "retrieval" and cfg.train.micro_batch_size < 2:
            raise ConfigError("task.name=retrieval draws negatives from the batch: train.micro_batch_size must be >= 2")

    def batch_builder(self):
        return functools.partial(TaskBatchBuilder, task=self.cfg.task, answers=self.answers)

    def build_model(self, pretrained: bool) -> torch.nn.Module:
        model = PixelBertForTask(self.cfg.model, self.cfg.task, len(self.answers))
        if pretrained and self.cfg.task.init:
            load_pretrained(model, self.cfg.task.init)
            if self.dist.is_main:
                log.info("%s: starting from %s", self.cfg.task.name, self.cfg.task.init)
        model.adopt_pretraining_heads()
        return model

    def flops_per_sample(self, model: torch.nn.Module) -> float:
        return 0.0  # FLOPs are counted for pre-training's batches; fine-tuning logs no MFU

    def evaluate(self) -> dict[str, float]:
        cfg, task = self.cfg, self.cfg.task
        if self._eval_pairs is None:
            self._eval_pairs = evaluate.read_pairs(self._eval_manifest)
        model = self.engine.module
        model.eval()
        builder = TaskBatchBuilder(self.tokenizer, cfg.data, task, self.answers)
        args = (self.dist.device, task.eval_batch_size)
        try:
            if task.name == "vqa":
                metrics, predictions = evaluate.vqa(model, builder, self._eval_pairs, self.answers, *args)
                if task.predictions and self.dist.is_main:
                    Path(task.predictions).parent.mkdir(parents=True, exist_ok=True)
                    Path(task.predictions).write_text(json.dumps(predictions))
            elif task.name == "nlvr2":
                metrics = evaluate.nlvr2(model, builder, self._eval_pairs, *args)
            else:
                metrics = evaluate.retrieval(model.visual_tokens, model.match_scores, self._eval_pairs,
                                             self.tokenizer, cfg.data, *args, folds=task.eval_folds)
        finally:
            model.train()
        metrics = {f"eval.{k}": v for k, v in metrics.items()}
        self.tracker.metrics(metrics, self.step)
        self.eval_metrics = metrics
        if self.dist.is_main:
            log.info("step %d %s evaluation: %s", self.step, task.name,
                     " ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items()))
        return metrics

    def train(self) -> dict[str, float]:
        metrics = super().train()
        return {**metrics, **getattr(self, "eval_metrics", {})}


def main(argv: list[str] | None = None) -> int:
    from pixelbert_dist import pretrain

    return pretrain.main(argv, job="finetune")


if __name__ == "__main__":
    from pixelbert_dist.pretrain import parse_args

    code = main()
    if parse_args(sys.argv[1:], "finetune")[0].launcher == "ray":
        sys.exit(code)
    distributed.finish(code)
