"""Fault injection for ``vlpl pseudolabel`` (issue 9): kill -9, a full disk, bit flips, a second writer.

Every test compares against one uninterrupted reference store built from the same 40 coco256 images
(tiny random teacher, grid 2 with flips, 4 images a shard: 10 shards, plus the FAISS index):

* **kill -9 at random points**: a real ``vlpl pseudolabel`` process is killed (SIGKILL to its process
  group) at a point drawn from the run's own progress: once ``k`` shards exist (``k`` uniform in
  ``0..10``; ``k = 10`` is the finalize step: index and manifest) plus a random delay, so a kill lands
  before, between and inside shard writes. The run is then resumed; the resumed store must be
  byte-identical to the reference (every file, the manifest and index included), with no temporary
  file and no lock left behind.
* **disk full**: every write under the store fails with ENOSPC once ``K`` bytes have been written
  (``K`` uniform over what a whole run writes; a wrapper at the write calls: Python's ``open``, the Parquet
  writer and the FAISS index writer). The run must stop with an error naming the file and the cause,
  leave no temporary file, keep every completed shard intact, and a re-run with space must give the
  reference store.
* **bit flips** (recorded under the ``store`` stage): one random bit of a shard (reading it through the split
  readers fails naming the shard, or reads identical values; the resume re-does the shard and the store
  comes back identical), of a training shard's cached scores (``vlpl evaluate`` and ``vlpl train`` both stop
  naming the shard) and of ``manifest.json`` (reading fails naming manifest.json; a resume refuses naming it
  or rebuilds the same store).
* **disk full under the CLI**: ``vlpl pseudolabel`` exits 2 with one line naming the file and the cause,
  no traceback.
* **orphans and the lock**: planted ``.tmp`` files are removed on resume; a second run on a store that a
  live run is writing is refused at once naming the owner's pid, and the first run's store is unharmed.

Each outcome is recorded with ``record_fault`` (docs/RELIABILITY.md is built from those records) and only
then asserted: ``lost`` counts stores that came back different from the reference.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from tests.conftest import REPO_ROOT, TINY_TEACHER, make_subset_dataset
from tests.faults.conftest import trials

pytestmark = pytest.mark.slow  # each test starts real runs (seconds each); `pytest -m "not slow"` skips them

TINY_STUDENT = REPO_ROOT / "configs" / "models" / "tiny_classifier.yaml"
N_IMAGES = 40
SHARD_SIZE = 4
N_SHARDS = N_IMAGES // SHARD_SIZE
SEED = int(os.environ.get("VLPL_FAULTS_SEED", "20261130"))
RUN_TIMEOUT_S = 300  # a run that takes longer than this is a hang


# --------------------------------------------------------------------------------------------------
# the run, the reference and the comparison
# --------------------------------------------------------------------------------------------------


def _overrides(data: Path, out: Path) -> List[str]:
    return [f"data.root={data}", f"out={out}", f"shard_size={SHARD_SIZE}", f"batch_size={SHARD_SIZE}",
            "num_workers=0", "progress=false", "views.grid=2"]


def _run_inprocess(data: Path, out: Path) -> Path:
    """``vlpl pseudolabel`` as a function call (what the CLI calls), in this process."""
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel

    return run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], _overrides(data, out)))


def _cli(data: Path, out: Path) -> List[str]:
    return [sys.executable, "-m", "vlpl", "pseudolabel", "--config", str(TINY_TEACHER), *_overrides(data, out)]


def _cli_env() -> Dict[str, str]:
    import torch

    # the same intra-op thread count as this process: the scores are then bitwise those of an in-process run
    n = str(torch.get_num_threads())
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "PYTHONHASHSEED": "0"}


# Derived, rebuildable data that is not part of the store contract: the flat read sidecars (vlpl.store.cache)
# are built on first read and marked with their shard's sha256, size and mtime, so a re-done shard's sidecar
# is rebuilt rather than served stale; the tests compare what is read instead (``_read_everything``).
DERIVED_DIRS = ("cache",)


def _files(root: Path) -> Dict[str, Path]:
    """Every file under ``root`` (hidden ones too: temp files and locks count), by relative path; the derived
    sidecar folders are left out."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in DERIVED_DIRS}


_TIME_KEY = re.compile(r"(^|_)(time|timestamp|date|created|started|finished|updated)(_|$)", re.I)


def _drop_times(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_times(v) for k, v in obj.items() if not _TIME_KEY.search(k)}
    if isinstance(obj, list):
        return [_drop_times(v) for v in obj]
    return obj


def _same_manifest(a: bytes, b: bytes) -> bool:
    """Byte-equal, or equal once timestamps (and the checksum that covers them) are left out."""
    if a == b:
        return True
    try:
        ja, jb = json.loads(a), json.loads(b)
    except ValueError:
        return False
    for j in (ja, jb):
        j.pop("manifest_sha256", None)
    return _drop_times(ja) == _drop_times(jb)


def store_diff(got: Path, ref: Path) -> List[str]:
    """What differs between two stores: ``+path`` extra, ``-path`` missing, ``~path`` other bytes."""
    a, b = _files(got), _files(ref)
    out = [f"+{k}" for k in a.keys() - b.keys()] + [f"-{k}" for k in b.keys() - a.keys()]
    for k in sorted(a.keys() & b.keys()):
        x, y = a[k].read_bytes(), b[k].read_bytes()
        same = _same_manifest(x, y) if k == "manifest.json" else x == y
        if not same:
            out.append(f"~{k}")
    return sorted(out)


def temp_files(root: Path) -> List[str]:
    """Temporary files (``.NAME.*.tmp``) anywhere in the store."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.name.endswith(".tmp")
                  or ".tmp." in p.name)


def shard_files(root: Path) -> List[Path]:
    """The completed (renamed) shard files."""
    d = root / "shards"
    return sorted(p for p in d.glob("part-*.parquet")) if d.is_dir() else []


@dataclass
class Bench:
    """The dataset, the reference store and a scratch folder for one test module."""

    data: Path
    ref: Path
    work: Path
    ref_seconds: float
    notes: Dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> Path:
        return self.work / "store"

    def fresh(self) -> Path:
        """An empty scratch store path (the same path every time: stores are compared byte for byte)."""
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        return self.store

    def copy_ref(self) -> Path:
        """The scratch store as a copy of the reference."""
        self.fresh()
        shutil.copytree(self.ref, self.store)
        return self.store


@pytest.fixture(scope="module")
def bench(coco256_root, tmp_path_factory) -> Bench:
    base = tmp_path_factory.mktemp("pl_faults")
    data = make_subset_dataset(coco256_root, base / "data", N_IMAGES)
    work = base / "work"
    work.mkdir()
    t0 = time.perf_counter()
    _run_inprocess(data, work / "store")
    ref_seconds = time.perf_counter() - t0
    ref = base / "ref"
    (work / "store").rename(ref)
    assert len(shard_files(ref)) == N_SHARDS, sorted(_files(ref))
    assert not temp_files(ref) and not (ref / ".lock").exists()
    # the reference is reproducible: a second uninterrupted run gives the same bytes
    b = Bench(data, ref, work, ref_seconds)
    _run_inprocess(data, b.fresh())
    assert store_diff(b.store, ref) == []
    return b


# --------------------------------------------------------------------------------------------------
# kill -9 at random points, then resume
# --------------------------------------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _kill_at(b: Bench, k: int, delay: float, on_temp: bool = False) -> Tuple[str, int, List[str]]:
    """Start a CLI run on a fresh store, SIGKILL it once ``k`` shards exist (``k = 0``: once the store
    exists) plus ``delay`` seconds; with ``on_temp``, inside the next file write after that (the run is
    frozen with SIGSTOP while a temporary file exists, then killed). Returns (where the kill landed, shards complete at the kill, temp files left)."""
    store = b.fresh()
    proc = subprocess.Popen(_cli(b.data, store), env=_cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                assert proc.returncode == 0, f"the run failed before the kill: {err[-3000:]}"
                return "after the run ended", len(shard_files(store)), temp_files(store)
            assert time.monotonic() < deadline, f"no progress in {RUN_TIMEOUT_S}s (hang?)"
            reached = (store / "manifest.json").exists() and len(shard_files(store)) >= k
            if reached and not on_temp:
                break
            if reached and temp_files(store):  # a write is under way: freeze the run, then look again
                os.killpg(proc.pid, signal.SIGSTOP)
                if temp_files(store):
                    break  # frozen inside the write: the SIGKILL below lands there
                os.killpg(proc.pid, signal.SIGCONT)
            elif not reached:
                time.sleep(0.002)
        time.sleep(0.0 if on_temp else delay)
        if proc.poll() is not None:
            return "after the run ended", len(shard_files(store)), temp_files(store)
        done = len(shard_files(store))
        manifest_done = _complete(store)
        _kill_group(proc)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        if proc.stderr:
            proc.stderr.close()
    tmps = temp_files(store)
    if on_temp and tmps:
        where = "inside a file write (temp file open)"
    elif done == 0:
        where = "before the first shard"
    elif done < N_SHARDS:
        where = "between/inside shard writes"
    else:
        where = "after the run ended" if manifest_done else "during finalize (index, manifest)"
    return where, done, tmps


def _complete(store: Path) -> bool:
    try:
        return bool(json.loads((store / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def test_kill9_at_random_points_then_resume(bench, record_fault):
    n = trials(3, 20)
    rng = random.Random(SEED)
    where_counts: Dict[str, int] = {}
    ok = lost = orphans_seen = 0
    failures: List[str] = []
    for t in range(n):
        # k = 0..N_SHARDS; the bounded run kills early, inside a write (the moment a temp file exists) and
        # during finalize; the long run draws the rest, a quarter of them inside writes
        if t < 3:
            k, on_temp = [(0, False), (N_SHARDS // 2, True), (N_SHARDS, False)][t]
        else:
            k, on_temp = rng.randint(0, N_SHARDS), rng.random() < 0.25
        delay = rng.uniform(0.0, 0.08)
        where, done, tmps = _kill_at(bench, k, delay, on_temp)
        where_counts[where] = where_counts.get(where, 0) + 1
        orphans_seen += len(tmps)
        try:
            _run_inprocess(bench.data, bench.store)
        except Exception as e:  # noqa: BLE001 - a resume that fails is an outcome to record
            failures.append(f"trial {t} (k={k}, {where}): resume failed: {type(e).__name__}: {e}")
            continue
        diff = store_diff(bench.store, bench.ref)
        if diff:
            lost += 1
            failures.append(f"trial {t} (k={k}, {where}, {done} shards at the kill): store differs: {diff}")
        else:
            ok += 1
    landed = ", ".join(f"{v} {k}" for k, v in sorted(where_counts.items()))
    record_fault("pseudolabel", "kill -9 at a random point, then resume", n, ok, lost,
                 f"resumed store byte-identical to an uninterrupted run (shards, manifest, index); kills landed: "
                 f"{landed}; {orphans_seen} temp files left by kills, none after resume; seed {SEED}")
    assert not failures, "\n".join(failures)


def _write_manifest(path: Path, manifest: Dict[str, Any]) -> None:
    """Write a manifest the way the store does (with its own checksum where the store keeps one)."""
    from vlpl.store import store as store_mod

    writer = getattr(store_mod, "write_manifest", None)
    if writer is not None:
        writer(path, manifest)
    else:
        path.write_text(json.dumps(manifest, indent=2) + "\n")


def test_resume_removes_orphan_temp_files_and_a_stale_lock(bench, record_fault):
    """A killed run's leftovers (half-written temp files, a lock whose owner is gone) are cleaned up."""
    store = bench.copy_ref()
    for s in (3, 7):  # two shards "in flight" when the run died: temp file written, never renamed
        (store / "shards" / f"part-{s:05d}.parquet").unlink()
        (store / "shards" / f"part-{s:05d}.json").unlink()
        (store / "shards" / f".part-{s:05d}.parquet.x{s}k2a9.tmp").write_bytes(os.urandom(1000))
    (store / ".manifest.json.q81zzm.tmp").write_text('{"half": ')
    (store / "index" / ".image_embeddings.faiss.ab12cd.tmp").write_bytes(b"\0" * 64)
    # a lock left by a process that no longer exists on this host
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (store / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                             "since": "2026-01-01T00:00:00Z"}) + "\n")
    # the manifest as the killed run left it: written by prepare, not complete
    manifest = json.loads((store / "manifest.json").read_text())
    manifest.update(complete=False, shards=[])
    for k in ("num_rows", "num_failed", "index"):
        manifest.pop(k, None)
    _write_manifest(store / "manifest.json", manifest)
    planted = temp_files(store)
    assert len(planted) == 4
    _run_inprocess(bench.data, store)
    diff = store_diff(store, bench.ref)
    record_fault("pseudolabel", "orphan temp files and a stale lock after a kill", 1, int(not diff), int(bool(diff)),
                 f"{len(planted)} planted .tmp files and a lock of a dead pid: all removed by the resume, "
                 "store identical to the reference")
    assert diff == [], diff


def test_second_writer_is_refused_while_a_run_writes(bench, record_fault):
    """Two runs on one store: the second fails at once naming the first's pid; the first's store is unharmed."""
    store = bench.fresh()
    proc = subprocess.Popen(_cli(bench.data, store), env=_cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (store / "manifest.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the first run never created its store"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGSTOP)  # hold the first run mid-way (it keeps its lock)
        try:
            with pytest.raises(Exception) as info:
                _run_inprocess(bench.data, store)
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        msg = str(info.value)
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, proc.stderr.read().decode(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        if proc.stderr:
            proc.stderr.close()
    named = str(proc.pid) in msg and "being written" in msg
    diff = store_diff(store, bench.ref)
    record_fault("pseudolabel", "a second run on a store being written", 1, int(named and not diff), int(bool(diff)),
                 "refused at once naming the first run's pid; the first run's store identical to the reference")
    assert named, msg
    assert diff == [], diff


# --------------------------------------------------------------------------------------------------
# disk full: ENOSPC at byte K
# --------------------------------------------------------------------------------------------------


class DiskFull:
    """A disk with ``free`` bytes left under ``root``: the writes that would pass it fail with ENOSPC.

    Installed at the write calls the store uses: Python's ``open`` (``Path.write_bytes``, ``np.save``, JSON),
    Parquet's writer (redirected through a Python file) and FAISS's ``write_index`` (through
    ``serialize_index``). Like a real disk, the write that crosses the limit writes what fits, then fails.
    """

    def __init__(self, root: Path, free: Optional[int]) -> None:
        self.root = str(Path(root).resolve())
        self.free = free
        self.written = 0
        self.failed_at: Optional[Path] = None

    def mine(self, path: Any) -> bool:
        if isinstance(path, int):
            return False
        try:
            p = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return False
        return p == self.root or p.startswith(self.root + os.sep)

    def take(self, n: int, path: Path) -> int:
        """Bytes of a write of ``n`` that fit; sets ``failed_at`` when it does not all fit."""
        if self.free is None:
            self.written += n
            return n
        room = max(self.free - self.written, 0)
        k = min(n, room)
        self.written += k
        if k < n and self.failed_at is None:
            self.failed_at = path
        return k


class _LimitedFile:
    """A binary file opened for writing whose ``write`` draws from a :class:`DiskFull`."""

    def __init__(self, disk: DiskFull, f: Any, path: Path) -> None:
        self._disk, self._f, self._path = disk, f, path

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        k = self._disk.take(len(mv), self._path)
        if k:
            self._f.write(mv[:k])
        if k < len(mv):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(mv)

    def __enter__(self) -> "_LimitedFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@contextmanager
def disk_full(monkeypatch: pytest.MonkeyPatch, root: Path, free: Optional[int]) -> Iterator[DiskFull]:
    import faiss
    import pyarrow.parquet as pq

    disk = DiskFull(root, free)
    real_open = io.open

    def limited_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and disk.mine(file):
            if "b" not in mode:  # text mode: count the encoded bytes through a binary layer
                f.close()
                raw = real_open(file, mode.replace("t", "") + "b")
                enc = kwargs.get("encoding") or (args[1] if len(args) > 1 else None) or "utf-8"
                return io.TextIOWrapper(_Buffered(_LimitedFile(disk, raw, Path(os.fsdecode(file)))), encoding=enc)
            return _LimitedFile(disk, f, Path(os.fsdecode(file)))
        return f

    real_init = pq.ParquetWriter.__init__
    real_close = pq.ParquetWriter.close

    def writer_init(self: Any, where: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(where, (str, os.PathLike)) and disk.mine(where):
            self._fault_file = limited_open(where, "wb")
            where = self._fault_file
        real_init(self, where, *args, **kwargs)

    def writer_close(self: Any) -> None:
        try:
            real_close(self)
        finally:
            f = getattr(self, "_fault_file", None)
            if f is not None and not f.closed:
                f.close()

    real_write_index = faiss.write_index

    def write_index(index: Any, path: Any, *args: Any) -> None:
        if isinstance(path, (str, os.PathLike)) and disk.mine(path):
            with limited_open(path, "wb") as f:
                f.write(faiss.serialize_index(index).tobytes())
            return
        real_write_index(index, path, *args)

    monkeypatch.setattr(builtins, "open", limited_open)
    monkeypatch.setattr(io, "open", limited_open)
    monkeypatch.setattr(pq.ParquetWriter, "__init__", writer_init)
    monkeypatch.setattr(pq.ParquetWriter, "close", writer_close)
    monkeypatch.setattr(faiss, "write_index", write_index)
    try:
        yield disk
    finally:
        monkeypatch.undo()


class _Buffered(io.RawIOBase):
    """A raw binary layer over a :class:`_LimitedFile`, for text-mode opens."""

    def __init__(self, f: _LimitedFile) -> None:
        self._lf = f

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self._lf.write(b)

    def close(self) -> None:
        if not self.closed:
            self._lf.close()
        super().close()


def _target_name(path: Path) -> str:
    """The final file a temporary ``.NAME.<random>.tmp`` stands for (else the file's own name)."""
    name = path.name
    if name.startswith(".") and name.endswith(".tmp"):
        return name[1:-4].rsplit(".", 1)[0]
    return name


def test_disk_full_at_a_random_byte_then_rerun(bench, record_fault, monkeypatch):
    n = trials(3, 20)
    rng = random.Random(SEED + 1)
    # how many bytes a whole run writes (through the same wrapper, without a limit)
    store = bench.fresh()
    with disk_full(monkeypatch, store, None) as disk:
        _run_inprocess(bench.data, store)
    total = disk.written
    assert store_diff(store, bench.ref) == [], "writing through the wrapper changed the store"
    assert total > sum(p.stat().st_size for p in shard_files(bench.ref))
    ok = lost = 0
    failures: List[str] = []
    where: Dict[str, int] = {}
    for t in range(n):
        budget = [0, total // 2, total - 1][t] if t < 3 else rng.randrange(0, total)
        store = bench.fresh()
        err: Optional[BaseException] = None
        with disk_full(monkeypatch, store, budget) as disk:
            try:
                _run_inprocess(bench.data, store)
            except Exception as e:  # noqa: BLE001 - the failure is the outcome under test
                err = e
        label = f"trial {t} (disk full at byte {budget} of {total}, in {disk.failed_at})"
        if err is None:
            failures.append(f"{label}: the run did not fail")
            continue
        target = _target_name(disk.failed_at) if disk.failed_at else "?"
        kind = re.sub(r"part-\d+", "part-N", target)
        where[kind] = where.get(kind, 0) + 1
        msg = str(err)
        problems = []
        if "no space left" not in msg.lower():
            problems.append(f"the error does not say the disk is full: {type(err).__name__}: {msg}")
        if target not in msg:
            problems.append(f"the error does not name {target}: {type(err).__name__}: {msg}")
        if temp_files(store):
            problems.append(f"temp files left: {temp_files(store)}")
        kept = shard_files(store)
        bad = [p.name for p in kept if p.read_bytes() != (bench.ref / "shards" / p.name).read_bytes()]
        if bad:
            problems.append(f"completed shards differ from the reference: {bad}")
        _run_inprocess(bench.data, store)  # space again: the same command completes the store
        diff = store_diff(store, bench.ref)
        if diff or bad:
            lost += 1
            problems.append(f"after the re-run the store differs: {diff}")
        if problems:
            failures.append(f"{label}: " + "; ".join(problems))
        else:
            ok += 1
    hit = ", ".join(f"{v} in {k}" for k, v in sorted(where.items()))
    record_fault("pseudolabel", "disk full (ENOSPC at a random byte), then re-run", n, ok, lost,
                 f"error names the file and 'no space left'; no temp file; completed shards kept; re-run store "
                 f"identical; failures hit: {hit}; seed {SEED + 1}")
    assert not failures, "\n".join(failures)


_CLI_DISK_FULL = """\
import sys
sys.path.insert(0, sys.argv[1])
import pytest
from tests.faults.test_pseudolabel_faults import disk_full
from vlpl.cli import main
with disk_full(pytest.MonkeyPatch(), sys.argv[2], int(sys.argv[3])):
    rc = main(sys.argv[4:])
sys.exit(rc)
"""


def test_disk_full_through_the_cli_is_a_clear_message_not_a_traceback(bench, record_fault):
    """What a user sees: ``vlpl pseudolabel`` on a full disk exits 2 with one line naming the file and the
    cause (no traceback), and the same command with space completes the reference store."""
    store = bench.fresh()
    budget = sum(p.stat().st_size for p in _files(bench.ref).values()) // 2  # the disk fills mid-way
    cmd = [sys.executable, "-c", _CLI_DISK_FULL, str(REPO_ROOT), str(store), str(budget),
           "pseudolabel", "--config", str(TINY_TEACHER), *_overrides(bench.data, store)]
    r = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    checks = {
        "exit status 2": r.returncode == 2,
        "no traceback": "Traceback" not in r.stderr,
        "one line naming the cause and a file of the store": last.startswith("vlpl pseudolabel: error: ")
        and "no space left" in last.lower() and str(store) in last,
        "no temp file": not temp_files(store),
    }
    r2 = subprocess.run(_cli(bench.data, store), env=_cli_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    diff = store_diff(store, bench.ref) if r2.returncode == 0 else ["the re-run failed: " + r2.stderr[-2000:]]
    checks["re-run gives the reference store"] = not diff
    record_fault("pseudolabel", "disk full under the CLI", 1, int(all(checks.values())), int(bool(diff)),
                 f"exit 2 with one message line ({last.replace(str(store), 'STORE')[:150]!r}), no traceback, no temp file; the same command "
                 "with space completes the store, identical to the reference")
    assert all(checks.values()), (checks, r.returncode, r.stderr[-3000:])


# --------------------------------------------------------------------------------------------------
# bit flips in shards and in the manifest
# --------------------------------------------------------------------------------------------------


def _flip(path: Path, rng: random.Random) -> Tuple[int, int]:
    data = bytearray(path.read_bytes())
    pos, bit = rng.randrange(len(data)), rng.randrange(8)
    data[pos] ^= 1 << bit
    path.write_bytes(bytes(data))
    return pos, bit


def _read_everything(store: Path) -> Dict[str, Any]:
    """Read a store the way train and evaluate do: open it, then every split's ids, labels and scores."""
    import numpy as np

    from vlpl.store.store import ScoreStore

    s = ScoreStore(store)
    out: Dict[str, Any] = {"classes": list(s.classes)}
    if hasattr(s, "split") and hasattr(s, "splits"):
        for name in sorted(s.splits()):
            sp = s.split(name)
            pos = np.arange(len(sp))
            out[name] = (list(sp.sample_ids), list(sp.images), np.asarray(sp.observed).tobytes(),
                         np.asarray(sp.labels_known).tobytes(),
                         None if sp.labels is None else np.asarray(sp.labels).tobytes(),
                         np.asarray(sp.scores(pos)).tobytes())
    else:  # before the batch-wise read API
        a = s.arrays(("sample_id", "split", "observed", "labels", "scores", "status"))
        out["all"] = {k: (v.tobytes() if v.dtype != object else list(v)) for k, v in a.items()}
    return out


def test_bit_flip_in_a_shard_is_detected_and_resume_redoes_it(bench, record_fault):
    n = trials(3, 20)
    rng = random.Random(SEED + 2)
    expected = _read_everything(bench.ref)
    ok = lost = detected = identical = 0
    failures: List[str] = []
    for t in range(n):
        store = bench.copy_ref()
        shard = rng.choice(shard_files(store))
        pos, bit = _flip(shard, rng)
        label = f"trial {t} ({shard.name} byte {pos} bit {bit})"
        # read through the train/evaluate path: an error naming the shard, or the same values
        try:
            got = _read_everything(store)
        except Exception as e:  # noqa: BLE001
            named = shard.name in str(e)
            detected += named
            read_ok = named
            if not named:
                failures.append(f"{label}: read failed without naming the shard: {type(e).__name__}: {e}")
        else:
            read_ok = got == expected
            identical += read_ok
            if not read_ok:
                failures.append(f"{label}: read succeeded with changed values (silent corruption)")
        # resume: the shard's sha256 no longer matches its mark, so it is re-done
        _run_inprocess(bench.data, store)
        diff = store_diff(store, bench.ref)
        if not diff and _read_everything(store) != expected:  # nothing read from a stale sidecar
            diff = ["values read after the resume differ from the reference's"]
        if diff:
            failures.append(f"{label}: after resume the store differs: {diff}")
        if diff or not read_ok:
            lost += 1
        else:
            ok += 1
    record_fault("store", "1-bit flip in a shard: read, then resume", n, ok, lost,
                 f"read through the split readers: {detected} detected naming the shard, {identical} read "
                 f"identical values; resume re-did the shard, store identical; seed {SEED + 2}")
    assert not failures, "\n".join(failures)


def _flip_in_scores(shard: Path, rng: random.Random) -> int:
    """Flip one random bit inside the shard's ``scores`` column chunk (the data train and evaluate read)."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(shard).metadata
    rg = md.row_group(rng.randrange(md.num_row_groups))
    col = next(rg.column(c) for c in range(md.num_columns) if rg.column(c).path_in_schema.startswith("scores"))
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset  # chunk start
    pos = start + rng.randrange(col.total_compressed_size)
    data = bytearray(shard.read_bytes())
    data[pos] ^= 1 << rng.randrange(8)
    shard.write_bytes(bytes(data))
    return pos


def _evaluate_store(store: Path, out: Path) -> None:
    """``vlpl evaluate`` in store mode on the training split (zero-shot scores and pseudo-label quality)."""
    from vlpl.config import EvaluateConfig
    from vlpl.eval.stage import run_evaluate

    run_evaluate(EvaluateConfig(store=str(store), split="train", out=str(out), plots=False))


def _train_on(store: Path, out: Path) -> None:
    """``vlpl train`` (AEVLP recipe, tiny student) for one epoch on the store."""
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    run_train(load_train_config([str(TINY_STUDENT)], [f"store={store}", f"out={out}", "method=aevlp",
                                                      "dataset=coco2014", "epochs=1", "num_workers=0",
                                                      "progress=false"]))


def test_bit_flip_in_scores_stops_evaluate_and_train_naming_the_shard(bench, record_fault, tmp_path):
    """End to end: a flipped bit in the cached scores of a training shard stops ``vlpl evaluate`` and
    ``vlpl train`` with an error naming that shard (it never becomes silently different training data)."""
    from vlpl.store.store import ScoreStore

    n = trials(1, 5)
    rng = random.Random(SEED + 4)
    train_shards = sorted({int(r) // SHARD_SIZE for r in ScoreStore(bench.ref).split("train").rows})
    ok = lost = 0
    failures: List[str] = []
    for t in range(n):
        store = bench.copy_ref()
        shard = store / "shards" / f"part-{rng.choice(train_shards):05d}.parquet"
        pos = _flip_in_scores(shard, rng)
        outcome = {}
        for stage, run in (("evaluate", _evaluate_store), ("train", _train_on)):
            try:
                run(store, tmp_path / f"{stage}{t}")
                outcome[stage] = "ran on (undetected)"
            except Exception as e:  # noqa: BLE001 - the error is the outcome under test
                outcome[stage] = "stopped naming the shard" if shard.name in str(e) else f"unnamed: {e}"
        if all(v == "stopped naming the shard" for v in outcome.values()):
            ok += 1
        else:
            lost += any(v.startswith("ran on") for v in outcome.values())
            failures.append(f"trial {t} ({shard.name} byte {pos}): {outcome}")
    record_fault("store", "1-bit flip in a training shard's scores: evaluate and train", n, ok, lost,
                 f"vlpl evaluate (store mode) and vlpl train on the flipped store both stop with an error naming the "
                 f"shard; seed {SEED + 4}")
    assert not failures, "\n".join(failures)


def test_bit_flip_in_the_manifest_is_detected(bench, record_fault):
    n = trials(3, 20)
    rng = random.Random(SEED + 3)
    ref_manifest = json.loads((bench.ref / "manifest.json").read_text())
    ok = lost = 0
    outcomes: Dict[str, int] = {}
    failures: List[str] = []
    for t in range(n):
        store = bench.copy_ref()
        pos, bit = _flip(store / "manifest.json", rng)
        label = f"trial {t} (manifest.json byte {pos} bit {bit})"
        try:
            same = json.loads((store / "manifest.json").read_text()) == ref_manifest
        except ValueError:
            same = False
        try:
            _read_everything(store)
            read = "read identical content" if same else "READ A CHANGED MANIFEST"
        except Exception as e:  # noqa: BLE001
            read = "detected on read" if "manifest.json" in str(e) else f"read failed unnamed: {e}"
        try:
            _run_inprocess(bench.data, store)
            diff = store_diff(store, bench.ref)
            resume = "resume rebuilt it" if not diff else f"RESUME LEFT {diff}"
        except Exception as e:  # noqa: BLE001
            resume = "resume refused" if "manifest.json" in str(e) else f"resume failed unnamed: {e}"
        outcomes[read] = outcomes.get(read, 0) + 1
        outcomes[resume] = outcomes.get(resume, 0) + 1
        good_read = read in ("detected on read", "read identical content")
        good_resume = resume in ("resume rebuilt it", "resume refused")
        if good_read and good_resume:
            ok += 1
        else:
            lost += int(read == "READ A CHANGED MANIFEST" or resume.startswith("RESUME LEFT"))
            failures.append(f"{label}: {read}; {resume}")
    record_fault("store", "1-bit flip in manifest.json: read, then resume", n, ok, lost,
                 "; ".join(f"{v} {k}" for k, v in sorted(outcomes.items())) + f"; seed {SEED + 3}")
    assert not failures, "\n".join(failures)
