"""Where datasets live: a local folder or `s3://bucket/prefix`, behind one small interface.

Writes are atomic: a local file is written under a temporary name and renamed; an S3
object appears only when its PUT or multipart upload completes. S3 is reached through
boto3 with the standard AWS chain (environment, profile, instance role) for credentials
and region, and AWS_ENDPOINT_URL for S3-compatible servers.

A server that stops answering is noticed within a connect/read timeout, not minutes. Writes,
heads and listings are retried by botocore (adaptive mode); every GET (`read_bytes`,
`open_read`) is retried here, each failure logged: a read that breaks reopens the object with
a ranged GET at the first byte not yet returned, so a stream resumes exactly. The bounds
(`S3Settings`) come from PIXELBERT_S3_* environment variables, read when a client is made.
"""

from __future__ import annotations

from urllib.parse import urlparse

from data_pipeline.storage.base import (HASH_CHUNK, HashingStream, Storage, StorageError, StorageUnavailable, sha256_of,  # noqa: F401
                                        spool_dir)
from data_pipeline.storage.local import LocalStorage, _read_file
from data_pipeline.storage.s3 import S3Settings, S3Storage, s3_client  # noqa: F401


def open_storage(url: str) -> Storage:
    """`s3://bucket/prefix` or a local path (`file://` accepted)."""
    if url.startswith("s3://"):
        return S3Storage(url)
    return LocalStorage(url[len("file://"):] if url.startswith("file://") else url)



def read_uri(uri: str, byte_range: tuple[int, int] | None = None) -> bytes:
    """Bytes of a path, file:// or s3:// URI (optionally a byte range: offset, length)."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        return S3Storage(f"s3://{parsed.netloc}").read_bytes(parsed.path.lstrip("/"), byte_range)
    return _read_file(uri[len("file://"):] if uri.startswith("file://") else uri, byte_range)


