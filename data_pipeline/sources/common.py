"""Helpers the kind readers share: JSON files and JSON lines, caption cleaning."""

from __future__ import annotations

import json
from collections.abc import Iterator

from data_pipeline.sources.types import SourceError, SourceSpec


def _load_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as err:
        raise SourceError(f"{what} {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise SourceError(f"{what} {path}: not valid JSON: {err}") from None


def _json_list(data, key: str, path: str, what: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise SourceError(f"{what} {path}: expected a JSON object with a {key!r} list")
    return data[key]


def _json_lines(spec: SourceSpec, raw: bytes, path: str) -> Iterator[tuple[int, object]]:
    """(line number, value) of each JSON line; a line that does not parse is a bad record."""
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            spec.bad_records.append(f"{path}:{number}: {err}")


def _clean(captions) -> tuple[str, ...]:
    """Strip and de-duplicate (in order); non-strings and blanks are dropped here and counted later."""
    seen = dict.fromkeys(c.strip() for c in captions if isinstance(c, str) and c.strip())
    return tuple(seen)


def _clean_aligned(texts, targets) -> tuple[tuple[str, ...], tuple]:
    """Strip; a blank or non-string text is dropped with its target. No de-duplication: a task
    may ask the same question twice, and each copy has its own id and answers."""
    kept = [(t.strip(), target) for t, target in zip(texts, targets) if isinstance(t, str) and t.strip()]
    return tuple(t for t, _ in kept), tuple(target for _, target in kept)
