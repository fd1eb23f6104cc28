"""A JSONL, CSV/TSV or parquet manifest: one row per image, its location, caption(s), optional key.

    manifest:path=pairs.parquet[,image_column=image][,caption_column=caption][,key_column=key][,images=ROOT]

A location is a path (relative ones are relative to `images`, by default the manifest's own
folder), a file:// or an s3:// URI. Every location must resolve (symlinks followed) inside
`images` when it is given, else the shard job skips it as `unsafe_path`, unread; without it,
relative paths must stay inside the manifest's folder, and absolute paths and URIs are read
as named: give `images=` (a folder or s3://bucket/prefix) for a manifest you do not trust.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.sources.common import _clean, _json_lines
from data_pipeline.sources.types import Record, SourceError, SourceSpec, reader


@reader("manifest")
def read(spec: SourceSpec) -> Iterator[Record]:
    """JSONL, CSV or parquet rows: image location, caption(s), optional key."""
    (path,) = spec.require("path")
    image_col = spec.options.get("image_column", "image")
    caption_col = spec.options.get("caption_column", "")
    key_col = spec.options.get("key_column", "key")
    root = spec.options.get("images")
    base = root if root is not None else str(Path(path).parent)
    for index, row in enumerate(_manifest_rows(spec, path)):
        if image_col not in row:
            raise SourceError(f"manifest {path}: row {index} has no column {image_col!r} "
                              f"(columns: {', '.join(map(str, row))}); set image_column=")
        captions = _row_captions(row, caption_col)
        location = str(row[image_col])
        relative = "://" not in location and not Path(location).is_absolute()
        if relative:
            location = f"{base.rstrip('/')}/{location}" if "://" in base else str(Path(base) / location)
        source_id = str(row[key_col]) if row.get(key_col) not in (None, "") else str(index)
        yield Record(spec.name, source_id, location, captions, root=base if relative or root is not None else None)


def _row_captions(row: dict, column: str) -> tuple[str, ...]:
    if column:
        value = row.get(column)
    elif "captions" in row:
        value = row["captions"]
    else:
        value = row.get("caption")
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:  # a CSV cell holding a JSON list of captions
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, str) or value is None:
        value = [value]
    return _clean(value)


def _manifest_rows(spec: SourceSpec, path: str) -> Iterator[dict]:
    suffix = Path(path).suffix.lower()
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise SourceError(f"manifest {path}: {err}") from None
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        yield from pq.read_table(io.BytesIO(raw)).to_pylist()
    elif suffix in (".jsonl", ".json"):
        for _, row in _json_lines(spec, raw, path):
            yield row
    elif suffix in (".csv", ".tsv"):
        text = raw.decode("utf-8", errors="surrogateescape")  # bad bytes surface per row below
        for number, row in enumerate(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","), start=2):
            if any(_has_surrogates(v) for v in row.values() if isinstance(v, str)):
                spec.bad_records.append(f"{path}:{number}: not UTF-8")
                continue
            yield row
    else:
        raise SourceError(f"manifest {path}: unknown format {suffix!r}; use .jsonl, .csv, .tsv or .parquet")


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)
