"""What every storage shares: the interface, its errors, hashing, local scratch."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import BinaryIO, Protocol

HASH_CHUNK = 4 * 1024 * 1024


class StorageError(RuntimeError):
    """A location that cannot be used: missing bucket, unwritable folder, absent object."""


class StorageUnavailable(OSError):
    """The object store kept failing (no answer, timeouts, 5xx) for longer than S3Settings allow.

    An OSError, not a StorageError: callers that read a StorageError as "absent" (a shard not
    yet written, an image to skip) must not mistake an outage for it; Ray retries OSError tasks.
    """


class Storage(Protocol):
    url: str

    def check_writable(self) -> None: ...
    def exists(self, name: str) -> bool: ...
    def size(self, name: str) -> int | None: ...
    def read_bytes(self, name: str, byte_range: tuple[int, int] | None = None) -> bytes: ...
    def open_read(self, name: str, offset: int = 0) -> BinaryIO: ...
    def write_bytes(self, name: str, data: bytes) -> None: ...
    def upload_file(self, name: str, local_path: str) -> None: ...
    def download_file(self, name: str, local_path: str) -> None: ...
    def delete(self, name: str) -> None: ...
    def list(self) -> list[str]: ...
    def sizes(self) -> dict[str, int]: ...
    def remove_stale_temporaries(self) -> int: ...



def sha256_of(stream: BinaryIO) -> tuple[str, int]:
    """(hex digest, byte count) of a stream, read in chunks."""
    digest, total = hashlib.sha256(), 0
    while chunk := stream.read(HASH_CHUNK):
        digest.update(chunk)
        total += len(chunk)
    return digest.hexdigest(), total



def spool_dir() -> str:
    """Local scratch for shards before upload."""
    return os.environ.get("PIXELBERT_SPOOL_DIR", tempfile.gettempdir())


class HashingStream(io.RawIOBase):
    """A read-only stream that hashes and counts what passes, and remembers where its last
    non-zero byte was (a tar's data ends there; zeros after it are its end padding)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.digest, self.total, self.data_end = raw, hashlib.sha256(), 0, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        stripped = len(data.rstrip(b"\0"))
        if stripped:
            self.data_end = self.total + stripped
        self.total += len(data)
        return len(data)

    def drain(self) -> None:
        """Read to the end, so the hash and the count cover the whole stream."""
        while self.read(1 << 20):
            pass
