#!/usr/bin/env python
"""Training input pipeline alone: images/s of the loader, old (float on the CPU) vs new (uint8 + device).

Both pipelines read the same JPEG files from disk (coco256's 256 real COCO images, cycled), in the same
data order (:class:`vlpl.train.data.EpochOrder`, with flips), through DataLoader workers, and hand the
training step a normalised float32 ``(B, 3, s, s)`` batch on the device:

* ``old`` (vlpl before issue 10.5): per image in a worker, decode + ``Resize((s, s))`` + float32
  ``ToTensor`` + ``Normalize`` + flip (:func:`~vlpl.train.data.image_transform`,
  :class:`~vlpl.train.data.FlippedRows`), collated per sample (``batch_sampler``), torch's default prefetch;
  the float32 batch is copied to the device.
* ``new`` (``vlpl train`` now): a worker decodes + resizes a whole micro-batch to **uint8**
  (:class:`~vlpl.train.data.TrainImages`, :class:`~vlpl.train.data.Uint8Resize`), prefetch from
  :func:`~vlpl.train.data.auto_prefetch`; the uint8 batch (4x fewer bytes) goes pinned and ``non_blocking``
  to the device, where :class:`~vlpl.train.data.DeviceNormalize` converts, normalises and flips it. On a CPU
  device (with workers) the workers normalise the whole batch, as ``vlpl train`` does there.

No model runs: this is the rate at which the input pipeline can feed a training step. Each round runs both
pipelines over ``--images`` images (a fresh DataLoader, as every epoch does, so worker start-up counts),
alternating their order round by round; the figure is the median over rounds, at each worker count.

CPU (the recorded run; a 2-core machine saturates at 2 workers, the larger counts are recorded anyway)::

    python benchmarks/train_input.py --workers 2 4 8 16 --images 512 --image-size 448 --rounds 3

GPU machine (e.g. 16 cores, H100/H200)::

    python benchmarks/train_input.py --workers 2 4 8 16 --images 4096 --image-size 448 --rounds 3 --device cuda
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

log = logging.getLogger("benchmarks.train_input")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's (timm's resnet50)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8, 16], help="DataLoader worker counts")
    p.add_argument("--images", type=int, default=512, help="images per pipeline per round (cycling over coco256)")
    p.add_argument("--image-size", type=int, default=448, help="s: the student's input size")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="rounds; the order of the pipelines alternates")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/train_input-<device>-<date>.json)")
    return p.parse_args(argv)


def _refs(n: int) -> tuple:
    """(ImageSource over coco256's root, n refs cycling over its images)."""
    from vlpl.config import ImageConfig
    from vlpl.data.images import ImageSource

    files = sorted((C.COCO256 / "images").rglob("*.jpg")) if (C.COCO256 / "images").is_dir() else []
    if not files:
        raise SystemExit(f"train_input needs the coco256 images at {C.COCO256 / 'images'}")
    rel = [str(f.relative_to(C.COCO256)) for f in files]
    return ImageSource(C.COCO256, ImageConfig()), [rel[k % len(rel)] for k in range(n)], len(rel)


def _pipelines(args: argparse.Namespace, device: torch.device) -> Dict[str, Callable[[int], int]]:
    """name -> run(workers) -> images delivered to the device (normalised float32 batches)."""
    from torch.utils.data import DataLoader

    from vlpl.data.images import ImageDataset
    from vlpl.train.data import (
        DeviceNormalize,
        EpochOrder,
        FlippedRows,
        TrainImages,
        Uint8Resize,
        auto_prefetch,
        image_transform,
        model_input,
    )

    src, refs, _ = _refs(args.images)
    s = args.image_size
    order = EpochOrder(len(refs), args.batch_size, args.seed, hflip=True)
    pin = device.type == "cuda"
    old_ds = FlippedRows(ImageDataset(src, refs, image_transform(s, MEAN, STD, train=False, hflip=False)))
    normalize = DeviceNormalize(MEAN, STD, device)
    # as vlpl train: uint8 to the accelerator; on a CPU device the workers normalise (in parallel)
    new_ds = {in_worker: TrainImages(ImageDataset(src, refs, Uint8Resize(s)), normalize=normalize if in_worker else None)
              for in_worker in (False, True)}

    def old(workers: int) -> int:
        n = 0
        dl = DataLoader(old_ds, batch_sampler=order.batches(1), num_workers=workers, pin_memory=pin)
        for x, _k, _f in dl:
            x = x.to(device, non_blocking=True)
            n += len(x)
        C.sync(device)
        return n

    def new(workers: int) -> int:
        n = 0
        kw: Dict[str, Any] = {"num_workers": workers, "pin_memory": pin}
        if workers:
            kw["prefetch_factor"] = auto_prefetch(workers)
        dl = DataLoader(new_ds[device.type == "cpu" and workers > 0], sampler=order.plans(1), batch_size=None, **kw)
        for item in dl:
            x = model_input(item["images"], item["flip"], normalize)
            n += len(x)
        C.sync(device)
        return n

    return {"old": old, "new": new}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from vlpl.train.data import auto_num_workers, auto_prefetch, available_cpus

    device = C.resolve_device(args.device)
    date = C.now_date()
    pipes = _pipelines(args, device)
    _, _, distinct = _refs(1)
    per_workers: Dict[str, Any] = {}
    for w in args.workers:
        rates: Dict[str, List[float]] = {"old": [], "new": []}
        for r in range(args.rounds):
            for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                t0 = time.perf_counter()
                n = pipes[name](w)
                dt = time.perf_counter() - t0
                rates[name].append(n / dt)
                log.info("workers %d round %d %s: %.1f images/s", w, r, name, n / dt)
        per_workers[str(w)] = {
            **{f"{k}_images_per_s_rounds": v for k, v in rates.items()},
            **{f"{k}_images_per_s_median": C.median(v) for k, v in rates.items()},
            "ratio_new_over_old": C.median(rates["new"]) / C.median(rates["old"]),
            "ratio_per_round": [a / b for a, b in zip(rates["new"], rates["old"])],
            "new_prefetch_factor": auto_prefetch(w),
        }
    s = args.image_size
    result = {
        "benchmark": "train_input",
        "date": date,
        "timestamp_utc": C.now_iso(),
        "command": "python benchmarks/train_input.py " + " ".join(sys.argv[1:]) if sys.argv and
                   sys.argv[0].endswith("train_input.py") else None,
        "commit": C.git_commit(),
        "environment": {**C.environment(device), "available_cpus": available_cpus(),
                        "auto_num_workers": auto_num_workers(local_processes=1)},
        "args": vars(args),
        "config": {"images_source": f"coco256 JPEGs read from disk ({distinct} distinct files, cycled)",
                   "bytes_per_image_to_device": {"old": 3 * s * s * 4, "new": 3 * s * s},
                   "mean": MEAN, "std": STD},
        "workers": per_workers,
        "notes": [
            "images/s = images delivered to the device as normalised float32 batches / wall time of a whole "
            "pass, a fresh DataLoader each pass (worker start-up included, as in every training epoch); median "
            "over rounds, the two pipelines alternating their order round by round.",
            "Both read and decode the JPEGs from disk (page cache warm after the first pass) with vlpl's decode "
            "rules (ImageSource.open) and resize with PIL bilinear to (s, s); they differ in where the float "
            "conversion, normalisation and flip happen and in the bytes sent to the device.",
            f"On this machine {available_cpus()} CPU(s) are available: worker counts above that add processes "
            "but no CPU, so the rate saturates; the figures are recorded anyway.",
        ],
    }
    out = Path(args.out) if args.out else C.default_out("train_input", device, date)
    result["out"] = str(C.write_json(out, result))
    return result


def report(res: Dict[str, Any]) -> str:
    a = res["args"]
    head = (f"training input on {res['environment']['device']} ({res['environment']['device_type']}, "
            f"{res['environment']['available_cpus']} CPUs): {a['images']} images @ {a['image_size']} px, batch "
            f"{a['batch_size']}, {a['rounds']} rounds")
    rows = [[w, f"{v['old_images_per_s_median']:.1f}", f"{v['new_images_per_s_median']:.1f}",
             f"{v['ratio_new_over_old']:.2f}x"] for w, v in res["workers"].items()]
    return "\n".join([head, C.table(rows, ["workers", "old img/s", "new img/s", "new/old"]), f"-> {res['out']}"])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return C.run_main(run, parse_args, report, argv)


if __name__ == "__main__":
    main()
