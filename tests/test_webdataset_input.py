"""webdataset tar shards as ``vlpl pseudolabel`` input (vlpl/data/webdataset.py; issue 13 item 6).

The tars are built here from coco256 with ``webdataset.TarWriter``, each sample keyed by the folder input's
sample id (``images/<stem>``), so the two stores can be compared row by row.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from tests.conftest import TINY_TEACHER, make_subset_dataset

N_TRAIN, N_TEST = 10, 4


def _rows(folder: Path) -> List[Dict[str, str]]:
    import csv

    return list(csv.DictReader(open(folder / "labels.csv")))


def write_tars(folder: Path, dst: Path, per_shard: int = 4, label_member: str = "json",
               extra: Tuple[Tuple[str, Dict[str, bytes]], ...] = ()) -> Dict[str, str]:
    """Tar shards of a folder dataset: train as ``train-NNNNNN.tar`` (``per_shard`` samples each), test as
    ``test-000000.tar``; ``extra``: (split, sample dict) appended to that split's last shard."""
    import webdataset as wds

    dst.mkdir(parents=True, exist_ok=True)
    rows = _rows(folder)
    patterns = {}
    for split in ("train", "test"):
        mine = [r for r in rows if r["split"] == split]
        chunks = [mine[k:k + per_shard] for k in range(0, len(mine), per_shard)] or [[]]
        for j, chunk in enumerate(chunks):
            with wds.TarWriter(str(dst / f"{split}-{j:06d}.tar")) as w:
                for r in chunk:
                    names = [n for n in r["labels"].split("|") if n]
                    sample = {"__key__": r["image"].rsplit(".", 1)[0], "jpg": (folder / r["image"]).read_bytes()}
                    if label_member == "json":
                        sample["json"] = json.dumps({"labels": names}).encode()
                    elif label_member:
                        sample[label_member] = "\n".join(names).encode()
                    w.write(sample)
                if j == len(chunks) - 1:
                    for s, extra_sample in extra:
                        if s == split:
                            w.write(extra_sample)
        patterns[split] = f"{dst.name}/{split}-{{000000..{len(chunks) - 1:06d}}}.tar"
    return patterns


def _pseudolabel(out: Path, overrides: List[str]) -> Path:
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel

    return run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], [
        f"out={out}", "shard_size=4", "batch_size=4", "num_workers=0", "progress=false", "views.grid=2",
        "index=false", *overrides]))


def _read(store: Path) -> Dict[str, Dict[str, np.ndarray]]:
    """sample id -> scores (variants, views, C), observed, labels, split."""
    from vlpl.store.store import ScoreStore

    st = ScoreStore.open(store)
    out: Dict[str, Dict[str, np.ndarray]] = {}
    for name in st.splits():
        sp = st.split(name)
        pos = np.arange(len(sp))
        scores = np.asarray(sp.scores(pos))
        for k, sid in enumerate(sp.sample_ids):
            out[str(sid)] = {"scores": scores[k], "observed": np.asarray(sp.observed[k]),
                             "labels": np.asarray(sp.labels[k]), "split": name}
    return out


@pytest.fixture(scope="module")
def wds_data(coco256_root, tmp_path_factory) -> Tuple[Path, Dict[str, str]]:
    root = make_subset_dataset(coco256_root, tmp_path_factory.mktemp("wds") / "data", N_TRAIN, N_TEST)
    return root, write_tars(root, root / "shards")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test its own index cache (and none left in memory from another test)."""
    from vlpl.data import webdataset as w

    monkeypatch.setenv("VLPL_CACHE_DIR", str(tmp_path / "cache"))
    w.clear_memory_cache()
    yield
    w.clear_memory_cache()


def test_webdataset_store_equals_folder_store(wds_data, tmp_path):
    """Same images, same labels -> the same store rows, bit for bit: scores, observed (Cole's simulation in the
    same row order), full labels, splits; the image references are wds:// members under the data root."""
    root, urls = wds_data
    ref = _pseudolabel(tmp_path / "folder", [f"data.root={root}"])
    got = _pseudolabel(tmp_path / "wds", [f"data.root={root}", "data.format=webdataset",
                                          f"data.urls={{train: '{urls['train']}', test: '{urls['test']}'}}"])
    a, b = _read(ref), _read(got)
    assert sorted(a) == sorted(b) and len(a) == N_TRAIN + N_TEST
    for sid in a:
        assert a[sid]["split"] == b[sid]["split"], sid
        np.testing.assert_array_equal(a[sid]["observed"], b[sid]["observed"])
        np.testing.assert_array_equal(a[sid]["labels"], b[sid]["labels"])
        np.testing.assert_array_equal(a[sid]["scores"], b[sid]["scores"])  # bit-identical: the same decoded pixels
    from vlpl.store.store import ScoreStore

    st = ScoreStore.open(got)
    images = [str(x) for s in st.splits() for x in st.split(s).images]
    assert all(i.startswith("wds://shards/") and "#images/" in i for i in images), images[:3]
    assert json.loads((got / "manifest.json").read_text())["dataset"]["format"] == "webdataset"


def test_members_reopen_by_reference_from_the_store(wds_data, tmp_path):
    """ImageSource.from_store reopens every wds:// member (the trainer's path): the pixels equal the folder file's;
    a fresh process state reads the index from the disk cache; a rewritten shard is re-indexed (fingerprint)."""
    from vlpl.data import webdataset as w
    from vlpl.data.images import ImageSource

    root, urls = wds_data
    store = _pseudolabel(tmp_path / "wds", [f"data.root={root}", "data.format=webdataset", f"data.urls={urls['train']}"])
    manifest = json.loads((store / "manifest.json").read_text())
    from vlpl.store.store import ScoreStore

    refs = [str(x) for x in ScoreStore.open(store).split("train").images]
    w.clear_memory_cache()
    src = ImageSource.from_store(manifest["dataset"], None)
    plain = ImageSource(root)
    for ref in refs:
        key = ref.rpartition("#")[2]
        assert np.array_equal(np.asarray(src.open(ref)), np.asarray(plain.open(key + ".jpg"))), ref
    cached = sorted((tmp_path / "cache" / "wds-index").glob("*.json"))
    assert len(cached) == 3  # train-000000..000002
    # the images moved: data_root= points at the new place, the relative shard URLs follow
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    w.clear_memory_cache()
    src2 = ImageSource.from_store(manifest["dataset"], str(moved))
    assert np.array_equal(np.asarray(src2.open(refs[0])), np.asarray(src.open(refs[0])))
    # rewrite shard 0 with the samples in reverse order: the cached index no longer fits and is rebuilt
    import tarfile

    shard0 = moved / "shards" / "train-000000.tar"
    with tarfile.open(shard0) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shard0, "w") as tf:
        for m, data in reversed(members):
            tf.addfile(m, io.BytesIO(data))
    import os

    os.utime(shard0, (1e9, 1e9))
    w.clear_memory_cache()
    src3 = ImageSource.from_store(manifest["dataset"], str(moved))
    for ref in refs[:4]:
        key = ref.rpartition("#")[2]
        assert np.array_equal(np.asarray(src3.open(ref)), np.asarray(plain.open(key + ".jpg"))), ref


def test_corrupt_and_missing_members_are_failed_rows_naming_shard_and_key(wds_data, tmp_path):
    """A member with garbage bytes and a sample without an image member become failed rows (the run goes on),
    each error naming the shard and the key; the good rows keep their scores."""
    root, _ = wds_data
    data = tmp_path / "data"
    shutil.copytree(root, data, ignore=shutil.ignore_patterns("shards"))
    jpg = (root / _rows(root)[0]["image"]).read_bytes()
    extra = (("train", {"__key__": "bad/corrupt", "jpg": b"this is not an image at all" * 10,
                        "json": json.dumps({"labels": ["person"]}).encode()}),
             ("train", {"__key__": "bad/truncated", "jpg": jpg[: len(jpg) // 3],
                        "json": json.dumps({"labels": ["person"]}).encode()}),
             ("train", {"__key__": "bad/noimage", "json": json.dumps({"labels": ["person"]}).encode()}))
    urls = write_tars(data, data / "shards", extra=extra)
    store = _pseudolabel(tmp_path / "store", [f"data.root={data}", "data.format=webdataset",
                                              f"data.urls={urls['train']}", "data.val_fraction=0",
                                              "max_failed_fraction=0.5"])
    import pyarrow.parquet as pq

    t = pq.read_table(sorted((store / "shards").glob("part-*.parquet")), columns=["sample_id", "status", "error"])
    rows = {r["sample_id"]: r for r in t.to_pylist()}
    for key, why in (("bad/corrupt", "not an image"), ("bad/truncated", "truncat"), ("bad/noimage", "no image member")):
        err = rows[key]["error"] or ""
        assert rows[key]["status"] != "ok" and "shards/train-000002.tar" in err and key in err and why in err, err
    assert sum(r["status"] == "ok" for r in rows.values()) == N_TRAIN


def test_labels_from_txt_members_side_file_and_partial_json(wds_data, tmp_path):
    """The three label sources give the same label matrix: txt members, a side file keyed by sample key, and
    positives/negatives json members (partial: listed negatives -1, the rest unknown)."""
    from vlpl.config import DataConfig, ObservedConfig
    from vlpl.data.readers import load_dataset

    root, urls = wds_data
    ref = load_dataset(DataConfig(format="folder", root=str(root), val_fraction=0.0))
    full = ref.label_matrix()
    data = tmp_path / "data"
    shutil.copytree(root, data, ignore=shutil.ignore_patterns("shards"))
    txt = write_tars(data, data / "txt", label_member="labels.txt")
    ds = load_dataset(DataConfig(format="webdataset", root=str(data), urls=dict(txt), val_fraction=0.0,
                                 wds_labels_member="labels.txt"))
    np.testing.assert_array_equal(ds.label_matrix(), full)
    assert [s.sample_id for s in ds.samples] == [s.sample_id for s in ref.samples]
    # a side file (CSV keyed by the sample key) over tars without label members
    bare = write_tars(data, data / "bare", label_member="")
    with open(data / "side.csv", "w") as f:
        f.write("key,labels\n")
        for r in _rows(root):
            f.write(f"{r['image'].rsplit('.', 1)[0]},{r['labels']}\n")
    ds2 = load_dataset(DataConfig(format="webdataset", root=str(data), urls=dict(bare), val_fraction=0.0,
                                  labels="side.csv"))
    np.testing.assert_array_equal(ds2.label_matrix(), full)
    # no labels anywhere: unknown (observed none works)
    ds3 = load_dataset(DataConfig(format="webdataset", root=str(data), urls=dict(bare), val_fraction=0.0,
                                  observed=ObservedConfig(mode="none")))
    assert all(s.labels is None for s in ds3.samples)
    # partial annotations in json members
    import webdataset as wds

    (data / "part").mkdir()
    with wds.TarWriter(str(data / "part" / "p-000000.tar")) as w:
        w.write({"__key__": "a", "jpg": b"x", "json": json.dumps({"positives": ["dog"], "negatives": ["cat"]}).encode()})
        w.write({"__key__": "b", "jpg": b"x", "json": json.dumps({"positives": [], "negatives": ["person"]}).encode()})
    ds4 = load_dataset(DataConfig(format="webdataset", root=str(data), urls="part/p-000000.tar", val_fraction=0.0,
                                  observed=ObservedConfig(mode="given")))
    assert ds4.labels_kind == "partial"
    C = ds4.classes
    a = ds4.observed_matrix()
    assert a[0, C.index("dog")] == 1 and a[0, C.index("cat")] == -1 and (a[0] != 0).sum() == 2
    assert a[1, C.index("person")] == -1 and (a[1] != 0).sum() == 1


def test_fsspec_urls_memory_filesystem(wds_data, tmp_path):
    """Shards on an fsspec file system (memory://, as object storage would be): the reader lists them by URL,
    the store's references keep the URL, and every member reopens with the folder file's pixels."""
    import fsspec

    from vlpl.config import DataConfig
    from vlpl.data.images import ImageSource
    from vlpl.data.readers import load_dataset

    root, _ = wds_data
    fs = fsspec.filesystem("memory")
    for p in sorted((root / "shards").glob("train-*.tar")):
        fs.pipe(f"/wdsbucket/{p.name}", p.read_bytes())
    try:
        ds = load_dataset(DataConfig(format="webdataset", root=str(root), val_fraction=0.0,
                                     urls="memory://wdsbucket/train-{000000..000002}.tar"))
        assert len(ds.samples) == N_TRAIN
        assert all(s.image.startswith("wds://memory://wdsbucket/train-0000") for s in ds.samples)
        plain = ImageSource(root)
        for s in ds.samples:
            assert np.array_equal(np.asarray(ds.image_source.open(s.image)),
                                  np.asarray(plain.open(s.sample_id + ".jpg")))
        # a store of remote shards reopens them without its recorded data root
        entry = {"root": str(tmp_path / "gone"), "format": "webdataset"}
        src = ImageSource.from_store(entry, None)
        s0 = ds.samples[0]
        assert np.array_equal(np.asarray(src.open(s0.image)), np.asarray(plain.open(s0.sample_id + ".jpg")))
        from vlpl.data.images import ImageLoadError

        with pytest.raises(ImageLoadError, match=r"shard shards/x.tar not found under the data root .*gone"):
            src.open("wds://shards/x.tar#k")
    finally:
        fs.rm("/wdsbucket", recursive=True)


def test_config_and_confinement_errors(wds_data, tmp_path):
    """Missing urls, a missing shard, a compressed shard, a shard outside the data root, and an unknown class in a
    json member are errors naming the key or the shard (and sample)."""
    import gzip

    from vlpl.config import ConfigError, DataConfig
    from vlpl.data.readers import DatasetFormatError, load_dataset

    root, urls = wds_data
    with pytest.raises(ConfigError, match="data.urls"):
        load_dataset(DataConfig(format="webdataset", root=str(root)))
    with pytest.raises(DatasetFormatError, match="nothere-000000.tar not found"):
        load_dataset(DataConfig(format="webdataset", root=str(root), urls="shards/nothere-000000.tar"))
    data = tmp_path / "data"
    shutil.copytree(root, data)
    (data / "shards" / "z.tar.gz").write_bytes(gzip.compress((data / "shards" / "train-000000.tar").read_bytes()))
    with pytest.raises(DatasetFormatError, match=r"z.tar.gz: not an uncompressed tar"):
        load_dataset(DataConfig(format="webdataset", root=str(data), urls="shards/z.tar.gz"))
    outside = tmp_path / "elsewhere.tar"
    shutil.copy(data / "shards" / "train-000000.tar", outside)
    with pytest.raises(ConfigError, match="outside the data root"):
        load_dataset(DataConfig(format="webdataset", root=str(data), urls=str(outside)))
    import webdataset as wds

    with wds.TarWriter(str(data / "shards" / "u.tar")) as w:
        w.write({"__key__": "k1", "jpg": b"x", "json": json.dumps({"labels": ["unicorn"]}).encode()})
    with pytest.raises(DatasetFormatError, match=r"u.tar, sample 'k1'.*unknown class name 'unicorn'"):
        load_dataset(DataConfig(format="webdataset", root=str(data), urls="shards/u.tar"))


@pytest.mark.slow
def test_two_processes_with_workers_give_the_one_process_store(wds_data, tmp_path):
    """torchrun with 2 processes and a decode worker each: every process lists the tars, scores its store shards
    (i % 2 == rank) by random access (the index cache shared on disk, written atomically), and the store is the
    1-process store, byte for byte."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT
    from tests.faults.test_pseudolabel_faults import _cli_env, store_diff

    root, urls = wds_data
    over = [f"data.root={root}", "data.format=webdataset", f"data.urls={{train: '{urls['train']}', test: '{urls['test']}'}}",
            "num_workers=1"]
    out = tmp_path / "store"
    one = _pseudolabel(out, over).rename(tmp_path / "one")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29548", "-m", "vlpl", "pseudolabel", "--config", str(TINY_TEACHER), f"out={out}",
                        "shard_size=4", "batch_size=4", "progress=false", "views.grid=2", "index=false",
                        *over], env={**_cli_env(), "PYTHONPATH": str(REPO_ROOT)}, cwd=str(REPO_ROOT),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert store_diff(out, one) == []
    assert len(list((tmp_path / "cache" / "wds-index").glob("*.json"))) == 4  # 3 train + 1 test shard


_SLOW_RUN = """
import sys, time
import vlpl.data.webdataset as w
from vlpl.data.images import SCHEMES
def slow(source, rest, _open=w.open_member):
    time.sleep(float(sys.argv[1]))
    return _open(source, rest)
SCHEMES["wds"] = slow
from vlpl.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_kill_mid_run_and_resume_gives_the_same_store(wds_data, tmp_path):
    """A real ``vlpl pseudolabel`` on the tars is killed (SIGKILL to its process group) once 2 of its 4 shards
    exist; the resumed run skips them and the store is the uninterrupted run's, byte for byte (manifest
    timestamps aside), with no temporary file or lock left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT
    from tests.faults.test_pseudolabel_faults import _cli_env, store_diff, temp_files

    root, urls = wds_data
    over = [f"data.root={root}", "data.format=webdataset", f"data.urls={{train: '{urls['train']}', test: '{urls['test']}'}}"]
    out = tmp_path / "store"
    ref = _pseudolabel(out, over).rename(tmp_path / "ref")
    args = ["pseudolabel", "--config", str(TINY_TEACHER), f"out={out}", "shard_size=4", "batch_size=4",
            "num_workers=0", "progress=false", "views.grid=2", "index=false", *over]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, "0.2", *args], env=_cli_env(), cwd=str(REPO_ROOT),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, killed = time.time() + 240, False
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "shards").glob("part-*.parquet"))) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert killed, f"the run ended before the kill (rc {proc.returncode}): {err[-2000:]}"
    assert 2 <= len(list((out / "shards").glob("part-*.parquet"))) < 4
    resumed = subprocess.run([sys.executable, "-m", "vlpl", *args], env=_cli_env(), cwd=str(REPO_ROOT),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already complete" in resumed.stderr, resumed.stderr[-3000:]
    assert store_diff(out, ref) == []
    assert temp_files(out) == [] and not (out / ".lock").exists()


def test_max_samples_stops_listing_shards(wds_data, tmp_path, monkeypatch):
    """data.max_samples=3 with one shard listed at a time: only the first train shard (4 samples) and the test
    shard are listed (indexed), and the dataset keeps the first 3 rows of each."""
    from vlpl.config import DataConfig
    from vlpl.data import webdataset as w
    from vlpl.data.readers import load_dataset

    root, urls = wds_data
    monkeypatch.setattr(w, "LIST_THREADS", 1)
    ds = load_dataset(DataConfig(format="webdataset", root=str(root), urls=dict(urls), val_fraction=0.0,
                                 max_samples=3))
    assert len(ds.samples) == 6
    assert len(list((tmp_path / "cache" / "wds-index").glob("*.json"))) == 2


def test_shard_cut_short_keeps_the_members_before_the_cut(wds_data, tmp_path, caplog):
    """A tar cut in the middle of a member (an interrupted copy): the listing warns naming the shard and the sample
    cut through, keeps the samples before the cut, and leaves that sample out (reopening it names shard and key)."""
    import logging

    import fsspec

    from vlpl.config import DataConfig
    from vlpl.data import webdataset as w
    from vlpl.data.images import ImageLoadError
    from vlpl.data.readers import load_dataset

    root, _ = wds_data
    data = tmp_path / "data"
    shutil.copytree(root, data)
    shard = data / "shards" / "train-000000.tar"
    index, _ = w.build_index(str(shard), fsspec.filesystem("file"), str(shard), "x")
    keys = list(index.samples)
    for cut in (lambda o, n: o + n // 2, lambda o, n: o + n):  # inside the image; right after it (json lost)
        shutil.copy(root / "shards" / "train-000000.tar", shard)
        off, size = index.samples[keys[2]]["jpg"]
        shard.write_bytes(shard.read_bytes()[: cut(off, size)])
        w.clear_memory_cache()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vlpl.data.webdataset"):
            ds = load_dataset(DataConfig(format="webdataset", root=str(data), urls="shards/train-000000.tar",
                                         val_fraction=0.0))
        assert "train-000000.tar is cut short" in caplog.text and f"sample {keys[2]!r}, cut through" in caplog.text
        assert [s.sample_id for s in ds.samples] == keys[:2]
        ds.image_source.open(ds.samples[1].image)  # before the cut: fine
        with pytest.raises(ImageLoadError, match=rf"train-000000.tar#{keys[2]}: shard .* has no sample with key"):
            ds.image_source.open(f"wds://shards/train-000000.tar#{keys[2]}")
