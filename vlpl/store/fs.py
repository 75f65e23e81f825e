"""Stores on fsspec URLs (``s3://bucket/store``, ``gs://...``, ``memory://...``, ``file://...``): the one small
filesystem abstraction the store needs beside its local-path code (docs/REMOTE_STORES.md).

:func:`store_path` turns a store location into either a :class:`pathlib.Path` (a plain path: the local code paths
stay as they are: rename-based atomic writes, ``flock``, memory-mapped / ``pread`` sidecars inside the store) or a
:class:`RemotePath`, a pathlib-like handle on a path of an fsspec file system with just the operations the store
uses (``/``, ``name``, ``exists``, ``read_bytes``, ``open``, ``stat``, ``iterdir``, ``unlink``, ...). The store's
modules branch on ``isinstance(p, RemotePath)`` where a remote file system needs something else:

* **Writes are whole** (:meth:`RemotePath.upload`, used by :func:`vlpl.store.atomic.atomic_path`): the file is
  written locally first, then

  - on fsspec's local file system (``file://``), copied to a temporary name ``.NAME.<random>.tmp`` in the same
    folder and renamed (``os.rename`` is atomic there), like the local path;
  - on every other file system (object stores, ``memory://``), sent in ONE put of the final name: an object
    store's put (multipart uploads included) makes the object appear whole or not at all, and ``memory://``
    stores the bytes in one assignment. No temporary objects are left on object storage.

* **Reads** go through pyarrow's view of the fsspec file system (``pyarrow.fs.PyFileSystem(FSSpecHandler(fs))``,
  :attr:`RemotePath.arrow_fs`); the flat sidecars (:mod:`vlpl.store.cache`) are built in a local cache directory
  (``VLPL_CACHE_DIR`` or ``~/.cache/vlpl/``) since object storage cannot be memory-mapped.

A URL given to code that wraps it in :class:`pathlib.Path` (``Path("s3://b/s")`` is ``s3:/b/s``) is recovered by
:func:`store_path` when that local path does not exist and its first part names an fsspec protocol.
"""
from __future__ import annotations

import logging
import posixpath
import re
import secrets
import types
from pathlib import Path, PurePath
from typing import Any, Iterator, Optional, Union

log = logging.getLogger(__name__)

__all__ = ["RemotePath", "StorePath", "is_url", "is_remote", "store_path", "PARQUET_MAGIC"]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_COLLAPSED = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):/(?!/)(.*)$")
#: protocols whose paths are absolute file-system paths (``file:///tmp/x``)
_ROOTED = ("file", "local", "memory")
#: the last 4 bytes of every complete Parquet file
PARQUET_MAGIC = b"PAR1"


def is_url(x: Any) -> bool:
    """Whether ``x`` is a string with a ``protocol://`` prefix (an fsspec URL)."""
    return isinstance(x, str) and bool(_URL.match(x))


def is_remote(x: Any) -> bool:
    return isinstance(x, RemotePath)


def _recover(p: PurePath) -> Optional[str]:
    """The URL a ``Path(url)`` collapsed (``s3:/b/k`` -> ``s3://b/k``), or None."""
    m = _COLLAPSED.match(str(p))
    if not m or Path(p).exists():
        return None
    import fsspec

    proto = m.group(1).lower()
    if proto not in fsspec.available_protocols():
        return None
    return f"{proto}:///{m.group(2)}" if proto in _ROOTED else f"{proto}://{m.group(2)}"


class RemotePath:
    """A path on an fsspec file system with the pathlib operations the store uses.

    ``str()`` (and ``os.fspath``) is the URL, so code that only formats or compares store roots keeps working;
    opening it with the builtin ``open`` does not (use :meth:`open`)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/") or "/"

    @classmethod
    def from_url(cls, url: str) -> "RemotePath":
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return cls(fs, path)

    # -- naming ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return str(self.fs.unstrip_protocol(self.path))

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __reduce__(self) -> Any:
        return (RemotePath.from_url, (self.url,))

    def __truediv__(self, name: Union[str, PurePath]) -> "RemotePath":
        return RemotePath(self.fs, posixpath.join(self.path, str(name)))

    def joinpath(self, *names: str) -> "RemotePath":
        out = self
        for n in names:
            out = out / n
        return out

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.fs, posixpath.dirname(self.path))

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    def resolve(self) -> "RemotePath":
        return self

    def expanduser(self) -> "RemotePath":
        return self

    @property
    def is_local_fs(self) -> bool:
        """fsspec's local file system (``file://``): rename is atomic there, objects stores have none."""
        from fsspec.implementations.local import LocalFileSystem

        return isinstance(self.fs, LocalFileSystem)

    @property
    def arrow_fs(self) -> Any:
        """pyarrow's view of this file system (``PyFileSystem(FSSpecHandler(fs))``), for Parquet reads."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self.fs))

    # -- queries --------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def stat(self) -> Any:
        """``st_size`` and ``st_mtime_ns`` (0 where the file system keeps no time); FileNotFoundError if absent."""
        info = self.fs.info(self.path)
        t = info.get("mtime") or info.get("created") or info.get("LastModified") or info.get("updated") or 0
        if hasattr(t, "timestamp"):
            t = t.timestamp()
        try:
            ns = int(float(t) * 1e9)
        except (TypeError, ValueError):
            ns = 0
        return types.SimpleNamespace(st_size=int(info.get("size") or 0), st_mtime_ns=ns)

    def iterdir(self) -> Iterator["RemotePath"]:
        if not self.fs.isdir(self.path):
            return iter(())
        return iter([RemotePath(self.fs, p) for p in sorted(self.fs.ls(self.path, detail=False))
                     if p.rstrip("/") != self.path])

    def listing(self) -> dict:
        """``{name: size}`` of the files directly in this folder, in one listing (empty when absent)."""
        try:
            entries = self.fs.ls(self.path, detail=True, refresh=True) if self._ls_refresh else \
                self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries
                if e.get("type") != "directory"}

    @property
    def _ls_refresh(self) -> bool:
        import inspect

        try:
            return "refresh" in inspect.signature(self.fs.ls).parameters
        except (TypeError, ValueError):
            return False

    def tail(self, n: int) -> bytes:
        """The last ``n`` bytes (one ranged read)."""
        size = self.stat().st_size
        if size <= 0:
            return b""
        return bytes(self.fs.cat_file(self.path, start=max(size - n, 0), end=size))

    # -- reads ----------------------------------------------------------------------------------------
    def open(self, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" not in mode:
            raise ValueError(f"{self}: RemotePath opens for reading only (writes go through atomic_path, whole)")
        try:
            return self.fs.open(self.path, mode, **kwargs)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self}: not found") from None

    def read_bytes(self) -> bytes:
        try:
            return bytes(self.fs.cat_file(self.path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self}: not found") from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # -- writes (whole) -------------------------------------------------------------------------------
    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.makedirs(self.path, exist_ok=True)

    def upload(self, local: Union[str, Path]) -> None:
        """Put the local file ``local`` at this path, whole (see the module docstring: rename on ``file://``,
        one put elsewhere)."""
        if self.is_local_fs:
            self.fs.makedirs(self.parent.path, exist_ok=True)
            tmp = self.parent / f".{self.name}.{secrets.token_hex(4)}.tmp"
            try:
                self.fs.put_file(str(local), tmp.path)
                self.fs.mv(tmp.path, self.path)
            except BaseException:
                try:
                    self.fs.rm_file(tmp.path)
                except OSError:
                    pass
                raise
        else:
            self.fs.put_file(str(local), self.path)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Remove this folder and everything under it (absent: nothing)."""
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)


StorePath = Union[Path, RemotePath]


def store_path(root: Any) -> StorePath:
    """A store location as a :class:`Path` (plain paths) or a :class:`RemotePath` (fsspec URLs, a
    :class:`RemotePath`, or a ``Path`` that collapsed a URL's ``//``)."""
    if isinstance(root, RemotePath):
        return root
    if is_url(root):
        return RemotePath.from_url(root)
    if isinstance(root, PurePath):
        url = _recover(root)
        if url is not None:
            return RemotePath.from_url(url)
    return Path(root)
