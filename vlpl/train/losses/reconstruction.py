"""The reconstruction term of Decision 5 (ours, off by default; ALGORITHMS.md "Decisions", 5).

SigRL's paper names a *visual feature reconstruction*, but its released code has no reconstruction loss
(ALGORITHMS.md §8c: "reconstruction" is architectural). This project adds one as its own extension, labelled
as such: the head's reconstruction feature ``f`` (its auxiliary output ``aux["reconstruction"]``, see
:meth:`vlpl.train.model.Classifier.forward`: for the ``sigrl`` head the pooled SVFR output, through the
head's own ``Linear(F, reconstruct_dim)`` when that is set; for a head that gives none, e.g. ``linear``, the
backbone's pooled feature), projected by ``P``, reconstructs the frozen teacher's cached CLIP image
embedding ``e`` of the same image, read from the score store (``SplitReader.image_embeddings``)::

    L_rec = weight * (1/B) sum_n (1 - cos(P f_n, e_n))

``P`` is a learned linear map (F' -> D, no bias) when the feature's width F' differs from the store's
embedding width D, else the identity (the head already projects, or the student's pooled feature is
already D-wide, e.g. an open_clip student of the teacher's family: then the term is a feature-distillation
cosine, like SigRL's open-vocabulary ``L_Global`` with 1 - cos for its L1).

It is added to any registered loss (:meth:`vlpl.train.losses.SPMLLoss.set_reconstruction`; config
``loss.reconstruction``: the weight, ``0`` = off; :func:`build_reconstruction` sizes it for a run). ``P``
belongs to the loss, not to the saved model: it is trained with the loss's parameter groups (at the head's
learning rate), checkpointed in the loss's ``state_dict`` and, under several processes, its gradients are
averaged by :meth:`~vlpl.train.losses.SPMLLoss.average_gradients`. The term is a per-image mean, so
equal-sized process slices give the 1-process gradient after averaging (no collective needed).

Not in any paper: the weight, the cosine form (Decision 5's choice, scale-free, like CLIP's own similarity)
and the use of the unflipped global view's embedding for a student that sees flipped crops are ours.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["ReconstructionTerm", "AUX_RECONSTRUCTION", "build_reconstruction", "probe_reconstruction_feature"]

#: the key of the head's auxiliary output that the term reconstructs from
#: (``Classifier.forward(x, with_aux=True)`` returns ``(logits, {AUX_RECONSTRUCTION: (B, F)})``)
AUX_RECONSTRUCTION = "reconstruction"


class ReconstructionTerm(nn.Module):
    """``weight * mean_n (1 - cos(P f_n, e_n))`` with ``P`` the learned projection ``proj`` (F -> D, no bias),
    or the identity with ``project=False`` (then F must equal D and the term has no parameters).

    Args:
        feature_dim: F, the width of the head's reconstruction feature.
        target_dim: D, the width of the teacher's cached image embeddings (the store's ``embedding_dim``).
        weight: the term's weight (> 0; off is "no term", not weight 0).
        lr: learning rate of ``P`` (``None``: the learning rate handed to :meth:`param_groups`).
        seed: seed of ``P``'s initialisation (``U(-1/sqrt(F), 1/sqrt(F))``, ``nn.Linear``'s default
            distribution, drawn from its own generator so the global RNG stream is not touched).
        project: learn ``P`` (default) or use the identity.
    """

    def __init__(self, feature_dim: int, target_dim: int, weight: float, lr: Optional[float] = None,
                 seed: int = 0, project: bool = True) -> None:
        super().__init__()
        if int(feature_dim) < 1 or int(target_dim) < 1:
            raise ValueError(f"reconstruction: feature_dim and target_dim must be >= 1, got {feature_dim}, "
                             f"{target_dim}")
        if not (math.isfinite(float(weight)) and float(weight) > 0):
            raise ValueError(f"reconstruction: weight must be a finite number > 0, got {weight}")
        if lr is not None and not float(lr) > 0:
            raise ValueError(f"reconstruction: lr must be > 0 or None, got {lr}")
        if not project and int(feature_dim) != int(target_dim):
            raise ValueError(f"reconstruction: without a projection the feature width ({feature_dim}) must equal "
                             f"the image embedding width ({target_dim})")
        self.feature_dim, self.target_dim = int(feature_dim), int(target_dim)
        self.weight = float(weight)
        self.lr = None if lr is None else float(lr)
        self.proj: Optional[nn.Linear] = None
        if project:
            gen = torch.Generator().manual_seed(int(seed))
            bound = 1.0 / math.sqrt(self.feature_dim)
            init = (2.0 * torch.rand((self.target_dim, self.feature_dim), generator=gen) - 1.0) * bound
            self.proj = nn.utils.skip_init(nn.Linear, self.feature_dim, self.target_dim, bias=False)  # no RNG draw
            with torch.no_grad():
                self.proj.weight.copy_(init)

    def extra_repr(self) -> str:
        return (f"{self.feature_dim} -> {self.target_dim}, projection={self.proj is not None}, "
                f"weight={self.weight:g}, lr={self.lr}")

    def distance(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B,)`` per-image ``1 - cos(P f_n, e_n)`` in float32 (AMP-safe)."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"reconstruction: features must be (B, {self.feature_dim}), got {tuple(features.shape)}")
        if target.shape != (features.shape[0], self.target_dim):
            raise ValueError(f"reconstruction: image embeddings must be ({features.shape[0]}, {self.target_dim}), "
                             f"got {tuple(target.shape)}")
        pred = features.float()
        if self.proj is not None:
            pred = F.linear(pred, self.proj.weight.float())
        cos = F.cosine_similarity(pred, target.to(pred.device).float(), dim=1, eps=1e-8)
        return 1.0 - cos

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The weighted batch mean ``weight * mean_n (1 - cos(P f_n, e_n))`` (a scalar)."""
        return self.weight * self.distance(features, target).mean()

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """``P`` at ``self.lr`` (or ``lr``), as an optimizer group named ``reconstruction`` (none without ``P``)."""
        if self.proj is None:
            return []
        return [{"params": [self.proj.weight], "lr": self.lr if self.lr is not None else lr,
                 "name": "reconstruction"}]


def probe_reconstruction_feature(model: nn.Module, image_size: int) -> Tuple[int, str]:
    """``(F', source)``: the width of ``model``'s reconstruction feature and where it comes from
    (``"head"``: the head's ``aux["reconstruction"]``; ``"pooled"``: the backbone's pooled feature), read from
    one forward pass of a blank image in eval mode without gradients (no weight, buffer or RNG changes)."""
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()
    try:
        with torch.no_grad():
            _, aux = model(torch.zeros(1, 3, int(image_size), int(image_size), device=device), with_aux=True)
    finally:
        model.train(was_training)
    head_aux = getattr(getattr(model, "head", None), "aux", None) or {}
    feature = aux[AUX_RECONSTRUCTION]
    if feature.dim() != 2:
        raise ValueError(f"reconstruction: the model's reconstruction feature must be (B, F), got "
                         f"{tuple(feature.shape)}")
    return int(feature.shape[1]), ("head" if AUX_RECONSTRUCTION in head_aux else "pooled")


def build_reconstruction(model: nn.Module, weight: float, target_dim: int, image_size: int,
                         lr: Optional[float] = None, seed: int = 0) -> ReconstructionTerm:
    """The term for a run: ``model`` a :class:`~vlpl.train.model.Classifier`, ``target_dim`` the store's
    ``embedding_dim`` (0: the store has no image embeddings, an error), ``lr`` the head's learning rate. The
    projection is learned iff the feature width differs from ``target_dim``."""
    if int(target_dim) < 1:
        raise ValueError("the term needs the teacher's image embeddings, but the store has none (embedding_dim "
                         "0): rebuild it with `vlpl pseudolabel`, or set loss.reconstruction: 0")
    width, source = probe_reconstruction_feature(model, image_size)
    head = getattr(model, "head", None)
    if source == "pooled" and getattr(head, "aux", None) is not None:
        log.warning("reconstruction: head %s gave no 'reconstruction' output (sigrl: svfr is off), so the "
                    "backbone's pooled feature is reconstructed instead of the pooled SVFR output of Decision 5",
                    type(head).__name__)
    term = ReconstructionTerm(width, int(target_dim), weight, lr=lr, seed=seed, project=width != int(target_dim))
    log.info("reconstruction term (Decision 5, ours): weight %g, from the %s feature (%d wide) to the teacher's "
             "%d-d image embeddings, %s", term.weight, "head's reconstruction" if source == "head" else
             "backbone's pooled", width, term.target_dim,
             "through a learned projection" if term.proj is not None else "no projection (widths match)")
    return term
