"""Full-label BCE and Cole et al.'s baselines (ALGORITHMS.md §2e): ``bce``, ``an``, ``an_ls``, ``wan``,
``epr``, ``role``, and ``iun``, ``iu``, ``pr`` (docs/LOSSES.md)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from vlpl.registry import LOSSES
from vlpl.train import loss_params as P
from vlpl.train.losses.base import (
    LossBatch,
    SPMLLoss,
    expected_positive_regularizer,
    neg_log_neg,
    neg_log_pos,
    soft_bce,
)

# ROLE estimator initialisation (ALGORITHMS.md §2e).
_ROLE_UNKNOWN_P = 0.6
_ROLE_POS_P = 0.995
_ROLE_NEG_P = 0.005


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))



class _IgnoreUnobserved(SPMLLoss):
    """Per entry ``l+(p)`` if ``z = 1``, ``l-(p)`` if ``z = -1``, ``0`` if ``z = 0``; batch mean over B x C."""

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        terms = {
            "obs_pos": m.pos * neg_log_pos(p, self.eps),
            "obs_neg": m.neg * neg_log_neg(p, self.eps),
        }
        return self._finish(terms)


@LOSSES.register("bce")
class FullLabelBCELoss(_IgnoreUnobserved):
    """Full-label BCE: the full-label upper bound (train with ``observed`` = the full +-1 labels).

    Per entry: ``l+(p)`` if ``z = 1``, ``l-(p)`` if ``z = -1``, ``0`` if ``z = 0`` (ignored); batch mean
    over all B x C entries (ALGORITHMS.md §1, §2f "full labels (BCE)").

    Args:
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    def __init__(self, observed: Any, *, eps: float = P.BCEParams.eps) -> None:
        super().__init__(observed, eps)


@LOSSES.register("an")
class AssumeNegativeLoss(SPMLLoss):
    """AN, assume negative (ALGORITHMS.md §2e): ``L = l+(p)`` if ``z = 1`` else ``l-(p)``.

    Observed ``-1`` entries also get ``l-(p)`` (logged as ``obs_neg``).

    Args:
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    def __init__(self, observed: Any, *, eps: float = P.ANParams.eps) -> None:
        super().__init__(observed, eps)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        lneg = neg_log_neg(p, self.eps)
        terms = {
            "obs_pos": m.pos * neg_log_pos(p, self.eps),
            "obs_neg": m.neg * lneg,
            "unknown": m.unk * lneg,
        }
        return self._finish(terms)


@LOSSES.register("an_ls")
class AssumeNegativeLabelSmoothingLoss(SPMLLoss):
    """AN-LS, assume negative with label smoothing (ALGORITHMS.md §2e).

    * observed positive: ``(1 - e) l+(p) + e l-(p)``;
    * unknown: ``(1 - e) l-(p) + e l+(p)``;
    * observed ``-1`` (partial labels; not in the paper): ``l-(p)``, unsmoothed, as a known negative.

    Args:
        label_smoothing: ``e``, 0.1 as in Cole et al.
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    def __init__(self, observed: Any, *, label_smoothing: float = P.ANLSParams.label_smoothing,
                 eps: float = P.ANLSParams.eps) -> None:
        super().__init__(observed, eps)
        self.label_smoothing = float(label_smoothing)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        e = self.label_smoothing
        lpos, lneg = neg_log_pos(p, self.eps), neg_log_neg(p, self.eps)
        terms = {
            "obs_pos": m.pos * ((1.0 - e) * lpos + e * lneg),
            "obs_neg": m.neg * lneg,
            "unknown": m.unk * ((1.0 - e) * lneg + e * lpos),
        }
        return self._finish(terms)


@LOSSES.register("wan")
class WeakAssumeNegativeLoss(SPMLLoss):
    """WAN, weak assume negative (ALGORITHMS.md §2e).

    Observed positives get ``l+(p)``; unknowns get ``l-(p) / (C - 1)``; observed ``-1`` (partial labels)
    get ``l-(p)`` with weight 1 (they are known, not assumed, negatives).

    Args:
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    def __init__(self, observed: Any, *, eps: float = P.WANParams.eps) -> None:
        super().__init__(observed, eps)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        lneg = neg_log_neg(p, self.eps)
        weight = 1.0 / max(self.num_classes - 1, 1)
        terms = {
            "obs_pos": m.pos * neg_log_pos(p, self.eps),
            "obs_neg": m.neg * lneg,
            "unknown": m.unk * lneg * weight,
        }
        return self._finish(terms)


@LOSSES.register("epr")
class ExpectedPositiveRegularizerLoss(SPMLLoss):
    """EPR (ALGORITHMS.md §2e): ``l+(p)`` on observed positives only, plus ``R(p)`` with weight 1.

    ``R(p) = ((1/B) sum_n sum_c p_nc - k)^2 / C^2``. Unknowns get no per-entry loss; observed ``-1``
    (partial labels) get ``l-(p)``.

    Args:
        expected_positives: ``k``, the expected number of positives per image (VOC 1.5, COCO 2.9,
            NUS 1.9, CUB 31.4, §1); default COCO's.
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    def __init__(self, observed: Any, *, expected_positives: float = P.EPRParams.expected_positives,
                 eps: float = P.EPRParams.eps) -> None:
        super().__init__(observed, eps)
        self.expected_positives = float(expected_positives)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        terms = {
            "obs_pos": m.pos * neg_log_pos(p, self.eps),
            "obs_neg": m.neg * neg_log_neg(p, self.eps),
        }
        reg = expected_positive_regularizer(p, self.expected_positives, self.distributed)
        return self._finish(terms, reg)


@LOSSES.register("role")
class ROLELoss(SPMLLoss):
    """ROLE, regularised online label estimation (ALGORITHMS.md §2e).

    Stateful: the label estimator, a free ``N x C`` float32 parameter, *is* the method (Cole et al. learn
    one logit per training entry), so ROLE's memory grows with ``N`` by design; it is built in place from
    the observed labels, a chunk of rows at a time (no other ``N x C`` tensor).

    The label estimator is a free logit matrix ``Phi`` (parameter ``estimator_logits``, N x C) with
    ``y^ = sigmoid(Phi)``, initialised with unknowns ~ ``U(-logit(0.6), logit(0.6))`` (drawn from a
    ``torch.Generator`` seeded with ``seed``), observed positives ``logit(0.995)`` and observed
    negatives ``logit(0.005)``. Per entry (sg = stop-gradient)::

        L = 1/2 [1{z=1} l+(p) + 1{z=1} l+(y^)]             (obs_pos)
          + 1/2 [1{z=-1} l-(p) + 1{z=-1} l-(y^)]           (obs_neg; partial labels only, not in Cole)
          + 1/2 [BCE(p; sg y^) + BCE(y^; sg p)]            (cross, over ALL entries)
        R = 1/2 (R(p) + R(y^))                             (reg, weight 1)

    :meth:`param_groups` returns the estimator at ``lr * lr_mult`` (Cole: ``lr_mult = 10``), with
    ``weight_decay = 0`` (Cole's Adam has none).

    Args:
        expected_positives: ``k`` of the regulariser (§1); default COCO's 2.9.
        lr_mult: learning-rate multiplier of the estimator.
        seed: seed of the uniform initialisation of unknown entries.
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    stateful = True

    def __init__(
        self,
        observed: Any,
        *,
        expected_positives: float = P.ROLEParams.expected_positives,
        lr_mult: float = P.ROLEParams.lr_mult,
        seed: int = P.ROLEParams.seed,
        eps: float = P.ROLEParams.eps,
    ) -> None:
        super().__init__(observed, eps)
        self.expected_positives = float(expected_positives)
        self.lr_mult = float(lr_mult)
        self.seed = int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        width = _logit(_ROLE_UNKNOWN_P)
        # width * (2 u - 1), in place (the same float32 operations, no full-size temporaries), then the
        # observed entries, a chunk of rows at a time
        init = torch.rand(self.observed_labels.shape, generator=gen).mul_(2.0).sub_(1.0).mul_(width)
        for start, rows in self.observed_labels.chunks():
            block = init[start:start + rows.shape[0]]
            block[rows == 1] = _logit(_ROLE_POS_P)
            block[rows == -1] = _logit(_ROLE_NEG_P)
        self.estimator_logits = nn.Parameter(init)

    def param_groups(self, lr: float) -> List[dict]:
        return [
            {
                "params": [self.estimator_logits],
                "lr": lr * self.lr_mult,
                "weight_decay": 0.0,
                "name": "role_estimator",
            }
        ] + super().param_groups(lr)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        rows = batch.index.reshape(-1).to(device=self.estimator_logits.device, dtype=torch.long)
        y_hat = torch.sigmoid(self.estimator_logits[rows].to(p.device).float())
        eps = self.eps
        p_sg, y_sg = p.detach(), y_hat.detach()
        terms = {
            "obs_pos": 0.5 * m.pos * (neg_log_pos(p, eps) + neg_log_pos(y_hat, eps)),
            "obs_neg": 0.5 * m.neg * (neg_log_neg(p, eps) + neg_log_neg(y_hat, eps)),
            "cross": 0.5 * (soft_bce(p, y_sg, eps) + soft_bce(y_hat, p_sg, eps)),
        }
        reg = 0.5 * (
            expected_positive_regularizer(p, self.expected_positives, self.distributed)
            + expected_positive_regularizer(y_hat, self.expected_positives, self.distributed)
        )
        return self._finish(terms, reg)


# --------------------------------------------------------------------------------------------------
# Cole et al.'s remaining baselines (issue 14, item 5): IUN, IU, PR. Their sources and the code-vs-paper
# notes are in docs/LOSSES.md.
# --------------------------------------------------------------------------------------------------


def _first_negative_row(loss: SPMLLoss) -> Optional[int]:
    """The first row of ``loss``'s observed labels holding a ``-1`` (``None``: none), read a chunk at a time
    and stopping at the first chunk that has one."""
    for start, rows in loss.observed_labels.chunks():
        hit = (rows == -1).any(dim=1).nonzero()
        if hit.numel():
            return start + int(hit[0, 0])
    return None


@LOSSES.register("iun")
class IgnoreUnobservedPositivesLoss(_IgnoreUnobserved):
    """IUN, "ignore unobserved positives" (Cole et al. CVPR'21, ``losses.py: loss_iun``; docs/LOSSES.md).

    The oracle baseline that knows every true negative: one observed positive per image plus all the true
    negatives, and the unobserved (true) positives ignored. Per entry, batch mean over B x C::

        L = l+(p)   if z = 1            (obs_pos, the single observed positive)
            l-(p)   if y = 0            (obs_neg, every true negative)
            0       otherwise           (the unobserved positives)

    In ``vlpl`` the true negatives reach the loss as observed ``-1``: build the store with Cole's sampler
    and every negative kept, ``data.observed: {mode: single_positive, num_neg: N}`` with ``N >= C`` (the
    sampler draws the positive first, so the positive is the one of the single-positive store). The loss
    refuses observed labels without any ``-1`` (a single-positive store: IUN would then train on positives
    only). The released ``loss_iun`` reads ``label_vec_true == -1`` on labels stored in {0, 1}, so it never
    sees a negative; this class follows the method it names (VLPL's copy of that file tests ``== 0``).

    Args:
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    def __init__(self, observed: Any, *, eps: float = P.IUNParams.eps) -> None:
        super().__init__(observed, eps)
        if _first_negative_row(self) is None:
            raise ValueError("loss 'iun' trains on the true negatives, but the observed labels hold no -1: build the "
                             "store with every negative observed (data.observed: {mode: single_positive, "
                             f"num_neg: {self.num_classes}}} or more), or use an/an_ls/wan/epr/role for "
                             "single-positive labels")


@LOSSES.register("iu")
class IgnoreUnobservedLoss(_IgnoreUnobserved):
    """IU, "ignore unobserved" (Cole et al. CVPR'21, ``losses.py: loss_iu``; docs/LOSSES.md).

    BCE on the observed labels only, the unobserved ones ignored; batch mean over B x C (the denominator
    counts every entry, as Cole's ``compute_batch_loss`` does)::

        L = l+(p) if z = 1;  l-(p) if z = -1;  0 if z = 0

    It needs observed negatives (partial labels, or ``num_neg > 0``): the released code asserts one in every
    batch, and with single positives alone its minimiser predicts every class positive. This class refuses
    observed labels without any ``-1`` when it is built (a per-batch check would cost a host sync per step).

    Args:
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    def __init__(self, observed: Any, *, eps: float = P.IUParams.eps) -> None:
        super().__init__(observed, eps)
        if _first_negative_row(self) is None:
            raise ValueError("loss 'iu' ignores the unobserved labels and needs observed negatives, but the observed "
                             "labels hold no -1 (single positives only: every class would be predicted positive); "
                             "use partial labels or data.observed.num_neg > 0")


@LOSSES.register("pr")
class PairwiseRankingLoss(SPMLLoss):
    """PR, pairwise ranking (Cole et al. CVPR'21, ``losses.py: loss_pr``; ALGORITHMS.md §2e; docs/LOSSES.md).

    For each observed positive ``i`` of row ``n``, a margin-1 hinge against every unobserved ``j`` of the
    row, at entry ``(n, i)``; batch mean over B x C::

        L_ni = sum_{j: z_nj = 0} max(0, 1 - p_ni + p_nj)          if z_ni = 1      (pairs)
             = U_n (1 - p_ni) + sum_{j: z_nj = 0} p_nj            (U_n = number of unobserved j in row n)

    The second line is the same value: on probabilities ``1 - p_i + p_j >= 0`` always, so the hinge never
    clips (its gradient is that of the linear form too) and the loss costs O(B C) instead of the pairs'
    O(B C^2). Observed ``-1`` (partial labels; the released code asserts there are none) get ``l-(p)``
    with weight 1 (``obs_neg``), the package's rule for known negatives; they are not hinge partners.

    Args:
        eps: inside ``l-`` of observed negatives; Cole's 1e-5.
    """

    def __init__(self, observed: Any, *, eps: float = P.PRParams.eps) -> None:
        super().__init__(observed, eps)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        n_unk = m.unk.sum(dim=1, keepdim=True)  # U_n
        sum_unk = (m.unk * p).sum(dim=1, keepdim=True)  # sum over the unobserved of p_nj
        terms = {
            "pairs": m.pos * (n_unk * (1.0 - p) + sum_unk),
            "obs_neg": m.neg * neg_log_neg(p, self.eps),
        }
        return self._finish(terms)
