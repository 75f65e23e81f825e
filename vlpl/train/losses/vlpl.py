"""VLPL's ``EM_PL`` loss on vision-language pseudo-labels (ALGORITHMS.md §6c): ``vlpl``, and its ``EM_PL_ASL``
variant ``vlpl_asl`` (docs/LOSSES.md)."""
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


@LOSSES.register("vlpl_asl")
class VLPLASLLoss(SPMLLoss):
    """VLPL's ``EM_PL_ASL`` variant (VLPL ``losses.py: loss_EM_PL_ASL``; docs/LOSSES.md); ``hat z = y~`` where
    ``z = 0``, else ``z``. Focal, ASL-style weights replace ``EM_PL``'s ``alpha``, ``beta_pos`` and smoothing.

    After the warm-up (epoch > ``warmup_epochs``; VLPL's default 0, so from epoch 1), per entry::

        obs_pos     z = 1:               (1 - p)^gamma_pos l+(p)
        unknown     hat z = 0:          -(1 - p)^gamma_unknown H(p)      (no alpha: the released form)
        pseudo_pos  z = 0, y~ = 1:       (1 - p)^gamma_pos l+(p)         (no beta_pos, no smoothing)
        pseudo_neg  z = 0, y~ = -1:      p^gamma_neg l-(p)               (active, unlike EM_PL's)
        obs_neg     z = -1 (partial labels, not in VLPL): l-(p), weight 1

    with ``H(p) = p l+(p) + (1 - p) l-(p)``; the focal weights are not detached (the released code builds
    them from ``preds`` with their gradient). During the warm-up epochs: plain EM, ``l+(p)`` on observed
    positives and ``-alpha H(p)`` on every ``z = 0`` entry, pseudo-labels unused. Batch mean over B x C.
    The released function also computes an ASL probability shift ``min(1 - p + 0.05, 1)`` that no term
    uses; it is left out (it changes nothing). Defaults ``gamma_pos = 2``, ``gamma_neg = gamma_unknown = 4``
    are ``main_clip.py``'s for every dataset.

    Args:
        gamma_pos: focusing exponent of observed and pseudo positives (2).
        gamma_neg: focusing exponent of pseudo-negatives (4).
        gamma_unknown: focusing exponent of the neutral unknowns' entropy (4).
        warmup_epochs: epochs of plain EM before the pseudo-labels are used (0).
        alpha: EM weight of the warm-up epochs (COCO's 0.1).
        eps: inside ``l+``/``l-``; VLPL's 1e-5.
    """

    requires_pseudo = P.VLPLASLParams.requires_pseudo

    def __init__(
        self,
        observed: Any,
        *,
        gamma_pos: float = P.VLPLASLParams.gamma_pos,
        gamma_neg: float = P.VLPLASLParams.gamma_neg,
        gamma_unknown: float = P.VLPLASLParams.gamma_unknown,
        warmup_epochs: int = P.VLPLASLParams.warmup_epochs,
        alpha: float = P.VLPLASLParams.alpha,
        eps: float = P.VLPLASLParams.eps,
    ) -> None:
        super().__init__(observed, eps)
        self.gamma_pos = float(gamma_pos)
        self.gamma_neg = float(gamma_neg)
        self.gamma_unknown = float(gamma_unknown)
        self.warmup_epochs = int(warmup_epochs)
        self.alpha = float(alpha)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        lpos, lneg = neg_log_pos(p, self.eps), neg_log_neg(p, self.eps)
        entropy = binary_entropy(p, self.eps)
        if self.epoch <= self.warmup_epochs:  # VLPL: P['epoch'] (1-based) <= warmup_epoch
            zero = torch.zeros_like(p)
            terms = {
                "obs_pos": m.pos * lpos,
                "obs_neg": m.neg * lneg,
                "unknown": m.unk * (-self.alpha * entropy),
                "pseudo_pos": zero,
                "pseudo_neg": zero,
            }
            return self._finish(terms)
        pp, pn, neutral = self._pseudo_masks(batch, p, m)
        focal_pos = (1.0 - p) ** self.gamma_pos
        terms = {
            "obs_pos": m.pos * focal_pos * lpos,
            "obs_neg": m.neg * lneg,
            "unknown": neutral * (-((1.0 - p) ** self.gamma_unknown) * entropy),
            "pseudo_pos": pp * focal_pos * lpos,
            "pseudo_neg": pn * (p ** self.gamma_neg) * lneg,
        }
        return self._finish(terms)
