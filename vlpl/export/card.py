"""The dataset card (``README.md``) of a ``vlpl export`` folder, rendered with ``huggingface_hub.DatasetCard``.

YAML front matter (:class:`huggingface_hub.DatasetCardData`): ``license``, ``task_categories:
[image-classification]``, ``task_ids: [multi-label-image-classification]``, ``annotations_creators:
[machine-generated]``, ``size_categories``, ``pretty_name``, ``tags`` and ``configs:`` (one entry per exported
config, i.e. per teacher and rule, with its ``data_files`` per split, the layout ``push_to_hub`` writes). The
body says, per config, how the pseudo-labels were made (teacher model and pretrained tag, prompt templates and
class descriptions, views, the rule and its parameters, observed labels, the command and the ``vlpl`` version),
what every column is, and, where full labels are known, their measured quality (precision / recall / F1 of the
pseudo-labels, the teacher's mAP). Everything comes from the configs' ``vlpl_export.json`` files, so the card is
regenerated whole after each export. Nothing secret goes in: the metadata holds no token (commands are redacted).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from vlpl.eval.report import markdown_table
from vlpl.export.schema import METADATA_FILE

log = logging.getLogger(__name__)

__all__ = ["TASK_CATEGORIES", "TASK_IDS", "ANNOTATIONS_CREATORS", "card_data", "render_card", "write_card",
           "read_configs", "validate_card", "front_matter"]

TASK_CATEGORIES = ["image-classification"]
TASK_IDS = ["multi-label-image-classification"]
ANNOTATIONS_CREATORS = ["machine-generated"]
_SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
          (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]


def read_configs(out: Path) -> Dict[str, Dict[str, Any]]:
    """config name -> its ``vlpl_export.json``, for every config folder of an export folder (sorted by name)."""
    found: Dict[str, Dict[str, Any]] = {}
    for path in sorted(Path(out).glob(f"*/{METADATA_FILE}")):
        if path.parent.name.startswith("."):
            continue
        try:
            found[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable export metadata ({e}); re-run `vlpl export` for that config "
                             f"or remove the folder") from None
    return found


def _size_category(n: int) -> str:
    for limit, name in _SIZES:
        if n < limit:
            return name
    return "n>1T"


def card_data(configs: Mapping[str, Mapping[str, Any]], license: Optional[str] = None) -> Any:
    """The card's :class:`huggingface_hub.DatasetCardData`: task fields, license, size, and one ``configs``
    entry per config (``data_files``: ``<config>/<split>-*``); the only config is the default."""
    from huggingface_hub import DatasetCardData

    if not configs:
        raise ValueError("no exported config to describe (no <config>/vlpl_export.json)")
    first = next(iter(configs.values()))
    lic = license or first.get("license") or "other"
    rows = max(sum(int(v) for v in (m.get("splits") or {}).values()) for m in configs.values())
    dataset = ((first.get("store") or {}).get("dataset") or {}).get("name") or "images"
    entries = []
    for name, meta in configs.items():
        entry: Dict[str, Any] = {"config_name": name,
                                 "data_files": [{"split": s, "path": f"{name}/{s}-*"} for s in meta.get("splits", {})]}
        if len(configs) == 1:
            entry["default"] = True
        entries.append(entry)
    teachers = sorted({str((m.get("teacher") or {}).get("column_prefix")) for m in configs.values()})
    return DatasetCardData(
        license=lic,
        task_categories=list(TASK_CATEGORIES),
        task_ids=list(TASK_IDS),
        annotations_creators=list(ANNOTATIONS_CREATORS),
        size_categories=[_size_category(rows)],
        pretty_name=f"{dataset} pseudo-labels (vlpl)",
        tags=["vlpl", "pseudo-labels", "multi-label", "single-positive-multi-label", *teachers],
        configs=entries,
    )


def _fmt(v: Any, digits: int = 2) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return "-" if v is None else str(v)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100.0 * float(v):.1f}"


def _teacher_lines(meta: Mapping[str, Any]) -> List[str]:
    t = meta.get("teacher") or {}
    model = t.get("model") or {}
    lines = []
    if t.get("members"):
        lines.append(f"- **Teacher**: an ensemble of {len(t['members'])} teachers: " + ", ".join(
            f"`{(m.get('model') or {}).get('name')}` (weight {m.get('weight')})" for m in t["members"]))
    else:
        tag = model.get("pretrained") or (f"checkpoint sha256 {model['checkpoint_sha256'][:16]}..."
                                          if model.get("checkpoint_sha256") else "none (random weights)")
        lines.append(f"- **Teacher**: `{model.get('name')}` ({model.get('backend', 'open_clip')}), pretrained "
                     f"`{tag}`" + (f", open_clip {model['open_clip_version']}" if model.get("open_clip_version")
                                   else ""))
    kind = meta.get("score_kind") or {}
    lines.append(f"- **Scores**: raw teacher scores of kind `{kind.get('score_kind', 'cosine')}`"
                 + (f" (logit scale {kind['logit_scale']})" if kind.get("logit_scale") else "")
                 + ", stored as float16")
    templates = t.get("templates") or []
    groups = templates if templates and all(isinstance(x, list) for x in templates) else [templates]  # ensemble
    for i, group in enumerate(groups):
        shown = ", ".join(f"`{x}`" for x in group[:8]) + (f" and {len(group) - 8} more" if len(group) > 8 else "")
        who = f" of member {i + 1}" if len(groups) > 1 else ""
        lines.append(f"- **Prompt templates{who}** ({len(group)}, sha256 `{t.get('templates_sha256')}`): {shown}")
    desc = t.get("descriptions")
    if desc:
        lines.append(f"- **Class descriptions**: {desc.get('num_descriptions')} descriptions from "
                     f"`{Path(str(desc.get('file'))).name}` (sha256 `{str(desc.get('sha256'))[:16]}...`), listed in "
                     f"`{desc.get('prompts_file', 'prompts.json')}` of the store")
    v = meta.get("views") or {}
    lines.append(f"- **Views**: global view + {v.get('grid')}x{v.get('grid')} grid"
                 + (", each also horizontally flipped" if v.get("flips") else "")
                 + f" = {v.get('num_views')} views per image at {v.get('image_size')} ({v.get('resize_mode')}); "
                 f"layout `{v.get('layout')}`")
    return lines


def _config_section(name: str, meta: Mapping[str, Any]) -> List[str]:
    from vlpl.eval.report import random_model_notice

    rule = meta.get("rule") or {}
    store = meta.get("store") or {}
    prov = meta.get("provenance") or {}
    lines = [f"## Config `{name}`", ""]
    notice = random_model_notice({"model": (meta.get("teacher") or {}).get("model")})
    if notice:
        lines += [f"> {notice}", ""]
    lines += ["### How the pseudo-labels were made", ""]
    lines += _teacher_lines(meta)
    params = rule.get("params") or {}
    lines.append(f"- **Rule**: `{rule.get('name')}` on the unflipped views, parameters: "
                 + (", ".join(f"`{k}={json.dumps(v)}`" for k, v in params.items()) or "none"))
    if rule.get("aggregate"):
        lines.append(f"- **Rule aggregate**: {rule['aggregate']}")
    obs = store.get("observed") or {}
    if obs:
        lines.append("- **Observed labels**: " + ", ".join(f"{k} `{v}`" for k, v in obs.items())
                     + f" (labels kind `{store.get('labels_kind', 'full')}`)")
    lines.append(f"- **Source store**: dataset `{(store.get('dataset') or {}).get('name')}`, manifest sha256 "
                 f"`{store.get('manifest_sha256')}`, made by vlpl {store.get('vlpl_version')}")
    if meta.get("failed_rows_left_out"):
        lines.append(f"- {meta['failed_rows_left_out']} image(s) the teacher could not read are left out")
    lines.append(f"- **Command**: `{prov.get('command')}` (vlpl {prov.get('version')}"
                 + (f", commit `{str(prov['commit'])[:12]}`" if prov.get("commit") else "") + ")")
    lines += ["", "### Splits", ""]
    lines += markdown_table(["split", "rows"], [[s, n] for s, n in (meta.get("splits") or {}).items()])
    lines += ["", "### Columns", ""]
    lines += markdown_table(["column", "content"], [[f"`{c}`", d] for c, d in (meta.get("columns") or {}).items()])
    quality = meta.get("quality") or {}
    lines += ["", "### Quality against the full labels", ""]
    if not quality:
        lines.append("No split has full labels, so the pseudo-labels' quality is not measured here.")
    else:
        lines.append("Measured on the exported columns, on the unobserved entries (observed labels left out; "
                     "F1 = 2PR/(P+R)); teacher mAP is Cole et al.'s (all classes, percent) of the score column.")
        lines.append("")
        score_cols = sorted({c for q in quality.values() for c in q.get("teacher_map", {})},
                            key=lambda c: (not c.endswith(f"{(meta.get('teacher') or {}).get('column_prefix')}_score"), c))
        header = ["split", "rows", "precision %", "recall %", "F1 %", "pseudo-positives / image",
                  *[f"teacher mAP `{c}`" for c in score_cols]]
        rows = []
        for split, q in quality.items():
            pl = (q.get("pseudo_labels") or {}).get("excluding_observed") or {}
            maps = [q["teacher_map"].get(c, {}) for c in score_cols]
            rows.append([split, f"{q.get('rows')} of {q.get('rows_in_split')}", _pct(pl.get("precision")),
                         _pct(pl.get("recall")), _pct(pl.get("f1")), _fmt(pl.get("per_image")),
                         *[_fmt(m.get("map", m.get("masked_map"))) for m in maps]])
        lines += markdown_table(header, rows)
    return lines + [""]


def _usage(configs: Mapping[str, Any], repo: str) -> List[str]:
    name = next(iter(configs))
    meta = configs[name]
    return [
        "## Use", "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{repo}", "{name}")',
        'names = ds["train"].features["pseudo_positives"].feature.names',
        'row = ds["train"][0]',
        'print([names[c] for c in row["pseudo_positives"]])',
        "```", "",
        f"Train on it with vlpl: `vlpl train store=hf:{repo}#{name} ...` (rules that read more than the global "
        "view need a config exported with `--all-views`; without `--with-images` give `data_root=` where the images "
        "are; docs/PUBLISHING.md). Scores are raw "
        f"`{(meta.get('score_kind') or {}).get('score_kind', 'cosine')}` teacher scores: "
        "`vlpl_export.json` in each config folder says how they were made and how to read them.", "",
    ]


def render_card(configs: Mapping[str, Mapping[str, Any]], *, repo: str = "PATH_OR_REPO_ID",
                license: Optional[str] = None) -> Any:
    """The :class:`huggingface_hub.DatasetCard` of an export folder's configs (:func:`read_configs`)."""
    from huggingface_hub import DatasetCard

    data = card_data(configs, license)
    pretty = data.pretty_name
    body = [f"# {pretty}", "",
            "Multi-label pseudo-labels made by `vlpl` from a frozen vision-language teacher's "
            "cached per-view scores: **machine-generated**, no person checked them. Each row is one image with its "
            "observed labels, the pseudo-labels of a rule, and the teacher's raw scores.", ""]
    body += markdown_table(["config", "teacher", "rule", "rows"],
                   [[f"`{n}`", f"`{((m.get('teacher') or {}).get('model') or {}).get('name', (m.get('teacher') or {}).get('column_prefix'))}`",
                     f"`{(m.get('rule') or {}).get('name')}`", sum((m.get("splits") or {}).values())]
                    for n, m in configs.items()])
    body.append("")
    for n, m in configs.items():
        body += _config_section(n, m)
    body += _usage(configs, repo)
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
    card = DatasetCard(content)
    validate_card(card, configs)
    return card


def front_matter(text: str) -> Dict[str, Any]:
    """The YAML front matter of a card's text, parsed with ``yaml.safe_load``."""
    import yaml

    if not text.startswith("---\n"):
        raise ValueError("the card has no YAML front matter (it must start with '---')")
    end = text.find("\n---", 4)
    if end < 0:
        raise ValueError("the card's YAML front matter is not closed with '---'")
    data = yaml.safe_load(text[4:end])
    if not isinstance(data, dict):
        raise ValueError(f"the card's front matter is {type(data).__name__}, expected a mapping")
    return data


def validate_card(card: Any, configs: Mapping[str, Any]) -> None:
    """Offline checks of a rendered card (the Hub validates the metadata again on upload): the front matter
    parses, has the task fields and a license, and its ``configs`` are what ``datasets`` accepts
    (:class:`datasets.utils.metadata.MetadataConfigs`) and name every config's folder."""
    from datasets.utils.metadata import MetadataConfigs

    meta = front_matter(str(card))
    for key, want in (("task_categories", TASK_CATEGORIES), ("task_ids", TASK_IDS),
                      ("annotations_creators", ANNOTATIONS_CREATORS)):
        if meta.get(key) != want:
            raise ValueError(f"card front matter {key}: {meta.get(key)!r}, expected {want!r}")
    if not meta.get("license"):
        raise ValueError("card front matter: no license")
    parsed = MetadataConfigs.from_dataset_card_data(card.data)
    if set(parsed) != set(configs):
        raise ValueError(f"card configs {sorted(parsed)} do not match the exported configs {sorted(configs)}")


def write_card(out: Path, repo: Optional[str] = None, license: Optional[str] = None) -> Path:
    """Render the card of every config in ``out`` and write ``out/README.md`` atomically; returns its path."""
    from vlpl.store.atomic import atomic_write_text

    out = Path(out)
    configs = read_configs(out)
    card = render_card(configs, repo=repo or str(out), license=license)
    path = out / "README.md"
    atomic_write_text(path, str(card))
    return path
