"""The store's read API (ScoreStore / SplitReader), ViewSpec (the one owner of the view layout), the writer
lock, write errors, stale temp files, and resume checks that run before anything is written."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TEACHER, make_subset_dataset

from vlpl.store.store import ScoreStore, SplitReader, StoreError, StoreWriter
from vlpl.store.views import ViewSpec

REPO = Path(__file__).resolve().parent.parent
ALL_COLUMNS = ("sample_id", "image", "split", "observed", "labels", "scores", "status", "error")


# --------------------------------------------------------------------------------------------------
# ViewSpec
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flips", [False, True])
@pytest.mark.parametrize("grid", [0, 1, 2, 3, 4, 5])
def test_viewspec_layout_round_trips(grid, flips):
    spec = ViewSpec(grid, flips, (8, 8))
    nvar, nview = (2 if flips else 1), 1 + grid * grid
    assert (spec.n_variants, spec.n_views, spec.num_views) == (nvar, nview, nvar * nview)
    names = spec.names()
    assert len(names) == spec.num_views == len(set(names))
    # every flat index: its name, its (variant, view), its tile, its flipped twin
    for v, name in enumerate(names):
        variant, view = spec.unravel(v)
        assert spec.index(view, variant) == v == variant * nview + view
        base = name.removeprefix("flip/")
        assert name.startswith("flip/") == (variant == 1)
        if view == 0:
            assert base == "global" and spec.global_index(variant) == v
        else:
            i, j = spec.tile_of(view)
            assert base == f"tile_{i}_{j}" and spec.tile_index(i, j, variant) == v
        if flips:
            w = spec.flipped(v)
            assert names[w] == (base if variant else f"flip/{base}") and spec.flipped(w) == v
    # reshapes: value = flat index, so split_variants must put v at [variant, view]
    n, c = 3, 4
    flat = np.broadcast_to(np.arange(spec.num_views)[None, :, None], (n, spec.num_views, c)).copy()
    split = spec.split_variants(flat)
    assert split.shape == (n, nvar, nview, c)
    for variant in range(nvar):
        for view in range(nview):
            assert (split[:, variant, view] == spec.index(view, variant)).all()
    assert np.array_equal(spec.flatten(split), flat)
    # the manifest entry round-trips, and a manifest that disagrees with itself is refused
    assert ViewSpec.from_manifest({"views": spec.to_dict()}) == spec
    assert ViewSpec.from_manifest(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="n_views"):
        ViewSpec.from_manifest({"views": {**spec.to_dict(), "n_views": nview + 1}})
    with pytest.raises(ValueError, match=r"expected scores of shape \(N, V="):
        spec.split_variants(np.zeros((2, spec.num_views + 1, c)))


def test_store_readers_are_torch_free():
    """Readers of a store (inspect, export, config checks) import the layout and the reader without torch."""
    code = ("import sys, vlpl.store.store, vlpl.store.views, vlpl.store.inspect; "
            "print(sorted(m for m in ('torch', 'open_clip', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


def test_viewspec_index_errors():
    spec = ViewSpec(2, False, (8, 8))
    with pytest.raises(IndexError, match="tile"):
        spec.tile_index(2, 0)
    with pytest.raises(IndexError, match="variant"):
        spec.index(0, 1)
    with pytest.raises(ValueError, match="no flipped views"):
        spec.flipped(0)


@pytest.mark.parametrize("grid", [0, 1, 2, 3, 4, 5])
def test_viewspec_matches_the_view_builder(grid):
    """Store order = the order make_views builds: view [variant, view] of split_variants is the global
    resize / tile (i, j) crop, mirrored for variant 1."""
    import torch

    from vlpl.vlm.views import _resize, make_views, tile_boxes

    spec = ViewSpec(grid, True, (6, 6), "squash", "bilinear")
    g = torch.Generator().manual_seed(grid)
    img = torch.randint(0, 256, (3, 23, 31), generator=g, dtype=torch.uint8)
    views = make_views(img, spec, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # identity normalise
    per = spec.split_variants(views.reshape(1, spec.num_views, -1))[0]  # (variants, views, 3*6*6)
    f = img.float()[None]
    expect = [_resize(f, (6, 6), "squash", "bilinear")[0]]
    expect += [_resize(f[..., t:b, le:r], (6, 6), "squash", "bilinear")[0] for t, le, b, r in tile_boxes(23, 31, grid)] \
        if grid else []
    for view, e in enumerate(expect):
        assert torch.allclose(per[0, view].view(3, 6, 6), e, atol=1e-3)
        assert torch.allclose(per[1, view].view(3, 6, 6), e.flip(-1), atol=1e-3)
        assert torch.equal(views[spec.index(view, 1)], views[spec.flipped(spec.index(view, 0))])


# --------------------------------------------------------------------------------------------------
# batch readers on a real store
# --------------------------------------------------------------------------------------------------


def test_split_readers_equal_the_dense_arrays(coco256_store, coco256_root):
    import csv

    store = ScoreStore(coco256_store)
    dense = store.arrays(ALL_COLUMNS)
    C, spec = store.num_classes, store.view_spec
    assert (spec.grid, spec.n_variants, spec.n_views, spec.num_views) == (2, 2, 5, 10)
    # split counts: every row usable (coco256 has no bad image); the folder reader carves val out of train
    in_file = {}
    for r in csv.DictReader(open(coco256_root / "labels.csv")):
        in_file[r["split"]] = in_file.get(r["split"], 0) + 1
    want = store.splits()
    assert want == {s: int((dense["split"] == s).sum()) for s in ("train", "val", "test")}
    assert want["train"] + want["val"] == in_file["train"] and want["test"] == in_file["test"]
    assert sum(want.values()) == store.num_rows == 256
    assert store.dataset_info["root"] == str(coco256_root.resolve())
    assert store.text_embeddings().shape == (C, store.embedding_dim)
    rng = np.random.default_rng(0)
    for name in want:
        sp = store.split(name)
        rows = np.nonzero((dense["split"] == name) & (dense["status"] == "ok"))[0]
        assert np.array_equal(sp.rows, rows) and len(sp) == len(rows)
        assert sp.sample_ids == list(dense["sample_id"][rows]) and sp.images == list(dense["image"][rows])
        assert sp.observed.dtype == np.int8 and np.array_equal(sp.observed, dense["observed"][rows])
        assert sp.labels is not None and np.array_equal(sp.labels, dense["labels"][rows]) and sp.labels_known.all()
        # random positions, in any order: the (N, V, C) rows reshaped variant-major by hand
        idx = rng.permutation(len(sp))[:50]
        by_hand = dense["scores"][rows[idx]].astype(np.float32).reshape(len(idx), 2, 5, C)
        got = sp.scores(idx)
        assert got.dtype == np.float32 and got.shape == (len(idx), 2, 5, C)
        assert np.array_equal(got, by_hand)
        # streamed in batches: the whole split, in order
        parts = list(sp.iter_scores(37))
        assert [len(p) for p, _ in parts][:-1] == [37] * (len(parts) - 1)
        assert np.array_equal(np.concatenate([p for p, _ in parts]), np.arange(len(sp)))
        assert np.array_equal(np.concatenate([s for _, s in parts]),
                              dense["scores"][rows].astype(np.float32).reshape(len(rows), 2, 5, C))
    with pytest.raises(IndexError, match="positions must be in"):
        store.split("train").scores([10**6])
    assert len(store.split("no-such-split")) == 0


def test_reader_cache_is_bounded(coco256_store):
    """A tiny cache still returns the right scores and never holds more than one row group over budget."""
    big = ScoreStore(coco256_store)
    small = ScoreStore(coco256_store, cache_bytes=1, sidecars=False)  # the row-group cache path
    sp_big, sp_small = big.split("train"), small.split("train")
    group_bytes = 256 * 10 * small.num_classes * 2  # at most one row group of float16 scores
    for idx in (np.arange(len(sp_small))[::-7], np.arange(len(sp_small))):
        assert np.array_equal(sp_small.scores(idx), sp_big.scores(idx))
        assert small._cache.nbytes <= group_bytes and len(small._cache.items) == 1
    # a streamed pass keeps its own few row groups, not the random-access cache
    fresh = ScoreStore(coco256_store)
    assert sum(len(p) for p, _ in fresh.split("train").iter_scores(16)) == len(sp_big)
    assert fresh._cache.nbytes == 0


@pytest.fixture(scope="module")
def failed_store(coco256_root, tmp_path_factory) -> Path:
    """8 train + 4 test images and 2 bad files, in 4-row shards (several shards and row groups)."""
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel

    data = make_subset_dataset(coco256_root, tmp_path_factory.mktemp("fdata"), 8, 4, bad=[
        (2, "bad1.jpg", b"not an image" * 5, "train", "person"),
        (11, "bad2.jpg", b"", "test", "dog")])
    out = tmp_path_factory.mktemp("fstore") / "store"
    run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], [
        f"data.root={data}", f"out={out}", "shard_size=4", "num_workers=0", "progress=false", "views.grid=1",
        "data.val_fraction=0", "max_failed_fraction=0.5"]))
    return out


def test_failed_rows_are_never_returned(failed_store):
    store = ScoreStore(failed_store)
    assert store.splits() == {"train": 8, "test": 4}
    assert store.split_counts() == {"train": {"total": 9, "failed": 1}, "test": {"total": 5, "failed": 1}}
    fails = store.failures()
    assert [(f["split"], Path(f["image"]).name) for f in fails] == [("train", "bad1.jpg"), ("test", "bad2.jpg")]
    assert all(Path(f["image"]).name in f["error"] for f in fails)
    dense = store.arrays(("sample_id", "status", "scores"))
    for name in ("train", "test"):
        sp = store.split(name)
        assert not any("bad" in s for s in sp.sample_ids) and sp.ok.all()
        s = sp.scores(np.arange(len(sp)))
        assert np.isfinite(s).all()
        assert np.array_equal(s, dense["scores"][sp.rows].reshape(len(sp), 2, 2, -1))
        every = store.split(name, include_failed=True)
        assert len(every) == len(sp) + 1 and (~every.ok).sum() == 1
        bad = np.nonzero(~every.ok)[0]
        assert np.isnan(every.scores(bad)).all() and np.isfinite(every.scores(np.nonzero(every.ok)[0])).all()
    assert store.verify()["shards"] == 4


# --------------------------------------------------------------------------------------------------
# integrity
# --------------------------------------------------------------------------------------------------


def _copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval", ".lock"))
    return dst


def test_manifest_checksum_names_the_manifest(failed_store, tmp_path):
    root = _copy_store(failed_store, tmp_path / "s")
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    assert len(m["manifest_sha256"]) == 64
    m["num_failed"] = 0  # a valid JSON edit that changes the meaning
    path.write_text(json.dumps(m, indent=2))
    with pytest.raises(StoreError, match=r"manifest\.json: checksum mismatch"):
        ScoreStore(root)
    del m["manifest_sha256"]
    path.write_text(json.dumps(m, indent=2))
    with pytest.raises(StoreError, match="manifest_sha256' is missing"):
        ScoreStore(root)


def test_verify_names_a_changed_shard(failed_store, tmp_path):
    root = _copy_store(failed_store, tmp_path / "s")
    shard = root / "shards" / "part-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"part-00002\.parquet: sha256 .* does not match") as e:
        ScoreStore(root).verify()
    assert "part-00001" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# the writer lock
# --------------------------------------------------------------------------------------------------

_HOLDER = textwrap.dedent("""
    import sys, time
    from vlpl.store.lock import StoreLock
    lk = StoreLock(sys.argv[1]).acquire()
    if len(sys.argv) > 2:  # pretend to be another (dead) pid
        import os
        os.ftruncate(lk._fd, 0); os.lseek(lk._fd, 0, 0)
        os.write(lk._fd, ('{"host": "%s", "pid": %s, "since": "then"}' % (sys.argv[2], sys.argv[3])).encode())
    print("locked", flush=True)
    time.sleep(60)
""")


def _holder(root: Path, *fake: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root), *fake], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_writer_fails_at_once_naming_the_owner(tmp_path):
    root = tmp_path / "store"
    holder = _holder(root)
    try:
        with pytest.raises(StoreError) as e:
            StoreWriter(root).prepare({"schema_version": 2}, ["a"], np.zeros((1, 2), np.float32))
        msg = str(e.value)
        assert f"store {root} is being written by pid {holder.pid} on host {socket.gethostname()} since " in msg
        assert not (root / "manifest.json").exists() and not (root / "classes.txt").exists()
    finally:
        holder.kill()
        holder.wait()
    # the owner is gone: its flock went with it; the next writer reports the stale lock and takes over
    w = StoreWriter(root)
    lk = w.lock()
    assert lk.taken_over is not None and lk.taken_over["pid"] == holder.pid
    assert json.loads((root / ".lock").read_text())["pid"] == os.getpid()
    w.close()
    assert not (root / ".lock").exists()


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, caplog):
    """A lock file naming a dead pid on this host is taken over, even while some orphan still holds the
    flock on it (a forked child that outlived its parent)."""
    root = tmp_path / "store"
    dead = _dead_pid()
    orphan = _holder(root, socket.gethostname(), str(dead))
    try:
        with caplog.at_level("WARNING", logger="vlpl.store.lock"):
            lk = StoreWriter(root).lock()
        assert lk.taken_over == {"host": socket.gethostname(), "pid": dead, "since": "then"}
        assert f"pid {dead}" in caplog.text and "taking it over" in caplog.text
        assert json.loads((root / ".lock").read_text())["pid"] == os.getpid()
        lk.release()
    finally:
        orphan.kill()
        orphan.wait()
    # a live owner on another host is never taken over
    other = _holder(root, "some-other-host", str(os.getpid()))
    try:
        with pytest.raises(StoreError, match=f"being written by pid {os.getpid()} on host some-other-host"):
            StoreWriter(root).lock()
    finally:
        other.kill()
        other.wait()


# --------------------------------------------------------------------------------------------------
# write errors, temp files, resume checks
# --------------------------------------------------------------------------------------------------


def _rows(n: int = 5, c: int = 3, v: int = 2, d: int = 4):
    from vlpl.store.store import ShardRows

    rng = np.random.default_rng(1)
    return ShardRows([f"s{i}" for i in range(n)], [f"i{i}.jpg" for i in range(n)], ["train"] * n,
                     np.zeros((n, c), np.int8), np.ones((n, c), np.int8), np.ones(n, bool),
                     rng.random((n, v, c)).astype(np.float16), rng.random((n, d)).astype(np.float16),
                     np.ones(n, bool), [None] * n)


@pytest.mark.parametrize("err,cause", [(errno.ENOSPC, "no space left on device"), (errno.EACCES, "permission denied"),
                                       (errno.EROFS, "read-only file system")])
def test_write_errors_name_the_file_and_leave_no_temp(tmp_path, monkeypatch, err, cause):
    import pyarrow.parquet as pq

    w = StoreWriter(tmp_path / "store")
    w.shard_dir.mkdir(parents=True)
    real = pq.write_table

    def failing(table, where, **kw):  # write part of the file, then fail as the OS would
        real(table, where, **kw)
        with open(where, "r+b") as f:
            f.truncate(12_300_000 // 1000)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(pq, "write_table", failing)
    with pytest.raises(StoreError) as e:
        w.write_shard(3, _rows())
    msg = str(e.value)
    path = w.shard_dir / "part-00003.parquet"
    assert msg.startswith(f"{cause} writing {path} (12.3 kB written, ")
    assert "re-run the same command: completed shards are kept" in msg
    assert list(w.shard_dir.iterdir()) == []  # no temp file, no shard, no mark


def test_restart_removes_orphan_temp_files(tmp_path):
    root = tmp_path / "store"
    (root / "shards").mkdir(parents=True)
    orphans = [root / "shards" / ".part-00001.parquet.abc123.tmp", root / ".manifest.json.x1.tmp",
               root / "shards" / ".part-00000.json.q.tmp"]
    for p in orphans:
        p.write_bytes(b"half")
    keep = root / "shards" / "notes.tmp"  # not one of ours (no leading dot)
    keep.write_bytes(b"x")
    w = StoreWriter(root)
    w.prepare({"schema_version": 2}, ["a", "b"], np.zeros((2, 4), np.float32))
    assert not any(p.exists() for p in orphans) and keep.exists()
    assert (root / ".lock").exists()
    w.close()


def test_resume_with_another_config_changes_nothing(failed_store, tmp_path):
    """A resume whose identity differs fails before any file is written, and says what differs."""
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel

    root = _copy_store(failed_store, tmp_path / "s")
    data = json.loads((root / "manifest.json").read_text())["dataset"]["root"]
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.iterdir() if p.is_file()}
    cfg = load_config(PseudolabelConfig, [TINY_TEACHER], [
        f"data.root={data}", f"out={root}", "shard_size=4", "num_workers=0", "progress=false", "views.grid=2",
        "data.val_fraction=0", "max_failed_fraction=0.5"])
    with pytest.raises(StoreError) as e:
        run_pseudolabel(cfg)
    msg = str(e.value)
    assert "different views" in msg and "views.grid: store has 1, run has 2" in msg and "Nothing was changed" in msg
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.iterdir() if p.is_file()}
    assert after == before  # config.yaml, classes.txt, text_embeddings.npy, manifest.json untouched; no .lock left


def test_inspect_streams_and_matches_dense_statistics(failed_store, monkeypatch):
    from vlpl.store.inspect import format_summary, summarize

    store = ScoreStore(failed_store)
    a = store.arrays(("sample_id", "status", "observed", "labels", "scores"))
    ok = a["status"] == "ok"
    s = a["scores"][ok].astype(np.float64).reshape(int(ok.sum()), 2, 2, -1)
    monkeypatch.setattr(ScoreStore, "arrays", lambda *a, **k: pytest.fail("inspect read the whole store"))
    for name in ("observed", "labels"):  # labels are read per batch too, not as whole (N, C) arrays
        monkeypatch.setattr(SplitReader, name, property(lambda self: pytest.fail("inspect loaded a split's labels")))
    out = summarize(failed_store, batch_size=3, verify_shards=True)
    sc = out["scores"]
    for key, x in (("all_views", s), ("global_view", s[:, 0, 0]), ("tiles", s[:, :, 1:])):
        assert sc[key]["mean"] == pytest.approx(x.mean()) and sc[key]["std"] == pytest.approx(x.std())
        assert (sc[key]["min"], sc[key]["max"]) == (x.min(), x.max())
    assert sc["flip_consistency"] == pytest.approx(np.corrcoef(s[:, 0].ravel(), s[:, 1].ravel())[0, 1])
    top1 = np.bincount(s[:, 0, 0].argmax(1), minlength=s.shape[-1])
    assert sc["most_frequent_top1"][0][1] == top1.max()
    assert out["observed"]["positives_per_image"] == pytest.approx((a["observed"][ok] == 1).sum(1).mean())
    assert out["labels"]["known_rows"] == 12
    assert [f["sample_id"] for f in out["failed_rows"]] == list(a["sample_id"][~ok])
    text = format_summary(out)
    assert "verified   4 shards" in text and "FAILED     row 2" in text


def test_reads_never_hash_whole_shards(coco256_store, monkeypatch):
    """The full sha256 is for resume (by the shard's writer) and verify(); every process reading the store
    only checks page CRCs, so 8 readers do not hash the store 8 times."""
    import vlpl.store.store as S

    calls = []
    monkeypatch.setattr(S, "sha256_file", lambda p: calls.append(p) or "x")
    store = ScoreStore(coco256_store)
    for name in store.splits():
        sp = store.split(name)
        sp.scores(np.arange(len(sp))[::3])
        sum(len(p) for p, _ in sp.iter_scores(64))
    store.failures()
    assert calls == []
    with pytest.raises(StoreError, match="sha256"):
        store.verify()  # on demand it does hash (and here the patched hash cannot match)
    assert len(calls) == len(store.shard_paths())
