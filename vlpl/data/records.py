"""In-memory records of a labelled multi-label dataset.

A :class:`LabelledDataset` is what every reader in :mod:`vlpl.data.readers` returns: the class list,
one :class:`Sample` per image (full labels when known, observed labels always) and its
:class:`~vlpl.data.images.ImageSource` (how its images are opened, the one way of
:mod:`vlpl.data.images`). Samples are ordered ``train`` (sorted original indices), then ``val`` (sorted), then ``test``,
as in Cole et al.'s protocol (ALGORITHMS.md 2b), so split indices are stable across runs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import numpy as np

from vlpl.config import ImageConfig
from vlpl.data.images import HF_PREFIX, ImageLoadError, ImageSource

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
__all__ = ["SPLITS", "HF_PREFIX", "ImageLoadError", "LabelledDataset", "Sample"]


@dataclass
class Sample:
    """One image of the dataset.

    Attributes:
        sample_id: stable id, unique in the dataset (the image path relative to the dataset root
            without its extension, or ``"<hfsplit>/<index>"`` for Hugging Face datasets).
        image: image path relative to :attr:`LabelledDataset.root` (``"hf://<hfsplit>/<index>"`` for
            Hugging Face datasets).
        split: ``"train"``, ``"val"`` (the part carved out of the official train split) or ``"test"``.
        labels: ``(C,)`` int8 in {0,1} (full labels), or in {-1,0,1} when the dataset's labels are partial
            annotations (:attr:`LabelledDataset.labels_kind` ``"partial"``: 0 = unknown, never a negative), or
            ``None`` when unknown.
        observed: ``(C,)`` int8 in {-1,0,1} (negative, unknown, positive; ALGORITHMS.md 1).
    """

    sample_id: str
    image: str
    split: str
    labels: Optional[np.ndarray]
    observed: np.ndarray


@dataclass
class LabelledDataset:
    """A multi-label dataset: classes, samples in a fixed order, and image decoding.

    Attributes:
        root: folder the sample ``image`` paths are relative to.
        classes: class names; column ``c`` of every label vector is ``classes[c]``.
        samples: train samples, then val, then test (see the module docstring).
        name: a short dataset name (for logs and output folders).
        labels_kind: ``"full"`` (sample labels in {0,1}) or ``"partial"`` (real partial annotations in {-1,0,1});
            recorded in the store manifest, where it tells evaluation to use the masked mAP.
        observed_protocol: how the observed labels were made (mode, seed, parameter;
            :func:`vlpl.data.observed.protocol_entry`), recorded in the store manifest.
    """

    root: Path
    classes: List[str]
    samples: List[Sample]
    name: str
    _hf: Any = field(default=None, repr=False, compare=False)  # datasets.DatasetDict for hf:// images
    _hf_image_column: str = field(default="image", repr=False, compare=False)
    hf_path: Optional[str] = field(default=None, repr=False, compare=False)  # where _hf was loaded from
    image_config: ImageConfig = field(default_factory=ImageConfig, repr=False, compare=False)
    labels_kind: str = "full"
    observed_protocol: Dict[str, Any] = field(default_factory=dict)
    _source: Optional[ImageSource] = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return len(self.classes)

    def image_path(self, i: int) -> Path:
        """Absolute path of sample ``i``'s image (not meaningful for ``hf://`` images)."""
        return Path(self.root) / self.samples[i].image

    @property
    def image_source(self) -> ImageSource:
        """How this dataset's images are opened (root, decode rules, the Hugging Face dataset if any)."""
        if self._source is None:
            self._source = ImageSource(Path(self.root), self.image_config, hf=self._hf,
                                       hf_image_column=self._hf_image_column, hf_path=self.hf_path)
        return self._source

    def open_image(self, i: int) -> "PILImage.Image":
        """Decode sample ``i``'s image fully, as RGB, under the decode rules of :mod:`vlpl.data.images`.

        Raises:
            ImageLoadError: the file is missing, outside the root, unreadable, not an image, truncated or
                over the pixel budget; the message names it.
        """
        return self.image_source.open(self.samples[i].image)

    def split_indices(self, split: str) -> np.ndarray:
        """Indices (into :attr:`samples`, increasing) of the samples of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
        return np.array([i for i, s in enumerate(self.samples) if s.split == split], dtype=np.int64)

    def _rows(self, split: Optional[str]) -> List[Sample]:
        if split is None:
            return self.samples
        return [self.samples[i] for i in self.split_indices(split)]

    def label_matrix(self, split: Optional[str] = None) -> np.ndarray:
        """Labels ``(N, C)`` int8 of ``split`` (all samples when None): in {0,1}, or in {-1,0,1} when
        :attr:`labels_kind` is ``"partial"``.

        Raises:
            ValueError: some of those samples have unknown full labels.
        """
        rows = self._rows(split)
        missing = [s.sample_id for s in rows if s.labels is None]
        if missing:
            raise ValueError(
                f"dataset {self.name!r}: full labels are unknown for {len(missing)} sample(s) of "
                f"split {split or 'all'} (first: {missing[0]})"
            )
        if not rows:
            return np.zeros((0, self.num_classes), dtype=np.int8)
        return np.stack([s.labels for s in rows]).astype(np.int8, copy=False)  # type: ignore[misc]

    def observed_matrix(self, split: Optional[str] = None) -> np.ndarray:
        """Observed labels ``(N, C)`` int8 in {-1,0,1} of ``split`` (all samples when None)."""
        rows = self._rows(split)
        if not rows:
            return np.zeros((0, self.num_classes), dtype=np.int8)
        return np.stack([s.observed for s in rows]).astype(np.int8, copy=False)
