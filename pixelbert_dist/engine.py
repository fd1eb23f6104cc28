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
    merged = {**ds, **{k: (v if not isinstance(v, dict) else {**ds.get(k, {}), **v}) for k, v in ours.items()}}
    if cfg.deepspeed.offload_optimizer:
        if cfg.deepspeed.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs ZeRO: set deepspeed.zero_stage to 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # ZeRO-Offload refuses a client optimizer unless told: ours (torch's fused SGD and AdamW,
        # one per group) then steps the fp32 masters on the host, where DeepSpeedCPUAdam would
        # run Adam on every group and drop the CNN's SGD.
        merged["zero_force_ds_cpu_optimizer"] = False
    merged["zero_optimization"] = zero
    if cfg.train.precision in ("bf16", "fp16"):
        types = merged.setdefault("data_types", {})
        # DeepSpeed casts parameters but keeps buffers fp32 unless told: the trained norms' fp32
        # running statistics would turn bf16 activations back to fp32 and the next conv would refuse
        # them. The frozen norms' statistics stay fp32: they are folded into their convs in fp32.
        types.setdefault("buffer_dtype", cfg.train.precision)
        if not cfg.model.train_backbone_norm:
            types.setdefault("keep_in_fp32_modules", ["visual.cnn."])
    if cfg.train.precision == "bf16":
        _accumulate_in_fp32(merged, cfg, path)
    # Our optimizer (SGD + AdamW groups) is a client optimizer DeepSpeed has not vetted.
    merged["zero_allow_untested_optimizer"] = True
    return merged


def _accumulate_in_fp32(merged: dict, cfg: PretrainConfig, path: Path) -> None:
    """bf16 keeps 8 bits of mantissa: summed over micro-steps (and ranks) in bf16, small
    gradients vanish under large ones. DeepSpeed accumulates in fp32 under ZeRO only."""
    types = merged.setdefault("data_types", {})
    if types.get("grad_accum_dtype", "fp32") != "fp32":
        raise ConfigError(f"{path}: data_types.grad_accum_dtype={types['grad_accum_dtype']!r} under bf16 sums "
                          "gradients in bf16; remove it (the run config accumulates in fp32)")
    if cfg.deepspeed.zero_stage > 0:
        types["grad_accum_dtype"] = "fp32"
    elif merged["gradient_accumulation_steps"] > 1:
        raise ConfigError(f"train.precision=bf16 with deepspeed.zero_stage=0 would sum "
                          f"{merged['gradient_accumulation_steps']} micro-steps' gradients in bf16 (DeepSpeed "
                          "accumulates in fp32 only under ZeRO): use deepspeed.zero_stage 1-3")


def build_engine(model, optimizer, scheduler, ds_config: dict):
    """The DeepSpeed engine; it reads checkpoints weights-only (safe_load: a checkpoint runs no code)."""
    import deepspeed

    from pixelbert_dist import safe_load

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return safe_load.install(engine)
