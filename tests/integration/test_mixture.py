"""Mixtures of datasets (`data.mixture`): each dataset read as often as its weight says, the
position exact across a resume on another number of ranks."""

import re
from collections import Counter

import pytest

from pixelbert_dist.config import ConfigError, load_config
from pixelbert_dist.data.loader import StreamingLoader, merge_states
from pixelbert_dist.data.mixture import Mixture
from tests.conftest import TINY
from tests.datasets import synthetic_shards

BATCH = 4


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, ray_local):
    """Dataset a: 8 images in 2 shards, read twice an epoch; b: 16 images in 4 shards, half an epoch."""
    root = tmp_path_factory.mktemp("mixture")
    a, vocab = synthetic_shards(root / "a", 8, seed=3, shard_size=4)
    b, _ = synthetic_shards(root / "b", 16, seed=4, shard_size=4)
    mix = f"[{{name: a, manifest: '{a}', weight: 2}}, {{name: b, manifest: '{b}', weight: 0.5}}]"
    return load_config(TINY, [f"--data.tokenizer={vocab}", "--data.image_short_side=64", "--data.image_long_side=96",
                              f"--data.mixture={mix}", "--data.num_workers=0"])


def _run(cfg, world, state=None, stop=None):
    loaders = [StreamingLoader("", cfg.data, BATCH, rank=r, world_size=world, seed=5) for r in range(world)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    streams = [loader.epoch_batches() for loader in loaders]
    pairs, steps = [], 0
    while stop is None or steps < stop:
        try:
            step = [next(s) for s in streams]
        except StopIteration:
            break
        pairs += [p for _, info in step for p in info.pairs]
        steps += 1
    by_dataset = sum((loader.pairs_by_dataset for loader in loaders), Counter())
    return pairs, merge_states([loader.state_dict() for loader in loaders]), by_dataset


def _physical(shard: str, index: int) -> tuple[str, str, int]:
    head, _, name = shard.partition("/")
    return head.partition("#")[0], name, index


def test_each_dataset_is_read_as_often_as_its_weight_says_across_a_resume_on_another_world_size(mixture):
    datasets = Mixture(mixture.data.mixture, seed=5)
    head, state, head_counts = _run(mixture, world=2, stop=3)
    tail, final, tail_counts = _run(mixture, world=3, state=state)
    seen = head + tail

    assert len(seen) == len(set(seen))  # no pair of a pass read twice, across the resume
    times = Counter(_physical(*pair) for pair in seen)
    planned = datasets.shard_names(0)
    a_pairs = datasets.datasets["a"].total_pairs
    chosen_b = [name for name in planned if name.startswith("b/")]
    assert len(chosen_b) == 2 and sorted(set(planned) - set(chosen_b)) == sorted(
        [f"a/{s}" for s in datasets.datasets["a"].shard_names()] + [f"a#1/{s}" for s in datasets.datasets["a"].shard_names()])
    assert max(count for (dataset, _, _), count in times.items() if dataset == "a") <= 2
    assert all(count == 1 for (dataset, _, _), count in times.items() if dataset == "b")
    assert {name for dataset, name, _ in times if dataset == "b"} <= {n.partition("/")[2] for n in chosen_b}

    # every pair of the epoch's plan was read, but for less than a batch per rank at the end
    planned_pairs = 2 * a_pairs + sum(datasets.num_pairs(n) for n in chosen_b)
    assert planned_pairs - len(seen) < 3 * BATCH
    consumed = sum(end - start for ranges in final["consumed"].values() for start, end in ranges)
    assert consumed == len(seen)
    # pairs per dataset, as the trainer logs them: carried across the resume
    assert head_counts == Counter(_physical(*p)[0] for p in head)
    assert tail_counts == Counter(_physical(*p)[0] for p in seen)


def test_a_fractional_weight_reads_every_shard_once_over_the_epochs_it_takes(mixture):
    datasets = Mixture(mixture.data.mixture, seed=5)
    b_shards = datasets.datasets["b"].shard_names()
    per_epoch = [[n.partition("/")[2] for n in datasets.shard_names(e) if n.startswith("b")] for e in range(4)]
    assert all(len(shards) == 2 for shards in per_epoch)
    assert sorted(per_epoch[0] + per_epoch[1]) == sorted(b_shards)  # two epochs of 0.5: each shard once
    assert per_epoch[2] == per_epoch[0] and per_epoch[3] == per_epoch[1]
    assert datasets.pairs_per_epoch(0) == {"a": 2 * datasets.datasets["a"].total_pairs,
                                           "b": sum(datasets.num_pairs(f"b/{s}") for s in per_epoch[0])}


def test_a_mixture_is_checked_when_the_config_is_read():
    for bad, says in [("[{name: 'a b', manifest: x}]", "must be letters"),
                      ("[{name: a, manifest: x}, {name: a, manifest: y}]", "names must differ"),
                      ("[{name: a, manifest: x, weight: -1}]", "weight must be >= 0"),
                      ("[{name: a, manifest: x, wieght: 1}]", "did you mean 'data.mixture[0].weight'")]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(TINY, [f"--data.mixture={bad}"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(TINY, ["--data.mixture=[{name: a, manifest: x}]", "--data.train_manifest=y"])
