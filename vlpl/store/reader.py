"""The store's read API as one typed contract, shared by every kind of store.

Three classes open as a store (:meth:`vlpl.store.store.ScoreStore.open`): a score store
(:class:`~vlpl.store.store.ScoreStore`), a teacher ensemble (:class:`~vlpl.store.ensemble.EnsembleStore`) and an
exported Hugging Face dataset (:class:`~vlpl.store.hf_dataset.DatasetStore`). Their ``split(name)`` readers differ
in where rows come from, but the consumers (train, evaluate, export, calibrate, the rules) see one interface:
:class:`SplitReaderBase` defines it and implements what does not depend on the storage (the view layout, the
score kind, probabilities, the shape of the observed labels, position checks, a streamed pass);
:class:`StoreBase` does the same for the store-level values derived from the view spec and the classes.
Torch-free.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Tuple

import numpy as np

from vlpl.store.views import ScoreKind, ViewSpec

__all__ = ["StoreBase", "SplitReaderBase"]


class StoreBase:
    """What every store kind derives from its ``view_spec`` and ``classes`` (subclasses provide both)."""

    view_spec: ViewSpec
    classes: Sequence[str]

    @property
    def n_variants(self) -> int:
        return self.view_spec.n_variants

    @property
    def n_views(self) -> int:
        return self.view_spec.n_views

    @property
    def grid(self) -> int:
        return self.view_spec.grid

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class SplitReaderBase:
    """One split of a store, read by positions ``0 .. len(self) - 1``.

    A subclass sets ``name`` and ``store`` and implements ``__len__``, ``scores(idx, device=None)`` (dense
    ``(B, n_variants, n_views, C)`` float32 raw scores whatever the storage), ``observed_at(idx)`` /
    ``labels_at(idx)`` (``(B, C)`` int8), ``image_embeddings(idx)`` and the whole-split ``observed`` /
    ``labels`` (small callers only: loops read rows per batch).
    """

    name: str
    store: Any

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def scores(self, idx: Any, device: Any = None) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def view_spec(self) -> ViewSpec:
        return self.store.view_spec

    @property
    def score_kind(self) -> ScoreKind:
        """What the raw scores are (:class:`vlpl.store.views.ScoreKind`): cosine, siglip, probability."""
        return self.store.score_kind

    @property
    def labels_kind(self) -> str:
        """``"full"`` or ``"partial"``: what :attr:`labels` / :meth:`labels_at` hold."""
        return self.store.labels_kind

    @property
    def observed_shape(self) -> Tuple[int, int]:
        """``(N, C)``: the shape of the observed labels, known without reading them (a loss built on the reader
        reads its rows per batch, :class:`vlpl.train.losses.ObservedLabels`)."""
        return (len(self), self.store.num_classes)

    def probabilities(self, idx: Any, temp: float, device: Any = None) -> Any:
        """``(B, n_variants, n_views, C)`` per-class probabilities of the rows at ``idx``: :meth:`scores` through
        the store's :class:`ScoreKind` (cosine: ``softmax_c(cos / temp)`` per view; siglip:
        ``sigmoid(scale * cos + bias)``). The common space teachers of different kinds are compared in."""
        return self.score_kind.probabilities(self.scores(idx, device), temp)

    def _positions(self, idx: Any) -> np.ndarray:
        """``idx`` as int64 positions, checked against the split's length (an ``IndexError`` naming the split)."""
        pos = np.asarray(idx, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(pos) and (pos.min() < 0 or pos.max() >= n):
            raise IndexError(f"split {self.name!r}: positions must be in [0, {n}); got "
                             f"{int(pos.min())}..{int(pos.max())}")
        return pos

    def iter_scores(self, batch_size: int, positions: Optional[Any] = None, device: Any = None
                    ) -> Iterator[Tuple[np.ndarray, Any]]:
        """``(positions, scores)`` batches in order over ``positions`` (default: the whole split), one
        :meth:`scores` call per batch (subclasses with a faster sequential path override this)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pos = np.arange(len(self)) if positions is None else np.asarray(positions, dtype=np.int64).reshape(-1)
        for k in range(0, len(pos), batch_size):
            p = pos[k : k + batch_size]
            yield p, self.scores(p, device)
