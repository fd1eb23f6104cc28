"""kill -9 of one rank while it saves a checkpoint, at two moments of save(), then `--resume auto`.

One epoch of the tiny config on 2 ranks (80 pairs, 10 steps, a checkpoint every 2, keep_last=1)
in three process starts: run 1 loses rank 1 before it writes its partition of step 4; run 2
resumes and loses rank 0 at step 6 after every partition is written, before complete.json;
run 3 resumes and finishes the epoch. The moment comes from the fault-injection point in
checkpoint.save() (PIXELBERT_TEST_PAUSE_IN_SAVE). Every file of each partial folder is then
overwritten with garbage, so a resume that read any of it would fail or resume the wrong step.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pixelbert_dist.checkpoint import COMPLETE, complete_tags
from pixelbert_dist.data.plan import Manifest
from tests.datasets import synthetic_shards
from tests.conftest import TINY
from tests.faults import record_fault
from tests.launch import REPO, job_command, job_env

MARKER = "paused-in-save"


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    """16 synthetic images x 5 captions in 2 local shards: one epoch is 10 steps of 2 x 4 pairs."""
    shards, vocab = synthetic_shards(tmp_path_factory.mktemp("faults-checkpoint"), 16, seed=5, shard_size=8)
    return str(shards), vocab


def _argv(data, workdir: Path) -> list[str]:
    shards, vocab = data
    settings = {
        "data.train_manifest": shards, "data.tokenizer": vocab, "model.vocab_size": len(vocab.read_text().split()),
        "data.image_short_side": 128, "data.image_long_side": 192, "data.num_workers": 1,
        "model.pixel_sample_count": 4, "train.global_batch_size": 8, "train.micro_batch_size": 4,
        "train.epochs": 1, "train.log_every": 1, "checkpoint.every_steps": 2, "checkpoint.keep_last": 1,
        "checkpoint.dir": workdir / "ckpt", "tracking.uri": f"sqlite:///{workdir / 'mlruns.db'}",
        "train.log_pairs_to": workdir / "pairs", "deepspeed.config": REPO / "configs/deepspeed/zero2.json",
    }
    return ["--config", str(TINY)] + [f"--{k}={v}" for k, v in settings.items()]


def _start(argv: list[str], workdir: Path, pause: str | None, resume: bool) -> subprocess.Popen:
    extra = {"PIXELBERT_TEST_PAUSE_IN_SAVE": pause} if pause else {}
    log = workdir / f"stderr-{len(list(workdir.glob('stderr-*')))}.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([*job_command("pretrain", 2), *argv, *(["--resume", "auto"] if resume else [])],
                                cwd=workdir, env=job_env(**extra), stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
    proc.log = log
    _started.append(proc)
    return proc


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_job_left_behind():
    """A failed check must not leave torchrun and its ranks running (each job is its own session)."""
    yield
    for proc in _started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _started.clear()


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 150) -> float:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before {what}: {_stderr(proc)}"
        assert time.time() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)
    return time.time()


def _stderr(proc: subprocess.Popen, tail: int = 3000) -> str:
    return proc.log.read_text()[-tail:]


def _kill_when_paused(proc: subprocess.Popen, workdir: Path) -> tuple[float, float]:
    """kill -9 the rank paused in save(); (time of the kill, seconds until the job had exited)."""
    marker = workdir / MARKER

    def paused() -> bool:
        return marker.exists() and marker.read_text().strip().isdigit()

    _wait_for(paused, proc, "the pause in save()")
    os.kill(int(marker.read_text()), signal.SIGKILL)
    killed_at = time.time()
    proc.wait(timeout=90)
    marker.unlink()
    return killed_at, time.time() - killed_at


def _poison(folder: Path) -> None:
    """Garbage in every file of a partial checkpoint, and a client state of another step."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage: a resume must never read this")
    (folder / "client_state.json").write_text(json.dumps({"step": 999, "loader": {}}))


def _rows(folder: Path) -> list[dict]:
    return [{**json.loads(line), "rank": int(p.stem[4:])} for p in sorted(folder.glob("rank*.jsonl"))
            for line in p.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kill_9_of_a_rank_inside_a_checkpoint_save_resumes_from_the_last_complete_one(data, tmp_path):
    argv, ckpt = _argv(data, tmp_path), tmp_path / "ckpt"
    checks: dict[str, bool] = {}

    # run 1: rank 1 killed at step 4 before it writes its partition (rank 0 has written its files)
    run1 = _start(argv, tmp_path, "1:4:before_engine_save", resume=False)
    kill1, exit1 = _kill_when_paused(run1, tmp_path)
    checks["run 1 failed"] = run1.returncode != 0
    checks["run 1 kept step 2, its last complete one"] = complete_tags(ckpt) == ["step00000002"]
    checks["step 4 partial"] = not (ckpt / "step00000004" / COMPLETE).exists()
    _poison(ckpt / "step00000004")
    (tmp_path / "pairs").rename(tmp_path / "pairs-1")

    # run 2: resumes from step 2, saves step 4 anew, then rank 0 is killed at step 6 between the
    # partitions and complete.json
    run2 = _start(argv, tmp_path, "0:6:after_partitions", resume=True)
    recovery1 = _wait_for((ckpt / "step00000004" / COMPLETE).exists, run2, "step 4 saved again") - kill1
    kill2, exit2 = _kill_when_paused(run2, tmp_path)
    checks["run 2 failed"] = run2.returncode != 0
    checks["run 2 resumed from step 2"] = "step00000002 at step 2" in _stderr(run2, 10 ** 7)
    partial = ckpt / "step00000006"
    checks["run 2 kept step 4 while step 6 is partial (keep_last=1)"] = complete_tags(ckpt) == ["step00000004"]
    checks["step 6 holds both partitions, no marker"] = (
        not (partial / COMPLETE).exists() and not (partial / "client_state.json").exists()
        and {r for r in (0, 1) if list(partial.rglob(f"*zero_pp_rank_{r}_*"))} == {0, 1})
    _poison(partial)
    (tmp_path / "pairs").rename(tmp_path / "pairs-2")

    # run 3: resumes from step 4 and finishes the epoch
    run3 = _start(argv, tmp_path, None, resume=True)
    recovery2 = _wait_for((ckpt / "step00000006" / COMPLETE).exists, run3, "step 6 saved again") - kill2
    run3.wait(timeout=240)
    checks["run 3 finished"] = run3.returncode == 0
    checks["run 3 resumed from step 4"] = "step00000004 at step 4" in _stderr(run3, 10 ** 7)
    checks["only the last checkpoint is left"] = sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [
        "step00000010"] and complete_tags(ckpt) == ["step00000010"]

    # the pair logs: run 1 up to step 2, run 2 from 2 to 4, run 3 from 4 on
    kept = ([r for r in _rows(tmp_path / "pairs-1") if r["step"] < 2]
            + [r for r in _rows(tmp_path / "pairs-2") if 2 <= r["step"] < 4] + _rows(tmp_path / "pairs"))
    firsts = [min(r["step"] for r in _rows(tmp_path / name)) for name in ("pairs-2", "pairs")]
    checks["run 2 began at step 2, run 3 at step 4"] = firsts == [2, 4]
    pairs = [tuple(p) for r in kept for p in r["pairs"]]
    total = Manifest(data[0]).total_pairs
    lost, repeated = total - len(set(pairs)), len(pairs) - len(set(pairs))
    checks["every pair of the epoch once"] = total == 80 and lost == 0 and repeated == 0
    checks["10 steps x 2 ranks"] = sorted((r["step"], r["rank"]) for r in kept) == [
        (s, r) for s in range(10) for r in (0, 1)]

    common = dict(pairs_lost=lost, pairs_repeated=repeated)
    failed = [name for name, ok in checks.items() if not ok]
    record_fault(dict(fault="kill -9 of rank 1 inside checkpoint save, before its partition",
                      what_was_done="2 ranks, checkpoint every 2 steps, keep_last=1; rank 1 killed at step 4 before "
                                    "engine.save_checkpoint; partial folder poisoned; --resume auto",
                      expected="job fails; step 2 kept and resumed; the partial step 4 never read, rewritten",
                      recovery_s=round(recovery1, 1), passed=not failed, **common))
    record_fault(dict(fault="kill -9 of rank 0 between the partitions and complete.json",
                      what_was_done="rank 0 killed at step 6 after every rank wrote its partition, before "
                                    "client_state.json/complete.json; partial folder poisoned; --resume auto",
                      expected="job fails; step 4 kept (never pruned for a partial newer one) and resumed; "
                               "the epoch finishes with every pair once",
                      recovery_s=round(recovery2, 1), passed=not failed, **common))
    print(f"job exit after kill: {exit1:.1f} s, {exit2:.1f} s; recovery (kill -> the killed step saved again): "
          f"{recovery1:.1f} s, {recovery2:.1f} s")
    assert not failed, f"failed checks: {failed}; run 3: {_stderr(run3)}"
