"""Teachers (issue 14, items 8, 9, 11): the shipped teacher configs, sigmoid (SigLIP-type) scoring, the dense
patch-token view and class descriptions, on tiny random open_clip models built through open_clip's real code
paths (no download anywhere)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "configs" / "models"


def _teacher_files():
    out = []
    for path in sorted(MODELS.glob("*.yaml")):
        t = (yaml.safe_load(path.read_text()) or {}).get("teacher")
        if t and t.get("backend", "open_clip") == "open_clip" and t.get("pretrained"):
            out.append((path.name, t))
    return out


def test_every_shipped_teacher_names_a_pretrained_open_clip_model():
    """Each open_clip teacher config names (model, tag) exactly as ``open_clip.list_pretrained()`` lists them,
    and the model's architecture config is there (nothing is downloaded)."""
    import open_clip

    files = _teacher_files()
    names = {n for n, _ in files}
    # the strongest model of each family (issue 14, item 8) is shipped
    for want in ("pe_core_bigg14_448.yaml", "siglip2_gopt16_384.yaml", "dfn5b_vit_h14_378.yaml",
                 "metaclip2_vit_bigg14_378.yaml", "eva02_e14_plus.yaml"):
        assert want in names
    listed = set(open_clip.list_pretrained())
    for fname, t in files:
        assert (t["name"], t["pretrained"]) in listed, f"{fname}: ({t['name']}, {t['pretrained']}) not in open_clip"
        assert open_clip.get_model_config(t["name"]) is not None, f"{fname}: no open_clip model config"
        # each model's own preprocessing is known to open_clip for that tag
        pp = open_clip.get_pretrained_cfg(t["name"], t["pretrained"])
        assert len(pp["mean"]) == 3 and len(pp["std"]) == 3, fname
        # and the file is a valid pseudolabel config fragment
        from vlpl.config import PseudolabelConfig, load_config

        cfg = load_config(PseudolabelConfig, [MODELS / fname], ["out=unused"])
        assert (cfg.teacher.name, cfg.teacher.pretrained) == (t["name"], t["pretrained"])


# --------------------------------------------------------------------------------------------------------
# sigmoid (SigLIP-type) scoring
# --------------------------------------------------------------------------------------------------------


def test_score_kind_probabilities_numpy_and_torch():
    """cosine: softmax over classes of cos / temp; siglip: sigmoid(scale * cos + bias) per class, hand values;
    numpy and torch agree; a bad manifest is refused naming the field."""
    import numpy as np
    import torch

    from vlpl.store.views import ScoreKind, active_score_kind

    cos = np.array([[0.2, 0.1, -0.3]], np.float32)
    sig = ScoreKind("siglip", 10.0, -1.0)
    want = 1.0 / (1.0 + np.exp(-(10.0 * cos - 1.0)))  # [sigmoid(1), sigmoid(0), sigmoid(-4)]
    np.testing.assert_allclose(sig.probabilities(cos, 0.01), want, rtol=1e-6)
    np.testing.assert_allclose(sig.probabilities(torch.from_numpy(cos), 0.01).numpy(), want, rtol=1e-6)
    assert abs(float(sig.probabilities(cos, 1.0)[0, 1]) - 0.5) < 1e-7
    soft = np.exp(cos / 0.1) / np.exp(cos / 0.1).sum()
    np.testing.assert_allclose(ScoreKind().probabilities(cos, 0.1), soft, rtol=1e-6)
    np.testing.assert_allclose(ScoreKind().probabilities(torch.from_numpy(cos).half(), 0.1).numpy(), soft, rtol=1e-3)
    assert ScoreKind.from_manifest({}) == ScoreKind()  # older stores: cosines
    assert ScoreKind.from_manifest(sig.to_dict()) == sig
    with pytest.raises(ValueError, match="logit_bias"):
        ScoreKind.from_manifest({"score_kind": "siglip", "logit_scale": 10.0})
    with pytest.raises(ValueError, match="score_kind"):
        ScoreKind.from_manifest({"score_kind": "sigmoidal"})
    with sig.scope():
        assert active_score_kind() is sig
    assert active_score_kind() == ScoreKind()


@pytest.fixture(scope="module")
def sigmoid_store(coco256_root, tmp_path_factory):
    """A store of 6 coco256 images scored by the tiny SigLIP-type teacher (grid 2, flips: V = 10)."""
    from conftest import make_subset_dataset

    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel

    tmp = tmp_path_factory.mktemp("sigmoid")
    data = make_subset_dataset(coco256_root, tmp / "data", n_train=6)
    out = tmp / "store"
    run_pseudolabel(load_config(PseudolabelConfig, [MODELS / "tiny_sigmoid.yaml"], [
        f"data.root={data}", f"out={out}", "num_workers=0", "progress=false", "views.grid=2", "index=false"]))
    return out


def test_sigmoid_teacher_store_records_kind_and_rules_use_sigmoid(sigmoid_store):
    """`vlpl pseudolabel` with a tiny SigLIP-type open_clip model (logit bias, custom text tower, timm image tower
    with an attention-pool head) records score_kind siglip with the model's scale and bias; a rule run on the
    store's scores uses the per-class sigmoid, checked by hand (and differs from the cosine softmax)."""
    import json

    import numpy as np
    import torch

    from vlpl.config import TeacherConfig
    from vlpl.pseudolabel.rules import RuleRows, apply_rule
    from vlpl.store.store import ScoreStore
    from vlpl.vlm.backend import OpenClipBackend

    man = json.loads((sigmoid_store / "manifest.json").read_text())
    teacher = OpenClipBackend(TeacherConfig(name="vlpl-tiny-sigmoid", pretrained=None), torch.device("cpu"))
    assert man["score_kind"] == "siglip"
    assert man["logit_bias"] == pytest.approx(float(teacher.model.logit_bias), abs=1e-6) == -10.0
    assert man["logit_scale"] == pytest.approx(float(teacher.model.logit_scale.exp()), rel=1e-6)
    assert man["text_context_length"] == 32  # the model's own context length (its config), not CLIP's 77

    store = ScoreStore(sigmoid_store)
    train = store.split("train")
    pos = np.arange(len(train))
    raw = train.scores(pos)  # (B, 2, 5, C) raw cosines
    hand = 1.0 / (1.0 + np.exp(-(man["logit_scale"] * raw[:, 0, 0].astype(np.float64) + man["logit_bias"])))
    np.testing.assert_allclose(train.probabilities(pos, temp=0.01)[:, 0, 0], hand, rtol=1e-5)
    thr = float(np.quantile(hand, 0.9))  # ~10% of the classes above it
    obs = torch.from_numpy(train.observed_at(pos))
    kw = dict(dynamic=False, score="softmax", view="global", threshold=thr)
    by_kind = apply_rule("threshold", torch.from_numpy(raw), obs, score_kind=store.score_kind, **kw).numpy()
    by_rows = apply_rule("threshold", torch.from_numpy(raw), obs, rows=RuleRows(train, pos), **kw).numpy()
    np.testing.assert_array_equal(by_kind, (hand >= thr).astype(np.int8))
    np.testing.assert_array_equal(by_rows, by_kind)
    cosine = apply_rule("threshold", torch.from_numpy(raw), obs, **kw).numpy()  # softmax over classes
    assert (cosine != by_kind).any()
    # DAMP under the store's kind: phi from the per-class sigmoids of the global view and the tiles, by hand
    from vlpl.pseudolabel.rules import damp_scores

    pi = 1.0 / (1.0 + np.exp(-(man["logit_scale"] * raw[:, 0].astype(np.float64) + man["logit_bias"])))  # (B, 5, C)
    o = train.observed_at(pos)
    gate = np.minimum(np.where(o == 1, pi[:, 0], 0.0).max(axis=1), 0.3)[:, None]
    a, b = pi[:, 1:].max(axis=1), pi[:, 1:].min(axis=1)
    phi_hand = 0.5 * (pi[:, 0] + np.where(a > gate, a, b))
    with store.score_kind.scope():
        phi, _ = damp_scores(torch.from_numpy(raw[:, 0]), obs, temp=0.01, eta=0.3)
    np.testing.assert_allclose(phi.numpy(), phi_hand, rtol=1e-5, atol=1e-9)
    # the trainer's RuleRunner (built as run_train builds it, with the training split) reads the store's kind
    from vlpl.train.step import RuleRunner

    runner = RuleRunner("threshold", {k: v for k, v in kw.items() if k != "dynamic"}, False,
                        lambda p: torch.from_numpy(train.scores(p)), train, split=train)
    np.testing.assert_array_equal(runner(pos, None).numpy(), by_kind)


# --------------------------------------------------------------------------------------------------------
# class descriptions and template sets
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    import torch

    from vlpl.config import TeacherConfig
    from vlpl.vlm.backend import OpenClipBackend

    return OpenClipBackend(TeacherConfig(name="vlpl-tiny", pretrained=None), torch.device("cpu"))


def test_descriptions_parse_json_and_yaml(tmp_path):
    import json

    from vlpl.vlm.backend import class_prompts, load_descriptions

    data = {"dog": ["a four-legged pet that barks", "a {} on a leash"], "cat": "a small feline", "owl": ["a bird"]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(data))
    for f in ("d.json", "d.yaml"):
        got = load_descriptions(tmp_path / f, ["cat", "dog"])  # owl: not a dataset class, ignored
        assert got == {"cat": ["a small feline"], "dog": ["a four-legged pet that barks", "a dog on a leash"]}
    prompts = class_prompts(["cat", "dog"], ["a photo of a {}."], got)
    assert prompts == [["a photo of a cat.", "a small feline"],
                       ["a photo of a dog.", "a four-legged pet that barks", "a dog on a leash"]]
    assert class_prompts(["cat"], [], got) == [["a small feline"]]  # templates: [] -> descriptions alone


def test_descriptions_missing_class_or_bad_entry_is_named(tmp_path):
    from vlpl.config import ConfigError
    from vlpl.vlm.backend import load_descriptions

    f = tmp_path / "desc.yaml"
    f.write_text(yaml.safe_dump({"dog": ["a pet"]}))
    with pytest.raises(ConfigError, match=r"desc\.yaml.*class 'cat' has no descriptions"):
        load_descriptions(f, ["dog", "cat"])
    f.write_text(yaml.safe_dump({"dog": [1, 2]}))
    with pytest.raises(ConfigError, match=r"desc\.yaml.*class 'dog': expected a list of strings"):
        load_descriptions(f, ["dog"])
    f.write_text(yaml.safe_dump({"dog": []}))
    with pytest.raises(ConfigError, match="class 'dog' has an empty list"):
        load_descriptions(f, ["dog"])
    with pytest.raises(ConfigError, match="missing.json: cannot read"):
        load_descriptions(tmp_path / "missing.json", ["dog"])


def test_description_averaging_equals_hand_mean(tiny):
    """Each class embedding = normalise(mean of the normalised prompt embeddings), for ragged prompt lists; with
    templates alone it equals open_clip's own prompt ensembling (build_zero_shot_classifier)."""
    import torch
    import torch.nn.functional as F

    prompts = [["a photo of a dog.", "a four-legged pet that barks", "a dog on a leash"], ["a small feline"]]
    got = tiny.encode_prompts(prompts, batch_size=2)  # batches straddle the classes
    with torch.no_grad():
        hand = []
        for ps in prompts:
            e = torch.stack([F.normalize(tiny.model.encode_text(tiny.tokenizer([p]))[0].float(), dim=-1) for p in ps])
            hand.append(F.normalize(e.mean(0), dim=-1))
    torch.testing.assert_close(got, torch.stack(hand), rtol=1e-5, atol=1e-6)
    templates = ["a photo of a {}.", "a drawing of a {}."]
    from vlpl.vlm.backend import class_prompts

    torch.testing.assert_close(tiny.encode_prompts(class_prompts(["dog", "cat"], templates)),
                               tiny.encode_text(["dog", "cat"], templates), rtol=1e-5, atol=1e-6)


def test_template_sets_by_name():
    import open_clip

    from vlpl.config import ConfigError
    from vlpl.vlm.backend import template_sets, template_strings

    oa = [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert {"openai_imagenet", "simple_imagenet"} <= set(template_sets())
    assert template_strings("openai_imagenet") == oa and len(oa) == 80
    assert template_strings(["{}", "simple_imagenet"]) == ["{}"] + [t("{}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES]
    assert template_strings([], allow_empty=True) == []
    with pytest.raises(ConfigError, match="openai_imagenet"):
        template_strings("openai_imagenet_typo")


def test_pseudolabel_records_descriptions(coco256_root, tmp_path):
    """`vlpl pseudolabel` with teacher.descriptions: the text embeddings are the description averages, prompts.json
    lists every description used, the manifest names the file and templates_sha256 covers the descriptions."""
    import json

    import numpy as np
    from conftest import TINY_TEACHER, make_subset_dataset

    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel
    from vlpl.store.store import ScoreStore, templates_hash
    from vlpl.vlm.backend import class_prompts, load_descriptions

    data = make_subset_dataset(coco256_root, tmp_path / "data", n_train=2)
    classes = (data / "classes.txt").read_text().split("\n")
    classes = [c for c in classes if c]
    desc = tmp_path / "desc.yaml"
    desc.write_text(yaml.safe_dump({c: [f"a {c} seen up close", "a picture showing a {}"] for c in classes}))
    out = tmp_path / "store"
    run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], [
        f"data.root={data}", f"out={out}", "num_workers=0", "progress=false", "views.grid=0", "index=false",
        f"teacher.descriptions={desc}", "views.resize_mode=model"]))
    store = ScoreStore(out)
    man = store.manifest
    assert man["views"]["resize_mode"] == "shortest"  # views.resize_mode=model: open_clip's default eval resize
    assert man["descriptions"]["file"] == str(desc) and man["descriptions"]["num_descriptions"] == 2 * len(classes)
    assert man["templates"] == ["a photo of a {}."]
    assert man["templates_sha256"] != templates_hash(man["templates"])
    rec = json.loads((out / "prompts.json").read_text())
    assert rec["descriptions"][classes[0]] == [f"a {classes[0]} seen up close", f"a picture showing a {classes[0]}"]
    import torch

    from vlpl.config import TeacherConfig
    from vlpl.vlm.backend import OpenClipBackend

    teacher = OpenClipBackend(TeacherConfig(name="vlpl-tiny", pretrained=None), torch.device("cpu"))
    want = teacher.encode_prompts(class_prompts(classes, man["templates"], load_descriptions(desc, classes)))
    np.testing.assert_allclose(store.text_embeddings(), want.numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# the dense patch-token view
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sigmoid():
    import torch

    from vlpl.config import TeacherConfig
    from vlpl.vlm.backend import OpenClipBackend

    return OpenClipBackend(TeacherConfig(name="vlpl-tiny-sigmoid", pretrained=None), torch.device("cpu"))


def test_dense_view_layout():
    from vlpl.store.views import LAYOUT, ViewSpec

    spec = ViewSpec(2, True, (64, 64), dense=True, dense_topk=3)
    assert (spec.n_views, spec.n_image_views, spec.num_views, spec.num_image_views) == (6, 5, 12, 10)
    assert spec.names()[:6] == ["global", "tile_0_0", "tile_0_1", "tile_1_0", "tile_1_1", "dense"]
    assert spec.names()[11] == "flip/dense" and spec.index(spec.dense_view, 1) == 11
    assert ViewSpec.from_manifest({"views": spec.to_dict()}) == spec
    plain = ViewSpec(2, True, (64, 64))
    assert "dense" not in plain.to_dict() and plain.to_dict()["layout"] == LAYOUT  # old stores read the same
    with pytest.raises(IndexError):
        spec.tile_of(spec.dense_view)
    with pytest.raises(ValueError, match="dense_topk"):
        ViewSpec(2, True, (64, 64), dense=True, dense_topk=0)


@pytest.mark.parametrize("which", ["tiny", "tiny_sigmoid"])
def test_patch_tokens_shapes_and_pooled_equals_image_embedding(which, request):
    """open_clip ViT (vlpl-tiny) and timm ViT with a MAP head (vlpl-tiny-sigmoid): the pooled output of the token
    pass is the image embedding; tokens are (N, P, D) unit vectors in the joint space."""
    import torch

    b = request.getfixturevalue(which)
    h, w = b.preprocess.image_size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    pooled, tokens = b.encode_image_tokens(x)
    P = (h // 16) * (w // 16)
    assert tokens.shape == (2, P, b.embed_dim) and pooled.shape == (2, b.embed_dim)
    torch.testing.assert_close(pooled, b.encode_image(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(2, P))


def test_map_pool_per_token_is_the_pool_of_that_token_alone(tiny_sigmoid):
    """The attention-pool value path: pooling a single token equals the per-token reading of that token."""
    import torch

    from vlpl.vlm.backend import _latent_pool_per_token

    pool = tiny_sigmoid.model.visual.trunk.attn_pool
    x = torch.randn(5, 1, pool.kv.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(_latent_pool_per_token(pool, x), pool(x).reshape(5, 1, -1), rtol=1e-5, atol=1e-5)


def test_dense_view_scores_topk_mean_by_hand():
    import torch

    from vlpl.vlm.views import dense_view_scores

    tok = torch.nn.functional.normalize(torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(2)), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(3)), dim=-1)
    cos = torch.einsum("npd,cd->npc", tok, text)
    torch.testing.assert_close(dense_view_scores(tok, text, 1), cos.max(dim=1).values)
    torch.testing.assert_close(dense_view_scores(tok, text, 2, max_elements=1),  # one image per chunk
                               cos.sort(dim=1, descending=True).values[:, :2].mean(dim=1))


@pytest.mark.parametrize("which", ["tiny", "tiny_sigmoid"])
def test_class_equal_to_a_patch_token_scores_highest_in_the_dense_view(which, request, coco256_root):
    """A real coco256 image through the Scorer with views.dense: a class whose text embedding IS one projected
    patch token of the image's global crop gets the dense view's top score (cosine 1) for that image."""
    import numpy as np
    import torch
    from PIL import Image

    from vlpl.pseudolabel.stage import DenseFeatures, Scorer, view_scores
    from vlpl.vlm.views import ViewSpec, make_views_batch

    b = request.getfixturevalue(which)
    spec = ViewSpec(2, True, b.preprocess.image_size, dense=True)
    img = sorted((coco256_root / "images").rglob("*.jpg"))[0]
    im = torch.from_numpy(np.asarray(Image.open(img).convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    mean, std = b.normalization()
    glob = make_views_batch([im], ViewSpec(0, False, spec.image_size), mean, std)  # the unflipped global crop
    _, tokens = b.encode_image_tokens(glob)
    C, hit = 12, 7
    text = torch.nn.functional.normalize(torch.randn(C, b.embed_dim, generator=torch.Generator().manual_seed(4)), dim=-1)
    text[hit] = tokens[0, tokens.shape[1] // 3]
    feats = Scorer(b, spec, text).features([im])
    assert isinstance(feats, DenseFeatures) and feats.feats.shape == (1, spec.num_image_views, b.embed_dim)
    scores = view_scores(spec, feats, text)  # (1, V, C)
    assert scores.shape == (1, spec.num_views, C)
    dense = scores[0, spec.index(spec.dense_view, 0)]
    assert int(dense.argmax()) == hit and float(dense[hit]) == pytest.approx(1.0, abs=1e-4)
    # the crops' rows are the plain (no dense view) scorer's
    plain = Scorer(b, ViewSpec(2, True, b.preprocess.image_size), text).features([im])
    torch.testing.assert_close(feats.feats, plain, rtol=1e-4, atol=1e-5)


def test_pseudolabel_with_dense_view(coco256_root, tmp_path):
    """`vlpl pseudolabel views.dense=true`: the store lists the dense view (V = 2 x (1 + 4 + 1)), its rows are
    the max patch cosine of the global crop (hand-computed), every rule runs on it; other forms are refused."""
    import numpy as np
    import torch
    from conftest import TINY_TEACHER, make_subset_dataset

    from vlpl.config import ConfigError, PseudolabelConfig, TeacherConfig, load_config
    from vlpl.data.images import ImageSource
    from vlpl.pseudolabel.rules import RuleRows, apply_rule
    from vlpl.pseudolabel.stage import DecodeDataset, run_pseudolabel
    from vlpl.store.store import ScoreStore
    from vlpl.vlm.backend import OpenClipBackend
    from vlpl.vlm.views import ViewSpec, make_views_batch

    data = make_subset_dataset(coco256_root, tmp_path / "data", n_train=3)
    out = tmp_path / "store"
    args = [f"data.root={data}", f"out={out}", "num_workers=0", "progress=false", "views.grid=2", "index=false",
            "views.dense=true"]
    with pytest.raises(ConfigError, match="views.dense.*score_format=dense"):
        run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], args + ["score_format=topk", "topk=4"]))
    run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], args))
    store = ScoreStore(out)
    spec = store.view_spec
    assert spec.dense and spec.num_views == 12 and spec.names()[5] == "dense"
    train = store.split("train")
    pos = np.arange(len(train))
    scores = train.scores(pos)  # (B, 2, 6, C)
    assert scores.shape == (len(train), 2, 6, store.num_classes)
    b = OpenClipBackend(TeacherConfig(name="vlpl-tiny", pretrained=None), torch.device("cpu"))
    im = DecodeDataset(ImageSource(data), [train.images[0]]).decode(train.images[0])
    glob = make_views_batch([im], ViewSpec(0, True, spec.image_size), *b.normalization())  # global, flipped global
    _, tokens = b.encode_image_tokens(glob)
    want = (tokens @ torch.from_numpy(store.text_embeddings()).T).max(dim=1).values  # (2, C)
    np.testing.assert_allclose(scores[0, :, spec.dense_view], want.numpy(), atol=2e-3)  # float16 store
    for rule in ("damp", "vlpl", "threshold"):
        out_rule = apply_rule(rule, torch.from_numpy(scores), torch.from_numpy(train.observed_at(pos)), dynamic=True,
                              generator=torch.Generator().manual_seed(0), rows=RuleRows(train, pos))
        assert out_rule.shape == (len(train), store.num_classes)


def test_hf_siglip_checkpoint_scores_like_the_model(tmp_path):
    """A tiny transformers SiglipModel (local directory, random weights): the hf backend records score_kind siglip
    with the model's scale and bias, and ScoreKind.logits(cos) equals the model's own logits_per_image."""
    import json

    import torch
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    from vlpl.config import TeacherConfig
    from vlpl.vlm.backend import create_backend

    st = SimpleTokenizer()  # any tokenizer saved in the directory serves; the CLIP BPE ships with open_clip
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (tmp_path / "vocab.json").write_text(json.dumps({rename.get(k, k): v for k, v in st.encoder.items()}))
    merges = sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    tok.save_pretrained(tmp_path)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(st.encoder), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8))
    torch.manual_seed(0)
    model = SiglipModel(cfg).eval()
    with torch.no_grad():
        model.logit_bias.fill_(-3.5)
        model.logit_scale.fill_(2.0)
    model.save_pretrained(tmp_path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)

    b = create_backend(TeacherConfig(backend="hf", name=str(tmp_path)), torch.device("cpu"))
    kind = b.score_kind()
    assert kind.kind == "siglip" and kind.logit_bias == -3.5 and kind.logit_scale == pytest.approx(float(torch.e ** 2))
    assert b.resize_mode == "squash" and b.context_length == 77
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    cos = b.encode_image(x) @ b.encode_text(["cat", "dog"], "a photo of a {}.").T
    ids = tok(["a photo of a cat.", "a photo of a dog."], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt")  # SigLIP's texts are padded to the full context length
    with torch.no_grad():
        ref = SiglipModel.from_pretrained(tmp_path).eval()(input_ids=ids["input_ids"], pixel_values=x).logits_per_image
    torch.testing.assert_close(kind.logits(cos), ref, rtol=1e-4, atol=1e-4)
    # descriptions through the hf backend: the same ensembling as its per-class path
    two = ["a photo of a {}.", "a {} in the wild"]
    torch.testing.assert_close(b.encode_prompts([[t.format("cat") for t in two], [t.format("dog") for t in two]]),
                               b.encode_text(["cat", "dog"], two), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["PE-Core-T-16-384", "EVA02-B-16"])
def test_patch_tokens_of_real_family_architectures(name):
    """The dense view's token projection on the real architectures of two shipped families, randomly initialised
    (no download): PE-Core (timm Eva trunk, MAP attention-pool head) and EVA02 (timm Eva, class-token pooling).
    The pooled output of the token pass is exactly the image embedding; one token per patch. ~1 min on a CPU."""
    import torch

    from vlpl.config import TeacherConfig
    from vlpl.vlm.backend import OpenClipBackend

    b = OpenClipBackend(TeacherConfig(name=name, pretrained=None), torch.device("cpu"))
    h, w = b.preprocess.image_size
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(6))
    pooled, tokens = b.encode_image_tokens(x)
    patch = b.model.visual.trunk.patch_embed.patch_size[0]
    assert tokens.shape == (1, (h // patch) * (w // patch), b.embed_dim)
    torch.testing.assert_close(pooled, b.encode_image(x), rtol=1e-4, atol=1e-5)


def test_long_description_warns_about_truncation(tiny_sigmoid, caplog):
    """A description longer than the text tower's context length (32 tokens for vlpl-tiny-sigmoid) is named."""
    import logging

    long = "a dog " + " ".join(["with a very long and detailed description"] * 8)
    with caplog.at_level(logging.WARNING, logger="vlpl.vlm.backend"):
        tiny_sigmoid.encode_prompts([["a photo of a dog."], [long]])
    assert "context length (32 tokens)" in caplog.text and "a dog with a very long" in caplog.text


def test_hf_naflex_siglip2_is_refused_with_the_way_out(tmp_path):
    from transformers import Siglip2Config

    from vlpl.config import ConfigError, TeacherConfig
    from vlpl.vlm.backend import create_backend

    Siglip2Config().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="Siglip2Model.*open_clip backend"):
        create_backend(TeacherConfig(backend="hf", name=str(tmp_path)))


def test_inspect_names_the_score_kind_and_partial_labels(sigmoid_store, coco256_real_partial_store, coco256_store):
    """`vlpl inspect` says what the scores are (a sigmoid teacher's scale and bias) and what the labels are
    (partial annotations are not full labels); a plain store still reads "raw cosine" and "full labels"."""
    from vlpl.store.inspect import format_summary, summarize
    from vlpl.store.store import ScoreStore

    sig = format_summary(summarize(sigmoid_store))
    kind = ScoreStore(sigmoid_store).score_kind
    assert f"sigmoid teacher (p = sigmoid({kind.logit_scale:.4g} cos {kind.logit_bias:+.4g}))" in sig
    part = format_summary(summarize(coco256_real_partial_store))
    assert "labels     partial annotations (+1 / -1 / unknown)" in part
    plain = format_summary(summarize(coco256_store))
    assert "scores     raw cosine, global view" in plain and "labels     full labels for" in plain
