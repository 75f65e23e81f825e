"""``sigrl``: SigRL's label-graph head (Zhang et al., ICME'25; ALGORITHMS.md §8b-§8d, Decision 5).

Notation: tokens ``F`` (B, N, F) and pooled ``g`` (B, F) from the backbone (:class:`ModelOutput`), class
embeddings ``H`` (C, D) from the class context, ``H`` L2-normalised per row (``normalize_embeddings``) and,
where D != F, mapped into the feature space by a learned ``Linear(D, F)`` (``project``); below ``H`` is that
(C, F) matrix. The pieces, each a module of this file:

* **GMC** (:class:`GMC`, §8b): 2-layer GATv2 over the label graph, the released code's (labml's) layer:
  one weight matrix shared by the two ends of an edge, no biases, **one attention vector shared by the heads**,
  ``e_ij = a^T LeakyReLU_0.2(W h_i + W h_j)``, softmax over the neighbours ``j`` of ``i``, attention dropout,
  output ``sum_j alpha_ij W h_j``. Input dropout 0.3; layer 1 F -> 4 heads x 32 concatenated; ELU; dropout
  0.3; layer 2 128 -> F, one head. Gives ``H^`` (C, F), used only inside VFR. The graph is fully connected
  with self-loops (the paper's) or, for large C, each class linked to its ``graph_k`` nearest classes by
  cosine of the class embeddings (faiss, exact; self included) - ``graph``/``dense_max_classes``. The dense
  graph's (C, C, heads, hidden) pre-activations are computed in row chunks (``chunk_mb``) and recomputed in
  backward, so only the (C, C, heads) scores are kept.
* **SDA** (§8c): ``f_nc = W_a tanh(F_n * H_c) + b_a``, softmax over the patches n for each (c, d),
  ``M_c = sum_n a_nc * F_n`` -> M (B, C, F).
* **Semantic mixing** (§8c): ``Q = ReLU(M^T H / (||M||_F ||H||_F))`` (B, F, F), each row of Q L2-normalised,
  ``T = M Q`` (B, C, F). ``norm: batch`` (default, the released code's) takes ``||M||_F`` over the whole batch
  tensor - under several processes over the *global* batch, through an autograd all-reduce in training mode
  (as the losses' expected-positive regulariser), so W processes take the 1-process step; ``norm: image``
  (ours) takes it per image. Because every row of Q is L2-normalised afterwards, a positive scalar divisor
  cancels: the two options give the same T except where a row of ``ReLU(M^T H)`` divided by the norms falls
  below ``F.normalize``'s eps (1e-12), i.e. for an image whose features are ~1e-6 of its batch-mates'. The
  mixing runs in float32 whatever the autocast dtype (float16 could underflow there).
* **VFR** (§8c): ``O = W_o [T; H^]`` (2F -> F, no bias), ``f^_nc = W_b tanh(F_n * O_c) + b_b``, softmax over
  n, ``M^_n = sum_c alpha^_nc * F_n`` (B, N, F).
* **Matching** (§8d): local ``lambda_c`` = mean of the top-k (k = 16) of ``<M^_n, H_c>`` over n, global
  ``gamma_c = <g, H_c>``, ``s = (lambda / ||lambda|| + gamma / ||gamma||) / 2`` (both L2-normalised across
  the classes, so s_c in [-1, 1]). Matching reads ``H``, not ``H^``.
* **Logits** (ours; the released code applies ``sigmoid(s)`` and so only ever sees p in [0.27, 0.73], where
  GPR's, GR's and EM's weights and thresholds, set for p over (0, 1), do not work): ``logits = t s + b`` with
  a learned scale ``t`` (stored as log t; initial value ``scale``, default sqrt(C), since s has unit norm over
  the C classes) and a learned bias ``b`` shared by the classes (initial value ``bias``, default
  ``logit(1/C) = -log(C - 1)``: p = 1/C where s = 0). The bias start matters: s lies on the unit sphere of R^C,
  so a head started at b = 0 (p about 1/2 everywhere) can only lower most of its logits by bending the
  features toward one common direction, which costs the ranking; with a slow head learning rate b takes
  epochs to get there (measured on coco256 with the tiny student: mAP falls below the untrained start at
  b = 0 and rises at b = -log(C - 1); tests/test_sigrl.py). ``scale: 1, learn_scale: false, bias: 0,
  learn_bias: false`` is the released code's ``sigmoid(s)`` (the ``sigrl`` recipe).

SDA and VFR materialise (B, N, c, F) values per class chunk (B 32, N 196, C 80, F 512 is 1 GB in float32
unchunked): classes go in chunks of ``chunk_mb`` MiB, each chunk recomputed in backward
(``torch.utils.checkpoint``), so the peak is a few chunks whatever C; one chunk holding every class runs
without recomputation. The result equals the unchunked one (up to float summation order).

**Decision 5 (ours, off by default):** after every forward with SVFR on, ``head.aux["reconstruction"]``
holds the pooled SVFR output, the patch-mean of ``M^`` (B, F), or with ``reconstruct_dim > 0`` that through
the head's own ``Linear(F, reconstruct_dim)`` (B, reconstruct_dim): the feature the reconstruction loss term
(:mod:`vlpl.train.losses.reconstruction`, ``loss.reconstruction``) projects onto the teacher's cached image
embedding. ``head.aux`` is ``{}`` with ``svfr: false``.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlpl.registry import HEADS
from vlpl.train.head_params import SigRLParams
from vlpl.train.heads.base import Head
from vlpl.train.model import ClassContext, ModelOutput

log = logging.getLogger(__name__)

__all__ = ["GATv2Layer", "GMC", "SigRLHead", "knn_graph", "classes_per_chunk", "chunked_over_classes",
           "semantic_mixing"]

_D = SigRLParams()  # the defaults, one home (vlpl/train/head_params.py)
_BYTES = 4  # float32 working tensors


# --------------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------------


def classes_per_chunk(chunk_mb: float, per_class_elements: int) -> int:
    """How many classes fit one working tensor of ``chunk_mb`` MiB, at ``per_class_elements`` float32 values
    per class (B * N * F for SDA/VFR); at least 1."""
    return max(1, int(chunk_mb * 2**20 // (_BYTES * max(1, per_class_elements))))


def chunked_over_classes(fn: Callable[..., torch.Tensor], num: int, chunk: int, *args: torch.Tensor,
                         combine: str = "cat", dim: int = 1) -> torch.Tensor:
    """``fn(start, stop, *args)`` over class ranges of ``chunk``, concatenated along ``dim`` (``combine="cat"``)
    or summed (``"sum"``). With more than one chunk and grad enabled each chunk runs under
    ``torch.utils.checkpoint`` (its intermediates are recomputed in backward, not kept)."""
    if chunk >= num:
        return fn(0, num, *args)
    recompute = torch.is_grad_enabled() and any(a.requires_grad for a in args)
    out: Optional[torch.Tensor] = None
    parts: List[torch.Tensor] = []
    for start in range(0, num, chunk):
        stop = min(num, start + chunk)
        part = checkpoint(fn, start, stop, *args, use_reentrant=False) if recompute else fn(start, stop, *args)
        if combine == "sum":
            out = part if out is None else out + part
        else:
            parts.append(part)
    return out if combine == "sum" else torch.cat(parts, dim=dim)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# GMC: GATv2 over the label graph
# --------------------------------------------------------------------------------------------------


def knn_graph(embeddings: np.ndarray, k: int) -> np.ndarray:
    """(C, min(k, C)) int64: for each class the ``k`` classes of highest cosine similarity of ``embeddings``
    (C, D), itself first (faiss exact inner product on L2-normalised rows)."""
    import faiss

    emb = np.ascontiguousarray(embeddings, dtype=np.float32).copy()
    faiss.normalize_L2(emb)
    c = emb.shape[0]
    k = min(int(k), c)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    _, nbr = index.search(emb, k)
    nbr = nbr.astype(np.int64)
    own = np.arange(c, dtype=np.int64)
    for i in np.nonzero(nbr[:, 0] != own)[0]:  # a duplicate embedding may rank before self: self goes first
        rest = [j for j in nbr[i] if j != i][: k - 1]
        nbr[i] = [i, *rest]
    return nbr


class GATv2Layer(nn.Module):
    """One GATv2 layer as SigRL's released code uses it (labml's layer, ``share_weights=True``).

    ``W`` (``lin``, no bias) is shared by source and target; the attention vector ``a`` (``att``, no bias) is
    shared by the heads. ``forward(h (C, in), neighbors)``: ``neighbors`` None = fully connected (self-loops
    included), else (C, k) indices (row i: the nodes i attends to). Output (C, heads * hidden) with
    ``concat``, else the mean over heads (C, hidden). ``chunk_mb`` bounds the dense (rows, C, heads, hidden)
    pre-activations (row chunks, recomputed in backward).
    """

    def __init__(self, in_features: int, hidden: int, heads: int, concat: bool, dropout: float,
                 negative_slope: float, chunk_mb: float = _D.chunk_mb) -> None:
        super().__init__()
        self.heads, self.hidden, self.concat = int(heads), int(hidden), bool(concat)
        self.negative_slope = float(negative_slope)
        self.chunk_mb = float(chunk_mb)
        self.lin = nn.Linear(in_features, self.heads * self.hidden, bias=False)
        self.att = nn.Linear(self.hidden, 1, bias=False)
        self.attn_dropout = nn.Dropout(dropout)
        self.last_attention: Optional[torch.Tensor] = None  # (C, C or k, heads), for inspection and tests

    def _scores_rows(self, start: int, stop: int, g: torch.Tensor) -> torch.Tensor:
        pre = g[start:stop, None] + g[None, :]  # (rows, C, H, d): W h_i + W h_j
        return self.att(F.leaky_relu(pre, self.negative_slope)).squeeze(-1)  # (rows, C, H)

    def forward(self, h: torch.Tensor, neighbors: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = h.shape[0]
        g = self.lin(h).view(c, self.heads, self.hidden)
        if neighbors is None:
            rows = classes_per_chunk(self.chunk_mb, c * self.heads * self.hidden)
            e = chunked_over_classes(self._scores_rows, c, rows, g, dim=0)  # (C, C, H)
            alpha = torch.softmax(e, dim=1)
            self.last_attention = alpha.detach()
            out = torch.einsum("ijh,jhd->ihd", self.attn_dropout(alpha), g)
        else:
            gj = g[neighbors]  # (C, k, H, d)
            e = self.att(F.leaky_relu(g[:, None] + gj, self.negative_slope)).squeeze(-1)  # (C, k, H)
            alpha = torch.softmax(e, dim=1)
            self.last_attention = alpha.detach()
            out = torch.einsum("ikh,ikhd->ihd", self.attn_dropout(alpha), gj)
        return out.reshape(c, self.heads * self.hidden) if self.concat else out.mean(dim=1)


class GMC(nn.Module):
    """Graph-based multi-label correlation (§8b): dropout -> GATv2 (heads x hidden, concat) -> ELU ->
    dropout -> GATv2 (1 head, ``out_features``). ``forward(H (C, F), neighbors) -> H^ (C, out_features)``."""

    def __init__(self, in_features: int, out_features: int, heads: int = _D.gat_heads,
                 hidden: int = _D.gat_hidden, dropout: float = _D.dropout,
                 negative_slope: float = _D.negative_slope, chunk_mb: float = _D.chunk_mb) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.layer1 = GATv2Layer(in_features, hidden, heads, True, dropout, negative_slope, chunk_mb)
        self.layer2 = GATv2Layer(heads * hidden, out_features, 1, False, dropout, negative_slope, chunk_mb)

    def forward(self, h: torch.Tensor, neighbors: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.layer1(self.dropout(h), neighbors)
        x = self.dropout(F.elu(x))
        return self.layer2(x, neighbors)


# --------------------------------------------------------------------------------------------------
# SVFR
# --------------------------------------------------------------------------------------------------


def _global_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` (1,) summed over the processes of the default group, with gradient (autograd all-reduce)."""
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(x)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def semantic_mixing(m: torch.Tensor, h: torch.Tensor, norm: str = "batch", global_batch: bool = False) -> torch.Tensor:
    """``T = M Q`` with ``Q = rownorm(ReLU(M^T H / (||M||_F ||H||_F)))`` (§8c), in float32.

    ``m`` (B, C, F), ``h`` (C, F). ``norm="batch"``: ``||M||_F`` over the whole batch tensor (with
    ``global_batch``: over every process's batch, autograd all-reduce); ``"image"``: per image.
    """
    with torch.autocast(device_type=m.device.type, enabled=False):
        m, h = m.float(), h.float()
        num = torch.matmul(m.transpose(1, 2), h)  # (B, F, F) = M^T H
        per_image = m.pow(2).flatten(1).sum(dim=1)  # (B,) squared Frobenius norm of each image's M
        if norm == "batch":  # the batch's, summed from the images' (a batch of 1 gives the same number)
            sq = per_image.sum().reshape(1)
            if global_batch:
                sq = _global_sum(sq)
            m_norm = sq.sqrt().reshape(1, 1, 1)
        elif norm == "image":
            m_norm = per_image.sqrt().reshape(-1, 1, 1)
        else:
            raise ValueError(f"semantic mixing: norm must be 'batch' or 'image', got {norm!r}")
        q = F.relu(num / (m_norm * h.norm()))
        q = F.normalize(q, dim=-1)
        return torch.matmul(m, q)  # (B, C, F)


# --------------------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------------------


@HEADS.register("sigrl", params=SigRLParams)
class SigRLHead(Head):
    """SigRL's head (see the module docstring for the formulas). ``forward(ModelOutput) -> logits (B, C)``.

    Parameters: :class:`vlpl.train.head_params.SigRLParams` (``vlpl train --list``).
    """

    uses_tokens = True

    def __init__(self, in_features: int, context: ClassContext, *, top_k: int = _D.top_k, gmc: bool = _D.gmc,
                 svfr: bool = _D.svfr, gat_heads: int = _D.gat_heads, gat_hidden: int = _D.gat_hidden,
                 dropout: float = _D.dropout, negative_slope: float = _D.negative_slope, graph: str = _D.graph,
                 graph_k: int = _D.graph_k, dense_max_classes: int = _D.dense_max_classes, norm: str = _D.norm,
                 chunk_mb: float = _D.chunk_mb, project: str = _D.project,
                 normalize_embeddings: bool = _D.normalize_embeddings, scale: Optional[float] = _D.scale,
                 learn_scale: bool = _D.learn_scale, bias: Optional[float] = _D.bias,
                 learn_bias: bool = _D.learn_bias,
                 reconstruct_dim: int = _D.reconstruct_dim) -> None:
        super().__init__(in_features, context)
        p = SigRLParams(top_k=top_k, gmc=gmc, svfr=svfr, gat_heads=gat_heads, gat_hidden=gat_hidden,
                        dropout=dropout, negative_slope=negative_slope, graph=graph, graph_k=graph_k,
                        dense_max_classes=dense_max_classes, norm=norm, chunk_mb=chunk_mb, project=project,
                        normalize_embeddings=normalize_embeddings, scale=scale, learn_scale=learn_scale,
                        bias=bias, learn_bias=learn_bias, reconstruct_dim=reconstruct_dim)  # validate
        self.params = p
        emb = np.asarray(context.require_embeddings("head 'sigrl'"), dtype=np.float32)
        c, d = emb.shape
        f = self.in_features
        text = torch.from_numpy(emb.copy())
        if p.normalize_embeddings:
            text = F.normalize(text, dim=1)
        # the class embeddings are rebuilt from the class context (saved with the model): not weights
        self.register_buffer("text", text, persistent=False)
        self.proj: Optional[nn.Linear] = nn.Linear(d, f) if (d != f or p.project == "always") else None
        self.graph_kind = "dense" if p.graph == "dense" or (p.graph == "auto" and c <= p.dense_max_classes) else "knn"
        if self.graph_kind == "knn":
            self.register_buffer("neighbors", torch.from_numpy(knn_graph(emb, p.graph_k)), persistent=False)
        else:
            self.neighbors = None
        self.gmc = GMC(f, f, p.gat_heads, p.gat_hidden, p.dropout, p.negative_slope, p.chunk_mb) if p.gmc else None
        if p.svfr:
            self.sda = nn.Linear(f, f)  # W_a, b_a
            self.vfr_mix = nn.Linear(2 * f, f, bias=False)  # W_o
            self.vfr = nn.Linear(f, f)  # W_b, b_b
        self.reconstruct = nn.Linear(f, p.reconstruct_dim) if p.reconstruct_dim else None
        t0 = math.log(p.scale if p.scale is not None else math.sqrt(c))
        log_scale = torch.tensor(t0, dtype=torch.float32)
        b0 = torch.tensor(float(p.bias) if p.bias is not None else -math.log(max(c - 1, 1)), dtype=torch.float32)
        if p.learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        if p.learn_bias:
            self.logit_bias = nn.Parameter(b0)
        else:
            self.register_buffer("logit_bias", b0)
        self.aux: Dict[str, torch.Tensor] = {}
        log.debug("sigrl head: C=%d, D=%d, F=%d, graph=%s, projection=%s", c, d, f, self.graph_kind,
                  self.proj is not None)

    # -- pieces ----------------------------------------------------------------------------------------

    def class_embeddings(self) -> torch.Tensor:
        """``H`` (C, F): the class embeddings in the feature space (projected where D != F)."""
        return self.proj(self.text) if self.proj is not None else self.text

    def refined_embeddings(self, h: torch.Tensor) -> torch.Tensor:
        """``H^`` = GMC(H) (C, F); ``H`` itself with ``gmc: false``."""
        return self.gmc(h, self.neighbors) if self.gmc is not None else h

    def _chunk(self, tokens: torch.Tensor) -> int:
        b, n, f = tokens.shape
        return classes_per_chunk(self.params.chunk_mb, b * n * f)

    def _sda_part(self, start: int, stop: int, tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(tokens[:, :, None, :] * h[None, None, start:stop])  # (B, N, c, F)
        a = torch.softmax(self.sda(x), dim=1)  # over the patches
        return torch.einsum("bncf,bnf->bcf", a, tokens)  # (B, c, F)

    def sda_features(self, tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """SDA's class-specific features M (B, C, F)."""
        return chunked_over_classes(self._sda_part, h.shape[0], self._chunk(tokens), tokens, h, dim=1)

    def _vfr_part(self, start: int, stop: int, tokens: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(tokens[:, :, None, :] * o[:, None, start:stop])  # (B, N, c, F)
        return torch.softmax(self.vfr(x), dim=1).sum(dim=2)  # sum over the chunk's classes of alpha^ (B, N, F)

    def svfr_tokens(self, tokens: torch.Tensor, h: torch.Tensor, h_hat: torch.Tensor) -> torch.Tensor:
        """``M^`` (B, N, F): SDA -> semantic mixing -> VFR (§8c)."""
        m = self.sda_features(tokens, h)
        t = semantic_mixing(m, h, self.params.norm, self.params.norm == "batch" and self.training and _distributed())
        t = t.to(m.dtype)
        o = self.vfr_mix(torch.cat([t, h_hat.to(t.dtype).expand(t.shape[0], -1, -1)], dim=-1))  # (B, C, F)
        alpha_sum = chunked_over_classes(self._vfr_part, h.shape[0], self._chunk(tokens), tokens, o,
                                         combine="sum")
        return tokens * alpha_sum

    def scores(self, out: ModelOutput) -> torch.Tensor:
        """The matched score s (B, C) in [-1, 1] (§8d), before the logit scale."""
        tokens = out.tokens
        if tokens is None:
            raise ValueError("head 'sigrl' reads the token map, but the backbone gave none")
        h = self.class_embeddings()
        if self.params.svfr:
            local_tokens = self.svfr_tokens(tokens, h, self.refined_embeddings(h))
            pooled_svfr = local_tokens.mean(dim=1)  # (B, F)
            self.aux = {"reconstruction": self.reconstruct(pooled_svfr) if self.reconstruct is not None
                        else pooled_svfr}
        else:
            local_tokens = tokens
        hf = h.to(local_tokens.dtype)
        sim = torch.matmul(local_tokens, hf.t())  # (B, N, C)
        k = min(self.params.top_k, sim.shape[1])
        local = sim.topk(k, dim=1).values.mean(dim=1)
        glob = torch.matmul(out.pooled, hf.t().to(out.pooled.dtype))
        return 0.5 * (F.normalize(local.float(), dim=1) + F.normalize(glob.float(), dim=1))

    def forward(self, out: ModelOutput) -> torch.Tensor:
        self.aux = {}
        s = self.scores(out)
        return self.log_scale.exp() * s + self.logit_bias

    def extra_repr(self) -> str:
        p = self.params
        return (f"C={self.num_classes}, F={self.in_features}, graph={self.graph_kind}, norm={p.norm}, "
                f"top_k={p.top_k}, gmc={p.gmc}, svfr={p.svfr}, chunk_mb={p.chunk_mb:g}")

