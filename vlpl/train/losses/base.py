"""The loss contract shared by every family: :class:`LossBatch`, :class:`SPMLLoss`, the per-entry
building blocks of ALGORITHMS.md §1 and the factory helpers (:func:`create_loss`, ...).

The conventions (notation, observed negatives, state, several processes, parameters) are in the package
docstring, :mod:`vlpl.train.losses`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from vlpl.registry import LOSSES
from vlpl.train.losses.reconstruction import ReconstructionTerm

__all__ = [
    "LossBatch",
    "SPMLLoss",
    "create_loss",
    "loss_defaults",
    "loss_description",
    "neg_log_pos",
    "neg_log_neg",
    "soft_bce",
    "binary_entropy",
    "expected_positive_regularizer",
]


@dataclass
class LossBatch:
    """What the trainer hands a loss at every step.

    Attributes:
        logits: ``(B, C)`` classifier logits (requires grad).
        index: ``(B,)`` long row indices of the batch into the training set ``0 .. N-1``.
        pseudo: ``(B, C)`` int8 pseudo-labels in {-1, 0, 1} for this step (from a rule), or ``None``.
        features: ``(B, F)`` the head's reconstruction feature (its auxiliary output
            ``"reconstruction"``), only handed over when the loss has the reconstruction term on
            (:meth:`SPMLLoss.set_reconstruction`, Decision 5); else ``None``.
        image_embedding: ``(B, D)`` float32 the teacher's cached image embeddings of the batch's images
            (``SplitReader.image_embeddings``), with ``features``; else ``None``.
    """

    logits: torch.Tensor
    index: torch.Tensor
    pseudo: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    image_embedding: Optional[torch.Tensor] = None


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
        self.reconstruction: Optional[ReconstructionTerm] = None
        self._reconstruction_hook: Optional[Any] = None

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
        """Extra trainable parameters of the loss with their learning rate: none of its own by default, plus
        the reconstruction projection when that term is on. A subclass with parameters of its own returns
        its groups ``+ super().param_groups(lr)``."""
        return self.reconstruction.param_groups(lr) if self.reconstruction is not None else []

    # -- the reconstruction term (Decision 5, ours, off by default) -------------------------------------

    @property
    def uses_features(self) -> bool:
        """Whether :meth:`forward` needs ``batch.features`` and ``batch.image_embedding`` (the
        reconstruction term is on): the trainer then asks the model for its auxiliary outputs and reads the
        teacher's image embeddings of the batch from the store."""
        return self.reconstruction is not None

    def set_reconstruction(self, term: Optional[ReconstructionTerm]) -> None:
        """Add (or, with ``None``, remove) the reconstruction term of Decision 5
        (:class:`~vlpl.train.losses.reconstruction.ReconstructionTerm`) to this loss, whatever its kind.

        With a term, every call returns ``loss + term(batch.features, batch.image_embedding)`` and the term
        as ``recon`` (the logged terms still add up to ``loss``); its projection joins :meth:`param_groups`
        and ``state_dict()``. Without one (the default) nothing is registered: the loss's values, state and
        parameters are those of the loss alone. Call it before building the optimizer.
        """
        if self._reconstruction_hook is not None:
            self._reconstruction_hook.remove()
            self._reconstruction_hook = None
        if "reconstruction" in self._modules:
            del self._modules["reconstruction"]
        self.reconstruction = term
        if term is not None:
            self._reconstruction_hook = self.register_forward_hook(_add_reconstruction)

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
# Factory helpers
# --------------------------------------------------------------------------------------------------


def _add_reconstruction(module: SPMLLoss, args: Tuple[Any, ...], out: Dict[str, torch.Tensor]
                        ) -> Dict[str, torch.Tensor]:
    """Forward hook of :meth:`SPMLLoss.set_reconstruction`: ``loss += recon`` after the loss's own forward."""
    term = module.reconstruction
    if term is None:  # pragma: no cover - the hook is removed with the term
        return out
    batch = args[0]
    if batch.features is None or batch.image_embedding is None:
        raise ValueError(f"loss {type(module).__name__} has the reconstruction term on: the batch needs the head's "
                         f"reconstruction feature (features) and the teacher's image embeddings (image_embedding)")
    recon = term(batch.features, batch.image_embedding)
    return {**out, "loss": out["loss"] + recon, "recon": recon.detach()}


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
