"""Which DeepSpeed ZeRO-2 settings cut its host-side cost per step: each option vs plain PyTorch.
(Over 300 lines on purpose: a benchmark is one script a person runs and reads; its rows,
report and plot stay together so a result file can be traced to one file.)

    DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0 .venv/bin/python benchmarks/bench_zero_options.py
    .venv/bin/python benchmarks/bench_zero_options.py --quick --out /tmp/z    # smoke run, ~1 min
    .venv/bin/python benchmarks/bench_zero_options.py --only fp32-ws1         # one group of rows

On the tiny config (configs/pretrain/tiny-cpu.yaml, vocab 1000, micro batch 16) a ZeRO-2 step
on one CPU rank costs a few ms more than the same step in plain PyTorch, and that time is
Python: a hook per parameter, a bucket, per-tensor norms. This benchmark runs the real step
(PixelBert, our SGD+AdamW optimizer, the lr schedule, clipping at 1.0) on synthetic batches
(pixelbert_dist.flops.synthetic_batch, 128x192 images, 24 tokens) with:
  plain      forward, loss.backward, clip_grad_norm_, optimizer.step, scheduler.step, zero_grad
             (autocast for bf16; DDP on 2 ranks)
  zero2      deepspeed.initialize with the DeepSpeed dict pixelbert_dist.engine.deepspeed_config
             builds from the shipped configs/deepspeed/zero2.json
  zero2 (again)  the shipped dict a second time: how large a "saving" noise alone makes
  <option>   the same dict with one option changed, one row per option (see variants())
  best       the options that keep training the same and measured faster, together
Groups: fp32 on 1 rank (every option), bf16 on 1 rank (the bf16 options), fp32 on 2 ranks
(gloo on 127.0.0.1; the options that act on communication). Options that are expected to
fail (a removed block, an option an assert forbids, timers our model's output cannot start)
are started once and their error kept. Last, a side-by-side check: the 1-rank rows built in
one process with their steps interleaved, which resolves differences below the rounds' spread.

Every run is a fresh process (DeepSpeed's state is global), forked from a server that has
imported torch, deepspeed and the model once; one thread per rank. Rounds: every group in
turn (rotated), each group's rows in a new seeded shuffle; per row and round, the median of
the timed steps.
vs plain / vs zero2 are medians over rounds of same-round ratios; added / saved ms are medians
of same-round differences (the shared machine's drift cancels within a round). Training is
checked too: each row's loss after the timed steps against the shipped config's.

Writes <out>/zero_options_<hardware>_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, markdown_table, write_results  # noqa: E402

TINY = "configs/pretrain/tiny-cpu.yaml"
SHIPPED = "zero2"
REPEAT = "zero2 (again)"
OVERRIDES = ["--model.backbone_weights=none", "--model.text_weights=none", "--model.vocab_size=1000"]
LOSS_RTOL = 0.02          # "trains the same": final loss within 2% of the shipped config's, same round
EFFECT_MIN_MS = 0.3       # a saving/cost smaller than this is "no clear effect" even when its sign is steady
RUN_TIMEOUT_S = 180
PRELOAD = ["torch", "deepspeed", "transformers", "pixelbert_dist.model", "pixelbert_dist.engine",
           "pixelbert_dist.optim", "pixelbert_dist.flops", "pixelbert_dist.distributed", "__main__"]


@dataclass
class Variant:
    """One row: an engine, where it runs, and the changes to the shipped DeepSpeed dict."""
    name: str
    what: str                                         # the option, and what it changes (one line)
    engine: str = "zero"                              # "plain" or "zero"
    world_size: int = 1
    precision: str = "fp32"
    zero: dict = field(default_factory=dict)          # merged into "zero_optimization"
    config: dict = field(default_factory=dict)        # merged into the top level (nested dicts merge)
    env: dict = field(default_factory=dict)           # set in the worker before the engine is built
    changes_training: bool = False                    # by design (e.g. no clipping): loss may differ
    probe: bool = False                               # expected to fail: started once, error kept
    together: bool = True                             # also in the side-by-side check (1 rank, no env)

    @property
    def group(self) -> str:
        return f"{self.precision}-ws{self.world_size}"


@dataclass
class Settings:
    config: str
    micro_batch: int
    image_size: list[int]
    text_len: int
    warmup: int
    steps: int
    threads: int


# ---------------------------------------------------------------------------- the rows

NO_CLIP = {"gradient_clipping": 0.0}
# "best": the JSON options that measured faster here (pilot runs and the side-by-side check) and
# leave training as it is. Turning the norm off was faster still, but it needs clipping off.
# reduce_scatter/reduce_bucket_size are not in it: without contiguous gradients DeepSpeed reads neither.
BEST_ZERO = {"contiguous_gradients": False, "overlap_comm": False}
BEST_BF16 = {"bf16": {"check_grad_overflow": False}}
NVML_ENV = {"PYTORCH_NVML_BASED_CUDA_CHECK": "0"}


def variants(world_sizes: list[int], precisions: list[str]) -> list[Variant]:
    rows: list[Variant] = []
    if 1 in world_sizes and "fp32" in precisions:
        rows += [
            Variant("plain", "plain PyTorch: the baseline", engine="plain"),
            Variant(SHIPPED, "configs/deepspeed/zero2.json as shipped (overlap, contiguous, 5e7 buckets)"),
            Variant(REPEAT, "the shipped config again: the noise floor of a saving", together=False),
            Variant("overlap_comm=false", "one IPG bucket buffer per step instead of two (no streams on a CPU)",
                    zero={"overlap_comm": False}),
            Variant("contiguous_gradients=false", "no copy into the IPG bucket; flatten at reduce time",
                    zero={"contiguous_gradients": False}),
            Variant("reduce_bucket_size=5e5", "bucket allocated each step: 2 MB instead of 200 MB (model: 0.23M)",
                    zero={"reduce_bucket_size": 500_000}),
            Variant("reduce_scatter=false", "one all-reduce of the bucket, no per-parameter rank/offset loop",
                    zero={"reduce_scatter": False}),
            Variant("use_multi_rank_bucket_allreduce=false", "reduce per destination rank instead of all-reduce",
                    zero={"use_multi_rank_bucket_allreduce": False}),
            Variant("gradient_clipping=0", "no clip multiply (the norm is still computed)", config=NO_CLIP,
                    changes_training=True),
            Variant("clip=0 + compute_grad_norm=false", "no per-tensor grad norm at all (needs clipping off)",
                    zero={"compute_grad_norm": False}, config=NO_CLIP, changes_training=True),
            Variant("timers.throughput.enabled=false", "no throughput timer (it synchronizes the device twice a step)",
                    config={"timers": {"throughput": {"enabled": False}}}),
            Variant("communication_data_type=bf16", "fp32 grads cast to bf16 for the reduction and back",
                    config={"communication_data_type": "bf16"}, changes_training=True),
            Variant("prescale_gradients=true (+reduce_scatter=false)", "divide before the all-reduce, not after",
                    zero={"reduce_scatter": False}, config={"prescale_gradients": True}),
            Variant("offload_optimizer=cpu (+zero_force_ds_cpu_optimizer=false)",
                    "fp32 master and step on the host: copies per parameter",
                    zero={"offload_optimizer": {"device": "cpu", "pin_memory": False}},
                    config={"zero_force_ds_cpu_optimizer": False}),
            Variant("env PYTORCH_NVML_BASED_CUDA_CHECK=0", "deepspeed sets it to 1: torch's Adam then dlopens NVML "
                    "on every step() call, ZeRO calls step() once per group", env=NVML_ENV),
            Variant("best", "contiguous_gradients=false + overlap_comm=false", zero=BEST_ZERO),
            # expected to fail: started once, the error is the result
            Variant("wall_clock_breakdown=true", "engine + optimizer timers; the backward timers start in a hook "
                    "DeepSpeed puts on output tensors, and our model returns a dataclass",
                    config={"wall_clock_breakdown": True}, probe=True),
            Variant("elasticity block", "removed in 0.19.x", config={"elasticity": {
                "enabled": True, "max_train_batch_size": 64, "micro_batch_sizes": [16]}}, probe=True),
            Variant("prescale_gradients=true", "with reduce_scatter on (the default)",
                    config={"prescale_gradients": True}, probe=True),
            Variant("gradient_predivide_factor=2", "with reduce_scatter on (the default)",
                    config={"gradient_predivide_factor": 2.0}, probe=True),
            Variant("compute_grad_norm=false", "with gradient_clipping 1.0 (ours)",
                    zero={"compute_grad_norm": False}, probe=True),
            Variant("offload_optimizer=cpu", "client optimizer, zero_force_ds_cpu_optimizer left true",
                    zero={"offload_optimizer": {"device": "cpu", "pin_memory": False}}, probe=True),
        ]
    if 1 in world_sizes and "bf16" in precisions:
        bf16 = dict(precision="bf16")
        rows += [
            Variant("plain", "plain PyTorch, autocast bf16 over fp32 weights", engine="plain", **bf16),
            Variant(SHIPPED, "zero2.json, bf16 weights and grads, fp32 master", **bf16),
            Variant("bf16.check_grad_overflow=false", "no per-tensor inf/nan scan and its all-reduce + .item()",
                    config=BEST_BF16, **bf16),
            Variant("best", "contiguous_gradients=false + overlap_comm=false + bf16.check_grad_overflow=false",
                    zero=BEST_ZERO, config=BEST_BF16, **bf16),
        ]
    if 2 in world_sizes and "fp32" in precisions:
        ws2 = dict(world_size=2)
        rows += [
            Variant("plain", "plain PyTorch with DDP", engine="plain", **ws2),
            Variant(SHIPPED, "configs/deepspeed/zero2.json as shipped", **ws2),
            Variant("overlap_comm=false", "one IPG bucket buffer per step instead of two",
                    zero={"overlap_comm": False}, **ws2),
            Variant("contiguous_gradients=false", "flatten, all-reduce, unflatten at the end of backward",
                    zero={"contiguous_gradients": False}, **ws2),
            Variant("reduce_scatter=false", "one in-place all-reduce of the bucket, no slice/flatten/copy-back",
                    zero={"reduce_scatter": False}, **ws2),
            Variant("use_multi_rank_bucket_allreduce=false", "one reduce per destination rank",
                    zero={"use_multi_rank_bucket_allreduce": False}, **ws2),
            Variant("round_robin_gradients=true", "parameters reordered so partitions alternate ranks",
                    zero={"round_robin_gradients": True}, **ws2),
            Variant("best", "contiguous_gradients=false + overlap_comm=false", zero=BEST_ZERO, **ws2),
        ]
    return rows


# ---------------------------------------------------------------------------- worker (one rank)

def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _run_config(settings: Settings, variant: Variant):
    from pixelbert_dist.config import load_config
    mb = settings.micro_batch
    cfg = load_config(REPO / settings.config, [
        *OVERRIDES, f"--train.precision={variant.precision}", f"--train.micro_batch_size={mb}",
        f"--train.global_batch_size={mb * variant.world_size}"])
    cfg.deepspeed.config = str(REPO / cfg.deepspeed.config)
    return cfg


def deepspeed_dict(settings: Settings, variant: Variant) -> dict:
    """The dict our engine builds from the shipped JSON, with the variant's changes on top."""
    from pixelbert_dist.engine import deepspeed_config
    ds = deepspeed_config(_run_config(settings, variant), variant.world_size)
    ds = _merge(ds, {"zero_optimization": variant.zero}) if variant.zero else ds
    return _merge(ds, variant.config)


def _plain_step(model, optimizer, scheduler, precision: str, world: int, clip: float):
    import torch
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def forward(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return wrapped(batch)

    def step() -> None:
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return forward, lambda loss: loss.backward(), step


PHASES = ("step", "forward", "backward", "optimizer")


def _build(settings: Settings, variant: Variant):
    """The model, optimizer and schedule as training builds them; (forward, backward, step, DeepSpeed dict)."""
    import torch
    import torch.distributed as dist
    from pixelbert_dist.model import PixelBert
    from pixelbert_dist.optim import build_lr_schedule, build_optimizer
    cfg = _run_config(settings, variant)
    torch.manual_seed(cfg.train.seed)
    model = PixelBert(cfg.model).train()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_schedule(optimizer, cfg.optim, steps_per_epoch=1000)
    if variant.engine == "plain":
        return (*_plain_step(model, optimizer, scheduler, variant.precision, variant.world_size,
                             cfg.train.grad_clip), None)
    import deepspeed
    from pixelbert_dist.engine import build_engine
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps our group
    ds = deepspeed_dict(settings, variant)
    engine = build_engine(model, optimizer, scheduler, ds)
    return engine, engine.backward, engine.step, ds


def _batches(settings: Settings) -> list:
    from pixelbert_dist.flops import synthetic_batch
    return [synthetic_batch(1000, settings.micro_batch, tuple(settings.image_size), settings.text_len, seed=s)
            for s in range(2)]


def _timed_step(forward, backward, step, batch, phases: dict[str, list[float]] | None) -> float:
    """One training step; appends its phase times (ms) when `phases` is given; returns the loss."""
    t0 = time.perf_counter()
    out = forward(batch)
    t1 = time.perf_counter()
    backward(out.loss)
    t2 = time.perf_counter()
    step()
    t3 = time.perf_counter()
    if phases is not None:
        for name, seconds in zip(PHASES, (t3 - t0, t1 - t0, t2 - t1, t3 - t2)):
            phases[name].append(1000 * seconds)
    return float(out.loss.detach())


def _final_loss(forward, batch) -> float:
    import torch
    with torch.no_grad():  # the loss after the timed steps, on the first batch, weights as they ended
        return float(forward(batch).loss.detach())


def _measure(settings: Settings, variant: Variant) -> dict:
    forward, backward, step, ds = _build(settings, variant)
    batches = _batches(settings)
    phases: dict[str, list[float]] = {name: [] for name in PHASES}
    losses = [_timed_step(forward, backward, step, batches[i % 2], phases if i >= settings.warmup else None)
              for i in range(settings.warmup + settings.steps)]
    return {"ms": {k: statistics.median(v) for k, v in phases.items()}, "step_times_ms": phases["step"],
            "final_loss": _final_loss(forward, batches[0]), "losses": losses, "deepspeed": ds}


def _side_by_side(settings: Settings, variants: list[Variant], cycles: int) -> dict:
    """Every variant built in this one process, their steps interleaved (order reversed every cycle).

    Not fresh processes (DeepSpeed's global state is shared), but every variant sees the same
    memory and the same moment of a shared machine: small differences show that rounds of
    fresh processes cannot resolve.
    """
    built = {v.name: _build(settings, v)[:3] for v in variants}
    batches = _batches(settings)
    phases = {name: {p: [] for p in PHASES} for name in built}
    for i in range(settings.warmup + cycles):
        for name in (list(built) if i % 2 == 0 else list(built)[::-1]):
            _timed_step(*built[name], batches[i % 2], phases[name] if i >= settings.warmup else None)
    return {"ms": {name: {p: statistics.median(t) for p, t in ph.items()} for name, ph in phases.items()},
            "final_loss": {name: _final_loss(steps[0], batches[0]) for name, steps in built.items()},
            "cycles": cycles}


def worker(settings: dict, variant: dict, rank: int, port: int, result: str, log: str,
           together: list[dict] | None = None) -> None:
    """One rank of one run, in a process forked from the preloaded server (`together`: the side-by-side check)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    settings_, variant_ = Settings(**settings), Variant(**variant)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(variant_.world_size),
                       "OMP_NUM_THREADS": str(settings_.threads), **variant_.env})
    import torch
    import torch.distributed as dist
    from pixelbert_dist.distributed import finish
    torch.set_num_threads(settings_.threads)
    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=variant_.world_size,
                                timeout=datetime.timedelta(seconds=RUN_TIMEOUT_S))
        out = (_side_by_side(settings_, [Variant(**v) for v in together], 2 * settings_.steps) if together
               else _measure(settings_, variant_))
    except Exception:  # a refused option is a result too
        out, code = {"error": traceback.format_exc()[-3000:]}, 1
        print(out["error"], flush=True)
    if rank == 0:
        Path(result).write_text(json.dumps(out))
    if code:
        sys.stdout.flush()
        os._exit(code)  # a peer may never reach the barrier in finish()
    finish(0)


# ---------------------------------------------------------------------------- launching

def launch(ctx, settings: Settings, variant: Variant, work: Path, together: list[Variant] | None = None) -> dict:
    """Run `variant` once in fresh processes (one per rank); rank 0's result. `together`: side by side instead."""
    stem = work / f"{variant.group}-{''.join(c if c.isalnum() else '_' for c in variant.name)}-{time.monotonic_ns()}"
    from pixelbert_dist.distributed import free_port

    result = stem.with_suffix(".result.json")
    port = free_port()
    side = [dataclasses.asdict(v) for v in together] if together else None
    procs = [ctx.Process(target=worker, args=(dataclasses.asdict(settings), dataclasses.asdict(variant), rank, port,
                                               str(result), f"{stem}.rank{rank}.log", side))
             for rank in range(variant.world_size)]
    began = time.perf_counter()
    for proc in procs:
        proc.start()
    deadline = time.time() + RUN_TIMEOUT_S * (2 if together else 1)
    for proc in procs:
        proc.join(timeout=max(1.0, deadline - time.time()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    wall = time.perf_counter() - began
    if result.exists():
        return {**json.loads(result.read_text()), "wall_s": wall}
    tail = Path(f"{stem}.rank0.log").read_text()[-2000:] if Path(f"{stem}.rank0.log").exists() else ""
    return {"error": f"no result (exit codes {[p.exitcode for p in procs]}); log tail:\n{tail}", "wall_s": wall}


# ---------------------------------------------------------------------------- summary

def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(rows: list[Variant], runs: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """Per row: medians over rounds, and same-round ratios/differences vs plain and vs zero2."""
    out = []
    noise = {}  # per group: the shipped config's "saving" over itself (the repeat row), in ms
    for v in rows:
        again, ref = runs.get((v.group, REPEAT), []), runs.get((v.group, SHIPPED), [])
        diffs = [b["ms"]["step"] - a["ms"]["step"] for a, b in zip(again, ref) if "ms" in a and "ms" in b]
        noise[v.group] = abs(statistics.median(diffs)) if diffs else 0.0
    for v in rows:
        mine = runs[(v.group, v.name)]
        row: dict = {"group": v.group, "variant": v.name, "what": v.what, "changes_training": v.changes_training,
                     "probe": v.probe, "rounds": len(mine)}
        errors = [r["error"] for r in mine if "error" in r]
        if errors:
            row["error"] = errors[0]
            row["error_line"] = errors[0].strip().splitlines()[-1][:200]
        good = [(i, r) for i, r in enumerate(mine) if "error" not in r]
        if not good:
            out.append(row)
            continue
        row["step_ms"] = _median([r["ms"]["step"] for _, r in good])
        row["per_round_ms"] = [r["ms"]["step"] if "error" not in r else None for r in mine]
        mid = sorted(good, key=lambda x: x[1]["ms"]["step"])[len(good) // 2][1]  # the median round
        for phase in ("forward", "backward", "optimizer"):
            row[f"{phase}_ms"] = mid["ms"][phase]
        row["final_loss"] = _median([r["final_loss"] for _, r in good])
        for ref, key in (("plain", "vs_plain"), (SHIPPED, "vs_zero2")):
            theirs = runs.get((v.group, ref), [])
            pairs = [(r["ms"]["step"], theirs[i]["ms"]["step"]) for i, r in good
                     if i < len(theirs) and "error" not in theirs[i]]
            if not pairs or v.name == ref:
                continue
            row[key] = _median([a / b for a, b in pairs])
            diffs = [a - b for a, b in pairs]
            if ref == "plain":
                row["added_ms"] = _median(diffs)
            else:
                row["saved_ms"] = -_median(diffs)
                row["saved_ms_rounds"] = [-d for d in diffs]
                steady = all(d < 0 for d in diffs) or all(d > 0 for d in diffs)
                floor = max(EFFECT_MIN_MS, noise[v.group] if v.name != REPEAT else 0.0)
                row["effect"] = ("no clear effect" if not steady or abs(row["saved_ms"]) < floor
                                 else "faster" if row["saved_ms"] > 0 else "slower")
            if ref == SHIPPED:
                losses = [(r["final_loss"], theirs[i]["final_loss"]) for i, r in good
                          if i < len(theirs) and "error" not in theirs[i]]
                row["loss_delta"] = max((a - b for a, b in losses), key=abs)
                row["trains_same"] = all(abs(a - b) <= LOSS_RTOL * abs(b) for a, b in losses)
        out.append(row)
    return out


COLUMNS = ["variant", "step ms", "vs plain", "added ms", "vs zero2", "saved ms", "saved ms per round", "effect",
           "fwd ms", "bwd ms", "opt ms", "final loss", "Δloss vs zero2", "trains same"]


def _table_rows(summary: list[dict], group: str) -> list[dict]:
    rows = []
    for s in summary:
        if s["group"] != group or s["probe"]:
            continue
        if "step_ms" not in s:
            rows.append({"variant": s["variant"], "step ms": f"error: {s.get('error_line', '?')}"})
            continue
        same = s.get("trains_same")
        rows.append({
            "variant": s["variant"], "step ms": s["step_ms"],
            "vs plain": f"{s['vs_plain']:.3f}" if "vs_plain" in s else "",
            "added ms": s.get("added_ms", ""),
            "vs zero2": f"{s['vs_zero2']:.3f}" if "vs_zero2" in s else "",
            "saved ms": s.get("saved_ms", ""),
            "saved ms per round": " / ".join(f"{d:+.1f}" for d in s.get("saved_ms_rounds", [])),
            "effect": s.get("effect", ""),
            "fwd ms": s["forward_ms"], "bwd ms": s["backward_ms"], "opt ms": s["optimizer_ms"],
            "final loss": f"{s['final_loss']:.4f}",
            "Δloss vs zero2": f"{s['loss_delta']:+.5f}" if "loss_delta" in s else "",
            "trains same": ("" if same is None else "yes" if same else
                            "no (by design)" if s["changes_training"] else "**no**"),
        })
    return rows


GROUP_TITLES = {"fp32-ws1": "fp32, 1 rank", "bf16-ws1": "bf16, 1 rank", "fp32-ws2": "fp32, 2 ranks (gloo)"}
SIDE_COLUMNS = ["variant", "step ms", "Δ step vs zero2", "Δ fwd", "Δ bwd", "Δ opt", "final loss"]


def side_by_side_rows(result: dict) -> list[dict]:
    """One row per variant of a side-by-side run: medians and differences from zero2 (negative = faster)."""
    if "error" in result:
        return [{"variant": "error", "step ms": result["error"].strip().splitlines()[-1][:200]}]
    ms, ref = result["ms"], result["ms"].get(SHIPPED)
    rows = []
    for name, m in ms.items():
        row = {"variant": name, "step ms": m["step"], "final loss": f"{result['final_loss'][name]:.4f}"}
        if ref is not None:
            for phase, col in zip(PHASES, SIDE_COLUMNS[2:6]):
                row[col] = f"{m[phase] - ref[phase]:+.2f}"
        rows.append(row)
    return rows


def report(summary: list[dict], rows: list[Variant], settings: Settings, rounds: int, elapsed: float,
           side: dict[str, dict]) -> str:
    sections: list[str] = []
    groups = list(dict.fromkeys(v.group for v in rows if not v.probe))
    for group in groups:
        sections += [f"## {GROUP_TITLES.get(group, group)}", "", markdown_table(_table_rows(summary, group), COLUMNS),
                     ""]
        what = [f"- **{v.name}**: {v.what}" for v in rows if v.group == group and not v.probe]
        sections += ["<details><summary>What each row changes</summary>", "", *what, "", "</details>", ""]
    for group, result in side.items():
        sections += [f"## Side by side in one process: {GROUP_TITLES.get(group, group)}", "",
                     f"Every row of the group (but the repeat and env rows) built in one process, their steps "
                     f"interleaved for {result.get('cycles', '?')} timed cycles (order reversed every cycle); "
                     "medians, and differences from zero2 in ms (negative = faster than the shipped config).", "",
                     markdown_table(side_by_side_rows(result), SIDE_COLUMNS), ""]
    probes = [s for s in summary if s["probe"]]
    if probes:
        sections += ["## Options that fail (started once, 1 rank, fp32)", "",
                     markdown_table([{"option": s["variant"], "setting": s["what"],
                                      "result": (f"refused: `{s['error_line']}`" if "error" in s
                                                 else "accepted (not refused)")} for s in probes],
                                    ["option", "setting", "result"]), ""]
    notes = [
        f"Config {TINY} (+ {' '.join(OVERRIDES)}), micro batch {settings.micro_batch} per rank, images "
        f"{settings.image_size[0]}x{settings.image_size[1]}, text {settings.text_len} tokens, synthetic batches "
        "(two, alternating); one optimizer step per micro-batch; clipping at 1.0 unless the row turns it off.",
        f"{settings.warmup} untimed + {settings.steps} timed steps per run; {rounds} round(s), the groups rotated "
        "and the rows of a group in a new seeded shuffle each round (a plain rotation keeps neighbours together; "
        "in a rotated run the rows just after plain were slow in every round); each run in fresh processes forked "
        f"from a server that imported torch/deepspeed/the model once; {settings.threads} thread(s) per rank "
        "(OMP_NUM_THREADS); 2 ranks: gloo on 127.0.0.1.",
        "step ms = median over rounds of each run's median step (forward + backward + step); fwd/bwd/opt = the "
        "median round's phase medians (ZeRO-2 reduces in backward hooks: that is in bwd; the norm, the update "
        "and the copy to the model's weights are in opt).",
        "vs plain / vs zero2 = median over rounds of same-round ratios; added ms = median of same-round "
        "(row - plain); saved ms = median of same-round (zero2 - row), positive = faster than the shipped config; "
        "effect: faster/slower when every round agrees in sign and the median exceeds both "
        f"{EFFECT_MIN_MS} ms and the repeat row's own |saved ms| (the noise floor), else no clear effect.",
        f"trains same: the loss after the timed steps (first batch, no grad) within {100 * LOSS_RTOL:.0f}% of the "
        "shipped config's in every round; rows marked 'by design' change training (no clipping, bf16 reduction).",
        "The machine was shared: another engineer's builds and tests may have used the cores during the run. "
        "Same-round ratios and differences cancel most of that; single rounds (saved ms per round) show the spread.",
        "Side by side: one process holds every engine (shared DeepSpeed state, not the fresh processes of the "
        "rounds), but each variant sees the same memory and the same moments of the machine, which resolves "
        "differences of a fraction of a ms that the rounds' process-to-process spread hides.",
        f"Wall time of the whole benchmark: {elapsed / 60:.1f} min.",
    ]
    sections += ["## How it was measured", "", *[f"- {n}" for n in notes]]
    return "\n".join(sections)


# ---------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="repeats of every row (default 4; --quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 5; --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 20; --quick 3)")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--world-sizes", default="1,2", help="1, 2 or 1,2 (default 1,2)")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16 or both (default both)")
    parser.add_argument("--only", default="", help="comma list of groups (fp32-ws1) or row names to run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1+3 steps")
    args = parser.parse_args(argv)
    quick = args.quick
    rounds = args.rounds or (1 if quick else 4)
    from pixelbert_dist.config import load_config
    cfg = load_config(REPO / TINY, OVERRIDES)
    settings = Settings(config=TINY, micro_batch=args.micro_batch,
                        image_size=[cfg.data.image_short_side, cfg.data.image_long_side],
                        text_len=cfg.data.max_text_len,
                        warmup=args.warmup if args.warmup is not None else 1 if quick else 5,
                        steps=args.steps or (3 if quick else 20), threads=args.threads)
    rows = variants([int(w) for w in args.world_sizes.split(",")], args.precisions.split(","))
    if args.only:
        wanted = set(args.only.split(","))
        rows = [v for v in rows if v.group in wanted or v.name in wanted or v.name in ("plain", SHIPPED)]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the server imports deepspeed
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    runs: dict[tuple[str, str], list[dict]] = {(v.group, v.name): [] for v in rows}
    groups = list(dict.fromkeys(v.group for v in rows))
    work = Path(tempfile.mkdtemp(prefix="bench-zero-options-"))
    began = time.perf_counter()
    for r in range(rounds):
        for group in groups[r % len(groups):] + groups[:r % len(groups)]:  # groups rotated
            # Rows shuffled anew each round (seeded). A rotation keeps neighbours together, and in a
            # rotated run the rows right after plain were the slow ones in every round.
            members = [v for v in rows if v.group == group and not v.probe]
            random.Random(r).shuffle(members)
            members += [v for v in rows if v.group == group and v.probe and r == 0]
            for v in members:
                result = launch(ctx, settings, v, work)
                runs[(v.group, v.name)].append(result)
                status = (f"{result['ms']['step']:.1f} ms/step, loss {result['final_loss']:.4f}" if "ms" in result
                          else "error: " + result["error"].strip().splitlines()[-1][:160])
                print(f"round {r + 1}/{rounds} {group:9s} {v.name:55s} {status}  ({result['wall_s']:.1f} s)",
                      flush=True)
    side: dict[str, dict] = {}
    for group in ("fp32-ws1", "bf16-ws1"):
        members = [v for v in rows if v.group == group and not v.probe and v.together and not v.env]
        if len(members) > 1:
            side[group] = launch(ctx, settings, members[0], work, together=members)
            print(f"side by side {group}: {'done' if 'ms' in side[group] else side[group]['error'][-300:]} "
                  f"({side[group]['wall_s']:.1f} s)", flush=True)
    elapsed = time.perf_counter() - began
    summary = summarize(rows, runs)
    body = report(summary, rows, settings, rounds, elapsed, side)
    shipped = next((r[0]["deepspeed"] for (g, n), r in runs.items() if n == SHIPPED and r and "deepspeed" in r[0]),
                   None)
    data = {"mode": "quick" if quick else "full", "summary": summary, "side_by_side": side,
            "runs": {f"{g}/{n}": [{k: v for k, v in x.items() if k != "deepspeed"} for x in rs]
                     for (g, n), rs in runs.items()},
            "config": {"settings": dataclasses.asdict(settings), "rounds": rounds, "overrides": OVERRIDES,
                       "shipped_deepspeed_dict": shipped,
                       "variants": [dataclasses.asdict(v) for v in rows], "log_folder": str(work)}}
    md = write_results("zero_options", "DeepSpeed ZeRO-2 options vs plain PyTorch: host-side cost per step",
                       body, data, out_dir=args.out)
    print(body)
    print(f"results: {md}  (worker logs: {work})")
    return 0 if all("step_ms" in s for s in summary if not s["probe"]) else 1


if __name__ == "__main__":
    sys.exit(main())
