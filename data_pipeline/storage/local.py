"""A local folder as storage: atomic writes by rename, temporary files of killed writers removed;
and the guarded read of one local source file (an image an annotation names)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import BinaryIO

from data_pipeline.storage.base import StorageError

TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{32}-")  # how _atomic names a file being written


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

    def sizes(self) -> dict[str, int]:
        """Every file's size by name (as `list` names them)."""
        if not self.root.is_dir():
            return {}
        return {str(p.relative_to(self.root)): p.stat().st_size for p in self.root.rglob("*") if p.is_file()}

    def remove_stale_temporaries(self) -> int:
        """Temporary files a killed writer of this folder's top level left behind, named as
        `_atomic` names them; never a finished file, never a file in a subfolder (another
        dataset's, a user's `.tmp-draft.txt`): the folder may hold more than one job's output."""
        if not self.root.is_dir():
            return 0
        stale = [p for p in self.root.iterdir() if TEMPORARY.match(p.name) and p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


def _read_file(path: str | Path, byte_range: tuple[int, int] | None) -> bytes:
    with open(path, "rb") as f:
        if byte_range is None:
            return f.read()
        f.seek(byte_range[0])
        return f.read(byte_range[1])


class SourceRefused(ValueError):
    """A source file that is not read: `reason` is the skip counter's name (unsafe_path,
    not_a_file, too_large); the message names the file as the annotation gave it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def inside(path: str, root: str) -> bool:
    """Whether resolved `path` lies strictly under resolved `root` (both absolute, symlink-free)."""
    return path != root and os.path.commonpath([path, root]) == root


def open_source_file(path: str, root: str | None) -> BinaryIO:
    """A local source file opened for reading, or SourceRefused before anything is read from it.

    Refused: a path that resolves (symlinks followed) outside `root` (None: no root, as for a
    manifest's absolute paths) and anything but a regular file (a folder, a FIFO that would
    block, /dev/zero that never ends). Checked on the path before it is opened, so nothing
    outside is opened, and again on the opened file, so a symlink swapped in between is caught
    too. A missing file raises FileNotFoundError.
    """
    if "\0" in path:  # no file has such a name; os calls would raise ValueError on it
        raise SourceRefused("unsafe_path", f"{path!r} holds a NUL byte")
    real = os.path.realpath(path)
    real_root = os.path.realpath(root) if root is not None else None
    if real_root is not None and not inside(real, real_root):
        raise SourceRefused("unsafe_path", f"{path} lies outside the image root {root}")
    _check_regular(os.stat(real), path)
    try:  # O_NOFOLLOW: `real` holds no symlink, unless one was swapped in since
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SourceRefused("unsafe_path", f"{path} became a symlink while being opened") from None
        raise
    stream = open(fd, "rb")
    try:
        _check_regular(os.fstat(fd), path)
        if real_root is not None and not inside(_opened_path(fd, real), real_root):
            raise SourceRefused("unsafe_path", f"{path} lies outside the image root {root} (a folder on its "
                                               "way was swapped for a symlink)")
    except BaseException:
        stream.close()
        raise
    return stream


def read_source_file(path: str, byte_range: tuple[int, int] | None, root: str | None, max_bytes: int) -> bytes:
    """Bytes of a local source file (`open_source_file`'s refusals), or the whole file or the
    byte range over `max_bytes` refused (too_large) before any of it is read."""
    with open_source_file(path, root) as f:
        offset, length = byte_range if byte_range is not None else (0, os.fstat(f.fileno()).st_size)
        if length > max_bytes:
            raise SourceRefused("too_large", f"{path}: {length} bytes, over the cap of {max_bytes}")
        f.seek(offset)
        return f.read(length)  # at most `length`, even if the file grew since fstat


def _check_regular(info: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise SourceRefused("not_a_file", f"{path} is {kind}")


def _opened_path(fd: int, fallback: str) -> str:
    """The path the kernel opened for `fd` (Linux's /proc); elsewhere the path that was checked."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return fallback

