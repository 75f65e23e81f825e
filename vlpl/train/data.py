"""Training data order and augmentation (images come through :class:`vlpl.data.images.ImageDataset`, labels
and cached scores through the store's read API, :meth:`vlpl.store.store.ScoreStore.split`).

The data order is vlpl's, not accelerate's: :class:`EpochOrder` makes, for every epoch, a permutation of
the training split from ``(seed, epoch)`` and a horizontal flip per sample from ``(seed, epoch, sample)``;
global batches of ``batch_size`` are cut from the permutation and each process takes its slice of every
global batch (``split_batches`` semantics). Nothing depends on what ran before, on the number of DataLoader
workers or on a sampler's internal state, so a run resumed at any step sees exactly the batches (and flips)
of an uninterrupted one. The training DataLoader is never ``accelerator.prepare``-d: accelerate would wrap
the sampler and re-seed it on resume (issue 9.1).

The input pipeline (issue 10.5) keeps the CPU work to what only a CPU can do: DataLoader workers decode each
image and resize it to ``(s, s)`` (PIL bilinear, Cole's ``Resize((s, s))``) as **uint8** (:class:`Uint8Resize`,
:class:`TrainImages`: a worker builds a whole micro-batch); the uint8 batch travels pinned and
``non_blocking`` to the device, where :class:`DeviceNormalize` converts it to float, normalises it and
applies the recorded flips in a few batched tensor ops. On the CPU this gives bit-for-bit the tensors of the
float path (:func:`image_transform` + :class:`FlippedRows`, kept as the reference and for the benchmark).
The rule's cached scores of the upcoming global batches are read from the store on a background thread
(:func:`prefetch_scores`), pinned, so the step's only host-to-device copy is ``non_blocking``.
Worker and prefetch counts default from the CPUs this process may use (:func:`auto_num_workers`).
"""
from __future__ import annotations

import logging
import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

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

    def plans(self, epoch: int, start: int = 0) -> "BatchPlans":
        """This process's :class:`BatchPlan` of every step of ``epoch`` from ``start`` on: the ``sampler`` of
        a DataLoader over :class:`TrainImages` (``batch_size=None``: a worker builds a whole micro-batch)."""
        return BatchPlans(self, epoch, start)


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


@dataclass(frozen=True)
class BatchPlan:
    """One micro-batch of this process: ``step`` (0-based, within the epoch), ``local`` the split positions
    this process loads, ``flips`` their recorded flips, ``global_index`` the positions of the whole global
    batch of all processes (the rule runs on it)."""

    step: int
    local: np.ndarray
    flips: np.ndarray
    global_index: np.ndarray


class BatchPlans:
    """The :class:`BatchPlan` of each step of an epoch (the same batches and flips as :class:`ProcessBatches`)."""

    def __init__(self, order: EpochOrder, epoch: int, start: int) -> None:
        self.order, self.epoch, self.start = order, epoch, start

    def __len__(self) -> int:
        return max(0, self.order.steps_per_epoch - self.start)

    def __iter__(self) -> Iterator[BatchPlan]:
        flips = self.order.flips(self.epoch)
        for step in range(self.start, self.order.steps_per_epoch):
            glob = self.order.global_batch(self.epoch, step)
            mine = self.order.process_slice(glob)
            yield BatchPlan(step, mine, flips[mine], glob)


class Uint8Resize:
    """PIL image -> ``(3, s, s)`` uint8 tensor: ``Resize((s, s))`` bilinear (PIL's, as :func:`image_transform`)
    without the float conversion, which :class:`DeviceNormalize` does on the device. With ``normalize`` (a
    CPU :class:`DeviceNormalize`: training on the CPU) the worker also does that, and returns float32.
    Picklable (workers)."""

    def __init__(self, size: int, normalize: Optional["DeviceNormalize"] = None) -> None:
        self.size = int(size)
        self.resize = T.Resize((self.size, self.size), interpolation=T.InterpolationMode.BILINEAR)
        self.normalize = normalize

    def __call__(self, img: Any) -> torch.Tensor:
        x = T.functional.pil_to_tensor(self.resize(img))
        return x if self.normalize is None else self.normalize(x[None])[0]


class TrainImages(Dataset):
    """Item :class:`BatchPlan` -> ``{"images": (b, 3, s, s), "index": (b,) int64, "flip": (b,) bool,
    "global_index": (B,) int64, "step": int}``: a whole micro-batch, decoded and resized in one DataLoader
    worker (``DataLoader(TrainImages(...), sampler=order.plans(epoch, start), batch_size=None)``).

    ``base``: a dataset whose item ``k`` is ``(uint8 tensor (3, s, s), k)``, e.g.
    ``ImageDataset(source, refs, Uint8Resize(s))``. Without ``normalize`` the images stay uint8 and the flips
    are only carried (:func:`model_input` applies both on the device); with a CPU ``normalize`` (training on
    the CPU, where the "device" work would otherwise run serially in the main process) the worker returns the
    normalised, flipped float32 batch.
    """

    def __init__(self, base: Dataset, normalize: Optional["DeviceNormalize"] = None) -> None:
        self.base = base
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, plan: BatchPlan) -> Dict[str, Any]:
        images = [self.base[int(k)][0] for k in plan.local]
        x = torch.stack(images) if images else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
        flip = torch.from_numpy(np.asarray(plan.flips, dtype=bool))
        if self.normalize is not None:
            x = self.normalize(x, flip)
        return {"images": x, "index": torch.from_numpy(np.asarray(plan.local, dtype=np.int64)), "flip": flip,
                "global_index": torch.from_numpy(np.asarray(plan.global_index, dtype=np.int64)),
                "step": int(plan.step)}


class DeviceNormalize:
    """uint8 ``(B, 3, H, W)`` -> float32 on ``device``, normalised, mirrored where ``flip`` (B,) is true.

    The same arithmetic, in the same order, as ``ToTensor`` (``x / 255``) + ``Normalize`` (``(x - mean) /
    std``), batched, and the flip (a pure permutation of columns) done on the uint8 data: on the CPU the
    result equals the float path's (:func:`image_transform` + :class:`FlippedRows`) bit for bit; on a GPU it
    differs by float rounding only. No host synchronisation: a CPU ``flip`` (the loader's) gives the flipped
    rows' indices on the CPU; a ``flip`` already on the device is applied with ``torch.where``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: Union[str, torch.device] = "cpu",
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.device = torch.device(device)
        self.mean = torch.as_tensor(list(mean), dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(list(std), dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        if (self.std == 0).any():
            raise ValueError(f"DeviceNormalize: std {list(std)} has a zero")
        self.memory_format = memory_format

    def __call__(self, x: torch.Tensor, flip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"DeviceNormalize expects a (B, 3, H, W) uint8 batch, got {tuple(x.shape)} {x.dtype}")
        x = x.to(self.device, non_blocking=True)
        if flip is not None and flip.device.type == "cpu":
            rows = torch.nonzero(flip.reshape(-1)).reshape(-1)  # host tensor: no device sync
            if len(rows):
                rows = rows.to(self.device, non_blocking=True)
                x = x.index_copy(0, rows, x.index_select(0, rows).flip(-1))  # out of place: the input is kept
        elif flip is not None:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = x.float().div_(255).sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=self.memory_format)


def model_input(images: torch.Tensor, flip: Optional[torch.Tensor], normalize: Optional["DeviceNormalize"]
                ) -> torch.Tensor:
    """The model's input from a loader batch: uint8 images are converted, normalised and flipped on the
    device by ``normalize``; a float batch was already made by the workers (CPU training) and is moved only
    (to ``normalize``'s device, if given)."""
    if images.dtype == torch.uint8:
        if normalize is None:
            raise ValueError("model_input: a uint8 batch needs a DeviceNormalize")
        return normalize(images, flip)
    return images if normalize is None else images.to(normalize.device, non_blocking=True)


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask: SLURM and containers restrict it), else ``os.cpu_count``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_num_workers(local_processes: Optional[int] = None, cpus: Optional[int] = None, cap: int = 16) -> int:
    """DataLoader workers per training process: the node's CPUs shared by its training processes
    (``LOCAL_WORLD_SIZE``, set by torchrun/accelerate), one left to the process itself, at most ``cap``.
    0 (load in the main process) when a process has a single CPU."""
    cpus = available_cpus() if cpus is None else int(cpus)
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    per = cpus // max(1, int(local_processes))
    return max(0, min(per - 1, cap))


def resolve_num_workers(value: Union[int, str], key: str = "num_workers") -> int:
    """``num_workers``: a count >= 0, or ``"auto"`` (:func:`auto_num_workers`)."""
    if isinstance(value, str):
        if value.strip().lower() != "auto":
            raise ValueError(f"{key}: expected a count >= 0 or 'auto', got {value!r}")
        return auto_num_workers()
    if int(value) < 0:
        raise ValueError(f"{key}: expected a count >= 0 or 'auto', got {value!r}")
    return int(value)


def auto_prefetch(num_workers: int, in_flight: int = 8) -> Optional[int]:
    """Batches each worker loads ahead: enough for about ``in_flight`` batches in flight (at least torch's 2);
    ``None`` without workers (DataLoader refuses a prefetch factor then)."""
    if num_workers <= 0:
        return None
    return max(2, math.ceil(in_flight / num_workers))


def prefetch_scores(batches: Iterable[Dict[str, Any]], read: Callable[[np.ndarray], np.ndarray],
                    pin: bool = False, depth: int = 2) -> Iterator[Dict[str, Any]]:
    """``batches`` (dicts with a ``global_index``) with ``"scores"`` added: ``read(global_index)`` (the store
    reader: ``(B, variants, views, C)`` numpy) as a CPU tensor, pinned when ``pin``, read on one background
    thread up to ``depth`` batches ahead of the consumer, so the main loop never waits on the store while
    the device works. A reader error is raised in the consumer, at the batch it belongs to."""
    if depth < 1:
        raise ValueError(f"prefetch_scores: depth must be >= 1, got {depth}")

    def job(idx: torch.Tensor) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(read(idx.numpy())))
        return t.pin_memory() if pin else t

    pending: Deque[Tuple[Dict[str, Any], "Future[torch.Tensor]"]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlpl-scores") as pool:
        try:
            for b in batches:
                pending.append((b, pool.submit(job, b["global_index"])))
                if len(pending) > depth:
                    head, fut = pending.popleft()
                    yield {**head, "scores": fut.result()}
            while pending:
                head, fut = pending.popleft()
                yield {**head, "scores": fut.result()}
        finally:
            for _, fut in pending:
                fut.cancel()
