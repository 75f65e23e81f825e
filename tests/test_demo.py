"""`vlpl demo`: the README's main command, end to end, offline.

With random models the demo's numbers mean nothing about the images, but they are not arbitrary: each
printed or reported number must be the one it claims to be. So the test recomputes them from the demo's
own outputs (the store, the run's saved predictions, the labels in vlpl.demo_data) with independent code
(sklearn's average precision, plain counting), and checks the printed table against the hand labels.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from vlpl import demo
from vlpl.demo_data import DEMO_IMAGES

REPO = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^  (\S+\.jpg)\s+(\S+)\s+(.*?)\s{2,}(\S+)$")


def _run_demo(out: Path, epochs: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "vlpl", "demo", "--offline", "--out", str(out), "--epochs", str(epochs)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _table(stdout: str) -> List[Tuple[str, str, List[str], str]]:
    """The rows of the printed DAMP table: (image, observed, pseudo-positives with marks, true labels)."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("DAMP pseudo-labels on the training images"))
    assert lines[start + 1].split() == ["image", "observed", "pseudo-positives", "true", "labels"]
    rows = []
    for ln in lines[start + 2:]:
        if not ln.strip():
            break
        m = ROW.match(ln)
        assert m, f"not a table row: {ln!r}"
        name, obs, pseudo, true = m.groups()
        rows.append((name, obs, [] if pseudo.strip() == "-" else pseudo.split(), true))
    return rows


def _sklearn_map(labels: np.ndarray, scores: np.ndarray) -> Tuple[float, float]:
    """(mAP over all classes with AP = 0 where a class has no positive, mAP over classes with one), in %."""
    from sklearn.metrics import average_precision_score

    aps = [average_precision_score(labels[:, c], scores[:, c]) if labels[:, c].any() else 0.0
           for c in range(labels.shape[1])]
    has = labels.any(axis=0)
    return 100 * float(np.mean(aps)), 100 * float(np.mean(np.asarray(aps)[has]))


@pytest.mark.slow
def test_demo_offline_end_to_end(tmp_path):
    from vlpl.store.store import ScoreStore

    r = _run_demo(tmp_path, 3)
    out = r.stdout
    # the random-model notice comes first, on screen and in the report
    assert out.startswith("vlpl demo: NOTE: using a tiny RANDOM-initialised CLIP and classifier because --offline "
                          "was given."), out[:300]
    assert "mean nothing" in out.splitlines()[0]
    report_dir, run, store_dir = tmp_path / "report-tiny", tmp_path / "run-tiny", tmp_path / "store-tiny"
    md = (report_dir / "report.md").read_text().splitlines()
    assert md[0] == "# vlpl evaluation: run-tiny"
    assert md[2].startswith("> **RANDOM MODELS:") and "mean nothing" in md[2]

    # --- the DAMP table: one row per training image of the store, checked against the hand labels ----------
    truth: Dict[str, List[str]] = {f"{d['name']}.jpg": sorted(d["labels"]) for d in DEMO_IMAGES}
    split_of = {f"{d['name']}.jpg": d["split"] for d in DEMO_IMAGES}
    rows = _table(out)
    train = ScoreStore(store_dir).split("train")
    assert [name for name, *_ in rows] == [Path(p).name for p in train.images]  # every training row, in order
    assert len(rows) == 20 and all(split_of[name] == "train" for name, *_ in rows)
    n_plus = n_pseudo = n_missing = 0
    for name, obs, pseudo, true in rows:
        assert true == "|".join(truth[name]), name  # the hand labels, as labelled in vlpl.demo_data
        assert obs in truth[name], name  # the one observed label is a true one (single-positive simulation)
        n_missing += len(truth[name]) - 1
        for p in pseudo:
            cls, mark = p[:-1], p[-1]
            assert cls != obs and mark == ("+" if cls in truth[name] else "-"), (name, p)
            n_plus += mark == "+"
            n_pseudo += 1

    report = json.loads((report_dir / "report.json").read_text())
    assert report["kind"] == "run+store" and report["units"]["map"] == "percent"
    # the report's DAMP quality on the training split is exactly what the printed table shows
    q = report["store"]["pseudo_labels"]["rules"]["damp"]["quality"]["excluding_observed"]
    assert report["store"]["pseudo_labels"]["split"] == "train" and report["store"]["pseudo_labels"]["num_images"] == 20
    assert (q["tp"], q["num_pred"], q["num_true"]) == (n_plus, n_pseudo, n_missing) == (n_plus, n_pseudo, 12)
    assert q["precision"] == pytest.approx(100 * n_plus / n_pseudo if n_pseudo else 0.0, abs=1e-9)
    assert q["recall"] == pytest.approx(100 * n_plus / 12, abs=1e-9)
    assert q["per_image"] == pytest.approx(n_pseudo / 20, abs=1e-12)

    # --- the trained classifier: summary, printed line, report and saved predictions agree -----------------
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "aevlp" and summary["epochs_run"] == 3 and 1 <= summary["best_epoch"] <= 3
    assert summary["num_train"] == 20 and summary["num_eval"] == {"val": 5, "test": 15}
    assert (f"Trained classifier: best epoch {summary['best_epoch']} of 3, val mAP {summary['best_val_map']:.2f} %, "
            f"test mAP {summary['test_map_at_best']:.2f} %") in out
    pred = np.load(run / "predictions" / "test.npz")
    test_names = [f"{Path(str(s)).name}.jpg" for s in pred["sample_ids"]]
    assert all(split_of[n] == "test" for n in test_names) and len(set(test_names)) == 15
    test_truth = np.array([[c in truth[n] for c in report["classes"]] for n in test_names])
    assert pred["probs"].shape == (15, 20) and np.array_equal(pred["labels"].astype(bool), test_truth)
    run_map, run_map_pos = _sklearn_map(pred["labels"], pred["probs"])
    head = report["headline"][0]
    assert head["kind"] == "run" and head["num_images"] == 15
    assert head["map"] == pytest.approx(run_map, abs=1e-9) and head["map_pos"] == pytest.approx(run_map_pos, abs=1e-9)
    assert head["map"] == pytest.approx(summary["test_map_at_best"], abs=1e-9)
    assert re.search(rf"trained model \(run-tiny\)\s+15\s+{head['map']:.2f}\s", out)

    # --- zero-shot from the store: the global unflipped view's raw cosine on the test split -----------------
    test = ScoreStore(store_dir).split("test")
    scores = test.scores(np.arange(len(test)))
    zs_map, zs_map_pos = _sklearn_map(test.labels, scores[:, 0, 0, :])
    zs = report["store"]["zero_shot"]["scores"]["global"]
    assert zs["map"] == pytest.approx(zs_map, abs=1e-9) and zs["map_pos"] == pytest.approx(zs_map_pos, abs=1e-9)
    mean_map, _ = _sklearn_map(test.labels, scores.mean(axis=(1, 2)))
    assert report["store"]["zero_shot"]["scores"]["mean"]["map"] == pytest.approx(mean_map, abs=1e-6)
    assert re.search(rf"zero-shot, global view\s+15\s+{zs['map']:.2f}\s", out)

    # --- the plots the report lists exist and are PNGs --------------------------------------------------------
    plots = [report_dir / p for p in report["plots"].values()]
    assert len(plots) >= 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)

    # --- a second run reuses the store (same identity: no shard rewritten) and starts the demo run afresh ---
    shards = sorted((store_dir / "shards").glob("*.parquet"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    _run_demo(tmp_path, 1)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((store_dir / "shards").glob("*.parquet"))} \
        == before
    summary2 = json.loads((run / "summary.json").read_text())
    assert summary2["epochs_run"] == 1 and summary2["best_epoch"] == 1
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]  # nothing left of the 3-epoch run


def test_demo_falls_back_plainly_without_weights_or_network(monkeypatch):
    monkeypatch.setattr(demo, "_hub_file_cached", lambda repo, files: False)
    monkeypatch.setattr(demo, "_hub_reachable", lambda timeout=3.0: False)
    m = demo.choose_models(offline=False)
    assert not m.real and "not cached" in m.why and "cannot be reached" in m.why
    assert "teacher.name=vlpl-tiny" in m.clip_overrides
    monkeypatch.setattr(demo, "_hub_file_cached", lambda repo, files: True)
    m = demo.choose_models(offline=False)
    assert m.real and m.why == "cached" and "teacher.name=ViT-B-32" in m.clip_overrides
    assert demo.choose_models(offline=True).why == "--offline was given"
