"""Fixes found by running issues 12 and 14 end to end as a user (helper Q1): each test fails without its fix."""
from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import pytest

from vlpl.eval.report import random_model_notice, run_summary_baseline, teacher_baseline

REPO = Path(__file__).resolve().parent.parent
TINY_TEACHER = {"backend": "open_clip", "name": "vlpl-tiny", "pretrained": None, "checkpoint_sha256": None}


def _report(student: Dict[str, Any]) -> Dict[str, Any]:
    return {"model": TINY_TEACHER, "run": {"train_config": {"student": student}}}


def test_student_random_fallback_is_random() -> None:
    """``pretrained: true`` whose weights could not be loaded (``pretrained_tag: null``, the random fallback) is a
    random student; a loaded tag is not; configs without the recorded key fall back to ``pretrained``."""
    asked_but_failed = random_model_notice(_report({"name": "resnet50", "pretrained": True, "pretrained_tag": None}))
    assert "`resnet50` started from random weights" in asked_but_failed
    loaded = random_model_notice(_report({"name": "resnet50", "pretrained": True,
                                          "pretrained_tag": "resnet50.tv_in1k"}))
    assert "resnet50" not in loaded  # only the teacher is named
    assert "`r18` started" in random_model_notice(_report({"name": "r18", "pretrained": False}))
    assert "r18" not in random_model_notice(_report({"name": "r18", "pretrained": True}))


def test_summary_baseline_log_uses_masked_map_on_partial_labels(coco256_real_partial_store: Path, caplog) -> None:
    """A partial store's test mAP (the run's ``test_map_at_best``) is the masked mAP, so the summary's log line
    must show the teacher's masked mAP beside it, not its Cole mAP (unknowns as negatives)."""
    base = teacher_baseline(coco256_real_partial_store, "test")
    assert base["labels_kind"] == "partial"
    with caplog.at_level(logging.INFO, logger="vlpl.eval.report"):
        run_summary_baseline(coco256_real_partial_store, "test", None, None, trained_map=44.5)
    line = next(r.getMessage() for r in caplog.records if "teacher zero-shot" in r.getMessage())
    nums = [float(x) for x in re.findall(r"([0-9.]+) %", line)]
    g, d = base["scores"]["global"], base["scores"]["damp"]
    assert "masked mAP" in line
    assert nums == [round(g["masked_map"], 2), round(d["masked_map"], 2), 44.5]
    assert round(g["map"], 2) not in nums[:2]


def test_url_store_paths_stay_urls(coco256_real_partial_store: Path, tmp_path: Path, monkeypatch) -> None:
    """A store on an fsspec URL: the run's summary.json records the URL as given (``Path()`` made it
    ``/cwd/memory:/...``), and ``vlpl evaluate store=URL`` needs a local ``out=`` (it wrote ``./memory:/.../eval``)
    and then evaluates the store through the URL."""
    import uuid

    import fsspec
    import pytest

    from vlpl.config import ConfigError, EvaluateConfig, load_config
    from vlpl.eval.stage import run_evaluate
    from vlpl.train.loop import _store_path

    assert _store_path("memory://bkt/s") == "memory://bkt/s"
    assert _store_path(["s3://b/one", str(coco256_real_partial_store)]) == \
        ["s3://b/one", str(coco256_real_partial_store.resolve())]
    assert _store_path("hf:user/ds") == "hf:user/ds"

    monkeypatch.setenv("VLPL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    mem = fsspec.filesystem("memory")
    name = f"/vlpl-q1-{uuid.uuid4().hex[:8]}"
    url = f"memory://{name.lstrip('/')}/store"
    try:
        mem.put(str(coco256_real_partial_store), f"{name}/store", recursive=True)
        with pytest.raises(ConfigError, match="fsspec URL.*out=DIR"):
            run_evaluate(load_config(EvaluateConfig, [], [f"store={url}", "plots=false", "rules={damp: {}}"]))
        assert not any(tmp_path.glob("memory*"))  # nothing written under the working directory
        out = run_evaluate(load_config(EvaluateConfig, [], [f"store={url}", f"out={tmp_path / 'ev'}",
                                                            "plots=false", "rules={damp: {}}"]))
        assert out == tmp_path / "ev" and (out / "report.json").is_file()
        assert not any(tmp_path.glob("memory*"))
        # the evaluate report of a run trained on the URL store names the teacher; a recipe checks its teacher
        from vlpl.eval.stage import _model_identity
        from vlpl.train.recipes import load_train_config, warn_teacher_mismatch

        assert _model_identity(None, {"summary": {"store": url}})["name"] == "vlpl-tiny"
        cfg = load_train_config([], [f"store={url}", "out=R", "method=aevlp", "dataset=coco2014"])
        assert any("vlpl-tiny" in d for d in warn_teacher_mismatch(cfg))
        # vlpl calibrate URL: the default file inside the store would be ./memory:/...; --out is required
        from vlpl.cli import main

        assert main(["calibrate", url]) == 2
        assert not any(tmp_path.glob("memory*"))
        assert main(["calibrate", url, "--out", str(tmp_path / "th.json")]) == 0 and (tmp_path / "th.json").is_file()
    finally:
        if mem.exists(name):
            mem.rm(name, recursive=True)


@pytest.fixture(scope="module")
def tiny_ensemble(coco256_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, str, int]:
    """``vlpl pseudolabel teachers=[CLIP-type tiny, SigLIP-type tiny]`` on 10 coco256 images with p = 0.5 partial
    labels, through the CLI: (the ensemble directory, what the command printed, its exit status)."""
    from tests.conftest import REPO_ROOT, make_subset_dataset
    from vlpl.cli import main

    tmp = tmp_path_factory.mktemp("q1_ens")
    data = make_subset_dataset(coco256_root, tmp / "data", n_train=6, n_test=4)
    models = REPO_ROOT / "configs" / "models"
    out = tmp / "ens"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["pseudolabel", "-c", str(models / "tiny.yaml"), f"data.root={data}", f"out={out}",
                   f"teachers=[{models / 'tiny.yaml'}, {models / 'tiny_sigmoid.yaml'}]",
                   "ensemble_weights=[0.6, 0.4]", "views.grid=1", "num_workers=0", "progress=false", "index=false",
                   "data.observed.mode=partial", "data.observed.keep=0.5"])
    return out, buf.getvalue(), rc


def test_cli_pseudolabel_with_teachers_prints_the_ensemble(tiny_ensemble: Tuple[Path, str, int]) -> None:
    """``vlpl pseudolabel teachers=[CLIP-type, SigLIP-type]`` exits 0 and prints the ensemble's members and their
    summaries (it exited 2: the summary looked for manifest.json in the ensemble directory)."""
    _, text, rc = tiny_ensemble
    assert rc == 0
    assert "combined score kind probability" in text
    assert "member     vlpl-tiny-random: weight 0.6, score kind cosine" in text
    assert "member     vlpl-tiny-sigmoid-random: weight 0.4, score kind siglip" in text
    assert text.count("rows       10  failed 0") == 2  # each member's own store summary


def test_csl_prior_from_clip_on_an_ensemble(tiny_ensemble: Tuple[Path, str, int], tmp_path: Path) -> None:
    """CSL's class prior (``prior=clip``) on a teacher-ensemble store reads the ensemble's combined scores (it
    opened ``ScoreStore(ensemble dir)``: "not a score store: manifest.json not found")."""
    from vlpl.store.store import ScoreStore
    from vlpl.train.losses.csl import PRIOR_FILE, clip_prior, prepare_csl_prior, read_prior_csv
    from vlpl.train.recipes import load_train_config

    ens = tiny_ensemble[0]
    cfg = load_train_config([REPO / "configs" / "models" / "tiny_classifier.yaml"], [
        f"store={ens}", f"out={tmp_path / 'run'}", "method=csl", "dataset=coco2014_rps05", "loss.params.prior=clip"])
    new = prepare_csl_prior(cfg)
    assert new.loss.params["prior_file"] == str(tmp_path / "run" / PRIOR_FILE)
    store = ScoreStore.open(ens)
    got = read_prior_csv(tmp_path / "run" / PRIOR_FILE, classes=list(store.classes))
    want = clip_prior(store.split("train"), "vlpl")  # the default prior_rule
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_train_dry_run_prints_the_resolved_recipe(tmp_path: Path, capsys) -> None:
    """``vlpl train method=aevlp dataset=coco2014 --dry-run`` shows the recipe resolved to the paper's exact
    student weights (torchvision's resnet50.tv_in1k), fp32 training and the recipe's teacher (OpenAI ViT-B/16,
    fp16, grid 4), the overrides winning, and trains nothing."""
    import yaml

    from vlpl.cli import main
    from vlpl.config import to_dict
    from vlpl.train.recipes import load_train_config

    args = ["method=aevlp", "dataset=coco2014", "store=nowhere", f"out={tmp_path / 'run'}", "optim.lr=0.5"]
    assert main(["train", *args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "# student weights asked for: timm resnet50.tv_in1k" in text
    assert "configs/models/clip_vit_b16.yaml: open_clip ViT-B-16 pretrained=openai" in text
    assert "grid 4, precision fp16" in text
    printed = yaml.safe_load(text)
    assert printed == to_dict(load_train_config([], args))
    assert printed["student"]["name"] == "resnet50.tv_in1k" and printed["mixed_precision"] == "no"
    assert printed["optim"]["lr"] == 0.5 and printed["pseudo"]["variant"] == "random"
    assert not (tmp_path / "run").exists()


def test_compare_reads_an_ensembles_protocol_and_shows_the_teachers_masked_map(
        tiny_ensemble: Tuple[Path, str, int]) -> None:
    """``vlpl evaluate --compare``: the ``observed`` column of a run trained on an ensemble directory names the
    protocol (it was empty: ``ScoreStore(ensemble dir)`` failed), and the teacher baseline table gives the
    teacher's masked mAP beside the runs' masked mAP when the evaluation labels are partial."""
    from vlpl.eval.compare import _observed_label, render_comparison

    ens = tiny_ensemble[0]
    assert _observed_label(str(ens)) == "partial keep=0.5"
    assert _observed_label([str(p) for p in sorted((ens / "teachers").iterdir())]) == "partial keep=0.5"
    row = {"name": "r", "method": "csl", "loss": "csl", "rule": None, "observed": "given", "best_epoch": 1,
           "best_val_map": 60.0, "split": "test", "num_images": 4, "map": 5.0, "masked_map": 44.0, "CF1": 1.0,
           "OF1": 2.0, "vs_teacher": -1.0}
    base = {"store": "/s", "observed": "given", "split": "test", "num_images": 4,
            "scores": {"global": {"map": 6.0, "map_pos": 7.0, "masked_map": 43.4},
                       "damp": {"map": 4.3, "map_pos": 5.0, "masked_map": 42.1}}}
    md = render_comparison({"rows": [row], "baselines": [base]})
    assert "| global view mAP (%) | DAMP mAP (%) | global view masked mAP (%) | DAMP masked mAP (%) |" in md
    assert "| /s | given | test | 4 | 6.00 | 4.30 | 43.40 | 42.10 |" in md
    full = {**base, "scores": {"global": {"map": 6.0}, "damp": {"map": 4.3}}}
    assert "masked mAP (%) |" not in render_comparison({"rows": [{**row, "masked_map": None}], "baselines": [full]})


def test_raw_score_thresholds_are_refused_on_a_probability_ensemble(tiny_ensemble: Tuple[Path, str, int],
                                                                    tmp_path: Path) -> None:
    """Thresholds fitted on a member's raw cosines (``vlpl calibrate MEMBER``, aggregate global) are in other units
    than a mixed-kind ensemble's probabilities: rule ``calibrated`` refuses them naming the file (it used them
    with only an "another store" warning); the member itself and a ``damp`` file stay usable."""
    import torch

    from vlpl.pseudolabel.calibrate import calibrate_store, write_thresholds
    from vlpl.pseudolabel.rules import RuleRows, apply_rule
    from vlpl.store.store import ScoreStore

    ens = tiny_ensemble[0]
    member = ens / "teachers" / "vlpl-tiny-sigmoid-random"
    files = {}
    for agg in ("global", "damp"):
        files[agg] = write_thresholds(tmp_path / f"{agg}.json",
                                      calibrate_store(member, aggregate=agg, show_progress=False))

    def label(store: Any, agg: str) -> torch.Tensor:
        sp = store.split("train")
        pos = np.arange(len(sp))
        return apply_rule("calibrated", torch.as_tensor(sp.scores(pos)).float(),
                          torch.from_numpy(sp.observed_at(pos)).to(torch.int8), dynamic=False,
                          rows=RuleRows(sp, pos), thresholds=str(files[agg]))

    with pytest.raises(ValueError, match=r"global\.json holds thresholds on raw teacher scores.*teacher ensemble"):
        label(ScoreStore.open(ens), "global")
    assert label(ScoreStore.open(member), "global").shape == (5, 80)
    assert label(ScoreStore.open(ens), "damp").shape == (5, 80)


def test_results_page_reads_masked_map_and_flags_random_models() -> None:
    """``python -m vlpl.results``: a run evaluated on partial labels is measured by its masked mAP (the partial-label
    benchmarks' metric) beside the teacher's masked mAP, not Cole's mAP with unknowns as negatives; a run of random
    models says so in its row."""
    from vlpl.results import _measured_table, measured_row

    report = {"provenance": {"command": "vlpl evaluate run=R", "commit": "abc"}, "split": "test",
              "model": TINY_TEACHER,
              "run": {"num_images": 4, "metrics": {"map": 5.3, "labels_kind": "partial", "masked": {"map": 44.76}},
                      "train_config": {"method": "csl", "student": {"name": "test_resnet", "pretrained": False,
                                                                    "pretrained_tag": None}}},
              "baseline": {"dataset": "coco256_partial_real",
                           "scores": {"global": {"map": 5.97, "masked_map": 43.4},
                                      "damp": {"map": 4.34, "masked_map": 42.11}}}}
    row = measured_row(report, "R/eval/report.json")
    assert (row["map"], row["teacher_global_map"], row["teacher_damp_map"]) == (44.76, 43.4, 42.11)
    assert row["metric"] == "masked_map" and row["random_models"]
    table = _measured_table([row])
    line = table[2]
    assert "| 44.76 (masked mAP: partial labels) | 43.40 / 42.11 |" in line
    assert line.endswith("**random models** |") and "mean nothing" in table[-1]
    full = {**report, "model": {"backend": "open_clip", "name": "ViT-B-16", "pretrained": "openai"},
            "run": {**report["run"], "metrics": {"map": 5.3}}}
    row = measured_row(full, "R/eval/report.json")
    assert (row["map"], row["teacher_global_map"], row["metric"], row["random_models"]) == (5.3, 5.97, "map", False)


def test_knn_rule_on_a_teacher_ensemble(tiny_ensemble: Tuple[Path, str, int]) -> None:
    """Rule ``knn`` on a teacher ensemble (directory or list) runs (it raised "EnsembleStore has no attribute
    'cache_dir'"): neighbours from the primary member's image embeddings / index, scores from the ensemble's
    combination; the smoothed scores equal the hand computation from the neighbour table."""
    import torch

    from vlpl.pseudolabel.neighbours import neighbour_smoothed, neighbour_table, smooth_scores
    from vlpl.pseudolabel.rules import RuleRows, apply_rule
    from vlpl.store.store import ScoreStore

    ens = tiny_ensemble[0]
    members = [str(p) for p in sorted((ens / "teachers").iterdir())]
    for store in (ScoreStore.open(ens), ScoreStore.open(members, weights=[0.5, 0.5])):
        sp = store.split("train")
        pos = np.arange(len(sp))
        scores = torch.as_tensor(sp.scores(pos)).float()
        out = apply_rule("knn", scores, torch.from_numpy(sp.observed_at(pos)).to(torch.int8), dynamic=False,
                         rows=RuleRows(sp, pos), base="damp", k=2)
        assert out.shape == (len(pos), 80)
        table = neighbour_table(store, "train", 2)
        primary = neighbour_table(store.primary, "train", 2)  # the same image embeddings: the same neighbours
        np.testing.assert_array_equal(table.positions, primary.positions)
        unflipped = scores[:, 0]
        got = neighbour_smoothed(unflipped, RuleRows(sp, pos), k=2, alpha=0.5, weighting="uniform")
        nb = torch.as_tensor(table.positions)
        nbr = scores.mean(dim=1)[nb]  # (B, k, views, C): the neighbours' flip-averaged combined scores
        valid = nb >= 0
        w = valid.float() / valid.float().sum(1, keepdim=True).clamp(min=1)
        want = smooth_scores(unflipped, nbr, w, 0.5, "all")
        torch.testing.assert_close(got, want)


def test_teacher_agreement_selection_passes_rows_and_the_score_kind(tiny_ensemble: Tuple[Path, str, int]) -> None:
    """``select=teacher_agreement`` runs the run's rule with the batch's rows: ``knn`` works (it raised "needs the
    batch's rows"), and on a SigLIP-type store the rule reads per-class sigmoids (it ran under the cosine kind)."""
    import torch

    from vlpl.eval.selection import Selector
    from vlpl.pseudolabel.rules import apply_rule
    from vlpl.store.store import ScoreStore

    ens = tiny_ensemble[0]
    val = ScoreStore.open(ens).split("test")
    got = Selector("teacher_agreement", val, "knn", {"base": "damp", "k": 2}).teacher_targets(val)
    assert got.shape == (len(val), 80)
    sig = ScoreStore.open(ens / "teachers" / "vlpl-tiny-sigmoid-random").split("test")
    params = {"threshold": 0.001, "score": "softmax", "view": "global"}
    got = Selector("teacher_agreement", sig, "threshold", params).teacher_targets(sig)
    pos = np.arange(len(sig))
    scores, obs = torch.from_numpy(sig.scores(pos)), torch.from_numpy(sig.observed_at(pos))
    want = apply_rule("threshold", scores, obs, dynamic=False, score_kind=sig.score_kind, **params).numpy() == 1
    cosine = apply_rule("threshold", scores, obs, dynamic=False, **params).numpy() == 1
    np.testing.assert_array_equal(got, want | (obs.numpy() == 1))
    assert (want != cosine).any()  # the kind matters here: softmax over classes vs per-class sigmoids
