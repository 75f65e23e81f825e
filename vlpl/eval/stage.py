"""``vlpl evaluate``: metrics of a training run and/or of a score store's zero-shot scores and pseudo-labels.

* **Run mode** (``cfg.run``): reads the run's ``predictions/<split>.npz`` (``probs``, ``labels``,
  ``sample_ids`` at the best epoch), ``classes.txt``, ``summary.json`` and the epoch records of
  ``metrics.jsonl``; computes Cole's mAP (and over classes with positives), per-class AP, CF1/OF1 at
  ``cfg.f1_threshold`` and at top-``cfg.top_k``.
* **Store mode** (``cfg.store``): on ``cfg.split`` rows with known labels and status ok, zero-shot
  metrics of three score views (``global``: the unflipped global view; ``mean``: every cached view;
  ``damp``: DAMP's phi). Then every rule of ``cfg.rules`` (unflipped views, deterministic) labels the
  ``cfg.pseudo_split`` rows, whose quality is measured against the full labels, and DAMP's phi (and
  the global softmax) are swept over ``cfg.thresholds``. Scores are read batch by batch through the
  store's split readers (:meth:`vlpl.store.store.ScoreStore.split`) and only ``(N, C)`` aggregates are
  kept, so memory does not grow with the number of views. With no ``cfg.rules``, a run's own rule and
  parameters (its ``config.yaml``) are measured.
* Both: one report.
* **Partial evaluation labels** (a store with ``labels_kind: partial``, real partial annotations in {-1, 0, 1};
  a run trained on one saves them with ``labels_kind`` in its predictions): beside Cole's mAP, which then counts
  the unknown entries as negatives, the report gives the **masked mAP** (CSL's ``mAP_partial``,
  :func:`vlpl.eval.metrics.masked_average_precision`: annotated entries only, classes lacking an annotated
  positive or negative skipped) and says which is which and how many classes were skipped. Pseudo-label
  quality needs full labels and is skipped for such a store.

Outputs in ``cfg.out`` (default ``<run>/eval``, else ``<store>/eval``): ``report.json``, ``report.md``,
``config.yaml`` and ``plots/*.png``; each written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from vlpl.config import ConfigError, EvaluateConfig, save_resolved, to_dict, yaml_load
from vlpl.eval.metrics import f1_metrics, f1_metrics_topk, masked_average_precision, mean_average_precision
from vlpl.eval.quality import pseudo_label_quality, threshold_sweep
from vlpl.eval.report import (
    REPORT_SCHEMA,
    finalize_report,
    jsonable,
    metric_row,
    package_versions,
    render_markdown,
    teacher_baseline,
    utc_now,
)
from vlpl.progress import progress
from vlpl.provenance import provenance
from vlpl.pseudolabel.params import TEMP, rule_params
from vlpl.pseudolabel.rules import RuleRows, aggregate_scores, apply_rule, damp_scores
from vlpl.store.atomic import atomic_write_json, atomic_write_text
from vlpl.store.fs import is_url, store_path
from vlpl.store.store import ScoreStore, StoreError

log = logging.getLogger(__name__)

__all__ = ["run_evaluate", "compare_runs", "evaluate_predictions", "load_predictions"]

_ZS_TEMP = TEMP  # the rules' softmax temperature (vlpl.pseudolabel.params)


# --------------------------------------------------------------------------------------------------
# shared
# --------------------------------------------------------------------------------------------------


def evaluate_predictions(labels: np.ndarray, ap_scores: np.ndarray, prob_scores: Optional[np.ndarray] = None,
                         threshold: float = 0.5, k: int = 3, labels_kind: str = "full") -> Dict[str, Any]:
    """mAP (Cole), mAP over classes with positives, per-class AP, and CF1/OF1 at a threshold and at top-k.

    ``ap_scores`` rank the images per class (AP); ``prob_scores`` (default: ``ap_scores``) are the
    probability-like scores that are thresholded for F1 and ranked per image for top-k.

    ``labels_kind="partial"``: ``labels`` are partial annotations in {-1, 0, 1}; the metrics above are then
    computed with the annotated positives as positives and **every other entry, unknown ones included, as a
    negative** (what Cole's mAP does with such labels), and ``masked`` adds the masked mAP
    (:func:`~vlpl.eval.metrics.masked_average_precision`, annotated entries only), ``labels_kind`` says which.
    """
    probs = ap_scores if prob_scores is None else prob_scores
    if labels_kind == "partial":
        masked = masked_average_precision(labels, ap_scores)
        pos = np.asarray(labels) == 1
        return {**mean_average_precision(pos, ap_scores), "f1": f1_metrics(pos, probs, threshold),
                "f1_topk": f1_metrics_topk(pos, probs, k), "labels_kind": "partial", "masked": masked}
    if labels_kind != "full":
        raise ValueError(f"labels_kind: expected 'full' or 'partial', got {labels_kind!r}")
    m = mean_average_precision(labels, ap_scores)
    return {**m, "f1": f1_metrics(labels, probs, threshold), "f1_topk": f1_metrics_topk(labels, probs, k)}


def _classes_file(path: Path) -> Optional[List[str]]:
    if not path.is_file():
        return None
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


# --------------------------------------------------------------------------------------------------
# run mode
# --------------------------------------------------------------------------------------------------


def load_predictions(run: Path, split: str) -> Dict[str, Any]:
    """``RUN/predictions/<split>.npz`` checked against the contract: ``probs`` (N, C) float in [0, 1],
    ``labels`` (N, C) in {0, 1}, ``sample_ids`` (N,) str (optional), and ``classes.txt`` with C names.
    ``labels_kind`` (optional, a 0-d string: ``full`` or ``partial``) marks partial annotations, whose
    ``labels`` are in {-1, 0, 1}."""
    path = run / "predictions" / f"{split}.npz"
    if not path.is_file():
        have = sorted(p.name for p in (run / "predictions").glob("*.npz")) if (run / "predictions").is_dir() else []
        raise FileNotFoundError(
            f"{path} not found: expected the run's predictions for split {split!r} (an .npz with probs (N, C), "
            f"labels (N, C), sample_ids (N,), written by `vlpl train` at the best epoch); "
            f"predictions present: {', '.join(have) or 'none'}"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - a corrupt file is a clear error, whatever numpy raised
        raise ValueError(f"{path}: unreadable predictions file ({type(e).__name__}: {e})") from None
    missing = [k for k in ("probs", "labels") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing array(s) {', '.join(missing)}; expected probs (N, C), labels (N, C), "
                         f"sample_ids (N,) (found: {', '.join(sorted(data)) or 'none'})")
    probs = np.asarray(data["probs"])
    labels = np.asarray(data["labels"])
    if probs.ndim != 2 or labels.shape != probs.shape:
        raise ValueError(f"{path}: probs and labels must both be (N, C) of one shape; got probs {probs.shape}, "
                         f"labels {labels.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"{path}: probs must be floating point (sigmoid outputs); got {probs.dtype}")
    if not np.isfinite(probs).all():
        raise ValueError(f"{path}: probs contain NaN or infinite values")
    kind = str(data["labels_kind"]) if "labels_kind" in data else "full"
    if kind not in ("full", "partial"):
        raise ValueError(f"{path}: labels_kind {kind!r}; expected 'full' or 'partial'")
    allowed = {0, 1} if kind == "full" else {-1, 0, 1}
    if not np.isin(labels, list(allowed)).all():
        raise ValueError(f"{path}: labels ({kind}) must be in {{{', '.join(map(str, sorted(allowed)))}}}; found "
                         f"values {sorted(set(np.unique(labels).tolist()) - allowed)[:5]}")
    ids = data.get("sample_ids")
    if ids is not None and (ids.ndim != 1 or len(ids) != len(probs)):
        raise ValueError(f"{path}: sample_ids must be (N,) with N = {len(probs)} rows of probs; got {ids.shape}")
    n, c = probs.shape
    classes = _classes_file(run / "classes.txt")
    if classes is None:
        log.warning("%s not found: classes are named by index", run / "classes.txt")
        classes = [f"class_{i}" for i in range(c)]
    elif len(classes) != c:
        raise ValueError(f"{run / 'classes.txt'} lists {len(classes)} classes but {path} has C = {c} columns")
    return {"path": path, "probs": probs.astype(np.float64), "labels": labels.astype(np.int8),
            "sample_ids": None if ids is None else ids.astype(str), "classes": classes, "labels_kind": kind}


def _read_epochs(path: Path) -> List[Dict[str, Any]]:
    """The ``"kind": "epoch"`` records of ``metrics.jsonl`` (a torn last line is skipped with a warning)."""
    if not path.is_file():
        return []
    out = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s, line %d: not valid JSON, skipped", path, no)
            continue
        if isinstance(rec, dict) and rec.get("kind") == "epoch" and "epoch" in rec:
            out.append(rec)
    return out


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _evaluate_run(run: Path, cfg: EvaluateConfig) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(report section, arrays for plots)."""
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} not found (expected a `vlpl train` output directory)")
    pred = load_predictions(run, cfg.split)
    labels, probs = pred["labels"], pred["probs"]
    log.info("run %s: %d images x %d classes from %s", run, *probs.shape, pred["path"])
    summary = _read_json(run / "summary.json")
    if summary is None:
        log.warning("%s not found (an unfinished run?)", run / "summary.json")
    train_config = None
    if (run / "config.yaml").is_file():
        try:
            train_config = yaml_load((run / "config.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            log.warning("%s: not valid YAML (%s)", run / "config.yaml", e)
    epochs = _read_epochs(run / "metrics.jsonl")
    kind = pred["labels_kind"]
    metrics = evaluate_predictions(labels, probs, threshold=cfg.f1_threshold, k=cfg.top_k, labels_kind=kind)
    section = {
        "path": str(run.resolve()),
        "predictions_file": str(pred["path"].relative_to(run)),
        "num_images": int(probs.shape[0]),
        "classes": list(pred["classes"]),
        "num_pos_per_class": (labels == 1).sum(axis=0).astype(int).tolist(),
        "labels_kind": kind,
        "selected_by": (summary or {}).get("select"),
        "summary": summary,
        "train_config": train_config,
        "best_epoch": (summary or {}).get("best_epoch"),
        "epochs": epochs,
        "metrics": metrics,
    }
    log.info("run %s: mAP %.2f %% (classes with positives %.2f %%), CF1 %.2f %%, OF1 %.2f %%", run.name,
             metrics["map"], metrics["map_pos"], 100 * metrics["f1"]["CF1"], 100 * metrics["f1"]["OF1"])
    if kind == "partial":
        mk = metrics["masked"]
        log.info("run %s: masked mAP %.2f %% over %d classes (%d skipped: no annotated positive or negative); "
                 "Cole's mAP with unknowns as negatives %.2f %%", run.name, mk["map"], mk["num_classes_used"],
                 mk["num_classes_skipped"], metrics["map"])
    # plots rank against the annotated positives (partial labels: unknown entries drawn as negatives)
    return section, {"labels": (labels == 1).astype(np.int8), "probs": probs, "classes": pred["classes"]}


# --------------------------------------------------------------------------------------------------
# store mode
# --------------------------------------------------------------------------------------------------


def _check_rules(rules: Dict[str, Dict[str, Any]]) -> None:
    for name, kwargs in rules.items():
        rule_params(name, kwargs or {}, where=f"rules.{name}")  # names the key, the option and the value


def _damp_params(cfg: EvaluateConfig) -> Dict[str, float]:
    """DAMP's temp / eta: the defaults, or those given to the ``damp`` rule in ``cfg.rules``."""
    p = rule_params("damp", (cfg.rules or {}).get("damp") or {}, where="rules.damp")
    return {"temp": p.temp, "eta": p.eta}


class _Collector:
    """Concatenates per-shard arrays by key."""

    def __init__(self) -> None:
        self.parts: Dict[str, List[np.ndarray]] = {}

    def add(self, key: str, value: Any) -> None:
        arr = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        self.parts.setdefault(key, []).append(arr)

    def get(self, key: str, shape_tail: Tuple[int, ...], dtype: Any) -> np.ndarray:
        parts = self.parts.get(key)
        return np.concatenate(parts) if parts else np.zeros((0, *shape_tail), dtype=dtype)


def _scan_store(store: ScoreStore, cfg: EvaluateConfig, dparams: Dict[str, float], batch_size: int = 256
                ) -> Tuple[Dict[str, Dict[str, int]], _Collector, _Collector]:
    """Per-split row counts and the (N, C) aggregates of the eval and the pseudo-label rows, reading the
    scores batch by batch through the store's split readers (rules are row-wise, so batches are exact);
    memory holds one batch of views plus the (N, C) aggregates. Every score form (dense, per-view embeddings,
    top-k) reads as the same dense batches."""
    readers = {s: store.split(s, include_failed=True, sidecars=False)  # one streamed pass, nothing written
               for s in dict.fromkeys([cfg.split, cfg.pseudo_split])}
    rows = {s: {"total": len(sp), "failed": int((~sp.ok).sum()),
                "labels_unknown": int((sp.ok & ~sp.labels_known).sum()),
                "used": int((sp.ok & sp.labels_known).sum())} for s, sp in readers.items()}
    ev, ps = _Collector(), _Collector()
    jobs = ((ev, cfg.split, False), (ps, cfg.pseudo_split, True))
    with progress(total=sum(rows[s]["used"] for _, s, _ in jobs), desc="evaluate: store scores", unit="img") as bar:
        for coll, s, with_rules in jobs:
            sp = readers[s]
            use = np.nonzero(sp.ok & sp.labels_known)[0]
            for pos, scores in sp.iter_scores(batch_size, use):
                full = torch.from_numpy(scores)  # (B, n_variants, n_views, C)
                obs = torch.from_numpy(sp.observed_at(pos))
                unflipped = full[:, 0]
                coll.add("labels", sp.labels_at(pos))
                coll.add("observed", obs)
                coll.add("global_cos", unflipped[:, 0])
                coll.add("global_soft", aggregate_scores(unflipped, score="softmax", temp=_ZS_TEMP, view="global"))
                with store.score_kind.scope():  # DAMP's per-view probabilities are the teacher's own kind
                    phi, _ = damp_scores(unflipped, obs, **dparams)
                coll.add("phi", phi)
                if not with_rules:
                    every = torch.from_numpy(store.view_spec.flatten(scores))  # (B, V, C), flips included
                    coll.add("mean_cos", aggregate_scores(every, score="cosine", view="mean"))
                    coll.add("mean_soft", aggregate_scores(every, score="softmax", temp=_ZS_TEMP, view="mean"))
                else:
                    for name, kwargs in cfg.rules.items():
                        coll.add(f"rule:{name}", apply_rule(name, full, obs, dynamic=False, rows=RuleRows(sp, pos),
                                                            **(kwargs or {})))
                bar.update(len(pos))
    return rows, ev, ps


def _evaluate_store(root: Path, cfg: EvaluateConfig) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    _check_rules(cfg.rules)
    store = ScoreStore.open(root)  # a store, or a teacher ensemble (vlpl.store.ensemble)
    C = store.num_classes
    dparams = _damp_params(cfg)
    log.info("store %s: %d rows, %d views x %d classes; evaluating split %r, pseudo-labels on %r",
             root, store.num_rows, store.view_spec.num_views, C, cfg.split, cfg.pseudo_split)
    rows, ev, ps = _scan_store(store, cfg, dparams)
    if rows[cfg.split]["used"] == 0:
        have = store.split_counts()
        raise ValueError(
            f"{root}: no row of split {cfg.split!r} has known labels and status ok "
            f"({rows[cfg.split]}); the store's splits: {have}"
        )
    labels = ev.get("labels", (C,), np.int8)
    kind = store.labels_kind
    zs_scores: Dict[str, Any] = {
        "global": evaluate_predictions(labels, ev.get("global_cos", (C,), np.float32),
                                       ev.get("global_soft", (C,), np.float32), cfg.f1_threshold, cfg.top_k, kind),
        "mean": evaluate_predictions(labels, ev.get("mean_cos", (C,), np.float32),
                                     ev.get("mean_soft", (C,), np.float32), cfg.f1_threshold, cfg.top_k, kind),
        "damp": evaluate_predictions(labels, ev.get("phi", (C,), np.float32), None, cfg.f1_threshold, cfg.top_k,
                                     kind),
    }
    for name, met in zs_scores.items():
        log.info("zero-shot %s: mAP %.2f %%, CF1 %.2f %%, OF1 %.2f %%", name, met["map"], 100 * met["f1"]["CF1"],
                 100 * met["f1"]["OF1"])
    section: Dict[str, Any] = {
        "path": str(root.resolve()),
        "model": store.manifest.get("model"),
        "templates": store.manifest.get("templates"),
        "templates_sha256": store.manifest.get("templates_sha256"),
        "views": store.manifest.get("views"),
        "dataset": store.manifest.get("dataset"),
        "score_kind": store.manifest.get("score_kind"),
        "logit_scale": store.manifest.get("logit_scale"),
        "num_rows": store.num_rows,
        "classes": list(store.classes),
        "rows": rows,
        "labels_kind": kind,
        "observed_protocol": store.manifest.get("observed"),
        "zero_shot": {
            "split": cfg.split,
            "num_images": int(labels.shape[0]),
            "num_pos_per_class": (labels == 1).sum(axis=0).astype(int).tolist(),
            "temp": _ZS_TEMP,
            "damp_params": dparams,
            "score_definitions": {
                "global": "AP: raw cosine of the unflipped global view; F1: its softmax over classes (cos / temp)",
                "mean": "AP: mean raw cosine over all cached views (flips included); F1: mean per-view softmax",
                "damp": "DAMP positive score phi (unflipped views, gate on observed labels), for AP and F1",
            },
            "scores": zs_scores,
        },
        "pseudo_labels": None,
    }
    arrays: Dict[str, Any] = {"labels": (labels == 1).astype(np.int8), "phi": ev.get("phi", (C,), np.float32),
                              "classes": store.classes}

    n_ps = rows[cfg.pseudo_split]["used"]
    if kind == "partial":  # the truth of the unobserved entries is unknown: nothing to measure them against
        log.warning("store %s: its labels are partial annotations: pseudo-label quality (which needs full labels) "
                    "skipped", root)
        section["pseudo_labels_skipped"] = "the store's labels are partial annotations (labels_kind: partial)"
    elif n_ps == 0:
        log.warning("store %s: no row of split %r has known labels: pseudo-label quality skipped", root,
                    cfg.pseudo_split)
    else:
        pl_labels = ps.get("labels", (C,), np.int8)
        pl_obs = ps.get("observed", (C,), np.int8)
        rules_out = {}
        for name, kwargs in cfg.rules.items():
            pseudo = ps.get(f"rule:{name}", (C,), np.int8)
            q = pseudo_label_quality(pseudo, pl_labels, pl_obs)
            new_pos = (pseudo == 1) & (pl_obs == 0)
            rules_out[name] = {
                "options": dict(kwargs or {}),
                "quality": q,
                "images_without_pseudo_positive": float((~new_pos.any(axis=1)).mean()),
            }
            ex = q["excluding_observed"]
            log.info("rule %s on %s: pseudo-positives P %.2f %% R %.2f %% F1 %.2f %%, %.2f per image", name,
                     cfg.pseudo_split, 100 * ex["precision"], 100 * ex["recall"], 100 * ex["f1"], ex["per_image"])
        sweeps = {}
        if cfg.thresholds:
            sweeps = {
                "damp_phi": threshold_sweep(ps.get("phi", (C,), np.float32), pl_labels, pl_obs, cfg.thresholds),
                "global_softmax": threshold_sweep(ps.get("global_soft", (C,), np.float32), pl_labels, pl_obs,
                                                  cfg.thresholds),
            }
        section["pseudo_labels"] = {
            "split": cfg.pseudo_split,
            "num_images": int(pl_labels.shape[0]),
            "dynamic": False,
            "observed_per_image": float((pl_obs == 1).sum(axis=1).mean()),
            "rules": rules_out,
            "threshold_sweep": sweeps,
        }
    return section, arrays


# --------------------------------------------------------------------------------------------------
# plots and the stage function
# --------------------------------------------------------------------------------------------------


def _make_plots(out: Path, split: str, run_section: Optional[Dict[str, Any]], run_arr: Optional[Dict[str, Any]],
                store_section: Optional[Dict[str, Any]], store_arr: Optional[Dict[str, Any]]) -> Dict[str, str]:
    from vlpl.eval.plots import draw_report_plots  # matplotlib is only imported when plots are drawn

    return draw_report_plots(out, split, run_section, run_arr, store_section, store_arr)


def _model_identity(store_section: Optional[Dict[str, Any]], run_section: Optional[Dict[str, Any]]
                    ) -> Optional[Dict[str, Any]]:
    """The VLM identity of the store used (the store given, else the one the run was trained from)."""
    if store_section is not None:
        return store_section.get("model")
    store = ((run_section or {}).get("summary") or {}).get("store")
    if isinstance(store, list) or (store and ((store_path(store) / "manifest.json").exists()  # a URL too
                                              or (Path(store) / "ensemble.json").is_file())):
        try:  # a store, or a teacher ensemble (its model entry names every member)
            return ScoreStore.open(store, require_complete=False).manifest.get("model")
        except StoreError as e:
            log.warning("%s; model identity not recorded", e)
    return None


def _run_baseline(run_section: Dict[str, Any], split: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """The teacher's zero-shot mAP on ``split`` of the store the run trained on
    (:func:`vlpl.eval.report.teacher_baseline`, with the run's rule parameters and ensemble weights), or
    ``(None, why not)`` when that store cannot be read."""
    cfg = run_section.get("train_config") or {}
    store = (run_section.get("summary") or {}).get("store") or cfg.get("store")
    if not store:
        return None, "the run records no score store (no summary.json or config.yaml with `store`)"
    pseudo = cfg.get("pseudo") or {}
    try:
        base = teacher_baseline(store, split, pseudo.get("rule"), pseudo.get("params") or {},
                                weights=cfg.get("ensemble_weights"))
    except (StoreError, FileNotFoundError, ValueError) as e:
        log.warning("zero-label baseline not measured: %s", e)
        return None, f"the run's store {store} could not be scored on split {split!r} ({e})"
    for view, s in base["scores"].items():
        log.info("teacher zero-shot %s on %s: mAP %.2f %% (trained: %.2f %%)", view, split, s["map"],
                 run_section["metrics"]["map"])
    return base, None


def _default_rules(run: Optional[Path]) -> Dict[str, Dict[str, Any]]:
    """The rules to measure when the config names none: the run's own rule with the run's own parameters
    (so a VOC run's DAMP quality uses VOC's eta, not the defaults), else damp and vlpl with their defaults."""
    if run is not None and (run / "config.yaml").is_file():
        from vlpl.config import yaml_load

        pseudo = (yaml_load((run / "config.yaml").read_text()) or {}).get("pseudo") or {}
        if pseudo.get("rule"):
            return {str(pseudo["rule"]): dict(pseudo.get("params") or {})}
    return {"damp": {}, "vlpl": {}}


def run_evaluate(cfg: EvaluateConfig) -> Path:
    """Evaluate a training run and/or a score store; write the report; return the output directory."""
    if not cfg.run and not cfg.store:
        raise ConfigError("evaluate: nothing to evaluate; set run=RUN_DIR (a `vlpl train` output) and/or "
                          "store=STORE_DIR (a score store)")
    if cfg.top_k < 0:
        raise ConfigError(f"top_k: expected a non-negative integer, got {cfg.top_k}")
    run = Path(cfg.run) if cfg.run else None
    if cfg.store and is_url(str(cfg.store)) and not cfg.out and run is None:
        raise ConfigError(f"out: the store {cfg.store} is an fsspec URL and the report is written locally; set "
                          "out=DIR (a local directory) for the evaluation report")
    store = store_path(cfg.store) if cfg.store else None  # a URL stays a URL (Path() would collapse its //)
    out = Path(cfg.out) if cfg.out else (run if run is not None else store) / "eval"  # type: ignore[operator]

    for what, d in (("run", run), ("store", store)):
        if d is not None and d.resolve() == out.resolve():  # its config.yaml would be overwritten
            raise ConfigError(f"out: {out} is the {what} directory itself; choose another output directory")

    if cfg.rules is None:
        cfg = dataclasses.replace(cfg, rules=_default_rules(run))
    run_section = run_arr = store_section = store_arr = None
    if run is not None:
        run_section, run_arr = _evaluate_run(run, cfg)
    if store is not None:
        store_section, store_arr = _evaluate_store(store, cfg)

    classes = (run_arr or store_arr or {})["classes"]
    if run_arr is not None and store_arr is not None and list(run_arr["classes"]) != list(store_arr["classes"]):
        log.warning("the run's classes differ from the store's (%d vs %d): is this the store the run was trained "
                    "from? Each section of the report lists its own classes", len(run_arr["classes"]),
                    len(store_arr["classes"]))

    headline: List[Dict[str, Any]] = []
    baseline: Optional[Dict[str, Any]] = None
    baseline_reason: Optional[str] = None
    if run_section is not None:
        headline.append(metric_row(Path(run_section["path"]).name, "run", cfg.split, run_section["metrics"],
                                   run_section["num_images"]))
        baseline, baseline_reason = _run_baseline(run_section, cfg.split)  # the zero-label baseline (issue 14.13)
        if baseline is not None:
            headline[0].update({f"teacher_{view}_map": s["map"] for view, s in baseline["scores"].items()})
    if store_section is not None:
        zs = store_section["zero_shot"]
        for view, met in zs["scores"].items():
            headline.append(metric_row(Path(store_section["path"]).name, f"zero-shot:{view}", cfg.split, met,
                                       zs["num_images"]))
    # the row compare_runs shows: the trained model, else DAMP (the primary pseudo-label score)
    summary = headline[0] if run_section is not None else next(r for r in headline if r["kind"] == "zero-shot:damp")
    name = summary["name"]
    kind = "+".join(k for k, s in (("run", run_section), ("store", store_section)) if s is not None)

    resolved = dataclasses.replace(cfg, out=str(out))
    out.mkdir(parents=True, exist_ok=True)
    plots = _make_plots(out, cfg.split, run_section, run_arr, store_section, store_arr) if cfg.plots else {}
    report = finalize_report(jsonable({  # metrics in percent, with their units
        "schema": REPORT_SCHEMA,
        "created": utc_now(),
        "name": name,
        "kind": kind,
        "split": cfg.split,
        "summary": summary,
        "headline": headline,
        "classes": list(classes),
        "run": run_section,
        "store": store_section,
        "model": _model_identity(store_section, run_section),
        "plots": plots,
        **({"baseline": baseline, "baseline_reason": baseline_reason} if run_section is not None else {}),
        "config": to_dict(resolved),
        "versions": package_versions(),
        "provenance": provenance(),  # command, commit, device: what the results page requires (vlpl.results)
    }))
    save_resolved(resolved, out / "config.yaml")
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    log.info("evaluation report: %s (%s)", out / "report.md", ", ".join(
        f"{r['kind']} mAP {r['map']:.2f} %" for r in headline))
    return out


def compare_runs(paths: List[str]) -> str:
    """The comparison table (Markdown) across evaluations, one row each, with the teacher's zero-shot baseline:
    :func:`vlpl.eval.compare.comparison` rendered by :func:`vlpl.eval.compare.render_comparison` (what
    ``vlpl evaluate --compare`` prints). A path may be a report file, an eval directory, or a run / store directory
    that has ``eval/report.json``."""
    from vlpl.eval.compare import comparison, render_comparison

    return render_comparison(comparison(paths))
