"""The training stage on real images (coco256) with a tiny timm model: learning, recipes, resume, DDP."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlpl.config import ConfigError
from vlpl.train.loop import run_train
from vlpl.train.recipes import load_train_config

REPO = Path(__file__).resolve().parent.parent
TINY_CLIP = str(REPO / "configs" / "models" / "tiny.yaml")
TINY_NET = str(REPO / "configs" / "models" / "tiny_classifier.yaml")


@pytest.fixture(scope="module")
def store(coco256_store):
    return coco256_store


def _train_args(store: Path, out: Path, *extra: str) -> list:
    return [f"store={store}", f"out={out}", "progress=false", "log_every=1", *extra]


def test_recipe_is_the_papers_table(store, tmp_path):
    cfg = load_train_config([], ["method=aevlp", "dataset=coco2014", f"store={store}", f"out={tmp_path}"])
    assert cfg.loss.name == "gpr" and cfg.pseudo.rule == "damp" and cfg.epochs == 8 and cfg.batch_size == 16
    assert cfg.loss.params["beta"] == [0, 10, -2, -8] and cfg.loss.params["lambda2"] == 0.5
    assert cfg.pseudo.params == {"temp": 0.01, "eta": 0.3, "threshold": 0.5, "top_k": 3, "negative_ratio": 0.3}
    assert (cfg.optim.lr, cfg.optim.head_lr, cfg.early_stop_patience, cfg.early_stop_drop) == (1e-5, 1e-4, 2, 2.0)
    cub = load_train_config([], ["method=aevlp", "dataset=cub", f"store={store}", f"out={tmp_path}"])
    assert cub.loss.params["q3"] == 1.5 and cub.pseudo.params["temp"] == 0.1 and cub.pseudo.params["top_k"] == 32
    # flags win over the recipe
    over = load_train_config([], ["method=aevlp", "dataset=voc2012", f"store={store}", f"out={tmp_path}", "epochs=2"])
    assert over.epochs == 2 and over.loss.params["reg"] == 0.05
    with pytest.raises(ConfigError, match="no row for 'coco'"):
        load_train_config([], ["method=aevlp", "dataset=coco", f"store={store}", f"out={tmp_path}"])
    with pytest.raises(ConfigError, match="unknown method 'aevpl'"):
        load_train_config([], ["method=aevpl", f"store={store}", f"out={tmp_path}"])


# three methods in the fast suite (a stateless baseline, a stateful loss, the primary method), all in CI
@pytest.mark.parametrize("method", ["an", "role", "aevlp"] + [
    pytest.param(m, marks=pytest.mark.slow)
    for m in ["an_ls", "wan", "epr", "em", "em_apl", "ll_r", "ll_ct", "ll_cp", "gr", "vlpl"]])
def test_every_method_trains_to_a_checkpoint_and_test_map(method, store, tmp_path):
    out = tmp_path / method
    extra = ["loss.params.warmup_epoch=1"] if method == "em_apl" else []
    cfg = load_train_config([TINY_NET], _train_args(store, out, f"method={method}", "dataset=coco2014", "epochs=2",
                                                    "max_steps_per_epoch=2", *extra))
    run_train(cfg)
    s = json.loads((out / "summary.json").read_text())
    assert s["loss"] == cfg.loss.name and 0 <= s["test_map_at_best"] <= 100
    assert (out / "best" / "model.safetensors").exists() and (out / "predictions" / "test.npz").exists()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "step"]
    assert steps and all(np.isfinite(r["loss"]) for r in steps)
    assert {"lr", "images_per_s", "data_wait_frac"} <= set(steps[0])
    if cfg.pseudo.rule:
        assert "pseudo_pos_per_image" in steps[0]
    if method == "em_apl":
        assert any(r.get("apl_total", 0) > 0 for r in recs if r["kind"] == "epoch")


@pytest.mark.slow
def test_training_learns_from_the_images_beyond_the_label_prior_and_the_untrained_model(store, tmp_path):
    """AN on the single observed positives, "val" = the training images themselves (full labels).

    Halving the AN loss proves nothing: predicting every class rare does it without looking at an image. So:
    the trained model's AN loss on the training images must be below that of the best image-blind predictor
    (each class at its observed-positive rate, computed by hand from the observed matrix), and its mAP on those
    images must beat the run's own untrained weights (same seed) by 10 points."""
    from accelerate.utils import set_seed

    from vlpl.eval.metrics import mean_average_precision
    from vlpl.store.store import ScoreStore
    from vlpl.train.data import image_transform
    from vlpl.train.loop import load_best
    from vlpl.train.model import ClassContext, create_classifier

    out = tmp_path / "learn"
    cfg = load_train_config([TINY_NET], _train_args(store, out, "method=an", "epochs=8", "optim.lr=3e-3",
                                                    "val_split=train", "hflip=false", "batch_size=17"))
    run_train(cfg)
    epochs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    assert len(epochs) == 8 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]

    st = ScoreStore(store)
    train = st.split("train")
    obs_pos = (train.observed == 1).astype(np.float64)
    prior = obs_pos.mean(0).clip(1e-5, 1 - 1e-5)  # the best constant predictor of the AN targets
    blind_loss = float(-(obs_pos * np.log(prior) + (1 - obs_pos) * np.log(1 - prior)).mean())

    def probs(model) -> np.ndarray:
        tf = image_transform(64, model.mean, model.std, False, False)
        from vlpl.data.images import ImageDataset, ImageSource

        ds = ImageDataset(ImageSource.from_store(st.dataset_info, None), train.images, tf)
        with torch.no_grad():
            return torch.sigmoid(model.eval()(torch.stack([ds[i][0] for i in range(len(ds))]))).double().numpy()

    trained, _ = load_best(out)
    p = probs(trained).clip(1e-5, 1 - 1e-5)
    an_loss = float(-(obs_pos * np.log(p) + (1 - obs_pos) * np.log(1 - p)).mean())
    assert an_loss < 0.97 * blind_loss, (an_loss, blind_loss)  # below what any image-blind predictor can reach
    set_seed(cfg.seed)  # what setup() does before building the model: the run's own initial weights
    untrained = create_classifier(cfg.student, ClassContext.from_store(st))
    base = mean_average_precision(train.labels, probs(untrained))["map"]
    best = json.loads((out / "summary.json").read_text())["best_val_map"]
    assert best == pytest.approx(mean_average_precision(train.labels, p)["map"], abs=0.5)
    assert best > base + 10, (best, base)


def _cli_train(store: Path, out: Path, *extra: str) -> list:
    return [sys.executable, "-m", "vlpl", "train", "-c", TINY_NET,
            *_train_args(store, out, "method=aevlp", "dataset=coco2014", "deterministic=true", *extra)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def fork_train(args: list, kill_at: Optional[str] = None, files: Sequence[str] = (TINY_NET,),
               timeout: float = 600) -> int:
    """``run_train`` in a forked child (no re-import: seconds, not tens of seconds); ``kill_at`` ("step:5",
    "checkpoint:2", "validate:1", "epoch_end:1") makes the child SIGKILL itself there. Returns the exit code
    (-9 when killed). Every run of a comparison goes through here, so all use one thread."""
    import multiprocessing as mp

    proc = mp.get_context("fork").Process(target=_train_child, args=(list(args), kill_at, list(files)))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"training child did not finish in {timeout} s: {args}")
    return int(proc.exitcode)


def _train_child(args: list, kill_at: Optional[str], files: list) -> None:
    from vlpl.train.checkpoint import KILL_ENV

    torch.set_num_threads(1)
    os.environ.pop(KILL_ENV, None)
    if kill_at:
        os.environ[KILL_ENV] = kill_at
    logging.disable(logging.WARNING)
    run_train(load_train_config(files, args))


def final_state(run: Path) -> dict:
    """sha256 of what must be identical between a resumed and an uninterrupted run: the last checkpoint's
    weights, loss state, optimizer, scheduler and RNG, best/, predictions/, and the logged losses."""
    from vlpl.train.checkpoint import list_checkpoints

    last = list_checkpoints(run / "checkpoints")[-1]
    files = {f"ckpt/{f}": last / f for f in ("model.safetensors", "loss.safetensors", "optimizer.pt",
                                             "scheduler.pt", "rng.pt")}
    files.update({f"best/{p.name}": p for p in (run / "best").iterdir()})
    files.update({f"pred/{p.name}": p for p in (run / "predictions").iterdir()})
    out = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in files.items()}
    out["last"] = last.name
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    timing = {"images_per_s", "data_wait_frac", "tflops_per_s", "mfu", "epoch_time_s"}
    out["metrics"] = [{k: v for k, v in r.items() if k not in timing} for r in recs]
    return out


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_bytes_at_any_point(store, tmp_path):
    """Kill -9 mid-epoch, inside a checkpoint write, during validation and between an epoch's record and its
    checkpoint; each resumed run ends byte-identical to an uninterrupted one (no max_steps_per_epoch: every
    epoch has its own order; mid-epoch checkpoints every 3 steps; one resume with 2 DataLoader workers), with
    no duplicate metrics record."""
    args = ["method=role", "dataset=coco2014", "epochs=2", "early_stop_patience=null", "early_stop_drop=null",
            "checkpoint_every_steps=3", "keep_checkpoints=2", "optim.lr=1e-3"]
    ref = tmp_path / "ref"
    assert fork_train(_train_args(store, ref, *args)) == 0
    want = final_state(ref)
    assert len([r for r in want["metrics"] if r["kind"] == "step"]) == 14  # 2 x ceil(102 / 16): no step cap
    for kill in ("step:5", "checkpoint:2", "validate:1", "epoch_end:1"):
        run = tmp_path / kill.replace(":", "_")
        assert fork_train(_train_args(store, run, *args), kill_at=kill) == -9, kill
        with pytest.raises(ConfigError, match="resume=true"):  # refuses to clobber a run
            run_train(load_train_config([TINY_NET], _train_args(store, run, *args)))
        workers = ["num_workers=2"] if kill == "validate:1" else []  # the data order ignores the worker count
        assert fork_train(_train_args(store, run, *args, "resume=true", *workers)) == 0, kill
        got = final_state(run)
        assert got == want, (kill, [k for k in want if got.get(k) != want[k]])
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # orphan tmp removed


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(store, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("epochs=1", "max_steps_per_epoch=3", "pseudo.dynamic=true", "batch_size=16")
    subprocess.run(_cli_train(store, one, *args), check=True, env=_env(), capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29547", "-m", "vlpl", *_cli_train(store, two, *args)[3:]],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    s1 = [r for r in map(json.loads, (one / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    s2 = [r for r in map(json.loads, (two / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    # same global batches; BatchNorm sees half-batches per process, hence a tolerance, not equality
    assert len(s1) == len(s2)
    assert abs(s1[0]["loss"] - s2[0]["loss"]) < 0.02 * s1[0]["loss"]
    # the rule runs on the global batch in each process: the same dynamic flips and pseudo-labels as 1 process
    assert [r["pseudo_pos_per_image"] for r in s1] == [r["pseudo_pos_per_image"] for r in s2]
    p1 = np.load(one / "predictions" / "test.npz")["probs"]
    p2 = np.load(two / "predictions" / "test.npz")["probs"]
    assert p1.shape == p2.shape and np.abs(p1 - p2).max() < 0.05


def _epoch_checkpoint(run: Path, epoch: int) -> Path:
    """The checkpoint written at the end of ``epoch``."""
    from vlpl.train.checkpoint import list_checkpoints

    for ck in list_checkpoints(run / "checkpoints"):
        p = json.loads((ck / "progress.json").read_text())
        if p["epoch"] == epoch and p["epoch_step"] == 0:
            return ck
    raise AssertionError(f"no end-of-epoch-{epoch} checkpoint in {run}")


def _torchrun(port: int, cmd: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "vlpl", *cmd[3:]], env=_env(), capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("method,extra,port", [
    ("role", ("optim.lr=1e-3",), 29548),                            # estimator lr 1e-2: rows move visibly
    ("ll_cp", ("loss.params.delta_rel=0.05", "optim.lr=1e-3"), 29549),  # epoch 2 writes ~K per step
])
def test_two_process_loss_state_matches_one_process(method, extra, port, store, tmp_path):
    """ROLE's estimator and LL-Cp's permanent writes are the 1-process ones in a 2-process run's checkpoint
    (processes see different rows; without averaging / syncing, rank 0 keeps only its own rows' updates)."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = (f"method={method}", "epochs=2", "max_steps_per_epoch=3", "batch_size=16", "early_stop_patience=null",
            "early_stop_drop=null", *extra)
    subprocess.run(_cli_train(store, one, *args), check=True, env=_env(), capture_output=True)
    r = _torchrun(port, _cli_train(store, two, *args))
    assert r.returncode == 0, r.stderr[-3000:]
    def state(run: Path, epoch: int) -> dict:
        return load_file(_epoch_checkpoint(run, epoch) / "loss.safetensors")

    if method == "role":
        # epoch 2's update of the estimator; Adam turns tiny gradient differences (BatchNorm sees half-batches
        # per process) into whole steps on a few entries, so compare the updates as a whole
        u1, u2 = (state(run, 2)["estimator_logits"] - state(run, 1)["estimator_logits"] for run in (one, two))
        moved1, moved2 = u1.abs().amax(1) > 1e-4, u2.abs().amax(1) > 1e-4
        assert int(moved1.sum()) > 20 and torch.equal(moved1, moved2)  # every row this epoch saw, on rank 0 too
        corr = float(torch.corrcoef(torch.stack([u1.flatten(), u2.flatten()]))[0, 1])
        assert corr > 0.95, corr
    else:
        base = int((state(one, 1)["label_state"] == 1).sum())  # epoch 1 writes nothing (clean rate 1)
        w1 = int((state(one, 2)["label_state"] == 1).sum()) - base
        w2 = int((state(two, 2)["label_state"] == 1).sum()) - base
        assert w1 > 10, "LL-Cp should have written corrections in epoch 2"
        # the same number of writes per step (top-K over the global batch), every process's in the checkpoint
        assert abs(w2 - w1) <= 0.1 * w1, (w1, w2)


@pytest.mark.slow
def test_batches_not_divisible_by_the_process_count_are_clear_errors(store, tmp_path):
    r = _torchrun(29550, _cli_train(store, tmp_path / "odd", "eval_batch_size=33"))
    assert r.returncode != 0 and "eval_batch_size=33 must be divisible by the 2 processes" in r.stderr


def test_open_clip_tower_backbone_and_grad_accum(store, tmp_path):
    out = tmp_path / "oc"
    cfg = load_train_config([], _train_args(store, out, "method=aevlp", "dataset=coco2014", "student.kind=open_clip",
                                            "student.name=vlpl-tiny", "student.image_size=64", "student.normalization=model",
                                            "epochs=1", "batch_size=8", "grad_accum=2", "max_steps_per_epoch=4",
                                            "num_workers=0"))
    run_train(cfg)
    from vlpl.train.loop import load_best

    model, classes = load_best(out)
    assert len(classes) == 80 and model.num_features == 32  # vlpl-tiny's embedding width
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 80)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in recs if r["kind"] == "step"]) == 4  # micro-batches, logged every step


def test_bad_training_configs_are_clear_errors(store, tmp_path):
    with pytest.raises(ConfigError, match="needs pseudo-labels"):
        run_train(load_train_config([TINY_NET], _train_args(store, tmp_path / "a", "loss.name=gpr", "pseudo.rule=null")))
    from vlpl.registry import RegistryError

    with pytest.raises(RegistryError, match="unknown option.*'tmep'"):
        run_train(load_train_config([TINY_NET], _train_args(store, tmp_path / "b", "pseudo.params.tmep=0.1")))
    with pytest.raises(RegistryError, match="unknown loss 'gpx'"):
        run_train(load_train_config([TINY_NET], _train_args(store, tmp_path / "c", "loss.name=gpx")))


# ---- data order, checkpoints, resume checks (fast) ------------------------------------------------------


def test_data_order_is_a_function_of_seed_epoch_and_position():
    from vlpl.train.data import EpochOrder

    one = EpochOrder(37, 8, seed=3, hflip=True)
    assert one.steps_per_epoch == 5
    full = [one.global_batch(2, s) for s in range(5)]
    assert sorted(np.concatenate(full).tolist()) == list(range(37))  # an epoch is a permutation
    assert not np.array_equal(one.permutation(1), one.permutation(2))  # each epoch its own order
    fresh = EpochOrder(37, 8, seed=3, hflip=True)
    fresh.permutation(5)  # another epoch drawn first: nothing carries over
    assert np.array_equal(fresh.permutation(2), one.permutation(2)) and np.array_equal(fresh.flips(2), one.flips(2))
    assert 0 < one.flips(2).sum() < 37 and not EpochOrder(37, 8, 3, hflip=False).flips(2).any()
    # a resumed epoch (start=3) yields exactly the tail of the uninterrupted one, flips included
    assert list(one.batches(2, 3)) == list(one.batches(2, 0))[3:] and len(one.batches(2, 3)) == 2
    # two processes: their slices of every global batch make the 1-process batch; the short last batch
    # (37 = 4 x 8 + 5) is filled from the start of the permutation so that it splits evenly
    ranks = [EpochOrder(37, 8, 3, True, num_processes=2, process_index=r) for r in range(2)]
    for s in range(5):
        both = np.concatenate([r.process_slice(r.global_batch(2, s)) for r in ranks])
        assert np.array_equal(both, ranks[0].global_batch(2, s))
        assert np.array_equal(both[:len(full[s])], full[s])
    assert len(ranks[0].global_batch(2, 4)) == 6 and ranks[0].global_batch(2, 4)[-1] == one.permutation(2)[0]
    assert len(EpochOrder(37, 8, 3, True, max_steps=2).batches(1)) == 2


def _tiny_states():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    loss = {"state": torch.tensor([[1.0, 0.0], [0.0, -1.0]]), "apl_mask": torch.tensor([[True, False], [False, True]])}
    return model, opt, sched, loss


def _save(ckdir: Path, step: int, keep: int = 0) -> Path:
    from vlpl.train.checkpoint import save_checkpoint

    model, opt, sched, loss = _tiny_states()
    return save_checkpoint(ckdir, step, model.state_dict(), loss, opt.state_dict(), sched.state_dict(),
                           {"epoch": 1, "step": step}, keep)


def test_checkpoint_round_trip_and_rotation(tmp_path):
    from vlpl.train.checkpoint import list_checkpoints, load_checkpoint

    ck = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        _save(ck, step, keep=2)
    assert [p.name for p in list_checkpoints(ck)] == ["step_000000006", "step_000000009"]
    c = load_checkpoint(ck / "step_000000009")
    model, opt, sched, loss = _tiny_states()
    assert all(torch.equal(c.model[k], v) for k, v in model.state_dict().items())
    assert torch.equal(c.loss["apl_mask"], loss["apl_mask"]) and c.loss["apl_mask"].dtype == torch.bool
    assert torch.equal(c.optimizer["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert c.scheduler["last_epoch"] == 1 and c.progress == {"epoch": 1, "step": 9}
    assert torch.equal(c.rng["torch"], torch.get_rng_state())


def test_flipped_bit_is_detected_named_and_resume_falls_back(tmp_path, caplog):
    from vlpl.train.checkpoint import CheckpointCorrupt, load_checkpoint, load_latest

    ck = tmp_path / "checkpoints"
    _save(ck, 3)
    newest = _save(ck, 6)
    f = newest / "optimizer.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match=r"optimizer\.pt: sha256 does not match"):
        load_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="vlpl.train.checkpoint"):
        c = load_latest(ck)
    assert c is not None and c.path.name == "step_000000003"
    assert "optimizer.pt" in caplog.text and "falling back to step_000000003" in caplog.text


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(marker: Path, torch_zip: bool = False) -> bytes:
    """A pickle that creates ``marker`` when unpickled (as a raw pickle, or inside torch.save's zip)."""
    import io
    import pickle

    if not torch_zip:
        return pickle.dumps({"state": _Evil(marker)})
    buf = io.BytesIO()
    torch.save({"state": _Evil(marker)}, buf)
    return buf.getvalue()


def test_crafted_checkpoints_never_run_code(store, tmp_path):
    """An accelerate-style folder with a custom_checkpoint_0.pkl, and a vlpl-looking checkpoint whose
    optimizer.pt is a code-running pickle with correct hashes: resume refuses both and the pickles never run."""
    import shutil

    from vlpl.train.checkpoint import CheckpointError, _self_checksum, sha256_bytes

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    acc = run / "checkpoints" / "epoch_001"
    acc.mkdir(parents=True)
    (acc / "custom_checkpoint_0.pkl").write_bytes(_evil_pickle(marker))
    (acc / "complete.json").write_text("{}")
    cfg = load_train_config([TINY_NET], _train_args(store, run, "method=an", "epochs=1", "resume=true"))
    with pytest.raises(CheckpointError, match=r"epoch_001.*Refusing to resume"):
        run_train(cfg)
    assert not marker.exists() and not (run / "config.yaml").exists()  # refused before writing anything

    shutil.rmtree(acc)
    ck = _save(run / "checkpoints", 4)
    evil = _evil_pickle(marker, torch_zip=True)
    (ck / "optimizer.pt").write_bytes(evil)
    meta = json.loads((ck / "complete.json").read_text())
    meta["sha256"]["optimizer.pt"] = sha256_bytes(evil)
    meta["complete_sha256"] = _self_checksum(meta)  # an attacker can recompute checksums: they are not the guard
    (ck / "complete.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: refused"):
        run_train(cfg)
    assert not marker.exists()
    (ck / "extra.pkl").write_bytes(evil)
    with pytest.raises(CheckpointError, match=r"unexpected file\(s\) extra\.pkl"):
        run_train(cfg)
    assert not marker.exists()


def test_checkpoint_write_failure_names_the_path_and_keeps_the_previous(tmp_path, monkeypatch):
    import errno

    from vlpl.train import checkpoint as ckmod

    ck = tmp_path / "checkpoints"
    _save(ck, 3)
    real = ckmod._write_file
    calls = []

    def full_disk(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(ckmod, "_write_file", full_disk)
    with pytest.raises(ckmod.CheckpointError, match=r"no space left on device writing checkpoint file .*"
                                                    r"\.tmp-step_000000006/loss\.safetensors; the previous "
                                                    r"checkpoint .*step_000000003 is kept"):
        _save(ck, 6)
    assert [p.name for p in ck.iterdir()] == ["step_000000003"]  # no temp folder left, the old one intact
    assert ckmod.load_latest(ck).path.name == "step_000000003"


def test_orphan_temp_checkpoints_are_removed(tmp_path):
    from vlpl.train.checkpoint import remove_orphans

    ck = tmp_path / "checkpoints"
    _save(ck, 3)
    (ck / ".tmp-step_000000006").mkdir()
    (ck / ".tmp-step_000000006" / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in remove_orphans(ck)] == [".tmp-step_000000006"]
    assert [p.name for p in ck.iterdir()] == ["step_000000003"]


def test_resume_refuses_another_config_or_store_before_writing(store, tmp_path):
    run = tmp_path / "run"
    base = _train_args(store, run, "method=an", "epochs=1", "max_steps_per_epoch=1")
    run_train(load_train_config([TINY_NET], base))
    saved = (run / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"optim\.lr: run has 1e-05, now 0\.001"):
        run_train(load_train_config([TINY_NET], [*base, "resume=true", "optim.lr=1e-3"]))
    with pytest.raises(ConfigError, match=r"loss\.name: run has \"an\", now \"an_ls\""):
        run_train(load_train_config([TINY_NET], [*base, "resume=true", "loss.name=an_ls"]))
    assert (run / "config.yaml").read_bytes() == saved
    ident = json.loads((run / "store.json").read_text())
    ident["classes_sha256"] = "0" * 64  # as if the run had trained on a store with other classes
    (run / "store.json").write_text(json.dumps(ident))
    with pytest.raises(ConfigError, match=r"not the one this run trained on \(classes_sha256: run has \"0000"):
        run_train(load_train_config([TINY_NET], [*base, "resume=true"]))
    assert (run / "config.yaml").read_bytes() == saved
    # keys that may change: more epochs (and cadence, logging) resume the run
    (run / "store.json").write_text(json.dumps({**ident, "classes_sha256": None}))
    (run / "store.json").unlink()
    run_train(load_train_config([TINY_NET], [*base, "resume=true", "epochs=2", "log_every=5"]))
    epochs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]


def test_identical_runs_write_identical_best_and_predictions(store, tmp_path):
    args = ("method=aevlp", "dataset=coco2014", "epochs=1", "max_steps_per_epoch=2")
    for name in ("a", "b"):
        run_train(load_train_config([TINY_NET], _train_args(store, tmp_path / name, *args)))
    for sub in ("best", "predictions"):
        fa = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / sub).iterdir())
        assert fa and fa == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b" / sub).iterdir())
        for f in fa:
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_checkpoint_cadence_in_steps_and_minutes_respects_accumulation(store, tmp_path):
    """Mid-epoch checkpoints every N micro-steps or M minutes, only where an accumulation group ends (never
    with gradients half-accumulated), plus one at every epoch end."""
    from vlpl.train.checkpoint import list_checkpoints

    def steps(run: Path) -> list:
        return [int(p.name.split("_")[1]) for p in list_checkpoints(run / "checkpoints")]

    base = ("method=an", "epochs=2", "max_steps_per_epoch=5", "grad_accum=2", "keep_checkpoints=0",
            "checkpoint_every_minutes=null")
    run_train(load_train_config([TINY_NET], _train_args(store, tmp_path / "n", *base, "checkpoint_every_steps=1")))
    # epoch 1: groups end at steps 2, 4 and 5 (the epoch's end); epoch 2 at 7, 9 and 10
    assert steps(tmp_path / "n") == [2, 4, 5, 7, 9, 10]
    run_train(load_train_config([TINY_NET], _train_args(store, tmp_path / "s", *base, "checkpoint_every_steps=3")))
    assert steps(tmp_path / "s") == [4, 5, 9, 10]  # 3 steps after the last checkpoint, at a group's end
    run_train(load_train_config([TINY_NET], _train_args(store, tmp_path / "m", *base[:-1],
                                                        "checkpoint_every_minutes=0.0")))
    assert steps(tmp_path / "m") == [2, 4, 5, 7, 9, 10]


@pytest.mark.slow
def test_two_process_run_killed_mid_epoch_resumes_to_the_same_bytes(store, tmp_path):
    """Under torchrun (2 processes, the case where accelerate re-seeded the sampler on resume): both ranks
    SIGKILLed mid-epoch 2, resumed under torchrun; the end equals an uninterrupted 2-process run byte for byte
    (LL-Cp: the corrections of both ranks are in the checkpoint)."""
    from vlpl.train.checkpoint import KILL_ENV

    args = ("method=ll_cp", "loss.params.delta_rel=0.05", "optim.lr=1e-3", "epochs=2", "max_steps_per_epoch=4",
            "checkpoint_every_steps=3", "early_stop_patience=null", "early_stop_drop=null")
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = _torchrun(29551, _cli_train(store, ref, *args))
    assert r.returncode == 0, r.stderr[-3000:]
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29552", "-m", "vlpl", *_cli_train(store, run, *args)[3:]],
                            env={**_env(), KILL_ENV: "step:6"}, capture_output=True, text=True)
    assert killed.returncode != 0 and not (run / "summary.json").exists()
    r = _torchrun(29553, _cli_train(store, run, *args, "resume=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert final_state(run) == final_state(ref)


# ---- the input pipeline (issue 10.5) --------------------------------------------------------------------


def test_uint8_device_path_gives_the_float_paths_tensors(store):
    """Workers: decode + Resize((s, s)) as uint8; device: /255, normalise, flip. On the CPU the model sees the
    float path's tensors (Resize + ToTensor + Normalize, flipped after) bit for bit; the whole micro-batch a
    worker builds carries the plan's positions and flips, which are EpochOrder's."""
    from vlpl.data.images import ImageDataset, ImageSource
    from vlpl.store.store import ScoreStore
    from vlpl.train.data import (
        DeviceNormalize,
        EpochOrder,
        FlippedRows,
        TrainImages,
        Uint8Resize,
        image_transform,
        model_input,
    )

    st = ScoreStore(store)
    train = st.split("train")
    src = ImageSource.from_store(st.dataset_info, None)
    mean, std, size = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27), 48
    old = FlippedRows(ImageDataset(src, train.images, image_transform(size, mean, std, False, False)))
    new = TrainImages(ImageDataset(src, train.images, Uint8Resize(size)))
    order = EpochOrder(len(train), 6, seed=1, hflip=True)
    plan = next(iter(order.plans(2, 3)))
    assert plan.step == 3 and list(zip(plan.local.tolist(), plan.flips.tolist())) == list(order.batches(2, 3))[0]
    item = new[plan]
    assert item["images"].dtype == torch.uint8 and item["images"].shape == (6, 3, size, size)
    assert item["index"].tolist() == plan.local.tolist() and item["flip"].tolist() == plan.flips.tolist()
    assert 0 < int(item["flip"].sum()) < 6  # both kinds in the batch (seed chosen so)
    want = torch.stack([old[(k, f)][0] for k, f in zip(plan.local.tolist(), plan.flips.tolist())])
    raw = item["images"].clone()
    got = model_input(item["images"], item["flip"], DeviceNormalize(mean, std))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(item["images"], raw)  # the loader's batch is not flipped in place
    # CPU training: the workers normalise and flip; the main process only passes the batch on
    cpu = TrainImages(ImageDataset(src, train.images, Uint8Resize(size)), normalize=DeviceNormalize(mean, std))[plan]
    assert torch.equal(cpu["images"], want) and torch.equal(model_input(cpu["images"], cpu["flip"], None), want)
    one = ImageDataset(src, train.images, Uint8Resize(size, normalize=DeviceNormalize(mean, std)))[int(plan.local[0])]
    assert torch.equal(one[0], old[(int(plan.local[0]), False)][0])  # eval loaders: no flip
    if torch.cuda.is_available():  # the GPU: float rounding only
        gpu = DeviceNormalize(mean, std, "cuda")(item["images"].pin_memory(), item["flip"]).cpu()
        assert torch.allclose(gpu, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        DeviceNormalize(mean, std)(want, None)


def test_worker_and_prefetch_counts_follow_the_cpus(monkeypatch):
    from vlpl.train.data import auto_num_workers, auto_prefetch, resolve_num_workers

    assert auto_num_workers(local_processes=1, cpus=16) == 15
    assert auto_num_workers(local_processes=8, cpus=128) == 15  # 16 CPUs per process, one left to it
    assert auto_num_workers(local_processes=2, cpus=2) == 0 and auto_num_workers(1, 64, cap=16) == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's: the node's CPUs are shared
    assert auto_num_workers(cpus=16) == 3
    assert resolve_num_workers(3) == 3 and resolve_num_workers("auto") == auto_num_workers()
    with pytest.raises(ValueError, match="num_workers: expected a count >= 0 or 'auto', got 'many'"):
        resolve_num_workers("many")
    assert auto_prefetch(0) is None and auto_prefetch(1) == 8 and auto_prefetch(16) == 2


def test_bad_worker_settings_are_config_errors(store, tmp_path):
    with pytest.raises(ConfigError, match="num_workers: expected a count >= 0 or 'auto', got 'many'"):
        run_train(load_train_config([TINY_NET], _train_args(store, tmp_path / "a", "num_workers=many")))
    with pytest.raises(ConfigError, match="prefetch_factor: expected a count >= 1"):
        run_train(load_train_config([TINY_NET], _train_args(store, tmp_path / "b", "num_workers=1",
                                                            "prefetch_factor=0")))


def test_prefetched_scores_are_the_readers_and_errors_reach_their_batch():
    """prefetch_scores adds read(global_index) to each batch, in order, reading ahead on a thread; a reader
    error is raised at the batch it belongs to, after the earlier batches were delivered."""
    from vlpl.train.data import prefetch_scores

    table = np.arange(40, dtype=np.float32).reshape(10, 1, 2, 2)
    batches = [{"global_index": torch.tensor(ix), "step": s} for s, ix in enumerate([[3, 1], [0, 9], [5, 5], [7, 2]])]
    got = list(prefetch_scores(batches, lambda ix: table[ix], depth=2))
    assert [b["step"] for b in got] == [0, 1, 2, 3]
    for b in got:
        assert torch.equal(b["scores"], torch.from_numpy(table[b["global_index"].numpy()]))

    def bad(ix: np.ndarray) -> np.ndarray:
        if 9 in ix:
            raise OSError("shard 3: unreadable")
        return table[ix]

    seen = []
    with pytest.raises(OSError, match="shard 3"):
        for b in prefetch_scores(batches, bad, depth=3):
            seen.append(b["step"])
    assert seen == [0]


def _step_fixture(store):
    """A tiny model, loss, optimizer and rule over the coco256 store's training split."""
    from vlpl.config import OptimConfig, StudentConfig
    from vlpl.store.store import ScoreStore
    from vlpl.train.losses import create_loss
    from vlpl.train.model import ClassContext, create_classifier
    from vlpl.train.optim import create_optimizer
    from vlpl.train.step import RuleRunner, StepState

    st = ScoreStore(store)
    train = st.split("train")
    torch.manual_seed(0)
    model = create_classifier(StudentConfig(kind="timm", name="test_resnet", pretrained=False, image_size=32),
                              ClassContext.from_store(st)).train()
    obs = torch.from_numpy(np.ascontiguousarray(train.observed))
    loss = create_loss("gpr", obs).train()
    loss.set_epoch(1, 2)
    opt = create_optimizer(OptimConfig(name="adam", lr=1e-3, head_lr=1e-3), model, loss.param_groups(1e-3))
    rule = RuleRunner("damp", {}, True, lambda pos: torch.from_numpy(train.scores(pos)), obs)
    return train, model, loss, rule, StepState(optimizer=opt, device=torch.device("cpu"), seed=5)


def test_step_with_prefetched_scores_equals_the_step_reading_them(store):
    """The loop hands the step the prefetched scores; the step with them equals the step reading the store
    itself (same dynamic variant draws, pseudo-labels, loss, weights), and the pseudo-labels stay on the
    step's device."""
    import copy

    from vlpl.config import OptimConfig
    from vlpl.train.optim import create_optimizer
    from vlpl.train.step import TrainBatch, train_step

    train, model, loss, rule, state = _step_fixture(store)
    runs = []
    for prefetched in (False, True):
        m, lo = copy.deepcopy(model), copy.deepcopy(loss)
        st = copy.copy(state)
        st.optimizer = create_optimizer(OptimConfig(name="adam", lr=1e-3, head_lr=1e-3), m, lo.param_groups(1e-3))
        outs = []
        for step, pos in enumerate([np.array([4, 9, 2, 30]), np.array([7, 1, 50, 3])]):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(4, 3, 32, 32, generator=g)
            scores = torch.from_numpy(train.scores(pos)) if prefetched else None
            outs.append(train_step(TrainBatch(images=x, index=torch.from_numpy(pos), flip=torch.zeros(4, dtype=torch.bool),
                                              epoch=1, step=step, scores=scores), m, lo, rule, st))
        runs.append((outs, m.state_dict()))
    (a, wa), (b, wb) = runs
    for oa, ob in zip(a, b):
        assert torch.equal(oa.pseudo, ob.pseudo) and oa.pseudo.device.type == "cpu"
        assert torch.equal(oa.terms["loss"], ob.terms["loss"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are only observable on a CUDA device")
def test_the_step_does_not_synchronise_with_the_host(store):
    """With CUDA's sync debug mode set to error, a whole training step (rule on the device, forward, loss,
    backward, optimizer step) runs without a host synchronisation."""
    from vlpl.train.step import TrainBatch, train_step

    train, model, loss, rule, state = _step_fixture(store)
    dev = torch.device("cuda")
    model.to(dev)
    loss.to(dev)
    from vlpl.config import OptimConfig
    from vlpl.train.optim import create_optimizer

    state.optimizer = create_optimizer(OptimConfig(name="adam", lr=1e-3, head_lr=1e-3), model, loss.param_groups(1e-3))
    state.device = dev
    pos = np.array([4, 9, 2, 30])
    scores = torch.from_numpy(train.scores(pos)).pin_memory()
    x = torch.randn(4, 3, 32, 32, device=dev)
    batch = TrainBatch(images=x, index=torch.from_numpy(pos), flip=torch.zeros(4, dtype=torch.bool), epoch=1, step=0,
                       scores=scores)
    train_step(batch, model, loss, rule, state)  # warm-up: lazy optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch.step = 1
        out = train_step(batch, model, loss, rule, state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.pseudo.device.type == "cuda"


@pytest.mark.slow
def test_compile_option_trains_and_saves_plain_weights(store, tmp_path, monkeypatch):
    """compile=true puts torch.compile's module in the step's forward; the run trains, and the checkpoint
    and best/ hold the plain module's weights (no _orig_mod. keys), loadable by load_best. Inductor's C++
    build takes minutes on these CPUs, so the test compiles with the aot_eager backend (the same graph
    capture, no code generation)."""
    real = torch.compile
    used = []

    def aot_eager(model, **kw):
        used.append(type(model).__name__)
        return real(model, backend="aot_eager", **kw)

    monkeypatch.setattr(torch, "compile", aot_eager)
    out = tmp_path / "compiled"
    run_train(load_train_config([TINY_NET], _train_args(store, out, "method=aevlp", "dataset=coco2014", "epochs=1",
                                                        "max_steps_per_epoch=2", "compile=true")))
    assert used, "torch.compile was not called"
    from vlpl.train.checkpoint import list_checkpoints
    from vlpl.train.loop import load_best

    keys = load_file(list_checkpoints(out / "checkpoints")[-1] / "model.safetensors").keys()
    assert keys and not any("_orig_mod" in k for k in keys)
    model, _ = load_best(out)
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
    # the compiled step computes the eager step's loss
    ref = tmp_path / "eager"
    run_train(load_train_config([TINY_NET], _train_args(store, ref, "method=aevlp", "dataset=coco2014", "epochs=1",
                                                        "max_steps_per_epoch=2")))
    eager = [r for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in eager], rel=1e-4)


# ---- memory flat in N: observed labels read per batch (issue 10, item 1) ------------------------------------


class _FakeObservedReader:
    """A split reader's observed-label interface for a large (N, C) set, generated per row (a positive at class
    ``row % C``, a known negative at the next class) without holding it: counts the rows read."""

    def __init__(self, n: int, c: int) -> None:
        self.observed_shape = (n, c)
        self.rows_read = 0

    def observed_at(self, idx):
        pos = np.asarray(idx, dtype=np.int64).reshape(-1)
        self.rows_read += len(pos)
        out = np.zeros((len(pos), self.observed_shape[1]), np.int8)
        out[np.arange(len(pos)), pos % self.observed_shape[1]] = 1
        out[np.arange(len(pos)), (pos + 1) % self.observed_shape[1]] = -1
        return out


def _rss_growth(fn, *args):
    """``(peak resident bytes fn(*args) added to this process, its result)`` (Linux: VmHWM reset through
    clear_refs)."""
    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    result = fn(*args)
    return status("VmHWM") - before, result


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_stateless_losses_on_a_200k_x_1000_reader_hold_and_allocate_no_n_by_c_tensor():
    """Every registered loss that is not ``stateful`` builds on a 200,000 x 1,000 observed-label reader without
    reading it and without an N-row tensor (the old base class copied it to a float32 buffer: 800 MB, plus
    1 GB of masks), and one training-size batch reads only its own rows."""
    from vlpl.registry import LOSSES
    from vlpl.train.losses import LossBatch, create_loss

    n, c = 200_000, 1_000
    stateless = [name for name in LOSSES.names() if not LOSSES.get(name).stateful]
    owned = {"an", "an_ls", "bce", "wan", "epr", "em", "ll_r", "ll_ct", "gr", "gpr", "vlpl"}
    assert owned <= set(stateless)
    assert {"role", "em_apl", "ll_cp"}.isdisjoint(stateless)  # their state is the method's (docstrings)
    for name in stateless:
        reader = _FakeObservedReader(n, c)
        grown, loss = _rss_growth(create_loss, name, reader)
        assert grown < 64 * 2**20, (name, grown)
        assert loss.per_sample_state() == {}, name
        tensors = list(loss.state_dict().values()) + list(loss.parameters())
        assert sum(t.numel() for t in tensors) < n, name
        assert loss.num_examples == n and loss.num_classes == c
        if name in owned:  # (a loss of its own may check the labels once, a chunk at a time)
            assert reader.rows_read == 0, (name, reader.rows_read)
    # a step reads the batch's rows: from batch.observed (the trainer's) or, without it, from the reader
    reader = _FakeObservedReader(n, c)
    loss = create_loss("an", reader)
    idx = torch.tensor([5, 199_999, 17])
    logits = torch.randn(3, c)
    with_rows = loss(LossBatch(logits=logits, index=idx, observed=torch.from_numpy(reader.observed_at(idx.numpy()))))
    reader.rows_read = 0
    from_reader = loss(LossBatch(logits=logits, index=idx))
    assert reader.rows_read == 3 and torch.equal(with_rows["loss"], from_reader["loss"])


def test_training_never_reads_the_whole_observed_matrix(store, tmp_path, monkeypatch):
    """A run (rule + loss, and EM+APL's epoch-end pass) reads the observed labels per batch only:
    ``SplitReader.observed`` (the whole N x C matrix) is never touched, and the stateless loss holds no
    N-row tensor."""
    from vlpl.store.store import SplitReader

    def whole(self):
        raise AssertionError("training read SplitReader.observed (the whole N x C matrix)")

    monkeypatch.setattr(SplitReader, "observed", property(whole))
    for method, extra in (("aevlp", ()), ("em_apl", ("loss.params.warmup_epoch=1",))):
        out = tmp_path / method
        run_train(load_train_config([TINY_NET], _train_args(store, out, f"method={method}", "dataset=coco2014",
                                                            "epochs=1", "max_steps_per_epoch=2", *extra)))
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert any(r["kind"] == "step" for r in recs)
        if method == "em_apl":
            assert [r["apl_total"] for r in recs if r["kind"] == "epoch"][0] > 0
        else:
            assert set(load_file(out / "checkpoints" / sorted(os.listdir(out / "checkpoints"))[-1] /
                                 "loss.safetensors")) == set()


def test_losses_on_the_reader_give_the_matrix_built_losses_step_for_step(store):
    """The trainer's path (loss and rule built on the SplitReader, batch rows read per step) gives the same
    per-step pseudo-labels, loss terms, weights and label state as losses built on the whole observed matrix
    in memory (the previous path), for a stateless loss with a rule, ROLE, EM+APL and LL-Cp's writes."""
    import copy

    from vlpl.config import OptimConfig, StudentConfig
    from vlpl.store.store import ScoreStore
    from vlpl.train.losses import create_loss
    from vlpl.train.model import ClassContext, create_classifier
    from vlpl.train.optim import create_optimizer
    from vlpl.train.step import RuleRunner, StepState, TrainBatch, train_step

    st = ScoreStore(store)
    train = st.split("train")
    matrix = torch.from_numpy(np.array(train.observed))
    torch.manual_seed(0)
    model0 = create_classifier(StudentConfig(kind="timm", name="test_resnet", pretrained=False, image_size=32),
                               ClassContext.from_store(st)).train()
    scores = lambda pos: torch.from_numpy(train.scores(pos))  # noqa: E731
    cases = [("gpr", {}, True), ("role", {}, False), ("em_apl", {"warmup_epoch": 1}, False),
             ("ll_cp", {"delta_rel": 0.2}, False)]
    for name, hp, use_rule in cases:
        runs = []
        for observed in (matrix, train):
            model = copy.deepcopy(model0)
            loss = create_loss(name, observed, **hp).train()
            if name == "em_apl":  # some soft negatives first (the pass's probabilities, the same for both)
                loss.set_epoch(1, 3)
                probs = torch.rand(len(train), st.num_classes, generator=torch.Generator().manual_seed(1))
                loss.end_epoch(probs, torch.arange(len(train)), 1)
            loss.set_epoch(3, 3)  # LL-Cp corrects and writes from epoch 2
            opt = create_optimizer(OptimConfig(name="adam", lr=1e-3, head_lr=1e-3), model, loss.param_groups(1e-3))
            rule = RuleRunner("damp", {}, True, scores, observed) if use_rule else None
            state = StepState(optimizer=opt, device=torch.device("cpu"), seed=5)
            outs = []
            for step, pos in enumerate([np.array([4, 9, 2, 30]), np.array([7, 1, 50, 4])]):
                x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(step))
                outs.append(train_step(TrainBatch(images=x, index=torch.from_numpy(pos),
                                                  flip=torch.zeros(4, dtype=torch.bool), epoch=3, step=step),
                                       model, loss, rule, state))
            runs.append((outs, model.state_dict(), loss.state_dict(), loss.state))
        (a, wa, la, sa), (b, wb, lb, sb) = runs
        for oa, ob in zip(a, b):
            assert set(oa.terms) == set(ob.terms)
            assert all(torch.equal(oa.terms[k], ob.terms[k]) for k in oa.terms), name
            assert (oa.pseudo is None and ob.pseudo is None) or torch.equal(oa.pseudo, ob.pseudo)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
        assert la.keys() == lb.keys(), name
        for k in la:  # (EM+APL's apl_target is NaN where no soft negative is stored)
            torch.testing.assert_close(la[k], lb[k], rtol=0, atol=0, equal_nan=True)
        assert torch.equal(sa, sb), name
        if name == "ll_cp":
            assert int((sa != matrix.float()).sum()) > 0  # the writes happened (and match)
