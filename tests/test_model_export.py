"""``vlpl export-model``: timm loads the exported folder and gives vlpl's logits (linear head) or features (other
heads); vlpl/ reloads the whole classifier; the push goes through HfApi (replaced at its boundary) and the token
never appears in any output or file."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from vlpl.cli import main as cli_main
from vlpl.config import StudentConfig, load_config
from vlpl.export.model import ModelExportError, export_model
from vlpl.train.model import ClassContext, create_classifier
from vlpl.train.model_io import load_model, save_model

CLASSES = ["cat", "dog", "person", "bicycle", "traffic light"]


def _fake_run(tmp: Path, head: str = "linear", name: str = "test_resnet", kind: str = "timm") -> Path:
    """A run folder holding only best/ (what export reads) and a summary: a random tiny classifier."""
    torch.manual_seed(0)
    cfg = load_config(StudentConfig, base={"kind": kind, "name": name, "pretrained": False, "image_size": 64,
                                           "head": {"name": head}})
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((len(CLASSES), 16)).astype(np.float32)
    model = create_classifier(cfg, ClassContext(CLASSES, emb))
    with torch.no_grad():  # non-trivial classifier weights (not timm's init)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    run = tmp / f"run-{head}"
    save_model(run / "best", model, cfg)
    (run / "summary.json").write_text(json.dumps({"method": "an", "best_epoch": 1, "test_map_at_best": 12.5}))
    return run


def test_linear_head_exports_the_whole_classifier_timm_loadable(tmp_path):
    import timm

    run = _fake_run(tmp_path)
    res = export_model(run, tmp_path / "out")
    assert res.timm and res.timm_classifier
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", "classes.txt", "README.md", "vlpl"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["num_classes"] == len(CLASSES)
    assert cfg["label_names"] == CLASSES and cfg["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert cfg["pretrained_cfg"]["crop_pct"] == 1.0 and cfg["vlpl"]["run"]["test_map_at_best"] == 12.5
    vl = load_model(run / "best")
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    # timm's own loader: local-dir (as hf-hub reads a pushed repo) and pretrained_cfg_overlay(file=...)
    a = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    b = timm.create_model("test_resnet", pretrained=True, num_classes=len(CLASSES),
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                      num_classes=len(CLASSES))).eval()
    with torch.no_grad():
        want = vl(x)
        torch.testing.assert_close(a(x), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(b(x), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(load_model(out / "vlpl")(x), want, rtol=0, atol=0)
    data = timm.data.resolve_data_config({}, model=a)
    assert tuple(data["mean"]) == tuple(vl.mean) and tuple(data["input_size"]) == (3, 64, 64) and data["crop_pct"] == 1.0
    # timm's own eval transform from the exported config is the run's preprocessing, bit for bit, on a
    # non-square image (squash resize to (s, s), not a centre crop)
    from PIL import Image

    from vlpl.train.data import DeviceNormalize, Uint8Resize

    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (90, 150, 3), dtype=np.uint8))
    ours = DeviceNormalize(vl.mean, vl.std)(Uint8Resize(64)(img)[None])
    torch.testing.assert_close(timm.data.create_transform(**data)(img)[None], ours, rtol=0, atol=0)
    assert "timm.create_model" in (out / "README.md").read_text() and cfg["vlpl"]["dataset"] is None


def test_a_run_trained_from_a_hub_dataset_names_it_in_the_card(tmp_path):
    run = _fake_run(tmp_path)
    (run / "config.yaml").write_text("store: hf:me/coco-pseudo@v1#vlpl_tiny_damp\n")
    export_model(run, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    import yaml

    assert yaml.safe_load(card.split("---")[1])["datasets"] == ["me/coco-pseudo"]
    assert "https://huggingface.co/datasets/me/coco-pseudo" in card


def test_other_heads_export_the_backbone_with_the_same_features(tmp_path):
    import timm

    run = _fake_run(tmp_path, head="sigrl")
    res = export_model(run, tmp_path / "out")
    assert res.timm and not res.timm_classifier
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["num_classes"] == 0
    vl = load_model(run / "best")
    m = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(m(x), vl.features(x).pooled, rtol=0, atol=1e-6)
        torch.testing.assert_close(load_model(out / "vlpl")(x), vl(x), rtol=0, atol=0)


def test_an_open_clip_student_exports_in_vlpl_format_only(tmp_path):
    run = _fake_run(tmp_path, name="vlpl-tiny", kind="open_clip")
    res = export_model(run, tmp_path / "out")
    out = tmp_path / "out"
    assert not res.timm and not (out / "model.safetensors").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert list(cfg) == ["vlpl"] and cfg["vlpl"]["student"]["kind"] == "open_clip"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out / "vlpl")(x), load_model(run / "best")(x), rtol=0, atol=0)
    assert "library_name: vlpl" in (out / "README.md").read_text()


def test_export_replaces_the_folder_whole_and_refuses_bad_destinations(tmp_path):
    run = _fake_run(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    export_model(run, out)
    assert not (out / "stale.bin").exists()
    with pytest.raises(ModelExportError, match="inside the run"):
        export_model(run, run / "export")
    with pytest.raises(ModelExportError, match="no best model"):
        export_model(tmp_path / "nothing", tmp_path / "o2")


class FakeHfApi:
    """HfApi at its boundary: records the calls; the token is whatever huggingface_hub would find (never passed)."""

    calls: list = []

    def __init__(self, *a, **kw):
        assert "token" not in kw
        FakeHfApi.calls.append(("init", a, kw))

    def create_repo(self, repo_id, **kw):
        FakeHfApi.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        FakeHfApi.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        files = sorted(str(p.relative_to(kw["folder_path"])) for p in Path(kw["folder_path"]).rglob("*") if p.is_file())
        FakeHfApi.calls.append(("upload_folder", kw, files))


def test_push_uploads_the_folder_and_never_shows_the_token(tmp_path, monkeypatch, caplog, capsys):
    import huggingface_hub

    secret = "hf_SECRETtokenVALUE1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    run = _fake_run(tmp_path)
    caplog.set_level(logging.DEBUG)
    rc = cli_main(["export-model", str(run), "--out", str(tmp_path / "out"), "--push-to-hub", "me/tiny",
                   "--private", "--revision", "v1"])
    assert rc == 0
    names = [c[0] for c in FakeHfApi.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    assert FakeHfApi.calls[1][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    up = FakeHfApi.calls[3][1]
    assert up["repo_id"] == "me/tiny" and up["repo_type"] == "model" and up["revision"] == "v1"
    assert {"config.json", "model.safetensors", "README.md", "vlpl/model.safetensors"} <= set(FakeHfApi.calls[3][2])
    assert "hf-hub:me/tiny" in (tmp_path / "out" / "README.md").read_text()
    printed = capsys.readouterr()
    assert "pushed to https://huggingface.co/me/tiny" in printed.out
    seen = printed.out + printed.err + caplog.text + "".join(
        p.read_bytes().decode("latin-1") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert secret not in seen


def test_push_failure_names_the_repo_and_step_not_the_token(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    secret = "hf_ANOTHERsecretTOKEN987654321"
    monkeypatch.setenv("HF_TOKEN", secret)

    class Failing(FakeHfApi):
        def upload_folder(self, **kw):
            raise RuntimeError(f"401 Unauthorized for token {secret}")

    monkeypatch.setattr(huggingface_hub, "HfApi", Failing)
    run = _fake_run(tmp_path)
    rc = cli_main(["export-model", str(run), "--out", str(tmp_path / "out"), "--push-to-hub", "me/tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "me/tiny" in err and "upload_folder" in err and secret not in err
