"""Check a sharded dataset against its manifest; exit non-zero on any mismatch.

    python -m data_pipeline.verify data/synthetic-shards
    python -m data_pipeline.verify s3://bucket/coco-vg

The manifest is checked first, by the loader's own check (pixelbert_dist/data/plan.py:
read_manifest): a shard named `../x.tar` or `/abs/x.tar`, or a manifest cut short, is refused
before any shard is opened. Then per shard: present, size, sha256, sample count, keys and byte
offsets, the DALI index, and that every image (a pair's right one too) decodes. Shards are read
as streams, several at a time.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from data_pipeline.shard_format import MANIFEST, dali_index, read_samples
from data_pipeline.storage import HashingStream, Storage, StorageError, open_storage
from data_pipeline.dataset_manifest import ManifestError, read_manifest


def check_shard(storage: Storage, shard: dict) -> list[str]:
    """Problems found in one shard (empty when it is sound)."""
    name = shard["name"]
    if not storage.exists(name):
        return [f"{name}: missing"]
    problems = []
    size = storage.size(name)
    if size != shard["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {shard['bytes']}")
    entries = []
    try:
        with storage.open_read(name) as raw:
            reader = HashingStream(raw)
            for entry, members in read_samples(io.BufferedReader(reader, 1 << 20)):
                entries.append(entry)
                for ext in ("jpg", "right.jpg") if "right.jpg" in members else ("jpg",):
                    try:
                        with Image.open(io.BytesIO(members.get(ext, b""))) as image:
                            image.load()
                    except Exception as err:  # any decoder failure is a finding, not a crash
                        problems.append(f"{name}: image {entry.key}.{ext} does not decode: {err}")
            reader.drain()  # the tar's end padding counts in its hash
    except Exception as err:
        return problems + [f"{name}: unreadable tar: {err}"]
    if reader.digest.hexdigest() != shard["sha256"]:
        problems.append(f"{name}: sha256 {reader.digest.hexdigest()}, manifest says {shard['sha256']}")
    if len(entries) != shard["num_samples"]:
        problems.append(f"{name}: {len(entries)} samples, manifest says {shard['num_samples']}")
    found = [e.to_manifest() for e in entries]
    listed = [{k: s[k] for k in ("key", "offset", "size")} for s in shard["samples"]]
    if found != listed and len(entries) == shard["num_samples"]:
        problems.append(f"{name}: sample keys or offsets differ from the manifest")
    try:
        if storage.read_bytes(shard["index"]).decode() != dali_index(entries):
            problems.append(f"{shard['index']}: DALI index does not match {name}")
    except StorageError:
        problems.append(f"{shard['index']}: missing")
    return problems


def verify(url: str, workers: int | None = None) -> tuple[dict, list[str]]:
    storage = open_storage(url)
    try:
        manifest = read_manifest(storage, url)
    except StorageError:
        return {}, [f"{url}: no {MANIFEST} (an unfinished or foreign dataset)"]
    except ManifestError as err:  # names the manifest and the shard; no shard was opened
        return {}, [str(err)]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        problems = [p for found in pool.map(lambda s: check_shard(storage, s), manifest["shards"]) for p in found]
    return manifest, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("location", help="dataset folder or s3://bucket/prefix")
    parser.add_argument("--workers", type=int, default=None, help="shards checked at once")
    args = parser.parse_args(argv)
    manifest, problems = verify(args.location, args.workers)
    if manifest:
        stats = manifest["stats"]
        print(f"{args.location}: {manifest['num_shards']} shards, {manifest['num_samples']} samples, "
              f"{manifest['num_captions']} captions, {stats['bytes'] / 1e6:.1f} MB")
        print(f"  per source written: {stats['written']}; skipped at sharding: {stats['skipped'] or 'none'}")
    for problem in problems:
        print(f"  MISMATCH {problem}")
    print("OK" if not problems else f"FAILED: {len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
