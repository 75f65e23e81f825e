"""The reconstruction term of Decision 5 (ours, off by default; ALGORITHMS.md "Decisions", 5).

SigRL's paper names a *visual feature reconstruction*, but its released code has no reconstruction loss
(ALGORITHMS.md §8c: "reconstruction" is architectural). This project adds one as its own extension, labelled
as such: a feature the head summarises the image with (for the ``sigrl`` head the pooled SVFR output; a head
without one gives the backbone's pooled feature), projected by a learned linear map ``P`` (F -> D, no
bias), reconstructs the frozen teacher's cached CLIP image embedding ``e`` of the same image, read from the
score store (the global, unflipped view)::

    L_rec = weight * (1/B) sum_n (1 - cos(P f_n, e_n))

It is added to any registered loss (:meth:`vlpl.train.losses.SPMLLoss.set_reconstruction`; config
``loss.reconstruction``: the weight, ``0`` = off). ``P`` belongs to the loss, not to the saved model: it is
trained with the loss's own parameter groups (at the head's learning rate), checkpointed in the loss's
``state_dict`` and, under several processes, its gradients are averaged by
:meth:`~vlpl.train.losses.SPMLLoss.average_gradients`. The term is a per-image mean, so equal-sized
process slices give the 1-process gradient after averaging (no collective needed).

Not in any paper: the weight, the cosine form (Decision 5's choice, scale-free, like CLIP's own similarity)
and the use of the unflipped global view's embedding for a student that sees flipped crops are ours.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["ReconstructionTerm", "AUX_RECONSTRUCTION"]

#: the key of the head's auxiliary output that the term reconstructs from
#: (``Classifier.forward(x, with_aux=True)`` returns ``(logits, {AUX_RECONSTRUCTION: (B, F)})``)
AUX_RECONSTRUCTION = "reconstruction"


class ReconstructionTerm(nn.Module):
    """``weight * mean_n (1 - cos(P f_n, e_n))`` with a learned projection ``P`` (``proj``, F -> D).

    Args:
        feature_dim: F, the width of the head's reconstruction feature (the student's feature width).
        target_dim: D, the width of the teacher's cached image embeddings (the store's ``embedding_dim``).
        weight: the term's weight (> 0; off is "no term", not weight 0).
        lr: learning rate of ``P`` (``None``: the learning rate handed to :meth:`param_groups`).
        seed: seed of ``P``'s initialisation (``U(-1/sqrt(F), 1/sqrt(F))``, ``nn.Linear``'s default
            distribution, drawn from its own generator so the global RNG stream is not touched).
    """

    def __init__(self, feature_dim: int, target_dim: int, weight: float, lr: Optional[float] = None,
                 seed: int = 0) -> None:
        super().__init__()
        if int(feature_dim) < 1 or int(target_dim) < 1:
            raise ValueError(f"reconstruction: feature_dim and target_dim must be >= 1, got {feature_dim}, "
                             f"{target_dim}")
        if not (math.isfinite(float(weight)) and float(weight) > 0):
            raise ValueError(f"reconstruction: weight must be a finite number > 0, got {weight}")
        if lr is not None and not float(lr) > 0:
            raise ValueError(f"reconstruction: lr must be > 0 or None, got {lr}")
        self.feature_dim, self.target_dim = int(feature_dim), int(target_dim)
        self.weight = float(weight)
        self.lr = None if lr is None else float(lr)
        gen = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(self.feature_dim)
        init = (2.0 * torch.rand((self.target_dim, self.feature_dim), generator=gen) - 1.0) * bound
        self.proj = nn.utils.skip_init(nn.Linear, self.feature_dim, self.target_dim, bias=False)  # no RNG draw
        with torch.no_grad():
            self.proj.weight.copy_(init)

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}, lr={self.lr}"

    def distance(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B,)`` per-image ``1 - cos(P f_n, e_n)`` in float32 (AMP-safe)."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"reconstruction: features must be (B, {self.feature_dim}), got {tuple(features.shape)}")
        if target.shape != (features.shape[0], self.target_dim):
            raise ValueError(f"reconstruction: image embeddings must be ({features.shape[0]}, {self.target_dim}), "
                             f"got {tuple(target.shape)}")
        pred = F.linear(features.float(), self.proj.weight.float())
        cos = F.cosine_similarity(pred, target.to(pred.device).float(), dim=1, eps=1e-8)
        return 1.0 - cos

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The weighted batch mean ``weight * mean_n (1 - cos(P f_n, e_n))`` (a scalar)."""
        return self.weight * self.distance(features, target).mean()

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """``P`` at ``self.lr`` (or ``lr``), as an optimizer group named ``reconstruction``."""
        return [{"params": [self.proj.weight], "lr": self.lr if self.lr is not None else lr,
                 "name": "reconstruction"}]
