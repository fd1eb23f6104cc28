"""Test data the project makes itself: synthetic shapes, sharded by the real sharding job; a
dataset turned back into the format v1 wrote; a sample table damaged where only its rows show it;
and a dataset read back as the trainer's loaders read it, rank by rank."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from data_pipeline import shard
from data_pipeline.dataset_manifest import read_table
from data_pipeline.sample_table import digest, table_name
from data_pipeline.shard_format import INDEX_FORMAT, MANIFEST, V1_FORMATS
from data_pipeline.storage import Storage
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


def as_v1(storage: Storage) -> dict:
    """Rewrite the dataset in `storage` as v1 code wrote it: every shard's samples inline in the
    manifest (an index's skipped samples too, from its NAME_index.json), the v1 format, no
    tables. The tars are not touched. Returns the v2 manifest it replaced."""
    v2 = json.loads(storage.read_bytes(MANIFEST))
    indexed = v2["format"] == INDEX_FORMAT
    v1 = {**v2, "format": V1_FORMATS[1] if indexed else V1_FORMATS[0], "shards": []}
    if not indexed:
        v1["settings"] = {**v2["settings"], "format": V1_FORMATS[0]}
    for entry in v2["shards"]:
        samples = list(read_table(storage, storage.url, entry).entries())
        old = {k: v for k, v in entry.items() if k not in ("table_bytes", "table_sha256", "skipped_counts")}
        old["samples"] = samples
        if indexed:
            old["skipped"] = json.loads(storage.read_bytes(f"{entry['name'][:-4]}_index.json"))["skipped"]
        v1["shards"].append(old)
        storage.delete(table_name(entry["name"]))
    storage.write_bytes(MANIFEST, json.dumps(v1, indent=1).encode())
    return v2


def shift_table_row(storage: Storage, shard_index: int, row: int, by: int) -> str:
    """Move row `row`'s offset in the sample table of the manifest's shard #`shard_index` by `by`
    bytes and list the new table's sha256 and size in the manifest, so that only the check of the
    rows can catch it. Returns the row's key."""
    manifest = json.loads(storage.read_bytes(MANIFEST))
    entry = manifest["shards"][shard_index]
    table = np.load(io.BytesIO(storage.read_bytes(table_name(entry["name"]))), allow_pickle=False)
    table["offset"][row] = int(table["offset"][row]) + by
    out = io.BytesIO()
    np.save(out, table, allow_pickle=False)
    storage.write_bytes(table_name(entry["name"]), out.getvalue())
    entry.update(table_bytes=len(out.getvalue()), table_sha256=digest(out.getvalue()))
    storage.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return table["key"][row].decode()


def run_loaders(url, data_cfg, world: int, workers: int = 0, batch: int = 4, state: dict | None = None,
                stop: int | None = None) -> tuple[list[list[tuple]], dict]:
    """`world` ranks' StreamingLoaders in lockstep over one epoch of `url` (from `state` if
    given), `stop` steps at most: each step's [(batch, info) of every rank], and the ranks' states
    merged as a checkpoint holds them."""
    from pixelbert_dist.data.loader import StreamingLoader, merge_states

    loaders = [StreamingLoader(str(url), data_cfg, batch, rank=r, world_size=world, num_workers=workers, seed=1)
               for r in range(world)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    streams = [loader.epoch_batches() for loader in loaders]
    steps = []
    while stop is None or len(steps) < stop:
        try:
            steps.append([next(s) for s in streams])
        except StopIteration:
            break
    return steps, merge_states([loader.state_dict() for loader in loaders])
