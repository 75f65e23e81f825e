"""``vlpl demo``: the whole job (pseudolabel -> train -> evaluate) on an embedded default.

The data are real photographs shipped inside scikit-image, labelled by hand (:mod:`vlpl.demo_data`).
The teacher is a real pretrained CLIP (open_clip ViT-B-32, ``laion2b_s34b_b79k``) and the student a
timm ResNet-18 with ImageNet weights when those weights are cached or can be downloaded; otherwise (or
with ``--offline``) both fall back to tiny random-initialised models, and the demo says plainly that
its numbers then mean nothing.
"""
from __future__ import annotations

import json
import logging
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from vlpl.pseudolabel.params import DampParams

log = logging.getLogger(__name__)

REAL_CLIP = ("ViT-B-32", "laion2b_s34b_b79k")
REAL_BACKBONE = "resnet18"
HUB_HOST = ("huggingface.co", 443)
# AEVLP's COCO row (ALGORITHMS.md 7e) for the DAMP rule: the rule's own defaults (one home)
DAMP = DampParams().to_dict()


@dataclass
class DemoModels:
    real: bool
    why: str
    clip_overrides: List[str]
    backbone_overrides: List[str]


def _hub_file_cached(repo_id: str, filenames: Tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def choose_models(offline: bool) -> DemoModels:
    tiny = DemoModels(False, "", ["teacher.name=vlpl-tiny", "teacher.pretrained=null"],
                      ["student.kind=timm", "student.name=test_resnet", "student.pretrained=false", "student.image_size=64"])
    if offline:
        tiny.why = "--offline was given"
        return tiny
    import open_clip
    import timm

    clip_cfg = open_clip.get_pretrained_cfg(*REAL_CLIP)
    clip_repo = (clip_cfg.get("hf_hub") or "").rstrip("/")
    timm_repo = timm.models.get_pretrained_cfg(REAL_BACKBONE).hf_hub_id or ""
    cached = bool(clip_repo) and _hub_file_cached(clip_repo, ("open_clip_model.safetensors",
                                                              "open_clip_pytorch_model.bin")) \
        and bool(timm_repo) and _hub_file_cached(timm_repo, ("model.safetensors", "pytorch_model.bin"))
    if not cached and not _hub_reachable():
        tiny.why = (f"the pretrained weights ({REAL_CLIP[0]}/{REAL_CLIP[1]}, timm {REAL_BACKBONE}) are not cached "
                    f"and {HUB_HOST[0]} cannot be reached")
        return tiny
    return DemoModels(True, "cached" if cached else "downloaded",
                      [f"teacher.name={REAL_CLIP[0]}", f"teacher.pretrained={REAL_CLIP[1]}",
                       "teacher.templates=a photo of a {}."],
                      ["student.kind=timm", f"student.name={REAL_BACKBONE}", "student.pretrained=true",
                       "student.image_size=224"])


def run_demo(out: Optional[str] = None, offline: bool = False, epochs: int = 6) -> Path:
    from vlpl.config import EvaluateConfig, PseudolabelConfig, load_config
    from vlpl.demo_data import materialize_demo_dataset
    from vlpl.eval.stage import run_evaluate
    from vlpl.pseudolabel.stage import run_pseudolabel
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    root = Path(out or "runs/demo")
    models = choose_models(offline)
    if models.real:
        print(f"vlpl demo: teacher open_clip {REAL_CLIP[0]} ({REAL_CLIP[1]}), student timm {REAL_BACKBONE} "
              f"with ImageNet weights ({models.why})")
    else:
        print("vlpl demo: NOTE: using a tiny RANDOM-initialised CLIP and classifier because "
              f"{models.why}. Every step runs for real, but the scores and mAPs below mean nothing.")
    tag = "real" if models.real else "tiny"
    data = materialize_demo_dataset(root / "data")

    store = root / f"store-{tag}"
    pl_cfg = load_config(PseudolabelConfig, [], [
        f"data.root={data}", "data.name=skimage-demo", f"out={store}", *models.clip_overrides,
        "views.grid=2", "shard_size=64", "batch_size=16", "num_workers=0"])
    try:
        run_pseudolabel(pl_cfg)
    except Exception as e:
        if not models.real:
            raise
        log.warning("pretrained models failed (%s: %s); falling back to the tiny random models", type(e).__name__, e)
        return run_demo(out, offline=True, epochs=epochs)

    run = root / f"run-{tag}"
    shutil.rmtree(run, ignore_errors=True)  # the demo's own output: start afresh each time
    lr = ["optim.lr=1e-4", "optim.head_lr=1e-3"] if models.real else ["optim.lr=1e-3", "optim.head_lr=1e-2"]
    tr_cfg = load_train_config([], [
        "method=aevlp", "dataset=coco2014", f"store={store}", f"out={run}", *models.backbone_overrides, *lr,
        f"epochs={epochs}", "batch_size=8", "num_workers=0", "early_stop_patience=null", "early_stop_drop=null",
        "log_every=5"])
    run_train(tr_cfg)

    report_dir = root / f"report-{tag}"
    ev_cfg = EvaluateConfig(run=str(run), store=str(store), split="test", out=str(report_dir),
                            rules={"damp": dict(DAMP), "vlpl": {}})
    run_evaluate(ev_cfg)
    print(_pseudo_label_table(store))
    print(_headline(report_dir, run))
    return report_dir


def _pseudo_label_table(store_root: Path, max_rows: int = 40) -> str:
    """DAMP's pseudo-labels on the demo's training images, one line each, marked right or wrong."""
    from vlpl.pseudolabel.rules import apply_rule
    from vlpl.store.store import ScoreStore

    train = ScoreStore(store_root).split("train")  # status-ok rows only
    cls = train.store.classes
    n = min(len(train), max_rows)
    pos = np.arange(n)
    scores = torch.from_numpy(train.scores(pos))  # (n, n_variants, n_views, C)
    observed = train.observed[:n]
    pseudo = apply_rule("damp", scores, torch.from_numpy(observed), dynamic=False, **DAMP).numpy()
    known = np.nonzero(train.labels_known[:n])[0]
    truth = {int(i): set(cls[c] for c in np.nonzero(row == 1)[0]) for i, row in zip(known, train.labels_at(known))}
    lines = ["", "DAMP pseudo-labels on the training images (observed = the one given label; "
             "pseudo = what DAMP adds; + correct, - wrong):",
             f"  {'image':28s} {'observed':10s} {'pseudo-positives':34s} true labels"]
    for i in range(n):
        o = [cls[c] for c in np.nonzero(observed[i] == 1)[0]]
        true = truth.get(i)
        p = [cls[c] for c in np.nonzero((pseudo[i] == 1) & (observed[i] == 0))[0]]
        ps = " ".join(f"{c}{'?' if true is None else '+' if c in true else '-'}" for c in p) or "-"
        lines.append(f"  {Path(train.images[i]).name:28s} {','.join(o) or '-':10s} {ps:34s} "
                     f"{'|'.join(sorted(true)) if true is not None else 'unknown'}")
    return "\n".join(lines)


def _headline(report_dir: Path, run: Path) -> str:
    """The trained classifier's best epoch and the evaluate summary (percent; the random-model notice
    first when the teacher had random weights), with where the report is."""
    from vlpl.eval.report import load_report, summary_text

    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    lines = ["", f"Trained classifier: best epoch {summary['best_epoch']} of {summary['epochs_run']}, "
                 f"val mAP {_pct(summary.get('best_val_map'))} %, test mAP {_pct(summary.get('test_map_at_best'))} %",
             ""]
    return "\n".join(lines) + summary_text(load_report(report_dir / "report.json"), report_dir)


def _pct(v: Optional[float]) -> str:
    """A value already in percent (mAP), two decimals."""
    return "n/a" if v is None else f"{v:.2f}"
