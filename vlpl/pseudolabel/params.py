"""The pseudo-label rules' parameters: defaults, meanings and validation, in one home (torch-free).

Each rule of :mod:`vlpl.pseudolabel.rules` takes its defaults from the schema here and validates through
it; the training config (``pseudo.params``), ``vlpl evaluate`` (``rules``), the demo and the docs all read
them from here. ``rule_params("damp", {"eta": 0.0})`` gives the validated :class:`DampParams`.

Defaults are the papers' COCO settings (AEVLP for DAMP, VLPL for vlpl); the per-dataset values live in
the method recipes (``configs/methods/*.yaml``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from vlpl.params import Params, ParamValueError, param
from vlpl.registry import RULE_PARAMS, RULES

__all__ = ["DampParams", "VLPLParams", "ThresholdParams", "TopkParams", "rule_params", "TEMP",
           "NEGATIVE_MODES", "SCORE_KINDS", "VIEW_AGGREGATES"]

#: softmax temperature of every rule: ``softmax_c(cos / temp)``; 0.01 plays the role of CLIP's x100 (§7g.3)
TEMP = 0.01
NEGATIVE_MODES = ("neutral", "pseudo")
SCORE_KINDS = ("softmax", "cosine")
VIEW_AGGREGATES = ("global", "mean", "max")

_TEMP_HELP = "softmax temperature over classes per view, softmax(cos / temp); 0.01 plays CLIP's x100"
_RATIO_HELP = "the bottom floor(ratio x C) classes become negatives (0: none)"
_SCORE_HELP = "softmax: per-view softmax(cos / temp); cosine: the raw cached cosine"
_VIEW_HELP = "global: view 0 only; mean / max: over all views, global included"


@RULE_PARAMS.register("damp")
@dataclass(frozen=True)
class DampParams(Params):
    """AEVLP's DAMP: gated max/min tile aggregation of multi-crop scores, top-K + threshold positives."""

    see = "AEVLP (ICCV'25); configs/methods/aevlp.yaml"

    temp: float = param(TEMP, _TEMP_HELP, gt=0)
    eta: float = param(0.3, "gate cap: a class takes its best tile when that beats min(global score of the "
                            "observed positive, eta), else its worst tile", ge=0, le=1)
    threshold: float = param(0.5, "a top-K class is pseudo-positive only if its score phi >= threshold",
                             ge=0, le=1)
    top_k: int = param(3, "at most this many pseudo-positives per image (the observed positive counts)", ge=0)
    negative_ratio: float = param(0.3, _RATIO_HELP + ", ranked by the mean-tile score psi", ge=0, le=1)
    negatives: str = param("neutral", "what the bottom classes become: neutral (0, the released code) or "
                                      "pseudo (-1, the paper)", choices=NEGATIVE_MODES)


@RULE_PARAMS.register("vlpl")
@dataclass(frozen=True)
class VLPLParams(Params):
    """VLPL: global-view softmax, strict threshold positives, optional bottom-ranked negatives."""

    see = "Xing et al., VLPL (CVPRW'24); configs/methods/vlpl.yaml"

    temp: float = param(TEMP, _TEMP_HELP, gt=0)
    threshold: float = param(0.3, "a class is pseudo-positive iff its global softmax score > threshold",
                             ge=0, le=1)
    negative_ratio: float = param(0.0, _RATIO_HELP + " (-1), ranked by the global softmax score", ge=0, le=1)


@RULE_PARAMS.register("threshold")
@dataclass(frozen=True)
class ThresholdParams(Params):
    """Fixed threshold on an aggregated score: +1 iff score >= threshold (no negatives)."""

    see = "vlpl/pseudolabel/rules.py (a baseline)"

    score: str = param("softmax", _SCORE_HELP, choices=SCORE_KINDS)
    temp: float = param(TEMP, _TEMP_HELP + " (softmax only)", gt=0)
    view: str = param("global", _VIEW_HELP, choices=VIEW_AGGREGATES)
    threshold: float = param(0.3, "a class is pseudo-positive iff its score >= threshold "
                                  "(softmax: in [0, 1]; cosine: in [-1, 1])")
    thresholds: Optional[str] = param(None, "per-class thresholds from a `vlpl calibrate --aggregate global` file "
                                            "instead of threshold (needs score: cosine, view: global)")

    def check(self) -> None:
        if self.thresholds is not None and (self.score, self.view) != ("cosine", "global"):
            raise ParamValueError("thresholds", f"a calibrated thresholds file holds global-view cosine thresholds: "
                                                f"set score: cosine and view: global (got {self.score}, {self.view})")
        lo = 0.0 if self.score == "softmax" else -1.0
        if not lo <= self.threshold <= 1.0:
            raise ParamValueError("threshold", f"must be in [{lo:g}, 1] for score={self.score}; got {self.threshold!r}")


@RULE_PARAMS.register("topk")
@dataclass(frozen=True)
class TopkParams(Params):
    """Top-k classes per image on an aggregated score are pseudo-positive (no threshold, no negatives)."""

    see = "vlpl/pseudolabel/rules.py (a baseline)"

    score: str = param("softmax", _SCORE_HELP, choices=SCORE_KINDS)
    temp: float = param(TEMP, _TEMP_HELP + " (softmax only)", gt=0)
    view: str = param("global", _VIEW_HELP, choices=VIEW_AGGREGATES)
    k: int = param(3, "pseudo-positives per image (observed positives count)", ge=0)


def rule_params(name: str, values: Optional[Mapping[str, Any]] = None, *, where: Optional[str] = None,
                source: Optional[str] = None, sources: Optional[Mapping[str, str]] = None) -> Params:
    """The validated parameters of rule ``name`` (defaults for what ``values`` leaves out).

    ``where``: the config key holding ``values`` (e.g. ``pseudo.params``, ``rules.damp``), for messages;
    ``source`` / ``sources``: where the values came from. Torch-free for the built-in rules. Raises
    :class:`vlpl.params.UnknownNameError` for an unknown rule, :class:`vlpl.params.UnknownParamError` for
    an unknown option, :class:`vlpl.params.ParamValueError` for a bad value (all ConfigErrors).
    """
    schema = RULES.schema(name)
    return schema.from_dict(values, where=where, source=source, sources=sources,
                            what=f"pseudo-label rule {name!r}")


# ---- per-class calibrated thresholds and neighbour consensus (issue 12, items 5 and 6; ours) ----------------
from dataclasses import field  # noqa: E402
from typing import Dict  # noqa: E402

CALIBRATE_AGGREGATES = ("damp", "global")
KNN_WEIGHTINGS = ("softmax", "power", "uniform")
KNN_VIEWS = ("all", "global")


@RULE_PARAMS.register("calibrated")
@dataclass(frozen=True)
class CalibratedParams(Params):
    """Per-class thresholds from `vlpl calibrate` (two-Gaussian fit per class on the cached scores; ours)."""

    see = "vlpl/pseudolabel/calibrate.py; docs/SWEEPS.md (vlpl calibrate)"

    thresholds: str = field(metadata={"help": "a thresholds file written by `vlpl calibrate STORE --out FILE`; "
                                              "the aggregate it was fitted on (damp phi or global cosine) is used"})
    negative_posterior: Optional[float] = param(None, "an unobserved entry whose posterior of the fitted negative "
                                                      "component is >= this becomes -1 (e.g. 0.99); null: no "
                                                      "negatives")

    def check(self) -> None:
        if not str(self.thresholds).strip():
            raise ParamValueError("thresholds", "expected the path of a thresholds file (vlpl calibrate)")
        if self.negative_posterior is not None and not 0.5 < self.negative_posterior <= 1.0:
            raise ParamValueError("negative_posterior", f"must be in (0.5, 1] or null; got {self.negative_posterior!r}")


@RULE_PARAMS.register("knn")
@dataclass(frozen=True)
class KnnParams(Params):
    """Neighbour consensus: each image's cached scores smoothed with its k nearest training images', then a base rule."""

    see = "vlpl/pseudolabel/neighbours.py; docs/SWEEPS.md (neighbour consensus; ours)"

    base: str = param("damp", "the rule run on the smoothed scores (any registered rule but knn)")
    base_params: Optional[Dict[str, Any]] = param(None, "the base rule's parameters (its own schema checks them)")
    k: int = param(10, "neighbours per image, from the store's FAISS index over training images, itself excluded",
                   ge=1)
    alpha: float = param(0.5, "mixing weight: s' = (1 - alpha) s + alpha sum_j w_j s_j", ge=0, le=1)
    weighting: str = param("softmax", "neighbour weights w_j from the cosine similarities: softmax(sim / tau), "
                                      "sim^power (negative sims count 0), or uniform 1/k", choices=KNN_WEIGHTINGS)
    tau: float = param(0.05, "softmax temperature over the k similarities (weighting=softmax)", gt=0)
    power: float = param(3.0, "exponent of the similarities (weighting=power)", ge=0)
    views: str = param("all", "which views are smoothed: all (each view with the neighbours' same view) or "
                              "global (view 0 only)", choices=KNN_VIEWS)

    def check(self) -> None:
        if self.base == "knn":
            raise ParamValueError("base", "knn cannot be its own base rule")
        try:
            RULES.schema(self.base)
        except Exception as e:  # UnknownNameError: name the key
            raise ParamValueError("base", str(e)) from None
        try:
            rule_params(self.base, self.base_params or {}, where="base_params")
        except ParamValueError as e:
            raise ParamValueError("base_params", e.reason) from None
        except Exception as e:  # UnknownParamError
            raise ParamValueError("base_params", str(e)) from None


__all__ += ["CalibratedParams", "KnnParams", "CALIBRATE_AGGREGATES", "KNN_WEIGHTINGS", "KNN_VIEWS"]


#: which cached flip variant of each view a rule reads during training (``pseudo.variant``):
#: ``random`` - every (image, view) independently, p = 1/2 (Decision 4: AEVLP's per-view random flips);
#: ``follow_student_flip`` - the variants of the image the student sees (VLPL's released code: the teacher
#: scores the same, possibly flipped, training image); ``unflipped`` - variant 0 always.
FLIP_VARIANTS = ("random", "follow_student_flip", "unflipped")


def flip_variant(variant: Optional[str], dynamic: bool = True) -> str:
    """``pseudo.variant`` resolved: a name of :data:`FLIP_VARIANTS`; None means ``random`` when ``dynamic``
    (the ``pseudo.dynamic`` switch of earlier versions) else ``unflipped``. Raises ParamValueError."""
    if variant is None:
        return "random" if dynamic else "unflipped"
    if variant not in FLIP_VARIANTS:
        raise ParamValueError("pseudo.variant", f"expected one of {', '.join(FLIP_VARIANTS)} or null; got {variant!r}")
    return variant


__all__ += ["FLIP_VARIANTS", "flip_variant"]
