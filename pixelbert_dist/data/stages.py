"""The stages of one loader worker, each a generator over the previous one's items.

loader._PairBatches lists them in order: plan -> read pairs -> decode -> group into batches
-> targets -> wire format. `pipeline(source, *stages)` chains them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from pixelbert_dist.data.decode import ImageDecoder
from pixelbert_dist.data.plan import Manifest, Segment, merge_ranges
from pixelbert_dist.data.stream import Pair, interleave, interleave_order
from pixelbert_dist.data.types import BatchInfo, Skipped


def pipeline(source: Iterable, *stages: Callable[[Iterable], Iterator]) -> Iterator:
    """`source` through each stage in turn: stages[-1](...stages[0](source))."""
    items = iter(source)
    for stage in stages:
        items = stage(items)
    return items


@dataclass(frozen=True)
class WorkerPlan:
    """One global worker's part of the epoch and where it stands in it."""

    segments: list[Segment]
    open_shards: int  # segments read at once, interleaved (stream.interleave_order)
    skip: int         # leading pairs of the order already consumed: a resume replays the order past them
    tag: str          # seeds the order and every batch's targets

    def order(self, manifest: Manifest) -> Iterator[int]:
        """The segment of each successive pair, the same each time it is asked for."""
        return interleave_order(manifest, self.segments, self.open_shards, random.Random(self.tag))


def plan_worker(manifest: Manifest, parts: list[list[Segment]], plan_tag: str, global_worker: int,
                open_shards: int, consumed: dict[str, list[list[int]]]) -> WorkerPlan:
    plan = WorkerPlan(parts[global_worker], open_shards, 0, f"{plan_tag}-{global_worker}")
    skip = consumed_prefix(plan.segments, plan.order(manifest), consumed)
    return WorkerPlan(plan.segments, open_shards, skip, plan.tag)


def consumed_prefix(segments: list[Segment], order: Iterable[int], consumed: dict[str, list[list[int]]]) -> int:
    """How many leading pairs of a worker's order are already consumed (a worker uses a prefix)."""
    position, count = [s.start for s in segments], 0
    for segment in order:
        shard, index = segments[segment].shard, position[segment]
        if not any(start <= index < end for start, end in consumed.get(shard, [])):
            return count
        position[segment] += 1
        count += 1
    return count


def read_pairs(manifest: Manifest, plan: WorkerPlan) -> Iterator[Pair]:
    """The plan's pairs in order; a placeholder (Pair.damage) for each that cannot be read."""
    return interleave(manifest, plan.segments, plan.order(manifest), plan.skip)


@dataclass
class Group:
    """The pairs of one batch, with their images, and every pair read for them."""

    pairs: list[Pair]
    images: list                          # per pair, as the decoder's `decode` gave it
    consumed: dict[str, list[list[int]]]  # merged ranges, pairs that did not decode included
    skipped: int                          # pairs damaged or whose image did not decode
    skips: list[Skipped]                  # where and why, per shard and reason


def group_batches(decoded: Iterable[tuple[Pair, object]], size: int) -> Iterator[Group]:
    """Groups of `size` pairs that decoded. The pairs after the last group: if some were skipped,
    a group without pairs that counts them, every pair after the last group consumed (the
    worker's part of the epoch is read, so a resume does not read them again); otherwise
    dropped unconsumed, as they always were."""
    pairs, images, consumed, skips = [], [], [], {}
    for pair, image in decoded:
        consumed.append((pair.shard, pair.index))
        if image is None or pair.damage is not None:
            _count_skip(skips, pair)
            continue
        pairs.append(pair)
        images.append(image)
        if len(pairs) == size:
            yield _group(pairs, images, consumed, skips)
            pairs, images, consumed, skips = [], [], [], {}
    if skips:
        yield _group([], [], consumed, skips)


def _count_skip(skips: dict[tuple[str, str], list], pair: Pair) -> None:
    reason = "corrupt_image" if pair.damage is None else pair.damage.reason
    if (pair.shard, reason) not in skips:
        error = (f"{pair.shard}: sample {pair.key!r} at offset {pair.offset}: its image does not decode"
                 if pair.damage is None
                 else " ".join(str(pair.damage.error).split()))  # one line
        skips[pair.shard, reason] = [0, error]
    skips[pair.shard, reason][0] += 1


def _group(pairs: list[Pair], images: list, consumed: list[tuple[str, int]],
           skips: dict[tuple[str, str], list]) -> Group:
    ranges: dict[str, list[list[int]]] = {}
    for shard, index in consumed:
        ranges.setdefault(shard, []).append([index, index + 1])
    return Group(pairs, images, {s: merge_ranges(r) for s, r in ranges.items()},
                 sum(count for count, _ in skips.values()),
                 [Skipped(shard, reason, count, first) for (shard, reason), (count, first) in skips.items()])


def make_batches(groups: Iterable[Group], builder, decoder: ImageDecoder,
                 tag: str) -> Iterator[tuple[object, BatchInfo]]:
    """Each group's batch (the builder tokenizes, masks, draws ITM negatives) and its BatchInfo;
    a group without pairs (group_batches' last) as (None, BatchInfo) that counts what it skipped."""
    for group in groups:
        pairs = group.pairs
        if not pairs:
            yield None, BatchInfo([], [], group.consumed, group.skipped, 0, skips=group.skips)
            continue
        # seeded by the batch's first pair: the same batch gets the same targets after a resume
        generator = torch.Generator().manual_seed(
            random.Random(f"{tag}-{pairs[0].shard}-{pairs[0].index}").getrandbits(63))
        truncated_before = builder.truncated
        batch, jpegs = decoder.build(builder, pairs, group.images, generator)
        yield batch, BatchInfo([p.key for p in pairs], [(p.shard, p.index) for p in pairs], group.consumed,
                               group.skipped, builder.truncated - truncated_before, jpegs, group.skips)
