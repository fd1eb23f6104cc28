"""Existing WebDataset tars (img2dataset, OpenCLIP) -> our manifest + DALI indexes, in place.

    python -m data_pipeline.index s3://bucket/laion/{00000..00999}.tar --out s3://bucket/laion-index
    python -m data_pipeline.index data/img2dataset_out            # manifest beside the tars

Inputs: folders or `s3://` prefixes (every .tar below them), tar paths or URLs, and brace
patterns (`shards/{00000..00999}.tar`); a tar a pattern names but storage lacks is counted as
missing, not an error. Each tar is read once, sequentially, by one Ray task
(data_pipeline/tar_index.py says what is checked and why a sample is skipped: the loader's own
caps are applied, so nothing listed is refused when training reads it); the tars are never
written. Into `--out` (default: the folder holding the tars) go NAME.idx (DALI's
index), NAME_index.json (the tar's result: a rerun skips every tar whose result matches its
URL and size) and manifest.json, last. A shard's `name` is its path below the inputs' common
folder; when the manifest is elsewhere, `url` says where the tar is, and `sources` (the inputs,
made absolute) where the loader lets such a url point (pixelbert_dist/data/plan.py: tar_roots).
Training then reads the tars directly: `--data.shards=OUT`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from data_pipeline.images import DEFAULT_MAX_PIXELS
from data_pipeline.shard_format import (FORMAT, IMG2DATASET, INDEX_FORMAT, MANIFEST, MAX_MEMBER_BYTES,
                                        MAX_SAMPLE_BYTES, dali_index, unsafe_member)
from data_pipeline.storage import StorageError, StorageUnavailable, open_storage
from data_pipeline.tar_index import index_stream
from data_pipeline.version import code_version
from data_pipeline.dataset_manifest import lies_under, source_root

log = logging.getLogger("data_pipeline.index")
MAX_EXAMPLES = 20  # skipped samples named in the manifest's stats (every one is named in its shard)
CAPS = [MAX_MEMBER_BYTES, MAX_SAMPLE_BYTES]  # the loader's, applied when indexing: a result made under others is redone


# ---------------------------------------------------------------------------- inputs

def _absolute(url: str) -> str:
    if url.startswith("s3://"):
        return url.rstrip("/")
    path = url[len("file://"):] if url.startswith("file://") else url
    return str(Path(path).expanduser().resolve())


def expand_inputs(inputs: list[str]) -> list[str]:
    """Every tar URL the inputs name, in order, each once."""
    from braceexpand import braceexpand

    tars: list[str] = []
    for pattern in inputs:
        for url in map(_absolute, braceexpand(pattern)):
            if url.endswith(".tar"):
                tars.append(url)
                continue
            try:
                names = [n for n in open_storage(url).list()
                         if n.endswith(".tar") and not n.rsplit("/", 1)[-1].startswith(".tmp-")]
            except Exception as err:  # a missing bucket, no credentials...
                raise StorageError(f"cannot list {url}: {err}") from None
            if not names:
                raise StorageError(f"no .tar files under {url}")
            tars.extend(f"{url}/{name}" for name in names)
    return list(dict.fromkeys(tars))


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
    """Index one tar into NAME.idx + NAME_index.json in `out_url`, unless an earlier run did."""
    out = open_storage(out_url)
    folder, _, base = url.rpartition("/")
    source = open_storage(folder or "/")
    size = source.size(base)
    if size is None:
        return {"name": name, "url": url, "missing": True}
    result_name = f"{stem(name)}_index.json"
    try:
        done = json.loads(out.read_bytes(result_name))
    except (StorageError, ValueError, RecursionError):
        done = None
    if (isinstance(done, dict) and done.get("url") == url and done.get("bytes") == size and done.get("caps") == CAPS
            and done.get("max_pixels") == max_pixels and out.exists(done.get("index", ""))):
        return {**done, "reused": True}
    started = time.time()
    with source.open_read(base) as stream:
        tar = index_stream(stream, max_pixels)
    out.write_bytes(f"{stem(name)}.idx", dali_index(tar.entries).encode())
    result = {"name": name, "url": url, "index": f"{stem(name)}.idx", "bytes": tar.bytes, "sha256": tar.sha256,
              "max_pixels": max_pixels, "caps": CAPS, "num_samples": len(tar.samples), "samples": tar.samples,
              "skipped": tar.skipped, "skipped_counts": tar.skipped_counts, "truncated": tar.truncated,
              "read_seconds": round(time.time() - started, 3)}
    out.write_bytes(result_name, json.dumps(result, sort_keys=True).encode())  # last: marks the tar done
    return {**result, "reused": False}


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


def write_manifest(out, results: list[dict], beside: bool, inputs: list[str], max_pixels: int,
                   seconds: float) -> dict:
    found = [r for r in results if not r.get("missing")]
    skipped, examples = Counter(), []
    for r in found:
        skipped.update(r["skipped_counts"])
        examples.extend({"shard": r["name"], **s} for s in r["skipped"][: max(0, MAX_EXAMPLES - len(examples))])
    shards = []
    for r in found:
        entry = {"name": r["name"], "index": r["index"], "layout": IMG2DATASET, "num_samples": r["num_samples"],
                 "num_captions": r["num_samples"], "bytes": r["bytes"], "sha256": r["sha256"],
                 "truncated": r["truncated"], "samples": r["samples"], "skipped": r["skipped"]}
        if not beside:
            entry["url"] = r["url"]
        shards.append(entry)
    manifest = {
        "format": INDEX_FORMAT,
        "sources": inputs,
        "code_version": code_version(),
        "settings": {"max_pixels": max_pixels, "max_member_bytes": MAX_MEMBER_BYTES,
                     "max_sample_bytes": MAX_SAMPLE_BYTES},
        "num_samples": sum(r["num_samples"] for r in found),
        "num_captions": sum(r["num_samples"] for r in found),
        "num_shards": len(shards),
        "shards": shards,
        "stats": {
            "skipped": dict(skipped), "skipped_examples": examples,
            "missing_tars": [r["url"] for r in results if r.get("missing")],
            "truncated_tars": [r["name"] for r in found if r["truncated"]],
            "tars_read": sum(not r["reused"] for r in found), "tars_reused": sum(r["reused"] for r in found),
            "bytes": sum(r["bytes"] for r in found), "seconds": round(seconds, 2),
        },
    }
    out.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def check_output(out, overwrite: bool) -> None:
    """Refuse to replace the manifest of a dataset `data_pipeline.shard` wrote, unless --overwrite."""
    try:
        existing = json.loads(out.read_bytes(MANIFEST))
    except StorageError:
        return
    except (ValueError, RecursionError):
        existing = {}
    if existing.get("format") != INDEX_FORMAT and not overwrite:
        made_by = "data_pipeline.shard" if existing.get("format") == FORMAT else "another tool"
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
    from data_pipeline.shard import connect_ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    started = time.time()
    try:
        sources = [_absolute(pattern) for pattern in args.inputs]
        urls = expand_inputs(sources)
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
    connect_ray(args.ray_address, args.num_cpus)
    results = run_index(names, urls, out_url, args.max_pixels, progress=not args.no_progress)
    manifest = write_manifest(out, results, out_url == folder, sources, args.max_pixels, time.time() - started)
    stats = manifest["stats"]
    log.info("indexed %d samples in %d tars (%d read, %d already indexed) into %s in %.1f s; skipped %s%s",
             manifest["num_samples"], manifest["num_shards"], stats["tars_read"], stats["tars_reused"], out.url,
             stats["seconds"], stats["skipped"] or "none",
             f"; missing tars: {len(stats['missing_tars'])}" if stats["missing_tars"] else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
