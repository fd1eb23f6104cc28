"""Image path throughput: our PIL decode vs torchvision vs DALI, at two image sizes, same inputs.

    .venv/bin/python benchmarks/bench_loader.py                  # 256 images, batches of 32
    .venv/bin/python benchmarks/bench_loader.py --quick --out /tmp/bench

Every method does what the loader's image stage does: encoded JPEG bytes in, then the model's
input out: (B, 3, H, W) float images, resized by `resized_size`, normalized, zero-padded to a
multiple of 64, and the pixel mask.
  pil               our decode_resize per image (PIL draft mode + bicubic) + pad_images
  torchvision-cpu   torchvision.io.decode_jpeg + v2 resize (bicubic, antialias) + pad_images
  dali-cpu          DaliImageDecoder(device_id=None)
  dali-mixed        DaliImageDecoder(device_id=0): nvJPEG decode, resize on the GPU       [GPU]
  nvjpeg            torchvision.io.decode_jpeg(device="cuda") on the batch + GPU resize   [GPU]
CPU rows get one core each (one thread), so their ratios are per core; GPU rows stop with the
batch in GPU memory, CPU rows with it in host memory (the copy to the GPU is not counted).
Inputs: synthetic photo-like JPEGs at COCO sizes (640x480 and kin), quality 90, in memory.
Settings: shorter side 224 / longer 384, and the paper's 800 / 1333.
Writes <out>/loader_<hardware>_<date>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, markdown_table, write_results  # noqa: E402
from pixelbert_dist.data.batch import decode_resize, resized_size  # noqa: E402
from pixelbert_dist.model import pad_images  # noqa: E402

COCO_SIZES = [(640, 480), (480, 640), (640, 427), (612, 612), (500, 375), (640, 360)]  # as bench_sharding
SETTINGS = {"224/384": (224, 384), "800/1333": (800, 1333)}
METHODS = ["pil", "torchvision-cpu", "dali-cpu", "dali-mixed", "nvjpeg"]
GPU_METHODS = {"dali-mixed", "nvjpeg"}
DALI_METHODS = {"dali-cpu", "dali-mixed"}
DALI_GPU_THREADS = 4  # host threads for DALI's mixed decoder (Huffman decoding not on the HW engine)
REPEATS = 3           # timed passes over the inputs per method; the fastest is reported

Batch = tuple[Tensor, Tensor]
Method = Callable[[list[bytes]], Batch]


def photo_jpeg(width: int, height: int, rng: np.random.Generator) -> bytes:
    """Smooth colour fields plus grain: compresses and decodes like a photo, unlike pure noise."""
    coarse = Image.fromarray(rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8))
    field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def photo_batches(num_images: int, batch_size: int) -> list[list[bytes]]:
    """The image benchmarks' inputs: `num_images` photo-like JPEGs at COCO sizes (seed 0), in batches."""
    rng = np.random.default_rng(0)
    jpegs = [photo_jpeg(*COCO_SIZES[i % len(COCO_SIZES)], rng) for i in range(num_images)]
    return [jpegs[i:i + batch_size] for i in range(0, len(jpegs), batch_size)]


def image_bench_args(argv: list[str] | None, doc: str, num_images: int, batch_size: int, quick_images: int,
                     quick_batch: int) -> argparse.Namespace:
    """The image benchmarks' command line (this one's and bench_augment.py's): `--quick` shrinks
    the inputs to a smoke run of one pass; `repeats` is the number of timed passes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=num_images)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--quick", action="store_true", help=f"{quick_images} images, one pass: a smoke run for tests")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    args.repeats = REPEATS
    if args.quick:
        args.num_images, args.batch_size = min(args.num_images, quick_images), min(args.batch_size, quick_batch)
        args.repeats = 1
    return args


def torchvision_method(short: int, long: int, device: str) -> Method:
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    def run(jpegs: list[bytes]) -> Batch:
        data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        # the CPU decoder takes one image at a time; nvJPEG decodes the list as one batch
        decoded = (decode_jpeg(data, mode=ImageReadMode.RGB, device=device) if device != "cpu"
                   else [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data])
        images = []
        for image in decoded:
            size = list(resized_size(*image.shape[-2:], short, long))
            image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
            images.append(image)
        return pad_images(images)
    return run


def make_method(name: str, short: int, long: int, batch_size: int) -> Method:
    if name == "pil":
        return lambda jpegs: pad_images([decode_resize(j, short, long) for j in jpegs])
    if name in ("torchvision-cpu", "nvjpeg"):
        return torchvision_method(short, long, "cpu" if name == "torchvision-cpu" else "cuda")
    from pixelbert_dist.data.dali_decode import DaliImageDecoder
    gpu = name == "dali-mixed"
    decoder = DaliImageDecoder(short, long, batch_size, device_id=0 if gpu else None,
                               num_threads=DALI_GPU_THREADS if gpu else 1)
    return lambda jpegs: decoder(jpegs)[:2]


def unavailable(name: str) -> str | None:
    """Why a method cannot run on this machine, or None."""
    if name in GPU_METHODS and not torch.cuda.is_available():
        return "not measured (no GPU)"
    if name in DALI_METHODS:
        try:
            import nvidia.dali  # noqa: F401
        except Exception as err:  # ImportError, or an OSError from a missing CUDA library
            return f"not measured (nvidia.dali not importable: {type(err).__name__})"
    return None


def time_pass(method: Method, batches: list[list[bytes]], gpu: bool) -> float:
    """Seconds for one pass over all batches; GPU work is waited for."""
    began = time.perf_counter()
    for batch in batches:
        method(batch)
    if gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - began


def failure(err: Exception) -> str:
    return f"failed: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def grey_level_gap(batch: Batch, reference: Batch) -> tuple[float, float]:
    """Max and mean |difference| from the PIL path in 0..255 grey levels, on real pixels."""
    images, mask = batch[0].cpu(), batch[1].cpu()
    if images.shape != reference[0].shape or not torch.equal(mask, reference[1]):
        return float("nan"), float("nan")
    gap = (images.float() - reference[0].float()).abs()
    gap = gap.permute(1, 0, 2, 3)[:, mask]
    return gap.max().item(), gap.mean().item()


def versions() -> dict:
    import PIL
    import torchvision
    found = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}
    try:
        import nvidia.dali
        found["nvidia-dali"] = nvidia.dali.__version__
    except Exception:
        found["nvidia-dali"] = None
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    return found


def main(argv: list[str] | None = None) -> int:
    args = image_bench_args(argv, __doc__, 256, 32, quick_images=16, quick_batch=8)
    repeats = args.repeats
    torch.set_num_threads(1)  # CPU rows: one core each

    batches = photo_batches(args.num_images, args.batch_size)
    rows = []
    for setting, (short, long) in SETTINGS.items():
        methods, firsts, passes = {}, {}, {}
        for name in METHODS:
            gpu = name in GPU_METHODS
            row = {"setting": setting, "method": name, "device": "gpu" if gpu else "cpu",
                   "cpu threads": (DALI_GPU_THREADS if name == "dali-mixed" else "") if gpu else 1,
                   "images": args.num_images, "batch": args.batch_size, "status": unavailable(name) or "ok"}
            rows.append(row)
            if row["status"] == "ok":
                try:
                    methods[name] = make_method(name, short, long, args.batch_size)
                    firsts[name] = methods[name](batches[0])  # warm-up: pipeline builds, nvJPEG, kernels
                except Exception as err:  # one broken method must not cost the others (a GPU run is one shot)
                    methods.pop(name, None)
                    row["status"] = failure(err)
            if row["status"] != "ok":
                print(f"{setting} {name}: {row['status']}", flush=True)
        # Passes alternate between methods, so load from elsewhere on the machine slows them alike;
        # the fastest pass is each method's speed when undisturbed.
        for _ in range(repeats):
            for name in list(methods):
                try:
                    passes.setdefault(name, []).append(time_pass(methods[name], batches, name in GPU_METHODS))
                except Exception as err:
                    del methods[name]
                    next(r for r in rows if r["setting"] == setting and r["method"] == name)["status"] = failure(err)
        for row in rows:
            name = row["method"]
            if row["setting"] != setting or name not in methods:
                continue
            seconds = min(passes[name])
            gap = grey_level_gap(firsts[name], firsts["pil"]) if "pil" in firsts else (float("nan"),) * 2
            row.update({"images/s": args.num_images / seconds, "ms/batch": 1000 * seconds / len(batches),
                        "vs pil": min(passes["pil"]) / seconds if "pil" in passes else float("nan"),
                        "max abs diff vs pil (levels)": gap[0], "mean abs diff vs pil (levels)": gap[1]})
            print(f"{setting} {name}: {row['images/s']:.1f} images/s", flush=True)

    columns = ["setting", "method", "device", "cpu threads", "images", "batch", "images/s", "ms/batch",
               "vs pil", "max abs diff vs pil (levels)", "mean abs diff vs pil (levels)", "status"]
    notes = [f"{args.num_images} JPEGs at COCO sizes (quality 90, {sum(len(j) for batch in batches for j in batch) / 1e6:.1f} MB), "
             f"batches of {args.batch_size}; fastest of {repeats} pass(es) per method, "
             "passes of all methods alternating, after one warm-up batch each.",
             "setting = shorter side / longer-side cap, the loader's resize rule (`resized_size`).",
             "CPU rows use one thread each, so 'vs pil' is per core; GPU rows end with the batch in GPU memory.",
             "abs diff vs pil: first batch against the PIL path, in 0..255 grey levels on real pixels; "
             "shapes and masks are identical or the cell is nan."]
    notes += [f"{r['setting']} {r['method']}: {r['status']}." for r in rows if r["status"] != "ok"]
    body = markdown_table(rows, columns) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    config = {"num_images": args.num_images, "batch_size": args.batch_size, "repeats": repeats,
              "settings": SETTINGS, "methods": METHODS, "dali_gpu_threads": DALI_GPU_THREADS,
              "versions": versions()}

    def plot(path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(SETTINGS), figsize=(5 * len(SETTINGS), 4), squeeze=False)
        for ax, setting in zip(axes[0], SETTINGS):
            measured = [r for r in rows if r["setting"] == setting and "images/s" in r]
            bars = ax.bar([r["method"] for r in measured], [r["images/s"] for r in measured],
                          color=["tab:orange" if r["device"] == "gpu" else "tab:blue" for r in measured])
            ax.bar_label(bars, labels=[f"{r.get('vs pil', float('nan')):.2f}x" for r in measured], fontsize=8)
            ax.set_yscale("log")
            # log bars need a stated floor, or their heights mislead; headroom for the labels
            ax.set_ylim(1, 4 * max([r["images/s"] for r in measured], default=1))
            missing = [r["method"] for r in rows if r["setting"] == setting and "images/s" not in r]
            if missing:
                ax.set_xlabel("not measured: " + ", ".join(missing), fontsize=8)
            ax.set_title(f"shorter/longer side {setting}")
            ax.set_ylabel("images / s (CPU rows: 1 core)")
            ax.tick_params(axis="x", labelrotation=30)
        fig.suptitle("Decode + resize + normalize + pad, JPEG bytes to a model batch")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    try:
        import matplotlib  # noqa: F401
        draw = plot
    except ImportError:  # a bare GPU machine may lack it: the table and JSON still matter
        draw = None
        body += "\n- matplotlib not installed: no plot."
    path = write_results("loader", "Image path throughput: PIL vs torchvision vs DALI", body,
                         {"config": config, "rows": rows}, draw, out_dir=args.out)
    print(body)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
