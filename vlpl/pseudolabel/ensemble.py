"""``vlpl pseudolabel`` with several teachers: one ordinary score store per teacher, then the ensemble manifest.

``teachers: [configs/models/clip_vit_b16.yaml, {name: ViT-L-14, pretrained: openai, id: l14}]`` with
``ensemble_weights: [0.4, 0.6]`` writes::

    OUT/teachers/<id>/       an ordinary score store per teacher (run_pseudolabel: resumable, same contract)
    OUT/ensemble.json        members, weights, how they are combined (vlpl.store.ensemble.write_ensemble)
    OUT/config.yaml          the resolved config of the ensemble run

Each entry is a teacher config file (its ``teacher:`` section, as ``configs/models/*.yaml`` hold it) or a
mapping of teacher keys; either is merged over the run's ``teacher`` section (so ``teacher.device`` or
``teacher.precision`` is set once for all). ``id`` names the sub-store (default: the model name and pretrained
tag, made unique). Every other setting (data, views, score form, shards) is the run's own, so the members hold
the same rows in the same order: :meth:`vlpl.store.store.ScoreStore.open` reads OUT as one store whose scores
are the weighted combination.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from vlpl.config import (
    ConfigError,
    PseudolabelConfig,
    TeacherConfig,
    _resolve_config_path,
    deep_merge,
    load_config,
    load_yaml_file,
    save_resolved,
    to_dict,
)
from vlpl.store.ensemble import TEACHERS_DIR, normalise_weights, write_ensemble
from vlpl.store.store import StoreError

log = logging.getLogger(__name__)

__all__ = ["resolve_teachers", "run_ensemble_pseudolabel"]

_ID = re.compile(r"[^A-Za-z0-9._-]+")


def _entry_mapping(entry: Any, i: int) -> Tuple[Dict[str, Any], str]:
    """(teacher keys, where they came from) of ``teachers[i]``."""
    where = f"teachers[{i}]"
    if isinstance(entry, str):
        path = _resolve_config_path(entry, None)
        data, _ = load_yaml_file(path)
        section = data.get("teacher", data.get("model"))
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: {path} has no `teacher:` mapping (expected a teacher config such as "
                              f"configs/models/clip_vit_b16.yaml)")
        return dict(section), f"{path} ({where})"
    if isinstance(entry, dict):
        return dict(entry), where
    raise ConfigError(f"{where}: expected a teacher config file or a mapping of teacher keys, got {entry!r}")


def resolve_teachers(cfg: PseudolabelConfig) -> List[Tuple[str, TeacherConfig]]:
    """``(id, TeacherConfig)`` per entry of ``cfg.teachers``, each merged over ``cfg.teacher`` and validated (an
    unknown key or a bad value is a :class:`ConfigError` naming ``teachers[i]``); ids are unique."""
    out: List[Tuple[str, TeacherConfig]] = []
    for i, entry in enumerate(cfg.teachers):
        keys, source = _entry_mapping(entry, i)
        given_id = keys.pop("id", None)
        merged = deep_merge(to_dict(cfg.teacher), keys)
        try:
            tcfg = load_config(TeacherConfig, base=merged, base_source=source)
        except ConfigError as e:
            raise ConfigError(f"teachers[{i}] ({source}): {e}") from None
        name = str(given_id) if given_id is not None else _ID.sub("_", f"{tcfg.name}-{tcfg.pretrained or 'random'}")
        if not name or name in (".", "..") or _ID.search(name):
            raise ConfigError(f"teachers[{i}].id: {name!r} is not a usable directory name (letters, digits, . _ -)")
        if any(name == n for n, _ in out):
            if given_id is not None:
                raise ConfigError(f"teachers[{i}].id: {name!r} is used twice; each teacher needs its own id")
            k = 2
            while any(f"{name}_{k}" == n for n, _ in out):
                k += 1
            name = f"{name}_{k}"
        out.append((name, tcfg))
    return out


def run_ensemble_pseudolabel(cfg: PseudolabelConfig, stats: Optional[Dict[str, Any]] = None) -> Path:
    """Score the dataset with every teacher of ``cfg.teachers`` into ``OUT/teachers/<id>/`` (each an ordinary,
    resumable :func:`vlpl.pseudolabel.stage.run_pseudolabel` run), then write ``OUT/ensemble.json`` (after
    checking that the members agree) and ``OUT/config.yaml``. Returns OUT."""
    from accelerate import PartialState

    from vlpl.pseudolabel.stage import run_pseudolabel
    from vlpl.vlm.backend import resolve_device

    out = Path(cfg.out)
    if (out / "manifest.json").is_file():
        raise ConfigError(f"out: {out} holds a single-teacher score store; a teacher ensemble needs its own "
                          f"directory (its members go to {out / TEACHERS_DIR}/<id>/)")
    members = resolve_teachers(cfg)
    try:
        weights = normalise_weights(cfg.ensemble_weights, len(members))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    paths: Dict[str, Path] = {}
    for k, (name, tcfg) in enumerate(members):
        sub = dataclasses.replace(cfg, teacher=tcfg, teachers=[], ensemble_weights=None,
                                  out=str(out / TEACHERS_DIR / name))
        log.info("teacher %d of %d: %s (%s, pretrained %s), weight %.3g -> %s", k + 1, len(members), name,
                 tcfg.name, tcfg.pretrained, weights[k], sub.out)
        member_stats: Optional[Dict[str, Any]] = {} if stats is not None else None
        run_pseudolabel(sub, stats=member_stats)
        if stats is not None:
            stats.setdefault("teachers", {})[name] = member_stats
        paths[name] = out / TEACHERS_DIR / name
    state = PartialState(cpu=resolve_device(cfg.teacher.device).type == "cpu")
    if state.is_main_process:
        try:
            write_ensemble(out, paths, cfg.ensemble_weights)
        except StoreError as e:
            raise StoreError(f"{out}: the teachers' stores cannot form an ensemble: {e}") from None
        save_resolved(cfg, out / "config.yaml")
    state.wait_for_everyone()
    return out
