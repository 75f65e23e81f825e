"""vlpl export --format hf: the DatasetDict, its Features, the Parquet / save_to_disk round trips, the card."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest

from vlpl.config import ExportConfig, load_config

CONFIG = "vlpl_tiny_damp"


def _cfg(store: Path, out: Path, *overrides: str) -> ExportConfig:
    return load_config(ExportConfig, [], [f"store={store}", f"out={out}", *overrides])


def _expected(store_root: Path, split: str, rule: str = "damp", **params: Any) -> Dict[str, Any]:
    """What the export must hold for ``split``, read through the store API alone (not the exporter's reader)."""
    import torch

    from vlpl.pseudolabel.rules import RuleRows, apply_rule
    from vlpl.store.store import ScoreStore

    store = ScoreStore(store_root)
    sp = store.split(split)
    pos = np.arange(len(sp))
    scores = sp.scores(pos)  # (N, 2, 5, C) float32 from float16
    pseudo = apply_rule(rule, torch.from_numpy(scores), torch.from_numpy(sp.observed), dynamic=False,
                        rows=RuleRows(sp, pos), **params).numpy()
    return {"sample_id": list(sp.sample_ids), "image": list(sp.images), "observed": sp.observed,
            "labels": sp.labels, "scores": scores, "views": store.view_spec.flatten(scores),
            "emb": sp.image_embeddings(pos), "pseudo": pseudo, "classes": store.classes}


@pytest.fixture(scope="module")
def full_export(coco256_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """coco256 exported with every optional column (no images), saved to disk too."""
    from vlpl.export.stage import run_export

    base = tmp_path_factory.mktemp("export")
    out, disk = base / "out", base / "disk"
    run_export(_cfg(coco256_store, out, "all_views=true", "embeddings=true", "sparse_topk=5",
                    f"save_to_disk={disk}"), argv=["vlpl", "export", str(coco256_store)])
    return {"out": out, "disk": disk, "store": coco256_store}


def _files(out: Path, config: str = CONFIG) -> Dict[str, str]:
    """data_files per split (``data_dir=`` alone would rename "val" to "validation", datasets' split keywords)."""
    return {s: str(out / config / f"{s}-*.parquet") for s in ("train", "val", "test")}


def _as_np(ds: Any, col: str, dtype: Any) -> np.ndarray:
    return np.asarray(ds.with_format("numpy")[col], dtype=dtype)


def test_export_round_trip_parquet_and_disk(full_export: Dict[str, Path]) -> None:
    """load_from_disk and load_dataset("parquet") give the same rows, the schema's Features, and the store's values
    exactly: ids, observed, labels, float16 scores of the global view and every view, embeddings, the rule's labels."""
    import datasets

    from vlpl.export.schema import ExportSchema, read_export_metadata

    out, disk = full_export["out"], full_export["disk"]
    meta = read_export_metadata(out)
    schema = ExportSchema.from_metadata(meta)
    assert read_export_metadata(disk) == meta  # the save_to_disk folder carries the same metadata
    from_disk = datasets.load_from_disk(str(disk))
    from_parquet = datasets.load_dataset("parquet", data_files=_files(out))
    from_card = datasets.load_dataset(str(out), CONFIG)  # the card's configs: data_files
    assert set(from_disk) == set(from_parquet) == set(from_card) == {"train", "val", "test"}
    assert schema.columns == ["image", "sample_id", "observed", "pseudo_positives", "pseudo_negatives",
                              "vlpl_tiny_score", "vlpl_tiny_damp_score", "vlpl_tiny_views", "image_embedding",
                              "labels", "vlpl_tiny_topk"]
    for split in ("train", "val", "test"):
        want = _expected(full_export["store"], split)
        n, c = want["observed"].shape
        for ds in (from_disk[split], from_parquet[split], from_card[split]):
            assert ds.features == schema.features()
            assert ds.column_names == schema.columns
            assert ds["sample_id"] == want["sample_id"] and ds["image"] == want["image"]
            np.testing.assert_array_equal(_as_np(ds, "observed", np.int8), want["observed"])
            np.testing.assert_array_equal(_as_np(ds, "labels", np.int8), want["labels"])
            glob = _as_np(ds, "vlpl_tiny_score", np.float32)
            np.testing.assert_array_equal(glob, want["scores"][:, 0, 0])  # float16 in the store: exact
            np.testing.assert_array_equal(_as_np(ds, "vlpl_tiny_views", np.float32), want["views"])
            np.testing.assert_array_equal(_as_np(ds, "image_embedding", np.float32),
                                          want["emb"].astype(np.float16).astype(np.float32))
            pseudo = np.zeros((n, c), np.int8)
            for i, (p, q) in enumerate(zip(ds["pseudo_positives"], ds["pseudo_negatives"])):
                pseudo[i, p] = 1
                pseudo[i, q] = -1
            np.testing.assert_array_equal(pseudo, want["pseudo"])
            assert (pseudo == 1).any()
    feats = from_parquet["train"].features
    assert feats["pseudo_positives"].feature.names == want["classes"]
    assert str(feats["vlpl_tiny_score"].feature.dtype) == "float16" and feats["vlpl_tiny_score"].length == c
    assert feats["vlpl_tiny_views"].shape == (10, c)


def test_rule_aggregate_column_is_damp_phi(full_export: Dict[str, Path]) -> None:
    """<teacher>_damp_score is DAMP's phi on the unflipped views (gate on the observed labels), as float16."""
    import datasets
    import torch

    from vlpl.pseudolabel.rules import damp_scores

    ds = datasets.load_from_disk(str(full_export["disk"]))["train"]
    want = _expected(full_export["store"], "train")
    phi, _ = damp_scores(torch.from_numpy(want["scores"][:, 0]), torch.from_numpy(want["observed"]))
    np.testing.assert_array_equal(_as_np(ds, "vlpl_tiny_damp_score", np.float32),
                                  phi.numpy().astype(np.float16).astype(np.float32))


def test_sparse_topk_equals_dense_topk(full_export: Dict[str, Path]) -> None:
    """<teacher>_topk lists the K best classes of the dense global score column, best first (ties: lower class id),
    with the same float16 scores."""
    import datasets

    ds = datasets.load_dataset("parquet", data_files=_files(full_export["out"]))["test"]
    dense = _as_np(ds, "vlpl_tiny_score", np.float32)
    for i, top in enumerate(ds["vlpl_tiny_topk"]):
        classes = [t["class"] for t in top]
        assert classes == np.argsort(-dense[i], kind="stable")[:5].tolist()
        np.testing.assert_array_equal(np.array([t["score"] for t in top], np.float32), dense[i, classes])


def test_card_front_matter_and_quality(full_export: Dict[str, Path]) -> None:
    """The card's YAML parses with yaml.safe_load, has the task fields and one config entry with its data_files;
    the body names the teacher, the rule and its parameters; the quality numbers are the pseudo-labels' P/R/F1 on
    unobserved entries and the teacher's mAP, recomputed here from the store."""
    import yaml  # noqa: F401 - the card module parses with it

    from vlpl.eval.metrics import mean_average_precision
    from vlpl.eval.quality import pseudo_label_quality
    from vlpl.export.card import front_matter
    from vlpl.export.schema import read_export_metadata

    text = (full_export["out"] / "README.md").read_text()
    fm = front_matter(text)
    assert fm["task_categories"] == ["image-classification"]
    assert fm["task_ids"] == ["multi-label-image-classification"]
    assert fm["annotations_creators"] == ["machine-generated"]
    assert fm["license"] == "other"
    assert fm["configs"] == [{"config_name": CONFIG, "default": True, "data_files": [
        {"split": s, "path": f"{CONFIG}/{s}-*"} for s in ("train", "val", "test")]}]
    assert "`vlpl-tiny`" in text and "Rule**: `damp`" in text and "`top_k=3`" in text and "RANDOM MODELS" in text
    assert "a photo of a {}." in text  # the templates
    q = read_export_metadata(full_export["out"])["quality"]["test"]
    want = _expected(full_export["store"], "test")
    ref = pseudo_label_quality(want["pseudo"], want["labels"], want["observed"])["excluding_observed"]
    assert q["pseudo_labels"]["excluding_observed"]["f1"] == pytest.approx(ref["f1"])
    assert q["pseudo_labels"]["excluding_observed"]["precision"] == pytest.approx(ref["precision"])
    m = mean_average_precision(want["labels"], want["scores"][:, 0, 0])["map"]
    assert q["teacher_map"]["vlpl_tiny_score"]["map"] == pytest.approx(m)
    assert f"{m:.2f}" in text


def test_metadata_records_source_and_columns(full_export: Dict[str, Path]) -> None:
    from vlpl.store.store import ScoreStore

    meta = json.loads((full_export["out"] / CONFIG / "vlpl_export.json").read_text())
    store = ScoreStore(full_export["store"])
    assert meta["store"]["manifest_sha256"] == store.manifest["manifest_sha256"]
    assert meta["classes"] == store.classes and meta["views"] == store.view_spec.to_dict()
    assert meta["score_kind"]["score_kind"] == "cosine"  # ScoreKind.to_dict(), readable by from_manifest
    assert meta["rule"]["name"] == "damp" and meta["rule"]["params"]["eta"] == 0.3
    assert meta["splits"] == {"train": 102, "val": 26, "test": 128}
    assert meta["provenance"]["command"].startswith("vlpl export")
    assert set(meta["columns"]) == set(meta["columns"]) & {
        "image", "sample_id", "observed", "pseudo_positives", "pseudo_negatives", "vlpl_tiny_score",
        "vlpl_tiny_damp_score", "vlpl_tiny_views", "image_embedding", "labels", "vlpl_tiny_topk"}


def test_cli_rules_by_name_add_configs(coco256_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Through the CLI: --rule vlpl --rule-param, and --thresholds (rule calibrated), into one folder: the card then
    lists both configs, each loads by name, and each holds its own rule's labels."""
    import datasets

    from vlpl.cli import main
    from vlpl.pseudolabel.calibrate import calibrate_store, write_thresholds

    th = tmp_path / "th.json"
    write_thresholds(th, calibrate_store(str(coco256_store), aggregate="global", split="train"))
    out = tmp_path / "out"
    assert main(["export", str(coco256_store), "--out", str(out), "--rule", "vlpl", "--rule-param", "threshold=0.02",
                 "--split", "val"]) == 0
    assert "vlpl_tiny_vlpl (val 26 rows)" in capsys.readouterr().out
    assert main(["export", str(coco256_store), "--out", str(out), "--thresholds", str(th), "--split", "val"]) == 0
    from vlpl.export.card import front_matter

    fm = front_matter((out / "README.md").read_text())
    assert [c["config_name"] for c in fm["configs"]] == ["vlpl_tiny_calibrated", "vlpl_tiny_vlpl"]
    for name, rule, params in (("vlpl_tiny_vlpl", "vlpl", {"threshold": 0.02}),
                               ("vlpl_tiny_calibrated", "calibrated", {"thresholds": str(th)})):
        ds = datasets.load_dataset(str(out), name)["val"]
        want = _expected(coco256_store, "val", rule, **params)
        got = np.zeros_like(want["pseudo"])
        for i, (p, q) in enumerate(zip(ds["pseudo_positives"], ds["pseudo_negatives"])):
            got[i, p], got[i, q] = 1, -1
        np.testing.assert_array_equal(got, want["pseudo"])
        assert f"vlpl_tiny_{rule}_score" in ds.column_names


def test_with_images_holds_the_files_bytes(coco256_store: Path, coco256_root: Path, tmp_path: Path) -> None:
    import datasets

    from vlpl.export.stage import run_export

    run_export(_cfg(coco256_store, tmp_path / "out", "with_images=true", "splits=[val]"))
    ds = datasets.load_dataset("parquet", data_files={"val": str(tmp_path / "out" / CONFIG / "val-*.parquet")})["val"]
    assert isinstance(ds.features["image"], datasets.Image)
    raw = ds.cast_column("image", datasets.Image(decode=False))
    for row in raw.select(range(3)):
        assert row["image"]["bytes"] == (coco256_root / row["image"]["path"]).read_bytes()
    assert ds[0]["image"].size[0] > 0  # decodes


@pytest.mark.parametrize("overrides, message", [
    (["rule=nope"], "nope"),
    (["rule=damp", "thresholds=__TH__"], "takes no thresholds file"),
    (["format=cole", "all_views=true"], "all_views"),
    (["format=xml"], "format"),
    (["rule_params.bogus=1"], "bogus"),
    (["private=true"], "push_to_hub"),
])
def test_export_refusals(coco256_store: Path, tmp_path: Path, overrides: list, message: str) -> None:
    """Bad settings are refused before anything is written, naming the key or option."""
    from vlpl.export.stage import run_export

    th = tmp_path / "th.json"
    th.write_text("{}")
    cfg = _cfg(coco256_store, tmp_path / "out", *[o.replace("__TH__", str(th)) for o in overrides])
    with pytest.raises(ValueError, match=message):
        run_export(cfg)
    assert not (tmp_path / "out").exists()


def test_partial_labels_store(coco256_real_partial_store: Path, tmp_path: Path) -> None:
    """A store with real partial annotations exports them as they are ({-1, 0, 1}); the card measures the teacher's
    masked mAP and no pseudo-label precision (there is no full ground truth to measure it against)."""
    import datasets

    from vlpl.eval.metrics import masked_average_precision
    from vlpl.export.schema import read_export_metadata
    from vlpl.export.stage import run_export
    from vlpl.store.store import ScoreStore

    out = tmp_path / "out"
    run_export(_cfg(coco256_real_partial_store, out, "splits=[test]"))
    ds = datasets.load_dataset(str(out), CONFIG)["test"]
    sp = ScoreStore(coco256_real_partial_store).split("test")
    labels = _as_np(ds, "labels", np.int8)
    np.testing.assert_array_equal(labels, sp.labels)
    assert (labels == -1).any() and (labels == 1).any() and (labels == 0).any()
    q = read_export_metadata(out)["quality"]["test"]
    assert "pseudo_labels" not in q
    glob = sp.scores(np.arange(len(sp)))[:, 0, 0]
    assert q["teacher_map"]["vlpl_tiny_score"]["masked_map"] == pytest.approx(
        masked_average_precision(sp.labels, glob)["map"])


def test_ensemble_export(coco256_store: Path, tmp_path: Path) -> None:
    """A teacher ensemble (here one store twice, equal weights) exports under the prefix `ensemble`, its members in
    the metadata and the card, its scores the weighted mean (= the store's for identical members)."""
    import datasets

    from vlpl.export.schema import read_export_metadata
    from vlpl.export.stage import run_export

    out = tmp_path / "out"
    cfg = load_config(ExportConfig, [], [f"store=[{coco256_store}, {coco256_store}]", f"out={out}", "splits=[val]"])
    run_export(cfg)
    meta = read_export_metadata(out)
    assert meta["teacher"]["column_prefix"] == "ensemble" and len(meta["teacher"]["members"]) == 2
    card = (out / "README.md").read_text()
    assert "an ensemble of 2 teachers" in card and "RANDOM MODELS" in card
    ds = datasets.load_dataset(str(out), "ensemble_damp")["val"]
    want = _expected(coco256_store, "val")
    np.testing.assert_array_equal(_as_np(ds, "ensemble_score", np.float32), want["scores"][:, 0, 0])


def test_interrupted_build_folder_is_removed(coco256_store: Path, tmp_path: Path) -> None:
    """A build folder left by a killed export (its process gone) is removed by the next export into that folder;
    the published metadata names no host."""
    from vlpl.export.schema import read_export_metadata
    from vlpl.export.stage import run_export

    out = tmp_path / "out"
    stale = out / ".vlpl-export-build.999999999.abc"
    (stale / "junk").mkdir(parents=True)
    run_export(_cfg(coco256_store, out, "splits=[val]"))
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", CONFIG]
    assert "host" not in read_export_metadata(out)["provenance"]


def test_failed_rows_are_left_out(coco256_root: Path, tmp_path: Path) -> None:
    """Images the teacher could not read (failed rows: no scores) are not exported, and the card says how many."""
    import datasets

    from tests.conftest import TINY_TEACHER, make_subset_dataset
    from vlpl.config import PseudolabelConfig
    from vlpl.export.stage import run_export
    from vlpl.pseudolabel.stage import run_pseudolabel

    data = make_subset_dataset(coco256_root, tmp_path / "data", n_train=6, n_test=2,
                               bad=[(2, "corrupt.jpg", b"not a jpeg" * 20, "train", "person")])
    store = tmp_path / "store"
    run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], [
        f"data.root={data}", f"out={store}", "num_workers=0", "progress=false", "views.grid=1", "views.flips=false",
        "data.val_fraction=0", "max_failed_fraction=0.5"]))
    out = tmp_path / "out"
    run_export(_cfg(store, out, "all_views=true"))
    ds = datasets.load_dataset(str(out), CONFIG)
    assert len(ds["train"]) == 6 and "images/corrupt.jpg" not in ds["train"]["image"]
    assert np.isfinite(_as_np(ds["train"], "vlpl_tiny_views", np.float32)).all()
    assert "1 image(s) the teacher could not read are left out" in (out / "README.md").read_text()
