"""Fault suite, inputs: a corpus of bad images through the pseudolabel stage (issue 9).

Each kind of bad input generated here is either read correctly (its stored scores equal those of a
lossless file holding the pixels it must decode to) or becomes a failed row whose error names it; the
run never crashes and never hangs (it runs in a subprocess with a timeout), with 0 and with 1 DataLoader
worker. A run with too many failures stops with a summary, keeping its completed shards.
"""
from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlpl.config import PseudolabelConfig, load_config
from vlpl.data.images import printable
from vlpl.pseudolabel.stage import TooManyFailedImages, run_pseudolabel

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "models" / "tiny.yaml")
RUN = ("import sys\nfrom vlpl.config import PseudolabelConfig, load_config\n"
       "from vlpl.pseudolabel.stage import run_pseudolabel\n"
       "run_pseudolabel(load_config(PseudolabelConfig, [sys.argv[1]], sys.argv[2:]))\n")
RUN_TIMEOUT_S = 300


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png(width: int, height: int, raw: bytes) -> bytes:
    """An 8-bit grey PNG chunk by chunk: it may declare a size its data does not have."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _rand(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


class Corpus:
    """The dataset: good coco256 images, bad inputs, and for each decodable bad input its truth file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rows: List[Dict[str, object]] = []
        self.expect: Dict[str, Tuple[str, Optional[str]]] = {}  # kind -> ("ok", truth ref) | ("failed", None)
        self.refs: Dict[str, str] = {}

    def add(self, kind: str, ref: str, data: Optional[bytes], outcome: str, truth: Optional[np.ndarray] = None
            ) -> None:
        if data is not None:
            target = self.root / ref
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        truth_ref = None
        if truth is not None:
            truth_ref = f"images/truth_{kind}.png"
            Image.fromarray(truth).save(self.root / truth_ref)
            self.rows.append({"image": truth_ref, "split": "train", "labels": []})
        self.rows.append({"image": ref, "split": "train", "labels": ["person"]})
        self.expect[kind] = (outcome, truth_ref)
        self.refs[kind] = ref


def build_corpus(coco256: Path, root: Path) -> Corpus:
    c = Corpus(root)
    (root / "images").mkdir(parents=True)
    good = [r for r in csv.DictReader(open(coco256 / "labels.csv")) if r["split"] == "train"][:4]
    for r in good:
        name = Path(r["image"]).name
        (root / "images" / name).write_bytes((coco256 / r["image"]).read_bytes())
        c.rows.append({"image": f"images/{name}", "split": "train", "labels": [n for n in r["labels"].split("|") if n]})
    jpg = (coco256 / good[0]["image"]).read_bytes()
    png = _encode(Image.fromarray(_rand(48, 64, 1)), "PNG")

    c.add("truncated JPEG", "images/truncated-jpeg.jpg", jpg[: len(jpg) // 2], "failed")
    c.add("truncated PNG", "images/truncated-png.png", png[: len(png) - 40], "failed")
    c.add("0-byte file", "images/empty.jpg", b"", "failed")
    c.add("1x1 image", "images/one.png", _encode(Image.fromarray(_rand(1, 1, 2)), "PNG"), "failed")
    c.add("2x2 image (grid 4)", "images/two.png", _encode(Image.fromarray(_rand(2, 2, 3)), "PNG"), "failed")
    c.add("100000x1 image", "images/wide.png", _png(100_000, 1, b"\x00" + bytes(100_000)), "failed")
    c.add("decompression bomb", "images/bomb.png", _png(20_000, 20_000, b"\x00" * 20_001), "failed")
    c.add("non-image with an image extension", "images/text.jpg", b"this is a text file, not a JPEG\n" * 50,
          "failed")

    a16 = np.random.RandomState(4).randint(0, 65536, (40, 56)).astype(np.uint16)
    c.add("16-bit PNG", "images/grey16.png", _encode(Image.fromarray(a16), "PNG"), "ok",
          truth=np.repeat((a16 >> 8).astype(np.uint8)[..., None], 3, axis=2))
    cmyk = _encode(Image.fromarray(_rand(40, 40, 5)).convert("CMYK"), "JPEG", quality=95)
    c.add("CMYK JPEG", "images/cmyk.jpg", cmyk, "ok", truth=np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB")))
    idx = np.random.RandomState(6).randint(0, 4, (40, 40)).astype(np.uint8)
    palette = np.array([[255, 0, 0], [0, 128, 0], [0, 0, 255], [20, 20, 20]], np.uint8)
    pal = Image.fromarray(idx, "P")
    pal.putpalette(palette.ravel().tolist() + [0] * (768 - 12))
    truth = palette[idx].copy()
    truth[idx == 1] = 255  # index 1 transparent: composited over white
    c.add("palette PNG with transparency", "images/palette.png", _encode(pal, "PNG", transparency=1), "ok",
          truth=truth)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    rot = _encode(Image.fromarray(_rand(32, 64, 7)), "JPEG", exif=exif, quality=95)
    stored = Image.open(io.BytesIO(rot)).convert("RGB")
    c.add("EXIF-rotated JPEG", "images/rotated.jpg", rot, "ok",
          truth=np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))

    # names and paths
    bad_name = os.fsdecode(b"images/caf\xe9-\xff.jpg")  # Latin-1 bytes: not UTF-8
    c.add("non-UTF-8 file name", bad_name, jpg, "failed")  # written as those bytes (surrogateescape)
    assert b"caf\xe9-\xff.jpg" in os.listdir(os.fsencode(root / "images"))
    secret = root.parent / "outside.jpg"
    secret.write_bytes(jpg)
    c.add("'..' path", "../outside.jpg", None, "failed")
    c.add("absolute path", str(secret), None, "failed")
    os.symlink(secret, root / "images" / "link.jpg")
    c.add("symlink out of the root", "images/link.jpg", None, "failed")
    c.add("missing file", "images/not-there.jpg", None, "failed")

    with open(root / "labels.jsonl", "w", encoding="utf-8") as f:  # JSON escapes the undecodable name
        for r in c.rows:
            f.write(json.dumps(r) + "\n")
    (root / "classes.txt").write_text((coco256 / "classes.txt").read_text())
    return c


def _rows(store: Path) -> Dict[str, Dict[str, object]]:
    shards = sorted((store / "shards").glob("part-*.parquet"))
    out: Dict[str, Dict[str, object]] = {}
    for p in shards:
        t = pq.read_table(p, columns=["image", "status", "error", "scores"]).to_pylist()
        for r in t:
            out[r["image"]] = r
    return out


def _judge(corpus: Corpus, rows: Dict[str, Dict[str, object]]) -> Dict[str, str]:
    """kind -> "" when handled as it must be, else what went wrong."""
    verdict = {}
    for kind, (outcome, truth) in corpus.expect.items():
        ref = printable(corpus.refs[kind])
        r = rows.get(ref)
        if r is None:
            verdict[kind] = f"no row for {ref!r}"
        elif outcome == "failed":
            err = r["error"] or ""
            named = Path(ref).name in err
            verdict[kind] = "" if r["status"] == "failed" and named else f"status {r['status']}, error {err!r}"
        else:
            t = rows[truth]
            ok = r["status"] == "ok" and t["status"] == "ok"
            same = ok and np.allclose(np.asarray(r["scores"], np.float32), np.asarray(t["scores"], np.float32),
                                      atol=2e-3)
            verdict[kind] = "" if same else f"status {r['status']}, scores equal to the truth's: {same}"
    return verdict


@pytest.mark.slow
def test_bad_input_corpus_never_crashes_nor_hangs(coco256_root: Path, tmp_path: Path, record_fault) -> None:
    corpus = build_corpus(coco256_root, tmp_path / "data")
    verdicts = []
    for workers in (0, 1):
        out = tmp_path / f"store{workers}"
        args = [f"data.root={corpus.root}", f"out={out}", "views.grid=4", "shard_size=8", "batch_size=4",
                f"num_workers={workers}", "progress=false", "index=false", "max_failed_fraction=1.0"]
        try:
            proc = subprocess.run([sys.executable, "-c", RUN, TINY, *args], capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
        except subprocess.TimeoutExpired:
            pytest.fail(f"the pseudolabel run with num_workers={workers} hung (> {RUN_TIMEOUT_S} s)")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] and manifest["num_rows"] == len(corpus.rows)
        verdicts.append(_judge(corpus, _rows(out)))
    for kind in corpus.expect:
        outcome = corpus.expect[kind][0]
        ok = sum(v[kind] == "" for v in verdicts)
        record_fault("inputs", kind, len(verdicts), ok,
                     detail=("read correctly (scores equal a lossless file of the right pixels)" if outcome == "ok"
                             else "a failed row whose error names the file") + ", num_workers 0 and 1")
    bad = {k: [v[k] for v in verdicts] for k in corpus.expect if any(v[k] for v in verdicts)}
    assert not bad, bad


def _small_dataset(root: Path, n_good: int, n_bad: int, bad_first: bool = False) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n_good):
        Image.fromarray(_rand(24, 24, i)).save(root / "images" / f"g{i:03d}.png")
        rows.append(f"images/g{i:03d}.png,train,cat")
    bad = []
    for i in range(n_bad):
        (root / "images" / f"b{i:03d}.jpg").write_bytes(b"" if i % 2 else b"not an image" * 9)
        bad.append(f"images/b{i:03d}.jpg,train,dog")
    rows = bad + rows if bad_first else rows + bad
    (root / "labels.csv").write_text("image,split,labels\n" + "\n".join(rows) + "\n")
    (root / "classes.txt").write_text("cat\ndog\n")
    return root


def _cfg(data: Path, out: Path, *extra: str) -> PseudolabelConfig:
    return load_config(PseudolabelConfig, [TINY], [f"data.root={data}", f"out={out}", "views.grid=2",
                                                    "shard_size=16", "batch_size=8", "num_workers=0",
                                                    "progress=false", "index=false", "data.val_fraction=0",
                                                    *extra])


def test_too_many_failures_stop_the_run_with_a_summary(tmp_path: Path, record_fault) -> None:
    data = _small_dataset(tmp_path / "data", n_good=40, n_bad=40)
    out = tmp_path / "store"
    with pytest.raises(TooManyFailedImages) as e:
        run_pseudolabel(_cfg(data, out, "max_failed_fraction=0.25"))
    msg = str(e.value)
    # checked after each batch once 50 images are done: at 56 images, 16 failed (28.6% > 25%)
    assert "16 of 56 images" in msg and "not an image: 8" in msg and "empty file: 8" in msg
    assert str(data / "images" / "b000.jpg") in msg and "max_failed_fraction" in msg
    assert msg.count("\n  - ") == 5  # the first 5 failures, each naming its file
    shards = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert shards == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # completed ones kept
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    # the same command again: the kept shards (48 rows, 8 failed) are skipped but counted, so it stops again
    with pytest.raises(TooManyFailedImages, match=r"16 of 56 images .*in shards completed earlier: 8"):
        run_pseudolabel(_cfg(data, out, "max_failed_fraction=0.25"))
    assert len(list((out / "shards").glob("*.parquet"))) == 3
    # allowed more failures, it completes from where it was
    run_pseudolabel(_cfg(data, out, "max_failed_fraction=0.5"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["num_rows"] == 80 and m["num_failed"] == 40
    record_fault("inputs", "failure share over max_failed_fraction", 1, 1,
                 detail="stopped with a summary by reason, completed shards kept, resumed to a complete store")


def test_failure_share_is_checked_at_the_end_of_a_small_run(tmp_path: Path) -> None:
    data = _small_dataset(tmp_path / "data", n_good=8, n_bad=3, bad_first=True)
    with pytest.raises(TooManyFailedImages, match="3 of 11 images"):
        run_pseudolabel(_cfg(data, tmp_path / "a", "max_failed_fraction=0.2"))
    m = json.loads(run_pseudolabel(_cfg(data, tmp_path / "b", "max_failed_fraction=0.3")).joinpath(
        "manifest.json").read_text())
    assert m["complete"] and m["num_failed"] == 3
