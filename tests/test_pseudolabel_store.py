"""The pseudolabel stage and the score store: round trips, resume, multi-process, failures."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_subset_dataset

from vlpl.config import ConfigError, PseudolabelConfig, load_config
from vlpl.pseudolabel.stage import run_pseudolabel
from vlpl.store.store import ScoreStore, StoreError

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "models" / "tiny.yaml")


def _mini_dataset(src: Path, dst: Path, n: int = 24) -> Path:
    """The first n coco256 train images, plus a corrupt and a truncated JPEG."""
    first = next(r for r in csv.DictReader(open(src / "labels.csv")) if r["split"] == "train")
    data = (src / first["image"]).read_bytes()
    return make_subset_dataset(src, dst, n_train=n, bad=[
        (5, "corrupt.jpg", b"this is not a jpeg" * 10, "train", "person"),
        (9, "truncated.jpg", data[: len(data) // 3], "test", "person|dog")])


def _cfg(data: Path, out: Path, *extra: str) -> PseudolabelConfig:
    return load_config(PseudolabelConfig, [TINY], [f"data.root={data}", f"out={out}", "shard_size=8",
                                                    "batch_size=4", "num_workers=0", "progress=false", *extra])


def _store_files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "config.yaml"}


@pytest.fixture(scope="module")
def mini(coco256_root, tmp_path_factory):
    return _mini_dataset(coco256_root, tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="module")
def mini_store(mini, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    run_pseudolabel(_cfg(mini, out))
    return out


def test_store_contents_and_failed_rows(mini_store):
    store = ScoreStore(mini_store)
    m = store.manifest
    assert m["complete"] and m["num_rows"] == 26 and m["num_failed"] == 2
    assert m["views"]["num_views"] == 34 and len(m["classes"]) == 80
    assert (mini_store / "classes.txt").read_text().splitlines() == m["classes"]
    te = np.load(mini_store / "text_embeddings.npy")
    assert te.shape == (80, 32) and np.allclose(np.linalg.norm(te, axis=1), 1, atol=1e-5)
    a = store.arrays(("sample_id", "status", "error", "scores", "observed", "labels"))
    failed = np.nonzero(a["status"] == "failed")[0]
    assert {a["sample_id"][i] for i in failed} == {"images/corrupt", "images/truncated"}
    for i in failed:
        assert "corrupt.jpg" in a["error"][i] or "truncated.jpg" in a["error"][i]
        assert np.isnan(a["scores"][i]).all()
    ok = a["status"] == "ok"
    assert np.isfinite(a["scores"][ok]).all() and np.abs(a["scores"][ok]).max() <= 1.0
    # every shard is listed with its checksum
    for s in m["shards"]:
        from vlpl.store.store import sha256_file
        assert sha256_file(mini_store / s["file"]) == s["sha256"]


def test_scores_are_the_cosines_of_the_views(mini, mini_store):
    """Recompute one image's 34 view scores directly and compare with the stored float16 values."""
    import torch

    from vlpl.data.readers import load_dataset
    from vlpl.vlm.backend import create_backend
    from vlpl.vlm.views import ViewSpec, make_views

    cfg = _cfg(mini, mini_store)
    ds = load_dataset(cfg.data)
    b = create_backend(cfg.teacher, torch.device("cpu"))
    text = b.encode_text(ds.classes, "a photo of a {}.")
    img = torch.from_numpy(np.array(ds.open_image(0))).permute(2, 0, 1)
    spec = ViewSpec(4, True, b.preprocess.image_size)
    feats = b.encode_image(make_views(img, spec, *b.normalization()))
    expect = (feats @ text.T).numpy()
    got = ScoreStore(mini_store).arrays(("scores", "image_embedding"))
    np.testing.assert_allclose(got["scores"][0], expect, atol=2e-3)
    np.testing.assert_allclose(got["image_embedding"][0], feats[0].numpy(), atol=2e-3)


def test_round_trip_pyarrow_and_datasets(mini_store):
    import datasets

    files = sorted(str(p) for p in (mini_store / "shards").glob("*.parquet"))
    t = pq.read_table(files)
    assert t.num_rows == 26
    assert t.schema.field("scores").type.list_size == 34
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(ds) == 26
    row = ds[0]
    assert len(row["scores"]) == 34 and len(row["scores"][0]) == 80 and row["status"] == "ok"
    assert set(ds.column_names) >= {"sample_id", "image", "split", "observed", "labels", "scores",
                                    "image_embedding", "status", "error"}
    np.testing.assert_allclose(np.array(row["scores"], np.float32),
                               ScoreStore(mini_store).arrays(("scores",))["scores"][0].astype(np.float32))


def test_faiss_index_finds_each_image_itself(mini_store):
    from vlpl.store.index import load_index, search

    store = ScoreStore(mini_store)
    emb = store.arrays(("image_embedding",))["image_embedding"].astype(np.float32)
    ok = ~np.isnan(emb).any(1)
    assert load_index(mini_store).ntotal == ok.sum()
    sims, ids = search(mini_store, emb[ok], k=1)
    assert (ids[:, 0] == np.nonzero(ok)[0]).all()


def test_rerun_complete_store_is_a_noop(mini, mini_store):
    before = {p: p.stat().st_mtime_ns for p in (mini_store / "shards").iterdir()}
    run_pseudolabel(_cfg(mini, mini_store))
    after = {p: p.stat().st_mtime_ns for p in (mini_store / "shards").iterdir()}
    assert before == after


def test_mismatched_store_is_refused_unless_overwrite(mini, mini_store, tmp_path):
    with pytest.raises(StoreError, match="different views"):
        run_pseudolabel(_cfg(mini, mini_store, "views.grid=2"))
    with pytest.raises(StoreError, match="different templates"):
        run_pseudolabel(_cfg(mini, mini_store, "teacher.templates=a picture of {}."))
    out = tmp_path / "s2"
    run_pseudolabel(_cfg(mini, out))
    run_pseudolabel(_cfg(mini, out, "views.grid=2", "overwrite=true"))
    assert ScoreStore(out).manifest["views"]["num_views"] == 10


def test_config_errors_name_key_and_source(mini, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("views:\n  gird: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'views.gird' in .*bad.yaml"):
        load_config(PseudolabelConfig, [TINY, bad], [f"data.root={mini}", "out=x"])
    with pytest.raises(ConfigError, match=r"views.grid: expected int, got 'four'.*override"):
        load_config(PseudolabelConfig, [TINY], [f"data.root={mini}", "out=x", "views.grid=four"])
    with pytest.raises(ConfigError, match="missing required value 'out'"):
        load_config(PseudolabelConfig, [TINY], [f"data.root={mini}"])


def _cli(*args: str, env=None) -> list:
    return [sys.executable, "-m", "vlpl", *args]


def _cli_args(data: Path, out: Path):
    return ["pseudolabel", "-c", TINY, f"data.root={data}", f"out={out}", "shard_size=4",
            "batch_size=2", "num_workers=0", "progress=false"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_killed_run_resumes_to_identical_store(mini, mini_store, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cli(*_cli_args(mini, ref)), check=True, env=_env(), capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*_cli_args(mini, out)), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        marks = list((out / "shards").glob("part-*.json")) if (out / "shards").exists() else []
        if len(marks) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    marks = list((out / "shards").glob("part-*.json"))
    assert 2 <= len(marks) < 7, "the run should have been killed part-way"
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(StoreError, match="incomplete"):
        ScoreStore(out)
    done_before = {p.name: p.stat().st_mtime_ns for p in marks}
    subprocess.run(_cli(*_cli_args(mini, out)), check=True, env=_env(), capture_output=True)
    for name, mtime in done_before.items():  # completed shards were skipped, not redone
        assert (out / "shards" / name).stat().st_mtime_ns == mtime
    assert not list(out.rglob("*.tmp"))
    assert _store_files(out) == _store_files(ref)


@pytest.mark.slow
def test_two_process_torchrun_gives_the_same_store(mini, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(*_cli_args(mini, one)), check=True, env=_env(), capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29531", "-m", "vlpl", *_cli_args(mini, two)],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _store_files(one) == _store_files(two)
