"""Losses under several processes: a W-process step on slices of a batch has the 1-process gradients.

Two gloo processes each take half of a batch; each process's loss is backpropagated, the logits' gradients
are averaged over processes as DDP averages parameter gradients, and the loss's own parameters go through
``average_gradients``. Everything must equal one process on the whole batch: the expected-positive
regulariser (EPR, ROLE, GPR), the Large-Loss top-K threshold over the global batch (LL-R, LL-Cp writes),
and ROLE's estimator. Without the global-batch statistics these differ (checked too).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlpl.train.losses import LossBatch, create_loss

N, C, B, W = 24, 6, 8, 2
CASES = {
    "epr": {"expected_positives": 2.0},
    "role": {"expected_positives": 2.0},
    "gpr": {},
    "ll_r": {"delta_rel": 0.07},  # epoch 3: K = ceil(48 * 0.14) = 7 globally, 4 + 4 per process
    "ll_cp": {"delta_rel": 0.1},  # K = ceil(48 * 0.1) = 5 globally, 3 + 3 per process
}


def _problem(name: str):
    g = torch.Generator().manual_seed(0)
    observed = torch.zeros(N, C)
    observed[torch.arange(N), torch.randint(0, C, (N,), generator=g)] = 1.0
    logits = torch.randn(B, C, generator=g) * 2
    index = torch.randperm(N, generator=g)[:B]
    pseudo = torch.randint(-1, 2, (B, C), generator=g).float() if name == "gpr" else None
    return observed, logits, index, pseudo


def _step(name: str, rows: slice, distributed: bool) -> Dict[str, torch.Tensor]:
    """One loss step on ``rows`` of the batch; returns the W-averaged logit gradient and the loss state."""
    observed, logits, index, pseudo = _problem(name)
    loss = create_loss(name, observed, **CASES[name])
    loss.set_epoch(3, 10)
    loss.set_distributed(distributed)
    x = logits[rows].clone().requires_grad_(True)
    out = loss(LossBatch(logits=x, index=index[rows], pseudo=None if pseudo is None else pseudo[rows]))
    out["loss"].backward()
    grad = torch.zeros(B, C)
    grad[rows] = x.grad
    if distributed:
        dist.all_reduce(grad)
        grad /= dist.get_world_size()  # what DDP does to the parameter gradients
    loss.average_gradients()
    loss.sync_state()
    res = {"grad": grad, "state": loss.state.clone()}
    if name == "role":
        res["estimator_grad"] = loss.estimator_logits.grad.clone()
    return res


def _worker(rank: int, init_file: str, out_dir: str, global_batch: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    try:
        half = B // W
        rows = slice(rank * half, (rank + 1) * half)
        res = {name: _step(name, rows, global_batch) if global_batch else _local_step(name, rows)
               for name in CASES}
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _local_step(name: str, rows: slice) -> Dict[str, torch.Tensor]:
    """Per-process statistics (the loss not told about the other process), gradients still averaged."""
    res = _step(name, rows, distributed=False)
    dist.all_reduce(res["grad"])
    res["grad"] /= dist.get_world_size()
    return res


def _run(tmp_path: Path, global_batch: bool) -> list:
    out = tmp_path / ("global" if global_batch else "local")
    out.mkdir()
    mp.spawn(_worker, args=(str(tmp_path / f"init-{out.name}"), str(out), global_batch), nprocs=W, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(W)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    return _run(tmp, True), _run(tmp, False)


@pytest.mark.slow  # spawns 2 gloo processes (about 25 s on 2 cores)
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_give_the_one_process_gradient(name, runs):
    ref = _step(name, slice(0, B), distributed=False)
    global_runs, local_runs = runs
    for r in global_runs:
        torch.testing.assert_close(r[name]["grad"], ref["grad"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r[name]["state"], ref["state"])
        if name == "role":
            torch.testing.assert_close(r[name]["estimator_grad"], ref["estimator_grad"], rtol=1e-5, atol=1e-7)
    # the test can fail: per-process statistics give another gradient (or, for LL-Cp, another state)
    local = local_runs[0][name]
    assert not torch.allclose(local["grad"], ref["grad"], rtol=1e-5, atol=1e-7) or \
        not torch.equal(local["state"], ref["state"])


@pytest.mark.slow
def test_ll_cp_writes_reach_every_process(runs):
    ref = _step("ll_cp", slice(0, B), distributed=False)
    written = int((ref["state"] != _problem("ll_cp")[0]).sum())
    assert written > 0
    global_runs, local_runs = runs
    assert all(torch.equal(r["ll_cp"]["state"], ref["state"]) for r in global_runs)
    # unsynced, each process keeps only its own writes
    assert int((local_runs[0]["ll_cp"]["state"] != _problem("ll_cp")[0]).sum()) < written


def test_set_distributed_needs_a_process_group():
    observed = torch.zeros(4, 3)
    observed[:, 0] = 1
    with pytest.raises(RuntimeError, match="process group"):
        create_loss("epr", observed).set_distributed(True)
