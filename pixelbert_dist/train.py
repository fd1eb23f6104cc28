"""The training loop: loader -> DeepSpeed engine -> metrics, checkpoints, MLflow.

Setup, in order: seed, tokenizer and dataset checks (before any step), model, loader,
optimizer and schedule, DeepSpeed engine, resume, tracking. Then epochs of batches until
train.epochs or train.max_steps. Every rank runs the same number of steps: the loader plans
equal shares, and each step all ranks agree that each has a batch before any trains on it.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import time
from pathlib import Path

import torch

from data_pipeline.storage import open_storage
from pixelbert_dist import checkpoint, distributed
from pixelbert_dist.config import ConfigError, PretrainConfig
from pixelbert_dist.data.batch import BatchBuilder
from pixelbert_dist.data.loader import StreamingLoader, merge_states
from pixelbert_dist.data.plan import Manifest
from pixelbert_dist.distributed import DistInfo
from pixelbert_dist.engine import build_engine, deepspeed_config
from pixelbert_dist.flops import training_flops_per_sample
from pixelbert_dist.metrics import StepTimer, device_peak
from pixelbert_dist.model import PixelBert, prepare_for_training
from pixelbert_dist.optim import build_lr_schedule, build_optimizer
from pixelbert_dist.tokenizer import load_tokenizer
from pixelbert_dist.tracking import Tracker, flatten, run_tags

log = logging.getLogger("pixelbert_dist.train")


class Trainer:
    """Pre-training; `finetune.TaskTrainer` swaps the model, batches and evaluation."""

    OUTPUT_KEYS = ("loss", "mlm_loss", "itm_loss", "mlm_accuracy", "itm_accuracy")  # logged model outputs

    def __init__(self, cfg: PretrainConfig, dist_info: DistInfo, resume: str | None = None) -> None:
        self.cfg, self.dist = cfg, dist_info
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)

        tokenizer = load_tokenizer(cfg.data.tokenizer)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = len(tokenizer)
        self.tokenizer = tokenizer
        self.prepare()  # a fine-tuning task reads its pre-trained config and answers here
        if len(tokenizer) != cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size is {cfg.model.vocab_size} but the tokenizer "
                              f"{cfg.data.tokenizer} has {len(tokenizer)} entries")
        self.loader = StreamingLoader(cfg.data.train_manifest, cfg.data, cfg.train.micro_batch_size,
                                      dist_info.rank, dist_info.world_size, cfg.train.seed,
                                      cfg.data.num_workers, cfg.data.open_shards, self.batch_builder())
        self.loader.manifest.check_shards_present()
        self._eval_pairs = None
        self._eval_manifest = None
        if cfg.data.eval_manifest:  # a missing held-out set: an error now, not at the first evaluation
            self._eval_manifest = Manifest(cfg.data.eval_manifest)
            self._eval_manifest.check_shards_present()

        ds_config = deepspeed_config(cfg, dist_info.world_size)
        self.accumulation = ds_config["gradient_accumulation_steps"]
        steps_per_epoch = self.loader.steps_per_epoch() // self.accumulation
        if steps_per_epoch == 0:
            raise ConfigError(f"{cfg.data.train_manifest} holds too few pairs for one optimizer step of "
                              f"{cfg.train.global_batch_size} pairs")
        if cfg.checkpoint.mirror:
            if dist_info.is_main:
                open_storage(cfg.checkpoint.mirror).check_writable()  # a missing bucket: before any step
            if resume == "auto":
                checkpoint.pull_newest(cfg.checkpoint.dir, cfg.checkpoint.mirror, dist_info.local_rank)
        found = checkpoint.resolve(resume, cfg.checkpoint.dir)
        client = checkpoint.read_client_state(*found) if found else None
        elastic = client is not None and client["world_size"] != dist_info.world_size

        model = self.build_model(pretrained=found is None)
        if elastic:
            checkpoint.load_weights_only(model, *found)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_lr_schedule(optimizer, cfg.optim, steps_per_epoch)
        if elastic:
            for _ in range(client["step"]):
                scheduler.step()
            if dist_info.is_main:
                log.warning("resuming %d ranks' checkpoint on %d: weights, schedule and data position are "
                            "restored; optimizer moments restart", client["world_size"], dist_info.world_size)
        # MFU's numerator: counted once, at the configured image size (landscape, unpadded)
        flops = self.flops_per_sample(model)
        # after the count: recomputed activations are not model FLOPs, and compiled kernels go uncounted
        prepare_for_training(getattr(model, "body", model), cfg.train, dist_info.device)  # a task model's body
        self.timer = StepTimer(flops, device_peak(cfg.train.precision).flops, dist_info.world_size,
                               device=dist_info.device)
        self.engine = build_engine(model, optimizer, scheduler, ds_config)

        self.step = 0
        run_id = None
        if found is not None:
            if not elastic:
                checkpoint.load(self.engine, *found)
            run_id = self._restore(client, found)
        self.tracker = Tracker(cfg.tracking, enabled=dist_info.is_main)
        hosts = distributed.gather_objects(socket.gethostname())
        params = {**cfg.flat_dict(), "world_size": dist_info.world_size, "data.decoder_used": self.loader.decoder,
                  **flatten("deepspeed_json", ds_config)}
        self.run_id = self.tracker.start(run_id, params, run_tags(dist_info.launcher, hosts))
        self._pairs_log = None
        if cfg.train.log_pairs_to:
            Path(cfg.train.log_pairs_to).mkdir(parents=True, exist_ok=True)
            self._pairs_log = open(Path(cfg.train.log_pairs_to) / f"rank{dist_info.rank}.jsonl", "a")

    # ------------------------------------------------------------------ what pre-training is

    def prepare(self) -> None:
        """Settle the config before anything is built (nothing to do in pre-training)."""

    def batch_builder(self):
        return BatchBuilder

    def build_model(self, pretrained: bool) -> torch.nn.Module:
        """The model; `pretrained` is False when a checkpoint of this run will overwrite it."""
        return PixelBert(self.cfg.model)

    def flops_per_sample(self, model: torch.nn.Module) -> float:
        # MFU's numerator: counted once, at the configured image size (landscape, unpadded)
        data = self.cfg.data
        return training_flops_per_sample(model, (data.image_short_side, data.image_long_side),
                                         data.max_text_len, self.dist.device)

    def evaluate(self) -> dict[str, float]:
        """Zero-shot retrieval on held-out images, scored by the ITM head: a quality signal."""
        from pixelbert_dist import evaluate

        if self._eval_pairs is None:
            self._eval_pairs = evaluate.read_pairs(self._eval_manifest, self.cfg.train.eval_images)
        model = self.engine.module
        model.eval()
        try:
            metrics = evaluate.retrieval(model.visual, _itm_scorer(model), self._eval_pairs, self.tokenizer,
                                         self.cfg.data, self.dist.device, batch_size=64)
        finally:
            model.train()
        metrics = {f"zeroshot.{k}": v for k, v in metrics.items()}
        self.tracker.metrics(metrics, self.step)
        if self.dist.is_main:
            log.info("step %d zero-shot retrieval on %d images: %s", self.step, int(metrics["zeroshot.images"]),
                     " ".join(f"{k.split('.')[1]} {v:.1f}" for k, v in metrics.items() if "_r" in k))
        return metrics

    # ------------------------------------------------------------------ resume

    def _restore(self, state: dict, found: tuple[Path, str]) -> str | None:
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        rng = state.get("rng")
        if rng and len(rng) == self.dist.world_size:  # same layout: each rank continues its own stream
            torch.set_rng_state(torch.tensor(rng[self.dist.rank]["torch"], dtype=torch.uint8))
            random.setstate(_tuple_state(rng[self.dist.rank]["python"]))
        else:
            torch.manual_seed(self.cfg.train.seed + 1000 * self.step + self.dist.rank)
        if self.dist.is_main:
            log.info("resumed from %s at step %d (epoch %d)", found[0] / found[1], self.step, self.loader.epoch)
        return state.get("mlflow_run_id")

    def _client_state(self) -> dict:
        rng = {"torch": torch.get_rng_state().tolist(), "python": random.getstate()}
        return {"step": self.step, "epoch": self.loader.epoch,
                "loader": merge_states(distributed.gather_objects(self.loader.state_dict())),
                "rng": distributed.gather_objects(rng), "mlflow_run_id": self.run_id,
                "config": self.cfg.to_dict()}

    def save(self) -> Path:
        ckpt = self.cfg.checkpoint
        path = checkpoint.save(self.engine, ckpt.dir, self.step, self._client_state(), ckpt.keep_last,
                               self.dist.is_main)
        location = str(path.resolve())
        if ckpt.mirror:
            checkpoint.push(ckpt.dir, path.name, ckpt.mirror, ckpt.keep_last)
            location = f"{ckpt.mirror.rstrip('/')}/{path.name}"
        self.tracker.tag(f"checkpoint.{path.name}", location)
        return path

    # ------------------------------------------------------------------ loop

    def train(self) -> dict[str, float]:
        """Train to train.epochs (or train.max_steps); returns the last logged metrics."""
        self._reset_window()
        self.last_metrics: dict[str, float] = {}
        while self.loader.epoch < self.cfg.train.epochs and not self._done():
            if self._run_epoch():
                self.loader.next_epoch()
        if self.step % self.cfg.checkpoint.every_steps != 0:
            self.save()
        if self._eval_manifest is not None and not self._evaluated_this_step():
            self.evaluate()
        if self._pairs_log is not None:
            self._pairs_log.close()
        self.tracker.end()
        return self.last_metrics

    def _run_epoch(self) -> bool:
        """Steps until the epoch's batches run out on any rank (True) or max_steps (False)."""
        batches = self.loader.epoch_batches()
        timer = self.timer
        while not self._done():
            with timer.phase("data"):  # waiting for the loader, and the copy to the device
                item = next(batches, None)
                if item is not None:
                    batch, info = item[0].to(self.dist.device), item[1]
            if not distributed.all_agree(item is not None):
                return True
            with timer.phase("forward"):
                out = self.engine(batch)
            with timer.phase("backward"):  # ZeRO reduces gradients in here
                self.engine.backward(out.loss)
            with timer.phase("optimizer"):
                self.engine.step()
            self.micro_steps += 1
            for key in self.OUTPUT_KEYS:  # .item() waits for the GPU: the step ends after it
                self.window[key] += getattr(out, key).detach().item()
            timer.end_step(samples=len(info.pairs), images=batch.images.shape[0])
            if self._pairs_log is not None:
                self._pairs_log.write(json.dumps({"step": self.step, "pairs": info.pairs,
                                                  "loss": out.loss.detach().item()}) + "\n")
                self._pairs_log.flush()
            if self.micro_steps % self.accumulation == 0:
                self._after_optimizer_step()
        return False

    def _after_optimizer_step(self) -> None:
        self.step += 1
        if self.step % self.cfg.train.log_every == 0 or self._done():
            self.last_metrics = self._log(time.perf_counter() - self.window_start)
            self._reset_window()
        if self._eval_manifest is not None and self._evaluated_this_step():
            self.evaluate()
        if self.step % self.cfg.checkpoint.every_steps == 0:
            self.save()

    def _evaluated_this_step(self) -> bool:
        """Whether train.eval_every puts an evaluation at this step (the end adds one otherwise)."""
        every = self.cfg.train.eval_every
        return bool(every) and self.step % every == 0

    def _reset_window(self) -> None:
        self.window = {k: 0.0 for k in self.OUTPUT_KEYS}
        self.micro_steps = 0
        self.window_start = time.perf_counter()
        self.timer.reset()

    def _done(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return bool(max_steps) and self.step >= max_steps

    def _log(self, elapsed: float) -> dict:
        # Mean over the window and over ranks; pairs, skips and waiting summed over ranks.
        timing = self.timer.summary(reset=False)  # this rank's step-time breakdown, MFU, memory
        keys = self.OUTPUT_KEYS
        local = [self.window[k] / max(self.micro_steps, 1) for k in keys] + \
                [self.timer.samples, self.loader.skipped, timing.get("frac.data", 0.0)]
        values = torch.tensor(local, dtype=torch.float64)
        torch.distributed.all_reduce(values)
        world = self.dist.world_size
        metrics = {k: values[i].item() / world for i, k in enumerate(keys)}
        metrics["samples_per_s"] = values[len(keys)].item() / max(elapsed, 1e-9)
        metrics["skipped_samples"] = values[len(keys) + 1].item()
        metrics["data_wait_fraction"] = values[len(keys) + 2].item() / world
        metrics["epoch"] = self.loader.epoch
        for group in self.engine.optimizer.param_groups:
            if "name" in group:
                metrics[f"lr.{group['name']}"] = group["lr"]
        metrics.update({k: v for k, v in timing.items() if k.startswith(("time.", "frac.")) or k in
                        ("step_time_s", "images_per_s", "mfu", "tflops_per_device", "memory_peak_gib")})
        self.tracker.metrics(metrics, self.step)
        if self.dist.is_main:
            log.info("step %d epoch %d %s %.1f pairs/s wait %.1f%%", self.step, self.loader.epoch,
                     " ".join(f"{k} {metrics[k]:.4f}" for k in keys), metrics["samples_per_s"],
                     100 * metrics["data_wait_fraction"])
        return metrics


def _itm_scorer(model: PixelBert):
    """Match score of the ITM head: log-odds of "matches", i.e. logit(yes) - logit(no)."""
    def score(input_ids, attention_mask, visual, visual_mask):
        logits = model.cls.seq_relationship(model.bert.pooler(model.encode(input_ids, attention_mask,
                                                                            visual, visual_mask)))
        return logits[:, 1] - logits[:, 0]
    return score


def _tuple_state(state):
    return tuple(_tuple_state(s) if isinstance(s, list) else s for s in state)
