"""The GPR loss of AEVLP (ALGORITHMS.md §7d): ``gpr``."""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch

from vlpl.registry import LOSSES
from vlpl.train import loss_params as P
from vlpl.train.losses.base import LossBatch, expected_positive_regularizer, neg_log_neg, neg_log_pos
from vlpl.train.losses.gr import _GRScheduled


@LOSSES.register("gpr")
class GPRLoss(_GRScheduled):
    """GPR loss of AEVLP (ALGORITHMS.md §7d); ``hat z = y~`` where ``z = 0``, else ``z``.

    * ``L1`` (``obs_pos``), ``z = 1``: ``l+(p)``;
    * ``L2`` (``pseudo_pos``), ``z = 0, y~ = 1``: ``w(p) [rho l+(p) + (1 - rho) l-(p)]`` with
      ``w(p) = 1 - clip(v(p), 1 - lambda1, 1 - lambda2)`` in ``[lambda2, lambda1]`` (detached);
    * ``L3`` (``unknown``), ``hat z = 0``: the GR term ``v [k L+ + (1 - k) L-]`` (§5a);
    * ``L4`` (``pseudo_neg``), ``z = 0, y~ = -1``: ``v(p) l-(p)`` (only active when the rule emits -1);
    * observed ``-1`` (``obs_neg``; partial labels, not in AEVLP): ``l-(p)`` with weight 1, like ``L1``
      for observed positives (the released code would route them to ``L4``'s ``v l-``);

    plus ``reg * ((1/B) sum_n sum_c p_nc - k)^2 / C^2``. Schedules as §5b (call :meth:`set_epoch`).
    Defaults are the COCO row of §7e.

    Args:
        beta: ``[w0, wT, b0, bT]`` (COCO/NUS/CUB ``[0, 10, -2, -8]``; VOC ``[0, 2, -2, -2]``).
        alpha: ``[mu0, sigma0, muT, sigmaT]`` (``[0.5, 2, 0.8, 0.5]`` everywhere).
        q2: GCE exponent toward positive (0.01).
        q3: GCE exponent toward negative (1; CUB 1.5).
        lambda1: upper bound of the pseudo-positive weight ``w`` (0.7; CUB 0.8).
        lambda2: lower bound of ``w`` (COCO/NUS 0.5; VOC 0.4; CUB 0.2).
        rho: label-smoothing target of pseudo-positives (0.9).
        reg: weight of the expected-positive regulariser (COCO/NUS 0.001; VOC 0.05; CUB 0.01).
        expected_positives: ``k`` of the regulariser (COCO 2.9; VOC 1.5; NUS 1.9; CUB 31.4).
        linear_init: ``n0`` of the schedules (0).
        eps: inside ``l+``/``l-``; AEVLP's 1e-7.
    """

    requires_pseudo = P.GPRParams.requires_pseudo

    def __init__(
        self,
        observed: Any,
        *,
        beta: Sequence[float] = P.GPRParams.beta,
        alpha: Sequence[float] = P.GPRParams.alpha,
        q2: float = P.GPRParams.q2,
        q3: float = P.GPRParams.q3,
        lambda1: float = P.GPRParams.lambda1,
        lambda2: float = P.GPRParams.lambda2,
        rho: float = P.GPRParams.rho,
        reg: float = P.GPRParams.reg,
        expected_positives: float = P.GPRParams.expected_positives,
        linear_init: int = P.GPRParams.linear_init,
        eps: float = P.GPRParams.eps,
    ) -> None:
        super().__init__(
            observed, beta=beta, alpha=alpha, q2=q2, q3=q3, linear_init=linear_init, eps=eps
        )
        P.GPRParams(beta=tuple(beta), alpha=tuple(alpha), q2=q2, q3=q3, lambda1=lambda1, lambda2=lambda2, rho=rho,
                    reg=reg, expected_positives=expected_positives, linear_init=linear_init, eps=eps)  # validate
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.rho = float(rho)
        self.reg = float(reg)
        self.expected_positives = float(expected_positives)

    def pseudo_pos_weight(self, v: torch.Tensor) -> torch.Tensor:
        """``w(p) = 1 - clip(v(p), 1 - lambda1, 1 - lambda2)`` (§7d)."""
        return 1.0 - v.clamp(1.0 - self.lambda1, 1.0 - self.lambda2)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        s, p, _, m = self._prepare(batch)
        pp, pn, neutral = self._pseudo_masks(batch, p, m)
        gr_term, v = self._gr_unknown(s, p)
        lpos, lneg = neg_log_pos(p, self.eps), neg_log_neg(p, self.eps)
        omega = self.pseudo_pos_weight(v)
        terms = {
            "obs_pos": m.pos * lpos,
            "obs_neg": m.neg * lneg,
            "pseudo_pos": pp * omega * (self.rho * lpos + (1.0 - self.rho) * lneg),
            "unknown": neutral * gr_term,
            "pseudo_neg": pn * v * lneg,
        }
        reg = self.reg * expected_positive_regularizer(p, self.expected_positives, self.distributed)
        return self._finish(terms, reg)
