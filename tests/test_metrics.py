"""Metrics (ALGORITHMS.md §2d) and pseudo-label quality (§7g.8) on hand-worked and random data."""
from __future__ import annotations

import numpy as np
import pytest

from vlpl.eval.metrics import average_precision, f1_metrics, f1_metrics_topk, mean_average_precision
from vlpl.eval.quality import pseudo_label_quality, threshold_sweep

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def test_ap_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    n, c = 300, 50
    y = (rng.random((n, c)) < rng.uniform(0.02, 0.6, size=c)).astype(int)
    y[0, y.sum(axis=0) == 0] = 1  # every class has a positive (sklearn's reference is then defined)
    scores = np.round(rng.random((n, c)) * 0.6 + 0.4 * y * rng.random((n, c)), 1)  # many ties
    ours = average_precision(y, scores)
    ref = np.array([sklearn_metrics.average_precision_score(y[:, j], scores[:, j]) for j in range(c)])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    # coarser ties still agree
    coarse = np.round(scores * 3) / 3
    ref = np.array([sklearn_metrics.average_precision_score(y[:, j], coarse[:, j]) for j in range(c)])
    np.testing.assert_allclose(average_precision(y, coarse), ref, rtol=0, atol=1e-12)


def test_ap_hand_worked_with_a_tie() -> None:
    # scores sorted: .9 (pos), .8 (neg), .7 (pos) tied with .7 (neg), .3 (pos); 3 positives.
    # distinct thresholds:  >= .9: P = 1/1, R = 1/3
    #                       >= .8: P = 1/2, R = 1/3  (no recall step)
    #                       >= .7: P = 2/4, R = 2/3  (the tie enters as one group)
    #                       >= .3: P = 3/5, R = 3/3
    # AP = 1/3 * 1 + 1/3 * 1/2 + 1/3 * 3/5 = 2.1 / 3 = 0.7
    # (breaking the tie positive-first would give (1 + 2/3 + 3/5)/3 = 0.7556 instead)
    y = np.array([1, 0, 1, 0, 1])
    s = np.array([0.9, 0.8, 0.7, 0.7, 0.3])
    assert average_precision(y, s)[0] == pytest.approx(0.7, abs=1e-12)
    assert sklearn_metrics.average_precision_score(y, s) == pytest.approx(0.7, abs=1e-12)


def test_map_empty_and_all_positive_classes() -> None:
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1], [1, 0, 1]])
    s = np.array([[0.9, 0.5, 0.1], [0.8, 0.4, 0.2], [0.7, 0.3, 0.3], [0.7, 0.2, 0.4], [0.3, 0.1, 0.5]])
    ap = average_precision(y, s)
    assert ap.tolist() == pytest.approx([0.7, 0.0, 1.0], abs=1e-12)  # empty class -> 0, all-positive -> 1
    res = mean_average_precision(y, s)
    assert res["map"] == pytest.approx(100 * 1.7 / 3)  # Cole: the empty class counts as AP = 0
    assert res["map_pos"] == pytest.approx(100 * 1.7 / 2)
    assert res["num_classes_with_pos"] == 2
    assert res["per_class_ap"] == pytest.approx([0.7, 0.0, 1.0])
    none = mean_average_precision(np.zeros((3, 2), int), np.random.default_rng(0).random((3, 2)))
    assert none["map"] == 0.0 and none["map_pos"] == 0.0 and none["num_classes_with_pos"] == 0


Y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
S = np.array([[0.9, 0.2, 0.4], [0.6, 0.7, 0.1], [0.8, 0.3, 0.2], [0.1, 0.55, 0.05]])


def test_f1_threshold_hand_worked() -> None:
    # predictions >= .5: [[1,0,0],[1,1,0],[1,0,0],[0,1,0]]
    # class 0: TP 2 / pred 3 / true 2 -> P 2/3, R 1; class 1: 1/2/2 -> P 1/2, R 1/2;
    # class 2: 0/0/1 -> P 0 (0/0), R 0
    # CP = (2/3 + 1/2 + 0)/3 = 7/18, CR = (1 + 1/2 + 0)/3 = 1/2, CF1 = 2 CP CR/(CP + CR) = 7/16
    # OP = 3/5, OR = 3/5, OF1 = 3/5
    m = f1_metrics(Y, S, threshold=0.5)
    assert m["per_class_precision"] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert m["per_class_recall"] == pytest.approx([1.0, 0.5, 0.0])
    assert m["CP"] == pytest.approx(7 / 18)
    assert m["CR"] == pytest.approx(0.5)
    assert m["CF1"] == pytest.approx(7 / 16)
    assert (m["OP"], m["OR"], m["OF1"]) == pytest.approx((0.6, 0.6, 0.6))
    # nothing predicted: every ratio is 0/0 -> 0
    z = f1_metrics(Y, S, threshold=2.0)
    assert (z["CP"], z["CR"], z["CF1"], z["OP"], z["OR"], z["OF1"]) == (0.0,) * 6


def test_f1_topk_hand_worked() -> None:
    # top-2 per image: {0,2}, {1,0}, {0,1}, {1,0}
    # class 0: TP 2 / pred 4 / true 2; class 1: 2/3/2; class 2: 1/1/1
    # CP = (1/2 + 2/3 + 1)/3 = 13/18, CR = 1, CF1 = 26/31; OP = 5/8, OR = 1, OF1 = 10/13
    m = f1_metrics_topk(Y, S, k=2)
    assert m["CP"] == pytest.approx(13 / 18)
    assert m["CR"] == pytest.approx(1.0)
    assert m["CF1"] == pytest.approx(26 / 31)
    assert (m["OP"], m["OR"], m["OF1"]) == pytest.approx((5 / 8, 1.0, 10 / 13))
    # top-3 of 3 classes predicts everything: P = 2/4, 2/4, 1/4
    m3 = f1_metrics_topk(Y, S, k=3)
    assert m3["CP"] == pytest.approx(5 / 12) and m3["OP"] == pytest.approx(5 / 12)
    assert m3["CR"] == pytest.approx(1.0) and m3["k"] == 3


LABELS = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 1]])
OBSERVED = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
PSEUDO = np.array([[-1, 1, -1, 0], [0, 1, 1, -1], [1, -1, 1, 1]])


def test_pseudo_label_quality_hand_worked() -> None:
    q = pseudo_label_quality(PSEUDO, LABELS, OBSERVED)
    # excluding observed entries (0,0), (1,1), (2,3):
    #   pseudo-positives (0,1) T, (1,2) T, (2,0) T, (2,2) F -> 4 predicted, 3 true
    #   ground truth on unobserved entries: (0,1), (1,2), (2,0), (2,1) -> 4
    #   P = 3/4, R = 3/4, F1 = 2PR/(P+R) = 3/4 (AEVLP's log would print PR/(P+R) = 3/8)
    ex = q["excluding_observed"]
    assert (ex["precision"], ex["recall"], ex["f1"]) == pytest.approx((0.75, 0.75, 0.75))
    assert (ex["tp"], ex["num_pred"], ex["num_true"]) == (3, 4, 4)
    assert ex["per_image"] == pytest.approx(4 / 3)
    # per class: c0 1/1, 1/1; c1 pred {(0,1)} true {(0,1),(2,1)} -> P 1, R 1/2;
    #            c2 pred {(1,2),(2,2)} true {(1,2)} -> P 1/2, R 1; c3 nothing -> 0, 0
    assert ex["per_class"]["precision"] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert ex["per_class"]["recall"] == pytest.approx([1.0, 0.5, 1.0, 0.0])
    assert ex["per_class"]["f1"] == pytest.approx([1.0, 2 / 3, 2 / 3, 0.0])
    # including observed: observed positives (0,0), (1,1), (2,3) are positives whatever the pseudo-label
    #   (the -1 at (0,0) is overridden) -> 7 predicted, 6 true; ground truth 7 -> P = R = F1 = 6/7
    inc = q["including_observed"]
    assert (inc["precision"], inc["recall"], inc["f1"]) == pytest.approx((6 / 7, 6 / 7, 6 / 7))
    assert (inc["tp"], inc["num_pred"], inc["num_true"]) == (6, 7, 7)
    assert inc["per_image"] == pytest.approx(7 / 3)
    # negatives on unobserved entries: (0,2) T, (1,3) T, (2,1) F (a true positive); (0,0) is observed
    neg = q["negatives"]
    assert neg["count"] == 3 and neg["num_truly_negative"] == 2
    assert neg["precision"] == pytest.approx(2 / 3) and neg["per_image"] == pytest.approx(1.0)
    assert q["num_images"] == 3


def test_threshold_sweep_monotone_and_consistent() -> None:
    rng = np.random.default_rng(1)
    n, c = 200, 10
    labels = (rng.random((n, c)) < 0.3).astype(int)
    observed = np.zeros((n, c), dtype=int)
    for i in range(n):
        pos = np.flatnonzero(labels[i])
        if pos.size:
            observed[i, rng.choice(pos)] = 1
    scores = np.clip(0.5 * labels + 0.7 * rng.random((n, c)), 0, 1)
    ts = np.linspace(0.0, 1.2, 13)
    sweep = threshold_sweep(scores, labels, observed, ts)
    recalls = [r["recall"] for r in sweep]
    assert all(a >= b for a, b in zip(recalls, recalls[1:]))
    assert sweep[0]["recall"] == pytest.approx(1.0) and sweep[-1]["recall"] == 0.0
    assert sweep[-1]["precision"] == 0.0 and sweep[-1]["f1"] == 0.0  # nothing predicted: 0/0 -> 0
    # agrees with pseudo_label_quality on the thresholded scores
    for t, row in zip(ts, sweep):
        ex = pseudo_label_quality((scores >= t).astype(int), labels, observed)["excluding_observed"]
        assert row["threshold"] == pytest.approx(t)
        assert (row["precision"], row["recall"], row["f1"], row["per_image"]) == pytest.approx(
            (ex["precision"], ex["recall"], ex["f1"], ex["per_image"])
        )


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        average_precision(np.array([[1, -1]]), np.array([[0.1, 0.2]]))
    with pytest.raises(ValueError):
        average_precision(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError):
        pseudo_label_quality(PSEUDO, LABELS, OBSERVED[:, :3])


# ---- masked mAP (CSL's mAP_partial, ALGORITHMS.md 9f) ------------------------------------------------------


def test_masked_average_precision_by_hand() -> None:
    from vlpl.eval.metrics import masked_average_precision

    y = np.array([[1, 1, 0, -1, -1],
                  [-1, 1, 0, 1, -1],
                  [0, 0, 0, -1, 0],
                  [1, 0, 0, 0, 0],
                  [-1, 1, 0, 0, 0]])
    s = np.array([[0.9, 0.1, 0.5, 0.5, 0.3],
                  [0.8, 0.2, 0.5, 0.5, 0.4],
                  [0.95, 0.3, 0.5, 0.2, 0.5],
                  [0.3, 0.4, 0.5, 0.9, 0.6],
                  [0.1, 0.5, 0.5, 0.0, 0.7]])
    m = masked_average_precision(y, s)
    # class 0: annotated 0.9+, 0.8-, 0.3+, 0.1- (the unknown 0.95 is left out): (1 + 2/3) / 2 = 5/6
    # class 3: annotated 0.5-, 0.5+ (one tie group), 0.2-: the positive's precision is 1/2 -> 1/2
    # class 1: no annotated negative; class 2: nothing annotated; class 4: no annotated positive -> skipped
    assert m["per_class_ap"] == [pytest.approx(5 / 6), None, None, pytest.approx(0.5), None]
    assert m["map"] == pytest.approx(100 * (5 / 6 + 0.5) / 2)
    assert m["map_macro"] == pytest.approx(100 * (2 * 5 / 6 + 1 * 0.5) / 3)  # weighted by annotated positives
    assert (m["num_classes_used"], m["num_classes_skipped"]) == (2, 3)
    assert m["skipped"] == {"no_annotation": [2], "no_positive": [4], "no_negative": [1]}
    assert m["num_annotated"] == int((y != 0).sum())
    # Cole's mAP counts the unknown 0.95 of class 0 as a negative ranked first: (1/2 + 2/4) / 2 = 1/2
    assert mean_average_precision(y == 1, s)["per_class_ap"][0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="only -1"):
        masked_average_precision(np.array([[2]]), np.array([[0.1]]))
    assert masked_average_precision(np.zeros((3, 2)), np.zeros((3, 2)))["map"] == 0.0  # nothing to score
