"""Quality of pseudo-labels against the full ground truth (ALGORITHMS.md §7g.8, §1 notation).

AEVLP logs pseudo-label precision/recall with the observed positive left out, and prints
``P R / (P + R)`` as "F1" (half the true F1, §7g.8). Here F1 is always the true ``2 P R / (P + R)``,
and every number is computed twice:

* ``excluding_observed``: only unobserved entries (``observed == 0``) count, on both the
  pseudo-label side and the ground-truth side. In SPML (observed in {0, +1}) this is exactly
  AEVLP's "leave the observed positive out". With partial labels, observed negatives are left out
  too, because the trainer uses ``observed`` wherever ``observed != 0`` (``ẑ = z if z != 0 else ỹ``)
  so pseudo-labels there never reach the loss.
* ``including_observed``: the positives the trainer effectively uses,
  ``(observed == +1) | (observed == 0 & pseudo == +1)`` (in SPML: the union of observed and
  pseudo positives), against all ground-truth positives.

All 0/0 ratios are defined as 0. Values are fractions in [0, 1], as plain Python numbers.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from vlpl.eval.metrics import prf, safe_div

__all__ = ["pseudo_label_quality", "threshold_sweep"]


def _check(labels: Any, observed: Any, other: Any, other_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    z = np.asarray(observed)
    o = np.asarray(other)
    if not (y.ndim == 2 and y.shape == z.shape == o.shape):
        raise ValueError(
            f"{other_name}, labels and observed must all be (N, C) of one shape; "
            f"got {o.shape}, {y.shape}, {z.shape}"
        )
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be the full ground truth in {0, 1}")
    if not np.isin(z, (-1, 0, 1)).all():
        raise ValueError("observed must be in {-1, 0, 1}")
    return y.astype(bool), z.astype(np.int64), o


def _prf(pred: np.ndarray, truth: np.ndarray, num_images: int) -> Dict[str, Any]:
    """Per-class and micro (overall) precision / recall / true F1 of a boolean prediction mask."""
    c = prf(truth, pred)
    tp, n_pred, n_true = int(c.tp_c.sum()), int(c.pred_c.sum()), int(c.true_c.sum())
    return {
        "precision": c.p,
        "recall": c.r,
        "f1": c.f1,
        "tp": tp,
        "num_pred": n_pred,
        "num_true": n_true,
        "per_image": float(safe_div(n_pred, num_images)),
        "per_class": {
            "precision": c.p_c.tolist(),
            "recall": c.r_c.tolist(),
            "f1": c.f1_c.tolist(),
            "num_pred": c.pred_c.astype(int).tolist(),
            "num_true": c.true_c.astype(int).tolist(),
        },
    }


def pseudo_label_quality(pseudo: Any, labels: Any, observed: Any) -> Dict[str, Any]:
    """Precision / recall / F1 of pseudo-positives and precision of pseudo-negatives (§7g.8).

    Args:
        pseudo: ``(N, C)`` pseudo-labels ``ỹ`` in {-1, 0, 1} (a rule's output).
        labels: ``(N, C)`` full ground truth ``y`` in {0, 1}.
        observed: ``(N, C)`` observed labels ``z`` in {-1, 0, 1}.

    Returns:
        dict with
          * ``excluding_observed`` and ``including_observed`` (see the module docstring), each a
            dict: ``precision, recall, f1`` (micro over all entries), ``tp, num_pred, num_true``,
            ``per_image`` (mean positives per image), and ``per_class`` lists ``precision, recall,
            f1, num_pred, num_true``;
          * ``negatives``: pseudo-negatives on unobserved entries: ``count``, ``per_image``,
            ``num_truly_negative`` and ``precision`` (fraction truly negative; 0 if there is none);
          * ``num_images``.
    """
    y, z, p = _check(labels, observed, pseudo, "pseudo")
    if not np.isin(p, (-1, 0, 1)).all():
        raise ValueError("pseudo must be in {-1, 0, 1}")
    n = y.shape[0]
    unobserved = z == 0
    pos = p == 1
    excl = _prf(pos & unobserved, y & unobserved, n)
    incl = _prf((z == 1) | (unobserved & pos), y, n)
    neg = (p == -1) & unobserved
    n_neg = int(neg.sum())
    n_true_neg = int((neg & ~y).sum())
    return {
        "excluding_observed": excl,
        "including_observed": incl,
        "negatives": {
            "count": n_neg,
            "per_image": float(safe_div(n_neg, n)),
            "num_truly_negative": n_true_neg,
            "precision": float(safe_div(n_true_neg, n_neg)),
        },
        "num_images": n,
    }


def threshold_sweep(
    scores: Any, labels: Any, observed: Any, thresholds: Sequence[float]
) -> List[Dict[str, float]]:
    """Pseudo-positive quality of ``scores >= t`` for each threshold ``t`` (excluding observed entries).

    ``scores`` is an aggregated, probability-like per-class score (e.g. DAMP's ``phi`` or a global
    softmax, ``vlpl.pseudolabel.rules.damp_scores`` / ``aggregate_scores``). Only unobserved entries
    (``observed == 0``) count, as in ``excluding_observed`` of :func:`pseudo_label_quality`. One sort
    serves all thresholds, so recall is non-increasing in ``t``.

    Returns:
        one dict per threshold, in the given order: ``threshold, precision, recall, f1`` (true F1),
        ``per_image`` (mean pseudo-positives per image), ``num_pred``, ``tp``.
    """
    y, z, s = _check(labels, observed, scores, "scores")
    s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n = y.shape[0]
    unobserved = z == 0
    all_sorted = np.sort(s[unobserved])
    pos_sorted = np.sort(s[unobserved & y])
    n_true = pos_sorted.size
    out: List[Dict[str, float]] = []
    for t in thresholds:
        n_pred = int(all_sorted.size - np.searchsorted(all_sorted, t, side="left"))
        tp = int(n_true - np.searchsorted(pos_sorted, t, side="left"))
        p = float(safe_div(tp, n_pred))
        r = float(safe_div(tp, n_true))
        out.append(
            {
                "threshold": float(t),
                "precision": p,
                "recall": r,
                "f1": float(safe_div(2 * p * r, p + r)),
                "per_image": float(safe_div(n_pred, n)),
                "num_pred": n_pred,
                "tp": tp,
            }
        )
    return out
