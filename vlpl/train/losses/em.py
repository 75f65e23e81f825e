"""Entropy maximisation and EM + APL (ALGORITHMS.md §4a): ``em``, ``em_apl``."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from vlpl.registry import LOSSES
from vlpl.train import loss_params as P
from vlpl.train.losses.base import (
    LossBatch,
    SPMLLoss,
    _Masks,
    binary_entropy,
    neg_log_neg,
    neg_log_pos,
    soft_bce,
)


@LOSSES.register("em")
class EntropyMaximizationLoss(SPMLLoss):
    """EM loss (ALGORITHMS.md §4a): ``l+(p)`` on observed positives, ``-alpha H(p)`` on unknowns.

    ``H(p) = p l+(p) + (1 - p) l-(p)``; minimising ``-alpha H`` maximises the entropy. Observed ``-1``
    (partial labels) get ``l-(p)``.

    Args:
        alpha: entropy weight (VOC 0.2, COCO 0.1, NUS 0.1, CUB 0.01, §4b); default COCO's.
        eps: inside ``l+``/``l-``; EM's 1e-5.
    """

    def __init__(self, observed: Any, *, alpha: float = P.EMParams.alpha, eps: float = P.EMParams.eps) -> None:
        super().__init__(observed, eps)
        self.alpha = float(alpha)

    def _em_terms(self, p: torch.Tensor, m: _Masks) -> Dict[str, torch.Tensor]:
        return {
            "obs_pos": m.pos * neg_log_pos(p, self.eps),
            "obs_neg": m.neg * neg_log_neg(p, self.eps),
            "unknown": m.unk * (-self.alpha * binary_entropy(p, self.eps)),
        }

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        return self._finish(self._em_terms(p, m))


@LOSSES.register("em_apl")
class EMAPLLoss(EntropyMaximizationLoss):
    """EM + APL, asymmetric pseudo-labelling (ALGORITHMS.md §4a), as released (soft negatives only).

    Loss per entry: as ``em``, plus for APL soft negatives ``beta [t l+(p) + (1 - t) l-(p)]`` with
    ``t = -state`` (the stored score), logged as ``soft_neg``.

    APL (:meth:`end_epoch`, after the training pass of every epoch ``e >= warmup_epoch``; the trainer
    runs the model in eval mode over the training set): for each class ``c``, among entries still
    unknown, take the ``m_c = floor(neg_proportion * U_c / (E - e_w))`` with the lowest ``p`` (ties: the
    earlier position in ``index``) and store ``state = -p``. ``U_c`` is the number of unknown entries of
    class ``c`` at the start of training (buffer ``unknown_at_start``); ``E`` comes from
    :meth:`set_epoch`. The set only grows ("self-paced"); entries are never removed.

    Which entries are APL soft negatives is kept in the bool buffer ``apl_mask`` rather than read from
    the sign of ``state``: this keeps an observed ``-1`` (a known negative, ``l-(p)``) apart from a
    soft negative storing ``p = 1``, and a stored ``-0.0`` from an unknown (the released code's §4d
    pitfall; it only differs when ``p`` underflows to exactly 0). If ``E <= e_w`` the denominator is
    taken as 1 (the released code would divide by zero).

    Args:
        alpha: entropy weight on unknowns (§4b; default COCO's 0.1).
        beta: weight of the soft-negative loss (§4b; default COCO's 0.9).
        warmup_epoch: ``e_w``, first epoch after which APL runs (§4b; default COCO's 5).
        neg_proportion: share of each class's initial unknowns that APL labels in total (0.9).
        eps: inside ``l+``/``l-``; EM's 1e-5.
    """

    needs_train_pass = True

    def __init__(
        self,
        observed: Any,
        *,
        alpha: float = P.EMAPLParams.alpha,
        beta: float = P.EMAPLParams.beta,
        warmup_epoch: int = P.EMAPLParams.warmup_epoch,
        neg_proportion: float = P.EMAPLParams.neg_proportion,
        eps: float = P.EMAPLParams.eps,
    ) -> None:
        super().__init__(observed, alpha=alpha, eps=eps)
        self.beta = float(beta)
        self.warmup_epoch = int(warmup_epoch)
        self.neg_proportion = float(neg_proportion)
        self.register_buffer("apl_mask", torch.zeros(self.state.shape, dtype=torch.bool))
        self.register_buffer("unknown_at_start", (self.state == 0).sum(dim=0).to(torch.long))

    apl_mask: torch.Tensor
    unknown_at_start: torch.Tensor

    def _soft_mask_rows(self, rows: torch.Tensor) -> Optional[torch.Tensor]:
        return self.apl_mask[rows]

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, z, m = self._prepare(batch)
        terms = self._em_terms(p, m)
        assert m.soft is not None
        t = (-z).clamp(0.0, 1.0)
        terms["soft_neg"] = m.soft * (self.beta * soft_bce(p, t, self.eps))
        return self._finish(terms)

    def apl_per_class(self) -> torch.Tensor:
        """``m_c = floor(neg_proportion * U_c / (E - e_w))`` per class (long tensor)."""
        if self.num_epochs is None:
            raise RuntimeError("em_apl: call set_epoch(epoch, num_epochs) before end_epoch")
        denom = max(self.num_epochs - self.warmup_epoch, 1)
        # float64, in the order neg_proportion * U_c / (E - e_w), like a plain Python float computation
        vals = self.neg_proportion * self.unknown_at_start.double() / denom
        return torch.floor(vals).to(torch.long)

    @torch.no_grad()
    def end_epoch(self, probs: torch.Tensor, index: torch.Tensor, epoch: int) -> Dict[str, float]:
        """Run APL after epoch ``epoch`` on the training-set probabilities ``probs`` of rows ``index``.

        Returns ``{"apl_new": entries labelled now, "apl_total": all soft negatives so far}``.
        """
        if epoch < self.warmup_epoch:
            return {"apl_new": 0.0, "apl_total": float(self.apl_mask.sum())}
        rows = index.reshape(-1).to(device=self.state.device, dtype=torch.long)
        probs = probs.detach().to(device=self.state.device, dtype=torch.float32)
        if probs.shape != (rows.numel(), self.num_classes):
            raise ValueError(
                f"probs must be ({rows.numel()}, {self.num_classes}), got {tuple(probs.shape)}"
            )
        if torch.unique(rows).numel() != rows.numel():
            raise ValueError("end_epoch: index must not repeat rows")
        limit = self.apl_per_class().to(self.state.device)
        candidate = (self.state[rows] == 0) & ~self.apl_mask[rows]
        masked = torch.where(candidate, probs, torch.full_like(probs, math.inf))
        order = torch.sort(masked, dim=0, stable=True).indices  # ascending p per class
        count = candidate.sum(dim=0)
        take = torch.minimum(limit, count)
        rank = torch.arange(rows.numel(), device=rows.device).unsqueeze(1)
        chosen_sorted = rank < take.unsqueeze(0)
        chosen = torch.zeros_like(candidate).scatter_(0, order, chosen_sorted)
        sel_r, sel_c = chosen.nonzero(as_tuple=True)
        self.state[rows[sel_r], sel_c] = -probs[sel_r, sel_c]
        self.apl_mask[rows[sel_r], sel_c] = True
        return {"apl_new": float(sel_r.numel()), "apl_total": float(self.apl_mask.sum())}
