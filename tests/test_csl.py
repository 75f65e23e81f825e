"""CSL (ALGORITHMS.md §9): the selective rules on hand examples, P-ASL's value and gradient by hand, the class
prior (accumulator, files, CLIP), the model EMA, and `vlpl train method=csl` on partial coco256 stores (p = 0.5,
real annotations), with kill + resume byte-identical (the temporary prior model, the EMA)."""
from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_train import TINY_NET, _train_args, final_state, fork_train
from vlpl.config import ConfigError
from vlpl.train.loop import run_train
from vlpl.train.losses import LossBatch, create_loss
from vlpl.train.losses.csl import PRIOR_FILE, PRIOR_INFO, read_prior_csv, selective_weights, write_prior_csv
from vlpl.train.recipes import load_train_config

# vlpl coding (ALGORITHMS.md §1): +1 annotated positive, -1 annotated negative, 0 un-annotated
Z = torch.tensor([[1, 0, 0, -1],
                  [0, 0, -1, 0]], dtype=torch.int8)
P_HAND = torch.tensor([[0.9, 0.8, 0.3, 0.1],
                       [0.7, 0.2, 0.1, 0.6]], dtype=torch.float64)


def _batch(p: torch.Tensor, rows=None) -> LossBatch:
    s = torch.logit(p.double()).float().requires_grad_()
    idx = torch.arange(p.shape[0]) if rows is None else torch.as_tensor(rows)
    return LossBatch(logits=s, index=idx)


# ---- the selective rule (§9b) -------------------------------------------------------------------------------


def test_selection_prior_rule_and_likelihood_rule_on_a_hand_example():
    """Prior rule: class 1 (prior 0.6 > 0.5) loses its un-annotated entries; likelihood rule, K = 1, B = 2: the
    K B = 2 un-annotated entries with the smallest 1 - p are ignored, among ALL un-annotated entries (an entry the
    prior rule already ignored uses up the budget, as released). By hand, the un-annotated entries sorted by
    1 - p: (0,1) 0.2, (1,0) 0.3, (1,3) 0.4, (0,2) 0.7, (1,1) 0.8 -> (0,1) and (1,0) ignored; (1,3) is kept."""
    unann, ann = Z == 0, Z != 0
    prior = torch.tensor([0.1, 0.6, 0.2, 0.05])
    w = selective_weights(unann, ann, 1 - P_HAND, "selective", 1, prior, 0.5)
    assert w.tolist() == [[1, 0, 1, 1], [0, 0, 1, 1]]
    # no prior rule: the likelihood rule alone ignores (0,1) and (1,0)
    w = selective_weights(unann, ann, 1 - P_HAND, "selective", 1, None, 0.5)
    assert w.tolist() == [[1, 0, 1, 1], [0, 1, 1, 1]]
    # K = 2: four entries (0,1), (1,0), (1,3), (0,2); the prior rule adds (1,1); annotated entries always kept
    w = selective_weights(unann, ann, 1 - P_HAND, "selective", 2, prior, 0.5)
    assert w.tolist() == [[1, 0, 0, 1], [0, 0, 1, 0]]
    # prior_threshold 0 means no prior rule (the released `if args.prior_threshold`)
    assert selective_weights(unann, ann, 1 - P_HAND, "selective", 0, prior, 0.0).tolist() == [[1] * 4] * 2
    # the modes
    assert selective_weights(unann, ann, 1 - P_HAND, "negative", 1).tolist() == [[1] * 4] * 2
    assert selective_weights(unann, ann, 1 - P_HAND, "ignore", 1).tolist() == [[1, 0, 0, 1], [0, 0, 1, 0]]
    # ties keep the flattened order: equal 1 - p everywhere, K B = 2 -> the first two un-annotated entries
    w = selective_weights(unann, ann, torch.full((2, 4), 0.5, dtype=torch.float64), "selective", 1)
    assert w.tolist() == [[1, 0, 0, 1], [1, 1, 1, 1]]


def test_the_loss_applies_the_selection_and_refuses_a_missing_prior():
    loss = create_loss("csl", Z, likelihood_topk=1, prior_threshold=0.5)  # prior=model, not computed yet
    with pytest.raises(RuntimeError, match="no class prior is set"):
        loss(_batch(P_HAND))
    loss.set_prior([0.1, 0.6, 0.2, 0.05])
    out = loss(_batch(P_HAND))
    assert float(out["num_ignored"]) == 3  # (0,1), (1,0) by the rules and (1,1) by the prior rule
    with pytest.raises(ConfigError, match="prior_file"):
        create_loss("csl", Z, prior="file")
    with pytest.raises(ConfigError, match="mode"):
        create_loss("csl", Z, mode="selectiv")
    with pytest.raises(ValueError, match="4 classes"):
        loss.set_prior([0.1, 0.2])


# ---- P-ASL (§9c) --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_pasl_value_and_gradient_are_the_hand_computed_ones(clip):
    """One image, three classes: annotated positive, annotated negative, un-annotated (mode negative: W = 1).

    By hand, with p = sigmoid(s), p_m = min(1 - p + m, 1) and the focusing factors held constant:
      positive:   L = -(1 - p)^g+ log p            dL/ds = -(1 - p)^g+ (1 - p)
      negative:   L = -(1 - p_m)^g- log p_m        dL/ds =  (1 - p_m)^g- p (1 - p) / p_m   (0 where p_m = 1)
      un-annot.:  the same with g_u and alpha_u."""
    gp, gn, gu, au = 1.0, 2.0, 3.0, 0.5
    s = torch.tensor([[0.5, 1.0, -0.3]], requires_grad=True)
    loss = create_loss("csl", torch.tensor([[1, -1, 0]]), mode="negative", gamma_pos=gp, gamma_neg=gn,
                       gamma_unann=gu, alpha_unann=au, clip=clip, prior="none", ema_decay=0.0)
    out = loss(LossBatch(logits=s, index=torch.tensor([0])))
    out["loss"].backward()
    p = [1 / (1 + math.exp(-v)) for v in (0.5, 1.0, -0.3)]
    pm = [min(1 - q + clip, 1.0) for q in p]
    want = [-(1 - p[0]) ** gp * math.log(p[0]),
            -(1 - pm[1]) ** gn * math.log(pm[1]),
            -au * (1 - pm[2]) ** gu * math.log(pm[2])]
    grad = [-(1 - p[0]) ** gp * (1 - p[0]),
            (1 - pm[1]) ** gn * p[1] * (1 - p[1]) / pm[1] if pm[1] < 1 else 0.0,
            au * (1 - pm[2]) ** gu * p[2] * (1 - p[2]) / pm[2] if pm[2] < 1 else 0.0]
    assert float(out["loss"].detach()) == pytest.approx(sum(want), rel=1e-5)
    assert [float(out[k]) for k in ("obs_pos", "obs_neg", "unannotated")] == pytest.approx(want, rel=1e-5)
    assert s.grad[0].tolist() == pytest.approx(grad, rel=1e-5, abs=1e-8)
    # a numeric spot check of the first value: p = 0.6225, (1 - p) log p
    assert want[0] == pytest.approx(0.3775407 * 0.4740770, rel=1e-5)


def test_pasl_sums_over_the_batch_and_the_clip_saturates():
    """Sum reduction (as released), and an entry with 1 - p + m >= 1 contributes nothing (log 1 = 0, clamped)."""
    z = torch.tensor([[-1, 0], [-1, 0]])
    s = torch.tensor([[-20.0, -20.0], [0.0, 0.0]], requires_grad=True)
    loss = create_loss("csl", z, mode="negative", gamma_neg=0, gamma_unann=0, clip=0.05, prior="none", ema_decay=0.0)
    out = loss(LossBatch(logits=s, index=torch.tensor([0, 1])))
    out["loss"].backward()
    assert float(out["loss"].detach()) == pytest.approx(-2 * math.log(0.55), rel=1e-6)
    assert s.grad[0].tolist() == [0.0, 0.0]
    assert s.grad[1].tolist() == pytest.approx([0.25 / 0.55] * 2, rel=1e-5)


# ---- the class prior and the EMA ----------------------------------------------------------------------------


def test_prior_accumulator_averages_every_training_batch_and_prior_files_round_trip(tmp_path):
    loss = create_loss("csl", torch.zeros(4, 3, dtype=torch.int8), mode="ignore", prior="none", ema_decay=0.0)
    p1 = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.5, 0.7]])
    p2 = torch.tensor([[0.2, 0.2, 0.2]])
    loss(_batch(p1, [0, 1]))
    loss(_batch(p2, [2]))
    loss.eval()
    loss(_batch(torch.full((1, 3), 0.99), [3]))  # not a training batch: not counted
    assert loss.prior_estimate().tolist() == pytest.approx([0.2, 0.4, 0.6], abs=1e-6)
    # the released file format: header, class name, prior; matched by name
    f = tmp_path / "prior.csv"
    f.write_text("Classes,avg_pred\nperson,0.542\nchair,0.241\ncar,0.209\n")
    assert read_prior_csv(f, classes=["car", "person", "chair"]).tolist() == [0.209, 0.542, 0.241]
    with pytest.raises(ValueError, match=r"no prior for 1 .*'dog'"):
        read_prior_csv(f, classes=["person", "dog"])
    with pytest.raises(ValueError, match="3 rows, expected one per class \\(4\\)"):
        read_prior_csv(f, num_classes=4)
    (tmp_path / "bad.csv").write_text("c,p\nperson,1.5\n")
    with pytest.raises(ValueError, match="line 2: the prior 1.5 is not in"):
        read_prior_csv(tmp_path / "bad.csv")
    out = tmp_path / "out.csv"
    write_prior_csv(out, ["a, b", "c"], [0.25, 1 / 3])
    assert read_prior_csv(out, classes=["c", "a, b"]).tolist() == [1 / 3, 0.25]
    built = create_loss("csl", torch.zeros(2, 2), prior="file", prior_file=str(out), ema_decay=0.0)
    assert built.has_prior and built.prior.tolist() == pytest.approx([0.25, 1 / 3])


def test_model_ema_is_the_released_update_and_lives_in_the_loss_state():
    """ema <- d ema + (1 - d) model after each step (ModelEma.update, d = 0.9997 by default), kept in the loss's
    state_dict so that a checkpoint restores it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    loss = create_loss("csl", torch.zeros(2, 2), prior="none", ema_decay=0.9)
    loss.bind_model(model)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
    loss.after_step(model)
    ema = loss.eval_models()["ema"]
    assert torch.allclose(ema[0].weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert torch.allclose(ema[1].running_mean, torch.full((2,), 0.2))
    assert not any(p.requires_grad for p in ema.parameters())
    state = loss.state_dict()
    assert "ema.module.0.weight" in state and "prior" in state and "pred_sum" in state
    again = create_loss("csl", torch.zeros(2, 2), prior="none", ema_decay=0.9)
    again.bind_model(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
    again.load_state_dict(state)
    assert torch.equal(again.eval_models()["ema"][0].weight, ema[0].weight)
    loss.train()
    assert not ema.training  # an EMA is only evaluated
    assert create_loss("csl", torch.zeros(2, 2), prior="none", ema_decay=0.0).eval_models() == {}


# ---- vlpl train method=csl ----------------------------------------------------------------------------------

QUICK = ["epochs=1", "max_steps_per_epoch=2", "batch_size=16", "optim.lr=1e-3", "loss.params.prior_epochs=1"]


def _epochs(run: Path) -> list:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]


def test_csl_trains_on_a_partial_store_with_the_clip_prior(coco256_partial_store, tmp_path):
    """p = 0.5 (MLR-PL keep ratio), the RPS-0.5 row, prior from the cached zero-shot scores (Decision 7): the
    prior file is the class frequency of (annotated label, else the vlpl rule's pseudo-positive), written and
    recorded; validation scores the model and its EMA."""
    from vlpl.pseudolabel.rules import apply_rule
    from vlpl.store.store import ScoreStore

    out = tmp_path / "csl_clip"
    cfg = load_train_config([TINY_NET], _train_args(coco256_partial_store, out, "method=csl", "dataset=coco2014_rps05",
                                                    "loss.params.prior=clip", *QUICK))
    run_train(cfg)
    train = ScoreStore(coco256_partial_store).split("train")
    obs = torch.from_numpy(train.observed)
    assert bool((obs == -1).any()) and bool((obs == 1).any()) and bool((obs == 0).any())  # partial labels
    pseudo = apply_rule("vlpl", torch.from_numpy(train.scores(np.arange(len(train)))), obs, dynamic=False)
    want = ((obs == 1) | ((obs == 0) & (pseudo == 1))).double().mean(0).numpy()
    got = read_prior_csv(out / PRIOR_FILE, classes=list(ScoreStore(coco256_partial_store).classes))
    assert got == pytest.approx(want)
    info = json.loads((out / PRIOR_INFO).read_text())
    assert info["source"] == {"prior": "clip", "classes": 80, "rule": "vlpl"}
    saved = (out / "config.yaml").read_text()
    assert str(out / PRIOR_FILE) in saved  # the run records the prior it used
    (rec,) = _epochs(out)
    assert {"val_map_model", "val_map_ema"} <= set(rec) and rec["val_map"] == max(rec["val_map_model"],
                                                                                     rec["val_map_ema"])
    assert (out / "best" / "model.safetensors").exists()


@pytest.mark.slow
def test_csl_with_the_temporary_model_prior_resumes_byte_identical_after_kills(coco256_partial_store, tmp_path):
    """The faithful recipe (prior from a temporary Ignore-mode model trained first in <out>/prior_model) killed
    inside the temporary model's training and inside the main run; each resumed run ends byte-identical to an
    uninterrupted one: the prior file, the main run's weights, loss state (EMA model, prior, accumulator),
    optimizer, best/, predictions and logged metrics."""
    args = ["method=csl", "dataset=coco2014_fpc1000", "epochs=2", "max_steps_per_epoch=3", "loss.params.prior_epochs=1",
            "checkpoint_every_steps=2", "keep_checkpoints=2", "optim.lr=1e-3", "loss.params.ema_decay=0.5"]
    ref = tmp_path / "ref"
    assert fork_train(_train_args(coco256_partial_store, ref, *args)) == 0
    want = final_state(ref)
    want_prior = (ref / PRIOR_FILE).read_bytes()
    assert (ref / "prior_model" / "checkpoints").is_dir() and len(_epochs(ref / "prior_model")) == 1
    recs = _epochs(ref)
    assert len(recs) == 2 and all("val_map_ema" in r for r in recs)
    # steps 1-3: the temporary model; 4-9: the main run (kill at 8: main step 5, resumed from its step-3 checkpoint)
    for kill in ("step:2", "step:8"):
        run = tmp_path / kill.replace(":", "_")
        assert fork_train(_train_args(coco256_partial_store, run, *args), kill_at=kill) == -9, kill
        if kill == "step:2":
            assert not (run / PRIOR_FILE).exists()
        assert fork_train(_train_args(coco256_partial_store, run, *args, "resume=true")) == 0, kill
        assert (run / PRIOR_FILE).read_bytes() == want_prior, kill
        got = final_state(run)
        assert got == want, (kill, [k for k in want if got.get(k) != want[k]])


def test_csl_trains_on_real_partial_annotations(coco256_real_partial_store, tmp_path):
    """A labels file with explicit positives and negatives (observed mode given): CSL trains, and the epoch's val
    score is the masked mAP on the observed labels (no full labels anywhere)."""
    out = tmp_path / "csl_real"
    cfg = load_train_config([TINY_NET], _train_args(coco256_real_partial_store, out, "method=csl",
                                                    "dataset=coco2014_fpc1000", "loss.params.prior=clip", *QUICK))
    run_train(cfg)
    (rec,) = _epochs(out)
    assert rec["select"] == "masked_map_observed" and 0 <= rec["val_map"] <= 100 and "val_map_ema" in rec
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == "csl" and summary["best_epoch"] == 1


@pytest.mark.slow
def test_two_processes_rank_the_global_batch_and_accumulate_the_global_prior(coco256_partial_store, tmp_path):
    """torchrun with 2 processes: one process writes the run's files (the CLIP prior is computed by each before any
    process group exists, identical), the prior accumulator counts the global batch, and the likelihood rule ignores
    K x B entries of the GLOBAL batch per step (the logged count is summed over the processes)."""
    from safetensors.torch import load_file

    from tests.test_train import _cli_train, _epoch_checkpoint, _torchrun
    from vlpl.store.store import ScoreStore
    from vlpl.train.losses.csl import clip_prior

    two = tmp_path / "two"
    args = ["method=csl", "dataset=coco2014_rps05", "loss.params.prior=clip", "epochs=1", "max_steps_per_epoch=3",
            "batch_size=16"]
    with socket.socket() as sock:  # a free port (a fixed one may still be held by an earlier run)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = _torchrun(port, _cli_train(coco256_partial_store, two, *args))
    assert r.returncode == 0, "\n".join(x for x in r.stderr.splitlines() if "rror" in x)[-3000:]
    store = ScoreStore(coco256_partial_store)
    want = clip_prior(store.split("train"), "vlpl")
    assert read_prior_csv(two / PRIOR_FILE, classes=list(store.classes)) == pytest.approx(want)
    state = load_file(_epoch_checkpoint(two, 1) / "loss.safetensors")
    assert float(state["pred_count"]) == 3 * 16  # the global batch of every step, on the main process
    assert any(k.startswith("ema.module.") for k in state)
    steps = [r for r in map(json.loads, (two / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]  # written once, by the main process
    # no class prior above 0.5 on this store: exactly K x B = 5 x 16 un-annotated entries ignored per global batch
    assert float(want.max()) < 0.5 and all(r["num_ignored"] == 5 * 16 for r in steps)


def test_prior_file_without_prior_file_mode_is_a_config_error(coco256_partial_store, tmp_path):
    from vlpl.train.losses.csl import prepare_csl_prior

    f = tmp_path / "p.csv"
    write_prior_csv(f, ["a"], [0.5])
    cfg = load_train_config([TINY_NET], _train_args(coco256_partial_store, tmp_path / "run", "method=csl",
                                                    "dataset=coco2014_rps05", f"loss.params.prior_file={f}"))
    with pytest.raises(ConfigError, match="prior_file: a prior file goes with loss.params.prior=file"):
        prepare_csl_prior(cfg)
    assert not (tmp_path / "run").exists()  # nothing written
    bad = load_train_config([TINY_NET], _train_args(coco256_partial_store, tmp_path / "run", "method=csl",
                                                    "dataset=coco2014_rps05", "loss.params.prior=file",
                                                    f"loss.params.prior_file={f}"))
    with pytest.raises(ConfigError, match="no prior for 80 of the store's classes"):
        prepare_csl_prior(bad)
