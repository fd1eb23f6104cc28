"""The streaming loader: shard list -> split -> read -> shuffle -> decode -> tokenize/mask -> batch.

    loader = StreamingLoader(manifest_url, cfg.data, batch_size, rank, world_size, seed)
    for batch, info in loader.epoch_batches():     # stops after loader.steps_per_epoch()
        ...
    loader.state_dict()  # {"epoch": 3, "consumed": {"000007.tar": [[0, 412]], ...}}

Each (rank, DataLoader worker) reads its own part of the epoch's unconsumed pairs (plan.py).
A batch carries the pair ranges it used up, bad samples included, and the state advances
only when a batch reaches the trainer, so prefetched batches are never counted. The state
of all ranks merged (`merge_states`) resumes exactly, on any number of ranks or workers.

A batch crosses from its worker with only the uint8 images in shared memory (`_to_wire`), and
a thread of the training process receives it while the model computes (prefetch.py).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pixelbert_dist.config import DataConfig
from pixelbert_dist.data.batch import BatchBuilder, drop_images, image_rows
from pixelbert_dist.data.dali_decode import resolve_decoder
from pixelbert_dist.data.plan import Manifest, Segment, merge_ranges, remaining_segments, split_even
from pixelbert_dist.data.prefetch import in_background
from pixelbert_dist.data.stream import interleave, interleave_order
from pixelbert_dist.model import PretrainBatch, image_sizes
from pixelbert_dist.tokenizer import load_tokenizer


@dataclass
class BatchInfo:
    """What travels with a batch from a loader worker."""

    keys: list[str]                   # image key of each pair
    pairs: list[tuple[str, int]]      # (shard, pair index) of each pair in the batch
    consumed: dict[str, list[list[int]]]  # every pair read for this batch, skipped ones too
    skipped: int                      # pairs whose image did not decode
    truncated: int                    # captions cut to max_text_len
    jpegs: list[bytes] | None = None  # per image row, when the images are decoded on the GPU


class _PairBatches(IterableDataset):
    def __init__(self, loader: "StreamingLoader", parts: list[list[Segment]], plan_tag: str) -> None:
        self.loader, self.parts, self.plan_tag = loader, parts, plan_tag
        # DataLoader takes batches from its workers in turn, always starting at worker 0: after
        # a resume at step n, worker 0 must play the part of the worker whose turn it was.
        self.rotation = loader.plan_step % loader.num_workers_or_one

    def __iter__(self) -> Iterator[tuple]:  # (batch, info), the batch as _to_wire made it in a worker
        info = get_worker_info()
        loader = self.loader
        worker = ((info.id if info is not None else 0) + self.rotation) % loader.num_workers_or_one
        global_worker = loader.rank * loader.num_workers_or_one + worker
        segments = self.parts[global_worker]
        tag = f"{self.plan_tag}-{global_worker}"
        order = interleave_order(loader.manifest, segments, loader.open_shards, random.Random(tag))
        skip = _consumed_prefix(segments, order, loader.consumed)
        builder = loader.make_builder(load_tokenizer(loader.cfg.tokenizer), loader.cfg)
        pairs, images, consumed, skipped = [], [], [], 0
        for pair in interleave(loader.manifest, segments, order, skip):
            consumed.append((pair.shard, pair.index))
            if loader.decoder == "cpu":
                try:
                    images.append(builder.image(pair))
                except ValueError:
                    skipped += 1
                    continue
            else:
                images.append(pair.jpeg)
            pairs.append(pair)
            if len(pairs) == loader.batch_size:
                # seeded by the batch's first pair: the same batch gets the same targets after a resume
                generator = torch.Generator().manual_seed(
                    random.Random(f"{tag}-{pairs[0].shard}-{pairs[0].index}").getrandbits(63))
                truncated_before = builder.truncated
                batch = builder(pairs, images, generator)
                ranges: dict[str, list[list[int]]] = {}
                for shard, index in consumed:
                    ranges.setdefault(shard, []).append([index, index + 1])
                jpegs = None if batch.images is not None else [pairs[i].jpeg for i in image_rows([p.key for p in pairs])[0]]
                # only a worker's batch crosses a process boundary; in process it stays as made
                yield _to_wire(batch) if info is not None else batch, BatchInfo([p.key for p in pairs], [(p.shard, p.index) for p in pairs],
                                       {s: merge_ranges(r) for s, r in ranges.items()}, skipped,
                                       builder.truncated - truncated_before, jpegs)
                pairs, images, consumed, skipped = [], [], [], 0


def _to_wire(batch):
    """A batch as it crosses from a loader worker: the images in shared memory, the rest by value.

    DataLoader moves every tensor through shared memory, and the receiving process fetches each
    one's handle from the worker over a socket: ~0.6 ms a tensor on two busy cores, most of the
    data wait. The small text tensors are cheaper copied, and the mask is sent as image sizes.
    """
    fields = {}
    for name, value in vars(batch).items():
        if name == "pixel_mask" and value is not None:
            value = (image_sizes(value).numpy(), tuple(value.shape[-2:]))
        elif name != "images" and isinstance(value, torch.Tensor):
            value = value.numpy()
        fields[name] = value
    return type(batch), fields


def _from_wire(item: tuple[tuple, BatchInfo]) -> tuple[PretrainBatch, BatchInfo]:
    (kind, fields), info = item
    for name, value in fields.items():
        if name == "pixel_mask" and value is not None:
            sizes, (height, width) = value
            # model.pixel_mask_from_sizes in numpy: single-threaded, where a torch op this size
            # would start its intra-op threads beside the training step's and the loader workers
            rows = np.arange(height) < sizes[:, :1]
            cols = np.arange(width) < sizes[:, 1:]
            value = torch.from_numpy(rows[:, :, None] & cols[:, None, :])
        elif isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        fields[name] = value
    return kind(**fields), info


def _as_made(item):
    return item


def _consumed_prefix(segments: list[Segment], order: list[int], consumed: dict[str, list[list[int]]]) -> int:
    """How many leading pairs of a worker's order are already consumed (a worker uses a prefix)."""
    position = [s.start for s in segments]
    for count, segment in enumerate(order):
        shard, index = segments[segment].shard, position[segment]
        if not any(start <= index < end for start, end in consumed.get(shard, [])):
            return count
        position[segment] += 1
    return len(order)


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
        self.manifest = Manifest(manifest_url, cfg.captions_per_image)
        # DALI decodes one image per pair; builders that need more (NLVR2) decode on the CPU
        self.decoder = resolve_decoder(cfg.decoder) if getattr(make_builder, "gpu_decode", False) else "cpu"
        self._dali = None  # made in the training process on first use: it owns GPU memory
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
        self.truncated = 0

    @property
    def num_workers_or_one(self) -> int:
        return max(1, self.num_workers)

    def _parts(self) -> tuple[list[list[Segment]], str]:
        segments = remaining_segments(self.manifest, self.plan_base, self.seed, self.epoch)
        base_size = sum(end - start for ranges in self.plan_base.values() for start, end in ranges)
        tag = f"{self.seed}-{self.epoch}-{self.plan_layout}-{base_size}"
        return split_even(segments, self.world_size * self.num_workers_or_one), tag

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
        # collate_fn: as made; the default would turn _to_wire's arrays back into shared tensors
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_made,
                            persistent_workers=False, prefetch_factor=2 if self.num_workers else None)
        # Both stop with this generator: the thread when `received` is closed, the DataLoader's
        # workers when its iterator is collected, as it was before the thread existed.
        received = iter(loader)
        if self.num_workers:  # a thread takes each batch from the workers while the model computes
            received = in_background(map(_from_wire, received), depth=2)
        for step, (batch, info) in enumerate(received):
            if step >= steps:
                break
            if info.jpegs is not None:
                batch, info = self._decode(batch, info)
            for shard, ranges in info.consumed.items():
                self.consumed[shard] = merge_ranges(self.consumed.get(shard, []) + ranges)
            self.skipped += info.skipped
            self.truncated += info.truncated
            self.plan_step += 1
            yield batch, info

    def _decode(self, batch: PretrainBatch, info: BatchInfo) -> tuple[PretrainBatch, BatchInfo]:
        """DALI decode of a batch's images; pairs of an image that does not decode are dropped, counted."""
        if self._dali is None:
            from pixelbert_dist.data.dali_decode import DaliImageDecoder
            device = torch.cuda.current_device() if torch.cuda.is_available() else None
            self._dali = DaliImageDecoder(self.cfg.image_short_side, self.cfg.image_long_side,
                                          self.batch_size, device, multiple=self.cfg.pad_multiple)
        batch.images, batch.pixel_mask, kept_rows = self._dali(info.jpegs)
        if len(kept_rows) < len(info.jpegs):
            batch, kept = drop_images(batch, kept_rows)
            info = BatchInfo([info.keys[i] for i in kept], [info.pairs[i] for i in kept], info.consumed,
                             info.skipped + len(info.keys) - len(kept), info.truncated)
        info.jpegs = None
        return batch, info

    def next_epoch(self) -> None:
        self.epoch += 1
        self.consumed, self.plan_base, self.plan_step = {}, {}, 0
        self.plan_layout = [self.world_size, self.num_workers_or_one]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": {s: [list(r) for r in v] for s, v in self.consumed.items()},
                "plan_base": self.plan_base, "plan_layout": self.plan_layout, "plan_step": self.plan_step,
                "skipped": self.skipped, "truncated": self.truncated,
                "captions_per_image": self.manifest.group}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["consumed"]) - set(self.manifest.shards)
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
        self.truncated = state.get("truncated", 0) if keep else 0


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
            "truncated": sum(s.get("truncated", 0) for s in states)}
