"""Checkpoints: DeepSpeed's own save/load plus our client state, a completion marker, keep-last-K.

    checkpoints/step00000100/...                DeepSpeed files (model, ZeRO optimizer partitions)
    checkpoints/step00000100/client_state.json  step, loader position, RNG, MLflow run, config
    checkpoints/step00000100/complete.json      written by rank 0 after every rank has saved

`--resume auto` takes the newest folder with complete.json, so a checkpoint cut off
mid-write is never taken. Our state is JSON: readable, and loaded without unpickling.

With `checkpoint.mirror` (an s3:// URL), each complete checkpoint is copied there: every
rank sends the files it wrote (so node-local folders work), then rank 0 sends complete.json
last. `--resume auto` takes the newer of the local and the mirrored checkpoint and fetches
the mirrored one onto each node that lacks it.

A job resumed on another number of ranks cannot load ZeRO's optimizer partitions (DeepSpeed
refuses a new data-parallel size, and its universal-checkpoint converter only knows Adam
state, not our SGD momentum). It then takes the consolidated fp32 weights (DeepSpeed's
zero-to-fp32), the schedule position and the exact data position, and restarts the
optimizer moments, with a warning.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from data_pipeline.storage import Storage, open_storage
from pixelbert_dist import distributed

COMPLETE = "complete.json"
CLIENT_STATE = "client_state.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / COMPLETE).is_file())


def save(engine, root: str | Path, step: int, client_state: dict, keep_last: int, is_main: bool) -> Path:
    """Every rank calls this; returns the checkpoint folder."""
    root = Path(root)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    dist.barrier()  # every rank's files are on disk before the marker
    if is_main:
        (root / tag / CLIENT_STATE).write_text(json.dumps(client_state))
        (root / tag / COMPLETE).write_text(json.dumps({"step": step, "epoch": client_state.get("epoch"),
                                                       "world_size": dist.get_world_size()}))
        for old in complete_tags(root)[:-keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return root / tag


# ZeRO names each rank's partition files; the rest (model states, our JSON) are rank 0's
_PARTITION = re.compile(r"zero_pp_rank_(\d+)_")


def _writer_rank(file_name: str) -> int:
    match = _PARTITION.search(file_name)
    return int(match.group(1)) if match else 0


def mirrored_tags(store: Storage) -> list[str]:
    return sorted(name.split("/")[0] for name in store.list() if name.endswith(f"/{COMPLETE}"))


def push(root: str | Path, tag: str, mirror: str, keep_last: int) -> None:
    """Every rank calls this after `save`: copy the checkpoint to the mirror, prune old ones there."""
    store, folder, rank = open_storage(mirror), Path(root) / tag, dist.get_rank()
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name != COMPLETE and _writer_rank(path.name) == rank:
            store.upload_file(f"{tag}/{name}", str(path))
    dist.barrier()
    if rank == 0:
        store.upload_file(f"{tag}/{COMPLETE}", str(folder / COMPLETE))  # last: the copy is whole
        old = set(mirrored_tags(store)[:-keep_last])
        names = [n for n in store.list() if n.split("/")[0] in old]
        for name in sorted(names, key=lambda n: not n.endswith(COMPLETE)):  # marker first
            store.delete(name)
    dist.barrier()


def pull_newest(root: str | Path, mirror: str, local_rank: int) -> None:
    """Before `--resume auto`: fetch the mirror's newest checkpoint if it is newer than rank 0's.

    Rank 0 decides, so every node resumes the same step; local rank 0 of each node that
    lacks that checkpoint downloads it (complete.json last).
    """
    store = open_storage(mirror)
    if dist.get_rank() == 0:
        remote, local = mirrored_tags(store), complete_tags(root)
        choice = remote[-1] if remote and (not local or remote[-1] > local[-1]) else None
    else:
        choice = None
    tag = distributed.gather_objects(choice)[0]
    if tag is not None and local_rank == 0 and tag not in complete_tags(root):
        names = [n for n in store.list() if n.startswith(f"{tag}/")]
        for name in sorted(names, key=lambda n: n.endswith(COMPLETE)):
            store.download_file(name, str(Path(root) / name))
    dist.barrier()


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
    try:
        path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True)
    except RuntimeError as err:  # state-dict shape mismatches
        raise ValueError(f"checkpoint {root / tag} does not fit this model: {str(err)[:500]}") from None
    if path is None:
        raise FileNotFoundError(f"checkpoint {root / tag} could not be loaded")


def load_weights_only(model, root: Path, tag: str) -> None:
    """Consolidated fp32 weights of a ZeRO checkpoint (any stage) into a plain model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"cls.predictions.decoder.weight"}  # the same tensor as the word embeddings
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint {root / tag} does not fit this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
