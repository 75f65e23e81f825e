"""The results page (docs/RESULTS.md): per benchmark, the papers' numbers, the project's two recipes, and the
results measured with vlpl, filled ONLY from real evaluation reports given on the command line.

    python -m vlpl.results [--out docs/RESULTS.md] [--check] [track1:|track2:]RUN/eval/report.json ...

* **Papers' numbers**: transcribed from the method reference (ALGORITHMS.md section 11, "Consolidated reported
  mAP", with each number's source; the training-free and CLIP-initialised reference points are those issue 14
  cites). They are data in :data:`BENCHMARKS`, never computed here.
* **Recipes**: track 1 = the papers' recipe exactly (AEVLP: CLIP ViT-B/16 teacher, DAMP, GPR, ResNet-50 with
  torchvision's V1 weights; CSL for partial labels); track 2 = the best achievable (an ensemble of the strongest
  open teachers with class descriptions, a strong pretrained student).
* **Measured**: one row per ``report.json`` of ``vlpl evaluate run=RUN`` given to the script: the trained
  model's mAP beside the teacher's zero-shot mAP (the report's zero-label baseline), with the commands, the
  commit and the device **from the report** (``provenance``; a report without a command or a commit is
  refused). With no report the measured tables are empty. Nothing is typed in by hand.

A report's benchmark is the run's recipe row (``dataset=coco2014_fpc1000``) when the store it trained on holds
that benchmark's dataset, else the benchmark of the store's dataset (the baseline's ``dataset``); a dataset that is
not a benchmark (e.g. ``coco256``) gets its own section under "Other datasets".
Its track is the ``track1:`` / ``track2:`` prefix, else inferred: track 1 when the student is the papers' and
the teacher a single store, else track 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

__all__ = ["BENCHMARKS", "Benchmark", "measured_row", "render_results", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "docs" / "RESULTS.md"

#: the papers' students (track 1); any other student is track 2
PAPER_STUDENTS = ("resnet50.tv_in1k", "tresnet_m.miil_in21k", "tresnet_l.miil_in1k_448")

_TRACK2_TEACHERS = ("configs/models/pe_core_bigg14_448.yaml", "configs/models/siglip2_so400m16_512.yaml",
                    "configs/models/dfn5b_vit_h14_378.yaml")
_TRACK2_STUDENT = "configs/students/eva02_base_448.yaml"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark row group of the page."""

    key: str  # the recipe row (vlpl train dataset=<key>) and configs/datasets/<key>.yaml
    title: str
    setting: str  # "spml" | "partial"
    split: str  # the split the papers report on
    papers: Tuple[Tuple[str, str, str, str], ...]  # (method, backbone / teacher, mAP, source)
    track1: Tuple[str, ...]  # commands
    track2: Tuple[str, ...]
    aliases: Tuple[str, ...] = field(default_factory=tuple)
    store_name: str = ""  # the dataset name its stores record (data.name), default: key

    @property
    def stores(self) -> Tuple[str, ...]:
        return (self.store_name or self.key, *self.aliases)


def _spml_cmds(ds: str, grid: int) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    t1 = (f"vlpl pseudolabel -c configs/datasets/{ds}.yaml -c configs/models/clip_vit_b16.yaml "
          f"views.grid={grid} data.root=DATA/{ds} out=stores/{ds}_b16",
          f"vlpl train -c configs/students/resnet50_tv.yaml method=aevlp dataset={ds} "
          f"store=stores/{ds}_b16 out=runs/{ds}_track1",
          f"vlpl evaluate run=runs/{ds}_track1")
    teachers = ", ".join(_TRACK2_TEACHERS)
    t2 = (f"vlpl pseudolabel -c configs/datasets/{ds}.yaml 'teachers=[{teachers}]' "
          f"teacher.descriptions=DESCRIPTIONS/{ds}.json views.grid={grid} data.root=DATA/{ds} out=stores/{ds}_ens",
          f"vlpl train -c {_TRACK2_STUDENT} method=aevlp dataset={ds} store=stores/{ds}_ens out=runs/{ds}_track2",
          f"vlpl evaluate run=runs/{ds}_track2")
    return t1, t2


def _partial_cmds(ds: str, row: bool = True) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """CSL's recipe; ``row``: configs/methods/csl.yaml has a per-dataset row for ``ds``."""
    ds_arg = f" dataset={ds}" if row else ""
    t1 = (f"vlpl pseudolabel -c configs/datasets/{ds}.yaml -c configs/models/clip_vit_b16.yaml views.grid=0 "
          f"data.root=DATA/{ds} out=stores/{ds}_b16",
          f"vlpl train method=csl{ds_arg} store=stores/{ds}_b16 out=runs/{ds}_track1",
          f"vlpl evaluate run=runs/{ds}_track1")
    teachers = ", ".join(_TRACK2_TEACHERS)
    t2 = (f"vlpl pseudolabel -c configs/datasets/{ds}.yaml 'teachers=[{teachers}]' "
          f"teacher.descriptions=DESCRIPTIONS/{ds}.json views.grid=0 data.root=DATA/{ds} out=stores/{ds}_ens",
          f"vlpl train -c {_TRACK2_STUDENT} method=csl{ds_arg} loss.params.prior=clip store=stores/{ds}_ens "
          f"out=runs/{ds}_track2",
          f"vlpl evaluate run=runs/{ds}_track2")
    return t1, t2


_LL, _AE, _VL = "LL README (ALGORITHMS.md 11a)", "AEVLP README (ALGORITHMS.md 11a)", "VLPL README (ALGORITHMS.md 11a)"
_ISSUE = "as cited in issue 14"
_CSL = "CSL README (ALGORITHMS.md 11b)"


def _spml_rows(i: int) -> Tuple[Tuple[str, str, str, str], ...]:
    """Column ``i`` (0 VOC, 1 COCO, 2 NUS, 3 CUB) of ALGORITHMS.md 11a (rows with a number only)."""
    table = [
        ("Full labels BCE", "ResNet-50 @448, end to end", ("90.2", "78.0", "54.5", "32.9"), _LL),
        ("Full labels BCE (re-run)", "ResNet-50 @448", ("89.42", "76.78", "52.08", "30.90"), _AE),
        ("AN", "ResNet-50, end to end", ("85.1", "64.1", "42.0", "19.1"), _LL),
        ("AN-LS", "ResNet-50, end to end", ("86.7", "66.9", "44.9", "17.9"), _LL),
        ("WAN", "ResNet-50, end to end", ("86.5", "64.8", "46.3", "20.3"), _LL),
        ("EPR", "ResNet-50, end to end", ("85.5", "63.3", "46.0", "20.0"), _LL),
        ("ROLE", "ResNet-50, end to end", ("87.9", "66.3", "43.1", "15.0"), _LL),
        ("ROLE, LinearInit", "ResNet-50", ("88.2", "69.0", "51.0", "16.8"), _LL),
        ("LL-R", "ResNet-50, end to end", ("89.2", "71.0", "47.4", "19.5"), _LL),
        ("LL-Ct", "ResNet-50, end to end", ("89.0", "70.5", "48.0", "20.4"), _LL),
        ("LL-Cp", "ResNet-50, end to end", ("88.4", "70.7", "48.3", "20.1"), _LL),
        ("EM", "ResNet-50", ("89.09", "70.70", "47.15*", "20.85"), "VLPL / AEVLP README (ALGORITHMS.md 11a)"),
        ("EM+APL", "ResNet-50", ("89.19", "70.87", "47.59*", "21.84"), "VLPL / AEVLP README (ALGORITHMS.md 11a)"),
        ("SMILE (NeurIPS'22)", "as cited", ("86.31", "63.33", "43.61", "18.61"), _AE),
        ("MIME (ICML'23)", "as cited", ("89.20", "72.92", "48.74", "21.89"), _AE),
        ("BoostLU + LL-R (CVPR'23)", "as cited", ("89.29", "72.89", "49.59", "19.8"), _AE),
        ("GR loss", "ResNet-50", ("89.83", "73.17", "49.08", "21.64"), _AE),
        ("DualCoOp", "CLIP-based (as cited)", ("83.6", "69.2", "42.8", ""), _VL),
        ("VLPL", "ResNet-50 @448; CLIP ViT-L/14@336 teacher", ("89.10", "71.45", "49.55*", "24.02"), _VL),
        ("AEVLP (GPR + DAMP)", "ResNet-50 @448; CLIP ViT-B/16 teacher", ("90.46", "73.54", "50.70", "24.89"), _AE),
        ("PIAA (ICML'26), training-free", "as cited", ("92.2", "74.6", "50.6", ""), _ISSUE),
        ("CCD (CVPR'25)", "as cited", ("", "70.3", "", ""), _ISSUE),
        ("SCPNet (CVPR'23)", "CLIP-initialised backbone, one positive per image", ("", "76.4", "", ""), _ISSUE),
        ("Fully labelled ResNet-50", "as cited", ("", "76.8", "", ""), _ISSUE),
    ]
    return tuple((m, b, v[i], s) for m, b, v, s in table if v[i])


BENCHMARKS: Tuple[Benchmark, ...] = (
    Benchmark("voc2012", "VOC2012", "spml", "test", _spml_rows(0), *_spml_cmds("voc2012", 4), aliases=("voc",)),
    Benchmark("coco2014", "COCO2014", "spml", "test", _spml_rows(1), *_spml_cmds("coco2014", 4), aliases=("coco",)),
    Benchmark("nuswide", "NUS-WIDE", "spml", "test", _spml_rows(2), *_spml_cmds("nuswide", 4),
              aliases=("nus-wide", "nus_wide")),
    Benchmark("cub", "CUB-200-2011 attributes", "spml", "test", _spml_rows(3), *_spml_cmds("cub", 5)),
    Benchmark("coco2014_fpc1000", "COCO2014, FPC-1000 (simulated partial labels)", "partial", "test", (
        ("Ignore", "TResNet-M 21k @448", "76.46", _CSL), ("Negative", "TResNet-M 21k @448", "81.24", _CSL),
        ("Neg-ASL", "TResNet-M 21k @448", "81.64", _CSL), ("CSL", "TResNet-M 21k @448", "83.44", _CSL)),
        *_partial_cmds("coco2014_fpc1000"), store_name="coco2014"),
    Benchmark("coco2014_rps05", "COCO2014, RPS-0.5 (simulated partial labels)", "partial", "test", (
        ("Ignore", "TResNet-M 21k @448", "84.90", _CSL), ("Negative", "TResNet-M 21k @448", "81.21", _CSL),
        ("Neg-ASL", "TResNet-M 21k @448", "81.91", _CSL), ("CSL", "TResNet-M 21k @448", "85.21", _CSL)),
        *_partial_cmds("coco2014_rps05"), store_name="coco2014"),
    Benchmark("openimages_v6", "OpenImages V6 (real partial labels)", "partial", "test", (
        ("Ignore", "TResNet-M", "85.38", _CSL), ("Negative", "TResNet-M", "85.85", _CSL),
        ("CSL", "TResNet-M", "86.72", _CSL), ("CSL", "TResNet-L", "87.34", _CSL)),
        *_partial_cmds("openimages_v6", row=False)),
)


# --------------------------------------------------------------------------------------------------
# measured rows: only from reports
# --------------------------------------------------------------------------------------------------


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def measured_row(report: Dict[str, Any], path: str, track: Optional[str] = None) -> Dict[str, Any]:
    """One measured row from a ``vlpl evaluate run=...`` report (``report.json`` as a dict). Raises
    ``ValueError`` naming ``path`` when the report is not a run's, or has no ``provenance.command`` /
    ``provenance.commit`` (a number without the command and the code that made it is not a result)."""
    prov = report.get("provenance") or {}
    missing = [k for k in ("command", "commit") if not prov.get(k)]
    if missing:
        raise ValueError(f"{path}: no provenance.{' or provenance.'.join(missing)} in the report; the results page "
                         f"takes only reports that say how they were made (re-run `vlpl evaluate` from a git "
                         f"checkout of vlpl to record them)")
    run = report.get("run")
    if not run or not isinstance(_get(run, "metrics", "map"), (int, float)):
        raise ValueError(f"{path}: not the report of a training run (no run.metrics.map); give the report of "
                         f"`vlpl evaluate run=RUN`")
    cfg = run.get("train_config") or {}
    summary = run.get("summary") or {}
    base = report.get("baseline") or {}
    recipe_dataset = cfg.get("dataset") or summary.get("dataset")
    dataset = base.get("dataset") or recipe_dataset or "unknown"
    student = _get(cfg, "student", "name") or str(summary.get("backbone") or "").split(":")[-1]
    ensemble = isinstance(cfg.get("store"), list) or isinstance(_get(report, "model", "ensemble"), list)
    if track is None:
        track = "1" if student in PAPER_STUDENTS and not ensemble else "2"
    scores = base.get("scores") or {}
    # partial evaluation labels (real partial annotations, OpenImages): the benchmark's number is the masked mAP
    # (CSL's mAP_partial), not Cole's mAP with every unknown entry counted as a negative; the teacher's likewise
    masked = _get(run, "metrics", "masked", "map")
    metric = "masked_map" if isinstance(masked, (int, float)) else "map"
    from vlpl.eval.report import random_model_notice

    return {
        "dataset": str(dataset),
        "recipe_dataset": recipe_dataset,
        "track": str(track),
        "method": cfg.get("method") or summary.get("method") or "n/a",
        "student": student or "n/a",
        "split": report.get("split"),
        "num_images": run.get("num_images"),
        "map": float(masked if metric == "masked_map" else run["metrics"]["map"]),
        "metric": metric,
        "random_models": random_model_notice(report) is not None,
        "teacher_global_map": _get(scores, "global", metric),
        "teacher_damp_map": _get(scores, "damp", metric),
        "train_command": _get(summary, "provenance", "command"),
        "evaluate_command": prov["command"],
        "commit": prov["commit"],
        "dirty": prov.get("dirty"),
        "device": prov.get("device") or "n/a",
        "train_device": _get(summary, "provenance", "device"),
        "created": report.get("created"),
        "report": path,
    }


def _benchmark_of(row: Dict[str, Any]) -> Optional[Benchmark]:
    """The benchmark of a measured row: the run's recipe row when the store holds that benchmark's dataset
    (``coco2014_fpc1000`` on a ``coco2014`` store), else the benchmark whose store name is the store's dataset
    (``coco2014``); None for any other dataset (``coco256``)."""
    d = str(row["dataset"]).lower()
    recipe = next((b for b in BENCHMARKS if b.key == row.get("recipe_dataset")), None)
    if recipe is not None and d in recipe.stores:
        return recipe
    found = [b for b in BENCHMARKS if d in b.stores]  # a COCO store without a partial recipe row: SPML COCO
    return next((b for b in found if b.setting == "spml"), found[0] if found else None)


def _n(v: Any) -> str:
    return "" if v is None else f"{float(v):.2f}"


def _cell(s: Any) -> str:
    return "" if s is None else str(s).replace("|", "\\|").replace("\n", " ")


def _measured_table(rows: List[Dict[str, Any]]) -> List[str]:
    if not rows:
        return ["_No measured run yet._ The column fills only from a run's report: "
                "`python -m vlpl.results RUN/eval/report.json`."]
    out = ["| track | method | student | split (images) | mAP (%) | teacher zero-shot global / DAMP (%) | "
           "train command | evaluate command | commit | device | report |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["track"], -r["map"])):
        commit = str(r["commit"])[:12] + (" (uncommitted changes)" if r.get("dirty") else "")
        device = r["device"] if not r.get("train_device") or r["train_device"] == r["device"] else \
            f"train: {r['train_device']}; evaluate: {r['device']}"
        out.append("| " + " | ".join(_cell(c) for c in (
            r["track"], r["method"], f"`{r['student']}`", f"{r['split']} ({r['num_images']})",
            _n(r["map"]) + (" (masked mAP: partial labels)" if r.get("metric") == "masked_map" else ""),
            f"{_n(r['teacher_global_map']) or 'n/a'} / {_n(r['teacher_damp_map']) or 'n/a'}",
            f"`{r['train_command']}`" if r["train_command"] else "not recorded", f"`{r['evaluate_command']}`",
            f"`{commit}`", device, f"`{r['report']}` ({r['created']})"
            + (" **random models**" if r.get("random_models") else ""))) + " |")
    if any(r.get("random_models") for r in rows):
        out += ["", "**random models**: the run's teacher had random weights (e.g. `vlpl-tiny`, `vlpl demo --offline`): "
                    "every stage ran for real, but its numbers mean nothing about the images."]
    return out


def render_results(reports: Sequence[Tuple[Dict[str, Any], str, Optional[str]]] = ()) -> str:
    """The page, from ``(report dict, path as shown, track or None)`` triples (none: the measured tables are
    empty)."""
    rows = [measured_row(rep, path, track) for rep, path, track in reports]
    by_bench: Dict[str, List[Dict[str, Any]]] = {}
    other: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        b = _benchmark_of(r)
        (by_bench.setdefault(b.key, []) if b else other.setdefault(r["dataset"], [])).append(r)
    out = ["# Results", "",
           "<!-- generated by `python -m vlpl.results`: do not edit by hand (tests/test_results_page.py checks it) -->",
           "",
           "Per benchmark: the papers' numbers (mAP in %, Cole et al.'s definition, on the official test split), the "
           "project's recipe for **track 1** (the papers' recipe exactly) and **track 2** (the best achievable: an "
           "ensemble of the strongest open teachers with class descriptions, a strong pretrained student), and the "
           "results **measured with vlpl**. A measured row comes only from a run's evaluation report given to "
           "`python -m vlpl.results` (the report's `provenance`: command, commit, device); nothing here is typed "
           "in by hand, and an empty table means no run has been reported.", "",
           "Each measured row shows the teacher's own zero-shot mAP on the same split (the report's zero-label "
           "baseline) beside the trained model's: training on pseudo-labels is worth it where it is higher.", "",
           "`DATA/<dataset>` is where the dataset lives (see its `configs/datasets/*.yaml`); `DESCRIPTIONS/<dataset>"
           ".json` a class-descriptions file (several descriptions per class, e.g. LLM-written; not shipped). "
           "Regenerate this page with the reports of every run:", "",
           "```bash", "python -m vlpl.results [track1:|track2:]runs/<run>/eval/report.json ... --out docs/RESULTS.md",
           "```", ""]
    for setting, title in (("spml", "Single positive label (SPML)"), ("partial", "Partial labels")):
        out += [f"## {title}", ""]
        for b in (b for b in BENCHMARKS if b.setting == setting):
            out += [f"### {b.title}", "", "Papers' numbers:", "",
                    "| method | backbone / teacher | mAP (%) | source |", "|---|---|---|---|"]
            out += [f"| {m} | {bb} | {v} | {s} |" for m, bb, v, s in b.papers]
            if any("*" in v for _, _, v, _ in b.papers):
                out += ["", "\\* the official NUS-WIDE image list (EM, VLPL); the others use Cole et al.'s "
                            "re-crawled subset, so the NUS numbers are not strictly comparable."]
            out += ["", "Track 1 (the papers' recipe):", "", "```bash", *b.track1, "```", "",
                    "Track 2 (the best achievable):", "", "```bash", *b.track2, "```", "",
                    "Measured with vlpl:", ""]
            out += _measured_table(by_bench.get(b.key, [])) + [""]
    if other:
        out += ["## Other datasets", "", "Runs on datasets that are not one of the benchmarks above (e.g. the "
                "256-image coco256 test set): their numbers are not comparable with the papers'.", ""]
        for name in sorted(other):
            out += [f"### {name}", ""] + _measured_table(other[name]) + [""]
    return "\n".join(out).rstrip() + "\n"


def _load(arg: str) -> Tuple[Dict[str, Any], str, Optional[str]]:
    track = None
    if arg.startswith(("track1:", "track2:")):
        track, arg = arg[5], arg.split(":", 1)[1]
    p = Path(arg)
    if p.is_dir():
        p = p / "report.json" if (p / "report.json").is_file() else p / "eval" / "report.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{arg}: no report.json there (run `vlpl evaluate run=RUN` first)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object (a vlpl evaluate report)")
    return data, str(p), track


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlpl.results", description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="*", metavar="[track1:|track2:]REPORT",
                    help="report.json of `vlpl evaluate run=RUN` (or its eval / run directory)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"the page (default {DEFAULT_OUT})")
    ap.add_argument("--check", action="store_true", help="exit 1 if the page differs from what is generated")
    ap.add_argument("--stdout", action="store_true", help="print the page instead of writing it")
    args = ap.parse_args(argv)
    try:
        page = render_results([_load(a) for a in args.reports])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.stdout:
        sys.stdout.write(page)
        return 0
    out = Path(args.out)
    if args.check:
        same = out.is_file() and out.read_text(encoding="utf-8") == page
        print(f"{out}: {'current' if same else 'out of date: regenerate it with python -m vlpl.results'}")
        return 0 if same else 1
    from vlpl.store.atomic import atomic_write_text

    atomic_write_text(out, page)
    print(f"wrote {out} ({len(args.reports)} measured report(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
