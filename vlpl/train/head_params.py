"""The heads' parameters: defaults, meanings and validation, in one home (torch-free).

Every built-in head of :mod:`vlpl.train.heads` takes its defaults from its schema here, and
``HEADS.create`` validates ``student.head.params`` through it, as does the training config before torch is
imported. ``head_params("sigrl", {"top_k": 8})`` gives the validated :class:`SigRLParams`.

The SigRL defaults are the released code's (ALGORITHMS.md §8b-§8d) except where a name says "ours"; the
per-recipe values live in ``configs/methods/sigrl.yaml`` and ``aevlp_sigrl.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from vlpl.params import Params, ParamValueError, param
from vlpl.registry import HEAD_PARAMS, HEADS

__all__ = ["HeadParams", "LinearParams", "SigRLParams", "head_params"]


@dataclass(frozen=True)
class HeadParams(Params):
    """Base of the head schemas."""


@HEAD_PARAMS.register("linear")
@dataclass(frozen=True)
class LinearParams(HeadParams):
    """Linear(F, C) on the pooled feature: the papers' head (Cole et al., EM, GR, VLPL, AEVLP)."""

    see = "ALGORITHMS.md 2c"


@HEAD_PARAMS.register("sigrl")
@dataclass(frozen=True)
class SigRLParams(HeadParams):
    """SigRL: GATv2 label graph (GMC) + class-wise patch attention and reconstruction (SVFR) + local/global matching."""

    see = "Zhang et al. (ICME'25), ALGORITHMS.md 8b-8d"

    top_k: int = param(16, "patches averaged in the local score (the top-k of each class; min(top_k, N))", ge=1)
    gmc: bool = param(True, "use the GATv2 label graph (off: VFR reads the class embeddings unrefined; an ablation)")
    svfr: bool = param(True, "use SDA + semantic mixing + VFR (off: the local score reads the raw tokens; an ablation)")
    gat_heads: int = param(4, "GMC layer-1 attention heads", ge=1)
    gat_hidden: int = param(32, "GMC layer-1 width per head (4 x 32 = 128 in the released code)", ge=1)
    dropout: float = param(0.3, "GMC dropout: on its input, on the attention weights, after the ELU", ge=0, lt=1)
    negative_slope: float = param(0.2, "LeakyReLU slope inside the GATv2 attention", ge=0)
    graph: str = param("auto", "label graph: dense (fully connected, the paper's), knn (each class to its graph_k "
                               "nearest classes by text-embedding cosine, self included), auto (dense up to "
                               "dense_max_classes)", choices=("auto", "dense", "knn"))
    graph_k: int = param(32, "neighbours per class of the knn graph (self included)", ge=1)
    dense_max_classes: int = param(2048, "graph=auto: the largest C that gets the dense graph", ge=1)
    norm: str = param("batch", "semantic mixing's Frobenius norm of M: over the whole (global) batch tensor (the "
                               "released code's) or per image (ours: an image's logits do not depend on its "
                               "batch-mates)", choices=("batch", "image"))
    chunk_mb: float = param(256.0, "MiB of one (B, N, classes, F) float32 SDA/VFR working tensor; classes are "
                                   "processed in chunks of that size (recomputed in backward), peak about 4x",
                            gt=0)
    project: str = param("auto", "learned Linear(D, F) of the class embeddings into the feature space: auto = "
                                 "only when D != F; always = also when equal", choices=("auto", "always"))
    normalize_embeddings: bool = param(True, "L2-normalise each class embedding before use (a no-op for a "
                                             "store's unit-norm embeddings)")
    scale: Optional[float] = param(None, "initial logit scale t in logits = t s + b, s in [-1, 1] the matched "
                                         "score (null: sqrt(C), so that t s has about unit RMS over classes)", gt=0)
    learn_scale: bool = param(True, "learn t (as log t); false: fixed (t = 1 and b = 0 fixed is the released "
                                    "code's sigmoid(s), p in [0.27, 0.73])")
    bias: Optional[float] = param(None, "initial logit bias b, shared by the classes (null: logit(1/C) = "
                                        "-log(C - 1): p = 1/C where s = 0, most labels of an image being "
                                        "negative; 0 with a scale of about 1 is the released code's)")
    learn_bias: bool = param(True, "learn b")
    reconstruct_dim: int = param(0, "ours (Decision 5): the patch-mean of the SVFR output is head.aux["
                                     "'reconstruction'] for the reconstruction loss (loss.reconstruction); > 0 "
                                     "passes it through the head's own Linear(F, this) first (e.g. the store's "
                                     "embedding dimension)", ge=0)

    def check(self) -> None:
        if self.reconstruct_dim and not self.svfr:
            raise ParamValueError("reconstruct_dim", "the reconstruction reads the SVFR output: needs svfr=true")


def head_params(name: str, values: Optional[Mapping[str, Any]] = None, *, where: Optional[str] = None,
                source: Optional[str] = None) -> Params:
    """The validated parameters of head ``name`` (torch-free; unknown names and keys are named)."""
    return HEADS.schema(name).from_dict(values, where=where, source=source, what=f"head {name!r}")
