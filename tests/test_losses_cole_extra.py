"""IUN, IU, PR (Cole et al. CVPR'21, released ``losses.py``) and VLPL's ``EM_PL_ASL`` (``vlpl_asl``).

Expected values are computed by hand, per entry, with plain Python ``math`` from the formulas in
docs/LOSSES.md, never by calling the implementation.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pytest
import torch

from vlpl.data.observed import single_positive_cole
from vlpl.registry import LOSSES
from vlpl.train.loss_params import loss_params
from vlpl.train.losses import LossBatch, create_loss, loss_defaults

EPS5 = 1e-5


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def lp(p: float, eps: float = EPS5) -> float:
    return -math.log(p + eps)


def ln(p: float, eps: float = EPS5) -> float:
    return -math.log(1.0 - p + eps)


def entropy(p: float, eps: float = EPS5) -> float:
    return p * lp(p, eps) + (1.0 - p) * ln(p, eps)


def make_batch(logits: Sequence[Sequence[float]], index: Sequence[int], observed: torch.Tensor,
               pseudo: Optional[List[List[int]]] = None) -> LossBatch:
    kw = {}
    if "observed" in {f.name for f in dataclasses.fields(LossBatch)}:  # the trainer's per-batch rows
        kw["observed"] = observed[torch.tensor(list(index))].to(torch.int8)
    return LossBatch(logits=torch.tensor(logits, dtype=torch.float32, requires_grad=True),
                     index=torch.tensor(list(index), dtype=torch.long),
                     pseudo=None if pseudo is None else torch.tensor(pseudo, dtype=torch.int8), **kw)


def mean(vals: List[float]) -> float:
    return sum(vals) / len(vals)


# A training set with observed negatives (partial labels): N = 3, C = 4.
OBS = torch.tensor([[1, 0, -1, 0], [0, 1, 1, -1], [-1, -1, 0, 0]], dtype=torch.int8)
S = [[1.5, -0.5, 0.2, -2.0], [0.3, 2.0, -1.0, 0.7], [-0.4, 1.1, 0.0, -3.0]]
IDX = [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# IU: l+ on observed positives, l- on observed negatives, unobserved ignored; mean over B x C
# ------------------------------------------------------------------------------------------------


def _ignore_unobserved(z: torch.Tensor, logits) -> float:
    vals = []
    for n, row in enumerate(logits):
        for c, s in enumerate(row):
            o = int(z[n, c])
            vals.append(lp(sig(s)) if o == 1 else ln(sig(s)) if o == -1 else 0.0)
    return mean(vals)


def test_iu_value_and_terms():
    loss = create_loss("iu", OBS)
    out = loss(make_batch(S, IDX, OBS))
    assert float(out["loss"].detach()) == pytest.approx(_ignore_unobserved(OBS, S), rel=1e-6)
    pos = sum(lp(sig(S[n][c])) for n, c in [(0, 0), (1, 1), (1, 2)]) / 12
    neg = sum(ln(sig(S[n][c])) for n, c in [(0, 2), (1, 3), (2, 0), (2, 1)]) / 12
    assert float(out["obs_pos"]) == pytest.approx(pos, rel=1e-6)
    assert float(out["obs_neg"]) == pytest.approx(neg, rel=1e-6)
    # a worked number: one row z = [1, 0, -1], p = [0.8, 0.3, 0.1] -> (-log 0.80001 - log 0.90001) / 3
    one = torch.tensor([[1, 0, -1]], dtype=torch.int8)
    logits = [[math.log(0.8 / 0.2), math.log(0.3 / 0.7), math.log(0.1 / 0.9)]]
    got = float(create_loss("iu", one)(make_batch(logits, [0], one))["loss"].detach())
    assert got == pytest.approx((-math.log(0.80001) - math.log(0.90001)) / 3, rel=1e-5)
    assert got == pytest.approx(0.109495, abs=1e-5)


def test_iu_refuses_single_positive_labels():
    with pytest.raises(ValueError, match="'iu'.*no -1"):
        create_loss("iu", torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.int8))


# ------------------------------------------------------------------------------------------------
# IUN: the observed positive plus every TRUE negative, from Cole's sampler with num_neg >= C
# ------------------------------------------------------------------------------------------------

TRUE = np.array([[1, 1, 0, 0, 1], [0, 1, 0, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=np.int8)
TS = [[0.5, -1.0, 0.8, -0.3, 2.0], [1.2, -0.7, 0.1, -2.2, 0.4], [-0.6, 0.9, 1.7, -1.4, 0.0],
      [0.2, 0.3, -0.9, 1.1, -0.5]]


def test_iun_is_cole_oracle_on_the_single_positive_plus_all_negatives_observation():
    spml = single_positive_cole(TRUE, seed=1200, num_neg=0)
    iun_obs = single_positive_cole(TRUE, seed=1200, num_neg=TRUE.shape[1])
    # the same single positive as the SPML store, and every true negative observed
    assert ((iun_obs == 1) == (spml == 1)).all()
    assert ((iun_obs == -1) == (TRUE == 0)).all()
    obs = torch.from_numpy(iun_obs)
    loss = create_loss("iun", obs)
    out = loss(make_batch(TS, range(4), obs))

    # Cole's loss_iun, by hand from the TRUE labels: l+ at the observed positive, l- at every true
    # negative, 0 at the unobserved positives
    def per_entry(n: int, c: int) -> float:
        p = sig(TS[n][c])
        if spml[n, c] == 1:
            return lp(p)
        if TRUE[n, c] == 0:
            return ln(p)
        return 0.0

    want = mean([per_entry(n, c) for n in range(4) for c in range(5)])
    assert float(out["loss"].detach()) == pytest.approx(want, rel=1e-6)


def test_iun_unobserved_positives_get_no_gradient():
    obs = torch.from_numpy(single_positive_cole(TRUE, seed=1200, num_neg=5))
    batch = make_batch(TS, range(4), obs)
    create_loss("iun", obs)(batch)["loss"].backward()
    grad = batch.logits.grad
    unobserved_pos = (obs == 0)
    assert unobserved_pos.any()
    assert (grad[unobserved_pos] == 0).all() and (grad[~unobserved_pos] != 0).all()


def test_iun_refuses_a_single_positive_store():
    spml = torch.from_numpy(single_positive_cole(TRUE, seed=1200, num_neg=0))
    with pytest.raises(ValueError, match="num_neg: 5"):
        create_loss("iun", spml)


# ------------------------------------------------------------------------------------------------
# PR: sum over unobserved j of max(0, 1 - p_i + p_j) at each observed positive i
# ------------------------------------------------------------------------------------------------


def _pr_pairs(z: torch.Tensor, logits) -> float:
    """Cole's loss_pr, the double loop with the hinge, plus l- on observed negatives (partial labels)."""
    vals = []
    for n, row in enumerate(logits):
        p = [sig(s) for s in row]
        for i in range(len(row)):
            o = int(z[n, i])
            if o == 1:
                vals.append(sum(max(0.0, 1.0 - p[i] + p[j]) for j in range(len(row)) if int(z[n, j]) == 0))
            elif o == -1:
                vals.append(ln(p[i]))
            else:
                vals.append(0.0)
    return mean(vals)


def test_pr_worked_example():
    # z = [1, 0, 0], p = [0.8, 0.3, 0.1]: (1 - 0.8 + 0.3) + (1 - 0.8 + 0.1) = 0.8, over C = 3 entries
    one = torch.tensor([[1, 0, 0]], dtype=torch.int8)
    logits = [[math.log(0.8 / 0.2), math.log(0.3 / 0.7), math.log(0.1 / 0.9)]]
    out = create_loss("pr", one)(make_batch(logits, [0], one))
    assert float(out["loss"].detach()) == pytest.approx(0.8 / 3, rel=1e-6)
    assert float(out["pairs"]) == pytest.approx(0.8 / 3, rel=1e-6)


def test_pr_value_with_several_positives_negatives_and_a_row_without_positive():
    loss = create_loss("pr", OBS)
    out = loss(make_batch(S, IDX, OBS))
    assert float(out["loss"].detach()) == pytest.approx(_pr_pairs(OBS, S), rel=1e-6)
    # row 1 by hand: positives at 1 and 2, one unobserved j = 0
    p = [sig(v) for v in S[1]]
    row1 = (1 - p[1] + p[0]) + (1 - p[2] + p[0])
    row0 = (1 - sig(S[0][0]) + sig(S[0][1])) + (1 - sig(S[0][0]) + sig(S[0][3]))
    assert float(out["pairs"]) == pytest.approx((row0 + row1) / 12, rel=1e-6)


def test_pr_gradient_is_the_hinge_pairs_gradient():
    batch = make_batch(S, IDX, OBS)
    create_loss("pr", OBS)(batch)["loss"].backward()
    # the pairs' gradient in float64 autograd: hinge on every (positive i, unobserved j) pair
    s = torch.tensor(S, dtype=torch.float64, requires_grad=True)
    p = torch.sigmoid(s)
    total = torch.zeros((), dtype=torch.float64)
    for n in range(3):
        for i in range(4):
            if OBS[n, i] == 1:
                for j in range(4):
                    if OBS[n, j] == 0:
                        total = total + torch.clamp(1 - p[n, i] + p[n, j], min=0)
            elif OBS[n, i] == -1:
                total = total - torch.log(1 - p[n, i] + EPS5)
    (total / 12).backward()
    torch.testing.assert_close(batch.logits.grad.double(), s.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# vlpl_asl: VLPL's EM_PL_ASL
# ------------------------------------------------------------------------------------------------

A_OBS = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 1, -1, 0]], dtype=torch.int8)
A_S = [[0.4, -1.3, 0.9, 2.1, -0.2], [1.6, -2.4, 0.3, 0.5, -0.8]]
A_PSEUDO = [[1, 1, -1, 0, 0], [-1, 0, 1, 1, 1]]  # pseudo on observed entries is ignored


def _asl_entry(z: int, y: int, p: float, gp=2.0, gn=4.0, gu=4.0) -> float:
    if z == 1:
        return (1 - p) ** gp * lp(p)
    if z == -1:
        return ln(p)
    if y == 1:
        return (1 - p) ** gp * lp(p)
    if y == -1:
        return p**gn * ln(p)
    return -((1 - p) ** gu) * entropy(p)


@pytest.mark.parametrize("gammas", [(2.0, 4.0, 4.0), (1.0, 3.0, 0.5)])
def test_vlpl_asl_value(gammas):
    gp, gn, gu = gammas
    loss = create_loss("vlpl_asl", A_OBS, gamma_pos=gp, gamma_neg=gn, gamma_unknown=gu)
    loss.set_epoch(1, 10)
    out = loss(make_batch(A_S, [0, 1], A_OBS, A_PSEUDO))
    want = mean([_asl_entry(int(A_OBS[n, c]), A_PSEUDO[n][c], sig(A_S[n][c]), gp, gn, gu)
                 for n in range(2) for c in range(5)])
    assert float(out["loss"].detach()) == pytest.approx(want, rel=1e-6)
    # each branch on its own (sum / (B C) = / 10)
    p = [[sig(v) for v in row] for row in A_S]
    assert float(out["pseudo_neg"]) == pytest.approx(
        sum(p[n][c] ** gn * ln(p[n][c]) for n, c in [(0, 2), (1, 0)]) / 10, rel=1e-6)
    assert float(out["pseudo_pos"]) == pytest.approx(
        sum((1 - p[n][c]) ** gp * lp(p[n][c]) for n, c in [(0, 1), (1, 4)]) / 10, rel=1e-6)
    assert float(out["obs_neg"]) == pytest.approx(ln(p[1][3]) / 10, rel=1e-6)
    assert float(out["unknown"]) == pytest.approx(
        sum(-((1 - p[n][c]) ** gu) * entropy(p[n][c]) for n, c in [(0, 3), (0, 4), (1, 1)]) / 10, rel=1e-6)


def test_vlpl_asl_focal_weight_carries_gradient():
    # one observed positive: d/ds [(1 - p)^2 (-log(p + eps))] = p(1-p) [-2 (1-p) lp(p) - (1-p)^2 / (p + eps)]
    obs = torch.tensor([[1]], dtype=torch.int8)
    loss = create_loss("vlpl_asl", obs)
    loss.set_epoch(1, 10)
    batch = make_batch([[0.3]], [0], obs, [[0]])
    loss(batch)["loss"].backward()
    p = sig(0.3)
    want = p * (1 - p) * (-2 * (1 - p) * lp(p) - (1 - p) ** 2 / (p + EPS5))
    assert float(batch.logits.grad) == pytest.approx(want, rel=1e-5)


def test_vlpl_asl_warmup_is_plain_em():
    loss = create_loss("vlpl_asl", A_OBS, warmup_epochs=2, alpha=0.2)
    loss.set_epoch(2, 10)
    out = loss(make_batch(A_S, [0, 1], A_OBS, A_PSEUDO))

    def em(n: int, c: int) -> float:
        z, p = int(A_OBS[n, c]), sig(A_S[n][c])
        return lp(p) if z == 1 else ln(p) if z == -1 else -0.2 * entropy(p)

    assert float(out["loss"].detach()) == pytest.approx(mean([em(n, c) for n in range(2) for c in range(5)]), rel=1e-6)
    assert float(out["pseudo_pos"]) == 0.0 and float(out["pseudo_neg"]) == 0.0
    loss.set_epoch(3, 10)  # epoch > warmup_epochs: the ASL form
    out = loss(make_batch(A_S, [0, 1], A_OBS, A_PSEUDO))
    want = mean([_asl_entry(int(A_OBS[n, c]), A_PSEUDO[n][c], sig(A_S[n][c])) for n in range(2) for c in range(5)])
    assert float(out["loss"].detach()) == pytest.approx(want, rel=1e-6)


def test_vlpl_asl_needs_pseudo_labels():
    loss = create_loss("vlpl_asl", A_OBS)
    assert loss.requires_pseudo
    loss.set_epoch(1, 10)
    with pytest.raises(ValueError, match="pseudo"):
        loss(make_batch(A_S, [0, 1], A_OBS))


# ------------------------------------------------------------------------------------------------
# registry and schemas
# ------------------------------------------------------------------------------------------------


def test_registered_with_schemas():
    for name in ("iun", "iu", "pr", "vlpl_asl"):
        assert name in LOSSES.names()
    assert loss_defaults("vlpl_asl") == {"gamma_pos": 2.0, "gamma_neg": 4.0, "gamma_unknown": 4.0,
                                         "warmup_epochs": 0, "alpha": 0.1, "eps": 1e-5}
    assert loss_defaults("pr") == {"eps": 1e-5}
    assert loss_params("vlpl_asl", {"gamma_neg": 3}).gamma_neg == 3.0
    with pytest.raises(ValueError, match="gamma_pos"):
        loss_params("vlpl_asl", {"gamma_pos": -1})


def test_defaults_have_one_home_the_schema():
    import inspect

    for name in ("iun", "iu", "pr", "vlpl_asl"):
        sig_ = inspect.signature(LOSSES.get(name).__init__)
        defaults = {k: p.default for k, p in sig_.parameters.items() if p.default is not p.empty}
        assert defaults == loss_params(name).to_dict() == loss_defaults(name), name
        assert LOSSES.get(name).requires_pseudo == LOSSES.schema(name).requires_pseudo, name


@pytest.mark.parametrize("name, rule", [("pr", "null"), ("vlpl_asl", "vlpl")])
def test_trains_through_the_trainer(name, rule, coco256_store, tmp_path):
    """Two steps of `vlpl train` on the shared coco256 store (single positives): finite losses, a checkpoint."""
    import json

    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny_classifier.yaml")
    out = tmp_path / name
    run_train(load_train_config([tiny], [f"store={coco256_store}", f"out={out}", "progress=false", "log_every=1",
                                         f"loss.name={name}", f"pseudo.rule={rule}", "epochs=1",
                                         "max_steps_per_epoch=2"]))
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)  # vlpl_asl: -H(p) terms, < 0
    if name == "pr":  # single positives: C - 1 partners per row, each 1 - p_i + p_j ~ 1 at p ~ 0.5: (C - 1) / C
        assert all(0.5 < r["pairs"] < 1.5 for r in steps), [r["pairs"] for r in steps]


def test_iu_and_iun_refuse_a_single_positive_store_in_the_trainer(coco256_store, tmp_path):
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny_classifier.yaml")
    for name in ("iu", "iun"):
        cfg = load_train_config([tiny], [f"store={coco256_store}", f"out={tmp_path / name}", "progress=false",
                                         f"loss.name={name}", "pseudo.rule=null", "epochs=1", "max_steps_per_epoch=1"])
        with pytest.raises(ValueError, match=f"'{name}'.*no -1"):
            run_train(cfg)


@pytest.mark.slow
def test_iun_end_to_end_on_a_store_with_every_negative_observed(coco256_root, tmp_path):
    """The recipe's way (configs/methods/iun.yaml): Cole's sampler with num_neg >= C keeps the single-positive
    store's positive and observes every true negative; `vlpl train loss=iun` trains on it."""
    import json

    from tests.conftest import TINY_TEACHER, make_subset_dataset
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel
    from vlpl.store.store import ScoreStore
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    data = make_subset_dataset(coco256_root, tmp_path / "data", n_train=48, n_test=16)
    stores = {}
    for name, num_neg in (("spml", 0), ("iun", 1000)):
        stores[name] = tmp_path / name
        run_pseudolabel(load_config(PseudolabelConfig, [str(TINY_TEACHER)], [
            f"data.root={data}", f"out={stores[name]}", "num_workers=0", "progress=false", "views.grid=0",
            f"data.observed.num_neg={num_neg}"]))
    spml, iun = (ScoreStore(stores[k]).split("train") for k in ("spml", "iun"))
    assert ((iun.observed == 1) == (spml.observed == 1)).all()  # the same single positive
    truth_neg = iun.labels != 1
    assert ((iun.observed == -1) == truth_neg).all()  # every true negative observed, nothing else
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny_classifier.yaml")
    out = tmp_path / "run"
    run_train(load_train_config([tiny], [f"store={stores['iun']}", f"out={out}", "progress=false", "log_every=1",
                                         "loss.name=iun", "pseudo.rule=null", "epochs=1", "max_steps_per_epoch=2",
                                         "batch_size=8"]))
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert len(steps) == 2 and all(r["obs_neg"] > 0 and math.isfinite(r["loss"]) for r in steps)
