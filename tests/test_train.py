"""The training stage on real images (coco256) with a tiny timm model: learning, recipes, resume, DDP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


@pytest.mark.parametrize("method", ["an", "an_ls", "wan", "epr", "role", "em", "em_apl", "ll_r", "ll_ct", "ll_cp",
                                    "gr", "vlpl", "aevlp"])
def test_every_method_trains_to_a_checkpoint_and_test_map(method, store, tmp_path):
    out = tmp_path / method
    extra = ["loss.params.warmup_epoch=1"] if method == "em_apl" else []
    cfg = load_train_config([TINY_NET], _train_args(store, out, f"method={method}", "dataset=coco2014", "epochs=2",
                                                    "max_steps_per_epoch=2", *extra))
    run_train(cfg)
    s = json.loads((out / "summary.json").read_text())
    assert s["loss"] == cfg.loss.name and 0 <= s["test_map_at_best"] <= 100
    assert (out / "best" / "model.pt").exists() and (out / "predictions" / "test.npz").exists()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "step"]
    assert steps and all(np.isfinite(r["loss"]) for r in steps)
    assert {"lr", "images_per_s", "data_wait_frac"} <= set(steps[0])
    if cfg.pseudo.rule:
        assert "pseudo_pos_per_image" in steps[0]
    if method == "em_apl":
        assert any(r.get("apl_total", 0) > 0 for r in recs if r["kind"] == "epoch")


def test_training_lowers_loss_and_beats_untrained_map_on_train_images(store, tmp_path):
    from vlpl.eval.metrics import mean_average_precision
    from vlpl.store.store import ScoreStore
    from vlpl.train.data import ImageRows, image_transform, load_split
    from vlpl.train.model import create_classifier

    out = tmp_path / "learn"
    # AN on the single observed positives; "val" = the training images themselves (full labels)
    cfg = load_train_config([TINY_NET], _train_args(store, out, "method=an", "epochs=8", "optim.lr=3e-3",
                                                    "val_split=train", "hflip=false", "batch_size=17"))
    run_train(cfg)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    st = ScoreStore(store)
    train = load_split(st, st.arrays(("sample_id", "image", "split", "observed", "labels", "scores", "status")),
                       "train", False)
    torch.manual_seed(cfg.seed)
    untrained = create_classifier(cfg.student, 80).eval()
    ds = ImageRows(Path(st.manifest["dataset"]["root"]), train.images,
                   image_transform(64, untrained.mean, untrained.std, False, False))
    with torch.no_grad():
        probs = torch.sigmoid(untrained(torch.stack([ds[i][0] for i in range(len(ds))]))).numpy()
    base = mean_average_precision(train.labels, probs)["map"]
    best = json.loads((out / "summary.json").read_text())["best_val_map"]
    assert best > base + 10, (best, base)


def _cli_train(store: Path, out: Path, *extra: str) -> list:
    return [sys.executable, "-m", "vlpl", "train", "-c", TINY_NET,
            *_train_args(store, out, "method=aevlp", "dataset=coco2014", "deterministic=true", *extra)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(store, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = ("epochs=3", "early_stop_patience=null", "early_stop_drop=null", "max_steps_per_epoch=4")
    subprocess.run(_cli_train(store, ref, *args), check=True, env=_env(), capture_output=True)
    proc = subprocess.Popen(_cli_train(store, run, *args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    mark = run / "checkpoints" / "epoch_001" / "complete.json"
    deadline = time.time() + 300
    while time.time() < deadline and not mark.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mark.exists() and not (run / "checkpoints" / "epoch_003").exists(), "kill should land mid-run"
    r = subprocess.run(_cli_train(store, run, *args), env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "resume=true" in r.stderr  # refuses to clobber a run
    subprocess.run(_cli_train(store, run, *args, "resume=true"), check=True, env=_env(), capture_output=True)
    a = load_file(ref / "checkpoints" / "epoch_003" / "model.safetensors")
    b = load_file(run / "checkpoints" / "epoch_003" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_002", "epoch_003"]


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
        return torch.load(run / "checkpoints" / f"epoch_00{epoch}" / "custom_checkpoint_0.pkl", weights_only=False)

    if method == "role":
        # epoch 2's update of the estimator; Adam turns tiny gradient differences (BatchNorm sees half-batches
        # per process) into whole steps on a few entries, so compare the updates as a whole
        u1, u2 = (state(run, 2)["estimator_logits"] - state(run, 1)["estimator_logits"] for run in (one, two))
        moved1, moved2 = u1.abs().amax(1) > 1e-4, u2.abs().amax(1) > 1e-4
        assert int(moved1.sum()) > 20 and torch.equal(moved1, moved2)  # every row this epoch saw, on rank 0 too
        corr = float(torch.corrcoef(torch.stack([u1.flatten(), u2.flatten()]))[0, 1])
        assert corr > 0.95, corr
    else:
        base = int((state(one, 1)["state"] == 1).sum())  # epoch 1 writes nothing (clean rate 1)
        w1 = int((state(one, 2)["state"] == 1).sum()) - base
        w2 = int((state(two, 2)["state"] == 1).sum()) - base
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
