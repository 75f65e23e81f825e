"""Flat sidecars of a store for random access with memory independent of the store's size.

Why: a random-access read from Parquet decodes a whole row group (256 rows of nested lists) to use one row,
so a training process either keeps decoded row groups (memory grows with N, per process) or decodes ~256x
what it uses. The sidecars are the same values, uncompressed and fixed-width, so a batch of rows is a few
positioned reads.

Design (chosen over ``np.load(mmap_mode='r')`` and Arrow memory maps): every array is a plain ``.npy`` file
(``np.load(path, mmap_mode='r')`` opens it, for anyone who wants a map), but the reader fetches rows with
``os.pread`` into the caller's batch. Mapped pages stay in a process's resident set as they are touched (an
epoch would touch them all, so a map's RSS grows with N); ``pread`` goes through the kernel page cache,
which is shared by every process on the node and evicted under pressure, and the process keeps only the
rows it asked for. Each row carries a CRC32 (kept in memory per shard / split: 4 bytes a row) checked on
every read, so a flipped bit in a sidecar is caught like a Parquet page CRC; a bad sidecar is rebuilt from
its shard once, then reported.

Layout (``STORE/cache/``, or ``VLPL_CACHE_DIR`` / ``~/.cache/vlpl`` when the store is read-only)::

    part-NNNNN.<column>.npy    (rows, *row shape) score payload of shard NNNNN in the store's form
    part-NNNNN.rows.npy        (rows, 1 + columns) uint32: valid flag, CRC32 of each column's row
    part-NNNNN.json            mark (written last): the shard's sha256, size and mtime, form, files
    split-NAME-HASH/           per split: rows.npy (store rows), flags.npy (known, ok), observed.npy,
                               labels.npy (N, C) int8, sample_id / image strings (offsets + blob),
                               crc.npy, mark.json

A sidecar is valid while its mark names the shard's current sha256 (manifest), size and mtime, so a shard
re-done by a resume or changed on disk is never served from a stale sidecar. Building takes a file lock per
sidecar, so the processes of a node build each one once.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from vlpl.store.atomic import atomic_path, atomic_write_json
from vlpl.store.fs import RemotePath

log = logging.getLogger(__name__)

__all__ = ["FlatArray", "StringColumn", "NpyWriter", "row_crcs", "file_lock", "resolve_cache_dir"]

CACHE_VERSION = 1


def resolve_cache_dir(store_root: Path, key: str, explicit: Optional[Path] = None) -> Optional[Path]:
    """Where a store's sidecars live: ``explicit``, else ``STORE/cache`` when the store is writable, else
    ``$VLPL_CACHE_DIR/KEY`` or ``~/.cache/vlpl/KEY``; None when nothing is writable. A store on an fsspec URL
    (:class:`~vlpl.store.fs.RemotePath`) always uses the local ``$VLPL_CACHE_DIR/KEY`` / ``~/.cache/vlpl/KEY``."""
    cands: List[Path] = []
    if explicit is not None:
        cands.append(Path(explicit))
    else:
        if not isinstance(store_root, RemotePath):  # object storage cannot be mapped: a local cache (fs.py)
            cands.append(Path(store_root) / "cache")
        env = os.environ.get("VLPL_CACHE_DIR")
        cands.append(Path(env) / key if env else Path.home() / ".cache" / "vlpl" / key)
    for c in cands:
        try:
            c.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(c, os.W_OK | os.X_OK):
            return c
    return None


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed) for the duration of the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def row_crcs(arr: np.ndarray) -> np.ndarray:
    """(n,) uint32: CRC32 of each row's bytes."""
    a = np.ascontiguousarray(arr)
    flat = a.reshape(len(a), -1).view(np.uint8) if len(a) else a.reshape(0, 0).view(np.uint8)
    return np.fromiter((zlib.crc32(r) for r in flat), np.uint32, len(a))


class NpyWriter:
    """Writes a ``.npy`` of known shape row block by row block (one block in memory at a time)."""

    def __init__(self, f: Any, shape: Tuple[int, ...], dtype: Any) -> None:
        self.f, self.shape, self.dtype = f, tuple(shape), np.dtype(dtype)
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                 "fortran_order": False, "shape": self.shape})
        self.written = 0

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, self.dtype)
        if block.shape[1:] != self.shape[1:]:
            raise ValueError(f"block shape {block.shape} does not fit {self.shape}")
        self.f.write(block.tobytes())
        self.written += len(block)

    def close(self) -> None:
        if self.written != self.shape[0]:
            raise ValueError(f"wrote {self.written} rows of {self.shape[0]}")


class FlatArray:
    """A ``.npy`` file read by rows with ``os.pread`` (resident memory: the rows asked for), each row checked
    against ``crc`` when given."""

    def __init__(self, path: Path, crc: Optional[np.ndarray] = None) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{path}: .npy format version {version} is not a sidecar")
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{self.path}: Fortran order is not a sidecar")
        self.shape: Tuple[int, ...] = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(math.prod(self.shape[1:]) * self.dtype.itemsize)
        size = os.path.getsize(self.path)
        if size != self.offset + self.shape[0] * self.row_bytes:
            raise ValueError(f"{self.path}: {size} bytes, expected {self.offset + self.shape[0] * self.row_bytes}")
        self.crc = crc
        self._fd: Optional[int] = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own descriptor
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def take(self, rows: Any) -> np.ndarray:
        """``(len(rows), *row shape)`` copy of the rows (any order, repeats allowed); raises ValueError naming
        the file and row when a row's CRC does not match."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"{self.path}: rows must be in [0, {self.shape[0]})")
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        breaks = np.nonzero(np.diff(srt) != 1)[0] + 1  # runs of consecutive rows (repeats break runs too)
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(srt)]])
        buf = out.reshape(len(rows), -1).view(np.uint8) if self.row_bytes else None
        fd = self._handle()
        tmp = np.empty((len(rows), self.row_bytes), np.uint8)
        for s, e in zip(starts.tolist(), ends.tolist()):
            n = e - s
            data = os.pread(fd, n * self.row_bytes, self.offset + int(srt[s]) * self.row_bytes)
            if len(data) != n * self.row_bytes:
                raise ValueError(f"{self.path}: short read at row {int(srt[s])} (file truncated?)")
            tmp[s:e] = np.frombuffer(data, np.uint8).reshape(n, self.row_bytes)
        if self.crc is not None:
            for i in range(len(srt)):
                if zlib.crc32(tmp[i]) != int(self.crc[srt[i]]):
                    raise ValueError(f"{self.path}: row {int(srt[i])} does not match its CRC32 (the sidecar is corrupt)")
        if buf is not None:
            buf[order] = tmp
        return out

    def mmap(self) -> np.ndarray:
        """The whole array as a read-only memory map (every row CRC-checked first when ``crc`` is set)."""
        arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        if self.crc is not None:
            for start in range(0, len(arr), 65536):
                block = np.ascontiguousarray(arr[start:start + 65536])
                bad = np.nonzero(row_crcs(block) != self.crc[start:start + len(block)])[0]
                if len(bad):
                    raise ValueError(f"{self.path}: row {start + int(bad[0])} does not match its CRC32 "
                                     f"(the sidecar is corrupt)")
        return arr

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["_fd"], d["_pid"] = None, -1
        return d


class StringColumn(Sequence[str]):
    """A sequence of strings kept on disk (offsets ``.npy`` + UTF-8 blob) and read one item at a time with
    ``pread``; compares equal to a list with the same items."""

    def __init__(self, offsets: Path, blob: Path) -> None:
        self._offsets = FlatArray(offsets)
        self._blob = Path(blob)
        self._fd: Optional[int] = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self._blob, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def _one(self, i: int) -> str:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self._blob}: index {i} out of range [0, {n})")
        a, b = self._offsets.take([i, i + 1]).tolist()
        return os.pread(self._handle(), b - a, a).decode("utf-8")

    def __getitem__(self, i: Any) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self._one(j) for j in range(*i.indices(len(self)))]
        if isinstance(i, (list, tuple, np.ndarray)):
            return [self._one(int(j)) for j in np.asarray(i).reshape(-1)]
        return self._one(int(i))

    def __iter__(self) -> Iterator[str]:
        step = 4096
        fd = self._handle()
        for start in range(0, len(self), step):
            offs = self._offsets.take(np.arange(start, min(start + step, len(self)) + 1)).tolist()
            data = os.pread(fd, offs[-1] - offs[0], offs[0])
            for a, b in zip(offs[:-1], offs[1:]):
                yield data[a - offs[0]:b - offs[0]].decode("utf-8")

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, (list, tuple, StringColumn)):
            return len(self) == len(other) and all(x == y for x, y in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"StringColumn({len(self)} items, {self._blob})"

    def __getstate__(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["_fd"], d["_pid"] = None, -1
        return d

    @staticmethod
    def write(offsets_path: Path, blob_path: Path, parts: Iterable[Sequence[str]], total: int) -> None:
        """Write ``total`` strings (given in parts) atomically."""
        with atomic_path(offsets_path) as to, atomic_path(blob_path) as tb:
            with open(to, "wb") as fo, open(tb, "wb") as fb:
                w = NpyWriter(fo, (total + 1,), np.int64)
                pos = 0
                w.write(np.zeros(1, np.int64))
                for part in parts:
                    enc = [s.encode("utf-8") for s in part]
                    lens = np.fromiter((len(e) for e in enc), np.int64, len(enc))
                    w.write(pos + np.cumsum(lens))
                    pos += int(lens.sum())
                    fb.write(b"".join(enc))
                w.close()


def write_json_mark(path: Path, mark: Dict[str, Any]) -> None:
    atomic_write_json(path, mark)


def read_json_mark(path: Path) -> Optional[Dict[str, Any]]:
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) and m.get("cache_version") == CACHE_VERSION else None
