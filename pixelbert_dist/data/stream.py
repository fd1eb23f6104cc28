"""Stages 2-3 of the loader: read a worker's segments sequentially, interleave them seeded.

Shards are read as byte streams (a ranged GET on S3) starting at the first needed sample;
only raw member bytes and our own JSON come out of a tar: nothing is unpickled.

Damage costs its pairs, not the run: a sample that cannot be read gives a placeholder for
each of its pairs (`Pair.damage`: why, and the error naming shard, sample and offset), and
reading goes on at the next sample the table lists. Where nothing more of the segment can be
read (its table is bad, the shard cannot be opened) every pair left is a placeholder. The
placeholders keep each pair's number, so a batch consumes them like any pair and a resume
neither repeats nor re-reads them; the loader counts them by reason and bounds them.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from data_pipeline.dataset_manifest import ManifestError
from data_pipeline.shard_format import IMG2DATASET, ShardFormatError, read_listed, sample_content, sample_where
from data_pipeline.storage import StorageError
from pixelbert_dist.data.plan import Manifest, Segment, round_robin

# Why a pair was skipped: the loader logs one counter per reason (data/skipped/<reason>).
SKIP_REASONS = (
    "truncated_shard",  # the shard ends before the sample (cut short after its manifest was written)
    "bad_tar",          # not one tar run of the sample's own plain files: a bad or zeroed header, another
                        # sample's bytes (swapped shards, a wrong offset), not a tar at all
    "unsafe_member",    # a member named ../x or /abs, or a link
    "too_large",        # a member header announcing more than the cap or than the sample holds
    "bad_captions",     # KEY.json not JSON or without the listed captions (an indexed sample: no caption)
    "bad_table",        # the shard's sample table unreadable or at odds with the manifest: the rest of the segment
    "missing_shard",    # the shard cannot be opened (deleted, access refused): the rest of the segment
    "corrupt_image",    # the image does not decode
)


class Damage(NamedTuple):
    """Why a pair could not be read: a SKIP_REASONS entry, and the error that names where."""

    reason: str
    error: Exception


@dataclass(frozen=True)
class Pair:
    """One image-caption pair, still encoded."""

    shard: str
    index: int      # pair index within the shard
    key: str        # the image's sample key
    jpeg: bytes
    caption: str
    target: object = None        # the caption's task label (VQA answers, NLVR2 truth), if any
    jpeg2: bytes | None = None   # a second image (NLVR2's right one), if any
    damage: Damage | None = None  # set on a placeholder for a pair that could not be read (no bytes)
    offset: int = -1             # the sample's first byte in its shard, for messages (-1: not read from one)


def read_segment(manifest: Manifest, segment: Segment) -> Iterator[Pair]:
    """Pairs [start, end) of a shard, in the shard's pair order; the first damaged sample's error
    is raised (evaluation reads its held-out set whole or not at all)."""
    for pair in read_segment_skipping(manifest, segment):
        if pair.damage is not None:
            raise pair.damage.error
        yield pair


def read_segment_skipping(manifest: Manifest, segment: Segment) -> Iterator[Pair]:
    """Pairs [start, end) of a shard, in the shard's pair order: a placeholder (`damage` set) for
    every pair that cannot be read."""
    pair = segment.start
    try:
        for item in _read_segment(manifest, segment):
            yield item
            pair += 1
    except (ManifestError, StorageError) as err:  # the table, or the shard: nothing more of it can be read
        damage = Damage("bad_table" if isinstance(err, ManifestError) else "missing_shard", err.with_traceback(None))
        for index in range(pair, segment.end):
            yield Pair(segment.shard, index, "", b"", "", damage=damage)
    except OSError as err:  # an outage (StorageUnavailable) or a shard that is no file: not damage, the run stops
        # the same type (a caller may wait out an outage), the shard named first
        raise type(err)(f"{segment.shard}: reading failed: {type(err).__name__}: {err}") from err


def _read_segment(manifest: Manifest, segment: Segment) -> Iterator[Pair]:
    """read_segment_skipping's pairs while the table and the stream last (windows dealt round-robin)."""
    first_sample, position = manifest.locate(segment.shard, segment.start)
    table = manifest.table(segment.shard)
    offset = int(table.offsets[first_sample])
    indexed = manifest.entry(segment.shard).get("layout") == IMG2DATASET  # an existing tar: only listed samples
    pair = segment.start
    with manifest.open_shard(segment.shard, offset) as stream:
        samples = read_listed(stream, table.entries(first_sample), offset)
        while pair < segment.end:
            counts = manifest.window_counts(segment.shard, first_sample)
            read = [_content(table.entry(first_sample + i), next(samples), indexed, stream.name)
                    for i in range(len(counts))]
            for sample, caption in round_robin(counts, manifest.group)[position:]:
                if pair >= segment.end:
                    return
                content = read[sample]
                if isinstance(content, Damage):
                    yield Pair(segment.shard, pair, "", b"", "", damage=content)
                else:
                    key, image, captions, targets, image2 = content
                    yield Pair(segment.shard, pair, key, image, captions[caption],
                               None if targets is None else targets[caption], image2,
                               offset=int(table.offsets[first_sample + sample]))
                pair += 1
            first_sample, position = first_sample + len(counts), 0


def _content(entry: dict, members: dict | ShardFormatError, indexed: bool, source: str) -> tuple | Damage:
    """(key, image, captions, targets, second image) of one listed sample, or why it cannot be used."""
    if isinstance(members, ShardFormatError):
        return Damage(members.reason, members)
    try:
        return (entry["key"], *sample_content(members, entry, indexed, sample_where(source, entry)))
    except ShardFormatError as err:
        return Damage(err.reason, err.with_traceback(None))


def interleave_order(manifest: Manifest, segments: list[Segment], open_count: int,
                     rng: random.Random) -> Iterator[int]:
    """Which segment each successive pair comes from: up to `open_count` open at a time, the
    next run (one image's consecutive pairs) drawn at random. Made as it is consumed, from the
    segments' lengths (or, with grouped captions, their tables' runs, read as each segment
    opens): a resumed worker replays it, and no list of the worker's pairs is ever held."""
    pending, open_ = iter(range(len(segments))), []
    runs: dict[int, Iterator[int]] = {}
    while True:
        while len(open_) < open_count and (segment := next(pending, None)) is not None:
            open_.append(segment)
            runs[segment] = _runs(manifest, segments[segment])
        if not open_:
            return
        slot = rng.randrange(len(open_))
        segment = open_[slot]
        length = next(runs[segment], None)
        if length is None:
            open_.pop(slot)
            del runs[segment]
            continue
        yield from itertools.repeat(segment, length)


def _runs(manifest: Manifest, segment: Segment) -> Iterator[int]:
    """The segment's runs; where its table cannot be read, runs of one pair (its placeholders)."""
    left = len(segment)
    try:
        for length in manifest.runs(segment):
            yield length
            left -= length
    except ManifestError:
        yield from itertools.repeat(1, left)


def interleave(manifest: Manifest, segments: list[Segment], order: Iterator[int], skip: int) -> Iterator[Pair]:
    """The pairs of the order after its first `skip`, each segment read as one sequential stream
    (placeholders for the pairs it cannot read)."""
    starts = [s.start for s in segments]
    for segment in itertools.islice(order, skip):
        starts[segment] += 1
    streams: dict[int, Iterator[Pair]] = {}
    for segment in order:
        if segment not in streams:
            piece = segments[segment]
            streams[segment] = read_segment_skipping(manifest, Segment(piece.shard, starts[segment], piece.end))
        yield next(streams[segment])
