"""The student model contract: ModelOutput from every backbone kind, heads from HeadConfig + class context,
models saved and rebuilt from their files alone (no code executed), optimizers by timm name."""
from __future__ import annotations

import json
import os
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vlpl.config import ConfigError, HeadConfig, OptimConfig, StudentConfig
from vlpl.registry import HEADS
from vlpl.train.model import ClassContext, ModelOutput, create_classifier
from vlpl.train.model_io import ModelFileError, load_model, save_model

RESNET = StudentConfig(kind="timm", name="test_resnet", pretrained=False, image_size=64)
VIT = StudentConfig(kind="timm", name="test_vit", pretrained=False, image_size=64)
CLIP = StudentConfig(kind="open_clip", name="vlpl-tiny", pretrained=False, image_size=64, normalization="model")
NAMES = ["cat", "dog", "traffic light", "person", "pizza"]


def _ctx(d: int = 8, seed: int = 0) -> ClassContext:
    emb = np.random.default_rng(seed).standard_normal((len(NAMES), d)).astype(np.float32)
    return ClassContext(NAMES, emb / np.linalg.norm(emb, axis=1, keepdims=True))


def _x(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# ---- backbones: pooled + tokens in one space ---------------------------------------------------------


def test_timm_cnn_tokens_are_the_last_feature_map_and_pool_to_pooled():
    model = create_classifier(RESNET, _ctx()).eval()
    x = _x()
    with torch.no_grad():
        out = model.features(x)
        fmap = model.backbone.model.forward_features(x)  # (B, F, H, W)
    B, F, H, W = fmap.shape
    assert out.tokens.shape == (B, H * W, F) and out.pooled.shape == (B, F) == (2, model.num_features)
    assert torch.equal(out.tokens, fmap.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out.pooled, out.tokens.mean(1))  # test_resnet pools by average
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head.fc(out.pooled), rtol=0, atol=0)


def test_timm_vit_tokens_are_patch_tokens_after_the_final_norm():
    model = create_classifier(VIT, _ctx()).eval()
    vit = model.backbone.model
    x = _x()
    with torch.no_grad():
        out = model.features(x)
        seq = vit.forward_features(x)  # final norm applied; [cls, patches]
    assert vit.num_prefix_tokens == 1 and seq.shape[1] == 1 + 16  # 64 px / patch 16
    assert torch.equal(out.tokens, seq[:, 1:])
    assert torch.equal(out.pooled, seq[:, 0])  # test_vit pools the class token


def test_timm_heads_that_norm_after_pooling_norm_the_tokens_too():
    """ConvNeXt-style heads (pool -> LayerNorm) and avg-pooled ViTs (fc_norm): tokens get the same norm."""
    import timm

    from vlpl.train.model import TimmBackbone

    x = _x()
    cnx = TimmBackbone(timm.create_model("test_convnext", pretrained=False, num_classes=0), (0.5,) * 3, (0.5,) * 3)
    vit = TimmBackbone(timm.create_model("test_vit", pretrained=False, num_classes=0, global_pool="avg"),
                       (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        out = cnx.eval()(x)
        fmap = cnx.model.forward_features(x)
        torch.testing.assert_close(out.tokens, cnx.model.head.norm(fmap).flatten(2).transpose(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(out.pooled, cnx.model.head.norm(fmap.mean((2, 3), keepdim=True)).flatten(1))
        out = vit.eval()(x)
        seq = vit.model.forward_features(x)  # norm is Identity here: the model norms after pooling
        assert isinstance(vit.model.norm, nn.Identity)
        assert torch.equal(out.tokens, vit.model.fc_norm(seq[:, 1:]))
        torch.testing.assert_close(out.pooled, vit.model.fc_norm(seq[:, 1:].mean(1)))


def test_open_clip_tokens_are_projected_like_the_pooled_feature():
    torch.manual_seed(0)
    model = create_classifier(CLIP, _ctx()).eval()
    bb = model.backbone
    visual = bb.visual
    x = _x()
    with torch.no_grad():
        out = model.features(x)
        assert torch.equal(out.pooled, visual(x))  # pooled = what the tower itself returns
        # the token path applied to the class token reproduces the (CLS-pooled) tower output exactly
        seq = visual.transformer(visual._embeds(x))
        projected = bb.project_tokens(seq, normed=False)
        assert torch.equal(projected[:, 0], out.pooled)
        assert torch.equal(projected[:, 1:], out.tokens)
        # open_clip's own output_tokens gives them after ln_post but before the projection
        visual.output_tokens = True
        try:
            _, raw = visual(x)
        finally:
            visual.output_tokens = False
    assert raw.shape == (2, 16, 64) and out.tokens.shape == (2, 16, 32) == (2, 16, model.num_features)
    assert torch.equal(out.tokens, raw @ visual.proj)


def test_linear_head_skips_tokens_and_initialises_as_before():
    """The linear head: Linear(F, C) created after the backbone, so a seeded run has today's weights."""
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    fc = nn.Linear(ref.num_features, len(NAMES))
    torch.manual_seed(0)
    model = create_classifier(RESNET, _ctx())
    ref_state = {f"backbone.model.{k}": v for k, v in ref.state_dict().items()}
    ref_state.update({"head.fc.weight": fc.weight, "head.fc.bias": fc.bias})
    got = model.state_dict()
    assert set(got) == set(ref_state) and all(torch.equal(got[k], ref_state[k]) for k in got)
    seen = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append(o))
    model.eval()(_x())
    assert seen[0].tokens is None and model.head.uses_tokens is False  # no token work for this head


def test_create_classifier_checks_names_and_text_embedding_source():
    with pytest.raises(ConfigError, match="close matches: test_resnet"):
        create_classifier(StudentConfig(kind="timm", name="test_resnett", pretrained=False), _ctx())
    with pytest.raises(ConfigError, match="not an open_clip model"):
        create_classifier(StudentConfig(kind="open_clip", name="vlpl-tinyy"), _ctx())
    with pytest.raises(ConfigError, match="needs an open_clip student"):
        create_classifier(StudentConfig(kind="timm", name="test_resnet", pretrained=False,
                                        head=HeadConfig(text_embeddings="student")), _ctx())
    with pytest.raises(ConfigError, match="store, student"):
        create_classifier(StudentConfig(kind="timm", name="test_resnet", pretrained=False,
                                        head=HeadConfig(text_embeddings="clip")), _ctx())
    with pytest.raises(KeyError, match="unknown head 'gmc'"):
        create_classifier(StudentConfig(kind="timm", name="test_resnet", pretrained=False,
                                        head=HeadConfig(name="gmc")), _ctx())
    # the form before class contexts: C unnamed classes
    assert create_classifier(RESNET, 7).num_classes == 7


def test_class_context_from_store(coco256_store):
    from vlpl.store.store import ScoreStore

    store = ScoreStore(coco256_store)
    ctx = ClassContext.from_store(store)
    assert ctx.names == store.classes and len(ctx.names) == 80
    emb = np.load(coco256_store / "text_embeddings.npy")
    assert ctx.text_embeddings.dtype == np.float32 and np.array_equal(ctx.text_embeddings, emb)
    with pytest.raises(ValueError, match=r"shape \(3, 4\), expected \(2, D\)"):
        ClassContext(["a", "b"], np.zeros((3, 4), np.float32))
    with pytest.raises(ConfigError, match="needs class text embeddings"):
        ClassContext.from_names(["a"]).require_embeddings("head 'gmc'")


def test_student_text_embeddings_come_from_the_students_text_tower():
    import open_clip

    from vlpl.vlm.backend import register_bundled_configs

    register_bundled_configs()
    cfg = StudentConfig(kind="open_clip", name="vlpl-tiny", pretrained=False, normalization="model",
                        head=HeadConfig(text_embeddings="student"))
    torch.manual_seed(3)
    model = create_classifier(cfg, _ctx())  # the store's 8-d embeddings are replaced
    torch.manual_seed(3)
    ref = open_clip.create_model("vlpl-tiny").eval()
    tok = open_clip.get_tokenizer("vlpl-tiny")
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref.encode_text(tok([f"a photo of a {n}." for n in NAMES])), dim=-1)
    assert model.context.names == NAMES and model.context.text_embeddings.shape == (5, 32)
    np.testing.assert_allclose(model.context.text_embeddings, want.numpy(), rtol=0, atol=1e-6)
    assert not any(k.startswith(("transformer.", "token_embedding")) for k in model.state_dict())  # no text tower


# ---- heads that read tokens and class embeddings fit the interface --------------------------------------


class _TokenSimilarityHead(nn.Module):
    """A test head in SigRL's shape: projects tokens into the class-embedding space, max over tokens."""

    uses_tokens = True

    def __init__(self, in_features: int, context: ClassContext, scale: float = 10.0) -> None:
        super().__init__()
        emb = torch.from_numpy(context.require_embeddings("test head"))
        self.register_buffer("emb", emb, persistent=False)
        self.proj = nn.Linear(in_features, emb.shape[1], bias=False)
        self.scale = scale

    def forward(self, out: ModelOutput) -> torch.Tensor:
        tok = torch.nn.functional.normalize(self.proj(out.tokens), dim=-1)
        return self.scale * (tok @ self.emb.T).amax(1)


if "_test_token_similarity" not in HEADS:
    HEADS.register("_test_token_similarity")(_TokenSimilarityHead)


@pytest.mark.parametrize("cfg", [RESNET, CLIP], ids=["timm", "open_clip"])
def test_a_token_head_gets_tokens_and_context(cfg):
    cfg = StudentConfig(**{**cfg.__dict__, "head": HeadConfig(name="_test_token_similarity", params={"scale": 5.0})})
    model = create_classifier(cfg, _ctx(d=8)).eval()
    assert model.head.scale == 5.0 and model.head.proj.in_features == model.num_features
    with torch.no_grad():
        logits = model(_x())
    assert logits.shape == (2, 5) and torch.all(logits.abs() <= 5.0 + 1e-5)


# ---- save / load ---------------------------------------------------------------------------------------


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("cfg", [RESNET, CLIP, StudentConfig(**{**CLIP.__dict__, "head": HeadConfig(
    text_embeddings="student")}), StudentConfig(**{**VIT.__dict__, "head": HeadConfig(
        name="_test_token_similarity", params={"scale": 3.0})})], ids=["timm", "open_clip", "clip_text", "token_head"])
def test_saved_model_rebuilds_with_identical_logits_and_bytes(cfg, tmp_path):
    torch.manual_seed(0)
    model = create_classifier(cfg, _ctx())
    with torch.no_grad():  # weights unlike any fresh initialisation
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.train()(_x(4))  # BatchNorm running statistics move away from their defaults
    save_model(tmp_path / "a", model, cfg)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "classes.txt", "model.json", "model.safetensors", "text_embeddings.npy"]
    torch.manual_seed(123)  # loading must not depend on the RNG
    loaded = load_model(tmp_path / "a")
    assert not loaded.training and loaded.context.names == NAMES
    assert np.array_equal(loaded.context.text_embeddings, model.context.text_embeddings)
    assert (loaded.mean, loaded.std) == (model.mean, model.std)
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    save_model(tmp_path / "b", loaded, cfg)  # identical weights -> byte-identical files
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    assert meta["student"]["head"]["name"] == cfg.head.name and meta["num_classes"] == 5
    assert meta["text_embeddings"]["source"] == cfg.head.text_embeddings


def test_load_model_never_fetches_pretrained_weights(tmp_path, monkeypatch):
    import timm

    cfg = StudentConfig(kind="timm", name="test_resnet", pretrained=True)  # as saved by a real run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = create_classifier(cfg, _ctx())
    save_model(tmp_path, model, cfg)
    calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k) or real(*a, **k))
    load_model(tmp_path)
    assert calls and all(k.get("pretrained") is False for k in calls)


def _write_module(tmp_path: Path, name: str, marker: Path) -> None:
    (tmp_path / "mods").mkdir(exist_ok=True)
    (tmp_path / "mods" / f"{name}.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")
        from vlpl.registry import HEADS
        from vlpl.train.heads.linear import LinearHead
        HEADS.register({name!r})(LinearHead)
    """))


@pytest.mark.parametrize("head_name", ["{mod}", "{mod}.EvilHead", "{mod}:EvilHead"])
def test_a_head_named_in_model_json_is_never_imported(tmp_path, monkeypatch, head_name):
    mod = "vlpl_evil_head_plugin"
    marker = tmp_path / "imported.txt"
    _write_module(tmp_path, mod, marker)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    model = create_classifier(RESNET, _ctx())
    save_model(tmp_path / "m", model, RESNET)
    meta_path = tmp_path / "m" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["student"]["head"]["name"] = head_name.format(mod=mod)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"model\.json: key 'student\.head\.name': head .* is not registered"):
        load_model(tmp_path / "m")
    assert mod not in sys.modules and not marker.exists()


def test_unexpected_keys_and_values_in_model_json_are_refused(tmp_path):
    model = create_classifier(RESNET, _ctx())
    save_model(tmp_path, model, RESNET)
    path = tmp_path / "model.json"
    good = json.loads(path.read_text())

    def refused(meta: dict, pattern: str) -> None:
        path.write_text(json.dumps(meta))
        with pytest.raises(ModelFileError, match=pattern):
            load_model(tmp_path)

    refused({**good, "loader": "pickle"}, r"model\.json: key 'loader': unknown key")
    refused({**good, "format_version": 2}, r"key 'format_version': expected 1, got 2")
    refused({**good, "student": {**good["student"], "module": "os"}}, r"unknown key 'module' in .*model\.json key 'student'")
    refused({**good, "student": {**good["student"], "head": {"name": "linear", "params": {"bias": False}}}},
            r"key 'student': cannot rebuild the model: .*'bias'")
    refused({**good, "num_classes": 6}, r"key 'num_classes': 6, but .*classes\.txt has 5 names")
    refused({k: v for k, v in good.items() if k != "files"}, r"key 'files': missing")


def test_a_damaged_or_replaced_weights_file_is_named(tmp_path):
    model = create_classifier(RESNET, _ctx())
    save_model(tmp_path, model, RESNET)
    w = tmp_path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x10
    w.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"model\.safetensors: sha256 .* does not match .*'files\.model\.safetensors'"):
        load_model(tmp_path)


class _Payload:
    """Unpickling this writes a file: a checkpoint that would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_pickle_is_never_loaded(tmp_path):
    """There is no pickle path: a ``model.pt`` beside the files is ignored, one instead of them is not a
    model, and pickle bytes in place of the safetensors file (with a matching hash) are refused."""
    marker = tmp_path / "ran.txt"
    evil = pickle.dumps({"state_dict": _Payload(marker)})
    model = create_classifier(RESNET, _ctx())
    save_model(tmp_path / "m", model, RESNET)
    (tmp_path / "m" / "model.pt").write_bytes(evil)
    load_model(tmp_path / "m")  # loads from model.safetensors; model.pt is never opened
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "model.pt").write_bytes(evil)
    with pytest.raises(ModelFileError, match="not a saved model: model.json not found"):
        load_model(tmp_path / "only")
    import hashlib

    (tmp_path / "m" / "model.safetensors").write_bytes(evil)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["files"]["model.safetensors"] = hashlib.sha256(evil).hexdigest()
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"model\.safetensors: not a safetensors file"):
        load_model(tmp_path / "m")
    assert not marker.exists()


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    import vlpl.train.model_io as mio

    model = create_classifier(RESNET, _ctx())
    save_model(tmp_path, model, RESNET)
    before = _files(tmp_path)
    with torch.no_grad():
        model.head.fc.bias.add_(1.0)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mio, "atomic_write_json", boom)  # the model.json write (the last one) fails
    with pytest.raises(OSError):
        save_model(tmp_path, model, RESNET)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    # the new weights landed but model.json still names the old ones: the mix is detected, not loaded
    assert _files(tmp_path)["model.json"] == before["model.json"]
    with pytest.raises(ModelFileError, match="does not match"):
        load_model(tmp_path)


# ---- optimizer and schedule ------------------------------------------------------------------------------


def _groups_summary(opt: torch.optim.Optimizer) -> list:
    return [(g.get("name"), g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in opt.param_groups]


def test_adam_by_timm_name_is_torch_adam_with_our_groups():
    from vlpl.train.optim import create_optimizer, param_groups

    model = create_classifier(RESNET, _ctx())
    extra = [{"params": [nn.Parameter(torch.zeros(3))], "lr": 0.5, "name": "estimator"}]
    cfg = OptimConfig(name="adam", lr=1e-3, head_lr=1e-2, weight_decay=1e-4)
    opt = create_optimizer(cfg, model, extra)
    ref = torch.optim.Adam(param_groups(cfg, model, extra), lr=1e-3, weight_decay=1e-4)
    assert type(opt) is torch.optim.Adam
    assert _groups_summary(opt) == _groups_summary(ref)
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("backbone", 1e-3), ("head", 1e-2), ("estimator", 0.5)]
    assert {k: v for k, v in opt.defaults.items()} == {k: v for k, v in ref.defaults.items()}
    # head_lr null: the head at lr
    opt = create_optimizer(OptimConfig(name="adamw", lr=2e-3, head_lr=None), model)
    assert type(opt) is torch.optim.AdamW and [g["lr"] for g in opt.param_groups] == [2e-3, 2e-3]


def test_sgd_with_params_and_unknown_names():
    from vlpl.train.optim import create_optimizer

    model = create_classifier(RESNET, _ctx())
    opt = create_optimizer(OptimConfig(name="sgd", lr=0.1, params={"momentum": 0.9, "nesterov": False}), model)
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is False
    loss = model(_x()).sum()
    loss.backward()
    w0 = model.head.fc.weight.detach().clone()
    opt.step()
    assert not torch.equal(w0, model.head.fc.weight)
    with pytest.raises(ConfigError, match=r"optim.name: 'adamm' is not a timm optimizer .*close matches: adam"):
        create_optimizer(OptimConfig(name="adamm"), model)
    with pytest.raises(ConfigError, match="optim.params.momentum: optimizer 'adam' has no 'momentum'"):
        create_optimizer(OptimConfig(name="adam", params={"momentum": 0.9}), model)  # timm would drop it
    with pytest.raises(ConfigError, match=r"optim.params: \['amsgrad_x'\] for optimizer 'adam'"):
        create_optimizer(OptimConfig(name="adam", params={"amsgrad_x": True}), model)
    with pytest.raises(ConfigError, match="optim.params.lr: set optim.lr"):
        create_optimizer(OptimConfig(name="adam", params={"lr": 0.9}), model)


@pytest.mark.parametrize("kind,expected", [
    ("none", [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("cosine", [1.0, 0.75, 0.25, 0.0, 0.0]),  # 0.5 (1 + cos(pi e / 3)); held at 0 past the end
    ("step", [1.0, 1.0, 0.1, 0.1, 0.01]),  # step_size 2, gamma 0.1
])
def test_scheduler_per_epoch_factors(kind, expected):
    from vlpl.train.optim import create_scheduler

    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = create_scheduler(OptimConfig(scheduler=kind, step_size=2, gamma=0.1), opt, epochs=3)
    got = []
    for _ in range(5):
        got.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    np.testing.assert_allclose(got, expected, atol=1e-12)
    with pytest.raises(ConfigError, match="optim.scheduler"):
        create_scheduler(OptimConfig(scheduler="linear"), opt, epochs=3)


def test_open_clip_tower_without_tokens_gives_pooled_only_and_token_heads_say_so(tmp_path):
    import open_clip

    tiny_rn = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "vlpl-test-tiny-rn.json").write_text(json.dumps(tiny_rn))
    open_clip.add_model_config(tmp_path / "cfg")
    cfg = StudentConfig(kind="open_clip", name="vlpl-test-tiny-rn", pretrained=False, normalization="model")
    model = create_classifier(cfg, _ctx()).eval()
    x = _x()
    with torch.no_grad():
        out = model.features(x)
        assert out.tokens is None and torch.equal(out.pooled, model.backbone.visual(x))
        assert model(x).shape == (2, 5)
    token_cfg = StudentConfig(**{**cfg.__dict__, "head": HeadConfig(name="_test_token_similarity")})
    with pytest.raises(ValueError, match=r"reads the token map, but the backbone \(ModifiedResNet\) gives none"):
        create_classifier(token_cfg, _ctx()).eval()(x)


def test_open_clip_student_from_a_local_checkpoint_is_rebuilt_without_it(tmp_path):
    """``open_clip_pretrained`` = a local file: loaded at creation; the saved model no longer needs it."""
    import open_clip

    from vlpl.vlm.backend import register_bundled_configs

    register_bundled_configs()
    torch.manual_seed(5)
    ckpt = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("vlpl-tiny").state_dict(), ckpt)
    torch.manual_seed(5)
    want = open_clip.create_model("vlpl-tiny").visual.eval()
    cfg = StudentConfig(**{**CLIP.__dict__, "open_clip_pretrained": str(ckpt)})
    torch.manual_seed(99)  # another random init: only the checkpoint can make the weights equal
    model = create_classifier(cfg, _ctx()).eval()
    x = _x()
    with torch.no_grad():
        assert torch.equal(model.features(x).pooled, want(x))
    save_model(tmp_path / "m", model, cfg)
    ckpt.unlink()
    loaded = load_model(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model.json").read_text())["student"]["open_clip_pretrained"] == str(ckpt)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_save_refuses_a_context_other_than_the_heads(tmp_path):
    cfg = StudentConfig(**{**CLIP.__dict__, "head": HeadConfig(text_embeddings="student")})
    store_ctx = _ctx()
    model = create_classifier(cfg, store_ctx)
    with pytest.raises(ValueError, match="differs from the one the head was built with"):
        save_model(tmp_path, model, cfg, store_ctx)  # the store's embeddings, not the student's
    save_model(tmp_path, model, cfg, ClassContext(list(NAMES), model.context.text_embeddings.copy()))
    assert np.array_equal(np.load(tmp_path / "text_embeddings.npy"), model.context.text_embeddings)
