"""The training loop's logging window: model outputs summed on the device, reduced over ranks by name.

    metrics = TrainingMetrics(spec.output_keys, timer, tracker, dist_info, every=cfg.train.log_every)
    metrics.record(out, samples=len(info.pairs), images=batch.images.shape[0],   # each micro-step
                   flops=step_flops(batch))                                      # optional: else per pair
    if metrics.should_log(step, last):
        metrics.log(step, counters={"skipped_samples": loader.skipped}, extra={"epoch": epoch})

Outputs stay on the device until the window closes, so a step never waits for the GPU just
to be logged; one collective per window reduces every value by its name.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from pixelbert_dist.distributed import DistInfo
from pixelbert_dist.metrics import StepTimer
from pixelbert_dist.tracking import Tracker

# StepTimer.summary() keys worth a place in MLflow (per device: this rank's)
_TIMING_KEYS = ("step_time_s", "images_per_s", "mfu", "tflops_per_device", "memory_peak_gib")


def reduce_by_name(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Each value summed over ranks, matched by name (every rank passes the same names)."""
    names = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[n], dtype=torch.float64, device=device).reshape(())
                           for n in names]) if names else torch.zeros(0, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
    return dict(zip(names, stacked.cpu().tolist()))


class TrainingMetrics:
    def __init__(self, output_keys: tuple[str, ...], timer: StepTimer, tracker: Tracker, dist_info: DistInfo,
                 every: int, logger: logging.Logger) -> None:
        self.output_keys, self.timer, self.tracker = output_keys, timer, tracker
        self.dist, self.every, self.logger = dist_info, every, logger
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_steps = 0
        self.window_start = time.perf_counter()
        self.timer.reset()

    def record(self, out, samples: int, images: int, flops: torch.Tensor | float | None = None) -> None:
        """One micro-step's outputs (tensors on the device), what it trained on and, if counted, its FLOPs."""
        for key in self.output_keys:
            value = getattr(out, key).detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.micro_steps += 1
        self.timer.end_step(samples=samples, images=images, flops=flops)

    def should_log(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def log(self, step: int, counters: dict[str, float], extra: dict[str, float]) -> dict[str, float]:
        """Close the window: outputs and data-wait averaged over micro-steps and ranks, pair
        throughput and `counters` summed over ranks, `extra` and this rank's timing as they are."""
        elapsed = time.perf_counter() - self.window_start
        timing = self.timer.summary(reset=False)
        world = self.dist.world_size
        local = {k: self.sums.get(k, 0.0) / max(self.micro_steps, 1) for k in self.output_keys}
        local.update(counters, samples=self.timer.samples, data_wait_fraction=timing.get("frac.data", 0.0))
        total = reduce_by_name(local, self.dist.device)
        metrics = {k: total[k] / world for k in self.output_keys}
        metrics["samples_per_s"] = total["samples"] / max(elapsed, 1e-9)
        metrics["data_wait_fraction"] = total["data_wait_fraction"] / world
        metrics.update({k: total[k] for k in counters}, **extra)
        metrics.update({k: v for k, v in timing.items() if k.startswith(("time.", "frac.")) or k in _TIMING_KEYS})
        self.tracker.metrics(metrics, step)
        if self.dist.is_main:
            self.logger.info("step %d epoch %d %s %.1f pairs/s wait %.1f%%", step, extra.get("epoch", 0),
                             " ".join(f"{k} {metrics[k]:.4f}" for k in self.output_keys), metrics["samples_per_s"],
                             100 * metrics["data_wait_fraction"])
        self.reset()
        return metrics
