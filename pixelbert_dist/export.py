"""Turn a ZeRO checkpoint into one safetensors file plus its config.

    python -m pixelbert_dist.export checkpoints/step00001000 exported/pixelbert-r50
    model = load_exported("exported/pixelbert-r50")

Weights are consolidated by DeepSpeed's own zero-to-fp32 (any ZeRO stage); `config.json`
holds the run config the checkpoint was trained with, so the model rebuilds without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_model, save_model

from pixelbert_dist import checkpoint
from pixelbert_dist.config import ModelConfig
from pixelbert_dist.model import PixelBert

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def export(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    source = Path(checkpoint_dir)
    if not (source / checkpoint.COMPLETE).is_file():
        raise FileNotFoundError(f"{source} is not a complete checkpoint (no {checkpoint.COMPLETE})")
    run_config = checkpoint.read_client_state(source.parent, source.name)["config"]
    model = PixelBert(ModelConfig(**{**run_config["model"], "text_weights": "none", "backbone_weights": "none"}))
    checkpoint.load_weights_only(model, source.parent, source.name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS))  # handles the tied MLM decoder / word embeddings
    (out / CONFIG).write_text(json.dumps(run_config, indent=1))
    return out


def load_exported(path: str | Path) -> PixelBert:
    path = Path(path)
    run_config = json.loads((path / CONFIG).read_text())
    model_cfg = {**run_config["model"], "text_weights": "none", "backbone_weights": "none"}
    model = PixelBert(ModelConfig(**model_cfg))
    load_model(model, str(path / WEIGHTS))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pixelbert_dist.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder, e.g. checkpoints/step00001000")
    parser.add_argument("out", help="folder for model.safetensors and config.json")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out / WEIGHTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
