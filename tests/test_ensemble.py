"""Teacher ensembles (issue 14, item 10): ``vlpl pseudolabel`` with several teachers, the ensemble store's
combined scores and rule output against the hand-computed weighted combination, members that do not agree,
and training / evaluating on stores given as a list."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import TINY_TEACHER, make_subset_dataset
from vlpl.config import ConfigError, PseudolabelConfig, load_config
from vlpl.pseudolabel.rules import apply_rule
from vlpl.pseudolabel.stage import run_pseudolabel
from vlpl.store.ensemble import ENSEMBLE_FILE, EnsembleStore, write_ensemble
from vlpl.store.store import ScoreStore, StoreError
from vlpl.store.views import ScoreKind

W = [0.7, 0.3]


def _pseudolabel(data: Path, out: Path, *extra: str, files: List[Path] = ()) -> Path:
    return run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER, *files], [
        f"data.root={data}", f"out={out}", "shard_size=8", "num_workers=0", "progress=false", "views.grid=2",
        "index=false", *extra]))


@pytest.fixture(scope="module")
def data(coco256_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_subset_dataset(coco256_root, tmp_path_factory.mktemp("ens") / "data", n_train=12, n_test=8)


@pytest.fixture(scope="module")
def ensemble(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`vlpl pseudolabel` with two tiny teachers (the same random tower with two different prompts, so their
    scores differ), weights 0.7 / 0.3."""
    cfg = tmp_path_factory.mktemp("cfg") / "ensemble.yaml"
    cfg.write_text(yaml.safe_dump({"teachers": [{"id": "photo", "templates": "a photo of a {}."},
                                                {"id": "bare", "templates": "{}"}],
                                   "ensemble_weights": W}))
    return _pseudolabel(data, tmp_path_factory.mktemp("ens_out") / "store", files=[cfg])


def _all(store: ScoreStore, split: str) -> np.ndarray:
    sp = store.split(split)
    return sp.scores(np.arange(len(sp)))


def test_pseudolabel_with_two_teachers_writes_one_store_each_and_the_manifest(ensemble: Path) -> None:
    manifest = json.loads((ensemble / ENSEMBLE_FILE).read_text())
    assert [m["name"] for m in manifest["members"]] == ["photo", "bare"]
    assert [m["weight"] for m in manifest["members"]] == pytest.approx(W)
    assert [m["path"] for m in manifest["members"]] == ["teachers/photo", "teachers/bare"]
    assert manifest["combine"]["space"] == "raw" and manifest["combine"]["score_kind"] == "cosine"
    a, b = (ScoreStore(ensemble / "teachers" / n) for n in ("photo", "bare"))
    assert a.manifest["templates"] == ["a photo of a {}."] and b.manifest["templates"] == ["{}"]
    assert not np.allclose(_all(a, "train"), _all(b, "train"))  # two different teachers
    assert (ensemble / "config.yaml").is_file() and not (ensemble / "manifest.json").exists()
    # re-running the same command resumes: every member's shards are complete, the manifest is the same
    before = (ensemble / ENSEMBLE_FILE).read_bytes()
    cfg = yaml.safe_load((ensemble / "config.yaml").read_text())
    _pseudolabel(Path(cfg["data"]["root"]), ensemble, f"teachers={json.dumps(cfg['teachers'])}",
                 f"ensemble_weights={W}")
    assert (ensemble / ENSEMBLE_FILE).read_bytes() == before


def test_ensemble_scores_and_rule_output_equal_the_hand_weighted_combination(ensemble: Path) -> None:
    store = ScoreStore.open(ensemble)
    assert isinstance(store, EnsembleStore) and store.weights == pytest.approx(W)
    a, b = (ScoreStore(ensemble / "teachers" / n) for n in ("photo", "bare"))
    for split in ("train", "test"):
        hand = W[0] * _all(a, split).astype(np.float64) + W[1] * _all(b, split).astype(np.float64)
        sp = store.split(split)
        got = sp.scores(np.arange(len(sp)))
        np.testing.assert_allclose(got, hand, rtol=0, atol=1e-6)
        streamed = np.concatenate([s for _, s in sp.iter_scores(5)])
        np.testing.assert_array_equal(streamed, got)
        obs = torch.from_numpy(sp.observed_at(np.arange(len(sp))))
        hand_t = torch.from_numpy(hand.astype(np.float32))
        for rule in ("damp", "vlpl"):
            want = apply_rule(rule, hand_t, obs, dynamic=False)
            np.testing.assert_array_equal(apply_rule(rule, torch.from_numpy(got), obs, dynamic=False), want)
        # labels and ids are the members' own (members agree on them)
        np.testing.assert_array_equal(sp.observed_at(np.arange(len(sp))), a.split(split).observed)
        assert list(sp.sample_ids) == list(a.split(split).sample_ids) and sp.observed_shape == a.split(split).observed_shape
    # the same stores given as a list, and weights given instead of the ensemble's own
    listed = ScoreStore.open([ensemble / "teachers" / "photo", ensemble / "teachers" / "bare"], weights=[7, 3])
    np.testing.assert_allclose(_all(listed, "train"), _all(store, "train"), atol=1e-7)
    only_a = ScoreStore.open(ensemble, weights=[1, 0])
    np.testing.assert_array_equal(_all(only_a, "train"), _all(a, "train"))
    # the identity a training run records names every member and its weight
    members = store.manifest["model"]["ensemble"]
    assert [(m["name"], m["weight"]) for m in members] == [("photo", pytest.approx(0.7)), ("bare", pytest.approx(0.3))]
    with pytest.raises(StoreError, match="given for a single store"):
        ScoreStore.open(ensemble / "teachers" / "photo", weights=[1.0])
    with pytest.raises(ValueError, match="3 weight"):
        ScoreStore.open(ensemble, weights=[1, 2, 3])


def test_members_of_different_score_kinds_are_combined_as_probabilities(ensemble: Path) -> None:
    a, b = (ScoreStore(ensemble / "teachers" / n) for n in ("photo", "bare"))
    b.score_kind = ScoreKind("siglip", 10.0, -5.0)  # as a SigLIP store's manifest would say
    store = EnsembleStore([a, b], [0.5, 0.5], ["clip", "siglip"])
    assert store.combine_rule["space"] == "probability" and store.score_kind.kind == "probability"
    ra, rb = _all(a, "train").astype(np.float64), _all(b, "train").astype(np.float64)
    ea = np.exp((ra - ra.max(-1, keepdims=True)) / 0.01)
    hand = 0.5 * ea / ea.sum(-1, keepdims=True) + 0.5 / (1 + np.exp(-(10.0 * rb - 5.0)))
    np.testing.assert_allclose(_all(store, "train"), hand, atol=1e-5)


def test_mismatched_members_are_refused_naming_both_stores_and_the_item(data: Path, ensemble: Path,
                                                                        tmp_path: Path) -> None:
    photo = ensemble / "teachers" / "photo"

    def variant(name: str, edit) -> Path:
        d = tmp_path / name
        shutil.copytree(data, d)
        edit(d)
        return _pseudolabel(d, tmp_path / f"{name}_store")

    def swap_rows(d: Path) -> None:  # the same images, two rows in another order
        lines = (d / "labels.csv").read_text().splitlines()
        lines[3], lines[4] = lines[4], lines[3]
        (d / "labels.csv").write_text("\n".join(lines) + "\n")

    def swap_classes(d: Path) -> None:
        names = (d / "classes.txt").read_text().split("\n")
        names[0], names[1] = names[1], names[0]
        (d / "classes.txt").write_text("\n".join(names))

    swapped = variant("order", swap_rows)
    with pytest.raises(StoreError, match=r"photo and .*order_store disagree on the samples: row 2: sample_id"):
        ScoreStore.open([photo, swapped])
    classes = variant("classes", swap_classes)
    with pytest.raises(StoreError, match=r"disagree on the classes: class 0 is 'person' vs 'bicycle'"):
        ScoreStore.open([photo, classes])
    grid = _pseudolabel(data, tmp_path / "grid3", "views.grid=3")
    with pytest.raises(StoreError, match="disagree on the views: grid 2, flips True vs grid 3"):
        write_ensemble(tmp_path / "ens", {"a": photo, "b": grid})
    assert not (tmp_path / "ens" / ENSEMBLE_FILE).exists()  # nothing written for a refused ensemble
    # a member changed after the ensemble was made is named
    tampered = tmp_path / "tampered"
    shutil.copytree(ensemble, tampered)
    m = json.loads((tampered / "teachers" / "bare" / "manifest.json").read_text())
    (tampered / "teachers" / "bare" / "manifest.json").write_text(json.dumps(
        {**m, "manifest_sha256": "0" * 64}))
    with pytest.raises(StoreError):
        ScoreStore.open(tampered)


def test_bad_teacher_entries_are_config_errors(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"teachers\[1\].*unknown key 'nmae'"):
        _pseudolabel(data, tmp_path / "x", 'teachers=[{id: a}, {nmae: x}]')
    with pytest.raises(ConfigError, match=r"teachers\[1\].id: 'a' is used twice"):
        _pseudolabel(data, tmp_path / "y", 'teachers=[{id: a}, {id: a}]')
    with pytest.raises(ConfigError, match="2 weight"):
        _pseudolabel(data, tmp_path / "z", 'teachers=[{id: a}]', "ensemble_weights=[1, 2]")


def test_training_and_evaluating_on_stores_given_as_a_list(ensemble: Path, tmp_path: Path) -> None:
    from vlpl.config import EvaluateConfig
    from vlpl.eval.report import teacher_baseline
    from vlpl.eval.stage import run_evaluate
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    members = [str(ensemble / "teachers" / "photo"), str(ensemble / "teachers" / "bare")]
    out = tmp_path / "run"
    net = Path(__file__).resolve().parent.parent / "configs" / "models" / "tiny_classifier.yaml"
    run_train(load_train_config([net], [f"store={json.dumps(members)}", f"ensemble_weights={W}", f"out={out}",
                                        "progress=false", "epochs=1", "max_steps_per_epoch=1", "method=aevlp",
                                        "dataset=coco2014", "val_split=test", "batch_size=4"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["store"] == [str(Path(m).resolve()) for m in members]
    ident = json.loads((out / "store.json").read_text())
    assert [m["weight"] for m in ident["model"]["ensemble"]] == pytest.approx(W)
    report = json.loads((run_evaluate(EvaluateConfig(run=str(out), split="test", plots=False)) /
                         "report.json").read_text())
    want = teacher_baseline(ScoreStore.open(ensemble), "test", "damp", {"eta": 0.3})  # aevlp's coco2014 row
    assert report["baseline"]["scores"] == want["scores"]
    assert summary["teacher_baseline"]["scores"] == want["scores"]  # the run's own summary has it too
    assert report["baseline"]["store"] == "[" + ", ".join(str(Path(m).resolve()) for m in members) + "]"
    assert [m["name"] for m in report["model"]["ensemble"]] == ["photo", "bare"]
    assert "RANDOM MODELS" in (out / "eval" / "report.md").read_text()  # every member is the random tiny teacher


def _damp_phi_of_probabilities(pi: np.ndarray, observed: np.ndarray, eta: float) -> np.ndarray:
    """DAMP's phi (ALGORITHMS.md 7c) from per-view probabilities (N, views, C) in numpy."""
    glob, tiles = pi[:, 0], pi[:, 1:]
    gate = np.minimum(np.where(observed == 1, glob, 0.0).max(axis=1), eta)
    loc = np.where(tiles.max(axis=1) > gate[:, None], tiles.max(axis=1), tiles.min(axis=1))
    return 0.5 * (glob + loc)


def test_baseline_and_store_report_of_an_ensemble_read_its_score_kind(ensemble: Path, tmp_path: Path) -> None:
    from sklearn.metrics import average_precision_score

    from vlpl.config import EvaluateConfig
    from vlpl.eval.report import teacher_baseline
    from vlpl.eval.stage import run_evaluate

    a, b = (ScoreStore(ensemble / "teachers" / n) for n in ("photo", "bare"))
    b.score_kind = ScoreKind("siglip", 10.0, -5.0)
    mixed = EnsembleStore([a, b], [0.5, 0.5], ["clip", "siglip"])
    sp = mixed.split("test")
    probs = sp.scores(np.arange(len(sp)))[:, 0].astype(np.float64)  # already probabilities (kind 'probability')
    phi = _damp_phi_of_probabilities(probs, sp.observed, eta=0.3)
    y = sp.labels
    want = 100 * np.mean([average_precision_score(y[:, c], phi[:, c]) if y[:, c].any() else 0.0
                          for c in range(y.shape[1])])
    assert teacher_baseline(mixed, "test")["scores"]["damp"]["map"] == pytest.approx(want, abs=1e-6)
    # `vlpl evaluate store=ENSEMBLE` reads the ensemble directory like a store
    out = run_evaluate(EvaluateConfig(store=str(ensemble), split="test", pseudo_split="train", plots=False,
                                      out=str(tmp_path / "eval")))
    report = json.loads((out / "report.json").read_text())
    base = teacher_baseline(ensemble, "test")
    assert report["store"]["zero_shot"]["scores"]["global"]["map"] == pytest.approx(base["scores"]["global"]["map"])
    assert report["store"]["zero_shot"]["scores"]["damp"]["map"] == pytest.approx(base["scores"]["damp"]["map"])


def test_cli_trains_on_an_ensemble_directory_and_inspect_names_its_members(ensemble: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    from vlpl.cli import main

    net = Path(__file__).resolve().parent.parent / "configs" / "models" / "tiny_classifier.yaml"
    out = tmp_path / "run"
    assert main(["train", "-c", str(net), f"store={ensemble}", f"out={out}", "progress=false", "epochs=1",
                 "max_steps_per_epoch=1", "method=an", "batch_size=4"]) == 0
    ident = json.loads((out / "store.json").read_text())
    assert [m["name"] for m in ident["model"]["ensemble"]] == ["photo", "bare"]
    assert main(["inspect", str(ensemble)]) != 0
    assert "is a teacher ensemble (ensemble.json)" in capsys.readouterr().err
    assert main(["inspect", str(ensemble / "teachers" / "photo")]) == 0


def test_one_members_scores_are_never_answered_for_the_ensemble(ensemble: Path) -> None:
    store = ScoreStore.open(ensemble)
    assert store.labels_kind == store.primary.labels_kind  # score-free attributes come from the primary member
    for name in ("iter_shards", "arrays", "table", "scores", "form", "score_columns", "dense_scores"):
        with pytest.raises(AttributeError):
            getattr(store, name)
    sp = store.split("train")
    assert sp.labels_kind == "full"
    with pytest.raises(AttributeError):
        sp._scores  # noqa: B018 - a member's private reader is not the ensemble's


def test_ensemble_weights_are_checked_when_the_config_loads(tmp_path: Path) -> None:
    from vlpl.config import TrainConfig

    with pytest.raises(ConfigError, match=r"ensemble_weights: 3 weight\(s\) for the 2 stores .*'ensemble_weights="):
        load_config(TrainConfig, [], ["store=[a, b]", f"out={tmp_path}", "ensemble_weights=[1, 2, 3]"])
    cfg = load_config(TrainConfig, [], ["store=[a, b]", f"out={tmp_path}", "ensemble_weights=[1, 2]"])
    assert cfg.store == ["a", "b"] and cfg.ensemble_weights == [1.0, 2.0]


def test_scores_on_a_device_equal_the_numpy_combination(ensemble: Path) -> None:
    a, b = (ScoreStore(ensemble / "teachers" / n) for n in ("photo", "bare"))
    for kinds in (None, ScoreKind("siglip", 10.0, -5.0)):
        if kinds is not None:
            b.score_kind = kinds
        store = EnsembleStore([a, b], W, ["a", "b"])
        sp = store.split("train")
        pos = np.array([5, 0, 3])
        on_device = sp.scores(pos, device="cpu")  # a torch tensor, combined where it was read
        assert isinstance(on_device, torch.Tensor)
        np.testing.assert_allclose(on_device.numpy(), sp.scores(pos), atol=1e-6)
