"""NLVR2: the nlvr2 repository's JSON-lines file (one sentence per line) over PAIR-img0.png / PAIR-img1.png.

    nlvr2:path=train.json,images=images/train

One record per image pair: `image` the left (`-img0.png`), `image2` the right (`-img1.png`),
inside the line's `directory` subfolder where it has one (train); targets `{"label": bool, "identifier"}`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_pipeline.sources.common import _clean_aligned, _json_lines
from data_pipeline.sources.types import Record, SourceError, SourceSpec, reader


@reader("nlvr2")
def read(spec: SourceSpec) -> Iterator[Record]:
    """NLVR2 JSON lines: one record per image pair, its sentences as captions, labels as targets."""
    path, images = spec.require("path", "images")
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise SourceError(f"NLVR2 {path}: {err}") from None
    if raw.lstrip().startswith(b"["):
        raise SourceError(f"NLVR2 {path}: a JSON array; expected JSON lines as in the nlvr2 repository's data/")
    pairs: dict[str, list] = {}  # pair id -> [directory, [(sentence, target), ...]]
    for number, row in _json_lines(spec, raw, path):
        parsed = _nlvr2_row(row)
        if isinstance(parsed, str):
            spec.bad_records.append(f"{path}:{number}: {parsed}")
            continue
        pair, directory, sentence, target = parsed
        pairs.setdefault(pair, [directory, []])[1].append((sentence, target))
    root = Path(images)
    for pair, (directory, items) in pairs.items():
        folder = root / directory if directory is not None else root
        captions, targets = _clean_aligned([s for s, _ in items], [t for _, t in items])
        yield Record(spec.name, pair, str(folder / f"{pair}-img0.png"), captions, targets=targets,
                     image2=str(folder / f"{pair}-img1.png"), root=images)


def _nlvr2_row(row) -> tuple[str, str | None, str, dict] | str:
    """(pair id, image subfolder, sentence, target), or what is wrong with the line."""
    if not isinstance(row, dict):
        return "not a JSON object"
    identifier, label = row.get("identifier"), row.get("label")
    if not isinstance(identifier, str) or identifier.count("-") < 3:
        return f"identifier {identifier!r} is not split-set-pair-sentence"
    if label in ("True", "true", True):
        label = True
    elif label in ("False", "false", False):
        label = False
    else:
        return f"label {label!r} is not True or False"
    directory = row.get("directory")
    return (identifier.rsplit("-", 1)[0], None if directory in (None, "") else str(directory),
            row.get("sentence"), {"label": label, "identifier": identifier})
