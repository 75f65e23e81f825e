"""A worker of tests/test_satl.py's 2-process test, in a module of its own so that a spawned process imports only
numpy, torch and the losses (not the test modules and their training imports)."""
from __future__ import annotations

import math

import numpy as np
import torch

# class 0: pi 0.3, N(2, 1) vs N(-1, 0.25); class 1: pi 0.1, N(1, 0.25) vs N(-2, 4) (unequal variances both ways)
POPULATION = [(0.3, 2.0, 1.0, -1.0, 0.25), (0.1, 1.0, 0.25, -2.0, 4.0)]


def synthetic(n: int, rng: np.random.Generator, shift: float = 0.0):
    """(n, 2) fully known labels (+1 / -1) and logits drawn from the class Gaussians (shifted by ``shift``)."""
    z = np.zeros((n, 2), np.int8)
    s = np.zeros((n, 2), np.float32)
    for c, (pi, mp, vp, mn, vn) in enumerate(POPULATION):
        pos = rng.random(n) < pi
        z[:, c] = np.where(pos, 1, -1)
        s[:, c] = np.where(pos, rng.normal(mp + shift, math.sqrt(vp), n), rng.normal(mn + shift, math.sqrt(vn), n))
    return z, s


def two_process_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: rows 20 rank .. 20 rank + 19 of a fixed 40-row batch; saves its epoch sums."""
    import torch.distributed as dist

    from vlpl.train.losses import LossBatch, create_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        z, s = synthetic(40, np.random.default_rng(3))
        loss = create_loss("satl", torch.from_numpy(z))
        loss.set_distributed(True)
        loss.set_epoch(1, 2)
        rows = np.arange(rank * 20, rank * 20 + 20)
        loss(LossBatch(logits=torch.from_numpy(s[rows]), index=torch.from_numpy(rows),
                       observed=torch.from_numpy(z[rows])))
        torch.save(loss.epoch_sums.clone(), f"{out}/sums{rank}.pt")
    finally:
        dist.destroy_process_group()
