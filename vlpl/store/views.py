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

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

__all__ = ["ViewSpec", "GLOBAL_VIEW", "LAYOUT"]

GLOBAL_VIEW = 0
LAYOUT = "variant-major: v = variant*(1+g^2) + view; view 0 global, 1+i*g+j tile (i,j)"


@dataclass(frozen=True)
class ViewSpec:
    """Grid size, flips and the preprocessing of the views; the index arithmetic of the layout."""

    grid: int
    flips: bool
    image_size: Tuple[int, int]
    resize_mode: str = "squash"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if not isinstance(self.grid, int) or isinstance(self.grid, bool) or self.grid < 0:
            raise ValueError(f"views.grid must be an integer >= 0, got {self.grid!r}")
        if self.resize_mode not in ("squash", "shortest"):
            raise ValueError(f"views.resize_mode must be 'squash' or 'shortest', got {self.resize_mode!r}")
        object.__setattr__(self, "image_size", tuple(int(x) for x in self.image_size))
        if len(self.image_size) != 2:
            raise ValueError(f"views.image_size must be (height, width), got {self.image_size!r}")

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
                       interpolation=str(views.get("interpolation", "bicubic")))
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
            "layout": LAYOUT,
            "names": self.names(),
        }

    # -- counts ---------------------------------------------------------------------------------------
    @property
    def n_views(self) -> int:
        """Views per variant: global + g^2 tiles."""
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
        if not 1 <= view < self.n_views:
            raise IndexError(f"view {view} is not a tile (tiles are 1..{self.n_views - 1})")
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
