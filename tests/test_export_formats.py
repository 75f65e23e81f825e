"""vlpl export --format cole | laion: the papers' files, read back with the project's Cole reader and numpy/pyarrow."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlpl.config import ExportConfig, load_config


def _cfg(store: Path, out: Path, *overrides: str) -> ExportConfig:
    return load_config(ExportConfig, [], [f"store={store}", f"out={out}", *overrides])


def test_cole_round_trip_through_read_cole(coco256_store: Path, coco256_root: Path, tmp_path: Path) -> None:
    """formatted_{train,val}_*.npy read by vlpl's own Cole reader (observed.mode given, the labels_obs files) give
    every store row's observed and full labels back, sample by sample; the pseudo-labels file is the rule's output;
    Cole's train = the store's train + val, Cole's val = the store's test."""
    import torch

    from vlpl.config import DataConfig, ObservedConfig
    from vlpl.data.readers import load_dataset
    from vlpl.export.stage import run_export
    from vlpl.pseudolabel.rules import RuleRows, apply_rule
    from vlpl.store.store import ScoreStore

    out = tmp_path / "cole"
    run_export(_cfg(coco256_store, out, "format=cole"))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["classes.txt", "vlpl_export.json"] + [f"formatted_{s}_{k}.npy" for s in ("train", "val")
                                               for k in ("images", "labels", "labels_obs", "labels_pseudo")])
    ds = load_dataset(DataConfig(format="cole", root=str(out), image_root=str(coco256_root),
                                 observed=ObservedConfig(mode="given")))
    store = ScoreStore(coco256_store)
    assert ds.classes == store.classes
    by_id = {s.sample_id: s for s in ds.samples}
    assert len(by_id) == store.num_rows == 256
    cole_split = {"train": "train", "val": "train", "test": "test"}
    for split in ("train", "val", "test"):
        sp = store.split(split)
        for i, sid in enumerate(sp.sample_ids):
            s = by_id[sid]
            assert s.image == sp.images[i]
            np.testing.assert_array_equal(s.observed, sp.observed[i])
            np.testing.assert_array_equal(s.labels, sp.labels[i])
            assert (s.split == "test") == (cole_split[split] == "test")
    # the pseudo-labels file, row-aligned with formatted_train_images.npy (store train rows, then val rows)
    pseudo = np.load(out / "formatted_train_labels_pseudo.npy")
    images = np.load(out / "formatted_train_images.npy")
    want, refs = [], []
    for split in ("train", "val"):
        sp = store.split(split)
        pos = np.arange(len(sp))
        want.append(apply_rule("damp", torch.from_numpy(sp.scores(pos)), torch.from_numpy(sp.observed),
                               dynamic=False, rows=RuleRows(sp, pos)).numpy())
        refs += list(sp.images)
    np.testing.assert_array_equal(pseudo, np.concatenate(want))
    assert images.tolist() == refs and pseudo.dtype == np.int8


def test_cole_refuses_partial_labels(coco256_real_partial_store: Path, tmp_path: Path) -> None:
    from vlpl.export.stage import run_export

    with pytest.raises(ValueError, match="labels_kind 'partial'"):
        run_export(_cfg(coco256_real_partial_store, tmp_path / "cole", "format=cole"))


def test_laion_layout_reads_back(coco256_store: Path, tmp_path: Path) -> None:
    """img_emb/img_emb_NNNN.npy (float16, unit norm) and metadata/metadata_NNNN.parquet, 100 rows a pair, row i of
    each the same image: the store's embedding normalised, its path, id, split, observed and pseudo positives."""
    import pyarrow.parquet as pq

    from vlpl.export.stage import run_export
    from vlpl.store.store import ScoreStore

    out = tmp_path / "laion"
    run_export(_cfg(coco256_store, out, "format=laion", "rows_per_file=100"))
    embs = sorted((out / "img_emb").glob("*.npy"))
    metas = sorted((out / "metadata").glob("*.parquet"))
    assert [p.name for p in embs] == ["img_emb_0000.npy", "img_emb_0001.npy", "img_emb_0002.npy"]
    assert [p.name for p in metas] == ["metadata_0000.parquet", "metadata_0001.parquet", "metadata_0002.parquet"]
    emb = [np.load(p) for p in embs]
    assert [len(e) for e in emb] == [100, 100, 56] and all(e.dtype == np.float16 for e in emb)
    emb_all = np.concatenate(emb).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb_all, axis=1), 1.0, atol=2e-3)
    meta = pq.read_table(metas).to_pylist()
    store = ScoreStore(coco256_store)
    rows = [(s, i) for s in store.splits() for i in range(len(store.split(s)))]
    assert len(meta) == len(rows) == 256
    k = 0
    for split in store.splits():
        sp = store.split(split)
        e = sp.image_embeddings(np.arange(len(sp)))
        want = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float16)
        np.testing.assert_array_equal(emb_all[k:k + len(sp)].astype(np.float16), want)
        for i in range(len(sp)):
            m = meta[k + i]
            assert (m["image_path"], m["sample_id"], m["split"]) == (sp.images[i], sp.sample_ids[i], split)
            obs = [store.classes[j] for j in np.flatnonzero(sp.observed[i] == 1)]
            assert m["observed_positives"] == obs
            assert m["caption"].split(", ")[: len(obs)] == obs
        k += len(sp)
    # a second export with fewer files leaves no stale pair behind
    run_export(_cfg(coco256_store, out, "format=laion", "rows_per_file=1000"))
    assert [p.name for p in sorted((out / "img_emb").glob("*.npy"))] == ["img_emb_0000.npy"]
    assert [p.name for p in sorted((out / "metadata").glob("*.parquet"))] == ["metadata_0000.parquet"]
