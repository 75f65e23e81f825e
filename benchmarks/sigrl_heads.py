#!/usr/bin/env python
"""Peak memory and step time of SigRL's head (``vlpl/train/heads/sigrl.py``) vs the number of classes C.

One training step of the head alone: given a backbone's tokens (B, N, F) and pooled feature (B, F) (random,
requiring grad, as a backbone's would), the ``sigrl`` head's forward (GMC over the label graph, SDA +
semantic mixing + VFR in class chunks, local + global matching), a BCE loss, the backward pass and an Adam
step. SigRL's dimensions by default: N = 196 patches and F = D = 512 (CLIP ViT-B/16 at 224), random unit
class embeddings (C up to 10,000 has no real ones). Each (C, B, variant) runs in a fresh subprocess, so
that its peak memory is its own:

* on a GPU, ``torch.cuda.max_memory_allocated`` during the steps, minus what was allocated before them;
* on a CPU, the growth of the process's peak RSS (``ru_maxrss``) over the steps (includes allocator
  caching; an upper bound of the working set).

Variants: ``chunked`` (the default ``chunk_mb``, 256 MiB per (B, N, classes, F) working tensor, chunks
recomputed in backward) and, where it fits, ``unchunked`` (one chunk holding every class: what SDA as
written costs). The label graph is the head's default: dense up to 2,048 classes, k-nearest-neighbour
(k = 32) above.

    python benchmarks/sigrl_heads.py                                  # CPU: C = 80 (B 8), 1,000 (B 1), 10,000 (B 1)
    python benchmarks/sigrl_heads.py --device cuda --classes 80,1000,10000 --batch-sizes 32,32,8 --steps 10
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import (  # noqa: E402
    RESULTS_DIR,
    device_name,
    environment,
    median,
    now_date,
    now_iso,
    resolve_device,
    slug,
    table,
    write_json,
)

log = logging.getLogger("benchmarks.sigrl_heads")

NAME = "sigrl_heads"
UNCHUNKED_MB = 1e9  # chunk_mb large enough that every class fits one chunk


def _ints(text: str) -> List[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", default="80,1000,10000", help="comma-separated class counts C")
    p.add_argument("--batch-sizes", default="8,1,1", help="batch size per C (one value: the same for all)")
    p.add_argument("--patches", type=int, default=196, help="tokens per image N (ViT-B/16 at 224: 196)")
    p.add_argument("--features", type=int, default=512, help="feature width F (= class embedding width D)")
    p.add_argument("--chunk-mb", type=float, default=256.0, help="the chunked variant's chunk_mb")
    p.add_argument("--unchunked-max-classes", type=int, default=1000,
                   help="also run the unchunked variant up to this C (its memory grows with C)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--warmup-max-classes", type=int, default=5000,
                   help="no warm-up step above this C (a CPU step at C = 10,000 takes minutes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads on a CPU (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/sigrl_heads-<device>-<date>.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one configuration, JSON on stdout
    return p.parse_args(argv)


def _rss_mib() -> float:
    """Peak RSS of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mib() -> float:
    """Current RSS of this process (MiB; /proc/self/statm, else the peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _rss_mib()


def run_one(classes: int, batch: int, variant: str, args: argparse.Namespace) -> Dict[str, Any]:
    """One configuration in this process: build the head and inputs, warm up, time ``args.steps`` steps."""
    from vlpl.registry import HEADS
    from vlpl.train.heads.sigrl import classes_per_chunk
    from vlpl.train.model import ClassContext, ModelOutput

    device = resolve_device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n, f = args.patches, args.features
    g = np.random.default_rng(args.seed)
    emb = g.standard_normal((classes, f)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ctx = ClassContext([f"class {i}" for i in range(classes)], emb)
    chunk_mb = args.chunk_mb if variant == "chunked" else UNCHUNKED_MB
    t0 = time.perf_counter()
    head = HEADS.create("sigrl", in_features=f, context=ctx, chunk_mb=chunk_mb).to(device).train()
    build_s = time.perf_counter() - t0
    opt = torch.optim.Adam(head.parameters(), lr=1e-5)
    tokens = torch.randn(batch, n, f, device=device, requires_grad=True)
    pooled = torch.randn(batch, f, device=device, requires_grad=True)
    target = (torch.rand(batch, classes, device=device) < 3.0 / 80).float()

    def step() -> None:
        logits = head(ModelOutput(pooled, tokens))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad(set_to_none=True)
        tokens.grad = pooled.grad = None
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:  # the current RSS now; the peak RSS at the end is the max over warm-up and timed steps alike
        base = _current_rss_mib()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20 - base
        kind = "cuda max_memory_allocated during the steps minus allocated before (MiB)"
    else:
        peak = _rss_mib() - base
        kind = ("peak RSS of the process minus its RSS after building the head and inputs (MiB; the steps' "
                "working memory, allocator caching and first-call lazy imports included)")
    per_class = batch * n * f
    return {
        "classes": classes, "batch_size": batch, "variant": variant, "chunk_mb": None if variant != "chunked" else chunk_mb,
        "classes_per_chunk": min(classes, classes_per_chunk(chunk_mb, per_class)),
        "graph": head.graph_kind,
        "graph_edges": classes * classes if head.graph_kind == "dense" else int(head.neighbors.numel()),
        "unchunked_working_tensor_mib": per_class * classes * 4 / 2**20,
        "head_parameters": sum(p.numel() for p in head.parameters()),
        "build_s": build_s, "step_s_rounds": times, "step_s_median": median(times),
        "peak_memory_mib": peak, "memory_measure": kind,
        "rss_total_mib": _rss_mib() if device.type == "cpu" else None,
    }


def _child(args: argparse.Namespace, classes: int, batch: int, variant: str) -> Dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{classes},{batch},{variant}",
           "--patches", str(args.patches), "--features", str(args.features), "--chunk-mb", str(args.chunk_mb),
           "--steps", str(args.steps), "--warmup", str(args.warmup if classes <= args.warmup_max_classes else 0),
           "--device", args.device,
           "--threads", str(args.threads), "--seed", str(args.seed)]
    log.info("C=%d B=%d %s ...", classes, batch, variant)
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["(no output)"]
        log.warning("C=%d B=%d %s failed (exit %d): %s", classes, batch, variant, res.returncode, tail[0])
        return {"classes": classes, "batch_size": batch, "variant": variant, "error": tail[0],
                "exit_code": res.returncode}
    row = json.loads(res.stdout.strip().splitlines()[-1])
    log.info("C=%d B=%d %s: %.2f s/step, %.0f MiB", classes, batch, variant, row["step_s_median"],
             row["peak_memory_mib"])
    return row


def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = resolve_device(args.device)
    classes = _ints(args.classes)
    batches = _ints(args.batch_sizes)
    if len(batches) == 1:
        batches = batches * len(classes)
    if len(batches) != len(classes):
        raise SystemExit(f"--batch-sizes: {len(batches)} values for {len(classes)} class counts")
    rows = []
    for c, b in zip(classes, batches):
        rows.append(_child(args, c, b, "chunked"))
        if c <= args.unchunked_max_classes:
            rows.append(_child(args, c, b, "unchunked"))
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    result = {
        "benchmark": NAME,
        "date": now_date(),
        "timestamp": now_iso(),
        "environment": environment(device),
        "args": vars(args) | {"child": None},
        "config": {"patches": args.patches, "features": args.features, "class_embedding_dim": args.features,
                   "head": "sigrl (defaults: GMC 4 x 32 GATv2, dropout 0.3, top-k 16, norm batch)",
                   "step": "head forward + BCE + backward (to the head, the tokens and the pooled feature) + Adam"},
        "rows": rows,
        "notes": [
            "The head alone: the backbone is not run (its tokens and pooled feature are random tensors "
            "requiring grad). Class embeddings are random unit vectors of width F (no projection).",
            "CPU memory is the process's peak RSS minus its RSS once the head and inputs are built (the steps' "
            "working memory; allocator caching and first-call imports, ~25 MiB, included); GPU memory is "
            "torch.cuda.max_memory_allocated minus what was allocated before the steps.",
            "'unchunked' = every class in one chunk (no recomputation): SDA as the released code computes it.",
        ],
    }
    out = Path(args.out) if args.out else RESULTS_DIR / f"{NAME}-{slug(device_name(device))}-{result['date']}.json"
    write_json(out, result)
    result["out"] = str(out)
    return result


def report(res: Dict[str, Any]) -> str:
    rows = []
    for r in res["rows"]:
        if "error" in r:
            rows.append([f"{r['classes']:,}", str(r["batch_size"]), r["variant"], "-", "-", "-", "-", r["error"][:40]])
            continue
        rows.append([f"{r['classes']:,}", str(r["batch_size"]), r["variant"], str(r["classes_per_chunk"]),
                     f"{r['graph']} ({r['graph_edges']:,} edges)", f"{r['unchunked_working_tensor_mib']:,.0f}",
                     f"{r['step_s_median']:.3f}", f"{r['peak_memory_mib']:,.0f}"])
    head = ["C", "B", "variant", "classes/chunk", "label graph", "(B,N,C,F) MiB", "s/step", "peak MiB"]
    return f"{res['environment']['device']}: N={res['config']['patches']}, F={res['config']['features']}\n" \
        + table(rows, head) + f"\n-> {res.get('out')}"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        c, b, variant = args.child.split(",")
        row = run_one(int(c), int(b), variant, args)
        print(json.dumps(row))
        return row
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    res = run(args)
    print(report(res))
    return res


if __name__ == "__main__":
    main()
