"""Sweeps: the file format and its errors, the shipped pipelines, a sweep on a coco256 store (the second
invocation trains nothing, the compare table holds each run's report values), and the coco256 partial-label
pipeline end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vlpl.config import ConfigError, PseudolabelConfig, load_config
from vlpl.pipeline import load_pipeline
from vlpl.sweep import load_sweep, run_sweep, sweep_from_doc

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "models" / "tiny_classifier.yaml")


def _doc(store: str, out: str, **extra):
    doc = {"store": store, "out": out,
           "base": {"config": [TINY], "set": {"epochs": 1, "dataset": "coco2014", "progress": False, "max_steps_per_epoch": 3,
                                               "checkpoint_every_minutes": None}},
           "variants": [{"name": "an", "set": {"method": "an"}},
                        {"name": "gpr_knn", "set": {"loss": {"name": "gpr"},
                                                    "pseudo": {"rule": "knn", "params": {"base": "damp", "k": 4}}}}],
           "evaluate": {"set": {"plots": False}}}
    doc.update(extra)
    return doc


def test_sweep_file_resolves_variants(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**_doc("${work}/store", "${work}/out"), "vars": {"work": "/nowhere"}}))
    sw = load_sweep(p, ["work=/w"])
    assert [v.name for v in sw.variants] == ["an", "gpr_knn"] and sw.out == Path("/w/out")
    v = sw.variants[1]
    assert v.config == [TINY] and v.out == Path("/w/out/gpr_knn")
    assert v.overrides[0] == "store=/w/store" and "loss.name=gpr" in v.overrides and "pseudo.rule=knn" in v.overrides
    assert sw.evaluate == ["plots=false"]


@pytest.mark.parametrize("change, message", [
    ({"variants": [{"name": "a", "set": {"method": "an"}}, {"name": "a", "set": {"method": "an"}}]}, "duplicate"),
    ({"variants": [{"name": "a/b", "set": {"method": "an"}}]}, "must be a folder name"),
    ({"variants": [{"name": "x", "set": {"method": "an", "epohcs": 2}}]}, "sweep variant 'x'.*epohcs"),
    ({"variants": [{"name": "x", "set": {"pseudo": {"rule": "knn", "params": {"k": 0}}}}]}, "sweep variant 'x'.*k"),
    ({"variants": []}, "non-empty list"),
    ({"stores": "x"}, "unknown key"),
])
def test_sweep_errors_name_the_variant_before_anything_trains(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        sweep_from_doc(_doc("/s", str(tmp_path)) | change, "s.yaml")


def test_shipped_pipelines_check(tmp_path):
    """Every shipped sweep pipeline loads and every variant's config validates (the coco_partial grid:
    p in {0.1, 0.3, 0.5, 0.7, 0.9} x an, csl, satl, aevlp; the ablation: every registered rule)."""
    from vlpl.registry import list_rules

    names = {}
    for f in ("coco_partial", "coco256_partial", "ablation_rules", "coco256_ablation_rules"):
        stages = load_pipeline(str(REPO / "pipelines" / f"{f}.yaml"), [f"work={tmp_path}"])
        for st in stages:
            if st["stage"] == "pseudolabel":
                cfg = load_config(PseudolabelConfig, st["config"], st["overrides"])
                assert cfg.out.startswith(str(tmp_path))
        sweeps = [sweep_from_doc(s["doc"], s["where"]) for s in stages if s["stage"] == "sweep"]
        assert len(sweeps) == 1
        names[f] = [v.name for v in sweeps[0].variants]
    assert names["coco_partial"] == [f"{m}_p{p}" for p in (0.1, 0.3, 0.5, 0.7, 0.9) for m in ("an", "csl", "satl",
                                                                                               "aevlp")]
    assert sorted(n.removeprefix("rule_") for n in names["ablation_rules"]) == list_rules()
    assert names["coco256_ablation_rules"] == names["ablation_rules"]
    keeps = [load_config(PseudolabelConfig, st["config"], st["overrides"]).data.observed.keep
             for st in load_pipeline(str(REPO / "pipelines" / "coco_partial.yaml"), [f"work={tmp_path}"])
             if st["stage"] == "pseudolabel"]
    assert keeps == [0.1, 0.3, 0.5, 0.7, 0.9]


def _train_calls(monkeypatch):
    import vlpl.train.loop as loop

    calls = []
    real = loop.run_train
    monkeypatch.setattr(loop, "run_train", lambda cfg: calls.append(cfg.out) or real(cfg))
    return calls


@pytest.mark.slow  # two 1-epoch runs, their evaluations and the second invocation: about a minute on a shared CPU
def test_sweep_skips_finished_variants_and_compares_report_values(coco256_store, tmp_path, monkeypatch):
    calls = _train_calls(monkeypatch)
    sweep = sweep_from_doc(_doc(str(coco256_store), str(tmp_path / "sw")), "test")
    out = run_sweep(sweep)
    assert len(calls) == 2
    doc = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["an", "gpr_knn"]
    for row, name in zip(doc["rows"], ("an", "gpr_knn")):
        rep = json.loads((tmp_path / "sw" / name / "eval" / "report.json").read_text())
        for key in ("map", "map_pos", "CF1", "OF1", "num_images", "split"):
            assert row[key] == rep["summary"][key], (name, key)
        assert row["teacher_global_map"] == rep["baseline"]["scores"]["global"]["map"]
        assert row["vs_teacher"] == pytest.approx(row["map"] - row["teacher_global_map"])
    assert doc["rows"][1]["rule"] == "knn" and doc["rows"][0]["rule"] == "none"
    assert len(doc["baselines"]) == 1  # one store, one split: one baseline row
    md = (out / "compare.md").read_text()
    assert "| gpr_knn | run |  | gpr | knn |" in md and "Teacher zero-shot baseline" in md
    summary = json.loads((tmp_path / "sw" / "an" / "summary.json").read_text())
    assert doc["rows"][0]["best_val_map"] == summary["best_val_map"] and doc["rows"][0]["best_epoch"] == 1
    assert (out / "compare.png").stat().st_size > 1000

    mtimes = {n: (tmp_path / "sw" / n / "summary.json").stat().st_mtime_ns for n in ("an", "gpr_knn")}
    again = run_sweep(sweep_from_doc(_doc(str(coco256_store), str(tmp_path / "sw")), "test"))
    assert len(calls) == 2  # the second invocation trains nothing
    assert mtimes == {n: (tmp_path / "sw" / n / "summary.json").stat().st_mtime_ns for n in mtimes}
    assert json.loads((again / "compare.json").read_text())["rows"] == doc["rows"]

    # an interrupted run (no summary.json) is resumed from its checkpoint, not trained again from scratch
    best = (tmp_path / "sw" / "an" / "best" / "model.safetensors").read_bytes()
    (tmp_path / "sw" / "an" / "summary.json").unlink()
    run_sweep(sweep_from_doc(_doc(str(coco256_store), str(tmp_path / "sw")), "test"))
    assert len(calls) == 3 and (tmp_path / "sw" / "an" / "summary.json").is_file()
    assert (tmp_path / "sw" / "an" / "best" / "model.safetensors").read_bytes() == best

    # a finished run of another spec is refused, naming the variant
    changed = _doc(str(coco256_store), str(tmp_path / "sw"))
    changed["variants"][0]["set"]["epochs"] = 2
    with pytest.raises(ConfigError, match="sweep variant 'an'.*another spec"):
        run_sweep(sweep_from_doc(changed, "test"))

    # vlpl evaluate --compare ... --out DIR writes the same table
    from vlpl.cli import main

    assert main(["evaluate", "--compare", str(tmp_path / "sw" / "an"), str(tmp_path / "sw" / "gpr_knn"),
                 "--out", str(tmp_path / "cmp")]) == 0
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"] == doc["rows"]


@pytest.mark.slow
def test_coco256_partial_pipeline_end_to_end(coco256_root, tmp_path, monkeypatch):
    """pipelines/coco256_partial.yaml (p = 0.5; an, csl, satl, aevlp) produces its table."""
    from vlpl.pipeline import run_pipeline

    calls = _train_calls(monkeypatch)
    run_pipeline(str(REPO / "pipelines" / "coco256_partial.yaml"), [f"work={tmp_path / 'w'}", f"data={coco256_root}"])
    doc = json.loads((tmp_path / "w" / "sweep" / "compare" / "compare.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["an_p0.5", "csl_p0.5", "satl_p0.5", "aevlp_p0.5"]
    assert {r["method"] for r in doc["rows"]} == {"an", "csl", "satl", "aevlp"}
    assert all(r["observed"] == "partial keep=0.5" and r["map"] is not None for r in doc["rows"])
    assert len(calls) == 4


def _report(path: Path, name: str, mAP: float, masked, teacher: float) -> Path:
    summary = {"name": name, "kind": "run", "split": "test", "num_images": 10, "map": mAP, "map_pos": mAP + 1,
               "CF1": 20.0, "OF1": 30.0}
    if masked is not None:
        summary.update(masked_map=masked, masked_classes_used=5, masked_classes_skipped=1)
    rep = {"schema": "vlpl.evaluate/2", "units": {}, "name": name, "summary": summary, "headline": [summary],
           "run": {"train_config": {"method": "csl", "loss": {"name": "csl"}, "pseudo": {"rule": None},
                                    "store": str(path / "no-store")},
                   "summary": {"best_epoch": 3, "best_val_map": 50.0, "select": "masked_map_observed"}},
           "baseline": {"num_images": 10, "scores": {"global": {"map": teacher, "map_pos": teacher},
                                                     "damp": {"map": teacher - 1, "map_pos": teacher}}}}
    d = path / name / "eval"
    d.mkdir(parents=True)
    (d / "report.json").write_text(json.dumps(rep))
    return path / name


def test_compare_table_masked_map_and_baseline_by_hand(tmp_path):
    from vlpl.eval.compare import write_comparison

    a = _report(tmp_path, "csl_p0.5", 40.0, 55.5, 30.0)
    b = _report(tmp_path, "an_p0.5", 35.0, None, 30.0)
    out = write_comparison([a, b], tmp_path / "cmp")
    doc = json.loads((out / "compare.json").read_text())
    assert [r["masked_map"] for r in doc["rows"]] == [55.5, None]
    assert [r["vs_teacher"] for r in doc["rows"]] == [10.0, 5.0]
    assert doc["rows"][0]["best_val_map"] == 50.0 and doc["rows"][0]["best_epoch"] == 3
    assert len(doc["baselines"]) == 1 and doc["baselines"][0]["scores"]["damp"]["map"] == 29.0
    md = (out / "compare.md").read_text()
    assert "masked mAP (%)" in md and "| csl_p0.5 | run | csl | csl | none |  | 3 | 50.00 | test | 10 | 40.00 | 55.50 |" in md
    assert "| an_p0.5 | run | csl | csl | none |  | 3 | 50.00 | test | 10 | 35.00 | n/a |" in md
    assert "counts unknown entries as negatives" in md and "| 30.00 | 29.00 |" in md
