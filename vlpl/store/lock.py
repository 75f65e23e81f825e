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

__all__ = ["StoreLock", "RemoteStoreLock", "StoreLockedError", "LOCK_NAME", "pid_alive"]

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
    return _parse_info(raw)


def _parse_info(raw: str) -> Optional[Dict[str, Any]]:
    """A lock's JSON content as a dict (None when empty; ``{"raw": ...}`` when it is not a JSON object)."""
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


# --------------------------------------------------------------------------------------------------
# stores on fsspec URLs (vlpl/store/fs.py): no flock on object storage, a lock object with a heartbeat
# --------------------------------------------------------------------------------------------------

#: seconds without a heartbeat after which a remote lock object is stale (``VLPL_REMOTE_LOCK_TTL``)
REMOTE_LOCK_TTL = 600.0


class RemoteStoreLock:
    """The writer lock of a store on an fsspec URL: the object ``STORE/.lock`` holding
    ``{"host", "pid", "since", "heartbeat", "token"}`` (docs/REMOTE_STORES.md).

    Object storage has no ``flock`` and no owner that dies with the process, so liveness is a heartbeat: the
    holder rewrites the object every ``ttl / 4`` seconds from a daemon thread. :meth:`acquire` refuses a lock
    whose heartbeat is younger than ``ttl`` (naming the owner and the age), takes over an older one with a
    warning, writes its own object in one put and reads it back: of two writers racing on the same stale lock,
    the one whose token is not read back fails. The writer calls :meth:`check` before each shard and before
    the manifest, so a run whose lock was taken over (it stalled longer than ``ttl``) stops instead of writing
    beside the new owner. This is as strong as a store without compare-and-swap allows; the window left is the
    read-back race (milliseconds), documented as the user's job (one writer per store).
    """

    def __init__(self, root: Any, ttl: Optional[float] = None, clock: Any = None) -> None:
        import time

        from vlpl.store.fs import RemotePath

        if not isinstance(root, RemotePath):
            raise TypeError(f"RemoteStoreLock needs a RemotePath, got {type(root).__name__}")
        self.root = root
        self.path = root / LOCK_NAME
        self.ttl = float(ttl if ttl is not None else os.environ.get("VLPL_REMOTE_LOCK_TTL", REMOTE_LOCK_TTL))
        self.clock = clock or time.time
        self.token: Optional[str] = None
        self.taken_over: Optional[Dict[str, Any]] = None
        self._info: Dict[str, Any] = {}
        self._stop: Any = None
        self._thread: Any = None

    @property
    def held(self) -> bool:
        return self.token is not None

    def read(self) -> Optional[Dict[str, Any]]:
        """The lock object's content (None: no lock object)."""
        try:
            raw = self.path.read_bytes().decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None
        return _parse_info(raw) if raw else {"raw": ""}

    def _write(self) -> None:
        from vlpl.store.atomic import atomic_write_bytes

        self._info["heartbeat"] = float(self.clock())
        atomic_write_bytes(self.path, (json.dumps(self._info) + "\n").encode("utf-8"))

    def _age(self, info: Dict[str, Any]) -> Optional[float]:
        hb = info.get("heartbeat")
        return float(self.clock()) - float(hb) if isinstance(hb, (int, float)) else None

    def acquire(self) -> "RemoteStoreLock":
        """Take the lock or raise :class:`StoreLockedError` naming the owner (never waits)."""
        import secrets
        import threading

        if self.held:
            return self
        key = str(self.root)
        prev = _HELD.get(key)
        if prev is not None and prev is not self:
            log.warning("%s: this process already held the lock of %s (an earlier run in this session that did "
                        "not finish): taking it over", self.path, self.root)
            prev.release()
        info = self.read()
        if info is not None:
            age = self._age(info)
            if age is not None and age < self.ttl:
                raise StoreLockedError(
                    f"store {self.root} is being written by {_describe(info)} (lock object {self.path}, last "
                    f"heartbeat {age:.0f}s ago; stale after {self.ttl:.0f}s without one, VLPL_REMOTE_LOCK_TTL); "
                    f"wait for that run to finish, or write to another URL")
            log.warning("stale lock on %s: %s (last heartbeat %s ago, ttl %.0fs); taking it over", self.root,
                        _describe(info), "unknown" if age is None else f"{age:.0f}s", self.ttl)
            self.taken_over = info
        token = secrets.token_hex(8)
        self._info = {"host": socket.gethostname(), "pid": os.getpid(),
                      "since": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "token": token}
        self._write()
        back = self.read() or {}
        if back.get("token") != token:
            raise StoreLockedError(f"store {self.root}: another writer ({_describe(back)}) took the lock object "
                                   f"{self.path} at the same time; wait for that run to finish, or write to "
                                   f"another URL")
        self.token = token
        _HELD[key] = self  # type: ignore[assignment]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"vlpl-lock-heartbeat {self.root}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        stop = self._stop
        while not stop.wait(max(self.ttl / 4.0, 0.05)):
            try:
                cur = self.read() or {}
                if cur.get("token") != self.token:
                    log.error("%s: the lock was taken over by %s; this run stops at its next shard", self.path,
                              _describe(cur))
                    return
                self._write()
            except Exception as e:  # noqa: BLE001 - a failed heartbeat is retried; check() decides
                log.warning("%s: heartbeat failed (%s: %s); retrying", self.path, type(e).__name__, e)

    def check(self) -> None:
        """Raise :class:`StoreLockedError` unless the lock object is still this holder's."""
        if not self.held:
            raise StoreLockedError(f"store {self.root}: the writer lock is not held")
        cur = self.read()
        if cur is None or cur.get("token") != self.token:
            raise StoreLockedError(
                f"store {self.root}: the lock object {self.path} now belongs to {_describe(cur)} (this run's "
                f"heartbeat was older than {self.ttl:.0f}s, or the lock was removed): this run stops without "
                f"writing more; completed shards are kept")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock object if it is still this holder's (idempotent)."""
        token, self.token = self.token, None
        if token is None:
            return
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=5.0)
        key = str(self.root)
        if _HELD.get(key) is self:
            del _HELD[key]
        try:
            cur = self.read()
            if cur is not None and cur.get("token") == token:
                self.path.unlink(missing_ok=True)
        except Exception as e:  # noqa: BLE001 - leaving a lock object behind only delays the next run by ttl
            log.warning("%s: could not remove the lock object (%s); the next run takes it over after %.0fs",
                        self.path, e, self.ttl)

    def __enter__(self) -> "RemoteStoreLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
