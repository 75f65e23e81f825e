"""VLM backends and DAMP views: real open_clip / transformers code paths on tiny random models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlpl.config import ConfigError, TeacherConfig
from vlpl.vlm.backend import OpenClipBackend, create_backend, template_strings
from vlpl.vlm.views import ViewSpec, grid_tiles, make_views, make_views_batch, tile_boxes

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


def _coco_images(root, n):
    files = sorted((root / "images").rglob("*.jpg"))[:n]
    return [torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1).contiguous()
            for f in files]


@pytest.mark.parametrize("resize_mode", ["squash", "shortest"])
@pytest.mark.parametrize("grid", [0, 3, 4])
def test_batched_views_equal_per_image_views(coco256_root, resize_mode, grid):
    """make_views_batch (grouped by size, tiles by one reshape, one flip, one normalisation) gives exactly
    the per-image views: coco256 images of several sizes (some sizes repeat), odd and tiny sizes, and the
    same image twice; whole-group and cache-sized chunks alike."""
    g = torch.Generator().manual_seed(0)
    odd = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
           for h, w in ((7, 5), (101, 33), (33, 101), (101, 33), (4, 4), (64, 64), (65, 63))]
    images = _coco_images(coco256_root, 10) + odd
    images.insert(3, images[0])
    images = [im for im in images if min(im.shape[1:]) >= grid]
    assert len({tuple(im.shape) for im in images}) < len(images)  # some sizes repeat: real groups
    spec = ViewSpec(grid=grid, flips=True, image_size=(64, 48), resize_mode=resize_mode)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ref = torch.cat([make_views(im, spec, mean, std) for im in images])
    for chunk in (-1, None, 1):
        out = make_views_batch(images, spec, mean, std, chunk_pixels=chunk)
        assert out.shape == ref.shape and torch.equal(out, ref), chunk
    assert torch.equal(make_views_batch(images, spec, mean, std, dtype=torch.bfloat16), ref.to(torch.bfloat16))


def test_grid_tiles_are_the_tile_boxes():
    x = torch.arange(2 * 3 * 11 * 14, dtype=torch.float32).view(2, 3, 11, 14)
    tiles = grid_tiles(x, 3)
    assert tiles.shape == (18, 3, 3, 4)
    for k in range(2):
        for n, (t, le, b, r) in enumerate(tile_boxes(11, 14, 3)):
            assert torch.equal(tiles[k * 9 + n], x[k, :, t:b, le:r])


def test_batched_views_refuse_bad_images():
    spec = ViewSpec(grid=4, flips=False, image_size=(16, 16))
    with pytest.raises(ValueError, match="image 1 of 3x9 pixels is too small for a 4x4 grid"):
        make_views_batch([torch.zeros(3, 9, 9, dtype=torch.uint8), torch.zeros(3, 9, 3, dtype=torch.uint8)],
                         spec, (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match=r"image 0: expected a \(3, H, W\)"):
        make_views_batch([torch.zeros(9, 9, dtype=torch.uint8)], spec, (0, 0, 0), (1, 1, 1))


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
