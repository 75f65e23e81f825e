"""The fault-injection suite (issue 9): kills, full disks, bit flips and bad inputs, each proved harmless.

Every test here is marked ``faults``. CI runs a bounded version (a few trials per stage); the long version
runs on demand::

    VLPL_FAULTS_LONG=1 .venv/bin/python -m pytest tests/faults -m faults
    .venv/bin/python tests/faults/make_report.py      # regenerates docs/RELIABILITY.md from the last run

A test reports what it did through the ``record_fault`` fixture; the records of a run are appended to
``$VLPL_FAULTS_RESULTS`` (default ``tests/faults/.results/<mode>.jsonl``), from which ``make_report.py``
builds the table of docs/RELIABILITY.md.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

LONG = os.environ.get("VLPL_FAULTS_LONG") == "1"
RESULTS_DIR = Path(__file__).resolve().parent / ".results"


def trials(ci: int, long: int) -> int:
    """How many random trials a fault test makes: ``ci`` in the bounded run, ``long`` on demand."""
    return long if LONG else ci


def pytest_collection_modifyitems(items):  # every test in this folder is a fault test
    for item in items:
        if "tests/faults/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.faults)


def _results_path() -> Path:
    env = os.environ.get("VLPL_FAULTS_RESULTS")
    return Path(env) if env else RESULTS_DIR / ("long.jsonl" if LONG else "ci.jsonl")


@pytest.fixture(scope="session", autouse=True)
def _fresh_results() -> Iterator[None]:
    """Start each session's results file afresh (a run's report covers that run only)."""
    path = _results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    yield


@pytest.fixture
def record_fault(request) -> Callable[..., None]:
    """``record_fault(stage, fault, trials, ok, lost=0, detail="")``: one line of the reliability table.

    ``stage``: pseudolabel | train | export | inputs | store; ``fault``: what was injected (e.g. "kill -9 at a
    random point", "ENOSPC at write", "1-bit flip in a shard"); ``trials``: how many injections; ``ok``: how
    many ended as they must (resumed byte-identical, detected and named, read correctly or a failed row);
    ``lost``: results lost or silently altered (must be 0); ``detail``: one line of what was checked.
    """

    def rec(stage: str, fault: str, trials: int, ok: int, lost: int = 0, detail: str = "") -> None:
        line = {"test": request.node.nodeid, "stage": stage, "fault": fault, "trials": int(trials), "ok": int(ok),
                "lost": int(lost), "detail": detail, "long": LONG, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}"}
        with open(_results_path(), "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    return rec
