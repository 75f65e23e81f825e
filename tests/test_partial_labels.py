"""Partial labels (issue 12, items 1-2): protocols (keep ratio, CSL's FPC/RPS), real partial annotations
(folder positives/negatives, OpenImages, VG-200), the store's labels_kind, model selection without full labels,
and a real-partial run end to end on coco256."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vlpl.config import ConfigError, DataConfig, ObservedConfig, load_config
from vlpl.data.observed import (
    fixed_per_class,
    partial_keep_mask,
    protocol_entry,
    random_per_sample,
    simulate_observed,
)
from vlpl.data.readers import DatasetFormatError, load_dataset, read_coco

REPO = Path(__file__).resolve().parent.parent
TINY_CLIP = REPO / "configs" / "models" / "tiny.yaml"
TINY_NET = REPO / "configs" / "models" / "tiny_classifier.yaml"


def _labels(n: int, c: int, p: float, seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).rand(n, c) < p).astype(np.int8)


def _with_global_seed(seed: int, fn):  # run reference code on numpy's global stream, then restore it
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return fn()
    finally:
        np.random.set_state(state)


# --------------------------------------------------------------------------------------------------
# protocols
# --------------------------------------------------------------------------------------------------


def test_keep_ratio_is_the_mlr_pl_reference_for_every_p() -> None:
    """HCP-MLR-PL's changeLabelProportion, restated: np.random.seed(0); mask = random(shape); mask[mask < p] = 1;
    mask[mask < 1] = 0; label = mask * labels (labels in +-1)."""
    y = _labels(40, 7, 0.3, 1)
    pm = 2 * y.astype(np.float64) - 1
    for p in (0.1, 0.3, 0.5, 0.7, 0.9):
        def ref(p: float = p) -> np.ndarray:
            mask = np.random.random(pm.shape)
            mask[mask < p] = 1
            mask[mask < 1] = 0
            return mask * pm
        want = _with_global_seed(0, ref)
        np.testing.assert_array_equal(partial_keep_mask(y, keep=p, seed=0), want.astype(np.int8))
        got = simulate_observed(y, ObservedConfig(mode="partial", keep=p))  # seed 0 by default
        np.testing.assert_array_equal(got, want.astype(np.int8))
    with pytest.raises(ConfigError, match="data.observed.keep"):
        simulate_observed(y, ObservedConfig(mode="partial", keep=0.0))


def test_fpc_counts_reference_and_seeds() -> None:
    y = _labels(60, 5, 0.2, 2)
    y[:, 4] = 0
    y[:3, 4] = 1  # class 4: only 3 positives, fewer than N
    n = 8
    got = fixed_per_class(y, n, seed=0)
    for c in range(5):
        n_pos, n_neg = int(y[:, c].sum()), int((y[:, c] == 0).sum())
        assert (got[:, c] == 1).sum() == min(n, n_pos) and (got[:, c] == -1).sum() == min(n, n_neg)
    assert (got[:, 4] == 1).sum() == 3
    ann = got != 0
    np.testing.assert_array_equal(got[ann] == 1, y[ann] == 1)  # annotations agree with the truth

    def csl() -> np.ndarray:  # CSL's coco_simulation.py "fix_per_class", with -1 for unknown, 0 for negative
        out = -np.ones_like(y)
        for c in range(y.shape[1]):
            idx_pos, idx_neg = np.where(y[:, c] == 1)[0], np.where(y[:, c] == 0)[0]
            sp = np.random.choice(idx_pos, np.minimum(n, len(idx_pos)), replace=False)
            sn = np.random.choice(idx_neg, np.minimum(n, len(idx_neg)), replace=False)
            out[sp, c], out[sn, c] = 1, 0
        return out
    ref = _with_global_seed(0, csl)
    np.testing.assert_array_equal(got, np.select([ref == 1, ref == 0], [1, -1], 0))
    cfg = ObservedConfig(mode="fpc", per_class=n)
    np.testing.assert_array_equal(simulate_observed(y, cfg), got)  # reproducible with the recorded seed 0
    assert protocol_entry(cfg) == {"mode": "fpc", "seed": 0, "per_class": 8}
    other = simulate_observed(y, ObservedConfig(mode="fpc", per_class=n, seed=1))
    assert (other != got).any()
    with pytest.raises(ConfigError, match="per_class"):
        simulate_observed(y, ObservedConfig(mode="fpc", per_class=0))


def test_rps_share_reference_and_seeds() -> None:
    y = _labels(400, 50, 0.1, 3)
    got = random_per_sample(y, 0.5, seed=0)
    share = (got == 0).mean()
    assert abs(share - 0.5) < 4 * np.sqrt(0.25 / got.size)  # within 4 sigma of the expected share
    kept = got != 0
    np.testing.assert_array_equal(got[kept], (2 * y - 1)[kept])

    def csl() -> np.ndarray:
        s = y.astype(np.int64).copy()
        s[np.random.random(s.shape) < 0.5] = -1
        return s
    ref = _with_global_seed(0, csl)
    np.testing.assert_array_equal(got, np.select([ref == 1, ref == 0], [1, -1], 0))
    # RPS(q) keeps exactly what the keep-ratio protocol with keep = q drops (same seed, same stream)
    np.testing.assert_array_equal(got != 0, partial_keep_mask(y, 0.5, seed=0) == 0)
    cfg = ObservedConfig(mode="rps", drop=0.5, seed=7)
    a, b = simulate_observed(y, cfg), simulate_observed(y, cfg)
    np.testing.assert_array_equal(a, b)
    assert (a != got).any() and protocol_entry(cfg) == {"mode": "rps", "seed": 7, "drop": 0.5}


def test_coco_json_order_is_the_mlr_pl_row_order(tmp_path: Path) -> None:
    ann = {"categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}],
           "images": [{"id": 10, "file_name": "x10.jpg"}, {"id": 9, "file_name": "x9.jpg"},
                      {"id": 100, "file_name": "x100.jpg"}],
           "annotations": [{"id": 1, "image_id": 10, "category_id": 3}, {"id": 2, "image_id": 100, "category_id": 1}]}
    (tmp_path / "annotations").mkdir()
    for name in ("instances_train2014.json", "instances_val2014.json"):
        (tmp_path / "annotations" / name).write_text(json.dumps(ann))
    base = {"format": "coco", "root": str(tmp_path), "keep_unannotated": True}
    cole = read_coco(DataConfig(**base))
    mlr = read_coco(DataConfig(**base, image_order="json"))
    assert [it.image for it in cole.train] == ["train2014/x10.jpg", "train2014/x100.jpg", "train2014/x9.jpg"]
    assert [it.image for it in mlr.train] == ["train2014/x10.jpg", "train2014/x9.jpg", "train2014/x100.jpg"]
    with pytest.raises(ConfigError, match="image_order"):
        read_coco(DataConfig(**base, image_order="numeric"))


# --------------------------------------------------------------------------------------------------
# real partial annotations
# --------------------------------------------------------------------------------------------------


def _folder(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    (tmp_path / name).write_text(text)
    return tmp_path


def _data(root: Path, **kw) -> DataConfig:
    return load_config(DataConfig, [], [f"root={root}", "val_fraction=0", *[f"{k}={v}" for k, v in kw.items()]])


def test_folder_positives_negatives_csv_and_jsonl(tmp_path: Path) -> None:
    csv_root = _folder(tmp_path / "c", "image,split,positives,negatives\n"
                       "a.jpg,train,cat,dog|bird\nb.jpg,train,,cat\nc.jpg,val,dog|bird,\nd.jpg,test,bird,cat\n")
    ds = load_dataset(_data(csv_root, **{"observed.mode": "given"}))
    assert ds.labels_kind == "partial"
    assert ds.observed_protocol == {"mode": "given"}
    by = {s.image: s for s in ds.samples}
    np.testing.assert_array_equal(by["a.jpg"].labels, [1, -1, -1])
    np.testing.assert_array_equal(by["b.jpg"].labels, [-1, 0, 0])
    np.testing.assert_array_equal(by["c.jpg"].labels, [0, 1, 1])
    assert by["c.jpg"].split == "val"
    for s in ("a.jpg", "b.jpg", "c.jpg"):  # train and val: the annotations are the observed labels
        np.testing.assert_array_equal(by[s].observed, by[s].labels)
    np.testing.assert_array_equal(by["d.jpg"].labels, [-1, 0, 1])
    np.testing.assert_array_equal(by["d.jpg"].observed, [0, 0, 0])  # test annotations: evaluation only

    rows = [{"image": "a.jpg", "split": "train", "positives": ["cat"], "negatives": ["dog", "bird"]},
            {"image": "b.jpg", "split": "train", "positives": [], "negatives": ["cat"]},
            {"image": "c.jpg", "split": "val", "positives": ["dog", "bird"], "negatives": []},
            {"image": "d.jpg", "split": "test", "positives": ["bird"], "negatives": ["cat"]}]
    jl = _folder(tmp_path / "j", "\n".join(json.dumps(r) for r in rows) + "\n", "labels.jsonl")
    ds2 = load_dataset(_data(jl, **{"observed.mode": "given"}))
    for s1, s2 in zip(ds.samples, ds2.samples):
        assert s1.image == s2.image
        np.testing.assert_array_equal(s1.labels, s2.labels)
        np.testing.assert_array_equal(s1.observed, s2.observed)


@pytest.mark.parametrize("text,match", [
    ("image,split,positives,negatives\na.jpg,train,cat,cow\n", r"line 2: unknown class name 'cow' in negatives"),
    ("image,split,positives,negatives\na.jpg,train,dog,cat\nb.jpg,train,cat|dog,dog\n",
     r"line 3: class 'dog' is listed both as a positive and as a negative"),
    ("image,split,positives\na.jpg,train,cat\n", r"line 1: missing column\(s\) negatives"),
])
def test_folder_partial_errors_name_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    root = _folder(tmp_path, text)
    with pytest.raises(DatasetFormatError, match=match) as e:
        load_dataset(_data(root, **{"observed.mode": "given"}))
    assert str(root / "labels.csv") in str(e.value)


def test_folder_partial_jsonl_keys_must_agree_and_simulation_is_refused(tmp_path: Path) -> None:
    rows = ['{"image": "a.jpg", "split": "train", "positives": ["cat"], "negatives": []}',
            '{"image": "b.jpg", "split": "train", "labels": ["cat"]}']
    root = _folder(tmp_path / "j", "\n".join(rows) + "\n", "labels.jsonl")
    with pytest.raises(DatasetFormatError, match=r"line 2: .*every line must use the keys of the first"):
        load_dataset(_data(root, **{"observed.mode": "given"}))
    root2 = _folder(tmp_path / "c", "image,split,positives,negatives\na.jpg,train,cat,dog\n")
    with pytest.raises(ConfigError, match="partial annotations.*use mode 'given'"):
        load_dataset(_data(root2, **{"observed.mode": "partial"}))


def _openimages(root: Path, train_rows: str, test_rows: str = "ImageID,Source,LabelName,Confidence\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "oidv6-class-descriptions.csv").write_text(
        "LabelName,DisplayName\n/m/01,Cat\n/m/02,Dog\n/m/03,Bow\n/m/04,Bow\n")
    (root / "oidv6-train-annotations-human-imagelabels.csv").write_text(train_rows)
    (root / "test-annotations-human-imagelabels.csv").write_text(test_rows)
    return root


def test_openimages_image_level_csv(tmp_path: Path) -> None:
    root = _openimages(tmp_path, "ImageID,Source,LabelName,Confidence\n"
                       "bb,verification,/m/02,0\naa,verification,/m/01,1\naa,crowdsource-verification,/m/01,1\n"
                       "aa,verification,/m/03,0\n",
                       "ImageID,Source,LabelName,Confidence\ncc,verification,/m/04,1\n")
    ds = load_dataset(load_config(DataConfig, [], [f"root={root}", "format=openimages", "val_fraction=0",
                                                   "observed.mode=given"]))
    assert ds.classes == ["Cat", "Dog", "Bow (/m/03)", "Bow (/m/04)"]  # shared display names made unique
    assert ds.labels_kind == "partial"
    by = {s.sample_id: s for s in ds.samples}
    assert [s.sample_id for s in ds.samples] == ["train/aa", "train/bb", "test/cc"]  # sorted by ImageID
    assert by["train/aa"].image == "train/aa.jpg"
    np.testing.assert_array_equal(by["train/aa"].labels, [1, 0, -1, 0])
    np.testing.assert_array_equal(by["train/bb"].labels, [0, -1, 0, 0])
    np.testing.assert_array_equal(by["train/aa"].observed, by["train/aa"].labels)
    np.testing.assert_array_equal(by["test/cc"].labels, [0, 0, 0, 1])
    np.testing.assert_array_equal(by["test/cc"].observed, [0, 0, 0, 0])


@pytest.mark.parametrize("rows,match", [
    ("aa,v,/m/01,1\naa,v,/m/02,0.5\n", r"line 3: Confidence '0.5'; expected 1 .* or 0"),
    ("aa,v,/m/09,1\n", r"line 2: LabelName '/m/09' is not in the class descriptions"),
    ("aa,v,/m/01,1\nbb,v, ,0\n", r"line 3: empty LabelName"),
    ("aa,v,/m/01,1\nbb,v,/m/01,1\naa,v,/m/01,0\n", r"lines 2, 4: image 'aa' has class '/m/01' both as a positive"),
])
def test_openimages_errors_name_file_and_row(tmp_path: Path, rows: str, match: str) -> None:
    root = _openimages(tmp_path, "ImageID,Source,LabelName,Confidence\n" + rows)
    with pytest.raises(DatasetFormatError, match=match) as e:
        load_dataset(load_config(DataConfig, [], [f"root={root}", "format=openimages", "observed.mode=given"]))
    assert "oidv6-train-annotations-human-imagelabels.csv" in str(e.value)


def test_vg200_release_files(tmp_path: Path) -> None:
    (tmp_path / "train_list_500.txt").write_text("2.jpg\n1.jpg\n3.jpg\n")
    (tmp_path / "test_list_500.txt").write_text("4.jpg\n")
    (tmp_path / "vg_category_200_labels_index.json").write_text(
        json.dumps({"1.jpg": [0, 2], "2.jpg": [], "3.jpg": [1], "4.jpg": [2, 2]}))
    cfg = [f"root={tmp_path}", "format=vg200", "val_fraction=0", "observed.mode=partial", "observed.keep=0.5"]
    with pytest.raises(ConfigError, match="ships none"):
        load_dataset(load_config(DataConfig, [], cfg))
    (tmp_path / "classes.txt").write_text("man\nshirt\ntree\n")
    ds = load_dataset(load_config(DataConfig, [], cfg))
    assert ds.labels_kind == "full" and [s.image for s in ds.samples] == [
        "VG_100K/2.jpg", "VG_100K/1.jpg", "VG_100K/3.jpg", "VG_100K/4.jpg"]
    np.testing.assert_array_equal(ds.label_matrix(), [[0, 0, 0], [1, 0, 1], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(ds.observed_matrix("train"), partial_keep_mask(ds.label_matrix("train"), 0.5, 0))
    (tmp_path / "vg_category_200_labels_index.json").write_text(json.dumps({"1.jpg": [3], "2.jpg": [], "3.jpg": [],
                                                                             "4.jpg": []}))
    with pytest.raises(DatasetFormatError, match=r"entry '1.jpg' has class index 3, outside 0..2"):
        load_dataset(load_config(DataConfig, [], cfg))


# --------------------------------------------------------------------------------------------------
# model selection without full labels
# --------------------------------------------------------------------------------------------------


def _reader(labels, observed, kind="partial"):
    return SimpleNamespace(name="val", labels=None if labels is None else np.asarray(labels, np.int8),
                           labels_kind=kind, observed=np.asarray(observed, np.int8), __len__=lambda: 2)


def test_selection_criteria_and_their_defaults() -> None:
    from vlpl.eval.selection import Selector, prediction_arrays, resolve_criterion

    obs = [[1, -1, 0], [-1, 1, 1], [1, 0, -1]]
    probs = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4], [0.3, 0.6, 0.7]])
    none = _reader(None, obs)
    partial = _reader(obs, obs)
    full = _reader([[1, 0, 0], [0, 1, 1], [1, 0, 0]], obs, "full")
    assert resolve_criterion("auto", full) == "map"
    assert resolve_criterion("auto", partial) == "masked_map_observed"
    assert resolve_criterion("auto", none) == "masked_map_observed"
    with pytest.raises(ConfigError, match="'map' needs full labels on the val split, which has no labels"):
        resolve_criterion("map", none)
    with pytest.raises(ConfigError, match="select: expected one of"):
        resolve_criterion("best", full)
    sel = Selector("auto", none)
    # masked mAP on the observed labels, by hand: class 0 annotated (+: 0.9, -: 0.1, +: 0.3), both positives above
    # the negative -> AP 1; class 1 (-: 0.2, +: 0.8) -> AP 1; class 2 (+: 0.4, -: 0.7) -> AP 1/2; mean 5/6
    assert sel.score("val", none, probs, is_val=True) == pytest.approx(100 * 5 / 6)
    arr = prediction_arrays(none)
    np.testing.assert_array_equal(arr["labels"], obs)
    assert str(arr["labels_kind"]) == "partial" and str(arr["labels_source"]) == "observed"
    assert "labels_kind" not in prediction_arrays(full)


# --------------------------------------------------------------------------------------------------
# end to end: a real positives/negatives file for coco256 -> store -> train (AN) -> evaluate (masked mAP)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def partial_coco256(coco256_root: Path, tmp_path_factory) -> Path:
    """coco256 with a hand-made partial file: per image 2 positives (fewer if it has fewer) and 5 negatives,
    drawn from its full labels with RandomState(0); images are referenced in place."""
    root = tmp_path_factory.mktemp("partial")
    classes = (coco256_root / "classes.txt").read_text().split("\n")
    classes = [c for c in classes if c]
    rng = np.random.RandomState(0)
    rows = []
    for r in csv.DictReader(open(coco256_root / "labels.csv")):
        pos = [c for c in r["labels"].split("|") if c]
        neg = [c for c in classes if c not in pos]
        rows.append({"image": r["image"], "split": r["split"],
                     "positives": "|".join(rng.permutation(pos)[:2]) if pos else "",
                     "negatives": "|".join(rng.choice(neg, 5, replace=False))})
    with open(root / "labels_partial.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "split", "positives", "negatives"])
        w.writeheader()
        w.writerows(rows)
    # the repository's example file (configs/datasets/coco256_partial_real.csv) is exactly this recipe's output
    assert (root / "labels_partial.csv").read_bytes() == (REPO / "configs" / "datasets" /
                                                         "coco256_partial_real.csv").read_bytes()
    return root


@pytest.fixture(scope="module")
def partial_store(partial_coco256: Path, coco256_root: Path, tmp_path_factory) -> Path:
    """`vlpl pseudolabel` with configs/datasets/coco256_partial_real.yaml on the positives/negatives file (read
    only by the tests that use it)."""
    from vlpl.config import PseudolabelConfig
    from vlpl.pseudolabel.stage import run_pseudolabel

    store = tmp_path_factory.mktemp("partial_store") / "store"
    run_pseudolabel(load_config(PseudolabelConfig, [TINY_CLIP, REPO / "configs" / "datasets" /
                                                    "coco256_partial_real.yaml"], [
        f"data.root={coco256_root}", f"data.labels={partial_coco256 / 'labels_partial.csv'}", f"out={store}",
        "shard_size=128", "num_workers=0", "progress=false", "views.grid=1", "index.enabled=false"]))
    return store


def test_real_partial_end_to_end(partial_store: Path, tmp_path: Path) -> None:
    from vlpl.config import EvaluateConfig
    from vlpl.eval.stage import run_evaluate
    from vlpl.store.store import ScoreStore
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    store = partial_store
    st = ScoreStore(store)
    assert st.labels_kind == "partial" and st.manifest["observed"] == {"mode": "given"}
    train, test = st.split("train"), st.split("test")
    assert train.labels_kind == "partial"
    np.testing.assert_array_equal(train.observed, train.labels)  # the annotations are the observed labels
    assert ((train.observed == 1).sum(1) <= 2).all() and ((train.observed == -1).sum(1) == 5).all()
    assert (test.observed == 0).all() and ((test.labels == -1).sum(1) == 5).all()

    run = tmp_path / "run"
    run_train(load_train_config([str(TINY_NET)], [f"store={store}", f"out={run}", "progress=false", "method=an",
                                                  "epochs=1", "max_steps_per_epoch=1", "num_workers=0"]))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["select"] == "masked_map_observed"  # auto: the val split has no full labels
    rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["select"] for r in rec if r["kind"] == "epoch"] == ["masked_map_observed"]
    with np.load(run / "predictions" / "test.npz") as z:
        assert str(z["labels_kind"]) == "partial" and set(np.unique(z["labels"])) <= {-1, 0, 1}

    out = run_evaluate(load_config(EvaluateConfig, [], [f"run={run}", f"out={tmp_path / 'ev'}", "plots=false"]))
    report = json.loads((out / "report.json").read_text())
    m = report["run"]["metrics"]
    assert report["run"]["labels_kind"] == "partial" and report["run"]["selected_by"] == "masked_map_observed"
    from vlpl.eval.metrics import masked_average_precision
    with np.load(run / "predictions" / "test.npz") as z:
        want = masked_average_precision(z["labels"], z["probs"])
    assert m["masked"]["map"] == pytest.approx(want["map"])
    assert m["masked"]["num_classes_skipped"] == want["num_classes_skipped"] > 0
    md = (out / "report.md").read_text()
    assert "## Partial evaluation labels" in md and "masked mAP (%)" in md and "unknown = negative" in md
    assert "val masked mAP on the val split's observed labels" in md
    from vlpl.eval.report import summary_text
    assert "masked mAP" in summary_text(report, out) and "counts unknown entries as negatives" in summary_text(report)
    from vlpl.eval.stage import compare_runs
    table = compare_runs([str(out)])
    assert "masked mAP (%)" in table and f"{m['masked']['map']:.2f}" in table


@pytest.mark.parametrize("name,mode,fmt", [("coco2014_partial", "partial", "coco"), ("coco2014_fpc1000", "fpc", "coco"),
                                           ("coco2014_rps05", "rps", "coco"), ("openimages_v6", "given", "openimages"),
                                           ("vg200_partial", "partial", "vg200"),
                                           ("coco256_partial_real", "given", "folder")])
def test_partial_dataset_configs_load(name: str, mode: str, fmt: str, tmp_path: Path) -> None:
    from vlpl.config import PseudolabelConfig

    cfg = load_config(PseudolabelConfig, [REPO / "configs" / "datasets" / f"{name}.yaml"], [f"out={tmp_path}"])
    assert (cfg.data.observed.mode, cfg.data.format) == (mode, fmt)
    if name == "coco2014_partial":
        assert cfg.data.image_order == "json" and cfg.data.keep_unannotated


def test_partial_store_zero_shot_report_and_teacher_agreement(partial_store: Path, coco256_store: Path,
                                                              tmp_path: Path) -> None:
    """Store mode on a partial store: masked mAP beside Cole's, pseudo-label quality skipped (no full labels);
    and select=teacher_agreement on a full store: the val number is the mAP against the rule's pseudo-labels."""
    from vlpl.config import EvaluateConfig
    from vlpl.eval.metrics import mean_average_precision
    from vlpl.eval.selection import Selector
    from vlpl.eval.stage import run_evaluate
    from vlpl.store.store import ScoreStore
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    store = partial_store
    out = run_evaluate(load_config(EvaluateConfig, [], [f"store={store}", f"out={tmp_path / 'ev'}", "plots=false"]))
    report = json.loads((out / "report.json").read_text())
    zs = report["store"]["zero_shot"]["scores"]
    assert report["store"]["labels_kind"] == "partial" and report["store"]["pseudo_labels"] is None
    assert "partial annotations" in report["store"]["pseudo_labels_skipped"]
    assert all(0 <= s["masked"]["map"] <= 100 and s["masked"]["num_classes_used"] > 0 for s in zs.values())
    assert all(r.get("masked_map") is not None for r in report["headline"])
    assert "## Partial evaluation labels" in (out / "report.md").read_text()

    run = tmp_path / "run"
    run_train(load_train_config([str(TINY_NET)], [f"store={coco256_store}", f"out={run}", "progress=false",
                                                  "method=an", "pseudo.rule=damp", "epochs=1",
                                                  "max_steps_per_epoch=1", "num_workers=0",
                                                  "select=teacher_agreement"]))
    rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x]
    rec = [r for r in rec if r["kind"] == "epoch"]
    assert rec[0]["select"] == "teacher_agreement"
    val = ScoreStore(coco256_store).split("val")
    with np.load(run / "predictions" / "val.npz") as z:
        probs = z["probs"]
    targets = Selector("teacher_agreement", val, "damp", {}).teacher_targets(val)
    assert targets.any() and rec[0]["val_map"] == pytest.approx(mean_average_precision(targets, probs)["map_pos"])
    assert json.loads((run / "summary.json").read_text())["select"] == "teacher_agreement"


def test_fpc_store_records_its_protocol_and_the_record_reproduces_it(coco256_root: Path, tmp_path: Path) -> None:
    """A coco256 store made with FPC(3): the manifest records mode, seed and N; re-simulating from that record
    gives the store's observed labels; each class has min(3, #pos) positives and 3 negatives annotated over the
    official train split (train + val rows)."""
    from vlpl.config import PseudolabelConfig
    from vlpl.pseudolabel.stage import run_pseudolabel
    from vlpl.store.store import ScoreStore

    store = tmp_path / "store"
    cfg = load_config(PseudolabelConfig, [TINY_CLIP], [
        f"data.root={coco256_root}", f"out={store}", "data.observed.mode=fpc", "data.observed.per_class=3",
        "shard_size=128", "num_workers=0", "progress=false", "views.grid=1", "index.enabled=false"])
    run_pseudolabel(cfg)
    st = ScoreStore(store)
    rec = st.manifest["observed"]
    assert rec == {"mode": "fpc", "seed": 0, "per_class": 3} and st.labels_kind == "full"
    obs = {}
    for name in ("train", "val"):
        sp = st.split(name)
        obs.update(zip(sp.sample_ids, sp.observed))
    # the official train split in file order (labels.csv rows of split train), as the protocol saw it
    rows = [r for r in csv.DictReader(open(coco256_root / "labels.csv")) if r["split"] == "train"]
    classes = [c for c in (coco256_root / "classes.txt").read_text().split("\n") if c]
    y = np.array([[c in r["labels"].split("|") for c in classes] for r in rows], np.int8)
    again = simulate_observed(y, ObservedConfig(**rec))  # from the record alone
    got = np.stack([obs[str(Path(r["image"]).with_suffix(""))] for r in rows])
    np.testing.assert_array_equal(got, again)
    assert ((got == -1).sum(0) == 3).all()
    np.testing.assert_array_equal((got == 1).sum(0), np.minimum(3, y.sum(0)))
