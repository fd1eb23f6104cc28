"""The DeepSpeed engine, configured from one source of truth.

Batch sizes, precision, clipping and the ZeRO stage come from our config and fill the
DeepSpeed JSON (configs/deepspeed/*.json holds the rest: buckets, overlap, offload
details). A JSON that sets one of our values differently is an error, not a silent winner.
"""

from __future__ import annotations

import json
from pathlib import Path

from pixelbert_dist.config import ConfigError, PretrainConfig


def deepspeed_config(cfg: PretrainConfig, world_size: int) -> dict:
    path = Path(cfg.deepspeed.config)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config: {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {err}") from None
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
                          f"train.micro_batch_size x world size ({cfg.train.micro_batch_size} x {world_size})")
    ours = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.global_batch_size // per_step,
        "gradient_clipping": cfg.train.grad_clip,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": cfg.train.precision == "fp16"},
    }
    for key, value in ours.items():
        theirs = ds.get(key)
        if isinstance(value, dict) and isinstance(theirs, dict):
            # only the keys we set can conflict: {"bf16": {"check_grad_overflow": false}} is the JSON's own
            theirs = {k: v for k, v in theirs.items() if k in value} or None
        if theirs is not None and theirs != value:
            raise ConfigError(f"{path}: {key}={json.dumps(ds[key])} conflicts with the run config "
                              f"({json.dumps(value)}); set it in the run config only")
    if cfg.train.compile and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("train.compile: ZeRO-3 gathers each layer's weights in module hooks that compiled "
                          "modules bypass; use deepspeed.zero_stage 0-2, or train.compile=false")
    zero = dict(ds.get("zero_optimization", {}))
    zero["stage"] = cfg.deepspeed.zero_stage  # the JSON's stage is a default; deepspeed.zero_stage decides
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    merged = {**ds, **{k: (v if not isinstance(v, dict) else {**ds.get(k, {}), **v}) for k, v in ours.items()}}
    merged["zero_optimization"] = zero
    if cfg.train.precision in ("bf16", "fp16"):
        # DeepSpeed casts parameters but keeps buffers fp32: the norms' fp32 statistics would turn
        # half-precision activations back to fp32 and the next conv would refuse them.
        merged.setdefault("data_types", {}).setdefault("buffer_dtype", cfg.train.precision)
    # Our optimizer (SGD + AdamW groups) is a client optimizer DeepSpeed has not vetted.
    merged["zero_allow_untested_optimizer"] = True
    return merged


def build_engine(model, optimizer, scheduler, ds_config: dict):
    """The DeepSpeed engine; it reads checkpoints weights-only (safe_load: a checkpoint runs no code)."""
    import deepspeed

    from pixelbert_dist import safe_load

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return safe_load.install(engine)
