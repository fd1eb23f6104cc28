"""A shard's per-sample table: the second level of a dataset's index.

    manifest.json          shards only: name, bytes, sha256, samples, pairs, table bytes + sha256
    NNNNNN.samples.npy     beside the manifest (and the DALI index): per sample key, byte offset,
                           byte size and caption count, in tar order

The manifest grows with the number of shards, the tables with the samples of one shard each,
so a process that plans an epoch reads only the manifest and a loader worker reads the tables
of the shards it opens. A table is a NumPy `.npy` of one structured dtype (no object fields):
loaded with `allow_pickle=False`, its length known from the manifest before it is read, its
bytes checked against the manifest's sha256, and its rows checked as the manifest's samples
used to be (inside the shard, block-aligned, in order, within the caps, sane caption counts).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable

import numpy as np

from data_pipeline.shard_format import MAX_SAMPLE_BYTES, TAR_BLOCK, ManifestError

MAX_CAPTIONS = 10_000  # per sample; a larger count is a broken index (the dealing would list them all)
MAX_KEY_BYTES = 256    # a longer key is a broken index; keeps a table's row size bounded
TABLE_SUFFIX = ".samples.npy"
_FIELDS = (("offset", "<u8"), ("size", "<u4"), ("captions", "<u2"))
_HEADER_BYTES = 4096   # an .npy header is ~128 bytes; more is not a table of ours


def max_table_bytes(samples: int) -> int:
    """The most bytes a table of `samples` rows may have: read no more than this whatever is stored."""
    return _HEADER_BYTES + samples * (MAX_KEY_BYTES + 14)


class TableError(ManifestError):
    """A table a reader must not trust: the message names the shard and the sample."""


def table_name(shard_name: str) -> str:
    """`000001.tar` -> `000001.samples.npy`; `part/x.tar` -> `part/x.samples.npy`."""
    return (shard_name[:-4] if shard_name.endswith(".tar") else shard_name) + TABLE_SUFFIX


def _dtype(key_bytes: int) -> np.dtype:
    return np.dtype([("key", f"S{max(1, key_bytes)}"), *_FIELDS])


def table_from_samples(samples: list[dict]) -> "SampleTable":
    """A table held in memory, from a v1 manifest's inline sample list (already checked)."""
    return decode_table(encode_table(samples), "(inline)", len(samples), None, None)


def encode_table(samples: Iterable[dict]) -> bytes:
    """`.npy` bytes of samples given as {key, offset, size, captions} dicts, in tar order."""
    samples = list(samples)
    keys = [s["key"].encode() for s in samples]
    table = np.zeros(len(samples), dtype=_dtype(max((len(k) for k in keys), default=1)))
    table["key"] = keys
    for field, _ in _FIELDS:
        table[field] = [s[field] for s in samples]
    out = io.BytesIO()
    np.save(out, table, allow_pickle=False)
    return out.getvalue()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SampleTable:
    """One shard's samples as arrays: `key(i)`, `offsets`, `sizes`, `captions`."""

    def __init__(self, table: np.ndarray) -> None:
        self._keys = table["key"]
        self.offsets = table["offset"].astype(np.int64)
        self.sizes = table["size"].astype(np.int64)
        self.captions = table["captions"].astype(np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def key(self, index: int) -> str:
        return self._keys[index].decode()

    def entry(self, index: int) -> dict:
        """Sample `index` as the tar reader takes it: key, offset, size, captions."""
        return {"key": self.key(index), "offset": int(self.offsets[index]), "size": int(self.sizes[index]),
                "captions": int(self.captions[index])}

    def entries(self, start: int = 0) -> Iterable[dict]:
        return (self.entry(i) for i in range(start, len(self)))

    @property
    def num_pairs(self) -> int:
        return int(self.captions.sum())


def decode_table(data: bytes, where: str, samples: int, shard_bytes: int | None, sha256: str | None) -> SampleTable:
    """Check and load a table's bytes; `where` names the shard in every error. `samples`,
    `shard_bytes` and `sha256` are what the manifest lists for it (None: not checked)."""
    if len(data) > max_table_bytes(samples):
        raise TableError(f"{where}: its sample table has {len(data)} bytes, more than {samples} samples take")
    if sha256 is not None and digest(data) != sha256:
        raise TableError(f"{where}: its sample table does not hash to the manifest's sha256 (changed or damaged)")
    try:
        table = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise TableError(f"{where}: its sample table is not a readable .npy ({err})") from None
    names = getattr(table.dtype, "names", None)
    if (table.ndim != 1 or names != ("key", *(f for f, _ in _FIELDS)) or table.dtype["key"].kind != "S"
            or table.dtype["key"].itemsize > MAX_KEY_BYTES
            or any(table.dtype[f] != np.dtype(t) for f, t in _FIELDS)):
        raise TableError(f"{where}: its sample table has dtype {table.dtype}, not this format's")
    if len(table) != samples:
        raise TableError(f"{where}: its sample table lists {len(table)} samples, the manifest {samples}")
    loaded = SampleTable(table)
    if shard_bytes is not None:
        check_rows(loaded, where, shard_bytes)
    return loaded


def check_rows(table: SampleTable, where: str, shard_bytes: int) -> None:
    """Each sample lies inside the shard's bytes, block-aligned, after the previous one, within the
    reader's size cap, with a non-empty key and 1..MAX_CAPTIONS captions; the first bad one is named."""
    offsets, sizes, captions = table.offsets, table.sizes, table.captions
    ends = offsets + sizes
    previous_end = np.concatenate(([0], ends[:-1]))
    misplaced = ((offsets % TAR_BLOCK != 0) | (offsets < previous_end) | (sizes <= 0) | (sizes > MAX_SAMPLE_BYTES)
                 | (ends > shard_bytes) | (table._keys == b""))
    if misplaced.any():
        i = int(np.argmax(misplaced))
        raise TableError(f"{where}: sample {table.key(i)!r} at offset {int(offsets[i])} of {int(sizes[i])} bytes "
                         f"(row {i}) is not inside the shard's {shard_bytes} bytes after the previous sample "
                         f"(which ends at {int(previous_end[i])}), or has no key")
    if (captions > MAX_CAPTIONS).any():
        i = int(np.argmax(captions > MAX_CAPTIONS))
        raise TableError(f"{where}: sample {table.key(i)!r} lists {int(captions[i])} captions (row {i}; "
                         f"at most {MAX_CAPTIONS})")
