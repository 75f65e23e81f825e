"""Tests of the SPML loss registry (the package vlpl/train/losses/) and schedules (vlpl/train/schedules.py).

Expected values are computed by hand, per entry, with plain Python ``math`` from the formulas in
ALGORITHMS.md (sections cited per test), never by calling the implementation.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import pytest
import torch

from vlpl.registry import LOSSES, RegistryError
from vlpl.train.losses import LossBatch, create_loss, loss_defaults
from vlpl.train.schedules import gr_mu_sigma, gr_wb, ll_clean_rate

EPS5 = 1e-5
EPS7 = 1e-7


# ------------------------------------------------------------------------------------------------
# plain-math helpers (ALGORITHMS.md §1)
# ------------------------------------------------------------------------------------------------


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def lp(p: float, eps: float) -> float:
    """l+(p) = -log(p + eps)."""
    return -math.log(p + eps)


def ln(p: float, eps: float) -> float:
    """l-(p) = -log(1 - p + eps)."""
    return -math.log(1.0 - p + eps)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def bce_logit(s: float, target: float) -> float:
    """BCEWithLogits(s, t) = t softplus(-s) + (1 - t) softplus(s)."""
    return target * softplus(-s) + (1.0 - target) * softplus(s)


def batch_mean(logits: Sequence[Sequence[float]], per_entry: Callable[[int, int, float], float]) -> float:
    vals = [per_entry(n, c, sig(s)) for n, row in enumerate(logits) for c, s in enumerate(row)]
    return sum(vals) / len(vals)


def make_batch(
    logits: Sequence[Sequence[float]], index: Sequence[int], pseudo: Optional[List[List[int]]] = None
) -> LossBatch:
    return LossBatch(
        logits=torch.tensor(logits, dtype=torch.float32, requires_grad=True),
        index=torch.tensor(index, dtype=torch.long),
        pseudo=None if pseudo is None else torch.tensor(pseudo, dtype=torch.int8),
    )


def close(a: torch.Tensor | float, b: float, tol: float = 1e-5) -> bool:
    got = float(a.detach()) if isinstance(a, torch.Tensor) else float(a)
    return abs(got - b) <= tol * max(1.0, abs(b))


# A small training set (N=4, C=3); batches pick rows out of order to test the index mapping.
OBS = torch.tensor([[1, 0, 0], [0, 1, -1], [0, 0, 1], [-1, 0, 0]], dtype=torch.int8)
IDX = [2, 1]  # rows: [0, 0, 1] and [0, 1, -1]
Z = [[0, 0, 1], [0, 1, -1]]
S = [[1.0, -0.5, 0.3], [-1.2, 2.0, 0.0]]


# ------------------------------------------------------------------------------------------------
# Cole baselines and full BCE (§2e)
# ------------------------------------------------------------------------------------------------


def test_an_value():
    def f(n, c, p):
        z = Z[n][c]
        return lp(p, EPS5) if z == 1 else ln(p, EPS5)

    out = create_loss("an", OBS)(make_batch(S, IDX))
    assert close(out["loss"], batch_mean(S, f))
    # the known negative (row 1, class 2, p = 0.5) is its own logged term
    assert close(out["obs_neg"], ln(0.5, EPS5) / 6)
    assert close(out["obs_pos"] + out["obs_neg"] + out["unknown"], float(out["loss"].detach()))


def test_an_ls_value():
    e = 0.1

    def f(n, c, p):
        z = Z[n][c]
        if z == 1:
            return (1 - e) * lp(p, EPS5) + e * ln(p, EPS5)
        if z == 0:
            return (1 - e) * ln(p, EPS5) + e * lp(p, EPS5)
        return ln(p, EPS5)  # observed -1: known negative, unsmoothed

    out = create_loss("an_ls", OBS)(make_batch(S, IDX))
    assert close(out["loss"], batch_mean(S, f))


def test_wan_value():
    def f(n, c, p):
        z = Z[n][c]
        if z == 1:
            return lp(p, EPS5)
        if z == 0:
            return ln(p, EPS5) / (3 - 1)
        return ln(p, EPS5)

    out = create_loss("wan", OBS)(make_batch(S, IDX))
    assert close(out["loss"], batch_mean(S, f))


def test_epr_value():
    k = 1.5

    def f(n, c, p):
        z = Z[n][c]
        if z == 1:
            return lp(p, EPS5)
        if z == -1:
            return ln(p, EPS5)
        return 0.0

    sum_p = sum(sig(s) for row in S for s in row)
    reg = (sum_p / 2 - k) ** 2 / 3**2
    out = create_loss("epr", OBS, expected_positives=k)(make_batch(S, IDX))
    assert close(out["reg"], reg)
    assert close(out["loss"], batch_mean(S, f) + reg)


def test_bce_full_label_value():
    full = torch.tensor([[1, -1, -1], [-1, 1, 0]], dtype=torch.int8)  # one entry ignored (0)
    zf = [[1, -1, -1], [-1, 1, 0]]

    def f(n, c, p):
        z = zf[n][c]
        return lp(p, EPS5) if z == 1 else (ln(p, EPS5) if z == -1 else 0.0)

    out = create_loss("bce", full)(make_batch(S, [0, 1]))
    assert close(out["loss"], batch_mean(S, f))


# ------------------------------------------------------------------------------------------------
# ROLE (§2e)
# ------------------------------------------------------------------------------------------------


def test_role_init_ranges_and_seed():
    loss = create_loss("role", OBS, seed=3)
    phi = loss.estimator_logits.detach()
    obs = OBS.float()
    assert torch.allclose(phi[obs == 1], torch.full_like(phi[obs == 1], logit(0.995)))
    assert torch.allclose(phi[obs == -1], torch.full_like(phi[obs == -1], logit(0.005)))
    unk = phi[obs == 0]
    assert bool((unk.abs() <= logit(0.6) + 1e-6).all())
    assert float(unk.std()) > 0
    same = create_loss("role", OBS, seed=3).estimator_logits.detach()
    other = create_loss("role", OBS, seed=4).estimator_logits.detach()
    assert torch.equal(phi, same)
    assert not torch.equal(phi, other)


def test_role_value_and_param_groups():
    k = 1.2
    loss = create_loss("role", OBS, expected_positives=k)
    phi_rows = [[0.4, -0.3, 2.0], [0.1, 1.5, -2.5]]  # estimator logits of rows 2 and 1
    with torch.no_grad():
        loss.estimator_logits[2] = torch.tensor(phi_rows[0])
        loss.estimator_logits[1] = torch.tensor(phi_rows[1])

    def f(n, c, p):
        z = Z[n][c]
        y = sig(phi_rows[n][c])
        out = 0.0
        if z == 1:
            out += 0.5 * (lp(p, EPS5) + lp(y, EPS5))
        if z == -1:
            out += 0.5 * (ln(p, EPS5) + ln(y, EPS5))
        out += 0.5 * (y * lp(p, EPS5) + (1 - y) * ln(p, EPS5) + p * lp(y, EPS5) + (1 - p) * ln(y, EPS5))
        return out

    sum_p = sum(sig(s) for row in S for s in row)
    sum_y = sum(sig(v) for row in phi_rows for v in row)
    reg = 0.5 * ((sum_p / 2 - k) ** 2 / 9 + (sum_y / 2 - k) ** 2 / 9)
    batch = make_batch(S, IDX)
    out = loss(batch)
    assert close(out["reg"], reg)
    assert close(out["loss"], batch_mean(S, f) + reg)

    out["loss"].backward()
    g = loss.estimator_logits.grad
    assert g is not None and bool(g[[1, 2]].abs().sum() > 0)
    assert float(g[[0, 3]].abs().sum()) == 0.0  # rows outside the batch get no gradient

    groups = loss.param_groups(1e-4)
    assert len(groups) == 1
    assert groups[0]["params"][0] is loss.estimator_logits
    assert math.isclose(groups[0]["lr"], 1e-3)
    assert create_loss("an", OBS).param_groups(1e-4) == []


# ------------------------------------------------------------------------------------------------
# EM and EM+APL (§4a)
# ------------------------------------------------------------------------------------------------


def H(p: float, eps: float) -> float:
    return p * lp(p, eps) + (1 - p) * ln(p, eps)


def test_em_value():
    a = 0.2

    def f(n, c, p):
        z = Z[n][c]
        if z == 1:
            return lp(p, EPS5)
        if z == -1:
            return ln(p, EPS5)
        return -a * H(p, EPS5)

    out = create_loss("em", OBS, alpha=a)(make_batch(S, IDX))
    assert close(out["loss"], batch_mean(S, f))


APL_OBS = torch.tensor([[1, 0], [0, 1], [0, 0], [0, 0], [0, -1], [0, 0]], dtype=torch.int8)


def _probs_for(index: List[int], per_row: dict) -> torch.Tensor:
    return torch.tensor([per_row[r] for r in index], dtype=torch.float32)


def test_em_apl_end_epoch_selection_and_accumulation():
    loss = create_loss("em_apl", APL_OBS, warmup_epoch=5)
    assert loss.needs_train_pass and not create_loss("em", APL_OBS).needs_train_pass
    loss.set_epoch(4, 7)
    # U_c: class 0 has 5 unknowns, class 1 has 4; E - e_w = 2
    assert loss.unknown_at_start.tolist() == [5, 4]
    m = [math.floor(0.9 * 5 / 2), math.floor(0.9 * 4 / 2)]
    assert m == [2, 1]
    assert loss.apl_per_class().tolist() == m

    index = [5, 4, 3, 2, 1, 0]
    probs1 = {0: [0.9, 0.2], 1: [0.3, 0.8], 2: [0.1, 0.6], 3: [0.2, 0.15], 4: [0.05, 0.01], 5: [0.4, 0.3]}
    # before warm-up: nothing happens
    info = loss.end_epoch(_probs_for(index, probs1), torch.tensor(index), epoch=4)
    assert info["apl_new"] == 0 and not bool(loss.apl_mask.any())
    assert torch.equal(loss.state, APL_OBS.float())

    loss.set_epoch(5, 7)
    info = loss.end_epoch(_probs_for(index, probs1), torch.tensor(index), epoch=5)
    # class 0: still-unknown rows 1..5, two lowest p: row 4 (0.05), row 2 (0.1)
    # class 1: still-unknown rows 0,2,3,5 (row 4 is an observed -1 despite p = 0.01): row 3 (0.15)
    assert info["apl_new"] == 3 and info["apl_total"] == 3
    expected = APL_OBS.float().clone()
    expected[4, 0], expected[2, 0], expected[3, 1] = -0.05, -0.1, -0.15
    assert torch.allclose(loss.state, expected)
    assert loss.apl_mask.nonzero().tolist() == [[2, 0], [3, 1], [4, 0]]

    loss.set_epoch(6, 7)
    probs2 = {0: [0.9, 0.4], 1: [0.5, 0.8], 2: [0.0, 0.35], 3: [0.25, 0.01], 4: [0.0, 0.01], 5: [0.2, 0.7]}
    info = loss.end_epoch(_probs_for(index, probs2), torch.tensor(index), epoch=6)
    # class 0: still unknown rows 1, 3, 5 -> rows 5 (0.2) and 3 (0.25); class 1: rows 0, 2, 5 -> row 2
    assert info["apl_new"] == 3 and info["apl_total"] == 6
    expected[5, 0], expected[3, 0], expected[2, 1] = -0.2, -0.25, -0.35
    assert torch.allclose(loss.state, expected)  # earlier entries kept their stored scores
    assert sorted(loss.apl_mask.nonzero().tolist()) == [[2, 0], [2, 1], [3, 0], [3, 1], [4, 0], [5, 0]]


def test_em_apl_loss_value():
    a, b = 0.1, 0.9
    loss = create_loss("em_apl", APL_OBS, alpha=a, beta=b, warmup_epoch=5)
    loss.set_epoch(5, 7)
    index = [0, 1, 2, 3, 4, 5]
    probs = {0: [0.9, 0.2], 1: [0.3, 0.8], 2: [0.1, 0.6], 3: [0.2, 0.15], 4: [0.05, 0.01], 5: [0.4, 0.3]}
    loss.end_epoch(_probs_for(index, probs), torch.tensor(index), epoch=5)
    # batch rows 2, 4, 1: state [-0.1, 0], [-0.05, -1 (observed)], [0, 1]
    s = [[0.3, -0.7], [-1.0, 0.8], [0.5, 1.5]]
    kinds = [[("soft", 0.1), ("unk", None)], [("soft", 0.05), ("neg", None)], [("unk", None), ("pos", None)]]

    def f(n, c, p):
        kind, t = kinds[n][c]
        if kind == "soft":
            return b * (t * lp(p, EPS5) + (1 - t) * ln(p, EPS5))
        if kind == "neg":
            return ln(p, EPS5)
        if kind == "pos":
            return lp(p, EPS5)
        return -a * H(p, EPS5)

    out = loss(make_batch(s, [2, 4, 1]))
    assert close(out["loss"], batch_mean(s, f))
    soft = (b * (0.1 * lp(sig(0.3), EPS5) + 0.9 * ln(sig(0.3), EPS5))
            + b * (0.05 * lp(sig(-1.0), EPS5) + 0.95 * ln(sig(-1.0), EPS5))) / 6
    assert close(out["soft_neg"], soft)


# ------------------------------------------------------------------------------------------------
# Large Loss Matters (§3b)
# ------------------------------------------------------------------------------------------------

LL_OBS = torch.tensor([[0, 0, 0], [0, 0, -1], [0, 0, 0], [1, 0, 0]], dtype=torch.int8)
LL_IDX = [3, 1]  # rows [1, 0, 0], [0, 0, -1]
LL_S = [[0.5, 2.0, 1.0], [1.0, -1.0, 3.0]]
# unknown AN losses: (0,1) sp(2)=2.127, (0,2) sp(1)=1.313, (1,0) sp(1)=1.313 (tie), (1,1) sp(-1)=0.313
AN_BCE = [[bce_logit(0.5, 1), bce_logit(2.0, 0), bce_logit(1.0, 0)],
          [bce_logit(1.0, 0), bce_logit(-1.0, 0), bce_logit(3.0, 0)]]
MODIFIED = {(0, 1), (0, 2), (1, 0)}  # U >= tau (tie at tau modified)


def _mean(m: List[List[float]]) -> float:
    return sum(sum(r) for r in m) / sum(len(r) for r in m)


def test_ll_clean_rate_and_k():
    assert ll_clean_rate(1, 0.002) == 1.0
    assert ll_clean_rate(3, 0.25) == 0.5
    assert math.isclose(1 - ll_clean_rate(4, 0.002), 3 * 0.002)
    # epoch 3, delta 0.25, B*C = 6 -> K = ceil(6 * 0.5) = 3 (R, Ct); LL-Cp: ceil(6 * 0.25) = 2
    assert math.ceil(6 * (1 - ll_clean_rate(3, 0.25))) == 3


@pytest.mark.parametrize("name", ["ll_r", "ll_ct", "ll_cp"])
def test_ll_epoch1_unchanged(name):
    loss = create_loss(name, LL_OBS, delta_rel=0.25)
    loss.set_epoch(1, 10)
    out = loss(make_batch(LL_S, LL_IDX))
    assert close(out["loss"], _mean(AN_BCE))
    assert float(out["num_modified"]) == 0
    assert torch.equal(loss.state, LL_OBS.float())


def test_ll_r_epoch3_rejects():
    loss = create_loss("ll_r", LL_OBS, delta_rel=0.25)
    loss.set_epoch(3, 10)
    exp = [[0.0 if (n, c) in MODIFIED else AN_BCE[n][c] for c in range(3)] for n in range(2)]
    out = loss(make_batch(LL_S, LL_IDX))
    assert close(out["loss"], _mean(exp))
    assert float(out["num_modified"]) == 3


def test_ll_ct_epoch3_corrects_temporarily():
    loss = create_loss("ll_ct", LL_OBS, delta_rel=0.25)
    loss.set_epoch(3, 10)
    exp = [[bce_logit(LL_S[n][c], 1) if (n, c) in MODIFIED else AN_BCE[n][c] for c in range(3)]
           for n in range(2)]
    out = loss(make_batch(LL_S, LL_IDX))
    assert close(out["loss"], _mean(exp))
    assert torch.equal(loss.state, LL_OBS.float())


def test_ll_cp_permanent_writes_persist():
    loss = create_loss("ll_cp", LL_OBS, delta_rel=0.25)
    loss.set_epoch(3, 10)
    # K = ceil(6 * 0.25) = 2 -> tau = 1.313 (the tied pair): modified = U >= tau (3 entries),
    # written = U > tau strictly: only (0, 1), i.e. training row 3, class 1
    exp = [[bce_logit(LL_S[n][c], 1) if (n, c) in MODIFIED else AN_BCE[n][c] for c in range(3)]
           for n in range(2)]
    out = loss(make_batch(LL_S, LL_IDX))
    assert close(out["loss"], _mean(exp))
    after = LL_OBS.float().clone()
    after[3, 1] = 1.0
    assert torch.equal(loss.state, after)

    # next batch: (0, 1) is now an observed positive; unknown U: 1.313, 1.313, 0.313 -> K = 2,
    # tau = 1.313: the tied pair is corrected, nothing is strictly above tau, nothing new is written
    exp2 = [[bce_logit(0.5, 1), bce_logit(2.0, 1), bce_logit(1.0, 1)],
            [bce_logit(1.0, 1), bce_logit(-1.0, 0), bce_logit(3.0, 0)]]
    out2 = loss(make_batch(LL_S, LL_IDX))
    assert close(out2["loss"], _mean(exp2))
    assert torch.equal(loss.state, after)

    # eval mode never writes
    ev = create_loss("ll_cp", LL_OBS, delta_rel=0.25)
    ev.set_epoch(3, 10)
    ev.eval()
    ev(make_batch(LL_S, LL_IDX))
    assert torch.equal(ev.state, LL_OBS.float())


def test_ll_cp_released_is_bug_behaves_like_ct():
    loss = create_loss("ll_cp", LL_OBS, delta_rel=0.25, released_is_bug=True)
    loss.set_epoch(3, 10)
    exp = [[bce_logit(LL_S[n][c], 1) if (n, c) in MODIFIED else AN_BCE[n][c] for c in range(3)]
           for n in range(2)]
    out = loss(make_batch(LL_S, LL_IDX))
    assert close(out["loss"], _mean(exp))
    assert torch.equal(loss.state, LL_OBS.float())  # no permanent write
    # K comes from the clean rate: at epoch 2, K = ceil(6 * 0.25) = 2 for both; at epoch 4 the
    # released variant corrects ceil(6 * 0.75) = 5 entries, capped by the 4 unknowns (tau = 0)
    loss.set_epoch(4, 10)
    assert float(loss(make_batch(LL_S, LL_IDX))["num_modified"]) == 4


# ------------------------------------------------------------------------------------------------
# GR schedules (§5b, §7e) and GR loss (§5a)
# ------------------------------------------------------------------------------------------------


def test_gr_schedules_coco_worked_example():
    beta, alpha = [0, 10, -2, -8], [0.5, 2, 0.8, 0.5]
    ws, bs, mus, sigmas = [], [], [], []
    for e in range(1, 9):
        w, b = gr_wb(e, 8, beta)
        mu, s = gr_mu_sigma(e, 8, alpha)
        ws.append(w), bs.append(b), mus.append(mu), sigmas.append(s)
    assert ws == pytest.approx([0, 1.25, 2.5, 3.75, 5.0, 6.25, 7.5, 8.75])
    assert bs == pytest.approx([-2, -2.75, -3.5, -4.25, -5.0, -5.75, -6.5, -7.25])
    assert mus[0] == pytest.approx(0.5375) and mus[-1] == pytest.approx(0.8)
    assert sigmas[0] == pytest.approx(1.8125) and sigmas[-1] == pytest.approx(0.5)
    # k(p) = sigmoid(8.75 p - 7.25) at the last epoch (§7e)
    assert sig(ws[-1] * 0 + bs[-1]) == pytest.approx(7.1e-4, abs=0.1e-4)
    # §7e prints k(0.5) ~ 0.04; sigmoid(4.375 - 7.25) = sigmoid(-2.875) is 0.053
    assert sig(ws[-1] * 0.5 + bs[-1]) == pytest.approx(0.0534, abs=1e-3)
    assert sig(ws[-1] * 1 + bs[-1]) == pytest.approx(0.82, abs=5e-3)
    # the loss module follows the same schedule
    loss = create_loss("gpr", OBS)
    loss.set_epoch(8, 8)
    assert (loss.w, loss.b, loss.mu, loss.sigma) == pytest.approx((8.75, -7.25, 0.8, 0.5))


def test_gr_schedules_linear_init():
    # n0 = 2, E = 8: (w, b) starts moving at e = 4, (mu, sigma) at e = 3
    assert gr_wb(3, 8, [0, 6, 0, 0], linear_init=2) == pytest.approx((0.0, 0.0))
    assert gr_wb(4, 8, [0, 6, 0, 0], linear_init=2) == pytest.approx((1.0, 0.0))
    assert gr_mu_sigma(2, 8, [0, 0, 6, 0], linear_init=2) == pytest.approx((0.0, 0.0))
    assert gr_mu_sigma(3, 8, [0, 0, 6, 0], linear_init=2) == pytest.approx((1.0, 0.0))
    with pytest.raises(ValueError):
        gr_wb(0, 8, [0, 1, 0, 1])


def _gr_unknown(p, w, b, mu, sigma, q2, q3):
    k = sig(w * p + b)
    v = math.exp(-((p - mu) ** 2) / (2 * sigma**2))
    return v * (k * (1 - p**q2) / q2 + (1 - k) * (1 - (1 - p) ** q3) / q3)


@pytest.mark.parametrize("epoch,q3", [(1, 1.0), (8, 1.5)])
def test_gr_value(epoch, q3):
    beta, alpha = (0, 2, -2, -2), (0.5, 2, 0.8, 0.5)
    loss = create_loss("gr", OBS, q3=q3)
    loss.set_epoch(epoch, 8)
    # hand schedule (§5b) for E = 8
    w = 0 + 2 * max(epoch - 1, 0) / 8
    b = -2.0
    mu = 0.5 + 0.3 * epoch / 8
    sg = 2 + (0.5 - 2) * epoch / 8

    def f(n, c, p):
        z = Z[n][c]
        if z == 1:
            return lp(p, EPS7)
        if z == -1:
            return ln(p, EPS7)
        return _gr_unknown(p, w, b, mu, sg, 0.01, q3)

    assert (beta, alpha) == (tuple(loss.beta), tuple(loss.alpha))
    out = loss(make_batch(S, IDX))
    assert close(out["loss"], batch_mean(S, f))


def test_gr_needs_set_epoch():
    with pytest.raises(RuntimeError, match="set_epoch"):
        create_loss("gr", OBS)(make_batch(S, IDX))


# ------------------------------------------------------------------------------------------------
# GPR (§7d, COCO row of §7e)
# ------------------------------------------------------------------------------------------------

G_OBS = torch.tensor([[1, 0, 0, 0], [0, 0, -1, 0]], dtype=torch.int8)
G_S = [[2.0, -4.5, 0.5, -1.0], [-2.0, 1.0, 0.3, -3.0]]
G_PSEUDO = [[1, 1, 0, -1], [1, 1, 1, 0]]  # pseudo on observed entries is ignored


def _v(p):  # last COCO epoch: mu = 0.8, sigma = 0.5
    return math.exp(-((p - 0.8) ** 2) / (2 * 0.5**2))


def _omega(v, l1=0.7, l2=0.5):
    return 1 - min(max(v, 1 - l1), 1 - l2)


def test_gpr_weight_branches():
    # v below 1 - lambda1 = 0.3 -> omega = 0.7; between -> 1 - v; above 1 - lambda2 = 0.5 -> 0.5
    p_lo, p_mid, p_hi = sig(-4.5), sig(-2.0), sig(1.0)
    assert _v(p_lo) < 0.3 and 0.3 < _v(p_mid) < 0.5 and _v(p_hi) > 0.5
    loss = create_loss("gpr", G_OBS)
    v = torch.tensor([_v(p_lo), _v(p_mid), _v(p_hi)])
    got = loss.pseudo_pos_weight(v).tolist()
    assert got == pytest.approx([0.7, 1 - _v(p_mid), 0.5], abs=1e-6)


def test_gpr_terms_and_value():
    loss = create_loss("gpr", G_OBS)
    loss.set_epoch(8, 8)
    w, b, mu, sg, q2, q3, rho = 8.75, -7.25, 0.8, 0.5, 0.01, 1.0, 0.9

    def f(n, c, p):
        z, y = G_OBS[n, c].item(), G_PSEUDO[n][c]
        if z == 1:
            return lp(p, EPS7)  # L1
        if z == -1:
            return ln(p, EPS7)  # observed negative
        if y == 1:
            return _omega(_v(p)) * (rho * lp(p, EPS7) + (1 - rho) * ln(p, EPS7))  # L2
        if y == -1:
            return _v(p) * ln(p, EPS7)  # L4
        return _gr_unknown(p, w, b, mu, sg, q2, q3)  # L3

    sum_p = sum(sig(s) for row in G_S for s in row)
    reg = 0.001 * (sum_p / 2 - 2.9) ** 2 / 4**2
    out = loss(make_batch(G_S, [0, 1], G_PSEUDO))
    assert close(out["reg"], reg)
    assert close(out["loss"], batch_mean(G_S, f) + reg)
    # each term on its own
    p = [[sig(s) for s in row] for row in G_S]
    assert close(out["obs_pos"], lp(p[0][0], EPS7) / 8)
    assert close(out["obs_neg"], ln(p[1][2], EPS7) / 8)
    l2 = sum(_omega(_v(p[n][c])) * (rho * lp(p[n][c], EPS7) + (1 - rho) * ln(p[n][c], EPS7))
             for n, c in [(0, 1), (1, 0), (1, 1)])
    assert close(out["pseudo_pos"], l2 / 8)
    l3 = sum(_gr_unknown(p[n][c], w, b, mu, sg, q2, q3) for n, c in [(0, 2), (1, 3)])
    assert close(out["unknown"], l3 / 8)
    assert close(out["pseudo_neg"], _v(p[0][3]) * ln(p[0][3], EPS7) / 8)
    assert float(out["pseudo_neg"]) > 0


def test_gpr_l4_zero_without_negative_pseudo_labels():
    loss = create_loss("gpr", G_OBS)
    loss.set_epoch(3, 8)
    no_neg = [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert float(loss(make_batch(G_S, [0, 1], no_neg))["pseudo_neg"]) == 0.0
    with pytest.raises(ValueError, match="pseudo"):
        loss(make_batch(G_S, [0, 1]))
    assert loss.requires_pseudo and create_loss("vlpl", G_OBS).requires_pseudo
    assert not create_loss("gr", G_OBS).requires_pseudo


# ------------------------------------------------------------------------------------------------
# VLPL (§6c)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_neg", [0.0, 0.5])
def test_vlpl_value(beta_neg):
    a = 0.1
    pseudo = [[1, 1, 0], [-1, 1, 0]]  # vs Z = [[0, 0, 1], [0, 1, -1]]

    def f(n, c, p):
        z, y = Z[n][c], pseudo[n][c]
        if z == 1:
            return lp(p, EPS5)
        if z == -1:
            return ln(p, EPS5)
        if y == 1:
            return 0.7 * (0.9 * lp(p, EPS5) + 0.1 * ln(p, EPS5))
        if y == -1:
            return beta_neg * ln(p, EPS5)  # 0 by default: ignored as released
        return -a * H(p, EPS5)

    out = create_loss("vlpl", OBS, alpha=a, beta_neg=beta_neg)(make_batch(S, IDX, pseudo))
    assert close(out["loss"], batch_mean(S, f))


# ------------------------------------------------------------------------------------------------
# registry, state, gradients
# ------------------------------------------------------------------------------------------------

ALL = ["an", "an_ls", "bce", "csl", "em", "em_apl", "epr", "gpr", "gr", "iu", "iun", "ll_cp", "ll_ct", "ll_r",
       "pr", "role", "satl", "vlpl", "vlpl_asl", "wan"]
#: hyper-parameters a loss needs when built alone (no trainer): CSL's class prior is computed by `vlpl train`
#: before training (prior=model / clip); "none" runs its selective rule without the prior rule
STANDALONE = {"csl": {"prior": "none"}}
#: the losses trained end to end with the sigrl head on the single-positive coco256 store below (iu / iun need
#: observed negatives; csl, satl, pr and vlpl_asl have their own end-to-end tests: test_csl, test_satl,
#: test_losses_cole_extra)
SIGRL_END_TO_END = [n for n in ALL if n not in ("csl", "iu", "iun", "pr", "satl", "vlpl_asl")]


def test_registered_names_and_defaults():
    assert set(ALL) <= set(LOSSES.names())
    d = loss_defaults("gpr")
    assert d["beta"] == [0.0, 10.0, -2.0, -8.0] and d["lambda1"] == 0.7 and d["lambda2"] == 0.5
    assert d["reg"] == 0.001 and d["expected_positives"] == 2.9 and d["eps"] == 1e-7
    assert loss_defaults("an")["eps"] == 1e-5
    assert loss_defaults("ll_cp") == {"delta_rel": 0.002, "released_is_bug": False}


def test_unknown_kwarg_is_named():
    with pytest.raises(RegistryError, match="lamda1"):
        create_loss("gpr", OBS, lamda1=0.3)


def test_loss_defaults_have_one_home_the_schema():
    """Every loss constructor's defaults are its schema's (vlpl/train/loss_params.py), and the schema
    (not the constructor) is what the config check, --list and docs read."""
    import inspect

    from vlpl.train.loss_params import loss_params

    for name in ALL:
        sig = inspect.signature(LOSSES.get(name).__init__)
        defaults = {k: (list(p.default) if isinstance(p.default, tuple) else p.default)
                    for k, p in sig.parameters.items() if p.default is not p.empty}
        assert defaults == loss_params(name).to_dict() == loss_defaults(name), name
        assert LOSSES.get(name).requires_pseudo == LOSSES.schema(name).requires_pseudo, name


@pytest.mark.parametrize("name, hparams, message", [
    ("gpr", {"lambda1": 0.4, "lambda2": 0.5}, r"lambda2: must not exceed lambda1 \(0.4\); got 0.5"),
    ("gpr", {"beta": [0, 10, -2]}, r"beta: needs 4 values; got 3"),
    ("gr", {"alpha": [0.5, 2.0, 0.8, 0.0]}, r"alpha: sigma0 and sigmaT"),
    ("gr", {"q2": 0.0}, r"q2: must be > 0; got 0.0"),
    ("ll_r", {"delta_rel": -0.1}, r"delta_rel: must be in \[0, 1\]; got -0.1"),
    ("an_ls", {"label_smoothing": 1.5}, r"label_smoothing: must be in \[0, 1\]"),
    ("em_apl", {"warmup_epoch": 2.5}, r"warmup_epoch: expected int, got 2.5"),
    ("ll_cp", {"released_is_bug": "yes"}, r"released_is_bug: expected bool"),
    ("vlpl", {"pseudo_pos_target": -0.1}, r"pseudo_pos_target: must be in \[0, 1\]"),
])
def test_bad_loss_values_are_named(name, hparams, message):
    with pytest.raises(ValueError, match=rf"loss '{name}': {message}"):
        create_loss(name, OBS, **hparams)


def test_loss_values_are_coerced_by_the_schema():
    loss = create_loss("gpr", OBS, beta=[0, 2, -2, -2], q3=2)  # YAML gives lists and ints
    assert loss.beta == (0.0, 2.0, -2.0, -2.0) and loss.q3 == 2.0


def test_state_dict_round_trip():
    role = create_loss("role", OBS, seed=0)
    with torch.no_grad():
        role.estimator_logits.add_(1.0)
    fresh = create_loss("role", OBS, seed=1)
    fresh.load_state_dict(role.state_dict())
    assert torch.equal(fresh.estimator_logits, role.estimator_logits)

    apl = create_loss("em_apl", APL_OBS, warmup_epoch=1)
    apl.set_epoch(1, 3)
    apl.end_epoch(torch.rand(6, 2), torch.arange(6), epoch=1)
    fresh_apl = create_loss("em_apl", APL_OBS, warmup_epoch=1)
    fresh_apl.load_state_dict(apl.state_dict())
    assert torch.equal(fresh_apl.state, apl.state) and torch.equal(fresh_apl.apl_mask, apl.apl_mask)
    s2 = [[0.1, 0.2], [0.3, -0.4]]
    assert close(fresh_apl(make_batch(s2, [2, 3]))["loss"], float(apl(make_batch(s2, [2, 3]))["loss"].detach()))

    cp = create_loss("ll_cp", LL_OBS, delta_rel=0.25)
    cp.set_epoch(3, 10)
    cp(make_batch(LL_S, LL_IDX))
    fresh_cp = create_loss("ll_cp", LL_OBS, delta_rel=0.25)
    fresh_cp.load_state_dict(cp.state_dict())
    assert float(fresh_cp.state[3, 1]) == 1.0



def test_em_apl_streamed_pass_equals_the_in_memory_pass(monkeypatch, tmp_path):
    """end_epoch_stream (the trainer's: batches in any order, a scratch file read back by blocks of classes)
    stores exactly what end_epoch does on all rows in position order, over several epochs, with ties, with
    observed -1 / +1 and with earlier soft negatives; before warm-up it does not read the pass at all."""
    import vlpl.train.losses.em as em

    monkeypatch.setattr(em, "APL_BLOCK_ENTRIES", 2 * 41)  # 2 classes per block: 4 blocks for C = 7
    g = torch.Generator().manual_seed(0)
    n, c = 41, 7
    obs = torch.randint(-1, 2, (n, c), generator=g).to(torch.int8)
    obs[obs == -1] = torch.randint(-1, 1, (int((obs == -1).sum()),), generator=g).to(torch.int8)  # fewer -1
    ref = create_loss("em_apl", obs, warmup_epoch=2, neg_proportion=0.9)
    streamed = create_loss("em_apl", obs, warmup_epoch=2, neg_proportion=0.9)

    def never():
        raise AssertionError("the pass was read before warm-up")
        yield  # pragma: no cover

    ref.set_epoch(1, 4)
    streamed.set_epoch(1, 4)
    assert streamed.end_epoch_stream(never(), 1, tmp_path) == {"apl_new": 0.0, "apl_total": 0.0}
    for epoch in (2, 3, 4):
        probs = torch.rand(n, c, generator=g)
        probs[::3] = torch.round(probs[::3] * 4) / 4  # ties (stable: the earlier row first)
        ref.set_epoch(epoch, 4)
        streamed.set_epoch(epoch, 4)
        want = ref.end_epoch(probs, torch.arange(n), epoch)
        order = torch.randperm(n, generator=g)
        batches = [(probs[order[k:k + 6]], order[k:k + 6]) for k in range(0, n, 6)]
        got = streamed.end_epoch_stream(iter(batches), epoch, tmp_path)
        assert got == want and want["apl_new"] > 0
        torch.testing.assert_close(streamed.apl_target, ref.apl_target, rtol=0, atol=0, equal_nan=True)
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone
    with pytest.raises(ValueError, match="gave 6 of 41 rows"):
        streamed.end_epoch_stream(iter(batches[:1]), 4, tmp_path)
    with pytest.raises(ValueError, match="twice"):
        streamed.end_epoch_stream(iter([batches[0], batches[0]]), 4, tmp_path)


def test_compact_state_keeps_the_old_values_and_reads_old_checkpoints():
    """LL-Cp's int8 label_state and EM+APL's float32 apl_target reproduce the old float32 ``state`` exactly
    (``loss.state``), and a checkpoint of the old layout (float32 ``state`` + bool ``apl_mask``) loads into
    the new buffers with the same loss values."""
    apl = create_loss("em_apl", APL_OBS, warmup_epoch=1)
    apl.set_epoch(1, 3)
    probs = torch.rand(6, 2, generator=torch.Generator().manual_seed(3))
    apl.end_epoch(probs, torch.arange(6), epoch=1)
    old_state = APL_OBS.float().clone()
    old_state[apl.apl_mask] = -probs[apl.apl_mask]  # what the float32 buffer held
    assert torch.equal(apl.state, old_state)
    old = {"state": old_state, "apl_mask": apl.apl_mask.clone(), "unknown_at_start": apl.unknown_at_start.clone()}
    fresh = create_loss("em_apl", APL_OBS, warmup_epoch=1)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.apl_target, apl.apl_target, rtol=0, atol=0, equal_nan=True)
    s2 = [[0.1, 0.2], [0.3, -0.4]]
    assert torch.equal(fresh(make_batch(s2, [2, 3]))["loss"], apl(make_batch(s2, [2, 3]))["loss"])

    cp = create_loss("ll_cp", LL_OBS, delta_rel=0.25)
    assert cp.label_state.dtype == torch.int8 and set(cp.per_sample_state()) == {"label_state"}
    cp.set_epoch(3, 10)
    cp(make_batch(LL_S, LL_IDX))
    fresh_cp = create_loss("ll_cp", LL_OBS, delta_rel=0.25)
    fresh_cp.load_state_dict({"state": cp.state})  # the old float32 buffer
    assert torch.equal(fresh_cp.label_state, cp.label_state) and int((cp.state != LL_OBS.float()).sum()) > 0
    # a stateless loss reads an old checkpoint's state-only dict too (nothing to restore)
    create_loss("an", OBS).load_state_dict({"state": OBS.float()})


def test_observed_labels_are_checked_and_named():
    import numpy as np

    with pytest.raises(ValueError, match=r"row 1, class 2 holds 0.5"):
        create_loss("an", torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]]))
    with pytest.raises(ValueError, match=r"\(N, C\) matrix"):
        create_loss("an", torch.zeros(3))

    class NoShape:
        def observed_at(self, idx):
            return np.zeros((len(idx), 2), np.int8)

    with pytest.raises(ValueError, match="NoShape"):
        create_loss("an", NoShape())


@pytest.mark.parametrize("name", ALL)
def test_gradients_flow(name):
    torch.manual_seed(0)
    obs = torch.tensor([[1, 0, 0, 0], [0, 1, 0, -1], [0, 0, 0, 1]], dtype=torch.int8)
    loss = create_loss(name, obs, **STANDALONE.get(name, {}))
    loss.set_epoch(2, 4)
    logits = torch.randn(3, 4, requires_grad=True)
    pseudo = torch.tensor([[0, 1, -1, 0], [1, 0, 1, 0], [-1, 1, 0, 0]], dtype=torch.int8)
    out = loss(LossBatch(logits=logits, index=torch.tensor([0, 1, 2]), pseudo=pseudo))
    assert out["loss"].requires_grad and out["loss"].dim() == 0
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert float(logits.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------------
# Values that a planted bug changes (issue 8 item 16): Large Loss's K on a non-integer B x C x rate,
# and the GR/GPR eps at a small p
# ------------------------------------------------------------------------------------------------

# The real case of §3b/§3c: batch 16, 80 COCO classes, the default Delta_rel = 0.002 (the CLI's 0.2%):
# B x C x rate = 2.56 at epoch 2 and 5.12 at epoch 3, so K = ceil(.) = 3 and 6 (rounding down or to the
# nearest integer gives 2 or 5).
LL_B, LL_C = 16, 80
# one observed positive per row (the single-positive setting), every other entry unknown
LL_REAL_OBS = torch.zeros(LL_B, LL_C, dtype=torch.int8)
for _n in range(LL_B):
    LL_REAL_OBS[_n, (5 * _n) % LL_C] = 1
# 1280 distinct logits in [-4, 4): a permutation of a regular grid, so the unknown losses have no ties
LL_REAL_S = [[((n * LL_C + c) * 37 % (LL_B * LL_C)) / (LL_B * LL_C) * 8.0 - 4.0 for c in range(LL_C)]
             for n in range(LL_B)]


def _ll_real_unknown_ranked() -> List[tuple]:
    """The unknown entries ``(n, c)`` by decreasing ``U = BCE(s, 0) = softplus(s)``."""
    unk = [(n, c) for n in range(LL_B) for c in range(LL_C) if LL_REAL_OBS[n, c] == 0]
    return sorted(unk, key=lambda nc: -softplus(LL_REAL_S[nc[0]][nc[1]]))


@pytest.mark.parametrize("name,epoch,k", [("ll_r", 2, 3), ("ll_ct", 2, 3), ("ll_r", 3, 6), ("ll_ct", 3, 6),
                                          ("ll_cp", 2, 3), ("ll_cp", 3, 3)])
def test_ll_k_rounds_up_on_the_real_batch(name, epoch, k):
    # §3b: K = ceil(B C (1 - r_t)) for LL-R/LL-Ct (1280 x 0.002 = 2.56 -> 3; 1280 x 0.004 = 5.12 -> 6) and
    # K = ceil(B C Delta_rel) = 3 at every epoch >= 2 for LL-Cp
    loss = create_loss(name, LL_REAL_OBS, delta_rel=0.002)
    loss.set_epoch(epoch, 10)
    out = loss(make_batch(LL_REAL_S, list(range(LL_B))))
    assert float(out["num_modified"]) == k
    top = set(_ll_real_unknown_ranked()[:k])

    def f(n: int, c: int) -> float:
        s = LL_REAL_S[n][c]
        if LL_REAL_OBS[n, c] == 1:
            return bce_logit(s, 1)
        if (n, c) in top:
            return 0.0 if name == "ll_r" else bce_logit(s, 1)  # rejected, or corrected toward 1
        return bce_logit(s, 0)

    expected = sum(f(n, c) for n in range(LL_B) for c in range(LL_C)) / (LL_B * LL_C)
    assert close(out["loss"], expected)
    if name == "ll_cp":  # the K - 1 entries strictly above tau are written as positives
        assert float(out["num_written"]) == k - 1
        written = {tuple(rc) for rc in (loss.state != LL_REAL_OBS.float()).nonzero().tolist()}
        assert written == set(_ll_real_unknown_ranked()[: k - 1])
        assert bool((loss.state[tuple(zip(*written))] == 1).all())


# GR and AEVLP use eps = 1e-7 inside l+(p) = -log(p + eps) (§1, §5a, §7d). The value tests above use logits
# in [-4.5, 3], where p >> eps and a 10x change of eps moves the loss by < 1e-5 relative. At a logit of -12
# (p = 6.144e-6, the scale of a confident wrong prediction) eps is 1.6% of p + eps: l+ = 11.98386 with
# eps = 1e-7, 11.84921 with 1e-6 and 11.99838 with 1e-8.
SMALL_LOGIT = -12.0


def _eps_from_lpos(lpos: float, p: float) -> float:
    """The ``eps`` that ``l+(p) = lpos`` implies: ``exp(-lpos) - p``."""
    return math.exp(-lpos) - p


def test_gr_eps_at_a_small_probability():
    p = sig(SMALL_LOGIT)
    assert p == pytest.approx(6.1442e-6, rel=1e-4)
    loss = create_loss("gr", torch.tensor([[1, 0]], dtype=torch.int8))
    loss.set_epoch(1, 8)
    out = loss(make_batch([[SMALL_LOGIT, 0.0]], [0]))
    lpos = float(out["obs_pos"]) * 2  # the batch mean over B x C = 2 entries
    assert lpos == pytest.approx(lp(p, EPS7), rel=1e-6)  # float32 resolution; eps 1e-6 / 1e-8 is 1e-2 / 1e-3 off
    assert _eps_from_lpos(lpos, p) == pytest.approx(1e-7, abs=2e-9)


def test_gpr_eps_at_a_small_probability():
    p = sig(SMALL_LOGIT)
    # row: an observed positive (L1), a pseudo-positive (L2) and a neutral entry, all with the COCO defaults
    loss = create_loss("gpr", torch.tensor([[1, 0, 0]], dtype=torch.int8))
    loss.set_epoch(8, 8)
    out = loss(make_batch([[SMALL_LOGIT, SMALL_LOGIT, 0.0]], [0], [[0, 1, 0]]))
    lpos = float(out["obs_pos"]) * 3
    assert lpos == pytest.approx(lp(p, EPS7), rel=1e-6)
    assert _eps_from_lpos(lpos, p) == pytest.approx(1e-7, abs=2e-9)
    # L2 = omega(p) [rho l+(p) + (1 - rho) l-(p)], v(p) = 0.278 < 1 - lambda1 = 0.3 -> omega = lambda1 = 0.7
    assert _v(p) < 0.3
    l2 = 0.7 * (0.9 * lp(p, EPS7) + 0.1 * ln(p, EPS7))
    assert float(out["pseudo_pos"]) * 3 == pytest.approx(l2, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# The reconstruction term of Decision 5 (ours, off by default): weight * mean_n (1 - cos(P f_n, e_n))
# ------------------------------------------------------------------------------------------------

from vlpl.train.losses import ReconstructionTerm  # noqa: E402

# F = 2 features, D = 3 embedding dims; P = [[1, 0], [0, 1], [1, 1]]
REC_P = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
REC_F = [[1.0, 2.0], [-1.0, 0.5]]  # P f = [1, 2, 3] and [-1, 0.5, -0.5]
REC_E = [[1.0, 0.0, 0.0], [0.0, 2.0, 2.0]]


def _cos(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _rec_term(weight: float = 0.5) -> ReconstructionTerm:
    term = ReconstructionTerm(2, 3, weight=weight)
    with torch.no_grad():
        term.proj.weight.copy_(torch.tensor(REC_P))
    return term


def _rec_batch(logits, index, pseudo=None) -> LossBatch:
    b = make_batch(logits, index, pseudo)
    b.features = torch.tensor(REC_F, requires_grad=True)
    b.image_embedding = torch.tensor(REC_E)
    return b


def test_reconstruction_term_hand_value():
    # cos([1,2,3], [1,0,0]) = 1/sqrt(14); cos([-1,.5,-.5], [0,2,2]) = 0 -> mean(1 - cos) = (2 - 1/sqrt(14)) / 2
    want = 0.5 * ((1 - _cos([1, 2, 3], REC_E[0])) + (1 - _cos([-1, 0.5, -0.5], REC_E[1]))) / 2
    assert want == pytest.approx(0.5 * (2 - 1 / math.sqrt(14)) / 2)
    term = _rec_term(0.5)
    assert close(term(torch.tensor(REC_F), torch.tensor(REC_E)), want, tol=1e-6)
    # on a loss: loss = the loss's own value + recon, and the logged terms still add up to loss
    em = create_loss("em", OBS)
    alone = em(make_batch(S, IDX))
    em.set_reconstruction(_rec_term(0.5))
    assert em.uses_features
    out = em(_rec_batch(S, IDX))
    assert close(out["recon"], want, tol=1e-6)
    assert torch.equal(out["loss"].detach(), alone["loss"].detach() + out["recon"])
    for k, v in alone.items():
        if k != "loss":
            assert torch.equal(out[k], v), k
    assert close(sum(float(v) for k, v in out.items() if k != "loss"), float(out["loss"].detach()))


@pytest.mark.parametrize("name", ALL)
def test_reconstruction_off_by_default_changes_nothing(name):
    """Off (the default): no term, no hook, no extra parameters or state; the loss's values are bit-identical
    whether or not the batch carries features and embeddings, and after the term was added and removed."""
    obs = torch.tensor([[1, 0, 0], [0, 1, -1], [0, 0, 1], [-1, 0, 0]], dtype=torch.int8)
    pseudo = [[1, 0, -1], [0, 1, 1]]

    def run(loss, batch):
        loss.set_epoch(2, 4)
        return loss(batch)

    ref_loss = create_loss(name, obs, **STANDALONE.get(name, {}))
    assert ref_loss.reconstruction is None and not ref_loss.uses_features
    assert not ref_loss._forward_hooks
    ref = run(ref_loss, make_batch(S, IDX, pseudo))
    carried = run(create_loss(name, obs, **STANDALONE.get(name, {})), _rec_batch(S, IDX, pseudo))
    toggled_loss = create_loss(name, obs, **STANDALONE.get(name, {}))
    toggled_loss.set_reconstruction(_rec_term())
    toggled_loss.set_reconstruction(None)
    toggled = run(toggled_loss, make_batch(S, IDX, pseudo))
    for out in (carried, toggled):
        assert out.keys() == ref.keys() and "recon" not in out
        for k in ref:
            assert torch.equal(out[k], ref[k]), (name, k)
    assert list(toggled_loss.state_dict()) == list(create_loss(name, obs, **STANDALONE.get(name, {})).state_dict())
    assert [g["name"] for g in toggled_loss.param_groups(1e-3)] == \
        [g["name"] for g in create_loss(name, obs, **STANDALONE.get(name, {})).param_groups(1e-3)]
    # on: every one of the loss's own terms is unchanged, and the total gains exactly the term
    on_loss = create_loss(name, obs, **STANDALONE.get(name, {}))
    on_loss.set_reconstruction(_rec_term())
    on = run(on_loss, _rec_batch(S, IDX, pseudo))
    assert set(on) == set(ref) | {"recon"}
    for k in ref:
        if k != "loss":
            assert torch.equal(on[k], ref[k]), (name, k)
    assert torch.equal(on["loss"].detach(), ref["loss"].detach() + on["recon"])


def test_reconstruction_gradients_param_groups_and_state():
    role = create_loss("role", OBS, lr_mult=10.0)
    role.set_reconstruction(_rec_term())
    groups = {g["name"]: g for g in role.param_groups(1e-3)}
    assert set(groups) == {"role_estimator", "reconstruction"}
    assert groups["reconstruction"]["lr"] == 1e-3 and groups["role_estimator"]["lr"] == 1e-2
    assert groups["reconstruction"]["params"][0] is role.reconstruction.proj.weight
    role.reconstruction.lr = 5e-4  # the trainer passes the head's learning rate
    assert {g["name"]: g["lr"] for g in role.param_groups(1e-3)}["reconstruction"] == 5e-4
    batch = _rec_batch(S, IDX)
    role(batch)["loss"].backward()
    # the term's gradient reaches the features (hence the head/backbone that made them) and the projection;
    # d/d f of (1 - cos) for row 1: cos = 0 there, the gradient is -P^T e / (|Pf| |e|) * weight / B
    assert batch.features.grad is not None and float(batch.features.grad.abs().sum()) > 0
    pf, e = [-1.0, 0.5, -0.5], REC_E[1]
    npf, ne = math.sqrt(sum(x * x for x in pf)), math.sqrt(sum(x * x for x in e))
    g_pred = [-(ei / (npf * ne)) * 0.5 / 2 for ei in e]  # d(w/B (1 - cos))/d(Pf) at cos = 0
    g_f = [sum(REC_P[d][j] * g_pred[d] for d in range(3)) for j in range(2)]
    assert batch.features.grad[1].tolist() == pytest.approx(g_f, rel=1e-5)
    assert role.reconstruction.proj.weight.grad is not None
    assert float(role.reconstruction.proj.weight.grad.abs().sum()) > 0
    # checkpoint: the projection is in the loss's state_dict and comes back
    keys = set(role.state_dict())
    assert "reconstruction.proj.weight" in keys and "estimator_logits" in keys
    fresh = create_loss("role", OBS)
    fresh.set_reconstruction(ReconstructionTerm(2, 3, weight=0.5, seed=7))
    assert not torch.equal(fresh.reconstruction.proj.weight, role.reconstruction.proj.weight)
    fresh.load_state_dict(role.state_dict())
    assert torch.equal(fresh.reconstruction.proj.weight, role.reconstruction.proj.weight)


def test_reconstruction_two_process_slices_average_to_the_one_process_gradient():
    """Under data parallelism each process takes the term's mean over its slice of the batch; DDP's averaging
    of the model's gradients and ``average_gradients``' averaging of ``P`` then give the 1-process gradient
    (equal slices), so the term needs no collective. A summed (not averaged) term would fail this."""
    g = torch.Generator().manual_seed(0)
    f, e = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)

    def grads(rows: slice):
        term = ReconstructionTerm(5, 3, weight=0.7, seed=1)
        x = f[rows].clone().requires_grad_(True)
        term(x, e[rows]).backward()
        full = torch.zeros_like(f)
        full[rows] = x.grad
        return full, term.proj.weight.grad

    whole_f, whole_p = grads(slice(0, 8))
    (a_f, a_p), (b_f, b_p) = grads(slice(0, 4)), grads(slice(4, 8))
    torch.testing.assert_close((a_f + b_f) / 2, whole_f)
    torch.testing.assert_close((a_p + b_p) / 2, whole_p)


def test_reconstruction_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = ReconstructionTerm(4, 3, weight=1.0, seed=0), ReconstructionTerm(4, 3, weight=1.0, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.proj.weight, b.proj.weight)
    assert not torch.equal(a.proj.weight, ReconstructionTerm(4, 3, weight=1.0, seed=1).proj.weight)
    assert float(a.proj.weight.detach().abs().max()) <= 1 / math.sqrt(4)


def test_reconstruction_errors_are_named():
    em = create_loss("em", OBS)
    em.set_reconstruction(_rec_term())
    with pytest.raises(ValueError, match="reconstruction term on: the batch needs .*features.*image_embedding"):
        em(make_batch(S, IDX))
    bad = _rec_batch(S, IDX)
    bad.image_embedding = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"image embeddings must be \(2, 3\), got \(2, 4\)"):
        em(bad)
    for kwargs, message in (({"weight": 0.0}, "weight must be a finite number > 0"),
                            ({"weight": float("nan")}, "weight must be a finite number > 0"),
                            ({"weight": 1.0, "lr": 0.0}, "lr must be > 0")):
        with pytest.raises(ValueError, match=message):
            ReconstructionTerm(2, 3, **kwargs)


# ------------------------------------------------------------------------------------------------
# Every registered loss trains with the SigRL head (issue 11 item 8) on the coco256 store, to a checkpoint
# ------------------------------------------------------------------------------------------------

SIGRL_ARGS = ["student.kind=open_clip", "student.name=vlpl-tiny", "student.pretrained=false", "student.image_size=64",
              "student.normalization=model", "student.head=sigrl", "epochs=1", "max_steps_per_epoch=2", "batch_size=4",
              "eval_batch_size=32", "num_workers=0", "progress=false", "log_every=1"]


def _loss_args(name: str) -> List[str]:
    """A loss alone (no method recipe): pseudo-labels (DAMP) only for the losses that need them; EM+APL's
    warm-up at 1 so its epoch-end pass runs."""
    args = [f"loss.name={name}", f"pseudo.rule={'damp' if LOSSES.schema(name).requires_pseudo else 'null'}"]
    return args + (["loss.params.warmup_epoch=1"] if name == "em_apl" else [])


@pytest.mark.slow
@pytest.mark.parametrize("name", SIGRL_END_TO_END)
def test_every_loss_trains_with_the_sigrl_head_to_a_checkpoint(name, coco256_store, tmp_path):
    import json

    from vlpl.train.loop import load_best, run_train
    from vlpl.train.recipes import load_train_config

    out = tmp_path / name
    cfg = load_train_config([], [f"store={coco256_store}", f"out={out}", *SIGRL_ARGS, *_loss_args(name)])
    assert cfg.student.head.name == "sigrl"
    run_train(cfg)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())  # a complete checkpoint
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "step"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    model, classes = load_best(out)
    assert type(model.head).__name__ == "SigRLHead" and len(classes) == 80
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(2, 3, 64, 64))).all()


def test_split_reader_image_embeddings_are_the_stored_column_in_the_asked_order(coco256_store):
    import numpy as np

    from vlpl.store.store import ScoreStore

    store = ScoreStore(coco256_store)
    train = store.split("train")
    D = store.embedding_dim
    assert D > 0
    column = np.concatenate([a["image_embedding"] for _, a in store.iter_shards(("image_embedding",))])
    pos = np.array([len(train) - 1, 0, 5, 5, 130 % len(train)])  # any order, repeats, across row groups
    got = train.image_embeddings(pos)
    assert got.dtype == np.float32 and got.shape == (len(pos), D)
    assert np.array_equal(got, column[np.asarray(train.rows)[pos]].astype(np.float32))
    assert train.image_embeddings([]).shape == (0, D)
    with pytest.raises(IndexError, match="positions must be in"):
        train.image_embeddings([len(train)])


# ------------------------------------------------------------------------------------------------
# The reconstruction term through the training step and the trainer (Decision 5)
# ------------------------------------------------------------------------------------------------


def _sigrl_classifier(store, reconstruct_dim: int):
    from vlpl.config import HeadConfig, StudentConfig
    from vlpl.train.model import ClassContext, create_classifier

    cfg = StudentConfig(kind="open_clip", name="vlpl-tiny", pretrained=False, image_size=64, normalization="model",
                        head=HeadConfig(name="sigrl", params={"reconstruct_dim": reconstruct_dim}))
    torch.manual_seed(0)
    return create_classifier(cfg, ClassContext.from_store(store))


def test_step_with_reconstruction_off_is_unchanged_and_on_trains_the_heads_projection(coco256_store):
    """Off: the model is called as before (no aux), the loss's values are those of the loss alone, and the
    head's reconstruction layer gets no gradient. On: same logits and loss terms, plus ``recon`` from the
    store's image embeddings of exactly the batch's positions, and the gradient reaches the head."""
    import copy

    import numpy as np

    from vlpl.store.store import ScoreStore
    from vlpl.train.losses import build_reconstruction
    from vlpl.train.step import StepState, TrainBatch, train_step

    store = ScoreStore(coco256_store)
    train = store.split("train")
    D = store.embedding_dim
    model_off = _sigrl_classifier(store, D)
    model_on = copy.deepcopy(model_off)
    obs = torch.from_numpy(np.array(train.observed))
    loss_off, loss_on = create_loss("em", obs), create_loss("em", obs)
    term = build_reconstruction(model_on, 0.5, D, 64)
    assert term.proj is None and term.feature_dim == D  # the head projects to D: no second projection
    loss_on.set_reconstruction(term)
    asked = []

    def embeddings(pos):
        asked.append(np.asarray(pos).tolist())
        return torch.from_numpy(train.image_embeddings(pos))

    calls = []
    images = torch.rand(4, 3, 64, 64)
    index = torch.tensor([7, 0, 3, 12])
    outs = {}
    for tag, model, loss in (("off", model_off, loss_off), ("on", model_on, loss_on)):
        model.train()
        real_forward = model.forward

        def spy(x, *a, _real=real_forward, _tag=tag, **k):
            calls.append((_tag, k))
            return _real(x, *a, **k)

        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        state = StepState(optimizer=opt, device=torch.device("cpu"), forward=spy,
                          image_embeddings=embeddings if tag == "on" else None)
        loss.set_epoch(1, 1)
        before = model.head.reconstruct.weight.detach().clone()
        outs[tag] = train_step(TrainBatch(images=images, index=index, flip=torch.zeros(4, dtype=torch.bool),
                                          epoch=1, step=0), model, loss, None, state)
        outs[tag + "_moved"] = not torch.equal(model.head.reconstruct.weight.detach(), before)
    assert calls == [("off", {}), ("on", {"with_aux": True})]
    assert asked == [[7, 0, 3, 12]]
    off, on = outs["off"].terms, outs["on"].terms
    assert "recon" not in off and float(on["recon"]) > 0
    for k in off:
        if k != "loss":
            assert torch.equal(on[k], off[k]), k
    assert torch.equal(on["loss"], off["loss"] + on["recon"])
    assert outs["on_moved"] and not outs["off_moved"]


@pytest.mark.parametrize("head", ["sigrl", "linear"])
def test_training_with_the_reconstruction_term_logs_it_and_checkpoints_its_state(head, coco256_store, tmp_path):
    import json

    from safetensors.torch import load_file

    from vlpl.store.store import ScoreStore
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    D = ScoreStore(coco256_store).embedding_dim
    out = tmp_path / head
    extra = [f"student.head.params.reconstruct_dim={D}"] if head == "sigrl" else \
        ["student.kind=timm", "student.name=test_resnet", "student.normalization=imagenet", "student.head=linear"]
    args = [f"store={coco256_store}", f"out={out}", *SIGRL_ARGS, *_loss_args("gpr"), "loss.reconstruction=0.5",
            *extra]
    run_train(load_train_config([], args))
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    assert len(steps) == 2 and all(0 < r["recon"] <= 1.0 and math.isfinite(r["loss"]) for r in steps)
    ck = sorted(p for p in (out / "checkpoints").iterdir() if p.is_dir())[-1]
    loss_state = load_file(ck / "loss.safetensors")
    # the linear head's pooled feature (test_resnet's width) is projected by the loss; sigrl's head projects itself
    assert ("reconstruction.proj.weight" in loss_state) == (head == "linear")
    if head == "linear":
        assert loss_state["reconstruction.proj.weight"].shape[0] == D


def test_reconstruction_config_errors_are_named(coco256_store, tmp_path):
    from vlpl.config import ConfigError
    from vlpl.train.recipes import load_train_config

    with pytest.raises(ConfigError, match=r"loss.reconstruction: expected a weight >= 0 \(0: off\), got -0.5"):
        load_train_config([], [f"store={coco256_store}", f"out={tmp_path}", "loss.reconstruction=-0.5"])
    assert load_train_config([], [f"store={coco256_store}", f"out={tmp_path}"]).loss.reconstruction == 0.0


@pytest.mark.slow
def test_killed_run_with_the_reconstruction_term_resumes_to_the_same_bytes(coco256_store, tmp_path):
    """The term's projection and its optimizer state are checkpointed with the loss: a run killed mid-epoch
    (and inside a checkpoint write) resumes byte-identical to an uninterrupted one (ROLE: the loss's own
    parameter group and the projection's side by side)."""
    from tests.test_train import _train_args, final_state, fork_train

    args = ["method=role", "dataset=coco2014", "epochs=2", "max_steps_per_epoch=4", "early_stop_patience=null",
            "early_stop_drop=null", "checkpoint_every_steps=2", "keep_checkpoints=2", "optim.lr=1e-3",
            "loss.reconstruction=0.5"]
    ref = tmp_path / "ref"
    assert fork_train(_train_args(coco256_store, ref, *args)) == 0
    want = final_state(ref)
    assert all(r["recon"] > 0 for r in want["metrics"] if r["kind"] == "step")
    for kill in ("step:3", "checkpoint:2"):
        run = tmp_path / kill.replace(":", "_")
        assert fork_train(_train_args(coco256_store, run, *args), kill_at=kill) == -9, kill
        assert fork_train(_train_args(coco256_store, run, *args, "resume=true")) == 0, kill
        got = final_state(run)
        assert got == want, (kill, [k for k in want if got.get(k) != want[k]])


def test_reconstruction_feature_is_the_heads_when_it_gives_one(coco256_store):
    """sigrl gives its pooled SVFR output (through its own Linear with reconstruct_dim); linear gives none, so
    the backbone's pooled feature stands in. The probe changes no weight and leaves the mode as it was."""
    from vlpl.config import HeadConfig, StudentConfig
    from vlpl.store.store import ScoreStore
    from vlpl.train.losses import probe_reconstruction_feature
    from vlpl.train.model import ClassContext, create_classifier

    store = ScoreStore(coco256_store)
    sig0 = _sigrl_classifier(store, 0)
    before = {k: v.clone() for k, v in sig0.state_dict().items()}
    assert probe_reconstruction_feature(sig0, 64) == (sig0.num_features, "head") and sig0.training
    assert all(torch.equal(v, before[k]) for k, v in sig0.state_dict().items())
    assert probe_reconstruction_feature(_sigrl_classifier(store, 7), 64) == (7, "head")
    lin = create_classifier(StudentConfig(kind="timm", name="test_resnet", pretrained=False, image_size=64,
                                          head=HeadConfig(name="linear")), ClassContext.from_store(store))
    assert probe_reconstruction_feature(lin.eval(), 64) == (lin.num_features, "pooled") and not lin.training
