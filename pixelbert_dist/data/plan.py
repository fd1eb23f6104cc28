"""Stage 1 of the loader: which image-caption pairs each (rank, loader worker) reads.

An epoch counts pairs (the paper's definition: COCO has ~5 per image, VG ~50). A shard's
pairs are numbered window by window: the samples are taken MIX_WINDOW at a time in tar
order and their captions dealt round-robin (caption 0 of each, then caption 1 of each...),
so the captions of one image are spread out rather than back to back, reading stays
sequential, and a position is one integer per shard: a reader seeks to the window's first
sample and skips into it. With `captions_per_image` G > 1, captions are dealt G at a time,
so a batch holds runs of G pairs of one image and the CNN runs once for the run (SOHO).

Progress is a set of consumed pair ranges per shard. The pairs not yet consumed, in a
shard order drawn from (seed, epoch), are cut into equal contiguous parts, one per global
worker. Because the cut is made from what remains, a job resumed on a different number of
ranks or workers continues with exactly the unseen pairs.
"""

from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass

from data_pipeline.shard_format import IMG2DATASET, MANIFEST, MAX_SAMPLE_BYTES, TAR_BLOCK, unsafe_member
from data_pipeline.storage import Storage, StorageError, open_storage, sha256_of

MIX_WINDOW = 16  # samples whose captions are dealt round-robin
MAX_CAPTIONS = 10_000  # per sample; a larger count is a broken manifest (the dealing would list them all)


class ManifestError(ValueError):
    """A manifest a reader must not trust: the message names it, the shard and the sample."""


def check_manifest(url: str, data: object) -> None:
    """Names, offsets and sizes before anything is read: a shard name is a relative path inside
    the manifest's location (no `..`, no absolute path, no URL); only an index manifest's
    shards (layout img2dataset) may say where their tar is (`url`, ending in the name); each
    sample lies inside its shard's listed bytes, block-aligned, after the previous one, within
    the reader's size cap, with a sane caption count."""
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(shards, list):
        raise ManifestError(f"{url}/{MANIFEST}: no list of shards")
    names = set()
    for shard in shards:
        name = shard.get("name") if isinstance(shard, dict) else None
        where = f"{url}/{MANIFEST}: shard {name!r}"
        if not isinstance(name, str) or unsafe_member(name) or ":" in name or name in names:
            raise ManifestError(f"{where}: a shard name must be a unique relative path inside the dataset's "
                                "location (no '..', absolute path or URL)")
        names.add(name)
        link = shard.get("url")
        if link is not None and (shard.get("layout") != IMG2DATASET or not isinstance(link, str)
                                 or not link.endswith(f"/{name}") or ".." in link.split("/")):
            raise ManifestError(f"{where}: url {link!r} is not where an index of this shard points")
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


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _NamedStream:
    """A shard's byte stream that names the shard (`name`), as read errors quote it."""

    def __init__(self, stream, name: str) -> None:
        self._stream, self.name = stream, name

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> "_NamedStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def round_robin(counts: list[int], group: int = 1) -> list[tuple[int, int]]:
    """(sample within window, caption index) in dealing order, `group` captions of a sample at a time."""
    order = []
    for first in range(0, max(counts, default=0), group):
        for sample, count in enumerate(counts):
            order.extend((sample, caption) for caption in range(first, min(first + group, count)))
    return order


def run_lengths(counts: list[int], group: int) -> list[int]:
    """Lengths of the dealing's runs: the consecutive pairs of one image (at most `group`)."""
    return [min(group, count - first) for first in range(0, max(counts, default=0), group)
            for count in counts if first < count]


@dataclass(frozen=True)
class Segment:
    """Pairs [start, end) of one shard."""

    shard: str
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


class Manifest:
    """A dataset's manifest.json: shards, their samples' byte offsets and caption counts."""

    def __init__(self, url: str, captions_per_image: int = 1) -> None:
        self.url, self.group = url, captions_per_image
        self.storage = open_storage(url)
        try:
            data = json.loads(self.storage.read_bytes(MANIFEST))
        except StorageError as err:
            raise StorageError(f"no dataset at {url}: {err}") from None
        except ValueError as err:
            raise ManifestError(f"{url}/{MANIFEST} is not JSON: {err}") from None
        check_manifest(url, data)
        self.shards = {s["name"]: s for s in data["shards"]}
        self._stores: dict[str, Storage] = {}
        self.order = [s["name"] for s in data["shards"]]
        # first pair index of every window, per shard
        self._windows = {}
        for name, shard in self.shards.items():
            counts = [sample["captions"] for sample in shard["samples"]]
            starts, total = [], 0
            for first in range(0, len(counts), MIX_WINDOW):
                starts.append(total)
                total += sum(counts[first:first + MIX_WINDOW])
            self._windows[name] = (starts, total)

    def num_pairs(self, shard: str) -> int:
        return self._windows[shard][1]

    def locate(self, shard: str, pair: int) -> tuple[int, int]:
        """(window's first sample index, position of the pair within the window)."""
        starts, _ = self._windows[shard]
        window = bisect.bisect_right(starts, pair) - 1
        return window * MIX_WINDOW, pair - starts[window]

    def runs(self, segment: "Segment") -> list[int]:
        """Run lengths of a segment's pairs: each run is one image's consecutive pairs."""
        first_sample, position = self.locate(segment.shard, segment.start)
        lengths, pair = [], segment.start
        while pair < segment.end:
            for length in run_lengths(self.window_counts(segment.shard, first_sample), self.group):
                if position >= length:  # runs before the segment's start
                    position -= length
                    continue
                take = min(length - position, segment.end - pair)
                lengths.append(take)
                pair, position = pair + take, 0
                if pair >= segment.end:
                    break
            first_sample += MIX_WINDOW
        return lengths

    def window_counts(self, shard: str, first_sample: int) -> list[int]:
        samples = self.shards[shard]["samples"][first_sample:first_sample + MIX_WINDOW]
        return [sample["captions"] for sample in samples]

    @property
    def total_pairs(self) -> int:
        return sum(total for _, total in self._windows.values())

    def shard_location(self, shard: str) -> tuple[Storage, str]:
        """Where a shard's tar is: beside the manifest, or at the `url` an index in another place lists."""
        url = self.shards[shard].get("url")
        if url is None:
            return self.storage, shard
        folder, _, name = url.rpartition("/")
        if folder not in self._stores:
            self._stores[folder] = open_storage(folder or "/")
        return self._stores[folder], name

    def open_shard(self, shard: str, offset: int = 0):
        """The shard's bytes from `offset`, as a stream whose `name` read errors quote."""
        storage, name = self.shard_location(shard)
        return _NamedStream(storage.open_read(name, offset), self.shards[shard].get("url") or f"{self.url}/{shard}")

    def check_shards_present(self, checksums: bool = False) -> None:
        """A listed shard that is missing or of the wrong size is an error before training;
        with `checksums`, so is one whose bytes do not hash to the manifest's sha256 (every
        byte is read: minutes per TB)."""
        for name, shard in self.shards.items():
            storage, stored_as = self.shard_location(name)
            size = storage.size(stored_as)
            where = f" ({shard['url']})" if "url" in shard else ""
            if size != shard["bytes"]:
                found = "missing" if size is None else f"{size} bytes"
                raise StorageError(f"{self.url}: shard {name}{where} is {found}, "
                                   f"the manifest lists {shard['bytes']} bytes")
            if checksums and shard.get("sha256"):
                with storage.open_read(stored_as) as stream:
                    digest, _ = sha256_of(stream)
                if digest != shard["sha256"]:
                    raise StorageError(f"{self.url}: shard {name}{where} has sha256 {digest}, "
                                       f"the manifest lists {shard['sha256']}")


def merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def remaining_segments(manifest: Manifest, consumed: dict[str, list[list[int]]], seed: int,
                       epoch: int) -> list[Segment]:
    """Unconsumed pairs of the epoch, shards in a seeded order."""
    order = list(manifest.order)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    segments = []
    for shard in order:
        position = 0
        for start, end in merge_ranges(consumed.get(shard, [])) + [[manifest.num_pairs(shard)] * 2]:
            if start > position:
                segments.append(Segment(shard, position, start))
            position = max(position, end)
    return segments


def split_even(segments: list[Segment], parts: int) -> list[list[Segment]]:
    """Cut the concatenated segments into `parts` contiguous pieces differing by at most one pair."""
    total = sum(len(s) for s in segments)
    sizes = [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
    pieces: list[list[Segment]] = [[] for _ in range(parts)]
    part, room = 0, sizes[0] if parts else 0
    for segment in segments:
        start = segment.start
        while start < segment.end:
            while room == 0:
                part += 1
                room = sizes[part]
            take = min(room, segment.end - start)
            pieces[part].append(Segment(segment.shard, start, start + take))
            start += take
            room -= take
    return pieces
