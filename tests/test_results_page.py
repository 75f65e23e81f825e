"""The results page (issue 14, item 14): docs/RESULTS.md is what ``python -m vlpl.results`` generates; its recipe
commands load; a measured row comes only from a run's report with a command and a commit."""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import yaml

from vlpl.results import BENCHMARKS, main, measured_row, render_results

REPO = Path(__file__).resolve().parent.parent


def test_the_committed_page_is_the_generated_one() -> None:
    page = (REPO / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    assert page == render_results([]), "docs/RESULTS.md is out of date: run python -m vlpl.results"
    # with no report, every benchmark's measured table is empty and nothing else is measured
    assert page.count("_No measured run yet._") == len(BENCHMARKS) and "## Other datasets" not in page
    for b in BENCHMARKS:
        assert f"### {b.title}" in page and all(f"| {v} |" in page for _, _, v, _ in b.papers)


def _split_command(cmd: str) -> Tuple[str, List[str], List[str]]:
    words = shlex.split(cmd)
    assert words[0] == "vlpl"
    files = [words[i + 1] for i, w in enumerate(words) if w == "-c"]
    overrides = [w for i, w in enumerate(words[2:], 2) if w != "-c" and words[i - 1] != "-c"]
    return words[1], files, overrides


@pytest.mark.parametrize("bench", BENCHMARKS, ids=[b.key for b in BENCHMARKS])
def test_every_recipe_command_loads(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.ensemble import resolve_teachers
    from vlpl.train.recipes import load_train_config

    monkeypatch.chdir(REPO)  # the commands name configs/... relative to the repository
    for track in (bench.track1, bench.track2):
        stages = [_split_command(c)[0] for c in track]
        assert stages == ["pseudolabel", "train", "evaluate"]
        for cmd in track:
            stage, files, overrides = _split_command(cmd)
            assert all((REPO / f).is_file() for f in files), cmd
            if stage == "pseudolabel":
                cfg = load_config(PseudolabelConfig, files, overrides)
                assert cfg.data.name in bench.stores
                for name, teacher in resolve_teachers(cfg):  # every teacher file exists and is a teacher config
                    assert teacher.pretrained, name
            elif stage == "train":
                cfg = load_train_config(files, overrides)
                assert cfg.dataset in (bench.key, None) and cfg.method in ("aevlp", "csl")
                if track is bench.track1:
                    assert cfg.student.name in ("resnet50.tv_in1k", "tresnet_m.miil_in21k")


PROVENANCE = {"command": "vlpl evaluate run=runs/coco256", "commit": "0123456789abcdef" * 2 + "01234567",
              "dirty": False, "version": "x", "device": "cpu (x86_64, 2 threads)", "host": "h"}


def test_provenance_names_the_command_commit_and_device() -> None:
    from vlpl.provenance import git_commit, provenance

    p = provenance(["/usr/local/bin/vlpl", "evaluate", "run=my run"])
    assert p["command"] == "vlpl evaluate 'run=my run'" and p["device"]
    if git_commit() is None:
        pytest.skip("not running from a git checkout: no commit to record")
    assert len(p["commit"]) == 40 and int(p["commit"], 16) >= 0 and isinstance(p["dirty"], bool)


def _run_report(store: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> Tuple[Dict, Path]:
    """`vlpl evaluate` of a run by the trainer's contract that trained on the coco256 store."""
    import vlpl.eval.stage
    from vlpl.config import EvaluateConfig
    from vlpl.eval.stage import run_evaluate
    from vlpl.store.store import ScoreStore

    monkeypatch.setattr(vlpl.eval.stage, "provenance", lambda: dict(PROVENANCE))

    sp = ScoreStore(store).split("test")
    run = root / "run"
    (run / "predictions").mkdir(parents=True)
    probs = np.random.default_rng(1).random(sp.labels.shape).astype(np.float32)
    np.savez(run / "predictions" / "test.npz", probs=probs, labels=sp.labels, sample_ids=np.asarray(sp.sample_ids))
    (run / "classes.txt").write_text("".join(f"{c}\n" for c in ScoreStore(store).classes))
    (run / "config.yaml").write_text(yaml.safe_dump({"store": str(store), "method": "aevlp", "dataset": "coco2014",
                                                     "student": {"name": "resnet50.tv_in1k"},
                                                     "pseudo": {"rule": "damp", "params": {}}}))
    (run / "summary.json").write_text(json.dumps({"store": str(store), "method": "aevlp", "provenance": {
        "command": "vlpl train method=aevlp dataset=coco2014 store=S out=R", "device": "NVIDIA H200"}}))
    out = run_evaluate(EvaluateConfig(run=str(run), split="test", plots=False))
    return json.loads((out / "report.json").read_text()), out / "report.json"


def test_a_coco256_run_report_fills_its_row_and_leaves_the_benchmarks_empty(coco256_store: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    report, path = _run_report(coco256_store, tmp_path, monkeypatch)
    prov = report["provenance"]
    assert prov == PROVENANCE  # the evaluate report carries its provenance
    page = render_results([(report, "runs/coco256/eval/report.json", None)])
    # coco256 is not a benchmark: the row goes to its own section, even though the recipe row was coco2014
    assert page.count("_No measured run yet._") == len(BENCHMARKS)
    other = page[page.index("## Other datasets"):]
    assert "### coco256" in other
    row = next(line for line in other.splitlines() if line.startswith("| 1 | aevlp |"))
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells[2] == "`resnet50.tv_in1k`" and cells[3] == f"test ({report['run']['num_images']})"
    assert cells[4] == f"{report['run']['metrics']['map']:.2f}"
    base = report["baseline"]["scores"]
    assert cells[5] == f"{base['global']['map']:.2f} / {base['damp']['map']:.2f}"
    assert cells[6] == "`vlpl train method=aevlp dataset=coco2014 store=S out=R`"
    assert cells[7] == "`vlpl evaluate run=runs/coco256`" and cells[8] == f"`{prov['commit'][:12]}`"
    assert cells[9] == "train: NVIDIA H200; evaluate: cpu (x86_64, 2 threads)"
    # the CLI writes the same page from the report file; track prefixes are honoured
    out = tmp_path / "RESULTS.md"
    assert main([f"track2:{path}", "--out", str(out)]) == 0
    assert "| 2 | aevlp |" in out.read_text()
    assert main([str(path), "--out", str(out), "--check"]) == 1  # the file has the track-2 row, not this page


def test_a_report_without_command_or_commit_is_refused(coco256_store: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    report, path = _run_report(coco256_store, tmp_path, monkeypatch)
    for key in ("commit", "command"):
        bad = json.loads(json.dumps(report))
        del bad["provenance"][key]
        with pytest.raises(ValueError, match=f"x.json: no provenance.{key}"):
            measured_row(bad, "x.json")
        p = tmp_path / f"no_{key}.json"
        p.write_text(json.dumps(bad))
        assert main([str(p), "--out", str(tmp_path / "page.md")]) == 2
        assert f"no provenance.{key}" in capsys.readouterr().err and not (tmp_path / "page.md").exists()
    store_only = {**report, "run": None}
    with pytest.raises(ValueError, match="not the report of a training run"):
        measured_row(store_only, "s.json")


def _minimal(dataset: str, recipe: str, method: str, student: str, m: float) -> Dict:
    return {"provenance": {"command": "vlpl evaluate run=R", "commit": "a" * 40, "device": "cpu"}, "split": "test",
            "created": "2026-01-01T00:00:00+00:00", "baseline": {"dataset": dataset, "scores": {}},
            "run": {"metrics": {"map": m}, "num_images": 10, "summary": {},
                    "train_config": {"dataset": recipe, "method": method, "student": {"name": student}}}}


def test_rows_go_to_the_benchmark_of_the_recipe_row_and_the_store() -> None:
    page = render_results([(_minimal("coco2014", "coco2014_fpc1000", "csl", "tresnet_m.miil_in21k", 81.5), "a", None),
                           (_minimal("coco2014", "coco2014", "aevlp", "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k",
                                     75.25), "b", None)])
    fpc = page[page.index("### COCO2014, FPC-1000"):page.index("### COCO2014, RPS-0.5")]
    spml = page[page.index("### COCO2014\n"):page.index("### NUS-WIDE")]
    assert "| 1 | csl |" in fpc and "81.50" in fpc and "75.25" not in fpc
    assert "| 2 | aevlp |" in spml and "75.25" in spml and "81.50" not in spml
    assert page.count("_No measured run yet._") == len(BENCHMARKS) - 2
