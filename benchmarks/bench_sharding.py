"""Sharding throughput: our Ray job vs a single-process script vs img2dataset, same inputs.

    .venv/bin/python benchmarks/bench_sharding.py                 # 2,000 images, both scenarios
    .venv/bin/python benchmarks/bench_sharding.py --num-images 200 --quick

Inputs: synthetic photo-like JPEGs at COCO sizes (640x480 and kin), with captions. Two scenarios:
  paper      limits 800/1333 (the paper's): COCO-size images need no resize
  downscale  limits 384/640: every image is decoded, resized and re-encoded
Tools, each given the same cores where it can use them:
  ours         python -m data_pipeline.shard on a local Ray cluster (Ray start timed apart)
  baseline     one process: PIL decode, RGB, resize, JPEG encode, webdataset.TarWriter
  img2dataset  reading file:// URLs, webdataset output, the equivalent resize settings
img2dataset runs from its own venv (its pins clash with ours): `make bench-venv-img2dataset`.
Writes benchmarks/results/sharding_<hardware>_<date>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import MemoryPeak, markdown_table, write_results  # noqa: E402
from data_pipeline.images import target_size  # noqa: E402

COCO_SIZES = [(640, 480), (480, 640), (640, 427), (612, 612), (500, 375), (640, 360)]
SCENARIOS = {"paper": (800, 1333), "downscale": (384, 640)}
SMALL = 20  # a run this size measures each tool's fixed start-up cost
DEFAULT_IMG2DATASET = Path(__file__).resolve().parent / ".venv-img2dataset" / "bin" / "img2dataset"


def make_inputs(root: Path, num_images: int, seed: int) -> dict:
    """Photo-like JPEGs (smooth colour fields plus grain compress like photos) + captions."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, annotations, rows = [], [], []
    for i in range(1, num_images + 1):
        width, height = COCO_SIZES[i % len(COCO_SIZES)]
        coarse = Image.fromarray(rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
        name = f"{i:012d}.jpg"
        Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(root / "images" / name, quality=90)
        caption = f"synthetic photo number {i}"
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        annotations.append({"id": i, "image_id": i, "caption": caption})
        rows.append({"url": f"file://{root / 'images' / name}", "caption": caption})
    megabytes = sum(p.stat().st_size for p in (root / "images").iterdir()) / 1e6
    sets = {}
    for name, count in (("full", num_images), ("small", SMALL)):
        (root / f"captions-{name}.json").write_text(json.dumps({"images": images[:count],
                                                                "annotations": annotations[:count]}))
        with open(root / f"urls-{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["url", "caption"])
            writer.writeheader()
            writer.writerows(rows[:count])
        sets[name] = {"coco": f"coco:captions={root / f'captions-{name}.json'},images={root / 'images'}",
                      "urls": root / f"urls-{name}.csv", "rows": rows[:count],
                      "megabytes": megabytes * count / num_images}
    return sets


def run_ours(inputs: dict, out: Path, limits: tuple[int, int], shard_size: int) -> None:
    from data_pipeline import shard
    rc = shard.main(["--source", inputs["coco"], "--out", str(out), "--shard-size", str(shard_size),
                     "--max-short-side", str(limits[0]), "--max-long-side", str(limits[1]), "--no-progress"])
    assert rc == 0, "our sharding job failed"


def run_baseline(inputs: dict, out: Path, limits: tuple[int, int], shard_size: int) -> None:
    """What one writes by hand: decode, RGB, resize, encode, TarWriter; one process."""
    import webdataset as wds
    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i, row in enumerate(inputs["rows"]):
            with open(row["url"][len("file://"):], "rb") as f:
                image = Image.open(io.BytesIO(f.read())).convert("RGB")
            size = target_size(*image.size, *limits)
            if size != image.size:
                image = image.resize(size, Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            sink.write({"__key__": f"{i:09d}", "jpg": buffer.getvalue(), "txt": row["caption"],
                        "json": {"width": image.width, "height": image.height}})


def run_img2dataset(inputs: dict, out: Path, limits: tuple[int, int], shard_size: int,
                    executable: Path, processes: int) -> None:
    command = [str(executable), "--url_list", str(inputs["urls"]), "--input_format", "csv",
               "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
               "--output_folder", str(out), "--processes_count", str(processes), "--thread_count", "8",
               "--image_size", str(limits[0]), "--resize_mode", "keep_ratio",
               "--resize_only_if_bigger", "True", "--encode_quality", "95",
               "--number_sample_per_shard", str(shard_size), "--enable_wandb", "False"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"img2dataset failed: {done.stderr[-2000:]}")


def count_samples(folder: Path) -> int:
    import tarfile
    total = 0
    for tar_path in folder.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            total += sum(1 for m in tar.getmembers() if m.name.endswith(".jpg"))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="cores for ours and img2dataset")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--scenarios", default="paper,downscale")
    parser.add_argument("--img2dataset", type=Path, default=DEFAULT_IMG2DATASET)
    parser.add_argument("--quick", action="store_true", help="few images: a smoke run for tests")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images = min(args.num_images, 60)
    args.num_images = max(args.num_images, 2 * SMALL)
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-sharding-"))
    try:
        inputs = make_inputs(work / "inputs", args.num_images, seed=0)
        tools = ["baseline", "ours"] + (["img2dataset"] if args.img2dataset.exists() else [])
        began = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
        ray_start = time.perf_counter() - began
        rows = []
        for scenario in args.scenarios.split(","):
            limits = SCENARIOS[scenario]
            for tool in tools:
                timings = {}
                for size in ("small", "full"):
                    out = work / f"{scenario}-{tool}-{size}"
                    with MemoryPeak() as memory:
                        began = time.perf_counter()
                        if tool == "ours":
                            run_ours(inputs[size], out, limits, args.shard_size)
                        elif tool == "baseline":
                            run_baseline(inputs[size], out, limits, args.shard_size)
                        else:
                            run_img2dataset(inputs[size], out, limits, args.shard_size, args.img2dataset, args.cpus)
                        timings[size] = time.perf_counter() - began
                    written = count_samples(out)
                    shutil.rmtree(out, ignore_errors=True)
                cores = 1 if tool == "baseline" else args.cpus
                # end to end: what a user waits for, ours including the start of its Ray cluster
                seconds = timings["full"] + (ray_start if tool == "ours" else 0.0)
                steady = (args.num_images - SMALL) / max(timings["full"] - timings["small"], 1e-9)
                rows.append({"scenario": scenario, "tool": tool, "cores": cores, "images": written,
                             "seconds": seconds, "images/s": written / seconds,
                             "images/s/core": written / seconds / cores,
                             "steady images/s/core": steady / cores,
                             "MB/s": inputs["full"]["megabytes"] / seconds, "peak MB": memory.peak_mb})
        for row in rows:
            same = {r["tool"]: r for r in rows if r["scenario"] == row["scenario"]}
            for base in ("baseline", "img2dataset"):
                if base in same:
                    row[f"vs {base} (per core)"] = row["images/s/core"] / same[base]["images/s/core"]
                    row[f"vs {base} (steady, per core)"] = (row["steady images/s/core"] /
                                                            same[base]["steady images/s/core"])
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    columns = ["scenario", "tool", "cores", "images", "seconds", "images/s", "images/s/core",
               "steady images/s/core", "MB/s", "peak MB", "vs baseline (per core)",
               "vs img2dataset (per core)", "vs img2dataset (steady, per core)"]
    notes = [f"{args.num_images} input JPEGs, {inputs['full']['megabytes']:.1f} MB, COCO-like sizes.",
             f"'seconds' is end to end; for ours it includes starting a local Ray cluster ({ray_start:.1f} s).",
             f"'steady' = ({args.num_images} - {SMALL}) / (t_{args.num_images} - t_{SMALL}): the rate once "
             "each tool's fixed start-up cost (process pools, Ray workers, imports) is paid.",
             "img2dataset: not installed, not measured." if "img2dataset" not in tools else
             "img2dataset reads file:// URLs (no HTTP server cost on either side).",
             "Memory: peak rise of the machine's used memory during the run (all processes)."]
    body = markdown_table(rows, columns) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    config = {"num_images": args.num_images, "cpus": args.cpus, "shard_size": args.shard_size,
              "scenarios": {s: SCENARIOS[s] for s in args.scenarios.split(",")}, "tools": tools}

    def plot(path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(tools)
        for t, tool in enumerate(tools):
            values = [next(r["steady images/s/core"] for r in rows if r["scenario"] == s and r["tool"] == tool)
                      for s in scenarios]
            ax.bar([i + t * width for i in range(len(scenarios))], values, width, label=tool)
        ax.set_xticks([i + width * (len(tools) - 1) / 2 for i in range(len(scenarios))], scenarios)
        ax.set_ylabel("images / s / core (steady)")
        ax.set_title("Sharding throughput per core")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    kwargs = {"out_dir": args.results_dir} if args.results_dir else {}
    path = write_results("sharding", "Sharding throughput", body, {"config": config, "rows": rows}, plot, **kwargs)
    print(body)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
