"""Per-class threshold calibration: the Bayes boundary by hand, recovery on synthetic two-Gaussian classes, the
thresholds file round trip (CLI), the rules that use it, and a file for other classes refused."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vlpl.pseudolabel.calibrate import (
    bayes_boundary,
    calibrate_store,
    fit_values,
    load_thresholds,
    write_thresholds,
)
from vlpl.pseudolabel.rules import RuleRows, apply_rule, damp_scores


def test_bayes_boundary_closed_forms():
    # equal variances: t = (m0 + m1) / 2 + s^2 log(w0 / w1) / (m1 - m0)
    t = bayes_boundary(0.8, 0.0, 0.5, 0.2, 2.0, 0.5)
    assert t == pytest.approx(1.0 + 0.25 * math.log(4.0) / 2.0, abs=1e-12)
    # unequal variances: the density ratio is 1 at the root, and the root lies between the means
    w0, m0, s0, w1, m1, s1 = 0.9, 0.2, 0.03, 0.1, 0.3, 0.02
    t = bayes_boundary(w0, m0, s0, w1, m1, s1)
    pdf = lambda x, m, s: math.exp(-0.5 * ((x - m) / s) ** 2) / s  # noqa: E731
    assert m0 < t < m1 and w1 * pdf(t, m1, s1) == pytest.approx(w0 * pdf(t, m0, s0), rel=1e-9)
    assert bayes_boundary(0.5, 1.0, 0.1, 0.5, 0.5, 0.1) is None  # positive mean below the negative one
    # a small overlapping minority of positives: the positive density wins only above m1 (t = 0.5 + log 19)
    assert bayes_boundary(0.95, 0.0, 1.0, 0.05, 1.0, 1.0) == pytest.approx(0.5 + math.log(19.0), abs=1e-12)
    # a wider positive component: the upper root (below it, down to the far lower root, the negatives win)
    t = bayes_boundary(0.9, 0.0, 1.0, 0.1, 3.0, 2.0)
    assert 0.0 < t < 3.0 and 0.1 * pdf(t, 3.0, 2.0) == pytest.approx(0.9 * pdf(t, 0.0, 1.0), rel=1e-9)
    assert 0.1 * pdf(t + 0.01, 3.0, 2.0) > 0.9 * pdf(t + 0.01, 0.0, 1.0)


# True boundary of w1 = 1/6, N(0.20, 0.03) vs N(0.32, 0.025): 0.2745. Over 10 seeds the fit's error was at most
# 0.0007 (unanchored) and 0.0014 (10 % of positives anchored); the sampling error of the boundary is about
# sigma / sqrt(n_pos) = 0.025 / sqrt(4000) = 0.0004. The tolerance 0.005 is a fifth of the smaller sigma: the
# midpoint of the means (0.26, what a failed fit falls back to) or any global threshold misses it.
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("anchor", [0.0, 0.1])
def test_fit_recovers_the_boundary_of_a_synthetic_class(seed, anchor):
    w1, m0, s0, m1, s1 = 1 / 6, 0.20, 0.03, 0.32, 0.025
    true = bayes_boundary(1 - w1, m0, s0, w1, m1, s1)
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(m0, s0, 20000), rng.normal(m1, s1, 4000)])
    pos = np.zeros(len(x), bool)
    pos[20000:] = rng.random(4000) < anchor
    fit = fit_values(x, pos if anchor else None)
    assert fit.fallback == [None]
    assert abs(fit.threshold[0] - true) < 0.005
    assert fit.mean_pos[0] == pytest.approx(m1, abs=0.003) and fit.mean_neg[0] == pytest.approx(m0, abs=0.003)
    assert fit.w_pos[0] == pytest.approx(w1, abs=0.02)
    assert abs(0.5 * (m0 + m1) - true) > 0.005  # the tolerance does tell the boundary from the midpoint


def test_several_classes_at_once_and_degenerate_ones():
    rng = np.random.default_rng(3)
    a = np.concatenate([rng.normal(0.0, 1.0, 5000), rng.normal(4.0, 1.0, 5000)])  # symmetric: boundary 2
    x = np.stack([a, np.full(10000, 0.7)], axis=1)  # class 1: constant scores
    fit = fit_values(x)
    assert fit.threshold[0] == pytest.approx(2.0, abs=0.1)
    assert fit.fallback == [None, "constant"] and math.isnan(fit.threshold[1])


def test_store_file_round_trip_and_rules(coco256_store, tmp_path):
    from vlpl.cli import main
    from vlpl.store.store import ScoreStore

    out = tmp_path / "th-global.json"
    assert main(["calibrate", str(coco256_store), "--out", str(out), "--aggregate", "global", "--bins", "512"]) == 0
    doc = json.loads(out.read_text())
    store = ScoreStore(coco256_store)
    assert doc["classes"] == store.classes and doc["store_manifest_sha256"] == store.manifest["manifest_sha256"]
    assert doc["aggregate"] == "global" and len(doc["diagnostics"]) == len(store.classes)
    th = load_thresholds(out)
    again = calibrate_store(store, aggregate="global", bins=512, show_progress=False)
    assert np.array_equal(th.thresholds, np.array([np.inf if v is None else v for v in again["thresholds"]]))

    train = store.split("train")
    pos = np.arange(32)
    full = torch.from_numpy(train.scores(pos))
    obs = torch.from_numpy(train.observed_at(pos))
    rows = RuleRows(train, pos)
    want = (full[:, 0, 0].double().numpy() >= th.thresholds[None, :]).astype(np.int8)
    got = apply_rule("calibrated", full, obs, dynamic=False, rows=rows, thresholds=str(out))
    assert np.array_equal(got.numpy(), want)
    # the threshold rule takes the same per-class thresholds on the global cosine
    got = apply_rule("threshold", full, obs, dynamic=False, rows=rows, score="cosine", thresholds=str(out))
    assert np.array_equal(got.numpy(), want)
    with pytest.raises(Exception, match="score: cosine and view: global"):
        apply_rule("threshold", full, obs, dynamic=False, thresholds=str(out))

    # the DAMP aggregate: thresholds on phi; negatives from the mixture's posterior, never over a positive
    damp_file = write_thresholds(tmp_path / "th-damp.json", calibrate_store(store, aggregate="damp", bins=512,
                                                                        show_progress=False))
    thd = load_thresholds(damp_file)
    phi, _ = damp_scores(full[:, 0], obs, **thd.aggregate_params)
    want = (phi.double().numpy() >= thd.thresholds[None, :]).astype(np.int8)
    got = apply_rule("calibrated", full, obs, dynamic=False, rows=rows, thresholds=str(damp_file))
    assert np.array_equal(got.numpy(), want)
    got = apply_rule("calibrated", full, obs, dynamic=False, rows=rows, thresholds=str(damp_file),
                     negative_posterior=0.9)
    post = thd.posterior_negative(phi.double().numpy())
    assert np.array_equal(got.numpy() == 1, want == 1)
    assert np.array_equal(got.numpy() == -1, (post >= 0.9) & (want == 0))
    with pytest.raises(ValueError, match="fitted on the 'damp' aggregate"):
        apply_rule("threshold", full, obs, dynamic=False, score="cosine", thresholds=str(damp_file))


def test_a_file_for_other_classes_is_refused(coco256_store, tmp_path):
    from vlpl.store.store import ScoreStore

    store = ScoreStore(coco256_store)
    doc = calibrate_store(store, aggregate="global", bins=64, show_progress=False)
    doc["classes"][3] = "zebra crossing"
    bad = write_thresholds(tmp_path / "bad.json", doc)
    train = store.split("train")
    pos = np.arange(4)
    full = torch.from_numpy(train.scores(pos))
    obs = torch.from_numpy(train.observed_at(pos))
    with pytest.raises(ValueError, match=rf"class 3 is 'zebra crossing' but store .* has '{store.classes[3]}'"):
        apply_rule("calibrated", full, obs, dynamic=False, rows=RuleRows(train, pos), thresholds=str(bad))
    doc["classes"] = doc["classes"][:-1]
    with pytest.raises(ValueError, match="must be a list of"):
        load_thresholds(write_thresholds(tmp_path / "short.json", doc))


def test_calibration_on_neighbour_smoothed_scores(coco256_store):
    """--knn-k: the fit sees exactly the knn rule's smoothed global cosines, and the file records the smoothing."""
    from vlpl.pseudolabel.neighbours import neighbour_smoothed
    from vlpl.store.store import ScoreStore

    store = ScoreStore(coco256_store)
    doc = calibrate_store(store, aggregate="global", bins=64, knn={"k": 3, "alpha": 0.5}, show_progress=False)
    assert doc["knn"] == {"k": 3, "alpha": 0.5, "weighting": "softmax", "tau": 0.05, "power": 3.0, "views": "all"}
    train = store.split("train")
    pos = np.arange(len(train))
    smoothed = neighbour_smoothed(torch.from_numpy(train.scores(pos)[:, 0]), RuleRows(train, pos), k=3, alpha=0.5)
    obs = train.observed_at(pos)
    fit = fit_values(smoothed[:, 0].double().numpy(), obs == 1, obs == -1, bins=64)
    want = [None if not np.isfinite(t) else float(t) for t in fit.threshold]
    assert doc["thresholds"] == pytest.approx(want, nan_ok=True)
    raw = calibrate_store(store, aggregate="global", bins=64, show_progress=False)
    assert raw["knn"] is None and raw["thresholds"] != doc["thresholds"]
