"""Large Loss Matters (ALGORITHMS.md §3b): ``ll_r``, ``ll_ct``, ``ll_cp``."""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlpl.registry import LOSSES
from vlpl.train import loss_params as P
from vlpl.train.losses.base import LossBatch, SPMLLoss
from vlpl.train.schedules import ll_clean_rate


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
        if self._writes_permanent() and self.training and self.label_state is not None and bool(write.any()):
            rows = batch.index.reshape(-1).to(device=self.label_state.device, dtype=torch.long)
            r, c = write.nonzero(as_tuple=True)
            self.label_state[rows[r.to(rows.device)], c.to(rows.device)] = 1
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
    the label state, so later batches treat them as positives. Writes happen only in training mode
    (``self.training``). This is the ``==`` reading of the released code's scheme test.

    Stateful: the label state is the int8 ``N x C`` buffer ``label_state`` (the observed labels plus the
    corrections, 1 byte an entry; :meth:`SPMLLoss.register_label_state`).

    ``released_is_bug=True`` reproduces the code as released (§3e: ``mod_scheme is 'LL-Cp'`` is False):
    ``K`` comes from the clean rate as for LL-Ct and nothing is written, i.e. it behaves like ``ll_ct``
    (and keeps no label state).

    Args:
        delta_rel: per-epoch fraction ``Delta_rel`` (0.002 for the CLI's 0.2%).
        released_is_bug: reproduce the released ``is``-comparison behaviour (default False).
    """

    scheme = "cp"
    stateful = True

    def __init__(self, observed: Any, *, delta_rel: float = P.LLCpParams.delta_rel,
                 released_is_bug: bool = P.LLCpParams.released_is_bug) -> None:
        super().__init__(observed, delta_rel=delta_rel)
        self.released_is_bug = bool(released_is_bug)
        if self._writes_permanent():
            self.register_label_state()

    def _num_modified(self, num_entries: int) -> int:
        if self.released_is_bug:
            return super()._num_modified(num_entries)
        return math.ceil(num_entries * self.delta_rel)

    def _writes_permanent(self) -> bool:
        return not self.released_is_bug

    def sync_state(self) -> None:
        """Union of every process's permanent writes: they only turn unknown ``0`` entries into ``+1``."""
        if self.distributed and self.label_state is not None:
            dist.all_reduce(self.label_state, op=dist.ReduceOp.MAX)
