"""The evaluation report: plain-data assembly, Markdown rendering and the cross-run comparison table.

``report.json`` is the complete, machine-readable record; ``report.md`` is what a person reads first.
Everything here works on plain dicts (as ``report.json`` holds them), so a report can be re-rendered
or compared without recomputing anything.

Units: mAP / AP are in percent (Cole et al.); the metric functions return precision / recall / F1 as
fractions in [0, 1], and the Markdown tables print them in percent too.
"""
from __future__ import annotations

import json
import logging
import math
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "REPORT_SCHEMA",
    "jsonable",
    "package_versions",
    "utc_now",
    "metric_row",
    "render_markdown",
    "load_report",
    "compare_table",
]

REPORT_SCHEMA = "vlpl.evaluate/1"
TOP_N = 10

_PACKAGES = {"vlpl": "vlpl", "torch": "torch", "numpy": "numpy", "open_clip": "open_clip_torch",
             "matplotlib": "matplotlib"}


# --------------------------------------------------------------------------------------------------
# plain data
# --------------------------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays turned into Python values, tuples into lists, paths into
    strings and non-finite floats into ``None`` (so that ``report.json`` is strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def package_versions() -> Dict[str, Optional[str]]:
    """Installed versions of the packages that shape the numbers (``None`` when absent)."""
    out: Dict[str, Optional[str]] = {}
    for key, dist in _PACKAGES.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    if out["vlpl"] is None:
        from vlpl import __version__

        out["vlpl"] = __version__
    out["python"] = platform.python_version()
    return out


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def metric_row(name: str, kind: str, split: str, metrics: Dict[str, Any], num_images: int) -> Dict[str, Any]:
    """One headline row from a metrics dict (``map``, ``map_pos``, ``f1``, ``f1_topk``)."""
    f1, topk = metrics["f1"], metrics["f1_topk"]
    return {
        "name": name,
        "kind": kind,
        "split": split,
        "num_images": int(num_images),
        "map": metrics["map"],
        "map_pos": metrics["map_pos"],
        "CF1": f1["CF1"],
        "OF1": f1["OF1"],
        "f1_threshold": f1["threshold"],
        "CF1_topk": topk["CF1"],
        "OF1_topk": topk["OF1"],
        "top_k": topk["k"],
    }


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v: Any, digits: int = 2) -> str:
    return "n/a" if v is None else f"{100.0 * float(v):.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def _headline_table(rows: List[Dict[str, Any]]) -> List[str]:
    ks = {r["top_k"] for r in rows}
    k = f"top{ks.pop()}" if len(ks) == 1 else "top-k"
    header = ["name", "kind", "split", "images", "mAP", "mAP (pos classes)", "CF1", "OF1", f"CF1@{k}", f"OF1@{k}"]
    body = []
    for r in rows:
        body.append([r["name"], r["kind"], r["split"], r.get("num_images", "n/a"), _f(r["map"]), _f(r["map_pos"]),
                     _pct(r["CF1"]), _pct(r["OF1"]), _pct(r["CF1_topk"]), _pct(r["OF1_topk"])])
    return _table(header, body)


def _per_class_tables(metrics: Dict[str, Any], classes: Sequence[str], num_pos: Sequence[int],
                      title: str) -> List[str]:
    ap = np.asarray(metrics["per_class_ap"], dtype=np.float64)
    p = metrics["f1"]["per_class_precision"]
    r = metrics["f1"]["per_class_recall"]
    t = metrics["f1"]["threshold"]
    order = np.argsort(-ap, kind="stable")
    n = min(TOP_N, ap.size)

    def rows(ranks: Sequence[int]) -> List[List[Any]]:
        return [[k + 1, classes[i], int(num_pos[i]), _pct(ap[i]), _pct(p[i]), _pct(r[i])]
                for k, i in ((k, int(order[k])) for k in ranks)]

    header = ["rank", "class", "positives", "AP", f"P@{t:g}", f"R@{t:g}"]
    if ap.size <= 2 * TOP_N:
        out = [f"### {title}: per-class AP", ""] + _table(header, rows(range(ap.size)))
        return out + _empty_note(num_pos)
    out = [f"### {title}: top {n} classes by AP", ""]
    out += _table(header, rows(range(n)))
    out += ["", f"### {title}: bottom {n} classes by AP", ""]
    out += _table(header, rows(range(ap.size - 1, ap.size - 1 - n, -1)))
    return out + _empty_note(num_pos)


def _empty_note(num_pos: Sequence[int]) -> List[str]:
    empty = int((np.asarray(num_pos) == 0).sum())
    if not empty:
        return []
    return ["", f"{empty} class(es) have no positive in this split: their AP is 0 and they still count in mAP "
                "(Cole et al.); *mAP (pos classes)* leaves them out."]


def _plot_links(plots: Dict[str, str], names: Sequence[str]) -> List[str]:
    out = []
    for key in names:
        if key in plots:
            out.append(f"![{key}]({plots[key]})")
    return out


def _run_section(run: Dict[str, Any], plots: Dict[str, str]) -> List[str]:
    classes = run["classes"]
    s = run.get("summary") or {}
    out = ["## Training run", "", f"Run directory: `{run['path']}`; predictions: `{run['predictions_file']}` "
           f"({run['num_images']} images).", ""]
    facts = [("method", s.get("method")), ("loss", s.get("loss")), ("pseudo-label rule", s.get("rule")),
             ("backbone", s.get("backbone")), ("store", s.get("store")), ("epochs run", s.get("epochs_run")),
             ("best epoch", s.get("best_epoch")), ("best val mAP", s.get("best_val_map")),
             ("test mAP at best", s.get("test_map_at_best")), ("stop reason", s.get("stop_reason"))]
    out += _table(["", ""], [[k, _f(v)] for k, v in facts])
    epochs = run.get("epochs") or []
    if epochs:
        out += ["", "### Training curve", ""]
        out += _table(["epoch", "val mAP", "test mAP", "train loss"],
                      [[e.get("epoch"), _f(e.get("val_map")), _f(e.get("test_map")), _f(e.get("train_loss"), 4)]
                       for e in epochs])
        out += [""] + _plot_links(plots, ["training_curve"])
    out += [""] + _per_class_tables(run["metrics"], classes, run["num_pos_per_class"], "Trained model")
    out += [""] + _plot_links(plots, ["run_per_class_ap", "run_pr_curves", "run_score_histograms"])
    return out


def _store_section(store: Dict[str, Any], plots: Dict[str, str]) -> List[str]:
    classes = store["classes"]
    zs = store["zero_shot"]
    model = store.get("model") or {}
    out = ["## Zero-shot scores of the score store", "",
           f"Store: `{store['path']}`; model `{model.get('name')}` (pretrained `{model.get('pretrained')}`, "
           f"open_clip {model.get('open_clip_version')}); views: grid {store['views'].get('grid')}, "
           f"{store['views'].get('num_views')} cached views per image.", ""]
    out += _table(["split", "rows", "failed", "labels unknown", "used"],
                  [[sp, r["total"], r["failed"], r["labels_unknown"], r["used"]] for sp, r in store["rows"].items()])
    out += ["", f"Score views on split `{zs['split']}` ({zs['num_images']} images): "
            f"**global** = the unflipped global view; **mean** = mean over all {store['views'].get('num_views')} "
            f"cached views (flipped variants included); **damp** = DAMP's positive score phi (temp "
            f"{zs['damp_params']['temp']:g}, eta {zs['damp_params']['eta']:g}, gate on the observed labels). AP "
            f"ranks the raw cosine (global, mean) or phi (damp); thresholded F1 uses the softmax over classes "
            f"(temp {zs['temp']:g}) or phi.", ""]
    if zs["scores"].get("damp") is not None:
        out += _per_class_tables(zs["scores"]["damp"], classes, zs["num_pos_per_class"], "Zero-shot DAMP phi")
        out += [""] + _plot_links(plots, ["zeroshot_per_class_ap", "zeroshot_pr_curves",
                                          "zeroshot_score_histograms"])
    pl = store.get("pseudo_labels")
    if pl:
        out += ["", f"## Pseudo-label quality (split `{pl['split']}`, {pl['num_images']} images)", "",
                "Rules run on the cached unflipped views (dynamic=False, deterministic). *excl. observed*: only "
                "unobserved entries count; *incl. observed*: the positives the trainer uses (observed + pseudo) "
                "against all ground-truth positives. P / R / F1 in percent; F1 is the true 2PR/(P+R).", ""]
        rows = []
        for name, r in pl["rules"].items():
            q = r["quality"]
            ex, inc, neg = q["excluding_observed"], q["including_observed"], q["negatives"]
            opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults"
            rows.append([name, opts, _pct(ex["precision"]), _pct(ex["recall"]), _pct(ex["f1"]),
                         _f(ex["per_image"]), _pct(inc["precision"]), _pct(inc["recall"]), _pct(inc["f1"]),
                         _f(inc["per_image"]), _f(neg["per_image"]),
                         _pct(neg["precision"]) if neg["count"] else "n/a",
                         _pct(r["images_without_pseudo_positive"])])
        out += _table(["rule", "options", "P excl.", "R excl.", "F1 excl.", "pos/img excl.", "P incl.", "R incl.",
                       "F1 incl.", "pos/img incl.", "neg/img", "neg precision", "% images w/o pseudo-pos"], rows)
        sweeps = pl.get("threshold_sweep") or {}
        phi = sweeps.get("damp_phi") or []
        if phi:
            best = max(phi, key=lambda r: r["f1"])
            out += ["", "### Threshold sweep of DAMP phi (excluding observed entries)", "",
                    f"Best F1 {_pct(best['f1'])} at threshold {best['threshold']:g}.", ""]
            out += _table(["threshold", "precision", "recall", "F1", "pseudo-pos / image", "pseudo-pos", "TP"],
                          [[f"{r['threshold']:g}", _pct(r["precision"]), _pct(r["recall"]), _pct(r["f1"]),
                            _f(r["per_image"]), r["num_pred"], r["tp"]] for r in phi])
            out += [""] + _plot_links(plots, ["pseudo_threshold_sweep"])
    return out


def render_markdown(report: Dict[str, Any]) -> str:
    """``report.md`` from a ``report.json`` dict."""
    v = report["versions"]
    plots = report.get("plots") or {}
    classes = report["classes"]
    out = [f"# vlpl evaluation: {report['name']}", "",
           f"{report['created']} · split `{report['split']}` · {len(classes)} classes · vlpl {v.get('vlpl')}, "
           f"torch {v.get('torch')}, open_clip {v.get('open_clip')}, numpy {v.get('numpy')}", "",
           "## Headline", ""]
    out += _headline_table(report["headline"])
    out += ["", "mAP: Cole et al.'s definition (per-class step-wise AP, AP = 0 for a class without positives, "
            "still in the mean); *mAP (pos classes)* averages only classes with a positive. CF1/OF1 (in percent) "
            f"predict `score >= {report['config']['f1_threshold']}` (sigmoid for the trained model, softmax over "
            "classes or DAMP phi for zero-shot scores); @top-k predicts each image's k best classes.", ""]
    if report.get("run"):
        out += _run_section(report["run"], plots) + [""]
    if report.get("store"):
        out += _store_section(report["store"], plots) + [""]
    out += ["## Files", "", "* `report.json`: every number above and more (per-class lists, resolved config, "
            "versions, model identity)", "* `config.yaml`: the resolved evaluate config"]
    out += [f"* `{p}`" for p in plots.values()]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------------


def load_report(path: str | Path) -> Dict[str, Any]:
    """A ``report.json``, given the file, an eval directory, or a run / store directory with ``eval/``."""
    p = Path(path)
    candidates = [p] if p.suffix == ".json" else [p / "report.json", p / "eval" / "report.json"]
    for c in candidates:
        if c.is_file():
            try:
                data = json.loads(c.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{c}: not valid JSON ({e})") from None
            if not isinstance(data, dict) or "summary" not in data:
                raise ValueError(f"{c}: not a vlpl evaluate report (no 'summary' key; expected {REPORT_SCHEMA})")
            data["_path"] = str(c)
            return data
    raise FileNotFoundError(
        f"no evaluation report for {path}: looked for {', '.join(str(c) for c in candidates)} "
        "(run `vlpl evaluate` on it first)"
    )


def compare_table(reports: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table with one row per report (its ``summary`` row)."""
    rows = []
    names = [r["summary"]["name"] for r in reports]
    for rep, name in zip(reports, names):
        row = dict(rep["summary"])
        if names.count(name) > 1:  # same directory name from two places: show where each comes from
            row["name"] = f"{name} ({Path(rep['_path']).parent})"
        rows.append(row)
    return "\n".join(_headline_table(rows)) + "\n"
