"""Pseudo-label rules on cached CLIP scores (ALGORITHMS.md §6b VLPL, §7c DAMP, Decisions 1 and 4).

Every rule is registered in :data:`vlpl.registry.RULES` and has the signature::

    rule(scores, observed, **options) -> (B, C) int8 in {-1, 0, +1}

``scores`` holds the RAW cosine similarities cached by the score store, for one variant per
(image, view): shape ``(B, n_views, C)``, where view 0 is the global view and views
``1 .. g*g`` are the grid tiles in row-major order (tile ``(i, j)`` is view ``1 + i*g + j``).
``observed`` is the observed label matrix ``z`` of §1, shape ``(B, C)`` in ``{-1, 0, +1}``.

The output is the pseudo-label matrix ``ỹ`` of §1: +1 pseudo-positive, -1 pseudo-negative,
0 neutral. A rule may also mark observed entries (e.g. the observed positive is usually among
DAMP's top-K, §7g.5); the trainer uses ``observed`` wherever ``observed != 0`` and ``ỹ`` only
where ``observed == 0`` (``ẑ = z if z != 0 else ỹ``, §6c / §7d), so the rule's value on an
observed entry never reaches the loss.

:func:`apply_rule` is the entry point used on batches read from the store: it first draws one
cached flip variant per (image, view) with :func:`select_variants` (Decision 4), then calls the
named rule.

Parameters: every rule's defaults, meanings and validation live in one torch-free home,
:mod:`vlpl.pseudolabel.params` (``DampParams``, ...; ``rule_params(name, values)``); the functions here take
their defaults from those schemas and validate their options through them.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple

import torch

from vlpl.pseudolabel.params import (
    NEGATIVE_MODES,
    SCORE_KINDS,
    TEMP,
    VIEW_AGGREGATES,
    DampParams,
    ThresholdParams,
    TopkParams,
    VLPLParams,
    flip_variant,
    rule_params,
)
from vlpl.registry import RULES
from vlpl.store.views import ScoreKind, active_score_kind

__all__ = [
    "select_variants",
    "view_softmax",
    "aggregate_scores",
    "damp_scores",
    "damp",
    "vlpl",
    "threshold",
    "topk",
    "apply_rule",
    "rule_params",
    "RuleRows",
]

_NEGATIVE_MODES = NEGATIVE_MODES
_SCORE_KINDS = SCORE_KINDS
_VIEW_AGGREGATES = VIEW_AGGREGATES


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _check_scores(scores: torch.Tensor, observed: Optional[torch.Tensor] = None) -> None:
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape (B, n_views, C); got {tuple(scores.shape)}")
    if scores.shape[1] < 1:
        raise ValueError("scores must contain at least the global view (n_views >= 1)")
    if observed is not None:
        b, _, c = scores.shape
        if tuple(observed.shape) != (b, c):
            raise ValueError(
                f"observed must have shape (B, C) = {(b, c)} to match scores; got {tuple(observed.shape)}"
            )


def _num_bottom(negative_ratio: float, num_classes: int) -> int:
    """``floor(negative_ratio * C)``, as the released code's ``int(r * C)`` (§6b step 5, §7c step 5).

    A tolerance of 1e-9 guards against float artefacts such as ``0.29 * 100 = 28.999999999999996``;
    for every configuration in §7e the result equals the released code's.
    """
    return min(num_classes, int(math.floor(negative_ratio * num_classes + 1e-9)))


def view_softmax(scores: torch.Tensor, temp: float) -> torch.Tensor:
    """Per-view distribution over classes, ``softmax_c(cos / temp)`` (§6b step 3, §7c step 2).

    Computed in float32 at least (the store may cache float16 cosines). The released codes apply no
    CLIP logit scale; ``temp = 0.01`` plays the role of CLIP's x100 (§7g.3). ``temp`` must be > 0
    (the rules validate it through their schemas; this helper only guards against a division by zero).

    Under a sigmoid teacher's score kind (:class:`vlpl.store.views.ScoreKind`, entered by :func:`apply_rule`
    from the store) the per-view score is that teacher's own per-class probability
    ``sigmoid(logit_scale * cos + logit_bias)`` instead, ``temp`` unused (docs/TEACHERS.md).
    """
    if not temp > 0:
        raise ValueError(f"temp must be > 0; got {temp}")
    x = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
    kind = active_score_kind()
    if kind.kind != "cosine":
        return kind.probabilities(x, temp)
    return torch.softmax(x / temp, dim=-1)


def _pseudo_from_ranks(
    positive: torch.Tensor,
    neg_score: torch.Tensor,
    negative_ratio: float,
    negative_value: int,
) -> torch.Tensor:
    """Start from a boolean positive mask, then scatter ``negative_value`` into the bottom-ranked set.

    The bottom set is written *after* the positives, as in both released codes (§6b step 5,
    §7c step 5): a class that is both a positive and in the bottom set ends up with
    ``negative_value`` (0 for neutral negatives, -1 for pseudo-negatives).
    """
    out = positive.to(torch.int8)
    n_neg = _num_bottom(negative_ratio, out.shape[1])
    if n_neg > 0:
        idx = torch.topk(neg_score, k=n_neg, dim=1, largest=False).indices
        out.scatter_(1, idx, torch.full_like(idx, negative_value, dtype=torch.int8))
    return out


# --------------------------------------------------------------------------------------------
# flip variants (Decision 4)
# --------------------------------------------------------------------------------------------
def select_variants(
    scores: torch.Tensor, generator: Optional[torch.Generator], dynamic: bool = True, *,
    variant: Optional[str] = None, flips: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pick one cached flip variant per (image, view) (Decision 4, §7c step 1).

    Args:
        scores: ``(B, n_variants, n_views, C)``; variant 0 is the unflipped view, variant 1 the
            horizontally flipped one (``n_variants == 1`` when the store was built without flips).
        generator: torch RNG used for the draws (``None``: torch's global RNG on the scores'
            device). Draws are made on the generator's device and moved to the scores' device, so a
            seeded CPU generator gives the same choices whatever device holds the scores.
        dynamic: ``True``: every (image, view) independently takes each variant with probability
            ``1 / n_variants`` (1/2 for the usual two), the same distribution as the released
            AEVLP code's per-view ``RandomHorizontalFlip(0.5)`` re-drawn every step. All classes
            of one view come from the same variant. ``False`` (or ``n_variants == 1``): variant 0.
        variant: ``pseudo.variant`` (:data:`vlpl.pseudolabel.params.FLIP_VARIANTS`); None: from ``dynamic``
            (``random`` / ``unflipped``). ``follow_student_flip`` (VLPL's released code, where the teacher scores
            the student's own possibly flipped image): a sample with ``flips[b]`` reads the views of the mirrored
            image - the flipped global view and, at tile (i, j), the flipped tile (i, g-1-j) (the mirror image's
            tile (i, j) is the mirror of the original's tile (i, g-1-j); a dense view, of the global crop, keeps
            its place); an unflipped sample reads variant 0.
            No random draw is made.
        flips: ``(B,)`` bool, each sample's flip as the student saw it (``TrainBatch.flip``); needed by
            ``follow_student_flip`` only.

    Returns:
        ``(B, n_views, C)``.
    """
    if scores.dim() != 4:
        raise ValueError(f"scores must have shape (B, n_variants, n_views, C); got {tuple(scores.shape)}")
    b, n_variants, n_views, c = scores.shape
    if n_variants < 1:
        raise ValueError("scores has no variant (n_variants == 0)")
    variant = flip_variant(variant, dynamic)
    if variant == "follow_student_flip":
        if flips is None:
            raise ValueError("pseudo.variant=follow_student_flip needs each sample's flip (TrainBatch.flip); none given")
        flips = torch.as_tensor(flips).to(device=scores.device, dtype=torch.bool, non_blocking=True).reshape(-1)
        if flips.numel() != b:
            raise ValueError(f"flips has {flips.numel()} entries for a batch of {b} samples")
        if n_variants == 1:
            if bool(flips.any()):
                raise ValueError("pseudo.variant=follow_student_flip: the store has no flipped views (views.flips "
                                 "false), so a flipped student image has no cached teacher view; rebuild the store "
                                 "with flips, or use pseudo.variant=unflipped")
            return scores[:, 0]
        # per variant: the global view, g x g tiles, and (views.dense) the dense view of the global crop last
        dense = int(math.isqrt(n_views - 1) ** 2 != n_views - 1)
        g = math.isqrt(n_views - 1 - dense)
        if g * g != n_views - 1 - dense:
            raise ValueError(f"n_views={n_views} is not 1 + g*g (+ 1 dense view): a global view and a g x g grid")
        mirror = [0] + [1 + i * g + (g - 1 - j) for i in range(g) for j in range(g)] + [n_views - 1] * dense
        mirrored = scores[:, 1, mirror] if g > 1 else scores[:, 1]
        return torch.where(flips[:, None, None], mirrored, scores[:, 0])
    if variant == "unflipped" or n_variants == 1:
        return scores[:, 0]
    device = generator.device if generator is not None else scores.device
    choice = torch.randint(0, n_variants, (b, n_views), generator=generator, device=device)
    choice = choice.to(scores.device)
    index = choice[:, None, :, None].expand(b, 1, n_views, c)
    return scores.gather(1, index).squeeze(1)


# --------------------------------------------------------------------------------------------
# DAMP (§7c)
# --------------------------------------------------------------------------------------------
def damp_scores(
    scores: torch.Tensor, observed: torch.Tensor, *, temp: float = DampParams.temp, eta: float = DampParams.eta
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DAMP's positive score ``phi`` and negative score ``psi`` (§7c steps 2-3).

    * ``pi = softmax_c(cos / temp)`` per view; ``pi_glob`` = view 0, tiles = views ``1..g*g``.
    * ``a, b, m`` = max, min, mean over tiles, per class.
    * gate ``eta_n = min(pi_glob[n, c*_n], eta)``. With several observed positives (partial labels)
      ``pi_glob[n, c*_n]`` is the **max** of ``pi_glob`` over them, which is what the released
      ``max(sim_global * label_vec)`` computes for a {0,1} label vector; with none, it is 0, so
      ``eta_n = 0`` and every class takes its best tile (§7g.6). Observed negatives (-1) play no
      part in the gate.
    * ``gamma = 1[a > eta_n]`` (strict), ``loc = gamma*a + (1-gamma)*b``,
      ``phi = (pi_glob + loc)/2``, ``psi = (pi_glob + m)/2``.

    With ``n_views == 1`` (no grid) there are no tiles; DAMP then degrades to
    ``phi = psi = pi_glob`` (a global-only softmax, as VLPL's score).

    ``temp`` and ``eta`` are validated through :class:`DampParams`.

    Returns:
        ``(phi, psi)``, each ``(B, C)`` float.
    """
    DampParams(temp=temp, eta=eta)
    _check_scores(scores, observed)
    pi = view_softmax(scores, temp)
    pi_glob = pi[:, 0]
    if pi.shape[1] == 1:
        return pi_glob, pi_glob
    tiles = pi[:, 1:]
    a = tiles.max(dim=1).values
    b = tiles.min(dim=1).values
    m = tiles.mean(dim=1)
    obs_pos = (observed == 1).to(pi_glob.device)
    pos_score = torch.where(obs_pos, pi_glob, torch.zeros_like(pi_glob)).max(dim=1).values  # 0 if none
    eta_n = torch.clamp(pos_score, max=float(eta))
    gamma = a > eta_n[:, None]
    loc = torch.where(gamma, a, b)
    phi = 0.5 * (pi_glob + loc)
    psi = 0.5 * (pi_glob + m)
    return phi, psi


@RULES.register("damp")
def damp(
    scores: torch.Tensor,
    observed: torch.Tensor,
    *,
    temp: float = DampParams.temp,
    eta: float = DampParams.eta,
    threshold: float = DampParams.threshold,
    top_k: int = DampParams.top_k,
    negative_ratio: float = DampParams.negative_ratio,
    negatives: str = DampParams.negatives,
) -> torch.Tensor:
    """AEVLP's DAMP pseudo-labels from cached cosines (§7c; defaults = COCO column of §7e).

    1. ``phi, psi`` from :func:`damp_scores` (gated max/min tile aggregation).
    2. **Positives** (§7c step 4): the top-``top_k`` classes by ``phi`` that also have
       ``phi >= threshold`` get +1. ``top_k`` counts the observed positive too (§7g.5).
       ``top_k`` larger than C is clamped to C; ties are broken by ``torch.topk``.
    3. **Negatives** (§7c step 5): the bottom ``floor(negative_ratio * C)`` classes by ``psi``.
       ``negatives="neutral"`` (default, the released code, Decision 1 / §7g.1) writes 0 there;
       ``negatives="pseudo"`` (the paper) writes -1.

    Positive/negative overlap: the released code scatters the positives first and then scatters
    into the bottom set, so the bottom set wins. We keep that order in both modes: a class that is
    in the top-K with ``phi >= threshold`` *and* in the bottom set by ``psi`` ends up 0
    ("neutral", i.e. the released code's positive is silently dropped) or -1 ("pseudo"). This
    can only happen when ``psi`` ranks a high-``phi`` class near the bottom (e.g. tiny ``C``,
    large ``negative_ratio``, or CUB's ``threshold = 0.005``); with the §7e settings it is rare.

    Args:
        scores: ``(B, n_views, C)`` raw cosines, one flip variant per view already chosen.
        observed: ``(B, C)`` in {-1, 0, 1}; only its +1 entries are read (the gate).
        temp, eta, threshold, top_k, negative_ratio, negatives: see :class:`DampParams` (validated there).

    Returns:
        ``(B, C)`` int8 in {-1, 0, 1} (in {0, 1} with ``negatives="neutral"``).
    """
    p = DampParams(temp=temp, eta=eta, threshold=threshold, top_k=top_k, negative_ratio=negative_ratio,
                   negatives=negatives)
    phi, psi = damp_scores(scores, observed, temp=p.temp, eta=p.eta)
    num_classes = phi.shape[1]
    positive = torch.zeros_like(phi, dtype=torch.bool)
    k = min(p.top_k, num_classes)
    if k > 0:
        values, idx = torch.topk(phi, k=k, dim=1)
        positive.scatter_(1, idx, values >= p.threshold)
    return _pseudo_from_ranks(positive, psi, p.negative_ratio, 0 if p.negatives == "neutral" else -1)


# --------------------------------------------------------------------------------------------
# VLPL (§6b)
# --------------------------------------------------------------------------------------------
@RULES.register("vlpl")
def vlpl(
    scores: torch.Tensor,
    observed: torch.Tensor,
    *,
    temp: float = VLPLParams.temp,
    threshold: float = VLPLParams.threshold,
    negative_ratio: float = VLPLParams.negative_ratio,
) -> torch.Tensor:
    """VLPL pseudo-labels (§6b): global-view softmax, strict threshold, optional bottom negatives.

    ``pi = softmax_c(cos_global / temp)``; +1 iff ``pi > threshold`` (strict, as the released code);
    the bottom ``floor(negative_ratio * C)`` classes by ``pi`` get -1 (default ratio 0.0: none, the
    ResNet-50 path of the released code). The negatives are written after the positives, as in the
    released ``clip_vision`` path, so with an overlap -1 wins. Only view 0 is read; ``observed`` is
    not used (VLPL does not look at the observed label when labelling). Options: :class:`VLPLParams`.

    Returns:
        ``(B, C)`` int8 in {-1, 0, 1}.
    """
    p = VLPLParams(temp=temp, threshold=threshold, negative_ratio=negative_ratio)
    _check_scores(scores, observed)
    pi = view_softmax(scores[:, 0], p.temp)
    return _pseudo_from_ranks(pi > p.threshold, pi, p.negative_ratio, -1)


# --------------------------------------------------------------------------------------------
# generic baselines on an aggregated score
# --------------------------------------------------------------------------------------------
def aggregate_scores(
    scores: torch.Tensor, *, score: str = ThresholdParams.score, temp: float = TEMP, view: str = ThresholdParams.view
) -> torch.Tensor:
    """A per-class score from the cached views, for the simple ``threshold`` / ``topk`` rules.

    Args:
        scores: ``(B, n_views, C)`` raw cosines.
        score: ``"softmax"`` = per-view ``softmax_c(cos / temp)`` (§6b step 3); ``"cosine"`` = the
            raw cosine (``temp`` unused).
        view: ``"global"`` = view 0 only; ``"mean"`` / ``"max"`` = mean / max of the per-view score
            over **all** views, global included (with ``n_views == 1`` all three coincide).

    ``score``, ``temp`` and ``view`` are validated through :class:`TopkParams` (the same three options as
    the ``threshold`` and ``topk`` rules).

    Returns:
        ``(B, C)`` float.
    """
    TopkParams(score=score, temp=temp, view=view)
    _check_scores(scores)
    s = view_softmax(scores, temp) if score == "softmax" else scores.float()
    if view == "global":
        return s[:, 0]
    if view == "mean":
        return s.mean(dim=1)
    return s.max(dim=1).values


@RULES.register("threshold")
def threshold(
    scores: torch.Tensor,
    observed: torch.Tensor,
    *,
    score: str = ThresholdParams.score,
    temp: float = ThresholdParams.temp,
    view: str = ThresholdParams.view,
    threshold: float = ThresholdParams.threshold,
    thresholds: Optional[str] = ThresholdParams.thresholds,
    rows: Any = None,
) -> torch.Tensor:
    """Fixed-threshold positives on :func:`aggregate_scores`: +1 iff ``score >= threshold``.

    A baseline rule (no negatives, ``observed`` unused). With the defaults it differs from
    :func:`vlpl` only in ``>=`` versus ``>``. Options: :class:`ThresholdParams`. With ``thresholds`` (a
    ``vlpl calibrate --aggregate global`` file) each class has its own threshold on the global cosine; its
    classes are checked against the store's when ``rows`` (:class:`RuleRows`) is given.

    Returns:
        ``(B, C)`` int8 in {0, 1}.
    """
    p = ThresholdParams(score=score, temp=temp, view=view, threshold=threshold, thresholds=thresholds)
    _check_scores(scores, observed)
    agg = aggregate_scores(scores, score=p.score, temp=p.temp, view=p.view)
    if p.thresholds is not None:
        from vlpl.pseudolabel.calibrate import per_class_thresholds

        return (agg >= per_class_thresholds(p.thresholds, "global", agg, rows)).to(torch.int8)
    return (agg >= p.threshold).to(torch.int8)


threshold.needs_rows = True  # type: ignore[attr-defined]  # only to check a thresholds file's classes


@RULES.register("topk")
def topk(
    scores: torch.Tensor,
    observed: torch.Tensor,
    *,
    score: str = TopkParams.score,
    temp: float = TopkParams.temp,
    view: str = TopkParams.view,
    k: int = TopkParams.k,
) -> torch.Tensor:
    """Top-``k`` positives per image on :func:`aggregate_scores` (no threshold, no negatives).

    ``k`` counts observed positives like DAMP's ``top_k`` (§7g.5); it is clamped to C; ties are
    broken by ``torch.topk``; ``observed`` is unused. Options: :class:`TopkParams`.

    Returns:
        ``(B, C)`` int8 in {0, 1}.
    """
    p = TopkParams(score=score, temp=temp, view=view, k=k)
    _check_scores(scores, observed)
    agg = aggregate_scores(scores, score=p.score, temp=p.temp, view=p.view)
    out = torch.zeros_like(agg, dtype=torch.int8)
    kk = min(p.k, agg.shape[1])
    if kk > 0:
        idx = torch.topk(agg, k=kk, dim=1).indices
        out.scatter_(1, idx, torch.ones_like(idx, dtype=torch.int8))
    return out


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
class RuleRows(NamedTuple):
    """Which rows a rule is labelling: ``split`` (a :class:`vlpl.store.store.SplitReader`) and ``positions``
    ``(B,)`` in it. Passed by the trainer and evaluate to rules that read other rows of the store (e.g.
    ``knn``: the neighbours' scores) or check a file against the store (``calibrated``); such a rule marks
    itself with ``fn.needs_rows = True`` and receives ``rows=`` (the others never see it)."""

    split: Any
    positions: Any


def apply_rule(
    name: str,
    scores_full: torch.Tensor,
    observed: torch.Tensor,
    *,
    dynamic: bool = True,
    generator: Optional[torch.Generator] = None,
    rows: Optional[RuleRows] = None,
    score_kind: Optional[ScoreKind] = None,
    variant: Optional[str] = None,
    flips: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Select flip variants (:func:`select_variants`, Decision 4) then run rule ``name``.

    Args:
        name: a registered rule (``vlpl.registry.list_rules()``).
        scores_full: ``(B, n_variants, n_views, C)`` raw cosines as cached by the store.
        observed: ``(B, C)`` in {-1, 0, 1}.
        dynamic: per-(image, view) random variant (True) or always variant 0 (False).
        generator: RNG for the variant draws.
        rows: the split and positions of the batch (:class:`RuleRows`), for rules with ``needs_rows``.
        score_kind: what the scores are (default: ``rows.split.score_kind`` when ``rows`` is given): the rule
            runs inside its :meth:`~vlpl.store.views.ScoreKind.scope`, so its per-view probabilities are the
            teacher's own (a SigLIP-type store: per-class sigmoids, docs/TEACHERS.md); None: the kind already
            active (cosine unless a caller entered another).
        variant, flips: which cached flip variant each view takes (:func:`select_variants`; None: from
            ``dynamic``) and, for ``follow_student_flip``, each sample's flip as the student saw it.
        **kwargs: the rule's options, validated through its schema (:func:`rule_params`): an option the
            rule does not declare raises :class:`vlpl.params.UnknownParamError` (a
            :class:`vlpl.registry.RegistryError`) naming it, a bad value a :class:`ValueError`.

    Returns:
        ``(B, C)`` int8 in {-1, 0, 1}. The caller uses ``observed`` where ``observed != 0``.
    """
    # unknown names and bad options fail before any RNG draw
    fn = RULES.get(name)
    params = rule_params(name, kwargs)
    scores = select_variants(scores_full, generator, dynamic=dynamic, variant=variant, flips=flips)
    extra = {"rows": rows} if getattr(fn, "needs_rows", False) else {}
    if score_kind is None and rows is not None:
        score_kind = getattr(rows.split, "score_kind", None)
    if score_kind is None:
        return fn(scores, observed, **params.kwargs(), **params.extras(kwargs), **extra)
    with score_kind.scope():
        return fn(scores, observed, **params.kwargs(), **params.extras(kwargs), **extra)
