"""The GR loss, generalized robust loss (ALGORITHMS.md §5): ``gr``, its per-entry terms and the scheduled
base class that the GPR loss (:mod:`vlpl.train.losses.gpr`) shares."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vlpl.registry import LOSSES
from vlpl.train import loss_params as P
from vlpl.train.losses.base import LossBatch, SPMLLoss, neg_log_neg, neg_log_pos
from vlpl.train.schedules import gr_mu_sigma, gr_wb


def _one_minus_exp(x: torch.Tensor) -> torch.Tensor:
    """``1 - exp(x)`` for ``x <= 0``, exact in value and gradient: ``-expm1(x)`` near 0 (no cancellation), and
    ``1 - exp(x)`` below -1, where ``expm1``'s backward (``result + 1``) would cancel to 0 while ``exp(x)``
    is still representable (e.g. ``x = -30``: slope ``-e^-30``, not 0)."""
    return torch.where(x < -1.0, 1.0 - torch.exp(x), -torch.expm1(x))


def gce_pos(s: torch.Tensor, q2: float) -> torch.Tensor:
    """``L+(p) = (1 - p^q2) / q2`` with ``p = sigmoid(s)`` (ALGORITHMS.md §5a), from the logits ``s``.

    Computed exactly as ``(1 - exp(q2 logsigmoid(s))) / q2`` (``p^q2 = exp(q2 log p)``; see
    :func:`_one_minus_exp`), so it stays right where ``p`` underflows in float32 (``s`` below about -87,
    where ``sigmoid(s)`` leaves the normal range, and 0 from about -104): at ``s = -100`` and ``q2 = 0.01``
    the value is ``(1 - e^-1) / 0.01 = 63.21`` and the gradient ``dL+/ds = -p^q2 (1 - p) = -e^-1``. A clamp
    of ``p`` at the smallest normal float (the previous form) gave 58.24 there and a zero gradient: it did
    change the values whose ``p`` had underflowed.
    """
    return _one_minus_exp(q2 * F.logsigmoid(s)) / q2


def gce_neg(s: torch.Tensor, q3: float) -> torch.Tensor:
    """``L-(p) = (1 - (1 - p)^q3) / q3`` with ``p = sigmoid(s)`` (ALGORITHMS.md §5a), from the logits ``s``.

    Computed exactly as ``(1 - exp(q3 logsigmoid(-s))) / q3`` (``1 - p = sigmoid(-s)``), finite with the
    exact gradient ``dL-/ds = (1 - p)^q3 p`` at any logit; ``q3 = 1`` gives ``L- = p``.
    """
    return _one_minus_exp(q3 * F.logsigmoid(-s)) / q3


def gr_k(p_detached: torch.Tensor, w: float, b: float) -> torch.Tensor:
    """Soft pseudo-label ``k(p) = sigmoid(w p + b)`` on detached ``p`` (ALGORITHMS.md §5a)."""
    return torch.sigmoid(w * p_detached + b)


def gr_v(p_detached: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    """Re-weighting ``v(p) = exp(-(p - mu)^2 / (2 sigma^2))`` on detached ``p`` (ALGORITHMS.md §5a)."""
    return torch.exp(-((p_detached - mu) ** 2) / (2.0 * sigma**2))



class _GRScheduled(SPMLLoss):
    """Holds the GR schedules ``(w, b, mu, sigma)`` of ALGORITHMS.md §5b, updated by :meth:`set_epoch`."""

    def __init__(
        self,
        observed: Any,
        *,
        beta: Sequence[float],
        alpha: Sequence[float],
        q2: float,
        q3: float,
        linear_init: int,
        eps: float,
    ) -> None:
        super().__init__(observed, eps)
        P.GRParams(beta=tuple(beta), alpha=tuple(alpha), q2=q2, q3=q3, linear_init=linear_init, eps=eps)  # validate
        self.beta = tuple(float(v) for v in beta)
        self.alpha = tuple(float(v) for v in alpha)
        self.q2 = float(q2)
        self.q3 = float(q3)
        self.linear_init = int(linear_init)
        self.w: Optional[float] = None
        self.b: Optional[float] = None
        self.mu: Optional[float] = None
        self.sigma: Optional[float] = None

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        super().set_epoch(epoch, num_epochs)
        self.w, self.b = gr_wb(epoch, num_epochs, self.beta, self.linear_init)
        self.mu, self.sigma = gr_mu_sigma(epoch, num_epochs, self.alpha, self.linear_init)

    def _schedule(self) -> Tuple[float, float, float, float]:
        if self.w is None or self.b is None or self.mu is None or self.sigma is None:
            raise RuntimeError(f"{type(self).__name__}: call set_epoch(epoch, num_epochs) before forward")
        return self.w, self.b, self.mu, self.sigma

    def _gr_unknown(self, s: torch.Tensor, p: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(v [k L+ + (1 - k) L-], v)`` per entry for logits ``s`` and ``p = sigmoid(s)``; ``k``/``v`` on
        detached ``p``, the GCE terms exact from ``s`` (§5a)."""
        w, b, mu, sigma = self._schedule()
        pd = p.detach()
        k = gr_k(pd, w, b)
        v = gr_v(pd, mu, sigma)
        return v * (k * gce_pos(s, self.q2) + (1.0 - k) * gce_neg(s, self.q3)), v

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, epoch={self.epoch}, w={self.w}, b={self.b}, "
            f"mu={self.mu}, sigma={self.sigma}"
        )


@LOSSES.register("gr")
class GRLoss(_GRScheduled):
    """GR loss, generalized robust loss (ALGORITHMS.md §5).

    * observed positive: ``l+(p)``;
    * unknown: ``v(p) [k(p) L+(p) + (1 - k(p)) L-(p)]`` with ``L+ = (1 - p^q2)/q2``,
      ``L- = (1 - (1-p)^q3)/q3``, ``k = sigmoid(w p + b)``, ``v = exp(-(p-mu)^2/(2 sigma^2))``, ``k`` and
      ``v`` on detached ``p``; ``(w, b, mu, sigma)`` follow the §5b schedules (call :meth:`set_epoch`);
    * observed ``-1`` (partial labels): ``l-(p)``.

    Args:
        beta: ``[w0, wT, b0, bT]`` (§5c default ``[0, 2, -2, -2]``).
        alpha: ``[mu0, sigma0, muT, sigmaT]`` (§5c default ``[0.5, 2, 0.8, 0.5]``).
        q2: GCE exponent toward positive (0.01).
        q3: GCE exponent toward negative (1: MAE).
        linear_init: ``n0``, epochs of a linear-init phase before the schedules start (0).
        eps: inside ``l+``/``l-``; GR's 1e-7.
    """

    def __init__(
        self,
        observed: Any,
        *,
        beta: Sequence[float] = P.GRParams.beta,
        alpha: Sequence[float] = P.GRParams.alpha,
        q2: float = P.GRParams.q2,
        q3: float = P.GRParams.q3,
        linear_init: int = P.GRParams.linear_init,
        eps: float = P.GRParams.eps,
    ) -> None:
        super().__init__(
            observed, beta=beta, alpha=alpha, q2=q2, q3=q3, linear_init=linear_init, eps=eps
        )

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        s, p, _, m = self._prepare(batch)
        unknown, _ = self._gr_unknown(s, p)
        terms = {
            "obs_pos": m.pos * neg_log_pos(p, self.eps),
            "obs_neg": m.neg * neg_log_neg(p, self.eps),
            "unknown": m.unk * unknown,
        }
        return self._finish(terms)
