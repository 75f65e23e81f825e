"""The scaling suite's scripts at toy sizes (benchmarks/synthetic.py, benchmarks/scaling.py,
benchmarks/results_table.py), so they do not rot; the numbers themselves mean nothing here."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from vlpl.store.store import ScoreStore

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    key = f"_bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def syn(coco256_root) -> ModuleType:
    return _load("synthetic")


def _shards(root: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((root / "shards").iterdir())}


def test_synthetic_store_is_a_normal_store_deterministic_and_resumable(syn, tmp_path):
    spec = syn.SyntheticSpec(rows=300, classes=30, grid=1, flips=True, dim=16, shard_size=128, failed=0.05)
    a = syn.make_synthetic_store(tmp_path / "a", spec, show_progress=False)
    st = ScoreStore(a)
    assert st.verify()["ok"] and st.num_rows == 300 and st.view_spec.num_views == 4 and st.num_classes == 30
    assert st.manifest["dataset"]["root"] == str(syn.COCO256.resolve())
    assert sum(st.splits().values()) == 300 - st.manifest["num_failed"] > 250
    tr = st.split("train")
    s = tr.scores(np.arange(len(tr)))[:, 0, 0]  # global unflipped view
    lab = tr.labels_at(np.arange(len(tr)))
    assert s[lab == 1].mean() > s[lab == 0].mean() + 0.08  # positives score higher, CLIP-like
    assert 0.1 < s[lab == 0].mean() < 0.3
    assert (tr.observed == 1).sum(1).tolist() == [1] * len(tr) and (tr.observed[lab == 0] == 0).all()
    # a pure function of (seed, shard): another run is byte-identical, and a lost shard is re-made the same
    b = syn.make_synthetic_store(tmp_path / "b", spec, show_progress=False)
    assert _shards(a) == _shards(b)
    (b / "shards" / "part-00001.parquet").unlink()  # lost: re-made; the others are kept as they are
    kept = (b / "shards" / "part-00000.parquet").stat().st_mtime_ns
    syn.make_synthetic_store(tmp_path / "b", spec, show_progress=False)
    assert _shards(a) == _shards(b) and (b / "shards" / "part-00000.parquet").stat().st_mtime_ns == kept
    assert ScoreStore(b).verify()["ok"]


def test_synthetic_compact_forms_read_back_as_the_dense_scores(syn, tmp_path):
    stores = {}
    for form in ("dense", "embeddings", "topk"):
        spec = syn.SyntheticSpec(rows=100, classes=40, grid=1, flips=False, dim=16, shard_size=64, form=form,
                                 topk=40)
        stores[form] = ScoreStore(syn.make_synthetic_store(tmp_path / form, spec, show_progress=False))
    ref = stores["dense"].split("train")
    dense = ref.scores(np.arange(len(ref)))
    for form in ("embeddings", "topk"):
        st = stores[form]
        assert st.score_format == form
        got = st.split("train").scores(np.arange(len(ref)))
        np.testing.assert_allclose(got, dense, atol=2e-3)  # float16 rounding (top-k with k = C keeps all)


def test_scaling_store_smoke(syn, tmp_path):
    mod = _load("scaling")
    out = tmp_path / "store.json"
    res = mod.main(["store", "--classes", "200", "--forms", "dense", "topk", "--topk", "8", "--images", "2",
                    "--grid", "1", "--shard-size", "4", "--num-workers", "0", "--out", str(out),
                    "--work", str(tmp_path)])
    r = json.loads(out.read_text())
    assert r["benchmark"] == "scaling_store" and r["command"].startswith("python benchmarks/scaling.py store")
    assert r["environment"]["device"] and "commit" in r
    rows = {(x["classes"], x["form"]): x for x in r["rows"]}
    assert set(rows) == {(200, "dense"), (200, "topk")}
    d = rows[(200, "dense")]
    assert d["score_payload_bytes_per_image"] == d["dense_payload_bytes_per_image"] == 4 * 200 * 2
    assert rows[(200, "topk")]["score_payload_bytes_per_image"] == 8 * 2 + 4 * 8 * 2 + 4 * 4  # classes, scores, floor
    assert all(x["images_per_s_loop"] > 0 and x["score_bytes_per_image"] > 0 for x in r["rows"])
    table = _load("results_table").tables([out])
    assert table.count("| 200 |") == 2 and res["file"] == str(out)
    assert not list(tmp_path.glob("vlpl-scaling-store-*"))  # temporary stores removed


def test_scaling_index_smoke(syn, tmp_path):
    mod = _load("scaling")
    out = tmp_path / "index.json"
    mod.main(["index", "--rows", "1500", "--dim", "16", "--vocab", "20", "--factories", "Flat", "IVF8,Flat", "HNSW8",
              "Nope", "--search", "", "nprobe=8", "efSearch=32", "--queries", "20", "--train-sample", "500",
              "--shard-size", "500", "--out", str(out), "--work", str(tmp_path)])
    r = json.loads(out.read_text())
    rows = {x["factory"]: x for x in r["rows"]}
    assert "not a FAISS index factory string" in rows["Nope"]["error"]
    assert [s["recall_at_10"] for s in rows["Flat"]["search"]] == [1.0]  # exact; nprobe/efSearch do not apply
    ivf = {s["search_params"]: s["recall_at_10"] for s in rows["IVF8,Flat"]["search"]}
    assert set(ivf) == {"", "nprobe=8"} and ivf["nprobe=8"] == 1.0  # every list probed: exact
    assert rows["IVF8,Flat"]["trained_on"] == 500 and rows["Flat"]["trained_on"] == 0
    assert {s["search_params"] for s in rows["HNSW8"]["search"]} == {"", "efSearch=32"}
    for x in (rows["Flat"], rows["IVF8,Flat"], rows["HNSW8"]):
        assert x["vectors"] == 1500 and x["index_bytes"] > 0 and x["peak_rss_mb"] > 0
    table = _load("results_table").tables([out])
    assert "| HNSW8 |" in table and "failed:" in table
