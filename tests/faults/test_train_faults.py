"""Fault injection on the training stage (issue 9): kill -9 at random points with the stateful losses, a full
disk while a checkpoint is written, and flipped bits in checkpoints.

Every kill trial resumes and must end byte-identical (weights, loss state, optimizer, scheduler, RNG, best/,
predictions, logged losses) to an uninterrupted run. CI runs ``trials(3, 20)`` kills per loss; the long run 20.
"""
from __future__ import annotations

import errno
import json
import logging
import random
from pathlib import Path

import pytest

from tests.faults.conftest import trials
from tests.test_train import TINY_NET, _train_args, final_state, fork_train
from vlpl.train.loop import run_train
from vlpl.train.recipes import load_train_config

EPOCHS, STEPS, EVERY = 2, 3, 2
# per run: steps 1..6; checkpoints at steps 2, 3 (epoch end), 5, 6 (epoch end); two eval splits per epoch
KILL_POINTS = {"step": EPOCHS * STEPS, "checkpoint": 4, "validate": 2 * EPOCHS, "epoch_end": EPOCHS}
LOSSES = {
    "role": ("method=role", "optim.lr=1e-3"),  # the estimator moves visibly
    "ll_cp": ("method=ll_cp", "loss.params.delta_rel=0.05", "optim.lr=1e-3"),  # writes corrections in epoch 2
    "em_apl": ("method=em_apl", "loss.params.warmup_epoch=1"),  # APL soft negatives after every epoch
}


def _args(store: Path, out: Path, loss: str, *extra: str) -> list:
    return _train_args(store, out, *LOSSES[loss], "dataset=coco2014", f"epochs={EPOCHS}",
                       f"max_steps_per_epoch={STEPS}", f"checkpoint_every_steps={EVERY}", "keep_checkpoints=2",
                       "early_stop_patience=null", "early_stop_drop=null", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(LOSSES))
def test_kill_at_random_points_resumes_byte_identical(loss, coco256_store, tmp_path, record_fault):
    ref = tmp_path / "ref"
    assert fork_train(_args(coco256_store, ref, loss)) == 0
    want = final_state(ref)
    if loss == "em_apl":
        assert any(r.get("apl_total", 0) > 0 for r in want["metrics"] if r["kind"] == "epoch")
    rng = random.Random(f"train-kill-{loss}")
    n = trials(3, 20)
    ok, details = 0, []
    for t in range(n):
        point = rng.choice(sorted(KILL_POINTS))
        kill = f"{point}:{rng.randint(1, KILL_POINTS[point])}"
        run = tmp_path / f"t{t}"
        killed = fork_train(_args(coco256_store, run, loss), kill_at=kill)
        resumed = fork_train(_args(coco256_store, run, loss, "resume=true"))
        same = killed == -9 and resumed == 0 and final_state(run) == want
        ok += same
        details.append(f"{kill}{'' if same else ' DIFFERS'}")
    record_fault("train", f"kill -9 at a random point ({loss})", n, ok, lost=n - ok,
                 detail=f"2 epochs x 3 steps, checkpoint every 2 steps; killed at {', '.join(details)}; resumed "
                        f"weights, loss state, optimizer, best/, predictions, metrics byte-identical")
    assert ok == n, details


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_write(coco256_store, tmp_path, monkeypatch, record_fault, caplog):
    """ENOSPC at the write call of the 3rd checkpoint: a clear error naming the file, the previous checkpoint
    intact, no temp folder left; the resumed run ends byte-identical to an uninterrupted one."""
    from vlpl.train import checkpoint as ckmod

    ref, run = tmp_path / "ref", tmp_path / "run"
    run_train(load_train_config([TINY_NET], _args(coco256_store, ref, "role")))
    real = ckmod._write_file
    writes = []

    def full_disk(path: Path, data: bytes) -> None:
        writes.append(path)
        if len(writes) == 2 * 7 + 4:  # 7 files a checkpoint: the 4th file of the 3rd checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(ckmod, "_write_file", full_disk)
    with pytest.raises(ckmod.CheckpointError) as err:
        run_train(load_train_config([TINY_NET], _args(coco256_store, run, "role")))
    msg = str(err.value)
    monkeypatch.setattr(ckmod, "_write_file", real)
    ckdir = run / "checkpoints"
    checks = {
        "names the file": f"no space left on device writing checkpoint file {ckdir}/.tmp-step_000000005/scheduler.pt"
                          in msg,
        "says the previous is kept": "the previous checkpoint" in msg and "step_000000003 is kept" in msg,
        "no temp folder": sorted(p.name for p in ckdir.iterdir()) == ["step_000000002", "step_000000003"],
    }
    run_train(load_train_config([TINY_NET], _args(coco256_store, run, "role", "resume=true")))
    checks["resumed identical"] = final_state(run) == final_state(ref)
    record_fault("train", "ENOSPC at a checkpoint write", 1, int(all(checks.values())),
                 lost=int(not checks["resumed identical"]), detail="; ".join(f"{k}: {v}" for k, v in checks.items()))
    assert all(checks.values()), (checks, msg)


def test_bit_flips_in_checkpoints_are_detected(coco256_store, tmp_path, record_fault, caplog):
    """A flipped bit anywhere in the newest checkpoint's files is detected, the file named, and resume falls
    back to the checkpoint before it."""
    from vlpl.train.checkpoint import FILES, list_checkpoints, load_latest

    run = tmp_path / "run"
    run_train(load_train_config([TINY_NET], _args(coco256_store, run, "ll_cp")))
    older, newest = list_checkpoints(run / "checkpoints")
    rng = random.Random("train-bitflip")
    n = trials(3, 20)
    ok, details = 0, []
    for _ in range(n):
        name = rng.choice(FILES + ("complete.json",))
        f = newest / name
        data = bytearray(f.read_bytes())
        pos, bit = rng.randrange(len(data)), rng.randrange(8)
        data[pos] ^= 1 << bit
        original = f.read_bytes()
        f.write_bytes(bytes(data))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vlpl.train.checkpoint"):
            got = load_latest(run / "checkpoints")
        f.write_bytes(original)
        detected = got is not None and got.path == older and newest.name in caplog.text and \
            (name in caplog.text or "complete.json" in caplog.text)
        ok += detected
        details.append(f"{name}@{pos}.{bit}{'' if detected else ' MISSED'}")
    assert json.loads((newest / "complete.json").read_text())["step"] == 6
    record_fault("train", "1-bit flip in a checkpoint", n, ok, lost=n - ok,
                 detail=f"flipped: {', '.join(details)}; each detected, named, fell back to {older.name}")
    assert ok == n, details
