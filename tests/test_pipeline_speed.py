"""The pseudolabel pipeline off the main loop: the background shard writer (bounded queue, errors raised in
the loop naming the shard, kill inside a write then resume) and the device JPEG decode option."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_subset_dataset

from vlpl.config import ConfigError, PseudolabelConfig, load_config
from vlpl.pseudolabel.stage import run_pseudolabel
from vlpl.store.async_writer import THREAD_NAME, BackgroundWriter, ScoredBatch, ShardAssembler
from vlpl.store.store import ScoreStore, StoreError, StoreWriter

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "models" / "tiny.yaml")


def _cfg(data: Path, out: Path, *extra: str) -> PseudolabelConfig:
    return load_config(PseudolabelConfig, [TINY], [f"data.root={data}", f"out={out}", "shard_size=8",
                                                    "batch_size=4", "num_workers=0", "progress=false",
                                                    "views.grid=2", "index=false", *extra])


def _store_files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("config.yaml", ".lock")}


@pytest.fixture(scope="module")
def mini(coco256_root, tmp_path_factory):
    """22 coco256 train images plus a corrupt and a truncated JPEG: 24 rows, 3 shards of 8."""
    first = next(r for r in csv.DictReader(open(coco256_root / "labels.csv")) if r["split"] == "train")
    data = (coco256_root / first["image"]).read_bytes()
    return make_subset_dataset(coco256_root, tmp_path_factory.mktemp("mini"), n_train=22, bad=[
        (3, "corrupt.jpg", b"this is not a jpeg" * 10, "train", "person"),
        (12, "truncated.jpg", data[: len(data) // 3], "train", "person|dog")])


@pytest.fixture(scope="module")
def inline_store(mini, tmp_path_factory):
    out = tmp_path_factory.mktemp("inline") / "s"
    stats: dict = {}
    run_pseudolabel(_cfg(mini, out, "writer=inline"), stats=stats)
    assert stats["writer"] == "inline" and stats["images"] == 24
    return out


def _no_writer_thread() -> bool:
    return not any(t.name == THREAD_NAME for t in threading.enumerate())


def test_background_writer_store_is_byte_identical_to_inline(mini, inline_store, tmp_path):
    stats: dict = {}
    # writer_queue=1: the loop is throttled by the writer (back-pressure) and still writes the same bytes
    run_pseudolabel(_cfg(mini, tmp_path / "bg", "writer=background", "writer_queue=1"), stats=stats)
    assert stats["writer"] == "background" and stats["max_pending"] == 1 and stats["max_queued"] <= 1
    assert 0.0 <= stats["stall_share"] <= 1.0
    a, b = _store_files(inline_store), _store_files(tmp_path / "bg")
    assert a.keys() == b.keys() and len([k for k in a if k.endswith(".parquet")]) == 3
    assert a == b
    assert ScoreStore(tmp_path / "bg").manifest["num_failed"] == 2
    assert _no_writer_thread()


def test_writer_error_is_raised_in_the_loop_naming_the_shard(mini, inline_store, tmp_path, monkeypatch):
    real = StoreWriter.write_shard
    threads = []

    def failing(self, i, rows):
        threads.append(threading.current_thread().name)
        if i == 1:
            raise OSError(28, "No space left on device (injected)")
        return real(self, i, rows)

    monkeypatch.setattr(StoreWriter, "write_shard", failing)
    out = tmp_path / "s"
    with pytest.raises(StoreError, match=r"shard 1 \(part-00001\).*OSError.*No space left"):
        run_pseudolabel(_cfg(mini, out))
    assert threads and set(threads) == {THREAD_NAME}  # the writes ran on the writer thread
    assert _no_writer_thread()  # joined before the store lock was given back
    assert (out / "shards" / "part-00000.json").exists() and not (out / "shards" / "part-00001.json").exists()
    monkeypatch.setattr(StoreWriter, "write_shard", real)
    run_pseudolabel(_cfg(mini, out))  # lock released; the same command completes the store
    assert _store_files(out) == _store_files(inline_store)


class _SlowAssembler(ShardAssembler):
    """An assembler whose every batch takes ``delay`` seconds; records what it saw."""

    def __init__(self, delay: float, fail_on: int = -1) -> None:
        super().__init__({0: range(100)}, {"x": ((1,), np.float32)}, encode=lambda p: {"x": p},
                         write=lambda s, b: None)
        self.delay, self.fail_on, self.seen = delay, fail_on, []

    def add(self, batch: ScoredBatch) -> None:
        time.sleep(self.delay)
        if batch.rows[0] == self.fail_on:
            self.current = 0
            raise ValueError("bad batch (injected)")
        self.seen.append(batch.rows[0])


def test_background_writer_back_pressure_and_order():
    asm = _SlowAssembler(0.02)
    w = BackgroundWriter(asm, max_pending=2)
    t0 = time.perf_counter()
    with w:
        for k in range(10):
            w.submit(ScoredBatch(rows=[k], good=[]))
            assert w._queue.qsize() <= 2
    # 10 batches of 20 ms through a queue of 2: the loop was held back, and waited for the rest at close
    assert time.perf_counter() - t0 >= 0.19 and w.wait_s >= 0.1
    assert asm.seen == list(range(10)) and w.max_seen <= 2
    assert _no_writer_thread()


def test_background_writer_error_reaches_the_next_submit():
    w = BackgroundWriter(_SlowAssembler(0.0, fail_on=2), max_pending=1)
    with pytest.raises(StoreError, match=r"shard 0 \(part-00000\): ValueError: bad batch"):
        with w:
            for k in range(50):
                w.submit(ScoredBatch(rows=[k], good=[]))
                time.sleep(0.005)
    assert _no_writer_thread()


def test_pipeline_settings_are_checked(mini, tmp_path):
    for key, value in (("writer", "async"), ("decode", "gpu"), ("writer_queue", "-1")):
        with pytest.raises(ConfigError, match=key):
            run_pseudolabel(_cfg(mini, tmp_path / key, f"{key}={value}"))


KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys, threading
    import vlpl.store.store as st

    real = st.write_parquet
    def write_parquet(table, path):
        real(table, path)  # the shard's temporary file is complete but not renamed, no completion mark
        if threading.current_thread().name == "vlpl-store-writer" and "part-00001" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
    st.write_parquet = write_parquet
    from vlpl.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_kill_inside_the_background_writer_resumes_byte_identical(mini, inline_store, tmp_path):
    out = tmp_path / "killed"
    args = ["pseudolabel", "--config", TINY, f"data.root={mini}", f"out={out}", "shard_size=8", "batch_size=4",
            "num_workers=0", "progress=false", "views.grid=2", "index=false", "writer=background"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", KILL_DRIVER, *args], env=env, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    shards = out / "shards"
    assert (shards / "part-00000.json").exists() and not (shards / "part-00001.json").exists()
    assert not (shards / "part-00001.parquet").exists()
    assert list(shards.glob(".part-00001.parquet.*")), "the kill should leave shard 1's temporary file"
    mtime = (shards / "part-00000.parquet").stat().st_mtime_ns
    stats: dict = {}
    run_pseudolabel(_cfg(mini, out), stats=stats)
    assert stats["images"] == 16  # shard 0 was kept, shards 1 and 2 redone
    assert (shards / "part-00000.parquet").stat().st_mtime_ns == mtime
    assert _store_files(out) == _store_files(inline_store)
