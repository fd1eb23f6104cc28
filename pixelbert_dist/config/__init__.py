"""One typed config tree for a run: YAML file, then `--section.key=value` overrides.

    cfg = load_config("configs/pretrain/tiny-cpu.yaml", ["--model.num_layers=4"])
    cfg.to_dict()        # nested plain dict, for logging (URL credentials redacted)

Every field has one docstring line; `python -m pixelbert_dist.config --help` prints them.
Errors name the file and the dotted key: an unknown key with the closest valid one, a wrong
type with the expected type, an invalid value with the rule it breaks.
"""

from pixelbert_dist.config.errors import ConfigError, _require
from pixelbert_dist.config.help import describe, field_docs, main
from pixelbert_dist.config.load import _build, _check_type, _parse_override, _type_name, load_config
from pixelbert_dist.config.redact import redact
from pixelbert_dist.config.schema import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    FinetuneConfig,
    MixtureEntry,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "DeepSpeedConfig", "FinetuneConfig", "MixtureEntry", "ModelConfig",
    "OptimConfig", "PretrainConfig", "TaskConfig", "TrackingConfig", "TrainConfig",
    "describe", "field_docs", "load_config", "main", "redact",
]
