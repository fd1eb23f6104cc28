"""Training-step levers side by side: today's step vs each lever alone vs all together.
(Over 300 lines on purpose: a benchmark is one script a person runs and reads; its rows,
report and plot stay together so a result file can be traced to one file.)

    .venv/bin/python benchmarks/bench_step.py                        # this CPU: R50 at 256x384 + BERT-base
    .venv/bin/python benchmarks/bench_step.py --quick --out /tmp/b   # smoke run (tests): tiny model, 1 round
    python3 benchmarks/bench_step.py --gpu --out DIR                 # one GPU: R50 at 800x1333, bf16
    python3 benchmarks/bench_step.py --gpu --rows today,all --more-micro-batches 32 --checkpoint-batches ""

Levers (issue 13), each a switch on the same model, batch, precision and optimizer:
  fold           frozen norms applied inside their convs (backbone.conv_norm); off: conv, then norm
  fused          torch's fused SGD/AdamW kernels in our optimizer; off: torch's defaults
  channels_last  NHWC activations in the CNN, and cudnn.benchmark on a GPU
  compile        torch.compile of the CNN trunk and of each transformer layer
  buckets        canvases padded to multiples of 128 px instead of 64 (data.pad_multiple): fewer
                 shapes to autotune/compile, more padded pixels; its token cost is also simulated
Rows: plain PyTorch with no lever ("today"), each lever alone, all levers; ZeRO-2 today and all
levers (the DeepSpeed engine at 1 rank); then activation checkpointing (none / transformer / cnn
/ all, with all levers) at several micro batches: pairs/s and peak memory.

Batches are what the loader makes: images resized by the run config's rule from a seeded mix of
aspect ratios, padded into one canvas with pixel masks (so the padding masks run). Each row runs
in a fresh process; rows are repeated in rounds with their order rotated, and a row's ratio vs
today is the median of same-round ratios, which cancels most of a shared machine's drift.
Each row is appended to <out>/step_<hardware>_<date>.rows.jsonl (and a line printed) the moment
it is measured, so a run cut off keeps them; at the end it writes <out>/step_<hardware>_<date>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, append_row, markdown_table, result_stem, timed_step, write_results  # noqa: E402

LEVERS = ("fold", "fused", "channels_last", "compile", "buckets")
# An assumed mix of photo shapes (w, h, share), COCO-like: mostly 4:3 and 3:2 landscapes, a
# quarter portraits, a few squares. It decides how much padding batches carry.
ASPECTS = [(640, 480, 0.45), (640, 427, 0.20), (480, 640, 0.20), (427, 640, 0.08), (640, 640, 0.07)]


@dataclass(frozen=True)
class Row:
    name: str
    levers: tuple[str, ...] = ()
    engine: str = "plain"            # "plain" or "zero2"
    micro_batch: int = 0             # 0: the settings' micro batch
    checkpointing: str = "none"      # train.activation_checkpointing


@dataclass
class Settings:
    """What every worker needs to build the same model, batches and step."""
    config: str
    overrides: list[str]
    image: tuple[int, int]           # short, long side of the resize rule
    precision: str
    micro_batch: int
    warmup: int
    steps: int
    device: str
    batches: int = 3                 # distinct batches cycled (distinct canvas shapes: recompiles are warm-up)


def row_config(settings: Settings, row: Row):
    from pixelbert_dist.config import load_config
    mb = row.micro_batch or settings.micro_batch
    cfg = load_config(REPO / settings.config, [
        *settings.overrides, f"--train.precision={settings.precision}", f"--train.micro_batch_size={mb}",
        f"--train.global_batch_size={mb}", f"--data.image_short_side={settings.image[0]}",
        f"--data.image_long_side={settings.image[1]}", f"--train.activation_checkpointing={row.checkpointing}",
        f"--train.compile={'compile' in row.levers}", f"--data.pad_multiple={128 if 'buckets' in row.levers else 64}"])
    cfg.deepspeed.config = str(REPO / cfg.deepspeed.config)
    return cfg


def image_sizes(count: int, short: int, long: int, seed: int) -> list[tuple[int, int]]:
    """(h, w) of `count` images of the ASPECTS mix after the paper's resize rule."""
    from pixelbert_dist.data.batch import resized_size
    rng = random.Random(seed)
    shapes = rng.choices([(h, w) for w, h, _ in ASPECTS], weights=[p for *_, p in ASPECTS], k=count)
    return [resized_size(h, w, short, long) for h, w in shapes]


def make_batches(settings: Settings, cfg, seed: int = 0):
    import torch
    from pixelbert_dist.model import IGNORE_INDEX, PretrainBatch, pad_images
    gen = torch.Generator().manual_seed(seed)
    mb, text = cfg.train.micro_batch_size, cfg.data.max_text_len
    out = []
    for b in range(settings.batches):
        sizes = image_sizes(mb, *settings.image, seed=seed + b)
        images, mask = pad_images([torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
                                   for h, w in sizes], cfg.data.pad_multiple)
        ids = torch.randint(5, cfg.model.vocab_size, (mb, text), generator=gen)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, 1:-1:7] = ids[:, 1:-1:7]  # ~15% of the tokens: MLM's rate
        out.append(PretrainBatch(images, mask, ids, torch.ones_like(ids), labels, torch.arange(mb) % 2))
    return out


# ---------------------------------------------------------------------------- worker (one row)

def run_row(settings: Settings, row: Row) -> dict:
    import torch
    import torch.distributed as dist
    from pixelbert_dist.flops import step_flops
    from pixelbert_dist.metrics import StepTimer, device_peak, synchronize
    from pixelbert_dist.model import PixelBert, prepare_for_training
    from pixelbert_dist.optim import build_lr_schedule, build_optimizer

    device = torch.device(settings.device)
    cfg = row_config(settings, row)
    torch.manual_seed(cfg.train.seed)
    model = PixelBert(cfg.model).train()
    levers = set(row.levers)
    model.visual.cnn.fold_norms = "fold" in levers
    prices = step_flops(model, settings.image, cfg.data.max_text_len, device)  # before compile and checkpointing
    prepare_for_training(model, cfg.train, device)
    model.visual.cnn.channels_last = "channels_last" in levers  # prepare_for_training turns it on for a GPU
    torch.backends.cudnn.benchmark = "channels_last" in levers
    optimizer = build_optimizer(model, cfg.optim, fused="fused" in levers)
    scheduler = build_lr_schedule(optimizer, cfg.optim, steps_per_epoch=1000)
    bf16 = cfg.train.precision == "bf16"
    if row.engine == "zero2":
        import deepspeed
        from pixelbert_dist.engine import build_engine, deepspeed_config
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        cfg.deepspeed.zero_stage = 2
        ds = deepspeed_config(cfg, 1)
        if "fold" not in levers and bf16:
            # unfolded, a frozen norm's fp32 statistics would hand its conv fp32 activations: today's
            # engine cast them to bf16 (the trainer folds, and keeps them fp32)
            ds["data_types"]["keep_in_fp32_modules"] = []
        engine = build_engine(model, optimizer, scheduler, ds)
        forward, backward, step = engine, engine.backward, engine.step
    else:
        model.to(device)

        def forward(batch):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return model(batch)

        def step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        backward = lambda loss: loss.backward()  # noqa: E731
    batches = [b.to(device) for b in make_batches(settings, cfg)]
    # MFU's numerator: what each batch trained, its valid pixels and tokens (padding is not useful work)
    flops = statistics.mean(float(prices(b)) for b in batches) / cfg.train.micro_batch_size
    peak = device_peak(settings.precision, device)
    timer = StepTimer(flops, peak.flops, 1, device=device)  # host timing: no synchronize between phases
    losses = []
    # Warm-up covers every batch once: each new canvas shape is a (re)compile and a cuDNN autotune.
    warmup = max(settings.warmup, settings.batches)
    began = time.perf_counter()
    for i in range(warmup + settings.steps):
        if i == warmup:
            synchronize(device)
            timer.reset()  # also the memory peak: the timed steps', not the FLOP probe's or a compile's
            timed_from = time.perf_counter()
            warmup_s = timed_from - began
        out = timed_step(timer, forward, backward, step, batches[i % len(batches)])
        losses.append(out.loss.detach())  # read at the end: a .item() per step would stall a GPU's queue
    synchronize(device)
    step_s = (time.perf_counter() - timed_from) / settings.steps  # the device's rate, queue drained
    canvas = statistics.mean(b.images.shape[-2] * b.images.shape[-1] for b in batches)
    valid = statistics.mean(float(b.pixel_mask.float().mean()) for b in batches)
    return {**dataclasses.asdict(row), "micro_batch": cfg.train.micro_batch_size, **timer.summary(reset=False),
            "step_s_round": step_s, "warmup_s": warmup_s, "losses": [float(v) for v in losses], "device": peak.device,
            "peak_tflops": peak.flops / 1e12, "gflops_per_sample": flops / 1e9, "canvas_pixels": canvas,
            "valid_fraction": valid, "shapes": sorted({tuple(b.images.shape[-2:]) for b in batches})}


def worker(spec_path: Path) -> None:
    import torch
    import torch.distributed as dist
    from pixelbert_dist.distributed import finish
    spec = json.loads(spec_path.read_text())
    settings = Settings(**{**spec["settings"], "image": tuple(spec["settings"]["image"])})
    row = Row(**{**spec["row"], "levers": tuple(spec["row"]["levers"])})
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if settings.device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if settings.device == "cuda" else "gloo", rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=5))
    try:
        result = run_row(settings, row)
    except Exception as err:  # an OOM at a large micro batch is a result too
        import traceback
        result = {**dataclasses.asdict(row), "error": f"{type(err).__name__}: {str(err)[:300]}",
                  "traceback": traceback.format_exc()[-3000:]}
    Path(spec["result"]).write_text(json.dumps(result))
    finish(0)


def launch(settings: Settings, row: Row, work: Path, timeout_s: float) -> dict:
    from pixelbert_dist.distributed import free_port
    spec, result = work / f"{row.name}-{time.monotonic_ns()}.json", work / f"{row.name}-{time.monotonic_ns()}.out.json"
    spec.write_text(json.dumps({"settings": dataclasses.asdict(settings), "row": dataclasses.asdict(row),
                                "result": str(result)}))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(os.cpu_count() if settings.device == "cpu" else 4),
           "DS_ACCELERATOR": "cuda" if settings.device == "cuda" else "cpu", "TOKENIZERS_PARALLELISM": "false"}
    began = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", str(spec)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        tail = (done.stdout + done.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        return {**dataclasses.asdict(row), "error": f"timed out after {timeout_s:.0f} s"}
    print(f"  {row.name}: {time.perf_counter() - began:.0f} s", flush=True)
    if not result.exists():
        return {**dataclasses.asdict(row), "error": f"worker failed (rc {done.returncode}): {tail}"}
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------- padding cost

def padding_cost(short: int, long: int, micro_batch: int, batches: int = 2000, seed: int = 0) -> list[dict]:
    """Canvas pixels per valid pixel, and distinct canvas shapes, by pad multiple (simulated, no model)."""
    rows = []
    sizes = image_sizes(micro_batch * batches, short, long, seed)
    for label, multiple, grouped in [("64 (one token cell)", 64, False), ("128 (buckets)", 128, False),
                                     ("128, batches of one orientation", 128, True)]:
        pool = sorted(sizes, key=lambda s: s[0] > s[1]) if grouped else sizes  # grouped: a sampler's view
        canvases, valid = [], 0
        for b in range(batches):
            chunk = pool[b * micro_batch:(b + 1) * micro_batch]
            h = -(-max(s[0] for s in chunk) // multiple) * multiple
            w = -(-max(s[1] for s in chunk) // multiple) * multiple
            canvases.append((h, w))
            valid += sum(s[0] * s[1] for s in chunk)
        pixels = sum(h * w for h, w in canvases) * micro_batch
        rows.append({"pad multiple": label, "canvas / valid pixels": pixels / valid,
                     "padded share of tokens %": 100 * (1 - valid / pixels),
                     "distinct canvas shapes": len(set(canvases))})
    return rows


# ---------------------------------------------------------------------------- rows and report

def lever_rows(micro_batch: int, checkpoint_batches: list[int], more_batches: list[int] = ()) -> list[Row]:
    """Every lever row at the settings' micro batch; today and all again at each of `more_batches`
    (named today-mb32, all-mb32: each compared with the today row of its own micro batch)."""
    rows = [Row("today"), *(Row(f"+{lever}", (lever,)) for lever in LEVERS), Row("all", LEVERS),
            Row("zero2-today", engine="zero2"), Row("zero2-all", LEVERS, engine="zero2")]
    for mb in more_batches:
        rows += [Row(f"today-mb{mb}", micro_batch=mb), Row(f"all-mb{mb}", LEVERS, micro_batch=mb)]
    # without compile: a compile per row would cost more than the row, and it does not move memory much
    uncompiled = tuple(lever for lever in LEVERS if lever != "compile")
    for mb in checkpoint_batches:
        rows += [Row(f"ckpt-{c}-mb{mb}", uncompiled, micro_batch=mb, checkpointing=c)
                 for c in ("none", "transformer", "cnn", "all")]
    return rows


def aggregate(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, rounds in runs.items():
        ok = [r for r in rounds if "error" not in r]
        if not ok:
            rows.append({**rounds[0], "name": name})
            continue
        ranked = sorted(ok, key=lambda r: r["step_s_round"])
        row = dict(ranked[(len(ranked) - 1) // 2])
        row["step_s"] = statistics.median(r["step_s_round"] for r in ok)
        row["pairs_per_s"] = row["micro_batch"] / row["step_s"]
        row["mfu"] = row["gflops_per_sample"] * 1e9 * row["pairs_per_s"] / (row["peak_tflops"] * 1e12)
        base = _today_of(name)
        today = [r for r in runs.get(base, []) if "error" not in r]
        if today and not name.startswith("ckpt"):
            paired = [(b["step_s_round"], r["step_s_round"]) for r, b in zip(rounds, runs[base])
                      if "error" not in r and "error" not in b]
            row["speedup_vs_today"] = statistics.median(b / r for b, r in paired) if paired else None
            row["loss_vs_today"] = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], today[0]["losses"]))
        rows.append(row)
    by = {r["name"]: r for r in rows}
    for z in ("zero2-today", "zero2-all"):
        plain = by.get(z.removeprefix("zero2-"))
        if z in by and "error" not in by[z] and plain and "error" not in plain:
            pairs = [(r["step_s_round"], p["step_s_round"]) for r, p in zip(runs[z], runs[plain["name"]])
                     if "error" not in r and "error" not in p]
            by[z]["zero2_vs_plain"] = statistics.median(r / p for r, p in pairs)
    return rows


def pick_rows(rows: list[Row], names: list[str]) -> list[Row]:
    """`names` in their order, each after the today row it is compared with; the checkpointing rows last."""
    by_name = {r.name: r for r in rows}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; rows are {', '.join(by_name)}")
    order = dict.fromkeys(["today", *(x for n in names for x in (_today_of(n), n))])
    return [by_name[n] for n in order] + [r for r in rows if r.name.startswith("ckpt")]


def row_line(result: dict) -> str:
    """One measured row in a line of the log."""
    if "error" in result:
        return f"error: {result['error'].strip().splitlines()[-1][:200]}"
    pairs_per_s = result["micro_batch"] / result["step_s_round"]
    mfu = result["gflops_per_sample"] * 1e9 * pairs_per_s / (result["peak_tflops"] * 1e12)
    return (f"{result['step_s_round']:.3f} s/step, {pairs_per_s:.1f} pairs/s, MFU {100 * mfu:.2f}%, "
            f"peak {result.get('memory_peak_gib', float('nan')):.2f} GiB, warm-up {result['warmup_s']:.0f} s")


def _today_of(name: str) -> str:
    """The row a lever row is compared with: today at the same micro batch."""
    return f"today-{name.rpartition('-')[2]}" if name.rpartition("-")[2].startswith("mb") else "today"


def _fmt(value, digits=3):
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else value


def report(rows: list[dict], padding: list[dict], settings: Settings, rounds: int, elapsed: float) -> str:
    main = [r for r in rows if not r["name"].startswith("ckpt")]
    ckpt = [r for r in rows if r["name"].startswith("ckpt")]
    columns = ["row", "levers", "step_s", "speedup vs today", "pairs/s", "MFU %", "peak memory GiB",
               "warm-up s", "max loss diff vs today", "canvas px", "note"]

    def shown(r):
        if "error" in r:
            return {"row": r["name"], "levers": "+".join(r.get("levers", ())) or "-", "note": r["error"][:150]}
        return {"row": r["name"], "levers": "+".join(r["levers"]) or "-", "step_s": _fmt(r["step_s"]),
                "speedup vs today": _fmt(r.get("speedup_vs_today")), "pairs/s": _fmt(r["pairs_per_s"], 2),
                "MFU %": _fmt(100 * r["mfu"], 2), "peak memory GiB": _fmt(r.get("memory_peak_gib"), 2),
                "warm-up s": _fmt(r["warmup_s"], 1), "max loss diff vs today": _fmt(r.get("loss_vs_today"), 6),
                "canvas px": f"{r['canvas_pixels']:.0f}",
                "note": f"ZeRO-2 / plain {r['zero2_vs_plain']:.3f}" if "zero2_vs_plain" in r else ""}
    by = {r["name"]: r for r in rows}
    headline = []
    for name in ("+fold", "all", *(n for n in by if n.startswith("all-mb"))):
        r = by.get(name, {})
        if "speedup_vs_today" in r:
            headline.append(f"- {name}: **{r['speedup_vs_today']:.3f}x** today's step (median of same-round ratios)")
    for name in ("zero2-today", "zero2-all"):
        if "zero2_vs_plain" in by.get(name, {}):
            headline.append(f"- {name}: ZeRO-2 step / plain step **{by[name]['zero2_vs_plain']:.3f}**")
    parts = ["## Headline", "", *(headline or ["- nothing measured"]), "",
             "## Levers, same batches and precision", "", markdown_table([shown(r) for r in main], columns)]
    if ckpt:
        parts += ["", "## Activation checkpointing (all levers but compile): pairs/s and peak memory by micro batch", "",
                  markdown_table([shown(r) for r in ckpt], columns)]
    parts += ["", f"## Padding cost of buckets, simulated: {settings.image[0]}x{settings.image[1]} resize, "
              f"micro batch {settings.micro_batch}, 2,000 batches", "",
              markdown_table([{k: _fmt(v) for k, v in p.items()} for p in padding], list(padding[0])), "",
              "The loader batches pairs in stream order, so a batch mixes orientations; the last line is what "
              "a sampler that groups orientations would pad (not built).", "",
              "## How it was measured", "",
              f"- Config {settings.config} ({' '.join(settings.overrides)}), images resized to at most "
              f"{settings.image[0]}x{settings.image[1]} from the ASPECTS mix, precision {settings.precision}, "
              f"micro batch {settings.micro_batch}; {settings.batches} distinct batches cycled.",
              f"- {max(settings.warmup, settings.batches)} untimed steps (every batch once: compiles, autotuning) + "
              f"{settings.steps} timed steps a row, each row in a fresh process, {rounds} round(s) in rotated order; "
              "a round's step = timed wall time / steps, the device drained at both ends (no synchronize "
              "between steps, as in training); step_s = median over rounds.",
              "- speedup vs today = median over rounds of today's step / the row's step in the same round.",
              "- max loss diff vs today: the largest relative difference of any step's loss from today's first "
              "round (same images and seed; with buckets the canvases differ, which padding must not change).",
              "- MFU = FLOPs per pair of what the batches trained, their valid pixels and tokens "
              "(pixelbert_dist.flops.StepFlops) x pairs/s / the device's peak (pixelbert_dist.metrics). Peak memory "
              "over the timed steps: max_memory_allocated on a GPU, peak RSS on a CPU.",
              "- Rows named -mbN run at micro batch N and compare with today-mbN. Each row is appended to "
              "<stem>.rows.jsonl the moment it is measured.",
              f"- Wall time: {elapsed / 60:.1f} min."]
    return "\n".join(parts)


def plot(rows: list[dict]):
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    good = [r for r in rows if "error" not in r and not r["name"].startswith("ckpt")]

    def draw(path: Path) -> None:
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(good) + 2), 4))
        ax.bar(range(len(good)), [r["pairs_per_s"] for r in good])
        for i, r in enumerate(good):
            if r.get("speedup_vs_today"):
                ax.annotate(f"{r['speedup_vs_today']:.2f}x", (i, r["pairs_per_s"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(good)), [r["name"] for r in good], rotation=30, ha="right")
        ax.set_ylabel("pairs/s (median round)")
        ax.set_title("Training-step levers (label: speedup vs today's step, same round)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return draw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="one GPU: R50 at 800x1333, bf16, micro batch 8")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 round, few steps (tests)")
    parser.add_argument("--rounds", type=int, default=None, help="default 2 (CPU), 1 (GPU, quick)")
    parser.add_argument("--micro-batch", type=int, default=None, help="default 4 (CPU), 8 (GPU)")
    parser.add_argument("--precision", default=None, help="default bf16")
    parser.add_argument("--checkpoint-batches", default=None,
                        help="micro batches of the activation-checkpointing rows (default CPU 4,8; GPU 8,16,32,64)")
    parser.add_argument("--rows", default=None,
                        help="comma-separated lever rows to run, in this order (default: all; the today row each "
                             "one is compared with and the checkpointing rows always)")
    parser.add_argument("--more-micro-batches", default="",
                        help="further micro batches (comma-separated) for rows today-mbN and all-mbN")
    parser.add_argument("--batches", type=int, default=3,
                        help="distinct batches (canvas shapes) cycled; each new shape is a warm-up compile")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return 0
    overrides = ["--model.backbone_weights=none", "--model.text_weights=none"]  # no downloads; same FLOPs
    if args.quick:
        settings = Settings("configs/pretrain/tiny-cpu.yaml", overrides + [
            "--model.vocab_size=1000", "--model.train_backbone_norm=false", "--model.backbone_widths=[16,32,64,128]"],
            (128, 192), args.precision or "fp32", args.micro_batch or 4, 1, 3, "cpu")
        default_ckpt, rounds = "4", 1
    elif args.gpu:
        settings = Settings("configs/pretrain/r50-coco-vg.yaml", overrides, (800, 1333), args.precision or "bf16",
                            args.micro_batch or 8, 4, 10, "cuda")
        default_ckpt, rounds = "8,16,32,64", 1
    else:
        settings = Settings("configs/pretrain/r50-coco-vg.yaml", overrides, (256, 384), args.precision or "bf16",
                            args.micro_batch or 4, 3, 5, "cpu")
        default_ckpt, rounds = "4,8", 2
    rounds = args.rounds or rounds
    settings.batches = args.batches
    ckpt_text = default_ckpt if args.checkpoint_batches is None else args.checkpoint_batches
    ckpt_batches = [int(x) for x in ckpt_text.split(",") if x]
    rows = lever_rows(settings.micro_batch, ckpt_batches, [int(x) for x in args.more_micro_batches.split(",") if x])
    if args.rows:
        rows = pick_rows(rows, args.rows.split(","))
    runs: dict[str, list[dict]] = {r.name: [] for r in rows}
    began = time.perf_counter()
    timeout = 240 if args.gpu else 900
    stem = result_stem("step", args.out)
    measured = stem.parent / f"{stem.name}.rows.jsonl"  # each row the moment it is measured
    print(f"rows as measured: {measured}", flush=True)

    def measure(row: Row, label: str) -> None:
        print(f"{label}: {row.name}", flush=True)
        result = launch(settings, row, Path(work), timeout)
        runs[row.name].append(result)
        append_row(measured, {"label": label, **result})
        print(f"  {row.name}: {row_line(result)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-step-") as work:
        timed = [r for r in rows if not r.name.startswith("ckpt")]
        for k in range(rounds):
            for row in timed[k % len(timed):] + timed[:k % len(timed)]:
                measure(row, f"round {k + 1}/{rounds}")
        for row in rows:  # memory rows: once each (peak memory does not drift)
            if row.name.startswith("ckpt"):
                measure(row, "memory")
    results = aggregate(runs)
    padding = padding_cost(*settings.image, settings.micro_batch)
    body = report(results, padding, settings, rounds, time.perf_counter() - began)
    data = {"mode": "gpu" if args.gpu else "quick" if args.quick else "cpu", "settings": dataclasses.asdict(settings),
            "rounds": rounds, "rows": results, "padding": padding, "aspects": ASPECTS}
    title = f"Training-step levers: {'R50 ' if 'r50' in settings.config else 'tiny '}{settings.image[0]}x" \
            f"{settings.image[1]}, {settings.precision}, plain PyTorch and ZeRO-2"
    md = write_results("step", title, body, data, plot(results), out_dir=args.out)
    print(body)
    print(f"results: {md}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
