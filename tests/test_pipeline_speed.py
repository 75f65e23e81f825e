"""The pseudolabel pipeline off the main loop: the background shard writer (bounded queue, errors raised in
the loop naming the shard, kill inside a write then resume) and the device JPEG decode option."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_subset_dataset

from vlpl.config import ConfigError, PseudolabelConfig, load_config
from vlpl.pseudolabel.stage import run_pseudolabel
from vlpl.store.async_writer import THREAD_NAME, BackgroundWriter, ScoredBatch, ShardAssembler
from vlpl.store.store import ScoreStore, StoreError, StoreWriter

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "models" / "tiny.yaml")


def _cfg(data: Path, out: Path, *extra: str) -> PseudolabelConfig:
    return load_config(PseudolabelConfig, [TINY], [f"data.root={data}", f"out={out}", "shard_size=8",
                                                    "batch_size=4", "num_workers=0", "progress=false",
                                                    "views.grid=2", "index=false", *extra])


def _store_files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("config.yaml", ".lock")}


@pytest.fixture(scope="module")
def mini(coco256_root, tmp_path_factory):
    """22 coco256 train images plus a corrupt and a truncated JPEG: 24 rows, 3 shards of 8."""
    first = next(r for r in csv.DictReader(open(coco256_root / "labels.csv")) if r["split"] == "train")
    data = (coco256_root / first["image"]).read_bytes()
    return make_subset_dataset(coco256_root, tmp_path_factory.mktemp("mini"), n_train=22, bad=[
        (3, "corrupt.jpg", b"this is not a jpeg" * 10, "train", "person"),
        (12, "truncated.jpg", data[: len(data) // 3], "train", "person|dog")])


@pytest.fixture(scope="module")
def inline_store(mini, tmp_path_factory):
    out = tmp_path_factory.mktemp("inline") / "s"
    stats: dict = {}
    run_pseudolabel(_cfg(mini, out, "writer=inline"), stats=stats)
    assert stats["writer"] == "inline" and stats["images"] == 24
    return out


def _no_writer_thread() -> bool:
    return not any(t.name == THREAD_NAME for t in threading.enumerate())


def test_background_writer_store_is_byte_identical_to_inline(mini, inline_store, tmp_path, monkeypatch):
    import vlpl.pseudolabel.stage as stage

    encoded_on = []  # the stored form and its device-to-host copy are made on the writer thread, not the loop
    real = stage.encode_views
    monkeypatch.setattr(stage, "encode_views", lambda *a: (encoded_on.append(threading.current_thread().name),
                                                            real(*a))[1])
    stats: dict = {}
    # writer_queue=1: the loop is throttled by the writer (back-pressure) and still writes the same bytes
    run_pseudolabel(_cfg(mini, tmp_path / "bg", "writer=background", "writer_queue=1"), stats=stats)
    assert stats["writer"] == "background" and stats["max_pending"] == 1 and stats["max_queued"] <= 1
    assert 0.0 <= stats["stall_share"] <= 1.0
    a, b = _store_files(inline_store), _store_files(tmp_path / "bg")
    assert a.keys() == b.keys() and len([k for k in a if k.endswith(".parquet")]) == 3
    assert a == b
    assert ScoreStore(tmp_path / "bg").manifest["num_failed"] == 2
    assert len(encoded_on) == 6 and set(encoded_on) == {THREAD_NAME}  # 6 batches with decoded images
    assert _no_writer_thread()


def test_writer_error_is_raised_in_the_loop_naming_the_shard(mini, inline_store, tmp_path, monkeypatch):
    real = StoreWriter.write_shard
    threads = []

    def failing(self, i, rows):
        threads.append(threading.current_thread().name)
        if i == 1:
            raise OSError(28, "No space left on device (injected)")
        return real(self, i, rows)

    monkeypatch.setattr(StoreWriter, "write_shard", failing)
    out = tmp_path / "s"
    with pytest.raises(StoreError, match=r"shard 1 \(part-00001\).*OSError.*No space left"):
        run_pseudolabel(_cfg(mini, out))
    assert threads and set(threads) == {THREAD_NAME}  # the writes ran on the writer thread
    assert _no_writer_thread()  # joined before the store lock was given back
    assert (out / "shards" / "part-00000.json").exists() and not (out / "shards" / "part-00001.json").exists()
    monkeypatch.setattr(StoreWriter, "write_shard", real)
    run_pseudolabel(_cfg(mini, out))  # lock released; the same command completes the store
    assert _store_files(out) == _store_files(inline_store)


class _SlowAssembler(ShardAssembler):
    """An assembler whose every batch takes ``delay`` seconds; records what it saw."""

    def __init__(self, delay: float, fail_on: int = -1) -> None:
        super().__init__({0: range(100)}, {"x": ((1,), np.float32)}, encode=lambda p: {"x": p},
                         write=lambda s, b: None)
        self.delay, self.fail_on, self.seen = delay, fail_on, []

    def add(self, batch: ScoredBatch) -> None:
        time.sleep(self.delay)
        if batch.rows[0] == self.fail_on:
            self.current = 0
            raise ValueError("bad batch (injected)")
        self.seen.append(batch.rows[0])


def test_background_writer_back_pressure_and_order():
    asm = _SlowAssembler(0.02)
    w = BackgroundWriter(asm, max_pending=2)
    t0 = time.perf_counter()
    with w:
        for k in range(10):
            w.submit(ScoredBatch(rows=[k], good=[]))
            assert w._queue.qsize() <= 2
    # 10 batches of 20 ms through a queue of 2: the loop was held back, and waited for the rest at close
    assert time.perf_counter() - t0 >= 0.19 and w.wait_s >= 0.1 and 0.0 < w.drain_s < w.wait_s
    assert asm.seen == list(range(10)) and w.max_seen <= 2
    assert _no_writer_thread()


def test_encode_error_on_the_writer_names_the_shard():
    """A failure while encoding a batch (e.g. out of device memory on the writer's side) names its shard."""
    def encode(payload):
        raise RuntimeError("CUDA out of memory (injected)")

    asm = ShardAssembler({0: range(0, 4), 1: range(4, 8)}, {"x": ((2,), np.float16)}, encode=encode,
                         write=lambda s, b: None)
    w = BackgroundWriter(asm, max_pending=2)
    w.submit(ScoredBatch(rows=[0, 1, 2, 3], good=[], errors={k: "bad" for k in range(4)}))  # no encode needed
    w.submit(ScoredBatch(rows=[4, 5], good=[4, 5], payload=object()))
    with pytest.raises(StoreError, match=r"shard 1 \(part-00001\): RuntimeError: CUDA out of memory"):
        w.close()
    assert asm.written == [0] and _no_writer_thread()


def test_background_writer_error_reaches_the_next_submit():
    w = BackgroundWriter(_SlowAssembler(0.0, fail_on=2), max_pending=1)
    with pytest.raises(StoreError, match=r"shard 0 \(part-00000\): ValueError: bad batch"):
        with w:
            for k in range(50):
                w.submit(ScoredBatch(rows=[k], good=[]))
                time.sleep(0.005)
    assert _no_writer_thread()


def test_pipeline_settings_are_checked(mini, tmp_path):
    for key, value in (("writer", "async"), ("decode", "gpu"), ("writer_queue", "-1")):
        with pytest.raises(ConfigError, match=key):
            run_pseudolabel(_cfg(mini, tmp_path / key, f"{key}={value}"))


KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys, threading
    import vlpl.store.store as st

    real = st.write_parquet
    def write_parquet(table, path):
        real(table, path)  # the shard's temporary file is complete but not renamed, no completion mark
        if threading.current_thread().name == "vlpl-store-writer" and "part-00001" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
    st.write_parquet = write_parquet
    from vlpl.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_kill_inside_the_background_writer_resumes_byte_identical(mini, inline_store, tmp_path):
    out = tmp_path / "killed"
    args = ["pseudolabel", "--config", TINY, f"data.root={mini}", f"out={out}", "shard_size=8", "batch_size=4",
            "num_workers=0", "progress=false", "views.grid=2", "index=false", "writer=background"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", KILL_DRIVER, *args], env=env, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    shards = out / "shards"
    assert (shards / "part-00000.json").exists() and not (shards / "part-00001.json").exists()
    assert not (shards / "part-00001.parquet").exists()
    assert list(shards.glob(".part-00001.parquet.*")), "the kill should leave shard 1's temporary file"
    mtime = (shards / "part-00000.parquet").stat().st_mtime_ns
    stats: dict = {}
    run_pseudolabel(_cfg(mini, out), stats=stats)
    assert stats["images"] == 16  # shard 0 was kept, shards 1 and 2 redone
    assert (shards / "part-00000.parquet").stat().st_mtime_ns == mtime
    assert _store_files(out) == _store_files(inline_store)


# --------------------------------------------------------------------------------------------------
# decode: device (torchvision.io.decode_jpeg; on the CPU device here, nvJPEG on CUDA)
# --------------------------------------------------------------------------------------------------


def _jpeg(img, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _oriented(img, orientation: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(img, exif=exif.tobytes())


@pytest.fixture(scope="module")
def odd_images(coco256_root, tmp_path_factory):
    """A folder dataset of 6 coco256 images plus every kind of file the device path must route: EXIF
    orientations 3/6/8, a grey JPEG, a CMYK JPEG, a PNG, a truncated JPEG, a corrupt file."""
    from PIL import Image

    dst = make_subset_dataset(coco256_root, tmp_path_factory.mktemp("odd"), n_train=6)
    first = sorted((dst / "images").glob("*.jpg"))[0]
    photo = Image.open(first).convert("RGB")
    data = first.read_bytes()
    extra = {"rot3.jpg": _oriented(photo, 3), "rot6.jpg": _oriented(photo, 6), "rot8.jpg": _oriented(photo, 8),
             "grey.jpg": _jpeg(photo.convert("L")), "cmyk.jpg": _jpeg(photo.convert("CMYK")),
             "png.png": (lambda b: (photo.save(b, format="PNG"), b.getvalue())[1])(__import__("io").BytesIO()),
             "truncated.jpg": data[: len(data) // 2], "corrupt.jpg": b"\xff\xd8 not really a jpeg \xff\xd9"}
    with open(dst / "labels.csv", "a", newline="") as f:
        w = csv.writer(f)
        for name, blob in extra.items():
            (dst / "images" / name).write_bytes(blob)
            w.writerow([f"images/{name}", "train", "person"])
    return dst


def test_probe_routes_only_plain_jpegs_to_the_device(odd_images, tmp_path):
    from vlpl.config import ImageConfig
    from vlpl.data.images import ImageSource
    from vlpl.pseudolabel.device_decode import probe_jpeg

    src = ImageSource(odd_images)
    routed = {p.name: probe_jpeg(src, f"images/{p.name}", grid=2) for p in (odd_images / "images").iterdir()}
    assert {k for k, v in routed.items() if v is None} == {"cmyk.jpg", "png.png", "truncated.jpg", "corrupt.jpg"}
    assert routed["rot6.jpg"].orientation == 6 and routed["grey.jpg"].orientation == 1
    # the pixel budget, the grid and max_side are checked from the header; outside the root is refused
    assert probe_jpeg(ImageSource(odd_images, ImageConfig(max_pixels=1000)), "images/rot3.jpg") is None
    assert probe_jpeg(src, "images/rot3.jpg", max_side=100) is None
    (tmp_path / "outside.jpg").write_bytes((odd_images / "images" / "rot3.jpg").read_bytes())
    (odd_images / "images" / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    try:
        assert probe_jpeg(src, "images/link.jpg") is None and probe_jpeg(src, "hf://train/0") is None
    finally:
        (odd_images / "images" / "link.jpg").unlink()


def test_device_decode_equals_the_cpu_decode_rules(odd_images):
    """On the CPU device, torchvision's decode + the EXIF orientation applied with tensor ops give exactly
    the pixels ImageSource.open gives (PIL, exif_transpose), for every routed file."""
    import torch

    from vlpl.data.images import ImageSource
    from vlpl.pseudolabel.device_decode import decode_on_device, probe_jpeg

    src = ImageSource(odd_images)
    refs = [f"images/{p.name}" for p in sorted((odd_images / "images").iterdir())]
    encoded = [(r, probe_jpeg(src, r)) for r in refs]
    encoded = [(r, e) for r, e in encoded if e is not None]
    decoded = decode_on_device([e for _, e in encoded], torch.device("cpu"))
    assert len(decoded) == len(encoded) >= 9
    for (ref, _), img in zip(encoded, decoded):
        ref_px = torch.from_numpy(np.asarray(src.open(ref)).copy()).permute(2, 0, 1)
        assert img is not None and torch.equal(img, ref_px), ref


def test_device_decode_store_equals_the_cpu_store(odd_images, tmp_path, monkeypatch):
    """decode=device on the CPU device: the same shards, byte for byte (failed rows and their messages too),
    as decode=cpu; the manifest records the decoder. A device decode failure falls back to the CPU path."""
    import json

    import torchvision.io

    cpu, dev = tmp_path / "cpu", tmp_path / "dev"
    run_pseudolabel(_cfg(odd_images, cpu, "max_failed_fraction=0.5"))
    real = torchvision.io.decode_jpeg
    calls = []

    def flaky(data, *a, **kw):  # the batched call fails, and so does one image on its own
        calls.append(len(data) if isinstance(data, list) else 1)
        if isinstance(data, list) or len(data) == len((odd_images / "images" / "rot6.jpg").read_bytes()):
            raise RuntimeError("nvjpeg: unsupported (injected)")
        return real(data, *a, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", flaky)
    run_pseudolabel(_cfg(odd_images, dev, "decode=device", "max_failed_fraction=0.5"))
    assert calls and calls[0] > 1  # one batched call per batch first
    a, b = _store_files(cpu), _store_files(dev)
    assert a.keys() == b.keys()
    assert {k: v for k, v in a.items() if k.startswith("shards/")} == {k: v for k, v in b.items() if k.startswith("shards/")}
    ma, mb = json.loads(a["manifest.json"]), json.loads(b["manifest.json"])
    assert mb["decode"].pop("jpeg_decoder") == "torchvision.io.decode_jpeg on cpu" and ma["decode"] == mb["decode"]
    assert ma["num_failed"] == mb["num_failed"] == 2
    # a resume with the other decoder is refused: the pixels may differ on a GPU
    with pytest.raises(StoreError, match="decode"):
        run_pseudolabel(_cfg(odd_images, dev, "max_failed_fraction=0.5"))


def test_exif_orientations_match_pil():
    import torch
    from PIL import Image, ImageOps

    from vlpl.pseudolabel.device_decode import apply_orientation

    base = Image.fromarray(np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3))
    x = torch.from_numpy(np.asarray(base).copy()).permute(2, 0, 1)
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        im = base.copy()
        im.info["exif"] = exif.tobytes()
        want = np.asarray(ImageOps.exif_transpose(im))
        assert np.array_equal(apply_orientation(x, o).permute(1, 2, 0).numpy(), want), o


@pytest.mark.gpu
def test_scoring_loop_work_never_syncs_on_cuda(coco256_root):
    """The loop's device work (uint8 images from pinned memory, batched views of several sizes, the image
    tower) runs under CUDA's sync debug mode set to error: no host sync; the features stay on the device."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from PIL import Image

    from vlpl.config import TeacherConfig
    from vlpl.pseudolabel.stage import Scorer
    from vlpl.vlm.backend import create_backend
    from vlpl.vlm.views import ViewSpec

    dev = torch.device("cuda")
    backend = create_backend(TeacherConfig(name="vlpl-tiny", pretrained=None, device="cuda"), dev)
    spec = ViewSpec(4, True, backend.preprocess.image_size, "squash", backend.preprocess.interpolation)
    text = backend.encode_text(["cat", "dog", "person"], "a photo of a {}.")
    scorer = Scorer(backend, spec, text)
    files = sorted((coco256_root / "images").rglob("*.jpg"))[:12]
    images = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1).contiguous()
              .pin_memory() for f in files]
    scorer.features(images)  # warm-up (cuDNN / cuBLAS handles, the normalisation constants)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        feats = scorer.features(images)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert feats.is_cuda and feats.shape[:2] == (12, 34)


@pytest.mark.gpu
def test_cuda_decode_is_close_to_the_cpu_decode(odd_images, tmp_path):
    """nvJPEG (CUDA) vs libjpeg-turbo: same sizes and orientation, pixels within a few levels; the stage runs
    with decode=device on CUDA and fails the same rows."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from vlpl.data.images import ImageSource
    from vlpl.pseudolabel.device_decode import decode_on_device, probe_jpeg

    src = ImageSource(odd_images)
    refs = [f"images/{p.name}" for p in sorted((odd_images / "images").iterdir())]
    enc = [(r, e) for r in refs for e in [probe_jpeg(src, r)] if e is not None]
    out = decode_on_device([e for _, e in enc], torch.device("cuda"))
    for (ref, _), img in zip(enc, out):
        want = torch.from_numpy(np.asarray(src.open(ref)).copy()).permute(2, 0, 1).int()
        assert img is not None and img.is_cuda and img.shape == want.shape, ref
        diff = (img.cpu().int() - want).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 16, (ref, float(diff.float().mean()), int(diff.max()))
    stats: dict = {}
    run_pseudolabel(_cfg(odd_images, tmp_path / "cuda", "decode=device", "teacher.device=cuda",
                         "max_failed_fraction=0.5"), stats=stats)
    assert ScoreStore(tmp_path / "cuda").manifest["num_failed"] == 2


def test_pipeline_benchmark_runs_and_records(coco256_root, tmp_path):
    """benchmarks/pseudolabel_pipeline.py at toy size: both measurements, the JSON fields the README's table
    reads, byte-identical stores and equal views."""
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import pseudolabel_pipeline as bench
    finally:
        sys.path.pop(0)
    out = tmp_path / "r.json"
    bench.main(["--what", "all", "--num-images", "8", "--classes-list", "90", "--shard-size", "4",
                "--batch-size", "4", "--num-workers", "0", "--grid", "2", "--rounds", "1", "--view-size", "32",
                "--device", "cpu", "--out", str(out)])
    res = json.loads(out.read_text())
    w = res["writer"]["90"]
    assert w["stores_byte_identical"] and set(w) >= {"inline", "background"}
    assert 0 <= w["background"]["stall_share_median"] <= 1 and w["inline"]["writer_wait_s_rounds"][0] > 0
    assert res["views"]["equal"] and res["views"]["max_abs_diff"] == 0.0 and res["views"]["images"] == 8
    assert res["command"].startswith("python benchmarks/pseudolabel_pipeline.py") and res["environment"]["torch"]
