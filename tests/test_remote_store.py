"""The score store on an fsspec URL (vlpl/store/fs.py, docs/REMOTE_STORES.md): fsspec's memory and local file
systems stand in for object storage."""
from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from tests.conftest import TINY_TEACHER, make_subset_dataset
from vlpl.config import PseudolabelConfig, load_config
from vlpl.pseudolabel.stage import run_pseudolabel
from vlpl.store import lock as lock_mod
from vlpl.store.fs import PARQUET_MAGIC, RemotePath, store_path
from vlpl.store.lock import RemoteStoreLock, StoreLockedError
from vlpl.store.store import ScoreStore, StoreError, StoreWriter

REPO = Path(__file__).resolve().parent.parent
TINY_NET = str(REPO / "configs" / "models" / "tiny_classifier.yaml")
MEM = fsspec.filesystem("memory")


@pytest.fixture(autouse=True)
def _local_cache(tmp_path, monkeypatch):
    """Sidecars of remote stores go to VLPL_CACHE_DIR (never ~/.cache in tests)."""
    monkeypatch.setenv("VLPL_CACHE_DIR", str(tmp_path / "vlpl-cache"))


@pytest.fixture()
def mem_url():
    """A fresh memory:// store URL, removed afterwards (the memory file system is process-global)."""
    name = f"/vlpl-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name.lstrip('/')}/store"
    if MEM.exists(name):
        MEM.rm(name, recursive=True)


@pytest.fixture(scope="module")
def data(coco256_root, tmp_path_factory):
    return make_subset_dataset(coco256_root, tmp_path_factory.mktemp("remote-data"), n_train=20, n_test=8)


@pytest.fixture(scope="module")
def local_store(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("remote-local") / "store"
    run_pseudolabel(_cfg(data, str(out)))
    return out


def _cfg(data: Path, out: str, *extra: str) -> PseudolabelConfig:
    return load_config(PseudolabelConfig, [str(TINY_TEACHER)], [
        f"data.root={data}", f"out={out}", "shard_size=8", "batch_size=4", "num_workers=0", "progress=false",
        "views.grid=2", *extra])


def _local_files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "config.yaml" and "cache" not in p.relative_to(root).parts}


def _mem_files(url: str) -> dict:
    root = RemotePath.from_url(url)
    return {p[len(root.path) + 1:]: bytes(MEM.cat_file(p)) for p in sorted(MEM.find(root.path))
            if not p.endswith("config.yaml")}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_memory_store_is_the_local_store_and_trains_and_evaluates(data, local_store, mem_url, tmp_path, capsys):
    from vlpl.config import EvaluateConfig
    from vlpl.eval.stage import run_evaluate
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    run_pseudolabel(_cfg(data, mem_url))
    remote, local = _mem_files(mem_url), _local_files(local_store)
    # the same store bytes: manifest, every shard and mark, classes, text embeddings, the FAISS index
    assert sorted(remote) == sorted(local)
    assert {k: _sha(v) for k, v in remote.items()} == {k: _sha(v) for k, v in local.items()}
    assert ".lock" not in remote and "manifest.json" in remote and "shards/part-00003.parquet" in remote

    store = ScoreStore.open(mem_url)
    assert isinstance(store.root, RemotePath) and store.verify()["shards"] == 4
    # the CLI's store check looks at the URL (not a local path), and `vlpl inspect --verify URL` reads it
    from vlpl.cli import _check_store, main
    from vlpl.config import ConfigError

    _check_store("store", mem_url, ensembles=True)
    with pytest.raises(ConfigError, match="no manifest.json there"):
        _check_store("store", mem_url + "-missing")
    assert main(["inspect", "--verify", mem_url]) == 0
    assert "every sha256 and page checksum matches" in capsys.readouterr().out
    ref = ScoreStore.open(local_store)
    tr, tr_ref = store.split("train"), ref.split("train")
    np.testing.assert_array_equal(tr.scores(np.arange(len(tr))), tr_ref.scores(np.arange(len(tr_ref))))
    np.testing.assert_array_equal(tr.observed, tr_ref.observed)
    assert list(tr.images) == list(tr_ref.images) and tr.images[0].startswith("images/")  # relative to data root
    # the memory-mapped sidecars are built locally (VLPL_CACHE_DIR), nothing is written into the store
    assert store.cache_dir is not None and str(store.cache_dir).startswith(str(tmp_path / "vlpl-cache"))
    assert any(store.cache_dir.glob("part-00000.scores*.npy"))
    assert not MEM.exists(RemotePath.from_url(mem_url).path + "/cache")

    run = tmp_path / "run"
    run_train(load_train_config([TINY_NET], [f"store={mem_url}", f"out={run}", "progress=false", "epochs=1",
                                             "max_steps_per_epoch=1", "batch_size=8", "val_split=test",
                                             "method=an"]))
    assert (run / "summary.json").exists() and (run / "best" / "model.safetensors").exists()
    ev = run_evaluate(load_config(EvaluateConfig, [], [f"store={mem_url}", f"out={tmp_path / 'ev'}",
                                                       "plots=false"]))
    ev_local = run_evaluate(load_config(EvaluateConfig, [], [f"store={local_store}", f"out={tmp_path / 'ev2'}",
                                                             "plots=false"]))
    rep, rep_local = (json.loads((p / "report.json").read_text()) for p in (ev, ev_local))
    assert rep["headline"] == rep_local["headline"] and len(rep["headline"]) > 1


def _interrupt_after(monkeypatch, n: int) -> list:
    """StoreWriter.write_shard raises after n shards (a crash between shards); returns the shards written."""
    written: list = []
    orig = StoreWriter.write_shard

    def write_shard(self, i, rows):
        if len(written) >= n:
            raise RuntimeError("injected crash")
        out = orig(self, i, rows)
        written.append(i)
        return out

    monkeypatch.setattr(StoreWriter, "write_shard", write_shard)
    return written


def test_interrupted_remote_run_resumes_by_listing(data, local_store, mem_url, monkeypatch, caplog):
    written = _interrupt_after(monkeypatch, 2)
    with pytest.raises(StoreError, match="failed on shard 2.*injected crash"):
        run_pseudolabel(_cfg(data, mem_url, "writer=inline"))
    assert written == [0, 1]
    root = RemotePath.from_url(mem_url)
    assert not json.loads((root / "manifest.json").read_text())["complete"]
    assert not (root / ".lock").exists()  # the failed run gave its lock object back
    monkeypatch.undo()

    listed = []
    orig_listing = RemotePath.listing

    def listing(self):
        listed.append(self.name)
        return orig_listing(self)

    monkeypatch.setattr(RemotePath, "listing", listing)
    written = _interrupt_after(monkeypatch, 99)
    with caplog.at_level(logging.INFO):
        run_pseudolabel(_cfg(data, mem_url, "writer=inline"))
    assert written == [2, 3]  # the two listed shards were verified and kept
    assert "shards" in listed and "2 of 4 shards of this process are already complete" in caplog.text
    assert {k: _sha(v) for k, v in _mem_files(mem_url).items()} == \
        {k: _sha(v) for k, v in _local_files(local_store).items()}


def test_truncated_shard_object_is_detected_and_rewritten(data, local_store, mem_url, monkeypatch, caplog):
    run_pseudolabel(_cfg(data, mem_url))
    root = RemotePath.from_url(mem_url)
    shard = root / "shards" / "part-00001.parquet"
    whole = shard.read_bytes()
    MEM.pipe_file(shard.path, whole[: len(whole) // 2])  # a partial object (e.g. a copy tool that streamed)
    with pytest.raises(StoreError, match="part-00001.parquet"):
        ScoreStore.open(mem_url).verify()
    # an object with a Parquet footer but other bytes is caught by the sha256 of its mark
    MEM.pipe_file((root / "shards" / "part-00002.parquet").path,
                  b"x" * 100 + (root / "shards" / "part-00002.parquet").read_bytes()[100:])
    written = _interrupt_after(monkeypatch, 99)
    with caplog.at_level(logging.INFO):
        run_pseudolabel(_cfg(data, mem_url, "writer=inline"))
    assert written == [1, 2]
    assert "partial object" in caplog.text and "sha256 does not match" in caplog.text
    assert shard.read_bytes() == whole and shard.tail(4) == PARQUET_MAGIC
    assert {k: _sha(v) for k, v in _mem_files(mem_url).items()} == \
        {k: _sha(v) for k, v in _local_files(local_store).items()}


def test_file_url_store(data, local_store, tmp_path):
    from vlpl.cli import main

    out = tmp_path / "fstore"
    url = f"file://{out}"
    assert main(["pseudolabel", "-c", str(TINY_TEACHER), f"data.root={data}", f"out={url}", "shard_size=8",
                 "batch_size=4", "num_workers=0", "progress=false", "views.grid=2"]) == 0
    assert _local_files(out).keys() == _local_files(local_store).keys()
    assert all(_sha(v) == _sha(_local_files(local_store)[k]) for k, v in _local_files(out).items())
    assert not (out / ".lock").exists() and not (out / "cache").exists()
    # a temporary left by a killed upload (file:// writes a temporary name, then renames) is cleared on resume
    stale = out / "shards" / ".part-00000.parquet.dead.tmp"
    stale.write_bytes(b"half")
    run_pseudolabel(_cfg(data, url))
    assert not stale.exists()
    store = ScoreStore.open(url)
    assert isinstance(store.root, RemotePath) and store.num_rows == 28 and store.verify()["ok"]


def _foreign_lock(root: RemotePath, heartbeat: float, token: str = "other") -> None:
    """The lock object another process (pid 4121 on host gpu07) would write."""
    (root / ".lock").parent.mkdir(exist_ok=True)
    MEM.pipe_file((root / ".lock").path, json.dumps({"host": "gpu07", "pid": 4121, "since": "2026-11-30T07:12:03Z",
                                                     "token": token, "heartbeat": heartbeat}).encode())


def test_remote_lock_heartbeat_refusal_takeover(mem_url, data, caplog):
    root = store_path(mem_url)
    clock = [1000.0]
    _foreign_lock(root, heartbeat=970.0)  # a live owner (heartbeat 30 s old): refused, naming it
    with pytest.raises(StoreLockedError, match=r"being written by pid 4121 on host gpu07 .* heartbeat 30s ago"):
        RemoteStoreLock(root, ttl=60, clock=lambda: clock[0]).acquire()
    # a pseudolabel run is refused before it writes anything (real clock: the heartbeat is "now")
    import time

    _foreign_lock(root, heartbeat=time.time())
    with pytest.raises(StoreError, match="being written by pid 4121 on host gpu07"):
        run_pseudolabel(_cfg(data, mem_url))
    assert not (root / "manifest.json").exists()
    _foreign_lock(root, heartbeat=900.0)  # no heartbeat for longer than the ttl: stale, taken over with a warning
    a = RemoteStoreLock(root, ttl=60, clock=lambda: clock[0])
    try:
        with caplog.at_level(logging.WARNING):
            a.acquire()
        assert "stale lock" in caplog.text and a.taken_over["pid"] == 4121
        info = json.loads((root / ".lock").read_text())
        assert info["token"] == a.token and info["heartbeat"] == 1000.0 and info["pid"] > 0
        a.check()
        _foreign_lock(root, heartbeat=1000.0, token="newer")  # a's run stalled past the ttl and was taken over
        with pytest.raises(StoreLockedError, match="now belongs to pid 4121"):
            a.check()  # the writer that stalled stops at its next shard
        a.release()
        assert json.loads((root / ".lock").read_text())["token"] == "newer"  # the new owner's object is kept
    finally:
        a.release()


def test_remote_lock_heartbeat_thread_renews(mem_url):
    import time

    root = store_path(mem_url)
    lk = RemoteStoreLock(root, ttl=0.4).acquire()
    try:
        first = json.loads((root / ".lock").read_text())["heartbeat"]
        deadline = time.time() + 5
        while json.loads((root / ".lock").read_text())["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads((root / ".lock").read_text())["heartbeat"] > first
        lk.check()
    finally:
        lk.release()
    assert str(root) not in lock_mod._HELD


def test_store_path_local_and_collapsed_urls(local_store, tmp_path):
    assert store_path(tmp_path) == tmp_path and isinstance(store_path(str(tmp_path)), Path)
    p = store_path(Path("memory://bkt/s"))  # Path() collapsed the URL's //: recovered
    assert isinstance(p, RemotePath) and p.path == "/bkt/s" and str(p / "x.json") == "memory:///bkt/s/x.json"
    f = store_path(Path(f"file://{local_store}"))
    assert isinstance(f, RemotePath) and f.path == str(local_store)
    assert ScoreStore.open(Path(f"file://{local_store}")).num_rows == 28
    assert store_path(Path("notaproto:/x")) == Path("notaproto:/x")  # not an fsspec protocol: a local path


def test_remote_store_refuses_another_identity_and_overwrites(data, mem_url):
    run_pseudolabel(_cfg(data, mem_url, "shard_size=16"))
    root = RemotePath.from_url(mem_url)
    before = _mem_files(mem_url)
    with pytest.raises(StoreError, match="different views.*Nothing was changed"):
        run_pseudolabel(_cfg(data, mem_url, "shard_size=16", "views.grid=1"))
    assert _mem_files(mem_url) == before and not (root / ".lock").exists()
    run_pseudolabel(_cfg(data, mem_url, "shard_size=16", "views.grid=1", "overwrite=true"))
    store = ScoreStore.open(mem_url)
    assert store.view_spec.grid == 1 and store.num_rows == 28 and store.verify()["shards"] == 2
    assert sorted(MEM.ls((root / "shards").path, detail=False)) == [
        (root / "shards" / f"part-0000{i}.{ext}").path for i in (0, 1) for ext in ("json", "parquet")]


def test_failed_upload_names_the_object_and_leaves_nothing(mem_url, tmp_path, monkeypatch):
    from vlpl.store.atomic import WriteError, atomic_path

    monkeypatch.setenv("VLPL_TMPDIR", str(tmp_path))
    target = RemotePath.from_url(mem_url) / "shards" / "part-00000.parquet"

    def denied(*a, **k):
        raise PermissionError("AccessDenied: s3:PutObject")

    monkeypatch.setattr(type(MEM), "put_file", denied)
    with pytest.raises(WriteError, match=r"PermissionError: AccessDenied.* uploading memory:///.*part-00000\.parquet"
                                         r" \(4 B to send\); re-run"):
        with atomic_path(target, hint="re-run the same command") as tmp:
            tmp.write_bytes(b"PAR1")
    assert not target.exists() and not list(tmp_path.glob(".part-00000*"))  # no object, no local temporary
