"""Build docs/RELIABILITY.md from a run of the fault-injection suite (tests/faults).

Usage::

    VLPL_FAULTS_LONG=1 .venv/bin/python -m pytest tests/faults -q -p no:cacheprovider \\
        --junitxml tests/faults/.results/long.xml          # the long run (20 trials a stage)
    .venv/bin/python tests/faults/make_report.py           # -> docs/RELIABILITY.md

    .venv/bin/python tests/faults/make_report.py tests/faults/.results/ci.jsonl --out /tmp/R.md

Input: the JSON lines that the ``record_fault`` fixture (tests/faults/conftest.py) appends, one per fault
test: ``stage, fault, trials, ok, lost, detail, long, time, machine, test``. Without a path argument the
long run's file is used when it has records, else the bounded (CI) run's. When a pytest JUnit XML file
with the same stem sits beside it (``long.xml`` beside ``long.jsonl``), the page also says which fault
tests passed, failed or were skipped, so a test that failed before it could record is not left out.

The page says which run it was built from (long or bounded), when, on which commit and machine, and
the command that regenerates it; the security model at its end is the part written by hand.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = HERE / ".results"
DEFAULT_OUT = REPO / "docs" / "RELIABILITY.md"
STAGE_ORDER = ("pseudolabel", "store", "inputs", "train", "export")
KEYS = ("stage", "fault", "trials", "ok", "lost")

LONG_CMD = ("VLPL_FAULTS_LONG=1 .venv/bin/python -m pytest tests/faults -q -p no:cacheprovider "
            "--junitxml tests/faults/.results/long.xml")
CI_CMD = ".venv/bin/python -m pytest tests/faults -q -p no:cacheprovider --junitxml tests/faults/.results/ci.xml"
REPORT_CMD = ".venv/bin/python tests/faults/make_report.py"


class ReportError(Exception):
    """The results file is missing, empty or malformed (the message names the file and line)."""


def read_records(path: Path) -> List[Dict[str, Any]]:
    """The records of a results file, checked: every line a JSON object with the keys of ``record_fault``."""
    if not path.is_file():
        raise ReportError(f"{path}: no such results file; run the fault suite first ({CI_CMD})")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{n}: not JSON ({e})") from None
        missing = [k for k in KEYS if k not in rec] if isinstance(rec, dict) else list(KEYS)
        if missing:
            raise ReportError(f"{path}:{n}: a record needs {', '.join(KEYS)}; missing {', '.join(missing)}")
        for k in ("trials", "ok", "lost"):
            if not isinstance(rec[k], int) or rec[k] < 0:
                raise ReportError(f"{path}:{n}: '{k}' must be a non-negative integer, got {rec[k]!r}")
        if rec["ok"] > rec["trials"]:
            raise ReportError(f"{path}:{n}: ok ({rec['ok']}) exceeds trials ({rec['trials']})")
        out.append(rec)
    if not out:
        raise ReportError(f"{path}: no records (the run recorded nothing: was it interrupted?)")
    return out


def default_results() -> Path:
    """The long run's results when they exist and are not empty, else the bounded run's."""
    long = RESULTS / "long.jsonl"
    if long.is_file() and long.read_text(encoding="utf-8").strip():
        return long
    return RESULTS / "ci.jsonl"


def read_junit(path: Path) -> Optional[Dict[str, Any]]:
    """``{"passed": [...], "failed": [...], "skipped": [...], "seconds": float}`` from a JUnit XML file (test
    ids and the suite's wall time), or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ReportError(f"{path}: not a JUnit XML file ({e})") from None
    out: Dict[str, Any] = {"passed": [], "failed": [], "skipped": [], "seconds": 0.0}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    try:
        out["seconds"] = sum(float(su.get("time", 0) or 0) for su in suites)
    except ValueError:
        pass
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"].append(name)
        elif case.find("skipped") is not None:
            out["skipped"].append(name)
        else:
            out["passed"].append(name)
    return out


def aggregate(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (stage, fault): trials, ok and lost summed, details joined; stages in a fixed order."""
    rows: "OrderedDict[Tuple[str, str], Dict[str, Any]]" = OrderedDict()
    for r in records:
        key = (str(r["stage"]), str(r["fault"]))
        row = rows.setdefault(key, {"stage": key[0], "fault": key[1], "trials": 0, "ok": 0, "lost": 0,
                                    "details": [], "tests": []})
        row["trials"] += r["trials"]
        row["ok"] += r["ok"]
        row["lost"] += r["lost"]
        if r.get("detail"):
            row["details"].append(str(r["detail"]))
        if r.get("test") and r["test"] not in row["tests"]:
            row["tests"].append(str(r["test"]))

    def order(row: Dict[str, Any]) -> Tuple[int, str]:
        s = row["stage"]
        return (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s)

    return sorted(rows.values(), key=order)  # stable: the run's order within a stage


def outcome(row: Dict[str, Any]) -> str:
    if row["lost"]:
        return f"**{row['lost']} LOST**"
    if row["ok"] == row["trials"]:
        return "all as required"
    return f"**{row['trials'] - row['ok']} not as required**"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit_line() -> str:
    sha = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "vlpl", "tests", "pyproject.toml")
    subject = _git("log", "-1", "--format=%s")
    line = f"`{sha}`" + (" plus uncommitted changes in vlpl/ or tests/" if dirty else "")
    if len(subject) > 90:
        subject = subject[:87].rsplit(" ", 1)[0] + " ..."
    return line + (f" ({subject})" if subject else "")


def render(records: Sequence[Dict[str, Any]], source: Path, junit: Optional[Dict[str, Any]] = None,
           commit: Optional[str] = None, generated: Optional[str] = None) -> str:
    """The Markdown page."""
    long = any(r.get("long") for r in records)
    rows = aggregate(records)
    times = sorted(str(r["time"]) for r in records if r.get("time"))
    machines = sorted({str(r["machine"]) for r in records if r.get("machine")})
    total_trials = sum(r["trials"] for r in rows)
    total_ok = sum(r["ok"] for r in rows)
    total_lost = sum(r["lost"] for r in rows)
    try:
        shown_source = source.resolve().relative_to(REPO).as_posix()
    except ValueError:
        shown_source = str(source)
    run_kind = ("the **long** run (`VLPL_FAULTS_LONG=1`: at least 20 trials per randomised fault)" if long else
                "the **bounded** run that CI makes (at least 3 trials per randomised fault; the long run makes 20 "
                "or more)")
    took = ""
    if junit is not None and junit.get("seconds"):
        took = f" (the suite took {junit['seconds'] / 60:.1f} minutes)"
    lines = [
        "# Reliability",
        "",
        "<!-- generated by tests/faults/make_report.py from a real run of tests/faults; do not edit by hand -->",
        "",
        "What `vlpl` does when a run is killed, the disk fills, bits flip or inputs are hostile, measured by the",
        "fault-injection suite in `tests/faults/` (issue 9), and what it trusts.",
        "",
        f"- Built from {run_kind}: `{shown_source}`.",
        f"- Records written {times[0] if times else 'unknown'} to {times[-1] if times else 'unknown'}{took}; "
        f"page generated {generated or _dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.",
        f"- Commit: {commit if commit is not None else commit_line()}.",
        f"- Machine: {', '.join(machines) or platform.platform()} (CPU only; tiny random models).",
        "- Regenerate:",
        "",
        "  ```",
        f"  {LONG_CMD if long else CI_CMD}",
        f"  {REPORT_CMD}{'' if long else ' tests/faults/.results/ci.jsonl'}",
        "  ```",
        "",
        "## Faults injected and outcomes",
        "",
        f"{len(rows)} kinds of fault, {total_trials} injections: {total_ok} ended as required, "
        f"**{total_lost} lost or silently altered results**.",
        "",
        "| stage | fault injected | trials | as required | lost | outcome |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['stage']} | {_cell(r['fault'])} | {r['trials']} | {r['ok']} | {r['lost']} | "
                     f"{outcome(r)} |")
    lines += [f"| **all** | | **{total_trials}** | **{total_ok}** | **{total_lost}** | |", ""]
    lines += ["\"As required\" means: a killed run resumed to a byte-identical result; a corrupted file was "
              "detected with its name (or provably read the same values); a bad input was read correctly "
              "or became a failed row naming it; an error named the file and the cause. \"Lost\" counts "
              "results that came back different from an uninterrupted run without an error.", ""]
    lines += ["### What each check did", ""]
    for r in rows:
        lines.append(f"- **{r['stage']}: {_cell(r['fault'])}** ({', '.join(f'`{t}`' for t in r['tests'])}). "
                     + " ".join(_cell(d if d.endswith(".") else d + ".") for d in r["details"]))
    lines.append("")
    if junit is not None:
        n_pass, n_fail, n_skip = (len(junit.get(k, [])) for k in ("passed", "failed", "skipped"))
        lines += ["### Test results", "",
                  f"{n_pass} fault tests passed, {n_fail} failed, {n_skip} skipped (pytest JUnit report beside "
                  "the results file)."]
        recorded = {str(r.get("test")) for r in records}
        silent = [t for t in junit["failed"] if not any(t.split("::")[-1] in x for x in recorded)]
        for t in junit["failed"]:
            lines.append(f"- FAILED `{t}`" + (" (recorded nothing: failed before its record)" if t in silent else ""))
        for t in junit["skipped"]:
            lines.append(f"- skipped `{t}`")
        lines.append("")
    lines += SECURITY_MODEL
    lines += ["## Raw records", "", "<details><summary>The run's records, one JSON object a line</summary>", "",
              "```json"]
    lines += [json.dumps(r, sort_keys=True) for r in records]
    lines += ["```", "", "</details>", ""]
    return "\n".join(lines)


SECURITY_MODEL = [
    "## Security model",
    "",
    "`vlpl` trusts the Python environment it runs in (installed packages and their entry points), its command",
    "line, and the config files a user passes. Everything it reads besides those (images, label files, score",
    "stores, checkpoints, saved models) is treated as data that may be corrupt or crafted: it is parsed, checked",
    "and refused with a message naming the file, never executed.",
    "",
    "| what | trusted? | how it is enforced (where) |",
    "|---|---|---|",
    "| checkpoints and saved models (`checkpoints/step_*/`, `best/`) | data only | weights in safetensors; "
    "optimizer, scheduler and RNG states read with `torch.load(weights_only=True)` (tensors and plain data); "
    "JSON and `.npy` with `allow_pickle=False`; a file the format does not list (e.g. accelerate's "
    "`custom_checkpoint_*.pkl`) is refused unread; the sha256 of every file is recorded when it is written and "
    "checked when it is loaded, so a flipped bit is named (`vlpl/train/checkpoint.py`, "
    "`vlpl/train/model_io.py`) |",
    "| code named in a config or checkpoint | never imported | heads, losses and rules are looked up by "
    "registered name only; a checkpoint can only name a head that is already registered, and no module named "
    "in a config, saved run or checkpoint is imported (`vlpl/registry.py`, `vlpl/train/model_io.py`) |",
    "| plugins (your own loss, rule or head) | trusted, by your choice | only from the command line "
    "(`--plugin MODULE`) or installed `vlpl.plugins` entry points; a config with a `plugins` key is refused "
    "(`vlpl/plugins.py`) |",
    "| teacher and student weights | chosen by name | open_clip / timm factories; local or hub weights loaded "
    "with `weights_only=True` where the library offers it |",
    "| image paths in file lists | confined | resolved (symlinks too) and kept inside the data root; absolute "
    "paths, `..` and symlinks out are refused naming the reference unless `images.allow_outside_root: true` "
    "(`vlpl/data/images.py`) |",
    "| image files | untrusted | pixel budget from the header before decoding (`images.max_pixels`, default "
    "89,478,485 = PIL's limit), PIL's decompression-bomb guard on, truncated files are errors; a bad image is a "
    "failed row naming the file and the reason, and a run with more than `max_failed_fraction` failures "
    "stops with a summary (`vlpl/data/images.py`, `vlpl/pseudolabel/stage.py`) |",
    "| label files (CSV, JSONL) | untrusted | strict UTF-8 schemas: extra or missing columns, ragged rows and "
    "unknown classes are errors with the file and line number (`vlpl/data/readers.py`) |",
    "| score stores | checked | Parquet page CRCs written and verified on every read; the manifest carries a "
    "sha256 of its own content, checked on open; the full sha256 of each shard checked on resume (by the "
    "process that owns the shard) and on demand (`vlpl inspect --verify`); a resume with another model, "
    "classes, views or inputs is refused before anything is written (`vlpl/store/store.py`) |",
    "| concurrent writers | one at a time | an advisory lock `STORE/.lock` (`flock`, holding host, pid and "
    "start time): a second writer is refused at once naming the owner; a stale lock (owner gone) is "
    "reported and taken over (`vlpl/store/lock.py`) |",
    "| partial writes | never visible | every output is written to a temporary name, fsynced and renamed; "
    "temporary files left by a killed run are removed by the next; a full disk or a permission error is a "
    "message naming the file and the cause (`vlpl/store/atomic.py`) |",
    "",
    "Not covered: a plugin or installed package runs with the user's rights like any module they import; "
    "pretrained weights chosen by name are trusted as the library that fetches them trusts them; outputs go "
    "where the config says (`out`, `store`), with the user's permissions.",
    "",
]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", type=Path,
                    help="a results .jsonl (default: tests/faults/.results/long.jsonl if it has records, else ci.jsonl)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the page to write (default {DEFAULT_OUT})")
    ap.add_argument("--junit", type=Path, help="pytest JUnit XML of the same run (default: beside the results)")
    ap.add_argument("--commit", help="the commit the run tested, when it is not the checkout's HEAD now")
    args = ap.parse_args(argv)
    source = args.results or default_results()
    try:
        records = read_records(source)
        junit = read_junit(args.junit or source.with_suffix(".xml"))
    except ReportError as e:
        print(f"make_report: {e}", file=sys.stderr)
        return 2
    text = render(records, source, junit, commit=f"`{args.commit}`" if args.commit else None)
    sys.path.insert(0, str(REPO))
    from vlpl.store.atomic import atomic_write_text

    atomic_write_text(args.out, text)
    rows = aggregate(records)
    print(f"{args.out}: {len(rows)} faults, {sum(r['trials'] for r in rows)} trials, "
          f"{sum(r['lost'] for r in rows)} lost (from {source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
