"""A damaged shard costs its pairs, not the run (issue 24): each kind of damage the loader names,
read through the real loader with two workers; the bound that stops the run; a worker error's exit.

Each damage test copies one small dataset (3 shards of 4 images, 5 captions each: 60 pairs),
damages it one way, and reads an epoch with batches of one pair (so no undamaged pair is left
over): the epoch finishes, every undamaged pair comes exactly once, the skipped count is the
damaged pairs by reason, the first bad sample of the shard is logged naming shard, sample and
offset, and `verify` reports that same line. Each records its fault-table row before asserting.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import sqlite3
import subprocess
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from data_pipeline.sample_table import table_name
from data_pipeline.shard_format import MANIFEST, ShardFormatError, read_samples
from data_pipeline.storage import open_storage
from data_pipeline.verify import check_shard
from pixelbert_dist.config import load_config
from pixelbert_dist.data.loader import DataDamageError, StreamingLoader, merge_states
from pixelbert_dist.data.plan import Manifest, Segment, remaining_segments, round_robin, split_even
from pixelbert_dist.data.stream import read_segment_skipping
from pixelbert_dist.evaluate import read_pairs
from pixelbert_dist.model import PixelBert
from pixelbert_dist.pretraining import PRETRAINING, zero_shot_retrieval
from pixelbert_dist.tokenizer import load_tokenizer
from tests.conftest import TINY
from tests.datasets import synthetic_shards
from tests.faults import record_fault
from tests.integration.test_faults_data import _copy, _files, _members, _patch_header, _save
from tests.launch import free_port, job_command, job_env

WORKERS = 2


@pytest.fixture(scope="module")
def damage_data(tmp_path_factory, ray_local):
    """3 local shards of 4 images (5 captions each), its vocab and a loader config for them."""
    out, vocab = synthetic_shards(tmp_path_factory.mktemp("faults-damage"), 12, seed=5, shard_size=4)
    cfg = load_config(TINY, [f"--data.tokenizer={vocab}", "--data.image_short_side=128",
                             "--data.image_long_side=192"])
    return out, cfg, vocab


def _pair_keys(url: str) -> dict[tuple[str, int], str]:
    """(shard, pair) -> the image key it belongs to, for every pair of the (undamaged) dataset."""
    manifest, keys = Manifest(url), {}
    for shard in manifest.shard_names():
        for index in range(manifest.num_pairs(shard)):
            first, position = manifest.locate(shard, index)
            sample, _ = round_robin(manifest.window_counts(shard, first))[position]
            keys[shard, index] = manifest.table(shard).key(first + sample)
    return keys


def _damage(kind: str, copy: Path, manifest: dict, shard: int = 1) -> tuple[str, set[str], set[str], dict | None]:
    """Damage shard #`shard` of the copy; (what was done, the keys whose pairs are lost, the reasons
    counted, the sample the first error must name (None: the whole shard))."""
    entry, other = manifest["shards"][shard], manifest["shards"][(shard + 1) % 3]
    samples = entry["samples"]
    victim = copy / entry["name"]
    members = _members(victim)
    one = samples[1]
    key = one["key"]
    keys = {key}
    if kind == "truncated":
        cut = samples[2]["offset"] + 700
        victim.write_bytes(victim.read_bytes()[:cut])
        return f"{entry['name']} cut to {cut} bytes, inside its third sample", \
            {s["key"] for s in samples[2:]}, {"truncated_shard"}, samples[2]
    if kind == "header_checksum":
        _patch_header(victim, members[f"{key}.json"], checksum=False)
        return f"one bit of {key}.json's header flipped (its checksum no longer matches)", keys, {"bad_tar"}, one
    if kind == "zeroed_header":
        data = bytearray(victim.read_bytes())
        data[members[f"{key}.jpg"]:members[f"{key}.jpg"] + 512] = bytes(512)
        victim.write_bytes(bytes(data))
        return f"the header of {key}.jpg zeroed", keys, {"bad_tar"}, one
    if kind in ("broken_json", "json_without_captions"):
        data = bytearray(victim.read_bytes())
        start, size = members[f"{key}.json"] + 512, _member_size(victim, f"{key}.json")
        data[start:start + size] = (b"\x00{[:" + bytes(size - 4) if kind == "broken_json"
                                    else json.dumps({"caption": "one"}).encode().ljust(size))
        victim.write_bytes(bytes(data))
        return f"{key}.json overwritten in place: " + ("not JSON" if kind == "broken_json" else
                                                          "JSON without its captions"), keys, {"bad_captions"}, one
    if kind in ("member_climbs", "member_absolute", "member_symlink"):
        if kind == "member_symlink":
            _patch_header(victim, members[f"{key}.json"], kind=tarfile.SYMTYPE, link="/etc/passwd", size=0)
        else:
            _patch_header(victim, members[f"{key}.json"],
                          name="../x.json" if kind == "member_climbs" else "/tmp/pixelbert-fault-abs/x.json")
        return f"{key}.json's header rewritten as {kind.split('_')[1]} (valid checksum)", keys, {"unsafe_member"}, one
    if kind == "member_2gb":
        _patch_header(victim, members[f"{key}.txt"], size=2 ** 31)
        return f"{key}.txt's header announces 2 GB (valid checksum)", keys, {"too_large"}, one
    if kind == "swapped_shards":
        a, b = victim.read_bytes(), (copy / other["name"]).read_bytes()
        victim.write_bytes(b)
        (copy / other["name"]).write_bytes(a)
        return f"{entry['name']} and {other['name']} swapped", \
            {s["key"] for s in samples + other["samples"]}, {"bad_tar", "truncated_shard"}, samples[0]
    if kind == "wrong_offset":
        one["offset"] += 1024
        one["size"] -= 1024
        _save(copy, manifest)
        return f"the table's offset of {key} moved 1024 bytes into its JPEG (sha256 updated)", keys, {"bad_tar"}, one
    if kind == "not_a_tar":
        victim.write_bytes(random.Random(24).randbytes(victim.stat().st_size))
        return f"{entry['name']} overwritten with random bytes of its size", \
            {s["key"] for s in samples}, {"bad_tar"}, samples[0]
    if kind == "changed_table":
        table = copy / table_name(entry["name"])
        data = table.read_bytes()
        table.write_bytes(data[:-20] + bytes([data[-20] ^ 1]) + data[-19:])
        return f"one byte of {table.name} flipped (the manifest's sha256 names the old table)", \
            {s["key"] for s in samples}, {"bad_table"}, None
    if kind == "missing_shard":
        victim.unlink()
        return f"{entry['name']} deleted (after the start-up check)", \
            {s["key"] for s in samples}, {"missing_shard"}, None
    assert kind == "corrupt_image"
    data = bytearray(victim.read_bytes())
    start = members[f"{key}.jpg"] + 512
    data[start:start + 600] = b"\xff\xd8 not a jpeg".ljust(600, b"\0")
    victim.write_bytes(bytes(data))
    return f"600 bytes of {key}.jpg overwritten (sizes and offsets unchanged)", keys, {"corrupt_image"}, one


def _member_size(path: Path, name: str) -> int:
    with tarfile.open(path) as tar:
        return tar.getmember(name).size


KINDS = ["truncated", "header_checksum", "zeroed_header", "broken_json", "json_without_captions", "member_climbs",
         "member_absolute", "member_symlink", "member_2gb", "swapped_shards", "wrong_offset", "not_a_tar",
         "changed_table", "missing_shard", "corrupt_image"]


def _epoch(loader: StreamingLoader, stop: int | None = None):
    """(pairs, seconds from the start to each batch, error or None) of one epoch's batches."""
    pairs, times, started = [], [], time.perf_counter()
    batches = loader.epoch_batches()
    try:
        for step, (_, info) in enumerate(batches):
            pairs += info.pairs
            times.append(time.perf_counter() - started)
            if stop is not None and step + 1 == stop:
                break
    except Exception as err:  # noqa: BLE001 - the test inspects what surfaced
        return pairs, times, err
    finally:
        batches.close()
    return pairs, times, None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_shard_costs_its_pairs_and_the_epoch_goes_on(damage_data, tmp_path, kind, caplog, monkeypatch):
    url, cfg, _ = damage_data
    copy, manifest = _copy((url, cfg), tmp_path)
    done, lost_keys, reasons, first_sample = _damage(kind, copy, manifest)
    work = tmp_path / "cwd"  # a member that climbs would land beside it
    work.mkdir()
    monkeypatch.chdir(work)
    before = _files(tmp_path)
    keys = _pair_keys(str(url))
    damaged = {pair for pair, key in keys.items() if key in lost_keys}
    caplog.set_level(logging.WARNING, logger="pixelbert_dist.data")

    loader = StreamingLoader(str(copy), cfg.data, 1, num_workers=WORKERS, seed=1)
    pairs, times, error = _epoch(loader)
    state = loader.state_dict()
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    repeated = len(pairs) - len(set(pairs))
    lost = len(set(keys) - damaged - set(pairs))
    name = manifest["shards"][1]["name"]
    first = loader.damaged.get(name, {}).get("first", "")
    source = name if kind == "corrupt_image" else f"{copy}/{name}"  # the decoder's failure: named by the loader
    wheres = ([f"{source}: sample {s['key']!r} at offset {s['offset']}" for s in manifest["shards"][1]["samples"]
               if s["key"] in lost_keys] if first_sample is not None else [f"{copy}/"])
    logged = [r.getMessage() for r in caplog.records if f"skipping damaged data in {name}" in r.getMessage()]
    problems = check_shard(open_storage(str(copy)), str(copy),
                           next(s for s in json.loads((copy / MANIFEST).read_text())["shards"] if s["name"] == name))
    same_words = kind in ("missing_shard", "corrupt_image") or first in problems  # a storage error, PIL's words
    row = dict(fault=f"damaged shard under the skip policy: {kind.replace('_', ' ')}",
               what_was_done=f"{done}; one epoch, {WORKERS} loader workers: {state['skipped']} pairs skipped "
                             f"({', '.join(f'{r} {n}' for r, n in sorted(state['skipped_by'].items()) if n)})",
               expected="the epoch finishes; the damaged pairs (and only they) skipped, counted by reason and "
                        "consumed; the shard's first bad sample logged once with shard, sample, offset; verify "
                        "reports the same line",
               pairs_lost=lost, pairs_repeated=repeated, recovery_s=round(max(gaps), 2) if gaps else None)
    checks = {
        "the epoch finished": error is None,
        "every undamaged pair once": lost == 0 and repeated == 0 and not set(pairs) & damaged,
        "skipped = damaged pairs": state["skipped"] == len(damaged) > 0,
        "counted by reason": sum(state["skipped_by"].get(r, 0) for r in reasons) == len(damaged),
        "consumed": sum(e - s for r in state["consumed"].values() for s, e in r) == len(pairs) + len(damaged),
        "logged once, naming shard, sample and offset": len(logged) == 1 and first in logged[0]
        and any(where in first for where in wheres),
        "verify says the same": same_words,
        "nothing written": _files(tmp_path) == before and not Path("/tmp/pixelbert-fault-abs").exists(),
    }
    record_fault({**row, "passed": all(checks.values())})
    assert all(checks.values()), f"{[k for k, v in checks.items() if not v]} {error!r} {first} {problems[:3]} {logged}"


def test_a_2_gb_header_is_refused_without_allocating_it(damage_data, tmp_path):
    """As the loader reads (read_segment_skipping) and as the index job walks a tar (read_samples)."""
    url, cfg, _ = damage_data
    copy, manifest = _copy((url, cfg), tmp_path)
    _damage("member_2gb", copy, manifest)
    reader = Manifest(str(copy))
    name = manifest["shards"][1]["name"]
    tracemalloc.start()
    pairs = list(read_segment_skipping(reader, Segment(name, 0, reader.num_pairs(name))))
    with (copy / name).open("rb") as stream, pytest.raises(ShardFormatError, match="announces 2147483648 bytes"):
        list(read_samples(stream))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [p.damage.reason for p in pairs if p.damage is not None] == ["too_large"] * 5 and peak < 32 << 20


@pytest.mark.timeout(120)
def test_a_resume_neither_repeats_nor_rehits_skipped_pairs(damage_data, tmp_path):
    """Batches of 4: skipped pairs share batches with good ones, and a worker's last skips arrive
    without a batch. Stopped after 3 batches and resumed on the same layout, then on another."""
    url, cfg, _ = damage_data
    copy, manifest = _copy((url, cfg), tmp_path)
    _, lost_a, _, _ = _damage("header_checksum", copy, manifest, shard=1)
    _, lost_b, _, _ = _damage("missing_shard", copy, manifest, shard=2)
    keys = _pair_keys(str(url))
    damaged = {pair for pair, key in keys.items() if key in lost_a | lost_b}
    whole = StreamingLoader(str(copy), cfg.data, 4, num_workers=WORKERS, seed=1)
    reference, _, _ = _epoch(whole)
    head = StreamingLoader(str(copy), cfg.data, 4, num_workers=WORKERS, seed=1)
    seen, _, _ = _epoch(head, stop=3)
    state = json.loads(json.dumps(merge_states([head.state_dict()])))
    same = StreamingLoader(str(copy), cfg.data, 4, num_workers=WORKERS, seed=1)
    same.load_state_dict(state)
    tail, _, _ = _epoch(same)
    other = StreamingLoader(str(copy), cfg.data, 4, num_workers=1, seed=1)  # another layout: the rest re-split
    other.load_state_dict(state)
    resplit, _, _ = _epoch(other)
    assert seen + tail == reference  # the same batches as the uninterrupted epoch
    for rest, loader in ((tail, same), (resplit, other)):
        run = seen + rest
        assert len(run) == len(set(run)) and not set(run) & damaged
        assert loader.state_dict()["skipped"] == len(damaged) == whole.state_dict()["skipped"]  # once each
        assert len(set(keys) - damaged - set(run)) < 4 * WORKERS  # under a batch per worker left, as always


def test_evaluation_skips_a_damaged_held_out_shards_pairs_counts_them_and_bounds_them(damage_data, tmp_path,
                                                                                       caplog):
    """The held-out set read as the trainer reads it for evaluation (evaluate.read_pairs), then the
    pre-training job's zero-shot retrieval on it with the tiny model: a result over the undamaged
    pairs and their skipped count; past data.max_skipped_fraction, one error naming the shard."""
    url, cfg, vocab = damage_data
    copy, manifest = _copy((url, cfg), tmp_path)
    done, lost, _, first = _damage("header_checksum", copy, manifest)
    name = manifest["shards"][1]["name"]
    keys = _pair_keys(str(url))
    undamaged = sorted(pair for pair, key in keys.items() if key not in lost)
    caplog.set_level(logging.WARNING, logger="pixelbert_dist.evaluate")
    held_out = read_pairs(Manifest(str(copy)), max_skipped_fraction=0.1)  # 60 pairs: 6 may be skipped
    run = PRETRAINING.resolve(cfg, load_tokenizer(str(vocab)))
    torch.manual_seed(0)
    metrics = zero_shot_retrieval(PixelBert(run.cfg.model), held_out, run, "cpu")
    logged = [r.getMessage() for r in caplog.records]
    with pytest.raises(DataDamageError) as stopped:
        read_pairs(Manifest(str(copy)), max_skipped_fraction=0.05)  # 3 of 60 may be skipped: 5 are damaged
    checks = {
        "the undamaged pairs, each once": sorted((p.shard, p.index) for p in held_out) == undamaged,
        "the result is over them": metrics["captions"] == len(undamaged)
        and metrics["images"] == len(set(keys.values()) - lost),
        "their skipped count": held_out.skipped == len(keys) - len(undamaged) == 5,
        "the shard's first bad sample logged": any(
            name in m and f"sample {first['key']!r} at offset {first['offset']}" in m for m in logged),
        "past the bound: one line naming the shard": re.fullmatch(
            rf"held-out set .*: pairs skipped: 5, more than data.max_skipped_fraction=0.05 allows \(3\); "
            rf"damaged shards: {re.escape(name)} \(bad_tar 5\)\. .*", str(stopped.value)) is not None,
    }
    record_fault(dict(fault="damaged held-out shard (evaluation)",
                      what_was_done=f"{done}; the held-out set read for evaluation, zero-shot retrieval on it; "
                                    "read again with data.max_skipped_fraction under the damage",
                      expected="the evaluation runs on the undamaged pairs and reports the skipped count; the "
                               "shard's first bad sample logged; past the bound, one error naming the shard",
                      pairs_lost=len(undamaged) - len(held_out), pairs_repeated=len(held_out) - len(set(
                          (p.shard, p.index) for p in held_out)), recovery_s=None, passed=all(checks.values())))
    assert all(checks.values()), ({k: v for k, v in checks.items() if not v}, metrics, logged, stopped.value)


# ---------------------------------------------------------------------------- the run, as a job

def _job_argv(shards: Path, vocab: Path, workdir: Path, **settings) -> list[str]:
    base = {"data.train_manifest": shards, "data.tokenizer": vocab, "model.vocab_size": len(vocab.read_text().split()),
            "data.image_short_side": 128, "data.image_long_side": 192, "data.num_workers": 1,
            "model.pixel_sample_count": 4, "train.global_batch_size": 4, "train.micro_batch_size": 2,
            "train.epochs": 1, "train.log_every": 1, "checkpoint.every_steps": 1000,
            "checkpoint.dir": workdir / "ckpt", "tracking.uri": f"sqlite:///{workdir / 'mlruns.db'}",
            "tracking.log_model": "false", "train.log_pairs_to": workdir / "pairs"}
    base.update(settings)
    return ["--config", str(TINY), *(f"--{k}={v}" for k, v in base.items())]


@pytest.mark.timeout(240)
def test_past_the_bound_every_rank_stops_with_one_line_naming_the_shards(damage_data, tmp_path):
    """Two ranks, started as the deepspeed launcher starts them (so each one's own output is seen)."""
    url, cfg, vocab = damage_data
    copy, manifest = _copy((url, cfg), tmp_path)
    _, lost, _, _ = _damage("header_checksum", copy, manifest)
    name = manifest["shards"][1]["name"]
    port = str(free_port())
    argv = _job_argv(copy, vocab, tmp_path, **{"data.max_skipped_fraction": 0})  # 0: stop at the first
    procs = []
    for rank in (0, 1):
        env = job_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([*job_command("pretrain", launcher="python"), *argv], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=200) for proc in procs]
    lines = [[line for line in err.splitlines() if line.startswith("error:")] for _, err in outputs]
    keys = _pair_keys(str(url))
    trained = [tuple(p) for path in (tmp_path / "pairs").glob("rank*.jsonl")
               for row in map(json.loads, path.read_text().splitlines()) for p in row["pairs"]]
    expected = re.compile(rf"error: step \d+: pairs skipped in epoch 0: \d, more than "
                          rf"data.max_skipped_fraction=0(\.0)? allows \(0\); damaged shards: "
                          rf"{re.escape(name)} \(bad_tar \d\)\. ")
    checks = {
        "both ranks exit 1": [p.returncode for p in procs] == [1, 1],
        "one line each, the same, naming the shard": all(len(ls) == 1 and expected.match(ls[0]) for ls in lines)
        and lines[0] == lines[1],
        "no traceback": not any("Traceback" in err for _, err in outputs),
        "the first bad sample logged": any(f"sample {sorted(lost)[0]!r}" in err and "skipping damaged data" in err
                                           for _, err in outputs),
        "no damaged pair trained": not any(keys[p] in lost for p in trained),
    }
    with sqlite3.connect(tmp_path / "mlruns.db") as con:  # rank 0's MLflow run, in MLflow's own store
        runs = con.execute("select status from runs").fetchall()
        failure = con.execute("select value from tags where key = 'failure'").fetchall()
    said = lines[0][0].removeprefix("error: ") if lines[0] else None
    checks["the MLflow run FAILED, that line its `failure` tag"] = runs == [("FAILED",)] and failure == [(said,)]
    record_fault(dict(fault="damage past data.max_skipped_fraction (set to 0: stop at the first)",
                      what_was_done=f"one sample of {name} with a bad header checksum; 2 ranks (deepspeed-launcher "
                                    "environment), 1 loader worker each",
                      expected="every rank exits 1 with the same one line naming the shard, pairs and bound; no "
                               "traceback on the console; no damaged pair trained; the MLflow run ends FAILED "
                               "with that line as its `failure` tag",
                      pairs_lost=0, pairs_repeated=len(trained) - len(set(trained)), recovery_s=None,
                      passed=all(checks.values())))
    assert all(checks.values()), ({k: v for k, v in checks.items() if not v}, lines, runs, failure,
                                  outputs[0][1][-3000:])


def _open_writer(fifo: Path, proc: subprocess.Popen | None, timeout: float) -> int | None:
    """Open `fifo`'s writing end once a reader waits in open() for it (that reader then goes on);
    None if `proc` (unless None) ends or `timeout` passes first."""
    deadline = time.time() + timeout
    while (proc is None or proc.poll() is None) and time.time() < deadline:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:  # ENXIO: no reader yet
            assert err.errno == errno.ENXIO
            time.sleep(0.005)
    return None


@pytest.mark.timeout(240)
def test_the_training_process_is_gone_within_2_s_of_a_worker_error(damage_data, tmp_path):
    """Two shards, each a FIFO, each read by one of two workers: each waits in open() for a
    writer. The test opens the first worker's: it goes on and fails (a stream it cannot seek: an
    OSError, not damage), so the test knows the moment. The other worker stays stuck in its read,
    as in a stalled one: the training process must not wait for it."""
    url, cfg, vocab = damage_data
    copy, manifest = _copy((url, cfg), tmp_path)
    manifest["shards"] = manifest["shards"][:2]
    _save(copy, manifest)
    seed = load_config(TINY).train.seed
    first, second = (part[0].shard for part in split_even(remaining_segments(Manifest(str(copy)), {}, seed, 0), 2))
    for name in (first, second):
        (copy / name).unlink()
        os.mkfifo(copy / name)
    log = tmp_path / "job.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*job_command("pretrain", launcher="python"),
                                 *_job_argv(copy, vocab, tmp_path, **{"data.num_workers": 2})],
                                cwd=tmp_path, env=job_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        writer = _open_writer(copy / first, proc, 180)
        failed_at = time.time()
        proc.wait(timeout=60)
        gone_s = time.time() - failed_at
    finally:
        if proc.poll() is None:
            proc.kill()
        # a worker still waiting goes on and ends (the job has gone: it is an orphan stuck in open())
        for fifo in (writer, _open_writer(copy / second, None, 2)):
            if fifo is not None:
                os.close(fifo)
    text = log.read_text()
    [line] = [line for line in text.splitlines() if line.startswith("error:")] or [""]
    with sqlite3.connect(tmp_path / "mlruns.db") as con:
        ended = con.execute("select status, (select value from tags where key = 'failure') from runs").fetchall()
    checks = {"exit 1": proc.returncode == 1, "gone within 2 s": gone_s < 2.0,
              "one line naming the worker's error and shard": "in a loader worker" in line and first in line,
              "no traceback": "Traceback" not in text,
              "the MLflow run FAILED with that line": ended == [("FAILED", line.removeprefix("error: "))]}
    record_fault(dict(fault="a loader worker's error (not damage): exit time",
                      what_was_done=f"1 rank, 2 loader workers; each one's shard a FIFO: the test opened worker 0's "
                                    f"({first}), which then failed (illegal seek); worker 1 stayed stuck in its read",
                      expected="the training process gone within 2 s of the worker's error, with one line naming "
                               "the error and the shard (torch's shutdown would join each worker for 5 s); its "
                               "MLflow run FAILED with that line",
                      pairs_lost=None, pairs_repeated=None, recovery_s=round(gone_s, 2),
                      passed=all(checks.values())))
    assert all(checks.values()), ({k: v for k, v in checks.items() if not v}, gone_s, ended, text[-3000:])


def test_only_a_collective_that_timed_out_or_lost_its_peer_is_reported_as_a_lost_node():
    from pixelbert_dist.distributed import PeerLost, lost_peer
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms "
                        "for recv operation to complete")
    lost = lost_peer(gloo, "step 7 (backward and gradient reduction)")
    assert isinstance(lost, PeerLost)
    assert "during step 7 (backward and gradient reduction): Timed out waiting 20000ms for recv" in str(lost)
    assert isinstance(lost_peer(RuntimeError("Connection closed by peer [10.213.0.2]:41234"), "step 1 (forward)"),
                      PeerLost)
    assert lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"), "step 1") is None
    assert lost_peer(ValueError("a config timeout of -1"), "step 1") is None  # not a collective's error
