"""``vlpl sweep SWEEP.yaml``: train and evaluate a list of variants, then one comparison table.

A sweep file (YAML)::

    vars: {work: runs/sweep}                 # ${work} is substituted in every string (vlpl sweep ... work=DIR)
    store: "${work}/store"                   # the score store every variant trains on (a variant may set its own)
    base:                                    # shared by every variant, as a pipeline's train stage
      config: [models/tiny_classifier.yaml]  # config files (as -c), earlier first
      set: {epochs: 2, dataset: coco2014}    # dotted overrides (nested mappings are flattened)
    variants:                                # each a normal `vlpl train` run in OUT/<name>
      - {name: an, set: {method: an}}
      - {name: aevlp, set: {method: aevlp}}
      - {name: aevlp_knn, set: {method: aevlp, pseudo: {rule: knn, params: {base: damp, k: 10, alpha: 0.5}}}}
      - {name: an_p0.3, set: {method: an, store: "${work}/store_p0.3"}}   # another store (another p)
    evaluate: {set: {split: test}}           # optional: overrides of every variant's `vlpl evaluate`
    out: "${work}"                           # OUT: variant runs in OUT/<name>, the table in OUT/compare/

For every variant, in order:

1. **train**: ``load_train_config(base.config + variant.config, [store, out=OUT/<name>, resume=true,
   *base.set, *variant.set])`` then ``run_train``. A variant whose run has finished (``summary.json``) is
   **skipped**; an interrupted one (a run directory without ``summary.json``) is **resumed** (the trainer's own
   resume: the run's config must be the same). A finished run whose recorded variant spec
   (``OUT/<name>/sweep_variant.json``: config files and overrides) differs from the file's is refused, naming
   the variant: delete its directory (or rename the variant) to train it again.
2. **evaluate**: ``vlpl evaluate run=OUT/<name>`` (plus ``evaluate.set``) into ``OUT/<name>/eval``, skipped when
   that report is newer than the run's ``summary.json``.

Then ``vlpl evaluate --compare OUT/<name> ... --out OUT/compare`` (:func:`vlpl.eval.compare.write_comparison`):
``compare.md``, ``compare.json``, ``compare.png``, with the teacher's zero-shot baseline row per store.

Under ``accelerate launch -m vlpl sweep FILE`` every process runs each variant's training (a normal multi-process
run) and process 0 alone evaluates and writes the table (not yet tried on several GPUs).

Every variant's configuration is loaded and checked (keys, types, rule and loss parameters) before the first
variant trains, so a typo in the last variant does not cost the first ones' hours. The same document is a
pipeline stage: ``- sweep: {store: ..., base: ..., variants: [...], out: ...}`` in ``vlpl run PIPELINE.yaml``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from vlpl.config import ConfigError, yaml_load

log = logging.getLogger(__name__)

__all__ = ["Variant", "Sweep", "load_sweep", "sweep_from_doc", "run_sweep", "SWEEP_KEYS", "VARIANT_FILE"]

SWEEP_KEYS = ("vars", "store", "base", "variants", "evaluate", "out")
VARIANT_FILE = "sweep_variant.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class Variant:
    """One variant: its name, config files and overrides (dotted ``key=value``), and where it runs."""

    name: str
    config: List[str]
    overrides: List[str]
    out: Path

    def spec(self) -> Dict[str, Any]:
        """What identifies the variant's run (recorded in ``OUT/<name>/sweep_variant.json``)."""
        return {"name": self.name, "config": list(self.config), "overrides": list(self.overrides)}


@dataclass
class Sweep:
    """A loaded sweep: its variants, the evaluate overrides, and the output folder."""

    source: str
    out: Path
    variants: List[Variant]
    evaluate: List[str] = field(default_factory=list)


def _mapping(value: Any, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _files(value: Any, where: str) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of config files")
    return list(value)


def _only(body: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected {', '.join(allowed)}")


def sweep_from_doc(doc: Any, source: str = "the sweep", variables: Sequence[str] = (), check: bool = True) -> Sweep:
    """A :class:`Sweep` from a parsed sweep document (``vars`` substituted; ``variables``: ``NAME=VALUE``
    overriding them). With ``check`` every variant's train config is loaded and validated."""
    from vlpl.pipeline import _flatten, _subst

    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    _only(doc, SWEEP_KEYS, source)
    env = {str(k): v for k, v in _mapping(doc.get("vars"), f"{source}: vars").items()}
    for v in variables:
        if "=" not in v:
            raise ConfigError(f"vlpl sweep: expected NAME=VALUE, got {v!r}")
        k, val = v.split("=", 1)
        env[k] = val
    body = _subst({k: v for k, v in doc.items() if k != "vars"}, env, source)
    if not body.get("out"):
        raise ConfigError(f"{source}: 'out' (the folder of the variants' runs and the table) is required")
    out = Path(str(body["out"]))
    base = _mapping(body.get("base"), f"{source}: base")
    _only(base, ("config", "set"), f"{source}: base")
    ev = _mapping(body.get("evaluate"), f"{source}: evaluate")
    _only(ev, ("set",), f"{source}: evaluate")
    items = body.get("variants")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{source}: 'variants' must be a non-empty list of {{name: ..., set: {{...}}}}")
    variants: List[Variant] = []
    seen = set()
    for i, item in enumerate(items):
        where = f"{source}: variants[{i}]"
        item = _mapping(item, where)
        _only(item, ("name", "config", "set"), where)
        name = str(item.get("name") or "")
        if not _NAME.match(name):
            raise ConfigError(f"{where}: name {name!r} must be a folder name (letters, digits, . _ + -)")
        if name in seen:
            raise ConfigError(f"{where}: duplicate variant name {name!r}")
        if name == "compare":
            raise ConfigError(f"{where}: the name 'compare' is taken by the comparison folder")
        seen.add(name)
        overrides = []
        if body.get("store") is not None:
            overrides.append(f"store={body['store']}" if isinstance(body["store"], str) else
                             _flatten({"store": body["store"]})[0])
        overrides += _flatten(_mapping(base.get("set"), f"{source}: base.set"))
        overrides += _flatten(_mapping(item.get("set"), f"{where}.set"))
        variants.append(Variant(name=name, config=_files(base.get("config"), f"{source}: base.config")
                                + _files(item.get("config"), f"{where}.config"),
                                overrides=[o for o in overrides if not o.startswith(("out=", "resume="))],
                                out=out / name))
    sweep = Sweep(source=source, out=out, variants=variants,
                  evaluate=_flatten(_mapping(ev.get("set"), f"{source}: evaluate.set")))
    if check:
        for v in variants:
            _train_config(v)
            _evaluate_config(sweep, v)
    return sweep


def load_sweep(path: Any, variables: Sequence[str] = (), check: bool = True) -> Sweep:
    """Read a sweep file (see the module docstring); errors name the file and the key."""
    p = Path(path)
    try:
        doc = yaml_load(p.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"cannot read sweep file {p}: {e}") from None
    return sweep_from_doc(doc, str(p), variables, check)


def _train_config(v: Variant) -> Any:
    from vlpl.train.recipes import load_train_config

    try:
        return load_train_config(v.config, [*v.overrides, f"out={v.out}", "resume=true"])
    except ConfigError as e:
        raise ConfigError(f"sweep variant {v.name!r}: {e}") from None


def _evaluate_config(sweep: Sweep, v: Variant) -> Any:
    from vlpl.config import EvaluateConfig, load_config

    try:
        return load_config(EvaluateConfig, [], [f"run={v.out}", *sweep.evaluate])
    except ConfigError as e:
        raise ConfigError(f"sweep variant {v.name!r} (evaluate.set): {e}") from None


def _finished(v: Variant) -> bool:
    if not (v.out / "summary.json").is_file():
        return False
    rec = v.out / VARIANT_FILE
    if rec.is_file():
        recorded = json.loads(rec.read_text(encoding="utf-8"))
        if recorded != v.spec():
            raise ConfigError(f"sweep variant {v.name!r}: {v.out} holds a finished run of another spec "
                              f"({rec}: {recorded}); delete {v.out} or rename the variant to train it again")
    return True


def _report_current(v: Variant, out: Path) -> bool:
    rep = out / "report.json"
    return rep.is_file() and rep.stat().st_mtime_ns >= (v.out / "summary.json").stat().st_mtime_ns


def run_sweep(sweep: Any, variables: Sequence[str] = ()) -> Path:
    """Train, evaluate and compare every variant of ``sweep`` (a file path or a :class:`Sweep`); returns the
    comparison folder ``OUT/compare``."""
    from vlpl.store.atomic import atomic_write_json

    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep, variables)
    from vlpl.eval.compare import write_comparison
    from vlpl.eval.stage import run_evaluate
    from vlpl.train.loop import run_train

    main = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch: every process trains, rank 0 writes
    trained, skipped = [], []
    for i, v in enumerate(sweep.variants):
        if _finished(v):
            log.info("sweep %d/%d %s: finished run in %s, skipped", i + 1, len(sweep.variants), v.name, v.out)
            skipped.append(v.name)
        else:
            state = "resumed" if v.out.exists() else "started"
            log.info("sweep %d/%d %s: training %s (%s)", i + 1, len(sweep.variants), v.name, state,
                     " ".join(v.overrides))
            if main:
                v.out.mkdir(parents=True, exist_ok=True)
                atomic_write_json(v.out / VARIANT_FILE, v.spec())
            run_train(_train_config(v))
            trained.append(v.name)
        ecfg = _evaluate_config(sweep, v)
        eval_out = Path(ecfg.out) if ecfg.out else v.out / "eval"
        if not main:
            continue
        if _report_current(v, eval_out):
            log.info("sweep %s: evaluation %s is current, skipped", v.name, eval_out)
        else:
            run_evaluate(ecfg)
    out = sweep.out / "compare"
    if not main:
        return out
    write_comparison([_eval_dir(sweep, v) for v in sweep.variants], out)
    log.info("sweep %s: %d trained, %d skipped (finished) -> %s", sweep.source, len(trained), len(skipped), out)
    return out


def _eval_dir(sweep: Sweep, v: Variant) -> Path:
    ecfg = _evaluate_config(sweep, v)
    return Path(ecfg.out) if ecfg.out else v.out / "eval"

