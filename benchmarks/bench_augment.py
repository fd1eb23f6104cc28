"""What training augmentation (data/augment.py) costs on each image path, against none.

    .venv/bin/python benchmarks/bench_augment.py               # 64 images, batches of 16
    .venv/bin/python benchmarks/bench_augment.py --quick --out /tmp/bench

The image stage as the loader runs it, JPEG bytes to a padded uint8 batch, on the inputs of
bench_loader.py (photo-like JPEGs at COCO sizes), with each policy's draws made beforehand:
  none        no augmentation (the paper's pre-training)
  vilt        RandAugment 2 ops at magnitude 9 (the fine-tuning configs)
  all         flip 0.5, colour jitter 0.4, RandAugment 2 x 9 (multi-scale left out: it changes
              the sizes, so its cost is the resize's at the drawn size, in bench_loader.py)
Paths: pil (decode_resize + augment.apply, one thread), dali-cpu (DaliImageDecoder, one
thread), dali-mixed (on the GPU) [GPU]. Per path: images/s per core and the milliseconds a
batch gains over `none` on the same path. Writes <out>/augment_<hardware>_<date>.{md,json}.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_loader import SETTINGS, image_bench_args, photo_batches, time_pass, unavailable, versions  # noqa: E402
from benchmarks.common import markdown_table, write_results  # noqa: E402
from pixelbert_dist.config import DataConfig  # noqa: E402
from pixelbert_dist.data.augment import Augmenter, apply  # noqa: E402
from pixelbert_dist.data.batch import decode_resize  # noqa: E402
from pixelbert_dist.data.types import pad_images  # noqa: E402

POLICIES = {"none": {}, "vilt": {"augment_randaugment": 2},
            "all": {"augment_flip": 0.5, "augment_color_jitter": 0.4, "augment_randaugment": 2}}
PATHS = ["pil", "dali-cpu", "dali-mixed"]


def make_method(path: str, cfg: DataConfig, batch_size: int):
    short, long = cfg.image_short_side, cfg.image_long_side
    if path == "pil":
        return lambda jpegs, draws: pad_images([apply(decode_resize(j, d.short_side if d else short, long), d)
                                                for j, d in zip(jpegs, draws)])
    from pixelbert_dist.data.dali_decode import DaliImageDecoder, GraphAugment
    gpu = path == "dali-mixed"
    decoder = DaliImageDecoder(short, long, batch_size, device_id=0 if gpu else None, num_threads=4 if gpu else 1,
                               augment=GraphAugment.of(cfg))
    return lambda jpegs, draws: decoder(jpegs, draws)[:2]


def main(argv: list[str] | None = None) -> int:
    args = image_bench_args(argv, __doc__, 64, 16, quick_images=8, quick_batch=4)
    repeats = args.repeats
    torch.set_num_threads(1)  # CPU rows: one core each

    batches = photo_batches(args.num_images, args.batch_size)
    rows = []
    for setting, (short, long) in SETTINGS.items():
        for path in PATHS:
            why = unavailable(path if path != "pil" else "")
            runs = {}
            for policy, options in POLICIES.items():
                rows.append({"setting": setting, "path": path, "policy": policy, "images": args.num_images,
                             "batch": args.batch_size, "status": why or "ok"})
                if why:
                    continue
                cfg = DataConfig(image_short_side=short, image_long_side=long, **options)
                augmenter = Augmenter(cfg, seed=0, epoch=0)
                draws = [[augmenter.draw("bench.tar", f"{b}-{i}") for i in range(len(batch))]
                         for b, batch in enumerate(batches)]
                method = make_method(path, cfg, args.batch_size)
                method(batches[0], draws[0])  # warm-up: the pipeline builds
                runs[policy] = (lambda pair, method=method: method(*pair), list(zip(batches, draws)))
            # passes alternate between the policies, so load from elsewhere slows them alike
            seconds: dict[str, float] = {}
            for _ in range(repeats):
                for policy, (method, paired) in runs.items():
                    took = time_pass(method, paired, path == "dali-mixed")
                    seconds[policy] = min(seconds.get(policy, took), took)
            for row in rows[-len(POLICIES):]:
                policy = row["policy"]
                if policy not in seconds:
                    continue
                row.update({"images/s": args.num_images / seconds[policy],
                            "ms/batch": 1000 * seconds[policy] / len(batches),
                            "added ms/batch": 1000 * (seconds[policy] - seconds["none"]) / len(batches),
                            "added %": 100 * (seconds[policy] / seconds["none"] - 1)})
                print(f"{setting} {path} {policy}: {row['images/s']:.1f} images/s", flush=True)

    columns = ["setting", "path", "policy", "images", "batch", "images/s", "ms/batch", "added ms/batch",
               "added %", "status"]
    notes = [f"{args.num_images} JPEGs at COCO sizes, batches of {args.batch_size}; fastest of {repeats} "
             "pass(es) per policy, the policies' passes alternating, after one warm-up batch; CPU rows use "
             "one thread: images/s is per core.",
             "added: over the same path's `none` row. DALI runs every stage its graph holds on every "
             "image (neutral arguments where a draw leaves a stage out); the CPU path only the drawn ops.",
             "GPU rows are not measured here; the target is under 5% of a training step.",
             f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other "
             "work on the machine slows every row; the alternating passes keep a path's ratios fair."]
    notes += [f"{r['setting']} {r['path']} {r['policy']}: {r['status']}." for r in rows if r["status"] != "ok"]
    body = markdown_table(rows, columns) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    config = {"num_images": args.num_images, "batch_size": args.batch_size, "repeats": repeats,
              "settings": SETTINGS, "policies": POLICIES, "versions": versions()}
    path = write_results("augment", "Training augmentation: cost per image path", body,
                         {"config": config, "rows": rows}, None, out_dir=args.out)
    print(body)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
