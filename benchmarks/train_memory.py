#!/usr/bin/env python
"""Training process peak RSS and step rate vs the number of images N (issue 10, "Benchmarks").

For each score store given (synthetic stores from ``benchmarks/synthetic.py``: N rows cycling over coco256's
images, C = 1,000), one fresh Python process runs what ``vlpl train`` runs before and during its first epoch:
``vlpl.train.loop.setup`` (store readers, model, loss, rule, optimizer) and ``train_epoch`` for ``--steps``
steps (the real loader: workers decode coco256 JPEGs, the rule's scores read from the store per batch),
then reports its peak resident memory and the step rate. Evaluation and checkpoints are left out (no val/test
split, no mid-epoch checkpoint): they are not per-step costs.

Memory is read from ``/proc/self/status`` at the end: ``VmHWM`` (peak RSS, file-backed pages of memory maps
included), and the ``RssAnon`` / ``RssFile`` split at the end; ``ru_maxrss`` of the DataLoader workers is
recorded separately (``RUSAGE_CHILDREN``). The store's sidecars (built on a store's first open) are built by
the parent before the measured process starts. Each process also reports how many bytes the loss's own
per-sample state holds (``N x C`` for the label-state losses), the part of the memory that grows with N
by design of the loss, not of the reader.

Make the stores, then measure (CPU; the recorded run)::

    python benchmarks/synthetic.py --rows 10000 --classes 1000 --grid 2 --out /tmp/synth/n10k-g2
    python benchmarks/synthetic.py --rows 100000 --classes 1000 --grid 2 --out /tmp/synth/n100k-g2
    python benchmarks/synthetic.py --rows 10000 --classes 1000 --grid 0 --no-flips --out /tmp/synth/n10k-global
    python benchmarks/synthetic.py --rows 1000000 --classes 1000 --grid 0 --no-flips --out /tmp/synth/n1m-global
    python benchmarks/train_memory.py --stores /tmp/synth/n10k-g2 /tmp/synth/n100k-g2 \\
        /tmp/synth/n10k-global /tmp/synth/n1m-global --steps 30

GPU (a ResNet-50@448 student in bf16; the same stores)::

    python benchmarks/train_memory.py --stores ... --steps 100 --student resnet50 --image-size 448 \\
        --batch-size 64 --device cuda
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

log = logging.getLogger("benchmarks.train_memory")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stores", nargs="+", required=True, help="score stores (e.g. from benchmarks/synthetic.py)")
    p.add_argument("--steps", type=int, default=30, help="training steps measured per store")
    p.add_argument("--student", default="test_resnet", help="timm model of the student")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--method", default="aevlp", help="vlpl method (rule + loss)")
    p.add_argument("--num-workers", default="auto")
    p.add_argument("--device", default="auto", help="auto or cpu (the child process picks CUDA when available)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/train_memory-<device>-<date>.json)")
    return p.parse_args(argv)


def _status() -> Dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of this process in bytes (Linux)."""
    out: Dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def child(args: argparse.Namespace) -> Dict[str, Any]:
    """The measured process: setup + train_epoch for ``--steps`` steps on one store."""
    import torch

    from vlpl.train.loop import setup, train_epoch
    from vlpl.train.recipes import load_train_config

    logging.disable(logging.WARNING)
    store = Path(args.child)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlpl-trainmem-") as tmp:
        cfg = load_train_config([], [
            f"store={store}", f"out={tmp}/run", f"method={args.method}", "dataset=coco2014",
            "student.kind=timm", f"student.name={args.student}", "student.pretrained=false",
            f"student.image_size={args.image_size}", f"batch_size={args.batch_size}", "epochs=1",
            f"max_steps_per_epoch={args.steps}", "val_split=none", "test_split=none", "progress=false",
            "checkpoint_every_minutes=null", "log_every=5", f"num_workers={args.num_workers}"])
        before_setup = _status()  # imports done (torch, timm, vlpl): the baseline
        run = setup(cfg)
        after_setup = _status()
        t_setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        train_epoch(run, 1)
        t_epoch = time.perf_counter() - t1
        recs = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "step"]
    ips = [r["images_per_s"] for r in steps[1:]] or [r["images_per_s"] for r in steps]
    loss_state = sum(t.numel() * t.element_size() for t in run.loss.state_dict().values() if torch.is_tensor(t))
    end = _status()
    return {
        "store": str(store), "rows_train": len(run.train), "num_classes": run.store.num_classes,
        "views_total": run.store.view_spec.num_views,
        "num_workers": run.num_workers, "device": str(run.accelerator.device),
        "peak_rss_bytes": end["VmHWM"], "end_rss_anon_bytes": end.get("RssAnon"),
        "end_rss_file_bytes": end.get("RssFile"), "before_setup": before_setup, "after_setup": after_setup,
        "loss_per_sample_state": {k: list(v) for k, v in run.loss.per_sample_state().items()},
        "workers_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "loss_state_bytes": int(loss_state), "setup_s": t_setup, "epoch_s": t_epoch, "steps": len(steps) and
        steps[-1]["step"], "images_per_s_median": C.median(ips), "images_per_s_logged": ips,
        "steps_per_s_median": C.median(ips) / args.batch_size,
        "data_wait_frac_last": steps[-1]["data_wait_frac"] if steps else None,
    }


def _prepare(store: Path) -> Dict[str, Any]:
    """Open the store once (its sidecars are built on first use) and describe it."""
    from vlpl.store.store import ScoreStore

    t0 = time.perf_counter()
    st = ScoreStore(store)
    tr = st.split("train")
    # one row in every 256 touches every shard: the per-shard sidecars (built on a shard's first read) are
    # all built here, not in the measured process's first steps
    for k in range(0, len(tr), 256 * 64):
        tr.scores(np.arange(k, min(k + 256 * 64, len(tr)), 256))
    sizes = [p.stat().st_size for p in store.rglob("*") if p.is_file()]
    spec = st.view_spec
    return {"rows": int(st.manifest.get("num_rows", 0)), "rows_train": len(tr), "num_classes": st.num_classes,
            "score_format": st.manifest.get("score_format", "dense"),
            "views": {"grid": getattr(spec, "grid", None), "flips": getattr(spec, "flips", None),
                      "total": getattr(spec, "num_views", None)},
            "store_bytes_on_disk": int(sum(sizes)), "prepare_s": time.perf_counter() - t0,
            "load_average_before": list(os.getloadavg())}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    device = C.resolve_device(args.device)
    date = C.now_date()
    rows: List[Dict[str, Any]] = []
    for s in args.stores:
        store = Path(s).resolve()
        info = _prepare(store)
        log.info("%s: %s", store, info)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = Path(f.name)
        env = {**os.environ, "PYTHONPATH": str(C.REPO_ROOT)}
        if device.type == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stores", str(store), "--child", str(store),
               "--child-out", str(out), "--steps", str(args.steps), "--student", args.student, "--image-size",
               str(args.image_size), "--batch-size", str(args.batch_size), "--method", args.method,
               "--num-workers", str(args.num_workers)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"the training process on {store} failed:\n{r.stderr[-3000:]}")
        res = json.loads(out.read_text())
        out.unlink()
        rows.append({**info, **res, "load_average_after": list(os.getloadavg())})
        log.info("%s: peak RSS %.0f MB, %.1f images/s", store.name, res["peak_rss_bytes"] / 2**20,
                 res["images_per_s_median"])
    result = {
        "benchmark": "train_memory", "date": date, "timestamp_utc": C.now_iso(),
        "command": "python benchmarks/train_memory.py " + " ".join(sys.argv[1:]), "commit": C.git_commit(),
        "environment": C.environment(device), "torch_threads": torch.get_num_threads(), "args": vars(args),
        "rows": rows,
        "notes": [
            "peak_rss_bytes: VmHWM of the training process (main process; DataLoader workers separately), after "
            "setup() and --steps steps of train_epoch(); file-backed pages of memory-mapped store files count in "
            "RSS while resident (they are the shared page cache, reclaimable); end_rss_anon/file split them.",
            "loss_state_bytes: the loss's state_dict tensors; loss_per_sample_state: those with N rows (only the "
            "stateful losses have any: ROLE's estimator, LL-Cp's int8 labels, EM+APL's soft targets; the default "
            "method's GPR has none). before_setup / after_setup: /proc/self/status after the imports and after "
            "setup().",
            "images_per_s: the trainer's own logged rate (every 5 steps, the first window dropped), median.",
            "The machine is shared: compare the rows of one run, not runs.",
        ],
    }
    out = Path(args.out) if args.out else C.default_out("train_memory", device, date)
    result["out"] = str(C.write_json(out, result))
    return result


def report(res: Dict[str, Any]) -> str:
    rows = [[Path(r["store"]).name, f"{r['rows']:,}", str(r["num_classes"]), str(r["views"].get("total")),
             f"{r['store_bytes_on_disk'] / 2**20:.0f}", f"{r['peak_rss_bytes'] / 2**20:.0f}",
             f"{(r['end_rss_anon_bytes'] or 0) / 2**20:.0f}", f"{r['loss_state_bytes'] / 2**20:.0f}",
             f"{r['images_per_s_median']:.1f}"] for r in res["rows"]]
    head = ["store", "N", "C", "views", "store MB", "peak RSS MB", "anon MB (end)", "loss state MB", "img/s"]
    return "\n".join([f"training memory on {res['environment']['device']}", C.table(rows, head), f"-> {res['out']}"])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        res = child(args)
        Path(args.child_out).write_text(json.dumps(res))
        return res
    return C.run_main(run, lambda _: args, report, argv)


if __name__ == "__main__":
    main()
