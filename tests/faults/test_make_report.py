"""tests/faults/make_report.py: the reliability page is built faithfully from a run's records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults import make_report as mr


def _rec(stage: str, fault: str, trials: int, ok: int, lost: int = 0, long: bool = True, test: str = "t::a") -> dict:
    return {"test": test, "stage": stage, "fault": fault, "trials": trials, "ok": ok, "lost": lost,
            "detail": f"{fault} checked", "long": long, "time": "2026-11-30T09:00:00", "machine": "x86_64 2 cpus"}


def _write(path: Path, recs: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_table_sums_per_fault_orders_stages_and_flags_losses(tmp_path):
    recs = [_rec("train", "kill -9", 20, 20, test="t::k1"), _rec("pseudolabel", "kill -9", 20, 20),
            _rec("train", "kill -9", 20, 19, lost=1, test="t::k2"), _rec("store", "1-bit flip", 400, 400)]
    text = mr.render(mr.read_records(_write(tmp_path / "long.jsonl", recs)), tmp_path / "long.jsonl",
                     commit="`abc`", generated="2026-11-30 09:20")
    section = text.split("## Faults injected and outcomes")[1].split("###")[0]
    table = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| stage")]
    assert table == [
        "| pseudolabel | kill -9 | 20 | 20 | 0 | all as required |",
        "| store | 1-bit flip | 400 | 400 | 0 | all as required |",
        "| train | kill -9 | 40 | 39 | 1 | **1 LOST** |",
        "| **all** | | **460** | **459** | **1** | |",
    ]
    assert "the **long** run" in text and "VLPL_FAULTS_LONG=1" in text and "Commit: `abc`" in text
    assert "## Security model" in text and "weights_only=True" in text
    assert "**1 lost or silently altered results**" in text
    assert text.count('"stage": "train"') == 2  # the raw records are kept, one a line


def test_bounded_run_is_named_and_junit_failures_listed(tmp_path):
    src = _write(tmp_path / "ci.jsonl", [_rec("inputs", "0-byte file", 1, 1, long=False, test="tests/x.py::test_a")])
    (tmp_path / "ci.xml").write_text(
        '<testsuites><testsuite time="90.0"><testcase classname="tests.x" name="test_a"/>'
        '<testcase classname="tests.x" name="test_b"><failure message="boom"/></testcase>'
        '<testcase classname="tests.x" name="test_c"><skipped/></testcase></testsuite></testsuites>')
    out = tmp_path / "R.md"
    assert mr.main([str(src), "--out", str(out)]) == 0
    text = out.read_text()
    assert "the **bounded** run that CI makes" in text and "VLPL_FAULTS_LONG" not in text.split("## Faults")[0]
    assert "1 fault tests passed, 1 failed, 1 skipped" in text and "(the suite took 1.5 minutes)" in text
    assert "- FAILED `tests.x::test_b` (recorded nothing: failed before its record)" in text


@pytest.mark.parametrize("line,msg", [
    ("not json", r"R\.jsonl:2: not JSON"),
    ('{"stage": "x", "fault": "y", "trials": 1}', r"R\.jsonl:2: .*missing ok, lost"),
    ('{"stage": "x", "fault": "y", "trials": 1, "ok": 2, "lost": 0}', r"R\.jsonl:2: ok \(2\) exceeds trials \(1\)"),
    ('{"stage": "x", "fault": "y", "trials": -1, "ok": 0, "lost": 0}', r"R\.jsonl:2: 'trials' must be"),
])
def test_bad_records_are_named_with_their_line(tmp_path, line, msg):
    p = tmp_path / "R.jsonl"
    p.write_text(json.dumps(_rec("a", "b", 1, 1)) + "\n" + line + "\n")
    with pytest.raises(mr.ReportError, match=msg):
        mr.read_records(p)


def test_missing_or_empty_results_are_refused(tmp_path, capsys):
    with pytest.raises(mr.ReportError, match="no such results file"):
        mr.read_records(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    assert mr.main([str(tmp_path / "e.jsonl"), "--out", str(tmp_path / "R.md")]) == 2
    assert "no records" in capsys.readouterr().err and not (tmp_path / "R.md").exists()
