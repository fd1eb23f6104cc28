"""Stages 2-3 of the loader: read a worker's segments sequentially, interleave them seeded.

Shards are read as byte streams (a ranged GET on S3) starting at the first needed sample;
only raw member bytes and our own JSON come out of a tar: nothing is unpickled.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

from data_pipeline.shard_format import (IMG2DATASET, ShardFormatError, caption_of, image_member, read_listed,
                                        sample_metadata)
from pixelbert_dist.data.plan import Manifest, Segment, round_robin


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


def read_segment(manifest: Manifest, segment: Segment) -> Iterator[Pair]:
    """Pairs [start, end) of a shard, in the shard's pair order (windows dealt round-robin)."""
    first_sample, position = manifest.locate(segment.shard, segment.start)
    table = manifest.table(segment.shard)
    offset = int(table.offsets[first_sample])
    indexed = manifest.entry(segment.shard).get("layout") == IMG2DATASET  # an existing tar: only listed samples
    pair = segment.start
    with manifest.open_shard(segment.shard, offset) as stream:
        samples = read_listed(stream, table.entries(first_sample), offset)
        while pair < segment.end:
            counts = manifest.window_counts(segment.shard, first_sample)
            decoded = [_unpack(table.entry(first_sample + i), next(samples), indexed, segment.shard)
                       for i in range(len(counts))]
            for sample, caption in round_robin(counts, manifest.group)[position:]:
                if pair >= segment.end:
                    return
                key, image, captions, targets, image2 = decoded[sample]
                yield Pair(segment.shard, pair, key, image, captions[caption],
                           None if targets is None else targets[caption], image2)
                pair += 1
            first_sample, position = first_sample + len(counts), 0


def _unpack(entry: dict, members: dict[str, bytes], indexed: bool, shard: str) -> tuple:
    """(key, image bytes, captions, targets, second image) of one sample the manifest lists."""
    key = entry["key"]
    where = f"{shard}: sample {key!r}"
    if indexed:  # img2dataset's layout, checked when it was indexed: a failure here means the tar changed since
        image = image_member(members)
        try:
            caption = caption_of(members)
        except ValueError as err:  # KEY.txt not UTF-8
            raise ShardFormatError(f"{where}: its caption does not parse ({type(err).__name__})") from None
        if image is None or caption is None:
            raise ShardFormatError(f"{where}: no image or no caption (the tar changed since it was indexed?)")
        return key, members[image], [caption], None, None
    meta = sample_metadata(members, where, entry["captions"])
    return key, members.get("jpg", b""), meta["captions"], meta.get("targets"), members.get("right.jpg")


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
            runs[segment] = manifest.runs(segments[segment])
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


def interleave(manifest: Manifest, segments: list[Segment], order: Iterator[int], skip: int) -> Iterator[Pair]:
    """The pairs of the order after its first `skip`, each segment read as one sequential stream."""
    starts = [s.start for s in segments]
    for segment in itertools.islice(order, skip):
        starts[segment] += 1
    streams: dict[int, Iterator[Pair]] = {}
    for segment in order:
        if segment not in streams:
            piece = segments[segment]
            streams[segment] = read_segment(manifest, Segment(piece.shard, starts[segment], piece.end))
        yield next(streams[segment])
