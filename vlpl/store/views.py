"""The view layout of a score store: the ONE place that knows how ``V`` cached views are ordered.

A store caches, per image, ``V = n_variants x n_views`` score rows (DAMP views, ALGORITHMS.md 7c): a
global view and a ``g x g`` grid of tiles (``n_views = 1 + g^2``), each also horizontally flipped when
``flips`` is on (``n_variants = 2``). The layout is variant-major::

    v = variant * n_views + view,   variant 0 = unflipped, 1 = flipped,
    view 0 = global, view 1 + i*g + j = tile (i, j)   (row i from the top, column j from the left)

:class:`ViewSpec` is torch-free (numpy and torch arrays both reshape through it), so readers of a store
(train, evaluate, inspect, export) import it without the VLM code. The tensor functions that *make* the
views live in :mod:`vlpl.vlm.views`.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

__all__ = ["ViewSpec", "GLOBAL_VIEW", "LAYOUT", "ScoreKind", "SCORE_KINDS", "active_score_kind"]

GLOBAL_VIEW = 0
LAYOUT = "variant-major: v = variant*(1+g^2) + view; view 0 global, 1+i*g+j tile (i,j)"
#: the layout with the dense patch-token view (``views.dense``): one more view per variant, after the tiles
LAYOUT_DENSE = ("variant-major: v = variant*(2+g^2) + view; view 0 global, 1+i*g+j tile (i,j), 1+g^2 dense "
                "(patch tokens of that variant's global view)")


@dataclass(frozen=True)
class ViewSpec:
    """Grid size, flips and the preprocessing of the views; the index arithmetic of the layout.

    ``dense``: each variant has one more view after the tiles, ``dense`` (per-variant view ``1 + g^2``): per
    class, the mean of the ``dense_topk`` best patch-text cosines of that variant's global view's projected
    patch tokens (docs/TEACHERS.md). It is a score row like the others but not an image crop: the crops the view
    maker produces are the ``n_image_views`` first views of each variant.
    """

    grid: int
    flips: bool
    image_size: Tuple[int, int]
    resize_mode: str = "squash"
    interpolation: str = "bicubic"
    dense: bool = False
    dense_topk: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.grid, int) or isinstance(self.grid, bool) or self.grid < 0:
            raise ValueError(f"views.grid must be an integer >= 0, got {self.grid!r}")
        if self.resize_mode not in ("squash", "shortest"):
            raise ValueError(f"views.resize_mode must be 'squash' or 'shortest', got {self.resize_mode!r}")
        object.__setattr__(self, "image_size", tuple(int(x) for x in self.image_size))
        if len(self.image_size) != 2:
            raise ValueError(f"views.image_size must be (height, width), got {self.image_size!r}")
        if not isinstance(self.dense, bool):
            raise ValueError(f"views.dense must be true or false, got {self.dense!r}")
        if isinstance(self.dense_topk, bool) or not isinstance(self.dense_topk, int) or self.dense_topk < 1:
            raise ValueError(f"views.dense_topk must be an integer >= 1 (patches averaged per class), "
                             f"got {self.dense_topk!r}")

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "ViewSpec":
        """The spec of a store, from its manifest (or from the manifest's ``views`` entry itself).

        The stored counts (``n_variants``, ``n_views``, ``num_views``) and names, when present, must agree
        with ``grid`` and ``flips``: a manifest that disagrees with itself is refused with what differs.
        """
        views = manifest.get("views", manifest)
        if not isinstance(views, Mapping) or "grid" not in views or "flips" not in views:
            raise ValueError("manifest: 'views' must be a mapping with at least 'grid' and 'flips' "
                             f"(got {type(views).__name__}: {sorted(views) if isinstance(views, Mapping) else views!r})")
        try:
            spec = cls(grid=int(views["grid"]), flips=bool(views["flips"]),
                       image_size=tuple(views.get("image_size") or (0, 0)),  # type: ignore[arg-type]
                       resize_mode=str(views.get("resize_mode", "squash")),
                       interpolation=str(views.get("interpolation", "bicubic")),
                       dense=bool(views.get("dense", False)), dense_topk=int(views.get("dense_topk", 1)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"manifest 'views': {e}") from None
        derived = {"n_variants": spec.n_variants, "n_views": spec.n_views, "num_views": spec.num_views,
                   "names": spec.names()}
        for key, value in derived.items():
            if key in views and views[key] != value:
                raise ValueError(f"manifest 'views': {key} is {views[key]!r} but grid {spec.grid} with "
                                 f"flips={spec.flips} gives {value!r}")
        return spec

    def to_dict(self) -> Dict[str, Any]:
        """The manifest's ``views`` entry."""
        return {
            "grid": self.grid,
            "flips": self.flips,
            "n_variants": self.n_variants,
            "n_views": self.n_views,
            "num_views": self.num_views,
            "image_size": list(self.image_size),
            "resize_mode": self.resize_mode,
            "interpolation": self.interpolation,
            "layout": LAYOUT_DENSE if self.dense else LAYOUT,
            "names": self.names(),
            # only with the dense view, so that the entry of a store without it is what it always was
            **({"dense": True, "dense_topk": self.dense_topk} if self.dense else {}),
        }

    # -- counts ---------------------------------------------------------------------------------------
    @property
    def n_views(self) -> int:
        """Views (score rows) per variant: global + g^2 tiles (+ the dense view)."""
        return 1 + self.grid * self.grid + int(self.dense)

    @property
    def n_image_views(self) -> int:
        """Image crops per variant (what the view maker produces): global + g^2 tiles."""
        return 1 + self.grid * self.grid

    @property
    def num_image_views(self) -> int:
        """Image crops per image, flips included: ``n_variants * n_image_views``, variant-major."""
        return self.n_variants * self.n_image_views

    @property
    def dense_view(self) -> int:
        """Per-variant view number of the dense view (``1 + g^2``); raises without one."""
        if not self.dense:
            raise ValueError("this store has no dense view (views.dense=false)")
        return 1 + self.grid * self.grid

    @property
    def n_variants(self) -> int:
        """1 (unflipped only) or 2 (unflipped, flipped)."""
        return 2 if self.flips else 1

    @property
    def num_views(self) -> int:
        """V, the number of cached score rows per image."""
        return self.n_variants * self.n_views

    @property
    def num_tiles(self) -> int:
        return self.grid * self.grid

    # -- indices --------------------------------------------------------------------------------------
    def index(self, view: int, variant: int = 0) -> int:
        """Flat index ``v`` in ``[0, V)`` of a (view, variant)."""
        if not 0 <= view < self.n_views:
            raise IndexError(f"view {view} out of range: a grid of {self.grid} has {self.n_views} views per variant")
        if not 0 <= variant < self.n_variants:
            raise IndexError(f"variant {variant} out of range: this store has {self.n_variants} variant(s) "
                             f"(flips={self.flips})")
        return variant * self.n_views + view

    def unravel(self, v: int) -> Tuple[int, int]:
        """``(variant, view)`` of a flat index."""
        if not 0 <= v < self.num_views:
            raise IndexError(f"view index {v} out of range [0, {self.num_views})")
        return divmod(v, self.n_views)

    def global_index(self, variant: int = 0) -> int:
        """Flat index of the global view of a variant."""
        return self.index(GLOBAL_VIEW, variant)

    def tile_view(self, i: int, j: int) -> int:
        """Per-variant view number of tile (row i, column j)."""
        if not (0 <= i < self.grid and 0 <= j < self.grid):
            raise IndexError(f"tile ({i}, {j}) out of range for a {self.grid}x{self.grid} grid")
        return 1 + i * self.grid + j

    def tile_index(self, i: int, j: int, variant: int = 0) -> int:
        """Flat index of tile (i, j) of a variant."""
        return self.index(self.tile_view(i, j), variant)

    def tile_of(self, view: int) -> Tuple[int, int]:
        """(i, j) of a per-variant tile view number (``view >= 1``)."""
        if not 1 <= view < self.n_image_views:
            raise IndexError(f"view {view} is not a tile (tiles are 1..{self.n_image_views - 1})")
        return divmod(view - 1, self.grid)

    def flipped(self, v: int) -> int:
        """Flat index of the horizontally flipped counterpart of flat view ``v`` (same view, other variant)."""
        if not self.flips:
            raise ValueError("this store has no flipped views (flips=false)")
        variant, view = self.unravel(v)
        return self.index(view, 1 - variant)

    def names(self) -> List[str]:
        """Names of the V views in store order: ``global``, ``tile_i_j``, then ``flip/...``."""
        base = ["global"] + [f"tile_{i}_{j}" for i in range(self.grid) for j in range(self.grid)]
        base += ["dense"] if self.dense else []
        return base + [f"flip/{n}" for n in base] if self.flips else base

    # -- reshapes -------------------------------------------------------------------------------------
    def split_variants(self, scores: Any) -> Any:
        """``(N, V, C)`` -> ``(N, n_variants, n_views, C)`` (numpy array or torch tensor; a view, no copy)."""
        shape = tuple(scores.shape)
        if len(shape) != 3 or shape[1] != self.num_views:
            raise ValueError(f"expected scores of shape (N, V={self.num_views}, C), got {shape}")
        return scores.reshape(shape[0], self.n_variants, self.n_views, shape[2])

    def flatten(self, scores: Any) -> Any:
        """``(N, n_variants, n_views, C)`` -> ``(N, V, C)``, the inverse of :meth:`split_variants`."""
        shape = tuple(scores.shape)
        if len(shape) != 4 or shape[1:3] != (self.n_variants, self.n_views):
            raise ValueError(f"expected scores of shape (N, {self.n_variants}, {self.n_views}, C), got {shape}")
        return scores.reshape(shape[0], self.num_views, shape[3])


# --------------------------------------------------------------------------------------------------------
# score kinds: how the cached scores become per-class probabilities (docs/TEACHERS.md)
# --------------------------------------------------------------------------------------------------------

#: ``cosine``: a softmax-trained CLIP (the papers' teachers; probabilities ``softmax_c(cos / temp)``);
#: ``siglip``: a sigmoid-trained teacher (SigLIP / SigLIP 2; probabilities ``sigmoid(scale * cos + bias)`` per
#: class, the model's own logit scale and bias); ``probability``: the cached scores are already per-class
#: probabilities (a derived store, e.g. a teacher ensemble combined in probability space): used as they are.
SCORE_KINDS = ("cosine", "siglip", "probability")


@dataclass(frozen=True)
class ScoreKind:
    """What a store's raw scores are, and the ONE place that turns them into per-class probabilities.

    The store always caches raw image-text cosines (``kind`` cosine or siglip); the rules' per-view score
    (:func:`vlpl.pseudolabel.rules.view_softmax`) is :meth:`probabilities` of the kind the rule runs under
    (:meth:`scope`, entered by :func:`vlpl.pseudolabel.rules.apply_rule` from ``ScoreStore.score_kind``), so a
    rule needs no special case for a sigmoid teacher. Torch-free: numpy arrays and torch tensors both work.
    """

    kind: str = "cosine"
    logit_scale: Optional[float] = None
    logit_bias: Optional[float] = None

    def __post_init__(self) -> None:
        if self.kind not in SCORE_KINDS:
            raise ValueError(f"score_kind must be one of {', '.join(SCORE_KINDS)}, got {self.kind!r}")
        if self.kind == "siglip":
            for name in ("logit_scale", "logit_bias"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"score_kind 'siglip' needs a finite {name}, got {v!r}")
            if self.logit_scale <= 0:  # type: ignore[operator]
                raise ValueError(f"score_kind 'siglip' needs logit_scale > 0, got {self.logit_scale!r}")

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "ScoreKind":
        """The kind of a store from its manifest (``score_kind``, ``logit_scale``, ``logit_bias``); a manifest
        without ``score_kind`` (older stores) holds cosines."""
        kind = manifest.get("score_kind") or "cosine"
        try:
            return cls(str(kind), _num(manifest.get("logit_scale")), _num(manifest.get("logit_bias")))
        except ValueError as e:
            raise ValueError(f"manifest: {e}") from None

    def to_dict(self) -> Dict[str, Any]:
        """The manifest's fields: ``score_kind``, ``logit_scale`` and (sigmoid teachers) ``logit_bias``."""
        out: Dict[str, Any] = {"score_kind": self.kind, "logit_scale": self.logit_scale}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    @property
    def sigmoid(self) -> bool:
        """Whether the teacher's own probabilities are per-class sigmoids (SigLIP-type)."""
        return self.kind == "siglip"

    def logits(self, scores: Any) -> Any:
        """``logit_scale * cos + logit_bias`` (siglip only): the teacher's own per-class logits."""
        if not self.sigmoid:
            raise ValueError(f"logits: score_kind {self.kind!r} has no per-class logit (only 'siglip' does)")
        return scores * float(self.logit_scale) + float(self.logit_bias)  # type: ignore[arg-type]

    def probabilities(self, scores: Any, temp: float) -> Any:
        """Per-class probabilities of raw scores ``(..., C)`` (float32 at least; numpy or torch):

        * cosine: ``softmax_c(cos / temp)`` over the last axis (the papers' rule, ALGORITHMS.md 6b / 7c);
        * siglip: ``sigmoid(logit_scale * cos + logit_bias)`` per class, ``temp`` unused (the model's own
          calibrated scale and bias replace the rules' temperature; ours, docs/TEACHERS.md);
        * probability: the scores themselves.
        """
        x = _as_float(scores)
        if self.kind == "probability":
            return x
        if self.sigmoid:
            z = self.logits(x)
            return z.sigmoid() if _is_torch(z) else _np().exp(-_np().logaddexp(0.0, -z))  # no cancellation
        if not temp > 0:
            raise ValueError(f"temp must be > 0; got {temp}")
        if _is_torch(x):
            return (x / temp).softmax(dim=-1)
        np = _np()
        z = x / temp
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)

    @contextlib.contextmanager
    def scope(self) -> Iterator["ScoreKind"]:
        """Run the rules inside under this kind (:func:`active_score_kind`); nests and restores."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


COSINE = ScoreKind()
_ACTIVE: "contextvars.ContextVar[ScoreKind]" = contextvars.ContextVar("vlpl_score_kind", default=COSINE)


def active_score_kind() -> ScoreKind:
    """The kind the rules run under now (cosine unless inside a :meth:`ScoreKind.scope`)."""
    return _ACTIVE.get()


def _num(v: Any) -> Optional[float]:
    return None if v is None else float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _np() -> Any:
    import numpy

    return numpy


def _as_float(x: Any) -> Any:
    if _is_torch(x):
        return x if x.dtype.is_floating_point and x.element_size() >= 4 else x.float()
    np = _np()
    x = np.asarray(x)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
