#!/usr/bin/env python
"""The scaling suite (issue 10, "Benchmarks"): store bytes per image and pseudolabel throughput vs the
class count and the score form, and the FAISS index types at up to 1M vectors.

Two measurements, one result JSON each (``benchmarks/results/scaling-<what>-<device>-<date>.json``, with
the command, the commit, the machine, the versions and the date; ``benchmarks/results_table.py`` prints
the tables):

* ``store``: the real ``vlpl pseudolabel`` stage (``run_pseudolabel``: decode workers, the views, the
  teacher, the shard writer) on ``--images`` coco256 images with ``C`` classes (coco's 80 names first, then
  ``class k``), for each ``C`` in ``--classes`` and each score form in ``--forms`` (``dense``, ``embeddings``,
  ``topk`` with ``--topk``). Reported per run: images/s of the scoring loop (the stage's own stats) and of
  the whole call, the writer stall share, and the bytes per image: the Parquet shards on disk, the score
  columns alone (compressed, from the Parquet metadata), and the score payload before compression.
* ``index``: a synthetic store of ``--rows`` rows (global view only, the generator of
  ``benchmarks/synthetic.py``: embeddings with class structure and noise, D = ``--dim``) and, per factory
  in ``--factories``, ``vlpl.store.index.build_index`` on it (the code ``vlpl pseudolabel`` runs), each in
  its own process so that its peak RSS is its own: build time (training + adding), peak RSS growth over
  the process's baseline, index bytes, and recall@10 vs exact search (ground truth by brute force over
  the store) of ``--queries`` held-out queries, with queries/s, for each search setting in
  ``--search`` (e.g. ``nprobe=16``).

CPU (the recorded runs; 2 shared cores)::

    python benchmarks/scaling.py store --classes 80 1000 10000 20000 --forms dense embeddings topk
    python benchmarks/scaling.py index --rows 1000000 --factories Flat IVF1024,PQ64 HNSW32

GPU (a device lent: the teacher on CUDA in bf16; FAISS on the GPU only where faiss-gpu is installed)::

    python benchmarks/scaling.py store --device cuda --teacher ViT-B-16 --images 2048 --batch-size 128 \\
        --num-workers 8 --classes 80 1000 10000 20000 --forms dense embeddings topk
    python benchmarks/scaling.py index --rows 1000000 --dim 512 --factories Flat IVF4096,PQ64 HNSW32 --gpu auto
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

log = logging.getLogger("benchmarks.scaling")

TINY_TEACHER = BENCH_DIR.parent / "configs" / "models" / "tiny.yaml"


# --------------------------------------------------------------------------------------------------
# shared
# --------------------------------------------------------------------------------------------------


def _count(n: int) -> str:
    """1000000 -> '1m', 100000 -> '100k', 1500 -> '1500'."""
    for div, suffix in ((1_000_000, "m"), (1_000, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


def commit() -> Dict[str, Any]:
    """The commit the benchmark ran on, and whether the work tree had changes."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=BENCH_DIR.parent, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def command(argv: Optional[Sequence[str]]) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return "python benchmarks/scaling.py " + " ".join(shlex.quote(a) for a in args)


def rss_mb() -> float:
    """Current resident set of this process (MB), from /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: ``5`` into /proc/self/clear_refs),
    so that :func:`peak_rss_mb` measures from here on; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS (MB) since the last :func:`reset_peak_rss` (VmHWM), or of the whole process (ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def record(what: str, args: argparse.Namespace, argv: Optional[Sequence[str]], device: str,
           rows: List[Dict[str, Any]], notes: List[str], out: Optional[str]) -> Dict[str, Any]:
    import _common as C
    import torch

    dev = torch.device(device)
    res = {"benchmark": f"scaling_{what}", "date": C.now_date(), "time": C.now_iso(), "command": command(argv),
           **commit(), "environment": C.environment(dev), "args": vars(args), "rows": rows, "notes": notes}
    tag = what if what != "index" else f"index-{_count(args.rows)}"
    path = Path(out) if out else C.RESULTS_DIR / f"scaling-{tag}-{C.slug(C.device_name(dev))}-{C.now_date()}.json"
    C.write_json(path, res)
    res["file"] = str(path)
    log.info("wrote %s", path)
    return res


# --------------------------------------------------------------------------------------------------
# store: bytes per image and pseudolabel throughput vs C and form
# --------------------------------------------------------------------------------------------------


def make_labels(work: Path, num_classes: int) -> Dict[str, str]:
    """labels.csv + classes.txt for coco256 with ``num_classes`` classes (coco's 80 names first; the extra
    classes have no positives); returns the data overrides (the images stay in coco256)."""
    from synthetic import COCO256, class_names

    if num_classes < 80:
        raise ValueError(f"--classes: at least coco's 80 classes, got {num_classes}")
    work.mkdir(parents=True, exist_ok=True)
    (work / "classes.txt").write_text("".join(f"{c}\n" for c in class_names(num_classes)))
    shutil.copyfile(COCO256 / "labels.csv", work / "labels.csv")
    return {"data.root": str(COCO256.resolve()), "data.labels": str(work / "labels.csv"),
            "data.classes": str(work / "classes.txt")}


def store_sizes(root: Path) -> Dict[str, Any]:
    """Bytes of a store: shard files, and per column the compressed and uncompressed Parquet bytes."""
    import pyarrow.parquet as pq

    cols: Dict[str, Dict[str, int]] = {}
    files = sorted((root / "shards").glob("*.parquet"))
    for f in files:
        md = pq.ParquetFile(f).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                ch = rg.column(c)
                name = ch.path_in_schema.split(".")[0]
                d = cols.setdefault(name, {"compressed": 0, "uncompressed": 0})
                d["compressed"] += ch.total_compressed_size
                d["uncompressed"] += ch.total_uncompressed_size
    return {"shards": sum(f.stat().st_size for f in files), "columns": cols}


def run_store(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel
    from vlpl.store.formats import ScoreForm
    from vlpl.store.store import ScoreStore

    work = Path(tempfile.mkdtemp(prefix="vlpl-scaling-store-", dir=args.work))
    rows: List[Dict[str, Any]] = []
    try:
        for C in args.classes:
            data = make_labels(work / f"data-{C}", C)
            for form in args.forms:
                out = work / f"store-{C}-{form}"
                overrides = [f"{k}={v}" for k, v in data.items()] + [
                    f"out={out}", f"views.grid={args.grid}", f"views.flips={str(args.flips).lower()}",
                    f"batch_size={args.batch_size}", f"num_workers={args.num_workers}", "progress=false",
                    "index=false", f"score_format={form}", f"topk={args.topk}", f"shard_size={args.shard_size}",
                    f"data.max_samples={args.images}", f"teacher.device={args.device}"]
                if args.teacher != "vlpl-tiny":
                    overrides += [f"teacher.name={args.teacher}", f"teacher.pretrained={args.pretrained}"]
                cfg = load_config(PseudolabelConfig, [TINY_TEACHER], overrides + list(args.set or []))
                stats: Dict[str, Any] = {}
                t0 = time.perf_counter()
                run_pseudolabel(cfg, stats=stats)
                wall = time.perf_counter() - t0
                st = ScoreStore(out)
                n = st.num_rows
                sizes = store_sizes(out)
                fm = ScoreForm.from_manifest(st.manifest, st.view_spec.num_views, st.num_classes)
                score_cols = [c for c in fm.columns if c in sizes["columns"]]
                comp = sum(sizes["columns"][c]["compressed"] for c in score_cols)
                row = {
                    "classes": C, "form": form, "k": fm.k or None, "images": n, "views": st.view_spec.num_views,
                    "dim": st.embedding_dim,
                    "images_per_s_loop": round(stats.get("images", n) / max(stats.get("seconds", wall), 1e-9), 2),
                    "images_per_s_call": round(n / wall, 2), "seconds_loop": round(stats.get("seconds", 0.0), 2),
                    "seconds_call": round(wall, 2), "stall_share": stats.get("stall_share"),
                    "writer": stats.get("writer"),
                    "store_bytes_per_image": round(sizes["shards"] / n, 1),
                    "score_bytes_per_image": round(comp / n, 1),
                    "score_payload_bytes_per_image": fm.bytes_per_row,
                    "dense_payload_bytes_per_image": st.view_spec.num_views * C * 2,
                    "score_columns": score_cols,
                }
                rows.append(row)
                log.info("C=%d %s: %.1f images/s (loop), store %.0f B/image, scores %.0f B/image (payload %d)", C,
                         form, row["images_per_s_loop"], row["store_bytes_per_image"], row["score_bytes_per_image"],
                         row["score_payload_bytes_per_image"])
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    notes = [
        f"teacher {args.teacher} ({'random weights' if args.teacher == 'vlpl-tiny' else args.pretrained}) on "
        f"{args.device}; g={args.grid}{' + flips' if args.flips else ''}; {args.images} coco256 images "
        f"decoded by the stage's workers ({args.num_workers}); extra classes beyond coco's 80 have no positives",
        "images_per_s_loop: the stage's scoring loop (decode, views, tower, writer waits); images_per_s_call: "
        "the whole run_pseudolabel call (model, text tower over C classes, manifest)",
        "score_bytes_per_image: the score columns (dense: scores; embeddings: view_embeddings; topk: "
        "topk_classes + topk_scores + topk_floor) compressed in the Parquet files; payload: before compression; "
        "store_bytes_per_image: every column (labels, observed, image embedding, ids) too",
    ]
    if args.teacher == "vlpl-tiny":
        notes.append("the tiny teacher's tower is cheap, so throughput here is bound by decoding, views and "
                     "the writer, which is what grows with C; its embedding dim is small, so the embeddings "
                     "form is smaller than with ViT-B/16 (D = 512: 34 x 512 x 2 = 34,816 B/image)")
    return record("store", args, argv, args.device, rows, notes, args.out)


# --------------------------------------------------------------------------------------------------
# index: Flat vs IVF-PQ vs HNSW
# --------------------------------------------------------------------------------------------------


def exact_top(store_root: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) store row ids of the exact inner-product top-k over the store's embeddings (brute force,
    shard by shard, merging the running top-k)."""
    from vlpl.store.index import _embedding_chunks, normalize
    from vlpl.store.store import ScoreStore

    q = normalize(queries)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for ids, emb in _embedding_chunks(ScoreStore(store_root)):
        s = q @ normalize(emb).T
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], axis=1)
        top = np.argpartition(-s_all, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


def index_one(args: argparse.Namespace) -> Dict[str, Any]:
    """One factory in this process: build from the store, peak RSS, recall@10 and queries/s."""
    import faiss

    from vlpl.config import IndexConfig
    from vlpl.store.index import build_index, normalize, recall_at_k, set_search_params
    from vlpl.store.store import ScoreStore

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    store = ScoreStore(Path(args.store))
    queries = np.load(args.queries)
    exact = np.load(args.exact)
    base_rss = rss_mb()
    peak_reset = reset_peak_rss()  # opening the store and the imports peaked higher than where the build starts
    path = Path(args.index_path)
    cfg = IndexConfig(factory=args.factory, train_sample=args.train_sample, gpu=args.gpu)
    t0 = time.perf_counter()
    entry = build_index(store, cfg, path=path)
    build_s = time.perf_counter() - t0
    peak = peak_rss_mb()
    index = faiss.read_index(str(path))
    q = normalize(queries)
    results = []
    for sp in (args.search or [""]):
        try:
            set_search_params(index, sp)
        except ValueError:
            continue  # e.g. nprobe on a Flat index
        index.search(q[: min(10, len(q))], 10)  # warm
        t = time.perf_counter()
        _, found = index.search(q, 10)
        dt = time.perf_counter() - t
        results.append({"search_params": sp, "recall_at_10": round(recall_at_k(found, exact, 10), 4),
                        "queries_per_s": round(len(q) / max(dt, 1e-9), 1)})
    return {"factory": args.factory, "type": entry["type"], "vectors": entry["num_vectors"], "dim": entry["dim"],
            "trained_on": entry["trained_on"], "build_s": round(build_s, 2), "device": entry["device"],
            "default_search_params": entry["search_params"],
            "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(base_rss, 1),
            "rss_growth_mb": round(peak - base_rss, 1), "peak_measured_from_build_start": peak_reset,
            "index_bytes": path.stat().st_size,
            "index_bytes_per_vector": round(path.stat().st_size / max(entry["num_vectors"], 1), 1),
            "search": results}


def run_index(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    from synthetic import Generator, SyntheticSpec, make_synthetic_store

    work = Path(args.store_dir) if args.store_dir else Path(tempfile.mkdtemp(prefix="vlpl-scaling-index-",
                                                                           dir=args.work))
    keep = bool(args.store_dir)
    spec = SyntheticSpec(rows=args.rows, classes=args.vocab, grid=0, flips=False, dim=args.dim, form="embeddings",
                         shard_size=args.shard_size, seed=args.seed, noise=args.noise)
    rows: List[Dict[str, Any]] = []
    try:
        t0 = time.perf_counter()
        store = make_synthetic_store(work / "store", spec, index=False, show_progress=False)
        gen_s = time.perf_counter() - t0
        # held-out queries from the same generative model (same text embeddings): a shard number the store
        # does not have (its rows are drawn from their own random stream)
        q_shard = 999_999
        qspec = SyntheticSpec(rows=(q_shard + 1) * args.queries, classes=args.vocab, grid=0, flips=False,
                              dim=args.dim, form="embeddings", shard_size=args.queries, seed=args.seed,
                              noise=args.noise)
        queries = Generator(qspec).shard(q_shard)["image_embedding"].astype(np.float32)
        t0 = time.perf_counter()
        exact = exact_top(store, queries, 10)
        exact_s = time.perf_counter() - t0
        np.save(work / "queries.npy", queries)
        np.save(work / "exact.npy", exact)
        for factory in args.factories:
            cmd = [sys.executable, str(Path(__file__).resolve()), "index-one", "--store", str(store), "--factory",
                   factory, "--queries", str(work / "queries.npy"), "--exact", str(work / "exact.npy"),
                   "--index-path", str(work / "index.faiss"), "--train-sample", str(args.train_sample),
                   "--gpu", str(args.gpu), "--threads", str(args.threads or 0),
                   *[x for s in args.search for x in ("--search", s)]]
            log.info("index %s on %d vectors ...", factory, args.rows)
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if p.returncode != 0:
                log.error("index %s failed:\n%s", factory, p.stderr[-3000:])
                rows.append({"factory": factory, "error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else
                             f"exit {p.returncode}"})
                continue
            row = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(row)
            log.info("index %s: build %.1fs, +%.0f MB RSS, %s", factory, row["build_s"], row["rss_growth_mb"],
                     ", ".join(f"{r['search_params'] or 'exact'}: recall@10 {r['recall_at_10']:.3f} "
                               f"{r['queries_per_s']:.0f} q/s" for r in row["search"]))
            (work / "index.faiss").unlink(missing_ok=True)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    notes = [
        f"{args.rows:,} synthetic image embeddings, D = {args.dim} (benchmarks/synthetic.py global view: "
        f"0.45 u + 0.15 sum of the positives' text embeddings + {args.noise} noise, normalised; {args.vocab} "
        f"classes): the more noise, the less structure for IVF/PQ/HNSW to exploit (the stores' default 0.9 is "
        f"near-isotropic, a worst case)",
        f"{args.queries} held-out queries (same model, rows the store does not have); exact top-10 by brute force over the store "
        f"({exact_s:.1f}s); store generation {gen_s:.1f}s",
        "build_s: vlpl.store.index.build_index on the store (training on a seeded sample of "
        f"{args.train_sample:,} rows read shard by shard, then adding shard by shard, write); peak RSS of its "
        "own process (rss_growth_mb = peak - the RSS after imports and loading the queries)",
        f"faiss {__import__('faiss').__version__}, {'GPU' if args.gpu is True else 'CPU (no faiss-gpu here)'}; "
        f"{os.cpu_count()} cores shared with other jobs",
    ]
    return record("index", args, argv, "cpu", rows, notes, args.out)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _gpu(text: str) -> Any:
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("store", help="store bytes/image and pseudolabel throughput vs C and form")
    s.add_argument("--classes", type=int, nargs="+", default=[80, 1000, 10000, 20000])
    s.add_argument("--forms", nargs="+", default=["dense", "embeddings", "topk"])
    s.add_argument("--topk", type=int, default=64)
    s.add_argument("--images", type=int, default=256, help="first N images of each coco256 split (data.max_samples)")
    s.add_argument("--grid", type=int, default=4)
    s.add_argument("--no-flips", dest="flips", action="store_false")
    s.add_argument("--teacher", default="vlpl-tiny", help="open_clip model name (vlpl-tiny: bundled, random)")
    s.add_argument("--pretrained", default="none", help="open_clip pretrained tag or file (non-tiny teachers)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--num-workers", type=int, default=1)
    s.add_argument("--shard-size", type=int, default=128)
    s.add_argument("--set", nargs="*", help="extra pseudolabel config overrides (key=value)")
    i = sub.add_parser("index", help="FAISS index types: build time, memory, recall@10 vs exact")
    i.add_argument("--rows", type=int, default=1_000_000)
    i.add_argument("--dim", type=int, default=512)
    i.add_argument("--vocab", type=int, default=1000, help="classes of the synthetic generator")
    i.add_argument("--noise", type=float, default=0.9, help="per-vector noise weight of the generator")
    i.add_argument("--factories", nargs="+", default=["Flat", "IVF1024,PQ64", "HNSW32"])
    i.add_argument("--search", nargs="+", default=["", "nprobe=16", "nprobe=64", "efSearch=64", "efSearch=128"],
                   help="search settings measured for each index ('' = vlpl's default for the type, "
                        "vlpl.store.index.default_search_params; others skipped where they do not apply)")
    i.add_argument("--queries", type=int, default=1000)
    i.add_argument("--train-sample", type=int, default=100_000)
    i.add_argument("--shard-size", type=int, default=50_000)
    i.add_argument("--gpu", type=_gpu, default="auto")
    i.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: its default)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--timeout", type=float, default=3600, help="seconds per index type")
    i.add_argument("--store-dir", default=None, help="keep the synthetic store here (default: a temp dir)")
    o = sub.add_parser("index-one", help=argparse.SUPPRESS)
    for a in ("--store", "--factory", "--queries", "--exact", "--index-path"):
        o.add_argument(a, required=True)
    o.add_argument("--train-sample", type=int, default=100_000)
    o.add_argument("--gpu", type=_gpu, default="auto")
    o.add_argument("--threads", type=int, default=0)
    o.add_argument("--search", action="append", default=[])
    for q in (s, i):
        q.add_argument("--out", default=None, help="result JSON (default benchmarks/results/scaling-<what>[-<rows>]-<device>-<date>.json)")
        q.add_argument("--work", default=None, help="folder for temporary stores (default: the system's)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    args = parse_args(argv)
    if args.what == "index-one":
        row = index_one(args)
        print(json.dumps(row))
        return row
    res = run_store(args, argv) if args.what == "store" else run_index(args, argv)
    from results_table import tables

    print(tables([Path(res["file"])]))
    return res


if __name__ == "__main__":
    main()
