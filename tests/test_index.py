"""The FAISS index of a store (vlpl/store/index.py): factory types, ids = store rows, recall vs exact,
rebuild equality, and the ``index`` config (true/false, a factory string, a mapping).

Stores are synthetic (benchmarks/synthetic.py, written through StoreWriter: a normal store), small enough
to build in about a second.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from vlpl.config import ConfigError, IndexConfig, PseudolabelConfig, load_config
from vlpl.store.store import ScoreStore

faiss = pytest.importorskip("faiss")

from vlpl.store.index import (  # noqa: E402
    INDEX_FILE,
    IndexBuildError,
    build_index,
    load_index,
    normalize,
    recall_at_k,
    search,
)

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _synthetic() -> ModuleType:
    name = "_bench_synthetic"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / "synthetic.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _store(root: Path, rows: int = 600, failed: float = 0.05, index=True, dim: int = 32) -> Path:
    syn = _synthetic()
    try:
        syn.image_refs()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    spec = syn.SyntheticSpec(rows=rows, classes=20, grid=0, flips=False, dim=dim, shard_size=200, failed=failed)
    return syn.make_synthetic_store(root, spec, index=index, show_progress=False)


def _embeddings(root: Path):
    """(unit float32 embeddings of the ok rows, their store row numbers, all rows' ok mask)."""
    st = ScoreStore(root)
    rows, vecs, ok_all = [], [], []
    for start, a in st.iter_shards(("image_embedding",)):
        ok = a["image_embedding_valid"]
        ok_all.append(ok)
        rows.append(start + np.nonzero(ok)[0])
        vecs.append(a["image_embedding"][ok])
    return normalize(np.concatenate(vecs)), np.concatenate(rows), np.concatenate(ok_all)


@pytest.fixture(scope="module")
def flat_store(tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("index") / "flat")


def test_flat_returns_the_exact_neighbours(flat_store):
    vecs, rows, _ = _embeddings(flat_store)
    q = vecs[::7]
    sims, ids = search(flat_store, q, k=10)
    exact = q @ vecs.T
    order = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, rows[order])  # row numbers, not positions among the ok rows
    np.testing.assert_allclose(sims, np.take_along_axis(exact, order, 1), atol=1e-5)


def test_ids_are_store_rows_and_failed_rows_are_left_out(flat_store):
    vecs, rows, ok = _embeddings(flat_store)
    assert (~ok).sum() > 0, "the synthetic store should have failed rows"
    index = load_index(flat_store)
    assert index.ntotal == ok.sum()
    stored_ids = faiss.vector_to_array(index.id_map)
    np.testing.assert_array_equal(np.sort(stored_ids), np.nonzero(ok)[0])
    _, ids = search(flat_store, vecs, k=1)
    np.testing.assert_array_equal(ids[:, 0], rows)  # each image finds itself, under its store row number
    manifest = ScoreStore(flat_store).manifest["index"]
    assert manifest["num_vectors"] == ok.sum() and manifest["factory"] == "Flat"
    assert manifest["metric"] == "inner_product" and manifest["trained_on"] == 0
    assert manifest["type"] == "IndexIDMap2(IndexFlat)"


# (factory, search parameters, recall@10 lower bound vs Flat). Measured on this set (2,850 vectors, D = 32,
# the synthetic generator's noisy embeddings): HNSW32 1.00, IVF32,Flat@16 0.93, IVF16,PQ16x4@16 0.57
# (4-bit PQ on 2-dim sub-vectors is lossy on purpose; random ids would score 0.004).
ANN = [("HNSW32", None, 0.95), ("IVF32,Flat", "nprobe=16", 0.85), ("IVF16,PQ16x4", "nprobe=16", 0.45)]


@pytest.fixture(scope="module")
def recall_store(tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("index") / "recall", rows=3000, failed=0.02)


@pytest.mark.parametrize("factory,params,bound", ANN, ids=[a[0] for a in ANN])
def test_ann_recall_at_10_vs_flat(recall_store, tmp_path, factory, params, bound):
    vecs, rows, _ = _embeddings(recall_store)
    q = vecs[:300]
    _, exact = search(recall_store, q, k=10)
    entry = build_index(ScoreStore(recall_store), IndexConfig(factory=factory, search_params=params),
                        path=tmp_path / "ann.faiss")
    index = faiss.read_index(str(tmp_path / "ann.faiss"))
    _, found = index.search(q, 10)  # the search parameters were stored with the index
    assert set(found.reshape(-1)) <= set(rows.tolist())  # ids are store rows here too
    r = recall_at_k(found, exact, 10)
    assert r >= bound, f"{factory} {params}: recall@10 {r:.3f} < {bound}"
    assert entry["factory"] == factory and entry["num_vectors"] == len(rows)
    if params:
        assert entry["search_params"] == params


def test_training_uses_a_seeded_sample_of_the_rows(recall_store, tmp_path):
    cfg = IndexConfig(factory="IVF8,Flat", train_sample=500, seed=3)
    a = build_index(ScoreStore(recall_store), cfg, path=tmp_path / "a.faiss")
    build_index(ScoreStore(recall_store), cfg, path=tmp_path / "b.faiss")
    _, _, ok = _embeddings(recall_store)
    rng_rows = np.sort(np.random.default_rng(3).choice(len(ok), 500, replace=False))
    assert a["trained_on"] == ok[rng_rows].sum() < 500  # the sampled rows that are not failed rows
    assert a["train_sample"] == 500 and a["seed"] == 3
    assert (tmp_path / "a.faiss").read_bytes() == (tmp_path / "b.faiss").read_bytes()
    c = build_index(ScoreStore(recall_store), IndexConfig(factory="IVF8,Flat", train_sample=500, seed=4),
                    path=tmp_path / "c.faiss")
    assert c["trained_on"] > 0 and (tmp_path / "c.faiss").read_bytes() != (tmp_path / "a.faiss").read_bytes()


@pytest.mark.parametrize("factory", ["Flat", "IVF16,PQ8x4", "HNSW16"])
def test_index_rebuilt_from_the_shards_equals_the_stored_one(tmp_path, factory):
    root = _store(tmp_path / "s", rows=500, index=IndexConfig(factory=factory))
    entry = ScoreStore(root).manifest["index"]
    assert entry["factory"] == factory and entry["file"] == INDEX_FILE
    again = build_index(ScoreStore(root), IndexConfig(factory=factory), path=tmp_path / "rebuilt.faiss")
    assert {k: v for k, v in again.items() if k not in ("file", "build_seconds")} == \
        {k: v for k, v in entry.items() if k not in ("file", "build_seconds")}
    stored, rebuilt = (root / INDEX_FILE).read_bytes(), (tmp_path / "rebuilt.faiss").read_bytes()
    if factory.startswith("HNSW"):  # HNSW insertion is multi-threaded: same contents, same answers
        vecs, _, _ = _embeddings(root)
        a = faiss.read_index(str(root / INDEX_FILE)).search(vecs[:50], 5)[1]
        b = faiss.read_index(str(tmp_path / "rebuilt.faiss")).search(vecs[:50], 5)[1]
        np.testing.assert_array_equal(a, b)
    else:
        assert stored == rebuilt


def test_index_false_builds_none(tmp_path):
    root = _store(tmp_path / "s", rows=200, index=IndexConfig(enabled=False))
    assert not (root / INDEX_FILE).exists()
    assert "index" not in ScoreStore(root).manifest
    with pytest.raises(FileNotFoundError, match="no FAISS index"):
        load_index(root)


def test_bad_factory_and_gpu_settings_name_the_key(flat_store, tmp_path):
    with pytest.raises(IndexBuildError, match="index.factory 'IVFx,Nope'"):
        build_index(ScoreStore(flat_store), IndexConfig(factory="IVFx,Nope"), path=tmp_path / "x.faiss")
    with pytest.raises(IndexBuildError, match="index.gpu"):
        build_index(ScoreStore(flat_store), IndexConfig(gpu="sometimes"), path=tmp_path / "x.faiss")
    with pytest.raises(IndexBuildError, match="index.train_sample is 0"):
        build_index(ScoreStore(flat_store), IndexConfig(factory="IVF4,Flat", train_sample=0), path=tmp_path / "x.faiss")
    if faiss.get_num_gpus() == 0:
        with pytest.raises(IndexBuildError, match="index.gpu is true but FAISS sees no GPU"):
            build_index(ScoreStore(flat_store), IndexConfig(gpu=True), path=tmp_path / "x.faiss")
    assert not (tmp_path / "x.faiss").exists()


def test_search_params_stored_and_overridable(recall_store, tmp_path):
    build_index(ScoreStore(recall_store), IndexConfig(factory="IVF32,Flat"), path=tmp_path / "i.faiss")
    index = faiss.read_index(str(tmp_path / "i.faiss"))
    assert faiss.extract_index_ivf(index).nprobe == 8  # default: clamp(nlist / 64, 8, 256)
    vecs, _, _ = _embeddings(recall_store)
    _, at8 = index.search(vecs[:100], 10)
    faiss.ParameterSpace().set_index_parameters(index, "nprobe=32")
    _, at32 = index.search(vecs[:100], 10)
    _, rows, _ = _embeddings(recall_store)
    exact = rows[np.argsort(-(vecs[:100] @ vecs.T), 1)[:, :10]]
    assert recall_at_k(at32, exact, 10) == pytest.approx(1.0)  # nprobe = nlist: every list, exact
    assert recall_at_k(at8, exact, 10) < 0.95
    with pytest.raises(IndexBuildError, match="could not set parameter nprobe"):  # the store's index is Flat
        search(recall_store, vecs[:100], 10, search_params="nprobe=32")


def test_recall_at_k_counts_shared_ids():
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, -1]]), np.array([[3, 2, 9], [4, 6, 7]]), 3) == pytest.approx(3 / 6)


# -- config ------------------------------------------------------------------------------------------------


def _pl(*overrides: str, files=()) -> PseudolabelConfig:
    return load_config(PseudolabelConfig, list(files), ["out=/tmp/x", "data.root=/tmp/y", *overrides])


def test_index_config_accepts_bool_string_and_mapping(tmp_path):
    assert _pl().index == IndexConfig() and bool(_pl().index)
    assert not _pl("index=false").index and _pl("index=false").index.factory == "Flat"
    assert _pl("index=true").index == IndexConfig()
    assert _pl("index=HNSW32").index.factory == "HNSW32"
    assert _pl("index=IVF4096,PQ64").index.factory == "IVF4096,PQ64"
    assert _pl("index.train_sample=5000").index.train_sample == 5000
    f = tmp_path / "a.yaml"
    f.write_text("index: false\n")
    assert not _pl(files=[f]).index
    g = tmp_path / "b.yaml"
    g.write_text("index: {factory: 'IVF1024,PQ32', gpu: false, search_params: nprobe=16}\n")
    cfg = _pl("index.train_sample=777", files=[f, g]).index
    assert (cfg.factory, cfg.gpu, cfg.search_params, cfg.train_sample, cfg.enabled) == \
        ("IVF1024,PQ32", False, "nprobe=16", 777, False)  # the mapping merges key by key over index: false
    h = tmp_path / "c.yaml"
    h.write_text("index: HNSW32\n")
    assert _pl("index.seed=5", files=[h]).index == IndexConfig(factory="HNSW32", seed=5)
    with pytest.raises(ConfigError, match="index.nlist"):
        _pl("index.nlist=5")


@pytest.mark.slow  # about 10 s alone (torch, the tiny teacher), 25 s on a busy machine
def test_pseudolabel_stage_builds_the_configured_index(coco256_root, tmp_path):
    from tests.conftest import TINY_TEACHER, make_subset_dataset
    from vlpl.pseudolabel.stage import run_pseudolabel

    data = make_subset_dataset(coco256_root, tmp_path / "data", n_train=6)
    out = tmp_path / "store"
    run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], [
        f"data.root={data}", f"out={out}", "num_workers=0", "progress=false", "views.grid=0",
        "index=HNSW8"]))
    entry = ScoreStore(out).manifest["index"]
    assert entry["factory"] == "HNSW8" and entry["num_vectors"] == 6 and entry["type"] == "IndexIDMap2(IndexHNSWFlat)"
    emb = ScoreStore(out).arrays(("image_embedding",))["image_embedding"].astype(np.float32)
    _, ids = search(out, emb, k=1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(6))
