"""Student recipes (issue 14, item 12): every shipped configs/students/*.yaml names weights that timm / open_clip
list, at the input size those weights were trained at, and loads as a training config (nothing is downloaded)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

STUDENTS = sorted((Path(__file__).resolve().parent.parent / "configs" / "students").glob("*.yaml"))


def test_the_recipes_are_there() -> None:
    names = {p.stem for p in STUDENTS}
    assert {"resnet50_tv", "openclip_vit_b16_openai", "vit_b16_clip_384", "convnext_base_clip_384",
            "eva02_base_448"} <= names


@pytest.mark.parametrize("path", STUDENTS, ids=[p.stem for p in STUDENTS])
def test_student_names_listed_weights_at_their_input_size(path: Path, tmp_path: Path) -> None:
    import open_clip
    import timm

    from vlpl.train.recipes import load_train_config

    student = yaml.safe_load(path.read_text())["student"]
    assert student.get("pretrained", True) is True
    if student["kind"] == "timm":
        arch, tag = timm.models.split_model_name_tag(student["name"])
        assert tag, f"{path.name}: name the weights tag, not just the architecture ({arch})"
        assert student["name"] in timm.list_pretrained(), f"{path.name}: {student['name']} is not in timm.list_pretrained()"
        pc = timm.models.get_pretrained_cfg(student["name"])
        if pc.fixed_input_size:  # a ViT's position embeddings are for one size (a ConvNet takes any, e.g. 448)
            size = pc.input_size[-1]
            assert student["image_size"] == size, f"{path.name}: {student['name']} takes {size} px only"
    else:
        assert student["kind"] == "open_clip"
        pair = (student["name"], student["open_clip_pretrained"])
        assert pair in open_clip.list_pretrained(), f"{path.name}: {pair} is not in open_clip.list_pretrained()"
        size = open_clip.get_model_config(student["name"])["vision_cfg"]["image_size"]
        assert student["image_size"] == size
    # the file loads as a training config and wins over the method recipe's student
    cfg = load_train_config([str(path)], ["method=aevlp", "dataset=coco2014", "store=S", f"out={tmp_path}"])
    assert (cfg.student.kind, cfg.student.name, cfg.student.image_size) == \
        (student["kind"], student["name"], student["image_size"])
    assert cfg.loss.name == "gpr"


def test_recorded_weight_tag_is_the_named_one() -> None:
    from vlpl.config import StudentConfig
    from vlpl.train.model import timm_weights_tag

    for path in STUDENTS:
        student = yaml.safe_load(path.read_text())["student"]
        if student["kind"] == "timm":
            assert timm_weights_tag(StudentConfig(**student)) == student["name"]
