"""Method recipes: ``configs/methods/<method>.yaml`` x a dataset row = a paper's configuration.

A recipe file has ``defaults`` (TrainConfig keys) and ``datasets`` (per-dataset overrides, keyed by
voc2012 / coco2014 / nuswide / cub). ``method=aevlp dataset=coco2014`` (in a config file or as
overrides) selects them; the user's files and overrides still win over the recipe.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from vlpl.config import (
    CONFIG_DIRS,
    ConfigError,
    TrainConfig,
    _resolve_config_path,
    deep_merge,
    load_config,
    load_yaml_file,
    parse_override,
    yaml_load,
)
from vlpl.pseudolabel.params import flip_variant


def list_methods() -> List[str]:
    return sorted(p.stem for d in CONFIG_DIRS for p in (d / "methods").glob("*.yaml"))


def recipe(method: str, dataset: Optional[str]) -> Tuple[Dict[str, Any], Path]:
    path = next((d / "methods" / f"{method}.yaml" for d in CONFIG_DIRS if (d / "methods" / f"{method}.yaml").is_file()),
                None)
    if path is None:
        raise ConfigError(f"method: unknown method {method!r}; expected one of: {', '.join(list_methods())}")
    with open(path, encoding="utf-8") as f:
        doc = yaml_load(f) or {}
    unknown = set(doc) - {"defaults", "datasets", "description", "source"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected defaults, datasets")
    base = dict(doc.get("defaults") or {})
    tables = doc.get("datasets") or {}
    if dataset is not None:
        if dataset not in tables:
            raise ConfigError(f"dataset: the {method} recipe ({path}) has no row for {dataset!r}; "
                              f"it has: {', '.join(sorted(tables)) or 'none'}")
        base = deep_merge(base, tables[dataset] or {})
    base["method"], base["dataset"] = method, dataset
    return base, path


def load_train_config(files: Sequence[str] = (), overrides: Sequence[str] = ()) -> TrainConfig:
    raw: Dict[str, Any] = {}
    for f in files:
        raw = deep_merge(raw, load_yaml_file(_resolve_config_path(str(f), None))[0])
    for o in overrides:
        k, v = parse_override(o)
        if k in ("method", "dataset"):
            raw[k] = v
    base: Dict[str, Any] = {}
    source = "the built-in defaults"
    if raw.get("method"):
        base, path = recipe(str(raw["method"]), raw.get("dataset"))
        source = f"the recipe {path}"
    cfg = load_config(TrainConfig, files, overrides, base=base, base_source=source)
    flip_variant(cfg.pseudo.variant, cfg.pseudo.dynamic)  # pseudo.variant: a clear error before torch is imported
    return cfg
