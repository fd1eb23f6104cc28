"""A dataset's manifest.json and its shards' sample tables, as readers take them: checked first.

The loader (pixelbert_dist/data/plan.py, `Manifest`) and `python -m data_pipeline.verify` read
a dataset only through `read_manifest` and `read_table`, so both refuse the same things: names
that leave the dataset's location, tar urls outside the roots they may point into, samples
outside their shard.

Two levels (format v2): the manifest lists shards only, O(shards) to read whatever the number
of samples; each shard's per-sample table (data_pipeline/sample_table.py) is read when the
shard is opened. A v1 manifest (samples inline, written before v2) is still read: its tables
are built from the inline lists, at the old O(samples) cost; `python -m data_pipeline.upgrade`
writes its tables and a v2 manifest without touching a tar.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

from data_pipeline.sample_table import (MAX_CAPTIONS, SampleTable, decode_table, max_table_bytes,
                                        table_from_samples, table_name)
from data_pipeline.shard_format import (FORMAT, IMG2DATASET, INDEX_FORMAT, MANIFEST, MAX_SAMPLE_BYTES, TAR_BLOCK,
                                        V1_FORMATS, ManifestError, unsafe_member)
from data_pipeline.storage import Storage, StorageError

__all__ = ["ManifestError", "read_manifest", "read_table", "is_v1", "pairs_of", "check_manifest", "shard_source"]
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_manifest(storage: Storage, url: str, shard_roots: Iterable[str] = ()) -> dict:
    """A dataset's manifest.json, parsed and checked before any shard is opened."""
    try:
        raw = storage.read_bytes(MANIFEST)
    except StorageError as err:
        raise StorageError(f"no dataset at {url}: {err}") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:  # cut short, not UTF-8, nested past the parser's depth
        raise ManifestError(f"{url}/{MANIFEST} is not JSON (cut short, or not a manifest): "
                            f"{type(err).__name__}: {str(err)[:200]}") from None
    check_manifest(url, data, shard_roots)
    return data


def is_v1(data: dict) -> bool:
    """A manifest written before the two-level index: every shard lists its samples inline."""
    return data.get("format") in V1_FORMATS or data.get("format") is None


def pairs_of(shard: dict) -> int:
    """A listed shard's image-caption pairs (the sum of its samples' caption counts)."""
    return shard["num_captions"]


def shard_source(url: str, shard: dict) -> str:
    """How readers name a listed shard's tar in their errors: its url (an index's tar elsewhere),
    else its place beside the manifest at `url`."""
    return shard.get("url") or f"{url}/{shard['name']}"


def read_table(storage: Storage, url: str, shard: dict) -> SampleTable:
    """A listed shard's sample table, read (at most the bytes its row count allows) and checked:
    its sha256, its rows (inside the shard, in order, within the caps) and its pair count."""
    if isinstance(shard.get("samples"), list):  # v1: inline, checked with the manifest
        return table_from_samples(shard["samples"])
    where = f"{url}/{table_name(shard['name'])}: shard {shard['name']!r}"
    try:
        data = storage.read_bytes(table_name(shard["name"]), (0, max_table_bytes(shard["num_samples"]) + 1))
    except StorageError as err:
        raise ManifestError(f"{where}: its sample table cannot be read: {err}") from None
    table = decode_table(data, where, shard["num_samples"], shard["bytes"], shard["table_sha256"])
    if table.num_pairs != pairs_of(shard):
        raise ManifestError(f"{where}: its sample table holds {table.num_pairs} pairs, the manifest "
                            f"{pairs_of(shard)}")
    return table


def check_manifest(url: str, data: object, shard_roots: Iterable[str] = ()) -> None:
    """Names, locations and counts before anything is read: a shard name (and its DALI index's)
    is a relative path inside the manifest's location (no `..`, no absolute path, no URL); only
    an index manifest's shards (layout img2dataset) may say where their tar is (`url`, ending in
    the name), and only inside a trusted root (tar_roots). v2: sample and pair counts and the
    table's sha256 are listed; v1: each inline sample lies inside its shard's listed bytes,
    block-aligned, after the previous one, within the reader's size cap, with a sane caption count."""
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(shards, list):
        raise ManifestError(f"{url}/{MANIFEST}: no list of shards")
    if data.get("format") not in (FORMAT, INDEX_FORMAT, *V1_FORMATS, None):
        raise ManifestError(f"{url}/{MANIFEST}: format {data.get('format')!r} is not one this version reads "
                            f"({FORMAT}, {INDEX_FORMAT} or their v1)")
    v1 = is_v1(data)
    roots = None  # computed for the first shard with a url: a dataset the sharding job wrote has none
    names = set()
    for shard in shards:
        name = shard.get("name") if isinstance(shard, dict) else None
        where = f"{url}/{MANIFEST}: shard {name!r}"
        if not _relative_name(name) or name in names:
            raise ManifestError(f"{where}: a shard name must be a unique relative path inside the dataset's "
                                "location (no '..', absolute path or URL)")
        names.add(name)
        if "index" in shard and not _relative_name(shard["index"]):
            raise ManifestError(f"{where}: its index {shard['index']!r} is not a relative path inside the "
                                "dataset's location")
        link = shard.get("url")
        if link is not None:
            if shard.get("layout") != IMG2DATASET or not isinstance(link, str) or not link.endswith(f"/{name}"):
                raise ManifestError(f"{where}: url {link!r} is not where an index of this shard points")
            roots = tar_roots(url, data, shard_roots) if roots is None else roots
            if not any(lies_under(link, root) for root in roots):
                raise ManifestError(f"{where}: url {link!r} lies outside the dataset's location and the sources "
                                    f"it was indexed from in the same store ({', '.join(roots) or 'none'}); "
                                    "list its folder in data.shard_roots if it is to be read")
        if not _count(shard.get("bytes")):
            raise ManifestError(f"{where}: no byte count")
        if v1 or "samples" in shard:  # samples inline: checked (and counted) as v1 always was
            _check_inline_samples(shard, where)
        elif not (_count(shard.get("num_samples")) and _count(shard.get("num_captions"))
                  and isinstance(shard.get("table_sha256"), str) and _SHA256.fullmatch(shard["table_sha256"])):
            raise ManifestError(f"{where}: no sample and caption counts or table sha256 (a v2 manifest lists them)")


def _check_inline_samples(shard: dict, where: str) -> None:
    total, position = shard["bytes"], 0
    if not isinstance(shard.get("samples"), list):
        raise ManifestError(f"{where}: no sample list")
    for sample in shard["samples"]:
        key, offset, size = (sample.get(k) for k in ("key", "offset", "size")) if isinstance(sample, dict) else \
            (None, None, None)
        if not (isinstance(key, str) and key and _count(offset) and _count(size) and 0 < size <= MAX_SAMPLE_BYTES
                and offset % TAR_BLOCK == 0 and position <= offset and offset + size <= total):
            raise ManifestError(f"{where}: sample {key!r} at offset {offset} of {size} bytes is not inside the "
                                f"shard's {total} bytes after the previous sample (which ends at {position})")
        if not (_count(sample.get("captions")) and sample["captions"] <= MAX_CAPTIONS):
            raise ManifestError(f"{where}: sample {key!r} lists {sample.get('captions')!r} captions")
        position = offset + size
    shard["num_samples"] = len(shard["samples"])
    shard["num_captions"] = sum(sample["captions"] for sample in shard["samples"])


# ---------------------------------------------------------------------------- where tars may be
# An index manifest names its tars by URL, and the trainer reads them with its own credentials:
# whoever can write the manifest must not be able to send it to /etc/passwd or another team's
# bucket. A url must lie under the manifest's own location, under a source the index job
# recorded in the same store as the manifest (local, or the same bucket: the recorded list is
# written by whoever writes the manifest), or under a root the run's config allows.

def tar_roots(url: str, data: dict, shard_roots: Iterable[str] = ()) -> list[str]:
    """The roots a manifest at `url` may point its tars into (normalised, see _location)."""
    home = _location(url, relative=True)
    sources = data.get("sources") if isinstance(data.get("sources"), list) else []
    recorded = [_location(source_root(s)) for s in sources if isinstance(s, str)]
    roots = [home] + [r for r in recorded if r and home and r[:2] == home[:2]] + [_location(r) for r in shard_roots]
    return list(dict.fromkeys(_join(r) for r in roots if r))


def source_root(pattern: str) -> str:
    """The folder or prefix every tar an index job's input (`dir`, `dir/x.tar`,
    `dir/{00000..00999}.tar`) expands to lies under: the part before any brace, up to its
    last `/` when it names tars."""
    head = pattern.split("{", 1)[0]
    if head != pattern or head.endswith(".tar"):
        head = head.rpartition("/")[0]
    return head.rstrip("/")


def lies_under(url: str, root: str) -> bool:
    """`url` (a tar) is strictly inside `root`, both normalised: same scheme and bucket, a
    local path resolved (symlinks followed), no `.` or `..` step in either."""
    inner, outer = _location(url), _location(root)
    return bool(inner and outer and inner[:2] == outer[:2] and len(inner[2]) > len(outer[2])
                and inner[2][:len(outer[2])] == outer[2])


def _location(url: str, relative: bool = False) -> tuple[str, str, tuple[str, ...]] | None:
    """(scheme, bucket, path steps) of an `s3://` URL or a local path (`file://` accepted);
    None for anything else, a `.`/`..` step, a relative path (unless `relative`: the dataset's
    own location is what the user gave) or the bare filesystem root."""
    if url.startswith("s3://"):
        bucket, _, key = url[len("s3://"):].partition("/")
        steps = tuple(s for s in key.split("/") if s)
        return None if not bucket or {".", ".."} & set(steps) else ("s3", bucket, steps)
    path = url[len("file://"):] if url.startswith("file://") else url
    if "://" in path:
        return None
    if not relative and (not path.startswith("/") or {".", ".."} & set(path.split("/"))):
        return None
    steps = tuple(s for s in os.path.realpath(os.path.expanduser(path)).split("/") if s)
    return ("file", "", steps) if steps else None


def _join(location: tuple[str, str, tuple[str, ...]]) -> str:
    scheme, bucket, steps = location
    return f"s3://{'/'.join((bucket,) + steps)}" if scheme == "s3" else "/" + "/".join(steps)


def _relative_name(name: object) -> bool:
    return isinstance(name, str) and not unsafe_member(name) and ":" not in name


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
