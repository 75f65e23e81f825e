"""VLM backends and DAMP views: real open_clip / transformers code paths on tiny random models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlpl.config import ConfigError, TeacherConfig
from vlpl.vlm.backend import OpenClipBackend, create_backend, template_strings
from vlpl.vlm.views import ViewSpec, make_views, tile_boxes

TINY = TeacherConfig(name="vlpl-tiny", pretrained=None)


@pytest.fixture(scope="module")
def tiny():
    return create_backend(TINY, torch.device("cpu"))


def _photo(w=203, h=157, seed=0):
    """A smooth random image (interpolation differences stay small on smooth content)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def test_templates_resolve_open_clip_sets():
    assert template_strings("a photo of a {}.") == ["a photo of a {}."]
    oa = template_strings("openai_imagenet")
    assert len(oa) == 80 and all(t.count("{}") == 1 for t in oa)
    with pytest.raises(ConfigError, match="exactly one"):
        template_strings(["no placeholder"])


def test_text_embeddings_are_prompt_ensembles(tiny):
    single = [tiny.encode_text(["dog"], [t]) for t in ("a photo of a {}.", "a drawing of a {}.")]
    both = tiny.encode_text(["dog"], ["a photo of a {}.", "a drawing of a {}."])
    mean = torch.nn.functional.normalize(single[0] + single[1], dim=-1)
    assert torch.allclose(both, mean, atol=1e-5)
    assert torch.allclose(both.norm(dim=-1), torch.ones(1))


def test_tiny_model_is_reproducible():
    a = create_backend(TINY, torch.device("cpu")).encode_text(["cat", "dog"], "a photo of a {}.")
    b = create_backend(TINY, torch.device("cpu")).encode_text(["cat", "dog"], "a photo of a {}.")
    assert torch.equal(a, b)


@pytest.mark.parametrize("resize_mode", ["squash", "shortest"])
def test_each_tile_equals_model_preprocessing_of_its_crop(tiny, resize_mode):
    import open_clip

    img = _photo()
    g = 3
    spec = ViewSpec(grid=g, flips=True, image_size=tiny.preprocess.image_size, resize_mode=resize_mode)
    mean, std = tiny.normalization()
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    views = make_views(x, spec, mean, std)
    assert views.shape == (2 * (1 + g * g), 3, 64, 64)
    ref_tf = open_clip.image_transform(tiny.preprocess.image_size, is_train=False, mean=mean, std=std,
                                       resize_mode=resize_mode, interpolation="bicubic")
    W, H = img.size
    crops = [img] + [img.crop((le, t, r, b)) for t, le, b, r in tile_boxes(H, W, g)]
    for v, crop in enumerate(crops):
        ref = ref_tf(crop)
        diff = (views[v] - ref).abs()
        # bicubic in torch vs PIL: a few grey levels at most (1/255/std ~ 0.015 per level)
        assert diff.mean() < 0.02, (v, float(diff.mean()))
        assert diff.max() < 0.35, (v, float(diff.max()))
        # flipped variant is the mirror of the same view
        assert torch.equal(views[len(crops) + v], views[v].flip(-1))


def test_tile_boxes_follow_the_released_grid():
    # W=10, H=7, g=3: tile size floor(10/3)=3 x floor(7/3)=2, remainder dropped
    boxes = tile_boxes(7, 10, 3)
    assert boxes[0] == (0, 0, 2, 3) and boxes[1] == (0, 3, 2, 6) and boxes[3] == (2, 0, 4, 3)
    assert boxes[-1] == (4, 6, 6, 9)


def test_view_names_and_layout():
    spec = ViewSpec(grid=4, flips=True, image_size=(224, 224))
    names = spec.names()
    assert spec.num_views == 34 and len(names) == 34
    assert names[0] == "global" and names[1 + 2 * 4 + 3] == "tile_2_3" and names[17] == "flip/global"


def test_local_checkpoint_file_loads(tiny, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    # perturb so that a silent fall-back to random init would be caught
    first = next(k for k in sd if k.endswith("proj") or "proj" in k)
    sd[first] = sd[first] + 0.5
    torch.save(sd, ckpt)
    loaded = OpenClipBackend(TeacherConfig(name="vlpl-tiny", pretrained=str(ckpt)), torch.device("cpu"))
    assert loaded.identity()["checkpoint_sha256"] and loaded.identity()["pretrained"] is None
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(ConfigError, match="does not exist"):
        OpenClipBackend(TeacherConfig(name="vlpl-tiny", pretrained=str(tmp_path / "missing.pt")), torch.device("cpu"))


def _save_tiny_hf_clip(path):
    """A random tiny transformers CLIPModel with the real CLIP tokenizer (built from open_clip's BPE)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    st = SimpleTokenizer()
    # same ids; transformers spells the two special tokens the way OpenAI's release does
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (path / "vocab.json").write_text(json.dumps({rename.get(k, k): v for k, v in st.encoder.items()}))
    merges = sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tok.save_pretrained(path)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(st.encoder), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)


def test_hf_clip_backend_round_trip(tmp_path):
    from transformers import CLIPModel

    _save_tiny_hf_clip(tmp_path)
    b = create_backend(TeacherConfig(backend="hf", name=str(tmp_path)), torch.device("cpu"))
    assert b.preprocess.image_size == (32, 32) and b.embed_dim == 16
    t = b.encode_text(["cat", "dog"], "a photo of a {}.")
    assert t.shape == (2, 16) and torch.allclose(t.norm(dim=-1), torch.ones(2))
    x = torch.randn(2, 3, 32, 32)
    ref = CLIPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        out = ref.get_image_features(pixel_values=x)
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert torch.allclose(b.encode_image(x), torch.nn.functional.normalize(out, dim=-1), atol=1e-5)
    assert b.identity()["checkpoint_sha256"]


def test_bad_backend_names_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.backend"):
        create_backend(TeacherConfig(backend="nope"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="cannot create open_clip model"):
        create_backend(TeacherConfig(name="no-such-model", pretrained=None), torch.device("cpu"))
