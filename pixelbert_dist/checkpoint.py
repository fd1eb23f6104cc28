"""Checkpoints: DeepSpeed's own save/load plus our client state, a completion marker, keep-last-K.
(About 400 lines: the Checkpointer and the file-level functions it orchestrates
(save, mirror push/pull, elastic load) change together.)

    checkpointer = Checkpointer(cfg.checkpoint, dist_info, resume="auto", seed=cfg.train.seed)
    model = build(pretrained=not checkpointer.resuming); checkpointer.prepare_model(model)
    checkpointer.bind(engine, scheduler, loader, train_state, run_config)
    checkpointer.load_latest()                      # at the start of train(): step, data, RNG, weights
    checkpointer.save(step)                         # every rank; a no-op if `step` is already saved

    checkpoints/step00000100/...                DeepSpeed files (model, ZeRO optimizer partitions)
    checkpoints/step00000100/client_state.json  step, loader position, RNG, MLflow run, config
    checkpoints/step00000100/complete.json      written by rank 0 after every rank has saved

`--resume auto` takes the newest folder with complete.json, so a checkpoint cut off
mid-write is never taken. A folder belongs to one run: a run without `--resume` refuses one
that holds complete checkpoints, and keep-last never prunes one newer than the step it saved. Our state is JSON. DeepSpeed's .pt files are pickles, read
weights-only (safe_load.py: tensors, containers and the few DeepSpeed records they hold), by
resume, the elastic resume, from_pretrained, export and task.init alike: a file that asks for
anything else is refused by name, and nothing of it runs.

With `checkpoint.mirror` (an s3:// URL), each complete checkpoint is copied there: every
rank sends the files it wrote (so node-local folders work), then rank 0 sends complete.json
last, only if every rank's files arrived. An upload that fails (S3 down for longer than
data_pipeline.storage.S3Settings allows) fails the save on every rank with a StorageError: the
mirror's copy has no complete.json, so no resume takes it. `--resume auto` takes the newer of
the local and the mirrored checkpoint and fetches the mirrored one onto each node that lacks it;
the mirror may be writable by others, so only our tags count and a file name that would land
outside its checkpoint folder refuses the fetch before anything is written.

A job resumed on another number of ranks cannot load ZeRO's optimizer partitions (DeepSpeed
refuses a new data-parallel size, and its universal-checkpoint converter only knows Adam
state, not our SGD momentum). It then takes the consolidated fp32 weights (DeepSpeed's
zero-to-fp32), the schedule position and the exact data position, and restarts the
optimizer moments, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.storage import Storage, StorageError, StorageUnavailable, open_storage
from pixelbert_dist import distributed
from pixelbert_dist.config import CheckpointConfig
from pixelbert_dist.data.loader import merge_states
from pixelbert_dist.distributed import DistInfo

log = logging.getLogger("pixelbert_dist.checkpoint")

COMPLETE = "complete.json"
CLIENT_STATE = "client_state.json"


TAG = re.compile(r"step\d{8,}")  # tag_for's names


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / COMPLETE).is_file())


def up_to(tags: list[str], step: int) -> list[str]:
    """The tags of `step` and before, oldest first: what keep-last may prune. A newer checkpoint
    is never this run's to remove (a fresh run refuses a used folder; this is the second guard)."""
    return sorted((t for t in tags if TAG.fullmatch(t) and int(t[4:]) <= step), key=lambda t: int(t[4:]))


def refuse_used_folder(root: str | Path) -> None:
    """A fresh run (no --resume) must not save into, and prune, another run's checkpoints; every
    rank checks its own disk (node-local folders) and every rank refuses together."""
    held = sorted({tag for tags in distributed.gather_objects(complete_tags(root)) for tag in tags})
    if held:
        raise ValueError(f"checkpoint.dir {root} holds another run's checkpoints ({', '.join(held[-3:])}); "
                         f"continue that run with --resume auto, or give this one a new folder "
                         f"(--checkpoint.dir=NEW)")


def save(engine, root: str | Path, step: int, client_state: dict, keep_last: int, is_main: bool) -> Path:
    """Every rank calls this; returns the checkpoint folder.

    A folder of this step left by a save that was cut off is removed first (one writer per
    node), so no file of it mixes into this one. Old checkpoints are pruned only once this one
    is complete, each losing its marker first: a prune cut off leaves a partial folder, which
    `--resume auto` ignores, never a "complete" one with files missing.
    """
    root = Path(root)
    tag = tag_for(step)
    if (is_main or os.environ.get("LOCAL_RANK") == "0") and (root / tag).exists():
        _remove(root / tag)
    dist.barrier()
    _fault_injection_point(step, "before_engine_save")
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    dist.barrier()  # every rank's files are on disk before the marker
    _fault_injection_point(step, "after_partitions")
    if is_main:
        (root / tag / CLIENT_STATE).write_text(json.dumps(client_state))
        (root / tag / COMPLETE).write_text(json.dumps({"step": step, "epoch": client_state.get("epoch"),
                                                       "world_size": dist.get_world_size()}))
        for old in up_to(complete_tags(root), step)[:-keep_last]:
            _remove(root / old)
    dist.barrier()
    return root / tag


def _remove(folder: Path) -> None:
    """The completion marker first, then the rest."""
    (folder / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def _fault_injection_point(step: int, where: str) -> None:
    """Fault injection for tests, off unless set: PIXELBERT_TEST_PAUSE_IN_SAVE=<rank>:<step>:<where>
    (where: before_engine_save, after_partitions) makes that rank write its pid to `paused-in-save`
    in its working directory and sleep there, so a test can kill -9 it at that moment of save()."""
    if os.environ.get("PIXELBERT_TEST_PAUSE_IN_SAVE") == f"{dist.get_rank()}:{step}:{where}":
        Path("paused-in-save").write_text(f"{os.getpid()}\n")
        time.sleep(3600)


# ZeRO names each rank's partition files; the rest (model states, our JSON) are rank 0's
_PARTITION = re.compile(r"zero_pp_rank_(\d+)_")


def _writer_rank(file_name: str) -> int:
    match = _PARTITION.search(file_name)
    return int(match.group(1)) if match else 0


def mirrored_tags(store: Storage) -> list[str]:
    """Our checkpoints in the mirror: tags of tag_for's form with complete.json (other names are not ours)."""
    return sorted(tag for tag, _, rest in (name.partition("/") for name in store.list())
                  if rest == COMPLETE and TAG.fullmatch(tag))


def _every_rank_did(work, what: str) -> None:
    """Run `work()` on this rank, then raise on every rank if it failed on any: a rank whose
    upload failed never leaves the others waiting in a barrier for it."""
    try:
        work()
        failure = None
    except (StorageError, StorageUnavailable) as err:
        failure = f"rank {dist.get_rank()}: {err}"
    failures = [f for f in distributed.gather_objects(failure) if f]  # also the ranks' barrier
    if failures:
        raise StorageError(f"{what}: {failures[0]}" + (f" (and {len(failures) - 1} more ranks)"
                                                       if len(failures) > 1 else ""))


def push(root: str | Path, tag: str, mirror: str, keep_last: int) -> None:
    """Every rank calls this after `save`: copy the checkpoint to the mirror, prune old ones there.

    A failed upload raises StorageError on every rank, and complete.json is not sent: the
    partial copy stays in the mirror unmarked, where `pull_newest` never takes it.
    """
    store, folder, rank = open_storage(mirror), Path(root) / tag, dist.get_rank()

    def send_ours() -> None:
        for path in sorted(folder.rglob("*")):
            name = path.relative_to(folder).as_posix()
            if path.is_file() and name != COMPLETE and _writer_rank(path.name) == rank:
                store.upload_file(f"{tag}/{name}", str(path))

    def mark_and_prune() -> None:
        if rank != 0:
            return
        store.upload_file(f"{tag}/{COMPLETE}", str(folder / COMPLETE))  # last: the copy is whole
        old = set(up_to(mirrored_tags(store), int(tag[4:]))[:-keep_last])
        names = [n for n in store.list() if n.split("/")[0] in old]
        for name in sorted(names, key=lambda n: not n.endswith(COMPLETE)):  # marker first
            store.delete(name)

    _every_rank_did(send_ours, f"checkpoint {tag} was not mirrored to {mirror} (no {COMPLETE} there, "
                               "so no resume takes that copy; the local checkpoint is complete)")
    _every_rank_did(mark_and_prune, f"checkpoint {tag}: marking or pruning the mirror {mirror} failed")


def pull_newest(root: str | Path, mirror: str, local_rank: int) -> None:
    """Before `--resume auto`: fetch the mirror's newest checkpoint if it is newer than rank 0's.

    Rank 0 decides, so every node resumes the same step; local rank 0 of each node that
    lacks that checkpoint downloads it (complete.json last). Only checkpoints with
    complete.json in the mirror count: a partial upload is never taken. Every name is checked
    before the first download: one that would land outside root/tag refuses the whole fetch.
    """
    store = open_storage(mirror)
    choice: list[str | None] = [None]

    def decide() -> None:
        if dist.get_rank() == 0:
            remote, local = mirrored_tags(store), complete_tags(root)
            choice[0] = remote[-1] if remote and (not local or remote[-1] > local[-1]) else None

    _every_rank_did(decide, f"cannot list the checkpoint mirror {mirror}")
    tag = distributed.gather_objects(choice[0])[0]

    def fetch() -> None:
        if tag is not None and local_rank == 0 and tag not in complete_tags(root):
            names = [n for n in store.list() if n.startswith(f"{tag}/")]
            targets = {name: _target(Path(root), tag, name) for name in names}
            for name in sorted(names, key=lambda n: n.endswith(COMPLETE)):
                store.download_file(name, str(targets[name]))

    _every_rank_did(fetch, f"cannot fetch checkpoint {tag} from the mirror {mirror}")


def _target(root: Path, tag: str, name: str) -> Path:
    """Where the mirrored file `name` (tag/...) goes: inside root/tag, else StorageError naming it."""
    folder = (root / tag).resolve()
    parts = name[len(tag) + 1:].split("/")
    safe = all(part not in ("", ".", "..") and "\0" not in part for part in parts)
    target = folder.joinpath(*parts).resolve() if safe else None  # symlinks followed: the real place
    if target is None or not target.is_relative_to(folder) or target == folder:
        raise StorageError(f"the mirror's file {name!r} would be written outside {root / tag} (an absolute "
                           "name, an empty, '.' or '..' part): refusing the whole checkpoint, nothing fetched")
    return target


def resolve(resume: str | None, root: str | Path) -> tuple[Path, str] | None:
    """`auto` -> newest complete checkpoint under root (None if there is none); a path -> that one."""
    if not resume:
        return None
    if resume == "auto":
        tags = complete_tags(root)
        return (Path(root), tags[-1]) if tags else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE})")
    return path.parent, path.name


def read_client_state(root: Path, tag: str) -> dict:
    state = json.loads((root / tag / CLIENT_STATE).read_text())
    state["world_size"] = json.loads((root / tag / COMPLETE).read_text())["world_size"]
    return state


def load(engine, root: Path, tag: str) -> None:
    """Model, optimizer and scheduler into the engine (same data-parallel size)."""
    from pixelbert_dist import safe_load  # imports deepspeed: not before distributed.init picks its accelerator

    try:
        # the engine's own loads are weights-only (engine.build_engine); this covers DeepSpeed's others
        with safe_load.weights_only(root / tag):
            path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True)
    except RuntimeError as err:  # state-dict shape mismatches
        raise ValueError(f"checkpoint {root / tag} does not fit this model: {str(err)[:500]}") from None
    if path is None:
        raise FileNotFoundError(f"checkpoint {root / tag} could not be loaded")


def load_weights_only(model, root: Path, tag: str) -> None:
    """Consolidated fp32 weights of a ZeRO checkpoint (any stage) into a plain model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pixelbert_dist import safe_load

    with safe_load.weights_only(root / tag):  # zero_to_fp32 has no loader hook of its own
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"cls.predictions.decoder.weight"}  # the same tensor as the word embeddings
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint {root / tag} does not fit this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


class Checkpointer:
    """Owns a run's checkpoints: finding the one to resume, what one holds, saving, pruning, mirroring.

    A checkpoint holds the engine (model, optimizer, schedule: DeepSpeed's files), the data
    position of all ranks merged, each rank's random streams (Python, torch CPU, CUDA), the
    bound train state (step, MLflow run) and the resolved run config.
    """

    def __init__(self, cfg: CheckpointConfig, dist_info: DistInfo, resume: str | None, seed: int) -> None:
        self.cfg, self.dist, self.seed = cfg, dist_info, seed
        if cfg.mirror:
            if dist_info.is_main:
                open_storage(cfg.mirror).check_writable()  # a missing bucket: before any step
            if resume == "auto":
                pull_newest(cfg.dir, cfg.mirror, dist_info.local_rank)
        if not resume:
            refuse_used_folder(cfg.dir)
        self.found = resolve(resume, cfg.dir)
        self.client = read_client_state(*self.found) if self.found else None
        # A checkpoint of another number of ranks: ZeRO's optimizer partitions do not fit
        self.elastic = self.client is not None and self.client["world_size"] != dist_info.world_size
        self.last_saved: int | None = None

    @property
    def resuming(self) -> bool:
        """A checkpoint will overwrite the weights: the model need not load pre-trained ones."""
        return self.found is not None

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Before the engine wraps `model`: an elastic resume's consolidated fp32 weights go in
        now, while the parameters are whole (ZeRO-3 partitions them when the engine is built)."""
        if self.elastic:
            load_weights_only(model, *self.found)

    def bind(self, engine, scheduler, loader, train_state, run_config) -> None:
        """What a checkpoint saves and restores; `train_state` has state_dict()/load_state_dict()."""
        self.engine, self.scheduler, self.loader = engine, scheduler, loader
        self.train_state, self.run_config = train_state, run_config

    def load_latest(self) -> bool:
        """Restore the checkpoint found at construction into the bound parts; False: a fresh start."""
        if self.found is None:
            return False
        state = self.client
        if self.elastic:
            for _ in range(state["step"]):  # the weights went in before the engine; the schedule catches up
                self.scheduler.step()
            if self.dist.is_main:
                log.warning("resuming %d ranks' checkpoint on %d: weights, schedule and data position are "
                            "restored; optimizer moments restart", state["world_size"], self.dist.world_size)
        else:
            load(self.engine, *self.found)
        self.train_state.load_state_dict(state)
        self.loader.load_state_dict(state["loader"])
        rng, rank = state.get("rng"), self.dist.rank
        reseed = self.seed + 1000 * state["step"] + rank
        if rng and len(rng) == self.dist.world_size:  # same layout: each rank continues its own streams
            restore_rng(rng[rank], reseed)
        else:
            torch.manual_seed(reseed)  # every device's generator
        self.last_saved = state["step"]
        if self.dist.is_main:
            log.info("resumed from %s at step %d (epoch %d)", self.found[0] / self.found[1], state["step"],
                     self.loader.epoch)
        return True

    def due(self, step: int) -> bool:
        return step % self.cfg.every_steps == 0

    def save(self, step: int) -> str | None:
        """Every rank calls this; the checkpoint's location (the mirror's URL if mirrored), or None
        when `step` is already saved."""
        if step == self.last_saved:
            return None
        client = {**self.train_state.state_dict(), "step": step, "epoch": self.loader.epoch,
                  "loader": merge_states(distributed.gather_objects(self.loader.state_dict())),
                  "rng": distributed.gather_objects(rng_state()), "config": self.run_config}
        path = save(self.engine, self.cfg.dir, step, client, self.cfg.keep_last, self.dist.is_main)
        self.last_saved = step
        if not self.cfg.mirror:
            return str(path.resolve())
        push(self.cfg.dir, path.name, self.cfg.mirror, self.cfg.keep_last)
        return f"{self.cfg.mirror.rstrip('/')}/{path.name}"


def rng_state() -> dict:
    """Every generator a training step draws from, as JSON: Python's, torch's CPU one and, on a
    GPU machine, each CUDA device's (dropout and pixel sampling draw there when the model is on a
    GPU; DeepSpeed saves none of them)."""
    state = {"torch": torch.get_rng_state().tolist(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict, reseed: int) -> None:
    """Put back what `rng_state` saved. A CUDA stream the checkpoint lacks (saved on a CPU, or
    another number of visible devices) is seeded from `reseed` instead: never step 0's draws."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_tuple_state(state["python"]))
    if not torch.cuda.is_available():
        return
    cuda = state.get("cuda")
    if cuda is not None and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])
    else:
        log.warning("the checkpoint holds %s CUDA generator states for %d devices: CUDA streams reseeded",
                    "no" if cuda is None else len(cuda), torch.cuda.device_count())
        torch.cuda.manual_seed_all(reseed)


def _tuple_state(state):
    """random.getstate() as JSON made it (lists) back into the tuples random.setstate wants."""
    return tuple(_tuple_state(s) if isinstance(s, list) else s for s in state)
