"""Cole et al.'s linear-init and fixed-features modes (ALGORITHMS.md §2c) as training phases
(``phases.linear_init_epochs`` / ``phases.freeze_backbone``; vlpl/train/phases.py).

The backbone (its weights AND its batch-norm statistics) stays exactly at its initial state during the frozen
epochs while the head trains, and trains after; a run stopped after the frozen epoch and resumed ends with
the bytes of an uninterrupted run (the phase is a function of the epoch)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file

from vlpl.config import ConfigError
from vlpl.train.phases import backbone_frozen

REPO = Path(__file__).resolve().parents[1]
TINY_NET = str(REPO / "configs" / "models" / "tiny_classifier.yaml")


def test_backbone_frozen_is_a_function_of_the_epoch():
    li = SimpleNamespace(linear_init_epochs=2, freeze_backbone=False)
    assert [backbone_frozen(li, e) for e in (1, 2, 3, 4)] == [True, True, False, False]
    fixed = SimpleNamespace(linear_init_epochs=0, freeze_backbone=True)
    assert all(backbone_frozen(fixed, e) for e in (1, 5, 25))
    off = SimpleNamespace(linear_init_epochs=0, freeze_backbone=False)
    assert not any(backbone_frozen(off, e) for e in (1, 2))


def test_bad_phase_is_named(tmp_path):
    from vlpl.train.recipes import load_train_config

    with pytest.raises(ConfigError, match="phases.linear_init_epochs"):
        load_train_config([TINY_NET], [f"store={tmp_path}", f"out={tmp_path / 'o'}", "phases.linear_init_epochs=-1"])


def _args(store: Path, out: Path, *extra: str) -> list:
    return [f"store={store}", f"out={out}", "progress=false", "log_every=1", "loss.name=an", "pseudo.rule=null",
            "max_steps_per_epoch=2", "optim.lr=1e-2", "optim.head_lr=1e-2", "checkpoint_every_minutes=null",
            "keep_checkpoints=5", "early_stop_patience=null", "early_stop_drop=null", *extra]


def _checkpoints(out: Path) -> Dict[int, Dict[str, torch.Tensor]]:
    """Model weights (and buffers) of each epoch-end checkpoint, by step."""
    return {int(d.name.split("_")[1]): load_file(str(d / "model.safetensors"))
            for d in sorted((out / "checkpoints").iterdir()) if d.name.startswith("step_")}


def _part(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_linear_init_freezes_the_backbone_then_trains_it(coco256_store, tmp_path):
    from accelerate.utils import set_seed

    from vlpl.store.store import ScoreStore
    from vlpl.train.loop import run_train
    from vlpl.train.model import ClassContext, create_classifier
    from vlpl.train.recipes import load_train_config

    out = tmp_path / "run"
    cfg = load_train_config([TINY_NET], _args(coco256_store, out, "epochs=2", "phases.linear_init_epochs=1"))
    assert cfg.phases.linear_init_epochs == 1 and not cfg.phases.freeze_backbone
    set_seed(cfg.seed)  # what setup() does right before it builds the student
    init = {k: v.detach().clone() for k, v in
            create_classifier(cfg.student, ClassContext.from_store(ScoreStore(coco256_store))).state_dict().items()}
    assert any("running_mean" in k for k in init if k.startswith("backbone."))  # batch norm: eval mode matters
    run_train(cfg)
    ck = _checkpoints(out)
    assert sorted(ck) == [2, 4]  # the end of epoch 1 (frozen) and of epoch 2
    after1, after2 = ck[2], ck[4]
    assert _same(_part(after1, "backbone."), _part(init, "backbone."))  # weights and BN statistics untouched
    assert not _same(_part(after1, "head."), _part(init, "head."))  # the head trained
    changed = [k for k in _part(after2, "backbone.") if not torch.equal(after2[k], after1[k])]
    assert any(k.endswith("weight") for k in changed) and any("running_mean" in k for k in changed)


@pytest.mark.slow
def test_stopped_after_the_frozen_epoch_and_resumed_gives_the_same_bytes(coco256_store, tmp_path):
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    ref, split = tmp_path / "ref", tmp_path / "split"
    run_train(load_train_config([TINY_NET], _args(coco256_store, ref, "epochs=2", "phases.linear_init_epochs=1")))
    run_train(load_train_config([TINY_NET], _args(coco256_store, split, "epochs=1", "phases.linear_init_epochs=1")))
    run_train(load_train_config([TINY_NET], _args(coco256_store, split, "epochs=2", "phases.linear_init_epochs=1",
                                                  "resume=true")))
    assert _same(_checkpoints(split)[4], _checkpoints(ref)[4])


def test_freeze_backbone_keeps_it_fixed_for_the_whole_run(coco256_store, tmp_path):
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    out = tmp_path / "fixed"
    run_train(load_train_config([TINY_NET], _args(coco256_store, out, "epochs=2", "phases.freeze_backbone=true")))
    ck = _checkpoints(out)
    assert _same(_part(ck[2], "backbone."), _part(ck[4], "backbone."))
    assert not _same(_part(ck[2], "head."), _part(ck[4], "head."))


@pytest.mark.slow
def test_linear_init_under_two_processes(coco256_store, tmp_path):
    """DDP (torchrun, 2 CPU processes, gloo): the frozen epoch's backbone gets no gradient, which DDP accepts
    with find_unused_parameters (vlpl.train.phases.ddp_kwargs); the backbone stays put, then trains."""
    import os
    import subprocess
    import sys

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "vlpl", "train", "-c", TINY_NET,
           *_args(coco256_store, out, "epochs=2", "phases.linear_init_epochs=1", "batch_size=8")]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = _checkpoints(out)
    first, last = ck[min(ck)], ck[max(ck)]
    assert not _same(_part(first, "backbone."), _part(last, "backbone."))
    assert not _same(_part(first, "head."), _part(last, "head."))
    # after the frozen epoch the backbone is still the initial one: that of a 1-process frozen epoch
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    one = tmp_path / "one"
    run_train(load_train_config([TINY_NET], _args(coco256_store, one, "epochs=1", "phases.freeze_backbone=true",
                                                  "batch_size=8")))
    assert _same(_part(first, "backbone."), _part(_checkpoints(one)[2], "backbone."))


def _head_steps(out: Path) -> set:
    """The Adam step counts of the head's parameters in the run's last checkpoint."""
    from vlpl.train.checkpoint import list_checkpoints

    opt = torch.load(list_checkpoints(out / "checkpoints")[-1] / "optimizer.pt", weights_only=True)
    head = opt["param_groups"][1]["params"]
    return {float(opt["state"][i]["step"]) for i in head}


def test_linear_init_lr_and_a_fresh_optimizer_for_the_end_to_end_phase(coco256_store, tmp_path):
    """Cole's two linear_init runs: the linear phase at its own lr (phases.linear_init_lr), the end-to-end phase
    with a fresh Adam (phases.reset_optimizer, default on): the head's step count restarts at the boundary."""
    import json

    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    out = tmp_path / "li"
    run_train(load_train_config([TINY_NET], _args(coco256_store, out, "epochs=2", "phases.linear_init_epochs=1",
                                                  "phases.linear_init_lr=1e-3")))
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert [(r["epoch"], r["head_lr"]) for r in steps] == [(1, pytest.approx(1e-3)), (1, pytest.approx(1e-3)),
                                                            (2, pytest.approx(1e-2)), (2, pytest.approx(1e-2))]
    assert _head_steps(out) == {2.0}  # the 2 steps of epoch 2 only: a fresh optimizer at the boundary
    kept = tmp_path / "kept"
    run_train(load_train_config([TINY_NET], _args(coco256_store, kept, "epochs=2", "phases.linear_init_epochs=1",
                                                  "phases.reset_optimizer=false")))
    assert _head_steps(kept) == {4.0}


def _fork_train(args: list, kill_at: str = "") -> int:
    import multiprocessing as mp

    proc = mp.get_context("fork").Process(target=_child, args=(args, kill_at))
    proc.start()
    proc.join(600)
    assert not proc.is_alive()
    return int(proc.exitcode)


def _child(args: list, kill_at: str) -> None:
    import logging
    import os

    from vlpl.train.checkpoint import KILL_ENV
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    torch.set_num_threads(1)
    os.environ.pop(KILL_ENV, None)
    if kill_at:
        os.environ[KILL_ENV] = kill_at
    logging.disable(logging.WARNING)
    run_train(load_train_config([TINY_NET], args))


@pytest.mark.slow
def test_resumed_inside_the_first_end_to_end_epoch_keeps_its_optimizer_state(coco256_store, tmp_path):
    """Killed after the first step of epoch 2 (a checkpoint every step), resumed: the optimizer is not reset a
    second time, and the run ends with the bytes of an uninterrupted one."""
    import hashlib

    from vlpl.train.checkpoint import list_checkpoints

    extra = ("epochs=2", "phases.linear_init_epochs=1", "phases.linear_init_lr=1e-3", "checkpoint_every_steps=1")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _fork_train(_args(coco256_store, ref, *extra)) == 0
    assert _fork_train(_args(coco256_store, run, *extra), kill_at="step:4") == -9
    assert list_checkpoints(run / "checkpoints")[-1].name == "step_000000003"  # inside epoch 2
    assert _fork_train(_args(coco256_store, run, *extra, "resume=true")) == 0

    def digest(out: Path) -> dict:
        last = list_checkpoints(out / "checkpoints")[-1]
        return {f: hashlib.sha256((last / f).read_bytes()).hexdigest()
                for f in ("model.safetensors", "optimizer.pt", "scheduler.pt")}

    assert digest(run) == digest(ref)
    assert _head_steps(run) == {2.0}
