"""AEVLP's label-relation GCN residual on the teacher's class text features (ALGORITHMS.md 7b, 7g.2, Decision 2).

The released AEVLP code perturbs the frozen CLIP text features ``T`` (C x D, the text encoder's output before
normalisation) with a frozen, randomly initialised three-layer graph convolution over a class-relation graph
and scores images against ``T_hat = normalize(T + G(T))``:

1. relation ``S`` (C x C): the released files ``data/relation/relation+{ds}.npy`` are (almost certainly) CLIP
   text-text cosine similarities; here by default the cosine similarity of the teacher's own normalised class
   text embeddings (``relation: text``), or a C x C ``.npy`` file (e.g. AEVLP's own);
2. sparsify: per row keep the ``sparse_topk`` largest entries (the class itself included) and zero the rest, then
   zero the diagonal;
3. ``A = reweight * S / rowsum(S)`` off the diagonal and ``1 - reweight`` on it: a row-stochastic adjacency (a row
   with no neighbour left keeps only its diagonal);
4. ``G(T) = A phi(A phi(A T W1) W2) W3`` with ``W1`` (D x H), ``W2`` (H x H), ``W3`` (H x D), no bias,
   ``phi`` = LeakyReLU(0.2), every ``W`` drawn from ``U(-1/sqrt(d_out), 1/sqrt(d_out))`` and never trained;
5. ``T_hat = normalize(T + G(T))``.

The released code sets no torch seed, so its ``W`` (and its pseudo-labels) change from run to run. Here the
draw is a function of ``seed`` alone (a CPU generator, float32, in the order W1, W2, W3), so the same seed gives
the same embeddings on any device, and the store records the seed (:meth:`RelationGCN.identity`). Off by default
(Decision 2). Our own implementation from the description above.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from vlpl.config import ConfigError
from vlpl.store.store import sha256_file

log = logging.getLogger(__name__)

__all__ = ["RelationGCN", "relation_adjacency", "gcn_weights", "text_relation"]


def text_relation(embeddings: torch.Tensor) -> torch.Tensor:
    """The cosine-similarity relation (C, C) of class text embeddings (rows normalised here)."""
    e = F.normalize(embeddings.double(), dim=-1)
    return (e @ e.T).float()


def relation_adjacency(relation: torch.Tensor, sparse_topk: Optional[int], reweight: float) -> torch.Tensor:
    """Steps 2-3: the row-stochastic adjacency (C, C) float32 from a relation matrix (C, C).

    ``sparse_topk``: entries kept per row (the class itself counts, as it is its own largest entry); None or
    more than C: all. ``reweight``: the weight of the neighbours (AEVLP's ``reweight_p``, 0.2); the class keeps
    ``1 - reweight``.
    """
    s = relation.detach().to(torch.float32).clone()
    if s.dim() != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"relation must be a square (C, C) matrix, got shape {tuple(s.shape)}")
    if not 0.0 <= reweight <= 1.0:
        raise ValueError(f"reweight must be in [0, 1], got {reweight}")
    c = s.shape[0]
    k = c if sparse_topk is None else min(int(sparse_topk), c)
    if k < 1:
        raise ValueError(f"sparse_topk must be >= 1, got {sparse_topk}")
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(1, torch.topk(s, k, dim=1).indices, True)
    s = torch.where(keep, s, torch.zeros_like(s))
    s.fill_diagonal_(0.0)
    rowsum = s.sum(dim=1, keepdim=True)
    a = torch.where(rowsum != 0, s / torch.where(rowsum != 0, rowsum, torch.ones_like(rowsum)), torch.zeros_like(s))
    a = a * reweight
    a.fill_diagonal_(1.0 - reweight)
    return a


def gcn_weights(dim: int, hidden: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W1 (dim, hidden), W2 (hidden, hidden), W3 (hidden, dim), each ``U(-1/sqrt(d_out), 1/sqrt(d_out))`` from a
    CPU generator seeded with ``seed`` (drawn in that order; float32)."""
    gen = torch.Generator().manual_seed(int(seed))

    def draw(d_in: int, d_out: int) -> torch.Tensor:
        bound = 1.0 / float(d_out) ** 0.5
        return (torch.rand(d_in, d_out, generator=gen, dtype=torch.float32) * 2.0 - 1.0) * bound

    return draw(dim, hidden), draw(hidden, hidden), draw(hidden, dim)


@dataclass
class RelationGCN:
    """The frozen residual ``T -> normalize(T + G(T))`` of :mod:`vlpl.vlm.relation_gcn` (AEVLP 7b), seeded.

    Built from ``teacher.relation_gcn`` (:class:`vlpl.config.RelationGCNConfig`): ``seed``, ``sparse_topk``
    (AEVLP: VOC 20, COCO 62, NUS-WIDE 50, CUB 312), ``reweight`` (0.2), ``hidden`` (1024) and ``relation``
    (``text`` or a ``.npy`` path).
    """

    seed: int = 0
    sparse_topk: Optional[int] = None
    reweight: float = 0.2
    hidden: int = 1024
    relation: str = "text"

    @classmethod
    def from_config(cls, cfg: Any) -> "RelationGCN":
        return cls(seed=int(cfg.seed), sparse_topk=cfg.sparse_topk, reweight=float(cfg.reweight),
                   hidden=int(cfg.hidden), relation=str(cfg.relation))

    def _relation(self, normalised: torch.Tensor) -> torch.Tensor:
        c = normalised.shape[0]
        if self.relation == "text":
            return text_relation(normalised)
        path = os.path.expanduser(self.relation)
        if not os.path.isfile(path):
            raise ConfigError(f"teacher.relation_gcn.relation: expected 'text' or a C x C .npy file; "
                              f"{path} does not exist")
        try:
            s = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ConfigError(f"teacher.relation_gcn.relation: {path} is not a plain .npy array ({e})") from None
        if s.shape != (c, c):
            raise ConfigError(f"teacher.relation_gcn.relation: {path} has shape {s.shape}, expected ({c}, {c}) for "
                              f"the {c} classes")
        return torch.from_numpy(np.asarray(s, dtype=np.float32))

    def __call__(self, features: torch.Tensor, normalised: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``normalize(T + G(T))`` (C, D) float32 for the text features ``features`` (C, D) - the text encoder's
        output before normalisation, as in the released code; ``normalised``: the unit-norm embeddings the
        ``text`` relation is computed from (default: ``features`` normalised)."""
        t = features.detach().to("cpu", torch.float32)
        unit = F.normalize(t, dim=-1) if normalised is None else normalised.detach().to("cpu", torch.float32)
        a = relation_adjacency(self._relation(unit), self.sparse_topk, self.reweight)
        w1, w2, w3 = gcn_weights(t.shape[1], self.hidden, self.seed)
        h = F.leaky_relu(a @ (t @ w1), 0.2)
        h = F.leaky_relu(a @ (h @ w2), 0.2)
        g = a @ (h @ w3)
        return F.normalize(t + g, dim=-1)

    def identity(self) -> Dict[str, Any]:
        """What the store records (``manifest["model"]["relation_gcn"]``): every setting, the seed included, and
        the relation file's sha256 when one is used."""
        out: Dict[str, Any] = {"seed": self.seed, "sparse_topk": self.sparse_topk, "reweight": self.reweight,
                               "hidden": self.hidden, "relation": self.relation}
        if self.relation != "text":
            path = os.path.expanduser(self.relation)
            if os.path.isfile(path):
                out["relation_sha256"] = sha256_file(Path(path))
        return out
