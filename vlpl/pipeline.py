"""``vlpl run PIPELINE.yaml``: several stages in one recipe.

A pipeline file::

    vars: {work: runs/coco256}                      # ${work} is substituted in every string below
    stages:
      - pseudolabel: {config: [datasets/coco256.yaml, models/tiny.yaml], set: {out: "${work}/store"}}
      - train: {config: [models/tiny_classifier.yaml], set: {method: aevlp, store: "${work}/store", out: "${work}/run"}}
      - evaluate: {set: {run: "${work}/run", store: "${work}/store"}}

A ``sweep`` stage holds a sweep document (:mod:`vlpl.sweep`: ``store``, ``base``, ``variants``, ``evaluate``,
``out``): several training variants, each evaluated, then one comparison table::

      - sweep: {store: "${work}/store", base: {config: [models/tiny_classifier.yaml]}, out: "${work}/sweep",
                variants: [{name: an, set: {method: an}}, {name: aevlp, set: {method: aevlp}}]}

A ``calibrate`` stage writes a per-class thresholds file (:mod:`vlpl.pseudolabel.calibrate`) for rule
``calibrated``; it is skipped when the file exists and was fitted on the same store content::

      - calibrate: {store: "${work}/store", out: "${work}/thresholds-global.json", aggregate: global}

An ``export`` stage holds a ``vlpl export`` config (:class:`vlpl.config.ExportConfig` keys: ``store``, ``out``,
``rule``, ``save_to_disk``, ``push_to_hub``, ...); an empty ``push_to_hub`` (a var left unset) means no push. A
``predict`` stage tags images with a run's model (:func:`vlpl.predict.predict_images`: ``run``, ``images`` (a list),
``out``, ``thresholds`` / ``threshold`` / ``topk``, ``batch_size``, ``device``, ``num_workers``); an
``export_model`` stage writes a run's model folder (:func:`vlpl.export.model.export_model`: ``run``, ``out``,
``push_to_hub``, ``private``, ``revision``). On a re-run, ``export`` keeps an export made from the same store content
with the same rule, parameters and options (a run trained from it then resumes; a ``push_to_hub`` pushes the kept
files); ``predict`` and ``export_model`` rewrite their outputs whole::

      - export: {store: "${work}/store", out: "${work}/dataset", save_to_disk: "${work}/dataset-disk",
                 push_to_hub: "${hub_repo}"}
      - export_model: {run: "${work}/run", out: "${work}/model", push_to_hub: "${hub_model_repo}"}
      - predict: {run: "${work}/run", images: ["${root}/images"], out: "${work}/predictions.csv"}

``config`` lists config files (as ``-c``), ``set`` holds dotted overrides (as ``key=value``). Command-line
``KEY=VALUE`` arguments of ``vlpl run`` set ``vars``. Every stage is resumable, so re-running a pipeline
after an interruption continues it (training stages get ``resume=true``).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Sequence

import yaml

from vlpl.config import ConfigError, yaml_load

log = logging.getLogger(__name__)
STAGES = ("pseudolabel", "train", "evaluate", "sweep", "calibrate", "export", "predict", "export_model")
CALIBRATE_KEYS = ("store", "out", "aggregate", "split", "bins", "knn")
PREDICT_KEYS = ("run", "images", "out", "thresholds", "threshold", "topk", "batch_size", "device", "num_workers")
EXPORT_MODEL_KEYS = ("run", "out", "push_to_hub", "private", "revision")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _subst(value: Any, env: Dict[str, Any], where: str) -> Any:
    if isinstance(value, str):
        def rep(m: re.Match) -> str:
            if m.group(1) not in env:
                raise ConfigError(f"{where}: unknown variable ${{{m.group(1)}}}; defined: {', '.join(env) or 'none'}")
            return str(env[m.group(1)])
        return _VAR.sub(rep, value)
    if isinstance(value, list):
        return [_subst(v, env, where) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, env, f"{where}.{k}") for k, v in value.items()}
    return value


def _flatten(d: Dict[str, Any], prefix: str = "") -> List[str]:
    out: List[str] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in ("loss.params", "pseudo.params", "rules"):
            out += _flatten(v, f"{key}.")
        else:
            out.append(f"{key}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                       if not isinstance(v, str) else f"{key}={v}")
    return out


def load_pipeline(path: str, variables: Sequence[str] = ()) -> List[Dict[str, Any]]:
    p = Path(path)
    try:
        doc = yaml_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read pipeline {p}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list):
        raise ConfigError(f"{p}: expected a mapping with a 'stages' list")
    env = {str(k): v for k, v in (doc.get("vars") or {}).items()}
    for v in variables:
        if "=" not in v:
            raise ConfigError(f"vlpl run: expected NAME=VALUE, got {v!r}")
        k, val = v.split("=", 1)
        env[k] = val
    stages = []
    for i, st in enumerate(doc["stages"]):
        where = f"{p} stages[{i}]"
        if not isinstance(st, dict) or len(st) != 1 or next(iter(st)) not in STAGES:
            raise ConfigError(f"{where}: expected one of {', '.join(STAGES)} as the only key, got {st!r}")
        name, body = next(iter(st.items()))
        body = _subst(body or {}, env, where)
        if name == "sweep":  # a whole sweep document (vlpl.sweep), its strings already substituted
            stages.append({"stage": "sweep", "doc": body, "where": where, "config": [], "overrides": []})
            continue
        if name == "calibrate":
            unknown = set(body) - set(CALIBRATE_KEYS)
            if unknown or not body.get("store"):
                raise ConfigError(f"{where}: calibrate takes {', '.join(CALIBRATE_KEYS)} (store required); "
                                  f"got {sorted(body)}")
            stages.append({"stage": "calibrate", "doc": body, "where": where, "config": [], "overrides": []})
            continue
        if name in ("export", "predict", "export_model"):
            stages.append({"stage": name, "doc": _check_doc(name, body, where), "where": where, "config": [],
                           "overrides": []})
            continue
        unknown = set(body) - {"config", "set"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; expected config, set")
        stages.append({"stage": name, "config": list(body.get("config") or []),
                       "overrides": _flatten(body.get("set") or {})})
    return stages


def _check_doc(name: str, body: Any, where: str) -> Dict[str, Any]:
    """An ``export`` / ``predict`` / ``export_model`` stage's mapping, its keys checked (torch-free): export's by
    :class:`vlpl.config.ExportConfig` (and :func:`vlpl.export.stage.check_export_config`, a thresholds file
    written by an earlier stage aside), the others against their key lists. ``push_to_hub: ""`` becomes null."""
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: {name} takes a mapping, got {body!r}")
    body = {k: (None if k == "push_to_hub" and v in ("", None) else v) for k, v in body.items()}
    if name == "export":
        import dataclasses

        from vlpl.config import ExportConfig, load_config
        from vlpl.export.stage import check_export_config

        try:
            cfg = load_config(ExportConfig, base=body, base_source=where)
            check_export_config(dataclasses.replace(cfg, thresholds=None) if cfg.thresholds else cfg)
        except ConfigError as e:
            raise ConfigError(f"{where}: export: {e}") from None
        return body
    keys = PREDICT_KEYS if name == "predict" else EXPORT_MODEL_KEYS
    unknown = sorted(set(body) - set(keys))
    if unknown or not body.get("run") or (name == "predict" and not body.get("images")) \
            or (name == "export_model" and not body.get("out")):
        need = "run and images" if name == "predict" else "run and out"
        raise ConfigError(f"{where}: {name} takes {', '.join(keys)} ({need} required); got {sorted(body)}")
    if name == "predict" and not (isinstance(body["images"], list) and all(isinstance(x, str) for x in body["images"])):
        raise ConfigError(f"{where}: predict: images must be a list of paths, got {body['images']!r}")
    return body


def _current_export(cfg: Any) -> Any:
    """The config folder of an ``hf`` export in ``cfg.out`` made from the same store content with the same rule,
    parameters and options (and its ``save_to_disk`` copy, when asked), else None: a re-run pipeline keeps it, so
    a run trained from it (``store=`` the export) resumes (re-exporting writes new Parquet bytes)."""
    import json

    from vlpl.export.rows import resolve_rule
    from vlpl.store.store import ScoreStore

    if cfg.format != "hf" or not isinstance(cfg.store, str) or not Path(cfg.out).is_dir():
        return None
    try:
        manifest = ScoreStore.open(cfg.store).manifest
    except Exception:  # noqa: BLE001 - not a plain finished store (an ensemble, a missing store): export again
        return None
    rule, params = resolve_rule(cfg.rule, cfg.rule_params, cfg.thresholds)
    want = {"manifest_sha256": manifest.get("manifest_sha256"), "rule": rule, "params": params,
            "options": {"with_images": cfg.with_images, "all_views": cfg.all_views, "embeddings": cfg.embeddings,
                        "sparse_topk": cfg.sparse_topk or None}, "license": cfg.license}
    if want["manifest_sha256"] is None:
        return None
    for meta_path in sorted(Path(cfg.out).glob("*/vlpl_export.json")):
        try:
            m = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        got = {"manifest_sha256": (m.get("store") or {}).get("manifest_sha256"), "rule": (m.get("rule") or {}).get("name"),
               "params": (m.get("rule") or {}).get("params"), "options": m.get("options"), "license": m.get("license")}
        if got != json.loads(json.dumps(want)) or (cfg.config_name and m.get("config_name") != cfg.config_name) \
                or (cfg.splits and sorted(m.get("splits") or {}) != sorted(cfg.splits)):
            continue
        if cfg.save_to_disk and not (Path(cfg.save_to_disk) / "dataset_dict.json").is_file():
            return None
        return meta_path.parent
    return None


def _run_doc_stage(name: str, doc: Dict[str, Any]) -> None:
    """Run an ``export`` / ``predict`` / ``export_model`` stage (see the module docstring)."""
    if name == "export":
        from vlpl.config import ExportConfig, load_config
        from vlpl.export.stage import run_export

        cfg = load_config(ExportConfig, base=doc, base_source="pipeline export stage")
        current = _current_export(cfg)
        if current is None:
            res = run_export(cfg)
            log.info("export: %s", getattr(res, "out", res))
            return
        log.info("export: %s is current for %s, kept", current, cfg.store)
        if cfg.push_to_hub:  # push the kept export (the Parquet files as they are)
            import datasets

            from vlpl.export.hf import parquet_files
            from vlpl.export.hub import push_export

            files = {s: [str(current / f) for f in fs] for s, fs in parquet_files(current).items()}
            dd = datasets.load_dataset("parquet", data_files=files)
            push_export(dd, Path(cfg.out), current.name, cfg.push_to_hub, private=cfg.private,
                        revision=cfg.revision, max_shard_size=cfg.max_shard_size)
    elif name == "predict":
        from vlpl.predict import predict_images

        args = {k: doc[k] for k in PREDICT_KEYS if k in doc and k not in ("run", "images", "out")}
        res = predict_images(doc["run"], doc["images"], doc.get("out"), **args)
        log.info("predict: %d images (%d unreadable) -> %s", res.images, res.failed, res.out)
    else:
        from vlpl.export.model import export_model

        export_model(doc["run"], doc["out"], push_to_hub=doc.get("push_to_hub"), private=bool(doc.get("private")),
                     revision=doc.get("revision"))


def _run_calibrate(doc: Dict[str, Any]) -> None:
    """A ``calibrate`` stage: write the thresholds file unless it exists for the same store content."""
    import json

    from vlpl.pseudolabel.calibrate import calibrate_store, write_thresholds
    from vlpl.store.store import MANIFEST_CHECKSUM_KEY, ScoreStore

    aggregate = str(doc.get("aggregate", "global"))
    store = ScoreStore(Path(str(doc["store"])))
    out = Path(str(doc.get("out") or Path(str(doc["store"])) / f"thresholds-{aggregate}.json"))
    knn = doc.get("knn")
    if out.is_file():
        try:
            old = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        same_knn = (old.get("knn") is None) == (knn is None) and all(
            (old.get("knn") or {}).get(k) == v for k, v in (knn or {}).items())
        if old.get("store_manifest_sha256") == store.manifest.get(MANIFEST_CHECKSUM_KEY) \
                and old.get("aggregate") == aggregate and same_knn:
            log.info("calibrate: %s is current for %s, skipped", out, store.root)
            return
    write_thresholds(out, calibrate_store(store, aggregate=aggregate, split=str(doc.get("split", "train")),
                                          bins=int(doc.get("bins", 2048)), knn=knn))
    log.info("calibrate: %s", out)


def run_pipeline(path: str, variables: Sequence[str] = ()) -> None:
    from vlpl.config import EvaluateConfig, PseudolabelConfig, load_config
    from vlpl.train.recipes import load_train_config

    stages = load_pipeline(path, variables)
    # every stage's config (keys, types, rule / loss parameters) is checked before the first stage runs,
    # and before torch is imported: a typo in the last stage must not cost the first stage's hours
    from vlpl.sweep import sweep_from_doc

    configs = [load_config(PseudolabelConfig, st["config"], st["overrides"]) if st["stage"] == "pseudolabel"
               else load_train_config(st["config"], ["resume=true", *st["overrides"]]) if st["stage"] == "train"
               else sweep_from_doc(st["doc"], st["where"]) if st["stage"] == "sweep"
               else st["doc"] if st["stage"] in ("calibrate", "export", "predict", "export_model")
               else load_config(EvaluateConfig, st["config"], st["overrides"]) for st in stages]
    from vlpl.eval.stage import run_evaluate
    from vlpl.pseudolabel.stage import run_pseudolabel
    from vlpl.train.loop import run_train

    for i, (st, cfg) in enumerate(zip(stages, configs)):
        log.info("pipeline stage %d/%d: %s %s", i + 1, len(stages), st["stage"], " ".join(st["overrides"]))
        if st["stage"] == "pseudolabel":
            run_pseudolabel(cfg)
        elif st["stage"] == "train":
            run_train(cfg)
        elif st["stage"] == "sweep":
            from vlpl.sweep import run_sweep

            run_sweep(cfg)
        elif st["stage"] == "calibrate":
            _run_calibrate(cfg)
        elif st["stage"] in ("export", "predict", "export_model"):
            _run_doc_stage(st["stage"], cfg)
        else:
            run_evaluate(cfg)
