"""Teacher ensembles: several score stores of the same images read as one (issue 14, item 10).

Two ways to make one, neither of which changes a stage's contract:

* ``vlpl pseudolabel`` with ``teachers: [...]`` (and ``ensemble_weights``) writes one ordinary store per
  teacher under ``OUT/teachers/<name>/`` and then ``OUT/ensemble.json`` (atomically, with its own checksum),
  which names the members, their weights and the manifest checksum of each member as it was when the ensemble
  was made (:func:`write_ensemble`; it also combines stores made separately, wherever they are).
* ``vlpl train store=[A,B] ensemble_weights=[0.7,0.3]`` combines stores given on the command line.

:meth:`vlpl.store.store.ScoreStore.open` opens either as an :class:`EnsembleStore`: the store read API
(``classes``, ``view_spec``, ``splits()``, ``split(name)`` -> a reader with the
:class:`~vlpl.store.store.SplitReader` API), whose ``scores()`` are the weighted combination of the members'
scores, so rules, training and evaluation read an ensemble like any store.

Members must agree on the classes (same names, same order), the samples (same sample ids, images, splits and
observed labels, in the same order), and the view layout (grid and flips; the teachers' input sizes may
differ). A mismatch is a :class:`~vlpl.store.store.StoreError` naming both stores and the first differing
item. A row that failed in any member is a failed row of the ensemble.

Combination space (our decision; docs/TEACHERS.md, "Ensembles"): members of one score kind with the same
logit scale and bias (:class:`~vlpl.store.views.ScoreKind`; e.g. two CLIP models) are combined as the weighted
mean of their raw scores, so the ensemble keeps that kind, every rule reads it as it reads one member and the
rules' ``temp`` keeps its meaning (for cosine teachers this is the weighted mean of the softmax logits: DAMP's
per-view softmax of it is the normalised weighted geometric mean of the members' softmaxes). Members of
different kinds (a CLIP cosine store and a SigLIP sigmoid store) have no common raw scale: each is mapped to
per-class probabilities by its own kind (:meth:`ScoreKind.probabilities`; cosine members at the rules' default
temperature, recorded as ``temp``), the weighted mean of those is the ensemble's score, and its kind is
``probability`` (rules use it as it is).

The first member is the *primary*: its text embeddings, image embeddings, dataset entry and index stand for
the ensemble (a head built from the class text embeddings, the reconstruction target and the image source
are one teacher's, not a mixture of spaces of different dimensions).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from vlpl.store.atomic import atomic_write_json
from vlpl.store.reader import SplitReaderBase, StoreBase
from vlpl.store.store import (
    _LRU,
    MANIFEST_CHECKSUM_KEY,
    STREAM_CACHE_BYTES,
    ScoreStore,
    SplitReader,
    StoreError,
    manifest_checksum,
)
from vlpl.store.views import ScoreKind, ViewSpec

log = logging.getLogger(__name__)

__all__ = ["ENSEMBLE_FILE", "ENSEMBLE_SCHEMA", "TEACHERS_DIR", "EnsembleStore", "EnsembleSplitReader",
           "is_ensemble_source", "open_ensemble", "write_ensemble", "read_ensemble", "normalise_weights",
           "check_members"]

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_SCHEMA = "vlpl.ensemble/1"
TEACHERS_DIR = "teachers"

PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------------------
# weights and the ensemble manifest
# --------------------------------------------------------------------------------------------------


def normalise_weights(weights: Optional[Sequence[Any]], n: int, where: str = "ensemble_weights") -> List[float]:
    """``n`` weights summing to 1: equal weights when ``weights`` is None; otherwise ``n`` finite numbers >= 0,
    not all 0, divided by their sum. A bad value is a ``ValueError`` naming ``where``."""
    if n < 1:
        raise ValueError(f"{where}: an ensemble needs at least one member")
    if weights is None:
        return [1.0 / n] * n
    w = list(weights)
    if len(w) != n:
        raise ValueError(f"{where}: {len(w)} weight(s) given for {n} member(s); give one weight per member")
    try:
        arr = np.asarray([float(x) for x in w], np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected numbers, got {w!r}") from None
    if not np.isfinite(arr).all() or (arr < 0).any() or arr.sum() <= 0:
        raise ValueError(f"{where}: expected finite weights >= 0 with a positive sum, got {w!r}")
    return (arr / arr.sum()).tolist()


def is_ensemble_source(root: Any) -> bool:
    """Whether ``root`` names an ensemble: a list/tuple of store directories, or a directory with
    ``ensemble.json`` (and no ``manifest.json`` of its own)."""
    if isinstance(root, (list, tuple)):
        return True
    p = Path(root)
    return (p / ENSEMBLE_FILE).is_file() and not (p / "manifest.json").is_file()


def read_ensemble(root: PathLike) -> Dict[str, Any]:
    """``ROOT/ensemble.json``, checked: schema, its own checksum, members with a name, a path and a weight."""
    path = Path(root) / ENSEMBLE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{root} is not a teacher ensemble: {ENSEMBLE_FILE} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: not valid JSON ({e}); the ensemble manifest is corrupt") from None
    if not isinstance(data, dict) or data.get("schema") != ENSEMBLE_SCHEMA:
        raise StoreError(f"{path}: schema {data.get('schema') if isinstance(data, dict) else None!r}, expected "
                         f"{ENSEMBLE_SCHEMA!r}")
    if data.get(MANIFEST_CHECKSUM_KEY) != manifest_checksum(data):
        raise StoreError(f"{path}: checksum mismatch: the ensemble manifest was changed or corrupted after it was "
                         f"written")
    members = data.get("members")
    if not isinstance(members, list) or not members or not all(
            isinstance(m, dict) and {"name", "path", "weight"} <= set(m) for m in members):
        raise StoreError(f"{path}: 'members' must be a non-empty list of {{name, path, weight}} entries")
    return data


def _member_path(root: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def write_ensemble(root: PathLike, members: Dict[str, PathLike], weights: Optional[Sequence[float]] = None,
                   extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Make ``ROOT`` an ensemble of ``members`` (name -> store directory; a path inside ``ROOT`` is recorded
    relative to it, so the directory can be moved whole): the members are opened and checked against each other
    (:func:`check_members`) first, then ``ROOT/ensemble.json`` is written atomically. Returns what was written."""
    root = Path(root)
    if (root / "manifest.json").is_file():
        raise StoreError(f"{root} is a single score store (it has manifest.json); an ensemble needs its own "
                         f"directory")
    names = [str(n) for n in members]
    if len(set(names)) != len(names) or not all(names):
        raise StoreError(f"{root}: member names must be unique and non-empty, got {names}")
    w = normalise_weights(weights, len(names))
    stores = [ScoreStore(Path(p)) for p in members.values()]
    check_members(stores)
    entries = []
    for name, store, weight, given in zip(names, stores, w, (list(weights) if weights is not None else w)):
        try:
            rel = os.path.relpath(store.root.resolve(), root.resolve())
            path = rel if not rel.startswith("..") else str(store.root.resolve())
        except ValueError:  # another drive
            path = str(store.root.resolve())
        entries.append({"name": name, "path": path, "weight": weight, "weight_given": float(given),
                        "manifest_sha256": store.manifest.get(MANIFEST_CHECKSUM_KEY),
                        "model": store.manifest.get("model"), "score_kind": store.manifest.get("score_kind")})
    data = {"schema": ENSEMBLE_SCHEMA, "members": entries, "combine": _combine_rule(stores), **(extra or {})}
    data[MANIFEST_CHECKSUM_KEY] = manifest_checksum(data)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / ENSEMBLE_FILE, data)
    log.info("ensemble %s: %s", root, ", ".join(f"{e['name']} (weight {e['weight']:.3g})" for e in entries))
    return data


def format_ensemble_summary(root: PathLike, max_failed: int = 5) -> str:
    """What ``vlpl pseudolabel`` prints after a ``teachers: [...]`` run: the ensemble's members (name, weight,
    score kind, path) and how they are combined, then each member's own store summary
    (:func:`vlpl.store.inspect.format_summary`)."""
    from vlpl.store.inspect import format_summary, summarize

    root = Path(root)
    data = read_ensemble(root)
    combine = data.get("combine") or {}
    lines = [f"ensemble   {root}  ({len(data['members'])} teachers, combined score kind "
             f"{combine.get('score_kind')}: {combine.get('rule', combine.get('space'))})"]
    for m in data["members"]:
        lines.append(f"member     {m['name']}: weight {float(m['weight']):.4g}, score kind {m.get('score_kind')}, "
                     f"{_member_path(root, m['path'])}")
    for m in data["members"]:
        lines += ["", f"--- member {m['name']}",
                  format_summary(summarize(_member_path(root, m["path"]), max_failed=max_failed))]
    return "\n".join(lines)


def open_ensemble(source: Any, weights: Optional[Sequence[float]] = None, **kwargs: Any) -> "EnsembleStore":
    """An :class:`EnsembleStore` from an ensemble directory (weights from its manifest unless ``weights`` is
    given) or from a list of store directories (``weights`` default: equal). ``kwargs`` go to each member's
    :class:`~vlpl.store.store.ScoreStore`."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        if not paths:
            raise StoreError("store: an empty list of stores")
        names = _unique_names([p.name or str(p) for p in paths])
        stores = [_open_member(p, **kwargs) for p in paths]
        w = normalise_weights(weights, len(stores))
        return EnsembleStore(stores, w, names)
    root = Path(source)
    data = read_ensemble(root)
    stores, names = [], []
    for m in data["members"]:
        store = _open_member(_member_path(root, m["path"]), **kwargs)
        if m.get("manifest_sha256") and store.manifest.get(MANIFEST_CHECKSUM_KEY) != m["manifest_sha256"]:
            raise StoreError(f"{root / ENSEMBLE_FILE}: member {m['name']!r} ({store.root}) changed since the ensemble "
                             f"was made (manifest checksum {str(store.manifest.get(MANIFEST_CHECKSUM_KEY))[:16]}..., "
                             f"recorded {str(m['manifest_sha256'])[:16]}...); re-run `vlpl pseudolabel` for the ensemble")
        stores.append(store)
        names.append(str(m["name"]))
    w = normalise_weights(weights if weights is not None else [m["weight"] for m in data["members"]], len(stores),
                          where="ensemble_weights" if weights is not None else f"{root / ENSEMBLE_FILE} weights")
    return EnsembleStore(stores, w, names, root=root)


def _open_member(path: Path, **kwargs: Any) -> ScoreStore:
    if is_ensemble_source(path):
        raise StoreError(f"{path} is itself an ensemble; an ensemble's members are single score stores")
    return ScoreStore(path, **kwargs)


def _unique_names(names: Sequence[str]) -> List[str]:
    out: List[str] = []
    for n in names:
        k, name = 1, n
        while name in out:
            k += 1
            name = f"{n}_{k}"
        out.append(name)
    return out


# --------------------------------------------------------------------------------------------------
# agreement of members
# --------------------------------------------------------------------------------------------------


def check_members(stores: Sequence[ScoreStore]) -> None:
    """Refuse members that do not describe the same images the same way. Each member is compared with the
    first; the error names both stores and the first differing item: the class list, the view layout (grid,
    flips), then the rows (sample id, image, split, observed labels, in store order)."""
    if not stores:
        raise StoreError("an ensemble needs at least one member store")
    a = stores[0]
    for b in stores[1:]:
        where = f"ensemble members {a.root} and {b.root}"
        if a.classes != b.classes:
            if len(a.classes) != len(b.classes):
                raise StoreError(f"{where} disagree on the classes: {len(a.classes)} vs {len(b.classes)} classes")
            i = next(i for i, (x, y) in enumerate(zip(a.classes, b.classes)) if x != y)
            raise StoreError(f"{where} disagree on the classes: class {i} is {a.classes[i]!r} vs {b.classes[i]!r}")
        va, vb = a.view_spec, b.view_spec
        if (va.grid, va.flips) != (vb.grid, vb.flips):
            raise StoreError(f"{where} disagree on the views: grid {va.grid}, flips {va.flips} vs grid {vb.grid}, "
                             f"flips {vb.flips} (every member must cache the same view layout)")
        if a.num_rows != b.num_rows:
            raise StoreError(f"{where} disagree on the samples: {a.num_rows} vs {b.num_rows} rows")
        sa, sb = a.manifest.get("samples_sha256"), b.manifest.get("samples_sha256")
        if sa and sa == sb:  # the digest covers every sample's id, image, split and observed labels, in order
            continue
        _first_row_difference(a, b, where)


def _first_row_difference(a: ScoreStore, b: ScoreStore, where: str) -> None:
    """Stream both stores shard by shard and raise at the first row whose id, image, split or observed labels
    differ (a no-op when every row agrees)."""
    cols = ("sample_id", "image", "split", "observed")

    def rows(store: ScoreStore) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
        for start, arr in store.iter_shards(cols):
            yield start, arr

    ib = rows(b)
    buf_b: Optional[Tuple[int, Dict[str, np.ndarray]]] = None
    for start, arr in rows(a):
        n = len(arr["sample_id"])
        for r in range(n):
            row = start + r
            while buf_b is None or row >= buf_b[0] + len(buf_b[1]["sample_id"]):
                buf_b = next(ib)
            rb = row - buf_b[0]
            for c in cols:
                x, y = arr[c][r], buf_b[1][c][rb]
                same = np.array_equal(x, y) if c == "observed" else x == y
                if not same:
                    what = f"{c} {x!r} vs {y!r}" if c != "observed" else \
                        f"observed labels differ (sample {arr['sample_id'][r]!r})"
                    raise StoreError(f"{where} disagree on the samples: row {row}: {what} (members must be scored "
                                     f"from the same dataset with the same observed labels, in the same order)")


# --------------------------------------------------------------------------------------------------
# combination space
# --------------------------------------------------------------------------------------------------


def _kind(store: ScoreStore) -> ScoreKind:
    return getattr(store, "score_kind", None) or ScoreKind.from_manifest(store.manifest)


def _combine_rule(stores: Sequence[ScoreStore], temp: Optional[float] = None) -> Dict[str, Any]:
    """How the members' scores are combined (recorded in the ensemble manifest and the run's store identity):
    ``space: raw`` (one score kind: the weighted mean of raw scores, the ensemble keeps the kind) or
    ``space: probability`` (mixed kinds: each member's :meth:`ScoreKind.probabilities`, cosine members at
    ``temp``, default the rules' temperature; the ensemble's kind is ``probability``)."""
    kinds = [_kind(s) for s in stores]
    if len(set(kinds)) == 1:
        return {"space": "raw", **kinds[0].to_dict(),
                "rule": "weighted mean of the members' raw scores (members of one score kind)"}
    if temp is None:
        from vlpl.pseudolabel.params import TEMP  # the rules' softmax temperature (torch-free)

        temp = TEMP
    return {"space": "probability", "score_kind": "probability", "temp": float(temp),
            "member_kinds": [k.to_dict() for k in kinds],
            "rule": "weighted mean of the members' per-class probabilities (cosine: softmax_c(cos / temp); "
                    "siglip: sigmoid(scale * cos + bias))"}


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


def _score_like(name: str) -> bool:
    """Attributes a single member cannot answer for the ensemble (scores, probabilities, forms, the index)."""
    return any(w in name for w in ("score", "prob", "form", "payload", "index", "text", "embedding", "manifest",
                                   "shard", "table", "arrays", "column", "read", "cache", "sidecar"))


class _Subset(Sequence[str]):
    """``seq[pos[i]]``: a lazy view of a member's ids or image refs at the ensemble's positions."""

    def __init__(self, seq: Sequence[str], pos: np.ndarray) -> None:
        self.seq, self.pos = seq, pos

    def __len__(self) -> int:
        return len(self.pos)

    def __getitem__(self, i: Any) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self.seq[int(p)] for p in self.pos[i]]
        if isinstance(i, (list, tuple, np.ndarray)):
            return [self.seq[int(p)] for p in self.pos[np.asarray(i, np.int64)]]
        return self.seq[int(self.pos[int(i)])]

    def __iter__(self) -> Iterator[str]:
        for p in self.pos:
            yield self.seq[int(p)]


class EnsembleSplitReader(SplitReaderBase):
    """One split of an :class:`EnsembleStore`, with the :class:`~vlpl.store.store.SplitReader` API: ids, image
    refs, labels (the primary member's: members agree on them) and ``scores`` = the members' weighted
    combination. Positions index the rows that are ok in every member (with ``include_failed``, every row;
    ``ok`` says which)."""

    def __init__(self, store: "EnsembleStore", name: str, members: Sequence[SplitReader], include_failed: bool) -> None:
        self.store = store
        self.name = name
        self.members = list(members)
        self.include_failed = include_failed
        primary = self.members[0]
        for m in self.members[1:]:
            if len(m) != len(primary) or not np.array_equal(m.rows, primary.rows):
                raise StoreError(f"split {name!r}: the ensemble's members list different rows ({len(primary)} vs "
                                 f"{len(m)}); members must hold the same samples")
        ok = np.logical_and.reduce([m.ok for m in self.members])
        self._pos = np.arange(len(primary)) if include_failed else np.nonzero(ok)[0]
        self._identity = len(self._pos) == len(primary)
        self.rows = primary.rows[self._pos]
        self.ok = ok[self._pos]
        self.labels_known = primary.labels_known[self._pos]
        self.sample_ids: Sequence[str] = primary.sample_ids if self._identity else _Subset(primary.sample_ids, self._pos)
        self.images: Sequence[str] = primary.images if self._identity else _Subset(primary.images, self._pos)
        self._observed: Optional[np.ndarray] = None
        self._labels: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self._pos)

    def _member_pos(self, idx: Any) -> np.ndarray:
        return self._pos[self._positions(idx)]

    @property
    def observed(self) -> np.ndarray:
        """``(N, C)`` int8 observed labels (loaded on first use; loops use :meth:`observed_at`)."""
        if self._observed is None:
            whole = self.members[0].observed
            self._observed = whole if self._identity else whole[self._pos]
        return self._observed

    @property
    def labels(self) -> Optional[np.ndarray]:
        """``(N, C)`` int8 full labels when every row has them, else None."""
        if not len(self._pos) or not self.labels_known.all():
            return None
        if self._labels is None:
            whole = self.members[0].labels if self._identity else self.members[0].labels_at(self._pos)
            self._labels = whole
        return self._labels

    def __getattr__(self, name: str) -> Any:
        """Other :class:`SplitReader` attributes come from the primary member when they cannot depend on the
        teachers' scores and the positions coincide (every row ok in every member); anything else is refused
        rather than answered with one teacher's numbers."""
        if name.startswith("_") or _score_like(name):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        if not self.__dict__.get("_identity", False):
            raise AttributeError(f"{type(self).__name__}.{name}: not available when the members' failed rows "
                                 f"differ (split {self.__dict__.get('name')!r})")
        return getattr(self.members[0], name)

    def observed_at(self, idx: Any) -> np.ndarray:
        return self.members[0].observed_at(self._member_pos(idx))

    def labels_at(self, idx: Any) -> np.ndarray:
        return self.members[0].labels_at(self._member_pos(idx))

    def image_embeddings(self, idx: Any) -> np.ndarray:
        """The primary member's cached global image embeddings (see the module docstring)."""
        return self.members[0].image_embeddings(self._member_pos(idx))

    def scores(self, idx: Any, device: Any = None) -> Any:
        """``(B, n_variants, n_views, C)`` float32: the weighted combination of the members' scores."""
        pos = self._member_pos(idx)
        return self.store.combine([m.scores(pos, device) for m in self.members])

    def iter_scores(self, batch_size: int, positions: Optional[Any] = None, device: Any = None
                    ) -> Iterator[Tuple[np.ndarray, Any]]:
        """``(positions, combined scores)`` batches in order; one streamed pass per member (bounded memory)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pos = np.arange(len(self._pos)) if positions is None else np.asarray(positions, np.int64).reshape(-1)
        caches = [_LRU(STREAM_CACHE_BYTES) for _ in self.members]
        for k in range(0, len(pos), batch_size):
            p = pos[k : k + batch_size]
            mp = self._member_pos(p)
            yield p, self.store.combine([m._scores(mp, c, device) for m, c in zip(self.members, caches)])


class EnsembleStore(StoreBase):
    """Several score stores of the same images read as one (see the module docstring): the
    :class:`~vlpl.store.store.ScoreStore` read API, scores combined with ``weights``."""

    def __init__(self, members: Sequence[ScoreStore], weights: Sequence[float], names: Sequence[str],
                 root: Optional[Path] = None, temp: Optional[float] = None) -> None:
        if len(members) != len(names):
            raise ValueError("one name per member")
        check_members(members)
        self.members = list(members)
        self.names = list(names)
        self.weights = normalise_weights(weights, len(members))
        self.root = Path(root) if root is not None else self.members[0].root
        #: what was opened, for messages and reports: the ensemble directory, or the list of member stores
        self.source = str(root) if root is not None else "[" + ", ".join(str(m.root) for m in self.members) + "]"
        self.is_ensemble = True
        self.combine_rule = _combine_rule(self.members, temp)
        #: what the combined scores are: the members' kind (raw space) or ``probability`` (mixed kinds)
        self.score_kind: ScoreKind = _kind(self.members[0]) if self.combine_rule["space"] == "raw" else \
            ScoreKind("probability")
        primary = self.members[0]
        self.classes: List[str] = list(primary.classes)
        self.view_spec: ViewSpec = primary.view_spec
        self.manifest = self._manifest()

    # -- identity ---------------------------------------------------------------------------------------
    def _manifest(self) -> Dict[str, Any]:
        """A manifest-shaped description (read-only; nothing is written): the primary's entries, with ``model``
        naming every member and its weight and ``shards`` listing every member's shards, so that a training run's
        ``store.json`` identity changes when a member or a weight does."""
        primary = self.members[0].manifest
        members = [{"name": n, "weight": w, "root": str(s.root), "model": s.manifest.get("model"),
                    "score_kind": s.manifest.get("score_kind"), "manifest_sha256": s.manifest.get(MANIFEST_CHECKSUM_KEY)}
                   for n, w, s in zip(self.names, self.weights, self.members)]
        out = {k: v for k, v in primary.items() if k != MANIFEST_CHECKSUM_KEY}
        out.update({
            "model": {"ensemble": members, "combine": self.combine_rule},
            "templates": [s.manifest.get("templates") for s in self.members],
            "templates_sha256": hashlib.sha256(json.dumps(
                [s.manifest.get("templates_sha256") for s in self.members]).encode()).hexdigest()[:16],
            **self.score_kind.to_dict(),
            "score_format": "ensemble",
            "shards": [{**sh, "file": f"{n}/{sh.get('file')}"} for n, s in zip(self.names, self.members)
                       for sh in s.manifest.get("shards", [])],
            "ensemble": {"members": members, "combine": self.combine_rule},
        })
        out[MANIFEST_CHECKSUM_KEY] = manifest_checksum(out)
        return out

    @property
    def primary(self) -> ScoreStore:
        return self.members[0]

    def __getattr__(self, name: str) -> Any:
        """Other :class:`ScoreStore` attributes that cannot depend on the teachers' scores (e.g. ``labels_kind``,
        ``label_classes``, ``failures``) come from the primary member; score-like ones are refused rather than
        answered with one teacher's numbers."""
        if name.startswith("_") or _score_like(name) or "members" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(self.members[0], name)

    @property
    def num_rows(self) -> int:
        return self.primary.num_rows

    @property
    def embedding_dim(self) -> int:
        return self.primary.embedding_dim

    @property
    def score_format(self) -> str:
        return "ensemble"

    @property
    def dataset_info(self) -> Dict[str, Any]:
        return self.primary.dataset_info

    def text_embeddings(self) -> np.ndarray:
        """The primary member's (C, D) class text embeddings."""
        return self.primary.text_embeddings()

    def verify(self) -> Dict[str, Any]:
        """Every member's full check (:meth:`ScoreStore.verify`)."""
        parts = {n: s.verify() for n, s in zip(self.names, self.members)}
        return {"shards": sum(p["shards"] for p in parts.values()), "bytes": sum(p["bytes"] for p in parts.values()),
                "ok": True, "members": parts}

    def prepare_sidecars(self, embeddings: bool = False) -> Optional[Path]:
        out = None
        for s in self.members:
            out = s.prepare_sidecars(embeddings=embeddings) or out
        return out

    # -- splits ---------------------------------------------------------------------------------------------
    def _ok_all(self) -> np.ndarray:
        return np.logical_and.reduce([s._row_meta()["ok"] for s in self.members])

    def splits(self) -> Dict[str, int]:
        """Rows ok in every member, per split."""
        m, ok = self.primary._row_meta(), self._ok_all()
        return {s: int(((m["split_code"] == i) & ok).sum()) for i, s in enumerate(m["split_names"])}

    def split_counts(self) -> Dict[str, Dict[str, int]]:
        m, ok = self.primary._row_meta(), self._ok_all()
        return {s: {"total": int((m["split_code"] == i).sum()), "failed": int(((m["split_code"] == i) & ~ok).sum())}
                for i, s in enumerate(m["split_names"])}

    def split(self, name: str, include_failed: bool = False, sidecars: Optional[bool] = None) -> EnsembleSplitReader:
        """An :class:`EnsembleSplitReader` over split ``name``."""
        return EnsembleSplitReader(self, name, [s.split(name, include_failed=True, sidecars=sidecars)
                                                for s in self.members], include_failed)

    # -- combination ------------------------------------------------------------------------------------------
    def combine(self, parts: Sequence[Any]) -> Any:
        """The weighted combination of the members' ``(B, n_variants, n_views, C)`` scores (numpy arrays or torch
        tensors), in the space of :attr:`combine_rule`: raw scores (one score kind), or each member's per-class
        probabilities (mixed kinds). NaN (a failed row) in any member stays NaN."""
        if self.combine_rule["space"] == "probability":
            t = self.combine_rule["temp"]
            parts = [_kind(m).probabilities(p, t) for m, p in zip(self.members, parts)]
        out = parts[0] * self.weights[0]
        for w, p in zip(self.weights[1:], parts[1:]):
            out = out + p * w
        return out
