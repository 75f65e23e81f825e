"""Method recipes: ``configs/methods/<method>.yaml`` x a dataset row = a paper's configuration.

A recipe file has ``defaults`` (TrainConfig keys) and ``datasets`` (per-dataset overrides, keyed by
voc2012 / coco2014 / nuswide / cub). ``method=aevlp dataset=coco2014`` (in a config file or as
overrides) selects them; the user's files and overrides still win over the recipe.

A recipe may also say which **teacher** the paper used (``teacher:`` in ``defaults`` and in a dataset row):
``config`` (a model config under ``configs/``: the store to build with ``vlpl pseudolabel -c``), and what
that config does not say or a dataset changes (``templates``, ``grid``). It is not a training key: the
recipe keeps it apart (:func:`recipe_teacher`), and :func:`load_train_config` warns when the training store
was scored by another teacher, with other prompts or another view grid (:func:`teacher_mismatches`), naming
both values.
"""
from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)

TEACHER_KEYS = ("config", "templates", "grid")


def list_methods() -> List[str]:
    return sorted(p.stem for d in CONFIG_DIRS for p in (d / "methods").glob("*.yaml"))


def _recipe_doc(method: str, dataset: Optional[str]) -> Tuple[Dict[str, Any], Path]:
    """The recipe's defaults merged with its ``dataset`` row (``teacher`` still in), and the file."""
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
    return base, path


def recipe(method: str, dataset: Optional[str]) -> Tuple[Dict[str, Any], Path]:
    """The training keys of ``method``'s recipe with its ``dataset`` row (None: the defaults alone), and the file."""
    base, path = _recipe_doc(method, dataset)
    base.pop("teacher", None)
    base["method"], base["dataset"] = method, dataset
    return base, path


def recipe_teacher(method: str, dataset: Optional[str]) -> Optional[Dict[str, Any]]:
    """The teacher ``method``'s paper used on ``dataset``, or None when the recipe names none (no pseudo-labels).

    Returns ``{"config", "backend", "name", "pretrained", "templates" (a list), "grid", "precision"}``: the model
    config file's ``teacher`` (and ``views.grid``) with the recipe's ``templates`` / ``grid`` for the dataset on
    top. Torch-free.
    """
    doc, path = _recipe_doc(method, dataset)
    spec = doc.get("teacher")
    if spec is None:
        return None
    if not isinstance(spec, dict) or "config" not in spec or set(spec) - set(TEACHER_KEYS):
        raise ConfigError(f"{path}: 'teacher' must be a mapping with 'config' (a model config file) and optionally "
                          f"{', '.join(TEACHER_KEYS[1:])}; got {spec!r}")
    cfg_path = _resolve_config_path(str(spec["config"]), path.parent)
    model, _ = load_yaml_file(cfg_path)
    teacher = dict(model.get("teacher") or {})
    templates = spec.get("templates", teacher.get("templates", "a photo of a {}."))
    return {
        "config": str(spec["config"]),
        "backend": teacher.get("backend", "open_clip"),
        "name": teacher.get("name"),
        "pretrained": teacher.get("pretrained"),
        "templates": [templates] if isinstance(templates, str) else list(templates),
        "grid": int(spec.get("grid", (model.get("views") or {}).get("grid", 4))),
        "precision": teacher.get("precision", "auto"),
    }


def teacher_mismatches(spec: Dict[str, Any], manifest: Dict[str, Any]) -> List[str]:
    """How a store (its manifest) differs from the recipe's teacher (:func:`recipe_teacher`): one sentence per
    difference (model, pretrained weights, prompt templates, view grid), naming both values; [] when none."""
    model = manifest.get("model") or {}
    out = []
    if model.get("name") != spec["name"] or (model.get("pretrained") or None) != (spec["pretrained"] or None):
        out.append(f"teacher: the store's is {model.get('name')!r} (pretrained {model.get('pretrained')!r}), the "
                   f"paper's {spec['name']!r} (pretrained {spec['pretrained']!r})")
    have = list(manifest.get("templates") or [])
    if have != spec["templates"]:
        show = lambda t: repr(t[0]) if len(t) == 1 else f"{len(t)} templates ({t[0]!r}, ...)"  # noqa: E731
        out.append(f"prompt templates: the store's are {show(have) if have else 'unrecorded'}, the paper's "
                   f"{show(spec['templates'])}")
    grid = (manifest.get("views") or {}).get("grid")
    if grid != spec["grid"]:
        out.append(f"view grid: the store's is {grid!r}, the paper's {spec['grid']}")
    return out


def warn_teacher_mismatch(cfg: TrainConfig) -> List[str]:
    """Log (and return) how ``cfg.store`` differs from the teacher of ``cfg.method``'s paper; nothing when the
    recipe names no teacher, or the store is not there yet (the training stage reports that)."""
    if not cfg.method or not isinstance(cfg.store, str):
        return []
    from vlpl.store.fs import store_path

    spec = recipe_teacher(cfg.method, cfg.dataset)
    manifest_path = store_path(cfg.store) / "manifest.json"  # a store on an fsspec URL too
    if spec is None or not manifest_path.exists():
        return []
    from vlpl.store.store import StoreError, read_manifest

    try:
        manifest = read_manifest(manifest_path)
    except StoreError:
        return []
    diffs = teacher_mismatches(spec, manifest)
    for d in diffs:
        log.warning("method=%s%s: the store %s differs from the paper's teacher: %s. Its pseudo-labels are not the "
                    "paper's; build the store with: vlpl pseudolabel -c %s%s", cfg.method,
                    f" dataset={cfg.dataset}" if cfg.dataset else "", cfg.store, d, spec["config"],
                    "" if len(spec["templates"]) > 1 else f" 'teacher.templates={spec['templates'][0]}'"
                    f" views.grid={spec['grid']}")
    return diffs


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
    warn_teacher_mismatch(cfg)
    return cfg


def dry_run_text(cfg: TrainConfig) -> str:
    """What ``vlpl train --dry-run`` prints: the resolved training config as YAML (recipe, then the files, then
    the overrides: exactly what ``config.yaml`` of the run would hold before training) and, as YAML comments, the
    student weights it would ask for and the recipe's teacher (the store the paper's numbers were made with).
    Torch-free: nothing is built, loaded or trained."""
    import yaml

    from vlpl.config import to_dict

    s = cfg.student
    if s.kind == "timm":
        want = s.pretrained if isinstance(s.pretrained, str) else (s.name if s.pretrained else None)
        weights = f"timm {want}" if want else f"none: {s.name} starts from random weights (pretrained: false)"
    else:
        weights = f"{s.kind} {s.name} {s.open_clip_pretrained or s.pretrained}"
    lines = [f"# student weights asked for: {weights} (the run records what it loaded as student.pretrained_tag)"]
    teacher = recipe_teacher(cfg.method, cfg.dataset) if cfg.method else None
    if teacher:
        lines.append(f"# recipe teacher (build the store with it): configs/{teacher['config']}: {teacher['backend']} "
                     f"{teacher['name']} pretrained={teacher['pretrained']}, templates {teacher['templates']}, "
                     f"grid {teacher['grid']}, precision {teacher['precision']}")
    elif cfg.method:
        lines.append(f"# recipe teacher: none (method {cfg.method} names no teacher)")
    return "\n".join(lines) + "\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)
