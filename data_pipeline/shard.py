"""Image-caption sources -> WebDataset shards + manifest, as Ray tasks.

    python -m data_pipeline.shard --out s3://bucket/coco-vg \\
        --source coco:captions=captions_train2017.json,images=train2017,include=karpathy_train_ids.txt \\
        --source vg:regions=region_descriptions.json,meta=image_data.json,images=VG \\
        --shard-size 1000 --max-short-side 800 --max-long-side 1333 --seed 0

On a cluster: `--ray-address` or RAY_ADDRESS (as `ray job submit` sets); otherwise a local
Ray starts. Steps: check the output is writable -> read sources into records -> drop
duplicates and captionless records (counted) -> seeded global shuffle -> cut into shards ->
one Ray task per shard (retried on I/O errors, a bounded number in flight) -> manifest last.
Rerunning the same command resumes: shards whose sha256 checks out are kept.
"""

# Over 300 lines on purpose: one job's plan, shard task, manifest and command line read as one recipe.

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace

from data_pipeline.images import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS, BadImage, ImageSettings, process_image
from data_pipeline.sample_table import MAX_KEY_BYTES, digest, encode_table, table_name
from data_pipeline.shard_format import (FORMAT, JOB, MANIFEST, MAX_MEMBER_BYTES, V1_FORMATS, ShardResult,
                                        ShardWriter, dali_index, index_name, is_job_file, shard_name, stats_name)
from data_pipeline.sources import Record, SourceError, SourceSpec, read_records
from data_pipeline.storage import (SourceRefused, Storage, StorageError, StorageUnavailable, open_storage,
                                   read_source, sha256_of, spool_dir)
from data_pipeline.version import code_version

log = logging.getLogger("data_pipeline.shard")
MAX_EXAMPLES = 20  # skipped samples named per shard, so a bad input can be found


@dataclass(frozen=True)
class JobSettings:
    shard_size: int
    seed: int
    image: ImageSettings

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}


@dataclass
class Plan:
    shards: list[list[Record]]
    fingerprint: str
    records: Counter            # per source, before planning drops
    planning_skips: Counter     # (source, reason) -> count
    planning_examples: list[dict]


# ---------------------------------------------------------------------------- planning

def make_plan(specs: list[SourceSpec], settings: JobSettings) -> Plan:
    """Read every source, drop what cannot become a sample, shuffle, cut into shards."""
    records, skips, examples, seen = [], Counter(), [], set()
    per_source = Counter()
    for spec in specs:
        for record in read_records(spec):
            per_source[record.source] += 1
            reason = ("duplicate_key" if record.key in seen else
                      "empty_caption" if not record.captions else
                      "long_key" if len(record.key.encode()) > MAX_KEY_BYTES else None)  # over a table's cap
            if reason:
                skips[(record.source, reason)] += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append({"key": record.key, "image": record.image, "reason": reason})
                continue
            seen.add(record.key)
            records.append(record)
        for line in spec.bad_records:
            skips[(spec.name, "bad_record")] += 1
            per_source[spec.name] += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append({"key": None, "image": line, "reason": "bad_record"})
    random.Random(settings.seed).shuffle(records)
    shards = [records[i:i + settings.shard_size] for i in range(0, len(records), settings.shard_size)]
    # v2 changed the index, not a byte of the tars: the fingerprint keeps v1's, so a job started
    # before v2 resumes (its finished shards get their tables, shard_is_complete) instead of being refused
    fingerprint = hashlib.sha256(json.dumps({**settings.to_dict(), "format": V1_FORMATS[0]}, sort_keys=True).encode())
    for record in records:
        fields = [record.key, record.image, record.byte_range, record.captions]
        if record.targets is not None or record.image2 is not None:  # captioning plans hash as before
            fields += [record.targets, record.image2]
        fingerprint.update(json.dumps(fields).encode())
    return Plan(shards, fingerprint.hexdigest(), per_source, skips, examples)


# ---------------------------------------------------------------------------- one shard

def write_table(storage: Storage, shard: str, samples: list[dict]) -> dict:
    """Write shard `shard`'s sample table beside the manifest from its samples ({key, offset, size,
    captions} in tar order); the manifest fields that vouch for it. The index job and upgrade
    write theirs here too."""
    data = encode_table(samples)
    storage.write_bytes(table_name(shard), data)
    return {"num_samples": len(samples), "num_captions": sum(s["captions"] for s in samples),
            "table_bytes": len(data), "table_sha256": digest(data)}


def shard_is_complete(storage: Storage, index: int) -> ShardResult | None:
    """The stored result if the shard's tar, DALI index and sample table exist and the tar's and
    the table's sha256 match. A shard an earlier version finished (its stats file lists the
    samples; no table) gets its table here, from that list: its tar is kept, not rewritten."""
    try:
        stats = json.loads(storage.read_bytes(stats_name(index)))
        inline = stats.pop("samples", None)  # written before v2
        if inline is not None:
            stats.update(num_captions=0, table_bytes=0, table_sha256="")  # filled in below
        result = ShardResult(**stats)
    except (StorageError, ValueError, TypeError, AttributeError, RecursionError):  # absent, cut short, foreign
        return None
    if not storage.exists(index_name(index)) or storage.size(shard_name(index)) != result.bytes:
        return None
    with storage.open_read(shard_name(index)) as stream:
        tar_digest, _ = sha256_of(stream)
    if tar_digest != result.sha256:
        return None
    if inline is not None:
        try:
            result = replace(result, **write_table(storage, result.name, inline))
        except (KeyError, TypeError, ValueError):  # not a list of samples: write the shard again
            return None
        storage.write_bytes(stats_name(index), result.to_json().encode())
        return result
    try:
        table = storage.read_bytes(table_name(result.name))
    except StorageError:
        return None
    return result if digest(table) == result.table_sha256 else None


def build_shard(index: int, records: list[Record], settings: ImageSettings, storage: Storage) -> ShardResult:
    """Validate and write one shard: tar, DALI index, sample table, then the stats file, which
    marks it complete. The samples go to the table; the result the driver gets holds counts."""
    done = shard_is_complete(storage, index)
    if done is not None:
        return done
    written, captions, skipped, examples = Counter(), Counter(), {}, []
    reencoded, caption_counts = 0, []
    with tempfile.NamedTemporaryFile(dir=spool_dir(), suffix=".tar") as spool:
        writer = ShardWriter(spool)
        for record in records:
            location = record.image
            try:
                image = process_image(_read_image(record, record.image, record.byte_range, settings), settings)
                image2 = None
                if record.image2 is not None:  # a pair (NLVR2): either image bad skips the sample
                    location = record.image2
                    image2 = process_image(_read_image(record, record.image2, None, settings), settings)
            except BadImage as bad:
                skipped.setdefault(record.source, Counter())[bad.reason] += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append({"key": record.key, "image": location, "reason": bad.reason,
                                     "detail": str(bad)})
                log.warning("skipped %s (%s): %s", record.key, location, bad)
                continue
            meta = {"key": record.key, "source": record.source, "source_id": record.source_id,
                    "captions": list(record.captions), "width": image.width, "height": image.height,
                    "original_width": image.original_width, "original_height": image.original_height}
            members = {"jpg": image.jpeg, "txt": record.captions[0].encode("utf-8")}
            if record.targets is not None:
                meta["targets"] = list(record.targets)
            if image2 is not None:
                meta["width2"], meta["height2"] = image2.width, image2.height
                members["right.jpg"] = image2.jpeg
                reencoded += image2.reencoded
            members["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
            writer.write(record.key, members)
            written[record.source] += 1
            captions[record.source] += len(record.captions)
            caption_counts.append(len(record.captions))
            reencoded += image.reencoded
        writer.close()
        spool.flush()
        spool.seek(0)
        tar_digest, size = sha256_of(spool)
        storage.upload_file(shard_name(index), spool.name)
    storage.write_bytes(index_name(index), dali_index(writer.samples).encode())
    table = write_table(storage, shard_name(index),
                        [{**s.to_manifest(), "captions": n} for s, n in zip(writer.samples, caption_counts)])
    result = ShardResult(
        index=index, name=shard_name(index), index_file=index_name(index), bytes=size, sha256=tar_digest,
        **table, records=dict(Counter(r.source for r in records)), written=dict(written), captions=dict(captions),
        skipped={source: dict(c) for source, c in skipped.items()}, skipped_examples=examples,
        reencoded=reencoded)
    storage.write_bytes(stats_name(index), result.to_json().encode())
    return result


def _read_image(record: Record, location: str, byte_range: tuple[int, int] | None, settings: ImageSettings) -> bytes:
    """The image's bytes; an absent, forbidden or refused file (outside the record's image root,
    not a regular file, over the size cap) is a skipped sample, not a failed task.

    Other errors (a network fault that outlived boto's retries) propagate: Ray retries the task.
    """
    from botocore.exceptions import ClientError

    try:
        return read_source(location, byte_range, record.root, settings.max_file_bytes)
    except SourceRefused as refused:  # its message names the file as the annotation did, not where it led
        raise BadImage(refused.reason, str(refused)) from None
    except (FileNotFoundError, NotADirectoryError, StorageError):
        raise BadImage("missing_file", f"{location} does not exist") from None
    except PermissionError as err:
        raise BadImage("read_error", f"{location}: {err}") from None
    except ClientError as err:
        raise BadImage("read_error", f"{location}: {err.response.get('Error', {}).get('Code')}") from None


# ---------------------------------------------------------------------------- the job

def prepare_output(storage: Storage, plan: Plan, settings: JobSettings, overwrite: bool) -> None:
    """Refuse an output made from other inputs/settings unless --overwrite; record ours."""
    job = {"fingerprint": plan.fingerprint, "settings": settings.to_dict()}
    try:
        existing = json.loads(storage.read_bytes(JOB))
    except StorageError:
        existing = None
    ours = [n for n in storage.list() if is_job_file(n)]
    same_job = existing is not None and existing.get("fingerprint") == plan.fingerprint
    if ours and not same_job:
        if not overwrite:
            made_by = ("other inputs or settings (its settings: "
                       f"{json.dumps(existing.get('settings'), sort_keys=True)})" if existing else "another job")
            raise StorageError(f"{storage.url} holds a dataset made from {made_by}; "
                               f"rerun with --overwrite to replace it")
        for name in ours:
            storage.delete(name)
    storage.remove_stale_temporaries()
    storage.write_bytes(JOB, json.dumps(job, sort_keys=True, indent=1).encode())


def connect_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def run_shards(plan: Plan, settings: JobSettings, storage: Storage, progress: bool) -> list[ShardResult]:
    """One Ray task per shard, at most 2 per CPU in flight; results in shard order."""
    import ray
    from botocore.exceptions import BotoCoreError, ClientError
    from tqdm import tqdm

    task = ray.remote(num_cpus=1, max_retries=3,
                      retry_exceptions=[OSError, StorageError, BotoCoreError, ClientError])(build_shard)
    max_in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict = {}
    results: dict[int, ShardResult] = {}
    todo = list(enumerate(plan.shards))
    total = sum(len(s) for s in plan.shards)
    with tqdm(total=total, unit="img", desc="sharding", disable=not progress, smoothing=0.1) as bar:
        while todo or pending:
            while todo and len(pending) < max_in_flight:
                index, records = todo.pop(0)
                pending[task.remote(index, records, settings.image, storage)] = index
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                index = pending.pop(ref)
                results[index] = ray.get(ref)
                bar.update(len(plan.shards[index]))
    return [results[i] for i in range(len(plan.shards))]


def write_manifest(storage: Storage, plan: Plan, settings: JobSettings, results: list[ShardResult],
                   sources: list[str], seconds: float) -> dict:
    skipped, by_source = Counter(), {}
    for (source, reason), count in plan.planning_skips.items():
        skipped[reason] += count
        by_source.setdefault(source, Counter())[reason] += count
    written, captions = Counter(), Counter()
    examples = list(plan.planning_examples)
    for result in results:
        written.update(result.written)
        captions.update(result.captions)
        for source, reasons in result.skipped.items():
            skipped.update(reasons)
            by_source.setdefault(source, Counter()).update(reasons)
        examples.extend(result.skipped_examples[: max(0, MAX_EXAMPLES - len(examples))])
    manifest = {
        "format": FORMAT,
        "fingerprint": plan.fingerprint,
        "settings": settings.to_dict(),
        "sources": sources,
        "code_version": code_version(),
        "num_samples": sum(r.num_samples for r in results),
        "num_captions": sum(captions.values()),
        "num_shards": len(results),
        "shards": [{"name": r.name, "index": r.index_file, "num_samples": r.num_samples,
                    "num_captions": r.num_captions, "bytes": r.bytes, "sha256": r.sha256,
                    "table_bytes": r.table_bytes, "table_sha256": r.table_sha256} for r in results],
        "stats": {
            "records": dict(plan.records), "written": dict(written), "captions": dict(captions),
            "skipped": dict(skipped), "skipped_by_source": {s: dict(c) for s, c in by_source.items()},
            "skipped_examples": examples, "reencoded": sum(r.reencoded for r in results),
            "bytes": sum(r.bytes for r in results), "seconds": round(seconds, 2),
        },
    }
    storage.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.shard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", required=True,
                        help="KIND:option=value,... (repeat to combine sources); see data_pipeline/sources/")
    parser.add_argument("--out", required=True, help="local folder or s3://bucket/prefix")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples (images) per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    parser.add_argument("--max-short-side", type=int, default=800, help="downscale so the short side is at most this (0: keep)")
    parser.add_argument("--max-long-side", type=int, default=1333, help="...and the long side at most this (0: keep)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are skipped")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                        help=f"larger source files are skipped unread (at most {MAX_MEMBER_BYTES}: a member's cap)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output made from other inputs (only its top-level job files are deleted)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.shard_size <= 0:
        parser.error("--shard-size must be positive")
    if not 0 < args.max_file_bytes <= MAX_MEMBER_BYTES:
        parser.error(f"--max-file-bytes must be between 1 and {MAX_MEMBER_BYTES}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    settings = JobSettings(args.shard_size, args.seed,
                           ImageSettings(args.max_short_side, args.max_long_side, args.max_pixels, args.max_file_bytes))
    started = time.time()
    try:
        specs = [SourceSpec.parse(s) for s in args.source]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise SourceError(f"two sources share a name ({', '.join(names)}): give one name=")
        storage = open_storage(args.out)
        storage.check_writable()  # a missing bucket fails here, before any image is read
        plan = make_plan(specs, settings)
        if not plan.shards:
            raise SourceError("the sources hold no usable image-caption pairs")
        prepare_output(storage, plan, settings, args.overwrite)
    except (SourceError, StorageError, StorageUnavailable) as err:  # named before any image is read
        log.error("%s", err)
        return 2
    log.info("%d images in %d shards -> %s", sum(map(len, plan.shards)), len(plan.shards), storage.url)
    connect_ray(args.ray_address, args.num_cpus)
    results = run_shards(plan, settings, storage, progress=not args.no_progress)
    storage.remove_stale_temporaries()  # a task Ray killed mid-write left its temporary; every task is done now
    manifest = write_manifest(storage, plan, settings, results, args.source, time.time() - started)
    stats = manifest["stats"]
    log.info("wrote %d samples (%d captions) in %d shards to %s in %.1f s; skipped %s",
             manifest["num_samples"], manifest["num_captions"], manifest["num_shards"], storage.url,
             stats["seconds"], stats["skipped"] or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
