"""A local folder as storage: atomic writes by rename, temporary files of killed writers removed."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from data_pipeline.storage.base import StorageError


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


def _read_file(path: str | Path, byte_range: tuple[int, int] | None) -> bytes:
    with open(path, "rb") as f:
        if byte_range is None:
            return f.read()
        f.seek(byte_range[0])
        return f.read(byte_range[1])


