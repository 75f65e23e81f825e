"""SATL, our formulation (Decision 6): the class threshold is the Bayes boundary of the running score Gaussians and
follows the distributions when they change; posterior pseudo-labels; the ranking loss's value and gradient signs;
SPML anchors from a rule; `vlpl train method=satl` on partial coco256 stores (p = 0.5, real annotations) and in SPML,
with kill + resume byte-identical (the class statistics)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.satl_worker import POPULATION, synthetic, two_process_worker
from tests.test_train import TINY_NET, _train_args, final_state, fork_train
from vlpl.train.loop import run_train
from vlpl.train.losses import LossBatch, create_loss
from vlpl.train.losses.satl import ranking_loss
from vlpl.train.recipes import load_train_config


def _log_odds(x, mp, vp, mn, vn, pi):
    """log pi N(x; mp, vp) - log (1 - pi) N(x; mn, vn), written out from the Gaussian densities."""
    lp = math.log(pi) - 0.5 * math.log(2 * math.pi * vp) - (x - mp) ** 2 / (2 * vp)
    ln = math.log(1 - pi) - 0.5 * math.log(2 * math.pi * vn) - (x - mn) ** 2 / (2 * vn)
    return lp - ln


def _bisect_boundary(mp, vp, mn, vn, pi):
    """The root of the log-odds between the means by bisection (independent of the loss's closed form)."""
    lo, hi = mn, mp
    f_lo = _log_odds(lo, mp, vp, mn, vn, pi)
    assert f_lo < 0 < _log_odds(hi, mp, vp, mn, vn, pi)
    for _ in range(200):
        mid = (lo + hi) / 2
        if (_log_odds(mid, mp, vp, mn, vn, pi) < 0) == (f_lo < 0):
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _epoch(loss, z: np.ndarray, s: np.ndarray, batch: int = 1000) -> None:
    for k in range(0, len(z), batch):
        idx = torch.arange(k, min(k + batch, len(z)))
        loss(LossBatch(logits=torch.from_numpy(s[idx.numpy()]), index=idx,
                       observed=torch.from_numpy(z[idx.numpy()])))


def _sample_stats(z: np.ndarray, s: np.ndarray, c: int):
    pos, neg = s[z[:, c] == 1, c].astype(np.float64), s[z[:, c] == -1, c].astype(np.float64)
    return pos.mean(), pos.var(), neg.mean(), neg.var(), len(pos) / (len(pos) + len(neg))


def test_threshold_is_the_bayes_boundary_and_follows_changed_distributions():
    rng = np.random.default_rng(0)
    z, s = synthetic(4000, rng)
    loss = create_loss("satl", torch.from_numpy(z), lambda_rank=0.0)  # the statistics alone (no pair matrix)
    loss.set_epoch(1, 50)
    assert torch.isnan(loss.thresholds()).all()  # no statistics yet: no threshold, no pseudo-label
    _epoch(loss, z, s)
    loss.set_epoch(2, 50)  # folds epoch 1
    tau = loss.thresholds()
    first = [_sample_stats(z, s, c) for c in range(2)]
    for c in range(2):
        mp, vp, mn, vn, pi = first[c]
        assert float(loss.mean_pos[c]) == pytest.approx(mp, rel=1e-9) and float(loss.var_neg[c]) == pytest.approx(vn, rel=1e-9)
        assert float(tau[c]) == pytest.approx(_bisect_boundary(mp, vp, mn, vn, pi), abs=1e-9)
        # and, the sample being large, near the boundary of the population Gaussians
        pi0, mp0, vp0, mn0, vn0 = POPULATION[c]
        assert float(tau[c]) == pytest.approx(_bisect_boundary(mp0, vp0, mn0, vn0, pi0), abs=0.1)
    # the distributions move up by 2: the EMA (momentum 0.9 per epoch) moves the statistics and the threshold toward
    # the new boundary, by exactly one EMA step per epoch
    z2, s2 = synthetic(4000, np.random.default_rng(1), shift=2.0)
    _epoch(loss, z2, s2)
    loss.set_epoch(3, 50)
    second = [_sample_stats(z2, s2, c) for c in range(2)]
    tau2 = loss.thresholds()
    for c in range(2):
        mixed = [0.9 * a + 0.1 * b for a, b in zip(first[c], second[c])]
        assert float(loss.mean_pos[c]) == pytest.approx(mixed[0], rel=1e-9)
        assert float(tau2[c]) == pytest.approx(_bisect_boundary(*mixed), abs=1e-9)
        new = _bisect_boundary(*second[c])
        assert float(tau[c]) < float(tau2[c]) < new
    for e in range(4, 60):
        _epoch(loss, z2, s2)
        loss.set_epoch(e, 60)
    final = loss.thresholds()
    for c in range(2):
        assert float(final[c]) == pytest.approx(_bisect_boundary(*second[c]), abs=0.01)


def test_unknown_entries_become_pseudo_labels_by_their_posterior_and_resume_does_not_fold_twice():
    rng = np.random.default_rng(0)
    z, s = synthetic(4000, rng)
    loss = create_loss("satl", torch.from_numpy(z), gamma=0.95)
    loss.set_epoch(1, 3)
    _epoch(loss, z, s)
    loss.set_epoch(2, 3)
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.set_epoch(2, 3)  # a run resumed inside epoch 2 enters it again: nothing is folded twice
    assert all(torch.equal(state[k], v) for k, v in loss.state_dict().items())
    mp, vp, mn, vn, pi = (float(getattr(loss, n)[0]) for n in ("mean_pos", "var_pos", "mean_neg", "var_neg", "rate_pos"))
    xs = [mp + 3.0, mp, 0.5 * (mp + mn), mn, mn - 3.0, float(loss.thresholds()[0])]
    want = []
    for x in xs:
        post = 1 / (1 + math.exp(-_log_odds(min(max(x, mn), mp), mp, vp, mn, vn, pi)))
        want.append(1 if post >= 0.95 else -1 if 1 - post >= 0.95 else 0)
    assert want[0] == 1 and want[-2] == -1 and want[-1] == 0  # beyond the mean: clamped, still confident
    logits = torch.tensor([[x, 0.0] for x in xs])
    z_unknown = torch.zeros(len(xs), 2, dtype=torch.int8)
    loss.eval()
    out = loss(LossBatch(logits=logits, index=torch.arange(len(xs)), observed=z_unknown))
    assert float(out["num_pseudo_pos"]) == want.count(1) and float(out["num_pseudo_neg"]) == want.count(-1)
    p = torch.sigmoid(logits[:, 0]).double()
    l_pos = sum(-math.log(float(p[i]) + 1e-5) for i, w in enumerate(want) if w == 1) / logits.numel()
    assert float(out["pseudo_pos"]) == pytest.approx(l_pos, rel=1e-5)


def test_ranking_loss_value_and_gradient_raise_the_positive_and_lower_the_negative():
    s = torch.tensor([[2.0, 0.0], [0.5, 1.0], [-1.0, 3.0]], requires_grad=True)
    positive = torch.tensor([[True, False], [False, True], [False, False]])
    negative = torch.tensor([[False, True], [True, False], [True, False]])
    loss, pairs = ranking_loss(s, positive, negative, margin=1.0)
    # class 0: (0 vs 1) diff 1.5, (0 vs 2) diff 3; class 1: (1 vs 0) diff 1
    sp = [math.log1p(math.exp(1 - d)) for d in (1.5, 3.0, 1.0)]
    assert int(pairs) == 3 and float(loss.detach()) == pytest.approx(sum(sp) / 3, rel=1e-6)
    loss.backward()
    g = s.grad
    assert g[0, 0] < 0 and g[1, 1] < 0  # descent raises the positives' logits
    assert g[1, 0] > 0 and g[2, 0] > 0 and g[0, 1] > 0  # and lowers the negatives'
    sig = lambda d: 1 / (1 + math.exp(d - 1))  # noqa: E731 - d/d(diff) softplus(1 - diff) = -sigmoid(1 - diff)
    assert float(g[0, 0]) == pytest.approx(-(sig(1.5) + sig(3.0)) / 3, rel=1e-5)
    assert float(g[2, 0]) == pytest.approx(sig(3.0) / 3, rel=1e-5)
    assert float(g[2, 1]) == 0.0  # neither positive nor negative in class 1
    none, n0 = ranking_loss(s, torch.zeros_like(positive), negative, margin=1.0)
    assert int(n0) == 0 and float(none.detach()) == 0.0


def test_spml_rule_negatives_are_known_negatives():
    """SPML: one positive per image, no negative; the rule's -1 on unknown entries count as known negatives for the
    statistics (and the loss); its +1 only with rule_labels=both."""
    z = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.int8)
    pseudo = torch.tensor([[0, -1], [0, -1], [-1, 1], [-1, 0]], dtype=torch.int8)
    s = torch.tensor([[2.0, -1.0], [3.0, -2.0], [-1.0, 2.5], [-2.0, 1.0]])
    loss = create_loss("satl", z)
    loss.set_epoch(1, 2)
    loss(LossBatch(logits=s, index=torch.arange(4), pseudo=pseudo))
    sums = loss.epoch_sums
    assert sums[:, 0].tolist() == [2, 2] and sums[:, 3].tolist() == [2, 2]  # n+ and n- per class
    assert sums[0, 4].item() == -3.0 and sums[1, 4].item() == -3.0  # the rule's negatives' scores
    loss.set_epoch(2, 2)
    assert loss.ready.all() and loss.valid().all()
    both = create_loss("satl", z, rule_labels="both")
    both.set_epoch(1, 2)
    both(LossBatch(logits=s, index=torch.arange(4), pseudo=pseudo))
    assert both.epoch_sums[1, 0].item() == 2  # (2, 1) is observed, the rule's +1 there changes nothing


# ---- vlpl train method=satl ---------------------------------------------------------------------------------

QUICK = ["epochs=2", "max_steps_per_epoch=3", "batch_size=16", "optim.lr=1e-3"]


def _records(run: Path) -> list:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_satl_trains_on_a_partial_store(coco256_partial_store, tmp_path):
    """p = 0.5: epoch 1 collects the class statistics from the known labels; epoch 2 has thresholds for the classes
    with enough known labels, pseudo-labels from them, and ranking pairs."""
    out = tmp_path / "satl"
    run_train(load_train_config([TINY_NET], _train_args(coco256_partial_store, out, "method=satl", "dataset=coco2014",
                                                        *QUICK)))
    steps = [r for r in _records(out) if r["kind"] == "step"]
    assert all(r["classes_ready"] == 0 and r["num_pseudo_pos"] + r["num_pseudo_neg"] == 0
               for r in steps if r["epoch"] == 1)
    second = [r for r in steps if r["epoch"] == 2]
    assert second and all(r["classes_ready"] > 0 for r in second)
    assert sum(r["num_pseudo_neg"] + r["num_pseudo_pos"] for r in second) > 0
    assert all(r["num_pairs"] > 0 and np.isfinite(r["loss"]) for r in steps)
    assert json.loads((out / "summary.json").read_text())["loss"] == "satl"


def test_satl_trains_in_spml_with_the_teachers_negatives(coco256_store, tmp_path):
    """SPML (one positive per image): DAMP's bottom-ranked classes as -1 are the known negatives."""
    out = tmp_path / "satl_spml"
    run_train(load_train_config([TINY_NET], _train_args(coco256_store, out, "method=satl", "dataset=coco2014_spml",
                                                        *QUICK)))
    second = [r for r in _records(out) if r["kind"] == "step" and r["epoch"] == 2]
    assert second and all(r["classes_ready"] > 0 and r["pseudo_neg_per_image"] > 0 for r in second)


def test_satl_trains_on_real_partial_annotations(coco256_real_partial_store, tmp_path):
    out = tmp_path / "satl_real"
    run_train(load_train_config([TINY_NET], _train_args(coco256_real_partial_store, out, "method=satl",
                                                        "dataset=coco2014", *QUICK)))
    epochs = [r for r in _records(out) if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(r["select"] == "masked_map_observed" for r in epochs)
    assert all(r["classes_ready"] > 0 for r in _records(out) if r["kind"] == "step" and r["epoch"] == 2)


@pytest.mark.slow
def test_satl_resumes_byte_identical_after_kills(coco256_partial_store, tmp_path):
    """Killed mid-epoch 2 and between epoch 1's record and its checkpoint: the resumed run has the class
    statistics (and everything else) of an uninterrupted one."""
    args = ["method=satl", "dataset=coco2014", "epochs=2", "max_steps_per_epoch=3", "checkpoint_every_steps=2",
            "keep_checkpoints=2", "optim.lr=1e-3"]
    ref = tmp_path / "ref"
    assert fork_train(_train_args(coco256_partial_store, ref, *args)) == 0
    want = final_state(ref)
    assert any(r.get("classes_ready", 0) > 0 for r in want["metrics"] if r["kind"] == "step")
    for kill in ("step:5", "epoch_end:1"):
        run = tmp_path / kill.replace(":", "_")
        assert fork_train(_train_args(coco256_partial_store, run, *args), kill_at=kill) == -9, kill
        assert fork_train(_train_args(coco256_partial_store, run, *args, "resume=true")) == 0, kill
        got = final_state(run)
        assert got == want, (kill, [k for k in want if got.get(k) != want[k]])


@pytest.mark.slow
def test_two_processes_sum_the_statistics_of_the_global_batch(tmp_path):
    """Under data parallelism every process folds the statistics of the whole global batch (identical everywhere):
    2 gloo processes with 20 rows each hold the sums of a 1-process loss over all 40 rows."""
    import multiprocessing as mp
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=two_process_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    z, s = synthetic(40, np.random.default_rng(3))
    one = create_loss("satl", torch.from_numpy(z))
    one.set_epoch(1, 2)
    one(LossBatch(logits=torch.from_numpy(s), index=torch.arange(40), observed=torch.from_numpy(z)))
    for r in range(2):
        got = torch.load(tmp_path / f"sums{r}.pt")
        assert torch.allclose(got, one.epoch_sums, rtol=1e-12, atol=1e-9), (r, got, one.epoch_sums)
