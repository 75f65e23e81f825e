"""Numbers in configs: a file, a recipe and a command-line override read ``1e-2`` as the same float."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vlpl.config import (
    ConfigError,
    EvaluateConfig,
    PseudolabelConfig,
    TrainConfig,
    load_config,
    parse_override,
    yaml_load,
)
from vlpl.registry import RegistryError
from vlpl.train.recipes import list_methods, load_train_config, recipe


def test_exponent_without_a_dot_is_a_float_everywhere(tmp_path: Path):
    # PyYAML's own safe loader (YAML 1.1) reads 1e-2 as the string '1e-2'
    assert yaml_load("temp: 1e-2\nlist: [1E5, -2.5e+3]\nn: 3\nname: 1e\n") == \
        {"temp": 0.01, "list": [100000.0, -2500.0], "n": 3, "name": "1e"}
    f = tmp_path / "c.yaml"
    f.write_text("store: s\nout: o\noptim: {lr: 1e-3}\npseudo: {params: {temp: 1e-2}}\n")
    cfg = load_config(TrainConfig, [f], ["loss.params.reg=5e-2", "loss.params.beta=[0, 1e1, -2e0, -8]"])
    assert cfg.optim.lr == 1e-3 and cfg.pseudo.params["temp"] == 0.01  # rule / loss params too
    assert cfg.loss.params["reg"] == 0.05 and cfg.loss.params["beta"] == [0, 10.0, -2.0, -8]
    assert parse_override("x=1e-5") == ("x", 1e-5) and parse_override("x=abc") == ("x", "abc")


def test_a_quoted_number_is_accepted_for_a_float_and_a_word_is_not(tmp_path: Path):
    assert load_config(TrainConfig, [], ["store=s", "out=o", 'optim.lr="2e-4"']).optim.lr == 2e-4
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(TrainConfig, [], ["store=s", "out=o", "optim.lr=fast"])


# --------------------------------------------------------------------------------------------------
# rule and loss parameters are checked when the config is loaded (issue 8 items 5 and 8)
# --------------------------------------------------------------------------------------------------

TRAIN = ["store=s", "out=o"]


def test_loss_and_rule_parameters_are_checked_at_load_time_naming_key_and_source(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"loss\.params: unknown option\(s\) 'bogus' \(loss 'gpr', from the "
                                          r"override 'loss\.params\.bogus=1'\); it accepts: beta, alpha"):
        load_config(TrainConfig, [], [*TRAIN, "loss.params.bogus=1"])
    with pytest.raises(RegistryError, match="unknown option.*'tmep'"):  # also a RegistryError, as before
        load_config(TrainConfig, [], [*TRAIN, "pseudo.params.tmep=0.1"])
    f = tmp_path / "bad.yaml"
    f.write_text("loss: {name: gpr, params: {lambda1: 0.4, lambda2: 0.5}}\n")
    with pytest.raises(ConfigError, match=rf"loss\.params\.lambda2: must not exceed lambda1 \(0\.4\); got 0\.5 "
                                          rf"\(loss 'gpr', from {f}\)"):
        load_config(TrainConfig, [f], TRAIN)
    with pytest.raises(ConfigError, match=r"pseudo\.params\.temp: must be > 0; got 0\.0"):
        load_config(TrainConfig, [], [*TRAIN, "pseudo.params.temp=0"])
    with pytest.raises(ConfigError, match=r"pseudo\.params\.negative_ratio: must be in \[0, 1\]; got 1\.5"):
        load_config(TrainConfig, [], [*TRAIN, "pseudo.params.negative_ratio=1.5"])
    with pytest.raises(ConfigError, match=r"pseudo\.params\.top_k: expected int, got 2\.5"):
        load_config(TrainConfig, [], [*TRAIN, "pseudo.params.top_k=2.5"])
    with pytest.raises(ConfigError, match=r"loss\.params\.alpha: needs 4 values; got 3"):
        load_config(TrainConfig, [], [*TRAIN, "loss.params.alpha=[0.5, 2, 0.8]"])
    with pytest.raises(ConfigError, match=r"loss\.params\.alpha: sigma0 and sigmaT .* must be > 0"):
        load_config(TrainConfig, [], [*TRAIN, "loss.params.alpha=[0.5, 0, 0.8, 0.5]"])
    with pytest.raises(ConfigError, match=r"pseudo\.rule: unknown pseudo-label rule 'dmap'; expected one of: .*\bdamp\b"):
        load_config(TrainConfig, [], [*TRAIN, "pseudo.rule=dmap"])
    with pytest.raises(ConfigError, match="loss 'vlpl' needs pseudo-labels: set pseudo.rule"):
        load_config(TrainConfig, [], [*TRAIN, "loss.name=vlpl", "pseudo.rule=null"])
    # the rule's own parameters, with the other rules' names refused
    with pytest.raises(ConfigError, match=r"pseudo\.params: unknown option\(s\) 'eta' \(pseudo-label rule 'vlpl'"):
        load_config(TrainConfig, [], [*TRAIN, "pseudo.rule=vlpl", "pseudo.params.eta=0.3"])
    # a value of the right kind is accepted and kept as given (ints for floats included)
    cfg = load_config(TrainConfig, [], [*TRAIN, "loss.name=an", "pseudo.rule=null", "loss.params.eps=0"])
    assert cfg.loss.params == {"eps": 0}


def test_evaluate_rules_are_checked_at_load_time():
    cfg = load_config(EvaluateConfig, [], ["store=s", "rules={damp: {eta: 0.0}, topk: {k: 2}}"])
    assert cfg.rules == {"damp": {"eta": 0.0}, "topk": {"k": 2}}
    with pytest.raises(ConfigError, match=r"rules\.topk\.k: must be >= 0; got -2"):
        load_config(EvaluateConfig, [], ["store=s", "rules={topk: {k: -2}}"])
    with pytest.raises(ConfigError, match=r"rules\.threshold\.threshold: must be in \[-1, 1\] for score=cosine"):
        load_config(EvaluateConfig, [], ["store=s", "rules={threshold: {score: cosine, threshold: 1.5}}"])
    with pytest.raises(ConfigError, match=r"rules\.tpok: unknown pseudo-label rule 'tpok'"):
        load_config(EvaluateConfig, [], ["store=s", "rules={tpok: {}}"])


@pytest.mark.parametrize("method", list_methods())
def test_every_recipe_row_validates(method: str):
    """Each method's defaults and each of its dataset rows pass the parameter schemas (a typo in a recipe,
    e.g. ``lamda1``, fails here rather than in somebody's training run)."""
    _, path = recipe(method, None)
    rows = sorted((yaml_load(path.read_text()) or {}).get("datasets") or {})
    assert rows, f"{path} has no dataset rows"
    for dataset in [None, *rows]:
        extra = [f"dataset={dataset}"] if dataset else []
        cfg = load_train_config([], [f"method={method}", *extra, *TRAIN])
        assert cfg.method == method and cfg.dataset == dataset


# --------------------------------------------------------------------------------------------------
# teacher / student names (issue 8 item 6)
# --------------------------------------------------------------------------------------------------


def test_model_override_means_the_teacher_in_pseudolabel_with_a_deprecation_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="vlpl.config"):
        cfg = load_config(PseudolabelConfig, [], ["data.root=r", "out=o", "model.name=ViT-L-14", "model.pretrained=x"])
    assert cfg.teacher.name == "ViT-L-14" and cfg.teacher.pretrained == "x"
    assert any("deprecated" in r.getMessage() and "'teacher'" in r.getMessage() for r in caplog.records)


def test_model_means_the_student_in_train(caplog, tmp_path: Path):
    with caplog.at_level(logging.WARNING, logger="vlpl.config"):
        cfg = load_config(TrainConfig, [], [*TRAIN, "model.name=test_resnet", "model.image_size=64"])
    assert cfg.student.name == "test_resnet" and cfg.student.image_size == 64
    assert cfg.student.kind == "timm"
    assert any("deprecated" in r.getMessage() and "'student'" in r.getMessage() for r in caplog.records)
    f = tmp_path / "old.yaml"
    f.write_text("model: {name: test_resnet, pretrained: false}\n")
    cfg = load_train_config([f], ["method=aevlp", "dataset=coco2014", *TRAIN])  # recipe's student + old file
    assert cfg.student.name == "test_resnet" and cfg.student.pretrained is False and cfg.student.image_size == 448


def test_old_and_new_name_together_is_an_error_naming_both(tmp_path: Path):
    f = tmp_path / "both.yaml"
    f.write_text("model: {name: a}\nteacher: {name: b}\n")
    with pytest.raises(ConfigError, match=r"both 'model' \(deprecated\) and 'teacher' are set"):
        load_config(PseudolabelConfig, [f], ["data.root=r", "out=o"])
    with pytest.raises(ConfigError, match=r"both 'model' \(deprecated, in the override 'model\.name=a'\) and 'student'"):
        load_config(TrainConfig, [], [*TRAIN, "student.pretrained=false", "model.name=a"])
    with pytest.raises(ConfigError, match=r"both 'model' .* and 'teacher' \(in the override 'teacher\.name=b'\)"):
        load_config(PseudolabelConfig, [], ["data.root=r", "out=o", "model.name=a", "teacher.name=b"])


def test_a_head_name_and_its_params_merge_across_layers(tmp_path: Path):
    """``student.head=NAME`` (a bare name) followed by ``student.head.params.x=1`` keeps the name, in
    overrides and across files (it used to fall back to the default head silently)."""
    cfg = load_config(TrainConfig, [], [*TRAIN, "student.head=other", "student.head.params.scale=2"])
    assert (cfg.student.head.name, cfg.student.head.params) == ("other", {"scale": 2})
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("student: {head: other}\n")
    b.write_text("student: {head: {params: {scale: 3}}}\n")
    cfg = load_config(TrainConfig, [a, b], TRAIN)
    assert (cfg.student.head.name, cfg.student.head.params) == ("other", {"scale": 3})


def test_a_dotted_override_into_a_mapping_keeps_its_other_default_entries():
    from vlpl.config import PseudolabelConfig

    cfg = load_config(PseudolabelConfig, [], ["data.root=/d", "out=/o", "data.hf_splits.test=validation"])
    assert cfg.data.hf_splits == {"train": "train", "test": "validation"}
