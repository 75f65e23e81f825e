"""The evaluate report's units, its short CLI summary, the random-model notice, and readable plots.

Hand-computed example (one class "a", 4 images): labels 1, 0, 1, 0 and probabilities 0.9, 0.8, 0.3,
0.1. AP = (1/1 + 2/3) / 2 = 5/6; at threshold 0.5 the predictions are 1, 1, 0, 0: TP 1 of 2 predicted
and 2 true, so P = R = CF1 = OF1 = 1/2, which a report must show as 50.0 (percent), never 0.5.
Pseudo-labels: labels (1, 1, 0, 0), observed (1, 0, 0, 0), pseudo (0, 1, 1, 0): on the unobserved
entries two pseudo-positives, one right: precision 1/2, recall 1/1, F1 2/3 -> 50.0, 100.0, 66.67.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import yaml

from vlpl.eval.metrics import f1_metrics, f1_metrics_topk, mean_average_precision
from vlpl.eval.quality import pseudo_label_quality, threshold_sweep
from vlpl.eval.report import (
    REPORT_SCHEMA,
    finalize_report,
    jsonable,
    load_report,
    metric_row,
    random_model_notice,
    render_markdown,
    summary_text,
)

LABELS = np.array([[1], [0], [1], [0]])
PROBS = np.array([[0.9], [0.8], [0.3], [0.1]])
PL_LABELS = np.array([[1, 1, 0, 0]])
PL_OBSERVED = np.array([[1, 0, 0, 0]])
PL_PSEUDO = np.array([[0, 1, 1, 0]])
PL_SCORES = np.array([[0.9, 0.6, 0.2, 0.01]])

TINY_TEACHER = {"backend": "open_clip", "name": "vlpl-tiny", "pretrained": None, "checkpoint_sha256": None}
REAL_TEACHER = {"backend": "open_clip", "name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k",
                "checkpoint_sha256": None}


def _metrics() -> Dict[str, Any]:
    """What the evaluate stage computes for a score matrix (mAP in percent, the rest fractions)."""
    return {**mean_average_precision(LABELS, PROBS), "f1": f1_metrics(LABELS, PROBS, 0.5),
            "f1_topk": f1_metrics_topk(LABELS, PROBS, 1)}


def _raw_report(model: Optional[Dict[str, Any]] = None, student: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A report as the evaluate stage assembles it, before :func:`finalize_report` (run + store)."""
    m = _metrics()
    q = pseudo_label_quality(PL_PSEUDO, PL_LABELS, PL_OBSERVED)
    sweep = threshold_sweep(PL_SCORES, PL_LABELS, PL_OBSERVED, [0.1, 0.5])
    headline = [metric_row("run_a", "run", "test", m, 4)]
    headline += [metric_row("store_a", f"zero-shot:{v}", "test", copy.deepcopy(m), 4) for v in ("global", "damp")]
    run = {"path": "/x/run_a", "predictions_file": "predictions/test.npz", "num_images": 4, "classes": ["a"],
           "num_pos_per_class": [2], "summary": {"method": "aevlp", "best_val_map": 40.0, "test_map_at_best": 83.33},
           "train_config": {"student": student} if student else None, "best_epoch": 1,
           "epochs": [{"epoch": 1, "val_map": 40.0, "test_map": 83.33, "train_loss": 0.5}], "metrics": m}
    store = {"path": "/x/store_a", "model": model, "views": {"grid": 2, "num_views": 10}, "classes": ["a"],
             "rows": {"test": {"total": 4, "failed": 0, "labels_unknown": 0, "used": 4}},
             "zero_shot": {"split": "test", "num_images": 4, "num_pos_per_class": [2], "temp": 0.01,
                           "damp_params": {"temp": 0.01, "eta": 0.3},
                           "scores": {"global": copy.deepcopy(m), "damp": copy.deepcopy(m)}},
             "pseudo_labels": {"split": "train", "num_images": 1, "dynamic": False, "observed_per_image": 1.0,
                               "rules": {"damp": {"options": {"eta": 0.3}, "quality": q,
                                                  "images_without_pseudo_positive": 0.25}},
                               "threshold_sweep": {"damp_phi": sweep}}}
    return jsonable({"schema": REPORT_SCHEMA, "created": "2026-01-01T00:00:00+00:00", "name": "run_a",
                     "kind": "run+store", "split": "test", "summary": headline[0], "headline": headline,
                     "classes": ["a"], "run": run, "store": store, "model": model, "plots": {},
                     "config": {"f1_threshold": 0.5}, "versions": {"vlpl": "0", "torch": "0", "open_clip": "0",
                                                                   "numpy": "0"}})


# --------------------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------------------


def test_every_metric_is_in_percent_hand_computed() -> None:
    raw = _raw_report(REAL_TEACHER)
    rep = finalize_report(raw)
    assert rep["schema"] == REPORT_SCHEMA == "vlpl.evaluate/2"
    for row in rep["headline"]:
        assert row["map"] == pytest.approx(500 / 6)  # mAP was percent already: not scaled twice
        assert (row["CF1"], row["OF1"]) == pytest.approx((50.0, 50.0))
        # top-1 predicts 'a' for every image: P 2/4, R 2/2 -> CF1 = OF1 = 2/3
        assert (row["CF1_topk"], row["OF1_topk"]) == pytest.approx((200 / 3, 200 / 3))
        assert row["f1_threshold"] == 0.5 and row["top_k"] == 1  # not metrics: unchanged
    m = rep["run"]["metrics"]
    assert m["per_class_ap"] == pytest.approx([500 / 6]) and m["map"] == pytest.approx(500 / 6)
    f1 = m["f1"]
    assert [f1[k] for k in ("CP", "CR", "CF1", "OP", "OR", "OF1")] == pytest.approx([50.0] * 6)
    assert f1["per_class_precision"] == pytest.approx([50.0]) and f1["threshold"] == 0.5
    assert rep["store"]["zero_shot"]["scores"]["damp"]["f1"]["OF1"] == pytest.approx(50.0)
    pl = rep["store"]["pseudo_labels"]
    ex = pl["rules"]["damp"]["quality"]["excluding_observed"]
    assert (ex["precision"], ex["recall"], ex["f1"]) == pytest.approx((50.0, 100.0, 200 / 3))
    assert ex["per_class"]["precision"] == pytest.approx([0.0, 100.0, 0.0, 0.0])
    assert ex["per_image"] == 2.0 and ex["tp"] == 1  # a count per image and a count: unchanged
    assert pl["rules"]["damp"]["images_without_pseudo_positive"] == pytest.approx(25.0)
    # threshold 0.5 on the unobserved scores (0.6, 0.2, 0.01): one pseudo-positive, the right one
    row05 = pl["threshold_sweep"]["damp_phi"][1]
    assert row05["threshold"] == 0.5 and (row05["precision"], row05["recall"]) == pytest.approx((100.0, 100.0))
    assert rep["units"]["map"] == rep["units"]["CF1"] == rep["units"]["precision"] == "percent"
    assert rep["units"]["per_image"] == "count per image"
    # once only; the input is not modified
    assert finalize_report(rep) is rep
    assert raw["headline"][0]["CF1"] == pytest.approx(0.5) and "units" not in raw


def test_markdown_prints_percent_with_labelled_headers() -> None:
    md = render_markdown(finalize_report(_raw_report(REAL_TEACHER)))
    header = next(line for line in md.splitlines() if line.startswith("| name | kind |"))
    assert "| mAP (%) |" in header and "| CF1 (%) |" in header and "| OF1 (%) |" in header
    run_row = next(line for line in md.splitlines() if line.startswith("| run_a | run |"))
    assert run_row.split(" | ")[4:8] == ["83.33", "83.33", "50.00", "50.00"]
    assert "| 0.50 |" not in md and "| 5000.00 |" not in md
    assert "| P excl. (%) | R excl. (%) | F1 excl. (%) |" in md
    assert "| damp | eta=0.3 | 50.00 | 100.00 | 66.67 |" in md
    assert "| AP (%) | P@0.5 (%) | R@0.5 (%) |" in md and "| 1 | a | 2 | 83.33 | 50.00 | 50.00 |" in md
    assert "| 0.5 | 100.00 | 100.00 | 100.00 |" in md  # the threshold sweep row


def test_a_v1_report_of_fractions_is_read_in_percent(tmp_path: Path) -> None:
    v1 = _raw_report(REAL_TEACHER)
    v1["schema"] = "vlpl.evaluate/1"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.json").write_text(json.dumps(v1))
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "report.json").write_text(json.dumps(finalize_report(_raw_report(REAL_TEACHER))))
    old, new = load_report(tmp_path / "old"), load_report(tmp_path / "new" / "report.json")
    assert old["schema"] == new["schema"] == REPORT_SCHEMA
    assert old["summary"]["CF1"] == new["summary"]["CF1"] == pytest.approx(50.0)
    from vlpl.eval.compare import comparison

    rows = comparison([tmp_path / "old", tmp_path / "new" / "report.json"], measure_baseline=False)["rows"]
    assert rows[0]["CF1"] == rows[1]["CF1"] == pytest.approx(50.0)


# --------------------------------------------------------------------------------------------------
# the summary the CLI prints, the random-model notice
# --------------------------------------------------------------------------------------------------


def test_summary_text_is_short_labelled_and_names_the_report(tmp_path: Path) -> None:
    rep = finalize_report(_raw_report(REAL_TEACHER))
    rep["plots"] = {"run_pr_curves": "plots/run_pr_curves.png"}
    text = summary_text(rep, tmp_path)
    lines = text.splitlines()
    assert len(lines) <= 12 and "##" not in text and "|" not in text  # not the Markdown report
    assert lines[0] == "vlpl evaluate: run_a, split test, 1 class"
    head = next(i for i, line in enumerate(lines) if "mAP (%)" in line)
    assert "CF1 (%)" in lines[head] and "OF1 (%)" in lines[head]
    assert lines[head + 1].split() == ["trained", "model", "(run_a)", "4", "83.33", "50.00", "50.00"]
    assert lines[head + 2].split()[:3] == ["zero-shot,", "global", "view"]
    assert lines[head + 3].split()[:3] == ["zero-shot,", "DAMP", "phi"]
    pl = next(i for i, line in enumerate(lines) if line.startswith("Pseudo-labels on split train (1 images)"))
    assert "precision (%)" in lines[pl + 1] and "recall (%)" in lines[pl + 1] and "F1 (%)" in lines[pl + 1]
    assert lines[pl + 2].split() == ["damp", "50.00", "100.00", "66.67", "2.00"]
    assert lines[-1].startswith(f"Full report: {tmp_path / 'report.md'}") and str(tmp_path / "plots") in lines[-1]
    assert "NOTE" not in text and random_model_notice(rep) is None


def test_random_teacher_notice_comes_first(tmp_path: Path) -> None:
    rep = finalize_report(_raw_report(TINY_TEACHER, student={"name": "test_resnet", "pretrained": False}))
    notice = random_model_notice(rep)
    assert notice and "mean nothing" in notice and "`vlpl-tiny`" in notice and "`test_resnet`" in notice
    md = render_markdown(rep).splitlines()
    assert md[0] == "# vlpl evaluation: run_a" and md[1] == ""
    assert md[2].startswith("> **RANDOM MODELS") and "mean nothing" in md[2]
    text = summary_text(rep, tmp_path).splitlines()
    assert text[2].startswith("NOTE: RANDOM MODELS") and "mean nothing" in text[2]
    # the run-only report of a run trained from a random teacher's store: model found from the store
    store_only = finalize_report(_raw_report(None))
    store_only["store"]["model"] = {"backend": "open_clip", "name": "RN50", "pretrained": None}
    assert "`RN50`" in random_model_notice(store_only)
    # a teacher loaded from a local checkpoint, or a Hugging Face one, is not random
    ckpt = {"backend": "open_clip", "name": "RN50", "pretrained": None, "checkpoint_sha256": "ab" * 32}
    assert random_model_notice(finalize_report(_raw_report(ckpt))) is None
    assert random_model_notice(finalize_report(_raw_report({"backend": "hf", "name": "x", "pretrained": None}))) \
        is None


def _fake_run(root: Path) -> Path:
    """A training run by the trainer's contract: the hand-computed predictions above."""
    (root / "predictions").mkdir(parents=True)
    np.savez(root / "predictions" / "test.npz", probs=PROBS.astype(np.float32), labels=LABELS.astype(np.int8),
             sample_ids=np.array(["0", "1", "2", "3"]))
    (root / "classes.txt").write_text("a\n")
    (root / "config.yaml").write_text(yaml.safe_dump({"store": "/nonexistent", "student": {"name": "resnet50",
                                                                                           "pretrained": True}}))
    (root / "summary.json").write_text(json.dumps({"best_epoch": 1, "method": "aevlp"}))
    return root


def test_cli_evaluate_prints_the_summary_not_the_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vlpl.cli import main

    run = _fake_run(tmp_path / "run_a")
    assert main(["evaluate", f"run={run}", "plots=false"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "# vlpl evaluation" not in out and "## Headline" not in out and len(lines) <= 8
    row = next(line for line in lines if line.lstrip().startswith("trained model (run_a)"))
    assert row.split()[-4:] == ["4", "83.33", "50.00", "50.00"]
    assert lines[-1].startswith(f"Full report: {run / 'eval' / 'report.md'}")
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["summary"]["CF1"] == pytest.approx(50.0) and report["units"]["CF1"] == "percent"
    assert main(["evaluate", "--compare", str(run)]) == 0
    table = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| ")]
    assert "| mAP (%) | CF1 (%) | OF1 (%) |" in table[0]
    assert table[1].startswith("| run_a | run |") and table[1].split(" | ")[-4:-1] == ["83.33", "50.00", "50.00"]


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------


def test_useful_threshold_range() -> None:
    from vlpl.eval.plots import useful_threshold_range

    def rows(ps: List[float], rs: List[float]) -> List[Dict[str, float]]:
        ts = [0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9]
        return [{"threshold": t, "precision": p, "recall": r} for t, p, r in zip(ts, ps, rs)]

    # flat below 0.05 and above 0.3: the range is the changes, one swept point wider each side
    assert useful_threshold_range(rows([.1, .1, .1, .3, .6, .6, .6], [.9, .9, .9, .5, .2, .2, .2])) == (0.01, 0.5)
    # recall alone changes at the very first step and precision at the last one: everything
    assert useful_threshold_range(rows([.1] * 6 + [.5], [.9, .8] + [.8] * 5)) == (0.001, 0.9)
    assert useful_threshold_range(rows([.2] * 7, [.4] * 7)) == (0.001, 0.9)  # nothing changes
    assert useful_threshold_range([{"threshold": 0.5, "precision": 1, "recall": 1}]) == (0.5, 0.5)


@pytest.fixture()
def figures(monkeypatch: pytest.MonkeyPatch) -> List[Any]:
    """The figures the plot functions draw (rendered, so that extents are final), instead of PNG files."""
    from vlpl.eval import plots

    drawn: List[Any] = []

    def keep(fig: Any, path: Path) -> Path:
        fig.canvas.draw()
        drawn.append(fig)
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    return drawn


def _overlaps(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_threshold_sweep_log_axis_on_the_useful_range(figures: List[Any], tmp_path: Path) -> None:
    from vlpl.eval.plots import plot_style, plot_threshold_sweep

    ts = [0.0001, 0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9]
    ps = [0.01, 0.01, 0.01, 0.05, 0.2, 0.5, 0.5, 0.5]
    rs = [1.0, 1.0, 1.0, 0.8, 0.5, 0.2, 0.2, 0.2]
    sweep = [{"threshold": t, "precision": p, "recall": r, "f1": 2 * p * r / (p + r), "per_image": 80 * (1 - t),
              "num_pred": 1, "tp": 1} for t, p, r in zip(ts, ps, rs)]
    plot_threshold_sweep({"damp_phi": sweep}, tmp_path / "s.png", "sweep, split train")
    fig = figures[-1]
    top, bottom = fig.axes[:2]
    assert top.get_xscale() == "log" and bottom.get_yscale() == "log"
    lo, hi = top.get_xlim()
    assert 0.001 / 1.2 < lo < 0.001 and 0.5 < hi < 0.5 * 1.2  # changes 0.05..0.3, one point wider each side
    assert "(%)" in top.get_ylabel() and top.get_ylim()[1] <= 100 and "log" in bottom.get_xlabel()
    assert "split train" in top.get_title()
    labels = [t.get_text() for t in bottom.get_xticklabels() if t.get_text()]
    assert "0.01" in labels and "0.1" in labels  # plain numbers, not 10^-2
    legend = fig.legends[0]
    assert not any(_overlaps(legend.get_window_extent(), ax.get_window_extent()) for ax in (top, bottom))
    import matplotlib

    with plot_style():
        assert matplotlib.rcParams["axes.grid"] is True
    assert matplotlib.rcParams["figure.constrained_layout.use"] is False  # restored after the plot


def test_histograms_pr_curves_and_ap_have_ticks_labels_units_and_free_legends(figures: List[Any],
                                                                              tmp_path: Path) -> None:
    from vlpl.eval.plots import plot_per_class_ap, plot_pr_curves, plot_score_histograms

    rng = np.random.default_rng(0)
    labels = (rng.random((60, 6)) < 0.3).astype(np.int8)
    scores = np.clip(labels * 0.3 + rng.random((60, 6)) * 0.7, 0, 1)
    classes = [f"class{i}" for i in range(6)]
    plot_score_histograms(labels, scores, classes, tmp_path / "h.png", "histograms, split test",
                          score_name="DAMP phi")
    fig = figures[-1]
    assert len(fig.axes) == 6
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_yticklabels() if t.get_text()], "y ticks have labels"
        assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()], "x ticks have labels"
        assert "pos." in ax.get_title() and "neg." in ax.get_title()
    assert fig.axes[0].get_ylabel() == "share of pos. / neg. (%)" and fig.axes[-1].get_xlabel() == "DAMP phi"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["negatives", "positives"]
    assert not any(_overlaps(fig.legends[0].get_window_extent(), ax.get_window_extent()) for ax in fig.axes)

    ap = mean_average_precision(labels, scores)["per_class_ap"]
    plot_pr_curves(labels, scores, classes, tmp_path / "pr.png", "PR, split test", ap=ap)
    fig = figures[-1]
    ax = fig.axes[0]
    assert ax.get_xlabel() == "recall (%)" and ax.get_ylabel() == "precision (%)" and ax.get_xlim() == (0, 100)
    assert fig.legends and not _overlaps(fig.legends[0].get_window_extent(), ax.get_window_extent())
    assert any(f"AP {100 * ap[0]:.1f} %" in t.get_text() for t in fig.legends[0].get_texts())

    plot_per_class_ap(ap, classes, tmp_path / "ap.png", "AP, split test", num_pos=labels.sum(0))
    fig = figures[-1]
    ax = fig.axes[0]
    assert ax.get_ylabel() == "AP (%)" and ax.get_ylim() == (0, 100) and "split test" in ax.get_title()
    assert f"mAP {100 * np.mean(ap):.2f} %" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert not _overlaps(fig.legends[0].get_window_extent(), ax.get_window_extent())


# --------------------------------------------------------------------------------------------------
# the zero-label baseline (issue 14, item 13): the teacher's zero-shot mAP beside the trained model's
# --------------------------------------------------------------------------------------------------


def _hand_map(labels: np.ndarray, scores: np.ndarray) -> float:
    """100 x mean over classes of sklearn's average precision (0 for a class without positives)."""
    from sklearn.metrics import average_precision_score

    aps = [average_precision_score(labels[:, c], scores[:, c]) if labels[:, c].any() else 0.0
           for c in range(labels.shape[1])]
    return 100.0 * float(np.mean(aps))


def _hand_damp_phi(unflipped: np.ndarray, observed: np.ndarray, temp: float, eta: float) -> np.ndarray:
    """DAMP's phi (ALGORITHMS.md 7c) in numpy: per-view softmax, gate = min(global score of the observed
    positive, eta), best tile above the gate else worst tile, averaged with the global view."""
    z = unflipped.astype(np.float64) / temp
    pi = np.exp(z - z.max(axis=2, keepdims=True))
    pi /= pi.sum(axis=2, keepdims=True)
    glob, tiles = pi[:, 0], pi[:, 1:]
    gate = np.minimum(np.where(observed == 1, glob, 0.0).max(axis=1), eta)
    loc = np.where(tiles.max(axis=1) > gate[:, None], tiles.max(axis=1), tiles.min(axis=1))
    return 0.5 * (glob + loc)


def test_run_report_shows_the_teacher_baseline_with_hand_computed_map(coco256_store: Path, tmp_path: Path) -> None:
    from vlpl.config import EvaluateConfig
    from vlpl.eval.report import teacher_baseline
    from vlpl.eval.stage import run_evaluate
    from vlpl.store.store import ScoreStore

    sp = ScoreStore(coco256_store).split("test")
    labels = sp.labels
    scores = sp.scores(np.arange(len(sp)))[:, 0]  # (N, n_views, C) unflipped
    want_global = _hand_map(labels, scores[:, 0])
    want_damp = _hand_map(labels, _hand_damp_phi(scores, sp.observed, temp=0.01, eta=0.5))
    # a run by the trainer's contract that trained on this store with DAMP (eta 0.5)
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    probs = np.random.default_rng(0).random(labels.shape).astype(np.float32)
    np.savez(run / "predictions" / "test.npz", probs=probs, labels=labels, sample_ids=np.asarray(sp.sample_ids))
    (run / "classes.txt").write_text("".join(f"{c}\n" for c in ScoreStore(coco256_store).classes))
    (run / "config.yaml").write_text(yaml.safe_dump({"store": str(coco256_store),
                                                     "pseudo": {"rule": "damp", "params": {"eta": 0.5}}}))
    (run / "summary.json").write_text(json.dumps({"store": str(coco256_store), "best_epoch": 1}))
    trained = _hand_map(labels, probs)

    base = teacher_baseline(coco256_store, "test", "damp", {"eta": 0.5})
    assert base["num_images"] == len(sp)
    assert base["scores"]["global"]["map"] == pytest.approx(want_global, abs=1e-9)
    assert base["scores"]["damp"]["map"] == pytest.approx(want_damp, abs=1e-9)
    assert base["scores"]["damp"]["eta"] == 0.5

    out = run_evaluate(EvaluateConfig(run=str(run), split="test", plots=False))
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["metrics"]["map"] == pytest.approx(trained, abs=1e-9)
    assert report["baseline"]["scores"]["global"]["map"] == pytest.approx(want_global, abs=1e-9)
    assert report["baseline"]["scores"]["damp"]["map"] == pytest.approx(want_damp, abs=1e-9)
    assert report["summary"]["teacher_global_map"] == pytest.approx(want_global, abs=1e-9)
    assert report["summary"]["teacher_damp_map"] == pytest.approx(want_damp, abs=1e-9)
    md = (out / "report.md").read_text()
    assert "## Zero-label baseline" in md
    assert f"| trained model | {trained:.2f} |  |" in md
    assert f"| teacher zero-shot, global view | {want_global:.2f} | {trained - want_global:+.2f} |" in md
    assert f"| teacher zero-shot, DAMP phi (temp 0.01, eta 0.5) | {want_damp:.2f} | {trained - want_damp:+.2f} |" in md
    # the baseline section sits right under the headline, before the run's own section
    assert md.index("## Zero-label baseline") < md.index("## Training run")
    from vlpl.eval.report import summary_text

    line = next(x for x in summary_text(report).splitlines() if x.startswith("Teacher zero-shot mAP, no training"))
    assert f"global {want_global:.2f} % ({trained - want_global:+.2f})" in line
    assert f"damp {want_damp:.2f} % ({trained - want_damp:+.2f})" in line


def test_run_report_says_why_the_baseline_is_missing(tmp_path: Path) -> None:
    from vlpl.config import EvaluateConfig
    from vlpl.eval.stage import run_evaluate

    out = run_evaluate(EvaluateConfig(run=str(_fake_run(tmp_path / "run")), split="test", plots=False))
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"] is None and "/nonexistent" in report["baseline_reason"]
    assert "Not measured: the run's store /nonexistent could not be scored" in (out / "report.md").read_text()
