"""PNG plots for ``vlpl evaluate`` (matplotlib, Agg backend).

Every function draws on its own :class:`matplotlib.figure.Figure` with an Agg canvas (no pyplot, so
no global backend switch and no figure left open), writes the PNG atomically and returns the path.
Inputs are plain numpy arrays: ``labels`` ``(N, C)`` in {0, 1}, ``scores`` ``(N, C)`` real.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vlpl.store.atomic import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "precision_recall_curve",
    "plot_per_class_ap",
    "plot_pr_curves",
    "plot_threshold_sweep",
    "plot_score_histograms",
    "plot_training_curve",
]

# Above this many classes the per-class AP chart is a sorted curve without class names.
MAX_NAMED_BARS = 100


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    log.debug("wrote %s", path)
    return path


def precision_recall_curve(y_true: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Precision and recall of ``scores >= t`` at every distinct score ``t``, from high to low.

    Tied scores enter together (as in :func:`vlpl.eval.metrics.average_precision`). Returns
    ``(precision, recall)``, both starting at recall 0 (precision 1) so that a step plot begins
    at the top-left corner. With no positive, recall is all 0.
    """
    y = np.asarray(y_true, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.size == 0:
        return np.ones(1), np.zeros(1)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y, dtype=np.float64)
    rank = np.arange(1, y.size + 1, dtype=np.float64)
    ends = np.r_[s[:-1] != s[1:], True]
    n_pos = tp[-1]
    precision = tp[ends] / rank[ends]
    recall = tp[ends] / n_pos if n_pos > 0 else np.zeros(int(ends.sum()))
    return np.r_[1.0, precision], np.r_[0.0, recall]


def _ap_steps(p: np.ndarray, r: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Keep the start and the points where recall grows (the tie groups holding a positive): drawn
    with ``where="pre"`` the area under the steps is then exactly the AP."""
    keep = np.r_[True, r[1:] > r[:-1]]
    return p[keep], r[keep]


def _frequent_classes(labels: np.ndarray, n: int) -> List[int]:
    """Indices of the ``n`` classes with most positives (ties: lower index first), positives only."""
    counts = np.asarray(labels).sum(axis=0)
    order = np.argsort(-counts, kind="stable")
    return [int(c) for c in order[:n] if counts[c] > 0]


def plot_per_class_ap(ap: Sequence[float], classes: Sequence[str], path: Path, title: str,
                      num_pos: Optional[Sequence[int]] = None) -> Path:
    """Per-class AP (percent) sorted from best to worst; classes without positives are greyed.

    Up to :data:`MAX_NAMED_BARS` classes: a bar per class with its name; beyond, a sorted curve.
    """
    ap_arr = 100.0 * np.asarray(ap, dtype=np.float64)
    c = ap_arr.size
    order = np.argsort(-ap_arr, kind="stable")
    has_pos = np.ones(c, bool) if num_pos is None else np.asarray(num_pos) > 0
    if c <= MAX_NAMED_BARS:
        fig = _new_figure(max(6.0, 0.16 * c + 2.0), 4.5)
        ax = fig.add_subplot(1, 1, 1)
        colors = ["tab:blue" if has_pos[i] else "lightgrey" for i in order]
        ax.bar(np.arange(c), ap_arr[order], color=colors, width=0.8)
        ax.set_xticks(np.arange(c))
        ax.set_xticklabels([classes[i] for i in order], rotation=90, fontsize=7)
        ax.set_xlim(-0.6, c - 0.4)
    else:
        fig = _new_figure(8.0, 4.5)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(np.arange(c), ap_arr[order], color="tab:blue")
        ax.set_xlabel("class rank")
    mean = float(ap_arr.mean()) if c else 0.0
    ax.axhline(mean, color="tab:red", linestyle="--", linewidth=1, label=f"mAP {mean:.2f}")
    ax.set_ylabel("AP (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="upper right")
    if not has_pos.all():
        ax.text(0.99, 0.85, f"{int((~has_pos).sum())} classes without positives (AP 0, grey)",
                transform=ax.transAxes, ha="right", fontsize=8, color="grey")
    return _save(fig, path)


def plot_pr_curves(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str], path: Path, title: str,
                   num_classes: int = 5, ap: Optional[Sequence[float]] = None) -> Path:
    """Precision-recall curves of the ``num_classes`` most frequent classes plus the micro-average
    (every (image, class) entry pooled). Steps are drawn so that the area under a class's curve is
    its AP (precision ``P_k`` over the recall interval ``(R_{k-1}, R_k]``)."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    fig = _new_figure(6.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    for c in _frequent_classes(y, num_classes):
        p, r = _ap_steps(*precision_recall_curve(y[:, c], s[:, c]))
        label = classes[c] if ap is None else f"{classes[c]} (AP {100 * ap[c]:.1f})"
        ax.step(r, p, where="pre", linewidth=1.2, label=label)
    p, r = _ap_steps(*precision_recall_curve(y, s))
    ax.step(r, p, where="pre", color="black", linewidth=2.0, linestyle="--", label="micro-average")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_threshold_sweep(sweeps: Dict[str, List[Dict[str, Any]]], path: Path, title: str) -> Path:
    """Pseudo-label precision / recall / F1 against the threshold, one line style per named sweep
    (rows as returned by :func:`vlpl.eval.quality.threshold_sweep`), and positives per image below."""
    fig = _new_figure(7.0, 6.0)
    ax = fig.add_subplot(2, 1, 1)
    ax2 = fig.add_subplot(2, 1, 2, sharex=ax)
    styles = ["-", "--", ":", "-."]
    colors = {"precision": "tab:blue", "recall": "tab:orange", "f1": "tab:green"}
    for i, (name, rows) in enumerate(sweeps.items()):
        if not rows:
            continue
        t = [r["threshold"] for r in rows]
        ls = styles[i % len(styles)]
        for key, color in colors.items():
            ax.plot(t, [r[key] for r in rows], ls, color=color, marker=".", label=f"{key} ({name})")
        ax2.plot(t, [r["per_image"] for r in rows], ls, color="tab:purple", marker=".", label=name)
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="best")
    ax2.set_xlabel("threshold")
    ax2.set_ylabel("pseudo-positives / image")
    ax2.set_yscale("symlog", linthresh=1.0)
    ax2.legend(fontsize=7)
    return _save(fig, path)


def plot_score_histograms(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str], path: Path,
                          title: str, num_classes: int = 12, bins: int = 30) -> Path:
    """Score histograms of positives vs negatives for the ``num_classes`` most frequent classes
    (a grid, densities so that a few positives remain visible beside many negatives). Each panel
    bins its own class's score range: softmax-like scores of different classes live on very
    different scales."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    chosen = _frequent_classes(y, num_classes)
    ncols = max(1, min(4, len(chosen)))
    nrows = max(1, int(np.ceil(len(chosen) / ncols)))
    fig = _new_figure(3.2 * ncols, 2.4 * nrows + 0.6)
    fig.suptitle(title)
    for k, c in enumerate(chosen):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        pos, neg = s[y[:, c], c], s[~y[:, c], c]
        lo, hi = float(s[:, c].min()), float(s[:, c].max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        if neg.size:
            ax.hist(neg, bins=edges, density=True, alpha=0.5, color="tab:red", label=f"neg ({neg.size})")
        ax.hist(pos, bins=edges, density=True, alpha=0.6, color="tab:green", label=f"pos ({pos.size})")
        ax.set_title(classes[c], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
        ax.legend(fontsize=6)
    if not chosen:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no class has a positive", ha="center", va="center")
        ax.set_axis_off()
    return _save(fig, path)


def plot_training_curve(epochs: List[Dict[str, Any]], path: Path, title: str,
                        best_epoch: Optional[int] = None) -> Path:
    """Validation and test mAP by epoch (and the training loss on a second axis when logged)."""
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    x = [r["epoch"] for r in epochs]
    for key, color in (("val_map", "tab:blue"), ("test_map", "tab:orange")):
        pts = [(e, r.get(key)) for e, r in zip(x, epochs) if r.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=color, markersize=3,
                    label=key.replace("_map", " mAP"))
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mAP (%)")
    ax.set_title(title)
    losses = [(e, r.get("train_loss")) for e, r in zip(x, epochs) if r.get("train_loss") is not None]
    handles, names = ax.get_legend_handles_labels()
    if losses:
        ax2 = ax.twinx()
        line = ax2.plot([p[0] for p in losses], [p[1] for p in losses], "--", color="tab:green",
                        label="train loss")
        ax2.set_ylabel("train loss")
        handles += line
        names += ["train loss"]
    if handles:
        ax.legend(handles, names, loc="best", fontsize=8)
    return _save(fig, path)
