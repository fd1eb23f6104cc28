"""Test data the project makes itself: synthetic shapes, sharded by the real sharding job."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline import shard
from data_pipeline.synthetic import generate
from pixelbert_dist.tokenizer import train_wordpiece


def synthetic_shards(root: Path, num_images: int, seed: int, shard_size: int,
                     out: str | Path | None = None) -> tuple[str | Path, Path]:
    """`num_images` synthetic images (5 captions each) under root/syn, written by
    data_pipeline.shard (a Ray cluster must be up) to `out` (default root/shards), and a
    150-entry WordPiece vocab of their captions; (the shards' location, the vocab file)."""
    captions = generate(root / "syn", num_images, seed=seed)
    out = root / "shards" if out is None else out
    assert shard.main(["--source", f"coco:captions={captions},images={root / 'syn' / 'images'}",
                       "--out", str(out), "--shard-size", str(shard_size), "--no-progress"]) == 0
    vocab = train_wordpiece([a["caption"] for a in json.loads(captions.read_text())["annotations"]], 150,
                            root / "vocab")
    return out, vocab
