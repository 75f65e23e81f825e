#!/usr/bin/env python
"""The pseudolabel pipeline off the main loop (issue 10 items 3 and 4): writer stall share, batched views.

Two measurements, each side by side in one process with the order alternating round by round:

* ``--what writer``: the real ``vlpl pseudolabel`` stage (``run_pseudolabel``: DataLoader decode workers,
  views, the teacher's image tower, the shard writer) on a folder dataset of ``--num-images`` images
  cycling over coco256's, for each class count in ``--classes-list`` (extra classes are named
  ``class k``), with ``writer=inline`` (before: the loop encodes, hashes and writes every shard itself)
  and ``writer=background`` (after: a thread behind a bounded queue). Reported: the **stall share**, the
  time the scoring loop waited on the writer / the loop's total time (inline: every shard write;
  background: blocked submits and the final drain), and images/s. The two stores are checked
  byte-identical (shards and marks).
* ``--what views``: ``make_views_batch`` (grouped by size, one resize per group, one flip, one
  normalisation) vs the per-image ``make_views`` loop on the same decoded images, with the outputs checked
  equal (max abs difference, which must be 0).

GPU (the same script; the views are made on the device, the stage runs its tower there in bf16)::

    python benchmarks/pseudolabel_pipeline.py --what writer --device cuda --clip ViT-B-16 \\
        --num-images 2048 --classes-list 80 1000 10000 --batch-size 64 --shard-size 1024 --num-workers 8
    python benchmarks/pseudolabel_pipeline.py --what views --device cuda --view-size 224 --num-images 64
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

log = logging.getLogger("benchmarks.pseudolabel_pipeline")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--what", choices=("writer", "views", "all"), default="all")
    p.add_argument("--clip", default="vlpl-tiny", help="open_clip model name of the teacher (vlpl-tiny: bundled)")
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--no-flips", dest="flips", action="store_false")
    p.add_argument("--num-images", type=int, default=512, help="images per stage run (writer) / per round (views)")
    p.add_argument("--classes-list", type=int, nargs="+", default=[80, 1000], help="class counts C (writer)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader decode workers of the stage")
    p.add_argument("--writer-queue", type=int, default=0, help="background writer queue (0: one shard's worth)")
    p.add_argument("--view-size", type=int, default=None, help="views: output size (default: the teacher's)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--clip-pretrained", default="none")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/"
                   "pseudolabel_pipeline-<what>-<device>-<date>.json)")
    return p.parse_args(argv)


def make_dataset(root: Path, n: int, num_classes: int) -> Path:
    """A folder dataset of ``n`` rows cycling over coco256's images (each row its own file name, a symlink
    inside the root to one copy of the image), coco256's labels, ``num_classes`` classes (coco's 80 first)."""
    src = C.COCO256
    rows = list(csv.DictReader(open(src / "labels.csv")))
    (root / "src").mkdir(parents=True)
    (root / "images").mkdir()
    for r in rows:
        shutil.copyfile(src / r["image"], root / "src" / Path(r["image"]).name)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "split", "labels"])
        w.writeheader()
        for k in range(n):
            r = rows[k % len(rows)]
            name = f"{k:07d}.jpg"
            os.symlink(f"../src/{Path(r['image']).name}", root / "images" / name)
            w.writerow({"image": f"images/{name}", "split": "train", "labels": r["labels"]})
    coco = [s.strip() for s in (src / "classes.txt").read_text().splitlines() if s.strip()]
    names = coco[:num_classes] + [f"class {k}" for k in range(len(coco), num_classes)]
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in names))
    return root


def _shard_bytes(root: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "shards").iterdir()) if not p.name.startswith(".")}


def run_writer(args: argparse.Namespace, device: torch.device, work: Path) -> Dict[str, Any]:
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel

    pretrained = "null" if str(args.clip_pretrained).lower() in ("none", "") else args.clip_pretrained
    out: Dict[str, Any] = {}
    for num_classes in args.classes_list:
        data = make_dataset(work / f"data-c{num_classes}", args.num_images, num_classes)
        per: Dict[str, List[Dict[str, Any]]] = {"inline": [], "background": []}
        identical = True
        for r in range(args.rounds):
            order = ["inline", "background"] if r % 2 == 0 else ["background", "inline"]
            stores = {}
            for writer in order:
                store = work / f"store-c{num_classes}-r{r}-{writer}"
                cfg = load_config(PseudolabelConfig, [], [
                    f"data.root={data}", f"out={store}", "teacher.backend=open_clip", f"teacher.name={args.clip}",
                    f"teacher.pretrained={pretrained}", f"teacher.device={device}", f"views.grid={args.grid}",
                    f"views.flips={str(args.flips).lower()}", f"batch_size={args.batch_size}",
                    f"shard_size={args.shard_size}", f"num_workers={args.num_workers}", "progress=false",
                    "index=false", f"writer={writer}", f"writer_queue={args.writer_queue}"])
                stats: Dict[str, Any] = {}
                run_pseudolabel(cfg, stats=stats)
                per[writer].append(stats)
                stores[writer] = store
                log.info("C=%d round %d/%d %-10s %7.1f images/s, loop waited %.2fs of %.2fs on the writer "
                         "(stall share %.1f%%)", num_classes, r + 1, args.rounds, writer, stats["images_per_s"],
                         stats["writer_wait_s"], stats["seconds"], 100 * stats["stall_share"])
            identical &= _shard_bytes(stores["inline"]) == _shard_bytes(stores["background"])
            shard_mb = sum(p.stat().st_size for p in (stores["inline"] / "shards").glob("*.parquet")) / 2**20
            for s in stores.values():
                shutil.rmtree(s)
        out[str(num_classes)] = {
            w: {"stall_share_median": C.median([s["stall_share"] for s in v]),
                "stall_share_rounds": [s["stall_share"] for s in v],
                "writer_wait_s_rounds": [s["writer_wait_s"] for s in v],
                "writer_drain_s_rounds": [s.get("writer_drain_s", 0.0) for s in v],
                "loop_seconds_rounds": [s["seconds"] for s in v],
                "images_per_s_median": C.median([s["images_per_s"] for s in v]),
                "images_per_s_rounds": [s["images_per_s"] for s in v],
                "max_pending": v[0]["max_pending"], "max_queued": max(s["max_queued"] for s in v)}
            for w, v in per.items()}
        out[str(num_classes)]["stores_byte_identical"] = identical
        out[str(num_classes)]["store_mib"] = shard_mb
        shutil.rmtree(data)
    return out


def run_views(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    from vlpl.config import TeacherConfig
    from vlpl.vlm.backend import create_backend
    from vlpl.vlm.views import ViewSpec, make_views, make_views_batch

    pretrained = None if str(args.clip_pretrained).lower() in ("none", "") else args.clip_pretrained
    backend = create_backend(TeacherConfig(name=args.clip, pretrained=pretrained, device=str(device)), device)
    size = (args.view_size, args.view_size) if args.view_size else backend.preprocess.image_size
    mean, std = backend.normalization()
    spec = ViewSpec(args.grid, args.flips, size, "squash", backend.preprocess.interpolation)
    pil, source = C.load_images(args.num_images, args.seed)
    images = [C.pil_to_uint8(im).to(device) for im in pil]
    variants = {"batched": lambda: make_views_batch(images, spec, mean, std),
                "per_image": lambda: torch.cat([make_views(im, spec, mean, std) for im in images])}
    for f in variants.values():  # warm-up
        f()
    times: Dict[str, List[float]] = {k: [] for k in variants}
    outs: Dict[str, torch.Tensor] = {}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            with C.Timer(device) as t:
                outs[name] = variants[name]()
            times[name].append(t.seconds)
            log.info("views round %d/%d %-9s %.3fs (%.1f images/s)", r + 1, args.rounds, name, t.seconds,
                     len(images) / t.seconds)
    diff = float((outs["batched"] - outs["per_image"]).abs().max())
    sizes = {tuple(im.shape[1:]) for im in images}
    med = {k: C.median(v) for k, v in times.items()}
    return {"images": len(images), "distinct_sizes": len(sizes), "images_source": source,
            "view_size": list(size), "views_per_image": spec.num_views,
            "seconds_median": med, "seconds_rounds": times,
            "images_per_s_median": {k: len(images) / v for k, v in med.items()},
            "speedup": med["per_image"] / med["batched"], "max_abs_diff": diff, "equal": diff == 0.0}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = C.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    result: Dict[str, Any] = {
        "benchmark": "pseudolabel_pipeline", "date": C.now_date(), "timestamp_utc": C.now_iso(),
        "command": "python benchmarks/pseudolabel_pipeline.py " + " ".join(sys.argv[1:]),
        "commit": C.git_commit(), "environment": C.environment(device), "args": vars(args),
        "load_average_start": list(os.getloadavg()),
    }
    if args.what in ("writer", "all"):
        with tempfile.TemporaryDirectory(prefix="vlpl-bench-") as tmp:
            result["writer"] = run_writer(args, device, Path(tmp))
    if args.what in ("views", "all"):
        result["views"] = run_views(args, device)
    result["load_average_end"] = list(os.getloadavg())  # a shared machine: other work slows every variant
    result["notes"] = [
        "writer: the real stage (run_pseudolabel) with index=false; stall share = time the scoring loop waited "
        "on the shard writer / the loop's wall time (DataLoader decode, views, image tower, hand-over). inline: "
        "the loop assembles, encodes (zstd Parquet), hashes (sha256) and writes each shard itself; background: "
        "a thread does, the loop waits only on a full queue and for the final drain.",
        "On a CPU the background thread shares the cores with the loop and the decode workers, so its work still "
        "slows the loop down through contention even when the loop never waits on it; compare images/s too.",
        "views: make_views_batch vs torch.cat of per-image make_views on the same uint8 images on the device; "
        "equal must be true (max_abs_diff 0).",
        "Weights are random (speed does not depend on them).",
    ]
    out = Path(args.out) if args.out else C.default_out(f"pseudolabel_pipeline-{args.what}", device,
                                                        result["date"])
    result["out"] = str(C.write_json(out, result))
    return result


def report(res: Dict[str, Any]) -> str:
    lines = [f"pseudolabel pipeline on {res['environment']['device']} ({res['environment']['device_type']})"]
    if "writer" in res:
        rows = []
        for c, v in res["writer"].items():
            for w in ("inline", "background"):
                rows.append([f"C={c}", w, f"{100 * v[w]['stall_share_median']:.1f}%",
                             f"{v[w]['images_per_s_median']:.1f}", str(v["stores_byte_identical"])])
        lines.append(C.table(rows, ["classes", "writer", "stall share", "images/s", "identical"]))
    if "views" in res:
        v = res["views"]
        lines.append(f"views ({v['images']} images, {v['distinct_sizes']} sizes, {v['views_per_image']} views of "
                     f"{v['view_size']}): batched {v['seconds_median']['batched']:.3f}s, per-image "
                     f"{v['seconds_median']['per_image']:.3f}s, speed-up {v['speedup']:.2f}x, max |diff| "
                     f"{v['max_abs_diff']}")
    lines.append(f"-> {res['out']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return C.run_main(run, parse_args, report, argv)


if __name__ == "__main__":
    main()
