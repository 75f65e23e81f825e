"""The evaluation report: plain-data assembly, Markdown rendering and the cross-run comparison table.

``report.json`` is the complete, machine-readable record; ``report.md`` is what a person reads first.
Everything here works on plain dicts (as ``report.json`` holds them), so a report can be re-rendered
or compared without recomputing anything.

Units: every metric in a report is in **percent** (0-100), as the papers report them: mAP, per-class
AP, CP/CR/CF1/OP/OR/OF1 (and their per-class lists), pseudo-label precision / recall / F1, the precision
of pseudo-negatives and the share of images without a pseudo-positive. The metric functions
(:mod:`vlpl.eval.metrics`, :mod:`vlpl.eval.quality`) compute precision / recall / F1 and per-class AP
as fractions in [0, 1] (sklearn's scale); :func:`finalize_report` turns them into percent once, when the
report is assembled, and records the unit of every field in ``report["units"]``. Counts per image
(``per_image``) and thresholds stay as they are.
"""
from __future__ import annotations

import contextlib
import copy
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
    "UNITS",
    "finalize_report",
    "random_model_notice",
    "summary_text",
    "jsonable",
    "package_versions",
    "utc_now",
    "metric_row",
    "render_markdown",
    "load_report",
    "teacher_baseline",
    "baseline_deltas",
    "baseline_markdown",
]

# /1: precision / recall / F1 / per-class AP as fractions; /2: every metric in percent, with "units"
REPORT_SCHEMA = "vlpl.evaluate/2"
TOP_N = 10

# The unit of every number-valued field of the report, by key (the same key means the same unit
# wherever it appears).
UNITS: Dict[str, str] = {
    "map": "percent", "map_pos": "percent", "per_class_ap": "percent",
    "CP": "percent", "CR": "percent", "CF1": "percent", "OP": "percent", "OR": "percent", "OF1": "percent",
    "CF1_topk": "percent", "OF1_topk": "percent",
    "per_class_precision": "percent", "per_class_recall": "percent", "per_class_f1": "percent",
    "precision": "percent", "recall": "percent", "f1": "percent",
    "images_without_pseudo_positive": "percent of images",
    "best_val_map": "percent", "test_map_at_best": "percent", "val_map": "percent", "test_map": "percent",
    "per_image": "count per image", "observed_per_image": "count per image",
    "threshold": "score (the scale of the thresholded score)", "f1_threshold": "probability",
    "top_k": "classes per image", "k": "classes per image",
    "masked_map": "percent", "map_macro": "percent",
}

_F1_SCALARS = ("CP", "CR", "CF1", "OP", "OR", "OF1")
_F1_LISTS = ("per_class_precision", "per_class_recall", "per_class_f1")
_ROW_FRACTIONS = ("CF1", "OF1", "CF1_topk", "OF1_topk")

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


# --------------------------------------------------------------------------------------------------
# units: fractions -> percent, once
# --------------------------------------------------------------------------------------------------


def _x100(v: Any) -> Any:
    """``100 * v`` for a number or a list of numbers; ``None`` (a non-finite value) stays ``None``."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return [_x100(x) for x in v]
    return 100.0 * float(v)


def _scale(d: Optional[Dict[str, Any]], keys: Sequence[str]) -> None:
    if not d:
        return
    for k in keys:
        if k in d:
            d[k] = _x100(d[k])


def _metrics_to_percent(m: Optional[Dict[str, Any]]) -> None:
    """A metrics dict of ``evaluate_predictions`` (``map`` already in percent)."""
    if not m:
        return
    _scale(m, ("per_class_ap",))
    _scale(m.get("masked"), ("per_class_ap",))  # partial labels' masked mAP: per-class AP, None where skipped
    for part in ("f1", "f1_topk"):
        _scale(m.get(part), _F1_SCALARS + _F1_LISTS)


def _pseudo_to_percent(pl: Optional[Dict[str, Any]]) -> None:
    """The ``store.pseudo_labels`` section: rule quality (``vlpl.eval.quality``) and threshold sweeps."""
    if not pl:
        return
    for r in (pl.get("rules") or {}).values():
        q = r.get("quality") or {}
        for part in ("excluding_observed", "including_observed"):
            _scale(q.get(part), ("precision", "recall", "f1"))
            _scale((q.get(part) or {}).get("per_class"), ("precision", "recall", "f1"))
        _scale(q.get("negatives"), ("precision",))
        _scale(r, ("images_without_pseudo_positive",))
    for rows in (pl.get("threshold_sweep") or {}).values():
        for row in rows or []:
            _scale(row, ("precision", "recall", "f1"))


def finalize_report(report: Dict[str, Any]) -> Dict[str, Any]:
    """The report with every metric in percent, ``schema`` set to :data:`REPORT_SCHEMA` and ``units`` added.

    ``report`` is the plain dict the evaluate stage assembles (``vlpl.evaluate/1`` layout): mAP in
    percent, every other ratio a fraction as the metric functions return it. Returns a new dict (the
    input is not modified). A report that already has ``units`` is returned unchanged, so a report is
    never scaled twice.
    """
    if "units" in report:
        return report
    out = copy.deepcopy(report)
    for row in out.get("headline") or []:
        _scale(row, _ROW_FRACTIONS)
    _scale(out.get("summary"), _ROW_FRACTIONS)
    if out.get("run"):
        _metrics_to_percent(out["run"].get("metrics"))
    store = out.get("store")
    if store:
        for m in ((store.get("zero_shot") or {}).get("scores") or {}).values():
            _metrics_to_percent(m)
        _pseudo_to_percent(store.get("pseudo_labels"))
    out["schema"] = REPORT_SCHEMA
    out["units"] = dict(UNITS)
    return out


# --------------------------------------------------------------------------------------------------
# random models
# --------------------------------------------------------------------------------------------------


def _teacher_is_random(model: Optional[Dict[str, Any]]) -> bool:
    """An open_clip teacher loaded without a pretrained tag or checkpoint is random-initialised
    (``vlpl-tiny``, ``vlpl demo --offline``). A Hugging Face teacher is always loaded from weights."""
    if not model:
        return False
    if isinstance(model.get("ensemble"), list):  # a teacher ensemble: random when every member is
        return all(_teacher_is_random(m.get("model")) for m in model["ensemble"])
    if model.get("name") == "vlpl-tiny":
        return True
    return model.get("backend", "open_clip") == "open_clip" and not model.get("pretrained") \
        and not model.get("checkpoint_sha256")


def _student_is_random(report: Dict[str, Any]) -> bool:
    """Whether the run's student started from random weights: ``student.pretrained_tag`` (what ``vlpl train``
    actually loaded) is null, also when weights were asked for (``pretrained: true``) but could not be loaded and
    the run fell back to random initialisation; configs written before that key existed: ``pretrained`` false."""
    student = (((report.get("run") or {}).get("train_config")) or {}).get("student") or {}
    if not student:
        return False
    if "pretrained_tag" in student:
        return student["pretrained_tag"] is None
    return not student.get("pretrained")


def random_model_notice(report: Dict[str, Any]) -> Optional[str]:
    """One sentence saying that the numbers mean nothing, when the teacher had random weights; else None.

    A random-initialised teacher's zero-shot scores, and therefore its pseudo-labels and every
    model trained on them, carry no information about the images (the offline demo runs this way).
    """
    model = report.get("model") or ((report.get("store") or {}).get("model"))
    if not _teacher_is_random(model):
        return None
    what = f"the teacher `{model.get('name')}` has random weights (no pretrained tag or checkpoint)"
    if _student_is_random(report):
        student = report["run"]["train_config"]["student"]
        what += f" and the student `{student.get('name')}` started from random weights"
    return (f"RANDOM MODELS: {what}, as in `vlpl demo --offline`. Every step ran for real, but these numbers "
            "mean nothing about the images; use a pretrained teacher (e.g. teacher.name=ViT-B-32 "
            "teacher.pretrained=laion2b_s34b_b79k) for meaningful results.")


def metric_row(name: str, kind: str, split: str, metrics: Dict[str, Any], num_images: int) -> Dict[str, Any]:
    """One headline row from a metrics dict (``map``, ``map_pos``, ``f1``, ``f1_topk``)."""
    f1, topk = metrics["f1"], metrics["f1_topk"]
    row = {
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
    if metrics.get("masked") is not None:  # partial evaluation labels: the masked mAP beside Cole's
        row.update(masked_map=metrics["masked"]["map"], masked_classes_used=metrics["masked"]["num_classes_used"],
                   masked_classes_skipped=metrics["masked"]["num_classes_skipped"])
    return row


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
    """A value already in percent, printed with ``digits`` decimals (no ``%`` sign: the header says it)."""
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    """A Markdown table's lines: the header, the rule, one line per row (cells as ``str``, ``|`` escaped)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def _headline_table(rows: List[Dict[str, Any]]) -> List[str]:
    ks = {r["top_k"] for r in rows}
    k = f"top{ks.pop()}" if len(ks) == 1 else "top-k"
    header = ["name", "kind", "split", "images", "mAP (%)", "mAP pos. classes (%)", "CF1 (%)", "OF1 (%)",
              f"CF1@{k} (%)", f"OF1@{k} (%)"]
    body = []
    for r in rows:
        body.append([r["name"], r["kind"], r["split"], r.get("num_images", "n/a"), _pct(r["map"]), _pct(r["map_pos"]),
                     _pct(r["CF1"]), _pct(r["OF1"]), _pct(r["CF1_topk"]), _pct(r["OF1_topk"])])
    return markdown_table(header, body)


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

    header = ["rank", "class", "positives", "AP (%)", f"P@{t:g} (%)", f"R@{t:g} (%)"]
    if ap.size <= 2 * TOP_N:
        out = [f"### {title}: per-class AP", ""] + markdown_table(header, rows(range(ap.size)))
        return out + _empty_note(num_pos)
    out = [f"### {title}: top {n} classes by AP", ""]
    out += markdown_table(header, rows(range(n)))
    out += ["", f"### {title}: bottom {n} classes by AP", ""]
    out += markdown_table(header, rows(range(ap.size - 1, ap.size - 1 - n, -1)))
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
             ("best epoch", s.get("best_epoch")), ("best val mAP (%)", s.get("best_val_map")),
             ("test mAP at best (%)", s.get("test_map_at_best")), ("stop reason", s.get("stop_reason")),
             ("best epoch chosen by", _SELECT_TEXT.get(s.get("select"), s.get("select")))]
    out += markdown_table(["", ""], [[k, _f(v)] for k, v in facts])
    epochs = run.get("epochs") or []
    if epochs:
        out += ["", "### Training curve", ""]
        out += markdown_table(["epoch", "val mAP (%)", "test mAP (%)", "train loss"],
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
    out += markdown_table(["split", "rows", "failed", "labels unknown", "used"],
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
                "against all ground-truth positives. F1 is the true 2PR/(P+R).", ""]
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
        out += markdown_table(["rule", "options", "P excl. (%)", "R excl. (%)", "F1 excl. (%)", "pos/img excl.",
                       "P incl. (%)", "R incl. (%)", "F1 incl. (%)", "pos/img incl.", "neg/img",
                       "neg precision (%)", "images w/o pseudo-pos (%)"], rows)
        sweeps = pl.get("threshold_sweep") or {}
        phi = sweeps.get("damp_phi") or []
        if phi:
            best = max(phi, key=lambda r: r["f1"])
            out += ["", "### Threshold sweep of DAMP phi (excluding observed entries)", "",
                    f"Best F1 {_pct(best['f1'])} % at threshold {best['threshold']:g}.", ""]
            out += markdown_table(["threshold", "precision (%)", "recall (%)", "F1 (%)", "pseudo-pos / image", "pseudo-pos",
                           "TP"],
                          [[f"{r['threshold']:g}", _pct(r["precision"]), _pct(r["recall"]), _pct(r["f1"]),
                            _f(r["per_image"]), r["num_pred"], r["tp"]] for r in phi])
            out += [""] + _plot_links(plots, ["pseudo_threshold_sweep"])
    return out


#: how the trainer chose the best epoch (``summary.json`` ``select``; vlpl.eval.selection)
_SELECT_TEXT = {
    "map": "val mAP (Cole, full labels)",
    "masked_map": "val masked mAP on the val split's partial annotations",
    "masked_map_observed": "val masked mAP on the val split's observed labels (no full labels needed)",
    "teacher_agreement": "val agreement with the teacher: mAP against the pseudo-labels of the run's rule",
    "last": "the last epoch (no val split to select on)",
}


def partial_labels_markdown(report: Dict[str, Any]) -> List[str]:
    """The "Partial evaluation labels" section: for each headline row scored on partial labels, the masked mAP
    (CSL's ``mAP_partial``) beside Cole's mAP, which counts the unknown entries as negatives, with the classes
    used and skipped. Empty when no row was scored on partial labels."""
    rows = [r for r in report.get("headline") or [] if r.get("masked_map") is not None]
    if not rows:
        return []
    out = ["## Partial evaluation labels", "",
           "The evaluation labels are partial annotations (+1 annotated positive, -1 annotated negative, 0 unknown). "
           "**masked mAP** is CSL's `mAP_partial`: per class, AP over the annotated entries only; a class without an "
           "annotated positive or an annotated negative is skipped and the mean is over the classes used. "
           "**Cole's mAP** (the headline's mAP, CF1/OF1, per-class tables and plots) counts every unknown entry as a "
           "negative, so it is lower than the truth; read the masked mAP.", ""]
    out += markdown_table(["name", "kind", "split", "masked mAP (%)", "classes used", "classes skipped",
                   "Cole's mAP, unknown = negative (%)"],
                  [[r["name"], r["kind"], r["split"], _pct(r["masked_map"]), r.get("masked_classes_used", "n/a"),
                    r.get("masked_classes_skipped", "n/a"), _pct(r["map"])] for r in rows])
    return out + [""]


def render_markdown(report: Dict[str, Any]) -> str:
    """``report.md`` from a ``report.json`` dict."""
    v = report["versions"]
    plots = report.get("plots") or {}
    classes = report["classes"]
    out = [f"# vlpl evaluation: {report['name']}", ""]
    notice = random_model_notice(report)
    if notice:
        out += [f"> **{notice}**", ""]
    out += [f"{report['created']} · split `{report['split']}` · {len(classes)} classes · vlpl {v.get('vlpl')}, "
            f"torch {v.get('torch')}, open_clip {v.get('open_clip')}, numpy {v.get('numpy')}", ""]
    out += ["## Headline", "", "Every metric in this report is in percent (0-100).", ""]
    out += _headline_table(report["headline"])
    out += ["", "mAP: Cole et al.'s definition (per-class step-wise AP, AP = 0 for a class without positives, "
            "still in the mean); *mAP pos. classes* averages only classes with a positive. CF1/OF1 "
            f"predict `score >= {report['config']['f1_threshold']}` (sigmoid for the trained model, softmax over "
            "classes or DAMP phi for zero-shot scores); @top-k predicts each image's k best classes.", ""]
    out += partial_labels_markdown(report)  # masked mAP beside Cole's when the evaluation labels are partial
    if report.get("run") and "baseline" in report:  # the zero-label baseline, right under the headline
        out += baseline_markdown(report["run"]["metrics"]["map"], report["baseline"], report.get("baseline_reason"),
                                 ((report["run"]["metrics"].get("masked") or {}).get("map"))) + [""]
    if report.get("run"):
        out += _run_section(report["run"], plots) + [""]
    if report.get("store"):
        out += _store_section(report["store"], plots) + [""]
    out += ["## Files", "", "* `report.json`: every number above and more (per-class lists, resolved config, "
            "versions, model identity)", "* `config.yaml`: the resolved evaluate config"]
    out += [f"* `{p}`" for p in plots.values()]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# the short summary the CLI prints
# --------------------------------------------------------------------------------------------------

_VIEW_NAMES = {"global": "global view", "mean": "mean of views", "damp": "DAMP phi"}


def _row_label(row: Dict[str, Any]) -> str:
    kind = str(row.get("kind", ""))
    if kind == "run":
        return f"trained model ({row.get('name')})"
    if kind.startswith("zero-shot:"):
        view = kind.split(":", 1)[1]
        return f"zero-shot, {_VIEW_NAMES.get(view, view)}"
    return f"{kind} ({row.get('name')})"


def summary_text(report: Dict[str, Any], out_dir: Optional[str | Path] = None) -> str:
    """A short plain-text summary of a report: what ``vlpl evaluate`` prints instead of all of report.md.

    Lines: the random-model notice (when it applies), the headline (the trained model's and the
    zero-shot scores' mAP, CF1, OF1 on the evaluated split), each rule's pseudo-label precision /
    recall / F1 on unobserved entries, and, with ``out_dir``, where the full report and plots are.
    Every metric is in percent and labelled so.
    """
    rows = report.get("headline") or []
    n_classes = len(report.get("classes") or [])
    out = [f"vlpl evaluate: {report.get('name')}, split {report.get('split')}, "
           f"{n_classes} class{'' if n_classes == 1 else 'es'}"]
    notice = random_model_notice(report)
    if notice:
        out += ["", "NOTE: " + notice, ""]
    if rows:
        labels = [_row_label(r) for r in rows]
        w = max(len(lb) for lb in labels)
        out.append(f"  {'':{w}s}  {'images':>6s}  {'mAP (%)':>8s}  {'CF1 (%)':>8s}  {'OF1 (%)':>8s}")
        for lb, r in zip(labels, rows):
            out.append(f"  {lb:{w}s}  {r.get('num_images', 'n/a')!s:>6s}  {_pct(r.get('map')):>8s}  "
                       f"{_pct(r.get('CF1')):>8s}  {_pct(r.get('OF1')):>8s}")
        masked = [(lb, r) for lb, r in zip(labels, rows) if r.get("masked_map") is not None]
        if masked:  # partial evaluation labels: the number to read
            out.append("Partial evaluation labels: the mAP above counts unknown entries as negatives; masked mAP "
                       "(annotated entries only, CSL's mAP_partial):")
            out += [f"  {lb:{w}s}  masked mAP {_pct(r['masked_map'])} % over {r.get('masked_classes_used')} classes "
                    f"({r.get('masked_classes_skipped')} skipped: no annotated positive or negative)" for lb, r in masked]
    base = report.get("baseline")
    if base and report.get("run"):
        trained = report["run"]["metrics"]["map"]
        parts = [f"{view} {_pct(s['map'])} % ({d:+.2f})" for (view, s), d in
                 zip(base["scores"].items(), baseline_deltas(trained, base).values()) if d is not None]
        out.append(f"Teacher zero-shot mAP, no training (trained - teacher in points): {', '.join(parts)}")
    pl = (report.get("store") or {}).get("pseudo_labels")
    if pl and pl.get("rules"):
        out.append(f"Pseudo-labels on split {pl['split']} ({pl['num_images']} images), unobserved entries only:")
        names = list(pl["rules"])
        w = max(len(n) for n in names)
        out.append(f"  {'rule':{w}s}  {'precision (%)':>13s}  {'recall (%)':>10s}  {'F1 (%)':>7s}  "
                   f"{'pseudo-pos / image':>18s}")
        for name in names:
            ex = pl["rules"][name]["quality"]["excluding_observed"]
            out.append(f"  {name:{w}s}  {_pct(ex.get('precision')):>13s}  {_pct(ex.get('recall')):>10s}  "
                       f"{_pct(ex.get('f1')):>7s}  {_f(ex.get('per_image')):>18s}")
    if out_dir is not None:
        d = Path(out_dir)
        out.append(f"Full report: {d / 'report.md'}  (every number: {d / 'report.json'}"
                   + (f"; plots: {d / 'plots'}" if report.get("plots") else "") + ")")
    return "\n".join(out) + "\n"


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
            data = finalize_report(data)  # a /1 report (fractions) is read in percent like a /2 one
            data["_path"] = str(c)
            return data
    raise FileNotFoundError(
        f"no evaluation report for {path}: looked for {', '.join(str(c) for c in candidates)} "
        "(run `vlpl evaluate` on it first)"
    )


# --------------------------------------------------------------------------------------------------
# the zero-label baseline: the teacher's own zero-shot mAP beside a trained model's (issue 14, item 13)
# --------------------------------------------------------------------------------------------------

UNITS.update({"teacher_global_map": "percent", "teacher_damp_map": "percent"})

#: the teacher's score views the baseline reports (the same definitions as the store report's zero-shot rows)
BASELINE_VIEWS = ("global", "damp")


def teacher_baseline(store: Any, split: str, rule: Optional[str] = None,
                     rule_params: Optional[Dict[str, Any]] = None, *, weights: Optional[Sequence[float]] = None,
                     batch_size: int = 256) -> Dict[str, Any]:
    """The teacher's own zero-shot mAP on ``split``: what a user gets with no training at all.

    Args:
        store: an open store (:class:`vlpl.store.store.ScoreStore` or an ensemble,
            :class:`vlpl.store.ensemble.EnsembleStore`), or what :meth:`ScoreStore.open` opens: a store
            directory, an ensemble directory, or a list of store directories (with ``weights``).
        split: the split to score (rows with status ok and known full labels).
        rule, rule_params: the training run's pseudo-label rule and its parameters; when the rule is
            ``damp`` its ``temp`` / ``eta`` shape the DAMP aggregate, otherwise DAMP's defaults are used.
        weights: ensemble weights when ``store`` is a list of directories.

    Returns a plain dict (mAP in percent, Cole et al.'s definition)::

        {"store": path, "dataset": the store's dataset name, "split": split, "num_images": N, "rule": rule,
         "labels_kind": "full" | "partial",
         "scores": {"global": {"map", "map_pos"}, "damp": {"map", "map_pos", "temp", "eta"}},
         "definitions": {view: what was ranked}}

    With partial evaluation labels (``labels_kind: partial``) ``map`` is Cole's mAP with the annotated positives
    as positives and every view also has ``masked_map`` (:func:`vlpl.eval.metrics.masked_average_precision`).

    ``global`` ranks the raw score of the unflipped global view, ``damp`` DAMP's positive score phi on the
    unflipped views (gate on the split's observed labels): exactly the ``zero-shot:global`` and
    ``zero-shot:damp`` rows of the store report (``vlpl evaluate store=...``), so the two agree. Scores are read
    batch by batch through the store's split reader (nothing is written to the store). Raises ``ValueError``
    when no row of ``split`` has known labels.
    """
    import torch

    from vlpl.eval.metrics import masked_average_precision, mean_average_precision
    from vlpl.pseudolabel.params import rule_params as _rule_params
    from vlpl.pseudolabel.rules import damp_scores
    from vlpl.store.store import ScoreStore

    if isinstance(store, (str, Path, list, tuple)):
        store = ScoreStore.open(store, weights=weights)
    given = dict(rule_params or {}) if rule == "damp" else {}
    dp = _rule_params("damp", given, where="pseudo.params")
    reader = store.split(split, include_failed=True, sidecars=False)
    use = np.nonzero(reader.ok & reader.labels_known)[0]
    if not len(use):
        raise ValueError(f"{getattr(store, 'root', store)}: no row of split {split!r} has known labels and status "
                         f"ok: no zero-label baseline (the store's splits: {store.splits()})")
    labels, glob, phi = [], [], []
    kind = getattr(store, "score_kind", None)  # DAMP's per-view probabilities are the teacher's own (its score kind)
    for pos, scores in reader.iter_scores(batch_size, use):
        unflipped = torch.from_numpy(np.ascontiguousarray(scores[:, 0]))  # (B, n_views, C)
        labels.append(reader.labels_at(pos))
        glob.append(unflipped[:, 0].numpy())
        with kind.scope() if kind is not None else contextlib.nullcontext():
            phi.append(damp_scores(unflipped, torch.from_numpy(reader.observed_at(pos)), temp=dp.temp,
                                   eta=dp.eta)[0].numpy())
    y = np.concatenate(labels)
    out: Dict[str, Any] = {
        "store": str(getattr(store, "source", None) or getattr(store, "root", "")),
        "dataset": (getattr(store, "dataset_info", None) or {}).get("name"),  # the benchmark (vlpl.results)
        "split": split,
        "num_images": int(len(y)),
        "rule": rule,
        "scores": {},
        "definitions": {
            "global": "raw score of the teacher's unflipped global view",
            "damp": "DAMP's positive score phi on the unflipped views (gate on the observed labels)",
        },
    }
    labels_kind = str(getattr(reader, "labels_kind", "full"))
    out["labels_kind"] = labels_kind
    for view, s in (("global", glob), ("damp", phi)):
        if labels_kind == "partial":  # annotations in {-1, 0, 1}: Cole's mAP on the positives, and the masked mAP
            m = mean_average_precision(y == 1, np.concatenate(s))
            out["scores"][view] = {"map": m["map"], "map_pos": m["map_pos"],
                                   "masked_map": masked_average_precision(y, np.concatenate(s))["map"]}
        else:
            m = mean_average_precision(y, np.concatenate(s))
            out["scores"][view] = {"map": m["map"], "map_pos": m["map_pos"]}
    out["scores"]["damp"].update(temp=float(dp.temp), eta=float(dp.eta))
    return out


def baseline_deltas(trained_map: Optional[float], baseline: Optional[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """``{view: trained mAP - teacher mAP}`` in percentage points (None where a number is missing)."""
    if not baseline:
        return {}
    return {view: (None if trained_map is None or s.get("map") is None else float(trained_map) - float(s["map"]))
            for view, s in (baseline.get("scores") or {}).items()}


def baseline_markdown(trained_map: Optional[float], baseline: Optional[Dict[str, Any]],
                      reason: Optional[str] = None, trained_masked_map: Optional[float] = None) -> List[str]:
    """The report's "Zero-label baseline" section: the trained model's mAP beside the teacher's zero-shot mAP
    on the same split, with the difference."""
    out = ["## Zero-label baseline", ""]
    if not baseline:
        return out + [f"Not measured: {reason or 'the run has no score store to compare with'}."]
    deltas = baseline_deltas(trained_map, baseline)
    out += [f"The teacher's own zero-shot scores (no training) on split `{baseline['split']}` "
            f"({baseline['num_images']} images) of the store `{baseline['store']}`: training on pseudo-labels "
            f"is worth it where the trained model's mAP is above them.", ""]
    masked = any("masked_map" in s for s in baseline["scores"].values())  # partial evaluation labels
    rows = [["trained model", _pct(trained_map), ""] + ([_pct(trained_masked_map)] if masked else [])]
    for view, s in baseline["scores"].items():
        what = "teacher zero-shot, global view" if view == "global" else \
            f"teacher zero-shot, DAMP phi (temp {s.get('temp', 0):g}, eta {s.get('eta', 0):g})" if view == "damp" \
            else f"teacher zero-shot, {view}"
        d = deltas.get(view)
        rows.append([what, _pct(s["map"]), "n/a" if d is None else f"{d:+.2f}"]
                    + ([_pct(s.get("masked_map"))] if masked else []))
    return out + markdown_table(["scores", "mAP (%)", "trained - teacher (points)"] + (["masked mAP (%)"] if masked else []),
                        rows)


def run_summary_baseline(store: Any, split: str, rule: Optional[str], rule_params: Optional[Dict[str, Any]],
                         trained_map: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """:func:`teacher_baseline` for a training run's own ``summary.json`` (the split the run tests on), logged
    beside the trained model's mAP; None (with a log line) when the split has no labelled row."""
    from vlpl.store.store import StoreError

    try:
        base = teacher_baseline(store, split, rule, rule_params)
    except (ValueError, StoreError) as e:
        log.info("no zero-label baseline in the summary: %s", e)
        return None
    # the run's test mAP is the masked mAP when the split's labels are partial (vlpl.eval.selection): compare like
    # with like, never a masked mAP with the teacher's Cole mAP (unknown entries counted as negatives)
    key, what = ("masked_map", "masked mAP") if base.get("labels_kind") == "partial" else ("map", "mAP")
    log.info("teacher zero-shot on %s (no training): global view %s %.2f %%, DAMP %s %.2f %% (trained: %s)", split,
             what, base["scores"]["global"][key], what, base["scores"]["damp"][key],
             "n/a" if trained_map is None else f"{trained_map:.2f} %")
    return base
