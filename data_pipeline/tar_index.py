"""Index one existing WebDataset tar in a single sequential read, without writing to it.

Each member is read once, as it streams past: the sha256 of the whole tar is computed on the
way, and nothing is extracted or followed as a path. Only the members the check needs (the
image, KEY.txt, KEY.json) are read, each copied in chunks to a spool that stays on local disk
past 1 MiB, so a member costs no more memory than that whatever its size; the rest are read
past. Images are opened only far enough for PIL to parse their header (width, height). The
loader's caps on one member and one sample (shard_format.MAX_MEMBER_BYTES, MAX_SAMPLE_BYTES)
are applied here too, so nothing listed is a sample the loader would refuse. A sample is a run
of consecutive members sharing a key (WebDataset's rule); it is listed when the loader can use
it and otherwise named with a reason:

    unsafe_member     a member named `../x`, `/abs/x`, `.jpg` (no key), ... or a link, device or fifo
    duplicate_member  two members of one sample with the same extension
    long_key          a key over MAX_KEY_BYTES bytes (UTF-8), more than a sample table holds
    too_large         a member or the sample over the loader's byte caps (read past, never held),
                      or an image header claiming more than `max_pixels`
    missing_image     no KEY.jpg|jpeg|png|webp
    empty_file        a zero-byte image
    corrupt_image     PIL cannot parse the image's header
    bad_json          KEY.json does not parse, whatever the reason (not UTF-8, nested too deep
                      for the parser, a number too long...)
    non_utf8_caption  KEY.txt is not UTF-8
    empty_caption     no KEY.txt text and no "caption" in KEY.json
    truncated_tar     the tar ends inside this sample, or without its end-of-archive blocks
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO

from PIL import Image

from data_pipeline.sample_table import MAX_KEY_BYTES
from data_pipeline.storage import HashingStream, spool_dir
from data_pipeline.shard_format import (IMAGE_EXTS, MAX_MEMBER_BYTES, MAX_SAMPLE_BYTES, TAR_BLOCK, Member,
                                        SampleEntry, caption_of, image_member, split_member, unsafe_member)

READ_EXTS = IMAGE_EXTS + ("txt", "json")  # the members the check reads; any other is read past
SPOOL_IN_MEMORY = 1 << 20                 # a member's bytes beyond this wait on local disk
COPY_CHUNK = 64 << 10


@dataclass
class _Group:
    entry: SampleEntry
    members: dict[str, BinaryIO] = field(default_factory=dict)  # spooled copies of READ_EXTS members
    bad: tuple[str, str] | None = None  # (reason, detail)

    def close(self) -> None:
        for spool in self.members.values():
            spool.close()


@dataclass
class TarIndex:
    samples: list[dict]                 # key, offset, size, captions (1), width, height: the table's rows
    entries: list[SampleEntry]          # the same samples with their members, for the DALI index
    skipped: list[dict]                 # key, reason, detail
    bytes: int
    sha256: str
    truncated: bool

    @property
    def skipped_counts(self) -> dict[str, int]:
        return dict(Counter(s["reason"] for s in self.skipped))


def index_stream(raw: BinaryIO, max_pixels: int) -> TarIndex:
    """Walk a tar sequentially (a streaming S3 body works) and sort its samples into good and skipped."""
    stream = HashingStream(raw)
    samples, entries, skipped = [], [], []
    group: _Group | None = None
    truncated = False

    def finish(current: _Group | None) -> None:
        if current is None:
            return
        try:
            if current.bad:
                raise _Skip(*current.bad)
            if len(current.entry.key.encode()) > MAX_KEY_BYTES:
                raise _Skip("long_key", f"a key of {len(current.entry.key.encode())} bytes, over the sample "
                                        f"table's {MAX_KEY_BYTES}")
            if current.entry.size > MAX_SAMPLE_BYTES:
                raise _Skip("too_large", f"the sample spans {current.entry.size} bytes, over the loader's cap of "
                                         f"{MAX_SAMPLE_BYTES}")
            width, height = _check(current.members, max_pixels)
        except _Skip as skip:
            skipped.append({"key": current.entry.key, "reason": skip.reason, "detail": skip.detail})
            return
        finally:
            current.close()
        entries.append(current.entry)
        samples.append({**current.entry.to_manifest(), "captions": 1, "width": width, "height": height})

    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if info.isdir():
                    continue
                key, ext = split_member(info.name)
                if group is None or key != group.entry.key:
                    finish(group)
                    group = _Group(SampleEntry(key, info.offset, 0))
                if unsafe_member(info.name) or not key or not info.isfile():
                    group.bad = group.bad or ("unsafe_member", f"{info.name!r} ({_kind(info)})")
                    continue  # its data is skipped unread; a link is never followed
                group.entry.members.append(Member(ext, info.offset_data, info.size))
                group.entry.size = info.offset_data + -(-info.size // TAR_BLOCK) * TAR_BLOCK - group.entry.offset
                if info.size > MAX_MEMBER_BYTES:
                    group.bad = group.bad or ("too_large", f"member {info.name!r} holds {info.size} bytes, over the "
                                                           f"loader's cap of {MAX_MEMBER_BYTES}")
                elif ext in group.members:
                    group.bad = group.bad or ("duplicate_member", info.name)
                if group.bad is None and ext in READ_EXTS:
                    group.members[ext] = _spool(tar.extractfile(info))
            end = tar.offset
        stream.drain()
        # a complete tar ends with two zero blocks after its last member; a cut one does not
        if stream.data_end > end or stream.total < end + 2 * TAR_BLOCK:
            truncated = True
            if group is not None:
                group.bad = ("truncated_tar", f"no end-of-archive after byte {end} of {stream.total}")
    except (tarfile.TarError, EOFError) as err:  # the tar ends inside a member
        truncated = True
        if group is not None:
            group.bad = ("truncated_tar", str(err))
        stream.drain()
    finish(group)
    return TarIndex(samples, entries, skipped, stream.total, stream.digest.hexdigest(), truncated)


def _spool(member: BinaryIO) -> BinaryIO:
    """A member's bytes copied chunk by chunk: in memory up to SPOOL_IN_MEMORY, then on disk."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, dir=spool_dir())
    shutil.copyfileobj(member, spool, COPY_CHUNK)
    spool.seek(0)
    return spool


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym() or info.islnk():
        return f"link to {info.linkname!r}"
    return "file" if info.isfile() else "special file"


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def _check(members: dict[str, BinaryIO], max_pixels: int) -> tuple[int, int]:
    """(width, height) of a usable sample; raises _Skip naming why it is not."""
    ext = image_member(members)
    if ext is None:
        raise _Skip("missing_image", f"members {sorted(members)}")
    image_file = members[ext]
    if not image_file.read(1):
        raise _Skip("empty_file", f"{ext}: zero bytes")
    image_file.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(image_file) as image:  # parses the header only; no pixel is decoded
                width, height = image.size
    except Image.DecompressionBombError as err:
        raise _Skip("too_large", str(err)) from None
    except Exception as err:  # PIL raises many kinds on garbage
        raise _Skip("corrupt_image", f"{ext}: {type(err).__name__}: {err}") from None
    if width * height > max_pixels:
        raise _Skip("too_large", f"{width}x{height} over {max_pixels} pixels")
    texts = {ext: members[ext].read() for ext in ("txt", "json") if ext in members}  # each within the member cap
    if "json" in texts:
        try:
            json.loads(texts["json"])
        except Exception as err:  # ValueError, UnicodeDecodeError, RecursionError, MemoryError...: never a crash
            raise _Skip("bad_json", f"json: {type(err).__name__}: {str(err)[:200]}") from None
    try:
        caption = caption_of(texts)
    except UnicodeDecodeError as err:
        raise _Skip("non_utf8_caption", str(err)) from None
    if caption is None:
        raise _Skip("empty_caption", "no KEY.txt text and no caption in KEY.json")
    return width, height
