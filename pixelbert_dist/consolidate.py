"""The trained weights of a live DeepSpeed engine as one fp32 state dict on rank 0.

Under bf16/fp16 the module holds low-precision copies and the optimizer the fp32 masters;
under ZeRO the masters (ZeRO-1/2) or the parameters themselves (ZeRO-3) are partitioned
over ranks. DeepSpeed's `safe_get_full_fp32_param` assembles each master (a collective:
every rank calls this); a parameter without one (no ZeRO, fp32) is the master itself.
"""

from __future__ import annotations

import torch
from deepspeed import zero
from deepspeed.utils import safe_get_full_fp32_param


def full_state_dict(engine, is_main: bool) -> dict[str, torch.Tensor]:
    """name -> fp32 CPU tensor of every parameter and buffer on rank 0; {} on the other ranks."""
    module = engine.module
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None and hasattr(param, "ds_id"):  # ZeRO-3, frozen: no master; gather the parameter
            with zero.GatheredParameters([param]):
                full = param.detach().clone()
        elif full is None:
            full = param.detach()
        if is_main:
            state[name] = full.float().cpu().clone()
    if is_main:
        for name, buffer in module.named_buffers():  # ZeRO never partitions buffers (norm statistics)
            state[name] = buffer.detach().cpu().clone()
    return state
