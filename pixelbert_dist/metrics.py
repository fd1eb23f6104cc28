"""Where a training step's time goes, and what it achieves: throughput, MFU, peak memory.

    peak = device_peak(cfg.train.precision)                   # datasheet figure, or measured on a CPU
    timer = StepTimer(flops_per_sample=flops.training, peak_flops=peak.flops,
                      world_size=world_size, exact=False)
    for ...:
        with timer.phase("data"):
            batch = next(batches)
        with timer.phase("forward"):
            out = engine(batch)
        with timer.phase("backward"):       # DeepSpeed and DDP reduce gradients in here
            engine.backward(out.loss)
        with timer.phase("optimizer"):
            engine.step()
        timer.end_step(samples=batch_size)
    tracker.metrics(timer.summary(), step)                   # the window's numbers; starts a new window

One component for the trainer and the benchmarks, so both report the same quantities the
same way. It imports no tracking library: callers log the plain dict `summary()` returns.
"""

from __future__ import annotations

import functools
import resource
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Dense (no 2:4 sparsity) tensor-core and plain FP32 peaks per GPU, FLOP/s, from NVIDIA's
# datasheets. The datasheets print tensor-core figures "with sparsity"; dense is half of that:
#   H100 SXM5  datasheet: BF16/FP16 1,979*, TF32 989*, FP32 67 TFLOPS    -> 989.5 / 494.5 / 67
#   H100 PCIe  datasheet: BF16/FP16 1,513*, TF32 756*, FP32 51 TFLOPS    -> 756.5 / 378 / 51
#   H100 NVL   datasheet: BF16/FP16 1,671*, TF32 835*, FP32 60 TFLOPS    -> 835.5 / 417.5 / 60
#   H200 SXM   datasheet: BF16/FP16 1,979*, TF32 989*, FP32 67 TFLOPS    -> as H100 SXM5
#   H200 NVL   datasheet: BF16/FP16 1,671*, TF32 835*, FP32 60 TFLOPS    -> as H100 NVL
#   A100 (SXM4 and PCIe, 40/80 GB) datasheet: BF16/FP16 312, TF32 156, FP32 19.5 TFLOPS (dense)
#   V100 SXM2 datasheet: Tensor (FP16) 125, FP32 15.7; V100 PCIe 112 / 14; V100S PCIe 130 / 16.4.
#   V100 has no BF16 tensor cores: a bf16 run there falls back to a measured peak.
# Rows are matched against torch.cuda.get_device_name() (lower-cased), first match wins, so
# the more specific names come first ("H100 PCIe" before "H100").
_DATASHEET: list[tuple[tuple[str, ...], str, dict[str, float]]] = [
    (("h200", "nvl"), "H200 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    (("h200",), "H200 SXM", {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.5e12, "fp32": 67e12}),
    (("h100", "nvl"), "H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    (("h100", "pcie"), "H100 PCIe", {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51e12}),
    (("h100",), "H100 SXM", {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.5e12, "fp32": 67e12}),
    (("a100",), "A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (("v100s",), "V100S PCIe", {"fp16": 130e12, "fp32": 16.4e12}),
    (("v100", "pcie"), "V100 PCIe", {"fp16": 112e12, "fp32": 14e12}),
    (("v100",), "V100 SXM2", {"fp16": 125e12, "fp32": 15.7e12}),
]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


@dataclass(frozen=True)
class Peak:
    """Peak FLOP/s of the device one training process drives."""

    flops: float
    """FLOP/s: a datasheet's dense figure, or the best of a few large matmuls."""
    device: str
    """torch.cuda.get_device_name(), or "cpu (N threads)"."""
    precision: str
    """The precision the figure is for: bf16, fp16, tf32 or fp32."""
    source: str
    """Where the figure comes from, for the reader of a result file."""


def datasheet_peak(device_name: str, precision: str) -> tuple[str, float] | None:
    """(datasheet row, dense FLOP/s) for a GPU name and precision; None when not in the table."""
    name = device_name.lower()
    for fragments, row, peaks in _DATASHEET:
        if all(f in name for f in fragments):
            return (row, peaks[precision]) if precision in peaks else None
    return None


def _gpu_precision(precision: str) -> str:
    # An "fp32" run on Ampere or newer still multiplies in TF32 wherever torch allows it
    # (cuDNN convolutions do by default), and the CNN holds most of Pixel-BERT's FLOPs.
    if precision == "fp32" and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32):
        return "tf32"
    return precision


@functools.lru_cache(maxsize=None)
def measured_peak(device: str, dtype: torch.dtype, threads: int) -> float:
    """FLOP/s of the fastest of several square matmuls; cached per process (device, dtype, threads).

    `threads` is part of the key because a CPU's peak scales with the threads torch may use:
    with two ranks on two cores each process owns one core, and its MFU is against that core.
    A CPU is tried at several sizes within a time budget (the best size depends on its caches,
    and a CPU without bf16 units multiplies bf16 50x slower than fp32); a GPU at 8192^3.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return _best_matmul(dev, dtype, 8192, warmup=3, budget_s=0.0, min_reps=10)
    best = 0.0
    for size in (256, 512, 1024):
        # 0.05 s a size: the best of 3+ products is within 2% of the best of 0.25 s (measured on
        # 2-core x86; every job start pays this, and the test suite starts ~30)
        flops = _best_matmul(dev, dtype, size, warmup=1, budget_s=0.05, min_reps=3)
        best = max(best, flops)
        if 2 * (2 * size) ** 3 / flops > 1.0:
            break  # the next size would take over a second a product: enough of a slow dtype
    return best


def _best_matmul(device: torch.device, dtype: torch.dtype, size: int, warmup: int, budget_s: float,
                 min_reps: int) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(warmup):  # thread pools, kernel selection, clocks ramping up
        a @ b
    best, reps, spent = float("inf"), 0, 0.0
    while reps < min_reps or spent < budget_s:
        synchronize(device)
        began = time.perf_counter()
        a @ b
        synchronize(device)
        elapsed = time.perf_counter() - began
        best, reps, spent = min(best, elapsed), reps + 1, spent + elapsed
    return 2 * size**3 / best


def device_peak(precision: str = "fp32", device: torch.device | str | None = None) -> Peak:
    """The peak a training process on `device` is measured against (default: the current one)."""
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
    dev = torch.device(device) if device is not None else \
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        kind = _gpu_precision(precision)
        found = datasheet_peak(name, kind)
        if found is not None:
            return Peak(found[1], name, kind, f"datasheet: {found[0]} {kind} dense")
        flops = measured_peak(str(dev), _DTYPES[kind], 0)
        return Peak(flops, name, kind, f"measured: best 8192^3 {kind} matmul (GPU not in the datasheet table)")
    threads = torch.get_num_threads()
    flops = measured_peak("cpu", _DTYPES[precision], threads)
    return Peak(flops, f"cpu ({threads} threads)", precision,
                f"measured: best square {precision} matmul (256-1024) on {threads} threads")


def mfu(flops_per_sample: float, samples_per_s: float, peak: float) -> float:
    """Model FLOPs utilization, a fraction: model FLOPs actually done per second over the peak.

    All three per device: `samples_per_s` is one device's throughput, `peak` its FLOP/s.
    """
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return flops_per_sample * samples_per_s / peak


def peak_memory_gib(device: torch.device | str | None = None) -> float:
    """GPU: torch's peak allocated memory. CPU: the process's peak resident set (VmHWM)."""
    dev = torch.device(device) if device is not None else None
    if (dev is None and torch.cuda.is_available()) or (dev is not None and dev.type == "cuda"):
        return torch.cuda.max_memory_allocated(dev) / 2**30
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Start a new peak: torch's counter on a GPU, the kernel's VmHWM on a CPU (Linux)."""
    dev = torch.device(device) if device is not None else None
    if (dev is None and torch.cuda.is_available()) or (dev is not None and dev.type == "cuda"):
        torch.cuda.reset_peak_memory_stats(dev)
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # 5 = reset the peak RSS (Linux >= 4.0)
    except OSError:
        pass  # not Linux, or not allowed: the peak then runs from process start


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Splits each training step into named phases and summarizes a window of steps.

    A step runs from the previous `end_step()` (or the window's start) to the next one, so
    any time not inside a phase (logging, checkpoints, a collective between phases) shows up
    as "other", and the fractions of all phases plus "other" sum to 1.

    On a GPU, kernels run after the host has moved on. With `exact=True` each phase starts
    and ends with torch.cuda.synchronize(): phase times are then the device's, at the cost
    of a few idle gaps per step. Without it phases measure host time, and queued device work
    surfaces wherever the host next waits (often in "optimizer" or a loss's .item());
    step time and throughput over a window stay right either way.

    Communication is not a phase of its own: DeepSpeed ZeRO-1/2 and DDP reduce gradients
    inside backward (overlapped with it), ZeRO-1/2 gather updated weights inside the
    optimizer step, and ZeRO-3 also gathers weights in forward. A loop that calls a collective
    itself can time it as a phase of its own ("comm").
    """

    def __init__(self, flops_per_sample: float = 0.0, peak_flops: float = 0.0, world_size: int = 1,
                 exact: bool = False, device: torch.device | str | None = None) -> None:
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self.world_size, self.exact = world_size, exact
        self.device = torch.device(device) if device is not None else \
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self._open: str | None = None
        self.reset()

    def reset(self) -> None:
        """Start a new window now, and a new memory peak (not a FLOP probe's or an evaluation's)."""
        reset_peak_memory(self.device)
        self.phase_totals: dict[str, float] = {}
        self.step_times: list[float] = []
        self.samples = self.images = 0
        self.flops: float | torch.Tensor | None = None  # counted per step when end_step is given them
        self._step_start = self._window_start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._open is not None:
            raise RuntimeError(f"phase {name!r} opened inside phase {self._open!r}: phases must not nest")
        if name == "other":
            raise ValueError("'other' is the time outside all phases; pick another name")
        self._open = name
        if self.exact:
            synchronize(self.device)
        began = time.perf_counter()
        try:
            yield
        finally:
            if self.exact:
                synchronize(self.device)
            self.phase_totals[name] = self.phase_totals.get(name, 0.0) + time.perf_counter() - began
            self._open = None

    def end_step(self, samples: int, images: int | None = None, flops: float | torch.Tensor | None = None) -> None:
        """Close a step that trained on `samples` pairs (and `images` images, default the same) here.

        `flops`: what the step computed (flops.StepFlops; a device tensor is summed there and read
        only by `summary`); without it a step counts flops_per_sample per pair.
        """
        now = time.perf_counter()
        self.step_times.append(now - self._step_start)
        self._step_start = now
        self.samples += samples
        self.images += samples if images is None else images
        if flops is not None:
            self.flops = flops if self.flops is None else self.flops + flops

    def summary(self, reset: bool = True) -> dict[str, float]:
        """The window's numbers (see `SUMMARY_KEYS`); then a new window starts unless reset=False.

        Throughput keys are for all ranks (this rank's x world_size: every rank trains the
        same batch size); MFU, TFLOP/s and memory are per device.
        """
        steps = len(self.step_times)
        wall = sum(self.step_times)
        out: dict[str, float] = {"steps": float(steps)}
        if steps == 0 or wall <= 0:
            if reset:
                self.reset()
            return out
        out["step_time_s"] = wall / steps
        out["step_time_median_s"] = statistics.median(self.step_times)
        other = wall - sum(self.phase_totals.values())
        for name, seconds in [*self.phase_totals.items(), ("other", max(other, 0.0))]:
            out[f"time.{name}_s"] = seconds / steps
            out[f"frac.{name}"] = seconds / wall
        local_rate = self.samples / wall
        out["samples_per_s"] = local_rate * self.world_size
        out["images_per_s"] = self.images / wall * self.world_size
        out["samples_per_s_per_device"] = local_rate
        flops_per_sample = (float(self.flops) / max(self.samples, 1) if self.flops is not None
                            else self.flops_per_sample)
        if flops_per_sample > 0:
            out["tflops_per_device"] = flops_per_sample * local_rate / 1e12
            if self.peak_flops > 0:
                out["mfu"] = mfu(flops_per_sample, local_rate, self.peak_flops)
        out["memory_peak_gib"] = peak_memory_gib(self.device)
        if reset:
            self.reset()
        return out


SUMMARY_KEYS = (
    "steps",                     # steps in the window
    "step_time_s",               # mean wall seconds per step
    "step_time_median_s",        # median wall seconds per step
    "time.<phase>_s",            # mean seconds per step in each phase, and time.other_s
    "frac.<phase>",              # share of the window's wall time; with frac.other they sum to 1
    "samples_per_s",             # image-text pairs per second, all ranks
    "images_per_s",              # images per second, all ranks
    "samples_per_s_per_device",  # this rank's pairs per second
    "tflops_per_device",         # model TFLOP/s done by this rank (steps' counted FLOPs, or flops_per_sample)
    "mfu",                       # tflops_per_device / peak, a fraction (with both)
    "memory_peak_gib",           # torch.cuda.max_memory_allocated, or peak RSS on a CPU, since the window's start
)
