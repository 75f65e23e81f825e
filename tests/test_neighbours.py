"""Neighbour consensus (rule ``knn``): hand-built index, hand-computed smoothing, self / other splits excluded,
the cache beside the store, and the real coco256 store against brute force."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vlpl.pseudolabel import neighbours as nbm
from vlpl.pseudolabel.neighbours import neighbour_table, neighbour_weights, smooth_scores
from vlpl.pseudolabel.rules import RuleRows, apply_rule

ANGLES = {0: 0.0, 1: 10.0, 2: 30.0, 3: 90.0, 4: 3.0}  # store row -> angle (degrees); row 4 is a test image
SPLIT_OF = {0: "train", 1: "train", 2: "train", 3: "train", 4: "test"}
# (rows, variants=2, views=2, C=2) cached cosines; variant 1 = flipped
SCORES = np.array([
    [[[0.10, 0.50], [0.20, 0.40]], [[0.30, 0.70], [0.40, 0.60]]],
    [[[0.50, 0.10], [0.60, 0.20]], [[0.70, 0.30], [0.80, 0.40]]],
    [[[0.90, 0.20], [0.10, 0.10]], [[0.90, 0.40], [0.30, 0.30]]],
    [[[0.00, 0.00], [0.00, 0.00]], [[0.20, 0.20], [0.20, 0.20]]],
    [[[0.40, 0.40], [0.40, 0.40]], [[0.40, 0.40], [0.40, 0.40]]],
], dtype=np.float32)


def _emb(row: int) -> np.ndarray:
    a = math.radians(ANGLES[row])
    return np.array([math.cos(a), math.sin(a)], np.float32)


class _Reader:
    def __init__(self, store: "_Store", name: str) -> None:
        self.store, self.name, self.include_failed = store, name, False
        self.rows = np.array([r for r in sorted(SPLIT_OF) if SPLIT_OF[r] == name], np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def image_embeddings(self, pos: np.ndarray) -> np.ndarray:
        return np.stack([_emb(int(r)) for r in self.rows[np.asarray(pos)]])

    def scores(self, pos: np.ndarray) -> np.ndarray:
        return SCORES[self.rows[np.asarray(pos)]]


class _Store:
    """What the neighbour code reads of a ScoreStore: root, manifest, cache_dir, embedding_dim, split()."""

    def __init__(self, root: Path, with_index: bool = True, sha: str = "sha-A") -> None:
        import faiss

        self.root = root
        self.manifest = {"manifest_sha256": sha, "index": {"factory": "Flat"}}
        self.cache_dir = root / "cache"
        self.embedding_dim = 2
        self.calls = 0
        if with_index:
            (root / "index").mkdir(parents=True, exist_ok=True)
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(2))
            ids = np.array(sorted(SPLIT_OF), np.int64)
            index.add_with_ids(np.stack([_emb(int(r)) for r in ids]), ids)
            faiss.write_index(index, str(root / "index" / "image_embeddings.faiss"))

    def split(self, name: str) -> _Reader:
        self.calls += 1
        return _Reader(self, name)


@pytest.fixture(autouse=True)
def _fresh_tables():
    nbm._TABLES.clear()
    nbm._TRAIN_READERS.clear()
    yield
    nbm._TABLES.clear()
    nbm._TRAIN_READERS.clear()


@pytest.mark.parametrize("with_index", [True, False])
def test_neighbours_of_a_hand_built_index(tmp_path, with_index):
    store = _Store(tmp_path, with_index=with_index)
    t = neighbour_table(store, "train", k=2)
    # train rows 0..3 at 0, 10, 30, 90 degrees; the test row 4 (3 degrees, nearest to row 0) is never a neighbour
    # and no row is its own neighbour
    assert t.positions.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    c = lambda d: math.cos(math.radians(d))  # noqa: E731
    np.testing.assert_allclose(t.sims, [[c(10), c(30)], [c(10), c(20)], [c(20), c(30)], [c(60), c(80)]], atol=1e-6)
    te = neighbour_table(store, "test", k=2)
    assert te.positions.tolist() == [[0, 1]]  # training images only; the test image may be nearest itself
    np.testing.assert_allclose(te.sims, [[c(3), c(7)]], atol=1e-6)
    assert t.source == ("index:Flat" if with_index else "exact")


def test_fewer_training_images_than_k(tmp_path):
    t = neighbour_table(_Store(tmp_path), "train", k=5)
    assert (t.positions[:, 3:] == -1).all() and (t.positions[:, :3] >= 0).all()
    assert (t.sims[:, 3:] == 0).all()


def test_weights_and_smoothing_by_hand():
    sims = torch.tensor([[0.9, 0.8, 0.0]])
    valid = torch.tensor([[True, True, False]])
    w = neighbour_weights(sims, valid, "softmax", tau=0.1)
    e = math.exp(0.1 / 0.1)  # exp(0.9/0.1) / exp(0.8/0.1)
    np.testing.assert_allclose(w.numpy(), [[e / (e + 1), 1 / (e + 1), 0.0]], atol=1e-6)
    np.testing.assert_allclose(neighbour_weights(sims, valid, "power", power=2).numpy(),
                               [[0.81 / 1.45, 0.64 / 1.45, 0.0]], atol=1e-6)
    np.testing.assert_allclose(neighbour_weights(sims, valid, "uniform").numpy(), [[0.5, 0.5, 0.0]])
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, views 2, C 2)
    nb = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]], [[9.0, 9.0], [9.0, 9.0]]]])
    out = smooth_scores(s, nb, torch.tensor([[0.75, 0.25, 0.0]]), alpha=0.4)
    mixed = 0.75 * nb[0, 0] + 0.25 * nb[0, 1]
    np.testing.assert_allclose(out[0].numpy(), (0.6 * s[0] + 0.4 * mixed).numpy(), atol=1e-6)
    glob = smooth_scores(s, nb, torch.tensor([[0.75, 0.25, 0.0]]), alpha=0.4, views="global")
    np.testing.assert_allclose(glob[0, 0].numpy(), out[0, 0].numpy())
    np.testing.assert_allclose(glob[0, 1].numpy(), s[0, 1].numpy())  # the tile keeps its own score
    # no valid neighbour: the image keeps its scores
    np.testing.assert_allclose(smooth_scores(s, nb, torch.zeros(1, 3), alpha=0.4).numpy(), s.numpy())


def test_knn_rule_hand_computed(tmp_path):
    store = _Store(tmp_path)
    reader = store.split("train")
    pos = np.array([0, 3])
    full = torch.from_numpy(SCORES[reader.rows[pos]])
    obs = torch.zeros(2, 2, dtype=torch.int8)
    out = apply_rule("knn", full, obs, dynamic=False, rows=RuleRows(reader, pos), base="threshold",
                     base_params={"score": "cosine", "threshold": 0.45}, k=2, alpha=0.5, weighting="uniform")
    # row 0 (variant 0, global view) = [0.1, 0.5]; neighbours rows 1, 2, each the mean of its two variants:
    # row 1 -> [0.6, 0.2], row 2 -> [0.9, 0.3]; uniform mean [0.75, 0.25]; s' = [0.425, 0.375]
    # row 3 = [0, 0]; neighbours rows 2, 1 -> mean [0.75, 0.25]; s' = [0.375, 0.125]
    assert out.tolist() == [[0, 0], [0, 0]]
    out = apply_rule("knn", full, obs, dynamic=False, rows=RuleRows(reader, pos), base="threshold",
                     base_params={"score": "cosine", "threshold": 0.4}, k=2, alpha=0.5, weighting="uniform")
    assert out.tolist() == [[1, 0], [0, 0]]
    # alpha = 0: the base rule on the image's own scores
    same = apply_rule("knn", full, obs, dynamic=False, rows=RuleRows(reader, pos), base="damp", alpha=0.0, k=2)
    assert torch.equal(same, apply_rule("damp", full, obs, dynamic=False))
    # test split rows get training neighbours: row 4 = [0.4, 0.4]; rows 0, 1 -> [0.2, 0.6], [0.6, 0.2]
    te = store.split("test")
    out = apply_rule("knn", torch.from_numpy(SCORES[[4]]), torch.zeros(1, 2, dtype=torch.int8), dynamic=False,
                     rows=RuleRows(te, np.array([0])), base="threshold",
                     base_params={"score": "cosine", "threshold": 0.4}, k=2, alpha=1.0, weighting="uniform")
    assert out.tolist() == [[1, 1]]  # mean [0.4, 0.4] >= 0.4


def test_knn_needs_rows_and_checks_its_base():
    full = torch.zeros(1, 1, 1, 3)
    obs = torch.zeros(1, 3, dtype=torch.int8)
    with pytest.raises(ValueError, match="needs the batch's rows"):
        apply_rule("knn", full, obs, dynamic=False)
    with pytest.raises(Exception, match="base_params.*etaa"):
        apply_rule("knn", full, obs, dynamic=False, base="damp", base_params={"etaa": 1})
    with pytest.raises(Exception, match="knn cannot be its own base"):
        apply_rule("knn", full, obs, dynamic=False, base="knn")


def test_cache_beside_the_store_is_checked_and_rebuilt(tmp_path):
    store = _Store(tmp_path)
    t = neighbour_table(store, "train", k=2)
    data, mark = tmp_path / "cache" / "neighbours" / "train-k2.npz", tmp_path / "cache" / "neighbours" / "train-k2.json"
    assert data.is_file() and json.loads(mark.read_text())["manifest_sha256"] == "sha-A"
    nbm._TABLES.clear()
    calls = []
    real = nbm.compute_neighbours
    nbm.compute_neighbours = lambda *a, **k: calls.append(1) or real(*a, **k)  # type: ignore[assignment]
    try:
        again = neighbour_table(store, "train", k=2)  # from the cache file: nothing computed
        assert calls == [] and np.array_equal(again.positions, t.positions)
        nbm._TABLES.clear()
        data.write_bytes(data.read_bytes()[:-7] + b"garbage")  # damaged file: sha256 mismatch -> rebuilt
        assert np.array_equal(neighbour_table(store, "train", k=2).positions, t.positions) and calls == [1]
        nbm._TABLES.clear()
        store.manifest["manifest_sha256"] = "sha-B"  # another store content -> rebuilt, mark updated
        neighbour_table(store, "train", k=2)
        assert calls == [1, 1] and json.loads(mark.read_text())["manifest_sha256"] == "sha-B"
        neighbour_table(store, "train", k=1)  # another k: its own file
        assert (tmp_path / "cache" / "neighbours" / "train-k1.npz").is_file()
    finally:
        nbm.compute_neighbours = real  # type: ignore[assignment]


def test_coco256_neighbours_match_brute_force(coco256_store):
    from vlpl.store.store import ScoreStore

    store = ScoreStore(coco256_store)
    train = store.split("train")
    t = neighbour_table(store, "train", k=5)
    emb = train.image_embeddings(np.arange(len(train)))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    best = np.sort(sim, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(t.sims, best, atol=1e-3)  # float16 embeddings: ties may swap, similarities agree
    assert (t.positions != np.arange(len(train))[:, None]).all()
    assert t.positions.min() >= 0 and t.positions.max() < len(train)
    # an evaluate-style call (reader with failed rows, test split) gets training neighbours through the table
    test = store.split("test", include_failed=True)
    pos = np.arange(min(8, len(test)))
    full = torch.from_numpy(test.scores(pos))
    obs = torch.from_numpy(test.observed_at(pos))
    out = apply_rule("knn", full, obs, dynamic=False, rows=RuleRows(test, pos), base="damp", k=5, alpha=0.3)
    assert out.shape == obs.shape and out.dtype == torch.int8
