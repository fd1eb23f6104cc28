"""Training-step speed: plain PyTorch vs DeepSpeed ZeRO 0-3 on 1 and 2 ranks, and the data path.
(Over 300 lines on purpose: a benchmark is one script a person runs and reads; its rows,
report and plot stay together so a result file can be traced to one file.)

    .venv/bin/python benchmarks/bench_train.py                        # tiny config on this CPU, ~20 min
    .venv/bin/python benchmarks/bench_train.py --quick --out /tmp/b   # smoke run (tests): 1 rank, few steps
    python3 benchmarks/bench_train.py --gpu-check --out DIR           # one GPU: R50 at 800x1333, bf16, < 4 min

Each case runs the real step (PixelBert, our SGD+AdamW optimizer, the lr schedule, gradient
clipping) on synthetic batches of one fixed shape: the config's largest image and longest
caption. Cases:
  plain       torch only: autocast for bf16, clip, optimizer.step, scheduler.step; DDP on 2 ranks
  zero0..3    deepspeed.initialize with the run config's DeepSpeed JSON and that ZeRO stage
  *-loader    the same step fed by StreamingLoader from shards made by data_pipeline (end to end)
  *-mb64      plain and ZeRO-2 on 1 rank at a 4x micro batch (CPU): DeepSpeed's cost per step is
              fixed, so its share depends on the step's length; the pair shows both ends
One optimizer step per micro-batch (no accumulation), so every timed step includes the update.
Each case runs in fresh processes (gloo on 127.0.0.1, one thread per rank on a 2-rank CPU run),
in rounds with the case order rotated; a row is the median round. Ratios vs plain are
medians of per-round ratios, which cancels most of a shared machine's drift.

Writes <out>/train_<hardware>_<date>.{md,json,png} and, unless --no-mlflow or --gpu-check,
logs a run to the MLflow experiment "benchmarks" (MLFLOW_TRACKING_URI, else sqlite in <out>).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, log_mlflow, markdown_table, timed_step, write_results  # noqa: E402
from pixelbert_dist.config import PretrainConfig, load_config  # noqa: E402

TINY = "configs/pretrain/tiny-cpu.yaml"
R50 = "configs/pretrain/r50-coco-vg.yaml"
# No downloads in a benchmark: random weights cost the same FLOPs as ImageNet/BERT ones.
OVERRIDES = ["--model.backbone_weights=none", "--model.text_weights=none"]
ZERO2_TARGET = 1.05       # the target: ZeRO-2 step time within 5% of plain PyTorch, 1 rank
DATA_WAIT_TARGET = 0.03   # ...and under 3% of step time waiting for data (CPU loader, tiny config)
# The paper's schedule. Pixel-BERT (Huang et al. 2020, arXiv:2004.00849) pre-trains on MS-COCO
# captions + Visual Genome region descriptions for 40 epochs (our r50 config). Pair counts as
# tabulated by ViLT (Kim et al. 2021, arXiv:2102.03334, Table 1) for the same two sources:
# MSCOCO 113K images / 567K captions, VG 108K images / 5.41M captions.
PAPER_PAIRS = {"MS-COCO captions": 567_000, "Visual Genome descriptions": 5_410_000}
PAPER_EPOCHS = 40


@dataclass(frozen=True)
class Case:
    engine: str               # "plain" or "zero"
    stage: int = -1           # ZeRO stage when engine == "zero"
    world_size: int = 1
    data: str = "synthetic"   # or "loader"
    micro_batch: int = 0      # 0: the settings' micro batch

    @property
    def label(self) -> str:
        name = ("plain-ddp" if self.world_size > 1 else "plain") if self.engine == "plain" else f"zero{self.stage}"
        return (f"{name}-ws{self.world_size}" + ("-loader" if self.data == "loader" else "")
                + (f"-mb{self.micro_batch}" if self.micro_batch else ""))


@dataclass
class Settings:
    """What every worker needs to build the same model, batch and step."""
    config: str
    vocab_size: int
    precision: str
    image_size: list[int]
    text_len: int
    micro_batches: list[int]   # the first that fits is used (a GPU halves on OOM)
    warmup: int
    steps: int
    device: str                # "cpu" or "cuda"
    overrides: list[str] = field(default_factory=lambda: list(OVERRIDES))
    manifest: str = ""
    tokenizer: str = ""
    loader_workers: int = 1
    data_ready: str = ""       # a file the loader cases wait for (the data is made meanwhile)

    def run_config(self, case: Case, micro_batch: int) -> PretrainConfig:
        cfg = load_config(REPO / self.config, [
            *self.overrides, f"--model.vocab_size={self.vocab_size}", f"--train.precision={self.precision}",
            f"--train.micro_batch_size={micro_batch}", f"--train.global_batch_size={micro_batch * case.world_size}"])
        if case.engine == "zero":
            cfg.deepspeed.zero_stage = case.stage
        cfg.deepspeed.config = str(REPO / cfg.deepspeed.config)
        return cfg


# ---------------------------------------------------------------------------- worker (one rank)

_FLOPS: dict = {}


def _flops_per_sample(model, settings: Settings, device):
    """Counted once per process on a small batch (train mode: pixel sampling included)."""
    from pixelbert_dist.flops import measure_flops, synthetic_batch
    key = (settings.config, tuple(settings.image_size), settings.text_len)
    if key not in _FLOPS:
        batch = synthetic_batch(settings.vocab_size, 1 if device.type == "cuda" else 2,
                                tuple(settings.image_size), settings.text_len)
        _FLOPS[key] = measure_flops(model.to(device).train(), batch.to(device))
    return _FLOPS[key]


def _synthetic(settings: Settings, batch_size: int):
    from pixelbert_dist.flops import synthetic_batch
    pool = [synthetic_batch(settings.vocab_size, batch_size, tuple(settings.image_size), settings.text_len, seed=s)
            for s in range(2)]
    for i in itertools.count():
        yield pool[i % 2]


def _from_shards(settings: Settings, cfg: PretrainConfig, batch_size: int, rank: int, world: int):
    from pixelbert_dist.data.loader import StreamingLoader
    from pixelbert_dist.tokenizer import load_tokenizer
    deadline = time.time() + 600
    while not Path(settings.data_ready).exists():
        if time.time() > deadline:
            raise TimeoutError("the shards for the loader cases never became ready")
        time.sleep(0.5)
    if Path(settings.data_ready).read_text().strip() != "ok":
        raise RuntimeError(f"making the shards failed: {Path(settings.data_ready).read_text()[-2000:]}")
    size = len(load_tokenizer(settings.tokenizer))
    if size > settings.vocab_size:  # the model must cover every id the tokenizer makes
        raise ValueError(f"--vocab-size {settings.vocab_size} < the tokenizer's {size} entries")
    cfg.data.tokenizer = settings.tokenizer
    loader = StreamingLoader(settings.manifest, cfg.data, batch_size, rank, world, cfg.train.seed,
                             settings.loader_workers, cfg.data.open_shards)
    while True:  # epochs until the case has its steps; each epoch restarts the loader's workers
        produced = 0
        for batch, _info in loader.epoch_batches():
            produced += 1
            yield batch
        if not produced:
            raise RuntimeError(f"{settings.manifest} holds too few pairs for one batch per rank")
        loader.next_epoch()


def _plain_step(model, cfg: PretrainConfig, device, world: int):
    import torch
    from pixelbert_dist.optim import build_lr_schedule, build_optimizer
    if cfg.train.precision == "fp16":
        raise ValueError("the plain baseline does bf16 (autocast) or fp32; fp16 would need a GradScaler")
    model.to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_schedule(optimizer, cfg.optim, steps_per_epoch=1000)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    bf16 = cfg.train.precision == "bf16"

    def forward(batch):
        # What one writes without DeepSpeed: fp32 weights and grads, bf16 matmuls/convs by autocast.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return wrapped(batch)

    def step():
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return forward, lambda loss: loss.backward(), step


def _deepspeed_step(model, cfg: PretrainConfig, world: int):
    import deepspeed
    import torch
    from pixelbert_dist.engine import build_engine, deepspeed_config
    from pixelbert_dist.optim import build_lr_schedule, build_optimizer
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # wraps our group
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_schedule(optimizer, cfg.optim, steps_per_epoch=1000)
    ds_config = deepspeed_config(cfg, world)
    engine = build_engine(model, optimizer, scheduler, ds_config)
    return engine, engine.backward, engine.step


def _run(settings: Settings, case: Case, device, micro_batch: int) -> dict:
    import torch
    import torch.distributed as dist
    from pixelbert_dist.metrics import StepTimer, device_peak, reset_peak_memory
    from pixelbert_dist.model import PixelBert
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = settings.run_config(case, micro_batch)
    torch.manual_seed(cfg.train.seed)
    model = PixelBert(cfg.model).train()
    flops = _flops_per_sample(model, settings, device)
    if case.engine == "plain":
        forward, backward, step = _plain_step(model, cfg, device, world)
    else:
        forward, backward, step = _deepspeed_step(model, cfg, world)
    source = (_from_shards(settings, cfg, micro_batch, rank, world) if case.data == "loader"
              else _synthetic(settings, micro_batch))
    peak = device_peak(settings.precision, device)
    timer = StepTimer(flops.training, peak.flops, world, exact=device.type == "cuda", device=device)
    reset_peak_memory(device)
    try:
        for i in range(settings.warmup + settings.steps):
            if i == settings.warmup:
                timer.reset()  # warm-up steps (allocations, optimizer state, loader start) not timed
            with timer.phase("data"):
                batch = next(source).to(device)
            timed_step(timer, forward, backward, step, batch)
    finally:
        source.close()  # stops a loader's worker processes now, not at garbage collection
    return {"case": case.label, **dataclasses.asdict(case), "case_micro_batch": case.micro_batch,
            "micro_batch": micro_batch,
            **timer.summary(reset=False), "step_times": timer.step_times, "device": peak.device,
            "peak_tflops": peak.flops / 1e12, "peak_source": peak.source,
            "gflops_per_sample": flops.training / 1e9, "gflops_forward": flops.forward / 1e9,
            "gflops_backward": flops.backward / 1e9}


def _run_case(settings: Settings, case: Case, device) -> dict:
    import torch
    for micro_batch in [case.micro_batch] if case.micro_batch else settings.micro_batches:
        try:
            return _run(settings, case, device, micro_batch)
        except torch.cuda.OutOfMemoryError:
            print(f"{case.label}: micro batch {micro_batch} does not fit; halving", flush=True)
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    raise RuntimeError(f"{case.label}: no micro batch in {settings.micro_batches} fits")


def worker(spec_path: Path) -> None:
    import torch
    import torch.distributed as dist
    from pixelbert_dist.distributed import finish
    spec = json.loads(spec_path.read_text())
    settings, cases = Settings(**spec["settings"]), [Case(**c) for c in spec["cases"]]
    rank = int(os.environ["RANK"])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if settings.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=datetime.timedelta(minutes=5))
    results = []
    for case in cases:
        try:
            results.append(_run_case(settings, case, device))
        except Exception:  # a case that fails (an OOM at batch 1, ZeRO-3 on this model) is a result too
            results.append({"case": case.label, **dataclasses.asdict(case), "error": traceback.format_exc()[-3000:]})
            print(results[-1]["error"], flush=True)
    if rank == 0:
        Path(spec["result"]).write_text(json.dumps(results))
    finish(0)  # gloo can abort at interpreter exit; see pixelbert_dist.distributed.finish


# ---------------------------------------------------------------------------- launching

def launch(settings: Settings, cases: list[Case], world_size: int, work: Path, timeout_s: float) -> list[dict]:
    """Run `cases` one after another in `world_size` fresh processes; rank 0's results."""
    name = f"{cases[0].label}-{time.monotonic_ns()}"
    spec, result = work / f"{name}.json", work / f"{name}.result.json"
    spec.write_text(json.dumps({"settings": dataclasses.asdict(settings), "result": str(result),
                                "cases": [dataclasses.asdict(c) for c in cases]}))
    from pixelbert_dist.distributed import free_port

    threads = max(1, (os.cpu_count() or 1) // world_size) if settings.device == "cpu" else 4
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "DS_ACCELERATOR": "cuda" if settings.device == "cuda" else "cpu", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs, logs = [], []
    for rank in range(world_size):
        logs.append(work / f"{name}.rank{rank}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(spec)], cwd=REPO,
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                          stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + timeout_s
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"{[c.label for c in cases]} on {world_size} ranks: {timeout_s - (deadline - time.time()):.1f} s",
          flush=True)
    if any(p.returncode != 0 for p in procs) or not result.exists():
        tails = "\n".join(f"--- rank {r} (rc {p.returncode}):\n{logs[r].read_text()[-3000:]}"
                          for r, p in enumerate(procs))
        raise RuntimeError(f"{[c.label for c in cases]} on {world_size} ranks failed:\n{tails}")
    return json.loads(result.read_text())


def prepare_shards(root: Path, num_images: int, cfg: PretrainConfig, ready: Path) -> None:
    """The Makefile demo's data steps: synthetic COCO -> shards (Ray) -> WordPiece vocab."""
    py = sys.executable
    steps = [
        [py, "-m", "data_pipeline.synthetic", "--out", str(root / "synthetic"), "--num-images", str(num_images),
         "--seed", "0"],
        [py, "-m", "data_pipeline.shard", "--out", str(root / "shards"), "--shard-size", "100",
         "--max-short-side", str(cfg.data.image_short_side), "--max-long-side", str(cfg.data.image_long_side),
         "--source", f"coco:captions={root}/synthetic/annotations/captions.json,images={root}/synthetic/images",
         "--no-progress", "--num-cpus", str(os.cpu_count() or 1)],
        [py, "-m", "pixelbert_dist.tokenizer", "--captions", str(root / "synthetic/annotations/captions.json"),
         "--out", str(root / "vocab")],
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    try:
        for command in steps:
            began = time.perf_counter()
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            print(f"data: {command[2]} took {time.perf_counter() - began:.1f} s", flush=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command[:3])} failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
        ready.write_text("ok")
    except Exception as err:
        ready.write_text(f"failed: {err}")
        raise


# ---------------------------------------------------------------------------- aggregating

def aggregate(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per case from its rounds: medians, so a busy machine's bad moments drop out.

    step_s is the median over rounds of each round's median step; throughput and MFU follow
    from it (micro batch x ranks / step_s), not from a mean that one stalled step can halve.
    Phase fractions and memory come from the median round. A CPU's peak is the best matmul
    rate any process of the same thread count measured (each measures its own, under load).
    """
    peaks: dict[int, float] = {}
    for rounds in runs.values():
        for r in rounds:
            if "error" not in r:
                peaks[r["world_size"]] = max(peaks.get(r["world_size"], 0.0), r["peak_tflops"])
    rows = []
    for rounds in runs.values():
        ok = [r for r in rounds if "error" not in r]
        if not ok:
            rows.append({**rounds[0], "error": rounds[0]["error"].strip().splitlines()[-1],
                         "traceback": rounds[0]["error"]})
            continue
        ranked = sorted(ok, key=lambda r: r["step_time_median_s"])
        row = dict(ranked[(len(ranked) - 1) // 2])
        row.pop("step_times", None)
        row["step_s"] = statistics.median(r["step_time_median_s"] for r in ok)
        row["step_s_min"], row["step_s_max"] = ranked[0]["step_time_median_s"], ranked[-1]["step_time_median_s"]
        row["rounds"] = len(ok)
        row["samples_per_s_mean"] = row["samples_per_s"]  # the median round's timer, mean step
        row["samples_per_s"] = row["images_per_s"] = row["micro_batch"] * row["world_size"] / row["step_s"]
        row["peak_tflops"] = peaks[row["world_size"]]
        row["mfu"] = row["gflops_per_sample"] * 1e9 * row["micro_batch"] / row["step_s"] / (row["peak_tflops"] * 1e12)
        row["data_wait_median"] = statistics.median(r.get("frac.data", 0.0) for r in ok)
        row["per_round"] = [{"step_s": r["step_time_median_s"], "samples_per_s_mean": r["samples_per_s"],
                             "frac.data": r.get("frac.data", 0.0), "peak_tflops": r["peak_tflops"]} for r in ok]
        rows.append(row)
    by_label = {r["case"]: r for r in rows}
    for row in rows:
        if "error" in row or row["data"] != "synthetic" or row["engine"] == "plain":
            continue
        plain = Case("plain", world_size=row["world_size"], micro_batch=row.get("case_micro_batch", 0)).label
        paired = [(z["step_time_median_s"], p["step_time_median_s"])  # the same round: same machine load
                  for z, p in zip(runs[row["case"]], runs.get(plain, []))
                  if "error" not in z and "error" not in p]
        if paired and "error" not in by_label.get(plain, {"error": 1}):
            row["plain_case"] = plain
            row["vs_plain"] = statistics.median(z / p for z, p in paired)
            row["added_s"] = statistics.median(z - p for z, p in paired)  # DeepSpeed's cost per step
            row["throughput_vs_plain"] = row["samples_per_s"] / by_label[plain]["samples_per_s"]
    return rows


def projection(gpu: dict | None, gpus: list[int]) -> tuple[str, dict]:
    """GPU-hours and days for the paper's schedule at the measured per-GPU throughput."""
    pairs = sum(PAPER_PAIRS.values())
    samples = pairs * PAPER_EPOCHS
    sources = " + ".join(f"{v / 1e6:.3f}M {k}" for k, v in PAPER_PAIRS.items())
    lines = ["## Cost projection: the paper's schedule (R50, 800x1333)", "",
             f"- Pairs per epoch: {sources} = {pairs / 1e6:.3f}M (ViLT, arXiv:2102.03334, Table 1; "
             f"Pixel-BERT pre-trains on these two sources, arXiv:2004.00849).",
             f"- Epochs: {PAPER_EPOCHS} (Pixel-BERT; our r50-coco-vg config). Samples: {pairs / 1e6:.3f}M x "
             f"{PAPER_EPOCHS} = {samples / 1e6:.1f}M image-text pairs through forward+backward."]
    data: dict = {"pairs_per_epoch": pairs, "epochs": PAPER_EPOCHS, "samples": samples, "sources": PAPER_PAIRS}
    if gpu is None:
        lines.append("- Per-GPU throughput: **not measured** (no `--gpu-check` result found); GPU-hours not computed.")
        return "\n".join(lines), {**data, "measured": False}
    rate = gpu["samples_per_s"]
    gpu_hours = samples / rate / 3600
    lines += [f"- Per-GPU throughput: **{rate:.2f} pairs/s** ({gpu['case']}, micro batch {gpu['micro_batch']}, "
              f"bf16, on {gpu['device']}, from {gpu['source_file']}; MFU {100 * gpu.get('mfu', 0):.1f}%).",
              f"- GPU-hours = {samples / 1e6:.1f}M / {rate:.2f} / 3600 = **{gpu_hours:,.0f} GPU-hours**.", "",
              "| GPUs | days (= GPU-hours / GPUs / 24) |", "|---|---|"]
    lines += [f"| {n} | {gpu_hours:,.0f} / {n} / 24 = {gpu_hours / n / 24:.2f} |" for n in gpus]
    lines += ["", "Assumes throughput scales linearly with GPUs: the measurement is one GPU, so it holds "
              "no gradient all-reduce across GPUs (ZeRO-2 overlaps it with backward) and no data-loading "
              "stall; at 64 GPUs x micro batch 8, the paper's global batch of 4096 needs 8 accumulation steps."]
    if "h100" not in gpu["device"].lower():
        lines.append(f"- Measured on {gpu['device']}, not an H100: an H100 SXM has the same dense bf16 peak "
                     "(989.5 TFLOP/s) but less memory bandwidth (3.35 vs 4.8 TB/s), so expect it a little slower.")
    data.update(measured=True, samples_per_s_per_gpu=rate, gpu_hours=gpu_hours,
                days={n: gpu_hours / n / 24 for n in gpus}, from_case=gpu["case"], from_file=gpu["source_file"])
    return "\n".join(lines), data


def find_gpu_result(rows: list[dict] | None, source: str, search: list[Path]) -> dict | None:
    """The ZeRO-2 (else plain) row of this --gpu-check run, or of the newest one saved."""
    if rows is None:
        files = sorted((p for d in search for p in d.glob("train_*.json")), key=lambda p: p.stat().st_mtime)
        for path in reversed(files):
            data = json.loads(path.read_text())
            if data.get("mode") == "gpu-check":
                rows, source = data["rows"], path.name
                break
    good = {r["case"]: r for r in rows or [] if "error" not in r}
    row = good.get("zero2-ws1") or good.get("plain-ws1")
    return {**row, "source_file": source} if row else None


# ---------------------------------------------------------------------------- reporting

COLUMNS = ["case", "micro_batch", "step_s", "step_s_min", "step_s_max", "vs_plain", "samples_per_s",
           "images_per_s", "mfu %", "memory_peak_gib", "data %", "forward %", "backward %", "optimizer %",
           "other %"]


def _table_rows(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        shown = {k: row.get(k, "") for k in COLUMNS}
        if "error" in row:
            shown["step_s"] = f"failed: {row['error'][:120]}"
        else:
            shown["mfu %"] = 100 * row.get("mfu", 0.0)
            for phase in ("data", "forward", "backward", "optimizer", "other"):
                shown[f"{phase} %"] = 100 * row.get(f"frac.{phase}", 0.0)
            if "vs_plain" in row:
                shown["vs_plain"] = f"{row['vs_plain']:.3f}"
        out.append(shown)
    return out


def report(rows: list[dict], args, settings: Settings, cfg: PretrainConfig, gpu: dict | None,
           notes: list[str]) -> tuple[str, dict]:
    engine_rows = [r for r in rows if r["data"] == "synthetic"]
    loader_rows = [r for r in rows if r["data"] == "loader"]
    targets: dict = {}
    lines = ["## Targets", ""]
    zero2 = [r for r in engine_rows if r["stage"] == 2 and r["world_size"] == 1 and "vs_plain" in r]
    for row in sorted(zero2, key=lambda r: r["micro_batch"]):
        key = f"zero2_ws1_mb{row['micro_batch']}"
        targets[f"{key}_vs_plain"] = row["vs_plain"]
        targets[f"{key}_met"] = row["vs_plain"] <= ZERO2_TARGET
        plain = next(r for r in engine_rows if r["case"] == row["plain_case"])
        lines.append(f"- ZeRO-2 step time vs plain PyTorch, 1 rank, micro batch {row['micro_batch']} (plain step "
                     f"{plain['step_s']:.3f} s): **{row['vs_plain']:.3f}x** (target <= {ZERO2_TARGET:.2f}): "
                     f"**{'met' if targets[f'{key}_met'] else 'NOT met'}**; DeepSpeed adds "
                     f"{1000 * row['added_s']:.0f} ms a step (median over rounds of the same-round difference).")
    for row in loader_rows:
        if "error" in row:
            continue
        twin = next((r for r in engine_rows if r["case"] == row["case"].removesuffix("-loader")), None)
        wait = row["data_wait_median"]
        targets[f"data_wait_{row['case']}"] = wait
        met = wait < DATA_WAIT_TARGET
        targets[f"data_wait_{row['case']}_met"] = met
        twin_text = (f"; synthetic tensors {100 * twin['data_wait_median']:.2f}%, step time loader/synthetic "
                     f"{row['step_s'] / twin['step_s']:.3f}x" if twin and "error" not in twin else "")
        rounds = ", ".join(f"{100 * r['frac.data']:.2f}%" for r in row["per_round"])
        lines.append(f"- Data wait, {row['case']} (real loader, {settings.loader_workers} worker per rank): "
                     f"**{100 * wait:.2f}%** of step time, median of rounds ({rounds}) "
                     f"(target < {100 * DATA_WAIT_TARGET:.0f}%): "
                     f"**{'met' if met else 'NOT met'}**{twin_text}.")
    if len(lines) == 2:
        lines.append("- Not measured in this run.")
    sections = ["\n".join(lines), "", "## Training step, synthetic batches", "",
                markdown_table(_table_rows(engine_rows), COLUMNS)]
    if loader_rows:
        sections += ["", "## End to end: the same step fed by StreamingLoader from shards", "",
                     markdown_table(_table_rows(loader_rows), COLUMNS)]
    proj_md, proj = projection(gpu, args.gpus)
    sections += ["", proj_md, "", "## How it was measured", "", *[f"- {n}" for n in notes]]
    return "\n".join(sections), {"targets": targets, "projection": proj}


def plot(rows: list[dict]):
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    good = [r for r in rows if "error" not in r]
    phases = ["data", "forward", "backward", "optimizer", "other"]

    def draw(path: Path) -> None:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(good) + 2), 4.5))
        bottom = [0.0] * len(good)
        for phase in phases:
            values = [r.get(f"frac.{phase}", 0.0) * r["step_s"] for r in good]
            ax.bar(range(len(good)), values, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, values)]
        for i, r in enumerate(good):
            if "vs_plain" in r:
                ax.annotate(f"{r['vs_plain']:.2f}x", (i, bottom[i]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(good)), [r["case"] for r in good], rotation=30, ha="right")
        ax.set_ylabel("seconds per step (median round), by phase")
        ax.set_title("Training step: plain PyTorch vs DeepSpeed ZeRO (label: step time vs plain)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return draw


# ---------------------------------------------------------------------------- main

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help=f"run config (default {TINY}; --gpu-check: {R50})")
    parser.add_argument("--vocab-size", type=int, default=None, help="model vocab (default: the config's, else 1000)")
    parser.add_argument("--precision", default=None, help="fp32 or bf16 (default: the config's; --gpu-check: bf16)")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the config's; --gpu-check: 8")
    parser.add_argument("--image-size", default=None, help="HxW of the synthetic images (default: short x long side)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20)")
    parser.add_argument("--rounds", type=int, default=None, help="repeats of every case (default 5)")
    parser.add_argument("--stages", default=None, help="ZeRO stages (default 0,1,2,3)")
    parser.add_argument("--world-sizes", default=None, help="ranks (default 1,2)")
    parser.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=None,
                        help="the loader-from-shards cases (default: on, off with --quick/--gpu-check)")
    parser.add_argument("--e2e-images", type=int, default=None, help="synthetic images to shard (default 400)")
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader workers per rank (the demo's 1)")
    parser.add_argument("--large-micro-batch", type=int, default=None,
                        help="plain and ZeRO-2 on 1 rank at this micro batch too (default: 4x on a CPU; 0: off)")
    parser.add_argument("--gpus", type=_ints, default=[8, 64], help="GPU counts for the cost projection")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 rank, plain vs ZeRO-2, few steps, no loader cases (add --e2e)")
    parser.add_argument("--gpu-check", action="store_true", help="one GPU: R50 at 800x1333, plain vs ZeRO-2")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return 0

    gpu_mode, quick = args.gpu_check, args.quick
    defaults = ({"warmup": 3, "steps": 10, "rounds": 1, "stages": "2", "world_sizes": "1", "e2e": False}
                if gpu_mode else
                {"warmup": 1, "steps": 3, "rounds": 1, "stages": "2", "world_sizes": "1", "e2e": False}
                if quick else
                {"warmup": 5, "steps": 20, "rounds": 5, "stages": "0,1,2,3", "world_sizes": "1,2", "e2e": True})
    config = args.config or (R50 if gpu_mode else TINY)
    cfg = load_config(REPO / config, OVERRIDES)
    device = "cpu"
    notes: list[str] = []
    if gpu_mode:
        import torch
        if not torch.cuda.is_available():
            print("--gpu-check needs a CUDA GPU", file=sys.stderr)
            return 2
        device = "cuda"
    short, long = cfg.data.image_short_side, cfg.data.image_long_side
    image = [int(x) for x in args.image_size.split("x")] if args.image_size else [short, long]
    micro = args.micro_batch or (8 if gpu_mode else cfg.train.micro_batch_size)
    settings = Settings(
        config=config, vocab_size=args.vocab_size or cfg.model.vocab_size or 1000,
        precision=args.precision or ("bf16" if gpu_mode else cfg.train.precision), image_size=image,
        text_len=cfg.data.max_text_len,
        micro_batches=[micro >> i for i in range(micro.bit_length())] if gpu_mode else [micro],
        warmup=args.warmup if args.warmup is not None else defaults["warmup"],
        steps=args.steps or defaults["steps"], device=device, loader_workers=args.loader_workers)
    rounds = args.rounds or defaults["rounds"]
    stages = _ints(args.stages or defaults["stages"])
    world_sizes = _ints(args.world_sizes or defaults["world_sizes"])
    e2e = defaults["e2e"] if args.e2e is None else args.e2e
    have_deepspeed = importlib.util.find_spec("deepspeed") is not None
    if not have_deepspeed:
        stages = []
        notes.append("**deepspeed is not installed here: plain PyTorch only.**")

    cases = [c for ws in world_sizes
             for c in [Case("plain", world_size=ws), *(Case("zero", s, ws) for s in stages)]]
    large = args.large_micro_batch if args.large_micro_batch is not None else 0 if gpu_mode or quick else 4 * micro
    if large and 2 in stages and 1 in world_sizes:
        cases += [Case("plain", micro_batch=large), Case("zero", 2, micro_batch=large)]
    if e2e and have_deepspeed:  # the shipped engine (the config's ZeRO stage), fed from shards
        cases += [Case("zero", cfg.deepspeed.zero_stage, ws, "loader") for ws in world_sizes]
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    runs: dict[str, list[dict]] = {c.label: [] for c in cases}
    timeout = 200 if gpu_mode else 900
    began = time.perf_counter()
    try:
        prep = None
        if any(c.data == "loader" for c in cases):
            ready = work / "data.ready"
            settings.manifest, settings.tokenizer = str(work / "data/shards"), str(work / "data/vocab/vocab.txt")
            settings.data_ready = str(ready)
            images = args.e2e_images or (100 if quick else 400)
            prep = threading.Thread(target=prepare_shards, args=(work / "data", images, cfg, ready), daemon=True)
            prep.start()
            if not quick:  # timings must not share the CPU with sharding: wait for it
                prep.join()
        if quick:  # cheap: every case of a world size in one process group (imports paid once)
            for ws in world_sizes:
                for result in launch(settings, [c for c in cases if c.world_size == ws], ws, work, timeout):
                    runs[result["case"]].append(result)
        else:
            for r in range(rounds):
                shift = r % len(cases)
                for case in cases[shift:] + cases[:shift]:  # rotated: no case always runs first or last
                    print(f"round {r + 1}/{rounds}: {case.label}", flush=True)
                    try:
                        runs[case.label] += launch(settings, [case], case.world_size, work, timeout)
                    except RuntimeError as err:
                        runs[case.label].append({"case": case.label, **dataclasses.asdict(case), "error": str(err)})
                        print(str(err)[-2000:], flush=True)
        if prep is not None:
            prep.join()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - began

    rows = aggregate(runs)
    gpu = find_gpu_result(rows if gpu_mode else None, "this run", [args.out, RESULTS])
    notes += [
        f"Config {config} (+ {' '.join(OVERRIDES)}), vocab {settings.vocab_size}, precision "
        f"{settings.precision}, images {image[0]}x{image[1]}, text {settings.text_len} tokens; global batch = "
        "micro batch x ranks (one optimizer step per micro-batch).",
        f"{settings.warmup} untimed + {settings.steps} timed steps per case and round; {rounds} round(s); "
        f"each case in fresh processes{' (quick: the cases of a world size share one process)' if quick else ''}. "
        "step_s = median over rounds of each round's median step; min/max = the rounds' extremes; "
        "samples_per_s = micro batch x ranks / step_s (samples_per_s_mean in the JSON: the median round's "
        "mean step); phase fractions and memory from the median round; data wait = median over rounds.",
        "vs_plain = median over rounds of (ZeRO step time / plain step time of the same round, same ranks).",
        "Phases: data = next batch + copy to the device; backward includes gradient reduction (DDP and "
        "ZeRO-1/2 reduce in backward hooks); optimizer = clip + step + lr schedule, and for ZeRO-1/2/3 the "
        "gather of updated weights; ZeRO-3 also gathers weights in forward. other = time outside the phases."
        + (" GPU phases are synchronized (exact timing)." if gpu_mode else ""),
        "plain with bf16 = torch.autocast over fp32 weights (what one writes without DeepSpeed); DeepSpeed "
        "bf16 = bf16 weights and grads with an fp32 master copy. Same model, batch and optimizer.",
        "MFU = counted model FLOPs per sample (pixelbert_dist.flops, train mode) x per-device pairs/s / the "
        "device's peak (pixelbert_dist.metrics: datasheet on a GPU; on a CPU the best square matmul "
        "rate measured by any process with the same threads, as each one's own is lowered by load).",
        "memory_peak_gib: torch.cuda.max_memory_allocated on a GPU; on a CPU the process's peak RSS "
        "(VmHWM, reset at the case's start), which includes torch, transformers and (ZeRO) deepspeed.",
        ("Host threads: 4 per process (OMP_NUM_THREADS)." if gpu_mode else
         f"CPU threads: {os.cpu_count()} cores / ranks per process (OMP_NUM_THREADS)."),
        f"Wall time of the whole benchmark: {elapsed / 60:.1f} min.",
    ]
    if e2e and have_deepspeed:
        notes.append(f"End to end: {args.e2e_images or (100 if quick else 400)} synthetic images x 5 captions "
                     "-> data_pipeline.shard (100 images a shard, the config's resize limits) -> WordPiece "
                     f"vocab; StreamingLoader with {settings.loader_workers} DataLoader worker per rank; the "
                     "loader's images vary in size (synthetic tensors are the largest size).")
    body, extra = report(rows, args, settings, cfg, gpu, notes)
    data = {"mode": "gpu-check" if gpu_mode else "quick" if quick else "full", "rows": rows, **extra,
            "config": {"run": settings.run_config(Case("plain"), micro).to_dict(),  # as the workers built it
                       "settings": dataclasses.asdict(settings), "rounds": rounds,
                       "stages": stages, "world_sizes": world_sizes, "cases": [c.label for c in cases],
                       "deepspeed_installed": have_deepspeed}}
    title = ("Training step on one GPU: R50 at 800x1333, plain PyTorch vs DeepSpeed ZeRO-2" if gpu_mode else
             "Training step: plain PyTorch vs DeepSpeed ZeRO 0-3, and the data path")
    md = write_results("train", title, body, data, plot(rows), out_dir=args.out)
    print(body)
    print(f"results: {md}")
    if not (gpu_mode or args.no_mlflow):
        run_id = log_mlflow("train", args.out, data["config"], rows, extra["targets"],
                            [md, md.with_suffix(".json"), md.with_suffix(".png")])
        if run_id:
            print(f"MLflow run {run_id} in experiment 'benchmarks'")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
