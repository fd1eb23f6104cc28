"""The streaming loader: shard list -> split -> read -> shuffle -> decode -> tokenize/mask -> batch.

    loader = StreamingLoader(manifest_url, cfg.data, batch_size, rank, world_size, seed)
    for batch, info in loader.epoch_batches():     # stops after loader.steps_per_epoch()
        ...
    loader.state_dict()  # {"epoch": 3, "consumed": {"000007.tar": [[0, 412]], ...}}

Each (rank, DataLoader worker) reads its own part of the epoch's unconsumed pairs (plan.py).
A batch carries the pair ranges it used up, bad samples included, and the state advances
only when a batch reaches the trainer, so prefetched batches are never counted. The state
of all ranks merged (`merge_states`) resumes exactly, on any number of ranks or workers.

Damaged data is skipped, not fatal (stream.py): each skipped pair is counted by reason
(`counters()`: data/skipped/<reason>), the first in each shard logged with shard, sample and
offset. The trainer stops the run, by `DataDamageError`, when an epoch skips more than
data.max_skipped_fraction of its pairs (`skip_bound`).

A worker's stages (`_PairBatches.__iter__`, data/stages.py): plan -> read pairs -> decode ->
group into batches -> targets -> wire format. Where images are decoded, PIL in the worker or
DALI in the training process, is chosen once, by name (data/decode.py). A batch crosses from
its worker with only the uint8 images in shared memory (wire.py), and a thread of the
training process receives it while the model computes (prefetch.py).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pixelbert_dist.config import DataConfig
from pixelbert_dist.data.batch import BatchBuilder
from pixelbert_dist.data.decode import choose_decoder
from pixelbert_dist.data.mixture import Mixture
from pixelbert_dist.data.plan import Manifest, Segment, merge_ranges, remaining_segments, split_even
from pixelbert_dist.data.prefetch import in_background
from pixelbert_dist.data.stages import group_batches, make_batches, pipeline, plan_worker, read_pairs
from pixelbert_dist.data.stream import SKIP_REASONS
from pixelbert_dist.data.types import BatchInfo, PretrainBatch, Skipped
from pixelbert_dist.data.wire import from_wire, to_wire
from pixelbert_dist.tokenizer import load_tokenizer

log = logging.getLogger("pixelbert_dist.data")


class _PairBatches(IterableDataset):
    def __init__(self, loader: "StreamingLoader", parts: list[list[Segment]], plan_tag: str) -> None:
        self.loader, self.parts, self.plan_tag = loader, parts, plan_tag
        # DataLoader takes batches from its workers in turn, always starting at worker 0: after
        # a resume at step n, worker 0 must play the part of the worker whose turn it was.
        self.rotation = loader.plan_step % loader.num_workers_or_one

    def __iter__(self) -> Iterator[tuple]:
        """This worker's batches: the stages of data/stages.py, in order."""
        worker_info = get_worker_info()
        loader, workers = self.loader, self.loader.num_workers_or_one
        worker = ((worker_info.id if worker_info is not None else 0) + self.rotation) % workers
        plan = plan_worker(loader.manifest, self.parts, self.plan_tag, loader.rank * workers + worker,
                           loader.open_shards, loader.consumed)
        # -> WorkerPlan: this (rank, worker)'s segments, its seeded pair order, the prefix a resume skips
        builder = loader.make_builder(load_tokenizer(loader.cfg.tokenizer), loader.cfg)
        decoder = loader.image_decoder
        stages = [
            read_pairs(loader.manifest, plan),
            # -> Pair: this worker's pairs in its seeded order, still encoded, the consumed prefix skipped
            partial(decoder.decode, builder=builder, seed=loader.seed, epoch=loader.epoch),
            # -> (Pair, image): decoded on the CPU, or its JPEG bytes for DALI; None if it did not decode
            partial(group_batches, size=loader.batch_size),
            # -> Group: batch_size pairs with images, and every pair read for them (skipped ones too)
            partial(make_batches, builder=builder, decoder=decoder, tag=plan.tag),
            # -> (batch, BatchInfo): tokenized, MLM-masked, ITM negatives, seeded by the first pair;
            #    images padded (cpu) or still None with info.jpegs set (dali)
        ]
        if worker_info is not None:  # only a worker's batch crosses a process boundary; in process it stays as is
            stages.append(partial(map, _to_wire))
            # -> ((batch type, fields), BatchInfo): the images in shared memory, the rest by value
        yield from pipeline(*stages)


def _as_made(item):
    return item


def _to_wire(item: tuple) -> tuple:
    return item if item[0] is None else to_wire(item)  # (None, info): a worker's count of its last skips


def _from_wire(item: tuple) -> tuple:
    return item if item[0] is None else from_wire(item)


# the start method DataLoader would use (the platform's default unless one was set), named
# without setting it: get_context() alone would fix the default for the whole process
_START_METHOD = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
WORKER_JOIN_S = 0.1


class _WorkerProcess(multiprocessing.get_context(_START_METHOD).Process):
    """A loader worker that torch's shutdown waits for at most WORKER_JOIN_S. torch joins each
    worker for up to 5 s (MP_STATUS_CHECK_INTERVAL) while it finishes, or hangs in, the batch it
    is making, then terminates it and joins for 5 s more: ~10 s after a worker's error, before
    the process can leave. Nothing a worker is still making is wanted once the epoch is over."""

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout if timeout is None else min(timeout, WORKER_JOIN_S))


class _WorkerContext(type(multiprocessing.get_context(_START_METHOD))):
    Process = _WorkerProcess


class DataDamageError(RuntimeError):
    """An epoch skipped more pairs than data.max_skipped_fraction allows; one line names the shards."""


class StreamingLoader:
    """Batches of one rank, epoch by epoch, with an exact, mergeable position."""

    def __init__(self, manifest_url: str, cfg: DataConfig, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_workers: int = 0, open_shards: int = 4,
                 make_builder: Callable = BatchBuilder) -> None:
        """`make_builder(tokenizer, cfg)` turns pairs into batches: pre-training's by default,
        a fine-tuning task's builder (data/task_batch.py) otherwise."""
        self.manifest_url, self.cfg, self.batch_size = manifest_url, cfg, batch_size
        self.make_builder = make_builder
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.open_shards = num_workers, open_shards
        # one dataset, or with no url and `data.mixture` set, several read as one (mixture.py)
        self.manifest = (Mixture(cfg.mixture, cfg.captions_per_image, cfg.shard_roots, seed)
                         if not manifest_url and cfg.mixture else
                         Manifest(manifest_url, cfg.captions_per_image, cfg.shard_roots))
        self.manifest_url = manifest_url or self.manifest.url
        self.image_decoder = choose_decoder(cfg, make_builder, batch_size)  # where images are decoded
        self.epoch = 0
        self.consumed: dict[str, list[list[int]]] = {}
        # The epoch's split is made from the pairs left when it was planned (`plan_base`) for
        # one layout (ranks x workers). Resumed on the same layout, every worker replays its
        # order and skips what it used: the continuation is the uninterrupted run's. On another
        # layout, what is left is split anew.
        self.plan_base: dict[str, list[list[int]]] = {}
        self.plan_layout = [world_size, self.num_workers_or_one]
        self.plan_step = 0  # batches handed out since the plan was made (the same on every rank)
        self.skipped = 0
        self.skipped_by: Counter[str] = Counter()  # of `skipped`, per stream.SKIP_REASONS entry
        self.epoch_skipped = 0  # this epoch's, against data.max_skipped_fraction
        self.damaged: dict[str, dict] = {}  # this epoch, this rank: shard -> {pairs, reasons, first error}
        self._bound: tuple[int, int] | None = None  # (epoch, skip_bound)
        self.truncated = 0
        self.pairs_by_dataset: Counter[str] = Counter()  # a mixture's pairs consumed, per dataset, in all

    @property
    def decoder(self) -> str:
        """The image path in use: "cpu" or "dali" (data/decode.py)."""
        return self.image_decoder.name

    @property
    def num_workers_or_one(self) -> int:
        return max(1, self.num_workers)

    def _parts(self) -> tuple[list[list[Segment]], str]:
        segments = remaining_segments(self.manifest, self.plan_base, self.seed, self.epoch)
        base_size = sum(end - start for ranges in self.plan_base.values() for start, end in ranges)
        tag = f"{self.seed}-{self.epoch}-{self.plan_layout}-{base_size}"
        return split_even(segments, self.world_size * self.num_workers_or_one), tag

    def counters(self) -> dict[str, int]:
        """What the loader counted, as the trainer logs it (summed over ranks): every rank gives
        the same names, one per dataset of a mixture."""
        datasets = getattr(self.manifest, "datasets", {})
        return {"skipped_samples": self.skipped,
                **{f"data/skipped/{reason}": self.skipped_by[reason] for reason in SKIP_REASONS},
                **{f"data/pairs/{name}": self.pairs_by_dataset[name] for name in datasets}}

    def skip_bound(self) -> int:
        """Pairs this epoch may skip, on all ranks together, before the run stops."""
        if self._bound is None or self._bound[0] != self.epoch:  # asked every step: counted once an epoch
            pairs = sum(map(self.manifest.num_pairs, self.manifest.shard_names(self.epoch)))
            self._bound = (self.epoch, int(self.cfg.max_skipped_fraction * pairs))
        return self._bound[1]

    def steps_per_epoch(self) -> int:
        """Full batches every rank can make from this epoch's plan (all ranks agree)."""
        return self._full_batches(self._parts()[0])

    def _full_batches(self, parts: list[list[Segment]]) -> int:
        workers = self.num_workers_or_one
        per_rank = [sum(sum(len(s) for s in parts[r * workers + w]) // self.batch_size for w in range(workers))
                    for r in range(self.world_size)]
        return min(per_rank)

    def epoch_batches(self) -> Iterator[tuple[PretrainBatch, BatchInfo]]:
        """This epoch's remaining batches; the position advances as each one is handed out."""
        parts, tag = self._parts()
        steps = self._full_batches(parts) - self.plan_step  # after a resume: the rest of the epoch
        dataset = _PairBatches(self, parts, tag)
        # collate_fn: as made; the default would turn to_wire's arrays back into shared tensors
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_made,
                            persistent_workers=False, prefetch_factor=2 if self.num_workers else None,
                            multiprocessing_context=_WorkerContext() if self.num_workers else None)
        # Both stop with this generator: the thread when `received` is closed, the DataLoader's
        # workers when its iterator is collected (within a second: _WorkerProcess).
        received = iter(loader)
        if self.num_workers:  # a thread takes each batch from the workers while the model computes
            received = in_background(map(_from_wire, received), depth=2)
        # -> (batch, BatchInfo) as a worker made it; (None, BatchInfo): what it skipped after its last batch
        handed = 0
        for batch, info in received:
            if batch is not None and handed >= steps:
                break
            skips = info.skips  # before finish: DALI's path rebuilds the BatchInfo without them
            if batch is not None:
                batch, info = self.image_decoder.finish(batch, info)
                # -> (batch, BatchInfo) as the model takes it: DALI's images decoded, their failures dropped
            self._count(info, skips)
            if batch is None:
                continue
            handed += 1
            self.plan_step += 1
            yield batch, info

    def _count(self, info: BatchInfo, skips: list[Skipped]) -> None:
        for shard, ranges in info.consumed.items():
            self.consumed[shard] = merge_ranges(self.consumed.get(shard, []) + ranges)
            dataset = self.manifest.dataset_of(shard)
            if dataset is not None:
                self.pairs_by_dataset[dataset] += sum(end - start for start, end in ranges)
        self.skipped += info.skipped
        self.epoch_skipped += info.skipped
        self.truncated += info.truncated
        placed = 0
        for skip in skips:
            self.skipped_by[skip.reason] += skip.pairs
            placed += skip.pairs
            if count_damage(self.damaged, skip.shard, skip.reason, skip.pairs, skip.first):
                log.warning("skipping damaged data in %s (data/skipped/%s; more in this shard is counted, not "
                            "logged): %s", skip.shard, skip.reason, skip.first)
        self.skipped_by["corrupt_image"] += info.skipped - placed  # DALI's failed images: counted, not placed

    def next_epoch(self) -> None:
        self.epoch += 1
        self.consumed, self.plan_base, self.plan_step = {}, {}, 0
        self.epoch_skipped, self.damaged = 0, {}
        self.plan_layout = [self.world_size, self.num_workers_or_one]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": {s: [list(r) for r in v] for s, v in self.consumed.items()},
                "plan_base": self.plan_base, "plan_layout": self.plan_layout, "plan_step": self.plan_step,
                "skipped": self.skipped, "skipped_by": dict(self.skipped_by), "epoch_skipped": self.epoch_skipped,
                "truncated": self.truncated,
                "pairs_by_dataset": dict(self.pairs_by_dataset), "captions_per_image": self.manifest.group}

    def load_state_dict(self, state: dict) -> None:
        unknown = [shard for shard in state["consumed"] if not self.manifest.knows(shard)]
        if unknown:
            raise ValueError(f"loader state names shards not in {self.manifest_url}: {sorted(unknown)[:3]}")
        group = state.get("captions_per_image", 1)
        if group != self.manifest.group:  # pair numbers within a window depend on the dealing
            raise ValueError(f"loader state was saved with data.captions_per_image={group}; this run has "
                             f"{self.manifest.group}. Resume with the same value.")
        self.epoch = state["epoch"]
        self.consumed = {s: merge_ranges(v) for s, v in state["consumed"].items()}
        layout = [self.world_size, self.num_workers_or_one]
        if state.get("plan_layout") == layout:
            self.plan_base, self.plan_step = state.get("plan_base", {}), state.get("plan_step", 0)
        else:
            self.plan_base, self.plan_layout, self.plan_step = dict(self.consumed), layout, 0
        # counters are totals over ranks: one rank carries them on, or merging would double them
        keep = self.rank == 0
        self.skipped = state.get("skipped", 0) if keep else 0
        self.skipped_by = Counter(state.get("skipped_by", {}) if keep else {})
        self.epoch_skipped = state.get("epoch_skipped", 0) if keep else 0
        self.truncated = state.get("truncated", 0) if keep else 0
        self.pairs_by_dataset = Counter(state.get("pairs_by_dataset", {}) if keep else {})


def merge_states(states: list[dict]) -> dict:
    """One position from every rank's (same epoch): the union of consumed ranges."""
    epochs = {s["epoch"] for s in states}
    if len(epochs) != 1:
        raise ValueError(f"ranks disagree on the epoch: {sorted(epochs)}")
    consumed: dict[str, list[list[int]]] = {}
    for state in states:
        for shard, ranges in state["consumed"].items():
            consumed[shard] = merge_ranges(consumed.get(shard, []) + ranges)
    plans = {json.dumps([s.get("plan_base"), s.get("plan_layout"), s.get("plan_step")], sort_keys=True)
             for s in states}
    if len(plans) != 1:
        raise ValueError("ranks disagree on the epoch's plan")
    return {"epoch": epochs.pop(), "consumed": consumed, "plan_base": states[0].get("plan_base", {}),
            "plan_layout": states[0].get("plan_layout"), "plan_step": states[0].get("plan_step", 0),
            "captions_per_image": states[0].get("captions_per_image", 1),
            "skipped": sum(s.get("skipped", 0) for s in states),
            "skipped_by": dict(sum((Counter(s.get("skipped_by", {})) for s in states), Counter())),
            "epoch_skipped": sum(s.get("epoch_skipped", 0) for s in states),
            "truncated": sum(s.get("truncated", 0) for s in states),
            "pairs_by_dataset": dict(sum((Counter(s.get("pairs_by_dataset", {})) for s in states), Counter()))}


def count_damage(damaged: dict[str, dict], shard: str, reason: str, pairs: int, first: str) -> bool:
    """Count `pairs` of `shard` skipped for `reason` into `damaged` (shard -> pairs, reasons, its
    first error: what past_the_bound names); True when the shard is new there (log it once)."""
    new = shard not in damaged
    entry = damaged.setdefault(shard, {"pairs": 0, "reasons": Counter(), "first": first})
    entry["pairs"] += pairs
    entry["reasons"][reason] += pairs
    return new


def damage_error(reports: list[dict[str, dict]], skipped: int, bound: int, fraction: float, step: int,
                 epoch: int) -> DataDamageError:
    """The one line every rank stops with: how many pairs, the bound, and the damaged shards of
    all ranks' `damaged` (most pairs first)."""
    return DataDamageError(f"step {step}: pairs skipped in epoch {epoch}: "
                           f"{past_the_bound(reports, skipped, bound, fraction)}")


def past_the_bound(reports: list[dict[str, dict]], skipped: int, bound: int, fraction: float) -> str:
    """"N, more than data.max_skipped_fraction=F allows (B); damaged shards: ..." and what to do:
    damage_error's words, which evaluation's held-out set stops with too."""
    shards: dict[str, dict] = {}
    for report in reports:
        for shard, damaged in report.items():
            merged = shards.setdefault(shard, {"pairs": 0, "reasons": Counter()})
            merged["pairs"] += damaged["pairs"]
            merged["reasons"].update(damaged["reasons"])
    named = sorted(shards.items(), key=lambda item: -item[1]["pairs"])
    listed = ", ".join(f"{shard} ({', '.join(f'{r} {n}' for r, n in sorted(d['reasons'].items()))})"
                       for shard, d in named[:10])
    more = f" and {len(named) - 10} more" if len(named) > 10 else ""
    return (f"{skipped}, more than data.max_skipped_fraction={fraction} allows ({bound}); "
            f"damaged shards: {listed or 'none named (images that failed on the GPU)'}{more}. "
            "Each shard's first bad sample is in the log; `python -m data_pipeline.verify` lists them all. "
            "Repair or drop those shards, or raise data.max_skipped_fraction to go on.")
