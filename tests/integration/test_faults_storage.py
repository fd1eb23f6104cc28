"""Storage faults: the S3 server stops answering for N seconds, then comes back.
(Over 300 lines: the freezable S3 server fixture serves all three outages.)

The outage is real: this module's own moto server is frozen with SIGSTOP and resumed with
SIGCONT, so its state survives and open connections hang, as when an object store stalls.
The S3 bounds are shortened for the tests (PIXELBERT_S3_*: 1 s connect and read timeouts):
a GET gives up after 3 tries (~2 s each against the frozen server) with 0.25 s and 0.5 s
between them, under 7 s; writes get 3 botocore tries (the sharding job 5), ~2.7 s each.
Each test writes one row of the fault table (tests/faults.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from data_pipeline.storage import S3Settings, StorageError, StorageUnavailable, open_storage, s3_client
from data_pipeline.synthetic import generate
from tests.faults import record_fault
from tests.launch import job_env, start_moto

SHORT_BOUNDS = {"PIXELBERT_S3_ATTEMPTS": "3", "PIXELBERT_S3_BACKOFF": "0.25",
                "PIXELBERT_S3_CONNECT_TIMEOUT": "1", "PIXELBERT_S3_READ_TIMEOUT": "1"}
BUCKET = "faults"


def read_bound_s() -> float:
    """How long a GET may keep failing before it gives up, under the settings in force."""
    s = S3Settings.from_env()
    return s.attempts * (s.connect_timeout + s.read_timeout) + s.backoff * (2 ** (s.attempts - 1) - 1)


def resume_gap_s() -> float:
    """The longest a GET can take to notice a server that came back: the try in flight times out,
    then the longest wait before the next (plus a second to decode and batch)."""
    s = S3Settings.from_env()
    return s.connect_timeout + s.read_timeout + s.backoff * 2 ** max(0, s.attempts - 2) + 1


class FreezableS3:
    """A moto server of this module's own, which a test can freeze and thaw."""

    def __init__(self, proc: subprocess.Popen, endpoint: str) -> None:
        self.proc, self.endpoint = proc, endpoint
        self.frozen_at = self.thawed_at = None

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen_at, self.thawed_at = time.monotonic(), None

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        if self.thawed_at is None:
            self.thawed_at = time.monotonic()

    @contextmanager
    def outage(self, seconds: float):
        """Frozen now, thawed `seconds` later by a timer (or on leaving the block, if sooner)."""
        self.freeze()
        timer = threading.Timer(seconds, self.thaw)
        timer.start()
        try:
            yield self
        finally:
            timer.cancel()
            self.thaw()


@pytest.fixture(scope="module")
def own_s3():
    """moto's server as a process of this module's own (the session's is shared): short S3 bounds."""
    proc, endpoint, env = start_moto()
    env.update(SHORT_BOUNDS)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3_client.cache_clear()  # clients made for the session's server keep its endpoint
    s3_client().create_bucket(Bucket=BUCKET)
    server = FreezableS3(proc, endpoint)
    yield server
    server.thaw()
    proc.terminate()
    proc.wait(timeout=10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s3_client.cache_clear()


def objects(prefix: str) -> dict[str, str]:
    """name under the prefix -> sha256 of its bytes."""
    store = open_storage(f"s3://{BUCKET}/{prefix}")
    return {name: hashlib.sha256(store.read_bytes(name)).hexdigest() for name in store.list()}


def shard_command(inputs: dict, out: str) -> list[str]:
    return [sys.executable, "-m", "data_pipeline.shard", "--source", inputs["source"], "--out", out,
            "--shard-size", "3", "--num-cpus", "2", "--no-progress"]


def shard_env() -> dict[str, str]:
    env = job_env(RAY_USAGE_STATS_ENABLED="0", PIXELBERT_S3_ATTEMPTS="5")
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own
    return env


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, own_s3, ray_local):
    """24 synthetic images sharded without a fault (8 shards) on disk, the reference; copied to
    s3://faults/clean for the loader."""
    from data_pipeline import shard

    root = tmp_path_factory.mktemp("faults")
    captions = generate(root / "syn", 24, seed=3)
    source = f"coco:captions={captions},images={root / 'syn' / 'images'}"
    reference = root / "reference"
    assert shard.main(["--source", source, "--out", str(reference), "--shard-size", "3", "--no-progress"]) == 0
    clean = open_storage(f"s3://{BUCKET}/clean")
    for path in sorted(reference.iterdir()):
        clean.upload_file(path.name, str(path))
    return {"root": root, "captions": captions, "source": source, "reference": reference}


def _without_timing(manifest: bytes) -> dict:
    data = json.loads(manifest)
    data["stats"].pop("seconds")  # the job's wall time: the one field two runs never share
    return data


@pytest.mark.timeout(150)
def test_sharding_outlives_an_outage_with_byte_identical_output(own_s3, inputs, tmp_path):
    outage_s = 3.0
    log = (tmp_path / "shard.log").open("w")
    started = time.monotonic()
    job = subprocess.Popen(shard_command(inputs, f"s3://{BUCKET}/faulty"), env=shard_env(),
                           stdout=log, stderr=subprocess.STDOUT)
    store = open_storage(f"s3://{BUCKET}/faulty")
    try:
        while not any(n.endswith(".tar") for n in store.list()):  # the first shard is in: Ray's tasks run
            assert job.poll() is None, (tmp_path / "shard.log").read_text()[-3000:]
            assert time.monotonic() - started < 90, "the sharding job wrote no shard"
            time.sleep(0.05)
        written_before = sum(n.endswith("_stats.json") for n in store.list())
        with own_s3.outage(outage_s):
            time.sleep(outage_s + 0.5)
        still_running = job.poll() is None  # the job was mid-way when the server froze and came back
        rc = job.wait(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
    ended = time.monotonic()
    output = (tmp_path / "shard.log").read_text()
    clean = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs["reference"].iterdir()}
    faulty = objects("faulty")
    manifests_equal = (_without_timing((inputs["reference"] / "manifest.json").read_bytes()) ==
                       _without_timing(open_storage(f"s3://{BUCKET}/faulty").read_bytes("manifest.json")))
    clean.pop("manifest.json"), faulty.pop("manifest.json")
    differing = sorted(n for n in clean.keys() | faulty.keys() if clean.get(n) != faulty.get(n))
    recovery_s = ended - own_s3.thawed_at
    passed = rc == 0 and still_running and not differing and manifests_equal and written_before < 8
    record_fault({
        "fault": f"S3 server frozen {outage_s:.0f} s during sharding (python -m data_pipeline.shard to s3://)",
        "what_was_done": f"SIGSTOP after the first shard landed ({written_before} of 8 complete), SIGCONT "
                         f"{outage_s:.0f} s later; botocore retries (5 tries, 1 s timeouts), then Ray's task retries",
        "expected": "the job finishes; every object's sha256 equals an uninterrupted run's (manifest: but its "
                    "wall time)",
        "pairs_lost": None if differing else 0, "pairs_repeated": None if differing else 0,
        "recovery_s": round(recovery_s, 2), "passed": passed})
    assert rc == 0, output[-3000:]
    assert still_running, "the job had finished before the outage ended: nothing was tested"
    assert written_before < 8
    assert not differing, f"objects differ from the uninterrupted run: {differing}"
    assert manifests_equal
    assert recovery_s < 60, f"the job took {recovery_s:.1f} s to finish after the server came back"


@pytest.fixture(scope="module")
def loader_setup(inputs):
    from pixelbert_dist.config import load_config
    from pixelbert_dist.tokenizer import train_wordpiece
    from tests.conftest import TINY

    texts = [a["caption"] for a in json.loads(inputs["captions"].read_text())["annotations"]]
    vocab = train_wordpiece(texts, 150, inputs["root"] / "vocab")
    cfg = load_config(TINY, [f"--data.tokenizer={vocab}", "--data.image_short_side=128",
                             "--data.image_long_side=192", "--data.decoder=cpu"])
    reference = [pair for _, info in _loader(cfg).epoch_batches() for pair in info.pairs]
    assert len(reference) == len(set(reference)) > 100
    return cfg, reference


def _loader(cfg):
    from pixelbert_dist.data.loader import StreamingLoader
    return StreamingLoader(f"s3://{BUCKET}/clean", cfg.data, 4, seed=1, num_workers=0, open_shards=4)


def _lost_and_repeated(got: list, reference: list) -> tuple[int, int]:
    return len(set(reference[:len(got)]) - set(got)), len(got) - len(set(got))


# a shard's tar, or its sample table (read when a worker opens the shard): whichever the outage meets
RETRY_LOG = re.compile(r"s3://faults/clean/(\d{6}\.(?:tar|samples\.npy)): "
                       r"read at byte (\d+) failed \(attempt (\d) of 3\)")


def _epoch_with_outage(cfg, server, outage_s: float, after_batches: int):
    """The epoch's pairs (up to an error), with the server frozen after `after_batches` batches
    for `outage_s` seconds; (pairs, arrival time of each batch, the StorageUnavailable or None)."""
    got, stamps, error, timer = [], [], None, None
    loader = _loader(cfg)  # the manifest is read while the server is up
    try:
        for step, (_, info) in enumerate(loader.epoch_batches()):
            got.extend(info.pairs)
            stamps.append(time.monotonic())
            if step + 1 == after_batches:
                server.freeze()
                timer = threading.Timer(outage_s, server.thaw)
                timer.start()
    except StorageUnavailable as err:
        error = err
    finally:
        if timer is not None:
            timer.cancel()
        server.thaw()
    return got, stamps, error


@pytest.mark.timeout(60)
def test_the_loader_retries_a_short_outage_and_reads_every_pair_once(own_s3, loader_setup, caplog):
    cfg, reference = loader_setup
    caplog.set_level(logging.WARNING, logger="data_pipeline.storage")
    outage_s = 3.0  # longer than one try (a timed-out GET here takes ~2 s: connect + read timeouts)
    got, stamps, error = _epoch_with_outage(cfg, own_s3, outage_s, after_batches=3)
    retries = [m.groups() for m in map(RETRY_LOG.search, caplog.messages) if m]
    after = [t for t in stamps if t >= own_s3.thawed_at]
    recovery_s = (after[0] - own_s3.thawed_at) if after else None
    lost, repeated = _lost_and_repeated(got, reference)
    passed = (error is None and got == reference and bool(retries) and recovery_s is not None
              and recovery_s < resume_gap_s())
    record_fault({
        "fault": f"S3 server frozen {outage_s:.0f} s during an epoch's streaming reads (StreamingLoader, s3://)",
        "what_was_done": f"SIGSTOP after 3 batches, SIGCONT {outage_s:.0f} s later; {len(retries)} failed ranged "
                         "GETs logged and retried at their byte position (3 tries, 1 s timeouts, 0.25/0.5 s backoff)",
        "expected": "every pair of the epoch exactly once, in the uninterrupted run's order; each retry logged "
                    "with the shard, byte offset and attempt",
        "pairs_lost": lost, "pairs_repeated": repeated,
        "recovery_s": None if recovery_s is None else round(recovery_s, 2), "passed": passed})
    assert error is None, f"the outage ({outage_s} s) is shorter than the bound, yet: {error}"
    assert retries, f"no read met the outage: {caplog.messages}"
    assert got == reference, f"{lost} pairs lost, {repeated} repeated"
    assert recovery_s is not None and recovery_s < resume_gap_s(), f"{recovery_s} s to resume"


@pytest.mark.timeout(60)
def test_the_loader_stops_with_the_shard_and_offset_named_after_the_bound(own_s3, loader_setup):
    cfg, reference = loader_setup
    outage_s, bound = 15.0, read_bound_s()
    got, _, error = _epoch_with_outage(cfg, own_s3, outage_s, after_batches=2)
    failed_after = own_s3.thawed_at - own_s3.frozen_at  # thawed as soon as the loader gave up
    lost, repeated = _lost_and_repeated(got, reference)
    named = error is not None and re.search(r"s3://faults/clean/\d{6}\.(tar|samples\.npy): "
                                            r"read at byte \d+ failed 3 times",
                                            str(error))
    passed = bool(named) and failed_after < bound + 2 and lost == repeated == 0
    record_fault({
        "fault": f"S3 server frozen for longer ({outage_s:.0f} s) than the read bound ({bound:.2f} s) "
                 "during streaming reads",
        "what_was_done": f"SIGSTOP after 2 batches; each GET tried 3 times, then the loader raised "
                         f"{failed_after:.2f} s into the outage: {error}",
        "expected": "a StorageError naming the shard and byte offset within the bound (+2 s); the pairs "
                    "delivered before it are the uninterrupted run's, none twice",
        "pairs_lost": lost, "pairs_repeated": repeated, "recovery_s": None, "passed": passed})
    assert named, f"not a clear error: {error!r}"
    assert failed_after < bound + 2, f"gave up after {failed_after:.1f} s, bound {bound:.1f} s"
    assert lost == repeated == 0


@pytest.mark.timeout(60)
def test_a_ranged_read_cut_mid_object_resumes_at_its_byte(own_s3, caplog):
    # 32 MB: more than loopback's socket buffers hold, so the freeze stalls the body mid-way
    caplog.set_level(logging.WARNING, logger="data_pipeline.storage")
    payload = random.Random(0).randbytes(32 * 1024 * 1024)  # no period: a slip would change the hash
    store = open_storage(f"s3://{BUCKET}/big")
    store.write_bytes("blob.tar", payload)
    outage_s, offset = 2.0, 1000
    digest, read, thawed_read = hashlib.sha256(), 0, None
    with store.open_read("blob.tar", offset) as stream:
        first = stream.read(1 << 20)
        digest.update(first)
        read += len(first)
        with own_s3.outage(outage_s):
            while chunk := stream.read(3 * 1000 * 1000 + 7):  # an odd size: resumes fall mid-chunk
                digest.update(chunk)
                read += len(chunk)
                if own_s3.thawed_at is not None and thawed_read is None:
                    thawed_read = time.monotonic()
    failed = re.compile(r"blob\.tar: read at byte (\d+) failed")
    positions = [int(m.group(1)) for m in map(failed.search, caplog.messages) if m]
    exact = read == len(payload) - offset and digest.hexdigest() == hashlib.sha256(payload[offset:]).hexdigest()
    mid = [p for p in positions if offset + (1 << 20) <= p < len(payload)]
    recovery_s = None if thawed_read is None else thawed_read - own_s3.thawed_at
    passed = exact and bool(mid)
    record_fault({
        "fault": f"S3 server frozen {outage_s:.0f} s in the middle of a ranged GET's body (32 MB object)",
        "what_was_done": f"SIGSTOP after 1 MB of a read from byte {offset}; the body stalled at byte "
                         f"{mid[0] if mid else '?'} and was reopened there ({len(positions)} failed tries logged)",
        "expected": "the bytes read equal the object's from the offset (sha256), nothing repeated or lost",
        "pairs_lost": None, "pairs_repeated": None,
        "recovery_s": None if recovery_s is None else round(recovery_s, 2), "passed": passed})
    assert exact, "the bytes read differ from the object's"
    assert mid, f"the outage never cut the body mid-way: {positions}"


def _fake_checkpoint(root: Path, step: int) -> str:
    """A checkpoint folder as `save` leaves it, without DeepSpeed: rank 0's files and the marker."""
    tag = f"step{step:08d}"
    folder = root / tag
    folder.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "client_state.json"):
        (folder / name).write_bytes(os.urandom(64 * 1024) if name.endswith(".pt") else b'{"step": %d}' % step)
    (folder / "complete.json").write_text(json.dumps({"step": step, "epoch": 0, "world_size": 1}))
    return tag


@pytest.mark.timeout(60)
def test_a_mirror_upload_cut_by_an_outage_fails_loudly_and_is_never_resumed(own_s3, one_rank_group, tmp_path,
                                                                           monkeypatch):
    from data_pipeline.storage import S3Storage
    from pixelbert_dist import checkpoint

    root, mirror = tmp_path / "checkpoints", f"s3://{BUCKET}/run"
    good, cut = _fake_checkpoint(root, 100), _fake_checkpoint(root, 200)
    checkpoint.push(root, good, mirror, keep_last=3)
    uploads, real_upload = [], S3Storage.upload_file

    def upload_then_freeze(self, name, local_path):  # the server stops once two files of `cut` are in
        if name.startswith(cut) and len(uploads) == 2:
            own_s3.freeze()
        real_upload(self, name, local_path)
        uploads.append(name)

    monkeypatch.setattr(S3Storage, "upload_file", upload_then_freeze)
    s = S3Settings.from_env()
    # botocore's tries (its waits are short); one PUT try to a frozen server took ~2.7 s here with
    # 1 s timeouts: the connection, then the response, each waited out
    bound = s.attempts * (s.connect_timeout + 2 * s.read_timeout) + 2
    started = time.monotonic()
    try:
        with pytest.raises(StorageError) as failure:
            checkpoint.push(root, cut, mirror, keep_last=3)
        failed_after = time.monotonic() - started
    finally:
        own_s3.thaw()
    monkeypatch.undo()
    mirrored = open_storage(mirror).list()
    partial = sorted(n for n in mirrored if n.startswith(f"{cut}/"))
    fresh = tmp_path / "fresh-node"
    checkpoint.pull_newest(fresh, mirror, local_rank=0)
    pulled = checkpoint.complete_tags(fresh)
    message = str(failure.value)
    clear = cut in message and "complete.json" in message and "zero_pp_rank_0" in message
    # 2 files, or 3: the timed-out PUTs of the third reach the server when it wakes up
    marker_absent = f"{cut}/complete.json" not in mirrored and 2 <= len(partial) <= 3
    passed = marker_absent and pulled == [good] and clear and failed_after < bound
    record_fault({
        "fault": "S3 server frozen during a checkpoint's mirror upload (checkpoint.push to s3://)",
        "what_was_done": f"SIGSTOP after 2 of {cut}'s 3 files arrived (the marker goes last); push raised "
                         f"after {failed_after:.2f} s (botocore: {s.attempts} tries, 1 s timeouts); then "
                         "pull_newest on an empty node",
        "expected": f"push raises a StorageError naming the checkpoint and file within {bound:.0f} s; no "
                    f"complete.json for {cut} in the mirror; pull_newest takes {good}",
        "pairs_lost": None, "pairs_repeated": None, "recovery_s": None, "passed": passed})
    assert clear, message
    assert failed_after < bound, f"push took {failed_after:.1f} s to fail"
    assert marker_absent, mirrored
    assert pulled == [good]
    assert sorted(p.name for p in (fresh / good).iterdir()) == sorted(p.name for p in (root / good).iterdir())
