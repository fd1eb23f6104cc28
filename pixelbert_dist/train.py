"""The training loop of every job: loader -> DeepSpeed engine -> metrics, evaluation, checkpoints.

    trainer = Trainer(job_spec(cfg), cfg, dist_info, resume="auto")   # builds; checks data and config
    metrics = trainer.train()                                          # resumes, then steps to the end

The job spec (spec.py) says what differs between pre-training and a task: config resolution,
model, batches, FLOPs, evaluation. Every rank runs the same number of steps: the loader plans
equal shares, and each step all ranks agree that each has a batch before any trains on it.
The same vote sums the pairs the ranks skipped as damaged this epoch: past
data.max_skipped_fraction every rank stops with the same line (loader.DataDamageError). A
collective that times out or loses its peer stops the rank with the step and what it was
doing (distributed.PeerLost).
"""

from __future__ import annotations

import json
import logging
import random
import socket
import tempfile
from pathlib import Path

import torch

from data_pipeline.storage import StorageError
from pixelbert_dist import distributed, evaluate
from pixelbert_dist.checkpoint import Checkpointer
from pixelbert_dist.config import ConfigError, PretrainConfig
from pixelbert_dist.consolidate import full_state_dict
from pixelbert_dist.data.loader import StreamingLoader, damage_error
from pixelbert_dist.data.plan import Manifest
from pixelbert_dist.data.wire import to_device
from pixelbert_dist.distributed import DistInfo
from pixelbert_dist.engine import build_engine, deepspeed_config
from pixelbert_dist.flops import step_flops
from pixelbert_dist.metrics import StepTimer, device_peak, reset_peak_memory
from pixelbert_dist.model import prepare_for_training
from pixelbert_dist.optim import build_lr_schedule, build_optimizer
from pixelbert_dist.spec import JobSpec
from pixelbert_dist.tracking import Tracker, flatten, run_tags
from pixelbert_dist.training_metrics import TrainingMetrics


class Trainer:
    def __init__(self, spec: JobSpec, cfg: PretrainConfig, dist_info: DistInfo, resume: str | None = None) -> None:
        self.spec, self.dist, self.step, self.run_id = spec, dist_info, 0, None
        self.log = logging.getLogger(f"pixelbert_dist.{spec.name}")
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.run = spec.resolve(cfg, spec.tokenizer(cfg))
        self.cfg = cfg = self.run.cfg
        self.loader = StreamingLoader(cfg.data.train_manifest, cfg.data, cfg.train.micro_batch_size,
                                      dist_info.rank, dist_info.world_size, cfg.train.seed, cfg.data.num_workers,
                                      cfg.data.open_shards, spec.batch_builder(self.run))
        try:
            self.loader.manifest.check_shards_present()
        except StorageError as err:  # a shard damaged since its manifest was written costs its pairs, not the run
            if not cfg.data.max_skipped_fraction:
                raise
            self.log.warning("%s: its pairs will be skipped and counted against data.max_skipped_fraction "
                             "(shards after it are checked as they are read)", err)
        self.eval_manifest = (Manifest(cfg.data.eval_manifest, shard_roots=cfg.data.shard_roots)
                              if cfg.data.eval_manifest else None)
        if self.eval_manifest is not None:  # a missing held-out set: an error now, not at the first evaluation
            self.eval_manifest.check_shards_present()
        self.ds_config = deepspeed_config(cfg, dist_info.world_size)
        self.accumulation = self.ds_config["gradient_accumulation_steps"]
        steps_per_epoch = self.loader.steps_per_epoch() // self.accumulation
        if steps_per_epoch == 0:
            raise ConfigError(f"{self.loader.manifest_url} holds too few pairs for one optimizer step of "
                              f"{cfg.train.global_batch_size} pairs")
        self.checkpointer = Checkpointer(cfg.checkpoint, dist_info, resume, cfg.train.seed)

        model = spec.build_model(self.run, not self.checkpointer.resuming)
        self.checkpointer.prepare_model(model)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_lr_schedule(optimizer, cfg.optim, steps_per_epoch)
        # counted before prepare_for_training: recomputed activations are not model FLOPs,
        # and compiled kernels go uncounted. Pre-training counts each step's valid pixels and
        # tokens; a task counts one pair at the configured size.
        data = cfg.data
        self.step_flops = step_flops(model, (data.image_short_side, data.image_long_side), data.max_text_len,
                                     dist_info.device)
        per_sample = spec.flops_per_sample(model, self.run, dist_info.device) if self.step_flops is None else 0.0
        timer = StepTimer(per_sample, device_peak(cfg.train.precision).flops, dist_info.world_size,
                          device=dist_info.device)
        prepare_for_training(getattr(model, "body", model), cfg.train, dist_info.device)  # a task model's body
        self.engine = build_engine(model, optimizer, scheduler, self.ds_config)
        if dist_info.launcher != "ray":  # Ray Train made the world group, with Ray's own timeout
            distributed.bound_every_group(cfg.train.collective_timeout_s)
        self.checkpointer.bind(self.engine, scheduler, self.loader, self, cfg.to_dict())
        self.tracker = Tracker(cfg.tracking, enabled=dist_info.is_main)
        self.metrics = TrainingMetrics(spec.output_keys, timer, self.tracker, dist_info, cfg.train.log_every,
                                       self.log)
        self.eval_pairs = None
        self.pairs_log = None
        self.doing = "start-up"  # what the loop is doing, for the message if a collective times out

    def _at(self, what: str, step: int | None = None) -> None:
        self.doing = f"step {self.step + 1 if step is None else step} ({what})"

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, float]:
        """Resume if asked, train to train.epochs (or train.max_steps); the last logged and evaluated metrics."""
        try:
            return self._train()
        except RuntimeError as err:
            lost = distributed.lost_peer(err, self.doing)
            if lost is None:
                raise
            raise lost from err

    def _train(self) -> dict[str, float]:
        self.checkpointer.load_latest()
        self._start_tracking()
        by_epochs = self.cfg.train.epochs * (self.loader.steps_per_epoch() // self.accumulation)
        self.metrics.plan(min(self.cfg.train.max_steps or by_epochs, by_epochs), first_step=self.step,
                          pairs_per_step=self.cfg.train.global_batch_size)
        self.micro_steps = 0  # DeepSpeed steps the optimizer every `accumulation` of them, across epochs
        self.last_metrics, self.eval_metrics = {}, {}
        while self.loader.epoch < self.cfg.train.epochs and not self._done():
            if self._run_epoch():
                self.loader.next_epoch()
        self._at("the last checkpoint, evaluation and model", self.step)
        self._save()
        if self.eval_manifest is not None and not self._evaluation_due():
            self.evaluate()
        if self.pairs_log is not None:
            self.pairs_log.close()
        self._log_model()
        self.tracker.end()
        return {**self.last_metrics, **self.eval_metrics}

    def _run_epoch(self) -> bool:
        """Steps until the epoch's batches run out on any rank (True) or max_steps (False)."""
        batches, timer = self.loader.epoch_batches(), self.metrics.timer
        while not self._done():
            self._at("waiting for the loader")
            with timer.phase("data"):  # waiting for the loader; the copy to the device is queued, not waited for
                item = next(batches, None)
                if item is not None:
                    batch, info = to_device(item[0], self.dist.device), item[1]
            self._at("the vote: does every rank have a batch")
            every_rank, skipped = distributed.agree_and_sum(item is not None, self.loader.epoch_skipped)
            if skipped > self.loader.skip_bound():
                self._stop_for_damage(skipped)
            if not every_rank:
                return True
            self._at("forward")
            with timer.phase("forward"):
                out = self.engine(batch)
            self._at("backward and gradient reduction")
            with timer.phase("backward"):  # ZeRO reduces gradients in here
                self.engine.backward(out.loss)
            self._at("the optimizer step")
            with timer.phase("optimizer"):
                self.engine.step()
            self.metrics.record(out, samples=len(info.pairs), images=batch.images.shape[0],
                                flops=None if self.step_flops is None else self.step_flops(batch))
            self._log_pairs(info, out)
            self.micro_steps += 1
            if self.micro_steps % self.accumulation == 0:
                self.step += 1
                self._after_step()
        return False

    def _stop_for_damage(self, skipped: int) -> None:
        """Every rank is here at the same step: each raises the same line, naming every rank's shards."""
        reports = distributed.gather_objects(self.loader.damaged)
        raise damage_error(reports, skipped, self.loader.skip_bound(), self.cfg.data.max_skipped_fraction,
                           self.step + 1, self.loader.epoch)

    def _after_step(self) -> None:
        self._at("logging its metrics", self.step)
        if self.metrics.should_log(self.step, last=self._done()):
            self.last_metrics = self.metrics.log(self.step, counters=self.loader.counters(),
                                                 extra={"epoch": self.loader.epoch, **self._learning_rates()})
        evaluating = self.eval_manifest is not None and self._evaluation_due()
        saving = self.checkpointer.due(self.step)
        if evaluating:
            self._at("the evaluation after it", self.step)
            self.evaluate()
        if saving:
            self._at("saving its checkpoint", self.step)
            self._save()
        if evaluating or saving:  # memory_peak_gib is the training steps', not this work's
            reset_peak_memory(self.dist.device)

    # ------------------------------------------------------------------ evaluation, checkpoints, tracking

    def evaluate(self) -> dict[str, float]:
        """The job's held-out evaluation on data.eval_manifest (every rank takes part)."""
        if self.eval_pairs is None:
            self.eval_pairs = evaluate.read_pairs(self.eval_manifest, self.spec.eval_images(self.cfg),
                                                  self.cfg.data.max_skipped_fraction)
        metrics = self.spec.evaluate(self.engine.module, self.eval_pairs, self.run, self.dist.device)
        metrics["skipped_pairs"] = float(self.eval_pairs.skipped)  # damaged held-out pairs left out
        self.eval_metrics = {f"{self.spec.eval_prefix}.{k}": v for k, v in metrics.items()}
        self.tracker.metrics(self.eval_metrics, self.step)
        if self.dist.is_main:
            self.log.info("step %d evaluation: %s", self.step, " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return self.eval_metrics

    def _save(self) -> None:
        location = self.checkpointer.save(self.step)
        if location is not None:
            self.tracker.tag(f"checkpoint.{Path(location).name}", location)

    def _log_model(self) -> None:
        """The trained model (fp32 masters, in save_pretrained's layout) as the run's `model`
        artifact (a task model with its head), and registered under tracking.register_model."""
        tracking = self.cfg.tracking
        if not tracking.log_model or not hasattr(self.engine.module, "save_pretrained"):
            return
        state = full_state_dict(self.engine, self.dist.is_main)  # every rank: ZeRO gathers the masters
        if not (self.dist.is_main and self.tracker.enabled):
            return
        model = self.spec.build_model(self.run, False)
        model.load_state_dict(state, strict=False)  # the MLM decoder is tied to the word embeddings
        model.tokenizer, model.run_config = self.run.tokenizer, self.cfg.to_dict()
        with tempfile.TemporaryDirectory() as folder:
            self.tracker.log_folder(str(model.save_pretrained(folder)), "model")
        if tracking.register_model:
            version = self.tracker.register(tracking.register_model, "model")
            self.log.info("registered %s version %s", tracking.register_model, version)

    def state_dict(self) -> dict:
        """The trainer's part of a checkpoint (the Checkpointer adds data position, RNG, config)."""
        return {"step": self.step, "mlflow_run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.run_id = state["step"], state.get("mlflow_run_id")

    def _start_tracking(self) -> None:
        hosts = distributed.gather_objects(socket.gethostname())
        params = {**self.cfg.flat_dict(), "world_size": self.dist.world_size,
                  "data.decoder_used": self.loader.decoder, **flatten("deepspeed_json", self.ds_config)}
        self.run_id = self.tracker.start(self.run_id, params, {**run_tags(self.dist.launcher, hosts),
                                                               "job": self.spec.name})
        self.tracker.log_dict(self.cfg.to_dict(), "config/resolved.yaml")  # what this run really ran with
        self.tracker.log_dict(self.ds_config, "config/deepspeed.json")
        if self.cfg.train.log_pairs_to:
            Path(self.cfg.train.log_pairs_to).mkdir(parents=True, exist_ok=True)
            self.pairs_log = open(Path(self.cfg.train.log_pairs_to) / f"rank{self.dist.rank}.jsonl", "a")

    def _log_pairs(self, info, out) -> None:
        """train.log_pairs_to: which pairs each step trained on, for the every-pair-once tests."""
        if self.pairs_log is not None:
            self.pairs_log.write(json.dumps({"step": self.step, "pairs": info.pairs,
                                             "loss": out.loss.detach().item()}) + "\n")
            self.pairs_log.flush()

    def _learning_rates(self) -> dict[str, float]:
        return {f"lr.{g['name']}": g["lr"] for g in self.engine.optimizer.param_groups if "name" in g}

    def _evaluation_due(self) -> bool:
        """Whether train.eval_every puts an evaluation at this step (the end adds one otherwise)."""
        every = self.cfg.train.eval_every
        return bool(every) and self.step % every == 0

    def _done(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return bool(max_steps) and self.step >= max_steps
