"""Multi-label evaluation metrics in numpy float64 (ALGORITHMS.md §2d, Decision 8).

* :func:`average_precision` / :func:`mean_average_precision`: Cole et al.'s protocol (§2d): per
  class, step-wise AP with no interpolation, identical to
  ``sklearn.metrics.average_precision_score`` on each column (ties included), and AP = 0 for a
  class with no positive, which still counts in the mean.
* :func:`f1_metrics` / :func:`f1_metrics_topk`: the per-class and overall precision / recall / F1
  of the ML-GCN evaluation (CP, CR, CF1, OP, OR, OF1).
* :func:`masked_average_precision`: CSL's ``mAP_partial`` (ALGORITHMS.md 9f) for partial evaluation labels in
  {-1, 0, 1}: per class, AP over the annotated entries only; a class without an annotated positive or an
  annotated negative is skipped, and the mean is over the remaining classes.

All functions are vectorised over classes (one sort per column, no per-class Python loop) and
return plain Python floats/lists, so results serialise to JSON directly.

Units: ``map`` / ``map_pos`` are in percent (Cole's scale, what the trainer logs as val/test mAP);
per-class AP and every precision / recall / F1 here are fractions in [0, 1] (sklearn's scale, which
the tests compare against). Everything a person reads (``report.json``, ``report.md``, the evaluate
summary, plots, log lines) shows them in percent: :func:`vlpl.eval.report.finalize_report` converts
once, when the report is assembled.
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple

import numpy as np

__all__ = ["average_precision", "mean_average_precision", "masked_average_precision", "f1_metrics",
           "f1_metrics_topk"]


def _as_2d(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"y_true and scores must both be (N, C) of the same shape; got {y.shape} and {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("y_true must contain only 0 and 1 (full ground truth, not observed labels)")
    return y.astype(bool), s


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise, 0 where ``den == 0``."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def average_precision(y_true: Any, scores: Any) -> np.ndarray:
    """Per-class average precision (§2d), equal to sklearn's ``average_precision_score`` per column.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the *distinct* score thresholds in decreasing order (all
    items tied at a score enter together, as in sklearn's ``precision_recall_curve``), with
    ``R_0 = 0``. Equivalently, every positive contributes the precision at the end of its tie group,
    divided by the number of positives; that is how it is computed here, one stable sort per column.

    Args:
        y_true: ``(N, C)`` in {0, 1} (or bool).
        scores: ``(N, C)`` real scores (any monotone scale; probabilities or logits).

    Returns:
        ``(C,)`` float64. A class with no positive gets AP = 0 (Cole's convention; sklearn warns and
        returns 0 there too); a class whose items are all positive gets AP = 1.
    """
    y, s = _as_2d(y_true, scores)
    n, c = s.shape
    if n == 0:
        return np.zeros(c, dtype=np.float64)
    order = np.argsort(-s, axis=0, kind="stable")
    s_sorted = np.take_along_axis(s, order, axis=0)
    y_sorted = np.take_along_axis(y, order, axis=0)
    tp = np.cumsum(y_sorted, axis=0, dtype=np.float64)
    rank = np.arange(1, n + 1, dtype=np.float64)[:, None]
    # last position of each tie group: where the next score differs (and the final row)
    group_end = np.ones((n, c), dtype=bool)
    group_end[:-1] = s_sorted[:-1] != s_sorted[1:]
    # for every position, the index of the end of its tie group (backward running minimum)
    end_idx = np.where(group_end, np.arange(n)[:, None], n)
    end_idx = np.minimum.accumulate(end_idx[::-1], axis=0)[::-1]
    precision_at_end = np.take_along_axis(tp / rank, end_idx, axis=0)
    n_pos = tp[-1]
    return safe_div((y_sorted * precision_at_end).sum(axis=0), n_pos)


def mean_average_precision(y_true: Any, scores: Any) -> Dict[str, Any]:
    """Cole et al.'s mAP (§2d) plus the mean over classes that have a positive.

    Returns:
        dict with
          * ``map``: 100 x mean AP over **all** classes, AP = 0 for classes without positives
            (the number every SPML paper reports, §2d);
          * ``map_pos``: 100 x mean AP over classes with >= 1 positive (0.0 if there is none);
          * ``per_class_ap``: list of C floats in [0, 1];
          * ``num_classes_with_pos``: int.
    """
    y, s = _as_2d(y_true, scores)
    ap = average_precision(y, s)
    has_pos = y.any(axis=0)
    n_with = int(has_pos.sum())
    return {
        "map": float(100.0 * ap.mean()) if ap.size else 0.0,
        "map_pos": float(100.0 * ap[has_pos].mean()) if n_with else 0.0,
        "per_class_ap": ap.tolist(),
        "num_classes_with_pos": n_with,
    }


def masked_average_precision(y: Any, scores: Any) -> Dict[str, Any]:
    """CSL's ``mAP_partial`` (ALGORITHMS.md 9f): mAP over annotated entries only.

    ``y`` uses this project's coding (ALGORITHMS.md 1): +1 annotated positive, -1 annotated negative, 0 unknown
    (CSL codes unknown as -1 and negative as 0; the rule is the same). Per class ``c``, the entries with
    ``y[:, c] != 0`` are kept and their AP computed exactly as :func:`average_precision` does (step-wise, tie
    groups entered together; an unknown entry tied with annotated ones does not count). A class with no
    annotated entry, no annotated positive or no annotated negative is **skipped** (CSL: AP = -1, left out of
    the mean), and ``map`` is the mean over the remaining classes. CSL's own per-class AP is the same
    precision-at-each-positive sum, except that it breaks score ties by sort order (``argsort``) where this
    one enters a tie group at once; without ties they agree.

    Args:
        y: ``(N, C)`` in {-1, 0, 1}.
        scores: ``(N, C)`` real scores.

    Returns:
        dict with
          * ``map``: 100 x mean AP over the classes used (0.0 when none is);
          * ``map_macro``: CSL's ``map_macro``, the used classes' APs weighted by their annotated positives;
          * ``per_class_ap``: C entries, the AP in [0, 1] or None for a skipped class;
          * ``num_classes_used`` / ``num_classes_skipped``;
          * ``skipped``: class indices skipped, by reason (``no_annotation``, ``no_positive``, ``no_negative``;
            CSL's order of tests);
          * ``num_annotated``: annotated entries (all classes).
    """
    yy = np.asarray(y)
    s = np.asarray(scores, dtype=np.float64)
    if yy.ndim == 1:
        yy = yy[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if yy.ndim != 2 or yy.shape != s.shape:
        raise ValueError(f"y and scores must both be (N, C) of the same shape; got {yy.shape} and {s.shape}")
    if not np.isin(yy, (-1, 0, 1)).all():
        raise ValueError("y must contain only -1 (annotated negative), 0 (unknown) and 1 (annotated positive)")
    if np.isnan(s[yy != 0]).any():
        raise ValueError("scores contain NaN at annotated entries")
    n, c = s.shape
    pos = yy == 1
    annotated = yy != 0
    n_pos = pos.sum(axis=0)
    n_ann = annotated.sum(axis=0)
    no_ann = n_ann == 0
    no_pos = ~no_ann & (n_pos == 0)
    no_neg = ~no_ann & ~no_pos & (n_pos == n_ann)
    used = ~(no_ann | no_pos | no_neg)
    ap = np.zeros(c, dtype=np.float64)
    if n and used.any():
        s_used = np.where(annotated, s, -np.inf)[:, used]  # unknown entries: value irrelevant, not counted
        order = np.argsort(-s_used, axis=0, kind="stable")
        s_sorted = np.take_along_axis(s_used, order, axis=0)
        p_sorted = np.take_along_axis(pos[:, used], order, axis=0)
        a_sorted = np.take_along_axis(annotated[:, used], order, axis=0)
        tp = np.cumsum(p_sorted, axis=0, dtype=np.float64)
        counted = np.cumsum(a_sorted, axis=0, dtype=np.float64)
        group_end = np.ones(s_sorted.shape, dtype=bool)
        group_end[:-1] = s_sorted[:-1] != s_sorted[1:]
        end_idx = np.where(group_end, np.arange(n)[:, None], n)
        end_idx = np.minimum.accumulate(end_idx[::-1], axis=0)[::-1]
        precision_at_end = np.take_along_axis(safe_div(tp, counted), end_idx, axis=0)
        ap[used] = safe_div((p_sorted * precision_at_end).sum(axis=0), tp[-1])
    weights = n_pos[used].astype(np.float64)
    return {
        "map": float(100.0 * ap[used].mean()) if used.any() else 0.0,
        "map_macro": float(100.0 * (ap[used] * weights).sum() / weights.sum()) if used.any() else 0.0,
        "per_class_ap": [float(a) if u else None for a, u in zip(ap, used)],
        "num_classes_used": int(used.sum()),
        "num_classes_skipped": int(c - used.sum()),
        "skipped": {"no_annotation": np.nonzero(no_ann)[0].tolist(), "no_positive": np.nonzero(no_pos)[0].tolist(),
                    "no_negative": np.nonzero(no_neg)[0].tolist()},
        "num_annotated": int(n_ann.sum()),
    }


class PRF(NamedTuple):
    """Precision / recall / F1 of a boolean prediction mask, per class (``*_c``, arrays) and micro."""

    tp_c: np.ndarray
    pred_c: np.ndarray
    true_c: np.ndarray
    p_c: np.ndarray
    r_c: np.ndarray
    f1_c: np.ndarray
    p: float
    r: float
    f1: float


def prf(truth: np.ndarray, pred: np.ndarray) -> PRF:
    """Per-class and micro precision / recall / F1 of boolean ``pred`` against boolean ``truth`` (N, C).

    ``P_c = TP_c / #pred_c``, ``R_c = TP_c / #true_c``, micro ``P = sum TP / sum #pred``,
    ``R = sum TP / sum #true``, F1 = ``2 P R / (P + R)``; every 0/0 is 0. Shared by the ML-GCN metrics
    below and the pseudo-label quality of :mod:`vlpl.eval.quality`.
    """
    tp_c = (truth & pred).sum(axis=0).astype(np.float64)
    pred_c = pred.sum(axis=0).astype(np.float64)
    true_c = truth.sum(axis=0).astype(np.float64)
    p_c = safe_div(tp_c, pred_c)
    r_c = safe_div(tp_c, true_c)
    p = float(safe_div(tp_c.sum(), pred_c.sum()))
    r = float(safe_div(tp_c.sum(), true_c.sum()))
    return PRF(tp_c, pred_c, true_c, p_c, r_c, safe_div(2 * p_c * r_c, p_c + r_c), p, r,
               float(safe_div(2 * p * r, p + r)))


def _prf_from_predictions(y: np.ndarray, pred: np.ndarray) -> Dict[str, Any]:
    """Per-class and overall precision / recall / F1 from boolean predictions (ML-GCN definitions).

    Per class c: ``P_c = TP_c / #pred_c``, ``R_c = TP_c / #true_c``; ``CP``/``CR`` are their means
    over all C classes and ``CF1 = 2 CP CR / (CP + CR)`` (F1 of the class-averaged P and R, the
    ML-GCN definition, not the mean of per-class F1). ``OP = sum TP / sum #pred``,
    ``OR = sum TP / sum #true``, ``OF1 = 2 OP OR / (OP + OR)``. Every 0/0 (a class never predicted,
    a class without positives, P + R = 0) is defined as 0, and such a class still counts in the
    class average.
    """
    c = prf(y, pred)
    cp = float(c.p_c.mean()) if c.p_c.size else 0.0
    cr = float(c.r_c.mean()) if c.r_c.size else 0.0
    return {
        "CP": cp,
        "CR": cr,
        "CF1": float(safe_div(2 * cp * cr, cp + cr)),
        "OP": c.p,
        "OR": c.r,
        "OF1": c.f1,
        "per_class_precision": c.p_c.tolist(),
        "per_class_recall": c.r_c.tolist(),
        "per_class_f1": c.f1_c.tolist(),
    }


def f1_metrics(y_true: Any, scores: Any, threshold: float = 0.5) -> Dict[str, Any]:
    """CP, CR, CF1, OP, OR, OF1 with predictions ``scores >= threshold`` (ML-GCN protocol).

    ``scores`` are probabilities (``sigmoid`` of the logits); ``>= 0.5`` equals ML-GCN's
    ``logit >= 0``. See :func:`_prf_from_predictions` for the definitions and the 0/0 = 0 rule.

    Returns:
        dict with ``CP, CR, CF1, OP, OR, OF1`` (fractions in [0, 1]), ``per_class_precision``,
        ``per_class_recall``, ``per_class_f1`` (lists) and ``threshold``.
    """
    y, s = _as_2d(y_true, scores)
    out = _prf_from_predictions(y, s >= threshold)
    out["threshold"] = float(threshold)
    return out


def f1_metrics_topk(y_true: Any, scores: Any, k: int = 3) -> Dict[str, Any]:
    """CP, CR, CF1, OP, OR, OF1 when each image predicts exactly its top-``k`` classes (ML-GCN's top-3).

    Ties at the k-th score are broken towards the lower class index (stable sort); ``k`` is clamped
    to C. Same definitions and 0/0 = 0 rule as :func:`f1_metrics`.

    Returns:
        the same keys as :func:`f1_metrics`, with ``k`` instead of ``threshold``.
    """
    y, s = _as_2d(y_true, scores)
    if k < 0:
        raise ValueError(f"k must be >= 0; got {k}")
    kk = min(int(k), s.shape[1])
    pred = np.zeros_like(y, dtype=bool)
    if kk > 0 and s.shape[0] > 0:
        idx = np.argsort(-s, axis=1, kind="stable")[:, :kk]
        np.put_along_axis(pred, idx, True, axis=1)
    out = _prf_from_predictions(y, pred)
    out["k"] = kk
    return out
