"""`vlpl demo`: the README's main command, end to end, offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vlpl import demo

REPO = Path(__file__).resolve().parent.parent


def test_demo_offline_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "vlpl", "demo", "--offline", "--out", str(tmp_path), "--epochs", "3"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tiny RANDOM-initialised" in r.stdout and "mean nothing" in r.stdout
    assert "DAMP pseudo-labels on the training images" in r.stdout
    assert "astronaut_flag.jpg" in r.stdout  # one row per training image
    report = json.loads((tmp_path / "report-tiny" / "report.json").read_text())
    assert report["kind"] == "run+store" and report["headline"][0]["kind"] == "run"
    assert 0 <= report["headline"][0]["map"] <= 100
    assert (tmp_path / "report-tiny" / "report.md").read_text().startswith("# vlpl evaluation")
    pngs = list((tmp_path / "report-tiny" / "plots").glob("*.png"))
    assert len(pngs) >= 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    summary = json.loads((tmp_path / "run-tiny" / "summary.json").read_text())
    assert summary["method"] == "aevlp" and summary["epochs_run"] == 3
    # a second run reuses the store (same identity) and starts the demo run afresh
    r2 = subprocess.run([sys.executable, "-m", "vlpl", "demo", "--offline", "--out", str(tmp_path), "--epochs", "1"],
                        env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads((tmp_path / "run-tiny" / "summary.json").read_text())["epochs_run"] == 1


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
