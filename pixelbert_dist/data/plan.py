"""Stage 1 of the loader: which image-caption pairs each (rank, loader worker) reads.

An epoch counts pairs (the paper's definition: COCO has ~5 per image, VG ~50). A shard's
pairs are numbered window by window: the samples are taken MIX_WINDOW at a time in tar
order and their captions dealt round-robin (caption 0 of each, then caption 1 of each...),
so the captions of one image are spread out rather than back to back, reading stays
sequential, and a position is one integer per shard: a reader seeks to the window's first
sample and skips into it. With `captions_per_image` G > 1, captions are dealt G at a time,
so a batch holds runs of G pairs of one image and the CNN runs once for the run (SOHO).

Planning needs only each shard's pair count, from the manifest: O(shards) whatever the number
of samples. A worker reads a shard's sample table (offsets, caption counts) when it opens the
shard, and keeps the last few.

Progress is a set of consumed pair ranges per shard. The pairs not yet consumed, in a
shard order drawn from (seed, epoch), are cut into equal contiguous parts, one per global
worker. Because the cut is made from what remains, a job resumed on a different number of
ranks or workers continues with exactly the unseen pairs.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from data_pipeline.dataset_manifest import ManifestError, pairs_of, read_manifest, read_table
from data_pipeline.sample_table import SampleTable
from data_pipeline.storage import Storage, StorageError, open_storage, sha256_of

__all__ = ["ManifestError", "Manifest", "Segment", "remaining_segments", "split_even", "merge_ranges"]
MIX_WINDOW = 16  # samples whose captions are dealt round-robin
TABLES_KEPT = 8  # sample tables a process keeps in memory (a worker has `data.open_shards` open at once)


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
    """A dataset as the loader plans and reads it: the manifest's shards and their pair counts,
    and each shard's sample table, read when a worker opens the shard (a few kept)."""

    def __init__(self, url: str, captions_per_image: int = 1, shard_roots: Iterable[str] = ()) -> None:
        """`shard_roots` (data.shard_roots): more places an index manifest's tars may be (tar_roots)."""
        self.url, self.group = url, captions_per_image
        self.storage = open_storage(url)
        data = read_manifest(self.storage, url, shard_roots)
        self.shards = {s["name"]: s for s in data["shards"]}
        self._stores: dict[str, Storage] = {}
        self._tables: OrderedDict[str, tuple[SampleTable, list[int]]] = OrderedDict()

    # -- what planning needs: names and pair counts, from the manifest alone
    def shard_names(self, epoch: int = 0) -> list[str]:
        """The shards an epoch reads, in manifest order."""
        return list(self.shards)

    def knows(self, shard: str) -> bool:
        return shard in self.shards

    def num_pairs(self, shard: str) -> int:
        return pairs_of(self.shards[shard])

    @property
    def total_pairs(self) -> int:
        return sum(map(self.num_pairs, self.shards))

    def dataset_of(self, shard: str) -> str | None:
        """The mixture's dataset a shard belongs to; None: not a mixture."""
        return None

    # -- what reading needs: a shard's table
    def table(self, shard: str) -> SampleTable:
        """The shard's checked sample table; the last few read stay in memory."""
        return self._table_and_windows(shard)[0]

    def _table_and_windows(self, shard: str) -> tuple[SampleTable, list[int]]:
        if shard in self._tables:
            self._tables.move_to_end(shard)
            return self._tables[shard]
        table = read_table(self.storage, self.url, self.shards[shard])
        # first pair index of every window of MIX_WINDOW samples
        sums = np.add.reduceat(table.captions, np.arange(0, len(table), MIX_WINDOW)) if len(table) else []
        starts = np.concatenate(([0], np.cumsum(sums)[:-1])).astype(np.int64).tolist() if len(table) else []
        self._tables[shard] = (table, starts)
        while len(self._tables) > TABLES_KEPT:
            self._tables.popitem(last=False)
        return self._tables[shard]

    def entry(self, shard: str) -> dict:
        """The shard's manifest entry (name, bytes, layout, url...)."""
        return self.shards[shard]

    def locate(self, shard: str, pair: int) -> tuple[int, int]:
        """(window's first sample index, position of the pair within the window)."""
        _, starts = self._table_and_windows(shard)
        window = bisect.bisect_right(starts, pair) - 1
        return window * MIX_WINDOW, pair - starts[window]

    def window_counts(self, shard: str, first_sample: int) -> list[int]:
        return self.table(shard).captions[first_sample:first_sample + MIX_WINDOW].tolist()

    def runs(self, segment: "Segment") -> Iterator[int]:
        """Run lengths of a segment's pairs: each run is one image's consecutive pairs. One pair
        per run when captions are not grouped: then no table is read to know them."""
        if self.group == 1:
            yield from itertools.repeat(1, len(segment))
            return
        first_sample, position = self.locate(segment.shard, segment.start)
        pair = segment.start
        while pair < segment.end:
            for length in run_lengths(self.window_counts(segment.shard, first_sample), self.group):
                if position >= length:  # runs before the segment's start
                    position -= length
                    continue
                take = min(length - position, segment.end - pair)
                yield take
                pair, position = pair + take, 0
                if pair >= segment.end:
                    return
            first_sample += MIX_WINDOW

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
        byte is read: minutes per TB). Sizes come from one listing per location (1,000 objects a
        request on S3), not a request per shard."""
        listings: dict[str, dict[str, int]] = {}
        for name, shard in self.shards.items():
            storage, stored_as = self.shard_location(name)
            if storage.url not in listings:
                listings[storage.url] = storage.sizes()
            size = listings[storage.url].get(stored_as)
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

    def __getstate__(self) -> dict:
        # loader workers get a copy: without the tables, which each worker reads for itself
        return {**self.__dict__, "_tables": OrderedDict()}


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
    order = manifest.shard_names(epoch)
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
