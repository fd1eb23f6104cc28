"""What every source reader shares: the spec it is given, the records it yields, its error.

Kind modules import from here (and from `common`), never from the package `__init__`,
which imports them to build the registry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")
MAX_KEY_LENGTH = 90  # a tar member name (key + extension) must fit ustar's 100 bytes


# kind -> reader: the one list of kinds, filled by each kind module's @reader("kind");
# the package __init__ imports every kind module, so a parsed spec sees them all.
READERS: dict[str, Callable[["SourceSpec"], Iterator["Record"]]] = {}


def reader(kind: str):
    """Register the decorated function as the reader of `kind`."""
    def register(read: Callable[["SourceSpec"], Iterator["Record"]]):
        READERS[kind] = read
        return read
    return register


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, malformed spec): stops before any work."""


@dataclass(frozen=True)
class Record:
    """One image (or image pair) and its texts, before the image is read."""

    source: str                    # the source's tag
    source_id: str                 # the image's id inside its source
    image: str                     # path, file:// or s3:// URI (NLVR2: the left image)
    captions: tuple[str, ...]
    byte_range: tuple[int, int] | None = None  # (offset, length) inside `image`, for tar members
    targets: tuple | None = None   # task sources: one JSON-serialisable label per caption, aligned
    image2: str | None = None      # a second image (NLVR2: the right one)
    # The folder or s3:// prefix both images must resolve inside (symlinks followed), else the
    # shard job skips the record as `unsafe_path` unread; None only for locations the user
    # named whole (a manifest's absolute paths and URIs without images=).
    root: str | None = None

    @property
    def key(self) -> str:
        """Unique sample key: no dots (WebDataset splits the extension at the first dot)."""
        key = f"{self.source}_{SAFE_KEY.sub('_', self.source_id)}"
        if len(key) > MAX_KEY_LENGTH:
            import hashlib
            key = f"{self.source}_{hashlib.sha1(self.source_id.encode()).hexdigest()}"
        return key


@dataclass
class SourceSpec:
    kind: str
    options: dict[str, str]
    name: str = ""
    include: frozenset[str] | None = None
    exclude: frozenset[str] = field(default_factory=frozenset)
    bad_records: list[str] = field(default_factory=list)  # lines that could not be parsed

    @classmethod
    def parse(cls, text: str) -> "SourceSpec":
        kind, _, rest = text.partition(":")
        if kind not in READERS:
            raise SourceError(f"source {text!r}: kind must be one of {', '.join(READERS)}")
        options = {}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise SourceError(f"source {text!r}: expected option=value, got {item!r}")
            options[key.strip()] = value.strip()
        name = options.pop("name", kind)
        if SAFE_KEY.search(name):
            raise SourceError(f"source {text!r}: name {name!r} may hold only letters, digits, _ and -")
        include = _read_ids(options.pop("include")) if "include" in options else None
        exclude = _read_ids(options.pop("exclude")) if "exclude" in options else frozenset()
        return cls(kind, options, name, include, exclude)

    def require(self, *names: str) -> list[str]:
        missing = [n for n in names if n not in self.options]
        if missing:
            raise SourceError(f"source {self.name}: missing option(s) {', '.join(missing)}")
        return [self.options[n] for n in names]

    def keeps(self, source_id: str) -> bool:
        return (self.include is None or source_id in self.include) and source_id not in self.exclude


def _read_ids(path: str) -> frozenset[str]:
    """An id list: one id per line, or a JSON array (include=, exclude=, VG's exclude_coco_ids=)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise SourceError(f"id list {path}: {err}") from None
    if text.lstrip().startswith("["):
        return frozenset(str(i) for i in json.loads(text))
    return frozenset(line.strip() for line in text.splitlines() if line.strip())
