"""The training loop's logging window: model outputs summed on the device, reduced over ranks by name.

    metrics = TrainingMetrics(spec.output_keys, timer, tracker, dist_info, every=cfg.train.log_every)
    metrics.plan(total_steps, first_step=step, pairs_per_step=global_batch)     # after a resume, too
    metrics.record(out, samples=len(info.pairs), images=batch.images.shape[0],   # each micro-step
                   flops=step_flops(batch))                                      # optional: else per pair
    if metrics.should_log(step, last):
        metrics.log(step, counters={"skipped_samples": loader.skipped}, extra={"epoch": epoch})

Outputs stay on the device until the window closes, so a step never waits for the GPU just
to be logged; one collective per window reduces every value by its name.

With the run's length known (`plan`), each window also says where the run is: the fraction
done, pairs seen of the total, the time left at the rate since the first window (the first
window holds compilation and warm-up), and the run's projected device-hours (GPU-hours on
GPUs: wall time x devices), so a user renting 64 GPUs knows the bill after a few minutes.
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

        self.total_steps = 0

    def plan(self, total_steps: int, first_step: int, pairs_per_step: int) -> None:
        """The run's length in optimizer steps and where it starts (a resume starts mid-way)."""
        self.total_steps, self.pairs_per_step = total_steps, pairs_per_step
        self.started, self.warm = time.perf_counter(), None  # warm: (step, time) at the first window's end
        self.first_step = first_step

    def progress(self, step: int) -> dict[str, float]:
        """Run fraction, pairs seen of the total, and once past warm-up: hours left and projected device-hours."""
        if not self.total_steps:
            return {}
        now = time.perf_counter()
        out = {"run_fraction": step / self.total_steps, "pairs_seen": step * self.pairs_per_step,
               "pairs_total": self.total_steps * self.pairs_per_step}
        if self.warm is None:
            self.warm = (step, now)
        elif step > self.warm[0]:
            seconds_per_step = (now - self.warm[1]) / (step - self.warm[0])
            left = max(self.total_steps - step, 0) * seconds_per_step
            out["eta_h"] = left / 3600
            out["projected_device_hours"] = (now - self.started + left) * self.dist.world_size / 3600
        return out

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
        # a reason's counter from its first skip on: nine charts of zeros would open the UI's data section
        metrics.update({k: total[k] for k in counters if total[k] or not k.startswith("data/skipped/")}, **extra)
        metrics.update({k: v for k, v in timing.items() if k.startswith(("time.", "frac.")) or k in _TIMING_KEYS})
        metrics.update(self.progress(step))
        self.tracker.metrics(metrics, step)
        if self.dist.is_main:
            self.logger.info("step %s epoch %d %s %.1f pairs/s wait %.1f%%%s", self._of_total(step),
                             extra.get("epoch", 0), " ".join(f"{k} {metrics[k]:.4f}" for k in self.output_keys), metrics["samples_per_s"],
                             100 * metrics["data_wait_fraction"], _eta_text(metrics))
        self.reset()
        return metrics

    def _of_total(self, step: int) -> str:
        return f"{step}/{self.total_steps} ({100 * step / self.total_steps:.1f}%)" if self.total_steps else str(step)


def _eta_text(metrics: dict[str, float]) -> str:
    if "eta_h" not in metrics:
        return ""
    minutes = round(metrics["eta_h"] * 60)
    left = f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"
    return f" | ETA {left}, run ~{metrics['projected_device_hours']:.2f} device-hours"
