"""An advisory lock on a store being written: ``STORE/.lock`` (``fcntl.flock``), holding who writes it.

One writing run per store: the main process of a ``vlpl pseudolabel`` run takes the lock before it
checks or touches anything, and gives it back when the manifest is final (other ranks of the same run
share it and never lock). A second writer fails at once, naming the owner::

    store /data/store is being written by pid 4121 on host gpu07 since 2026-11-30T07:12:03Z

The lock file holds one JSON line ``{"host", "pid", "since"}``. The kernel drops a ``flock`` when its
owner dies, so a killed run leaves only the file's text behind: the next writer reports that stale
lock and takes over. If a lock is still held but its owner pid is gone on this host (a forked child
that outlived its parent keeps the open file), the stale file is unlinked and a fresh one locked.
Readers never lock: a store is read only when its manifest says complete.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
import weakref
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"

__all__ = ["StoreLock", "StoreLockedError", "LOCK_NAME", "pid_alive"]

# locks held by this process, by resolved store path: a second writer in the same process (a run that
# failed and is retried in one Python session) supersedes the first instead of locking itself out
_HELD: "weakref.WeakValueDictionary[str, StoreLock]" = weakref.WeakValueDictionary()


class StoreLockedError(RuntimeError):
    """Another live run holds the store's lock."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_info(fd: int) -> Optional[Dict[str, Any]]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        return {"raw": raw[:200]}
    return info if isinstance(info, dict) else {"raw": raw[:200]}


def _describe(info: Optional[Dict[str, Any]]) -> str:
    if not info:
        return "an unknown process"
    if "pid" not in info:
        return f"an unknown process (lock file says {info.get('raw', info)!r})"
    return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('since')}"


class StoreLock:
    """``with StoreLock(root): ...`` or :meth:`acquire` / :meth:`release`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self._fd: Optional[int] = None
        self.taken_over: Optional[Dict[str, Any]] = None  # the stale owner's info, when there was one

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "StoreLock":
        """Take the lock or raise :class:`StoreLockedError` naming the owner (never waits)."""
        if self._fd is not None:
            return self
        key = str(self.root.resolve())
        prev = _HELD.get(key)
        if prev is not None and prev is not self:
            log.warning("%s: this process already held the lock of %s (an earlier run in this session that did "
                        "not finish): taking it over", self.path, self.root)
            prev.release()
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                info = _read_info(fd)
                here = socket.gethostname()
                if info and info.get("host") == here and isinstance(info.get("pid"), int) \
                        and not pid_alive(info["pid"]):
                    log.warning("stale lock on %s: %s, but that process is gone; taking it over",
                                self.root, _describe(info))
                    self._unlink_if_same(fd)
                    os.close(fd)
                    self.taken_over = info
                    continue
                os.close(fd)
                raise StoreLockedError(f"store {self.root} is being written by {_describe(info)} "
                                       f"(lock file {self.path}); wait for that run to finish, or write "
                                       f"to another directory") from None
            # we hold a lock, but on the file at self.path? (it may have been unlinked meanwhile)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = _read_info(fd)
            if old:
                log.warning("stale lock on %s: %s did not finish (killed?); taking it over", self.root,
                            _describe(old))
                self.taken_over = old
            info = {"host": socket.gethostname(), "pid": os.getpid(),
                    "since": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + "\n").encode())
            os.fsync(fd)
            self._fd = fd
            _HELD[key] = self
            log.debug("locked %s", self.path)
            return self
        raise StoreLockedError(f"store {self.root}: could not take the lock {self.path} (it kept changing)")

    def _unlink_if_same(self, fd: int) -> None:
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        key = str(self.root.resolve())
        if _HELD.get(key) is self:
            del _HELD[key]
        try:
            self._unlink_if_same(fd)
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock is dropped with its object
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
