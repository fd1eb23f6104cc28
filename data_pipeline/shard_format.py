"""The on-storage contract between the sharding job, `verify` and the training loader.

    NNNNNN.tar          WebDataset shard: KEY.jpg, KEY.txt (first caption), KEY.json (metadata);
                        image pairs (NLVR2) add KEY.right.jpg after KEY.jpg
    NNNNNN.idx          DALI index of the shard, the format of DALI's `wds2idx`
    NNNNNN_stats.json   written after the two above: the shard is complete when this matches
    _job.json           inputs fingerprint + settings, written before any shard
    manifest.json       written last: every shard, its samples and byte offsets, run statistics

Tar headers are deterministic (ustar, mtime 0, no owner), so the same inputs and settings
give byte-identical shards: a resumed run ends with exactly the dataset a clean run makes.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

FORMAT = "pixelbert-dist/webdataset-v1"
MANIFEST = "manifest.json"
JOB = "_job.json"
TAR_BLOCK = 512
DALI_INDEX_VERSION = "v1.2"
# img2dataset's order; the image comes first (a sample's offset is its jpg's header), a pair's
# right image next: its extension is "right.jpg" for WebDataset, DALI and wds2idx alike.
MEMBER_ORDER = ("jpg", "right.jpg", "txt", "json")


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


def index_name(index: int) -> str:
    return f"{index:06d}.idx"


def stats_name(index: int) -> str:
    return f"{index:06d}_stats.json"


def is_job_file(name: str) -> bool:
    """Files this job owns in an output location (everything else is left alone)."""
    stem = name.split("/")[-1]
    return (stem in (MANIFEST, JOB) or
            (stem[:6].isdigit() and stem[6:] in (".tar", ".idx", "_stats.json")))


@dataclass
class Member:
    ext: str
    offset: int  # of the member's data (after its header), as DALI's index wants
    size: int


@dataclass
class SampleEntry:
    key: str
    offset: int  # of the first member's header: seek here to resume mid-shard
    size: int    # bytes from `offset` through the last member's padding
    members: list[Member] = field(default_factory=list)

    def to_manifest(self) -> dict:
        return {"key": self.key, "offset": self.offset, "size": self.size}


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes samples to a tar on a local file and records every byte offset."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples: list[SampleEntry] = []

    def write(self, key: str, members: dict[str, bytes]) -> None:
        entry = SampleEntry(key, offset=self._tar.offset, size=0)
        for ext in sorted(members, key=lambda e: MEMBER_ORDER.index(e) if e in MEMBER_ORDER else len(MEMBER_ORDER)):
            data = members[ext]
            header_at = self._tar.offset
            self._tar.addfile(_tar_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
            entry.members.append(Member(ext, header_at + TAR_BLOCK, len(data)))
        entry.size = self._tar.offset - entry.offset
        self.samples.append(entry)

    def close(self) -> None:
        self._tar.close()


def dali_index(samples: Iterable[SampleEntry]) -> str:
    """The text `wds2idx` writes: a header line, then per sample `ext offset size name` per member."""
    samples = list(samples)
    lines = [f"{DALI_INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        lines.append(" ".join(f"{m.ext} {m.offset} {m.size} {sample.key}.{m.ext}" for m in sample.members))
    return "\n".join(lines) + "\n"


def read_samples(stream: BinaryIO) -> Iterator[tuple[SampleEntry, dict[str, bytes]]]:
    """Walk a shard sequentially (a streaming body works); yields entries and member bytes.

    Only raw bytes come out: nothing is unpickled or decoded here.
    """
    current: SampleEntry | None = None
    data: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            payload = tar.extractfile(info).read()
            if current is None or key != current.key:
                if current is not None:
                    yield current, data
                current, data = SampleEntry(key, info.offset, 0), {}
            current.members.append(Member(ext, info.offset_data, info.size))
            current.size = info.offset_data + -(-info.size // TAR_BLOCK) * TAR_BLOCK - current.offset
            data[ext] = payload
    if current is not None:
        yield current, data


@dataclass
class ShardResult:
    """What a finished shard reports; stored as NNNNNN_stats.json and in the manifest."""

    index: int
    name: str
    index_file: str
    num_samples: int
    bytes: int
    sha256: str
    samples: list[dict]       # key, offset, size, captions (count) per sample, in tar order
    records: dict[str, int]   # per source: records assigned to this shard
    written: dict[str, int]   # per source: samples written
    captions: dict[str, int]  # per source: captions written
    skipped: dict[str, dict[str, int]]  # per source: reason -> count
    skipped_examples: list[dict]        # first few skipped samples with key, image and reason
    reencoded: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ShardResult":
        return cls(**json.loads(text))


# ---------------------------------------------------------------------------- indexed tars
# `python -m data_pipeline.index` lists existing WebDataset tars (img2dataset's layout:
# KEY.jpg|png|webp, KEY.txt, optional KEY.json) in a manifest without rewriting them. Their
# shards carry `"layout": "img2dataset"`, and `"url"` when the tar lives outside the
# manifest's location. The loader then reads only the listed byte ranges (`read_listed`), so
# samples the index rejected, between or after good ones, are never parsed.

INDEX_FORMAT = "pixelbert-dist/webdataset-index-v1"
IMG2DATASET = "img2dataset"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def split_member(name: str) -> tuple[str, str]:
    """(key, ext) as WebDataset splits a member name: the key ends at the file name's first dot."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def unsafe_member(name: str) -> bool:
    """A name no reader may trust as a path: empty, absolute, `..` anywhere, backslashes."""
    return (not name or name.startswith("/") or "\\" in name or ".." in name.split("/")
            or (len(name) > 1 and name[1] == ":"))


def image_member(members: dict[str, bytes]) -> str | None:
    return next((ext for ext in IMAGE_EXTS if ext in members), None)


def caption_of(members: dict[str, bytes]) -> str | None:
    """An indexed sample's caption: KEY.txt, else KEY.json's "caption"; None if neither has text.

    A KEY.txt that is not UTF-8 raises UnicodeDecodeError (the index skips such samples).
    """
    text = members["txt"].decode("utf-8").strip() if "txt" in members else ""
    if not text and "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            meta = None
        caption = meta.get("caption") if isinstance(meta, dict) else None
        text = caption.strip() if isinstance(caption, str) else ""
    return text or None


def read_listed(stream: BinaryIO, samples: Iterable[dict], start: int) -> Iterator[dict[str, bytes]]:
    """Member bytes (by ext) of each listed sample; `stream` is positioned at byte `start`.

    Bytes between listed samples are read past, never parsed; nothing is unpickled or decoded.
    """
    position = start
    for sample in samples:
        _read_exactly(stream, sample["offset"] - position, discard=True)
        chunk = _read_exactly(stream, sample["size"])
        position = sample["offset"] + sample["size"]
        members = {}
        with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    members[split_member(info.name)[1]] = tar.extractfile(info).read()
        yield members


def _read_exactly(stream: BinaryIO, size: int, discard: bool = False) -> bytes:
    parts, left = [], size
    while left > 0:
        data = stream.read(min(left, 1 << 20) if discard else left)
        if not data:
            raise tarfile.ReadError(f"unexpected end of data: {left} of {size} bytes missing")
        left -= len(data)
        if not discard:
            parts.append(data)
    return b"".join(parts)
