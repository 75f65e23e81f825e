"""Shard assembly and writing off the scoring loop (issue 10 item 3).

The pseudolabel loop hands each scored batch to a *shard writer* and goes on with the next batch:

* :class:`ScoredBatch`: one batch's results: the dataset rows of all its images, the *payload* of the
  decoded ones (the teacher's per-view features, left on the device), and the errors of the failed ones.
* :class:`ShardAssembler`: per-shard buffers filled row by row; it turns a payload into the rows' arrays
  with the stage's ``encode`` (cosines or a compact form, the device-to-host copy: the only place that
  waits for the device) and, when a shard's last row is in, calls ``write(shard, ShardBuffer)`` (the
  stage's function around :meth:`StoreWriter.write_shard`). So the scoring loop never syncs with the device.
* :class:`BackgroundWriter`: an assembler on one thread behind a bounded queue: :meth:`submit` blocks while
  ``max_pending`` batches wait (back-pressure), an error in the writer is raised by the next
  :meth:`submit` or by :meth:`close` in the loop's thread, naming the shard. Parquet encoding, zstd and
  sha256 release the GIL, so a thread is enough. :class:`InlineWriter` is the same interface, run in the
  loop's thread (the synchronous reference).

Both run the same assembler code and the same :meth:`StoreWriter.write_shard`, so their stores are
byte-identical, and the commit and resume rules are the store's own: a shard counts only once its file is
renamed into place and its completion mark written; a kill at any point leaves at most temporary files,
which the next run's ``StoreWriter.prepare`` removes before it redoes the incomplete shards.

Both measure :attr:`wait_s`: the time the scoring loop spent waiting on the writer (the whole write for
:class:`InlineWriter`; blocked submits and the final drain for :class:`BackgroundWriter`).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from vlpl.store.store import StoreError, shard_name

log = logging.getLogger(__name__)

#: the writer thread's name (tests and profilers look for it)
THREAD_NAME = "vlpl-store-writer"


@dataclass
class ScoredBatch:
    """One batch's results (all its rows lie in one shard).

    Attributes:
        rows: dataset indices of every image of the batch.
        good: the decoded ones among ``rows``; row ``k`` of the encoded arrays belongs to ``good[k]``.
        payload: what the assembler's ``encode`` turns into the rows' arrays (e.g. the teacher's per-view
            features, still on the device: the device work and the device-to-host copy then happen on the
            writer's side, the scoring loop never waits for them); None when no image decoded.
        errors: dataset index -> error message, for the images that failed.
    """

    rows: List[int]
    good: List[int]
    payload: Any = None
    errors: Dict[int, str] = field(default_factory=dict)


@dataclass
class ShardBuffer:
    """One shard's rows being collected: ``arrays[name][r]`` and ``ok[r]`` for row ``rows.start + r``."""

    rows: range
    arrays: Dict[str, np.ndarray]
    ok: np.ndarray
    errors: List[Optional[str]]
    filled: int = 0


class ShardAssembler:
    """Collects :class:`ScoredBatch` rows into per-shard buffers; writes each shard when it is full.

    Args:
        shard_rows: shard index -> its dataset rows (a range), for the shards this run scores.
        fields: name -> (per-row shape, numpy dtype) of each array a shard keeps (zeros for failed rows).
        encode: a batch's ``payload`` -> name -> ``(len(good), *shape)`` numpy array for every field.
        write: called as ``write(shard, buffer)`` once the shard's last row is in.
    """

    def __init__(self, shard_rows: Mapping[int, range], fields: Mapping[str, Tuple[Sequence[int], Any]],
                 encode: Callable[[Any], Mapping[str, np.ndarray]], write: Callable[[int, ShardBuffer], None]
                 ) -> None:
        self.shard_rows = dict(shard_rows)
        self.fields = {k: (tuple(int(x) for x in shape), np.dtype(dt)) for k, (shape, dt) in fields.items()}
        self.encode = encode
        self.write = write
        self._shard_of = {i: s for s, r in self.shard_rows.items() for i in r}
        self._buffers: Dict[int, ShardBuffer] = {}
        self.current: Optional[int] = None  # the shard of the batch being added (for error messages)
        self.written: List[int] = []

    def _buffer(self, s: int) -> ShardBuffer:
        b = self._buffers.get(s)
        if b is None:
            r = self.shard_rows[s]
            n = len(r)
            b = ShardBuffer(r, {k: np.zeros((n, *shape), dt) for k, (shape, dt) in self.fields.items()},
                            np.zeros(n, bool), [None] * n)
            self._buffers[s] = b
        return b

    def add(self, batch: ScoredBatch) -> None:
        """Encode ``batch`` into its shard's buffer and write the shard if this batch completed it."""
        if not batch.rows:
            return
        s = self._shard_of[batch.rows[0]]
        self.current = s  # named by an error in encode or write
        b = self._buffer(s)
        if batch.good:
            arrays = self.encode(batch.payload)
            missing = set(self.fields) - set(arrays)
            if missing:
                raise ValueError(f"shard {s}: the encoded batch lacks {sorted(missing)}")
            r = np.asarray(batch.good, np.int64) - b.rows.start
            for name in self.fields:
                b.arrays[name][r] = arrays[name]
            b.ok[r] = True
        for i, err in batch.errors.items():
            b.errors[i - b.rows.start] = err
        b.filled += len(batch.rows)
        if b.filled == len(b.rows):
            self.write(s, self._buffers.pop(s))
            self.written.append(s)
        self.current = None

    @property
    def pending_shards(self) -> List[int]:
        """Shards with some but not all rows in (dropped when the run stops early)."""
        return sorted(self._buffers)


def _reraise(e: BaseException, shard: Optional[int]) -> None:
    """Raise the writer's error ``e`` in the loop's thread, as :func:`_named` makes it."""
    err = _named(e, shard)
    if err is e:
        raise e
    raise err from e


def _named(e: BaseException, shard: Optional[int]) -> BaseException:
    """The writer's error as the loop raises it: a :class:`StoreError` naming the shard (kept as is when it
    already does)."""
    if shard is None:
        return e
    name = shard_name(shard)
    if isinstance(e, StoreError) and name in str(e):
        return e
    return StoreError(f"the score writer failed on shard {shard} ({name}): {type(e).__name__}: {e}")


class InlineWriter:
    """The assembler run in the scoring loop's thread: every write is a stall (:attr:`wait_s`)."""

    def __init__(self, assembler: ShardAssembler) -> None:
        self.assembler = assembler
        self.wait_s = 0.0

    def submit(self, batch: ScoredBatch) -> None:
        t0 = time.perf_counter()
        try:
            self.assembler.add(batch)
        except BaseException as e:  # noqa: BLE001 - re-raised, naming the shard
            _reraise(e, self.assembler.current)
        finally:
            self.wait_s += time.perf_counter() - t0

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def __enter__(self) -> "InlineWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()


_STOP = object()


class BackgroundWriter:
    """The assembler on a thread behind a queue of at most ``max_pending`` batches.

    Use as a context manager: on a normal exit it drains the queue (:meth:`close`: every submitted batch is
    written, the writer's error re-raised); on an exception it stops the thread after the write in progress
    (:meth:`abort`: pending batches are dropped; their shards are redone by the next run), so the thread
    never outlives the store lock.
    """

    def __init__(self, assembler: ShardAssembler, max_pending: int) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.assembler = assembler
        self.max_pending = max_pending
        self.wait_s = 0.0
        self.drain_s = 0.0  # the part of wait_s spent in close(), writing what was still queued
        self.max_seen = 0  # the most batches ever queued at once
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=max_pending)
        self._error: Optional[BaseException] = None
        self._error_shard: Optional[int] = None
        self._abort = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    # -- the writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None or self._abort.is_set():
                continue  # drain without writing, so that submit() never blocks forever
            try:
                self.assembler.add(item)
            except BaseException as e:  # noqa: BLE001 - handed to the loop's thread
                self._error_shard = self.assembler.current
                self._error = e
                log.debug("score writer failed on shard %s", self._error_shard, exc_info=True)

    # -- the loop's side -----------------------------------------------------------------------------
    def _raise_error(self) -> None:
        if self._error is not None:
            _reraise(self._error, self._error_shard)

    def submit(self, batch: ScoredBatch) -> None:
        """Queue ``batch``; blocks while ``max_pending`` batches wait; raises the writer's error, if any."""
        self._raise_error()
        if self._closed:
            raise RuntimeError("submit() after close()")
        t0 = time.perf_counter()
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            while True:
                try:
                    self._queue.put(batch, timeout=0.05)
                    break
                except queue.Full:
                    self._raise_error()
                    if not self._thread.is_alive():
                        raise RuntimeError("the score writer thread ended unexpectedly") from None
            self.wait_s += time.perf_counter() - t0
        self.max_seen = max(self.max_seen, self._queue.qsize())

    def close(self) -> None:
        """Write everything submitted, stop the thread, and raise the writer's error if there was one."""
        if not self._closed:
            self._closed = True
            t0 = time.perf_counter()
            self._queue.put(_STOP)
            self._thread.join()
            self.drain_s = time.perf_counter() - t0
            self.wait_s += self.drain_s
        self._raise_error()

    def abort(self) -> None:
        """Stop after the write in progress, dropping what is queued (the loop is failing anyway)."""
        if not self._closed:
            self._closed = True
            self._abort.set()
            self._queue.put(_STOP)
            self._thread.join()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
