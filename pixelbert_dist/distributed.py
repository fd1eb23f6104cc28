"""Process-group setup and a clean exit, whichever launcher started us.

torchrun and the deepspeed launcher set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; Ray
Train sets them too (its TorchTrainer has already made the group). One process with none of
them is a world of one. CPU-only machines use gloo; on GPUs, CUDA tensors go over NCCL and
CPU tensors (the per-step "does every rank have a batch" vote, gathered Python objects) over
gloo, so those small collectives never wait for the GPU.

A rank waits at most `train.collective_timeout_s` for the others in any one collective (gloo's
and NCCL's default is 30 minutes): a node that vanishes without closing its sockets (a link
down, a kernel panic) is found in that time, and each surviving rank stops with `PeerLost`.
`init` gives it to the world group, `bound_every_group` to the groups DeepSpeed makes.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str
    """Who started the processes: single, torchrun, deepspeed or ray (a tag of the MLflow run)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launcher() -> str:
    """The launcher that set this process's environment (Ray's is passed in, see init)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if "RANK" in os.environ and "LOCAL_RANK" in os.environ:
        return "deepspeed"
    return "single"


class PeerLost(RuntimeError):
    """Another rank stopped answering (a collective timed out) or left (its connection closed)."""


def init(launcher: str | None = None, timeout_s: float = 300.0) -> DistInfo:
    """Join (or make) the process group; DeepSpeed's init reuses one that exists (Ray Train's,
    with Ray's own timeout).

    `launcher`: who started us, when the environment cannot tell (Ray Train's workers).
    `timeout_s`: the longest wait in one collective (train.collective_timeout_s).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed

    launcher = launcher or detect_launcher()  # before a world of one sets RANK/LOCAL_RANK for itself
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # before the group: NCCL binds to the current device
        device, backend = torch.device("cuda", local_rank), "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, launcher)


def bound_every_group(timeout_s: float) -> None:
    """Give every process group that exists now `timeout_s` (train.collective_timeout_s); call it
    once the engine is built.

    torch gives a group made by new_group() without a timeout the backend's default (gloo: 30
    minutes), not the world group's. DeepSpeed makes its groups that way, among them its copy of
    the world group that ZeRO reduces gradients on: a node lost mid-backward kept the others
    waiting there for 30 minutes, while one lost during the per-step vote was found in time.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    # torch lists its groups only in _world (its own _add_ephemeral_timeout_for_all_pgs reads it too)
    for group in list(dist.distributed_c10d._world.pg_map):
        if dist.get_rank(group) >= 0:  # -1: a group this rank is not in
            dist.set_timeout(timeout, group)


def agree_and_sum(flag: bool, count: int) -> tuple[bool, int]:
    """(every rank says True, the sum of every rank's `count`), in one collective: ranks stop an
    epoch together and never hang."""
    values = torch.tensor([0 if flag else 1, count], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(values)
    return values[0].item() == 0, int(values[1].item())


# what gloo and NCCL say when a peer is gone: a collective timed out, or the connection closed
_LOST = re.compile(r"timed out|timeout|connection (closed|reset)|broken pipe|socket closed|watchdog",
                   re.IGNORECASE)


def lost_peer(err: BaseException, where: str) -> PeerLost | None:
    """A PeerLost naming `where` (the step, and what it was doing) if `err` is a collective's
    report of a rank that timed out or left; None for any other error."""
    distributed_error = isinstance(err, getattr(dist, "DistError", ())) or type(err) is RuntimeError
    if not (distributed_error and _LOST.search(str(err))):
        return None
    said = next((line.strip() for line in str(err).splitlines() if _LOST.search(line)), str(err))
    said = re.sub(r"^\[[^\]]*\]\s*", "", said)  # gloo's [source file:line] prefix
    return PeerLost(f"rank {dist.get_rank() if dist.is_initialized() else 0}: lost the other ranks during {where}: "
                    f"{said} (a rank failed, or a node is lost or hung; train.collective_timeout_s bounds the "
                    "wait). `--resume auto` continues from the last checkpoint")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the group; (0, 1) without one (evaluation in a plain process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def finish(exit_code: int = 0) -> None:
    """Barrier, destroy the group, flush, and leave without interpreter teardown.

    gloo can abort in its destructors at interpreter exit (about 1 run in 15 here) after
    all work is done; exiting this way lets launchers see the real exit code. After a failure
    (a non-zero code) nothing waits: the other ranks may be gone, or stuck in another collective,
    and the loader's workers notice their parent is gone by themselves.
    """
    if dist.is_initialized() and exit_code == 0:
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to synchronize
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
