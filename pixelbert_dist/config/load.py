"""Build the config tree from a YAML file and `--section.key=value` overrides, checking each
value's type; errors name the file and the dotted key."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pixelbert_dist.config.errors import ConfigError, _require
from pixelbert_dist.config.schema import PretrainConfig


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                schema: type = PretrainConfig) -> Any:
    """Build `schema` from a YAML file (optional) and `--section.key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        _require(isinstance(loaded, (dict, type(None))), f"{path}: top level must be a mapping")
        raw = _relative_to(Path(path), loaded or {})
    for override in overrides:
        dotted, value = _parse_override(override)
        section, _, key = dotted.partition(".")
        _require(bool(section and key), f"override {override!r}: expected --section.key=value")
        target = raw.setdefault(section, {})
        _require(isinstance(target, dict), f"{path}: section {section} must be a mapping")
        target[key] = value
    where = " + ".join(filter(None, [str(path) if path else "", "overrides" if overrides else ""]))
    try:
        return _build(schema, raw, prefix="")
    except ConfigError as err:
        raise ConfigError(f"{where or 'defaults'}: {err}") from None


# Files a config file names that ship beside it: relative to that file, so a config works from
# any folder. Data, checkpoints and outputs stay relative to where the job runs.
BESIDE_THE_FILE = (("deepspeed", "config"),)


def _relative_to(path: Path, raw: dict) -> dict:
    for section, key in BESIDE_THE_FILE:
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            raw[section][key] = str((path.resolve().parent / value).resolve())
    return raw


def _parse_override(arg: str) -> tuple[str, Any]:
    _require(arg.startswith("--") and "=" in arg, f"override {arg!r}: expected --section.key=value")
    dotted, text = arg[2:].split("=", 1)
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text  # not YAML: keep the literal string and let the type check judge it
    return dotted, value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    _require(isinstance(raw, dict), f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else \
                f"; valid keys: {', '.join(prefix + n for n in names)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            kwargs[key] = _build(expected, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, expected)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "None" if tp is type(None) else tp.__name__


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_type(name: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp` (int -> float only) or raise naming the field."""
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{name}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name}: invalid value {value!r}; choose one of {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(name, value, option)
            except ConfigError:
                continue
        raise wrong
    if dataclasses.is_dataclass(tp):  # a list's items may be sections of their own (data.mixture)
        return _build(tp, value, f"{name}.")
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        (item_tp,) = typing.get_args(tp)
        return [_check_type(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise wrong
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _SCIENTIFIC.fullmatch(value):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise wrong
    return value
