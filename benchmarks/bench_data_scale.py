"""The data plane at internet scale: a rank's start-up and a loader worker's memory vs dataset size.

    .venv/bin/python benchmarks/bench_data_scale.py              # 1M, 10M, 100M, 400M pairs; v1 at 1M, 10M
    .venv/bin/python benchmarks/bench_data_scale.py --quick      # 1M and 10M, 2 repeats
    .venv/bin/python benchmarks/bench_data_scale.py --sizes 1000000,100000000 --index-tars 0

Synthetic datasets of LAION's shape: shards of 10,000 samples, one caption each. Only the shards
a run opens need real bytes, so ONE real tar of 10,000 tiny samples is written (the sharding
job's format: KEY.jpg, KEY.txt, KEY.json {"captions": [...]}) with its sample table, and every
shard of every dataset is a hard link to them; each manifest lists every shard with that tar's
bytes and sha256 and that table's, so every check the loader makes passes.

Each measurement is a fresh process (this script with --child), measured from its own baseline
after imports (torch and the loader imported, the config loaded; peak RSS reset there):
  rank    StreamingLoader(url, cfg.data, 32, rank=0, world_size=512, num_workers=4) +
          steps_per_epoch() + one _parts() (the epoch plan): seconds; peak PSS above the
          baseline (this process polls /proc/PID/smaps_rollup) and peak RSS (VmHWM)
  worker  the same loader with num_workers=0, then 3 batches of epoch_batches() (cpu decoder,
          16 px images): what one loader worker holds once its first shards are open
  v1      both again on the format before issue 22 (samples inline in manifest.json), up to
          --v1-max pairs (10M takes ~6 GB per process), as ratios v1/v2
  index   python -m data_pipeline.index over N tars of 10 samples (hard links of one), Ray local
          with 2 CPUs: the driver process's peak RSS (VmHWM) and PSS
Configurations run --repeats times in interleaved rounds; the median is reported, with the
machine's load average (others share its 2 cores). Target (issue 22): at 400M pairs a rank
starts in < 10 s and < 100 MB above its import baseline; the figures at 1M, 10M and 100M
within 20% of each other.
Writes benchmarks/results/data_scale_<hardware>_<date>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import io
import itertools
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import markdown_table, write_results  # noqa: E402

SHARD_SAMPLES = 10_000   # img2dataset's default, LAION's shape
INDEX_TAR_SAMPLES = 10   # the index job's tars: its driver cost is per tar, not per sample
WORLD, WORKERS, BATCH, BATCHES = 512, 4, 32, 3
CAPTIONS = ["a red circle above a blue square", "two green triangles on a white field",
            "a small yellow square beside a large circle", "a blue triangle under a red square"]
WORDS = sorted({w for c in CAPTIONS for w in c.split()})
TINY = REPO / "configs" / "pretrain" / "tiny-cpu.yaml"
POLL_S = 0.02


# ---------------------------------------------------------------------------- memory of a process

def _status_mb(field: str, pid: str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _pss_mb(pid: str = "self") -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise KeyError("Pss")


def _baseline() -> dict:
    """RSS and PSS now, and the peak RSS (VmHWM) reset to now: what follows is measured from here."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return {"rss_mb": _status_mb("VmRSS"), "pss_mb": _pss_mb()}


def _held(base: dict) -> dict:
    return {"rss_peak_mb": _status_mb("VmHWM") - base["rss_mb"], "rss_held_mb": _status_mb("VmRSS") - base["rss_mb"],
            "pss_held_mb": _pss_mb() - base["pss_mb"]}


# ---------------------------------------------------------------------------- the measured processes

def child(spec: dict) -> None:
    """One measurement in this fresh process: prints READY <baseline> when it starts, RESULT <figures> at the end."""
    if spec["kind"] == "index":
        return _index_child(spec)
    from pixelbert_dist.config import load_config
    from pixelbert_dist.data.loader import StreamingLoader
    cfg = load_config(TINY, [f"--data.tokenizer={spec['vocab']}", "--data.image_short_side=16",
                             "--data.image_long_side=32", "--data.decoder=cpu"])
    base = _baseline()
    print("READY " + json.dumps(base), flush=True)
    profile = cProfile.Profile() if spec["kind"] == "profile" else None
    if profile:
        profile.enable()
    started = time.perf_counter()
    if spec["kind"] in ("rank", "profile"):
        loader = StreamingLoader(spec["url"], cfg.data, BATCH, rank=0, world_size=WORLD, num_workers=WORKERS)
        built = time.perf_counter()
        steps = loader.steps_per_epoch()
        counted = time.perf_counter()
        parts, _ = loader._parts()
        out = {"seconds": time.perf_counter() - started, "construct_s": built - started,
               "steps_per_epoch_s": counted - built, "plan_s": time.perf_counter() - counted,
               "steps": steps, "pairs": loader.manifest.total_pairs, "parts": len(parts)}
    else:  # a loader worker: in this process (num_workers=0), reading its part's first shards
        loader = StreamingLoader(spec["url"], cfg.data, BATCH, rank=0, world_size=WORLD, num_workers=0)
        batches = list(itertools.islice(loader.epoch_batches(), BATCHES))
        out = {"seconds": time.perf_counter() - started, "batches": len(batches),
               "pairs_read": sum(e - s for r in loader.consumed.values() for s, e in r),
               "shards_open": len(loader.consumed), "tables_held": len(loader.manifest._tables)}
    if profile:
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
        out["profile"] = text.getvalue()
    out.update(_held(base))
    print("RESULT " + json.dumps(out), flush=True)


def _index_child(spec: dict) -> None:
    """`python -m data_pipeline.index TARS --out OUT` in this process, its peak memory read before it exits."""
    import runpy

    import data_pipeline.index  # noqa: F401  what -m imports before main runs: the baseline
    base = _baseline()
    base["rss_at_start_mb"] = base["rss_mb"]
    print("READY " + json.dumps(base), flush=True)
    sys.argv = ["data_pipeline.index", spec["tars"], "--out", spec["out"], "--no-progress", "--num-cpus", "2"]
    started, rc = time.perf_counter(), 0
    try:
        runpy.run_module("data_pipeline.index", run_name="__main__", alter_sys=True)
    except SystemExit as done:
        rc = done.code if isinstance(done.code, int) else 1
    out = {"seconds": time.perf_counter() - started, "rc": rc, "rss_peak_abs_mb": _status_mb("VmHWM"),
           **_held(base)}
    print("RESULT " + json.dumps(out), flush=True)


def measure(spec: dict, timeout: float = 1800) -> dict:
    """Run one child; its figures, its peak PSS above its baseline (polled from here), its wall
    time from start to result (interpreter and imports included), and the load average."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu"}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                                stderr=errors, text=True, env=env, cwd=REPO)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        base, result, peak, stop = None, None, [0.0], threading.Event()

        def poll() -> None:
            while True:
                try:
                    peak[0] = max(peak[0], _pss_mb(str(proc.pid)))
                except (OSError, KeyError, ValueError):
                    return
                if stop.wait(POLL_S):
                    return
        poller = threading.Thread(target=poll, daemon=True)
        for line in proc.stdout:
            if line.startswith("READY "):
                base = json.loads(line[6:])
                poller.start()
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
                break
        wall = time.perf_counter() - started
        stop.set()
        if poller.is_alive():
            poller.join()
        proc.stdout.close()
        proc.wait()
        timer.cancel()
        errors.seek(0)
        tail = errors.read()[-1500:]
    if result is None:
        return {"error": f"rc {proc.returncode}: {tail.strip() or 'no output'}"}
    return {**result, "process_s": wall, "pss_peak_mb": max(peak[0] - base["pss_mb"], result["pss_held_mb"]),
            "pss_base_mb": base["pss_mb"], "rss_base_mb": base["rss_mb"], "load_1min": os.getloadavg()[0]}


# ---------------------------------------------------------------------------- synthetic datasets

def tiny_jpeg() -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_tar(path: Path, samples: int, img2dataset: bool = False) -> list[dict]:
    """A tar of `samples` tiny samples (ours, or img2dataset's layout); its table rows."""
    from data_pipeline.shard_format import ShardWriter
    jpeg = tiny_jpeg()
    with open(path, "wb") as f:
        writer = ShardWriter(f)
        for i in range(samples):
            key, caption = f"{i:09d}", CAPTIONS[i % len(CAPTIONS)]
            meta = {"key": key, "status": "success", "caption": caption} if img2dataset else \
                {"key": key, "captions": [caption]}
            writer.write(key, {"jpg": jpeg, "txt": caption.encode(), "json": json.dumps(meta).encode()})
        writer.close()
    return [{**s.to_manifest(), "captions": 1} for s in writer.samples]


def write_shard(root: Path) -> dict:
    """THE real shard every listed shard links to: its tar, its table, what a manifest says of them."""
    from data_pipeline.sample_table import digest, encode_table
    tar, table = root / "shard.tar", root / "shard.samples.npy"
    samples = write_tar(tar, SHARD_SAMPLES)
    table.write_bytes(encode_table(samples))
    return {"tar": tar, "table": table, "bytes": tar.stat().st_size,
            "sha256": hashlib.sha256(tar.read_bytes()).hexdigest(), "table_bytes": table.stat().st_size,
            "table_sha256": digest(table.read_bytes()), "samples": samples}


def write_dataset(folder: Path, shard: dict, pairs: int, v1: bool) -> dict:
    """A dataset of `pairs` // SHARD_SAMPLES shards, all hard links of `shard`, and its manifest
    (indent=1, as the writers do), written as text from one entry's template: no 10M objects here."""
    from data_pipeline.sample_table import table_name
    from data_pipeline.shard_format import FORMAT, V1_FORMATS, index_name, shard_name
    shards = pairs // SHARD_SAMPLES
    folder.mkdir()
    for i in range(shards):
        os.link(shard["tar"], folder / shard_name(i))
        if not v1:
            os.link(shard["table"], folder / table_name(shard_name(i)))
    entry = {"name": "@NAME@", "index": "@INDEX@", "num_samples": SHARD_SAMPLES, "num_captions": SHARD_SAMPLES,
             "bytes": shard["bytes"], "sha256": shard["sha256"]}
    entry.update({"samples": shard["samples"]} if v1 else
                 {"table_bytes": shard["table_bytes"], "table_sha256": shard["table_sha256"]})
    head = {"format": V1_FORMATS[0] if v1 else FORMAT, "num_samples": shards * SHARD_SAMPLES,
            "num_captions": shards * SHARD_SAMPLES, "num_shards": shards, "shards": ["@SHARDS@"],
            "stats": {"bytes": shards * shard["bytes"]}}
    before, after = json.dumps(head, indent=1).split('"@SHARDS@"')
    template = json.dumps(entry, indent=1).replace("\n", "\n  ")
    with open(folder / "manifest.json", "w") as f:
        f.write(before)
        for i in range(shards):
            text = template.replace("@NAME@", shard_name(i)).replace("@INDEX@", index_name(i))
            f.write((",\n  " if i else "") + text)
        f.write(after)
    manifest = {"shards": shards, "manifest KB": (folder / "manifest.json").stat().st_size / 1e3}
    return manifest if v1 else {**manifest, "table KB": shard["table_bytes"] / 1e3,
                                "tables total MB": shards * shard["table_bytes"] / 1e6}


def write_vocab(path: Path) -> Path:
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


# ---------------------------------------------------------------------------- the index job

def run_index_jobs(root: Path, counts: list[int], repeats: int) -> dict[int, list[dict]]:
    """The index job over `n` tars (hard links of one tar of INDEX_TAR_SAMPLES img2dataset samples),
    a fresh output each run; a failed run is kept as its error (the writers may be mid-change)."""
    runs: dict[int, list[dict]] = {}
    if counts:
        write_tar(root / "img2dataset.tar", INDEX_TAR_SAMPLES, img2dataset=True)
    for n in counts:
        tars = root / f"tars-{n}"
        tars.mkdir()
        for i in range(n):
            os.link(root / "img2dataset.tar", tars / f"{i:05d}.tar")
        for r in range(max(2, repeats - 1)):  # each run starts a local Ray: fewer rounds than the loader's
            out = root / f"index-{n}-{r}"
            got = measure({"kind": "index", "tars": str(tars), "out": str(out)})
            manifest = out / "manifest.json"
            if "error" not in got and got["rc"] == 0 and manifest.exists():
                data = json.loads(manifest.read_text())
                inline = any("samples" in s for s in data.get("shards", []))
                got.update({"manifest_format": data.get("format", "?") + (" (samples inline)" if inline else ""),
                            "manifest_kb": manifest.stat().st_size / 1e3})
            elif "error" not in got:
                got["error"] = f"rc {got['rc']}, no manifest"
            print(f"index {n} tars, run {r}: {json.dumps(got)}", flush=True)
            runs.setdefault(n, []).append(got)
            shutil.rmtree(out, ignore_errors=True)
    return runs


# ---------------------------------------------------------------------------- results

def median_of(runs: list[dict]) -> dict:
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0]["error"][-300:] if runs else "not run"}
    return {k: statistics.median(r[k] for r in good) for k, v in good[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def spread(values: list[float]) -> float | None:
    """How far apart: max / min - 1 (0.2 = within 20%)."""
    return max(values) / min(values) - 1 if len(values) > 1 and min(values) > 0 else None


def loader_row(fmt: str, pairs: int, on_disk: dict, rank_runs: list[dict], worker_runs: list[dict]) -> dict:
    rank, worker = median_of(rank_runs), median_of(worker_runs)
    row = {"format": fmt, "pairs": pairs, **on_disk}
    if "error" in rank:
        row["error"] = rank["error"]
    else:
        row.update({"rank s": rank["seconds"], "rank process s": rank["process_s"], "rank PSS MB": rank["pss_peak_mb"],
                    "rank RSS MB": rank["rss_peak_mb"], "rank base RSS MB": rank["rss_base_mb"],
                    "steps/epoch": int(rank["steps"]), "load": rank["load_1min"]})
    if "error" in worker:
        row["worker error"] = worker["error"]
    else:
        row.update({"worker s": worker["seconds"], "worker PSS MB": worker["pss_peak_mb"],
                    "worker RSS MB": worker["rss_peak_mb"], "worker base RSS MB": worker["rss_base_mb"],
                    "tables held": int(worker["tables_held"])})
    return row


def ratio_rows(rows: list[dict]) -> list[dict]:
    """v1 / v2 at the sizes both ran."""
    by = {(r["format"], r["pairs"]): r for r in rows if "rank s" in r}
    keys = ("manifest KB", "rank s", "rank PSS MB", "rank RSS MB", "worker s", "worker PSS MB", "worker RSS MB")
    return [{"pairs": n, **{f"{k} v1/v2": by[("v1", n)][k] / v2[k] for k in keys
                            if k in v2 and k in by[("v1", n)] and v2[k] > 0}}
            for (fmt, n), v2 in by.items() if fmt == "v2" and ("v1", n) in by]


def index_row(tars: int, runs: list[dict]) -> dict:
    got = median_of(runs)
    row = {"tars": tars, "samples": tars * INDEX_TAR_SAMPLES}
    if "error" in got:
        return {**row, "error": got["error"]}
    return {**row, "seconds": got["seconds"], "driver peak RSS MB": got["rss_peak_abs_mb"],
            "above import MB": got["rss_peak_mb"], "driver PSS above MB": got["pss_peak_mb"],
            "manifest format": next(r["manifest_format"] for r in runs if "error" not in r),
            "manifest KB": got["manifest_kb"]}


def verdicts(rows: list[dict]) -> tuple[dict, list[str]]:
    v2 = {r["pairs"]: r for r in rows if r["format"] == "v2" and "rank s" in r}
    targets, lines = {}, []
    if 400_000_000 in v2:
        r = v2[400_000_000]
        met = r["rank s"] < 10 and r["rank PSS MB"] < 100
        targets.update({"target_400M_startup_s": r["rank s"], "target_400M_pss_above_mb": r["rank PSS MB"],
                        "target_400M_rss_above_mb": r["rank RSS MB"], "target_400M_met": met})
        lines.append(f"- 400M pairs: rank start-up {r['rank s']:.2f} s (< 10 s), peak PSS {r['rank PSS MB']:.1f} MB "
                     f"/ peak RSS {r['rank RSS MB']:.1f} MB above the import baseline (< 100 MB): "
                     f"**{'met' if met else 'NOT met'}**")
    else:
        lines.append("- 400M pairs: not run (--sizes)")
    flat = [v2[n] for n in (1_000_000, 10_000_000, 100_000_000) if n in v2]
    if len(flat) > 1:
        # Whole processes: what a node holds and waits for. PSS's baseline moves with whatever else
        # maps torch's libraries on the machine, so the whole-process peak is judged on RSS.
        whole = {"rank process s (start to plan)": [r["rank process s"] for r in flat],
                 "rank process peak RSS": [r["rank RSS MB"] + r["rank base RSS MB"] for r in flat],
                 "worker process peak RSS": [r["worker RSS MB"] + r["worker base RSS MB"] for r in flat
                                             if "worker RSS MB" in r]}
        above = {"start-up s": [r["rank s"] for r in flat], "rank PSS MB": [r["rank PSS MB"] for r in flat],
                 "worker PSS MB": [r["worker PSS MB"] for r in flat if "worker PSS MB" in r]}
        met = all(s is not None and s <= 0.2 for s in map(spread, whole.values()))
        targets["target_flat_met"] = met
        names = ", ".join(f"{r['pairs'] // 1_000_000}M" for r in flat)
        lines.append(f"- {names} pairs within 20% of each other: " + ", ".join(
                         f"{k} {spread(v):.1%}" for k, v in whole.items() if spread(v) is not None)
                     + f" apart: **{'met' if met else 'NOT met'}**. What grows with the shards is the part above "
                     "the import baseline: " + ", ".join(f"{k} {min(v):.3g} to {max(v):.3g}" for k, v in above.items()))
    return targets, lines


def report(rows: list[dict], ratios: list[dict], index_rows: list[dict], lines: list[str], loads: list,
           profile: str, repeats: int) -> str:
    def commas(table: list[dict]) -> list[dict]:
        return [{**r, "pairs": f"{r['pairs']:,}"} for r in table]
    columns = ["format", "pairs", "shards", "manifest KB", "table KB", "tables total MB", "rank s", "rank PSS MB",
               "rank RSS MB", "steps/epoch", "worker s", "worker PSS MB", "worker RSS MB", "tables held", "load"]
    errors = [f"- {r['format']} {r['pairs']:,}: {r.get('error') or r.get('worker error')}" for r in rows
              if "error" in r or "worker error" in r]
    return (f"Synthetic datasets in shards of {SHARD_SAMPLES:,} samples with one caption each (hard links of one "
            f"real tar). Every figure is the median of {repeats} fresh processes, in interleaved rounds; memory is "
            f"the peak above the process's own baseline after imports (PSS polled every {POLL_S * 1000:.0f} ms, "
            f"RSS from VmHWM reset at the baseline). rank: StreamingLoader(world_size={WORLD}, "
            f"num_workers={WORKERS}, batch {BATCH}) + steps_per_epoch() + _parts(); worker: num_workers=0 and "
            f"{BATCHES} batches. table KB: one shard's sample table; tables total MB: all of them if written. "
            "load: 1-minute load average (2 cores, shared).\n\n"
            + markdown_table(commas(rows), columns) + ("\n\n" + "\n".join(errors) if errors else "")
            + "\n\n### Today's format (v1, samples inline) vs the two-level index (v2)\n\n"
            + (markdown_table(commas(ratios), list(ratios[0])) if ratios else "not run (--v1-max)")
            + "\n\n### The index job's driver (python -m data_pipeline.index, fresh process, local Ray, 2 CPUs)\n\n"
            + (markdown_table(index_rows, ["tars", "samples", "seconds", "driver peak RSS MB", "above import MB",
                                           "driver PSS above MB", "manifest format", "manifest KB", "error"])
               if index_rows else "not run (--index-tars 0)")
            + "\n\n### Target (issue 22)\n\n" + "\n".join(lines)
            + "\n\nLoad average (1, 5, 15 min) at start, after each round, at the end: "
            + ", ".join("(" + ", ".join(f"{x:.2f}" for x in load) + ")" for load in loads)
            + ("\n\n### Where a rank's start-up goes at the largest size (cProfile, by own time)\n\n```\n"
               + "\n".join(profile.strip().splitlines()[:30]) + "\n```\n" if profile else "\n"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    series = [("rank s", "rank", 0), ("rank PSS MB", "rank", 1), ("worker PSS MB", "worker", 1),
              ("manifest KB", "manifest.json", 2)]
    for fmt, style in (("v2", "-o"), ("v1", "--s")):
        got = [r for r in rows if r["format"] == fmt]
        for key, label, ax in series:
            points = [(r["pairs"], r[key]) for r in got if isinstance(r.get(key), (int, float))]
            if points:
                axes[ax].plot(*zip(*points), style, label=f"{fmt} {label}")
    axes[0].axhline(10, color="red", lw=0.8, label="target at 400M")
    axes[1].axhline(100, color="red", lw=0.8, label="target at 400M")
    for ax, title in zip(axes, ["rank start-up (manifest + plan), seconds", "peak PSS above import baseline, MB",
                                "manifest.json, KB"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pairs (shards of 10,000)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- the run

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="pairs, comma separated (multiples of 10,000)")
    parser.add_argument("--quick", action="store_true", help="1M and 10M pairs, 2 repeats, no profile")
    parser.add_argument("--repeats", type=int, default=None, help="fresh processes per configuration (default 3)")
    parser.add_argument("--v1-max", type=int, default=10_000_000, help="largest size measured in format v1")
    parser.add_argument("--index-tars", default="100,1000", help="index job runs, tars each (0: none)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    sizes = [int(s) for s in (args.sizes or ("1000000,10000000" if args.quick else
                                             "1000000,10000000,100000000,400000000")).split(",")]
    repeats = args.repeats or (2 if args.quick else 3)
    index_tars = [int(n) for n in args.index_tars.split(",") if int(n)]
    configs = [(fmt, n) for n in sizes for fmt in ("v2", "v1") if fmt == "v2" or n <= args.v1_max]

    root = Path(tempfile.mkdtemp(prefix="bench-data-scale-", dir=os.environ.get("BENCH_TMP")))
    print(f"datasets under {root}; disk free {shutil.disk_usage(root).free / 1e9:.0f} GB", flush=True)
    loads, runs = [os.getloadavg()], {}
    try:
        shard, vocab = write_shard(root), write_vocab(root / "vocab.txt")
        on_disk = {(fmt, n): write_dataset(root / f"{fmt}-{n}", shard, n, fmt == "v1") for fmt, n in configs}
        for round_ in range(repeats):  # interleaved: a burst of load on the machine hits every configuration alike
            for (fmt, n), kind in itertools.product(configs, ("rank", "worker")):
                got = measure({"kind": kind, "url": str(root / f"{fmt}-{n}"), "vocab": str(vocab)})
                print(f"round {round_} {fmt} {n:,} {kind}: {json.dumps(got)}", flush=True)
                runs.setdefault(f"{fmt}-{n}-{kind}", []).append(got)
            loads.append(os.getloadavg())
        profile = "" if args.quick else measure({"kind": "profile", "url": str(root / f"v2-{max(sizes)}"),
                                                  "vocab": str(vocab)}).get("profile", "")
        index_runs = run_index_jobs(root, index_tars, repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    loads.append(os.getloadavg())

    rows = [loader_row(fmt, n, on_disk[(fmt, n)], runs[f"{fmt}-{n}-rank"], runs[f"{fmt}-{n}-worker"])
            for fmt, n in configs]
    ratios, index_rows = ratio_rows(rows), [index_row(n, index_runs[n]) for n in index_tars]
    targets, lines = verdicts(rows)
    config = {"sizes": sizes, "repeats": repeats, "shard_samples": SHARD_SAMPLES, "captions_per_sample": 1,
              "world_size": WORLD, "num_workers": WORKERS, "batch_size": BATCH, "worker_batches": BATCHES,
              "v1_max": args.v1_max, "index_tars": index_tars, "index_tar_samples": INDEX_TAR_SAMPLES,
              "shard_tar_bytes": shard["bytes"], "table_bytes": shard["table_bytes"], "pss_poll_s": POLL_S,
              "load_avg": loads}
    md = write_results("data_scale", "Data plane at scale: rank start-up and worker memory vs pairs",
                       report(rows, ratios, index_rows, lines, loads, profile, repeats),
                       {"config": config, "rows": rows, "ratios_v1_v2": ratios, "index_job": index_rows,
                        "targets": targets, "profile": profile, "runs": runs, "index_runs": index_runs},
                       plot=lambda path: plot(rows, path), **({"out_dir": args.out} if args.out else {}))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
