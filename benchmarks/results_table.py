#!/usr/bin/env python
"""Print the recorded benchmark results (benchmarks/results/*.json) as Markdown tables.

    python benchmarks/results_table.py [RESULT.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

RESULTS = Path(__file__).resolve().parent / "results"


def _f(x: Optional[float], nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _device(e: Dict[str, Any]) -> str:
    return f"{e['device']} ({e['device_type']}, {e.get('torch_num_threads', '?')} threads)" \
        if e["device_type"] == "cpu" else e["device"]


def _versions(e: Dict[str, Any]) -> str:
    return f"torch {e['torch']}, timm {e['timm']}, open_clip {e['open_clip']}, vlpl {e['vlpl']}"


def _commit(r: Dict[str, Any]) -> str:
    c = r.get("commit")
    return "-" if not c else f"`{c[:8]}`" + ("+changes" if r.get("dirty") else "")


def _int(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _train_row(r: Dict[str, Any], f: Path) -> List[str]:
    e, a, v = r["environment"], r["args"], r["variants"]
    return [
        f"| {r['date']} | {_device(e)} | {a['backbone']}@{a['image_size']} + {a['clip']} x "
        f"{r['config']['views_per_image']} views, batch {a['batch_size']}, {a['steps']} steps x "
        f"{a['rounds']} rounds | {_f(v['cached']['images_per_s_median'])} | "
        f"{_f(v['clip']['images_per_s_median'])} | **{_f(r['ratio'])}x** | {_f(r['expected_ratio'])}x | "
        f"{_versions(e)} | `{f.name}` |"]


def _pl_row(r: Dict[str, Any], f: Path) -> List[str]:
    e, a, v = r["environment"], r["args"], r["variants"]
    ag = r["agreement"]
    lim = v["scorer"]["fraction_of_flop_limit"]
    return [
        f"| {r['date']} | {_device(e)} | {a['clip']}, g={a['grid']}{' + flips' if a['flips'] else ''} "
        f"({r['config']['views_per_image']} views), Scorer batch {a['batch_size']} images, {a['num_images']} images x "
        f"{a['rounds']} rounds | "
        f"{_f(v['scorer']['images_per_s_median'])} | {_f(v['naive']['images_per_s_median'])} | "
        f"**{_f(r['ratio'])}x** | {'-' if lim is None else f'{100 * lim:.0f}%'} | "
        f"{ag['max_abs_diff']:.4f} | {_versions(e)} | `{f.name}` |"]


def _store_rows(r: Dict[str, Any], f: Path) -> List[str]:
    e, a = r["environment"], r["args"]
    out = []
    for x in r["rows"]:
        form = x["form"] + (f" (k={x['k']})" if x.get("k") else "")
        stall = x.get("stall_share")
        out.append(
            f"| {r['date']} | {_device(e)} | {x['classes']:,} | {form} | {a['teacher']}, {x['views']} views, "
            f"D={x['dim']}, {x['images']} images | {_int(x['dense_payload_bytes_per_image'])} | "
            f"{_int(x['score_payload_bytes_per_image'])} | **{_int(x['score_bytes_per_image'])}** | "
            f"{_int(x['store_bytes_per_image'])} | {_f(x['images_per_s_loop'], 1)} | "
            f"{'-' if stall is None else f'{100 * stall:.0f}%'} | {_commit(r)} | `{f.name}` |")
    return out


def _index_rows(r: Dict[str, Any], f: Path) -> List[str]:
    e = r["environment"]
    out = []
    for x in r["rows"]:
        if "error" in x:
            out.append(f"| {r['date']} | {_device(e)} | {x['factory']} | failed: {x['error']} "
                       "| - | - | - | - | - | - | - | - |")
            continue
        for s in x["search"]:
            sp = s["search_params"] or (f"default ({x['default_search_params']})" if x.get("default_search_params")
                                        else "exact")
            out.append(
                f"| {r['date']} | {_device(e)} | {x['factory']} | {x['vectors']:,} x {x['dim']} | "
                f"{x['trained_on']:,} | {_f(x['build_s'], 1)} | {_int(x['rss_growth_mb'])} | "
                f"{_f(x['index_bytes_per_vector'], 0)} | {sp} | **{s['recall_at_10']:.3f}** | "
                f"{_int(s['queries_per_s'])} | {_commit(r)} | `{f.name}` |")
    return out


def _memory_rows(r: Dict[str, Any], f: Path) -> List[str]:
    e = r["environment"]
    out = []
    for row in r["rows"]:
        v = row["views"]
        views = "global view only" if not v["grid"] else f"g = {v['grid']}{' + flips' if v['flips'] else ''}"
        out.append(f"| {r['date']} | {_device(e)} | {_int(row['rows'])} | {row['num_classes']:,} | {views} "
                   f"({v['total']} views) | {row['score_format']} | {_int(row['store_bytes_on_disk'] / 2**20)} | "
                   f"**{_int(row['peak_rss_bytes'] / 2**20)}** | {_int(row.get('loss_state_bytes', 0) / 2**20)} | "
                   f"{_f(row['images_per_s_median'], 1)} | {_commit(r)} | `{f.name}` |")
    return out


# benchmark name -> (title, header, row maker); files of other benchmarks are listed as not tabulated
TABLES: Dict[str, Tuple[str, str, Callable[[Dict[str, Any], Path], List[str]]]] = {
    "train_throughput": (
        "Training (images/s, median over rounds):",
        "| date | device | configuration | cached | clip-in-the-loop | ratio | FLOP-expected | versions | file |",
        _train_row),
    "pseudolabel_throughput": (
        "Pseudolabel scoring (images/s, median over rounds):",
        "| date | device | configuration | Scorer | naive PIL loop | ratio | Scorer of FLOP limit "
        "| max abs diff | versions | file |",
        _pl_row),
    "scaling_store": (
        "Store bytes per image and pseudolabel throughput vs classes C and score form (bytes per image; "
        "\"scores\" = the score columns compressed in Parquet):",
        "| date | device | C | form | teacher, views | dense payload | form payload | scores | whole row "
        "| images/s | writer stall | commit | file |",
        _store_rows),
    "train_memory": (
        "Training process peak RSS vs the number of images N (one process, real loader, the rule's scores read per "
        "batch from the store; the target: < 10% growth from N = 10k to 1M at C = 1,000):",
        "| date | device | N | C | views | form | store MB | peak RSS MB | loss state MB | images/s | commit | file |",
        _memory_rows),
    "scaling_index": (
        "FAISS index types (recall@10 vs exact search; build = train on a sample + add, shard by shard):",
        "| date | device | factory | vectors | trained on | build s | RSS growth MB | bytes/vector "
        "| search | recall@10 | queries/s | commit | file |",
        _index_rows),
}


def tables(files: Sequence[Path]) -> str:
    rows: Dict[str, List[str]] = {k: [] for k in TABLES}
    other: List[str] = []
    for f in sorted(Path(x) for x in files):
        r: Dict[str, Any] = json.loads(Path(f).read_text())
        kind = r.get("benchmark")
        if kind in TABLES:
            rows[kind] += TABLES[kind][2](r, f)
        else:
            other.append(f"`{f.name}` ({kind or 'no benchmark name'})")
    out: List[str] = []
    for kind, (title, header, _) in TABLES.items():
        if rows[kind]:
            out += [title, "", header, "|" + "---|" * (header.count("|") - 1), *rows[kind], ""]
    if other:
        out += ["Not tabulated here (their own sections above give their tables): " + ", ".join(other), ""]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``results_table.py [--out FILE] [RESULT.json ...]``: the tables on stdout, or written to FILE
    (``--out benchmarks/results/README.md`` regenerates the recorded-results page)."""
    args = list(sys.argv[1:] if argv is None else argv)
    out: Optional[Path] = None
    if "--out" in args:
        i = args.index("--out")
        out = Path(args[i + 1])
        del args[i : i + 2]
    files = [Path(a) for a in args] or sorted(RESULTS.glob("*.json"))
    text = tables(files)
    if out is None:
        print(text)
        return
    head = ("# Recorded benchmark results\n\nGenerated by `python benchmarks/results_table.py --out "
            "benchmarks/results/README.md` from the JSON files in this folder (each with its command, commit, "
            "machine, versions and date); `benchmarks/README.md` explains each benchmark and gives the GPU "
            "commands.\n\n")
    out.write_text(head + text, encoding="utf-8")


if __name__ == "__main__":
    main()
