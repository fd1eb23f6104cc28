"""Upgrade a dataset written before the two-level index (v1) in place: tables, then a v2 manifest.

    python -m data_pipeline.upgrade data/coco-vg
    python -m data_pipeline.upgrade s3://bucket/laion-index

Either kind: the sharding job's or the index job's. Each shard's sample table is written from
the samples its v1 manifest lists inline, where the job would have written it (beside the
manifest and the DALI index); then the manifest is rewritten, last, with every field kept but
the per-sample lists (an index's skipped samples become counts per reason; they stay named in
its NAME_index.json files). An upgrade cut short leaves the v1 manifest, which still reads, and
running it again completes it. No tar is read or written: the tables hold what the v1 manifest
listed, and `python -m data_pipeline.verify` checks them against the tars. A v2 dataset is left
as it is (exit 0). The v1 manifest is read whole, as the v1 loader did: its O(samples) memory
is paid once, here, instead of in every training process.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from data_pipeline.dataset_manifest import ManifestError, is_v1, read_manifest
from data_pipeline.sample_table import MAX_KEY_BYTES
from data_pipeline.shard import write_table
from data_pipeline.shard_format import FORMAT, IMG2DATASET, INDEX_FORMAT, MANIFEST, V1_FORMATS
from data_pipeline.storage import StorageError, StorageUnavailable, open_storage
from data_pipeline.version import code_version


def upgrade(url: str, shard_roots: list[str] = ()) -> str:
    """Upgrade the dataset at `url` (a folder or s3:// prefix); what was done, in a sentence."""
    storage = open_storage(url)
    manifest = read_manifest(storage, url, shard_roots)  # checked: names, urls, every inline sample
    if not is_v1(manifest):
        return f"{url}: already {manifest['format']}; nothing to do"
    indexed = manifest.get("format") == V1_FORMATS[1] or any(s.get("layout") == IMG2DATASET
                                                             for s in manifest["shards"])
    for shard in manifest["shards"]:  # before anything is written: a table that could not be read back
        long = next((s["key"] for s in shard["samples"] if len(s["key"].encode()) > MAX_KEY_BYTES), None)
        if long is not None:
            raise ManifestError(f"{url}: shard {shard['name']!r}: sample {long[:80]!r}... has a key over "
                                f"{MAX_KEY_BYTES} bytes, more than a v2 sample table holds: index or shard it again")
    shards = []
    for shard in manifest["shards"]:
        entry = {key: value for key, value in shard.items() if key not in ("samples", "skipped")}
        entry.update(write_table(storage, shard["name"], shard["samples"]))
        if isinstance(shard.get("skipped"), list):  # an index's skipped samples, named per shard
            entry["skipped_counts"] = dict(Counter(s.get("reason") for s in shard["skipped"] if isinstance(s, dict)))
        shards.append(entry)
    old = manifest.get("format")
    manifest.update(format=INDEX_FORMAT if indexed else FORMAT, shards=shards,
                    upgraded={"from": old, "code_version": code_version()})
    storage.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())  # last: the dataset is v2 from here
    return (f"{url}: upgraded from {old or 'v1 (no format)'} to {manifest['format']}: {len(shards)} sample "
            f"tables written, the manifest rewritten; no tar was touched")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.upgrade", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("location", help="dataset folder or s3://bucket/prefix")
    parser.add_argument("--shard-root", action="append", default=[],
                        help="a folder or s3:// prefix an index's tar urls may also point into (data.shard_roots)")
    args = parser.parse_args(argv)
    try:
        print(upgrade(args.location, args.shard_root))
    except (StorageError, StorageUnavailable, ManifestError) as err:  # a rerun completes an upgrade cut short
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
