"""Entropy maximisation and EM + APL (ALGORITHMS.md §4a): ``em``, ``em_apl``."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np
import torch

from vlpl.registry import LOSSES
from vlpl.train import loss_params as P
from vlpl.train.losses.base import (
    LossBatch,
    SPMLLoss,
    _Masks,
    binary_entropy,
    neg_log_neg,
    neg_log_pos,
    soft_bce,
)


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


# entries of one class block of EM+APL's streamed selection (float32 probabilities of all N rows, and
# the stable sort's int64 indices): about 4M, 48 MB, whatever N
APL_BLOCK_ENTRIES = 1 << 22


@LOSSES.register("em_apl")
class EMAPLLoss(EntropyMaximizationLoss):
    """EM + APL, asymmetric pseudo-labelling (ALGORITHMS.md §4a), as released (soft negatives only).

    Loss per entry: as ``em``, plus for APL soft negatives ``beta [t l+(p) + (1 - t) l-(p)]`` with
    ``t`` the stored score, logged as ``soft_neg``.

    APL (:meth:`end_epoch`, after the training pass of every epoch ``e >= warmup_epoch``; the trainer
    runs the model in eval mode over the training set): for each class ``c``, among entries still
    unknown, take the ``m_c = floor(neg_proportion * U_c / (E - e_w))`` with the lowest ``p`` (ties: the
    earlier position in ``index``) and store ``p`` as their soft target. ``U_c`` is the number of unknown
    entries of class ``c`` at the start of training (buffer ``unknown_at_start``); ``E`` comes from
    :meth:`set_epoch`. The set only grows ("self-paced"); entries are never removed.

    Stateful: the soft targets are the float32 ``N x C`` buffer ``apl_target``, NaN where an entry is not
    a soft negative (4 bytes an entry; the observed labels are not copied: they come with the batch). The
    targets stay float32 because they are the model's float32 ``p``: a float16 copy would move them by up
    to 2^-11 relative and flush ``p < 6e-8`` to 0, changing the loss. ``apl_mask`` (which entries are soft
    negatives) is derived from it: a NaN sentinel keeps an observed ``-1`` (a known negative, ``l-(p)``)
    apart from a soft negative storing ``p = 1``, and a stored ``p = 0`` from an unknown (the released
    code's §4d pitfall, where ``-0.0`` read as unknown). :attr:`state` shows them as ``-p``, as released.
    If ``E <= e_w`` the denominator is taken as 1 (the released code would divide by zero).

    Args:
        alpha: entropy weight on unknowns (§4b; default COCO's 0.1).
        beta: weight of the soft-negative loss (§4b; default COCO's 0.9).
        warmup_epoch: ``e_w``, first epoch after which APL runs (§4b; default COCO's 5).
        neg_proportion: share of each class's initial unknowns that APL labels in total (0.9).
        eps: inside ``l+``/``l-``; EM's 1e-5.
    """

    needs_train_pass = True
    stateful = True

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
        self.register_buffer("apl_target", torch.full(self.observed_labels.shape, math.nan, dtype=torch.float32))
        unknown = torch.zeros(self.num_classes, dtype=torch.long)
        for _, rows in self.observed_labels.chunks():
            unknown += (rows == 0).sum(dim=0)
        self.register_buffer("unknown_at_start", unknown)

    apl_target: torch.Tensor
    unknown_at_start: torch.Tensor

    @property
    def apl_mask(self) -> torch.Tensor:
        """``(N, C)`` bool: the APL soft negatives so far (built at every access)."""
        return ~torch.isnan(self.apl_target)

    @property
    def state(self) -> torch.Tensor:
        """``(N, C)`` float32: the observed labels, with ``-p`` at the soft negatives (as released)."""
        out = super().state
        out = out.to(self.apl_target.device)
        soft = ~torch.isnan(self.apl_target)
        out[soft] = -self.apl_target[soft]
        return out

    def _upgrade_state(self, state_dict: Dict[str, Any], prefix: str, old_state: torch.Tensor) -> None:
        """An old checkpoint's float32 ``state`` (``-p`` at the soft negatives) and bool ``apl_mask``."""
        mask = state_dict.pop(prefix + "apl_mask", None)
        if mask is not None and prefix + "apl_target" not in state_dict:
            state_dict[prefix + "apl_target"] = torch.where(mask.bool(), -old_state.float(),
                                                             torch.full_like(old_state, math.nan, dtype=torch.float32))

    def _soft_mask_rows(self, rows: torch.Tensor) -> Optional[torch.Tensor]:
        return ~torch.isnan(self.apl_target[rows.to(self.apl_target.device, torch.long)])

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        terms = self._em_terms(p, m)
        assert m.soft is not None
        rows = batch.index.reshape(-1).to(self.apl_target.device, torch.long)
        t = torch.nan_to_num(self.apl_target[rows].to(p.device), nan=0.0)  # the stored p; 0 (unused) elsewhere
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

    def _apl_total(self) -> float:
        n, c = self.observed_labels.shape
        step = max(1, APL_BLOCK_ENTRIES // max(c, 1))
        return float(sum(int((~torch.isnan(self.apl_target[r:r + step])).sum()) for r in range(0, n, step)))

    def _masked(self, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``probs`` where the entry is still unknown (observed 0, not yet a soft negative), else ``inf``."""
        dev = self.apl_target.device
        candidate = (self.observed_labels.rows(rows).to(dev) == 0) & torch.isnan(self.apl_target[rows.to(dev)])
        return torch.where(candidate, probs.to(dev), torch.full((), math.inf, device=dev))

    def _select(self, masked: torch.Tensor, rows: torch.Tensor, c0: int, limit: torch.Tensor) -> int:
        """Label, in classes ``c0 ..`` of the ``(n, k)`` candidate probabilities ``masked`` (``inf``: not a
        candidate) of ``rows``, the ``limit`` lowest per class (stable: ties go to the earlier row of
        ``masked``). Returns the number of entries labelled."""
        dev = self.apl_target.device
        masked, rows = masked.to(dev), rows.to(dev)
        order = torch.sort(masked, dim=0, stable=True).indices  # ascending p per class
        count = (masked != math.inf).sum(dim=0)
        take = torch.minimum(limit[c0:c0 + masked.shape[1]].to(dev), count)
        rank = torch.arange(masked.shape[0], device=dev).unsqueeze(1)
        chosen = torch.zeros(masked.shape, dtype=torch.bool, device=dev).scatter_(0, order, rank < take.unsqueeze(0))
        sel_r, sel_c = chosen.nonzero(as_tuple=True)
        self.apl_target[rows[sel_r], c0 + sel_c] = masked[sel_r, sel_c]
        return int(sel_r.numel())

    @torch.no_grad()
    def end_epoch(self, probs: torch.Tensor, index: torch.Tensor, epoch: int) -> Dict[str, float]:
        """Run APL after epoch ``epoch`` on the training-set probabilities ``probs`` of rows ``index``, all
        in memory (small sets, tests; the trainer streams: :meth:`end_epoch_stream`).

        Returns ``{"apl_new": entries labelled now, "apl_total": all soft negatives so far}``.
        """
        if epoch < self.warmup_epoch:
            return {"apl_new": 0.0, "apl_total": self._apl_total()}
        rows = index.reshape(-1).to(device=self.apl_target.device, dtype=torch.long)
        probs = probs.detach().to(device=self.apl_target.device, dtype=torch.float32)
        if probs.shape != (rows.numel(), self.num_classes):
            raise ValueError(
                f"probs must be ({rows.numel()}, {self.num_classes}), got {tuple(probs.shape)}"
            )
        if torch.unique(rows).numel() != rows.numel():
            raise ValueError("end_epoch: index must not repeat rows")
        new = self._select(self._masked(probs, rows), rows, 0, self.apl_per_class())
        return {"apl_new": float(new), "apl_total": self._apl_total()}

    @torch.no_grad()
    def end_epoch_stream(self, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], epoch: int,
                         workdir: Optional[Path] = None) -> Dict[str, float]:
        """:meth:`end_epoch` on the training pass streamed: ``(probs (b, C), positions (b,))`` batches that
        cover every row ``0..N-1`` once, in any order; the result is that of :meth:`end_epoch` on all rows
        in position order. Before ``warmup_epoch`` the batches are not read (the pass does not run).

        Memory stays bounded whatever ``N``: each batch's candidate probabilities (``inf`` where the entry
        is not a candidate) go to a scratch file in ``workdir`` (default: the system's temporary folder;
        ``N x C x 4`` bytes, deleted after), laid out by blocks of classes; each block (``APL_BLOCK_ENTRIES``
        entries) is then read back and selected on its own.
        """
        if epoch < self.warmup_epoch:
            return {"apl_new": 0.0, "apl_total": self._apl_total()}
        n, num_classes = self.observed_labels.shape
        k = max(1, min(num_classes, APL_BLOCK_ENTRIES // max(n, 1)))
        blocks = [(c0, min(num_classes, c0 + k)) for c0 in range(0, num_classes, k)]
        seen = torch.zeros(n, dtype=torch.bool)
        limit = self.apl_per_class()
        new = 0
        with tempfile.TemporaryDirectory(prefix="vlpl-apl-", dir=workdir) as tmp, \
                open(Path(tmp) / "candidates.f32", "w+b") as f:
            f.truncate(n * num_classes * 4)
            fd = f.fileno()
            for probs, index in batches:
                rows = index.reshape(-1).to("cpu", torch.long)
                if probs.shape != (rows.numel(), num_classes):
                    raise ValueError(f"end_epoch_stream: probs must be ({rows.numel()}, {num_classes}), got "
                                     f"{tuple(probs.shape)}")
                if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n):
                    raise IndexError(f"end_epoch_stream: positions must be in [0, {n})")
                if bool(seen[rows].any()) or torch.unique(rows).numel() != rows.numel():
                    raise ValueError("end_epoch_stream: a row came twice in the training pass")
                seen[rows] = True
                order = torch.argsort(rows)
                rows = rows[order]
                masked = self._masked(probs.detach().float()[order.to(probs.device)], rows).cpu().numpy()
                cuts = (np.flatnonzero(np.diff(rows.numpy()) != 1) + 1).tolist()
                for a, b in zip([0] + cuts, cuts + [len(rows)]):  # runs of consecutive rows
                    r0 = int(rows[a])
                    for c0, c1 in blocks:
                        os.pwrite(fd, np.ascontiguousarray(masked[a:b, c0:c1]).tobytes(),
                                  4 * (c0 * n + r0 * (c1 - c0)))
            if not bool(seen.all()):
                raise ValueError(f"end_epoch_stream: the training pass gave {int(seen.sum())} of {n} rows")
            all_rows = torch.arange(n)
            for c0, c1 in blocks:
                block = np.empty((n, c1 - c0), dtype=np.float32)
                f.seek(4 * c0 * n)
                if f.readinto(memoryview(block).cast("B")) != block.nbytes:
                    raise OSError(f"end_epoch_stream: short read of {Path(tmp) / 'candidates.f32'}")
                new += self._select(torch.from_numpy(block), all_rows, c0, limit)
        return {"apl_new": float(new), "apl_total": self._apl_total()}
