"""The one way to open an image (vlpl.data.images): decode rules, root confinement, hf:// rows, errors."""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image

from vlpl.config import ImageConfig
from vlpl.data.images import (
    ALPHA_BACKGROUND,
    ImageDataset,
    ImageLoadError,
    ImageSource,
    decode_image,
    open_image,
    to_rgb,
)

CFG = ImageConfig()


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bytes(width: int, height: int, color_type: int, bit_depth: int, raw: bytes) -> bytes:
    """A PNG written chunk by chunk (PIL cannot write 16-bit RGB, nor lie about the size)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def pixels(data: bytes, cfg: ImageConfig = CFG) -> np.ndarray:
    im = decode_image(data, "test-image", cfg)
    assert im.mode == "RGB"
    return np.asarray(im)


def rand(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------------------


def test_16bit_grey_png_keeps_the_high_byte() -> None:
    """Before the fix 16-bit PNGs decoded white (PIL's I;16 -> RGB clips at 255)."""
    a = np.array([[0, 255, 256, 65535], [1000, 40000, 512, 300]], dtype=np.uint16)
    data = encode(Image.fromarray(a), "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    out = pixels(data)
    np.testing.assert_array_equal(out[..., 0], a >> 8)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert out[1, 1, 0] == 156  # 40000 >> 8, not 255


def test_16bit_big_endian_tiff_and_mode_i() -> None:
    a = np.array([[0, 300, 40000], [65535, 512, 7]], dtype=np.uint16)
    big = Image.frombytes("I;16B", (3, 2), a.astype(">u2").tobytes())
    data = encode(big, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    np.testing.assert_array_equal(pixels(data)[..., 1], a >> 8)
    # mode I (32-bit): clipped to the 16-bit range, then the high byte
    i32 = Image.fromarray(np.array([[-5, 256, 70000, 65535]], dtype=np.int32), "I")
    np.testing.assert_array_equal(np.asarray(to_rgb(i32))[0, :, 0], [0, 1, 255, 255])


def test_16bit_rgb_png() -> None:
    rgb = np.random.RandomState(0).randint(0, 65536, (3, 4, 3)).astype(">u2")
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(3))
    np.testing.assert_array_equal(pixels(png_bytes(4, 3, 2, 16, raw)), rgb >> 8)


def test_transparency_is_composited_over_white() -> None:
    # palette with a transparent index
    idx = np.zeros((4, 4), np.uint8)
    idx[1, 2] = 1
    pal = Image.fromarray(idx, "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    out = pixels(encode(pal, "PNG", transparency=0))
    assert tuple(out[1, 2]) == (0, 0, 255)
    assert tuple(out[0, 0]) == ALPHA_BACKGROUND == (255, 255, 255)
    # RGBA: out = a * src + (1 - a) * 255
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[..., 3] = [[0, 255], [128, 64]]
    out = pixels(encode(Image.fromarray(rgba, "RGBA"), "PNG")).astype(int)
    a = rgba[..., 3:].astype(float) / 255
    want = a * rgba[..., :3] + (1 - a) * 255
    assert np.abs(out - want).max() <= 1
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (10, 200, 30)
    # LA
    la = np.stack([np.full((1, 2), 100, np.uint8), np.array([[0, 255]], np.uint8)], -1)
    np.testing.assert_array_equal(pixels(encode(Image.fromarray(la, "LA"), "PNG"))[0, :, 0], [255, 100])


def test_cmyk_and_1bit() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    data = encode(cmyk, "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert np.abs(pixels(data)[4, 4].astype(int) - (255, 0, 0)).max() <= 3
    one = Image.fromarray(np.array([[0, 1], [1, 0]], bool))
    np.testing.assert_array_equal(pixels(encode(one, "PNG"))[..., 0], [[0, 255], [255, 0]])


@pytest.mark.parametrize("orientation,transpose", [(3, Image.Transpose.ROTATE_180),
                                                   (6, Image.Transpose.ROTATE_270),
                                                   (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied(orientation: int, transpose) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(rand(16, 32)), "JPEG", exif=exif, quality=95)
    stored = decode_image(data, "e.jpg", ImageConfig(exif_transpose=False))
    shown = decode_image(data, "e.jpg", CFG)
    assert stored.size == (32, 16)
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(stored.transpose(transpose)))
    if orientation != 3:
        assert shown.size == (16, 32)


# --------------------------------------------------------------------------------------------------
# budget, bombs, broken files
# --------------------------------------------------------------------------------------------------


def _reason(data: bytes, cfg: ImageConfig = CFG) -> str:
    with pytest.raises(ImageLoadError) as e:
        decode_image(data, "images/bad.png", cfg)
    assert "images/bad.png" in str(e.value)
    return e.value.reason


def test_pixel_budget_is_checked_from_the_header_before_decoding() -> None:
    ok = encode(Image.fromarray(rand(64, 64)), "PNG")
    assert pixels(ok, ImageConfig(max_pixels=4096)).shape == (64, 64, 3)
    assert _reason(ok, ImageConfig(max_pixels=4095)) == "too many pixels"
    # a truncated 2000x2000 file over the budget is refused for its size: nothing was decoded
    big = encode(Image.fromarray(np.zeros((2000, 2000), np.uint8)), "PNG")
    assert _reason(big[:200], ImageConfig(max_pixels=1_000_000)) == "too many pixels"
    assert _reason(big[:200], ImageConfig(max_pixels=10_000_000)) == "truncated file"


def test_decompression_bombs_are_refused() -> None:
    # small files that declare huge sizes: over our budget (100 M pixels) and over PIL's own guard (400 M)
    for side in (10_000, 20_000):
        bomb = png_bytes(side, side, 0, 8, b"\x00" * (side + 1))
        assert len(bomb) < 1000
        assert _reason(bomb) == "too many pixels"


def test_truncated_empty_and_non_images() -> None:
    jpg = encode(Image.fromarray(rand(64, 64)), "JPEG")
    png = encode(Image.fromarray(rand(16, 32)), "PNG")
    assert _reason(jpg[: len(jpg) // 2]) == "truncated file"
    assert _reason(jpg[:-2]) == "truncated file"
    assert _reason(png[: len(png) // 2]) == "truncated file"
    assert _reason(png[:-12]) == "truncated file"  # every pixel there, the end chunk lost: still refused
    assert _reason(b"") == "empty file"
    assert _reason(b"GIF89a but not really" * 3) in ("not an image", "truncated file", "corrupt image")
    assert _reason(b"just some text, not an image\n" * 20) == "not an image"


# --------------------------------------------------------------------------------------------------
# files: root confinement
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    Image.fromarray(rand(8, 8)).save(root / "images" / "a.png")
    outside = tmp_path / "secret.png"
    Image.fromarray(rand(8, 8, 1)).save(outside)
    os.symlink(outside, root / "images" / "out.png")
    os.symlink(root / "images" / "a.png", root / "images" / "in.png")
    return root


def _fails(source: ImageSource, ref: str, reason: str) -> str:
    with pytest.raises(ImageLoadError) as e:
        source.open(ref)
    assert e.value.reason == reason and e.value.ref == ref, str(e.value)
    return str(e.value)


def test_paths_are_confined_to_the_root(tree: Path) -> None:
    src = ImageSource(tree)
    assert src.open("images/a.png").size == (8, 8)
    assert open_image("images/in.png", src).size == (8, 8)  # a symlink that stays inside
    assert src.open("images/../images/a.png").size == (8, 8)  # '..' that stays inside
    outside = tree.parent / "secret.png"
    msg = _fails(src, str(outside), "outside the data root")
    assert str(outside) in msg and "absolute" in msg and "allow_outside_root" in msg
    msg = _fails(src, "../secret.png", "outside the data root")
    assert "'..'" in msg and str(outside) in msg
    msg = _fails(src, "images/out.png", "outside the data root")
    assert "symlink" in msg and str(tree / "images" / "out.png") in msg
    loose = ImageSource(tree, ImageConfig(allow_outside_root=True))
    for ref in (str(outside), "../secret.png", "images/out.png"):
        np.testing.assert_array_equal(np.asarray(loose.open(ref)), rand(8, 8, 1))
    # a symlinked root is resolved too
    os.symlink(tree, tree.parent / "link")
    assert ImageSource(tree.parent / "link").open("images/a.png").size == (8, 8)


def test_missing_special_and_unknown_refs(tree: Path) -> None:
    src = ImageSource(tree)
    assert str(tree / "images/nope.jpg") in _fails(src, "images/nope.jpg", "file not found")
    _fails(src, "images", "not a regular file")
    os.mkfifo(tree / "images" / "fifo.jpg")  # would block a reader forever
    _fails(src, "images/fifo.jpg", "not a regular file")
    (tree / "images" / "zero.jpg").write_bytes(b"")
    _fails(src, "images/zero.jpg", "empty file")
    _fails(src, "", "empty reference")
    assert "zzz" in _fails(src, "zzz://shard-000.tar/x.jpg", "unknown scheme")
    _fails(src, "wds://shard-000.tar/x.jpg", "bad reference")  # wds:// is known now (vlpl/data/webdataset.py)


def test_error_survives_pickling_with_its_reason() -> None:
    e = pickle.loads(pickle.dumps(ImageLoadError("cannot open image x.jpg: file not found", "x.jpg", "file not found")))
    assert (str(e), e.ref, e.reason) == ("cannot open image x.jpg: file not found", "x.jpg", "file not found")


def test_image_dataset_items_and_errors(tree: Path) -> None:
    ds = ImageDataset(ImageSource(tree), ["images/a.png", "images/in.png", "images/gone.png"],
                      transform=lambda im: np.asarray(im).sum())
    assert len(ds) == 3
    assert ds[1] == (int(rand(8, 8).sum()), 1)
    with pytest.raises(ImageLoadError, match="gone.png"):
        ds[2]


# --------------------------------------------------------------------------------------------------
# hf:// rows and the store round trip
# --------------------------------------------------------------------------------------------------


def _hf_dict(path: Path, images: List[bytes]):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "labels": datasets.Sequence(datasets.Value("int64"))})
    rows = {"image": [{"bytes": b, "path": None} for b in images], "labels": [[0]] * len(images)}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=feats)})
    dd.save_to_disk(str(path))
    return datasets.load_from_disk(str(path))


def test_hf_rows_follow_the_same_decode_rules(tmp_path: Path) -> None:
    a16 = np.array([[0, 40000], [65535, 256]], dtype=np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6
    imgs = [encode(Image.fromarray(a16), "PNG"), encode(Image.fromarray(rand(16, 32)), "JPEG", exif=exif),
            encode(Image.fromarray(rand(100, 100)), "PNG")]
    dd = _hf_dict(tmp_path / "hf", imgs)
    src = ImageSource(tmp_path, ImageConfig(max_pixels=5000), hf=dd, hf_path=str(tmp_path / "hf"))
    np.testing.assert_array_equal(np.asarray(src.open("hf://train/0"))[..., 0], a16 >> 8)
    assert src.open("hf://train/1").size == (16, 32)
    assert "hf://train/2" in _fails(src, "hf://train/2", "too many pixels")
    assert "hf://train/9" in _fails(src, "hf://train/9", "missing row")
    assert "hf://test/0" in _fails(src, "hf://test/0", "missing row")
    assert "hf://" in _fails(ImageSource(tmp_path), "hf://train/0", "no dataset")
    # the store records where the dataset is; from_store reopens it, and workers can pickle the source
    info = src.describe()
    assert info == {"root": str(tmp_path.resolve()), "hf": {"path": str(tmp_path / "hf"), "image_column": "image"}}
    again = pickle.loads(pickle.dumps(ImageSource.from_store(info, None, ImageConfig())))
    np.testing.assert_array_equal(np.asarray(again.open("hf://train/2")), rand(100, 100))


def test_from_store_for_files(tree: Path, tmp_path: Path) -> None:
    info = ImageSource(tree).describe()
    assert info == {"root": str(tree.resolve())}
    assert ImageSource.from_store(info, None).open("images/a.png").size == (8, 8)
    moved = tmp_path / "moved"
    tree.rename(moved)
    with pytest.raises(FileNotFoundError, match="data_root"):
        ImageSource.from_store(info, None)
    src = ImageSource.from_store(info, str(moved), ImageConfig(max_pixels=10))
    assert src.root == moved and src.cfg.max_pixels == 10


# --------------------------------------------------------------------------------------------------
# a store made from a Hugging Face dataset trains (issue 8 item 4: the training reader ignored hf://)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_store_from_a_hf_dataset_trains_end_to_end(coco256_root: Path, tmp_path: Path) -> None:
    import csv

    datasets = pytest.importorskip("datasets")
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel
    from vlpl.store.store import ScoreStore
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    repo = Path(__file__).resolve().parent.parent
    classes = (coco256_root / "classes.txt").read_text().split("\n")
    classes = [c for c in classes if c.strip()]
    rows = list(csv.DictReader(open(coco256_root / "labels.csv")))
    feats = datasets.Features({"image": datasets.Image(),
                               "labels": datasets.Sequence(datasets.ClassLabel(names=classes))})

    def split(name: str, n: int):
        part = [r for r in rows if r["split"] == name][:n]
        return datasets.Dataset.from_dict(
            {"image": [{"bytes": (coco256_root / r["image"]).read_bytes(), "path": None} for r in part],
             "labels": [[classes.index(c) for c in r["labels"].split("|") if c] for r in part]}, features=feats)

    datasets.DatasetDict({"train": split("train", 12), "validation": split("test", 4)}).save_to_disk(
        str(tmp_path / "data" / "hfds"))
    store = tmp_path / "store"
    run_pseudolabel(load_config(PseudolabelConfig, [repo / "configs" / "models" / "tiny.yaml"], [
        f"data.root={tmp_path / 'data'}", "data.format=hf", "data.hf_path=hfds", "data.hf_splits.train=train",
        "data.hf_splits.test=validation",
        f"out={store}", "views.grid=2", "num_workers=0", "progress=false", "index=false"]))
    info = ScoreStore(store).dataset_info
    assert info["hf"] == {"path": str((tmp_path / "data" / "hfds").resolve()), "image_column": "image",
                          "splits": {"train": "train", "test": "validation"}}
    assert ScoreStore(store).manifest["num_failed"] == 0

    out = tmp_path / "run"
    run_train(load_train_config([repo / "configs" / "models" / "tiny_classifier.yaml"], [
        f"store={store}", f"out={out}", "progress=false", "epochs=1", "max_steps_per_epoch=2", "batch_size=4",
        "eval_batch_size=4", "num_workers=0", "log_every=1"]))
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["test_map_at_best"] <= 100
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "step" for r in steps) == 2
