"""Pseudo-label rules (ALGORITHMS.md §6b VLPL, §7c DAMP, Decisions 1 and 4) on hand-worked numbers."""
from __future__ import annotations

import math

import pytest
import torch

from vlpl.pseudolabel.rules import (
    aggregate_scores,
    apply_rule,
    damp,
    damp_scores,
    select_variants,
    vlpl,
)
from vlpl.registry import RULES, RegistryError

TEMP = 0.01

# Hand-chosen per-view class distributions (each row sums to 1). g = 2 -> 5 views: view 0 is the
# global view, views 1..4 the tiles (0,0), (0,1), (1,0), (1,1). C = 4.
PROBS = [
    # image 0, observed positive = class 0 (pi_glob = 0.25 < eta = 0.3 -> eta_0 = 0.25)
    [
        [0.25, 0.40, 0.05, 0.30],  # global
        [0.70, 0.10, 0.10, 0.10],
        [0.10, 0.60, 0.10, 0.20],
        [0.32, 0.20, 0.28, 0.20],
        [0.41, 0.30, 0.05, 0.24],
    ],
    # image 1, observed positive = class 3 (pi_glob = 0.55 > eta = 0.3 -> eta_1 = 0.3)
    [
        [0.10, 0.15, 0.20, 0.55],
        [0.05, 0.25, 0.10, 0.60],
        [0.35, 0.15, 0.20, 0.30],
        [0.10, 0.20, 0.29, 0.41],
        [0.20, 0.10, 0.15, 0.55],
    ],
]
OBSERVED = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.int8)


def _cosines() -> torch.Tensor:
    """Raw "cosines" whose softmax(cos / TEMP) is exactly PROBS: cos = 0.2 + TEMP * ln(p)."""
    return torch.tensor(
        [[[0.2 + TEMP * math.log(p) for p in view] for view in img] for img in PROBS], dtype=torch.float64
    )


def test_cosines_softmax_by_hand() -> None:
    cos = _cosines()
    # softmax by hand with math.exp for one view: exp(cos/T) / sum exp(cos/T)
    row = cos[0, 3].tolist()
    e = [math.exp(x / TEMP) for x in row]
    hand = [v / sum(e) for v in e]
    assert hand == pytest.approx([0.32, 0.20, 0.28, 0.20], abs=1e-12)
    assert all(-1.0 <= x <= 1.0 for x in cos.flatten().tolist())


def test_damp_scores_hand_worked() -> None:
    phi, psi = damp_scores(_cosines(), OBSERVED, temp=TEMP, eta=0.3)
    # image 0: tiles -> a = max = [.70, .60, .28, .24], b = min = [.10, .10, .05, .10]
    #   m = mean = [(.70+.10+.32+.41)/4, (.10+.60+.20+.30)/4, (.10+.10+.28+.05)/4, (.10+.20+.20+.24)/4]
    #            = [.3825, .30, .1325, .185]
    #   eta_0 = min(pi_glob[0] = .25, .3) = .25; a > .25 -> [T, T, T (.28), F (.24)]
    #   loc = [.70, .60, .28, .10]  (class 2 takes its max because the gate is .25, not .3)
    #   phi = (glob + loc)/2 = [(.25+.70)/2, (.40+.60)/2, (.05+.28)/2, (.30+.10)/2] = [.475, .50, .165, .20]
    #   psi = (glob + m)/2   = [(.25+.3825)/2, (.40+.30)/2, (.05+.1325)/2, (.30+.185)/2]
    #                        = [.31625, .35, .09125, .2425]
    # image 1: a = [.35, .25, .29, .60], b = [.05, .10, .10, .30]
    #   m = [(.05+.35+.10+.20)/4, (.25+.15+.20+.10)/4, (.10+.20+.29+.15)/4, (.60+.30+.41+.55)/4]
    #     = [.175, .175, .185, .465]
    #   eta_1 = min(.55, .3) = .3; a > .3 -> [T, F, F (.29), T]; loc = [.35, .10, .10, .60]
    #   phi = [(.10+.35)/2, (.15+.10)/2, (.20+.10)/2, (.55+.60)/2] = [.225, .125, .15, .575]
    #   psi = [(.10+.175)/2, (.15+.175)/2, (.20+.185)/2, (.55+.465)/2] = [.1375, .1625, .1925, .5075]
    assert phi.tolist()[0] == pytest.approx([0.475, 0.50, 0.165, 0.20], abs=1e-9)
    assert psi.tolist()[0] == pytest.approx([0.31625, 0.35, 0.09125, 0.2425], abs=1e-9)
    assert phi.tolist()[1] == pytest.approx([0.225, 0.125, 0.15, 0.575], abs=1e-9)
    assert psi.tolist()[1] == pytest.approx([0.1375, 0.1625, 0.1925, 0.5075], abs=1e-9)


def test_damp_no_observed_positive_takes_max() -> None:
    # eta_n = 0 -> every class takes its best tile:
    # image 1: loc = a = [.35, .25, .29, .60] -> phi = [(.10+.35)/2, (.15+.25)/2, (.20+.29)/2, (.55+.60)/2]
    #        = [.225, .20, .245, .575]
    none = torch.zeros_like(OBSERVED)
    phi, _ = damp_scores(_cosines(), none, temp=TEMP, eta=0.3)
    assert phi.tolist()[1] == pytest.approx([0.225, 0.20, 0.245, 0.575], abs=1e-9)
    # top-2 with theta = 0.2: gated (observed class 3) -> classes 3 (.575) and 0 (.225);
    # ungated -> classes 3 (.575) and 2 (.245)
    kw = dict(temp=TEMP, eta=0.3, threshold=0.2, top_k=2, negative_ratio=0.0)
    assert damp(_cosines(), OBSERVED, **kw)[1].tolist() == [1, 0, 0, 1]
    assert damp(_cosines(), none, **kw)[1].tolist() == [0, 0, 1, 1]
    # an observed negative (-1) does not act as an observed positive in the gate
    neg_only = torch.tensor([[0, 0, 0, 0], [0, -1, 0, 0]], dtype=torch.int8)
    assert damp(_cosines(), neg_only, **kw)[1].tolist() == [0, 0, 1, 1]


def test_damp_gate_uses_max_over_several_observed_positives() -> None:
    # image 0 with observed positives {0, 1}: max(pi_glob[0], pi_glob[1]) = max(.25, .40) = .40
    # -> eta_0 = min(.40, .3) = .3 -> class 2 (a = .28) now takes its min .05:
    # phi[2] = (.05 + .05)/2 = .05
    obs = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.int8)
    phi, _ = damp_scores(_cosines(), obs, temp=TEMP, eta=0.3)
    assert phi.tolist()[0] == pytest.approx([0.475, 0.50, 0.05, 0.20], abs=1e-9)


def test_damp_topk_threshold_and_negatives() -> None:
    cos = _cosines()
    base = dict(temp=TEMP, eta=0.3)
    # top-2 by phi: image 0 -> classes 1 (.50), 0 (.475), both >= .45; image 1 -> 3 (.575), 0 (.225 < .45, cut)
    out = damp(cos, OBSERVED, threshold=0.45, top_k=2, negative_ratio=0.5, negatives="neutral", **base)
    assert out.dtype == torch.int8
    assert out.tolist() == [[1, 1, 0, 0], [0, 0, 0, 1]]
    # paper negatives: bottom floor(.5 * 4) = 2 classes by psi -> image 0: {2 (.09125), 3 (.2425)};
    # image 1: {0 (.1375), 1 (.1625)}
    out = damp(cos, OBSERVED, threshold=0.45, top_k=2, negative_ratio=0.5, negatives="pseudo", **base)
    assert out.tolist() == [[1, 1, -1, -1], [-1, -1, 0, 1]]
    # top-1 only keeps the best class
    out = damp(cos, OBSERVED, threshold=0.45, top_k=1, negative_ratio=0.0, **base)
    assert out.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]
    # theta cut: top-3 with theta = .19 -> image 0: 1 (.50), 0 (.475), 3 (.20); image 1: 3, 0 (.225), 2 (.15 cut)
    out = damp(cos, OBSERVED, threshold=0.19, top_k=3, negative_ratio=0.0, **base)
    assert out.tolist() == [[1, 1, 0, 1], [1, 0, 0, 1]]
    # same with theta = .5: only phi >= .5 survives
    out = damp(cos, OBSERVED, threshold=0.5 - 1e-9, top_k=3, negative_ratio=0.0, **base)
    assert out.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]


def test_damp_overlap_bottom_set_wins() -> None:
    # negative_ratio = 1 puts every class in the bottom set; it is written after the positives
    # (the released code's order), so positives become 0 ("neutral") or -1 ("pseudo").
    cos = _cosines()
    kw = dict(temp=TEMP, eta=0.3, threshold=0.45, top_k=2, negative_ratio=1.0)
    assert damp(cos, OBSERVED, negatives="neutral", **kw).tolist() == [[0] * 4, [0] * 4]
    assert damp(cos, OBSERVED, negatives="pseudo", **kw).tolist() == [[-1] * 4, [-1] * 4]


def test_damp_without_grid_degrades_to_global() -> None:
    cos = _cosines()[:, :1]
    phi, psi = damp_scores(cos, OBSERVED, temp=TEMP, eta=0.3)
    assert phi.tolist()[0] == pytest.approx(PROBS[0][0], abs=1e-9)
    assert torch.equal(phi, psi)
    out = damp(cos, OBSERVED, temp=TEMP, threshold=0.35, top_k=3, negative_ratio=0.0)
    assert out.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]


def test_damp_float16_input_and_bad_options() -> None:
    out = damp(_cosines().half(), OBSERVED, temp=TEMP, threshold=0.45, top_k=2, negative_ratio=0.0)
    assert out.tolist() == [[1, 1, 0, 0], [0, 0, 0, 1]]
    with pytest.raises(ValueError):
        damp(_cosines(), OBSERVED, negatives="bogus")
    with pytest.raises(ValueError):
        damp(_cosines(), OBSERVED[:, :3])


def test_vlpl_rule() -> None:
    # global distributions pi: image 0 [.5, .35, .1, .05] -> > .3: classes 0, 1; image 1 [.3, .3, .25, .15]:
    # .3 is not > .3 (strict) -> none.
    probs = [[0.5, 0.35, 0.1, 0.05], [0.3 + 1e-6, 0.3 - 1e-6, 0.25, 0.15]]
    glob = torch.tensor([[0.2 + TEMP * math.log(p) for p in row] for row in probs], dtype=torch.float64)
    tiles = torch.zeros(2, 4, 4, dtype=torch.float64)  # extra views are ignored by VLPL
    cos = torch.cat([glob[:, None], tiles], dim=1)
    obs = torch.zeros(2, 4, dtype=torch.int8)
    assert vlpl(cos, obs).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    # bottom floor(.5 * 4) = 2 by pi -> -1: image 0 {2, 3}; image 1 {2, 3}
    assert vlpl(cos, obs, negative_ratio=0.5).tolist() == [[1, 1, -1, -1], [1, 0, -1, -1]]
    # threshold .4 -> image 0 only class 0
    assert vlpl(cos, obs, threshold=0.4).tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]]


def test_threshold_and_topk_rules() -> None:
    cos = _cosines()
    obs = torch.zeros(2, 4, dtype=torch.int8)
    # mean over all 5 views of image 0: [(.25+.70+.10+.32+.41)/5, ...] = [.356, .32, .116, .208]
    agg = aggregate_scores(cos, score="softmax", temp=TEMP, view="mean")
    assert agg.tolist()[0] == pytest.approx([0.356, 0.32, 0.116, 0.208], abs=1e-9)
    agg_max = aggregate_scores(cos, view="max", temp=TEMP)
    assert agg_max.tolist()[0] == pytest.approx([0.70, 0.60, 0.28, 0.30], abs=1e-9)
    out = RULES.create("threshold", cos, obs, view="mean", threshold=0.3)
    assert out.tolist()[0] == [1, 1, 0, 0]
    out = RULES.create("topk", cos, obs, view="global", k=2)
    assert out.tolist() == [[0, 1, 0, 1], [0, 0, 1, 1]]
    # raw cosine scores: order is the same as the softmax order within a view
    out = RULES.create("topk", cos, obs, score="cosine", k=1)
    assert out.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]


def test_select_variants_dynamic_statistics() -> None:
    b, v, c = 400, 5, 3
    full = torch.stack([torch.zeros(b, v, c), torch.ones(b, v, c)], dim=1)  # variant id as value
    g = torch.Generator().manual_seed(0)
    picked = select_variants(full, g, dynamic=True)
    assert picked.shape == (b, v, c)
    # all classes of one view come from the same variant
    assert torch.equal(picked.amin(dim=2), picked.amax(dim=2))
    choice = picked[:, :, 0]
    frac = choice.mean().item()
    assert abs(frac - 0.5) < 0.05  # 2000 draws: std ~ 0.011
    # independent per view: each view ~50%, and views disagree within an image about half the time
    assert (choice.mean(dim=0) - 0.5).abs().max().item() < 0.1
    disagree = (choice[:, 0] != choice[:, 1]).float().mean().item()
    assert abs(disagree - 0.5) < 0.1
    # per image as well: not all views equal in most images
    assert (choice.amin(dim=1) != choice.amax(dim=1)).float().mean().item() > 0.8


def test_select_variants_deterministic_and_static() -> None:
    full = torch.randn(8, 2, 5, 4)
    a = select_variants(full, torch.Generator().manual_seed(7))
    b = select_variants(full, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(select_variants(full, torch.Generator().manual_seed(7), dynamic=False), full[:, 0])
    one = full[:, :1]
    assert torch.equal(select_variants(one, torch.Generator().manual_seed(1), dynamic=True), one[:, 0])


def test_apply_rule_and_unknown_options() -> None:
    cos = _cosines()
    full = torch.stack([cos, cos], dim=1)  # identical variants -> result independent of the draw
    out = apply_rule(
        "damp", full, OBSERVED, dynamic=True, generator=torch.Generator().manual_seed(0),
        temp=TEMP, threshold=0.45, top_k=2, negative_ratio=0.5, negatives="pseudo",
    )
    assert out.tolist() == [[1, 1, -1, -1], [-1, -1, 0, 1]]
    with pytest.raises(RegistryError, match="bogus"):
        apply_rule("damp", full, OBSERVED, dynamic=False, bogus=1)
    with pytest.raises(RegistryError, match="bogus"):
        RULES.create("vlpl", cos, OBSERVED, bogus=1)
    with pytest.raises(RegistryError):
        apply_rule("no_such_rule", full, OBSERVED)
    assert {"damp", "vlpl", "threshold", "topk"} <= set(RULES.names())


# --------------------------------------------------------------------------------------------
# parameters: one home (vlpl.pseudolabel.params), validated with clear messages
# --------------------------------------------------------------------------------------------
def test_rule_defaults_come_from_their_schemas() -> None:
    import inspect

    from vlpl.pseudolabel.params import TEMP, rule_params

    for name in ("damp", "vlpl", "threshold", "topk"):
        sig = inspect.signature(RULES.get(name))
        # ``rows`` is the RuleRows hook (apply_rule passes it to rules with needs_rows), not a parameter
        defaults = {k: p.default for k, p in sig.parameters.items() if p.default is not p.empty and k != "rows"}
        assert defaults == rule_params(name).to_dict(), name
    sig = inspect.signature(damp_scores).parameters
    assert (sig["temp"].default, sig["eta"].default) == (0.01, 0.3) == (rule_params("damp").temp, rule_params("damp").eta)
    assert inspect.signature(aggregate_scores).parameters["temp"].default == TEMP == 0.01
    # the published (AEVLP COCO / VLPL) defaults
    assert rule_params("damp").to_dict() == {"temp": 0.01, "eta": 0.3, "threshold": 0.5, "top_k": 3,
                                             "negative_ratio": 0.3, "negatives": "neutral"}
    assert rule_params("vlpl").to_dict() == {"temp": 0.01, "threshold": 0.3, "negative_ratio": 0.0}


@pytest.mark.parametrize("name, values, message", [
    ("damp", {"temp": 0}, r"temp: must be > 0; got 0"),
    ("damp", {"eta": -0.1}, r"eta: must be in \[0, 1\]; got -0.1"),
    ("damp", {"negative_ratio": 1.01}, r"negative_ratio: must be in \[0, 1\]; got 1.01"),
    ("damp", {"top_k": -1}, r"top_k: must be >= 0; got -1"),
    ("damp", {"top_k": 1.5}, r"top_k: expected int, got 1.5"),
    ("damp", {"negatives": "ignore"}, r"negatives: must be one of 'neutral', 'pseudo'; got 'ignore'"),
    ("vlpl", {"threshold": 2}, r"threshold: must be in \[0, 1\]; got 2"),
    ("threshold", {"view": "min"}, r"view: must be one of 'global', 'mean', 'max'"),
    ("threshold", {"score": "cosine", "threshold": -1.5}, r"threshold: must be in \[-1, 1\] for score=cosine"),
    ("topk", {"score": "logit"}, r"score: must be one of 'softmax', 'cosine'"),
])
def test_bad_rule_values_are_named(name, values, message) -> None:
    from vlpl.config import ConfigError
    from vlpl.pseudolabel.params import rule_params

    with pytest.raises(ConfigError, match=rf"^pseudo\.params\.{message}.*\(pseudo-label rule '{name}'"):
        rule_params(name, values, where="pseudo.params")
    full = torch.stack([_cosines(), _cosines()], dim=1)
    with pytest.raises(ValueError, match=message):  # the same check on the training path
        apply_rule(name, full, OBSERVED, dynamic=False, **values)


def test_cosine_threshold_may_be_negative() -> None:
    from vlpl.pseudolabel.params import rule_params
    from vlpl.pseudolabel.rules import threshold

    assert rule_params("threshold", {"score": "cosine", "threshold": -0.5}).threshold == -0.5
    out = threshold(_cosines(), OBSERVED, score="cosine", threshold=-1.0)  # every cosine >= -1
    assert bool((out == 1).all())


def test_bad_options_fail_before_any_random_draw() -> None:
    full = torch.stack([_cosines(), _cosines()], dim=1)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state().clone()
    for bad in ({"temp": -1.0}, {"bogus": 1}, {"top_k": "3"}):
        with pytest.raises((ValueError, RegistryError)):
            apply_rule("damp", full, OBSERVED, dynamic=True, generator=gen, **bad)
        assert torch.equal(gen.get_state(), state), bad


def test_direct_rule_calls_validate_too() -> None:
    with pytest.raises(ValueError, match="negative_ratio: must be in"):
        damp(_cosines(), OBSERVED, negative_ratio=2.0)
    with pytest.raises(ValueError, match="temp: must be > 0"):
        damp_scores(_cosines(), OBSERVED, temp=0.0)
    with pytest.raises(ValueError, match="view: must be one of"):
        aggregate_scores(_cosines(), view="median")
    with pytest.raises(ValueError, match="threshold: must be in"):
        vlpl(_cosines(), OBSERVED, threshold=-0.2)
