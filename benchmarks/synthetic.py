#!/usr/bin/env python
"""Synthetic score stores of any size, written through :class:`vlpl.store.store.StoreWriter`.

A synthetic store is a normal, complete store (manifest with checksum, Parquet shards with page CRCs,
completion marks, ``text_embeddings.npy``, optionally the FAISS index): every reader (``vlpl train``,
``vlpl evaluate``, ``vlpl inspect``, :class:`~vlpl.store.store.ScoreStore`) sees nothing unusual. Its rows
cycle over the 256 real images of ``../shared/data/coco256`` (so ``vlpl train`` can open them), with
``N`` rows, ``C`` classes, a ``g x g`` view grid (+ flips) and ``D``-dimensional embeddings.

The numbers come from a small generative model, so that scores have the shape of CLIP cosines (positives
about 0.33, negatives about 0.21, spread 0.04 at D = 512) and pseudo-label rules and ANN indexes see
structure rather than noise:

* text embeddings ``t_c = normalize(0.4 u + g_c)``, ``u`` a shared unit direction, ``g_c ~ N(0, I/D)``;
* each image has ``1 + Poisson(positives - 1)`` positive classes drawn from a long-tailed class frequency
  (``p_c ~ (c + 5)^-0.8``, as in OpenImages-like vocabularies); one of them is the observed single positive;
* view ``v`` of an image has the embedding
  ``e_v = normalize(0.45 u + 0.15 sum_{p visible in v} t_p + 0.9 n_v)``, ``n_v ~ N(0, I/D)``: the global
  view sees every positive, each tile each positive with probability 0.4, a flipped tile sees what the
  mirrored unflipped tile sees (with its own noise);
* scores = ``e_v . t_c`` (cosine; stored float16), the image embedding = ``e`` of the global unflipped view.

Every shard is a pure function of ``(seed, shard)``: a killed generation re-run with the same arguments
resumes (complete shards are kept) and two runs give byte-identical shards.

Usage::

    python benchmarks/synthetic.py --rows 100000 --classes 1000 --out /tmp/synth-100k-c1000
    python benchmarks/synthetic.py --rows 1000000 --classes 1000 --grid 0 --no-flips --out /tmp/synth-1m-global

or from Python: ``make_synthetic_store(out, SyntheticSpec(rows=10_000, classes=1_000))``.

Compact score forms (``--form embeddings|topk``, the ``score_format`` of ``vlpl pseudolabel``) are encoded
by the store's own :class:`~vlpl.store.formats.ScoreForm` from the generated dense scores or per-view
embeddings (the embeddings form never makes the ``V x C`` scores, so it scales to any class count).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger("benchmarks.synthetic")

BENCH_DIR = Path(__file__).resolve().parent
COCO256 = BENCH_DIR.parent.parent / "shared" / "data" / "coco256"

# generative model (see the module docstring): scores shaped like CLIP cosines
TEXT_SHARED, IMAGE_SHARED, SIGNAL, NOISE = 0.4, 0.45, 0.15, 0.9
TILE_VISIBLE = 0.4
TAIL_OFFSET, TAIL_POWER = 5.0, 0.8
FORMS = ("dense", "embeddings", "topk")


@dataclass
class SyntheticSpec:
    """What a synthetic store holds.

    ``rows``: N; ``classes``: C; ``grid``/``flips``: the views (V = (1 + grid^2) x (2 if flips else 1));
    ``dim``: D of the text and image embeddings; ``form``: the store's score form (``dense``, or a compact
    form the store supports); ``topk``: k of the sparse form; ``positives``: mean positives per image
    (COCO: 2.9); ``splits``: split name -> share of the rows (drawn per row, seeded); ``failed``: share of
    rows written as failed rows (as an undecodable image is), to exercise the readers' and the index's
    handling of them.
    """

    rows: int
    classes: int = 1000
    grid: int = 4
    flips: bool = True
    dim: int = 512
    form: str = "dense"
    topk: int = 64
    shard_size: int = 1024
    seed: int = 0
    positives: float = 2.9
    splits: Dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    image_size: int = 224
    failed: float = 0.0  # share of rows written as failed (status failed, no scores), drawn per row
    noise: float = NOISE  # weight of each view's own noise in its embedding (lower: tighter class clusters)

    def __post_init__(self) -> None:
        if self.rows < 1 or self.classes < 1 or self.dim < 2 or self.shard_size < 1:
            raise ValueError(f"rows, classes, shard_size must be >= 1 and dim >= 2, got rows={self.rows}, "
                             f"classes={self.classes}, dim={self.dim}, shard_size={self.shard_size}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.grid < 0:
            raise ValueError(f"grid must be >= 0, got {self.grid}")
        if not self.splits or any(v < 0 for v in self.splits.values()) or sum(self.splits.values()) <= 0:
            raise ValueError(f"splits must be non-negative shares with a positive sum, got {self.splits}")

    @property
    def n_views(self) -> int:
        return 1 + self.grid * self.grid

    @property
    def num_views(self) -> int:
        return self.n_views * (2 if self.flips else 1)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.rows / self.shard_size)

    def shard_rows(self, s: int) -> range:
        return range(s * self.shard_size, min((s + 1) * self.shard_size, self.rows))

    def dense_bytes_per_row(self) -> int:
        """Bytes of one row's dense float16 scores, before compression (V x C x 2)."""
        return self.num_views * self.classes * 2

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)


def class_names(n: int) -> List[str]:
    """coco256's class names for the first ``min(n, 80)`` classes, then ``class 80``, ``class 81``, ..."""
    f = COCO256 / "classes.txt"
    base = [s.strip() for s in f.read_text().splitlines() if s.strip()] if f.is_file() else []
    return [base[i] if i < len(base) else f"class {i}" for i in range(n)]


def image_refs() -> Tuple[Path, List[str]]:
    """(dataset root, image paths relative to it) of the images the rows cycle over: coco256's, sorted."""
    root = COCO256.resolve()
    files = sorted(p.relative_to(root).as_posix() for p in (root / "images").rglob("*.jpg")) \
        if (root / "images").is_dir() else []
    if not files:
        raise FileNotFoundError(f"{COCO256}: coco256 images not found (the synthetic rows cycle over them)")
    return root, files


class Generator:
    """The generative model of one spec: text embeddings once, then any shard on demand."""

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        d = spec.dim
        u = _normalize(rng.standard_normal(d))
        self.u = u.astype(np.float32)
        self.text = _normalize(TEXT_SHARED * u + rng.standard_normal((spec.classes, d)) / math.sqrt(d)).astype(np.float32)
        freq = (np.arange(spec.classes) + TAIL_OFFSET) ** -TAIL_POWER
        self.cdf = np.cumsum(freq / freq.sum())
        self.split_names = list(spec.splits)
        shares = np.array([spec.splits[k] for k in self.split_names], np.float64)
        self.split_cdf = np.cumsum(shares / shares.sum())
        self.root, self.images = image_refs()
        # flipped tile (i, j) shows what unflipped tile (i, g-1-j) shows
        g = spec.grid
        self.mirror = np.array([0] + [1 + i * g + (g - 1 - j) for i in range(g) for j in range(g)], np.int64)

    def splits_of(self, rows: range) -> np.ndarray:
        """Split index of each row (a function of (seed, row) only)."""
        u = np.random.default_rng([self.spec.seed, 1, rows.start]).random(len(rows))
        return np.searchsorted(self.split_cdf, u, side="right").clip(max=len(self.split_names) - 1)

    def shard(self, s: int) -> Dict[str, Any]:
        """Rows of shard ``s``: ids, images, splits, labels, observed, per-view embeddings, dense scores."""
        sp = self.spec
        rows = sp.shard_rows(s)
        n, C, D, g = len(rows), sp.classes, sp.dim, sp.grid
        rng = np.random.default_rng([sp.seed, 2, s])
        kmax = max(1, int(math.ceil(sp.positives * 3)))
        k = np.minimum(1 + rng.poisson(max(sp.positives - 1.0, 0.0), n), kmax)
        pos = np.searchsorted(self.cdf, rng.random((n, kmax)), side="right").clip(max=C - 1)
        slot = np.arange(kmax)[None, :] < k[:, None]  # (n, kmax) which draws are used
        labels = np.zeros((n, C), np.int8)
        np.put_along_axis(labels, np.where(slot, pos, pos[:, :1]), 1, axis=1)
        observed = np.zeros((n, C), np.int8)
        observed[np.arange(n), pos[:, 0]] = 1  # the single observed positive (Cole et al.'s protocol)
        # visibility of each positive draw in each view: global sees all, tiles with probability TILE_VISIBLE
        vis = np.empty((n, sp.n_views, kmax), np.float32)
        vis[:, 0] = 1.0
        if g:
            vis[:, 1:] = rng.random((n, g * g, kmax)) < TILE_VISIBLE
        if sp.flips:
            vis = np.concatenate([vis, vis[:, self.mirror]], axis=1)
        vis *= slot[:, None, :]
        emb = np.empty((n, sp.num_views, D), np.float32)
        emb[:] = IMAGE_SHARED * self.u
        emb += SIGNAL * np.einsum("nvk,nkd->nvd", vis, self.text[pos], optimize=True)
        emb += (sp.noise / math.sqrt(D)) * rng.standard_normal((n, sp.num_views, D), dtype=np.float32)
        emb = _normalize(emb)
        scores: Optional[np.ndarray] = None
        if sp.form != "embeddings":  # the embeddings form stores emb itself: no V x C scores to make
            scores = np.empty((n, sp.num_views, C), np.float16)
            step = max(1, (1 << 26) // max(sp.num_views * C, 1))  # ~256 MB of float32 at a time
            for a in range(0, n, step):
                scores[a : a + step] = emb[a : a + step] @ self.text.T
        splits = self.splits_of(rows)
        ok = np.random.default_rng([sp.seed, 3, s]).random(n) >= sp.failed
        return {
            "sample_id": [f"synth-{i:09d}" for i in rows],
            "image": [self.images[i % len(self.images)] for i in rows],
            "split": [self.split_names[j] for j in splits],
            "labels": labels,
            "observed": observed,
            "view_embeddings": emb.astype(np.float16),
            "scores": scores,
            "image_embedding": emb[:, 0].astype(np.float16),
            "ok": ok,
        }

    def split_counts(self) -> Dict[str, int]:
        counts = np.zeros(len(self.split_names), np.int64)
        for s in range(self.spec.num_shards):
            counts += np.bincount(self.splits_of(self.spec.shard_rows(s)), minlength=len(self.split_names))
        return {name: int(c) for name, c in zip(self.split_names, counts) if c}


def score_form(spec: SyntheticSpec) -> Any:
    """The store's :class:`~vlpl.store.formats.ScoreForm` of ``spec``."""
    from vlpl.store.formats import ScoreForm

    return ScoreForm.create(spec.form, spec.num_views, spec.classes, spec.dim, spec.topk)


def identity(spec: SyntheticSpec, gen: Generator) -> Dict[str, Any]:
    """The manifest identity of a synthetic store (the keys ``vlpl pseudolabel`` writes)."""
    from vlpl import __version__
    from vlpl.store.store import SCHEMA_VERSION, sha256_lines
    from vlpl.store.views import ViewSpec

    view_spec = ViewSpec(spec.grid, spec.flips, (spec.image_size, spec.image_size))
    classes = class_names(spec.classes)
    ident: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "vlpl_version": __version__,
        "model": {"backend": "synthetic", "name": f"synthetic-d{spec.dim}", "seed": spec.seed,
                  "generator": "benchmarks/synthetic.py"},
        "templates": ["{}"],
        "templates_sha256": sha256_lines(["{}"]),
        "classes": classes,
        "classes_sha256": sha256_lines(classes),
        "views": view_spec.to_dict(),
        "decode": {"synthetic": True},
        "score_kind": "cosine",
        **score_form(spec).manifest_entry(),
        "score_dtype": "float16",
        "logit_scale": 100.0,
        "embedding_dim": spec.dim,
        "dataset": {"name": "synthetic", "format": "synthetic", "root": str(gen.root)},
        "samples_sha256": hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest(),
        "shard_size": spec.shard_size,
        "num_shards": spec.num_shards,
        "splits": gen.split_counts(),
        "synthetic": spec.to_dict(),
    }
    return json.loads(json.dumps(ident))


def _shard_rows(data: Dict[str, Any], form: Any) -> Any:
    """The store's :class:`ShardRows` of one generated shard in ``form`` (the store encodes the payload:
    dense scores, per-view embeddings, or the top-k classes with their floor)."""
    from vlpl.store.store import ShardRows

    n = len(data["sample_id"])
    payload = form.from_dense(data["scores"], embeddings=data["view_embeddings"])
    return ShardRows(
        sample_id=data["sample_id"], image=data["image"], split=data["split"], observed=data["observed"],
        labels=data["labels"], labels_known=np.ones(n, bool), scores=data["scores"],
        image_embedding=data["image_embedding"], ok=data["ok"],
        error=[None if o else "synthetic failed row" for o in data["ok"]], payload=payload, form=form)


def make_synthetic_store(out: Path, spec: SyntheticSpec, overwrite: bool = False, index: Any = False,
                         show_progress: bool = True) -> Path:
    """Write (or resume) a synthetic store at ``out`` through :class:`StoreWriter`; returns ``out``.

    ``index``: build the FAISS index at the end (``False``, ``True`` for the default, or an index config).
    """
    from vlpl.progress import progress
    from vlpl.store.store import StoreWriter

    out = Path(out)
    gen = Generator(spec)
    ident = identity(spec, gen)
    form = score_form(spec)
    writer = StoreWriter(out)
    t0 = time.perf_counter()
    try:
        writer.prepare(ident, ident["classes"], gen.text, overwrite=overwrite)
        todo = [s for s in range(spec.num_shards) if not writer.shard_complete(s, len(spec.shard_rows(s)))]
        if len(todo) < spec.num_shards:
            log.info("%s: resuming, %d of %d shards already complete", out, spec.num_shards - len(todo),
                     spec.num_shards)
        with progress(sum(len(spec.shard_rows(s)) for s in todo), "synthetic", "row",
                      enabled=show_progress) as bar:
            for s in todo:
                writer.write_shard(s, _shard_rows(gen.shard(s), form))
                bar.update(len(spec.shard_rows(s)))
        writer.finalize(ident, spec.num_shards, build_index=index)
    finally:
        writer.close()
    log.info("synthetic store %s: %d rows x %d views x %d classes (%s) in %.1fs", out, spec.rows, spec.num_views,
             spec.classes, spec.form, time.perf_counter() - t0)
    return out


def store_bytes(root: Path) -> Dict[str, int]:
    """On-disk bytes of a store: ``shards`` (Parquet files), ``index``, ``total`` (every file)."""
    root = Path(root)
    shards = sum(p.stat().st_size for p in (root / "shards").glob("*.parquet"))
    index = sum(p.stat().st_size for p in (root / "index").glob("*") if p.is_file()) if (root / "index").is_dir() else 0
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"shards": shards, "index": index, "total": total}


def _parse_splits(text: str) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for part in text.split(","):
        name, _, share = part.partition(":")
        if not name or not share:
            raise argparse.ArgumentTypeError(f"--splits: expected name:share,... (e.g. train:0.8,val:0.1,test:0.1), "
                                             f"got {text!r}")
        out[name.strip()] = float(share)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="store directory to write (or resume)")
    p.add_argument("--rows", type=int, required=True, help="N rows (cycling over coco256's 256 images)")
    p.add_argument("--classes", type=int, default=1000, help="C classes")
    p.add_argument("--grid", type=int, default=4, help="g: global view + g x g tiles (0: global view only)")
    p.add_argument("--no-flips", action="store_true", help="no flipped variants (V = 1 + g^2)")
    p.add_argument("--dim", type=int, default=512, help="D of the text and image embeddings")
    p.add_argument("--form", default="dense", choices=FORMS, help="score form of the store")
    p.add_argument("--topk", type=int, default=64, help="k of the topk form")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positives", type=float, default=2.9, help="mean positive classes per image")
    p.add_argument("--splits", type=_parse_splits, default={"train": 0.8, "val": 0.1, "test": 0.1},
                   help="split shares, name:share,...")
    p.add_argument("--index", default=None,
                   help="build the FAISS index: a factory string (Flat, IVF4096,PQ64, HNSW32); default none")
    p.add_argument("--failed", type=float, default=0.0, help="share of rows written as failed rows")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    a = parse_args(argv)
    spec = SyntheticSpec(rows=a.rows, classes=a.classes, grid=a.grid, flips=not a.no_flips, dim=a.dim,
                         form=a.form, topk=a.topk, shard_size=a.shard_size, seed=a.seed, positives=a.positives,
                         splits=a.splits, failed=a.failed)
    index: Any = False
    if a.index:
        index = _index_config(a.index)
    out = make_synthetic_store(Path(a.out), spec, overwrite=a.overwrite, index=index)
    b = store_bytes(out)
    print(json.dumps({"store": str(out), "rows": spec.rows, "views": spec.num_views, "classes": spec.classes,
                      "form": spec.form, "shard_bytes_per_row": round(b["shards"] / spec.rows, 1),
                      "dense_raw_bytes_per_row": spec.dense_bytes_per_row(), **b}, indent=2))
    return out


def _index_config(factory: str) -> Any:
    """An index config for ``factory`` (vlpl.config.IndexConfig when this vlpl has it)."""
    try:
        from vlpl.config import IndexConfig  # type: ignore[attr-defined]
    except ImportError:
        return True
    return IndexConfig(factory=factory)


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH_DIR.parent))
    main()
