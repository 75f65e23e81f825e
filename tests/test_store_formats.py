"""Compact score forms (per-view embeddings, sparse top-k) and the memory-bounded sidecar readers.

Every form reads back through the same split readers as dense ``(B, variants, views, C)`` batches; the
embeddings form equals dense to float16 rounding and can take a new class without an image pass; top-k keeps
the softmax denominators at the rules' temperature; sidecar reads hold only the rows asked for.
"""
from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TEACHER, make_subset_dataset

from vlpl.pseudolabel.params import TEMP
from vlpl.pseudolabel.rules import apply_rule, view_softmax
from vlpl.store.formats import FLOOR_TEMP, ScoreForm, densify, encode_views, topk_from_dense
from vlpl.store.store import ScoreStore, ShardRows, StoreError, StoreWriter, retarget_classes, sha256_lines

EXTRA = "traffic cone"


# --------------------------------------------------------------------------------------------------
# the top-k form by hand
# --------------------------------------------------------------------------------------------------


def test_topk_by_hand():
    """C = 5, V = 2, k = 2: the class set is the top-2 of the max over views; the floor is
    T * (logsumexp(dropped / T) - log 3); densify puts the kept scores back and the floor elsewhere."""
    s = np.array([[[0.30, 0.10, 0.20, 0.05, 0.00],
                   [0.10, 0.40, 0.00, 0.05, 0.02]]], np.float32)  # max over views: .30 .40 .20 .05 .02
    idx, kept, floor = topk_from_dense(s, 2, temp=0.1)
    assert idx.tolist() == [[0, 1]]
    assert kept.tolist() == [[[np.float16(0.30), np.float16(0.10)], [np.float16(0.10), np.float16(0.40)]]]
    f0 = 0.1 * (math.log(math.exp(2.0) + math.exp(0.5) + math.exp(0.0)) - math.log(3))
    f1 = 0.1 * (math.log(math.exp(0.0) + math.exp(0.5) + math.exp(0.2)) - math.log(3))
    np.testing.assert_allclose(floor[0], [f0, f1], rtol=1e-6)
    d = densify(idx, kept, floor, 5)
    np.testing.assert_allclose(d[0, 0], [0.30, 0.10, f0, f0, f0], atol=1e-3)
    np.testing.assert_allclose(d[0, 1], [0.10, 0.40, f1, f1, f1], atol=1e-3)
    # the floor lies between the mean and the max of the dropped cosines, and the softmax at T is exact
    assert np.mean(s[0, 0, 2:]) <= f0 <= np.max(s[0, 0, 2:])
    np.testing.assert_allclose(np.exp(d[0] / 0.1).sum(1), np.exp(s[0] / 0.1).sum(1), rtol=2e-3)
    # bytes a row at the target: k = 64, V = 34, C = 10,000 -> <= 5 KB
    assert ScoreForm.create("topk", 34, 10_000, 512, 64).bytes_per_row <= 5 * 1024
    assert ScoreForm.create("embeddings", 34, 10_000, 512).bytes_per_row == 34 * 512 * 2
    assert FLOOR_TEMP == TEMP  # exact at the rules' temperature
    # the class set keeps every view's top class first: class 0 leads the global view (0.5) although two
    # classes of view 1 have a higher cosine (0.9, 0.8); ranking by the max over views would drop it
    s2 = np.array([[[0.5, 0.1, 0.2, 0.0], [0.1, 0.9, 0.8, 0.0]]], np.float32)
    assert topk_from_dense(s2, 2)[0].tolist() == [[0, 1]]
    assert topk_from_dense(s2, 3)[0].tolist() == [[0, 1, 2]]


def test_encode_views_matches_numpy():
    """The device-side encoder (torch) gives the numpy form's payload."""
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(6, 4, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    dense = (feats @ text.T).numpy()
    form = ScoreForm.create("topk", 4, 30, 8, 7)
    got = encode_views(form, feats, text)
    want = form.from_dense(dense)
    assert np.array_equal(got["topk_classes"], want["topk_classes"])
    np.testing.assert_allclose(got["topk_scores"].astype(np.float32), want["topk_scores"].astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(got["topk_floor"], want["topk_floor"], atol=1e-5)
    emb = ScoreForm.create("embeddings", 4, 30, 8)
    back = emb.dense(encode_views(emb, feats, text), text.numpy())
    np.testing.assert_allclose(back, dense, atol=2e-3)
    t = form.dense_torch(got, None, "cpu")
    np.testing.assert_allclose(t.numpy(), form.dense(got), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# real stores of every form (tiny teacher)
# --------------------------------------------------------------------------------------------------


def _build(data: Path, out: Path, *extra: str) -> Path:
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel

    return run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], [
        f"data.root={data}", f"out={out}", "shard_size=16", "num_workers=0", "progress=false", "views.grid=2",
        "index=false", *extra]))


@pytest.fixture(scope="module")
def form_stores(coco256_root, tmp_path_factory):
    """The same 40 images: ``dense`` over C + 1 classes (the last one new), ``embeddings`` over the C
    original classes, ``topk`` (k = 16) over C + 1."""
    base = tmp_path_factory.mktemp("forms")
    data = make_subset_dataset(coco256_root, base / "data", 32, 8)
    ext = make_subset_dataset(coco256_root, base / "data_ext", 32, 8)
    (ext / "classes.txt").write_text((ext / "classes.txt").read_text().rstrip("\n") + f"\n{EXTRA}\n")
    return {"dense": _build(ext, base / "dense"),
            "embeddings": _build(data, base / "emb", "score_format=embeddings"),
            "topk": _build(ext, base / "topk", "score_format=topk", "topk=16"),
            "data": data}


def _all(store: ScoreStore, split: str):
    sp = store.split(split)
    return sp, sp.scores(np.arange(len(sp)))


def _damp(scores: np.ndarray, observed: np.ndarray, **kw) -> np.ndarray:
    return apply_rule("damp", torch.from_numpy(np.ascontiguousarray(scores)), torch.from_numpy(np.array(observed)),
                      dynamic=False, **kw).numpy()


def test_embedding_form_equals_dense_and_takes_a_new_class_without_an_image_pass(form_stores, monkeypatch):
    dense, emb = ScoreStore(form_stores["dense"]), ScoreStore(form_stores["embeddings"])
    C = emb.num_classes
    assert emb.score_format == "embeddings" and dense.num_classes == C + 1
    assert emb.score_columns == ["view_embeddings"] and "scores" not in emb.columns
    for split in ("train", "test"):
        (sd, d), (se, e) = _all(dense, split), _all(emb, split)
        assert se.sample_ids == sd.sample_ids
        np.testing.assert_allclose(e, d[..., :C], atol=2e-3)  # float16 rounding of embeddings vs of cosines
    # add a class: text embeddings from the text tower only; the image tower must not run
    from vlpl.vlm.backend import VLMBackend

    monkeypatch.setattr(VLMBackend, "encode_image", lambda *a, **k: pytest.fail("image pass"))
    before = {split: np.array(emb.split(split).observed) for split in ("train", "test")}
    new_text = dense.text_embeddings()
    assert np.allclose(new_text[:C], emb.text_embeddings(), atol=1e-6)
    retarget_classes(form_stores["embeddings"], dense.classes, new_text)
    emb2 = ScoreStore(form_stores["embeddings"])
    assert emb2.classes == dense.classes and emb2.manifest["classes_sha256"] == sha256_lines(dense.classes)
    assert emb2.label_classes == dense.classes[:C]
    for split in ("train", "test"):
        (sd, d), (se, e) = _all(dense, split), _all(emb2, split)
        np.testing.assert_allclose(e, d, atol=2e-3)
        # observed labels of the stored classes unchanged; the new class is unknown (0)
        assert np.array_equal(se.observed[:, :C], before[split]) and (se.observed[:, C] == 0).all()
        assert np.array_equal(se.observed_at([1, 0]), np.asarray(se.observed)[[1, 0]])
        if sd.labels is not None:
            assert np.array_equal(se.labels[:, :C], sd.labels[:, :C])
        # same pseudo-labels (DAMP, and VLPL with pseudo negatives)
        assert np.array_equal(_damp(e, sd.observed), _damp(d, sd.observed))
        same = (_damp(e, sd.observed, negatives="pseudo", negative_ratio=0.5)
                == _damp(d, sd.observed, negatives="pseudo", negative_ratio=0.5)).mean()
        assert same >= 0.995, same
    # re-running the stage with the new class list on the embeddings store points at retarget_classes
    with pytest.raises(StoreError, match="retarget_classes"):
        with StoreWriter(form_stores["embeddings"]) as w:
            w.prepare({**emb.manifest, "classes_sha256": "other", "samples_sha256": "other"}, ["a"],
                      np.zeros((1, emb.embedding_dim), np.float32))
    # a dense store cannot change its classes without an image pass
    with pytest.raises(StoreError, match="only an 'embeddings' store"):
        retarget_classes(form_stores["dense"], dense.classes, new_text)


def test_topk_form_agrees_with_dense_where_it_keeps_the_information(form_stores):
    dense, top = ScoreStore(form_stores["dense"]), ScoreStore(form_stores["topk"])
    assert top.score_format == "topk" and top.form.k == 16 and top.manifest["score_form"]["k"] == 16
    for split in ("train", "test"):
        (sd, d), (_, t) = _all(dense, split), _all(top, split)
        flat_d, flat_t = d.reshape(len(d), -1, d.shape[-1]), t.reshape(len(t), -1, t.shape[-1])
        kept = np.zeros((len(flat_d), flat_d.shape[-1]), bool)
        np.put_along_axis(kept, topk_from_dense(flat_d, 16)[0].astype(np.int64), True, axis=1)
        assert np.take_along_axis(kept, flat_d.argmax(axis=2), axis=1).all()  # every view's top class is kept
        # kept classes: the dense values, in every view; dropped: one floor per view, between their mean and max
        np.testing.assert_allclose(np.where(kept[:, None], flat_t, 0), np.where(kept[:, None], flat_d, 0), atol=1e-3)
        floor = flat_t[:, :, np.argmin(kept, axis=1)].diagonal(axis1=0, axis2=2).T  # (N, V)
        dropped = np.where(kept[:, None], np.nan, flat_d)
        assert (floor <= np.nanmax(dropped, axis=2) + 1e-3).all() and (floor >= np.nanmean(dropped, axis=2) - 1e-3).all()
        # per-view softmax at the rules' temperature: kept classes' probabilities equal dense's
        pt, pd = view_softmax(torch.from_numpy(flat_t), TEMP).numpy(), view_softmax(torch.from_numpy(flat_d), TEMP).numpy()
        np.testing.assert_allclose(np.where(kept[:, None], pt, 0), np.where(kept[:, None], pd, 0), atol=2e-3)
        # DAMP positives (default: neutral negatives) agree for every image
        assert np.array_equal(_damp(t, sd.observed), _damp(d, sd.observed))
        # pseudo negatives: the bottom set is picked among tied dropped classes (the documented difference);
        # the negatives never fall on a kept class where dense has none
        pn_t = _damp(t, sd.observed, negatives="pseudo", negative_ratio=0.5)
        pn_d = _damp(d, sd.observed, negatives="pseudo", negative_ratio=0.5)
        assert ((pn_t == 1) == (pn_d == 1)).all()
        assert ((pn_t == -1).sum(1) == (pn_d == -1).sum(1)).all()
        # ... ordered by the store's class prior (text @ mean image embedding), not by class id: most agree
        assert (pn_t == pn_d).mean() >= 0.85, (pn_t == pn_d).mean()
        assert len(top.manifest["mean_image_embedding"]) == top.embedding_dim


def test_every_form_evaluates_and_inspects(form_stores):
    """inspect and the evaluate scan stream every form (same dense batches)."""
    import shutil

    from vlpl.config import EvaluateConfig
    from vlpl.eval.stage import _evaluate_store
    from vlpl.store.inspect import summarize

    results = {}
    for form in ("dense", "topk"):
        shutil.rmtree(form_stores[form] / "cache", ignore_errors=True)
        section, _ = _evaluate_store(form_stores[form], EvaluateConfig(store=str(form_stores[form]), rules={"damp": {}}))
        results[form] = section
        s = summarize(form_stores[form])
        assert s["scores"]["global_view"]["max"] > s["scores"]["global_view"]["min"]
        assert s["score_format"] == form
        assert not (form_stores[form] / "cache").exists()  # a streamed pass writes nothing beside the store
    for name in ("global", "damp"):  # global cosine AP only sees the kept classes' order: close to dense
        assert abs(results["topk"]["zero_shot"]["scores"][name]["map"]
                   - results["dense"]["zero_shot"]["scores"][name]["map"]) < 10.0


# --------------------------------------------------------------------------------------------------
# memory bound of the sidecar readers
# --------------------------------------------------------------------------------------------------


def _synthetic_store(root: Path, n: int, C: int, V: int = 2, shard: int = 512) -> Path:
    rng = np.random.default_rng(0)
    ident = {"schema_version": 2, "classes": [f"c{i}" for i in range(C)], "classes_sha256": sha256_lines([f"c{i}" for i in range(C)]),
             "views": {"grid": 0, "flips": True, "image_size": [8, 8]}, "score_format": "dense", "embedding_dim": 4,
             "model": {}, "shard_size": shard}
    w = StoreWriter(root)
    w.prepare(ident, ident["classes"], np.eye(C, 4, dtype=np.float32))
    k = 0
    for k, start in enumerate(range(0, n, shard)):
        m = min(shard, n - start)
        w.write_shard(k, ShardRows(
            sample_id=[f"s{start + i}" for i in range(m)], image=[f"img/{start + i}.jpg" for i in range(m)],
            split=["train"] * m, observed=rng.integers(-1, 2, (m, C)).astype(np.int8),
            labels=rng.integers(0, 2, (m, C)).astype(np.int8), labels_known=np.ones(m, bool),
            scores=rng.standard_normal((m, V, C)).astype(np.float16),
            image_embedding=rng.standard_normal((m, 4)).astype(np.float16),
            ok=np.ones(m, bool), error=[None] * m))
    w.finalize(ident, k + 1, build_index=False)
    return root


def test_sidecar_reads_hold_only_the_rows_asked_for(tmp_path):
    """A whole pass of random-access batches over a 4,096-row store: the values equal the shards', the
    Python heap peak is a few batches (not N rows: the row-group path holds the decoded store), and the
    split's labels / names are not materialised."""
    n, C, B = 4096, 256, 32
    root = _synthetic_store(tmp_path / "s", n, C)
    ref = ScoreStore(root, sidecars=False)
    sp_ref = ref.split("train")
    store = ScoreStore(root)
    store.prepare_sidecars()
    sp = store.split("train")
    assert sp.sample_ids == sp_ref.sample_ids and sp.images[5] == "img/5.jpg"
    perm = np.random.default_rng(1).permutation(n)
    row_bytes = 2 * C * 4  # float32 out
    tracemalloc.start()
    for k in range(0, n, B):
        p = perm[k:k + B]
        s = sp.scores(p)
        o = sp.observed_at(p)
        lab = sp.labels_at(p)
        del s, o, lab
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * B * row_bytes + (1 << 20), peak  # a few batches, whatever N
    tracemalloc.start()
    for k in range(0, n, B):
        sp_ref.scores(perm[k:k + B])
    _, peak_ref = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_ref > n * 2 * C * 2  # the row-group cache holds the whole decoded store: grows with N
    for p in (perm[:B], np.arange(n)[::97], [3, 3, 2]):
        assert np.array_equal(sp.scores(p), sp_ref.scores(p))
        assert np.array_equal(sp.observed_at(p), sp_ref.observed[p]) and np.array_equal(sp.labels_at(p), sp_ref.labels[p])
        assert np.array_equal(sp.image_embeddings(p), sp_ref.image_embeddings(p))
    assert (root / "cache" / "part-00000.embedding.image_embedding.npy").is_file()  # read from its own sidecar
    assert np.array_equal(np.asarray(sp.observed), sp_ref.observed)
    # the streamed reader (inspect / evaluate): same values, read from row groups, nothing materialised at open
    st = ScoreStore(root, sidecars=False).split("train", sidecars=False)
    assert st.sample_ids == sp_ref.sample_ids and st.images[-1] == sp_ref.images[-1]
    for p in (perm[:B], np.arange(n)[::97]):
        assert np.array_equal(st.observed_at(p), sp_ref.observed[p]) and np.array_equal(st.labels_at(p), sp_ref.labels[p])
        assert np.array_equal(st.scores(p), sp_ref.scores(p))


def test_a_corrupt_sidecar_is_rebuilt_and_a_changed_shard_is_not_served(tmp_path):
    root = _synthetic_store(tmp_path / "s", 600, 16)
    store = ScoreStore(root)
    want = ScoreStore(root, sidecars=False).split("train").scores(np.arange(600))
    store.prepare_sidecars()
    side = root / "cache" / "part-00000.scores.scores.npy"
    (root / "cache" / ".part-00000.scores.scores.npy.ab12.tmp").write_bytes(b"x")  # left by a killed reader
    data = bytearray(side.read_bytes())
    data[-5] ^= 0x10  # a bit of the last row of shard 0
    side.write_bytes(bytes(data))
    fresh = ScoreStore(root)
    assert np.array_equal(fresh.split("train").scores(np.arange(600)), want)  # CRC caught it, rebuilt
    assert not list((root / "cache").glob("*.tmp"))  # the rebuild removed the killed reader's temp file
    # a shard changed on disk (size / mtime differ from the sidecar's mark) is read again, not served stale
    shard = root / "shards" / "part-00000.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="part-00000.parquet"):
        ScoreStore(root).split("train").scores(np.arange(600))


def _open_and_read(root: str, q) -> None:
    store = ScoreStore(Path(root))
    sp = store.split("train")
    q.put(sp.scores(np.arange(len(sp))[::5]).tobytes())


def test_processes_opening_a_store_at_once_share_its_sidecars(tmp_path):
    """Two processes reading the same new store at the same time: one builds, the other waits on the file
    lock and reads the same files; both get the shards' values."""
    import multiprocessing as mp

    root = _synthetic_store(tmp_path / "s", 1200, 32)
    want = ScoreStore(root, sidecars=False).split("train").scores(np.arange(1200)[::5]).tobytes()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_open_and_read, args=(str(root), q)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got == [want, want]
    cache = root / "cache"
    assert sorted(p.name for p in cache.glob("part-*.scores.json")) == [f"part-0000{i}.scores.json" for i in range(3)]
    assert not list(cache.rglob("*.tmp"))
