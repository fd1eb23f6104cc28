"""Turn a ZeRO checkpoint into one safetensors file plus its config (and its tokenizer's files).

    python -m pixelbert_dist.export checkpoints/step00001000 exported/pixelbert-r50
    model = PixelBert.from_pretrained("exported/pixelbert-r50")   # load_exported(path) says the same

Weights are consolidated by DeepSpeed's own zero-to-fp32 (any ZeRO stage); `config.json`
holds the run config the checkpoint was trained with, so the model rebuilds without it. The
folder is `PixelBert.save_pretrained`'s (pretrained.py); the run's tokenizer goes with it when
it is found (pretrained.find_tokenizer). A fine-tuning checkpoint exports its task model, head
included (tasks/base.py; VQA's answers as answers.json): load_exported returns a PixelBertForVQA, ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pixelbert_dist import checkpoint
from pixelbert_dist.model import PixelBert
from pixelbert_dist.pretrained import CONFIG, WEIGHTS, fine_tuned  # noqa: F401  (CONFIG: this module's name)


def export(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    source = Path(checkpoint_dir)
    if not (source / checkpoint.COMPLETE).is_file():
        raise FileNotFoundError(f"{source} is not a complete checkpoint (no {checkpoint.COMPLETE})")
    return load_exported(source).save_pretrained(out_dir)


def load_exported(path: str | Path):
    """The exported model in eval mode, with its tokenizer when the folder has one: a PixelBert,
    or for a fine-tuned one its task model (PixelBertForVQA, ...: body and head)."""
    if fine_tuned(Path(path)):
        from pixelbert_dist import tasks

        return tasks.from_pretrained(path)
    return PixelBert.from_pretrained(path)


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
