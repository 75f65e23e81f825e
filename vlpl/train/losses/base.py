"""The loss contract shared by every family: :class:`LossBatch`, :class:`SPMLLoss`, the per-entry
building blocks of ALGORITHMS.md §1 and the factory helpers (:func:`create_loss`, ...).

The conventions (notation, observed negatives, state, several processes, parameters) are in the package
docstring, :mod:`vlpl.train.losses`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from vlpl.registry import LOSSES
from vlpl.train.losses.reconstruction import ReconstructionTerm

__all__ = [
    "LossBatch",
    "ObservedLabels",
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
        observed: ``(B, C)`` int8 observed labels of the batch's rows (the trainer reads them per batch with
            ``SplitReader.observed_at``); ``None``: the loss reads the rows from the labels it was built on
            (:class:`ObservedLabels`, e.g. a small matrix in tests).
    """

    logits: torch.Tensor
    index: torch.Tensor
    pseudo: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    image_embedding: Optional[torch.Tensor] = None
    observed: Optional[torch.Tensor] = None


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


# rows per chunk when a loss reads all its observed labels (state built at construction, validation,
# EM+APL's candidates): about 16M entries, 16 MB of int8 whatever N
CHUNK_ENTRIES = 1 << 24


class ObservedLabels:
    """Row access to the ``(N, C)`` observed labels (in {-1, 0, 1}) a loss is built on, without a copy.

    Wraps either a reader with ``observed_at(positions) -> (B, C) int8`` and a shape (``shape=``, else the
    reader's ``observed_shape`` or ``shape``), e.g. :class:`vlpl.store.store.SplitReader` (training: nothing of size ``N x C`` is
    read), or an ``(N, C)`` matrix (torch tensor of any dtype, numpy array or nested lists), which is kept
    by reference (a numpy array or tensor is not copied) and validated once, chunk by chunk. A reader's
    labels are trusted (the store writes validated int8).
    """

    def __init__(self, observed: Any, shape: Optional[Tuple[int, int]] = None) -> None:
        if isinstance(observed, ObservedLabels):
            self._matrix, self._reader, self.shape = observed._matrix, observed._reader, observed.shape
            return
        self._matrix: Optional[torch.Tensor] = None
        self._reader: Any = None
        if callable(getattr(observed, "observed_at", None)) and not torch.is_tensor(observed):
            shape = shape or getattr(observed, "observed_shape", None) or getattr(observed, "shape", None)
            if shape is None or len(tuple(shape)) != 2:
                raise ValueError(f"observed: a reader must give its (N, C) shape (shape=, or its observed_shape "
                                 f"or shape); {type(observed).__name__} gives {shape!r}")
            self._reader = observed
            self.shape: Tuple[int, int] = (int(shape[0]), int(shape[1]))
            return
        mat = observed if torch.is_tensor(observed) else torch.as_tensor(np.asarray(observed))
        if mat.dim() != 2:
            raise ValueError(f"observed must be an (N, C) matrix, got shape {tuple(mat.shape)}")
        self._matrix = mat.detach()
        self.shape = (int(mat.shape[0]), int(mat.shape[1]))
        step = max(1, CHUNK_ENTRIES // max(self.shape[1], 1))
        for start in range(0, self.shape[0], step):
            rows = self._matrix[start:start + step]  # in the matrix's own dtype: 0.5 is not a label
            bad = ~((rows == 1) | (rows == 0) | (rows == -1))
            if bool(bad.any()):
                r, c = (int(v) for v in bad.nonzero()[0])
                raise ValueError(f"observed labels must be in {{-1, 0, 1}}: row {start + r}, class {c} holds "
                                 f"{rows[r, c].item()}")

    def rows(self, index: Any) -> torch.Tensor:
        """``(B, C)`` int8 labels of the rows at ``index`` (a tensor, array or list of positions): on the CPU
        for a reader, on the matrix's device for a matrix (a device matrix is not copied back to the host)."""
        pos = index.detach().to("cpu", torch.long) if torch.is_tensor(index) else \
            torch.as_tensor(np.asarray(index, dtype=np.int64))
        pos = pos.reshape(-1)
        if self._reader is not None:
            out = torch.from_numpy(np.ascontiguousarray(self._reader.observed_at(pos.numpy()), dtype=np.int8))
            if tuple(out.shape) != (pos.numel(), self.shape[1]):
                raise ValueError(f"observed_at of {type(self._reader).__name__} gave shape {tuple(out.shape)} for "
                                 f"{pos.numel()} rows; expected ({pos.numel()}, {self.shape[1]})")
            return out
        assert self._matrix is not None
        return self._matrix[pos.to(self._matrix.device)].to(dtype=torch.int8)

    def chunks(self, rows_per_chunk: Optional[int] = None) -> Iterator[Tuple[int, torch.Tensor]]:
        """``(start, (b, C) int8 rows start..start+b-1)`` over all rows, in order, a chunk at a time."""
        n, c = self.shape
        step = rows_per_chunk or max(1, CHUNK_ENTRIES // max(c, 1))
        for start in range(0, n, step):
            stop = min(n, start + step)
            if self._reader is not None:
                yield start, self.rows(torch.arange(start, stop))
            else:
                assert self._matrix is not None
                yield start, self._matrix[start:stop].to(device="cpu", dtype=torch.int8)


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
        observed: the training set's ``(N, C)`` observed labels in {-1, 0, 1}: a reader with
            ``observed_at`` and ``observed_shape`` (the trainer passes its :class:`~vlpl.store.store.SplitReader`),
            or a matrix (torch int8/float or numpy); see :class:`ObservedLabels`. A stateless loss keeps no
            copy: it reads ``batch.observed`` (or, without it, the batch's rows from ``observed``).
        eps: the ``eps`` inside ``l+`` / ``l-`` (ALGORITHMS.md §1).

    Class attributes:
        requires_pseudo: the loss needs ``batch.pseudo`` (VLPL, GPR).
        needs_train_pass: after each epoch the trainer runs the model in eval mode over the whole training
            set and calls :meth:`end_epoch` (EM+APL).
        stateful: the loss keeps per-sample state (``N`` rows) in buffers or parameters it registers in its
            ``__init__`` after ``super().__init__`` (from :attr:`observed_labels`, chunk by chunk:
            :meth:`register_label_state`, :meth:`ObservedLabels.chunks`), so that ``state_dict()`` holds it.
            A loss with ``stateful = False`` must hold no tensor with ``N`` rows (checked by the tests for
            every registered loss, and logged by the trainer: :meth:`per_sample_state`).
    """

    requires_pseudo: bool = False
    needs_train_pass: bool = False
    stateful: bool = False

    def __init__(self, observed: Any, eps: float) -> None:
        super().__init__()
        self.observed_labels = ObservedLabels(observed)
        self.eps = float(eps)
        self.epoch = 1
        self.num_epochs: Optional[int] = None
        self.distributed = False
        self.reconstruction: Optional[ReconstructionTerm] = None
        self._reconstruction_hook: Optional[Any] = None
        self.register_buffer("label_state", None)  # set by register_label_state (stateful losses)

    label_state: Optional[torch.Tensor]

    @property
    def num_examples(self) -> int:
        return int(self.observed_labels.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.observed_labels.shape[1])

    # -- per-sample state ------------------------------------------------------------------------------

    def register_label_state(self) -> None:
        """Keep a writable ``(N, C)`` int8 copy of the observed labels as the buffer ``label_state``
        (1 byte an entry; built chunk by chunk, no full-size temporary). :meth:`_prepare` then reads the
        batch's labels from it instead of ``batch.observed``, so writes into it (LL-Cp's corrections) change
        later batches, and it is checkpointed with the loss. For ``stateful`` losses only."""
        if not self.stateful:
            raise TypeError(f"{type(self).__name__}: register_label_state needs stateful = True")
        buf = torch.empty(self.observed_labels.shape, dtype=torch.int8)
        for start, rows in self.observed_labels.chunks():
            buf[start:start + rows.shape[0]] = rows
        self.register_buffer("label_state", buf)

    def per_sample_state(self) -> Dict[str, Tuple[int, ...]]:
        """Shapes of the tensors in ``state_dict()`` with ``N`` (= :attr:`num_examples`) rows: the loss's
        per-sample state. Empty for a stateless loss (unless ``N`` happens to equal another dimension)."""
        n = self.num_examples
        return {k: tuple(v.shape) for k, v in self.state_dict().items()
                if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n}

    @property
    def state(self) -> torch.Tensor:
        """The ``(N, C)`` float32 label state, materialised on demand for inspection and tests: the observed
        labels with the loss's own changes (LL-Cp's corrections; EM+APL's soft negatives as ``-p``). It is
        built at every access (``N x C x 4`` bytes): training never reads it."""
        if self.label_state is not None:
            return self.label_state.float()
        out = torch.empty(self.observed_labels.shape, dtype=torch.float32)
        for start, rows in self.observed_labels.chunks():
            out[start:start + rows.shape[0]] = rows
        return out

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Reads checkpoints written before the compact state too (their float32 ``state`` buffer)."""
        old = state_dict.get(prefix + "state")
        if old is not None:
            self._upgrade_state(state_dict, prefix, state_dict.pop(prefix + "state"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _upgrade_state(self, state_dict: Dict[str, Any], prefix: str, old_state: torch.Tensor) -> None:
        """Turn an old float32 ``state`` (observed labels plus the loss's writes) into this loss's buffers."""
        if self.label_state is not None and prefix + "label_state" not in state_dict:
            state_dict[prefix + "label_state"] = old_state.to(torch.int8)

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

    # -- the trainer's hooks (no-ops here; CSL uses them) ----------------------------------------------

    @classmethod
    def prepare_training(cls, cfg: Any) -> Any:
        """Called by ``run_train`` with the training config before ``setup``; returns the config to train with
        (CSL computes its class prior here, training a temporary model as its own run). Default: ``cfg``."""
        return cfg

    def bind_model(self, model: nn.Module) -> None:
        """Called once in ``setup`` with the student, before a checkpoint is restored (CSL keeps its EMA)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (CSL updates its EMA model)."""

    def eval_models(self) -> Dict[str, nn.Module]:
        """Extra models that ``validate`` scores beside the student, by name (CSL: ``{"ema": ...}``)."""
        return {}

    def end_epoch(self, probs: torch.Tensor, index: torch.Tensor, epoch: int) -> Dict[str, float]:
        """Hook after the training pass of ``epoch``, on all rows' probabilities at once (only called when
        ``needs_train_pass``)."""
        return {}

    def end_epoch_stream(self, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], epoch: int,
                         workdir: Optional[Path] = None) -> Dict[str, float]:
        """The hook the trainer calls after the training pass of ``epoch`` (when ``needs_train_pass``):
        ``batches`` yields ``(probs (b, C), positions (b,))`` covering the training set once, lazily (the
        pass runs as they are read); ``workdir`` is a folder for scratch files. Default: the batches
        gathered into one ``(N, C)`` matrix for :meth:`end_epoch` (``N x C x 4`` bytes); a loss whose pass
        must stay bounded in memory overrides it (EM+APL)."""
        probs, index = [], []
        for p, k in batches:
            probs.append(p.detach().float().cpu())
            index.append(k.reshape(-1).cpu())
        if not probs:
            return self.end_epoch(torch.zeros(0, self.num_classes), torch.zeros(0, dtype=torch.long), epoch)
        return self.end_epoch(torch.cat(probs), torch.cat(index), epoch)

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

    def _label_rows(self, batch: LossBatch, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``(B, C)`` int8 labels of the batch on ``device``: ``label_state`` rows (stateful losses that keep
        one), else ``batch.observed``, else the rows read from :attr:`observed_labels`."""
        if self.label_state is not None:
            return self.label_state[rows.to(self.label_state.device)].to(device)
        if batch.observed is not None:
            z = batch.observed
            if tuple(z.shape) != (rows.numel(), self.num_classes):
                raise ValueError(f"batch.observed must be ({rows.numel()}, {self.num_classes}), got "
                                 f"{tuple(z.shape)}")
            return z.to(device, non_blocking=True)
        return self.observed_labels.rows(rows).to(device, non_blocking=True)

    def _prepare(self, batch: LossBatch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Masks]:
        """Return ``(s, p, z, masks)`` for the batch: float32 logits, probabilities, the ``(B, C)`` int8
        labels of its rows (:meth:`_label_rows`) and the float masks. Loss code reads labels only here."""
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
        z = self._label_rows(batch, index, s.device)
        soft = self._soft_mask_rows(index)
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
    """Build the registered loss ``name`` on the ``(N, C)`` observed labels (a reader such as a
    :class:`~vlpl.store.store.SplitReader`, or a matrix: :class:`ObservedLabels`).

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
