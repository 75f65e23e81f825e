"""``vlpl evaluate --compare RUN [RUN ...] --out DIR``: one comparison table across evaluated runs.

Each RUN is a run directory with ``eval/report.json`` (or an eval directory, or a ``report.json``), as
:func:`vlpl.eval.report.load_report` reads it. The comparison has one row per run and, for every score store
the runs trained on, the **teacher's zero-shot baseline** (what a user gets with no training: the global view's
and DAMP's mAP on the same split, :func:`vlpl.eval.report.teacher_baseline`; taken from the run's report when it
has it, else measured on the store). Where the evaluation labels are partial the **masked mAP** (CSL's
``mAP_partial``, annotated entries only) stands beside Cole's mAP, and the table says which is which.

Written into DIR (atomically): ``compare.md`` (the table, percent), ``compare.json`` (every value, the same
numbers as each run's report: nothing is recomputed for a run), ``compare.png`` (mAP per run, masked mAP beside
it where present, the teacher baselines as dashed lines).

Columns: ``name`` (the run directory's name; for a sweep, the variant's), ``method``, ``loss``, ``rule``,
``observed`` (the store's observed-label protocol, e.g. ``partial keep=0.5``), ``best epoch`` and ``val mAP`` (the
run's model selection, from its ``summary.json``: pick a grid's best variant by it), ``split``, ``images``, ``mAP``,
``masked mAP`` (partial labels only), ``CF1``, ``OF1``, and ``vs teacher``: the run's mAP minus the teacher's
global-view zero-shot mAP on the same store and split, in points.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from vlpl.eval.report import jsonable, load_report, utc_now
from vlpl.store.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["COMPARE_SCHEMA", "comparison", "render_comparison", "plot_comparison", "write_comparison"]

COMPARE_SCHEMA = "vlpl.compare/1"


def _observed_label(store: Optional[str]) -> Optional[str]:
    """``partial keep=0.5``-style description of the store's observed-label protocol (None if unreadable)."""
    if not store:
        return None
    try:
        from vlpl.store.store import ScoreStore

        # a store, a teacher ensemble (directory or list: its members share the observed labels), an export
        entry = ScoreStore.open(store).manifest.get("observed")
    except Exception as e:  # a moved / deleted store: the column is left empty
        log.debug("observed protocol of %s not read: %s", store, e)
        return None
    if not isinstance(entry, dict):
        return None
    extra = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("mode", "seed"))
    return f"{entry.get('mode')}{' ' + extra if extra else ''}"


def _store_key(store: Any) -> str:
    if isinstance(store, (list, tuple)):
        return "+".join(str(Path(s).resolve()) for s in store)
    return str(Path(store).resolve())


def _row(rep: Dict[str, Any], observed: Dict[str, Optional[str]]) -> Dict[str, Any]:
    """One comparison row of a report; ``observed``: the stores' protocol descriptions read so far, by store key
    (each store is opened once however many runs used it)."""
    run = rep.get("run") or {}
    cfg = run.get("train_config") or {}
    summary = dict(rep["summary"])
    store = (run.get("summary") or {}).get("store") or cfg.get("store")
    key = _store_key(store) if store else None
    if key and key not in observed:
        observed[key] = _observed_label(store)
    return {
        "name": summary.get("name"),
        "report": rep["_path"],
        "method": cfg.get("method"),
        "loss": (cfg.get("loss") or {}).get("name"),
        "rule": (cfg.get("pseudo") or {}).get("rule") or ("none" if cfg else None),
        "rule_params": (cfg.get("pseudo") or {}).get("params") or {},
        "store": store,
        "observed": observed[key] if key else None,
        "kind": summary.get("kind"),
        "split": summary.get("split"),
        "num_images": summary.get("num_images"),
        "map": summary.get("map"),
        "map_pos": summary.get("map_pos"),
        "masked_map": summary.get("masked_map"),
        "CF1": summary.get("CF1"),
        "OF1": summary.get("OF1"),
        "best_by": (run.get("summary") or {}).get("select"),
        "best_epoch": (run.get("summary") or {}).get("best_epoch"),
        "best_val_map": (run.get("summary") or {}).get("best_val_map"),
        "test_map_at_best": (run.get("summary") or {}).get("test_map_at_best"),
    }


def _baseline_of(rep: Dict[str, Any], row: Dict[str, Any], measure: bool) -> Optional[Dict[str, Any]]:
    base = rep.get("baseline")
    if base:
        return base
    if not measure or not row["store"] or row["kind"] != "run":
        return None
    from vlpl.eval.report import teacher_baseline

    try:
        return teacher_baseline(row["store"], row["split"], row["rule"], row["rule_params"])
    except Exception as e:  # e.g. the store moved: the row says so instead of failing the whole table
        log.warning("teacher baseline of %s on %s not measured: %s", row["store"], row["split"], e)
        return None


def comparison(paths: Sequence[Any], *, measure_baseline: bool = True) -> Dict[str, Any]:
    """The comparison document (see the module docstring) of the reports at ``paths``."""
    if not paths:
        raise ValueError("compare: give at least one run, eval directory or report.json")
    reports = [load_report(p) for p in paths]
    observed: Dict[str, Optional[str]] = {}
    rows = [_row(r, observed) for r in reports]
    names = [r["name"] for r in rows]
    for r in rows:
        if names.count(r["name"]) > 1:  # the same directory name from two places
            r["name"] = f"{r['name']} ({Path(r['report']).parent})"
    baselines: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for rep, row in zip(reports, rows):
        if not row["store"]:
            row["vs_teacher"] = None
            continue
        key = (_store_key(row["store"]), str(row["split"]))
        if key not in baselines:
            base = _baseline_of(rep, row, measure_baseline)
            if base is not None:
                baselines[key] = {"store": row["store"], "split": row["split"], "observed": row["observed"],
                                  "num_images": base.get("num_images"),
                                  "scores": {v: {"map": s.get("map"), "map_pos": s.get("map_pos"),
                                                 **({"masked_map": s["masked_map"]} if "masked_map" in s else {})}
                                             for v, s in (base.get("scores") or {}).items()}}
        b = baselines.get(key)
        g = ((b or {}).get("scores") or {}).get("global", {}).get("map")
        row["teacher_global_map"] = g
        row["teacher_damp_map"] = ((b or {}).get("scores") or {}).get("damp", {}).get("map")
        row["vs_teacher"] = None if g is None or row["map"] is None else row["map"] - g
    return jsonable({
        "schema": COMPARE_SCHEMA,
        "created": utc_now(),
        "units": {"map": "percent", "map_pos": "percent", "masked_map": "percent", "CF1": "percent",
                  "OF1": "percent", "teacher_global_map": "percent", "teacher_damp_map": "percent",
                  "best_val_map": "percent", "test_map_at_best": "percent",
                  "vs_teacher": "points"},
        "rows": rows,
        "baselines": list(baselines.values()),
    })


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _cell(v: Any) -> str:
    return "" if v is None else str(v).replace("|", "\\|")


def render_comparison(doc: Dict[str, Any]) -> str:
    """``compare.md``: the runs' table, then the teacher baselines (every metric in percent)."""
    rows = doc["rows"]
    masked = any(r.get("masked_map") is not None for r in rows)
    head = ["name", "kind", "method", "loss", "rule", "observed", "best epoch", "val mAP (%)", "split", "images",
            "mAP (%)"]
    head += ["masked mAP (%)"] if masked else []
    head += ["CF1 (%)", "OF1 (%)", "vs teacher (points)"]
    out = ["# Comparison", "", f"{len(rows)} run(s). mAP is Cole et al.'s (every class, AP 0 without positives); "
           "`vs teacher` is the run's mAP minus the teacher's global-view zero-shot mAP on the same store and split; "
           "`kind` is `run` for a trained model, `zero-shot:<view>` for a store's own evaluation.",
           ""]
    if masked:
        out += ["Partial evaluation labels: `mAP` counts unknown entries as negatives; **masked mAP** (CSL's "
                "`mAP_partial`, annotated entries only, classes without an annotated positive or negative skipped) "
                "is the number to read for those rows.", ""]
    out += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["name"], r.get("kind"), r.get("method"), r.get("loss"), r.get("rule"), r.get("observed"),
                 r.get("best_epoch"),
                 _pct(r.get("best_val_map")), r.get("split"), r.get("num_images"), _pct(r.get("map"))]
        cells += [_pct(r.get("masked_map"))] if masked else []
        vs = r.get("vs_teacher")
        cells += [_pct(r.get("CF1")), _pct(r.get("OF1")), "n/a" if vs is None else f"{vs:+.2f}"]
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if doc["baselines"]:
        # partial evaluation labels: the teacher's masked mAP too, to read beside the runs' masked mAP
        b_masked = any("masked_map" in v for b in doc["baselines"] for v in (b.get("scores") or {}).values())
        bhead = ["store", "observed", "split", "images", "global view mAP (%)", "DAMP mAP (%)"]
        bhead += ["global view masked mAP (%)", "DAMP masked mAP (%)"] if b_masked else []
        out += ["", "## Teacher zero-shot baseline (no training)", "",
                "| " + " | ".join(bhead) + " |", "|" + "|".join("---" for _ in bhead) + "|"]
        for b in doc["baselines"]:
            s = b["scores"]
            g, d = s.get("global") or {}, s.get("damp") or {}
            cells = [_cell(b["store"]), _cell(b.get("observed")), _cell(b["split"]), _cell(b.get("num_images")),
                     _pct(g.get("map")), _pct(d.get("map"))]
            cells += [_pct(g.get("masked_map")), _pct(d.get("masked_map"))] if b_masked else []
            out.append("| " + " | ".join(cells) + " |")
    else:
        out += ["", "Teacher zero-shot baseline: not available (the runs' stores could not be read)."]
    return "\n".join(out) + "\n"


def plot_comparison(doc: Dict[str, Any], path: Path) -> Path:
    """``compare.png``: a bar per run (mAP; masked mAP beside it where present), the teacher baselines dashed."""
    import numpy as np

    from vlpl.eval.plots import _new_figure, _save, plot_style

    rows = doc["rows"]
    names = [str(r["name"]) for r in rows]
    maps = np.array([np.nan if r.get("map") is None else r["map"] for r in rows], float)
    masked = [r.get("masked_map") for r in rows]
    has_masked = any(m is not None for m in masked)
    with plot_style():
        fig = _new_figure(max(5.0, 0.6 * len(rows) + 3.0), 4.0)
        ax = fig.add_subplot(1, 1, 1)
        x = np.arange(len(rows))
        w = 0.4 if has_masked else 0.6
        ax.bar(x - (w / 2 if has_masked else 0), np.nan_to_num(maps), width=w, label="mAP (Cole)")
        if has_masked:
            ax.bar(x + w / 2, [np.nan if m is None else m for m in masked], width=w, label="masked mAP")
        styles = ["--", ":", "-."]
        for i, b in enumerate(doc["baselines"]):
            for view, color in (("global", "#555555"), ("damp", "#D55E00")):
                v = (b["scores"].get(view) or {}).get("map")
                if v is not None:
                    tag = f" ({Path(str(b['store'])).name})" if len(doc["baselines"]) > 1 else ""
                    ax.axhline(v, color=color, linestyle=styles[i % len(styles)], linewidth=1.2,
                               label=f"teacher zero-shot, {view}{tag}")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30 if len(rows) > 3 else 0, ha="right" if len(rows) > 3 else "center")
        ax.set_ylabel("mAP (%)")
        split = {str(r.get("split")) for r in rows}
        ax.set_title(f"runs compared on split {', '.join(sorted(split))}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return _save(fig, path)


def write_comparison(paths: Sequence[Any], out: Any, *, measure_baseline: bool = True) -> Path:
    """Write ``compare.md``, ``compare.json`` and ``compare.png`` for the runs at ``paths`` into ``out``."""
    out = Path(out)
    doc = comparison(paths, measure_baseline=measure_baseline)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", doc)
    atomic_write_text(out / "compare.md", render_comparison(doc))
    plot_comparison(doc, out / "compare.png")
    log.info("comparison of %d run(s): %s", len(doc["rows"]), out / "compare.md")
    return out

