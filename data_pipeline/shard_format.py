"""The on-storage contract between the sharding job, `verify` and the training loader.

    NNNNNN.tar          WebDataset shard: KEY.jpg, KEY.txt (first caption), KEY.json (metadata);
                        image pairs (NLVR2) add KEY.right.jpg after KEY.jpg
    NNNNNN.idx          DALI index of the shard, the format of DALI's `wds2idx`
    NNNNNN.samples.npy  the shard's sample table: key, byte offset, size, caption count per sample
    NNNNNN_stats.json   written after the three above: the shard is complete when this matches
    _job.json           inputs fingerprint + settings, written before any shard
    manifest.json       written last: every shard (counts, sha256 of tar and table), run statistics

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

# v2: the manifest lists shards only; each shard's samples are in its table (data_pipeline/sample_table.py).
# v1 (samples inline in the manifest) is still read, and `python -m data_pipeline.upgrade` rewrites it as v2.
FORMAT = "pixelbert-dist/webdataset-v2"
MANIFEST = "manifest.json"
JOB = "_job.json"
TAR_BLOCK = 512
DALI_INDEX_VERSION = "v1.2"
# img2dataset's order; the image comes first (a sample's offset is its jpg's header), a pair's
# right image next: its extension is "right.jpg" for WebDataset, DALI and wds2idx alike.
MEMBER_ORDER = ("jpg", "right.jpg", "txt", "json")
# Caps on what a reader allocates for one tar member / one listed sample, whatever a header or a
# manifest announces: an image, caption or metadata member above this is a broken or hostile tar.
MAX_MEMBER_BYTES = 64 << 20
MAX_SAMPLE_BYTES = 4 * MAX_MEMBER_BYTES + 16 * TAR_BLOCK


class ManifestError(ValueError):
    """A manifest or sample table a reader must not trust: the message names it, the shard and the sample."""


class ShardFormatError(ValueError):
    """A shard's bytes are not what its manifest lists; the message names the shard, and the
    sample's key and offset (or the member's offset). `reason` says which check failed, in the
    words the loader counts skipped pairs by (pixelbert_dist/data/stream.py SKIP_REASONS):
    truncated_shard, bad_tar, unsafe_member, too_large, bad_captions or bad_table."""

    def __init__(self, message: str, reason: str = "bad_tar") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keeps `reason` across processes
        return type(self), (str(self), self.reason)


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


def index_name(index: int) -> str:
    return f"{index:06d}.idx"


def stats_name(index: int) -> str:
    return f"{index:06d}_stats.json"


def is_job_file(name: str) -> bool:
    """Files this job owns in an output location: at its top level only (a name relative to the
    location, as `Storage.list` gives it). Everything else, a subfolder's dataset included, is
    left alone."""
    # .samples.npy: sample_table.table_name's suffix, spelled here because sample_table imports this module
    return "/" not in name and (name in (MANIFEST, JOB) or
                                (name[:6].isdigit() and name[6:] in (".tar", ".idx", "_stats.json", ".samples.npy")))


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


def read_samples(stream: BinaryIO,
                 max_member: int = MAX_MEMBER_BYTES) -> Iterator[tuple[SampleEntry, dict[str, bytes]]]:
    """Walk a shard sequentially (a streaming body works); yields entries and member bytes.

    Only raw bytes come out: nothing is unpickled or decoded here. A member whose header
    announces more than `max_member` bytes is an error before any of it is read.
    """
    current: SampleEntry | None = None
    data: dict[str, bytes] = {}
    source = getattr(stream, "name", "shard")
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            if info.size > max_member:
                raise ShardFormatError(f"{source}: member {info.name!r} at offset {info.offset} announces "
                                       f"{info.size} bytes (more than the cap of {max_member})", "too_large")
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
    """What a finished shard reports; stored as NNNNNN_stats.json and in the manifest. Its samples
    are in its table (NNNNNN.samples.npy), never here: the driver holds O(shards)."""

    index: int
    name: str
    index_file: str
    num_samples: int
    bytes: int
    sha256: str
    num_captions: int         # pairs: the sum of the samples' caption counts
    table_bytes: int
    table_sha256: str
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

INDEX_FORMAT = "pixelbert-dist/webdataset-index-v2"
V1_FORMATS = ("pixelbert-dist/webdataset-v1", "pixelbert-dist/webdataset-index-v1")
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
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
            meta = None
        caption = meta.get("caption") if isinstance(meta, dict) else None
        text = caption.strip() if isinstance(caption, str) else ""
    return text or None


def sample_where(source: str, sample: dict) -> str:
    """How every reader names a listed sample in its errors: shard, key, offset."""
    return f"{source}: sample {sample['key']!r} at offset {sample['offset']}"


def listed_chunks(stream: BinaryIO, samples: Iterable[dict], start: int,
                  source: str | None = None) -> Iterator[tuple[dict, bytes | ShardFormatError]]:
    """Each listed sample with its bytes, or the ShardFormatError that says why they cannot be
    read; `stream` is positioned at byte `start`. The table says where each sample starts, so a
    bad sample costs only itself: reading goes on at the next listed offset. Bytes between listed
    samples are read past, never parsed. A shard that ends early fails every sample from there."""
    source = source or getattr(stream, "name", "shard")
    position, ended = start, None
    for sample in samples:
        offset, size = sample["offset"], sample["size"]
        where = sample_where(source, sample)
        if offset < position or not 0 < size <= MAX_SAMPLE_BYTES:
            yield sample, ShardFormatError(f"{where}: listed with {size} bytes after byte {position} "
                                           "(a broken manifest)", "bad_table")
        elif ended is not None:
            yield sample, ShardFormatError(f"{where}: the shard ends at byte {ended} (it is shorter than its "
                                           "manifest says)", "truncated_shard")
        else:
            try:
                _read_exactly(stream, offset - position, discard=True)
                chunk = _read_exactly(stream, size)
            except _ShortRead as err:
                ended = offset + size - err.missing if err.chunk else offset - err.missing
                yield sample, ShardFormatError(f"{where}: {err} (the shard is shorter than its manifest says)",
                                               "truncated_shard")
                continue
            position = offset + size
            yield sample, chunk


def read_listed(stream: BinaryIO, samples: Iterable[dict], start: int,
                source: str | None = None) -> Iterator[dict[str, bytes] | ShardFormatError]:
    """Member bytes (by ext) of each listed sample, or the ShardFormatError that names why the
    sample cannot be used; `stream` is positioned at byte `start` (listed_chunks reads).

    Nothing is unpickled, decoded or written. A sample's bytes must be one tar run of its own
    key's plain files, each within the sample's listed size: anything else (a shard cut short,
    offsets or keys that disagree with the manifest, a bad header, `../x` or `/abs` names,
    links, a header announcing more bytes than the sample holds) is an error naming `source`
    (the shard), key and offset. The loader skips such a sample; `verify` reports it.
    """
    source = source or getattr(stream, "name", "shard")
    for sample, chunk in listed_chunks(stream, samples, start, source):
        if isinstance(chunk, ShardFormatError):
            yield chunk
            continue
        try:
            yield sample_members(chunk, sample["key"], sample_where(source, sample), sample["offset"])
        except ShardFormatError as err:
            yield err


def sample_members(chunk: bytes, key: str, where: str, offset: int) -> dict[str, bytes]:
    """The members of one listed sample's bytes (from shard byte `offset`), checked as read_listed says."""
    members, end = {}, 0
    try:
        with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
            for info in tar:
                name = info.name
                if info.isdir():  # an index skips folder entries too; nothing is ever written
                    end = info.offset_data
                    continue
                if unsafe_member(name) or not info.isfile():
                    raise ShardFormatError(f"{where}: member {name!r} is not a plain file with a safe name",
                                           "unsafe_member")
                if split_member(name)[0] != key:
                    raise ShardFormatError(f"{where}: holds member {name!r}, not one of {key!r} "
                                           "(the tar disagrees with its manifest)")
                if info.size > MAX_MEMBER_BYTES or info.offset_data + info.size > len(chunk):
                    raise ShardFormatError(f"{where}: member {name!r} announces {info.size} bytes; the sample "
                                           f"holds {len(chunk)}", "too_large")
                members[split_member(name)[1]] = tar.extractfile(info).read()
                end = info.offset_data + -(-info.size // TAR_BLOCK) * TAR_BLOCK
    except tarfile.TarError as err:
        raise ShardFormatError(f"{where}: not a tar sample ({err}); the tar disagrees with its manifest") from None
    if end != len(chunk):  # tarfile ends an archive quietly at a bad header after the first
        raise ShardFormatError(f"{where}: no valid tar member at byte {offset + end} of the shard, inside the "
                               f"sample's {len(chunk)} bytes (the tar disagrees with its manifest)")
    return members


def sample_metadata(members: dict[str, bytes], where: str, captions: int) -> dict:
    """A sample's KEY.json as the loader needs it: an object whose "captions" are `captions`
    strings (the count the manifest lists); otherwise a ShardFormatError naming `where`."""
    try:
        meta = json.loads(members["json"])
    except KeyError:
        raise ShardFormatError(f"{where}: no .json member", "bad_captions") from None
    except (ValueError, RecursionError) as err:  # RecursionError: nested past the parser's depth
        raise ShardFormatError(f"{where}: its .json member is not JSON ({type(err).__name__}: {str(err)[:200]})",
                               "bad_captions") from None
    texts = meta.get("captions") if isinstance(meta, dict) else None
    if not (isinstance(texts, list) and len(texts) == captions and all(isinstance(t, str) for t in texts)):
        raise ShardFormatError(f"{where}: its .json member does not hold the {captions} captions the manifest lists",
                               "bad_captions")
    return meta


def sample_content(members: dict[str, bytes], sample: dict, indexed: bool,
                   where: str) -> tuple[bytes, list[str], list | None, bytes | None]:
    """What a listed sample gives the loader: (image bytes, captions, caption targets or None,
    second image or None). The sharding job's sample: its KEY.json holds the listed captions;
    an indexed one (img2dataset's layout): KEY.txt or KEY.json's caption. A missing caption is a
    ShardFormatError naming `where`; a missing or broken image is b"" or bytes the decoder refuses."""
    if not indexed:
        meta = sample_metadata(members, where, sample["captions"])
        return members.get("jpg", b""), meta["captions"], meta.get("targets"), members.get("right.jpg")
    try:
        caption = caption_of(members)
    except ValueError:  # KEY.txt not UTF-8
        raise ShardFormatError(f"{where}: its KEY.txt is not UTF-8", "bad_captions") from None
    if caption is None:
        raise ShardFormatError(f"{where}: no caption (KEY.txt or KEY.json's)", "bad_captions")
    image = image_member(members)
    return (members[image] if image else b""), [caption], None, None


class _ShortRead(EOFError):
    def __init__(self, missing: int, size: int, chunk: bool) -> None:
        super().__init__(f"unexpected end of data: {missing} of {size} bytes missing")
        self.missing, self.chunk = missing, chunk


def _read_exactly(stream: BinaryIO, size: int, discard: bool = False) -> bytes:
    """`size` bytes, read 1 MiB at a time: a stream that ends early never costs `size` of memory."""
    parts, left = [], size
    while left > 0:
        data = stream.read(min(left, 1 << 20))
        if not data:
            raise _ShortRead(left, size, chunk=not discard)
        left -= len(data)
        if not discard:
            parts.append(data)
    return b"".join(parts)
