"""Check a dataset against its manifest; exit non-zero on any mismatch.

    python -m data_pipeline.verify data/synthetic-shards        # written by data_pipeline.shard
    python -m data_pipeline.verify s3://bucket/laion-index      # written by data_pipeline.index

Either kind, in either format (v2: a sample table per shard; v1: samples inline), its tars
beside the manifest or where an index's `url` says. The manifest is checked first, by the
loader's own check (data_pipeline/dataset_manifest.py: read_manifest): a shard named `../x.tar`
or `/abs/x.tar`, a url outside the roots it may point into, or a manifest cut short, is refused
before any shard is opened. Then per shard: its sample table (read_table: sha256, and rows
inside the shard, in order, within the caps; a damaged one is named by shard and sample); the
tar present, its size and sha256; every listed sample's bytes, checked as the loader checks them
(shard_format.sample_members: one tar run of its own key's plain files), its image (a pair's
right one too) decodes, its captions are there (the sharding job's: as many as listed); the
sharding job's tars hold nothing but their listed samples; the DALI index matches. Shards are
read as streams, several at a time.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from data_pipeline.dataset_manifest import ManifestError, read_manifest, read_table, shard_source
from data_pipeline.sample_table import SampleTable
from data_pipeline.shard_format import (IMG2DATASET, MANIFEST, Member, SampleEntry, ShardFormatError, dali_index,
                                        listed_chunks, sample_content, sample_members, sample_where, split_member)
from data_pipeline.storage import HashingStream, Storage, StorageError, open_storage

MAX_PROBLEMS = 20  # per shard: a tar that disagrees everywhere is named, not listed sample by sample


def check_shard(storage: Storage, url: str, shard: dict) -> list[str]:
    """Problems found in one shard (empty when it is sound), in the loader's words."""
    try:
        table = read_table(storage, url, shard)
    except ManifestError as err:  # names the shard and the sample
        return [str(err)]
    tar_store, stored_as = _tar_location(storage, shard)
    name = shard_source(url, shard)  # as the loader names the shard in its errors
    size = tar_store.size(stored_as)
    if size is None:
        return [f"{name}: missing"]
    problems = [] if size == shard["bytes"] else [f"{name}: {size} bytes, manifest says {shard['bytes']}"]
    indexed = shard.get("layout") == IMG2DATASET
    if not indexed:
        problems += _unlisted_bytes(table, name)
    entries = []
    try:
        with tar_store.open_read(stored_as) as raw:
            reader = HashingStream(raw)
            stream = io.BufferedReader(reader, 1 << 20)
            for sample, chunk in listed_chunks(stream, table.entries(), 0, name):  # the loader's reading
                if len(problems) >= MAX_PROBLEMS:
                    break
                if isinstance(chunk, ShardFormatError):
                    problems.append(str(chunk))
                    continue
                where = sample_where(name, sample)
                try:
                    members = sample_members(chunk, sample["key"], where, sample["offset"])
                    entries.append(SampleEntry(sample["key"], sample["offset"], sample["size"],
                                               _members_at(chunk, sample["offset"])))
                    image, _, _, image2 = sample_content(members, sample, indexed, where)
                except ShardFormatError as err:
                    problems.append(str(err))
                    continue
                problems += _image_problems({"image": image, "right image": image2}, where)
            reader.drain()  # the tar's end padding counts in its hash
    except Exception as err:  # noqa: BLE001 - an unreadable tar is a finding, not a crash
        return problems + [f"{name}: unreadable tar: {err}"]
    if reader.digest.hexdigest() != shard["sha256"]:
        problems.append(f"{name}: sha256 {reader.digest.hexdigest()}, manifest says {shard['sha256']}")
    if len(entries) == len(table):
        try:
            if storage.read_bytes(shard["index"]).decode() != dali_index(entries):
                problems.append(f"{shard['index']}: DALI index does not match {name}")
        except StorageError:
            problems.append(f"{shard['index']}: missing")
    return problems[:MAX_PROBLEMS] + ([f"{name}: more problems not listed"] if len(problems) > MAX_PROBLEMS else [])


def _tar_location(storage: Storage, shard: dict) -> tuple[Storage, str]:
    """Beside the manifest, or at the `url` an index elsewhere lists (read_manifest checked it)."""
    if "url" not in shard:
        return storage, shard["name"]
    folder, _, base = shard["url"].rpartition("/")
    return open_storage(folder or "/"), base


def _unlisted_bytes(table: SampleTable, name: str) -> list[str]:
    """The sharding job writes samples back to back from byte 0: bytes before or between its
    listed samples are a sample the manifest does not know (an index's tars may hold skipped ones)."""
    ends = [0] + (table.offsets + table.sizes).tolist()
    for i, (end, offset) in enumerate(zip(ends, table.offsets.tolist())):
        if offset != end:
            return [f"{name}: bytes {end}..{offset} before sample {table.key(i)!r} are in no listed sample"]
    return []


def _members_at(chunk: bytes, offset: int) -> list[Member]:
    """Where each member's data lies in the tar, as DALI's index lists it (sample_members checked the chunk)."""
    with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
        return [Member(split_member(info.name)[1], offset + info.offset_data, info.size) for info in tar
                if info.isfile()]


def _image_problems(images: dict[str, bytes | None], where: str) -> list[str]:
    """Each image there is (a pair's right one may not be) decodes."""
    problems = []
    for label, data in images.items():
        if data is None and label != "image":
            continue
        try:
            with Image.open(io.BytesIO(data or b"")) as image:
                image.load()
        except Exception as err:  # noqa: BLE001 - any decoder failure is a finding, not a crash
            problems.append(f"{where}: its {label} does not decode: {err}")
    return problems


def verify(url: str, workers: int | None = None, shard_roots: list[str] = ()) -> tuple[dict, list[str]]:
    storage = open_storage(url)
    try:
        manifest = read_manifest(storage, url, shard_roots)
    except StorageError:
        return {}, [f"{url}: no {MANIFEST} (an unfinished or foreign dataset)"]
    except ManifestError as err:  # names the manifest and the shard; no shard was opened
        return {}, [str(err)]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        found = pool.map(lambda s: check_shard(storage, url, s), manifest["shards"])
        problems = [p for shard_problems in found for p in shard_problems]
    return manifest, problems


def summary(url: str, manifest: dict) -> list[str]:
    """What the dataset holds and what its job left out, for either kind."""
    stats = manifest.get("stats") if isinstance(manifest.get("stats"), dict) else {}  # not checked: read, not trusted
    size = stats.get("bytes") if isinstance(stats.get("bytes"), int) else 0
    lines = [f"{url}: {manifest.get('format', 'no format (v1)')}, {len(manifest['shards'])} shards, "
             f"{manifest.get('num_samples')} samples, {manifest.get('num_captions')} captions, {size / 1e6:.1f} MB"]
    skipped = stats.get("skipped") or "none"
    if "written" in stats:  # the sharding job's
        lines.append(f"  per source written: {stats['written']}; skipped at sharding: {skipped}")
        return lines
    lines.append(f"  skipped at indexing: {skipped}")
    compressed = stats.get("compressed_tars") if isinstance(stats.get("compressed_tars"), dict) else {}
    for label, tars in (("missing tars", stats.get("missing_tars")), ("truncated tars", stats.get("truncated_tars")),
                        ("compressed tars not indexed", compressed.get("tars"))):
        if isinstance(tars, list) and tars:
            lines.append(f"  {label}: {len(tars)} ({', '.join(map(str, tars[:3]))}{', ...' * (len(tars) > 3)})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("location", help="dataset folder or s3://bucket/prefix")
    parser.add_argument("--workers", type=int, default=None, help="shards checked at once")
    parser.add_argument("--shard-root", action="append", default=[],
                        help="a folder or s3:// prefix an index's tar urls may also point into (data.shard_roots)")
    args = parser.parse_args(argv)
    manifest, problems = verify(args.location, args.workers, args.shard_root)
    if manifest:
        print("\n".join(summary(args.location, manifest)))
    for problem in problems:
        print(f"  MISMATCH {problem}")
    print("OK" if not problems else f"FAILED: {len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
