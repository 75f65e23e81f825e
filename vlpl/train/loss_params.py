"""The losses' parameters: defaults, meanings and validation, in one home (torch-free).

Every loss of :mod:`vlpl.train.losses` takes its defaults from its schema here (no second copy), and
``LOSSES.create`` / :func:`vlpl.train.losses.create_loss` validate through it, as does the training config
(``loss.params``) before torch is imported. ``loss_params("gpr", {"q2": 0.02})`` gives the validated
:class:`GPRParams`.

Defaults are the COCO rows of the papers; the per-dataset values live in the method recipes
(``configs/methods/*.yaml``). The formulas are in each loss class's docstring (the package vlpl/train/losses/).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Tuple

from vlpl.params import Params, ParamValueError, param
from vlpl.registry import LOSS_PARAMS, LOSSES

__all__ = ["LossParams", "loss_params", "EPS_COLE", "EPS_GR"]

#: ``eps`` of Cole et al., EM and VLPL inside ``-log(p + eps)``.
EPS_COLE = 1e-5
#: ``eps`` of GR and AEVLP.
EPS_GR = 1e-7

_EPS = "eps inside -log(p + eps) and -log(1 - p + eps)"
_K = "k, the expected number of positives per image (VOC 1.5, COCO 2.9, NUS 1.9, CUB 31.4)"
_BETA = "GR schedule [w0, wT, b0, bT] of the soft pseudo-label k(p) = sigmoid(w p + b)"
_ALPHA = "GR schedule [mu0, sigma0, muT, sigmaT] of the re-weighting v(p) = exp(-(p - mu)^2 / (2 sigma^2))"
_Q2 = "GCE exponent toward positive, L+ = (1 - p^q2) / q2"
_Q3 = "GCE exponent toward negative, L- = (1 - (1 - p)^q3) / q3 (1: MAE)"
_N0 = "epochs of a linear-init phase before the GR schedules start"
_DELTA = "clean-rate decrement per epoch as a fraction (the LL code's --delta_rel 0.2 [%] is 0.002)"


@dataclass(frozen=True)
class LossParams(Params):
    """Base of the loss schemas. ``requires_pseudo``: the loss needs pseudo-labels (a ``pseudo.rule``)."""

    requires_pseudo: ClassVar[bool] = False


class _GRCheck:
    """Checks shared by the GR-scheduled losses (gr, gpr)."""

    alpha: Tuple[float, ...]

    def _check_gr(self) -> None:
        if not (self.alpha[1] > 0 and self.alpha[3] > 0):
            raise ParamValueError("alpha", f"sigma0 and sigmaT (2nd and 4th values) must be > 0; got {list(self.alpha)}")


@LOSS_PARAMS.register("bce")
@dataclass(frozen=True)
class BCEParams(LossParams):
    """Full-label BCE over observed +1/-1 entries: the full-label upper bound (observed=full)."""

    see = "Cole et al. (CVPR'21)"
    eps: float = param(EPS_COLE, _EPS, ge=0)


@LOSS_PARAMS.register("an")
@dataclass(frozen=True)
class ANParams(LossParams):
    """AN, assume negative: every unobserved label is a negative."""

    see = "Cole et al. (CVPR'21)"
    eps: float = param(EPS_COLE, _EPS, ge=0)


@LOSS_PARAMS.register("an_ls")
@dataclass(frozen=True)
class ANLSParams(LossParams):
    """AN-LS, assume negative with label smoothing."""

    see = "Cole et al. (CVPR'21)"
    label_smoothing: float = param(0.1, "label smoothing e of observed positives and assumed negatives", ge=0, le=1)
    eps: float = param(EPS_COLE, _EPS, ge=0)


@LOSS_PARAMS.register("wan")
@dataclass(frozen=True)
class WANParams(LossParams):
    """WAN, weak assume negative: assumed negatives weighted 1/(C-1)."""

    see = "Cole et al. (CVPR'21)"
    eps: float = param(EPS_COLE, _EPS, ge=0)


@LOSS_PARAMS.register("epr")
@dataclass(frozen=True)
class EPRParams(LossParams):
    """EPR, expected positive regulariser: observed positives plus (mean positives - k)^2 / C^2."""

    see = "Cole et al. (CVPR'21)"
    expected_positives: float = param(2.9, _K, ge=0)
    eps: float = param(EPS_COLE, _EPS, ge=0)


@LOSS_PARAMS.register("role")
@dataclass(frozen=True)
class ROLEParams(LossParams):
    """ROLE, regularised online label estimation with a free N x C label estimator."""

    see = "Cole et al. (CVPR'21)"
    expected_positives: float = param(2.9, _K, ge=0)
    lr_mult: float = param(10.0, "learning-rate multiplier of the label estimator", gt=0)
    seed: int = param(0, "seed of the estimator's uniform initialisation of unknown entries")
    eps: float = param(EPS_COLE, _EPS, ge=0)


@LOSS_PARAMS.register("em")
@dataclass(frozen=True)
class EMParams(LossParams):
    """EM, entropy maximisation on the unobserved labels."""

    see = "Zhou et al. (ECCV'22)"
    alpha: float = param(0.1, "entropy weight on unknowns (VOC 0.2, COCO 0.1, NUS 0.1, CUB 0.01)", ge=0)
    eps: float = param(EPS_COLE, _EPS, ge=0)


@LOSS_PARAMS.register("em_apl")
@dataclass(frozen=True)
class EMAPLParams(LossParams):
    """EM + APL: EM plus asymmetric soft-negative pseudo-labels added after each epoch."""

    see = "Zhou et al. (ECCV'22)"
    alpha: float = param(0.1, "entropy weight on unknowns (VOC 0.2, COCO 0.1, NUS 0.1, CUB 0.01)", ge=0)
    beta: float = param(0.9, "weight of the soft-negative loss", ge=0)
    warmup_epoch: int = param(5, "first epoch after which APL labels soft negatives", ge=0)
    neg_proportion: float = param(0.9, "share of each class's initial unknowns APL labels in total", ge=0, le=1)
    eps: float = param(EPS_COLE, _EPS, ge=0)


@LOSS_PARAMS.register("ll_r")
@dataclass(frozen=True)
class LLRParams(LossParams):
    """LL-R, Large Loss Matters: the largest unknown losses are rejected (set to 0)."""

    see = "Kim et al. (CVPR'22)"
    delta_rel: float = param(0.002, _DELTA, ge=0, le=1)


@LOSS_PARAMS.register("ll_ct")
@dataclass(frozen=True)
class LLCtParams(LossParams):
    """LL-Ct, Large Loss Matters: the largest unknown losses are corrected to positive for this step."""

    see = "Kim et al. (CVPR'22)"
    delta_rel: float = param(0.002, _DELTA, ge=0, le=1)


@LOSS_PARAMS.register("ll_cp")
@dataclass(frozen=True)
class LLCpParams(LossParams):
    """LL-Cp, Large Loss Matters: the largest unknown losses become permanent positives."""

    see = "Kim et al. (CVPR'22)"
    delta_rel: float = param(0.002, "per-epoch fraction of unknown entries corrected (the LL code's 0.2 [%] "
                                    "is 0.002)", ge=0, le=1)
    released_is_bug: bool = param(False, "reproduce the released code (its 'is' test makes LL-Cp behave like "
                                         "LL-Ct and write nothing)")


@LOSS_PARAMS.register("gr")
@dataclass(frozen=True)
class GRParams(_GRCheck, LossParams):
    """GR, generalized robust loss: scheduled soft pseudo-labels and re-weighting of unknowns."""

    see = "Chen et al., GR loss (IJCAI'24)"
    beta: Tuple[float, ...] = param((0.0, 2.0, -2.0, -2.0), _BETA, length=4)
    alpha: Tuple[float, ...] = param((0.5, 2.0, 0.8, 0.5), _ALPHA, length=4)
    q2: float = param(0.01, _Q2, gt=0)
    q3: float = param(1.0, _Q3, gt=0)
    linear_init: int = param(0, _N0, ge=0)
    eps: float = param(EPS_GR, _EPS, ge=0)

    def check(self) -> None:
        self._check_gr()


@LOSS_PARAMS.register("gpr")
@dataclass(frozen=True)
class GPRParams(_GRCheck, LossParams):
    """GPR, AEVLP's generalized pseudo-label robust loss on observed + pseudo-labels."""

    see = "AEVLP (ICCV'25); configs/methods/aevlp.yaml"
    requires_pseudo = True

    beta: Tuple[float, ...] = param((0.0, 10.0, -2.0, -8.0), _BETA + " (COCO/NUS/CUB [0, 10, -2, -8]; VOC "
                                                                      "[0, 2, -2, -2])", length=4)
    alpha: Tuple[float, ...] = param((0.5, 2.0, 0.8, 0.5), _ALPHA, length=4)
    q2: float = param(0.01, _Q2, gt=0)
    q3: float = param(1.0, _Q3 + " (CUB 1.5)", gt=0)
    lambda1: float = param(0.7, "upper bound of the pseudo-positive weight w(p) (CUB 0.8)", ge=0, le=1)
    lambda2: float = param(0.5, "lower bound of w(p) (COCO/NUS 0.5, VOC 0.4, CUB 0.2)", ge=0, le=1)
    rho: float = param(0.9, "label-smoothing target of pseudo-positives", ge=0, le=1)
    reg: float = param(0.001, "weight of the expected-positive regulariser (COCO/NUS 0.001, VOC 0.05, CUB 0.01)",
                       ge=0)
    expected_positives: float = param(2.9, _K, ge=0)
    linear_init: int = param(0, _N0, ge=0)
    eps: float = param(EPS_GR, _EPS, ge=0)

    def check(self) -> None:
        self._check_gr()
        if self.lambda2 > self.lambda1:
            raise ParamValueError("lambda2", f"must not exceed lambda1 ({self.lambda1}); got {self.lambda2}")


@LOSS_PARAMS.register("vlpl")
@dataclass(frozen=True)
class VLPLLossParams(LossParams):
    """VLPL's EM_PL: EM on unknowns plus weighted, smoothed vision-language pseudo-positives."""

    see = "Xing et al., VLPL (CVPRW'24); configs/methods/vlpl.yaml"
    requires_pseudo = True

    alpha: float = param(0.1, "EM weight on neutral unknowns (VOC 0.2, COCO 0.1, NUS 0.1, CUB 0.01)", ge=0)
    beta_pos: float = param(0.7, "weight of the pseudo-positive term", ge=0)
    pseudo_pos_target: float = param(0.9, "smoothed target of pseudo-positives", ge=0, le=1)
    beta_neg: float = param(0.0, "weight of pseudo-negatives (0: ignored, as released)", ge=0)
    eps: float = param(EPS_COLE, _EPS, ge=0)


CSL_MODES = ("negative", "ignore", "selective")
CSL_PRIORS = ("model", "clip", "file", "none")


@LOSS_PARAMS.register("csl")
@dataclass(frozen=True)
class CSLParams(LossParams):
    """CSL: class-aware selective loss (prior + likelihood rules) with P-ASL, for partial annotations."""

    see = "Ben-Baruch et al., CSL (CVPR'22); configs/methods/csl.yaml; docs/CSL_SATL.md"

    mode: str = param("selective", "un-annotated labels: negative (all negatives), ignore (dropped) or selective "
                                   "(the prior and likelihood rules)", choices=CSL_MODES)
    gamma_pos: float = param(0.0, "P-ASL focusing exponent of annotated positives, (1 - p)^gamma_pos", ge=0)
    gamma_neg: float = param(1.0, "P-ASL focusing exponent of annotated negatives, p_m^gamma_neg "
                                  "(FPC-1000 3, RPS-0.5 1)", ge=0)
    gamma_unann: float = param(2.0, "P-ASL focusing exponent of un-annotated labels taken as negatives "
                                    "(COCO recipes 4)", ge=0)
    alpha_pos: float = param(1.0, "weight of annotated positives", ge=0)
    alpha_neg: float = param(1.0, "weight of annotated negatives", ge=0)
    alpha_unann: float = param(1.0, "weight of un-annotated labels taken as negatives", ge=0)
    clip: float = param(0.0, "probability margin m of the shifted negative probability min(1 - p + m, 1)", ge=0, le=1)
    likelihood_topk: int = param(5, "likelihood rule: the K x B most likely un-annotated entries of a batch are "
                                    "ignored", ge=0)
    prior_threshold: float = param(0.05, "prior rule: un-annotated labels of classes with prior > this are ignored "
                                         "(COCO recipes 0.5; 0: no prior rule)", ge=0, le=1)
    prior: str = param("model", "class prior: model (a temporary Ignore-mode model trained first, the paper's), "
                                "clip (the store's zero-shot scores, ours), file (prior_file), none",
                       choices=CSL_PRIORS)
    prior_file: Optional[str] = param(None, "CSV of the class prior (header; class name, prior; the released "
                                            "train_avg_preds.csv format); set by vlpl train for prior=model/clip")
    prior_epochs: Optional[int] = param(None, "epochs of the temporary Ignore-mode model (null: the run's epochs)",
                                        ge=1)
    prior_rule: str = param("vlpl", "prior=clip: the pseudo-label rule (its defaults) whose positives on the cached "
                                    "scores estimate each class's frequency")
    ema_decay: float = param(0.9997, "decay of the model EMA (timm ModelEmaV3) updated after every optimizer step; "
                                     "validation takes the better of model and EMA (0: no EMA)", ge=0, lt=1)

    def check(self) -> None:
        if self.prior == "file" and not self.prior_file:
            raise ParamValueError("prior_file", "prior=file needs prior_file (a CSV: class name, prior)")


@LOSS_PARAMS.register("satl")
@dataclass(frozen=True)
class SATLParams(LossParams):
    """SATL (ours, Decision 6): class thresholds from running score Gaussians, posterior pseudo-labels, ranking."""

    see = "Decision 6 (our formulation of SATL, arXiv 2507.23263); configs/methods/satl.yaml; docs/CSL_SATL.md"

    momentum: float = param(0.9, "EMA momentum of the per-class score statistics, one update per epoch", ge=0, lt=1)
    gamma: float = param(0.95, "an unknown entry becomes pseudo-positive (negative) when the posterior of positive "
                               "(negative) is >= gamma", gt=0.5, le=1)
    margin: float = param(1.0, "margin m of the ranking loss softplus(m - (s_pos - s_neg))", ge=0)
    lambda_rank: float = param(1.0, "weight of the differential ranking loss", ge=0)
    pseudo_weight: float = param(1.0, "weight of the BCE on threshold pseudo-labels", ge=0)
    min_count: int = param(2, "known positives and known negatives a class needs in an epoch to update its "
                              "statistics", ge=2)
    min_std: float = param(1e-3, "floor of the score standard deviations", gt=0)
    rule_labels: str = param("negatives", "with a pseudo.rule (SPML): which of its labels on unknown entries count "
                                          "as known: negatives, or both (positives too)",
                             choices=("negatives", "both"))
    eps: float = param(EPS_COLE, _EPS, ge=0)


def loss_params(name: str, values: Optional[Mapping[str, Any]] = None, *, where: Optional[str] = None,
                source: Optional[str] = None, sources: Optional[Mapping[str, str]] = None) -> Params:
    """The validated parameters of loss ``name`` (defaults for what ``values`` leaves out); torch-free for
    the built-in losses. Errors as :func:`vlpl.pseudolabel.params.rule_params`."""
    return LOSSES.schema(name).from_dict(values, where=where, source=source, sources=sources, what=f"loss {name!r}")


# ---- Cole et al.'s remaining baselines and VLPL's ASL variant (issue 14, items 5; docs/LOSSES.md) ---------


@LOSS_PARAMS.register("iun")
@dataclass(frozen=True)
class IUNParams(LossParams):
    """IUN, ignore unobserved positives: the observed positive plus ALL true negatives (an oracle baseline)."""

    see = "Cole et al. (CVPR'21), losses.py loss_iun; docs/LOSSES.md (store: data.observed.num_neg >= C)"
    eps: float = param(EPS_COLE, _EPS, ge=0)


@LOSS_PARAMS.register("iu")
@dataclass(frozen=True)
class IUParams(LossParams):
    """IU, ignore unobserved: BCE on the observed positives and observed negatives only."""

    see = "Cole et al. (CVPR'21), losses.py loss_iu; docs/LOSSES.md"
    eps: float = param(EPS_COLE, _EPS, ge=0)


@LOSS_PARAMS.register("pr")
@dataclass(frozen=True)
class PRParams(LossParams):
    """PR, pairwise ranking: hinge max(0, 1 - p_i + p_j) of each observed positive i over the unobserved j."""

    see = "Cole et al. (CVPR'21), losses.py loss_pr; docs/LOSSES.md"
    eps: float = param(EPS_COLE, _EPS + " (observed negatives only)", ge=0)


@LOSS_PARAMS.register("vlpl_asl")
@dataclass(frozen=True)
class VLPLASLParams(LossParams):
    """VLPL's EM_PL_ASL: focal (ASL-style) weights on positives, pseudo-labels and the entropy of unknowns."""

    see = "Xing et al., VLPL (CVPRW'24), losses.py loss_EM_PL_ASL; docs/LOSSES.md"
    requires_pseudo = True

    gamma_pos: float = param(2.0, "focusing exponent of observed and pseudo positives, (1 - p)^gamma_pos l+(p)", ge=0)
    gamma_neg: float = param(4.0, "focusing exponent of pseudo-negatives, p^gamma_neg l-(p)", ge=0)
    gamma_unknown: float = param(4.0, "focusing exponent of the neutral unknowns' entropy, -(1 - p)^gamma_unknown "
                                      "H(p)", ge=0)
    warmup_epochs: int = param(0, "epochs of plain EM (observed positives, -alpha H(p) on every unknown) before "
                                  "the pseudo-labels are used (VLPL: 0)", ge=0)
    alpha: float = param(0.1, "EM weight during the warm-up epochs only (VOC 0.2, COCO 0.1, NUS 0.1, CUB 0.01)",
                         ge=0)
    eps: float = param(EPS_COLE, _EPS, ge=0)
