"""Training/evaluation data: images from the dataset root, labels and cached scores from the store."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T

from vlpl.store.store import ScoreStore

log = logging.getLogger(__name__)


@dataclass
class SplitData:
    """The rows of one split that can be used (status ok), with everything the loop needs."""

    name: str
    rows: np.ndarray  # store row numbers
    images: List[str]  # paths relative to the data root
    sample_ids: List[str]
    observed: np.ndarray  # (N, C) int8
    labels: Optional[np.ndarray]  # (N, C) int8 when every row's labels are known
    scores: Optional[np.ndarray]  # (N, n_variants, n_views, C) float16, for pseudo-labels

    def __len__(self) -> int:
        return len(self.rows)


def load_split(store: ScoreStore, arrays: Dict[str, np.ndarray], split: str, with_scores: bool) -> SplitData:
    sel = (arrays["split"] == split) & (arrays["status"] == "ok")
    n_failed = int(((arrays["split"] == split) & (arrays["status"] != "ok")).sum())
    if n_failed:
        log.warning("%s: %d rows failed in the pseudolabel stage and are left out", split, n_failed)
    rows = np.nonzero(sel)[0]
    known = arrays["labels_known"][rows]
    labels = arrays["labels"][rows].astype(np.int8) if len(rows) and known.all() else None
    scores = None
    if with_scores:
        s = arrays["scores"][rows]
        scores = s.reshape(len(rows), store.n_variants, store.n_views, store.num_classes).astype(np.float16)
    return SplitData(split, rows, list(arrays["image"][rows]), list(arrays["sample_id"][rows]),
                     arrays["observed"][rows].astype(np.int8), labels, scores)


def image_transform(size: int, mean: Sequence[float], std: Sequence[float], train: bool, hflip: bool) -> T.Compose:
    """Cole's recipe (ALGORITHMS.md 2c): Resize((s, s)), RandomHorizontalFlip for training, normalise."""
    ops: List[Any] = [T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR)]
    if train and hflip:
        ops.append(T.RandomHorizontalFlip(0.5))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


class ImageRows(Dataset):
    """Item k -> (image tensor, k). A decode failure raises with the file named."""

    def __init__(self, root: Path, images: List[str], transform: T.Compose) -> None:
        self.root = Path(root)
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int):
        path = self.root / self.images[k]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"cannot read training image {path}: {type(e).__name__}: {e}") from e
        return self.transform(img), k


class EpochShuffle(Sampler[int]):
    """A random permutation per epoch from ``seed + epoch``: the order of an epoch does not depend on
    what ran before it, so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())
