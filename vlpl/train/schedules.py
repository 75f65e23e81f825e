"""Per-epoch schedules used by the SPML losses (pure functions, no state).

* :func:`gr_wb` and :func:`gr_mu_sigma`: the linear GR-loss schedules of ALGORITHMS.md §5b, used by the
  ``gr`` and ``gpr`` losses (§5, §7d).
* :func:`ll_clean_rate`: the Large-Loss-Matters clean rate ``r_t`` of ALGORITHMS.md §3b.

Epochs are 1-indexed everywhere (``epoch = 1 .. num_epochs``).
"""
from __future__ import annotations

from typing import Sequence, Tuple


def _check_epoch(epoch: int, num_epochs: int, linear_init: int) -> None:
    if epoch < 1:
        raise ValueError(f"epoch is 1-indexed, got {epoch}")
    if num_epochs - linear_init <= 0:
        raise ValueError(
            f"num_epochs ({num_epochs}) must exceed linear_init ({linear_init}) for the GR schedules"
        )


def gr_wb(
    epoch: int, num_epochs: int, beta: Sequence[float], linear_init: int = 0
) -> Tuple[float, float]:
    """Soft-pseudo-label parameters ``(w_e, b_e)`` of ``k(p) = sigmoid(w p + b)`` (ALGORITHMS.md §5b).

    ``beta = [w0, wT, b0, bT]``; with ``n0 = linear_init``::

        w_e = w0 + (wT - w0) * max(e - 1 - n0, 0) / (E - n0)
        b_e = b0 + (bT - b0) * max(e - 1 - n0, 0) / (E - n0)

    The schedule lags one epoch behind :func:`gr_mu_sigma` (note the ``e - 1``), so at ``e = 1`` it is
    ``(w0, b0)`` and it never reaches ``(wT, bT)``: this is the released GR/AEVLP behaviour.
    """
    _check_epoch(epoch, num_epochs, linear_init)
    w0, wt, b0, bt = (float(v) for v in beta)
    frac = max(epoch - 1 - linear_init, 0) / (num_epochs - linear_init)
    return w0 + (wt - w0) * frac, b0 + (bt - b0) * frac


def gr_mu_sigma(
    epoch: int, num_epochs: int, alpha: Sequence[float], linear_init: int = 0
) -> Tuple[float, float]:
    """Re-weighting parameters ``(mu_e, sigma_e)`` of ``v(p) = exp(-(p-mu)^2 / (2 sigma^2))`` (§5b).

    ``alpha = [mu0, sigma0, muT, sigmaT]``; with ``n0 = linear_init``::

        mu_e    = mu0    + (muT    - mu0)    * max(e - n0, 0) / (E - n0)
        sigma_e = sigma0 + (sigmaT - sigma0) * max(e - n0, 0) / (E - n0)

    It reaches ``(muT, sigmaT)`` at ``e = E``.
    """
    _check_epoch(epoch, num_epochs, linear_init)
    mu0, s0, mut, st = (float(v) for v in alpha)
    frac = max(epoch - linear_init, 0) / (num_epochs - linear_init)
    return mu0 + (mut - mu0) * frac, s0 + (st - s0) * frac


def ll_clean_rate(epoch: int, delta_rel: float) -> float:
    """Clean rate ``r_t`` of Large Loss Matters in (1-indexed) epoch ``t`` (ALGORITHMS.md §3b).

    ``r_1 = 1`` and ``r`` decreases by ``delta_rel`` after every epoch, so ``1 - r_t = (t - 1) delta_rel``.
    ``delta_rel`` is a *fraction* (the LL CLI's ``--delta_rel 0.2`` (percent) is ``0.002`` here).

    The value is accumulated by repeated subtraction, exactly as the released training loop does
    (``clean_rate -= delta_rel`` once per epoch), so ``ceil(B*C*(1 - r_t))`` matches it bit for bit.
    """
    if epoch < 1:
        raise ValueError(f"epoch is 1-indexed, got {epoch}")
    rate = 1.0
    for _ in range(epoch - 1):
        rate -= float(delta_rel)
    return rate
