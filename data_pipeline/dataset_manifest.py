"""A dataset's manifest.json as readers take it: parsed and checked before any shard is opened.

The loader (pixelbert_dist/data/plan.py, `Manifest`) and `python -m data_pipeline.verify` read
a manifest only through `read_manifest`, so both refuse the same things: names that leave the
dataset's location, tar urls outside the roots it may point into, samples outside their shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from data_pipeline.shard_format import IMG2DATASET, MANIFEST, MAX_SAMPLE_BYTES, TAR_BLOCK, unsafe_member
from data_pipeline.storage import Storage, StorageError

MAX_CAPTIONS = 10_000  # per sample; a larger count is a broken manifest (the dealing would list them all)


class ManifestError(ValueError):
    """A manifest a reader must not trust: the message names it, the shard and the sample."""


def read_manifest(storage: Storage, url: str, shard_roots: Iterable[str] = ()) -> dict:
    """A dataset's manifest.json, parsed and checked before any shard is opened: the loader
    (Manifest) and `python -m data_pipeline.verify` both read it here."""
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


def check_manifest(url: str, data: object, shard_roots: Iterable[str] = ()) -> None:
    """Names, locations, offsets and sizes before anything is read: a shard name (and its DALI
    index's) is a relative path inside the manifest's location (no `..`, no absolute path, no
    URL); only an index manifest's shards (layout img2dataset) may say where their tar is (`url`,
    ending in the name), and only inside a trusted root (tar_roots); each sample lies inside its
    shard's listed bytes, block-aligned, after the previous one, within the reader's size cap,
    with a sane caption count."""
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(shards, list):
        raise ManifestError(f"{url}/{MANIFEST}: no list of shards")
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
        total, position = shard.get("bytes"), 0
        if not _count(total) or not isinstance(shard.get("samples"), list):
            raise ManifestError(f"{where}: no byte count or sample list")
        for sample in shard["samples"]:
            key, offset, size = (sample.get(k) for k in ("key", "offset", "size"))
            if not (isinstance(key, str) and key and _count(offset) and _count(size) and 0 < size <= MAX_SAMPLE_BYTES
                    and offset % TAR_BLOCK == 0 and position <= offset and offset + size <= total):
                raise ManifestError(f"{where}: sample {key!r} at offset {offset} of {size} bytes is not inside the "
                                    f"shard's {total} bytes after the previous sample (which ends at {position})")
            if not (_count(sample.get("captions")) and sample["captions"] <= MAX_CAPTIONS):
                raise ManifestError(f"{where}: sample {key!r} lists {sample.get('captions')!r} captions")
            position = offset + size


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
