"""Numbers in configs: a file, a recipe and a command-line override read ``1e-2`` as the same float."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlpl.config import ConfigError, TrainConfig, load_config, parse_override, yaml_load


def test_exponent_without_a_dot_is_a_float_everywhere(tmp_path: Path):
    # PyYAML's own safe loader (YAML 1.1) reads 1e-2 as the string '1e-2'
    assert yaml_load("temp: 1e-2\nlist: [1E5, -2.5e+3]\nn: 3\nname: 1e\n") == \
        {"temp": 0.01, "list": [100000.0, -2500.0], "n": 3, "name": "1e"}
    f = tmp_path / "c.yaml"
    f.write_text("store: s\nout: o\noptim: {lr: 1e-3}\npseudo: {params: {temp: 1e-2}}\n")
    cfg = load_config(TrainConfig, [f], ["loss.params.reg=5e-2", "pseudo.params.eta=[3e-1]"])
    assert cfg.optim.lr == 1e-3 and cfg.pseudo.params["temp"] == 0.01  # free-form params too
    assert cfg.loss.params["reg"] == 0.05 and cfg.pseudo.params["eta"] == [0.3]
    assert parse_override("x=1e-5") == ("x", 1e-5) and parse_override("x=abc") == ("x", "abc")


def test_a_quoted_number_is_accepted_for_a_float_and_a_word_is_not(tmp_path: Path):
    assert load_config(TrainConfig, [], ["store=s", "out=o", 'optim.lr="2e-4"']).optim.lr == 2e-4
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(TrainConfig, [], ["store=s", "out=o", "optim.lr=fast"])
