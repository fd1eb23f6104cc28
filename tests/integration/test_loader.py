"""The streaming loader on real shards: coverage, exact resume, S3, bad samples."""

import io
import itertools
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from data_pipeline.sample_table import digest, encode_table, table_name
from data_pipeline.shard_format import MANIFEST, ShardWriter
from data_pipeline.storage import StorageError, s3_client
from pixelbert_dist.config import load_config
from pixelbert_dist.data.batch import resized_size
from pixelbert_dist.data.loader import StreamingLoader
from pixelbert_dist.data.plan import Manifest
from tests.datasets import run_loaders, synthetic_shards
from tests.conftest import TINY


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local):
    out, vocab = synthetic_shards(tmp_path_factory.mktemp("loader"), 36, seed=7, shard_size=7)
    cfg = load_config(TINY, [f"--data.tokenizer={vocab}", "--data.image_short_side=128",
                             "--data.image_long_side=192"])
    return out, cfg


def _run(url, cfg, world, workers, batch=4, state=None, stop=None):
    return run_loaders(url, cfg.data, world, workers, batch, state, stop)


def _pairs(steps):
    return [p for step in steps for _, info in step for p in info.pairs]


def test_an_epoch_reads_each_pair_at_most_once_and_drops_less_than_a_batch_per_worker(dataset):
    url, cfg = dataset
    manifest = Manifest(str(url))
    steps, state = _run(url, cfg, world=2, workers=2)
    pairs = _pairs(steps)
    assert len(pairs) == len(set(pairs))
    assert manifest.total_pairs - len(pairs) < 2 * 2 * 4
    assert len(steps) == StreamingLoader(str(url), cfg.data, 4, 0, 2, 1, 2).steps_per_epoch()
    # each pair's key is the sample the manifest places at that position
    for step in steps[:3]:
        for _, info in step:
            for (shard_name, index), key in zip(info.pairs, info.keys):
                first, position = manifest.locate(shard_name, index)
                from pixelbert_dist.data.plan import round_robin
                sample, _ = round_robin(manifest.window_counts(shard_name, first))[position]
                assert manifest.table(shard_name).key(first + sample) == key


def test_batches_mix_images_and_follow_the_resize_rule(dataset):
    url, cfg = dataset
    steps, _ = _run(url, cfg, world=1, workers=0, batch=8, stop=3)
    for batch, info in (step[0] for step in steps):
        assert len(set(info.keys)) >= 4  # captions of one image are spread out, not back to back
        heights = batch.pixel_mask.any(2).sum(1)
        widths = batch.pixel_mask.any(1).sum(1)
        for h, w in zip(heights.tolist(), widths.tolist()):
            assert min(h, w) == 128 or max(h, w) == 192
        assert batch.images.shape[-2] % 64 == 0 and batch.images.shape[-1] % 64 == 0


def test_masking_does_not_reveal_the_itm_label(dataset):
    url, cfg = dataset
    steps, _ = _run(url, cfg, world=1, workers=0, batch=16, stop=6)
    mask_id = 4  # [MASK] in the trained vocab
    rates = {0: [], 1: []}
    for batch, _ in (step[0] for step in steps):
        for row, label in zip(batch.input_ids, batch.itm_labels.tolist()):
            rates[label].append((row == mask_id).float().sum().item())
        assert (batch.mlm_labels[batch.itm_labels == 0] != -100).any()  # the model decides which count (mlm())
        assert (batch.mlm_labels[batch.itm_labels == 1] != -100).any()
    assert sum(rates[0]) > 0 and sum(rates[1]) > 0  # mismatched captions are masked too
    assert abs(sum(rates[0]) / len(rates[0]) - sum(rates[1]) / len(rates[1])) < 1.0


def test_a_worker_process_hands_over_the_batches_made_in_process(dataset):
    # batches cross from a worker in a compact form (data/wire.py): nothing may change on the way
    url, cfg = dataset
    inline, _ = _run(url, cfg, world=1, workers=0, stop=6)
    worker, _ = _run(url, cfg, world=1, workers=1, stop=6)
    assert len(inline) == len(worker) == 6
    for ((a, info_a),), ((b, info_b),) in zip(inline, worker):
        assert info_a.pairs == info_b.pairs
        for name, value in vars(a).items():
            other = getattr(b, name)
            assert (value is None and other is None) or (
                torch.equal(value, other) and value.dtype == other.dtype), name
    assert inline[0][0][0].images.dtype == torch.uint8 and not inline[0][0][0].pixel_mask.all()


@pytest.mark.parametrize("stop", [3, 4])
def test_resume_on_the_same_layout_continues_exactly_as_the_uninterrupted_run(dataset, stop):
    url, cfg = dataset
    full, _ = _run(url, cfg, world=2, workers=2)
    head, state = _run(url, cfg, world=2, workers=2, stop=stop)
    tail, _ = _run(url, cfg, world=2, workers=2, state=json.loads(json.dumps(state)))
    assert len(head) + len(tail) == len(full)
    for a, b in zip(full, head + tail):
        for (batch_a, info_a), (batch_b, info_b) in zip(a, b):
            assert info_a.pairs == info_b.pairs
            assert torch.equal(batch_a.input_ids, batch_b.input_ids)
            assert torch.equal(batch_a.images, batch_b.images)


def test_resume_two_ranks_as_one_covers_the_epoch_exactly_once(dataset):
    url, cfg = dataset
    manifest = Manifest(str(url))
    head, state = _run(url, cfg, world=2, workers=2, stop=3)
    tail, final = _run(url, cfg, world=1, workers=1, state=state)
    seen = _pairs(head) + _pairs(tail)
    assert len(seen) == len(set(seen))
    assert manifest.total_pairs - len(seen) < 4  # re-split: less than one batch left over
    consumed = sum(e - s for ranges in final["consumed"].values() for s, e in ranges)
    assert consumed == len(seen)


def test_caption_groups_run_the_cnn_once_per_image_and_resume_exactly(dataset):
    url, cfg = dataset
    grouped = load_config(TINY, [f"--data.tokenizer={cfg.data.tokenizer}", "--data.image_short_side=128",
                                 "--data.image_long_side=192", "--data.captions_per_image=4"])
    full, _ = _run(url, grouped, world=2, workers=2, batch=8)
    runs, rows = [], 0
    for batch, info in (item for step in full for item in step):
        rows += batch.images.shape[0]
        assert batch.image_index is not None and batch.images.shape[0] == len(set(info.keys)) < len(info.keys)
        mapping = set(zip(info.keys, batch.image_index.tolist()))  # a row is one image and vice versa
        assert len(mapping) == len(set(info.keys)) == len({row for _, row in mapping})
        runs += [len(list(g)) for _, g in itertools.groupby(info.keys)]
    pairs = _pairs(full)
    # 5 captions an image deal as a run of 4 and a run of 1; batch edges cut some runs
    assert max(runs) == 4 and sum(r for r in runs if r == 4) > len(pairs) / 2
    assert rows < len(pairs) / 2  # over 2 pairs per CNN pass (1 without groups)
    assert len(pairs) == len(set(pairs)) and Manifest(str(url)).total_pairs - len(pairs) < 2 * 2 * 8

    head, state = _run(url, grouped, world=2, workers=2, batch=8, stop=2)
    tail, _ = _run(url, grouped, world=2, workers=2, batch=8, state=state)
    assert _pairs(head + tail) == pairs
    with pytest.raises(ValueError, match="captions_per_image=4"):
        StreamingLoader(str(url), cfg.data, 8).load_state_dict(state)


def test_reads_from_s3_like_from_a_folder(dataset, bucket):
    url, cfg = dataset
    client = s3_client()
    for path in Path(url).iterdir():
        client.upload_file(str(path), bucket, f"ds/{path.name}")
    local, _ = _run(url, cfg, world=1, workers=1, stop=4)
    remote, _ = _run(f"s3://{bucket}/ds", cfg, world=1, workers=1, stop=4)
    assert [info.pairs for (_, info), in local] == [info.pairs for (_, info), in remote]
    assert all(torch.equal(a.images, b.images) for ((a, _),), ((b, _),) in zip(local, remote))


def _with_decoder(cfg, decoder):
    import dataclasses
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, decoder=decoder))


def test_the_dali_path_gives_the_cpu_paths_batches(dataset):
    url, cfg = dataset
    cpu, _ = _run(url, _with_decoder(cfg, "cpu"), world=1, workers=1, batch=8, stop=3)
    dali, _ = _run(url, _with_decoder(cfg, "dali"), world=1, workers=1, batch=8, stop=3)
    for (batch_c, info_c), (batch_d, info_d) in zip((s[0] for s in cpu), (s[0] for s in dali)):
        assert info_c.pairs == info_d.pairs and torch.equal(batch_c.input_ids, batch_d.input_ids)
        assert torch.equal(batch_c.pixel_mask, batch_d.pixel_mask)
        # resize filters differ (PIL bicubic vs DALI's): close, not equal, in grey levels
        assert (batch_c.images.float() - batch_d.images.float()).abs().mean() < 3


@pytest.mark.parametrize("decoder", ["cpu", "dali"])
def test_a_corrupt_image_mid_stream_is_skipped_counted_and_consumed(dataset, tmp_path, decoder):
    url, cfg = dataset
    cfg = _with_decoder(cfg, decoder)
    broken = tmp_path / "broken"
    shutil.copytree(url, broken)
    manifest = json.loads((broken / MANIFEST).read_text())
    entry = manifest["shards"][0]
    # rewrite shard 0 with its second image replaced by garbage, offsets updated
    from data_pipeline.shard_format import read_samples
    with open(broken / entry["name"], "rb") as f:
        samples = list(read_samples(f))
    buffer = io.BytesIO()
    writer = ShardWriter(buffer)
    for i, (sample, members) in enumerate(samples):
        writer.write(sample.key, {**members, "jpg": b"\xff\xd8 not a jpeg" if i == 1 else members["jpg"]})
    writer.close()
    (broken / entry["name"]).write_bytes(buffer.getvalue())
    listed = Manifest(str(url)).table(entry["name"])
    table = encode_table([{**listed.entry(i), "offset": written.offset, "size": written.size}
                          for i, written in enumerate(writer.samples)])
    (broken / table_name(entry["name"])).write_bytes(table)
    entry.update(bytes=len(buffer.getvalue()), table_bytes=len(table), table_sha256=digest(table))
    (broken / MANIFEST).write_text(json.dumps(manifest))
    bad_key = samples[1][0].key
    steps, state = _run(broken, cfg, world=1, workers=1)
    keys = {k for step in steps for _, info in step for k in info.keys}
    assert bad_key not in keys
    assert state["skipped"] == len(json.loads(samples[1][1]["json"])["captions"])
    consumed = sum(e - s for ranges in state["consumed"].values() for s, e in ranges)
    assert consumed == len(_pairs(steps)) + state["skipped"]


def test_a_missing_or_truncated_shard_is_named_before_training(dataset, tmp_path):
    url, _ = dataset
    broken = tmp_path / "b"
    shutil.copytree(url, broken)
    (broken / "000002.tar").unlink()
    with pytest.raises(StorageError, match="shard 000002.tar is missing"):
        Manifest(str(broken)).check_shards_present()
    data = (url / "000001.tar").read_bytes()
    (broken / "000001.tar").write_bytes(data[:1000])
    with pytest.raises(StorageError, match="shard 000001.tar is 1000 bytes"):
        Manifest(str(broken)).check_shards_present()


def test_shards_that_vanish_mid_epoch_are_skipped_and_counted(dataset, tmp_path):
    # shards checked at start, then deleted while the epoch runs (an object-store lifecycle rule, say)
    url, cfg = dataset
    copy = tmp_path / "shards"
    shutil.copytree(url, copy)
    loader = StreamingLoader(str(copy), cfg.data, 4, num_workers=1, seed=1)
    for name in loader.manifest.shards:
        (copy / name).unlink()
    assert list(loader.epoch_batches()) == []
    assert loader.skipped == loader.counters()["data/skipped/missing_shard"] == Manifest(str(url)).total_pairs
    assert set(loader.damaged) == set(loader.manifest.shards)
    assert not [t for t in threading.enumerate() if t.name == "loader-receive"]  # the thread stopped


def test_a_worker_error_surfaces_and_no_worker_is_waited_for(dataset, tmp_path):
    """Two shards, one per worker: worker 0's is a folder (an OSError when opened: not damage),
    worker 1's a FIFO nobody writes (it hangs in open(), as in a stalled read). The error reaches
    the caller naming the shard, and dropping the epoch ends both workers within a second
    (torch alone waits 5 s for each, twice)."""
    import gc
    import os
    import time

    import psutil
    from data_pipeline.shard_format import MANIFEST
    from pixelbert_dist.data.plan import remaining_segments, split_even

    url, cfg = dataset
    copy = tmp_path / "shards"
    shutil.copytree(url, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["shards"] = manifest["shards"][:2]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    first, second = (part[0].shard for part in split_even(remaining_segments(Manifest(str(copy)), {}, 1, 0), 2))
    (copy / first).unlink()
    (copy / first).mkdir()
    (copy / second).unlink()
    os.mkfifo(copy / second)
    loader = StreamingLoader(str(copy), cfg.data, 4, num_workers=2, seed=1)
    others = {p.pid for p in psutil.Process().children()}  # the test session's servers
    batches = loader.epoch_batches()
    with pytest.raises(OSError, match=rf"{first}: reading failed: IsADirectoryError"):
        next(batches)
    workers = [p for p in psutil.Process().children() if p.pid not in others]
    assert len(workers) == 2
    started = time.perf_counter()
    del batches
    gc.collect()
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive and time.perf_counter() - started < 1.0


def test_resize_rule():
    assert resized_size(480, 640, 800, 1333) == (800, 1067)
    assert resized_size(400, 2000, 800, 1333) == (267, 1333)


def test_an_unreachable_bucket_is_named_before_training(s3_server):
    with pytest.raises(StorageError, match="bucket 'no-such-dataset-bucket' does not exist"):
        Manifest("s3://no-such-dataset-bucket/coco-vg")
