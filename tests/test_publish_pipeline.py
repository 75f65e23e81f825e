"""pipelines/coco256_publish.yaml end to end (store -> exported dataset + card -> trained model -> model folder ->
predictions) and the pipeline's export / predict / export_model stages' config checks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from vlpl.config import ConfigError
from vlpl.pipeline import load_pipeline, run_pipeline

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "pipelines" / "coco256_publish.yaml"


def test_recipe_parses_and_an_unset_hub_repo_means_no_push(tmp_path):
    stages = load_pipeline(str(RECIPE), [f"work={tmp_path}"])
    names = [s["stage"] for s in stages]
    assert names[:5] == ["pseudolabel", "export", "train", "export_model", "predict"]
    export = stages[1]["doc"]
    assert export["push_to_hub"] is None and export["save_to_disk"] == f"{tmp_path}/dataset-disk"
    pushed = load_pipeline(str(RECIPE), [f"work={tmp_path}", "hub_repo=me/pseudo", "hub_model_repo=me/model"])
    assert pushed[1]["doc"]["push_to_hub"] == "me/pseudo" and pushed[3]["doc"]["push_to_hub"] == "me/model"


@pytest.mark.parametrize("stage, body, match", [
    ("export", {"store": "s", "out": "o", "with_imagez": True}, "with_imagez"),
    ("export", {"store": "s", "out": "o", "format": "cole", "push_to_hub": "me/x"}, "push_to_hub"),
    ("predict", {"run": "r"}, "images"),
    ("predict", {"run": "r", "images": "one.jpg"}, "list of paths"),
    ("predict", {"run": "r", "images": ["a.jpg"], "topK": 3}, "topk"),
    ("export_model", {"run": "r"}, "out"),
])
def test_bad_stage_bodies_are_refused_before_anything_runs(tmp_path, stage, body, match):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"stages": [{stage: body}]}))
    with pytest.raises(ConfigError, match=match):
        load_pipeline(str(p))


@pytest.mark.slow
def test_publish_recipe_end_to_end(coco256_root, tmp_path):
    import datasets

    work = tmp_path / "pub"
    run_pipeline(str(RECIPE), [f"work={work}", f"root={coco256_root}"])
    # the store
    assert (work / "store" / "manifest.json").is_file()
    # the exported dataset, its card (YAML front matter), and the save_to_disk copy with the images in it
    card = (work / "dataset" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["task_ids"] == ["multi-label-image-classification"]
    dd = datasets.load_from_disk(str(work / "dataset-disk"))
    assert {"train", "test"} <= set(dd) and sum(len(d) for d in dd.values()) == 256
    # the trained model and its exported folder, timm-loadable
    assert (work / "run" / "best" / "model.safetensors").is_file()
    cfg = json.loads((work / "model" / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and len(cfg["label_names"]) == 80
    # the predictions on the test images are the run's saved test predictions
    from vlpl.predict import read_predictions
    from vlpl.store.store import ScoreStore

    images, errors, tags, probs, classes = read_predictions(work / "predictions.csv")
    test = ScoreStore.open(work / "store").split("test")
    by_name = {Path(i).name: k for k, i in enumerate(images)}
    order = [by_name[Path(ref).name] for ref in test.images]
    saved = np.load(work / "run" / "predictions" / "test.npz")
    assert len(images) == 128 and errors == [None] * 128
    np.testing.assert_allclose(probs[order], saved["probs"], rtol=0, atol=2e-6)
    # re-running the recipe resumes: every stage finds its work done or rewrites its output whole
    run_pipeline(str(RECIPE), [f"work={work}", f"root={coco256_root}"])
    assert read_predictions(work / "predictions.csv")[0] == images
