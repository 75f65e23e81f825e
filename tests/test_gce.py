"""The generalised-cross-entropy terms of GR / GPR (ALGORITHMS.md §5a, §7d) are exact where ``p`` underflows.

``L+(p) = (1 - p^q2) / q2`` and ``L-(p) = (1 - (1 - p)^q3) / q3`` with ``p = sigmoid(s)`` are computed from the
logits as ``-expm1(q log sigmoid(+-s)) / q``. In float32 ``sigmoid(s)`` leaves the normal range below
``s = -87.3``; the analytic limits at ``s = -100`` are ``p^q = e^(-100 q)`` (``log sigmoid(-100) = -100`` to
float64 precision), so ``L+ = (1 - e^(-100 q)) / q`` with slope ``dL+/ds = -p^q (1 - p) = -e^(-100 q)``.
The previous form clamped ``p`` at the smallest normal float: 58.24 instead of 63.21 at ``q2 = 0.01`` and a
zero gradient. Expected values are plain ``math``, never the implementation.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vlpl.train.losses import LossBatch, create_loss, gce_neg, gce_pos

EPS7 = 1e-7


def _grad(fn, s: float, q: float) -> tuple[float, float]:
    x = torch.tensor([s], dtype=torch.float32, requires_grad=True)
    y = fn(x, q)
    y.sum().backward()
    assert x.grad is not None
    return float(y.detach()), float(x.grad)


@pytest.mark.parametrize("q2", [0.01, 0.3])
def test_gce_pos_at_minus_100_equals_the_analytic_limit(q2):
    value, grad = _grad(gce_pos, -100.0, q2)
    assert value == pytest.approx((1.0 - math.exp(-100.0 * q2)) / q2, rel=1e-6)
    # float32 rounding of q2 * (-100) moves e^(-100 q2) by up to 100 q2 * 6e-8 relative
    assert grad == pytest.approx(-math.exp(-100.0 * q2), rel=1e-5, abs=0.0)
    assert math.isfinite(grad) and grad < 0.0


@pytest.mark.parametrize("q2", [0.01, 0.3])
def test_gce_pos_at_plus_100_is_zero_with_a_finite_gradient(q2):
    value, grad = _grad(gce_pos, 100.0, q2)
    assert value == pytest.approx(0.0, abs=1e-30)
    assert math.isfinite(grad) and abs(grad) < 1e-30  # -p^q2 (1 - p) = -e^-100


@pytest.mark.parametrize("q3", [1.0, 1.5, 0.5])
def test_gce_neg_at_plus_and_minus_100(q3):
    value, grad = _grad(gce_neg, 100.0, q3)  # 1 - p = e^-100: L- = (1 - e^(-100 q3)) / q3 -> 1 / q3
    assert value == pytest.approx(1.0 / q3, rel=1e-6)
    slope = math.exp(-100.0 * q3)  # (1 - p)^q3 p
    assert math.isfinite(grad) and grad == pytest.approx(slope, rel=1e-4, abs=1e-44)
    value, grad = _grad(gce_neg, 30.0, q3)  # expm1's own backward cancels to 0 here; the slope is e^(-30 q3)
    assert grad == pytest.approx(math.exp(-30.0 * q3), rel=1e-5, abs=0.0)
    value, grad = _grad(gce_neg, -100.0, q3)  # p = e^-100: L- -> p = 3.7e-44, slope -> p
    assert 0.0 <= value < 1e-40 and math.isfinite(grad) and 0.0 <= grad < 1e-40


def test_gce_matches_the_probability_form_where_p_is_representable():
    s = torch.linspace(-30.0, 30.0, 241, dtype=torch.float64)
    p = torch.sigmoid(s)
    for q in (0.01, 0.5, 1.0, 1.5):
        torch.testing.assert_close(gce_pos(s, q), (1.0 - p**q) / q, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gce_neg(s, q), (1.0 - torch.sigmoid(-s) ** q) / q, rtol=1e-10, atol=1e-12)  # 1 - p
    # float32, the training dtype: the same to float32 round-off
    s32 = s.float()
    torch.testing.assert_close(gce_pos(s32, 0.01).double(), (1.0 - p**0.01) / 0.01, rtol=2e-5, atol=1e-5)


def _batch(logits, index, observed, pseudo=None) -> LossBatch:
    kw = {}
    if "observed" in {f.name for f in dataclasses.fields(LossBatch)}:  # the batch's observed rows (new contract)
        kw["observed"] = observed[torch.tensor(index)]
    return LossBatch(logits=torch.tensor(logits, dtype=torch.float32, requires_grad=True),
                     index=torch.tensor(index, dtype=torch.long),
                     pseudo=None if pseudo is None else torch.tensor(pseudo, dtype=torch.int8), **kw)


def _gr_limit(s: float, w: float, b: float, mu: float, sigma: float, q2: float, q3: float) -> tuple[float, float]:
    """The GR unknown term ``v [k L+ + (1 - k) L-]`` at a logit and its slope (k, v detached), in float64."""
    p = 1.0 / (1.0 + math.exp(-s))
    log_p, log_1p = -math.log1p(math.exp(-s)), -math.log1p(math.exp(s))
    k = 1.0 / (1.0 + math.exp(-(w * p + b)))
    v = math.exp(-((p - mu) ** 2) / (2 * sigma**2))
    lpos, lneg = -math.expm1(q2 * log_p) / q2, -math.expm1(q3 * log_1p) / q3
    dpos, dneg = -math.exp(q2 * log_p) * (1 - p), math.exp(q3 * log_1p) * p
    return v * (k * lpos + (1 - k) * lneg), v * (k * dpos + (1 - k) * dneg)


@pytest.mark.parametrize("s", [-100.0, 100.0])
def test_gr_loss_unknown_term_at_extreme_logits(s):
    obs = torch.tensor([[1, 0]], dtype=torch.int8)
    loss = create_loss("gr", obs)
    loss.set_epoch(1, 8)  # w = 0, b = -2, mu = 0.5 + 0.3/8, sigma = 2 - 1.5/8
    batch = _batch([[0.0, s]], [0], obs)
    out = loss(batch)
    out["loss"].backward()
    value, slope = _gr_limit(s, 0.0, -2.0, 0.5 + 0.3 / 8, 2.0 - 1.5 / 8, 0.01, 1.0)
    assert float(out["unknown"]) * 2 == pytest.approx(value, rel=1e-6)
    grad = float(batch.logits.grad[0, 1]) * 2  # the batch mean over B x C = 2 entries
    assert math.isfinite(grad)
    assert grad == pytest.approx(slope, rel=1e-5, abs=1e-30)
    if s < 0:
        assert grad < -0.04  # v k e^-1 = 0.042; the clamp gave 0 here: no push up from a confidently wrong unknown


def test_gpr_neutral_term_at_minus_100():
    obs = torch.tensor([[1, 0, 0]], dtype=torch.int8)
    loss = create_loss("gpr", obs)
    loss.set_epoch(8, 8)  # COCO row: w = 8.75, b = -7.25, mu = 0.8, sigma = 0.5
    batch = _batch([[0.0, -100.0, 100.0]], [0], obs, pseudo=[[0, 0, 0]])
    out = loss(batch)
    out["loss"].backward()
    v_lo, d_lo = _gr_limit(-100.0, 8.75, -7.25, 0.8, 0.5, 0.01, 1.0)
    v_hi, d_hi = _gr_limit(100.0, 8.75, -7.25, 0.8, 0.5, 0.01, 1.0)
    assert float(out["unknown"]) * 3 == pytest.approx(v_lo + v_hi, rel=1e-6)
    g = batch.logits.grad[0].tolist()
    assert all(math.isfinite(x) for x in g)
    assert g[1] * 3 == pytest.approx(d_lo, rel=1e-5)
    assert g[2] * 3 == pytest.approx(d_hi, rel=1e-5, abs=1e-30)


def test_gce_neg_where_float32_sigmoid_rounds_to_one():
    # sigmoid(25) is 1.0 in float32 (1 - p = 1.4e-11 is below its resolution at 1): the clamp form gave
    # (1 - tiny^q3) / q3 = 58.24 at q3 = 0.01, the exact value is (1 - e^(-25 q3)) / q3 = 22.12
    s = torch.tensor([25.0])
    assert float(torch.sigmoid(s)) == 1.0
    for q3 in (0.01, 0.5):
        value, grad = _grad(gce_neg, 25.0, q3)
        assert value == pytest.approx((1.0 - math.exp(-25.0 * q3)) / q3, rel=1e-5)
        assert grad == pytest.approx(math.exp(-25.0 * q3) / (1 + math.exp(-25.0)), rel=1e-4)  # (1 - p)^q3 p
