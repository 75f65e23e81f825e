#!/usr/bin/env python
"""Print the recorded benchmark results (benchmarks/results/*.json) as Markdown tables.

    python benchmarks/results_table.py [RESULT.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def _f(x: Optional[float], nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def tables(files: Sequence[Path]) -> str:
    train: List[str] = []
    pl: List[str] = []
    for f in sorted(files):
        r: Dict[str, Any] = json.loads(Path(f).read_text())
        e, a, v = r["environment"], r["args"], r["variants"]
        dev = f"{e['device']} ({e['device_type']}, {e.get('torch_num_threads', '?')} threads)" \
            if e["device_type"] == "cpu" else e["device"]
        vers = f"torch {e['torch']}, timm {e['timm']}, open_clip {e['open_clip']}, vlpl {e['vlpl']}"
        if r["benchmark"] == "train_throughput":
            train.append(
                f"| {r['date']} | {dev} | {a['backbone']}@{a['image_size']} + {a['clip']} x "
                f"{r['config']['views_per_image']} views, batch {a['batch_size']}, {a['steps']} steps x "
                f"{a['rounds']} rounds | {_f(v['cached']['images_per_s_median'])} | "
                f"{_f(v['clip']['images_per_s_median'])} | **{_f(r['ratio'])}x** | {_f(r['expected_ratio'])}x | "
                f"{vers} | `{f.name}` |")
        elif r["benchmark"] == "pseudolabel_throughput":
            ag = r["agreement"]
            lim = v["scorer"]["fraction_of_flop_limit"]
            pl.append(
                f"| {r['date']} | {dev} | {a['clip']}, g={a['grid']}{' + flips' if a['flips'] else ''} "
                f"({r['config']['views_per_image']} views), Scorer batch {a['batch_size']} images, {a['num_images']} images x "
                f"{a['rounds']} rounds | "
                f"{_f(v['scorer']['images_per_s_median'])} | {_f(v['naive']['images_per_s_median'])} | "
                f"**{_f(r['ratio'])}x** | {'-' if lim is None else f'{100 * lim:.0f}%'} | "
                f"{ag['max_abs_diff']:.4f} | {vers} | `{f.name}` |")
    out: List[str] = []
    if train:
        out += ["Training (images/s, median over rounds):", "",
                "| date | device | configuration | cached | clip-in-the-loop | ratio | FLOP-expected | versions | file |",
                "|---|---|---|---|---|---|---|---|---|", *train, ""]
    if pl:
        out += ["Pseudolabel scoring (images/s, median over rounds):", "",
                "| date | device | configuration | Scorer | naive PIL loop | ratio | Scorer of FLOP limit "
                "| max abs diff | versions | file |",
                "|---|---|---|---|---|---|---|---|---|---|", *pl, ""]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    files = [Path(a) for a in args] or sorted(RESULTS.glob("*.json"))
    print(tables(files))


if __name__ == "__main__":
    main()
