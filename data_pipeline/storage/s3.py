"""`s3://bucket/prefix` through boto3: timeouts, bounded retries, GETs that resume where they broke.
(Just over 300 lines: the retrying body and the client it reopens share one set of bounds.)

Writes, heads and listings are retried by botocore; every GET (`read_bytes`, `open_read`) is
retried here, each failure logged: a read that breaks reopens the object with a ranged GET
at the first byte not yet returned, so a stream resumes exactly. The bounds (`S3Settings`)
come from PIXELBERT_S3_* environment variables, read when a client is made.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from data_pipeline.storage.base import StorageError, StorageUnavailable

MULTIPART_THRESHOLD = 64 * 1024 * 1024  # shards above this upload in parallel parts
READ_CHUNK = 1024 * 1024  # a whole-object read advances in these steps, so a retry keeps what came

log = logging.getLogger("data_pipeline.storage")


@dataclass(frozen=True)
class S3Settings:
    """How long S3 may fail before an operation gives up; from PIXELBERT_S3_* variables.

    A GET that makes no progress gives up after `attempts` tries, waiting backoff, 2x, 4x...
    between them: against a server that accepts connections but never answers, after
    attempts x read_timeout + backoff x (2^(attempts-1) - 1) seconds (5 x 10 + 15 = 65 s by
    default; add connect_timeout per try when connections cannot be opened). Writes, heads and
    listings get the same number of tries from botocore, with its own short waits (~50 s).
    """

    attempts: int = 5              # PIXELBERT_S3_ATTEMPTS: tries of one request or read
    backoff: float = 1.0           # PIXELBERT_S3_BACKOFF: seconds before a GET's 2nd try; doubles
    connect_timeout: float = 5.0   # PIXELBERT_S3_CONNECT_TIMEOUT: seconds to open a connection
    read_timeout: float = 10.0     # PIXELBERT_S3_READ_TIMEOUT: seconds a socket may stay silent

    @classmethod
    def from_env(cls) -> "S3Settings":
        env = {"attempts": ("PIXELBERT_S3_ATTEMPTS", int), "backoff": ("PIXELBERT_S3_BACKOFF", float),
               "connect_timeout": ("PIXELBERT_S3_CONNECT_TIMEOUT", float),
               "read_timeout": ("PIXELBERT_S3_READ_TIMEOUT", float)}
        settings = cls(**{field: kind(os.environ[var]) for field, (var, kind) in env.items() if os.environ.get(var)})
        if settings.attempts < 1:
            raise ValueError("PIXELBERT_S3_ATTEMPTS must be at least 1")
        return settings


@functools.lru_cache(maxsize=None)
def s3_client(retries: bool = True):
    """One client per process (boto3 clients are thread-safe; Ray workers build their own).

    `retries=False`: botocore tries once, for the GETs, whose own loop (`_retrying`) retries.
    Tests that change AWS_ENDPOINT_URL or PIXELBERT_S3_* call `s3_client.cache_clear()`.
    """
    import boto3
    from botocore.config import Config

    settings = S3Settings.from_env()
    # Endpoint (AWS_ENDPOINT_URL), region and credentials come from the standard chain.
    return boto3.client("s3", config=Config(
        retries={"mode": "adaptive", "max_attempts": settings.attempts if retries else 1},
        connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout))


_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                    "RequestTimeout", "Throttling", "ThrottlingException"}


def _is_transient(err: Exception) -> bool:
    """A fault a retry can outlive: no connection, a timeout, a cut stream, a 5xx or throttling."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(err, ClientError):
        status = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return err.response.get("Error", {}).get("Code") in _TRANSIENT_CODES or status in _TRANSIENT_CODES
    return isinstance(err, (ConnectionError, HTTPClientError, IncompleteReadError, Urllib3Error,
                            TimeoutError, ConnectionResetError))


def _retrying(what: str, call, position):
    """`call()` until it succeeds, fails for good, or has failed S3Settings.attempts times
    (then StorageUnavailable, naming `what` and the byte `position()` it stopped at).

    Every failed try is logged with the object's URL, the byte position and the attempt.
    """
    settings, started = S3Settings.from_env(), time.monotonic()
    for attempt in range(1, settings.attempts + 1):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - sorted by _is_transient; the rest propagate
            if not _is_transient(err):
                raise
            if attempt == settings.attempts:
                raise StorageUnavailable(f"{what}: read at byte {position()} failed {attempt} times over "
                                         f"{time.monotonic() - started:.1f} s, giving up: {err}") from err
            delay = settings.backoff * 2 ** (attempt - 1)
            log.warning("%s: read at byte %d failed (attempt %d of %d): %s; retrying in %.1f s",
                        what, position(), attempt, settings.attempts, err, delay)
            time.sleep(delay)


class _ResumingBody:
    """A GET's body that survives a broken connection: the read that fails is retried on a new
    ranged GET starting at the first byte not yet returned, so nothing is repeated or lost.

    [start, stop): the bytes wanted (stop None: to the object's end).
    """

    def __init__(self, storage: "S3Storage", name: str, start: int = 0, stop: int | None = None) -> None:
        self.storage, self.name, self.position, self.stop = storage, name, start, stop
        self.what = f"{storage.url}/{name}"
        self.body = None
        _retrying(self.what, self._open, lambda: self.position)

    def _open(self) -> None:
        if self.position == 0 and self.stop is None:
            response = self.storage._get(self.name)
        else:
            end = "" if self.stop is None else self.stop - 1
            response = self.storage._get(self.name, Range=f"bytes={self.position}-{end}")
        self.body = response["Body"]
        self.stop = self.position + response["ContentLength"]  # later tries ask for the same span

    def _read_once(self, amt: int) -> bytes:
        if self.position >= self.stop:
            return b""
        if self.body is None:
            self._open()
        try:
            data = self.body.read(amt)
            if not data and amt:  # the server closed before the span's end
                from botocore.exceptions import IncompleteReadError
                raise IncompleteReadError(actual_bytes=self.position, expected_bytes=self.stop)
        except Exception:
            self._drop()  # the next try opens a new GET at self.position
            raise
        self.position += len(data)
        return data

    def read(self, amt: int | None = None) -> bytes:
        if amt is not None and amt >= 0:
            return _retrying(self.what, lambda: self._read_once(amt), lambda: self.position)
        parts = []
        while chunk := self.read(READ_CHUNK):
            parts.append(chunk)
        return b"".join(parts)

    def readable(self) -> bool:
        return True

    def _drop(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close as well
                pass
            self.body = None

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> "_ResumingBody":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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

    def _get(self, name: str, **kwargs) -> dict:
        """One GET, tried once (`_ResumingBody` retries it); an absent object is a StorageError."""
        from botocore.exceptions import ClientError

        try:
            return s3_client(retries=False).get_object(Bucket=self.bucket, Key=self._key(name), **kwargs)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            if code == "NoSuchBucket":
                raise StorageError(f"bucket {self.bucket!r} does not exist ({self.url})") from None
            if code in ("404", "NoSuchKey"):
                raise StorageError(f"{self.url}/{name} does not exist") from None
            raise

    def read_bytes(self, name: str, byte_range: tuple[int, int] | None = None) -> bytes:
        if byte_range is None:
            with _ResumingBody(self, name) as body:
                return body.read()
        start, length = byte_range
        if length <= 0:
            return b""
        with _ResumingBody(self, name, start, start + length) as body:
            return body.read()

    def open_read(self, name: str, offset: int = 0) -> BinaryIO:
        # read() in chunks, never held whole; a ranged GET to start mid-object, and again to
        # resume at the current byte after a broken read
        return _ResumingBody(self, name, offset)

    def _call(self, action: str, name: str, call):
        """`call()` with botocore's retries; a fault that outlived them is StorageUnavailable, a
        refusal (no bucket, no access) a StorageError."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call()
        except (BotoCoreError, ClientError, S3UploadFailedError) as err:
            if _is_transient(err):
                raise StorageUnavailable(f"{action} {self.url}/{name} failed after "
                                         f"{S3Settings.from_env().attempts} attempts: {err}") from err
            raise StorageError(f"{action} {self.url}/{name} failed: {err}") from err

    def write_bytes(self, name: str, data: bytes) -> None:
        self._call("upload of", name,
                   lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data))

    def upload_file(self, name: str, local_path: str) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
        self._call("upload of", name,
                   lambda: self.client.upload_file(local_path, self.bucket, self._key(name), Config=config))

    def download_file(self, name: str, local_path: str) -> None:
        from botocore.exceptions import ClientError

        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        try:  # s3transfer writes a temporary file and renames it: never a half file under the name
            self._call("download of", name,
                       lambda: self.client.download_file(self.bucket, self._key(name), local_path))
        except StorageError as err:
            if isinstance(err.__cause__, ClientError):
                raise StorageError(f"cannot download {self.url}/{name}: {err.__cause__}") from None
            raise

    def delete(self, name: str) -> None:
        self._call("delete of", name,
                   lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(name)))

    def remove_stale_temporaries(self) -> int:
        return 0  # an S3 object appears only when its upload completes: nothing half-written to remove

    def list(self) -> list[str]:
        names = []
        start = f"{self.prefix}/" if self.prefix else ""

        def pages() -> None:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                names.extend(obj["Key"][len(start):] for obj in page.get("Contents", []))

        self._call("listing of", "", pages)
        return sorted(names)

    def sizes(self) -> dict[str, int]:
        """Every object's size by name, from the listing: one request per 1,000 objects, not one each."""
        sizes: dict[str, int] = {}
        start = f"{self.prefix}/" if self.prefix else ""

        def pages() -> None:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                sizes.update((obj["Key"][len(start):], obj["Size"]) for obj in page.get("Contents", []))

        self._call("listing of", "", pages)
        return sizes


