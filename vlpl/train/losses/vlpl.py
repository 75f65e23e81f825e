"""VLPL's ``EM_PL`` loss on vision-language pseudo-labels (ALGORITHMS.md §6c): ``vlpl``."""
from __future__ import annotations

from typing import Any, Dict

import torch

from vlpl.registry import LOSSES
from vlpl.train import loss_params as P
from vlpl.train.losses.base import LossBatch, SPMLLoss, binary_entropy, neg_log_neg, neg_log_pos


@LOSSES.register("vlpl")
class VLPLLoss(SPMLLoss):
    """VLPL's ``EM_PL`` loss (ALGORITHMS.md §6c); ``hat z = y~`` where ``z = 0``, else ``z``.

    * observed positive (``obs_pos``): ``l+(p)``;
    * ``hat z = 0`` (``unknown``): ``-alpha H(p)`` (EM);
    * pseudo-positive (``pseudo_pos``), ``z = 0, y~ = 1``:
      ``beta_pos [t l+(p) + (1 - t) l-(p)]``, ``t = pseudo_pos_target = 0.9``, ``beta_pos = 0.7``;
    * pseudo-negative (``pseudo_neg``), ``z = 0, y~ = -1``: ``beta_neg l-(p)``; ``beta_neg = 0`` by
      default, i.e. ignored as released (its form when ``beta_neg > 0`` is ours: the released negative
      branch is commented out);
    * observed ``-1`` (``obs_neg``; partial labels, not in VLPL): ``l-(p)``.

    Final loss: sum / (B C).

    Args:
        alpha: EM weight (VOC 0.2, COCO 0.1, NUS 0.1, CUB 0.01, §6d); default COCO's.
        beta_pos: weight of the pseudo-positive term (0.7).
        pseudo_pos_target: smoothed target of pseudo-positives (0.9).
        beta_neg: weight of pseudo-negatives (0: ignored, as released).
        eps: inside ``l+``/``l-``; VLPL's 1e-5.
    """

    requires_pseudo = P.VLPLLossParams.requires_pseudo

    def __init__(
        self,
        observed: Any,
        *,
        alpha: float = P.VLPLLossParams.alpha,
        beta_pos: float = P.VLPLLossParams.beta_pos,
        pseudo_pos_target: float = P.VLPLLossParams.pseudo_pos_target,
        beta_neg: float = P.VLPLLossParams.beta_neg,
        eps: float = P.VLPLLossParams.eps,
    ) -> None:
        super().__init__(observed, eps)
        self.alpha = float(alpha)
        self.beta_pos = float(beta_pos)
        self.pseudo_pos_target = float(pseudo_pos_target)
        self.beta_neg = float(beta_neg)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        pp, pn, neutral = self._pseudo_masks(batch, p, m)
        lpos, lneg = neg_log_pos(p, self.eps), neg_log_neg(p, self.eps)
        t = self.pseudo_pos_target
        terms = {
            "obs_pos": m.pos * lpos,
            "obs_neg": m.neg * lneg,
            "unknown": neutral * (-self.alpha * binary_entropy(p, self.eps)),
            "pseudo_pos": pp * (self.beta_pos * (t * lpos + (1.0 - t) * lneg)),
            "pseudo_neg": pn * (self.beta_neg * lneg),
        }
        return self._finish(terms)
