"""``vlpl evaluate`` (store mode, run mode, both), ``compare_runs``, and the demo dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_subset_dataset
from PIL import Image

from vlpl.config import DataConfig, EvaluateConfig, PseudolabelConfig, load_config
from vlpl.eval.metrics import mean_average_precision
from vlpl.eval.quality import pseudo_label_quality
from vlpl.eval.stage import compare_runs, run_evaluate
from vlpl.pseudolabel.rules import apply_rule, damp_scores
from vlpl.store.store import ScoreStore

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "models" / "tiny.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT_KEYS = {"schema", "created", "name", "kind", "split", "summary", "headline", "classes", "run", "store",
               "model", "plots", "config", "versions"}


def _subset(src: Path, dst: Path, n_train: int = 18, n_test: int = 12) -> Path:
    """The first coco256 train and test images, plus one corrupt test image."""
    return make_subset_dataset(src, dst, n_train, n_test,
                               bad=[(n_train + n_test, "broken.jpg", b"not a jpeg" * 20, "test", "person")])


@pytest.fixture(scope="module")
def small_store(coco256_root, tmp_path_factory) -> Path:
    from vlpl.pseudolabel.stage import run_pseudolabel

    data = _subset(coco256_root, tmp_path_factory.mktemp("evaldata"))
    out = tmp_path_factory.mktemp("evalstore") / "store"
    cfg = load_config(PseudolabelConfig, [TINY], [f"data.root={data}", f"out={out}", "shard_size=16",
                                                  "num_workers=0", "progress=false", "views.grid=2"])
    return run_pseudolabel(cfg)


def _fake_run(root: Path) -> Path:
    """A training run directory by the trainer's contract, with hand-made predictions.

    Class a: scores 0.9 (pos), 0.8 (neg), 0.3 (pos), 0.1 (neg) -> AP = (1/1 + 2/3) / 2 = 5/6.
    Class b: the two positives rank first -> AP = 1. Class c: no positive -> AP = 0 (Cole), still in the mean.
    """
    (root / "predictions").mkdir(parents=True)
    probs = np.array([[0.9, 0.2, 0.1], [0.8, 0.7, 0.2], [0.3, 0.6, 0.3], [0.1, 0.4, 0.6]], np.float32)
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]], np.int8)
    np.savez(root / "predictions" / "test.npz", probs=probs, labels=labels,
             sample_ids=np.array(["img/0", "img/1", "img/2", "img/3"]))
    (root / "classes.txt").write_text("a\nb\nc\n")
    (root / "config.yaml").write_text(yaml.safe_dump({"store": "/nonexistent/store", "epochs": 3}))
    (root / "summary.json").write_text(json.dumps({
        "best_epoch": 2, "best_val_map": 55.0, "test_map_at_best": 61.1, "method": "aevlp", "loss": "gpr",
        "store": "/nonexistent/store", "epochs_run": 3}))
    recs = [{"kind": "step", "step": 1, "loss": 0.9, "lr": 1e-4, "images_per_s": 10.0}]
    recs += [{"kind": "epoch", "epoch": e, "val_map": v, "test_map": t, "train_loss": lo}
             for e, v, t, lo in ((1, 40.0, 45.0, 0.8), (2, 55.0, 61.1, 0.6), (3, 50.0, None, 0.5))]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def _eval_cfg(*overrides: str) -> EvaluateConfig:
    return load_config(EvaluateConfig, [], list(overrides))


def _assert_pngs(out: Path, report: dict) -> None:
    assert report["plots"]
    for rel in report["plots"].values():
        path = out / rel
        assert path.read_bytes()[:8] == PNG_MAGIC, path
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG"


def test_store_mode_end_to_end(small_store, tmp_path):
    out = run_evaluate(_eval_cfg(f"store={small_store}", f"out={tmp_path / 'ev'}",
                                 "rules={damp: {}, vlpl: {}, topk: {k: 2}}", "thresholds=[0.1, 0.3, 0.5, 0.9]"))
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["kind"] == "store" and report["run"] is None and report["split"] == "test"
    assert report["model"]["name"] == "vlpl-tiny" and report["versions"]["numpy"] == np.__version__
    assert report["config"]["store"] == str(small_store)

    # recompute the zero-shot mAPs from the store arrays
    store = ScoreStore(small_store)
    a = store.arrays(("split", "observed", "labels", "status"))
    scores = store.scores()
    rows = (a["split"] == "test") & (a["status"] == "ok") & a["labels_known"]
    assert rows.sum() == 12
    y, s = a["labels"][rows], scores[rows]
    zs = report["store"]["zero_shot"]
    assert zs["num_images"] == 12
    assert report["store"]["rows"]["test"] == {"total": 13, "failed": 1, "labels_unknown": 0, "used": 12}
    assert zs["scores"]["global"]["map"] == pytest.approx(mean_average_precision(y, s[:, 0, 0])["map"], abs=1e-9)
    mean_cos = s.reshape(len(s), -1, s.shape[-1]).mean(axis=1)
    assert zs["scores"]["mean"]["map"] == pytest.approx(mean_average_precision(y, mean_cos)["map"], abs=1e-4)
    phi, _ = damp_scores(torch.from_numpy(s[:, 0]), torch.from_numpy(a["observed"][rows]))
    assert zs["scores"]["damp"]["map"] == pytest.approx(mean_average_precision(y, phi.numpy())["map"], abs=1e-9)
    assert report["summary"]["kind"] == "zero-shot:damp"
    assert report["summary"]["map"] == zs["scores"]["damp"]["map"]

    # pseudo-label quality on the train rows, recomputed for DAMP
    pl = report["store"]["pseudo_labels"]
    tr = (a["split"] == "train") & (a["status"] == "ok") & a["labels_known"]
    assert pl["split"] == "train" and pl["num_images"] == int(tr.sum()) and set(pl["rules"]) == {"damp", "vlpl", "topk"}
    pseudo = apply_rule("damp", torch.from_numpy(scores[tr]), torch.from_numpy(a["observed"][tr]), dynamic=False)
    expect = pseudo_label_quality(pseudo.numpy(), a["labels"][tr], a["observed"][tr])
    got = pl["rules"]["damp"]["quality"]
    for part in ("excluding_observed", "including_observed"):
        for key in ("precision", "recall", "f1"):  # report.json is in percent, the quality function in fractions
            assert got[part][key] == pytest.approx(100 * expect[part][key])
        assert got[part]["per_image"] == pytest.approx(expect[part]["per_image"])
    assert pl["rules"]["topk"]["options"] == {"k": 2}
    assert [r["threshold"] for r in pl["threshold_sweep"]["damp_phi"]] == [0.1, 0.3, 0.5, 0.9]

    md = (out / "report.md").read_text()
    assert "mAP" in md and "Pseudo-label quality" in md and "Threshold sweep" in md
    assert set(report["plots"]) == {"zeroshot_per_class_ap", "zeroshot_pr_curves", "zeroshot_score_histograms",
                                    "pseudo_threshold_sweep"}
    _assert_pngs(out, report)
    for rel in report["plots"].values():
        assert f"({rel})" in md
    back = load_config(EvaluateConfig, [out / "config.yaml"])
    assert back.rules == {"damp": {}, "vlpl": {}, "topk": {"k": 2}}


def test_store_mode_bad_inputs(small_store, tmp_path):
    from vlpl.config import ConfigError

    with pytest.raises(ConfigError, match="rules.damp"):
        run_evaluate(_eval_cfg(f"store={small_store}", f"out={tmp_path}", "rules={damp: {bogus: 1}}"))
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run_evaluate(_eval_cfg())
    with pytest.raises(ValueError, match="no row of split 'nosuch'"):
        run_evaluate(_eval_cfg(f"store={small_store}", f"out={tmp_path}", "split=nosuch", "plots=false"))


def test_run_mode_hand_checked(tmp_path):
    run = _fake_run(tmp_path / "run1")
    out = run_evaluate(_eval_cfg(f"run={run}"))
    assert out == run / "eval"
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report) and report["kind"] == "run" and report["store"] is None
    m = report["run"]["metrics"]
    assert m["per_class_ap"] == pytest.approx([500 / 6, 100.0, 0.0])  # report.json: percent
    assert m["map"] == pytest.approx(100 * (5 / 6 + 1.0 + 0.0) / 3)
    assert m["map_pos"] == pytest.approx(100 * (5 / 6 + 1.0) / 2)
    # threshold 0.5: a -> {0, 1} (P 1/2, R 1/2), b -> {1, 2} (P 1, R 1), c -> {3} (P 0, R 0)
    f1 = m["f1"]
    assert f1["CP"] == pytest.approx(50) and f1["CR"] == pytest.approx(50) and f1["CF1"] == pytest.approx(50)
    assert f1["OP"] == pytest.approx(60) and f1["OR"] == pytest.approx(75)
    assert f1["per_class_precision"] == pytest.approx([50, 100, 0.0])
    assert m["f1_topk"]["k"] == 3
    assert [e["epoch"] for e in report["run"]["epochs"]] == [1, 2, 3]  # step records left out
    assert report["run"]["best_epoch"] == 2 and report["summary"]["kind"] == "run"
    assert report["model"] is None  # the run's store does not exist here
    assert "training_curve" in report["plots"]
    _assert_pngs(out, report)
    md = (out / "report.md").read_text()
    assert "61.11" in md and "Training curve" in md


def test_run_mode_errors(tmp_path):
    run = _fake_run(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"predictions[/\\]val\.npz.*present: test\.npz"):
        run_evaluate(_eval_cfg(f"run={run}", "split=val"))
    with pytest.raises(FileNotFoundError, match="run directory"):
        run_evaluate(_eval_cfg(f"run={tmp_path / 'missing'}"))
    np.savez(run / "predictions" / "bad.npz", probs=np.zeros((4, 3), np.float32), labels=np.zeros((4, 2), np.int8))
    with pytest.raises(ValueError, match=r"bad\.npz.*\(4, 3\).*\(4, 2\)"):
        run_evaluate(_eval_cfg(f"run={run}", "split=bad"))
    np.savez(run / "predictions" / "nolabels.npz", probs=np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="missing array.*labels"):
        run_evaluate(_eval_cfg(f"run={run}", "split=nolabels"))
    (run / "classes.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="classes.txt lists 2 classes"):
        run_evaluate(_eval_cfg(f"run={run}"))


def test_both_modes_and_compare_runs(small_store, tmp_path):
    run = _fake_run(tmp_path / "run_a")
    both = run_evaluate(_eval_cfg(f"run={run}", f"store={small_store}", "plots=false"))
    report = json.loads((both / "report.json").read_text())
    assert report["kind"] == "run+store" and report["run"] and report["store"]
    assert [r["kind"] for r in report["headline"]] == ["run", "zero-shot:global", "zero-shot:mean", "zero-shot:damp"]
    assert report["plots"] == {} and not (both / "plots").exists()

    store_eval = run_evaluate(_eval_cfg(f"store={small_store}", f"out={tmp_path / 'store_eval'}", "plots=false"))
    table = compare_runs([str(run), str(store_eval / "report.json")])
    lines = [x for x in table.strip().splitlines() if x.startswith("| ")]
    assert lines[0].startswith("| name | kind | method |") and "| mAP (%) | CF1 (%) | OF1 (%) |" in lines[0]
    assert lines[1].startswith("| run_a | run |") and "| 61.11 |" in lines[1]
    assert lines[2].startswith("| store | zero-shot:damp |")
    assert "Teacher zero-shot baseline: not available" in table  # the fake run names no readable store
    with pytest.raises(FileNotFoundError, match="no evaluation report"):
        compare_runs([str(tmp_path / "nowhere")])


def test_demo_dataset(tmp_path):
    from vlpl.data.readers import load_dataset
    from vlpl.demo_data import DEMO_CLASSES, materialize_demo_dataset

    dst = materialize_demo_dataset(tmp_path / "demo")
    ds = load_dataset(DataConfig(root=str(dst)))
    assert len(ds.samples) >= 20 and ds.classes == DEMO_CLASSES
    labels = np.stack([s.labels for s in ds.samples])
    assert (labels.sum(axis=1) >= 1).all() and (labels.sum(axis=0) >= 1).all()
    splits = {s.split for s in ds.samples}
    assert {"train", "test"} <= splits
    n_test = sum(s.split == "test" for s in ds.samples)
    assert 0.25 <= n_test / len(ds.samples) <= 0.45
    for i in range(len(ds.samples)):
        assert ds.open_image(i).size[0] > 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(dst.rglob("*")) if p.is_file()}
    assert materialize_demo_dataset(dst) == dst
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(dst.rglob("*")) if p.is_file()}
    assert before == after
    # deterministic: a fresh copy is byte-identical
    other = materialize_demo_dataset(tmp_path / "demo2")
    assert {p.name: p.read_bytes() for p in (other / "images").iterdir()} == \
           {p.name: p.read_bytes() for p in (dst / "images").iterdir()}


def test_store_quality_uses_the_runs_own_rule(small_store, tmp_path):
    """A run trained with DAMP at eta 0.0 is measured with eta 0.0 (not the default 0.3), visibly in report.json."""
    run = _fake_run(tmp_path / "run_eta0")
    (run / "config.yaml").write_text(yaml.safe_dump({"store": str(small_store),
                                                     "pseudo": {"rule": "damp", "params": {"eta": 0.0}}}))
    out = run_evaluate(_eval_cfg(f"run={run}", f"store={small_store}", "plots=false"))
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["rules"] == {"damp": {"eta": 0.0}}
    zs, pl = report["store"]["zero_shot"], report["store"]["pseudo_labels"]
    assert zs["damp_params"]["eta"] == 0.0 and set(pl["rules"]) == {"damp"}
    assert pl["rules"]["damp"]["options"] == {"eta": 0.0}
    # the numbers are eta 0.0's: DAMP phi recomputed by hand with eta 0.0, and not the default's
    store = ScoreStore(small_store)
    sp = store.split("test")
    use = np.nonzero(sp.labels_known)[0]
    s, obs, y = torch.from_numpy(sp.scores(use)[:, 0]), torch.from_numpy(sp.observed[use]), sp.labels_at(use)
    phi0 = damp_scores(s, obs, eta=0.0)[0].numpy()
    phi3 = damp_scores(s, obs, eta=0.3)[0].numpy()
    assert zs["scores"]["damp"]["map"] == pytest.approx(mean_average_precision(y, phi0)["map"], abs=1e-9)
    assert not np.allclose(phi0, phi3)
    tr = store.split("train")
    pseudo = apply_rule("damp", torch.from_numpy(tr.scores(np.arange(len(tr)))), torch.from_numpy(tr.observed),
                        dynamic=False, eta=0.0)
    expect = pseudo_label_quality(pseudo.numpy(), tr.labels, tr.observed)
    assert pl["rules"]["damp"]["quality"]["excluding_observed"]["num_pred"] == \
        expect["excluding_observed"]["num_pred"]
