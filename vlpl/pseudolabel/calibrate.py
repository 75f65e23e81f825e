"""Per-class threshold calibration on the cached CLIP scores (issue 12, item 5; ours, none of the anchors has it).

One global CLIP threshold "is very sensitive to the selection of threshold": every class has its own score
range. ``vlpl calibrate STORE`` fits, **per class and without labels**, a two-component Gaussian mixture to
the class's teacher scores over the training split and puts the class's threshold at the mixture's Bayes
boundary. It is the label-free counterpart of SATL's class thresholds (ALGORITHMS.md Decision 6, last
sentence), done once before training on the cached scores.

What is fitted (per class ``c``, over the rows of ``split``, default ``train``, unflipped views):

* the **aggregate** the thresholds apply to (``--aggregate``):

  - ``global`` (default): the raw cosine of the global view (view 0), fitted as it is. On synthetic CLIP-like
    cosines (``benchmarks/synthetic.py``) its per-class thresholds gave the best pseudo-labels (docs/SWEEPS.md).
  - ``damp``: DAMP's positive score ``phi`` (§7c steps 2-3, ``temp`` / ``eta`` recorded in the
    file; the gate uses each row's observed positives, as in training). ``phi`` lies in (0, 1) and is very
    skewed (at ``temp = 0.01`` most classes' ``phi`` lie between 1e-30 and 1e-3), so the mixture is fitted on
    ``logit(phi)`` (``phi`` clipped to ``[1e-30, 1 - 1e-7]``): for small ``phi``, ``logit(phi) ~ log(phi)``, an
    affine function of the cosines (``cos / temp`` minus the image's log-sum-exp), so the two populations keep
    the cosines' near-Gaussian shape; the threshold is mapped back (``sigmoid``) to ``phi``. ``phi`` of one class
    depends on the image's other classes (a softmax), which makes its two populations less Gaussian.

* the **fit**: EM for ``w0 N(m0, s0^2) + w1 N(m1, s1^2)`` ("negative" and "positive" components) on a
  per-class histogram (``bins`` bins between the class's min and max, Sheppard's correction ``h^2/12`` on
  the variances), so the store is read in two streamed passes (min/max, then histograms) with memory
  ``O(C x bins)`` whatever the number of images.
* **anchoring** on the observed labels: an observed positive (``observed == +1``) has responsibility 1 for
  the positive component and an observed negative (``-1``) responsibility 0 in every E-step
  (semi-supervised EM). With at least ``MIN_ANCHORS = 10`` observed positives the positive component's mean
  and variance **are** those of the observed positives and stay fixed (the random-protocol observed positives
  are a sample of the class's positives; left free, EM prefers to split the bulk of the scores into a narrow
  core and a broad "positive" component that swallows most entries: seen on synthetic CLIP-like cosines);
  EM then fits the weight and the negative component. With 1-9 observed positives they only start the
  positive component; with none it starts at the class's top decile, and the component with the larger mean
  is the positive one.
* the **threshold**: the Bayes boundary, the root of ``w1 N(x; m1, s1) = w0 N(x; m0, s0)`` where the positive
  component takes over going up (:func:`bayes_boundary`; between the means for well-separated classes, above
  ``m1`` for a small overlapping minority of positives). An entry is pseudo-positive iff its aggregate is ``>=``
  the threshold (the second root a quadratic has, where the other component wins again, is ignored).
* **degenerate fits** (fallback, recorded per class in ``diagnostics[c]["fallback"]``):

  - ``"no-separation"``: a component weight below ``1e-4``, or ``m1 - m0`` below ``1e-3`` of the class's
    score range, or no upward crossing: the threshold is the midpoint ``(m0 + m1) / 2`` when
    ``m1 > m0`` (Decision 6's "midpoint if degenerate"), else
  - ``"constant"``: the class's scores span no range (all in one bin; or the midpoint is undefined): the threshold is
    ``null`` in the file, read as ``+inf`` (the class gets no pseudo-positive).

The thresholds file (JSON, written atomically)::

    {"format": "vlpl-thresholds/1", "method": "...", "aggregate": "damp", "fit_space": "logit(phi)",
     "aggregate_params": {"temp": 0.01, "eta": 0.3}, "split": "train", "knn": null, "store": PATH,
     "store_manifest_sha256": "...", "classes": [...], "thresholds": [...],   # in the aggregate's own units
     "mixture": {"w_pos": [...], "mean_neg": [...], "std_neg": [...], "mean_pos": [...], "std_pos": [...]},
     "diagnostics": [{"class", "rows", "observed_pos", "observed_neg", "iterations", "converged",
                      "log_likelihood", "fallback"}, ...]}

Rules that use it: ``calibrated`` (this module: per-class thresholds on the file's aggregate, optional
negatives from the mixture posterior) and ``threshold`` with ``thresholds: FILE`` (a ``global`` file only:
its aggregate is the threshold rule's ``score: cosine, view: global``). A file whose classes differ from
the store's is refused, naming the first difference (:func:`check_classes`); one fitted on another store with the
same classes is used with a warning, except raw-score thresholds (any aggregate but ``damp``) on a teacher ensemble
of different score kinds, whose scores are probabilities: refused.

Neighbour consensus (rule ``knn``) shrinks every score toward its neighbours', so thresholds fitted on the raw
scores are too high for the smoothed ones; ``vlpl calibrate --knn-k K --knn-alpha A`` fits on the smoothed scores
(recorded as ``knn`` in the file) for ``rule: knn, params: {base: calibrated, base_params: {thresholds: FILE},
k: K, alpha: A}``; ``knn`` warns when its base's file was fitted on other scores.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vlpl.pseudolabel.params import CALIBRATE_AGGREGATES, CalibratedParams, DampParams
from vlpl.store.atomic import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "AGGREGATES", "MixtureFit", "Thresholds", "bayes_boundary", "fit_histograms", "fit_values",
           "to_fit_space", "from_fit_space", "aggregate_values", "calibrate_store", "write_thresholds",
           "load_thresholds", "check_classes", "per_class_thresholds", "calibrated"]

FORMAT = "vlpl-thresholds/1"
AGGREGATES = CALIBRATE_AGGREGATES
METHOD = ("per-class two-Gaussian mixture by semi-supervised EM on a histogram of the aggregate (observed "
          "positives / negatives anchored), threshold = Bayes boundary between the two means (vlpl, ours)")
_LOGIT_LO, _LOGIT_HI = 1e-30, 1.0 - 1e-7  # float32 softmax values reach ~1e-38; 1 - 1e-7 ~ float32's 1 - eps
_MIN_WEIGHT = 1e-4
_MIN_SEPARATION = 1e-3  # of the class's score range
_MIN_STD_BINS = 0.5  # variance floor: half a bin width
MIN_ANCHORS = 10  # observed positives from which the positive component is theirs (fixed), not just started


# --------------------------------------------------------------------------------------------------
# spaces
# --------------------------------------------------------------------------------------------------
def to_fit_space(values: np.ndarray, aggregate: str) -> np.ndarray:
    """The aggregate's values in the space the mixture is fitted in (``damp``: ``logit(phi)``)."""
    v = np.asarray(values, dtype=np.float64)
    if aggregate == "damp":
        p = np.clip(v, _LOGIT_LO, _LOGIT_HI)
        return np.log(p) - np.log1p(-p)
    return v


def from_fit_space(x: np.ndarray, aggregate: str) -> np.ndarray:
    """Inverse of :func:`to_fit_space` (``damp``: ``sigmoid``)."""
    x = np.asarray(x, dtype=np.float64)
    if aggregate == "damp":
        return 1.0 / (1.0 + np.exp(-x))
    return x


def aggregate_values(scores: Any, observed: Any, aggregate: str, *, temp: float = DampParams.temp,
                     eta: float = DampParams.eta) -> Any:
    """``(B, C)`` torch float: the aggregate the thresholds apply to, from ``(B, n_views, C)`` raw cosines.

    ``damp``: DAMP's ``phi`` with ``temp`` / ``eta`` (gate on ``observed``); ``global``: the global view's cosine.
    """
    from vlpl.pseudolabel.rules import damp_scores

    if aggregate == "damp":
        phi, _ = damp_scores(scores, observed, temp=temp, eta=eta)
        return phi
    if aggregate == "global":
        return scores[:, 0].float()
    raise ValueError(f"aggregate: expected one of {', '.join(AGGREGATES)}, got {aggregate!r}")


# --------------------------------------------------------------------------------------------------
# the mixture
# --------------------------------------------------------------------------------------------------
def bayes_boundary(w0: float, m0: float, s0: float, w1: float, m1: float, s1: float) -> Optional[float]:
    """The Bayes boundary of ``w0 N(m0, s0^2)`` (negative) and ``w1 N(m1, s1^2)`` (positive), ``m0 < m1``: the root
    of ``w1 N(x; m1, s1) = w0 N(x; m0, s0)`` where the positive component takes over going up, or None.

    Taking logs, ``f(x) = log(w1 N1) - log(w0 N0) = a x^2 + b x + c`` with ``a = 1/(2 s0^2) - 1/(2 s1^2)``,
    ``b = m1/s1^2 - m0/s0^2``, ``c = m0^2/(2 s0^2) - m1^2/(2 s1^2) + log(w1/s1) - log(w0/s0)``; the boundary is the
    root with ``f' > 0``: the larger root when the positive component is the wider (``a > 0``), the smaller one
    when it is the narrower (``a < 0``; far above ``m1`` the wider negative component wins again, which a
    threshold ignores), the only root when the widths are equal. It lies between the means when the
    components are well separated, and above ``m1`` when the positives are a small, overlapping minority.
    """
    if not (m1 > m0 and s0 > 0 and s1 > 0 and w0 > 0 and w1 > 0):
        return None
    a = 0.5 / s0 ** 2 - 0.5 / s1 ** 2
    b = m1 / s1 ** 2 - m0 / s0 ** 2
    c = 0.5 * m0 ** 2 / s0 ** 2 - 0.5 * m1 ** 2 / s1 ** 2 + math.log(w1 / s1) - math.log(w0 / s0)
    if abs(a) < 1e-12 * max(abs(b), 1.0):
        return -c / b if b > 0 else None
    disc = b * b - 4 * a * c
    if disc < 0:
        return None
    sq = math.sqrt(disc)
    q = -0.5 * (b + math.copysign(sq, b))  # numerically stable pair of roots: q / a and c / q
    roots = sorted(r for r in ([q / a] + ([c / q] if q != 0 else [])) if math.isfinite(r))
    if not roots:
        return None
    r = roots[-1] if a > 0 else roots[0]
    return r if 2 * a * r + b > 0 else None


@dataclass
class MixtureFit:
    """Per-class results of :func:`fit_histograms` (arrays of length C, in the fit space)."""

    threshold: np.ndarray  # NaN: no threshold (constant class)
    w_pos: np.ndarray
    mean_neg: np.ndarray
    std_neg: np.ndarray
    mean_pos: np.ndarray
    std_pos: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    log_likelihood: np.ndarray
    fallback: List[Optional[str]]
    rows: np.ndarray
    observed_pos: np.ndarray
    observed_neg: np.ndarray


def _normal_pdf(x: np.ndarray, m: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))


def _weighted_moments(x: np.ndarray, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = w.sum(axis=1)
    m = (w * x).sum(axis=1) / np.maximum(n, 1e-300)
    v = (w * (x - m[:, None]) ** 2).sum(axis=1) / np.maximum(n, 1e-300)
    return n, m, v


def fit_histograms(edges: np.ndarray, h_unl: np.ndarray, h_pos: Optional[np.ndarray] = None,
                   h_neg: Optional[np.ndarray] = None, *, max_iter: int = 500, tol: float = 1e-8,
                   min_anchors: int = MIN_ANCHORS) -> MixtureFit:
    """Two-Gaussian EM per class on histograms (see the module docstring).

    Args:
        edges: ``(C, bins + 1)`` increasing bin edges per class (fit space).
        h_unl: ``(C, bins)`` counts of the unobserved entries; ``h_pos`` / ``h_neg``: counts of observed
            positives / negatives (anchors; None: none).
        max_iter, tol: EM stops after ``max_iter`` iterations or when the mean log-likelihood per entry
            improves by less than ``tol``.
        min_anchors: with at least this many observed positives the positive component's mean and variance
            are theirs and stay fixed (EM fits the weight and the negative component); with fewer they only
            start it.
    """
    edges = np.asarray(edges, dtype=np.float64)
    h_unl = np.asarray(h_unl, dtype=np.float64)
    C, nb = h_unl.shape
    h_pos = np.zeros_like(h_unl) if h_pos is None else np.asarray(h_pos, dtype=np.float64)
    h_neg = np.zeros_like(h_unl) if h_neg is None else np.asarray(h_neg, dtype=np.float64)
    x = 0.5 * (edges[:, :-1] + edges[:, 1:])
    width = edges[:, -1] - edges[:, 0]
    h = width / nb
    total = h_unl + h_pos + h_neg
    n = total.sum(axis=1)
    n_pos, n_neg = h_pos.sum(axis=1), h_neg.sum(axis=1)
    var_floor = (_MIN_STD_BINS * np.maximum(h, 1e-12)) ** 2
    sheppard = h ** 2 / 12.0

    # ---- initialisation: positives from the anchors, else the top decile -------------------------------
    cdf = np.cumsum(total, axis=1) / np.maximum(n, 1)[:, None]
    top = cdf >= 0.9
    top_w = np.where(top, total, 0.0)
    _, m_top, v_top = _weighted_moments(x, top_w)
    _, m_rest, v_rest = _weighted_moments(x, np.where(top, 0.0, total))
    _, m_anc, v_anc = _weighted_moments(x, h_pos)
    anchored = n_pos > 0
    fixed = n_pos >= max(int(min_anchors), 2)  # the positive component is the anchors' (see the docstring)
    m1 = np.where(anchored, m_anc, m_top)
    v1 = np.where(anchored & (n_pos > 1), v_anc + np.where(fixed, sheppard, 0.0), np.where(anchored, v_rest, v_top))
    below = np.where(x < m1[:, None], total, 0.0)
    _, m_b, v_b = _weighted_moments(x, below)
    m0 = np.where(anchored, np.where(below.sum(1) > 0, m_b, m_rest), m_rest)
    v0 = np.where(anchored, np.where(below.sum(1) > 0, v_b, v_rest), v_rest)
    v0 = np.maximum(v0, var_floor)
    v1 = np.maximum(v1, var_floor)
    w1 = np.clip(np.where(anchored, np.maximum(n_pos / np.maximum(n, 1), 0.05), 0.1), 0.01, 0.99)

    iterations = np.zeros(C, np.int64)
    converged = np.zeros(C, bool)
    ll_prev = np.full(C, -np.inf)
    ll = np.full(C, -np.inf)
    active = n > 0
    for it in range(1, max_iter + 1):
        s0, s1 = np.sqrt(v0), np.sqrt(v1)
        p1 = w1[:, None] * _normal_pdf(x, m1[:, None], s1[:, None])
        p0 = (1 - w1)[:, None] * _normal_pdf(x, m0[:, None], s0[:, None])
        mix = p1 + p0
        r = np.where(mix > 0, p1 / np.where(mix > 0, mix, 1.0), (x > 0.5 * (m0 + m1)[:, None]).astype(float))
        # log-likelihood per entry of the unobserved data plus the anchors' own component densities
        with np.errstate(divide="ignore"):
            ll = (h_unl * np.log(np.maximum(mix, 1e-300))).sum(1) + (h_pos * np.log(np.maximum(p1, 1e-300))).sum(1) \
                + (h_neg * np.log(np.maximum(p0, 1e-300))).sum(1)
        ll = ll / np.maximum(n, 1)
        step_active = active & ~converged
        done = step_active & (np.abs(ll - ll_prev) < tol)
        converged |= done
        iterations[step_active] = it
        ll_prev = np.where(step_active, ll, ll_prev)
        if converged[active].all():
            break
        resp1 = h_unl * r + h_pos
        resp0 = h_unl * (1 - r) + h_neg
        n1, mm1, vv1 = _weighted_moments(x, resp1)
        n0, mm0, vv0 = _weighted_moments(x, resp0)
        upd = step_active & ~done
        w1 = np.where(upd, np.clip(n1 / np.maximum(n, 1), 0.0, 1.0), w1)
        m1 = np.where(upd & (n1 > 0) & ~fixed, mm1, m1)
        m0 = np.where(upd & (n0 > 0), mm0, m0)
        v1 = np.where(upd & (n1 > 0) & ~fixed, np.maximum(vv1 + sheppard, var_floor), v1)
        v0 = np.where(upd & (n0 > 0), np.maximum(vv0 + sheppard, var_floor), v0)
        w1 = np.clip(w1, 1e-12, 1 - 1e-12)

    # without anchors the labels of the components are arbitrary: the positive one has the larger mean
    swap = ~anchored & (m1 < m0)
    m0, m1 = np.where(swap, m1, m0), np.where(swap, m0, m1)
    v0, v1 = np.where(swap, v1, v0), np.where(swap, v0, v1)
    w1 = np.where(swap, 1 - w1, w1)

    thr = np.full(C, np.nan)
    occupied = (total > 0).sum(axis=1)  # one occupied bin: the class's scores do not vary
    fallback: List[Optional[str]] = []
    for c in range(C):
        s0, s1 = math.sqrt(v0[c]), math.sqrt(v1[c])
        sep_ok = m1[c] - m0[c] > _MIN_SEPARATION * max(width[c], 1e-12)
        weight_ok = _MIN_WEIGHT < w1[c] < 1 - _MIN_WEIGHT
        if n[c] == 0 or not width[c] > 0 or occupied[c] <= 1:
            fallback.append("constant")
            continue
        t = bayes_boundary(1 - w1[c], m0[c], s0, w1[c], m1[c], s1) if sep_ok and weight_ok else None
        if t is not None:
            thr[c] = t
            fallback.append(None)
        elif m1[c] > m0[c]:
            thr[c] = 0.5 * (m0[c] + m1[c])
            fallback.append("no-separation")
        else:
            fallback.append("constant")
    return MixtureFit(threshold=thr, w_pos=w1, mean_neg=m0, std_neg=np.sqrt(v0), mean_pos=m1, std_pos=np.sqrt(v1),
                      iterations=iterations, converged=converged, log_likelihood=ll, fallback=fallback,
                      rows=n.astype(np.int64), observed_pos=n_pos.astype(np.int64), observed_neg=n_neg.astype(np.int64))


def _class_edges(lo: np.ndarray, hi: np.ndarray, bins: int) -> np.ndarray:
    """``(C, bins + 1)`` edges from per-class min/max (a constant class gets a unit-width range around it)."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    span = hi - lo
    pad = np.where(span > 0, span * 1e-9, 0.5)
    return lo[:, None] - pad[:, None] + (span + 2 * pad)[:, None] * np.linspace(0.0, 1.0, bins + 1)[None, :]


def _accumulate(hist: np.ndarray, edges: np.ndarray, x: np.ndarray, mask: np.ndarray) -> None:
    """Add the entries ``x[mask]`` (``(B, C)``) to ``hist`` (``(C, bins)``), per class."""
    C, nb = hist.shape
    lo, hi = edges[:, 0], edges[:, -1]
    idx = np.floor((x - lo[None, :]) / (hi - lo)[None, :] * nb).astype(np.int64)
    idx = np.clip(idx, 0, nb - 1)
    flat = (np.arange(C)[None, :] * nb + idx)[mask]
    hist += np.bincount(flat, minlength=C * nb).reshape(C, nb)


def fit_values(x: np.ndarray, positives: Optional[np.ndarray] = None, negatives: Optional[np.ndarray] = None,
               *, bins: int = 2048, max_iter: int = 500) -> MixtureFit:
    """:func:`fit_histograms` on in-memory values ``x`` (``(N,)`` one class or ``(N, C)``, fit space);
    ``positives`` / ``negatives``: boolean masks of the anchors (same shape)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
        positives = None if positives is None else np.asarray(positives)[:, None]
        negatives = None if negatives is None else np.asarray(negatives)[:, None]
    pos = np.zeros(x.shape, bool) if positives is None else np.asarray(positives, bool)
    neg = np.zeros(x.shape, bool) if negatives is None else np.asarray(negatives, bool) & ~pos
    edges = _class_edges(x.min(0), x.max(0), bins)
    hs = [np.zeros((x.shape[1], bins)) for _ in range(3)]
    for h, m in zip(hs, (~pos & ~neg, pos, neg)):
        _accumulate(h, edges, x, m)
    return fit_histograms(edges, *hs, max_iter=max_iter)


# --------------------------------------------------------------------------------------------------
# a store
# --------------------------------------------------------------------------------------------------
def _batches(reader: Any, batch_size: int, knn: Optional[Dict[str, Any]] = None) -> Any:
    import torch

    for pos, scores in reader.iter_scores(batch_size):
        obs = reader.observed_at(pos)
        s = torch.from_numpy(np.ascontiguousarray(scores[:, 0]))
        if knn is not None:
            from vlpl.pseudolabel.neighbours import neighbour_smoothed
            from vlpl.pseudolabel.rules import RuleRows

            s = neighbour_smoothed(s, RuleRows(reader, pos), **knn)
        yield s, torch.from_numpy(obs), obs


def calibrate_store(store: Any, *, aggregate: str = "global", split: str = "train", bins: int = 2048,
                    batch_size: int = 512, temp: float = DampParams.temp, eta: float = DampParams.eta,
                    max_iter: int = 500, show_progress: bool = True,
                    knn: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Fit the per-class thresholds of ``store`` (a :class:`~vlpl.store.store.ScoreStore` or a directory).

    Two streamed passes over ``split`` (unflipped views): per-class min/max of the aggregate, then histograms
    of unobserved / observed-positive / observed-negative entries; then :func:`fit_histograms`. Returns the
    thresholds document (see the module docstring) without writing it (:func:`write_thresholds`).

    ``knn``: fit on neighbour-smoothed scores (:func:`vlpl.pseudolabel.neighbours.neighbour_smoothed`; keys
    ``k``, ``alpha`` and optionally ``weighting``, ``tau``, ``power``, ``views``; the rest :class:`KnnParams`'
    defaults), for rule ``knn`` with this file in its base rule; the file records the smoothing.
    """
    from vlpl.progress import progress
    from vlpl.store.store import MANIFEST_CHECKSUM_KEY, ScoreStore

    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate: expected one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    if bins < 8:
        raise ValueError(f"bins: expected at least 8, got {bins}")
    DampParams(temp=temp, eta=eta)
    if knn is not None:
        from vlpl.pseudolabel.neighbours import SMOOTHING_KEYS
        from vlpl.pseudolabel.params import KnnParams

        kp = KnnParams(**{k: v for k, v in knn.items() if k in SMOOTHING_KEYS})
        unknown = set(knn) - set(SMOOTHING_KEYS)
        if unknown:
            raise ValueError(f"knn: unknown option(s) {sorted(unknown)}; expected {', '.join(SMOOTHING_KEYS)}")
        knn = {k: getattr(kp, k) for k in SMOOTHING_KEYS}
    if isinstance(store, (str, Path)):
        store = ScoreStore(Path(store))
    if split not in store.splits():
        raise ValueError(f"store {store.root} has no split {split!r} (it has: {', '.join(store.splits())})")
    reader = store.split(split)
    if not len(reader):
        raise ValueError(f"store {store.root}: split {split!r} has no usable rows to calibrate on")
    C = len(store.classes)
    n_batches = 2 * math.ceil(len(reader) / batch_size)
    lo = np.full(C, np.inf)
    hi = np.full(C, -np.inf)
    with progress(total=n_batches, desc=f"calibrate {aggregate}", unit="batch", enabled=show_progress) as bar:
        for scores, obs_t, _ in _batches(reader, batch_size, knn):
            x = to_fit_space(aggregate_values(scores, obs_t, aggregate, temp=temp, eta=eta).numpy(), aggregate)
            lo = np.minimum(lo, x.min(0))
            hi = np.maximum(hi, x.max(0))
            bar.update(1)
        edges = _class_edges(lo, hi, bins)
        hs = [np.zeros((C, bins)) for _ in range(3)]
        for scores, obs_t, obs in _batches(reader, batch_size, knn):
            x = to_fit_space(aggregate_values(scores, obs_t, aggregate, temp=temp, eta=eta).numpy(), aggregate)
            for h, m in zip(hs, (obs == 0, obs == 1, obs == -1)):
                _accumulate(h, edges, x, m)
            bar.update(1)
    fit = fit_histograms(edges, *hs, max_iter=max_iter)
    thr = from_fit_space(fit.threshold, aggregate)
    diag = []
    for c, name in enumerate(store.classes):
        diag.append({"class": name, "rows": int(fit.rows[c]), "observed_pos": int(fit.observed_pos[c]),
                     "observed_neg": int(fit.observed_neg[c]), "iterations": int(fit.iterations[c]),
                     "converged": bool(fit.converged[c]), "log_likelihood": _num(fit.log_likelihood[c]),
                     "fallback": fit.fallback[c]})
    n_fb = sum(f is not None for f in fit.fallback)
    if n_fb:
        log.warning("calibrate: %d of %d classes had a degenerate fit (fallback recorded per class in "
                    "diagnostics): %s", n_fb, C, ", ".join(store.classes[c] for c in range(C) if fit.fallback[c])[:300])
    return {
        "format": FORMAT,
        "method": METHOD,
        "aggregate": aggregate,
        "fit_space": "logit(phi)" if aggregate == "damp" else "cosine",
        "aggregate_params": {"temp": float(temp), "eta": float(eta)} if aggregate == "damp" else {},
        "split": split,
        "knn": knn,
        "bins": int(bins),
        "store": str(store.root),
        "store_manifest_sha256": store.manifest.get(MANIFEST_CHECKSUM_KEY),
        "classes": list(store.classes),
        "thresholds": [_num(t) for t in thr],
        "mixture": {"w_pos": [_num(v) for v in fit.w_pos], "mean_neg": [_num(v) for v in fit.mean_neg],
                    "std_neg": [_num(v) for v in fit.std_neg], "mean_pos": [_num(v) for v in fit.mean_pos],
                    "std_pos": [_num(v) for v in fit.std_pos]},
        "diagnostics": diag,
    }


def _num(v: Any) -> Optional[float]:
    v = float(v)
    return v if math.isfinite(v) else None


def write_thresholds(path: Any, doc: Dict[str, Any]) -> Path:
    """Write a thresholds document atomically (temp file + rename); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, doc)
    return p


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    """A loaded thresholds file: ``thresholds`` ``(C,)`` float64 in the aggregate's units (``+inf``: none)."""

    path: str
    classes: Tuple[str, ...]
    thresholds: np.ndarray
    aggregate: str
    aggregate_params: Dict[str, float]
    mixture: Dict[str, np.ndarray]
    store_manifest_sha256: Optional[str]
    knn: Optional[Dict[str, Any]] = None  # the neighbour smoothing the scores were fitted on (None: raw scores)

    def posterior_negative(self, values: np.ndarray) -> np.ndarray:
        """``P(negative component | value)`` of ``(B, C)`` aggregate values under the fitted mixture."""
        x = to_fit_space(values, self.aggregate)
        w1 = self.mixture["w_pos"]
        p1 = w1 * _normal_pdf(x, self.mixture["mean_pos"], self.mixture["std_pos"])
        p0 = (1 - w1) * _normal_pdf(x, self.mixture["mean_neg"], self.mixture["std_neg"])
        return p0 / np.maximum(p0 + p1, 1e-300)


_LOADED: Dict[Tuple[str, int, int], Thresholds] = {}


def load_thresholds(path: Any) -> Thresholds:
    """Read and check a thresholds file (cached per path, size and mtime). Errors name the file and key."""
    import json

    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"thresholds file {p} not found (write one with `vlpl calibrate STORE --out {p}`)") \
            from None
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _LOADED:
        return _LOADED[key]
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"thresholds file {p}: not readable JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"thresholds file {p}: 'format' is {doc.get('format') if isinstance(doc, dict) else doc!r}, "
                         f"expected {FORMAT!r} (written by `vlpl calibrate`)")
    for k in ("classes", "thresholds", "aggregate", "mixture"):
        if k not in doc:
            raise ValueError(f"thresholds file {p}: missing key {k!r}")
    classes = tuple(str(c) for c in doc["classes"])
    C = len(classes)
    if doc["aggregate"] not in AGGREGATES:
        raise ValueError(f"thresholds file {p}: aggregate {doc['aggregate']!r}, expected one of {AGGREGATES}")

    def vec(key: str, values: Any, fill: float) -> np.ndarray:
        if not isinstance(values, list) or len(values) != C:
            raise ValueError(f"thresholds file {p}: {key!r} must be a list of {C} numbers (one per class)")
        try:
            return np.array([fill if v is None else float(v) for v in values], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"thresholds file {p}: {key!r} holds a non-number") from None

    thr = vec("thresholds", doc["thresholds"], np.inf)
    mix = {k: vec(f"mixture.{k}", (doc["mixture"] or {}).get(k), np.nan)
           for k in ("w_pos", "mean_neg", "std_neg", "mean_pos", "std_pos")}
    out = Thresholds(path=str(p), classes=classes, thresholds=thr, aggregate=str(doc["aggregate"]),
                     aggregate_params={k: float(v) for k, v in (doc.get("aggregate_params") or {}).items()},
                     mixture=mix, store_manifest_sha256=doc.get("store_manifest_sha256"), knn=doc.get("knn"))
    _LOADED[key] = out
    return out


def check_classes(th: Thresholds, classes: Sequence[str], where: str = "the store") -> None:
    """Refuse a thresholds file whose classes differ from ``classes``, naming the first difference."""
    classes = list(classes)
    if list(th.classes) == classes:
        return
    for i, (a, b) in enumerate(zip(th.classes, classes)):
        if a != b:
            raise ValueError(f"thresholds file {th.path}: class {i} is {a!r} but {where} has {b!r} there; "
                             f"calibrate this store (`vlpl calibrate STORE`)")
    raise ValueError(f"thresholds file {th.path} has {len(th.classes)} classes, {where} has {len(classes)} "
                     f"(first unmatched: {(th.classes[len(classes)] if len(th.classes) > len(classes) else classes[len(th.classes)])!r})")


_OTHER_STORE_WARNED: set = set()


def _checked(path: str, num_classes: int, rows: Any) -> Thresholds:
    th = load_thresholds(path)
    if rows is not None:
        store = rows.split.store
        check_classes(th, store.classes, f"store {store.root}")
        kind = getattr(getattr(store, "score_kind", None), "kind", None)
        if kind == "probability" and th.aggregate != "damp":  # raw-score thresholds vs combined probabilities
            raise ValueError(f"thresholds file {path} holds thresholds on raw teacher scores, but "
                             f"{getattr(store, 'source', None) or store.root} is a teacher ensemble of different "
                             f"score kinds whose scores are probabilities (docs/TEACHERS.md): its {th.aggregate!r} "
                             f"aggregate is not in the file's units; use the member store itself, or calibrate "
                             f"with --aggregate damp")
        sha = store.manifest.get("manifest_sha256")
        if th.store_manifest_sha256 != sha and (path, sha) not in _OTHER_STORE_WARNED:
            _OTHER_STORE_WARNED.add((path, sha))
            log.warning("thresholds file %s was fitted on another store (manifest sha256 %s, this one %s): same "
                        "classes, so it is used; calibrate this store for thresholds fitted on its own scores",
                        path, th.store_manifest_sha256, sha)
    elif len(th.classes) != num_classes:
        raise ValueError(f"thresholds file {path} has {len(th.classes)} classes, the scores have {num_classes}")
    return th


def per_class_thresholds(path: str, aggregate: str, like: Any, rows: Any = None) -> Any:
    """The file's ``(C,)`` thresholds as a tensor like ``like`` (a ``(B, C)`` aggregate), checked: the file's
    aggregate must be ``aggregate`` and its classes the store's (``rows`` given) or as many as ``like``'s."""
    import torch

    th = _checked(path, like.shape[-1], rows)
    if th.aggregate != aggregate:
        raise ValueError(f"thresholds file {path} was fitted on the {th.aggregate!r} aggregate; this rule compares "
                         f"the {aggregate!r} one (calibrate with --aggregate {aggregate}, or use rule 'calibrated')")
    return torch.as_tensor(th.thresholds, dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------------------
from vlpl.registry import RULES  # noqa: E402


@RULES.register("calibrated", params=CalibratedParams)
def calibrated(scores: Any, observed: Any, *, thresholds: str,
               negative_posterior: Optional[float] = CalibratedParams.negative_posterior, rows: Any = None) -> Any:
    """Per-class calibrated thresholds (``vlpl calibrate``): +1 iff the file's aggregate >= the class's
    threshold; with ``negative_posterior``, -1 where the mixture's negative posterior >= it (positives win).

    Args:
        scores: ``(B, n_views, C)`` raw cosines (one flip variant per view chosen).
        observed: ``(B, C)`` in {-1, 0, 1} (the DAMP aggregate's gate reads its +1 entries).
        thresholds: the thresholds file; its aggregate (and DAMP's temp / eta) is the one it was fitted on.
        negative_posterior: see :class:`~vlpl.pseudolabel.params.CalibratedParams`.
        rows: :class:`vlpl.pseudolabel.rules.RuleRows` (passed by the trainer and evaluate): the file's classes
            are checked against the store's; without it only the class count is checked.

    Returns:
        ``(B, C)`` int8 in {-1, 0, 1}.
    """
    import torch

    p = CalibratedParams(thresholds=thresholds, negative_posterior=negative_posterior)
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape (B, n_views, C); got {tuple(scores.shape)}")
    th = _checked(p.thresholds, scores.shape[2], rows)
    agg = aggregate_values(scores, observed, th.aggregate, **th.aggregate_params)
    t = torch.as_tensor(th.thresholds, dtype=agg.dtype, device=agg.device)
    pos = agg >= t
    out = pos.to(torch.int8)
    if p.negative_posterior is not None:
        post = torch.from_numpy(th.posterior_negative(agg.detach().double().cpu().numpy())).to(agg.device)
        out[(post >= p.negative_posterior) & ~pos] = -1
    return out


calibrated.needs_rows = True  # type: ignore[attr-defined]
