"""Atomic file and directory writes: write to a temporary name in the same folder, fsync, rename.

A failed write (disk full, permission denied, read-only file system, ...) removes its temporary file
and raises :class:`WriteError`, whose message names the final path, the cause and how much was written,
e.g. ``no space left on device writing STORE/shards/part-00003.parquet (12.3 MB written, 0 B free)``,
followed by the caller's ``hint`` (what to do; what was kept).

Temporary names are ``.<name>.<random>.tmp`` next to the target; :func:`remove_stale_temps` clears those
left by a killed process (call it only while no other process writes there, e.g. under the store lock).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Union

from vlpl.store.fs import RemotePath

PathLike = Union[str, Path]

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"

_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error",
    errno.EFBIG: "file too large",
}


class WriteError(OSError):
    """An output could not be written; the message says which file, why, and what to do."""

    def __init__(self, err: int, message: str, path: PathLike) -> None:
        super().__init__(err, message, str(path))
        self.message = message
        self.path = Path(path)

    def __str__(self) -> str:
        return self.message


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def _write_error(e: OSError, path: Path, tmp: Path, hint: str) -> WriteError:
    cause = _CAUSES.get(e.errno or 0, e.strerror or type(e).__name__)
    try:
        written = f"{_size(tmp.stat().st_size)} written"
    except OSError:
        written = "nothing written"
    try:
        free = f", {_size(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = ""
    msg = f"{cause} writing {path} ({written}{free})"
    if hint:
        msg += f"; {hint}"
    return WriteError(e.errno or errno.EIO, msg, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: PathLike, hint: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is untouched, so an output is never
    half-written. An ``OSError`` (from the caller's write, the fsync or the rename) becomes a
    :class:`WriteError` naming ``path``, the cause and ``hint``.

    ``path`` a :class:`~vlpl.store.fs.RemotePath` (a store on an fsspec URL): the temporary file is local and is
    sent whole on success (:meth:`RemotePath.upload`: one put on object storage, rename on ``file://``).
    """
    if isinstance(path, RemotePath):
        with _remote_atomic_path(path, hint) as tmp:
            yield tmp
        return
    path = Path(path)
    tmp_path = path.with_name(f".{path.name}.pending{TEMP_SUFFIX}")  # only for messages if mkstemp fails
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except WriteError:
        tmp_path.unlink(missing_ok=True)
        raise
    except OSError as e:
        err = _write_error(e, path, tmp_path, hint)
        tmp_path.unlink(missing_ok=True)
        raise err from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def _remote_atomic_path(path: RemotePath, hint: str) -> Iterator[Path]:
    """A local temporary file, uploaded whole onto ``path`` on success (nothing is sent on an exception)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX,
                               dir=os.environ.get("VLPL_TMPDIR") or None)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            path.upload(tmp_path)
        except WriteError:
            raise
        except Exception as e:  # noqa: BLE001 - any file-system client error: name the object and the cause
            size = tmp_path.stat().st_size if tmp_path.exists() else 0
            msg = f"{type(e).__name__}: {e} uploading {path} ({_size(size)} to send)"
            raise WriteError(getattr(e, "errno", None) or errno.EIO, msg + (f"; {hint}" if hint else ""),
                             str(path)) from e
    except WriteError:
        raise
    except OSError as e:
        raise _write_error(e, Path(str(path)), tmp_path, hint) from e
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: PathLike, data: bytes, hint: str = "") -> None:
    with atomic_path(path, hint) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str, hint: str = "") -> None:
    atomic_write_bytes(path, text.encode("utf-8"), hint)


def atomic_write_json(path: PathLike, obj: Any, hint: str = "") -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", hint)


def remove_stale_temps(folder: PathLike, recursive: bool = True) -> int:
    """Remove the temporary files and folders (``.NAME.*.tmp``) that a killed writer left in ``folder``.

    Only call it while nothing else writes there. Returns how many were removed.
    """
    if isinstance(folder, RemotePath):  # only file:// leaves temporaries (object stores are written in one put)
        n = 0
        for name in folder.listing():
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                (folder / name).unlink(missing_ok=True)
                log.info("removed a temporary file left by an interrupted run: %s", folder / name)
                n += 1
        return n
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob(f".*{TEMP_SUFFIX}") if recursive else folder.glob(f".*{TEMP_SUFFIX}")
    n = 0
    for p in sorted(found, key=lambda q: len(q.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        log.info("removed a temporary file left by an interrupted run: %s", p)
        n += 1
    return n


@contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
