"""Checkpoints: DeepSpeed's own save/load plus our client state, a completion marker, keep-last-K.

    checkpoints/step00000100/...            DeepSpeed files (model, ZeRO optimizer partitions)
    checkpoints/step00000100/complete.json  written by rank 0 after every rank has saved

`--resume auto` takes the newest folder with complete.json, so a checkpoint cut off
mid-write is never taken.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

COMPLETE = "complete.json"


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
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's files are on disk before the marker
    if is_main:
        (root / tag / COMPLETE).write_text(json.dumps({"step": step, "epoch": client_state.get("epoch")}))
        for old in complete_tags(root)[:-keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return root / tag


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


def load(engine, root: Path, tag: str) -> dict:
    """Model, optimizer and scheduler into the engine; returns the client state."""
    try:
        path, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True)
    except RuntimeError as err:  # state-dict shape mismatches
        raise ValueError(f"checkpoint {root / tag} does not fit this model: {str(err)[:500]}") from None
    if path is None:
        raise FileNotFoundError(f"checkpoint {root / tag} could not be loaded")
    return client_state
