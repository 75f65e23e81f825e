"""PNG plots for ``vlpl evaluate`` (matplotlib, Agg backend), in one style.

Every function draws on its own :class:`matplotlib.figure.Figure` with an Agg canvas (no pyplot, so
no global backend switch and no figure left open), inside :func:`plot_style` (the one set of rcParams
every plot uses: sizes, grid, colour-blind-safe colours, constrained layout), writes the PNG
atomically and returns the path. Inputs are plain numpy arrays and the metric dicts as the metric
functions return them: ``labels`` ``(N, C)`` in {0, 1}, ``scores`` ``(N, C)`` real, per-class AP and
precision / recall as fractions in [0, 1]. Every axis that shows a metric shows it in percent and
says so; legends sit outside the data area; titles name the split.

:func:`draw_report_plots` is what the evaluate stage calls: which plots a report has, their titles
and file names.
"""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import matplotlib
import numpy as np
from cycler import cycler
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, PercentFormatter

from vlpl.store.atomic import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "PLOT_NAMES",
    "STYLE",
    "plot_style",
    "useful_threshold_range",
    "precision_recall_curve",
    "plot_per_class_ap",
    "plot_pr_curves",
    "plot_threshold_sweep",
    "plot_score_histograms",
    "plot_training_curve",
    "draw_report_plots",
]

# Above this many classes the per-class AP chart is a sorted curve without class names.
MAX_NAMED_BARS = 100

# Every plot a report can have (file stem = key); a stale one of an earlier evaluation is removed.
PLOT_NAMES = ("training_curve", "run_per_class_ap", "run_pr_curves", "run_score_histograms",
              "zeroshot_per_class_ap", "zeroshot_pr_curves", "zeroshot_score_histograms", "pseudo_threshold_sweep")

# Okabe & Ito's colour-blind-safe palette (black is kept for averages and references).
_COLORS = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442"]
POS_COLOR, NEG_COLOR, MEAN_COLOR = "#0072B2", "#D55E00", "#555555"

STYLE: Dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": 110,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "figure.constrained_layout.use": True,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "figure.titlesize": 12,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.framealpha": 0.9,
    "axes.grid": True,
    "grid.alpha": 0.35,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": cycler(color=_COLORS),
    "lines.linewidth": 1.5,
    "lines.markersize": 4,
}

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def plot_style() -> Iterator[None]:
    """The rcParams every ``vlpl`` plot is drawn with (:data:`STYLE`), restored on exit."""
    with matplotlib.rc_context(STYLE):
        yield


def _styled(fn: F) -> F:
    """Run a plot function inside :func:`plot_style` (rcParams are read when artists are created)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plot_style():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    log.debug("wrote %s", path)
    return path


def _plain_number(v: float, _pos: Any = None) -> str:
    """A log-axis tick as a plain number (0.01, 0.1, 1, 10) rather than 10^-2."""
    return f"{v:g}"


def _log_axis(axis: Any) -> None:
    """Ticks at 1, 2, 5 x 10^k with plain-number labels, no minor labels."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(_plain_number))
    axis.set_minor_formatter(NullFormatter())


# --------------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------------


def precision_recall_curve(y_true: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Precision and recall of ``scores >= t`` at every distinct score ``t``, from high to low.

    Tied scores enter together (as in :func:`vlpl.eval.metrics.average_precision`). Returns
    ``(precision, recall)`` as fractions, both starting at recall 0 (precision 1) so that a step plot
    begins at the top-left corner. With no positive, recall is all 0.
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


def useful_threshold_range(rows: Sequence[Dict[str, Any]], keys: Sequence[str] = ("precision", "recall")
                           ) -> Tuple[float, float]:
    """The threshold interval over which ``keys`` change, widened by one swept point on each side.

    ``rows`` are threshold-sweep rows (``threshold`` plus the values of ``keys``). Below the first
    change and above the last one the curves are flat (every score above, or none), so a plot limited
    to this interval shows all that varies. With fewer than two rows, or nothing changing, the whole
    swept interval is returned.
    """
    pts = sorted(rows, key=lambda r: r["threshold"])
    t = [float(r["threshold"]) for r in pts]
    if len(t) < 2:
        return (t[0], t[0]) if t else (0.0, 1.0)
    changed = [i for i in range(1, len(pts)) if any(pts[i].get(k) != pts[i - 1].get(k) for k in keys)]
    if not changed:
        return t[0], t[-1]
    return t[max(changed[0] - 2, 0)], t[min(changed[-1] + 1, len(t) - 1)]


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------


@_styled
def plot_per_class_ap(ap: Sequence[float], classes: Sequence[str], path: Path, title: str,
                      num_pos: Optional[Sequence[int]] = None) -> Path:
    """Per-class AP (percent) sorted from best to worst; classes without positives are greyed.

    ``ap`` are fractions (as :func:`vlpl.eval.metrics.average_precision` returns them). Up to
    :data:`MAX_NAMED_BARS` classes: a bar per class with its name; beyond, a sorted curve.
    """
    ap_arr = 100.0 * np.asarray(ap, dtype=np.float64)
    c = ap_arr.size
    order = np.argsort(-ap_arr, kind="stable")
    has_pos = np.ones(c, bool) if num_pos is None else np.asarray(num_pos) > 0
    if c <= MAX_NAMED_BARS:
        fig = _new_figure(max(6.0, 0.16 * c + 2.5), 4.8)
        ax = fig.add_subplot(1, 1, 1)
        colors = [POS_COLOR if has_pos[i] else "#CFCFCF" for i in order]
        ax.bar(np.arange(c), ap_arr[order], color=colors, width=0.8)
        ax.set_xticks(np.arange(c))
        ax.set_xticklabels([classes[i] for i in order], rotation=90, fontsize=7)
        ax.set_xlim(-0.6, c - 0.4)
        ax.grid(axis="x", visible=False)
        ax.set_xlabel("class (sorted by AP)")
    else:
        fig = _new_figure(8.0, 4.8)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(np.arange(c), ap_arr[order], color=POS_COLOR)
        ax.set_xlabel("class rank (sorted by AP)")
    mean = float(ap_arr.mean()) if c else 0.0
    handles = [ax.axhline(mean, color=NEG_COLOR, linestyle="--", linewidth=1.2, label=f"mAP {mean:.2f} %")]
    n_empty = int((~has_pos).sum())
    if n_empty:
        from matplotlib.patches import Patch

        handles.append(Patch(color="#CFCFCF", label=f"{n_empty} class{'es' if n_empty > 1 else ''} without "
                                                      "positives (AP 0)"))
    ax.set_ylabel("AP (%)")
    ax.set_ylim(0, 100)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    ax.set_title(title)
    fig.legend(handles=handles, loc="outside upper right", ncols=len(handles))
    return _save(fig, path)


@_styled
def plot_pr_curves(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str], path: Path, title: str,
                   num_classes: int = 5, ap: Optional[Sequence[float]] = None) -> Path:
    """Precision-recall curves (percent) of the ``num_classes`` most frequent classes plus the
    micro-average (every (image, class) entry pooled). Steps are drawn so that the area under a class's
    curve is its AP (precision ``P_k`` over the recall interval ``(R_{k-1}, R_k]``); ``ap`` (fractions)
    labels each class with its AP. The legend sits beside the plot, never on a curve."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    fig = _new_figure(8.5, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    for c in _frequent_classes(y, num_classes):
        p, r = _ap_steps(*precision_recall_curve(y[:, c], s[:, c]))
        label = f"{classes[c]} ({int(y[:, c].sum())} pos.)"
        if ap is not None:
            label = f"{classes[c]}: AP {100 * ap[c]:.1f} % ({int(y[:, c].sum())} pos.)"
        ax.step(100 * r, 100 * p, where="pre", label=label)
    p, r = _ap_steps(*precision_recall_curve(y, s))
    ax.step(100 * r, 100 * p, where="pre", color="black", linewidth=2.0, linestyle="--",
            label="micro-average (all entries)")
    ax.set_xlabel("recall (%)")
    ax.set_ylabel("precision (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 102)
    ax.set_title(title)
    fig.legend(loc="outside right upper", title=f"the {num_classes} most frequent classes", title_fontsize=8)
    return _save(fig, path)


@_styled
def plot_threshold_sweep(sweeps: Dict[str, List[Dict[str, Any]]], path: Path, title: str) -> Path:
    """Pseudo-label precision / recall / F1 (percent) against the threshold, and pseudo-positives per
    image below, one line style per named sweep (rows as returned by
    :func:`vlpl.eval.quality.threshold_sweep`, precision / recall / F1 as fractions).

    The threshold axis is logarithmic (the scores are softmax-like: most of their range is close to 0)
    and limited to :func:`useful_threshold_range` of all sweeps, where precision and recall change;
    pseudo-positives per image are on a log axis too (they span orders of magnitude).
    """
    fig = _new_figure(8.5, 6.2)
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    styles = ["-", "--", ":", "-."]
    colors = {"precision": _COLORS[0], "recall": _COLORS[1], "f1": _COLORS[2]}
    names = {"precision": "precision", "recall": "recall", "f1": "F1"}
    lo, hi, top = np.inf, -np.inf, 0.0
    all_t: List[float] = []
    for i, (name, rows) in enumerate(sweeps.items()):
        rows = sorted((r for r in rows or [] if r["threshold"] > 0), key=lambda r: r["threshold"])
        if not rows:
            continue
        a, b = useful_threshold_range(rows)
        lo, hi = min(lo, a), max(hi, b)
        t = [r["threshold"] for r in rows]
        all_t += t
        ls = styles[i % len(styles)]
        label = name.replace("_", " ")
        for key, color in colors.items():
            vals = [100 * r[key] for r in rows]
            top = max(top, *vals)
            ax.plot(t, vals, ls, color=color, marker=".", label=f"{names[key]}, {label}")
        per_image = np.array([r["per_image"] for r in rows], dtype=np.float64)
        ax2.plot(t, np.where(per_image > 0, per_image, np.nan), ls, color=_COLORS[4], marker=".",
                 label=f"pseudo-positives / image, {label}")
    ax.set_ylabel("precision, recall, F1 (%)")
    # a little below 0 so that a curve at 0 % is not hidden by the axis
    ax.set_ylim(-1.5, min(100.0, 10.0 * np.ceil(top * 1.1 / 10.0)) if top > 0 else 100.0)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    ax.set_title(title)
    ax2.set_xlabel("threshold (log scale)")
    ax2.set_ylabel("pseudo-positives / image")
    if all_t:
        ax.set_xscale("log")
        ax2.set_yscale("log")
        _log_axis(ax2.xaxis)
        _log_axis(ax2.yaxis)
        if hi > lo:
            ax.set_xlim(lo / 1.15, hi * 1.15)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        fig.legend(h1 + h2, l1 + l2, loc="outside right upper")
    else:
        ax.text(0.5, 0.5, "no positive threshold swept", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


@_styled
def plot_score_histograms(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str], path: Path,
                          title: str, num_classes: int = 12, bins: int = 30, score_name: str = "score") -> Path:
    """Score histograms of positives vs negatives for the ``num_classes`` most frequent classes.

    A grid of panels, each with its own score range (softmax-like scores of different classes live on
    very different scales), ticks and labels on both axes (``score_name`` on x, the share of the
    class's positives or negatives per bin on y, so that a few positives remain visible beside many
    negatives) and the counts in the panel title; one legend for the figure.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    chosen = _frequent_classes(y, num_classes)
    ncols = max(1, min(4, len(chosen)))
    nrows = max(1, int(np.ceil(len(chosen) / ncols)))
    fig = _new_figure(3.3 * ncols, 2.6 * nrows + 0.9)
    fig.suptitle(title)
    handles: List[Any] = []
    for k, c in enumerate(chosen):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        pos, neg = s[y[:, c], c], s[~y[:, c], c]
        lo, hi = float(s[:, c].min()), float(s[:, c].max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        h = []
        if neg.size:
            h.append(ax.hist(neg, bins=edges, weights=np.full(neg.size, 100.0 / neg.size), alpha=0.55,
                             color=NEG_COLOR, label="negatives")[2])
        h.append(ax.hist(pos, bins=edges, weights=np.full(pos.size, 100.0 / pos.size), alpha=0.65,
                         color=POS_COLOR, label="positives")[2])
        if len(h) > len(handles):
            handles = h
        ax.set_title(f"{classes[c]} ({pos.size} pos. / {neg.size} neg.)", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
        if k % ncols == 0:
            ax.set_ylabel("share of pos. / neg. (%)", fontsize=8)
        if k >= len(chosen) - ncols:
            ax.set_xlabel(score_name, fontsize=8)
    if not chosen:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no class has a positive", ha="center", va="center")
        ax.set_axis_off()
    if handles:
        fig.legend([hh[0] for hh in handles], [hh[0].get_label() for hh in handles], loc="outside lower center",
                   ncols=2)
    return _save(fig, path)


@_styled
def plot_training_curve(epochs: List[Dict[str, Any]], path: Path, title: str,
                        best_epoch: Optional[int] = None) -> Path:
    """Validation and test mAP (percent) by epoch, and the training loss on a second axis when logged."""
    fig = _new_figure(8.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    x = [r["epoch"] for r in epochs]
    for key, color in (("val_map", _COLORS[0]), ("test_map", _COLORS[1])):
        pts = [(e, r.get(key)) for e, r in zip(x, epochs) if r.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=color,
                    label=key.replace("_map", " mAP (%)"))
    if best_epoch is not None:
        ax.axvline(best_epoch, color=MEAN_COLOR, linestyle=":", label=f"best epoch {best_epoch}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mAP (%)")
    ax.set_title(title)
    losses = [(e, r.get("train_loss")) for e, r in zip(x, epochs) if r.get("train_loss") is not None]
    handles, names = ax.get_legend_handles_labels()
    if losses:
        ax2 = ax.twinx()
        ax2.spines["right"].set_visible(True)
        ax2.grid(False)
        line = ax2.plot([p[0] for p in losses], [p[1] for p in losses], "--", color=_COLORS[3],
                        label="train loss")
        ax2.set_ylabel("train loss")
        handles += line
        names += ["train loss"]
    if handles:
        fig.legend(handles, names, loc="outside right upper")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# the report's plots
# --------------------------------------------------------------------------------------------------


def draw_report_plots(out: Path, split: str, run_section: Optional[Dict[str, Any]] = None,
                      run_arr: Optional[Dict[str, Any]] = None, store_section: Optional[Dict[str, Any]] = None,
                      store_arr: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """Draw every plot of an evaluation report into ``out/plots``; returns ``{name: path relative to out}``.

    ``run_section`` / ``store_section`` are the report's sections as the evaluate stage builds them
    (metrics as fractions, before :func:`vlpl.eval.report.finalize_report`); ``run_arr`` holds
    ``labels``, ``probs``, ``classes``, ``store_arr`` holds ``labels``, ``phi``, ``classes``. A plot of
    :data:`PLOT_NAMES` that this evaluation did not draw is removed (it would be stale).
    """
    pdir = Path(out) / "plots"
    made: Dict[str, Path] = {}
    if run_section is not None and run_arr is not None:
        name = Path(run_section["path"]).name
        met, cl = run_section["metrics"], run_arr["classes"]
        n = run_section["num_images"]
        if run_section.get("epochs"):
            made["training_curve"] = plot_training_curve(
                run_section["epochs"], pdir / "training_curve.png", f"{name}: mAP (%) by epoch (validation and test)",
                run_section.get("best_epoch"))
        made["run_per_class_ap"] = plot_per_class_ap(
            met["per_class_ap"], cl, pdir / "run_per_class_ap.png",
            f"{name}: per-class AP (%), split {split} ({n} images)", run_section["num_pos_per_class"])
        made["run_pr_curves"] = plot_pr_curves(
            run_arr["labels"], run_arr["probs"], cl, pdir / "run_pr_curves.png",
            f"{name}: precision-recall (%), split {split}", ap=met["per_class_ap"])
        made["run_score_histograms"] = plot_score_histograms(
            run_arr["labels"], run_arr["probs"], cl, pdir / "run_score_histograms.png",
            f"{name}: predicted probability of positives and negatives, split {split}",
            score_name="predicted probability")
    if store_section is not None and store_arr is not None:
        zs = store_section["zero_shot"]
        met, cl = zs["scores"]["damp"], store_arr["classes"]
        zsplit, n = zs.get("split", split), zs["num_images"]
        made["zeroshot_per_class_ap"] = plot_per_class_ap(
            met["per_class_ap"], cl, pdir / "zeroshot_per_class_ap.png",
            f"zero-shot DAMP phi: per-class AP (%), split {zsplit} ({n} images)", zs["num_pos_per_class"])
        made["zeroshot_pr_curves"] = plot_pr_curves(
            store_arr["labels"], store_arr["phi"], cl, pdir / "zeroshot_pr_curves.png",
            f"zero-shot DAMP phi: precision-recall (%), split {zsplit}", ap=met["per_class_ap"])
        made["zeroshot_score_histograms"] = plot_score_histograms(
            store_arr["labels"], store_arr["phi"], cl, pdir / "zeroshot_score_histograms.png",
            f"zero-shot DAMP phi of positives and negatives, split {zsplit}", score_name="DAMP phi")
        pl = store_section.get("pseudo_labels")
        if pl and pl.get("threshold_sweep"):
            made["pseudo_threshold_sweep"] = plot_threshold_sweep(
                pl["threshold_sweep"], pdir / "pseudo_threshold_sweep.png",
                f"pseudo-label quality (%) against threshold\nsplit {pl['split']} ({pl['num_images']} images), "
                "unobserved entries only")
    for key in PLOT_NAMES:
        stale = pdir / f"{key}.png"
        if key not in made and stale.exists():
            stale.unlink()
    log.info("%d plots in %s", len(made), pdir)
    return {k: str(p.relative_to(out)) for k, p in made.items()}
