"""Where datasets live: a local folder or `s3://bucket/prefix`, behind one small interface.

Writes are atomic: a local file is written under a temporary name and renamed; an S3
object appears only when its PUT or multipart upload completes. S3 is reached through
boto3 with the standard AWS chain (environment, profile, instance role) for credentials
and region, and AWS_ENDPOINT_URL for S3-compatible servers; retries are adaptive.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

MULTIPART_THRESHOLD = 64 * 1024 * 1024  # shards above this upload in parallel parts
HASH_CHUNK = 4 * 1024 * 1024


class StorageError(RuntimeError):
    """A location that cannot be used: missing bucket, unwritable folder, absent object."""


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
    def remove_stale_temporaries(self) -> int: ...


def open_storage(url: str) -> Storage:
    """`s3://bucket/prefix` or a local path (`file://` accepted)."""
    if url.startswith("s3://"):
        return S3Storage(url)
    return LocalStorage(url[len("file://"):] if url.startswith("file://") else url)


def sha256_of(stream: BinaryIO) -> tuple[str, int]:
    """(hex digest, byte count) of a stream, read in chunks."""
    digest, total = hashlib.sha256(), 0
    while chunk := stream.read(HASH_CHUNK):
        digest.update(chunk)
        total += len(chunk)
    return digest.hexdigest(), total


class LocalStorage:
    def __init__(self, root: str) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / name

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise StorageError(f"output folder {self.root} is not writable: {err}") from None

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int | None:
        path = self._path(name)
        return path.stat().st_size if path.is_file() else None

    def read_bytes(self, name: str, byte_range: tuple[int, int] | None = None) -> bytes:
        try:
            return _read_file(self._path(name), byte_range)
        except FileNotFoundError:
            raise StorageError(f"{self._path(name)} does not exist") from None

    def open_read(self, name: str, offset: int = 0) -> BinaryIO:
        try:
            stream = open(self._path(name), "rb")
        except FileNotFoundError:
            raise StorageError(f"{self._path(name)} does not exist") from None
        stream.seek(offset)
        return stream

    def _atomic(self, name: str, fill) -> None:
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{uuid.uuid4().hex}-{target.name}")
        try:
            fill(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        self._atomic(name, lambda tmp: tmp.write_bytes(data))

    def upload_file(self, name: str, local_path: str) -> None:
        self._atomic(name, lambda tmp: shutil.copyfile(local_path, tmp))

    def download_file(self, name: str, local_path: str) -> None:
        if not self.exists(name):
            raise StorageError(f"{self._path(name)} does not exist")
        LocalStorage(str(Path(local_path).parent)).upload_file(Path(local_path).name, str(self._path(name)))

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def remove_stale_temporaries(self) -> int:
        """Temporary files a killed writer left behind; never a finished file."""
        stale = list(self.root.rglob(".tmp-*")) if self.root.is_dir() else []
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


@functools.lru_cache(maxsize=None)
def s3_client():
    """One client per process (boto3 clients are thread-safe; Ray workers build their own)."""
    import boto3
    from botocore.config import Config

    # Endpoint (AWS_ENDPOINT_URL), region and credentials come from the standard chain.
    return boto3.client("s3", config=Config(retries={"mode": "adaptive", "max_attempts": 10}))


class S3Storage:
    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if not parsed.netloc:
            raise StorageError(f"{url}: expected s3://bucket/prefix")
        self.url = url.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")

    @property
    def client(self):
        return s3_client()  # looked up per process: a client does not travel to Ray workers

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def check_writable(self) -> None:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            probe = self._key(f".write-probe-{uuid.uuid4().hex}")
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket"):
                raise StorageError(f"bucket {self.bucket!r} does not exist (output {self.url})") from None
            raise StorageError(f"cannot write to {self.url}: {code or err}") from None
        except (EndpointConnectionError, NoCredentialsError) as err:
            raise StorageError(f"cannot reach {self.url}: {err}") from None

    def _head(self, name: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def size(self, name: str) -> int | None:
        head = self._head(name)
        return None if head is None else head["ContentLength"]

    def _get(self, name: str, **kwargs):
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name), **kwargs)["Body"]
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            if code == "NoSuchBucket":
                raise StorageError(f"bucket {self.bucket!r} does not exist ({self.url})") from None
            if code in ("404", "NoSuchKey"):
                raise StorageError(f"{self.url}/{name} does not exist") from None
            raise

    def read_bytes(self, name: str, byte_range: tuple[int, int] | None = None) -> bytes:
        if byte_range is None:
            return self._get(name).read()
        start, length = byte_range
        return self._get(name, Range=f"bytes={start}-{start + length - 1}").read()

    def open_read(self, name: str, offset: int = 0) -> BinaryIO:
        # a streaming body: read() in chunks, never held whole; a ranged GET to start mid-object
        return self._get(name, Range=f"bytes={offset}-") if offset else self._get(name)

    def write_bytes(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def upload_file(self, name: str, local_path: str) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
        self.client.upload_file(local_path, self.bucket, self._key(name), Config=config)

    def download_file(self, name: str, local_path: str) -> None:
        from botocore.exceptions import ClientError

        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        try:  # s3transfer writes a temporary file and renames it: never a half file under the name
            self.client.download_file(self.bucket, self._key(name), local_path)
        except ClientError as err:
            raise StorageError(f"cannot download {self.url}/{name}: {err}") from None

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def remove_stale_temporaries(self) -> int:
        return 0  # an S3 object appears only when its upload completes: nothing half-written to remove

    def list(self) -> list[str]:
        names = []
        start = f"{self.prefix}/" if self.prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            names.extend(obj["Key"][len(start):] for obj in page.get("Contents", []))
        return sorted(names)


def read_uri(uri: str, byte_range: tuple[int, int] | None = None) -> bytes:
    """Bytes of a path, file:// or s3:// URI (optionally a byte range: offset, length)."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        return S3Storage(f"s3://{parsed.netloc}").read_bytes(parsed.path.lstrip("/"), byte_range)
    return _read_file(uri[len("file://"):] if uri.startswith("file://") else uri, byte_range)


def _read_file(path: str | Path, byte_range: tuple[int, int] | None) -> bytes:
    with open(path, "rb") as f:
        if byte_range is None:
            return f.read()
        f.seek(byte_range[0])
        return f.read(byte_range[1])


def spool_dir() -> str:
    """Local scratch for shards before upload."""
    return os.environ.get("PIXELBERT_SPOOL_DIR", tempfile.gettempdir())

