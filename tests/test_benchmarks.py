"""Smoke tests of the benchmark scripts (benchmarks/*.py) at the tiniest settings, so they do not rot.

They run the real code paths (timm ``test_resnet`` at 64 px, the bundled random ``vlpl-tiny`` CLIP, 1 step,
1 round) and check the result JSON's fields; the numbers themselves mean nothing here.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _check_env(res: dict) -> None:
    env = res["environment"]
    for k in ("device", "device_type", "torch", "timm", "open_clip", "vlpl"):
        assert env[k], k
    assert res["date"] and res["args"] and res["notes"]


def test_train_throughput_smoke(tmp_path: Path) -> None:
    mod = _load("train_throughput")
    out = tmp_path / "train.json"
    res = mod.main(["--backbone", "test_resnet", "--image-size", "64", "--clip", "vlpl-tiny", "--grid", "2",
                    "--batch-size", "2", "--steps", "1", "--warmup", "0", "--rounds", "1", "--num-batches", "1",
                    "--classes", "10", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    _check_env(saved)
    assert saved["config"]["views_per_image"] == 5
    for v in ("cached", "clip"):
        assert saved["variants"][v]["images_per_s_median"] > 0
        assert len(saved["variants"][v]["images_per_s_rounds"]) == 1
    assert saved["ratio"] > 0 and saved["expected_ratio"] > 1
    assert saved["flops"]["backbone_forward_per_image"] > 0 and saved["flops"]["clip_forward_per_view"] > 0
    assert res["ratio"] == pytest.approx(saved["ratio"])


def test_train_benchmark_times_vlpls_train_step(tmp_path: Path, monkeypatch) -> None:
    """The benchmark's steps are calls of vlpl.train.step.train_step, the function ``vlpl train`` runs
    (issue 8 item 1): with a counting wrapper in its place, every timed and warm-up step goes through it."""
    import vlpl.train.step as step_mod

    calls = []
    real = step_mod.train_step

    def counting(batch, model, loss, rule, state):
        calls.append((rule.name, rule.dynamic, batch.step, tuple(batch.index.tolist())))
        return real(batch, model, loss, rule, state)

    monkeypatch.setattr(step_mod, "train_step", counting)
    mod = _load("train_throughput")
    mod.main(["--backbone", "test_resnet", "--image-size", "64", "--clip", "vlpl-tiny", "--grid", "2",
              "--batch-size", "2", "--steps", "2", "--warmup", "1", "--rounds", "1", "--num-batches", "2",
              "--classes", "10", "--device", "cpu", "--out", str(tmp_path / "t.json")])
    # warmup: 1 step per variant, then 1 round x 2 steps per variant; the cached rule draws flips (dynamic)
    assert [(n, d) for n, d, _, _ in calls] == [("damp", True), ("damp", False)] + \
        [("damp", True)] * 2 + [("damp", False)] * 2
    assert [c[3] for c in calls[2:4]] == [(0, 1), (2, 3)]  # batches cycled, sample indices carried
    assert [c[2] for c in calls] == list(range(6))  # each step its own seed


def test_pseudolabel_throughput_smoke(tmp_path: Path) -> None:
    mod = _load("pseudolabel_throughput")
    out = tmp_path / "pl.json"
    mod.main(["--clip", "vlpl-tiny", "--grid", "2", "--num-images", "2", "--batch-size", "2", "--rounds", "1",
              "--classes", "10", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    _check_env(saved)
    assert saved["config"]["views_per_image"] == 10  # (1 + 2*2) x 2 flip variants
    for v in ("scorer", "naive"):
        assert saved["variants"][v]["images_per_s_median"] > 0
    assert saved["ratio"] > 0
    ag = saved["agreement"]
    assert ag["shape"] == [2, 10, 10]
    assert ag["agree"], ag  # both paths score the same views


def test_train_input_smoke(tmp_path: Path) -> None:
    """The loader benchmark runs both pipelines over the same images and records a rate per worker count."""
    mod = _load("train_input")
    out = tmp_path / "ti.json"
    res = mod.main(["--workers", "0", "1", "--images", "8", "--image-size", "32", "--batch-size", "4", "--rounds", "2",
                    "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    _check_env(saved)
    assert set(saved["workers"]) == {"0", "1"}
    for w in saved["workers"].values():
        assert len(w["old_images_per_s_rounds"]) == len(w["new_images_per_s_rounds"]) == 2
        assert w["ratio_new_over_old"] == pytest.approx(w["new_images_per_s_median"] / w["old_images_per_s_median"])
    assert saved["config"]["bytes_per_image_to_device"] == {"old": 3 * 32 * 32 * 4, "new": 3 * 32 * 32}
    assert res["out"] == str(out)


@pytest.mark.slow
def test_train_memory_smoke(coco256_store: Path, tmp_path: Path) -> None:
    """The memory benchmark trains in a fresh process on a store and records its peak RSS, the loss's per-sample
    state bytes (none for AEVLP's GPR: a stateless loss reads the batch's observed rows) and the trainer's own
    logged rate."""
    mod = _load("train_memory")
    out = tmp_path / "tm.json"
    mod.main(["--stores", str(coco256_store), "--steps", "2", "--image-size", "32", "--batch-size", "4",
              "--num-workers", "0", "--device", "cpu", "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["steps"] == 2 and row["peak_rss_bytes"] > 0 and row["loss_state_bytes"] == 0
    assert row["images_per_s_median"] > 0 and row["views"]["total"] == 10
