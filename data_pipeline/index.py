"""Existing WebDataset tars (img2dataset, OpenCLIP) -> our manifest + DALI indexes, in place.

    python -m data_pipeline.index s3://bucket/laion/{00000..00999}.tar --out s3://bucket/laion-index
    python -m data_pipeline.index data/img2dataset_out            # manifest beside the tars

Inputs: folders or `s3://` prefixes (every .tar below them), tar paths or URLs, and brace
patterns (`shards/{00000..00999}.tar`); a tar a pattern names but storage lacks is counted as
missing, not an error. A compressed tar (`.tar.gz`, `.tgz`, ...) cannot be read at a byte
offset, so it is not indexed: it is counted and named, with what to do about it. Each tar is
read once, sequentially, by one Ray task (data_pipeline/tar_index.py says what is checked and
why a sample is skipped: the loader's own caps are applied, so nothing listed is refused when
training reads it); the tars are never written. Into `--out` (default: the folder holding the
tars) go per tar NAME.idx (DALI's index), NAME.samples.npy (its sample table) and
NAME_index.json (the tar's result, its skipped samples named: a rerun skips every tar whose
result matches its URL and size), and manifest.json, last: shards only, so the driver holds
O(tars) whatever their samples. A shard's `name` is its path below the inputs' common folder;
when the manifest is elsewhere, `url` says where the tar is, and `sources` (the inputs, made
absolute) where the loader lets such a url point (data_pipeline/dataset_manifest.py: tar_roots).
Training then reads the tars directly: `--data.train_manifest=OUT`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from data_pipeline.dataset_manifest import lies_under, source_root
from data_pipeline.images import DEFAULT_MAX_PIXELS
from data_pipeline.sample_table import digest, table_name
from data_pipeline.shard_format import (FORMAT, IMG2DATASET, INDEX_FORMAT, MANIFEST, MAX_MEMBER_BYTES,
                                        MAX_SAMPLE_BYTES, V1_FORMATS, dali_index, unsafe_member)
from data_pipeline.shard import connect_ray, write_table
from data_pipeline.storage import Storage, StorageError, StorageUnavailable, open_storage
from data_pipeline.tar_index import index_stream
from data_pipeline.version import code_version

log = logging.getLogger("data_pipeline.index")
MAX_EXAMPLES = 20  # skipped samples named in the manifest's stats (every one is named in NAME_index.json)
CAPS = [MAX_MEMBER_BYTES, MAX_SAMPLE_BYTES]  # the loader's, applied when indexing: a result made under others is redone
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.lz4")
COMPRESSED_WHY = "a compressed tar cannot be read at a byte offset, and the loader seeks to each sample"
COMPRESSED_TODO = ("decompress it (e.g. `gunzip -k NAME.tar.gz`, `zstd -d NAME.tar.zst`) and index the .tar, "
                   "or re-shard its contents with python -m data_pipeline.shard")
# what the driver gets back from a tar's task: counts and sha256s, never a per-sample list
SUMMARY = ("name", "url", "index", "bytes", "sha256", "num_samples", "num_captions", "table_bytes", "table_sha256",
           "truncated", "skipped_counts")


# ---------------------------------------------------------------------------- inputs

def _absolute(url: str) -> str:
    if url.startswith("s3://"):
        return url.rstrip("/")
    path = url[len("file://"):] if url.startswith("file://") else url
    return str(Path(path).expanduser().resolve())


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """(every tar URL the inputs name, every compressed tar among them), in order, each once."""
    from braceexpand import braceexpand

    tars: list[str] = []
    compressed: list[str] = []
    for pattern in inputs:
        for url in map(_absolute, braceexpand(pattern)):
            if url.endswith(".tar") or url.endswith(COMPRESSED):
                (tars if url.endswith(".tar") else compressed).append(url)
                continue
            try:
                names = [n for n in open_storage(url).list() if not n.rsplit("/", 1)[-1].startswith(".tmp-")]
            except Exception as err:  # a missing bucket, no credentials...
                raise StorageError(f"cannot list {url}: {err}") from None
            found = [n for n in names if n.endswith(".tar")]
            packed = [n for n in names if n.endswith(COMPRESSED)]
            if not found and not packed:
                raise StorageError(f"no .tar files under {url}")
            tars.extend(f"{url}/{name}" for name in found)
            compressed.extend(f"{url}/{name}" for name in packed)
    tars, compressed = list(dict.fromkeys(tars)), list(dict.fromkeys(compressed))
    if not tars:
        raise StorageError(f"no .tar files to index: {_compressed_note(compressed)}")
    return tars, compressed


def _compressed_note(compressed: list[str]) -> str:
    named = ", ".join(compressed[:5]) + (f" and {len(compressed) - 5} more" if len(compressed) > 5 else "")
    return f"{len(compressed)} compressed tar(s) not indexed ({named}): {COMPRESSED_WHY}; {COMPRESSED_TODO}"


def common_folder(urls: list[str]) -> str:
    """The deepest folder holding every tar: shard names are paths below it."""
    parts = [url.split("/")[:-1] for url in urls]
    common = parts[0]
    for other in parts[1:]:
        while other[:len(common)] != common:
            common = common[:-1]
    folder = "/".join(common)
    if folder in ("", "s3:", "s3:/"):
        raise StorageError("the tars share no folder (other buckets, or local and S3): index them separately")
    return folder


def stem(name: str) -> str:
    return name[:-len(".tar")]


# ---------------------------------------------------------------------------- one tar

def index_tar(name: str, url: str, out_url: str, max_pixels: int) -> dict:
    """Index one tar into NAME.idx, its sample table and NAME_index.json in `out_url`, unless an
    earlier run did; returns what the manifest lists for it (SUMMARY, a few skipped examples)."""
    out = open_storage(out_url)
    folder, _, base = url.rpartition("/")
    source = open_storage(folder or "/")
    size = source.size(base)
    if size is None:
        return {"name": name, "url": url, "missing": True}
    result_name = f"{stem(name)}_index.json"
    done = _earlier_result(out, result_name, name, url, size, max_pixels)
    if done is not None:
        return _summary(done, reused=True)
    started = time.time()
    with source.open_read(base) as stream:
        tar = index_stream(stream, max_pixels)
    out.write_bytes(f"{stem(name)}.idx", dali_index(tar.entries).encode())
    table = write_table(out, name, tar.samples)
    result = {"name": name, "url": url, "index": f"{stem(name)}.idx", "bytes": tar.bytes, "sha256": tar.sha256,
              "max_pixels": max_pixels, "caps": CAPS, **table, "skipped": tar.skipped,
              "skipped_counts": tar.skipped_counts, "truncated": tar.truncated,
              "read_seconds": round(time.time() - started, 3)}
    out.write_bytes(result_name, json.dumps(result, sort_keys=True).encode())  # last: marks the tar done
    return _summary(result, reused=False)


def _earlier_result(out: Storage, result_name: str, name: str, url: str, size: int, max_pixels: int) -> dict | None:
    """An earlier run's result for this tar, if it still holds: same tar (url, size), same caps,
    its DALI index and sample table present (the table's sha256 checked). A result written before
    v2 lists its samples instead of a table: the table is written from that list and the result
    rewritten without it (the tar is not read again)."""
    try:
        done = json.loads(out.read_bytes(result_name))
    except (StorageError, ValueError, RecursionError):
        return None
    if not (isinstance(done, dict) and done.get("name") == name and done.get("url") == url
            and done.get("bytes") == size and done.get("caps") == CAPS and done.get("max_pixels") == max_pixels
            and out.exists(done.get("index", ""))):
        return None
    if "samples" in done:
        try:
            done.update(write_table(out, name, done.pop("samples")))
        except (KeyError, TypeError, ValueError):  # not a list of samples: index the tar again
            return None
        out.write_bytes(result_name, json.dumps(done, sort_keys=True).encode())
        return done
    try:
        table = out.read_bytes(table_name(name))
    except StorageError:
        return None
    complete = set(SUMMARY) <= done.keys() and isinstance(done.get("skipped"), list)
    return done if complete and digest(table) == done.get("table_sha256") else None


def _summary(result: dict, reused: bool) -> dict:
    return {**{key: result[key] for key in SUMMARY}, "skipped_examples": result["skipped"][:MAX_EXAMPLES],
            "reused": reused}


# ---------------------------------------------------------------------------- the job

def run_index(names: list[str], urls: list[str], out_url: str, max_pixels: int, progress: bool) -> list[dict]:
    """One Ray task per tar, at most 2 per CPU in flight; results in input order."""
    import ray
    from botocore.exceptions import BotoCoreError, ClientError
    from tqdm import tqdm

    task = ray.remote(num_cpus=1, max_retries=3,
                      retry_exceptions=[OSError, StorageError, BotoCoreError, ClientError])(index_tar)
    max_in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    todo, pending, results = list(enumerate(zip(names, urls))), {}, {}
    samples = 0
    with tqdm(total=len(names), unit="tar", desc="indexing", disable=not progress, smoothing=0.1) as bar:
        while todo or pending:
            while todo and len(pending) < max_in_flight:
                i, (name, url) = todo.pop(0)
                pending[task.remote(name, url, out_url, max_pixels)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                results[i] = ray.get(ref)
                samples += results[i].get("num_samples", 0)
                bar.set_postfix(samples=samples, refresh=False)
                bar.update(1)
    return [results[i] for i in range(len(names))]


def write_manifest(out: Storage, results: list[dict], beside: bool, inputs: list[str], max_pixels: int,
                   seconds: float, compressed: list[str] = ()) -> dict:
    """The v2 index manifest from the tars' summaries: shards and counts, O(tars)."""
    found = [r for r in results if not r.get("missing")]
    skipped, examples = Counter(), []
    for r in found:
        skipped.update(r["skipped_counts"])
        examples.extend({"shard": r["name"], **s}
                        for s in r["skipped_examples"][: max(0, MAX_EXAMPLES - len(examples))])
    shards = []
    for r in found:
        entry = {"name": r["name"], "index": r["index"], "layout": IMG2DATASET, "num_samples": r["num_samples"],
                 "num_captions": r["num_captions"], "bytes": r["bytes"], "sha256": r["sha256"],
                 "table_bytes": r["table_bytes"], "table_sha256": r["table_sha256"], "truncated": r["truncated"],
                 "skipped_counts": r["skipped_counts"]}
        if not beside:
            entry["url"] = r["url"]
        shards.append(entry)
    not_indexed = {"count": len(compressed), "tars": list(compressed)}
    if compressed:
        not_indexed.update(why=COMPRESSED_WHY, what_to_do=COMPRESSED_TODO)
    manifest = {
        "format": INDEX_FORMAT,
        "sources": inputs,
        "code_version": code_version(),
        "settings": {"max_pixels": max_pixels, "max_member_bytes": MAX_MEMBER_BYTES,
                     "max_sample_bytes": MAX_SAMPLE_BYTES},
        "num_samples": sum(r["num_samples"] for r in found),
        "num_captions": sum(r["num_captions"] for r in found),
        "num_shards": len(shards),
        "shards": shards,
        "stats": {
            "skipped": dict(skipped), "skipped_examples": examples,
            "missing_tars": [r["url"] for r in results if r.get("missing")],
            "truncated_tars": [r["name"] for r in found if r["truncated"]],
            "compressed_tars": not_indexed,
            "tars_read": sum(not r["reused"] for r in found), "tars_reused": sum(r["reused"] for r in found),
            "bytes": sum(r["bytes"] for r in found), "seconds": round(seconds, 2),
        },
    }
    out.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def check_output(out: Storage, overwrite: bool) -> None:
    """Refuse to replace the manifest of a dataset `data_pipeline.shard` wrote, unless --overwrite."""
    try:
        existing = json.loads(out.read_bytes(MANIFEST))
    except StorageError:
        return
    except (ValueError, RecursionError):
        existing = None
    existing = existing if isinstance(existing, dict) else {}
    if existing.get("format") not in (INDEX_FORMAT, V1_FORMATS[1]) and not overwrite:  # v1: rewritten as v2
        made_by = "data_pipeline.shard" if existing.get("format") in (FORMAT, V1_FORMATS[0]) else "another tool"
        raise StorageError(f"{out.url}/{MANIFEST} was written by {made_by}; rerun with --overwrite to replace it")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="URL",
                        help="folder, s3:// prefix, tar, or brace pattern like shards/{00000..00999}.tar")
    parser.add_argument("--out", default=None, help="where the manifest and indexes go (default: beside the tars)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are skipped")
    parser.add_argument("--overwrite", action="store_true", help="replace a manifest data_pipeline.shard wrote")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    started = time.time()
    try:
        sources = [_absolute(pattern) for pattern in args.inputs]
        urls, compressed = expand_inputs(sources)
        stray = [u for u in urls if not any(lies_under(u, source_root(s)) for s in sources)]
        if stray:  # a symlink out of the inputs: the loader would refuse such a url
            raise StorageError(f"tars that resolve outside the inputs {sources}: {stray[:3]}")
        folder = common_folder(urls)
        names = [url[len(folder) + 1:] for url in urls]
        bad = [n for n in names if unsafe_member(n)]
        if bad:
            raise StorageError(f"tar paths with `..` or odd characters: {bad[:3]}")
        out_url = _absolute(args.out) if args.out else folder
        out = open_storage(out_url)
        out.check_writable()
        check_output(out, args.overwrite)
    except (StorageError, StorageUnavailable) as err:  # named before any tar is read
        log.error("%s", err)
        return 2
    log.info("%d tars under %s -> %s", len(urls), folder, out.url)
    if compressed:
        log.warning("%s", _compressed_note(compressed))
    connect_ray(args.ray_address, args.num_cpus)
    results = run_index(names, urls, out_url, args.max_pixels, progress=not args.no_progress)
    out.remove_stale_temporaries()  # a task Ray killed mid-write left its temporary; every task is done now
    manifest = write_manifest(out, results, out_url == folder, sources, args.max_pixels, time.time() - started,
                              compressed)
    stats = manifest["stats"]
    log.info("indexed %d samples in %d tars (%d read, %d already indexed) into %s in %.1f s; skipped %s%s",
             manifest["num_samples"], manifest["num_shards"], stats["tars_read"], stats["tars_reused"], out.url,
             stats["seconds"], stats["skipped"] or "none",
             f"; missing tars: {len(stats['missing_tars'])}" if stats["missing_tars"] else "")
    if compressed:  # again last, where a user reads: these samples are not in the dataset
        log.warning("%s (listed in the manifest's stats.compressed_tars)", _compressed_note(compressed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
