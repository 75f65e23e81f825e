"""`vlpl run` pipeline files: variables, stage bodies, errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlpl.config import ConfigError, PseudolabelConfig, load_config
from vlpl.pipeline import load_pipeline

REPO = Path(__file__).resolve().parent.parent


def test_bundled_pipeline_resolves_to_stage_configs():
    stages = load_pipeline(str(REPO / "pipelines" / "coco256_aevlp.yaml"), ["work=/tmp/w"])
    assert [s["stage"] for s in stages] == ["pseudolabel", "train", "evaluate"]
    assert "out=/tmp/w/store" in stages[0]["overrides"] and "views.grid=4" in stages[0]["overrides"]
    assert "views.flips=true" in stages[0]["overrides"]
    cfg = load_config(PseudolabelConfig, stages[0]["config"], stages[0]["overrides"])
    assert cfg.out == "/tmp/w/store" and cfg.views.grid == 4 and cfg.teacher.name == "vlpl-tiny"
    assert "epochs=3" in stages[1]["overrides"] and "method=aevlp" in stages[1]["overrides"]


def test_pipeline_errors_are_clear(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("stages:\n  - train: {set: {out: '${nope}/x'}}\n")
    with pytest.raises(ConfigError, match=r"unknown variable \$\{nope\}"):
        load_pipeline(str(p))
    p.write_text("stages:\n  - fit: {}\n")
    with pytest.raises(ConfigError, match="expected one of pseudolabel, train, evaluate"):
        load_pipeline(str(p))
    p.write_text("stages:\n  - train: {sets: {}}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_pipeline(str(p))
    p.write_text("vars: {a: 1}\nstages:\n  - train: {set: {loss: {params: {alpha: 0.2}}, out: '${a}'}}\n")
    st = load_pipeline(str(p))
    assert st[0]["overrides"] == ["loss.params={alpha: 0.2}", "out=1"]
