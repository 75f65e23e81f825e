"""Training data order and augmentation (images come through :class:`vlpl.data.images.ImageDataset`, labels
and cached scores through the store's read API, :meth:`vlpl.store.store.ScoreStore.split`).

The data order is vlpl's, not accelerate's: :class:`EpochOrder` makes, for every epoch, a permutation of
the training split from ``(seed, epoch)`` and a horizontal flip per sample from ``(seed, epoch, sample)``;
global batches of ``batch_size`` are cut from the permutation and each process takes its slice of every
global batch (``split_batches`` semantics). Nothing depends on what ran before, on the number of DataLoader
workers or on a sampler's internal state, so a run resumed at any step sees exactly the batches (and flips)
of an uninterrupted one. The training DataLoader is never ``accelerator.prepare``-d: accelerate would wrap
the sampler and re-seed it on resume (issue 9.1).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

log = logging.getLogger(__name__)

# tags that keep the seed streams of the different random draws apart
SEED_PERMUTATION, SEED_FLIP, SEED_RULE, SEED_STEP = 1, 2, 3, 4


def mix_seed(*keys: int) -> int:
    """A 63-bit seed that is a function of the integers ``keys`` only (numpy ``SeedSequence``), e.g.
    ``mix_seed(seed, SEED_RULE, epoch, step)``: nearby keys give unrelated streams."""
    state = np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`mix_seed` of ``keys``."""
    return torch.Generator().manual_seed(mix_seed(*keys))


def image_transform(size: int, mean: Sequence[float], std: Sequence[float], train: bool, hflip: bool) -> T.Compose:
    """Cole's recipe (ALGORITHMS.md 2c): Resize((s, s)), RandomHorizontalFlip for training, normalise.

    The trainer itself builds ``train=False`` transforms and applies the flip drawn by :class:`EpochOrder`
    (:class:`FlippedRows`), so that the flip is recorded and reproducible; ``train=True`` (a random flip)
    is for stand-alone use."""
    ops: List[Any] = [T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR)]
    if train and hflip:
        ops.append(T.RandomHorizontalFlip(0.5))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


class FlippedRows(Dataset):
    """Item ``(k, flip)`` -> ``(image tensor, k, flip)``: sample ``k`` of ``base`` (a dataset whose items are
    ``(tensor, k)``), mirrored left-right when ``flip``. The flip is drawn by :class:`EpochOrder`, not here,
    so it does not depend on the worker that loads the image and the batch can carry it (a rule may follow
    the student's flip). Flipping the normalised tensor equals flipping the image before Resize + Normalize.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: Tuple[int, bool]) -> Tuple[torch.Tensor, int, bool]:
        k, flip = item
        x, _ = self.base[int(k)]
        return (x.flip(-1) if flip else x), int(k), bool(flip)


class EpochOrder:
    """vlpl's data order (see the module docstring).

    Args:
        n: rows of the training split.
        batch_size: the global batch (all processes together), the papers' number.
        seed: the run's seed.
        hflip: draw a horizontal flip per sample (p = 1/2), else never flip.
        num_processes, process_index: this process's place; each global batch is cut into
            ``num_processes`` equal slices (a last batch not divisible by the process count is filled from
            the start of the epoch's permutation, as accelerate's ``even_batches`` did).
        max_steps: at most this many global batches per epoch (quick runs).
    """

    def __init__(self, n: int, batch_size: int, seed: int, hflip: bool, num_processes: int = 1,
                 process_index: int = 0, max_steps: Optional[int] = None) -> None:
        if n < 1:
            raise ValueError("EpochOrder: the training split is empty")
        if batch_size < 1 or batch_size % num_processes:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the {num_processes} processes")
        self.n, self.batch_size, self.seed, self.hflip = n, batch_size, seed, hflip
        self.num_processes, self.process_index = num_processes, process_index
        steps = math.ceil(n / batch_size)
        self.steps_per_epoch = steps if max_steps is None else max(0, min(steps, int(max_steps)))
        self._cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        if epoch not in self._cache:
            perm = torch.randperm(self.n, generator=generator(self.seed, SEED_PERMUTATION, epoch)).numpy()
            if self.hflip:
                flips = (torch.rand(self.n, generator=generator(self.seed, SEED_FLIP, epoch)) < 0.5).numpy()
            else:
                flips = np.zeros(self.n, dtype=bool)
            self._cache = {epoch: (perm, flips)}  # one epoch at a time: O(N) memory
        return self._cache[epoch]

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order of the split's positions."""
        return self._epoch(epoch)[0]

    def flips(self, epoch: int) -> np.ndarray:
        """``flips[k]``: whether sample ``k`` is mirrored in ``epoch`` (a function of seed, epoch and k)."""
        return self._epoch(epoch)[1]

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """Positions of global batch ``step`` (0-based) of ``epoch``, padded to a multiple of the process
        count from the start of the permutation."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside epoch of {self.steps_per_epoch} steps")
        perm = self.permutation(epoch)
        batch = perm[step * self.batch_size:(step + 1) * self.batch_size]
        short = (-len(batch)) % self.num_processes
        return np.concatenate([batch, perm[:short]]) if short else batch

    def process_slice(self, batch: np.ndarray) -> np.ndarray:
        """This process's share of a global batch."""
        per = len(batch) // self.num_processes
        return batch[self.process_index * per:(self.process_index + 1) * per]

    def batches(self, epoch: int, start: int = 0) -> "ProcessBatches":
        """This process's batches of ``epoch`` from step ``start`` on: a ``batch_sampler`` for a DataLoader."""
        return ProcessBatches(self, epoch, start)


class ProcessBatches:
    """Lists of ``(position, flip)`` for :class:`FlippedRows`, one list per step (a DataLoader ``batch_sampler``)."""

    def __init__(self, order: EpochOrder, epoch: int, start: int) -> None:
        self.order, self.epoch, self.start = order, epoch, start

    def __len__(self) -> int:
        return max(0, self.order.steps_per_epoch - self.start)

    def __iter__(self) -> Iterator[List[Tuple[int, bool]]]:
        flips = self.order.flips(self.epoch)
        for step in range(self.start, self.order.steps_per_epoch):
            mine = self.order.process_slice(self.order.global_batch(self.epoch, step))
            yield [(int(k), bool(flips[k])) for k in mine]
