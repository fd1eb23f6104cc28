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

import posixpath
from urllib.parse import urlparse

from data_pipeline.storage.base import (HASH_CHUNK, HashingStream, Storage, StorageError, StorageUnavailable, sha256_of,  # noqa: F401
                                        spool_dir)
from data_pipeline.storage.local import LocalStorage, SourceRefused, _read_file, read_source_file
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


def read_source(uri: str, byte_range: tuple[int, int] | None, root: str | None, max_bytes: int) -> bytes:
    """Bytes of a source file (an image an annotation names): path, file:// or s3:// URI.

    SourceRefused, with nothing read, when it lies outside `root` (None: no root to stay in),
    is not a regular file or holds more than `max_bytes` (local rules: `read_source_file`).
    An S3 object must lie under an s3:// root with no `.`/`..` in its key; its size is taken
    from a HEAD before the GET, which then asks for exactly that many bytes.
    """
    root = _strip_file(root) if root is not None else None
    if not uri.startswith("s3://") and not (root or "").startswith("s3://"):
        return read_source_file(_strip_file(uri), byte_range, root, max_bytes)
    if root is not None and not _s3_inside(uri, root):
        raise SourceRefused("unsafe_path", f"{uri} lies outside the image root {root}")
    parsed = urlparse(uri)
    store, key = S3Storage(f"s3://{parsed.netloc}"), parsed.path.lstrip("/")
    size = store.size(key) if byte_range is None else byte_range[1]
    if size is None:
        raise StorageError(f"{uri} does not exist")
    if size > max_bytes:
        raise SourceRefused("too_large", f"{uri}: {size} bytes, over the cap of {max_bytes}")
    return store.read_bytes(key, byte_range or (0, size))


def _strip_file(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _s3_inside(uri: str, root: str) -> bool:
    """An s3:// URI strictly under an s3:// root, its key holding no `.`, `..` or `//` a server or
    proxy might resolve (S3 itself takes them literally)."""
    if not uri.startswith("s3://"):
        return False
    key = uri[len("s3://"):]
    return posixpath.normpath(key) == key and key.startswith(root[len("s3://"):].rstrip("/") + "/")
