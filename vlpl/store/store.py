"""The score store: the contract between stages (DESIGN.md, "The score store").

A directory::

    manifest.json            identity (model, preprocessing, templates, classes, views), shards, completion
    classes.txt              one class name a line
    text_embeddings.npy      (C, D) float32, unit-norm, prompt-ensembled
    config.yaml              the resolved config of the run that made it
    shards/part-NNNNN.parquet  one row per image (schema below)
    shards/part-NNNNN.json   the shard's completion mark: rows, failed rows, sha256
    index/image_embeddings.faiss  inner-product index over image embeddings, ids = row numbers

Row schema: ``sample_id`` (string), ``image`` (path relative to the dataset root), ``split``,
``observed`` (C x int8 in {-1,0,1}), ``labels`` (C x int8 in {0,1}, null when unknown),
``scores`` (V x C float16 raw cosine, null for a failed row), ``image_embedding`` (D float16, null for
a failed row), ``status`` ("ok" | "failed"), ``error`` (null or the reason).

Every file is written to a temporary name and renamed. A shard is complete when its ``.json`` mark
exists and the shard's sha256 matches it; a re-run skips complete shards. The manifest is written
last, by the main process, and says ``complete: true`` only when every shard is.
Nothing in the store depends on timing or on the number of processes, so a killed-and-resumed run
and a multi-process run give byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlpl.store.atomic import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUS_OK = "ok"
STATUS_FAILED = "failed"
# Keys of the manifest whose values must match for a run to add to (resume) an existing store.
IDENTITY_KEYS = ("model", "templates_sha256", "classes_sha256", "views", "samples_sha256", "shard_size",
                 "score_kind", "score_format")


class StoreError(Exception):
    """A store that is missing, incomplete, corrupt, or does not match the run."""


def shard_name(i: int) -> str:
    return f"part-{i:05d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def row_schema(num_classes: int, num_views: int, dim: int) -> pa.Schema:
    return pa.schema([
        ("sample_id", pa.string()),
        ("image", pa.string()),
        ("split", pa.string()),
        ("observed", pa.list_(pa.int8(), num_classes)),
        ("labels", pa.list_(pa.int8(), num_classes)),
        ("scores", pa.list_(pa.list_(pa.float16(), num_classes), num_views)),
        ("image_embedding", pa.list_(pa.float16(), dim)),
        ("status", pa.string()),
        ("error", pa.string()),
    ])


def _fixed(values: np.ndarray, valid: np.ndarray, shape: Sequence[int], dtype: Any) -> pa.Array:
    """A (nested) fixed-size list array from an (N, *shape) numpy array; rows with valid=False are null."""
    arr: pa.Array = pa.array(np.ascontiguousarray(values, dtype=dtype).reshape(-1))
    for k in reversed(shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, k)
    mask = pa.array(~valid) if not valid.all() else None
    return pa.FixedSizeListArray.from_arrays(arr, shape[0], mask=mask)


@dataclass
class ShardRows:
    """One shard's rows, as arrays (the writer's input)."""

    sample_id: List[str]
    image: List[str]
    split: List[str]
    observed: np.ndarray  # (N, C) int8
    labels: Optional[np.ndarray]  # (N, C) int8 or None
    labels_known: np.ndarray  # (N,) bool
    scores: np.ndarray  # (N, V, C) float16 (rows of failed images: anything)
    image_embedding: np.ndarray  # (N, D) float16
    ok: np.ndarray  # (N,) bool
    error: List[Optional[str]]

    def to_table(self) -> pa.Table:
        n, c = self.observed.shape
        v, d = self.scores.shape[1], self.image_embedding.shape[1]
        labels = self.labels if self.labels is not None else np.zeros((n, c), np.int8)
        cols = [
            pa.array(self.sample_id, pa.string()),
            pa.array(self.image, pa.string()),
            pa.array(self.split, pa.string()),
            _fixed(self.observed, np.ones(n, bool), (c,), np.int8),
            _fixed(labels, self.labels_known, (c,), np.int8),
            _fixed(self.scores, self.ok, (v, c), np.float16),
            _fixed(self.image_embedding, self.ok, (d,), np.float16),
            pa.array([STATUS_OK if o else STATUS_FAILED for o in self.ok], pa.string()),
            pa.array(self.error, pa.string()),
        ]
        return pa.Table.from_arrays(cols, schema=row_schema(c, v, d))


class StoreWriter:
    """Creates or resumes a store. Only the main process calls :meth:`prepare` and :meth:`finalize`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.shard_dir = self.root / "shards"

    # -- set-up -------------------------------------------------------------------------------------
    def prepare(self, identity: Dict[str, Any], classes: Sequence[str], text_embeddings: np.ndarray,
                overwrite: bool = False) -> None:
        """Check an existing store against ``identity`` (refuse a mismatch unless ``overwrite``),
        then write the identity files and an incomplete manifest."""
        manifest_path = self.root / "manifest.json"
        if manifest_path.exists():
            try:
                old = json.loads(manifest_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise StoreError(f"{manifest_path}: unreadable manifest ({e}); pass overwrite=true to rebuild") from e
            diffs = [k for k in IDENTITY_KEYS if old.get(k) != identity.get(k)]
            if diffs and not overwrite:
                detail = "; ".join(f"{k}: store has {_short(old.get(k))}, run has {_short(identity.get(k))}"
                                   for k in diffs)
                raise StoreError(
                    f"{self.root} was built with a different {', '.join(diffs)} ({detail}). "
                    f"Use another output directory, or overwrite=true to replace it."
                )
            if diffs:
                log.warning("overwriting %s (different %s)", self.root, ", ".join(diffs))
                self._clear()
        elif overwrite:
            self._clear()
        elif self.shard_dir.exists() and any(self.shard_dir.iterdir()):
            raise StoreError(f"{self.root} has shards but no manifest.json; use overwrite=true to rebuild")
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard_dir.mkdir(exist_ok=True)
        atomic_write_text(self.root / "classes.txt", "".join(f"{c}\n" for c in classes))
        with atomic_path(self.root / "text_embeddings.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(text_embeddings, np.float32))
        if not manifest_path.exists() or overwrite:
            atomic_write_json(manifest_path, {**identity, "complete": False, "shards": []})

    def _clear(self) -> None:
        for name in ("shards", "index"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for name in ("manifest.json", "classes.txt", "text_embeddings.npy"):
            (self.root / name).unlink(missing_ok=True)

    # -- shards -------------------------------------------------------------------------------------
    def shard_complete(self, i: int, expected_rows: int) -> bool:
        mark = self.shard_dir / f"{shard_name(i)}.json"
        path = self.shard_dir / f"{shard_name(i)}.parquet"
        if not mark.exists() or not path.exists():
            return False
        try:
            meta = json.loads(mark.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return meta.get("rows") == expected_rows and meta.get("sha256") == sha256_file(path)

    def write_shard(self, i: int, rows: ShardRows) -> Dict[str, Any]:
        path = self.shard_dir / f"{shard_name(i)}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(rows.to_table(), tmp, compression="zstd", write_statistics=False)
        meta = {
            "file": f"shards/{path.name}",
            "index": i,
            "rows": len(rows.sample_id),
            "failed": int((~rows.ok).sum()),
            "sha256": sha256_file(path),
            "complete": True,
        }
        atomic_write_json(self.shard_dir / f"{shard_name(i)}.json", meta)
        return meta

    # -- finish -------------------------------------------------------------------------------------
    def finalize(self, identity: Dict[str, Any], num_shards: int, build_index: bool = True) -> Dict[str, Any]:
        shards = []
        for i in range(num_shards):
            mark = self.shard_dir / f"{shard_name(i)}.json"
            if not mark.exists():
                raise StoreError(f"{mark} is missing: shard {i} was not completed")
            shards.append(json.loads(mark.read_text()))
        manifest = {
            **identity,
            "num_rows": sum(s["rows"] for s in shards),
            "num_failed": sum(s["failed"] for s in shards),
            "shards": shards,
            "complete": True,
        }
        if build_index:
            from vlpl.store.index import build_index as _build

            store = ScoreStore(self.root, manifest=manifest)
            manifest["index"] = _build(store)
        atomic_write_json(self.root / "manifest.json", manifest)
        return manifest


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= n else s[: n - 3] + "..."


class ScoreStore:
    """Read-only view of a complete store (pyarrow only; ``datasets.load_dataset('parquet')`` also works)."""

    def __init__(self, root: Path, manifest: Optional[Dict[str, Any]] = None, require_complete: bool = True) -> None:
        self.root = Path(root)
        path = self.root / "manifest.json"
        if manifest is None:
            if not path.exists():
                raise StoreError(f"{self.root} is not a score store: manifest.json not found")
            try:
                manifest = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise StoreError(f"{path}: not valid JSON ({e})") from e
        self.manifest = manifest
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{path}: schema_version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        if require_complete and not manifest.get("complete"):
            raise StoreError(f"{self.root} is incomplete (an interrupted run?): run `vlpl pseudolabel` again to resume")
        self.classes: List[str] = list(manifest["classes"])
        views = manifest["views"]
        self.n_variants: int = views["n_variants"]
        self.n_views: int = views["n_views"]
        self.grid: int = views["grid"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_rows(self) -> int:
        return int(self.manifest.get("num_rows", 0))

    def shard_paths(self) -> List[Path]:
        return [self.root / s["file"] for s in self.manifest["shards"]]

    def text_embeddings(self) -> np.ndarray:
        return np.load(self.root / "text_embeddings.npy", allow_pickle=False)

    def table(self, columns: Optional[Sequence[str]] = None) -> pa.Table:
        paths = self.shard_paths()
        if not paths:
            return row_schema(self.num_classes, self.n_variants * self.n_views, 1).empty_table()
        return pa.concat_tables([pq.read_table(p, columns=list(columns) if columns else None) for p in paths])

    def iter_tables(self, columns: Optional[Sequence[str]] = None) -> Iterator[pa.Table]:
        for p in self.shard_paths():
            yield pq.read_table(p, columns=list(columns) if columns else None)

    def arrays(self, columns: Sequence[str] = ("sample_id", "split", "observed", "labels", "scores", "status")
               ) -> Dict[str, np.ndarray]:
        """Columns as numpy. Fixed-size lists become dense arrays; null rows become NaN (floats) or
        -1 (``labels``: unknown); ``labels_known`` is added when ``labels`` is asked for."""
        t = self.table(columns)
        out: Dict[str, np.ndarray] = {}
        n = t.num_rows
        for name in columns:
            col = t.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(col.type):
                shape = []
                ty = col.type
                while pa.types.is_fixed_size_list(ty):
                    shape.append(ty.list_size)
                    ty = ty.value_type
                valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), bool)
                flat = col
                for _ in shape:
                    flat = _flatten_keep(flat)
                arr = np.array(flat.to_numpy(zero_copy_only=False)).reshape((n, *shape))  # writable copy
                if not valid.all():
                    arr = arr.astype(np.float32) if name != "labels" else arr.copy()
                    arr[~valid] = np.nan if name != "labels" else -1
                out[name] = arr
                if name == "labels":
                    out["labels_known"] = valid
            else:
                out[name] = np.asarray(col.to_pylist(), dtype=object)
        return out

    def scores(self, dtype: Any = np.float32) -> np.ndarray:
        """(N, n_variants, n_views, C) raw cosine scores; NaN for failed rows."""
        s = self.arrays(("scores",))["scores"].astype(dtype)
        return s.reshape(len(s), self.n_variants, self.n_views, self.num_classes)


def _flatten_keep(arr: pa.FixedSizeListArray) -> pa.Array:
    """Flatten a fixed-size list array keeping every row's slots, null rows included
    (pyarrow's ``flatten`` drops the children of null rows, which would break the reshape)."""
    return arr.values.slice(arr.offset * arr.type.list_size, len(arr) * arr.type.list_size)
