"""Single-positive / partial-label multi-label losses, one registry entry each.

Every loss is an :class:`SPMLLoss` built as ``LOSSES.create(name, observed, **hparams)`` (or
:func:`create_loss`). Notation is that of ALGORITHMS.md §1: logits ``s``, ``p = sigmoid(s)``, observed
labels ``z`` in {-1, 0, +1}, pseudo-labels ``y~`` in {-1, 0, +1},
``l+(p) = -log(p + eps)``, ``l-(p) = -log(1 - p + eps)``. Unless a loss says otherwise, the objective is
the batch mean ``(1 / (B C)) sum_{n,c} L_nc`` (§1) plus a regulariser where the method has one.

Registered names (see each class for the formulas and its ALGORITHMS.md section):

=========  ==================================================================================
``bce``    full-label BCE over observed +1/-1 entries (the full-label upper bound, observed=full)
``an``     assume negative (§2e)
``an_ls``  assume negative with label smoothing 0.1 (§2e)
``wan``    weak assume negative, unknowns weighted 1/(C-1) (§2e)
``epr``    expected positive regulariser (§2e)
``role``   regularised online label estimation, free N x C estimator (§2e)
``em``     entropy maximisation on unknowns (§4a)
``em_apl`` EM + asymmetric (soft negative) pseudo-labelling after each epoch (§4a)
``ll_r``   Large Loss Matters, rejection (§3b)
``ll_ct``  Large Loss Matters, temporary correction (§3b)
``ll_cp``  Large Loss Matters, permanent correction (§3b)
``gr``     generalized robust loss with GR schedules (§5)
``vlpl``   VLPL's EM_PL loss on vision-language pseudo-labels (§6c)
``gpr``    AEVLP's generalized pseudo-label robust loss (§7d)
=========  ==================================================================================

**Observed negatives.** The SPML papers never have observed ``-1`` entries. For the partial-label
setting every loss here treats an observed ``-1`` as a known (clean) negative with loss ``l-(p)`` and
weight 1 (``ll_*`` use the logits BCE toward 0, which is the same thing without ``eps``); each class
states where this enters its formula.

**State.** A loss owns the training label state: the float32 ``N x C`` buffer ``state`` initialised from
``observed`` (EM+APL writes soft negatives ``-p`` into it, LL-Cp writes permanent ``+1`` corrections);
ROLE's estimator is the ``N x C`` parameter ``estimator_logits``. ``state_dict()`` therefore holds all
loss state for checkpoint / resume. Logits are computed on in float32 whatever their dtype (AMP-safe).

**Several processes.** The papers train on one GPU. Under data parallelism each process holds a slice of
the global batch; after :meth:`SPMLLoss.set_distributed` the two batch-level statistics are computed over
the *global* batch, so that after DDP's gradient averaging a W-process step has the gradients of the
1-process step on the same global batch (BatchNorm aside): the expected-positive regulariser ``R`` (its
batch sum goes through an autograd all-reduce, whose backward sums the W identical upstream gradients,
and DDP divides by W again) and the Large-Loss top-``K`` threshold (over the gathered losses, ``K`` from the
global ``B C``). Per-sample state stays identical on every process: the trainer averages the gradients of
the loss's own parameters (ROLE) with :meth:`SPMLLoss.average_gradients`, and :meth:`SPMLLoss.sync_state`
merges LL-Cp's writes once per epoch (each row is seen by one process once per epoch); EM+APL's epoch-end
update reads the gathered predictions and is identical everywhere.

**Parameters.** Each loss's defaults, one-line meanings and validation live in one torch-free home,
:mod:`vlpl.train.loss_params` (``GPRParams``, ...): the constructors here take their defaults from those
schemas, and :func:`create_loss` / ``LOSSES.create`` validate the hyper-parameters through them (the
training config is checked with the same schemas before torch is imported).

Importing this module registers the entries in :data:`vlpl.registry.LOSSES`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from vlpl.registry import LOSSES
from vlpl.train import loss_params as P
from vlpl.train.loss_params import EPS_COLE, EPS_GR  # noqa: F401  (re-exported)
from vlpl.train.schedules import gr_mu_sigma, gr_wb, ll_clean_rate

__all__ = [
    "LossBatch",
    "SPMLLoss",
    "create_loss",
    "loss_defaults",
    "loss_description",
    "neg_log_pos",
    "neg_log_neg",
]

# ``EPS_COLE`` (Cole, EM, VLPL: 1e-5) and ``EPS_GR`` (GR, AEVLP: 1e-7) come from vlpl.train.loss_params.

# ROLE estimator initialisation (ALGORITHMS.md §2e).
_ROLE_UNKNOWN_P = 0.6
_ROLE_POS_P = 0.995
_ROLE_NEG_P = 0.005


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclass
class LossBatch:
    """What the trainer hands a loss at every step.

    Attributes:
        logits: ``(B, C)`` classifier logits (requires grad).
        index: ``(B,)`` long row indices of the batch into the training set ``0 .. N-1``.
        pseudo: ``(B, C)`` int8 pseudo-labels in {-1, 0, 1} for this step (from a rule), or ``None``.
    """

    logits: torch.Tensor
    index: torch.Tensor
    pseudo: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------------------------------
# Per-entry building blocks
# --------------------------------------------------------------------------------------------------


def neg_log_pos(p: torch.Tensor, eps: float) -> torch.Tensor:
    """``l+(p) = -log(p + eps)`` (ALGORITHMS.md §1)."""
    return -torch.log(p + eps)


def neg_log_neg(p: torch.Tensor, eps: float) -> torch.Tensor:
    """``l-(p) = -log(1 - p + eps)`` (ALGORITHMS.md §1)."""
    return -torch.log(1.0 - p + eps)


def soft_bce(q: torch.Tensor, t: torch.Tensor, eps: float) -> torch.Tensor:
    """``BCE(q; t) = t l+(q) + (1 - t) l-(q)`` (ALGORITHMS.md §2e, §4a)."""
    return t * neg_log_pos(q, eps) + (1.0 - t) * neg_log_neg(q, eps)


def binary_entropy(p: torch.Tensor, eps: float) -> torch.Tensor:
    """``H(p) = p l+(p) + (1 - p) l-(p)`` (ALGORITHMS.md §4a)."""
    return soft_bce(p, p, eps)


def expected_positive_regularizer(p: torch.Tensor, expected_positives: float, global_batch: bool = False) -> torch.Tensor:
    """``R(p) = ((1/B) sum_n sum_c p_nc - k)^2 / C^2`` (ALGORITHMS.md §2e, §7d).

    With ``global_batch`` (an initialised process group) the sum and ``B`` are over every process's slice
    of the batch, through an autograd all-reduce (see the module docstring, "Several processes").
    """
    num_classes = p.shape[1]
    total = p.sum().reshape(1)
    count = torch.full((1,), float(p.shape[0]), device=p.device, dtype=total.dtype)
    if global_batch:
        total = dist_fn.all_reduce(total)
        dist.all_reduce(count)
    return ((total / count - expected_positives) ** 2 / float(num_classes**2)).reshape(())


def gce_pos(p: torch.Tensor, q2: float) -> torch.Tensor:
    """``L+(p) = (1 - p^q2) / q2`` (ALGORITHMS.md §5a).

    ``p`` is clamped below at the smallest positive float, which changes no value that has not
    underflowed to 0 and keeps the gradient of ``p^q2`` finite.
    """
    tiny = torch.finfo(p.dtype).tiny
    return (1.0 - p.clamp_min(tiny) ** q2) / q2


def gce_neg(p: torch.Tensor, q3: float) -> torch.Tensor:
    """``L-(p) = (1 - (1 - p)^q3) / q3`` (ALGORITHMS.md §5a); ``q3 = 1`` gives ``L- = p``."""
    tiny = torch.finfo(p.dtype).tiny
    return (1.0 - (1.0 - p).clamp_min(tiny) ** q3) / q3


def gr_k(p_detached: torch.Tensor, w: float, b: float) -> torch.Tensor:
    """Soft pseudo-label ``k(p) = sigmoid(w p + b)`` on detached ``p`` (ALGORITHMS.md §5a)."""
    return torch.sigmoid(w * p_detached + b)


def gr_v(p_detached: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    """Re-weighting ``v(p) = exp(-(p - mu)^2 / (2 sigma^2))`` on detached ``p`` (ALGORITHMS.md §5a)."""
    return torch.exp(-((p_detached - mu) ** 2) / (2.0 * sigma**2))


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------


def _as_observed(observed: Any) -> torch.Tensor:
    obs = torch.as_tensor(np.asarray(observed) if not torch.is_tensor(observed) else observed)
    if obs.dim() != 2:
        raise ValueError(f"observed must be an (N, C) matrix, got shape {tuple(obs.shape)}")
    obs = obs.detach().to(device="cpu", dtype=torch.float32).clone()
    bad = ~((obs == 1) | (obs == 0) | (obs == -1))
    if bool(bad.any()):
        raise ValueError("observed labels must be in {-1, 0, 1}")
    return obs


@dataclass
class _Masks:
    """Float masks over a batch: observed positive, known negative, unknown, APL soft negative."""

    pos: torch.Tensor
    neg: torch.Tensor
    unk: torch.Tensor
    soft: Optional[torch.Tensor] = None


class SPMLLoss(nn.Module):
    """Base class of every registered loss (see the module docstring for the conventions).

    Args:
        observed: ``(N, C)`` training observed-label matrix in {-1, 0, 1} (torch int8/float or numpy).
        eps: the ``eps`` inside ``l+`` / ``l-`` (ALGORITHMS.md §1).

    Class attributes:
        requires_pseudo: the loss needs ``batch.pseudo`` (VLPL, GPR).
        needs_train_pass: after each epoch the trainer runs the model in eval mode over the whole training
            set and calls :meth:`end_epoch` (EM+APL).
    """

    requires_pseudo: bool = False
    needs_train_pass: bool = False

    def __init__(self, observed: Any, eps: float) -> None:
        super().__init__()
        self.register_buffer("state", _as_observed(observed))
        self.eps = float(eps)
        self.epoch = 1
        self.num_epochs: Optional[int] = None
        self.distributed = False

    state: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(self.state.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.state.shape[1])

    # -- interface -----------------------------------------------------------------------------------

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        """Enter (1-indexed) ``epoch`` of ``num_epochs``; subclasses update their schedules here."""
        if epoch < 1:
            raise ValueError(f"epoch is 1-indexed, got {epoch}")
        if num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
        self.epoch = int(epoch)
        self.num_epochs = int(num_epochs)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def param_groups(self, lr: float) -> List[dict]:
        """Extra trainable parameters of the loss with their learning rate (default: none)."""
        return []

    def end_epoch(self, probs: torch.Tensor, index: torch.Tensor, epoch: int) -> Dict[str, float]:
        """Hook after the training pass of ``epoch`` (only called when ``needs_train_pass``)."""
        return {}

    # -- several processes ---------------------------------------------------------------------------

    def set_distributed(self, enabled: bool) -> None:
        """Compute batch-level statistics over the global batch of all processes of the default group.

        Every process must then call :meth:`forward` in lockstep on equal-sized slices (the trainer's
        loader gives each process ``batch_size / W`` rows).
        """
        if enabled and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("set_distributed(True) needs an initialised torch.distributed process group")
        self.distributed = bool(enabled)

    def average_gradients(self) -> None:
        """All-reduce-mean the gradients of the loss's own parameters (ROLE's estimator) across processes.

        The loss is not wrapped in DDP; this is the same averaging DDP does for the model. A process's
        gradient is non-zero only on its own rows, so the mean equals the 1-process gradient of the global
        batch. (The dense ``N x C`` all-reduce is 26 MB per step on COCO; cheap next to the step on NVLink.)
        """
        if not self.distributed:
            return
        world = dist.get_world_size()
        for param in self.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad.div_(world)

    def sync_state(self) -> None:
        """Merge per-sample state the processes changed on their own rows (default: nothing changes)."""

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of every process concatenated along dim 0 (no gradient; ``x`` itself when not distributed)."""
        if not self.distributed:
            return x
        # slices may differ in length (a last batch not divisible by W): pad to the longest, then trim
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, n)
        longest = int(max(int(t) for t in sizes))
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[: int(t)] for part, t in zip(parts, sizes)])

    def extra_repr(self) -> str:
        return f"N={self.num_examples}, C={self.num_classes}, eps={self.eps:g}"

    # -- helpers -------------------------------------------------------------------------------------

    def _soft_mask_rows(self, rows: torch.Tensor) -> Optional[torch.Tensor]:
        """Bool mask of APL soft negatives for ``rows`` (``None`` for losses without APL)."""
        return None

    def _prepare(self, batch: LossBatch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Masks]:
        """Return ``(s, p, z, masks)`` for the batch: float32 logits, probabilities, state rows, masks."""
        logits = batch.logits
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must be (B, {self.num_classes}), got shape {tuple(logits.shape)}"
            )
        index = batch.index.reshape(-1)
        if index.numel() != logits.shape[0]:
            raise ValueError(f"index has {index.numel()} rows but logits have {logits.shape[0]}")
        s = logits.float()
        p = torch.sigmoid(s)
        rows = index.to(device=self.state.device, dtype=torch.long)
        z = self.state[rows].to(s.device)
        soft = self._soft_mask_rows(rows)
        if soft is not None:
            soft = soft.to(s.device)
            hard = ~soft
            masks = _Masks(
                pos=(z == 1).float(),
                neg=((z == -1) & hard).float(),
                unk=((z == 0) & hard).float(),
                soft=soft.float(),
            )
        else:
            masks = _Masks(pos=(z == 1).float(), neg=(z == -1).float(), unk=(z == 0).float())
        return s, p, z, masks

    def _pseudo_masks(self, batch: LossBatch, like: torch.Tensor,
                      m: _Masks) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float masks of the unknown entries whose pseudo-label is ``+1``, ``-1`` and ``0``."""
        if batch.pseudo is None:
            raise ValueError(f"loss {type(self).__name__} requires batch.pseudo (pseudo-labels)")
        pseudo = batch.pseudo.to(like.device)
        if pseudo.shape != like.shape:
            raise ValueError(f"pseudo must have shape {tuple(like.shape)}, got {tuple(pseudo.shape)}")
        return m.unk * (pseudo == 1).float(), m.unk * (pseudo == -1).float(), m.unk * (pseudo == 0).float()

    @staticmethod
    def _finish(
        terms: Dict[str, torch.Tensor],
        reg: Optional[torch.Tensor] = None,
        extra: Optional[Dict[str, torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Batch mean (sum / (B C), ALGORITHMS.md §1) of the per-entry terms, plus ``reg``.

        Every term is also returned detached as its own contribution to the batch mean, so the logged
        terms (and ``reg``) add up to ``loss``.
        """
        first = next(iter(terms.values()))
        denom = float(first.numel())
        total = first.new_zeros(())
        out: Dict[str, torch.Tensor] = {}
        for name, mat in terms.items():
            part = mat.sum() / denom
            total = total + part
            out[name] = part.detach()
        if reg is not None:
            total = total + reg
            out["reg"] = reg.detach()
        if extra:
            out.update({k: v.detach() for k, v in extra.items()})
        return {"loss": total, **out}


# --------------------------------------------------------------------------------------------------
# Full labels and Cole et al.'s baselines (§2e)
# --------------------------------------------------------------------------------------------------


@LOSSES.register("bce")
class FullLabelBCELoss(SPMLLoss):
    """Full-label BCE: the full-label upper bound (train with ``observed`` = the full +-1 labels).

    Per entry: ``l+(p)`` if ``z = 1``, ``l-(p)`` if ``z = -1``, ``0`` if ``z = 0`` (ignored); batch mean
    over all B x C entries (ALGORITHMS.md §1, §2f "full labels (BCE)").

    Args:
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    def __init__(self, observed: Any, *, eps: float = P.BCEParams.eps) -> None:
        super().__init__(observed, eps)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        terms = {
            "obs_pos": m.pos * neg_log_pos(p, self.eps),
            "obs_neg": m.neg * neg_log_neg(p, self.eps),
        }
        return self._finish(terms)


@LOSSES.register("an")
class AssumeNegativeLoss(SPMLLoss):
    """AN, assume negative (ALGORITHMS.md §2e): ``L = l+(p)`` if ``z = 1`` else ``l-(p)``.

    Observed ``-1`` entries also get ``l-(p)`` (logged as ``obs_neg``).

    Args:
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    def __init__(self, observed: Any, *, eps: float = P.ANParams.eps) -> None:
        super().__init__(observed, eps)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        lneg = neg_log_neg(p, self.eps)
        terms = {
            "obs_pos": m.pos * neg_log_pos(p, self.eps),
            "obs_neg": m.neg * lneg,
            "unknown": m.unk * lneg,
        }
        return self._finish(terms)


@LOSSES.register("an_ls")
class AssumeNegativeLabelSmoothingLoss(SPMLLoss):
    """AN-LS, assume negative with label smoothing (ALGORITHMS.md §2e).

    * observed positive: ``(1 - e) l+(p) + e l-(p)``;
    * unknown: ``(1 - e) l-(p) + e l+(p)``;
    * observed ``-1`` (partial labels; not in the paper): ``l-(p)``, unsmoothed, as a known negative.

    Args:
        label_smoothing: ``e``, 0.1 as in Cole et al.
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    def __init__(self, observed: Any, *, label_smoothing: float = P.ANLSParams.label_smoothing,
                 eps: float = P.ANLSParams.eps) -> None:
        super().__init__(observed, eps)
        self.label_smoothing = float(label_smoothing)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        e = self.label_smoothing
        lpos, lneg = neg_log_pos(p, self.eps), neg_log_neg(p, self.eps)
        terms = {
            "obs_pos": m.pos * ((1.0 - e) * lpos + e * lneg),
            "obs_neg": m.neg * lneg,
            "unknown": m.unk * ((1.0 - e) * lneg + e * lpos),
        }
        return self._finish(terms)


@LOSSES.register("wan")
class WeakAssumeNegativeLoss(SPMLLoss):
    """WAN, weak assume negative (ALGORITHMS.md §2e).

    Observed positives get ``l+(p)``; unknowns get ``l-(p) / (C - 1)``; observed ``-1`` (partial labels)
    get ``l-(p)`` with weight 1 (they are known, not assumed, negatives).

    Args:
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    def __init__(self, observed: Any, *, eps: float = P.WANParams.eps) -> None:
        super().__init__(observed, eps)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        lneg = neg_log_neg(p, self.eps)
        weight = 1.0 / max(self.num_classes - 1, 1)
        terms = {
            "obs_pos": m.pos * neg_log_pos(p, self.eps),
            "obs_neg": m.neg * lneg,
            "unknown": m.unk * lneg * weight,
        }
        return self._finish(terms)


@LOSSES.register("epr")
class ExpectedPositiveRegularizerLoss(SPMLLoss):
    """EPR (ALGORITHMS.md §2e): ``l+(p)`` on observed positives only, plus ``R(p)`` with weight 1.

    ``R(p) = ((1/B) sum_n sum_c p_nc - k)^2 / C^2``. Unknowns get no per-entry loss; observed ``-1``
    (partial labels) get ``l-(p)``.

    Args:
        expected_positives: ``k``, the expected number of positives per image (VOC 1.5, COCO 2.9,
            NUS 1.9, CUB 31.4, §1); default COCO's.
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    def __init__(self, observed: Any, *, expected_positives: float = P.EPRParams.expected_positives,
                 eps: float = P.EPRParams.eps) -> None:
        super().__init__(observed, eps)
        self.expected_positives = float(expected_positives)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        terms = {
            "obs_pos": m.pos * neg_log_pos(p, self.eps),
            "obs_neg": m.neg * neg_log_neg(p, self.eps),
        }
        reg = expected_positive_regularizer(p, self.expected_positives, self.distributed)
        return self._finish(terms, reg)


@LOSSES.register("role")
class ROLELoss(SPMLLoss):
    """ROLE, regularised online label estimation (ALGORITHMS.md §2e).

    The label estimator is a free logit matrix ``Phi`` (parameter ``estimator_logits``, N x C) with
    ``y^ = sigmoid(Phi)``, initialised with unknowns ~ ``U(-logit(0.6), logit(0.6))`` (drawn from a
    ``torch.Generator`` seeded with ``seed``), observed positives ``logit(0.995)`` and observed
    negatives ``logit(0.005)``. Per entry (sg = stop-gradient)::

        L = 1/2 [1{z=1} l+(p) + 1{z=1} l+(y^)]             (obs_pos)
          + 1/2 [1{z=-1} l-(p) + 1{z=-1} l-(y^)]           (obs_neg; partial labels only, not in Cole)
          + 1/2 [BCE(p; sg y^) + BCE(y^; sg p)]            (cross, over ALL entries)
        R = 1/2 (R(p) + R(y^))                             (reg, weight 1)

    :meth:`param_groups` returns the estimator at ``lr * lr_mult`` (Cole: ``lr_mult = 10``), with
    ``weight_decay = 0`` (Cole's Adam has none).

    Args:
        expected_positives: ``k`` of the regulariser (§1); default COCO's 2.9.
        lr_mult: learning-rate multiplier of the estimator.
        seed: seed of the uniform initialisation of unknown entries.
        eps: inside ``l+``/``l-``; Cole's 1e-5.
    """

    def __init__(
        self,
        observed: Any,
        *,
        expected_positives: float = P.ROLEParams.expected_positives,
        lr_mult: float = P.ROLEParams.lr_mult,
        seed: int = P.ROLEParams.seed,
        eps: float = P.ROLEParams.eps,
    ) -> None:
        super().__init__(observed, eps)
        self.expected_positives = float(expected_positives)
        self.lr_mult = float(lr_mult)
        self.seed = int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        width = _logit(_ROLE_UNKNOWN_P)
        init = width * (2.0 * torch.rand(self.state.shape, generator=gen) - 1.0)
        init[self.state == 1] = _logit(_ROLE_POS_P)
        init[self.state == -1] = _logit(_ROLE_NEG_P)
        self.estimator_logits = nn.Parameter(init)

    def param_groups(self, lr: float) -> List[dict]:
        return [
            {
                "params": [self.estimator_logits],
                "lr": lr * self.lr_mult,
                "weight_decay": 0.0,
                "name": "role_estimator",
            }
        ]

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        rows = batch.index.reshape(-1).to(device=self.estimator_logits.device, dtype=torch.long)
        y_hat = torch.sigmoid(self.estimator_logits[rows].to(p.device).float())
        eps = self.eps
        p_sg, y_sg = p.detach(), y_hat.detach()
        terms = {
            "obs_pos": 0.5 * m.pos * (neg_log_pos(p, eps) + neg_log_pos(y_hat, eps)),
            "obs_neg": 0.5 * m.neg * (neg_log_neg(p, eps) + neg_log_neg(y_hat, eps)),
            "cross": 0.5 * (soft_bce(p, y_sg, eps) + soft_bce(y_hat, p_sg, eps)),
        }
        reg = 0.5 * (
            expected_positive_regularizer(p, self.expected_positives, self.distributed)
            + expected_positive_regularizer(y_hat, self.expected_positives, self.distributed)
        )
        return self._finish(terms, reg)


# --------------------------------------------------------------------------------------------------
# EM and EM+APL (§4a)
# --------------------------------------------------------------------------------------------------


@LOSSES.register("em")
class EntropyMaximizationLoss(SPMLLoss):
    """EM loss (ALGORITHMS.md §4a): ``l+(p)`` on observed positives, ``-alpha H(p)`` on unknowns.

    ``H(p) = p l+(p) + (1 - p) l-(p)``; minimising ``-alpha H`` maximises the entropy. Observed ``-1``
    (partial labels) get ``l-(p)``.

    Args:
        alpha: entropy weight (VOC 0.2, COCO 0.1, NUS 0.1, CUB 0.01, §4b); default COCO's.
        eps: inside ``l+``/``l-``; EM's 1e-5.
    """

    def __init__(self, observed: Any, *, alpha: float = P.EMParams.alpha, eps: float = P.EMParams.eps) -> None:
        super().__init__(observed, eps)
        self.alpha = float(alpha)

    def _em_terms(self, p: torch.Tensor, m: _Masks) -> Dict[str, torch.Tensor]:
        return {
            "obs_pos": m.pos * neg_log_pos(p, self.eps),
            "obs_neg": m.neg * neg_log_neg(p, self.eps),
            "unknown": m.unk * (-self.alpha * binary_entropy(p, self.eps)),
        }

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        return self._finish(self._em_terms(p, m))


@LOSSES.register("em_apl")
class EMAPLLoss(EntropyMaximizationLoss):
    """EM + APL, asymmetric pseudo-labelling (ALGORITHMS.md §4a), as released (soft negatives only).

    Loss per entry: as ``em``, plus for APL soft negatives ``beta [t l+(p) + (1 - t) l-(p)]`` with
    ``t = -state`` (the stored score), logged as ``soft_neg``.

    APL (:meth:`end_epoch`, after the training pass of every epoch ``e >= warmup_epoch``; the trainer
    runs the model in eval mode over the training set): for each class ``c``, among entries still
    unknown, take the ``m_c = floor(neg_proportion * U_c / (E - e_w))`` with the lowest ``p`` (ties: the
    earlier position in ``index``) and store ``state = -p``. ``U_c`` is the number of unknown entries of
    class ``c`` at the start of training (buffer ``unknown_at_start``); ``E`` comes from
    :meth:`set_epoch`. The set only grows ("self-paced"); entries are never removed.

    Which entries are APL soft negatives is kept in the bool buffer ``apl_mask`` rather than read from
    the sign of ``state``: this keeps an observed ``-1`` (a known negative, ``l-(p)``) apart from a
    soft negative storing ``p = 1``, and a stored ``-0.0`` from an unknown (the released code's §4d
    pitfall; it only differs when ``p`` underflows to exactly 0). If ``E <= e_w`` the denominator is
    taken as 1 (the released code would divide by zero).

    Args:
        alpha: entropy weight on unknowns (§4b; default COCO's 0.1).
        beta: weight of the soft-negative loss (§4b; default COCO's 0.9).
        warmup_epoch: ``e_w``, first epoch after which APL runs (§4b; default COCO's 5).
        neg_proportion: share of each class's initial unknowns that APL labels in total (0.9).
        eps: inside ``l+``/``l-``; EM's 1e-5.
    """

    needs_train_pass = True

    def __init__(
        self,
        observed: Any,
        *,
        alpha: float = P.EMAPLParams.alpha,
        beta: float = P.EMAPLParams.beta,
        warmup_epoch: int = P.EMAPLParams.warmup_epoch,
        neg_proportion: float = P.EMAPLParams.neg_proportion,
        eps: float = P.EMAPLParams.eps,
    ) -> None:
        super().__init__(observed, alpha=alpha, eps=eps)
        self.beta = float(beta)
        self.warmup_epoch = int(warmup_epoch)
        self.neg_proportion = float(neg_proportion)
        self.register_buffer("apl_mask", torch.zeros(self.state.shape, dtype=torch.bool))
        self.register_buffer("unknown_at_start", (self.state == 0).sum(dim=0).to(torch.long))

    apl_mask: torch.Tensor
    unknown_at_start: torch.Tensor

    def _soft_mask_rows(self, rows: torch.Tensor) -> Optional[torch.Tensor]:
        return self.apl_mask[rows]

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, z, m = self._prepare(batch)
        terms = self._em_terms(p, m)
        assert m.soft is not None
        t = (-z).clamp(0.0, 1.0)
        terms["soft_neg"] = m.soft * (self.beta * soft_bce(p, t, self.eps))
        return self._finish(terms)

    def apl_per_class(self) -> torch.Tensor:
        """``m_c = floor(neg_proportion * U_c / (E - e_w))`` per class (long tensor)."""
        if self.num_epochs is None:
            raise RuntimeError("em_apl: call set_epoch(epoch, num_epochs) before end_epoch")
        denom = max(self.num_epochs - self.warmup_epoch, 1)
        # float64, in the order neg_proportion * U_c / (E - e_w), like a plain Python float computation
        vals = self.neg_proportion * self.unknown_at_start.double() / denom
        return torch.floor(vals).to(torch.long)

    @torch.no_grad()
    def end_epoch(self, probs: torch.Tensor, index: torch.Tensor, epoch: int) -> Dict[str, float]:
        """Run APL after epoch ``epoch`` on the training-set probabilities ``probs`` of rows ``index``.

        Returns ``{"apl_new": entries labelled now, "apl_total": all soft negatives so far}``.
        """
        if epoch < self.warmup_epoch:
            return {"apl_new": 0.0, "apl_total": float(self.apl_mask.sum())}
        rows = index.reshape(-1).to(device=self.state.device, dtype=torch.long)
        probs = probs.detach().to(device=self.state.device, dtype=torch.float32)
        if probs.shape != (rows.numel(), self.num_classes):
            raise ValueError(
                f"probs must be ({rows.numel()}, {self.num_classes}), got {tuple(probs.shape)}"
            )
        if torch.unique(rows).numel() != rows.numel():
            raise ValueError("end_epoch: index must not repeat rows")
        limit = self.apl_per_class().to(self.state.device)
        candidate = (self.state[rows] == 0) & ~self.apl_mask[rows]
        masked = torch.where(candidate, probs, torch.full_like(probs, math.inf))
        order = torch.sort(masked, dim=0, stable=True).indices  # ascending p per class
        count = candidate.sum(dim=0)
        take = torch.minimum(limit, count)
        rank = torch.arange(rows.numel(), device=rows.device).unsqueeze(1)
        chosen_sorted = rank < take.unsqueeze(0)
        chosen = torch.zeros_like(candidate).scatter_(0, order, chosen_sorted)
        sel_r, sel_c = chosen.nonzero(as_tuple=True)
        self.state[rows[sel_r], sel_c] = -probs[sel_r, sel_c]
        self.apl_mask[rows[sel_r], sel_c] = True
        return {"apl_new": float(sel_r.numel()), "apl_total": float(self.apl_mask.sum())}


# --------------------------------------------------------------------------------------------------
# Large Loss Matters (§3b)
# --------------------------------------------------------------------------------------------------


class _LargeLossBase(SPMLLoss):
    """Shared machinery of LL-R / LL-Ct / LL-Cp (ALGORITHMS.md §3b).

    Per entry ``L = BCEwithLogits(s, max(z, 0))`` (no ``eps``; an observed ``-1`` is a known negative
    with target 0 and is never modified). Epoch 1 (clean rate 1): no modification. Later epochs:
    ``U = 1{z = 0} L``; ``tau`` = the ``K``-th largest value of ``U`` over the flattened batch; entries
    with ``U >= tau`` are modified (ties at ``tau`` are modified, as released). Modification is limited
    to unknown entries (in the released code an observed entry could only be hit when ``tau <= 0``).
    ``K = 0`` modifies nothing. ``K`` is capped at ``B C``.

    ``delta_rel`` is the *fraction* ``Delta_rel``: the LL CLI's ``--delta_rel 0.2`` (percent) is
    ``delta_rel=0.002`` here. The per-dataset values are not published (§3c, UNVERIFIED); the default
    is 0.002.
    """

    scheme: str = ""

    def __init__(self, observed: Any, *, delta_rel: float = P.LLRParams.delta_rel) -> None:
        super().__init__(observed, 0.0)
        self.delta_rel = float(P.LLRParams(delta_rel=delta_rel).delta_rel)  # validated: in [0, 1]

    def extra_repr(self) -> str:
        return f"N={self.num_examples}, C={self.num_classes}, delta_rel={self.delta_rel:g}"

    @property
    def clean_rate(self) -> float:
        """``r_t`` of the current epoch (§3b)."""
        return ll_clean_rate(self.epoch, self.delta_rel)

    def _num_modified(self, num_entries: int) -> int:
        """``K = ceil(B C (1 - r_t))`` (LL-R, LL-Ct)."""
        return math.ceil(num_entries * (1.0 - self.clean_rate))

    def _writes_permanent(self) -> bool:
        return False

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        s, _, z, m = self._prepare(batch)
        target = (z == 1).float()
        loss = F.binary_cross_entropy_with_logits(s, target, reduction="none")
        modified = torch.zeros_like(m.unk, dtype=torch.bool)
        write = modified
        if self.clean_rate != 1.0:
            u = (m.unk * loss).detach()
            u_all = self._gather_rows(u)  # the threshold is over the global batch (module docstring)
            k = min(self._num_modified(u_all.numel()), u_all.numel())
            if k > 0:
                unknown = m.unk.bool()
                tau = torch.topk(u_all.flatten(), k).values[-1]
                modified = unknown & (u >= tau)
                write = unknown & (u > tau)
        keep = ~modified
        terms = {
            "obs_pos": m.pos * loss,
            "obs_neg": m.neg * loss,
            "unknown": (m.unk * keep.float()) * loss,
        }
        if self.scheme in ("ct", "cp"):
            corrected = F.binary_cross_entropy_with_logits(s, torch.ones_like(s), reduction="none")
            terms["corrected"] = modified.float() * corrected
        if self._writes_permanent() and self.training and bool(write.any()):
            rows = batch.index.reshape(-1).to(device=self.state.device, dtype=torch.long)
            r, c = write.nonzero(as_tuple=True)
            self.state[rows[r.to(rows.device)], c.to(rows.device)] = 1.0
        extra = {"num_modified": modified.sum().float()}
        if self._writes_permanent():
            extra["num_written"] = write.sum().float()
        return self._finish(terms, extra=extra)


@LOSSES.register("ll_r")
class LargeLossRejectionLoss(_LargeLossBase):
    """LL-R (ALGORITHMS.md §3b): the selected large unknown losses are set to 0 (rejected).

    ``K = ceil(B C (1 - r_t))``, ``1 - r_t = (t - 1) delta_rel``. See :class:`_LargeLossBase`.

    Args:
        delta_rel: clean-rate decrement per epoch as a fraction (0.002 for the CLI's 0.2%).
    """

    scheme = "r"


@LOSSES.register("ll_ct")
class LargeLossTemporaryCorrectionLoss(_LargeLossBase):
    """LL-Ct (ALGORITHMS.md §3b): the selected entries use ``BCEwithLogits(s, 1)`` for this step only.

    ``K = ceil(B C (1 - r_t))``. See :class:`_LargeLossBase`.

    Args:
        delta_rel: clean-rate decrement per epoch as a fraction (0.002 for the CLI's 0.2%).
    """

    scheme = "ct"


@LOSSES.register("ll_cp")
class LargeLossPermanentCorrectionLoss(_LargeLossBase):
    """LL-Cp (ALGORITHMS.md §3b): correct the selected entries and write ``state = 1`` permanently.

    From epoch 2, ``K = ceil(B C delta_rel)`` (constant); entries with ``U >= tau`` use
    ``BCEwithLogits(s, 1)`` and those with ``U > tau`` (strictly) are written as observed positives into
    ``state``, so later batches treat them as positives. Writes happen only in training mode
    (``self.training``). This is the ``==`` reading of the released code's scheme test.

    ``released_is_bug=True`` reproduces the code as released (§3e: ``mod_scheme is 'LL-Cp'`` is False):
    ``K`` comes from the clean rate as for LL-Ct and nothing is written, i.e. it behaves like ``ll_ct``.

    Args:
        delta_rel: per-epoch fraction ``Delta_rel`` (0.002 for the CLI's 0.2%).
        released_is_bug: reproduce the released ``is``-comparison behaviour (default False).
    """

    scheme = "cp"

    def __init__(self, observed: Any, *, delta_rel: float = P.LLCpParams.delta_rel,
                 released_is_bug: bool = P.LLCpParams.released_is_bug) -> None:
        super().__init__(observed, delta_rel=delta_rel)
        self.released_is_bug = bool(released_is_bug)

    def _num_modified(self, num_entries: int) -> int:
        if self.released_is_bug:
            return super()._num_modified(num_entries)
        return math.ceil(num_entries * self.delta_rel)

    def _writes_permanent(self) -> bool:
        return not self.released_is_bug

    def sync_state(self) -> None:
        """Union of every process's permanent writes: they only turn unknown ``0`` entries into ``+1``."""
        if self.distributed and self._writes_permanent():
            dist.all_reduce(self.state, op=dist.ReduceOp.MAX)


# --------------------------------------------------------------------------------------------------
# GR loss (§5) and the GPR loss of AEVLP (§7d)
# --------------------------------------------------------------------------------------------------


class _GRScheduled(SPMLLoss):
    """Holds the GR schedules ``(w, b, mu, sigma)`` of ALGORITHMS.md §5b, updated by :meth:`set_epoch`."""

    def __init__(
        self,
        observed: Any,
        *,
        beta: Sequence[float],
        alpha: Sequence[float],
        q2: float,
        q3: float,
        linear_init: int,
        eps: float,
    ) -> None:
        super().__init__(observed, eps)
        P.GRParams(beta=tuple(beta), alpha=tuple(alpha), q2=q2, q3=q3, linear_init=linear_init, eps=eps)  # validate
        self.beta = tuple(float(v) for v in beta)
        self.alpha = tuple(float(v) for v in alpha)
        self.q2 = float(q2)
        self.q3 = float(q3)
        self.linear_init = int(linear_init)
        self.w: Optional[float] = None
        self.b: Optional[float] = None
        self.mu: Optional[float] = None
        self.sigma: Optional[float] = None

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        super().set_epoch(epoch, num_epochs)
        self.w, self.b = gr_wb(epoch, num_epochs, self.beta, self.linear_init)
        self.mu, self.sigma = gr_mu_sigma(epoch, num_epochs, self.alpha, self.linear_init)

    def _schedule(self) -> Tuple[float, float, float, float]:
        if self.w is None or self.b is None or self.mu is None or self.sigma is None:
            raise RuntimeError(f"{type(self).__name__}: call set_epoch(epoch, num_epochs) before forward")
        return self.w, self.b, self.mu, self.sigma

    def _gr_unknown(self, p: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(v [k L+ + (1 - k) L-], v)`` per entry, ``k``/``v`` on detached ``p`` (§5a)."""
        w, b, mu, sigma = self._schedule()
        pd = p.detach()
        k = gr_k(pd, w, b)
        v = gr_v(pd, mu, sigma)
        return v * (k * gce_pos(p, self.q2) + (1.0 - k) * gce_neg(p, self.q3)), v

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, epoch={self.epoch}, w={self.w}, b={self.b}, "
            f"mu={self.mu}, sigma={self.sigma}"
        )


@LOSSES.register("gr")
class GRLoss(_GRScheduled):
    """GR loss, generalized robust loss (ALGORITHMS.md §5).

    * observed positive: ``l+(p)``;
    * unknown: ``v(p) [k(p) L+(p) + (1 - k(p)) L-(p)]`` with ``L+ = (1 - p^q2)/q2``,
      ``L- = (1 - (1-p)^q3)/q3``, ``k = sigmoid(w p + b)``, ``v = exp(-(p-mu)^2/(2 sigma^2))``, ``k`` and
      ``v`` on detached ``p``; ``(w, b, mu, sigma)`` follow the §5b schedules (call :meth:`set_epoch`);
    * observed ``-1`` (partial labels): ``l-(p)``.

    Args:
        beta: ``[w0, wT, b0, bT]`` (§5c default ``[0, 2, -2, -2]``).
        alpha: ``[mu0, sigma0, muT, sigmaT]`` (§5c default ``[0.5, 2, 0.8, 0.5]``).
        q2: GCE exponent toward positive (0.01).
        q3: GCE exponent toward negative (1: MAE).
        linear_init: ``n0``, epochs of a linear-init phase before the schedules start (0).
        eps: inside ``l+``/``l-``; GR's 1e-7.
    """

    def __init__(
        self,
        observed: Any,
        *,
        beta: Sequence[float] = P.GRParams.beta,
        alpha: Sequence[float] = P.GRParams.alpha,
        q2: float = P.GRParams.q2,
        q3: float = P.GRParams.q3,
        linear_init: int = P.GRParams.linear_init,
        eps: float = P.GRParams.eps,
    ) -> None:
        super().__init__(
            observed, beta=beta, alpha=alpha, q2=q2, q3=q3, linear_init=linear_init, eps=eps
        )

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        unknown, _ = self._gr_unknown(p)
        terms = {
            "obs_pos": m.pos * neg_log_pos(p, self.eps),
            "obs_neg": m.neg * neg_log_neg(p, self.eps),
            "unknown": m.unk * unknown,
        }
        return self._finish(terms)


@LOSSES.register("gpr")
class GPRLoss(_GRScheduled):
    """GPR loss of AEVLP (ALGORITHMS.md §7d); ``hat z = y~`` where ``z = 0``, else ``z``.

    * ``L1`` (``obs_pos``), ``z = 1``: ``l+(p)``;
    * ``L2`` (``pseudo_pos``), ``z = 0, y~ = 1``: ``w(p) [rho l+(p) + (1 - rho) l-(p)]`` with
      ``w(p) = 1 - clip(v(p), 1 - lambda1, 1 - lambda2)`` in ``[lambda2, lambda1]`` (detached);
    * ``L3`` (``unknown``), ``hat z = 0``: the GR term ``v [k L+ + (1 - k) L-]`` (§5a);
    * ``L4`` (``pseudo_neg``), ``z = 0, y~ = -1``: ``v(p) l-(p)`` (only active when the rule emits -1);
    * observed ``-1`` (``obs_neg``; partial labels, not in AEVLP): ``l-(p)`` with weight 1, like ``L1``
      for observed positives (the released code would route them to ``L4``'s ``v l-``);

    plus ``reg * ((1/B) sum_n sum_c p_nc - k)^2 / C^2``. Schedules as §5b (call :meth:`set_epoch`).
    Defaults are the COCO row of §7e.

    Args:
        beta: ``[w0, wT, b0, bT]`` (COCO/NUS/CUB ``[0, 10, -2, -8]``; VOC ``[0, 2, -2, -2]``).
        alpha: ``[mu0, sigma0, muT, sigmaT]`` (``[0.5, 2, 0.8, 0.5]`` everywhere).
        q2: GCE exponent toward positive (0.01).
        q3: GCE exponent toward negative (1; CUB 1.5).
        lambda1: upper bound of the pseudo-positive weight ``w`` (0.7; CUB 0.8).
        lambda2: lower bound of ``w`` (COCO/NUS 0.5; VOC 0.4; CUB 0.2).
        rho: label-smoothing target of pseudo-positives (0.9).
        reg: weight of the expected-positive regulariser (COCO/NUS 0.001; VOC 0.05; CUB 0.01).
        expected_positives: ``k`` of the regulariser (COCO 2.9; VOC 1.5; NUS 1.9; CUB 31.4).
        linear_init: ``n0`` of the schedules (0).
        eps: inside ``l+``/``l-``; AEVLP's 1e-7.
    """

    requires_pseudo = P.GPRParams.requires_pseudo

    def __init__(
        self,
        observed: Any,
        *,
        beta: Sequence[float] = P.GPRParams.beta,
        alpha: Sequence[float] = P.GPRParams.alpha,
        q2: float = P.GPRParams.q2,
        q3: float = P.GPRParams.q3,
        lambda1: float = P.GPRParams.lambda1,
        lambda2: float = P.GPRParams.lambda2,
        rho: float = P.GPRParams.rho,
        reg: float = P.GPRParams.reg,
        expected_positives: float = P.GPRParams.expected_positives,
        linear_init: int = P.GPRParams.linear_init,
        eps: float = P.GPRParams.eps,
    ) -> None:
        super().__init__(
            observed, beta=beta, alpha=alpha, q2=q2, q3=q3, linear_init=linear_init, eps=eps
        )
        P.GPRParams(beta=tuple(beta), alpha=tuple(alpha), q2=q2, q3=q3, lambda1=lambda1, lambda2=lambda2, rho=rho,
                    reg=reg, expected_positives=expected_positives, linear_init=linear_init, eps=eps)  # validate
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.rho = float(rho)
        self.reg = float(reg)
        self.expected_positives = float(expected_positives)

    def pseudo_pos_weight(self, v: torch.Tensor) -> torch.Tensor:
        """``w(p) = 1 - clip(v(p), 1 - lambda1, 1 - lambda2)`` (§7d)."""
        return 1.0 - v.clamp(1.0 - self.lambda1, 1.0 - self.lambda2)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        pp, pn, neutral = self._pseudo_masks(batch, p, m)
        gr_term, v = self._gr_unknown(p)
        lpos, lneg = neg_log_pos(p, self.eps), neg_log_neg(p, self.eps)
        omega = self.pseudo_pos_weight(v)
        terms = {
            "obs_pos": m.pos * lpos,
            "obs_neg": m.neg * lneg,
            "pseudo_pos": pp * omega * (self.rho * lpos + (1.0 - self.rho) * lneg),
            "unknown": neutral * gr_term,
            "pseudo_neg": pn * v * lneg,
        }
        reg = self.reg * expected_positive_regularizer(p, self.expected_positives, self.distributed)
        return self._finish(terms, reg)


# --------------------------------------------------------------------------------------------------
# VLPL (§6c)
# --------------------------------------------------------------------------------------------------


@LOSSES.register("vlpl")
class VLPLLoss(SPMLLoss):
    """VLPL's ``EM_PL`` loss (ALGORITHMS.md §6c); ``hat z = y~`` where ``z = 0``, else ``z``.

    * observed positive (``obs_pos``): ``l+(p)``;
    * ``hat z = 0`` (``unknown``): ``-alpha H(p)`` (EM);
    * pseudo-positive (``pseudo_pos``), ``z = 0, y~ = 1``:
      ``beta_pos [t l+(p) + (1 - t) l-(p)]``, ``t = pseudo_pos_target = 0.9``, ``beta_pos = 0.7``;
    * pseudo-negative (``pseudo_neg``), ``z = 0, y~ = -1``: ``beta_neg l-(p)``; ``beta_neg = 0`` by
      default, i.e. ignored as released (its form when ``beta_neg > 0`` is ours: the released negative
      branch is commented out);
    * observed ``-1`` (``obs_neg``; partial labels, not in VLPL): ``l-(p)``.

    Final loss: sum / (B C).

    Args:
        alpha: EM weight (VOC 0.2, COCO 0.1, NUS 0.1, CUB 0.01, §6d); default COCO's.
        beta_pos: weight of the pseudo-positive term (0.7).
        pseudo_pos_target: smoothed target of pseudo-positives (0.9).
        beta_neg: weight of pseudo-negatives (0: ignored, as released).
        eps: inside ``l+``/``l-``; VLPL's 1e-5.
    """

    requires_pseudo = P.VLPLLossParams.requires_pseudo

    def __init__(
        self,
        observed: Any,
        *,
        alpha: float = P.VLPLLossParams.alpha,
        beta_pos: float = P.VLPLLossParams.beta_pos,
        pseudo_pos_target: float = P.VLPLLossParams.pseudo_pos_target,
        beta_neg: float = P.VLPLLossParams.beta_neg,
        eps: float = P.VLPLLossParams.eps,
    ) -> None:
        super().__init__(observed, eps)
        self.alpha = float(alpha)
        self.beta_pos = float(beta_pos)
        self.pseudo_pos_target = float(pseudo_pos_target)
        self.beta_neg = float(beta_neg)

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        pp, pn, neutral = self._pseudo_masks(batch, p, m)
        lpos, lneg = neg_log_pos(p, self.eps), neg_log_neg(p, self.eps)
        t = self.pseudo_pos_target
        terms = {
            "obs_pos": m.pos * lpos,
            "obs_neg": m.neg * lneg,
            "unknown": neutral * (-self.alpha * binary_entropy(p, self.eps)),
            "pseudo_pos": pp * (self.beta_pos * (t * lpos + (1.0 - t) * lneg)),
            "pseudo_neg": pn * (self.beta_neg * lneg),
        }
        return self._finish(terms)


# --------------------------------------------------------------------------------------------------
# Factory helpers
# --------------------------------------------------------------------------------------------------


def create_loss(name: str, observed: Any, **hparams: Any) -> SPMLLoss:
    """Build the registered loss ``name`` on the ``(N, C)`` observed labels.

    The hyper-parameters are validated through the loss's schema (:mod:`vlpl.train.loss_params`): an
    unknown one raises :class:`vlpl.params.UnknownParamError` (a :class:`vlpl.registry.RegistryError`)
    naming it, a bad value a :class:`vlpl.params.ParamValueError` (a ``ValueError``).
    """
    return LOSSES.create(name, observed, **hparams)


def loss_defaults(name: str) -> Dict[str, Any]:
    """The hyper-parameters of loss ``name`` with their defaults, from its schema (tuples as lists)."""
    return LOSSES.schema(name).defaults()


def loss_description(name: str) -> str:
    """The one-line summary of loss ``name`` (its schema's)."""
    return LOSSES.schema(name).one_line()
