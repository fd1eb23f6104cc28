"""Several datasets as one: `data.mixture`, each dataset read `weight` times per epoch.

    data:
      mixture:
        - {name: coco-vg, manifest: s3://bucket/coco-vg, weight: 1}
        - {name: cc3m, manifest: s3://bucket/cc3m-index, weight: 0.5}

A mixture offers the planner and the readers what one Manifest does (plan.py), over shards
named `DATASET/SHARD` (a second pass over a dataset: `DATASET#1/SHARD`). An epoch reads each
dataset's pairs `floor(weight)` times, plus a fraction of its shards for the rest: a weight of
0.25 reads a quarter of them, a different quarter each epoch (the shards in an order drawn once
from the seed, cut into consecutive blocks), so four epochs read every pair once. The shards of
all datasets are then shuffled together and split like one dataset's, so the position stays one
set of consumed ranges per shard: exact, and independent of the number of ranks and workers.
"""

from __future__ import annotations

import math
import random

from pixelbert_dist.config import MixtureEntry
from pixelbert_dist.data.plan import Manifest, Segment


class Mixture:
    def __init__(self, entries: list[MixtureEntry], captions_per_image: int = 1, shard_roots=(),
                 seed: int = 0) -> None:
        self.entries = {e.name: e for e in entries}
        self.datasets = {e.name: Manifest(e.manifest, captions_per_image, shard_roots) for e in entries}
        self.group, self.seed = captions_per_image, seed
        self.url = " + ".join(f"{e.name}={e.manifest}" for e in entries)

    # -- names: DATASET[#PASS]/SHARD
    def _split(self, shard: str) -> tuple[Manifest, str]:
        head, _, name = shard.partition("/")
        return self.datasets[head.partition("#")[0]], name

    def dataset_of(self, shard: str) -> str:
        return shard.partition("/")[0].partition("#")[0]

    def shard_names(self, epoch: int = 0) -> list[str]:
        names = []
        for dataset, manifest in self.datasets.items():
            weight, shards = self.entries[dataset].weight, manifest.shard_names()
            passes = math.floor(weight)
            for copy in range(passes):
                names += [f"{dataset}#{copy}/{s}" if copy else f"{dataset}/{s}" for s in shards]
            share = round((weight - passes) * len(shards))
            if share:
                order = list(shards)
                random.Random(f"{self.seed}-mixture-{dataset}").shuffle(order)
                first = epoch * share
                chosen = [order[(first + i) % len(order)] for i in range(share)]
                label = f"{dataset}#{passes}" if passes else dataset
                names += [f"{label}/{s}" for s in chosen]
        return names

    def knows(self, shard: str) -> bool:
        head = shard.partition("/")[0].partition("#")[0]
        return head in self.datasets and self.datasets[head].knows(shard.partition("/")[2])

    def pairs_per_epoch(self, epoch: int = 0) -> dict[str, int]:
        """Pairs each dataset contributes to an epoch."""
        counts = dict.fromkeys(self.datasets, 0)
        for shard in self.shard_names(epoch):
            counts[self.dataset_of(shard)] += self.num_pairs(shard)
        return counts

    @property
    def total_pairs(self) -> int:
        return sum(self.num_pairs(s) for s in self.shard_names())

    # -- everything else is the dataset's own
    def num_pairs(self, shard: str) -> int:
        manifest, name = self._split(shard)
        return manifest.num_pairs(name)

    def table(self, shard: str):
        manifest, name = self._split(shard)
        return manifest.table(name)

    def entry(self, shard: str) -> dict:
        manifest, name = self._split(shard)
        return manifest.entry(name)

    def locate(self, shard: str, pair: int) -> tuple[int, int]:
        manifest, name = self._split(shard)
        return manifest.locate(name, pair)

    def window_counts(self, shard: str, first_sample: int) -> list[int]:
        manifest, name = self._split(shard)
        return manifest.window_counts(name, first_sample)

    def runs(self, segment: Segment):
        manifest, name = self._split(segment.shard)
        return manifest.runs(Segment(name, segment.start, segment.end))

    def open_shard(self, shard: str, offset: int = 0):
        manifest, name = self._split(shard)
        return manifest.open_shard(name, offset)

    def check_shards_present(self, checksums: bool = False) -> None:
        for manifest in self.datasets.values():
            manifest.check_shards_present(checksums)
