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


def test_linear_init_freezes_the_backbone_then_trains_it_and_resumes_exactly(coco256_store, tmp_path):
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

    # stopped after the frozen epoch, resumed for the second: the same bytes as the uninterrupted run
    split = tmp_path / "split"
    run_train(load_train_config([TINY_NET], _args(coco256_store, split, "epochs=1", "phases.linear_init_epochs=1")))
    run_train(load_train_config([TINY_NET], _args(coco256_store, split, "epochs=2", "phases.linear_init_epochs=1",
                                                  "resume=true")))
    assert _same(_checkpoints(split)[4], after2)


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
