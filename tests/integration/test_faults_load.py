"""Faults under load: Ray workers SIGKILLed while the sharding job runs; the loader stopped and
resumed every 50 steps at 4 workers per rank. Each test records one row of the fault table
(tests/faults.py; benchmarks/faults.py writes the table).
"""

import hashlib
import io
import json
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from data_pipeline import shard
from data_pipeline.shard_format import MANIFEST, read_samples
from pixelbert_dist.config import load_config
from pixelbert_dist.data.loader import StreamingLoader, merge_states
from pixelbert_dist.data.plan import Manifest
from pixelbert_dist.tokenizer import train_wordpiece
from tests.conftest import TINY
from tests.faults import record_fault

NUM_IMAGES = 20_000
SHARD_SIZE = 500  # 40 shards: many tasks, so a kill lands mid-job and most of the job runs after it
SEED = 16
WORDS = ("red", "green", "blue", "small", "large", "circle", "square", "noise", "tile", "dot", "left", "right")


def _tiny_jpeg(rng: np.random.Generator) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, format="JPEG", quality=80)
    return out.getvalue()


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    """20,000 seeded 32x32 noise JPEGs and their captions (written once; a few seconds)."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(SEED)
    words = random.Random(SEED)
    rows = []
    for i in range(NUM_IMAGES):
        key = f"i{i:05d}"
        (root / "imgs" / f"{key}.jpg").write_bytes(_tiny_jpeg(rng))
        rows.append({"key": key, "image": f"imgs/{key}.jpg",
                     "captions": [" ".join(words.choices(WORDS, k=5)) for _ in range(3)]})
    return root, rows


def _write_manifest(root: Path, name: str, rows: list[dict]) -> str:
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"manifest:path={path},name={name}"


def _shard(source: str, out: Path, shard_size: int) -> int:
    return shard.main(["--source", source, "--out", str(out), "--shard-size", str(shard_size),
                       "--max-short-side", "0", "--max-long-side", "0", "--seed", str(SEED), "--no-progress"])


def _keys_in_tars(folder: Path) -> list[str]:
    keys = []
    for tar in sorted(folder.glob("*.tar")):
        with tar.open("rb") as f:
            keys += [entry.key for entry, _ in read_samples(f)]
    return keys


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def _shard_workers() -> list[psutil.Process]:
    """Ray workers running a shard task. `ray_local`'s cluster runs under this process, so its
    workers (children of its raylet) are among our descendants; a busy one is titled ray::build_shard."""
    workers = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if cmdline and cmdline[0].startswith("ray::build_shard"):
            workers.append(proc)
    return sorted(workers, key=lambda p: p.pid)


class WorkerKiller(threading.Thread):
    """SIGKILLs one busy Ray worker each time the job has finished `thresholds[i]` shards,
    after a seeded delay of up to 0.3 s, so the kill lands at a random point of a task."""

    def __init__(self, out: Path, thresholds: list[int], rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.out, self.thresholds, self.rng = out, thresholds, rng
        self.kills: list[dict] = []
        self.stop = threading.Event()

    def _done(self) -> int:
        return len(list(self.out.glob("*_stats.json"))) if self.out.is_dir() else 0

    def run(self) -> None:
        for threshold in self.thresholds:
            while self._done() < threshold:
                if self.stop.wait(0.01):
                    return
            if self.stop.wait(self.rng.uniform(0.0, 0.3)):
                return
            while not (victims := _shard_workers()):
                if self.stop.wait(0.01):
                    return
            victim = victims[self.rng.randrange(len(victims))]
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:  # it finished between the listing and the kill: take another
                continue
            self.kills.append({"at_s": time.perf_counter(), "pid": victim.pid, "shards_done": self._done()})


@pytest.mark.timeout(150)
def test_ray_workers_killed_mid_job_every_image_lands_once_byte_identical(tiny_images, tmp_path, ray_local):
    root, rows = tiny_images
    source = _write_manifest(root, "tiny", rows)
    # warm-up: both Ray workers import the job's code, so neither timed run pays for it
    assert _shard(_write_manifest(root, "warm", rows[:20]), tmp_path / "warm", 10) == 0

    started = time.perf_counter()
    assert _shard(source, tmp_path / "clean", SHARD_SIZE) == 0
    clean_s = time.perf_counter() - started

    rng = random.Random(SEED)
    num_shards = NUM_IMAGES // SHARD_SIZE
    killer = WorkerKiller(tmp_path / "killed", [rng.randint(2, num_shards // 3),
                                                rng.randint(num_shards // 2, 2 * num_shards // 3)], rng)
    started = time.perf_counter()
    killer.start()
    try:
        rc = _shard(source, tmp_path / "killed", SHARD_SIZE)
    except Exception as err:  # retries used up: still a row, with what the output holds
        rc = f"{type(err).__name__}: {err}"[:300]
    finally:
        killer.stop.set()
        killer.join()
    killed_s = time.perf_counter() - started

    expected = sorted(f"tiny_{r['key']}" for r in rows)
    keys = _keys_in_tars(tmp_path / "killed")
    lost = len(set(expected) - set(keys))
    repeated = len(keys) - len(set(keys))
    identical = _digests(tmp_path / "killed") == _digests(tmp_path / "clean")
    manifests = [json.loads(p.read_text()) if (p := tmp_path / d / MANIFEST).exists() else {"shards": []}
                 for d in ("clean", "killed")]
    same_manifest = manifests[0]["shards"] == manifests[1]["shards"]  # counts, sizes, tar and table sha256
    ok = (rc == 0 and len(killer.kills) == 2 and lost == 0 and repeated == 0 and sorted(keys) == expected
          and identical and same_manifest)
    stale = len(list((tmp_path / "killed").glob(".tmp-*")))
    record_fault(dict(
        fault="Ray workers SIGKILLed mid-job (x2)",
        what_was_done=f"sharding job, {NUM_IMAGES:,} 32x32 images in {num_shards} shards, 2-CPU local Ray: "
                      f"{len(killer.kills)} busy workers (ray::build_shard) SIGKILLed after "
                      f"{' and '.join(str(k['shards_done']) for k in killer.kills)} shards were done (seeded); "
                      f"{killed_s:.1f} s vs {clean_s:.1f} s without kills; tars byte-identical: {identical}"
                      + (f"; {stale} stale .tmp files left" if stale else "") + (f"; job failed: {rc}" if rc else ""),
        expected="Ray retries the killed tasks; every image exactly once; tars byte-identical to a run without kills",
        pairs_lost=lost, pairs_repeated=repeated,
        recovery_s=round(killed_s - clean_s, 1),  # the kills' cost: wall time over the run without them
        passed=ok))
    assert rc == 0, rc
    assert len(killer.kills) == 2, f"the job ended before both kills: {killer.kills}"
    assert lost == 0 and repeated == 0 and sorted(keys) == expected
    assert identical and same_manifest


# ---------------------------------------------------------------------------- the loader

WORLD, WORKERS, BATCH, EVERY = 2, 4, 8, 50


@pytest.fixture(scope="module")
def loader_dataset(tiny_images, tmp_path_factory, ray_local):
    """2,000 of the tiny images with 3 captions each: 6,000 pairs in 20 shards."""
    root, rows = tiny_images
    out = tmp_path_factory.mktemp("loader") / "shards"
    assert _shard(_write_manifest(root, "pairs", rows[:2000]), out, 100) == 0
    vocab = train_wordpiece([c for r in rows[:2000] for c in r["captions"]], 100, out.parent / "vocab")
    cfg = load_config(TINY, [f"--data.tokenizer={vocab}", "--data.image_short_side=64",  # one visual token
                             "--data.image_long_side=64"])
    return str(out), cfg


def _loaders(url, cfg) -> list[StreamingLoader]:
    return [StreamingLoader(url, cfg.data, BATCH, rank=r, world_size=WORLD, num_workers=WORKERS, seed=1)
            for r in range(WORLD)]


def _pairs(step) -> list:
    return [p for _, info in step for p in info.pairs]


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")  # 8 on 2 cores: on purpose
def test_loader_checkpointed_and_resumed_every_50_steps_at_4_workers_loses_and_repeats_nothing(loader_dataset):
    url, cfg = loader_dataset
    reference = []
    streams = [loader.epoch_batches() for loader in _loaders(url, cfg)]
    for step in zip(*streams):
        reference += _pairs(step)

    seen, resumes, state, restarts = [], [], None, 0
    while True:
        started = time.perf_counter()
        loaders = _loaders(url, cfg)  # a new process's loaders, as after a restart
        if state is not None:
            for loader in loaders:
                loader.load_state_dict(state)
        streams = [loader.epoch_batches() for loader in loaders]
        steps = 0
        for step in zip(*streams):
            if steps == 0 and state is not None:
                resumes.append(time.perf_counter() - started)  # restart to the first batch
            seen += _pairs(step)
            steps += 1
            if steps == EVERY:
                break
        # the checkpoint: every rank's position merged, through JSON as a checkpoint stores it
        state = json.loads(json.dumps(merge_states([loader.state_dict() for loader in loaders])))
        for stream in streams:
            stream.close()  # stops the DataLoader workers and the receiving thread
        if steps < EVERY:
            break
        restarts += 1

    total = Manifest(url).total_pairs
    lost = len(set(reference) - set(seen))
    repeated = len(seen) - len(set(seen))
    consumed = sum(e - s for ranges in state["consumed"].values() for s, e in ranges)
    ok = (seen == reference and lost == 0 and repeated == 0 and restarts >= 6
          and total - len(seen) < WORLD * WORKERS * BATCH and consumed == len(seen))
    record_fault(dict(
        fault="loader stopped and resumed every 50 steps",
        what_was_done=f"{total:,} pairs, {WORLD} ranks x {WORKERS} workers, batch {BATCH}: both ranks' state_dict "
                      f"merged, then new loaders + load_state_dict, every {EVERY} steps: {restarts} resumes, "
                      f"restart to first batch {min(resumes):.2f}-{max(resumes):.2f} s" if resumes else "no resume",
        expected="the epoch's pairs exactly once, in the uninterrupted run's order "
                 "(as without resumes, less than a batch per worker is left for the next epoch)",
        pairs_lost=lost, pairs_repeated=repeated,
        recovery_s=round(max(resumes), 2) if resumes else None,  # the slowest restart to its first batch
        passed=ok))
    assert restarts >= 6
    assert lost == 0 and repeated == 0 and seen == reference
    assert total - len(seen) < WORLD * WORKERS * BATCH and consumed == len(seen)
