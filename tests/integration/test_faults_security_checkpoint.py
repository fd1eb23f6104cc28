"""Hostile checkpoints: a DeepSpeed file whose pickle would run a command, and a mirror whose
key climbs out of the checkpoint folder. Every path that reads a checkpoint refuses the file by
name and runs nothing of it; a mirror fetch with such a key is refused before anything is written.

One subprocess (a 1-rank gloo world, no Ray) saves two real tiny checkpoints (ZeRO-2 fp32, ZeRO-3
bf16) with DeepSpeed, poisons copies of them with `poison` below, and tries the engine's resume
load on each; the rest (from_pretrained, export, the elastic resume's consolidation) runs here
on copies of the clean ones, poisoned the same way with a marker of its own. Each test records
one row of the fault table (section "security").
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixelbert_dist import checkpoint, export, safe_load
from pixelbert_dist.model import PixelBert
from tests.faults import record_fault
from tests.launch import job_env

SETTINGS = {2: "fp32", 3: "bf16"}  # ZeRO stage: precision (the two stages, bf16 on and off)
CLEAN, MODEL_POISONED, OPTIM_POISONED = "step00000001", "step00000002", "step00000003"


class _RunsCode:
    """Unpickled, runs `touch marker`: what a hostile writer of the mirror would put in a .pt file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def poison(path: Path, marker: Path) -> None:
    """The real file plus one entry whose unpickling runs a command: a loader that unpickled it
    would run the command and then load the checkpoint as if nothing happened."""
    state = safe_load.load(path, map_location="cpu")
    state["payload"] = _RunsCode(marker)
    torch.save(state, path)


SAVE_POISON_AND_RESUME = """
import dataclasses, json, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from pixelbert_dist import checkpoint, distributed, safe_load
from pixelbert_dist.config import load_config
from pixelbert_dist.consolidate import full_state_dict
from pixelbert_dist.engine import build_engine, deepspeed_config
from pixelbert_dist.model import PixelBert
from pixelbert_dist.optim import build_lr_schedule, build_optimizer
from tests.conftest import TINY
from tests.launch import REPO
from tests.integration.test_faults_security_checkpoint import (CLEAN, MODEL_POISONED, OPTIM_POISONED, SETTINGS,
                                                               poison)

out, marker = Path(sys.argv[1]), Path(sys.argv[2])
distributed.init()

def engine_of(stage, seed):
    cfg = load_config(TINY, [f"--deepspeed.config={REPO / 'configs/deepspeed/zero2.json'}", "--model.vocab_size=50",
                             "--model.num_layers=1", f"--deepspeed.zero_stage={stage}",
                             f"--train.precision={SETTINGS[stage]}", "--train.global_batch_size=2",
                             "--train.micro_batch_size=2"])
    torch.manual_seed(seed)
    model = PixelBert(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    engine = build_engine(model, optimizer, build_lr_schedule(optimizer, cfg.optim, 10), deepspeed_config(cfg, 1))
    return engine, {"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data)}

results = {}
for stage in SETTINGS:
    root = out / f"zero{stage}"
    engine, run_config = engine_of(stage, seed=stage)
    checkpoint.save(engine, root, 1, {"config": run_config, "epoch": 0}, keep_last=1, is_main=True)
    save_file(full_state_dict(engine, True), str(root / "reference.safetensors"))
    for tag, pattern in ((MODEL_POISONED, "*model_states.pt"), (OPTIM_POISONED, "*optim_states.pt")):
        shutil.copytree(root / CLEAN, root / tag)
        poison(next((root / tag).glob(pattern)), marker)
    other, _ = engine_of(stage, seed=100 + stage)  # other weights: the clean load must bring them back
    for tag in (MODEL_POISONED, OPTIM_POISONED):
        try:
            checkpoint.load(other, root, tag)
            results[f"{stage}/{tag}"] = "loaded"
        except safe_load.UnsafeCheckpoint as err:
            results[f"{stage}/{tag}"] = str(err)
    checkpoint.load(other, root, CLEAN)
    save_file(full_state_dict(other, True), str(root / "resumed.safetensors"))
(out / "results.json").write_text(json.dumps(results))
distributed.finish(0)
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(folder with zero2/ and zero3/, the marker a payload would create, the resume attempts' outcomes)."""
    out = tmp_path_factory.mktemp("hostile-checkpoints")
    marker = out / "payload-ran"
    done = subprocess.run([sys.executable, "-c", SAVE_POISON_AND_RESUME, str(out), str(marker)], cwd=out,
                          env=job_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, marker, json.loads((out / "results.json").read_text())


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def _equal_to_saved(model: PixelBert, saved: Path) -> bool:
    """Every parameter equals the engine's fp32 weights as saved (buffers too, where the state dict has them)."""
    reference, state = _weights(saved), model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    return params <= set(reference) and all(torch.equal(state[n], t) for n, t in reference.items() if n in state)


def _names_file(message: str, folder: Path, pattern: str) -> bool:
    return str(next(folder.glob(pattern))) in message and "posix.system" in message


@pytest.mark.timeout(300)
def test_resume_refuses_a_checkpoint_file_whose_pickle_runs_a_command(checkpoints):
    out, marker, results = checkpoints
    named = {key: _names_file(message, out / f"zero{key[0]}" / key[2:],
                              "*model_states.pt" if key.endswith(MODEL_POISONED) else "*optim_states.pt")
             for key, message in results.items()}
    saved = {stage: [_weights(out / f"zero{stage}" / f"{which}.safetensors") for which in ("reference", "resumed")]
             for stage in SETTINGS}
    resumed_equal = {stage: ref.keys() == res.keys() and all(torch.equal(ref[n], res[n]) for n in ref)
                     for stage, (ref, res) in saved.items()}
    passed = all(named.values()) and len(named) == 4 and not marker.exists() and all(resumed_equal.values())
    record_fault({
        "section": "security", "fault": "checkpoint file that runs code when unpickled (resume)",
        "what_was_done": "real ZeRO-2 fp32 and ZeRO-3 bf16 checkpoints; a copy of each with the model-states "
                         "file, another with the optimizer partition, given one more entry whose pickle calls "
                         "os.system('touch marker'); checkpoint.load (what --resume takes) into a fresh engine",
        "expected": "each poisoned copy refused with UnsafeCheckpoint naming the file and posix.system; the "
                    "marker absent; the clean checkpoint then loads with the saved weights (allowlist not too tight)",
        "pairs_lost": None, "pairs_repeated": None, "recovery_s": None, "passed": passed})
    assert not marker.exists(), "the payload ran"
    assert named == {key: True for key in results} and len(named) == 4, results
    assert resumed_equal == {stage: True for stage in SETTINGS}


@pytest.mark.timeout(300)
def test_from_pretrained_export_and_consolidation_refuse_it_too(checkpoints, tmp_path):
    out = checkpoints[0]
    marker, exports = tmp_path / "payload-ran", tmp_path / "exports"  # its own marker: this test's files
    refusals, exported = {}, {}
    for stage in SETTINGS:
        root = tmp_path / f"zero{stage}"
        shutil.copytree(out / f"zero{stage}" / CLEAN, root / CLEAN)
        for tag, pattern in ((MODEL_POISONED, "*model_states.pt"), (OPTIM_POISONED, "*optim_states.pt")):
            shutil.copytree(root / CLEAN, root / tag)
            poison(next((root / tag).glob(pattern)), marker)
            for way, load in (("from_pretrained", lambda: PixelBert.from_pretrained(root / tag)),
                              ("load_weights_only", lambda: checkpoint.load_weights_only(
                                  PixelBert.from_pretrained(root / CLEAN), root, tag))):
                try:
                    load()
                    refusals[(stage, tag, way)] = False
                except safe_load.UnsafeCheckpoint as err:
                    refusals[(stage, tag, way)] = _names_file(str(err), root / tag, pattern)
            exported[(stage, tag)] = export.main([str(root / tag), str(exports / f"{stage}-{tag}")])
    clean_equal = {stage: _equal_to_saved(PixelBert.from_pretrained(tmp_path / f"zero{stage}" / CLEAN),
                                          out / f"zero{stage}" / "reference.safetensors") for stage in SETTINGS}
    passed = (all(refusals.values()) and set(exported.values()) == {2} and not marker.exists()
              and not exports.exists() and all(clean_equal.values()))
    record_fault({
        "section": "security", "fault": "checkpoint file that runs code when unpickled (from_pretrained, "
                                        "export, elastic resume's zero-to-fp32)",
        "what_was_done": "copies of the real ZeRO-2/ZeRO-3 checkpoints poisoned as in the resume test (model "
                         "states; optimizer partition) through PixelBert.from_pretrained(<checkpoint folder>), "
                         "checkpoint.load_weights_only (elastic resume, task.init) and python -m pixelbert_dist.export",
        "expected": "UnsafeCheckpoint naming the file and posix.system (export: exit 2, nothing written); the "
                    "marker absent; the clean checkpoint loads with the saved fp32 weights",
        "pairs_lost": None, "pairs_repeated": None, "recovery_s": None, "passed": passed})
    assert not marker.exists(), "the payload ran"
    assert all(refusals.values()), refusals
    assert set(exported.values()) == {2} and not exports.exists(), exported
    assert clean_equal == {stage: True for stage in SETTINGS}


# ---------------------------------------------------------------------------- the mirror

@pytest.mark.timeout(60)
def test_a_mirror_key_climbing_out_of_the_checkpoint_folder_refuses_the_fetch(bucket, one_rank_group, tmp_path):
    from data_pipeline.storage import StorageError, open_storage, s3_client

    mirror, s3 = f"s3://{bucket}/run", s3_client()
    evil = "step00000002/../../victim/pwned.txt"
    objects = {"step00000001/mp_rank_00_model_states.pt": b"weights", "step00000001/complete.json": b"{}",
               "step00000002/mp_rank_00_model_states.pt": b"weights", evil: b"pwned",
               "step00000002/complete.json": b"{}", "zz-not-ours/complete.json": b"{}"}
    for name, body in objects.items():
        s3.put_object(Bucket=bucket, Key=f"run/{name}", Body=body)
    root = tmp_path / "node" / "checkpoints"
    victim = tmp_path / "node" / "victim" / "pwned.txt"  # where root / evil lands
    try:
        checkpoint.pull_newest(root, mirror, local_rank=0)
        message = None
    except StorageError as err:
        message = str(err)
    written = [p for p in (tmp_path / "node").rglob("*")] if (tmp_path / "node").exists() else []
    tags = checkpoint.mirrored_tags(open_storage(mirror))
    s3.delete_object(Bucket=bucket, Key=f"run/{evil}")  # without it, the same checkpoint is fetched
    checkpoint.pull_newest(root, mirror, local_rank=0)
    fetched = sorted(p.name for p in (root / "step00000002").iterdir()) if (root / "step00000002").is_dir() else []
    refused = message is not None and evil in message and "step00000002" in message
    passed = (refused and not victim.exists() and not written and tags == ["step00000001", "step00000002"]
              and fetched == ["complete.json", "mp_rank_00_model_states.pt"])
    record_fault({
        "section": "security", "fault": "mirror key that climbs out of checkpoint.dir (pull_newest)",
        "what_was_done": f"moto S3 mirror with run/{evil} beside the newest checkpoint's files and complete.json "
                         "(and a foreign tag zz-not-ours/ with complete.json); --resume auto's pull_newest on a "
                         "node with no checkpoint; then again with that key removed",
        "expected": "StorageError naming the key; nothing written on the node (no victim/pwned.txt outside, no "
                    "partial folder); the foreign tag ignored; the clean mirror then fetches step00000002",
        "pairs_lost": None, "pairs_repeated": None, "recovery_s": None, "passed": passed})
    assert refused, message
    assert not victim.exists() and not written, written
    assert tags == ["step00000001", "step00000002"], tags
    assert fetched == ["complete.json", "mp_rank_00_model_states.pt"], fetched
