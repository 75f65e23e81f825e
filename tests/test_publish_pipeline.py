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
    assert names == ["pseudolabel", "export", "train", "export_model", "predict", "train"]
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
    # the second user, from the dataset alone, trains the same model: the same test predictions
    again = np.load(work / "run-from-dataset" / "predictions" / "test.npz")
    assert list(again["sample_ids"]) == list(saved["sample_ids"])
    np.testing.assert_array_equal(again["probs"], saved["probs"])
    # re-running the recipe resumes: the export is kept (the run trained from it resumes), the rest is rewritten
    parquet = {p: p.read_bytes() for p in sorted((work / "dataset").rglob("*.parquet"))}
    run_pipeline(str(RECIPE), [f"work={work}", f"root={coco256_root}"])
    assert read_predictions(work / "predictions.csv")[0] == images
    assert {p: p.read_bytes() for p in sorted((work / "dataset").rglob("*.parquet"))} == parquet


def test_export_stage_keeps_a_current_export_and_pushes_it(coco256_store, tmp_path, monkeypatch):
    import vlpl.export.hub as hub

    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump({"vars": {"repo": ""}, "stages": [{"export": {
        "store": str(coco256_store), "out": str(tmp_path / "ds"), "push_to_hub": "${repo}"}}]}))
    run_pipeline(str(pipe))
    files = {p: p.read_bytes() for p in sorted((tmp_path / "ds").rglob("*")) if p.is_file()}
    assert any(p.suffix == ".parquet" for p in files)
    pushed = []
    monkeypatch.setattr(hub, "push_export", lambda dd, out, name, repo, **kw: pushed.append(
        (sorted(dd), {k: len(v) for k, v in dd.items()}, Path(out), name, repo, kw)))
    run_pipeline(str(pipe), ["repo=me/pseudo"])
    assert {p: p.read_bytes() for p in sorted((tmp_path / "ds").rglob("*")) if p.is_file()} == files
    (split_names, rows, out, name, repo, kw) = pushed[0]
    meta = json.loads((tmp_path / "ds" / name / "vlpl_export.json").read_text())
    assert len(pushed) == 1 and out == tmp_path / "ds" and repo == "me/pseudo" and rows == meta["splits"]
    # another rule is another export: written, not kept
    pipe.write_text(pipe.read_text().replace("push_to_hub", "rule: topk\n    push_to_hub"))
    run_pipeline(str(pipe))
    assert len(list((tmp_path / "ds").glob("*/vlpl_export.json"))) == 2


def _doc_commands(text: str):
    """``vlpl ...`` command lines of the fenced bash blocks of a Markdown text (continuations joined)."""
    import re
    import shlex

    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"(?:^|\s)(?:-m )?vlpl (\S.*)$", line)
            if m:
                yield line, shlex.split(m.group(1).split(" #")[0].rstrip(" &"))


def test_every_command_in_the_scale_and_tagging_docs_parses():
    from vlpl.cli import build_parser

    parser = build_parser()
    text = (REPO / "docs" / "SCALE.md").read_text()
    pub = (REPO / "docs" / "PUBLISHING.md").read_text()
    text += pub[pub.index("## 8. Tag new images"):]
    seen = set()
    for line, argv in _doc_commands(text):
        args, extra = parser.parse_known_args(argv)
        assert args.command and all("=" in e for e in extra), (line, extra)
        seen.add(args.command)
    assert {"pseudolabel", "train", "predict", "export-model", "run"} <= seen
