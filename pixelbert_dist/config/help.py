"""The CLI help, built from each field's docstring line, and `python -m pixelbert_dist.config`."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path

import yaml

from pixelbert_dist.config.errors import ConfigError
from pixelbert_dist.config.load import _type_name, load_config
from pixelbert_dist.config.schema import FinetuneConfig, PretrainConfig


def field_docs(cls: type) -> dict[str, str]:
    """The docstring line under each field of a dataclass (and its dataclass bases), from source."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
                docs[node.target.id] = str(nxt.value.value).strip()
    return docs


def describe(schema: type = PretrainConfig) -> str:
    """Every key with its type, default and docstring line: the CLI's --help."""
    lines = []
    defaults = schema()
    pretraining = {f.name for f in dataclasses.fields(PretrainConfig)}
    for section in dataclasses.fields(schema):
        section_cls = typing.get_type_hints(schema)[section.name]
        only = "" if section.name in pretraining else " (fine-tuning only: python -m pixelbert_dist.finetune)"
        lines.append(f"{section.name}: {field_docs(schema).get(section.name, '')}{only}")
        docs = field_docs(section_cls)
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            default = getattr(getattr(defaults, section.name), f.name)
            lines.append(f"  --{section.name}.{f.name}={default!r}  ({_type_name(hints[f.name])})")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def schema_of(path: str | None, overrides: list[str]) -> type:
    """A config with a `task` section is a fine-tuning one (configs/finetune/*.yaml)."""
    if any(arg.startswith("--task.") for arg in overrides):
        return FinetuneConfig
    try:
        loaded = yaml.safe_load(Path(path).read_text()) if path else None
    except (OSError, yaml.YAMLError):
        return PretrainConfig  # load_config names the problem
    return FinetuneConfig if isinstance(loaded, dict) and "task" in loaded else PretrainConfig


def main(argv: list[str] | None = None) -> int:
    """`python -m pixelbert_dist.config [CONFIG.yaml] [--section.key=value ...]`: print it resolved
    (a pre-training or, with a task section, a fine-tuning config)."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(describe(FinetuneConfig))  # pre-training's keys and the task section
        return 0
    path = argv[0] if argv and not argv[0].startswith("--") else None
    overrides = argv[1:] if path else argv
    try:
        cfg = load_config(path, overrides, schema=schema_of(path, overrides))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0
