"""The exported dataset's schema: column names, ``datasets.Features`` and the ``vlpl_export.json`` metadata.

Torch-free (it imports ``datasets`` only inside :meth:`ExportSchema.features`), so a reader of an exported
dataset (``vlpl train`` from a dataset, issue 13 item 4) learns the columns without the export code.

One row per image of a store split; the columns (``T`` = the teacher's column prefix, :func:`teacher_prefix`;
``C`` classes, ``V`` cached views, ``D`` embedding dimension):

===========================  =====================================================  =======================
column                       feature                                                present
===========================  =====================================================  =======================
``image``                    ``Image()`` (the image bytes) or ``Value("string")``    always
                             (the path relative to the dataset root)
``sample_id``                ``Value("string")``: the store's stable id              always
``observed``                 ``List(Value("int8"), length=C)``, {-1, 0, 1}          always
``pseudo_positives``         ``List(ClassLabel(names=classes))``: the rule's +1     always
``pseudo_negatives``         ``List(ClassLabel(names=classes))``: the rule's -1     always
``T_score``                  ``List(Value("float16"), length=C)``: raw score of     always
                             the unflipped global view
``T_<rule>_score``           ``List(Value("float16"), length=C)``: the rule's       rules with an aggregate
                             per-class aggregate (DAMP phi, VLPL softmax, ...)      (:data:`RULE_AGGREGATES`)
``T_views``                  ``Array2D((V, C), "float16")``: every cached view,      ``--all-views``
                             in the store's layout (``views.names`` in metadata)
``image_embedding``          ``List(Value("float16"), length=D)``                   ``--embeddings``
``labels``                   ``List(Value("int8"), length=C)``: full labels {0,1}   the store has labels
                             (partial annotations {-1,0,1} when ``labels_kind``
                             is ``partial``); null where unknown
``T_topk``                   ``List({"class": ClassLabel, "score": float16})``:     ``--sparse-topk K``
                             the K best classes of the global view, best first
===========================  =====================================================  =======================

Where the files are (:mod:`vlpl.export.hf`): an export folder ``OUT/`` holds ``README.md`` (the card) and one folder
per config (``<teacher>_<rule>`` unless named), ``OUT/<config>/<split>-NNNNN-of-NNNNN.parquet`` +
``OUT/<config>/vlpl_export.json`` (the Hub repo layout ``push_to_hub`` writes); a ``--save-to-disk DIR`` folder is
``DatasetDict.save_to_disk`` output plus ``DIR/vlpl_export.json`` and ``DIR/README.md``.
:func:`read_export_metadata` finds the metadata in either.

Scores are the store's **raw** teacher scores (cosine for CLIP, ``score_kind`` in the metadata says how a rule
turns them into probabilities), stored as float16 as in the store. The layout of ``T_views`` is the store's:
``v = variant * n_views + view`` (:class:`vlpl.store.views.ViewSpec`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = [
    "METADATA_FILE",
    "EXPORT_SCHEMA_VERSION",
    "RULE_AGGREGATES",
    "ExportOptions",
    "ExportSchema",
    "teacher_prefix",
    "default_teacher_name",
    "read_export_metadata",
    "find_export_metadata",
    "build_metadata",
    "ExportFormatError",
]

#: the metadata file written beside the exported dataset (and uploaded with it)
METADATA_FILE = "vlpl_export.json"
EXPORT_SCHEMA_VERSION = 1
#: the rules whose per-class aggregate score is exported as ``<teacher>_<rule>_score`` and what it is; other
#: rules (``knn``, plugins) export their labels only
RULE_AGGREGATES: Dict[str, str] = {
    "damp": "DAMP's positive score phi (gated tile aggregation of per-view probabilities, unflipped views)",
    "vlpl": "softmax over classes of the global view's score / temp",
    "threshold": "the rule's aggregate_scores (score, temp, view) on the unflipped views",
    "topk": "the rule's aggregate_scores (score, temp, view) on the unflipped views",
    "calibrated": "the aggregate the thresholds file was fitted on (damp phi or global cosine)",
}


class ExportFormatError(ValueError):
    """An exported dataset (or its metadata) that does not have what a reader expects; names the file/key."""


def teacher_prefix(name: str) -> str:
    """A column-name prefix from a teacher name (DataComp-style ``clip_l14_score``): lower case, every run of
    characters other than letters and digits replaced by ``_``. ``"ViT-L-14-336"`` -> ``"vit_l_14_336"``."""
    out = re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")
    if not out:
        raise ValueError(f"teacher name {name!r} gives an empty column prefix; pass a teacher name with letters "
                         f"or digits (vlpl export --teacher-name)")
    return out


def default_teacher_name(manifest: Mapping[str, Any]) -> str:
    """The teacher's name for column prefixes: the manifest's ``model.name`` (``"ensemble"`` for a teacher
    ensemble, whose members are listed in the metadata)."""
    model = manifest.get("model")
    if manifest.get("ensemble") or manifest.get("members") or (isinstance(model, Mapping) and "ensemble" in model):
        return "ensemble"
    name = model.get("name") if isinstance(model, Mapping) else None
    if not name:
        raise ExportFormatError("the store's manifest has no model.name; pass a teacher name (--teacher-name)")
    return str(name)


@dataclass(frozen=True)
class ExportOptions:
    """What goes into the export besides the always-present columns."""

    with_images: bool = False
    all_views: bool = False
    embeddings: bool = False
    sparse_topk: Optional[int] = None

    def __post_init__(self) -> None:
        k = self.sparse_topk
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"sparse_topk must be an integer >= 1 (classes kept per image) or None, got {k!r}")

    def to_dict(self) -> Dict[str, Any]:
        return {"with_images": self.with_images, "all_views": self.all_views, "embeddings": self.embeddings,
                "sparse_topk": self.sparse_topk}


@dataclass(frozen=True)
class ExportSchema:
    """The columns of one export as a function of the store's classes, the teacher, the views and the options.

    Args:
        classes: the class names, in the store's order (``ClassLabel`` ids are these positions).
        teacher: the teacher's column prefix (:func:`teacher_prefix`).
        view_names: the store's view names in layout order (``ViewSpec.names()``); ``V = len(view_names)``.
        rule: the pseudo-label rule's registered name.
        embedding_dim: ``D`` (needed with ``options.embeddings``).
        has_labels: whether a ``labels`` column is exported (the store has labels for some rows).
        options: :class:`ExportOptions`.
    """

    classes: Sequence[str]
    teacher: str
    view_names: Sequence[str]
    rule: str
    embedding_dim: int = 0
    has_labels: bool = False
    options: ExportOptions = field(default_factory=ExportOptions)
    #: export the rule's aggregate (when it has one, :data:`RULE_AGGREGATES`)
    rule_score: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "view_names", tuple(str(v) for v in self.view_names))
        if not self.classes:
            raise ValueError("an export needs at least one class")
        if len(set(self.classes)) != len(self.classes):
            dup = sorted({c for c in self.classes if self.classes.count(c) > 1})[:3]
            raise ValueError(f"class names must be unique for ClassLabel; duplicated: {dup}")
        if teacher_prefix(self.teacher) != self.teacher:
            raise ValueError(f"teacher column prefix {self.teacher!r} is not normalised; use teacher_prefix()")
        if not self.view_names:
            raise ValueError("view_names is empty: a store has at least the global view")
        if self.options.embeddings and self.embedding_dim < 1:
            raise ValueError("embeddings requested but embedding_dim is 0 (the store has no image embeddings)")

    # -- names --------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_views(self) -> int:
        return len(self.view_names)

    @property
    def score_column(self) -> str:
        """``<teacher>_score``: the raw score of the unflipped global view."""
        return f"{self.teacher}_score"

    @property
    def rule_score_column(self) -> Optional[str]:
        """``<teacher>_<rule>_score`` when the rule has an aggregate (:data:`RULE_AGGREGATES`), else None."""
        if not self.rule_score or self.rule not in RULE_AGGREGATES:
            return None
        return f"{self.teacher}_{teacher_prefix(self.rule)}_score"

    @property
    def views_column(self) -> Optional[str]:
        return f"{self.teacher}_views" if self.options.all_views else None

    @property
    def topk_column(self) -> Optional[str]:
        return f"{self.teacher}_topk" if self.options.sparse_topk else None

    @property
    def columns(self) -> List[str]:
        """Every column, in the dataset's order."""
        cols = ["image", "sample_id", "observed", "pseudo_positives", "pseudo_negatives", self.score_column]
        for extra in (self.rule_score_column, self.views_column):
            if extra:
                cols.append(extra)
        if self.options.embeddings:
            cols.append("image_embedding")
        if self.has_labels:
            cols.append("labels")
        if self.topk_column:
            cols.append(self.topk_column)
        return cols

    # -- features -----------------------------------------------------------------------------------
    def features(self) -> Any:
        """The ``datasets.Features`` of the export (the column order of :attr:`columns`)."""
        import datasets

        c = self.num_classes
        labels = datasets.ClassLabel(names=list(self.classes))
        f16 = datasets.Value("float16")
        feats: Dict[str, Any] = {
            "image": datasets.Image() if self.options.with_images else datasets.Value("string"),
            "sample_id": datasets.Value("string"),
            "observed": _list(datasets.Value("int8"), c),
            "pseudo_positives": _list(labels),
            "pseudo_negatives": _list(labels),
            self.score_column: _list(f16, c),
        }
        if self.rule_score_column:
            feats[self.rule_score_column] = _list(f16, c)
        if self.views_column:
            feats[self.views_column] = datasets.Array2D(shape=(self.num_views, c), dtype="float16")
        if self.options.embeddings:
            feats["image_embedding"] = _list(f16, self.embedding_dim)
        if self.has_labels:
            feats["labels"] = _list(datasets.Value("int8"), c)
        if self.topk_column:
            feats[self.topk_column] = _list({"class": labels, "score": f16})
        return datasets.Features({k: feats[k] for k in self.columns})

    def column_descriptions(self) -> Dict[str, str]:
        """One line per column (the metadata file and the dataset card)."""
        out = {
            "image": "the image" if self.options.with_images else "the image path, relative to the dataset root",
            "sample_id": "the score store's stable sample id",
            "observed": "observed labels per class: 1 positive, -1 negative, 0 unobserved",
            "pseudo_positives": f"classes the {self.rule!r} rule labels positive (+1)",
            "pseudo_negatives": f"classes the {self.rule!r} rule labels negative (-1)",
            self.score_column: "the teacher's raw per-class score of the unflipped global view (float16)",
        }
        if self.rule_score_column:
            out[self.rule_score_column] = RULE_AGGREGATES[self.rule] + " (float16)"
        if self.views_column:
            out[self.views_column] = (f"every cached view's raw per-class score, {self.num_views} x "
                                      f"{self.num_classes} (float16; view order in views.names)")
        if self.options.embeddings:
            out["image_embedding"] = f"the teacher's {self.embedding_dim}-d image embedding (global view, float16)"
        if self.has_labels:
            out["labels"] = "full labels per class where known (null otherwise)"
        if self.topk_column:
            out[self.topk_column] = (f"the {self.options.sparse_topk} best classes of the global view's raw score, "
                                     f"best first: list of {{class, score}}")
        return out

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "ExportSchema":
        """The schema an export was written with, from its ``vlpl_export.json`` (:func:`read_export_metadata`)."""
        try:
            opts = meta.get("options") or {}
            return cls(classes=list(meta["classes"]), teacher=str(meta["teacher"]["column_prefix"]),
                       view_names=list(meta["views"]["names"]), rule=str(meta["rule"]["name"]),
                       embedding_dim=int(meta.get("embedding_dim") or 0), has_labels="labels" in meta["columns"],
                       rule_score=any(str(c).endswith("_score") and c != f"{meta['teacher']['column_prefix']}_score"
                                      for c in meta["columns"]),
                       options=ExportOptions(**{k: opts[k] for k in ("with_images", "all_views", "embeddings",
                                                                      "sparse_topk") if k in opts}))
        except (KeyError, TypeError, ValueError) as e:
            raise ExportFormatError(f"{METADATA_FILE}: {type(e).__name__}: {e}") from None


def build_metadata(schema: ExportSchema, *, manifest: Mapping[str, Any], views: Mapping[str, Any],
                   score_kind: Mapping[str, Any], rule_params: Mapping[str, Any], splits: Mapping[str, int],
                   store: str, provenance: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The ``vlpl_export.json`` content: where the data came from and how to read it.

    Args:
        schema: the export's :class:`ExportSchema`.
        manifest: the store's manifest (its checksum, teacher model, templates, dataset and labels kind).
        views: the store's ``ViewSpec.to_dict()`` (layout and names of ``<teacher>_views``).
        score_kind: ``ScoreKind.to_dict()``: what the raw scores are.
        rule_params: the rule's resolved parameters (every parameter, defaults included).
        splits: rows per exported split.
        store: the store's path or source, as given.
        provenance: :func:`vlpl.provenance.provenance` of the export command (no secrets: a command line with a
            token in it must be redacted by the caller).
    """
    model = manifest.get("model")
    teacher: Dict[str, Any] = {
        "column_prefix": schema.teacher,
        "model": model,
        "templates": manifest.get("templates"),
        "templates_sha256": manifest.get("templates_sha256"),
    }
    if manifest.get("descriptions"):
        teacher["descriptions"] = manifest.get("descriptions")
    members = (manifest.get("ensemble") or {}).get("members") if isinstance(manifest.get("ensemble"), Mapping) \
        else manifest.get("members")
    if members:
        teacher["members"] = members
    return {
        "schema_version": EXPORT_SCHEMA_VERSION,
        "store": {"source": store, "manifest_sha256": manifest.get("manifest_sha256"),
                  "dataset": manifest.get("dataset"), "labels_kind": manifest.get("labels_kind") or "full",
                  "observed": manifest.get("observed"), "vlpl_version": manifest.get("vlpl_version")},
        "teacher": teacher,
        "classes": list(schema.classes),
        "views": dict(views),
        "score_kind": dict(score_kind),
        "rule": {"name": schema.rule, "params": dict(rule_params), "variant": "unflipped",
                 "aggregate": RULE_AGGREGATES.get(schema.rule)},
        "options": schema.options.to_dict(),
        "embedding_dim": schema.embedding_dim,
        "columns": schema.column_descriptions(),
        "splits": dict(splits),
        "provenance": dict(provenance or {}),
    }


def _list(feature: Any, length: int = -1) -> Any:
    """``datasets.List`` (datasets >= 4) or the older ``Sequence``, with a fixed ``length`` when > 0."""
    import datasets

    cls = getattr(datasets, "List", None)
    if cls is not None:
        return cls(feature, length=length)
    return datasets.Sequence(feature, length=length)  # pragma: no cover - datasets 3.x


def find_export_metadata(path: Any, config: Optional[str] = None) -> Path:
    """The ``vlpl_export.json`` of an export, wherever ``path`` points:

    * the file itself;
    * a ``save_to_disk`` folder (``DIR/vlpl_export.json`` beside ``dataset_dict.json``);
    * an export folder (``OUT/<config>/vlpl_export.json``, one folder per config): ``config`` names one; without it
      the only config (several: an :class:`ExportFormatError` listing them);
    * a config folder (``OUT/<config>/``).
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ExportFormatError(f"{p}: no such file or folder (expected a `vlpl export` output)")
    if config is not None:
        q = p / config / METADATA_FILE
        if q.is_file():
            return q
        if (p / METADATA_FILE).is_file() and p.name == config:
            return p / METADATA_FILE
        have = sorted(x.parent.name for x in p.glob(f"*/{METADATA_FILE}"))
        raise ExportFormatError(f"{p}: no config {config!r} (configs: {have or 'none'})")
    if (p / METADATA_FILE).is_file():
        return p / METADATA_FILE
    found = sorted(x for x in p.glob(f"*/{METADATA_FILE}") if not x.parent.name.startswith("."))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ExportFormatError(f"{p}: no {METADATA_FILE} (here or in a config folder): not a dataset exported by "
                                f"`vlpl export`")
    raise ExportFormatError(f"{p} holds several configs ({', '.join(x.parent.name for x in found)}); name one")


def read_export_metadata(path: Any, config: Optional[str] = None) -> Dict[str, Any]:
    """The ``vlpl_export.json`` of an export (:func:`find_export_metadata`: the file, a ``save_to_disk`` folder, an
    export folder and ``config``, or a config folder), checked for the keys a reader needs: ``schema_version``,
    ``classes``, ``teacher``, ``views``, ``rule``, ``columns``."""
    p = find_export_metadata(path, config)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportFormatError(f"{p}: unreadable ({e})") from None
    if not isinstance(data, Mapping):
        raise ExportFormatError(f"{p}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in ("schema_version", "classes", "teacher", "views", "rule", "columns") if k not in data]
    if missing:
        raise ExportFormatError(f"{p}: missing key(s) {', '.join(missing)}")
    if data["schema_version"] != EXPORT_SCHEMA_VERSION:
        raise ExportFormatError(f"{p}: schema_version {data['schema_version']!r}; this vlpl reads "
                                f"{EXPORT_SCHEMA_VERSION}")
    return dict(data)
