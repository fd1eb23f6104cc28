"""Where one R50 training step at 800x1333 spends its GPU time (bf16 autocast, plain PyTorch).

    python benchmarks/profile_step.py [--micro-batch 8]

Prints step times with padded vs unpadded batches (the padding-zeroing hooks run only on
padded batches) and the top CUDA kernels of one step. A diagnostic for MFU work.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pixelbert_dist.config import load_config  # noqa: E402
from pixelbert_dist.flops import synthetic_batch  # noqa: E402
from pixelbert_dist.model import PixelBert  # noqa: E402
from pixelbert_dist.optim import build_optimizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()
    cfg = load_config("configs/pretrain/r50-coco-vg.yaml", ["--model.backbone_weights=none", "--model.text_weights=none",
                                                             "--model.vocab_size=30522"])
    torch.backends.cudnn.benchmark = True
    model = PixelBert(cfg.model).cuda().train()
    optimizer = build_optimizer(model, cfg.optim)
    batch = synthetic_batch(30522, args.micro_batch, (800, 1333), 40).to("cuda")

    def step(b):
        with torch.autocast("cuda", torch.bfloat16):
            out = model(b)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(b, label, n=8):
        for _ in range(3):
            step(b)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            step(b)
        torch.cuda.synchronize()
        print(f"{label}: {(time.perf_counter() - start) / n * 1000:.1f} ms/step", flush=True)

    padded = synthetic_batch(30522, args.micro_batch, (800, 1333), 40).to("cuda")
    padded.pixel_mask[0, 600:, :] = False  # one image shorter: hooks active
    padded.images[0, :, 600:, :] = 0  # uint8 zero padding, as pad_images leaves it
    timed(batch, "no padding (hooks idle)")
    timed(padded, "padded batch (hooks active)")
    model.visual.cnn = model.visual.cnn.to(memory_format=torch.channels_last)
    timed(batch, "no padding, channels_last CNN")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step(batch)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
