"""What can be trained: methods (recipes), pseudo-label rules, losses and heads with their parameters.

``vlpl train --list`` prints :func:`format_catalog`; ``vlpl train --list --markdown`` prints the same as
Markdown, which is ``docs/METHODS.md`` (a test checks the file is current, so it never drifts). Everything
comes from the recipe files and the parameter schemas; the text listing imports no torch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from vlpl.config import CONFIG_DIRS, yaml_load
from vlpl.registry import HEADS, LOSSES, RULES, Registry

log = logging.getLogger(__name__)

__all__ = ["MethodInfo", "list_method_infos", "format_catalog", "METHODS_DOC", "REGENERATE"]

#: the generated document, relative to the repository root
METHODS_DOC = "docs/METHODS.md"
REGENERATE = "vlpl train --list --markdown > docs/METHODS.md"


@dataclass
class MethodInfo:
    """One recipe, ``configs/methods/<name>.yaml``."""

    name: str
    description: str
    source: str
    loss: Optional[str]
    rule: Optional[str]
    datasets: List[str]
    rows: Dict[str, Dict[str, Any]]  # dataset -> its row's settings (plain data)


def list_method_infos() -> List[MethodInfo]:
    """Every recipe in ``configs/methods`` (first config folder wins for a name), sorted by name."""
    seen = {}
    for d in CONFIG_DIRS:
        for path in sorted((d / "methods").glob("*.yaml")):
            if path.stem in seen:
                continue
            doc = yaml_load(path.read_text(encoding="utf-8")) or {}
            defaults = doc.get("defaults") or {}
            seen[path.stem] = MethodInfo(
                name=path.stem,
                description=str(doc.get("description", "")),
                source=str(doc.get("source", "")),
                loss=(defaults.get("loss") or {}).get("name"),
                rule=(defaults.get("pseudo") or {}).get("rule", "damp"),
                datasets=sorted(doc.get("datasets") or {}),
                rows={k: dict(v or {}) for k, v in sorted((doc.get("datasets") or {}).items())},
            )
    return [seen[k] for k in sorted(seen)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _flatten(d: Dict[str, Any], prefix: str = "") -> List[Any]:
    out: List[Any] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _entries(registry: Registry[Any], load: bool) -> List[str]:
    return registry.names() + [n for n in registry.schema_names() if n not in registry.names()] if load \
        else registry.schema_names()


def _text(load_heads: bool) -> str:
    out: List[str] = []
    out.append("Methods (method=NAME dataset=ROW: a paper's recipe, configs/methods/NAME.yaml):")
    for m in list_method_infos():
        out.append(f"  {m.name:10s} {m.description}")
        out.append(f"  {'':10s} loss {m.loss}, {f'rule {m.rule}' if m.rule else 'no pseudo-labels'}; "
                   f"dataset rows: {', '.join(m.datasets) or 'none'}")
    for title, registry, keys in (("Pseudo-label rules", RULES, "pseudo.rule=NAME pseudo.params.KEY=VALUE"),
                                  ("Losses", LOSSES, "loss.name=NAME loss.params.KEY=VALUE; any loss: "
                                   "loss.reconstruction=W adds the reconstruction term, ours, off by default")):
        out.append("")
        out.append(f"{title} ({keys}):")
        for name in registry.schema_names():
            schema = registry.schema(name)
            see = f"  [{schema.see}]" if getattr(schema, "see", "") else ""
            see += "  Needs pseudo.rule." if getattr(schema, "requires_pseudo", False) else ""
            out.append(f"  {name:10s} {schema.one_line()}{see}")
            for p in schema.describe():
                cons = f" ({p.constraint})" if p.constraint else ""
                out.append(f"      {p.name:18s} {_fmt(p.default):16s} {p.help}{cons}")
    out.append("")
    heads = _entries(HEADS, load_heads)
    out.append("Heads (student.head.name=NAME student.head.params.KEY=VALUE)"
               + ("" if load_heads else "; the built-in ones are in docs/METHODS.md") + (":" if heads else ""))
    for name in heads:
        schema = HEADS.schema(name)
        out.append(f"  {name:10s} {schema.one_line()}")
        for p in schema.describe():
            cons = f" ({p.constraint})" if p.constraint else ""
            out.append(f"      {p.name:18s} {_fmt(p.default):16s} {p.help}{cons}")
    out.append("")
    out.append("Docs: docs/METHODS.md (this list, with every parameter), README.md (Methods, Configuration); "
               "per-dataset values: configs/methods/*.yaml. Plugins add entries: --plugin MODULE (see vlpl/plugins.py).")
    return "\n".join(out) + "\n"


def _md_table(schema: Any) -> List[str]:
    rows = schema.describe()
    if not rows:
        return ["No parameters.", ""]
    out = ["| parameter | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for p in rows:
        out.append(f"| `{p.name}` | {p.type} | `{_fmt(p.default)}` | {p.constraint} | {p.help} |")
    return out + [""]


def _markdown() -> str:
    out = [
        "# Methods, pseudo-label rules, losses and heads",
        "",
        f"<!-- generated by `{REGENERATE}`; tests/test_cli.py checks that it is current. Do not edit by hand. -->",
        "",
        "Everything `vlpl train` can combine, with every parameter's default, allowed values and meaning. The",
        "parameters live in one place each: `vlpl/pseudolabel/params.py` (rules), `vlpl/train/loss_params.py`",
        "(losses); a bad key or value is reported before any model is loaded. `vlpl train --list` prints the same.",
        "Formulas: the docstrings of `vlpl/pseudolabel/rules.py` and `vlpl/train/losses/` (one module per family).",
        "",
        "## Methods",
        "",
        "`method=NAME dataset=ROW` selects a paper's recipe (`configs/methods/NAME.yaml`) and its per-dataset row;",
        "your config files and `key=value` overrides still win over it.",
        "",
        "| method | loss | pseudo-label rule | dataset rows | description |",
        "|---|---|---|---|---|",
    ]
    for m in list_method_infos():
        out.append(f"| `{m.name}` | `{m.loss}` | {f'`{m.rule}`' if m.rule else 'none'} | {', '.join(m.datasets)} | {m.description} |")
    out.append("")
    out += ["Per-dataset rows (what `dataset=ROW` sets on top of the method's defaults):", ""]
    for m in list_method_infos():
        rows = {k: v for k, v in m.rows.items() if v}
        if not rows:
            continue
        out += [f"- `{m.name}`:"]
        for ds, row in rows.items():
            out.append(f"  - `{ds}`: " + ", ".join(f"`{k}={_fmt(v)}`" for k, v in _flatten(row)))
    out.append("")
    for title, registry, keys in (
            ("Pseudo-label rules", RULES, "`pseudo.rule=NAME`, `pseudo.params.KEY=VALUE`; `vlpl evaluate` takes "
                                          "`rules={NAME: {KEY: VALUE}}`"),
            ("Losses", LOSSES, "`loss.name=NAME`, `loss.params.KEY=VALUE`. Any loss takes `loss.reconstruction=W` "
                               "(default 0: off), the reconstruction term of Decision 5 (ours, not in a paper): "
                               "`W mean(1 - cos(P f, e))` between the head's reconstruction feature `f` (the `sigrl` "
                               "head's pooled SVFR output; for a head without one, the backbone's pooled feature) "
                               "and the teacher's cached image embedding "
                               "`e`, `P` a learned projection where the widths differ "
                               "(`vlpl/train/losses/reconstruction.py`)"),
            ("Heads", HEADS, "`student.head.name=NAME` (or `student.head=NAME`), `student.head.params.KEY=VALUE`")):
        out += [f"## {title}", "", f"Set with {keys}.", ""]
        for name in _entries(registry, load=True):
            schema = registry.schema(name)
            out += [f"### `{name}`", "", schema.one_line() + (f" Source: {schema.see}." if schema.see else ""), ""]
            if getattr(schema, "requires_pseudo", False):
                out += ["Needs pseudo-labels (`pseudo.rule`).", ""]
            out += _md_table(schema)
    out += ["## Plugins", "",
            "A module that registers a loss, rule or head (with its parameter schema) is loaded with",
            "`vlpl COMMAND --plugin my_pkg.module` (repeatable) or an installed entry point in the `vlpl.plugins`",
            "group; never from a config file or a checkpoint. See the docstring of `vlpl/plugins.py`.", ""]
    return "\n".join(out)


def format_catalog(markdown: bool = False) -> str:
    """The listing of ``vlpl train --list`` (torch-free), or with ``markdown`` the text of docs/METHODS.md
    (built-in heads included, which imports them)."""
    return _markdown() if markdown else _text(load_heads=False)
