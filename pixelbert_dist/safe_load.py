"""Reading DeepSpeed's checkpoint files without running code from them.

A checkpoint folder may come from a mirror that other jobs can write, and DeepSpeed reads its
.pt files with `torch.load(weights_only=False)`: a pickle there runs whatever it names. Every
read here is weights-only instead: tensors, storages, containers and primitives (torch's own
allowlist) plus the few DeepSpeed types in ALLOWED. A file that needs anything else is refused
with `UnsafeCheckpoint`, which names the file and what it asked for; nothing of it runs.

    engine = install(engine)       # build_engine: engine.load_checkpoint reads through `load`
    with weights_only(folder):     # DeepSpeed code with no loader hook (zero_to_fp32)
        get_fp32_state_dict_from_zero_checkpoint(...)
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# What DeepSpeed 0.19.8's files pickle beyond torch's defaults, found by saving real checkpoints
# (ZeRO 0-3, fp32 and bf16, our optimizer and schedule) and listing the globals of every file's
# pickle: the ZeRO optimizer files hold the loss scaler, the stage as an enum and (ZeRO 1-2) the
# parameters' fragment addresses. DynamicLossScaler is fp16's (DeepSpeed's CreateLossScaler), a
# GPU-only precision, so it could not be seen here. Each is a plain record: building one runs no
# code of the file's choosing.
ALLOWED = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


class UnsafeCheckpoint(ValueError):
    """A checkpoint file whose pickle needs more than tensors, containers and ALLOWED."""


def load(path: str | Path, map_location=None, mmap: bool = False):
    """torch.load of one checkpoint file, weights-only with ALLOWED; UnsafeCheckpoint if refused."""
    try:
        with torch.serialization.safe_globals(list(ALLOWED)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from err


def _refusal(path: str | Path, err: Exception) -> UnsafeCheckpoint:
    # torch's message suggests allowlisting the global: the opposite of what to do with a foreign file
    text = str(err)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    detail = [line for line in text.splitlines() if line.strip() and not line.startswith(
        ("Weights only load failed", "Check the documentation", "Please file an issue"))]
    what = f"the global {named.group(1)}" if named else (detail[0][:200] if detail else "more than tensors")
    return UnsafeCheckpoint(f"{path}: refused to load a checkpoint file whose pickle needs {what} (a DeepSpeed "
                            f"checkpoint holds only tensors, containers and {', '.join(c.__name__ for c in ALLOWED)});"
                            " nothing of it was run")


class WeightsOnlyLoads(CheckpointEngine):
    """The checkpoint engine DeepSpeed picked, its `load` replaced by ours; saving is unchanged.

    DeepSpeed's engine reads every file of a (non-universal) checkpoint through its checkpoint
    engine: the model states, the ZeRO optimizer partitions.
    """

    def __init__(self, inner: CheckpointEngine) -> None:
        super().__init__()
        self.inner, self.name = inner, f"weights-only loads, saves by {inner.name}"

    def load(self, path: str, map_location=None):
        return load(path, map_location)

    def create(self, info):
        return self.inner.create(info)

    def save(self, state_dict, path: str):
        return self.inner.save(state_dict, path)

    def makedirs(self, path, exist_ok=False):
        return self.inner.makedirs(path, exist_ok=exist_ok)

    def commit(self, info):
        return self.inner.commit(info)

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self):
        return self.inner.is_decoupled()

    def set_commit_info(self, info):
        return self.inner.set_commit_info(info)

    def get_commit_info(self):
        return self.inner.get_commit_info()

    def cleanup(self):
        return self.inner.cleanup()

    def preserves_storage_sharing(self):
        return self.inner.preserves_storage_sharing()


def install(engine):
    """The engine, reading its checkpoints weights-only. DeepSpeed picks its checkpoint engine
    from the config when the engine is built and offers no option for one of ours: we wrap it."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyLoads):
        engine.checkpoint_engine = WeightsOnlyLoads(engine.checkpoint_engine)
    return engine


_FORCE, _FORCE_NOT = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def weights_only(folder: str | Path) -> Iterator[None]:
    """Every torch.load inside is weights-only with ALLOWED, whatever its caller passed.

    For DeepSpeed code that calls torch.load(weights_only=False) directly, with no hook to pass
    a loader: zero_to_fp32 (consolidation), and the engine's loads outside its checkpoint engine.
    TORCH_FORCE_WEIGHTS_ONLY_LOAD is torch's own switch that overrides the argument; it is read at
    each call, and while it is set any other thread's loads are weights-only too (stricter, never
    looser). On a refusal the error names the first file of `folder` that asks for more.
    """
    saved = {name: os.environ.pop(name, None) for name in (_FORCE, _FORCE_NOT)}
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(list(ALLOWED)):
            yield
    except pickle.UnpicklingError as err:
        raise _refusal(_culprit(Path(folder)), err) from err
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _culprit(folder: Path) -> Path:
    """The first file under `folder` that a weights-only load refuses (torch's error does not say)."""
    for path in sorted(folder.glob("*.pt")):
        for mmap in (True, False):  # mapped, its tensors stay on disk; a legacy-format file cannot be
            try:
                load(path, map_location="cpu", mmap=mmap)
                break
            except UnsafeCheckpoint:
                return path
            except Exception:  # noqa: BLE001  not mappable, or another fault: not the one we name
                continue
    return folder
