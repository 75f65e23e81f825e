"""Streaming Hugging Face datasets as ``vlpl pseudolabel`` input (vlpl/data/streaming.py; issue 13 item 6).

The input is a folder of Parquet files written here from coco256 (image bytes embedded, ``Sequence(ClassLabel)``
labels) and read with ``datasets.load_dataset(folder, streaming=True)``; the folder input over the same images in
the same order is the reference.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, TINY_TEACHER, make_subset_dataset

N_TRAIN, N_TEST = 10, 4
TRAIN_FILES = 2  # source files of the train split: 5 rows each


def write_parquet(folder: Path, dst: Path, train_files: int = TRAIN_FILES) -> Path:
    """The folder dataset's rows as Parquet files ``data/{train,test}-NNNNN-of-NNNNN.parquet`` (file order kept)."""
    import datasets

    classes = [c for c in (folder / "classes.txt").read_text().splitlines() if c]
    feats = datasets.Features({"image": datasets.Image(),
                               "labels": datasets.Sequence(datasets.ClassLabel(names=classes))})
    rows = list(csv.DictReader(open(folder / "labels.csv")))
    for split, files in (("train", train_files), ("test", 1)):
        mine = [r for r in rows if r["split"] == split]
        per = -(-len(mine) // files)
        for j in range(files):
            chunk = mine[j * per:(j + 1) * per]
            d = datasets.Dataset.from_dict(
                {"image": [{"bytes": (folder / r["image"]).read_bytes(), "path": None} for r in chunk],
                 "labels": [[c for c in r["labels"].split("|") if c] for r in chunk]}, features=feats)
            d.to_parquet(str(dst / "data" / f"{split}-{j:05d}-of-{files:05d}.parquet"))
    return dst


@pytest.fixture(scope="module")
def data(coco256_root, tmp_path_factory) -> Tuple[Path, Path]:
    base = tmp_path_factory.mktemp("stream")
    folder = make_subset_dataset(coco256_root, base / "folder", N_TRAIN, N_TEST)
    return folder, write_parquet(folder, base / "pq")


def _overrides(out: Path) -> List[str]:
    return [f"out={out}", "shard_size=2", "batch_size=2", "num_workers=0", "progress=false", "views.grid=2",
            "index=false"]


def _stream_overrides(pq: Path, out: Path) -> List[str]:
    return [f"data.root={pq}", "data.format=hf", "data.hf_path=.", "data.hf_streaming=true", *_overrides(out)]


def _pseudolabel(overrides: List[str]) -> Path:
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel

    return run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], overrides))


def _rows(store: Path) -> Dict[str, Dict[str, np.ndarray]]:
    """split -> scores, observed, labels, images in split order."""
    from vlpl.store.store import ScoreStore

    st = ScoreStore.open(store)
    out = {}
    for name in st.splits():
        sp = st.split(name)
        out[name] = {"scores": np.asarray(sp.scores(np.arange(len(sp)))), "observed": np.asarray(sp.observed),
                     "labels": np.asarray(sp.labels), "images": [str(x) for x in sp.images]}
    return out


def test_streaming_store_equals_folder_store(data, tmp_path):
    """The streamed Parquet rows give the folder input's store row for row, bit for bit (same image bytes, same
    decoder): scores, Cole's observed labels, full labels, the train/val/test carving; references are hfs://."""
    folder, pq = data
    ref = _rows(_pseudolabel([f"data.root={folder}", *_overrides(tmp_path / "folder")]))
    store = _pseudolabel(_stream_overrides(pq, tmp_path / "stream"))
    got = _rows(store)
    assert sorted(ref) == sorted(got) == ["test", "train", "val"]
    for split in ref:
        for k in ("scores", "observed", "labels"):
            np.testing.assert_array_equal(ref[split][k], got[split][k], err_msg=f"{split} {k}")
    assert got["test"]["images"] == [f"hfs://test/{k}" for k in range(N_TEST)]
    hf = json.loads((store / "manifest.json").read_text())["dataset"]["hf"]
    assert hf["streaming"] is True and hf["stream"]["file_rows"] == {"train": [5, 5], "test": [4]}


def test_stream_rows_in_any_order_and_from_the_store(data, tmp_path):
    """Rows read back through the per-file cursors in any order (backwards jumps re-open the file) equal the
    Parquet files' rows; ImageSource.from_store reopens them from the manifest alone (the trainer's path)."""
    from vlpl.config import DataConfig
    from vlpl.data.images import ImageSource, decode_image
    from vlpl.data.readers import load_dataset
    from vlpl.data.streaming import StreamRows

    folder, pq = data
    ds = load_dataset(DataConfig(format="hf", root=str(pq), hf_path=".", hf_streaming=True, val_fraction=0.0))
    rows = StreamRows(str(pq), "image", ds.image_source.hf_stream["file_rows"])
    files = [r["image"] for r in csv.DictReader(open(folder / "labels.csv")) if r["split"] == "train"]
    order = [9, 0, 4, 5, 1, 8, 2, 7, 3, 6, 6]
    for k in order:
        cell = rows.row("train", k)
        assert cell["bytes"] == (folder / files[k]).read_bytes(), k
    assert rows.reopened >= 4  # 9 then 0 (two files opened), 5 after 4 (file 1 again: backwards), ...
    with pytest.raises(IndexError, match="out of range"):
        rows.row("train", 10)
    src = ImageSource.from_store({"root": str(pq), "hf": ds.image_source.describe()["hf"]}, None)
    for k in (3, 7, 0):
        img = src.open(f"hfs://train/{k}")
        ref = decode_image((folder / files[k]).read_bytes(), files[k], src.cfg)
        assert np.array_equal(np.asarray(img), np.asarray(ref))
    from vlpl.data.images import ImageLoadError

    with pytest.raises(ImageLoadError, match=r"hfs://train/99 .*out of range"):
        src.open("hfs://train/99")


def test_streaming_pseudolabel_then_train_one_step(data, tmp_path):
    """End to end: a store made from the stream trains a tiny student for one step (the trainer reopens the
    hfs:// images through the manifest's stream record)."""
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    _, pq = data
    store = _pseudolabel(_stream_overrides(pq, tmp_path / "stream"))
    out = tmp_path / "run"
    run_train(load_train_config([str(REPO_ROOT / "configs" / "models" / "tiny_classifier.yaml")], [
        f"store={store}", f"out={out}", "progress=false", "epochs=1", "max_steps_per_epoch=1", "batch_size=4"]))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "step"]
    assert len(steps) == 1 and np.isfinite(steps[0]["loss"])
    epoch = next(x for x in lines if x["kind"] == "epoch")
    assert np.isfinite(epoch["test_map"])  # the test split's hfs:// images were reopened and scored


def test_changed_stream_is_refused_on_resume(data, tmp_path):
    """Resume rules: a stream whose rows changed since the store was started (a source file gained a row) gives
    other sample ids / observed labels, so the store's samples_sha256 differs and the resume is refused."""
    import shutil

    from vlpl.store.store import StoreError

    folder, pq = data
    store = _pseudolabel(_stream_overrides(pq, tmp_path / "stream"))
    changed = tmp_path / "pq2"
    shutil.copytree(pq, changed)
    import datasets

    f0 = changed / "data" / "train-00000-of-00002.parquet"
    d = datasets.Dataset.from_parquet(str(f0))
    d2 = datasets.concatenate_datasets([d, d.select([0]).cast(d.features)])
    f0.unlink()
    d2.to_parquet(str(f0))
    with pytest.raises(StoreError, match="samples_sha256"):
        _pseudolabel(_stream_overrides(changed, store))


# --------------------------------------------------------------------------------------------------
# kill -9 mid-run + resume (modelled on tests/faults/test_pseudolabel_faults.py)
# --------------------------------------------------------------------------------------------------

_SLOW_RUN = """
import sys, time
import vlpl.data.streaming as s
from vlpl.data.images import SCHEMES
def slow(source, rest, _open=s.open_row):
    time.sleep(float(sys.argv[1]))
    return _open(source, rest)
SCHEMES["hfs"] = slow
from vlpl.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_kill_mid_run_and_resume_gives_the_same_store(data, tmp_path):
    """A real ``vlpl pseudolabel`` on the stream is killed (SIGKILL to its process group) once 2 of its 7 shards
    exist; the resumed run skips them, reads the remaining rows through the cursors, and the store is the
    uninterrupted run's, byte for byte (manifest timestamps aside), with no temporary file or lock left."""
    from tests.faults.test_pseudolabel_faults import _cli_env, store_diff, temp_files

    _, pq = data
    out = tmp_path / "store"  # one path for both runs: config.yaml records it
    ref = _pseudolabel(_stream_overrides(pq, out)).rename(tmp_path / "ref")
    cmd = [sys.executable, "-c", _SLOW_RUN, "0.15", "pseudolabel", "--config", str(TINY_TEACHER),
           *_stream_overrides(pq, out)]
    proc = subprocess.Popen(cmd, env=_cli_env(), cwd=str(REPO_ROOT), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "shards").glob("part-*.parquet"))) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert killed, f"the run ended before the kill (rc {proc.returncode}): {err[-2000:]}"
    done = len(list((out / "shards").glob("part-*.parquet")))
    assert 2 <= done < 7, done
    resumed = subprocess.run([sys.executable, "-m", "vlpl", "pseudolabel", "--config", str(TINY_TEACHER),
                              *_stream_overrides(pq, out)], env=_cli_env(), cwd=str(REPO_ROOT),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already complete" in resumed.stderr, resumed.stderr[-3000:]
    assert store_diff(out, ref) == [], store_diff(out, ref)
    assert temp_files(out) == [] and not (out / ".lock").exists()


def test_decode_workers_keep_their_own_cursors(data, tmp_path):
    """num_workers=2: each forked DataLoader worker opens its own cursors (never the parent's stream) and takes
    every other batch; the store equals the num_workers=0 store."""
    _, pq = data
    one = _rows(_pseudolabel(_stream_overrides(pq, tmp_path / "w0")))
    two = _rows(_pseudolabel([*_stream_overrides(pq, tmp_path / "w2"), "num_workers=2"]))
    for split in one:
        np.testing.assert_array_equal(one[split]["scores"], two[split]["scores"], err_msg=split)
        assert one[split]["images"] == two[split]["images"]


@pytest.mark.slow
def test_two_processes_give_the_one_process_store(data, tmp_path):
    """torchrun with 2 processes: rank r scores the store shards i % 2 == r, reading the stream through its own
    cursors (skipping the other rank's rows); the store is the 1-process store, byte for byte."""
    from tests.faults.test_pseudolabel_faults import _cli_env, store_diff

    _, pq = data
    out = tmp_path / "store"
    one = _pseudolabel(_stream_overrides(pq, out)).rename(tmp_path / "one")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29547", "-m", "vlpl", "pseudolabel", "--config", str(TINY_TEACHER),
                        *_stream_overrides(pq, out)], env={**_cli_env(), "PYTHONPATH": str(REPO_ROOT)},
                       cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert store_diff(out, one) == []


def test_max_samples_lists_only_the_files_it_needs(data, tmp_path):
    """data.max_samples=3: only the first source file of train is listed (its 5 rows), the test split's file too;
    the rows read back are the first 3 of the stream."""
    from vlpl.config import DataConfig
    from vlpl.data.readers import load_dataset

    folder, pq = data
    ds = load_dataset(DataConfig(format="hf", root=str(pq), hf_path=".", hf_streaming=True, val_fraction=0.0,
                                 max_samples=3))
    assert ds.image_source.hf_stream["file_rows"] == {"train": [5], "test": [4]}
    assert [s.image for s in ds.samples] == ["hfs://train/0", "hfs://train/1", "hfs://train/2", "hfs://test/0",
                                             "hfs://test/1", "hfs://test/2"]
    files = [r["image"] for r in csv.DictReader(open(folder / "labels.csv")) if r["split"] == "train"]
    from vlpl.data.images import decode_image

    for k in range(3):
        ref = decode_image((folder / files[k]).read_bytes(), files[k], ds.image_source.cfg)
        assert np.array_equal(np.asarray(ds.image_source.open(f"hfs://train/{k}")), np.asarray(ref))
