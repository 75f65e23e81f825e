"""The score store: the contract between stages (DESIGN.md, "The score store").

A directory::

    manifest.json            identity (model, preprocessing, templates, classes, views), shards, completion,
                             and ``manifest_sha256``, a checksum of its own content
    classes.txt              one class name a line
    text_embeddings.npy      (C, D) float32, unit-norm, prompt-ensembled
    config.yaml              the resolved config of the run that made it
    shards/part-NNNNN.parquet  one row per image (schema below), row groups of ROW_GROUP_SIZE rows,
                             every page with a CRC checksum
    shards/part-NNNNN.json   the shard's completion mark: rows, failed rows, sha256
    index/image_embeddings.faiss  inner-product index over image embeddings, ids = row numbers
    .lock                    present while a run writes the store (:mod:`vlpl.store.lock`)

Row schema: ``sample_id`` (string), ``image`` (path relative to the dataset root), ``split``,
``observed`` (C x int8 in {-1,0,1}), ``labels`` (C x int8 in {0,1}, null when unknown; in {-1,0,1} with
0 = unknown when the manifest says ``labels_kind: partial``, real partial annotations),
``scores`` (V x C float16 raw cosine, null for a failed row) or, in a compact score form
(``score_format``, :mod:`vlpl.store.formats`), ``view_embeddings`` (V x D float16) or ``topk_classes`` /
``topk_scores`` / ``topk_floor``; ``image_embedding`` (D float16, null for a failed row), ``status``
("ok" | "failed"), ``error`` (null or the reason). Readers return dense scores whatever the form.

``cache/`` (not part of the store's content; rebuilt from the shards when missing or stale): flat,
CRC-checked sidecars for random access with memory independent of the store's size (:mod:`vlpl.store.cache`).

Writing: every file is written to a temporary name and renamed. A shard is complete when its ``.json``
mark exists and the shard's sha256 matches it; a re-run skips complete shards and re-does the others
(the process that owns a shard hashes it; nothing else does). The manifest is written last, by the main
process, and says ``complete: true`` only when every shard is. Nothing in the store depends on timing or
on the number of processes, so a killed-and-resumed run and a multi-process run give byte-identical files.

Reading (:class:`ScoreStore`): the manifest's checksum is checked on open; every Parquet page read is
checked against its CRC, and every shard's schema and row count against the manifest, so a flipped bit
raises a :class:`StoreError` naming the shard instead of changing the data. :meth:`ScoreStore.verify`
checks the full sha256 of every shard on demand. Callers read through :meth:`ScoreStore.split`
(:class:`SplitReader`: ids, labels, and batch-wise scores) and never parse the manifest or the shards.

A store may live on an fsspec URL (``s3://...``; :mod:`vlpl.store.fs`, docs/REMOTE_STORES.md): the same bytes,
each file sent whole (one put; rename on ``file://``), resume by listing ``shards/``, a lock object with a
heartbeat instead of ``flock``, Parquet read through pyarrow's fsspec handler, sidecars in a local cache directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlpl.store import cache as _sc
from vlpl.store.atomic import (
    TEMP_SUFFIX,
    WriteError,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
)
from vlpl.store.formats import ScoreForm, tie_offsets
from vlpl.store.fs import PARQUET_MAGIC, RemotePath, store_path
from vlpl.store.lock import RemoteStoreLock, StoreLock, StoreLockedError
from vlpl.store.reader import SplitReaderBase, StoreBase
from vlpl.store.views import ScoreKind, ViewSpec

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# 1: no manifest checksum, no page checksums, one row group per shard (still readable)
READABLE_SCHEMAS = (1, 2)
STATUS_OK = "ok"
STATUS_FAILED = "failed"
ROW_GROUP_SIZE = 256
MANIFEST_CHECKSUM_KEY = "manifest_sha256"
DEFAULT_CACHE_BYTES = 4 << 30  # decoded float16 scores kept for random access (training batches)
STREAM_CACHE_BYTES = 64 << 20  # what one sequential pass (iter_scores) keeps
CACHE_DIR = "cache"  # flat sidecars for memory-bounded random access (vlpl.store.cache), rebuilt from the shards
# Keys of the manifest whose values must match for a run to add to (resume) an existing store.
IDENTITY_KEYS = ("model", "templates_sha256", "classes_sha256", "views", "samples_sha256", "shard_size",
                 "score_kind", "score_format", "score_form", "decode")
_RESUME_HINT = "free space (or fix the permission) and re-run the same command: completed shards are kept"


LABELS_KINDS = ("full", "partial")


def labels_kind_of(manifest: Dict[str, Any]) -> str:
    """The manifest's ``labels_kind``: ``"full"`` (the ``labels`` column holds full labels in {0,1}; stores
    written before the field existed) or ``"partial"`` (real partial annotations in {-1,0,1}, 0 = unknown, never
    a negative: evaluate with the masked mAP, :func:`vlpl.eval.metrics.masked_average_precision`)."""
    kind = manifest.get("labels_kind") or "full"
    if kind not in LABELS_KINDS:
        raise StoreError(f"manifest labels_kind {kind!r}; expected one of: {', '.join(LABELS_KINDS)}")
    return str(kind)


class StoreError(Exception):
    """A store that is missing, incomplete, corrupt, locked, or does not match the run."""


def shard_name(i: int) -> str:
    return f"part-{i:05d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with (path.open("rb") if isinstance(path, RemotePath) else open(path, "rb")) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def templates_hash(templates: Sequence[str]) -> str:
    """The store's ``templates_sha256``: the first 16 hex digits of the templates' line hash."""
    return sha256_lines(templates)[:16]


def manifest_checksum(manifest: Dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces) without its checksum field."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM_KEY}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def write_manifest(path: Path, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``manifest`` atomically with its checksum; returns what was written."""
    out = {**{k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM_KEY}}
    out[MANIFEST_CHECKSUM_KEY] = manifest_checksum(out)
    atomic_write_json(path, out, hint=_RESUME_HINT)
    return out


def read_manifest(path: Path) -> Dict[str, Any]:
    """Read and check a manifest: valid JSON, a known schema, and (schema >= 2) its own checksum."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path.parent} is not a score store: manifest.json not found") from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: not valid JSON ({e}); the manifest is corrupt") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"{path}: expected a JSON object, got {type(manifest).__name__}; the manifest is corrupt")
    version = manifest.get("schema_version")
    if version not in READABLE_SCHEMAS:
        raise StoreError(f"{path}: schema_version {version!r}; this vlpl reads {', '.join(map(str, READABLE_SCHEMAS))}")
    if version >= 2:
        want = manifest.get(MANIFEST_CHECKSUM_KEY)
        if not isinstance(want, str):
            raise StoreError(f"{path}: '{MANIFEST_CHECKSUM_KEY}' is missing; the manifest is corrupt")
        got = manifest_checksum(manifest)
        if got != want:
            raise StoreError(f"{path}: checksum mismatch (content sha256 {got[:16]}..., recorded {want[:16]}...): "
                             f"the manifest was changed or corrupted after it was written")
    return manifest


def row_schema(num_classes: int, num_views: int, dim: int, form: Optional[ScoreForm] = None) -> pa.Schema:
    """The shard schema; the score columns are those of ``form`` (default: dense ``scores``)."""
    form = form or ScoreForm("dense", num_views, num_classes, dim)
    return pa.schema([
        ("sample_id", pa.string()),
        ("image", pa.string()),
        ("split", pa.string()),
        ("observed", pa.list_(pa.int8(), num_classes)),
        ("labels", pa.list_(pa.int8(), num_classes)),
        *form.arrow_fields(),
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
    scores: Optional[np.ndarray]  # (N, V, C) float16 dense scores (rows of failed images: anything), or None
    image_embedding: np.ndarray  # (N, D) float16
    ok: np.ndarray  # (N,) bool
    error: List[Optional[str]]
    #: the score columns of a compact form (:meth:`ScoreForm.payload`), e.g. ``view_embeddings`` (N, V, D);
    #: with ``form`` given and ``payload`` None, the payload is made from ``scores``
    payload: Optional[Dict[str, np.ndarray]] = None
    form: Optional[ScoreForm] = None

    def to_table(self) -> pa.Table:
        n, c = self.observed.shape
        d = self.image_embedding.shape[1]
        form = self.form
        if form is None:
            if self.scores is None:
                raise ValueError("ShardRows: dense scores or a form with its payload are needed")
            form = ScoreForm("dense", self.scores.shape[1], c, d)
        payload = self.payload if self.payload is not None else form.from_dense(self.scores)
        labels = self.labels if self.labels is not None else np.zeros((n, c), np.int8)
        emb = np.where(self.ok[:, None], self.image_embedding, 0).astype(np.float16)
        score_cols = []
        for name, (shape, dtype) in form.payload().items():
            arr = np.asarray(payload[name])
            if arr.shape != (n, *shape):
                raise ValueError(f"ShardRows: column {name!r} has shape {arr.shape}, expected {(n, *shape)}")
            arr = np.where(self.ok.reshape(-1, *([1] * len(shape))), arr, 0).astype(dtype)  # null rows: zeros
            score_cols.append(_fixed(arr, self.ok, shape, dtype))
        cols = [
            pa.array(self.sample_id, pa.string()),
            pa.array(self.image, pa.string()),
            pa.array(self.split, pa.string()),
            _fixed(self.observed, np.ones(n, bool), (c,), np.int8),
            _fixed(labels, self.labels_known, (c,), np.int8),
            *score_cols,
            _fixed(emb, self.ok, (d,), np.float16),
            pa.array([STATUS_OK if o else STATUS_FAILED for o in self.ok], pa.string()),
            pa.array(self.error, pa.string()),
        ]
        return pa.Table.from_arrays(cols, schema=row_schema(c, form.num_views, d, form))


def write_parquet(table: pa.Table, path: Path) -> None:
    """The store's Parquet settings: zstd, no statistics, row groups of ROW_GROUP_SIZE, page CRCs."""
    pq.write_table(table, path, compression="zstd", write_statistics=False, row_group_size=ROW_GROUP_SIZE,
                   write_page_checksum=True)


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


class StoreWriter:
    """Creates or resumes a store. Only the main process calls :meth:`prepare` and :meth:`finalize`;
    :meth:`prepare` takes the store lock (``STORE/.lock``) and :meth:`finalize` (or :meth:`close`)
    gives it back."""

    def __init__(self, root: Path) -> None:
        self.root = store_path(root)  # a Path, or a RemotePath for an fsspec URL (vlpl/store/fs.py)
        self.shard_dir = self.root / "shards"
        self._lock: Any = None
        self._listed: Optional[Dict[str, int]] = None  # remote: the shard folder's one listing (resume)

    @property
    def remote(self) -> bool:
        """Whether the store is on an fsspec URL (docs/REMOTE_STORES.md)."""
        return isinstance(self.root, RemotePath)

    # -- lock ---------------------------------------------------------------------------------------
    def lock(self) -> StoreLock:
        """Take the store's writer lock (idempotent); raises :class:`StoreError` naming the owner when
        another live run holds it. Usable as a context manager: ``with writer.lock(): ...``."""
        if self._lock is None or not self._lock.held:
            lk = RemoteStoreLock(self.root) if self.remote else StoreLock(self.root)
            try:
                lk.acquire()
            except StoreLockedError as e:
                raise StoreError(str(e)) from None
            self._lock = lk
        return self._lock

    def close(self) -> None:
        """Give the lock back (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- set-up -------------------------------------------------------------------------------------
    def prepare(self, identity: Dict[str, Any], classes: Sequence[str], text_embeddings: np.ndarray,
                overwrite: bool = False) -> None:
        """Lock the store, check an existing store against ``identity`` (refuse a mismatch unless
        ``overwrite``, saying what differs) BEFORE writing anything, remove temporary files of an
        interrupted run, then write the identity files and an incomplete manifest."""
        self.lock()
        try:
            self._prepare(identity, classes, text_embeddings, overwrite)
        except BaseException:
            self.close()
            raise

    def _prepare(self, identity: Dict[str, Any], classes: Sequence[str], text_embeddings: np.ndarray,
                 overwrite: bool) -> None:
        manifest_path = self.root / "manifest.json"
        if manifest_path.exists():
            try:
                old = read_manifest(manifest_path)
            except StoreError as e:
                if not overwrite:
                    raise StoreError(f"{e}; pass overwrite=true to rebuild the store") from None
                old = {}
            diffs = [k for k in IDENTITY_KEYS if old.get(k) != identity.get(k)]
            if diffs and not overwrite:
                detail = "; ".join(_differences(k, old.get(k), identity.get(k)) for k in diffs)
                hint = ""
                if old.get("score_format") == "embeddings" and set(diffs) <= {"classes_sha256", "templates_sha256",
                                                                               "samples_sha256"}:
                    hint = (" This store keeps per-view image embeddings: new classes or prompts need no image "
                            "pass (vlpl.store.store.retarget_classes with the teacher's text embeddings).")
                raise StoreError(
                    f"{self.root} was built with a different {', '.join(diffs)} ({detail}). Nothing was "
                    f"changed. Use another output directory, or overwrite=true to replace it.{hint}"
                )
            if diffs:
                log.warning("overwriting %s (different %s)", self.root, ", ".join(diffs))
                self._clear()
        elif overwrite:
            self._clear()
        elif self.shard_dir.exists() and any(p.suffix == ".parquet" for p in self.shard_dir.iterdir()):
            raise StoreError(f"{self.root} has shards but no manifest.json; use overwrite=true to rebuild")
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in (self.root, self.shard_dir, self.root / "index"):
            remove_stale_temps(folder, recursive=False)
        self.shard_dir.mkdir(exist_ok=True)
        atomic_write_text(self.root / "classes.txt", "".join(f"{c}\n" for c in classes), hint=_RESUME_HINT)
        with atomic_path(self.root / "text_embeddings.npy", hint=_RESUME_HINT) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(text_embeddings, np.float32))
        if not manifest_path.exists() or overwrite:
            write_manifest(manifest_path, {**identity, "complete": False, "shards": []})

    def _clear(self) -> None:
        if self.remote:
            for name in ("shards", "index"):
                (self.root / name).rmtree()
            for name in ("manifest.json", "classes.txt", "text_embeddings.npy"):
                (self.root / name).unlink(missing_ok=True)
            self._listed = None
            return
        for name in ("shards", "index", CACHE_DIR):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for name in ("manifest.json", "classes.txt", "text_embeddings.npy"):
            (self.root / name).unlink(missing_ok=True)

    # -- shards -------------------------------------------------------------------------------------
    def shard_complete(self, i: int, expected_rows: int) -> bool:
        """Whether shard ``i`` is done: its mark says ``expected_rows`` rows and the file's full sha256
        matches the mark (a shard changed on disk is re-done, not skipped)."""
        mark = self.shard_dir / f"{shard_name(i)}.json"
        path = self.shard_dir / f"{shard_name(i)}.parquet"
        if self.remote:  # resume by listing: one listing of shards/, then each listed shard is checked
            if not self._remote_present(i, path):
                return False
        elif not mark.exists() or not path.exists():
            return False
        try:
            meta = json.loads(mark.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            log.warning("%s: unreadable completion mark; shard %d will be re-done", mark, i)
            return False
        if not isinstance(meta, dict) or meta.get("rows") != expected_rows:
            log.warning("%s: mark does not say %d rows; shard %d will be re-done", mark, expected_rows, i)
            return False
        if meta.get("sha256") != sha256_file(path):
            log.warning("%s: sha256 does not match its completion mark (changed or corrupted on disk); "
                        "shard %d will be re-done", path, i)
            return False
        return True

    def _remote_present(self, i: int, path: Any) -> bool:
        """Remote store: shard i and its mark are in the shard folder's listing, and the shard is whole (its
        last bytes are Parquet's magic: a truncated object is re-done without reading it all)."""
        if self._listed is None:
            self._listed = self.shard_dir.listing()
            log.info("%s: %d objects listed for resume", self.shard_dir, len(self._listed))
        name = shard_name(i)
        size = self._listed.get(f"{name}.parquet")
        if size is None or f"{name}.json" not in self._listed:
            return False
        if size < 12 or path.tail(4) != PARQUET_MAGIC:
            log.warning("%s: a partial object (%d bytes, no Parquet footer); shard %d will be re-done", path, size, i)
            return False
        return True

    def _check_lock(self) -> None:
        """Remote store: the lock object is still this run's (:meth:`RemoteStoreLock.check`)."""
        if self.remote and self._lock is not None:
            try:
                self._lock.check()
            except StoreLockedError as e:
                raise StoreError(str(e)) from None

    def write_shard(self, i: int, rows: ShardRows) -> Dict[str, Any]:
        path = self.shard_dir / f"{shard_name(i)}.parquet"
        self._check_lock()
        try:
            with atomic_path(path, hint=_RESUME_HINT) as tmp:
                write_parquet(rows.to_table(), tmp)
                digest = sha256_file(tmp)  # the bytes that are renamed / put whole onto ``path``
            meta = {
                "file": f"shards/{path.name}",
                "index": i,
                "rows": len(rows.sample_id),
                "failed": int((~rows.ok).sum()),
                "sha256": digest,
                "complete": True,
            }
            atomic_write_json(self.shard_dir / f"{shard_name(i)}.json", meta, hint=_RESUME_HINT)
        except WriteError as e:
            raise StoreError(str(e)) from e
        return meta

    # -- finish -------------------------------------------------------------------------------------
    def finalize(self, identity: Dict[str, Any], num_shards: int, build_index: bool = True) -> Dict[str, Any]:
        """Write the complete manifest (and the FAISS index) and give the lock back."""
        shards = []
        for i in range(num_shards):
            mark = self.shard_dir / f"{shard_name(i)}.json"
            if not mark.exists():
                raise StoreError(f"{mark} is missing: shard {i} was not completed")
            shards.append(json.loads(mark.read_text()))
        manifest = {
            **{k: v for k, v in identity.items() if k != MANIFEST_CHECKSUM_KEY},
            "num_rows": sum(s["rows"] for s in shards),
            "num_failed": sum(s["failed"] for s in shards),
            "shards": shards,
            "complete": True,
        }
        if manifest.get("score_format") == "topk":  # the class prior that orders top-k's dropped classes
            manifest["mean_image_embedding"] = [round(float(x), 7) for x in
                                                mean_image_embedding(ScoreStore(self.root, manifest=manifest,
                                                                                sidecars=False))]
        try:
            if build_index:
                from vlpl.store.index import build_index as _build

                store = ScoreStore(self.root, manifest=manifest)
                if self.remote:  # built locally, then put whole beside the shards
                    from vlpl.store.index import INDEX_FILE

                    with atomic_path(self.root / INDEX_FILE, hint=_RESUME_HINT) as tmp:
                        manifest["index"] = {**_build(store, build_index, path=tmp), "file": INDEX_FILE}
                else:
                    manifest["index"] = _build(store, build_index)  # True or an IndexConfig
            self._check_lock()
            manifest = write_manifest(self.root / "manifest.json", manifest)
        except WriteError as e:
            raise StoreError(str(e)) from e
        self.close()
        return manifest


def mean_image_embedding(store: "ScoreStore") -> np.ndarray:
    """(D,) float32 mean of the ok rows' global image embeddings, streamed shard by shard (float64 sums)."""
    total = np.zeros(max(store.embedding_dim, 1), np.float64)
    n = 0
    for _, a in store.iter_shards(("image_embedding",)):
        ok = a["image_embedding_valid"]
        total += a["image_embedding"][ok].astype(np.float64).sum(0)
        n += int(ok.sum())
    return (total / max(n, 1)).astype(np.float32)


def _differences(key: str, old: Any, new: Any) -> str:
    """``key.sub: store has X, run has Y`` for each differing entry (nested dicts compared key by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        subs = [k for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)]
        return "; ".join(_differences(f"{key}.{k}", old.get(k), new.get(k)) for k in subs)
    return f"{key}: store has {_short(old)}, run has {_short(new)}"


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= n else s[: n - 3] + "..."


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


def _flatten_keep(arr: pa.FixedSizeListArray) -> pa.Array:
    """Flatten a fixed-size list array keeping every row's slots, null rows included
    (pyarrow's ``flatten`` drops the children of null rows, which would break the reshape)."""
    return arr.values.slice(arr.offset * arr.type.list_size, len(arr) * arr.type.list_size)


def _validity(col: pa.Array) -> np.ndarray:
    """(n,) bool: which rows are not null, from the validity bitmap (``is_null()`` on nested fixed-size
    lists costs ~1 ms per row)."""
    n = len(col)
    if col.null_count == 0:
        return np.ones(n, bool)
    bits = np.unpackbits(np.frombuffer(col.buffers()[0], np.uint8), bitorder="little")
    return bits[col.offset : col.offset + n].astype(bool)


def _decode_fixed(col: Any) -> Tuple[np.ndarray, np.ndarray]:
    """A fixed-size list column -> (dense (n, *shape) array, valid (n,) bool)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    shape = []
    ty = col.type
    while pa.types.is_fixed_size_list(ty):
        shape.append(ty.list_size)
        ty = ty.value_type
    valid = _validity(col)
    flat = col
    for _ in shape:
        flat = _flatten_keep(flat)
    arr = np.array(flat.to_numpy(zero_copy_only=False)).reshape((n, *shape))  # writable copy
    return arr, valid


def _strings(col: Any) -> np.ndarray:
    return np.asarray(col.to_pylist(), dtype=object)


class _LRU:
    """A byte-bounded LRU of numpy arrays (always keeps the newest entry)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: "OrderedDict[Any, np.ndarray]" = OrderedDict()
        self.nbytes = 0

    def get(self, key: Any) -> Any:
        v = self.items.get(key)
        if v is not None:
            self.items.move_to_end(key)
        return v

    @staticmethod
    def _size(value: Any) -> int:
        if isinstance(value, np.ndarray):
            return value.nbytes
        if isinstance(value, dict):
            return sum(_LRU._size(v) for v in value.values())
        if isinstance(value, (tuple, list)):
            return sum(_LRU._size(v) for v in value)
        return 0

    def put(self, key: Any, value: Any) -> None:
        self.items[key] = value
        self.nbytes += self._size(value)
        while self.nbytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.nbytes -= self._size(old)


class _InMemory:
    """An in-memory (N, ...) array with the :class:`vlpl.store.cache.FlatArray` read interface."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr

    def take(self, rows: Any) -> np.ndarray:
        return self.arr[np.asarray(rows, np.int64).reshape(-1)]

    def mmap(self) -> np.ndarray:
        return self.arr


class _GroupRows:
    """(N, C) label rows of a split read from the shards' row groups on demand (no sidecar)."""

    def __init__(self, store: "ScoreStore", rows: np.ndarray, column: str, lru: "_LRU") -> None:
        self.store, self.rows, self.column, self.lru = store, rows, column, lru

    def take(self, pos: Any) -> np.ndarray:
        return self.store._take_rows(self.rows[np.asarray(pos, np.int64).reshape(-1)], self.column, self.lru)

    def mmap(self) -> np.ndarray:
        return self.take(np.arange(len(self.rows)))


class _GroupStrings(Sequence[str]):
    """A split's ids or image refs read from the shards' row groups on demand (no sidecar)."""

    def __init__(self, store: "ScoreStore", rows: np.ndarray, column: str, lru: "_LRU") -> None:
        self.store, self.rows, self.column, self.lru = store, rows, column, lru

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: Any) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [str(x) for x in self.store._take_rows(self.rows[i], self.column, self.lru)]
        if isinstance(i, (list, tuple, np.ndarray)):
            return [str(x) for x in self.store._take_rows(self.rows[np.asarray(i, np.int64)], self.column, self.lru)]
        n = len(self.rows)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"index {i} out of range [0, {n})")
        return str(self.store._take_rows(self.rows[[j]], self.column, self.lru)[0])

    def __iter__(self) -> Iterator[str]:
        for a in range(0, len(self.rows), 4096):
            yield from self[a:a + 4096]

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, (list, tuple, Sequence)) and not isinstance(other, str):
            return len(self) == len(other) and all(x == y for x, y in zip(self, other))
        return NotImplemented


class SplitReader(SplitReaderBase):
    """The rows of one split: ids, image refs, observed and full labels, and the view scores, all read
    batch-wise on demand (``scores``, ``observed_at``, ``labels_at``).

    With sidecars (the default when the store or ``VLPL_CACHE_DIR`` is writable, :mod:`vlpl.store.cache`)
    only ``rows``, ``labels_known`` and ``ok`` (9 bytes a row) are in memory: ``sample_ids`` and ``images``
    are sequences read from disk per item, ``observed`` / ``labels`` are loaded into memory on first use (whole-array
    use; prefer ``observed_at`` / ``labels_at`` in loops), and the batch readers read just the rows asked for.

    Positions ``0..len-1`` index the split; ``rows`` maps them to store row numbers. Failed rows
    (status not ok) are left out unless the split was opened with ``include_failed=True`` (then ``ok``
    says which rows failed and their scores are NaN).
    """

    def __init__(self, store: "ScoreStore", name: str, rows: np.ndarray, sample_ids: Sequence[str],
                 images: Sequence[str], observed: Any, labels: Any, labels_known: np.ndarray, ok: np.ndarray,
                 include_failed: bool) -> None:
        self.store = store
        self.name = name
        self.rows = rows
        self.sample_ids = sample_ids
        self.images = images
        self._observed_src = _InMemory(observed) if isinstance(observed, np.ndarray) else observed
        self._labels_src = _InMemory(labels) if isinstance(labels, np.ndarray) else labels
        self.labels_known = labels_known
        self.ok = ok
        self.include_failed = include_failed
        self._observed: Optional[np.ndarray] = None
        self._labels: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def observed(self) -> np.ndarray:
        """``(N, C)`` int8 observed labels, loaded into memory on first use (N x C bytes: per-batch code should
        use :meth:`observed_at`, which reads only the rows asked for)."""
        if self._observed is None:
            self._observed = self._whole(self._observed_src)
        return self._observed

    @property
    def labels(self) -> Optional[np.ndarray]:
        """``(N, C)`` int8 labels when every row has them, else None: full labels in {0,1}, or partial
        annotations in {-1,0,1} when :attr:`labels_kind` is ``"partial"``."""
        if not len(self.rows) or not self.labels_known.all():
            return None
        if self._labels is None:
            self._labels = self._whole(self._labels_src)
        return self._labels

    def _whole(self, src: Any) -> np.ndarray:
        """The whole (N, C) array in memory, writable (loaded on first use; batch loops use ``*_at``)."""
        try:
            return np.array(src.mmap())
        except ValueError as e:
            raise StoreError(f"split {self.name!r}: {e}; delete {getattr(src, 'path', 'the sidecar')} (it is "
                             f"rebuilt from the shards)") from None

    def _take(self, src: Any, pos: np.ndarray) -> np.ndarray:
        try:
            return src.take(pos)
        except ValueError as e:
            raise StoreError(f"split {self.name!r}: {e}; delete {getattr(src, 'path', 'the sidecar')} (it is "
                             f"rebuilt from the shards)") from None

    def observed_at(self, idx: Any) -> np.ndarray:
        """``(B, C)`` int8 observed labels of the rows at positions ``idx`` (reads only those rows)."""
        return self._take(self._observed_src, self._positions(idx))

    def labels_at(self, idx: Any) -> np.ndarray:
        """``(B, C)`` int8 full labels of the rows at positions ``idx`` (all must have known labels)."""
        pos = self._positions(idx)
        if not self.labels_known[pos].all():
            bad = pos[~self.labels_known[pos]][:3]
            raise ValueError(f"split {self.name!r}: rows {[self.sample_ids[i] for i in bad]} have no full labels")
        return self._take(self._labels_src, pos)

    def scores(self, idx: Any, device: Any = None) -> Any:
        """``(B, n_variants, n_views, C)`` float32 raw cosine scores of the rows at positions ``idx``, whatever
        the store's form (dense, per-view embeddings scored against the text embeddings, top-k filled with
        the floor). ``device`` None: a numpy array; else a torch tensor computed on that device (a compact
        form's payload is moved there and expanded there).

        Random access: read from the shards' flat sidecars (:mod:`vlpl.store.cache`: only the rows asked
        for are read; memory independent of the store's size) when the store has them or can make them,
        else from decoded row groups kept in the store's byte-bounded cache."""
        return self._scores(idx, None, device)

    def _scores(self, idx: Any, cache: Optional["_LRU"], device: Any = None) -> Any:
        pos = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(pos) and (pos.min() < 0 or pos.max() >= len(self.rows)):
            raise IndexError(f"split {self.name!r}: positions must be in [0, {len(self.rows)}); got "
                             f"{int(pos.min())}..{int(pos.max())}")
        flat = self.store._read_scores(self.rows[pos], cache, device)
        return self.store.view_spec.split_variants(flat)

    def iter_scores(self, batch_size: int, positions: Optional[Any] = None, device: Any = None
                    ) -> Iterator[Tuple[np.ndarray, Any]]:
        """``(positions, scores)`` batches in order, over ``positions`` (default: the whole split).

        One pass: it keeps only a few decoded row groups of its own (``STREAM_CACHE_BYTES``), not the
        store's random-access cache, so memory stays bounded whatever the store's size."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pos = np.arange(len(self.rows)) if positions is None else np.asarray(positions, dtype=np.int64).reshape(-1)
        cache = _LRU(STREAM_CACHE_BYTES)
        for k in range(0, len(pos), batch_size):
            p = pos[k : k + batch_size]
            yield p, self._scores(p, cache, device)

    def image_embeddings(self, idx: Any) -> np.ndarray:
        """``(B, D)`` float32: the teacher's cached image embeddings (the ``image_embedding`` column: the
        global, unflipped view) of the rows at positions ``idx``; NaN for a failed row. Random access through
        the store's byte-bounded cache of decoded row groups (the reconstruction term of Decision 5 reads
        them per training batch)."""
        return self.store._read_embeddings(self.rows[self._positions(idx)])


class ScoreStore(StoreBase):
    """Read-only view of a store: identity, splits and batch-wise readers (pyarrow only; the shards are
    also readable by ``datasets.load_dataset('parquet')``).

    Decoded score row groups are kept in a byte-bounded LRU (``cache_bytes``); nothing reads the whole
    store at once unless asked (:meth:`arrays`, kept for callers not yet moved).
    """

    def __init__(self, root: Path, manifest: Optional[Dict[str, Any]] = None, require_complete: bool = True,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, sidecars: bool = True,
                 cache_dir: Optional[Path] = None) -> None:
        self.root = store_path(root)  # a Path, or a RemotePath for an fsspec URL (vlpl/store/fs.py)
        self.sidecars = sidecars
        self._cache_dir_arg = cache_dir
        self._cache_dir: Any = False  # False: not resolved yet; None: nowhere writable
        self._shard_sidecars: Dict[Tuple[int, str], Tuple[Dict[str, "_sc.FlatArray"], np.ndarray]] = {}
        path = self.root / "manifest.json"
        if manifest is None:
            manifest = read_manifest(path)
        self.manifest = manifest
        if manifest.get("schema_version") not in READABLE_SCHEMAS:
            raise StoreError(f"{path}: schema_version {manifest.get('schema_version')!r}, this vlpl reads "
                             f"{', '.join(map(str, READABLE_SCHEMAS))}")
        if require_complete and not manifest.get("complete"):
            raise StoreError(f"{self.root} is incomplete (an interrupted run?): run `vlpl pseudolabel` again to resume")
        try:
            self.classes: List[str] = list(manifest["classes"])
            self.view_spec: ViewSpec = ViewSpec.from_manifest(manifest)
            self.form: ScoreForm = ScoreForm.from_manifest(manifest, self.view_spec.num_views, len(self.classes))
            # what the raw scores are (cosine / siglip ...): the rules' probabilities (docs/TEACHERS.md)
            self.score_kind: ScoreKind = ScoreKind.from_manifest(manifest)
            # classes the shards' observed/labels columns cover (differs after retarget_classes)
            self.label_classes: List[str] = list(manifest.get("label_classes") or self.classes)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{path}: {e}") from None
        self._text: Optional[np.ndarray] = None
        self._mean_emb: Optional[np.ndarray] = None
        self._offsets: Optional[np.ndarray] = None
        shards = manifest.get("shards", [])
        self._shard_rows = np.array([int(s["rows"]) for s in shards], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._shard_rows)]).astype(np.int64)
        self._rg_starts: Dict[int, np.ndarray] = {}
        self._remote_footers: Dict[int, Any] = {}  # remote store: each shard's Parquet footer, fetched once
        self._cache = _LRU(cache_bytes)
        self._meta: Optional[Dict[str, np.ndarray]] = None

    @classmethod
    def open(cls, root: Any, weights: Optional[Sequence[float]] = None, **kwargs: Any) -> Any:
        """The store at ``root``, or a teacher ensemble (:class:`vlpl.store.ensemble.EnsembleStore`, the same read
        API) when ``root`` is an ensemble directory (``ensemble.json``) or a list of store directories, combined
        with ``weights`` (default: the ensemble's own, or equal), or a dataset made by ``vlpl export``
        (:class:`vlpl.store.hf_dataset.DatasetStore`: ``hf:<repo id or path>`` or an export / save_to_disk
        folder). ``kwargs`` go to :class:`ScoreStore`."""
        from vlpl.store import ensemble as _ensemble  # the ensemble hook (issue 14, item 10)
        from vlpl.store import hf_dataset as _hf_dataset  # a `vlpl export` dataset (issue 13, item 4)

        if _hf_dataset.is_dataset_source(root):
            if weights is not None:
                raise StoreError(f"{root}: ensemble_weights given for an exported dataset; an ensemble combines "
                                 f"score stores (store=[A,B])")
            return _hf_dataset.open_dataset(root, **kwargs)
        if _ensemble.is_ensemble_source(root):
            return _ensemble.open_ensemble(root, weights, **kwargs)
        if weights is not None:
            raise StoreError(f"{root}: ensemble_weights {list(weights)} given for a single store; give a list of "
                             f"stores (store=[A,B]) or an ensemble directory")
        return cls(store_path(root), **kwargs)

    # -- identity (n_variants, n_views, grid, num_classes: StoreBase) -----------------------------------
    @property
    def num_rows(self) -> int:
        return int(self._starts[-1])

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest.get("embedding_dim") or 0)

    @property
    def score_format(self) -> str:
        """How scores are stored: ``dense`` (V x C float16 per row), ``embeddings`` (V x D float16 per-view
        image embeddings) or ``topk`` (see :mod:`vlpl.store.formats`). Readers always return dense scores."""
        return self.form.name

    @property
    def score_columns(self) -> List[str]:
        """The shard columns that hold the scores in this store's form."""
        return self.form.columns

    @property
    def columns(self) -> List[str]:
        """Every shard column of this store."""
        return row_schema(1, 1, 1, self.form).names

    @property
    def labels_kind(self) -> str:
        """``"full"`` or ``"partial"``: what the ``labels`` column holds (:func:`labels_kind_of`)."""
        return labels_kind_of(self.manifest)

    @property
    def dataset_info(self) -> Dict[str, Any]:
        """The manifest's ``dataset`` entry (name, format, root)."""
        return dict(self.manifest.get("dataset") or {})

    def shard_paths(self) -> List[Path]:
        return [self.root / s["file"] for s in self.manifest.get("shards", [])]

    def text_embeddings(self) -> np.ndarray:
        """(C, D) float32 class text embeddings."""
        path = self.root / "text_embeddings.npy"
        try:
            with path.open("rb") as f:
                te = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: unreadable ({e})") from None
        if te.ndim != 2 or te.shape[0] != self.num_classes:
            raise StoreError(f"{path}: shape {te.shape}, expected ({self.num_classes}, D) for the store's classes")
        if self.form.name == "embeddings" and te.shape[1] != self.form.dim:
            raise StoreError(f"{path}: dimension {te.shape[1]}, the store's view embeddings have {self.form.dim}")
        return te

    def _text_embeddings(self) -> Optional[np.ndarray]:
        """The (C, D) text embeddings the embeddings form scores against (loaded once), else None."""
        if self.form.name != "embeddings":
            return None
        if self._text is None:
            self._text = self.text_embeddings()
        return self._text

    def dense_scores(self, payload: Dict[str, np.ndarray], device: Any = None) -> Any:
        """``(B, V, C)`` float32 scores of a batch of payload columns (numpy, or a torch tensor on ``device``)."""
        offsets = self._tie_offsets()
        if device is None:
            return self.form.dense(payload, self._text_embeddings(), offsets)
        return self.form.dense_torch(payload, self._text_embeddings(), device, offsets)

    def mean_image_embedding(self) -> np.ndarray:
        """(D,) float32 mean of the ok rows' global image embeddings (the manifest's, else one streamed pass)."""
        stored = self.manifest.get("mean_image_embedding")
        if stored is not None:
            return np.asarray(stored, np.float32)
        if self._mean_emb is None:
            self._mean_emb = mean_image_embedding(self)
        return self._mean_emb

    def _tie_offsets(self) -> Optional[np.ndarray]:
        """Top-k only: (C,) offsets ordering dropped classes by ``text @ mean image embedding``."""
        if self.form.name != "topk" or self.form.k >= self.num_classes or not self.embedding_dim:
            return None
        if self._offsets is None:
            self._offsets = tie_offsets(self.text_embeddings() @ self.mean_image_embedding())
        return self._offsets

    # -- labels of added classes ------------------------------------------------------------------------
    def _map_labels(self, arr: np.ndarray) -> np.ndarray:
        """(n, label classes) -> (n, C): a class added by :func:`retarget_classes` is 0 (unknown / none)."""
        if self.label_classes == self.classes:
            return arr
        where = {c: i for i, c in enumerate(self.label_classes)}
        out = np.zeros((len(arr), self.num_classes), arr.dtype)
        for j, c in enumerate(self.classes):
            if c in where:
                out[:, j] = arr[:, where[c]]
        return out

    # -- flat sidecars (random access) -------------------------------------------------------------------
    @property
    def cache_dir(self) -> Optional[Path]:
        """Where this store's sidecars are (None: sidecars off or nowhere writable)."""
        if self._cache_dir is False:
            key = f"store-{str(self.manifest.get(MANIFEST_CHECKSUM_KEY) or sha256_lines([str(self.root)]))[:16]}"
            self._cache_dir = _sc.resolve_cache_dir(self.root, key, self._cache_dir_arg) if self.sidecars else None
            if self.sidecars and self._cache_dir is None:
                log.warning("%s: no writable cache directory (set VLPL_CACHE_DIR): random access decodes row "
                            "groups into an in-memory cache instead of reading flat sidecars", self.root)
        return self._cache_dir

    def _mmap_ok(self) -> bool:
        return bool(self.sidecars and self.manifest.get("complete") and len(self._shard_rows)
                    and self.cache_dir is not None)

    def _sidecar_columns(self, kind: str) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
        """Columns of a sidecar family: ``scores`` (the form's payload) or ``embedding`` (image_embedding)."""
        if kind == "scores":
            return self.form.payload()
        return {"image_embedding": ((self.embedding_dim,), np.dtype(np.float16))}

    def _shard_sidecar(self, k: int, rebuild: bool = False, kind: str = "scores"
                       ) -> Tuple[Dict[str, "_sc.FlatArray"], np.ndarray]:
        """The flat files of shard k for ``kind`` (built on first use) and its per-row [valid, CRC...] table."""
        hit = self._shard_sidecars.get((k, kind))
        if hit is not None and not rebuild:
            return hit
        root = self.cache_dir
        assert root is not None
        name = f"{shard_name(k)}.{kind}"
        mark_path = root / f"{name}.json"
        entry = self.manifest["shards"][k]
        path = self.shard_paths()[k]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise StoreError(f"{path}: shard file missing (listed in {self.root / 'manifest.json'})") from None
        columns = self._sidecar_columns(kind)
        want = {"cache_version": _sc.CACHE_VERSION, "shard_sha256": entry.get("sha256"), "size": st.st_size,
                "mtime_ns": st.st_mtime_ns, "rows": int(self._shard_rows[k]), **self.form.manifest_entry(),
                "columns": {c: [list(shp), np.dtype(dt).str] for c, (shp, dt) in columns.items()}}
        mark = None if rebuild else _sc.read_json_mark(mark_path)
        if mark != want:
            with _sc.file_lock(root / f".{name}.lock"):
                mark = None if rebuild else _sc.read_json_mark(mark_path)
                if mark != want:
                    for stale in root.glob(f".{name}.*{TEMP_SUFFIX}"):  # a reader killed mid-build
                        stale.unlink(missing_ok=True)
                    self._build_shard_sidecar(k, root, name, kind, want)
        try:
            table = np.load(root / f"{name}.rows.npy", allow_pickle=False)
            cols = {c: _sc.FlatArray(root / f"{name}.{c}.npy", table[:, 1 + i]) for i, c in enumerate(columns)}
        except (OSError, ValueError) as e:
            if rebuild:
                raise StoreError(f"{root}: sidecar of {path.name} unreadable after a rebuild ({e})") from None
            log.warning("%s: sidecar of shard %d unreadable (%s); rebuilding it", root, k, e)
            return self._shard_sidecar(k, True, kind)
        if table.shape != (self._shard_rows[k], 1 + len(cols)) or any(len(c) != self._shard_rows[k] for c in cols.values()):
            if rebuild:
                raise StoreError(f"{root}: sidecar of {path.name} has the wrong shape after a rebuild")
            return self._shard_sidecar(k, True, kind)
        out = (cols, table[:, 0].astype(bool))
        self._shard_sidecars[(k, kind)] = out
        return out

    def _group_columns(self, k: int, g: int, kind: str) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
        if kind == "scores":
            return self._group_payload(k, g, _LRU(0))
        arr, valid = self._decode(k, self._read(k, ["image_embedding"], [g]).column("image_embedding"))
        return {"image_embedding": arr.astype(np.float16, copy=False)}, valid

    def _build_shard_sidecar(self, k: int, root: Path, name: str, kind: str, mark: Dict[str, Any]) -> None:
        """Decode shard k's columns row group by row group into flat ``.npy`` files (one group in memory)."""
        n = int(self._shard_rows[k])
        columns = self._sidecar_columns(kind)
        rg = self._row_groups(k)
        table = np.zeros((n, 1 + len(columns)), np.uint32)
        with contextlib.ExitStack() as stack:
            writers = {}
            for c, (shape, dt) in columns.items():
                tmp = stack.enter_context(atomic_path(root / f"{name}.{c}.npy"))
                f = stack.enter_context(open(tmp, "wb"))
                writers[c] = _sc.NpyWriter(f, (n, *shape), dt)
            for g in range(len(rg) - 1):
                arrays, valid = self._group_columns(k, g, kind)
                table[rg[g]:rg[g + 1], 0] = valid
                for i, c in enumerate(columns):
                    writers[c].write(arrays[c])
                    table[rg[g]:rg[g + 1], 1 + i] = _sc.row_crcs(np.ascontiguousarray(arrays[c], columns[c][1]))
            for w in writers.values():
                w.close()
        with atomic_path(root / f"{name}.rows.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, table, allow_pickle=False)
        _sc.write_json_mark(root / f"{name}.json", mark)
        log.info("%s: flat sidecar %s written (%d rows)", root, name, n)

    def _sidecar_payload(self, rows: np.ndarray, kind: str = "scores") -> Tuple[Dict[str, np.ndarray], np.ndarray]:
        """Columns of store rows read from the sidecars (only those rows), CRC-checked."""
        out = {c: np.zeros((len(rows), *shape), dt) for c, (shape, dt) in self._sidecar_columns(kind).items()}
        valid = np.zeros(len(rows), bool)
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        for k in np.unique(shard):
            sel = np.nonzero(shard == k)[0]
            local = rows[sel] - self._starts[k]
            for attempt in (0, 1):
                cols, ok = self._shard_sidecar(int(k), attempt == 1, kind)
                try:
                    for c, fa in cols.items():
                        out[c][sel] = fa.take(local)
                    break
                except ValueError as e:
                    if attempt:
                        raise StoreError(f"{e}; the sidecar was rebuilt from {self.shard_paths()[int(k)]} and is "
                                         f"still bad: check the disk") from None
                    log.warning("%s; rebuilding it from the shard", e)
            valid[sel] = ok[local]
        return out, valid

    def prepare_sidecars(self, embeddings: bool = False) -> Optional[Path]:
        """Build every shard's score sidecar (and, with ``embeddings``, the image-embedding one) now, e.g. on
        the main process before the others start reading; returns the cache directory, or None when sidecars
        are off."""
        if not self._mmap_ok():
            return None
        for k in range(len(self._shard_rows)):
            self._shard_sidecar(k)
            if embeddings and self.embedding_dim:
                self._shard_sidecar(k, kind="embedding")
        return self.cache_dir

    # -- shard access ---------------------------------------------------------------------------------
    def _expected_type(self, column: str) -> pa.DataType:
        C = len(self.label_classes) if column in ("observed", "labels") else self.num_classes
        return row_schema(C, self.view_spec.num_views, max(self.embedding_dim, 1), self.form).field(column).type

    def _parquet(self, k: int) -> pq.ParquetFile:
        path = self.shard_paths()[k]
        try:
            if isinstance(path, RemotePath):  # pyarrow reads through the fsspec file system; footer read once
                pf = pq.ParquetFile(path.path, filesystem=path.arrow_fs, page_checksum_verification=True,
                                    metadata=self._remote_footers.get(k))
                self._remote_footers[k] = pf.metadata
            else:
                pf = pq.ParquetFile(path, page_checksum_verification=True)
            rows = pf.metadata.num_rows
        except FileNotFoundError:
            raise StoreError(f"{path}: shard file missing (listed in {self.root / 'manifest.json'})") from None
        except Exception as e:  # noqa: BLE001 - any decoder error is a corrupt shard
            raise self._corrupt(k, e) from None
        if rows != self._shard_rows[k]:
            raise StoreError(f"{path}: {rows} rows, the manifest says {self._shard_rows[k]}; the shard is corrupt "
                             f"or from another run")
        return pf

    def _corrupt(self, k: int, e: BaseException) -> StoreError:
        path = self.shard_paths()[k]
        return StoreError(f"{path}: corrupt shard ({type(e).__name__}: {e}). Check the store with "
                          f"`vlpl inspect --verify {self.root}`; re-running `vlpl pseudolabel` with the same config "
                          f"re-does shards whose sha256 no longer matches")

    def _read(self, k: int, columns: Sequence[str], row_groups: Optional[Sequence[int]] = None) -> pa.Table:
        """Columns of shard ``k`` (optionally some row groups), CRC-checked, schema-checked."""
        pf = self._parquet(k)
        try:
            t = pf.read(columns=list(columns)) if row_groups is None else \
                pf.read_row_groups(list(row_groups), columns=list(columns))
        except Exception as e:  # noqa: BLE001
            raise self._corrupt(k, e) from None
        for name in columns:
            want = self._expected_type(name) if name != "image_embedding" or self.embedding_dim else None
            if name not in t.column_names or (want is not None and t.schema.field(name).type != want):
                got = t.schema.field(name).type if name in t.column_names else "missing"
                raise StoreError(f"{self.shard_paths()[k]}: column {name!r} is {got}, expected {want}; the shard "
                                 f"is corrupt or from another store")
        return t

    def _decode(self, k: int, col: Any) -> Any:
        """A column as numpy: ``(dense, valid)`` for fixed-size lists, an object array for strings; a value
        that does not decode (e.g. bad UTF-8 in a store without page checksums) names the shard."""
        try:
            return _decode_fixed(col) if pa.types.is_fixed_size_list(col.type) else _strings(col)
        except Exception as e:  # noqa: BLE001
            raise self._corrupt(k, e) from None

    def _row_groups(self, k: int) -> np.ndarray:
        """First row of each row group of shard k, plus the end."""
        rg = self._rg_starts.get(k)
        if rg is None:
            md = self._parquet(k).metadata
            rg = np.concatenate([[0], np.cumsum([md.row_group(i).num_rows for i in range(md.num_row_groups)])])
            self._rg_starts[k] = rg.astype(np.int64)
            rg = self._rg_starts[k]
        return rg

    def _group_payload(self, k: int, g: int, cache: Optional[_LRU] = None) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
        """Row group g of shard k: its score payload columns (in the store's form) and which rows are valid."""
        cache = self._cache if cache is None else cache
        key = (k, g)
        hit = cache.get(key)
        if hit is not None:
            return hit
        t = self._read(k, self.form.columns, [g])
        payload: Dict[str, np.ndarray] = {}
        valid = None
        for name, (_, dtype) in self.form.payload().items():
            arr, v = self._decode(k, t.column(name))
            payload[name] = arr.astype(dtype, copy=False)
            valid = v if valid is None else valid & v
        out = (payload, valid if valid is not None else np.ones(t.num_rows, bool))
        cache.put(key, out)
        return out

    def _read_payload(self, rows: np.ndarray, cache: Optional[_LRU] = None) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
        """The score payload columns of store rows (any order) and which rows are valid."""
        rows = np.asarray(rows, np.int64)
        out = self.form.empty(len(rows))
        valid = np.zeros(len(rows), bool)
        if not len(rows):
            return out, valid
        if rows.min() < 0 or rows.max() >= self.num_rows:
            raise IndexError(f"store rows must be in [0, {self.num_rows})")
        if cache is None and self._mmap_ok():
            return self._sidecar_payload(rows)
        for k, g, where, at in self._locate(rows):
            payload, ok = self._group_payload(k, g, cache)
            for name in out:
                out[name][where] = payload[name][at]
            valid[where] = ok[at]
        return out, valid

    def _locate(self, rows: np.ndarray) -> Iterator[Tuple[int, int, np.ndarray, np.ndarray]]:
        """Store rows (any order) grouped by Parquet row group: ``(shard, row group, positions in rows,
        offsets inside the group)``, so that each row group is decoded once per batch."""
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        for k in np.unique(shard).tolist():
            sel = np.nonzero(shard == k)[0]
            local = rows[sel] - self._starts[k]
            rg = self._row_groups(k)
            group = np.searchsorted(rg, local, side="right") - 1
            for g in np.unique(group).tolist():
                gsel = np.nonzero(group == g)[0]
                yield k, g, sel[gsel], local[gsel] - rg[g]

    def _read_scores(self, rows: np.ndarray, cache: Optional[_LRU] = None, device: Any = None) -> Any:
        """(B, V, C) float32 scores of store rows (any order); NaN for failed rows. ``device``: a torch
        tensor computed there (the compact payload is moved, then expanded)."""
        payload, valid = self._read_payload(rows, cache)
        out = self.dense_scores(payload, device)
        if not valid.all():
            if device is None:
                out[~valid] = np.nan
            else:
                import torch

                out[torch.from_numpy(~valid).to(out.device)] = float("nan")
        return out

    def _read_embeddings(self, rows: np.ndarray) -> np.ndarray:
        """(B, D) float32 image embeddings of store rows (any order); NaN for failed rows."""
        if self.embedding_dim < 1:
            raise StoreError(f"{self.root}: the store holds no image embeddings (manifest embedding_dim "
                             f"{self.manifest.get('embedding_dim')!r})")
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.embedding_dim), np.float32)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= self.num_rows:
            raise IndexError(f"store rows must be in [0, {self.num_rows})")
        if self._mmap_ok():  # flat sidecar: only these rows are read
            cols, valid = self._sidecar_payload(rows, "embedding")
            out[:] = cols["image_embedding"]
            out[~valid] = np.nan
            return out
        for k, g, where, at in self._locate(rows):
            key = ("image_embedding", k, g)
            arr = self._cache.get(key)
            if arr is None:
                arr, valid = self._decode(k, self._read(k, ["image_embedding"], [g]).column("image_embedding"))
                arr = arr.astype(np.float16, copy=False)
                if not valid.all():
                    arr[~valid] = np.nan
                self._cache.put(key, arr)
            out[where] = arr[at]
        return out

    def iter_shards(self, columns: Sequence[str]) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
        """``(first store row, decoded columns)`` per shard: fixed-size lists as dense arrays plus
        ``<name>_valid`` (bool), strings as object arrays. One shard in memory at a time."""
        for k in range(len(self._shard_rows)):
            t = self._read(k, columns)
            out: Dict[str, np.ndarray] = {}
            for name in columns:
                col = t.column(name)
                if pa.types.is_fixed_size_list(col.type):
                    out[name], out[f"{name}_valid"] = self._decode(k, col)
                else:
                    out[name] = self._decode(k, col)
            yield int(self._starts[k]), out

    # -- row metadata and splits ----------------------------------------------------------------------
    def _row_meta(self) -> Dict[str, Any]:
        """Per store row: ``split_code`` (int32 index into ``split_names``) and ``ok`` (bool); 5 bytes a row,
        computed from the shards' ``split`` and ``status`` columns without Python strings per row."""
        if self._meta is None:
            names: List[str] = []
            codes, oks = [], []
            for k in range(len(self._shard_rows)):
                t = self._read(k, ["split", "status"])
                try:
                    ok = pc.equal(t.column("status"), STATUS_OK).fill_null(False).to_numpy(zero_copy_only=False)
                    enc = t.column("split").combine_chunks().dictionary_encode()
                    local = [str(x) for x in enc.dictionary.to_pylist()]
                    idx = enc.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
                except Exception as e:  # noqa: BLE001 - a value that does not decode is a corrupt shard
                    raise self._corrupt(k, e) from None
                lut = np.array([names.index(x) if x in names else names.append(x) or len(names) - 1
                                for x in local] or [0], np.int32)
                codes.append(lut[idx] if len(idx) else np.zeros(0, np.int32))
                oks.append(np.asarray(ok, bool))
            self._meta = {"split_names": names,
                          "split_code": np.concatenate(codes) if codes else np.zeros(0, np.int32),
                          "ok": np.concatenate(oks) if oks else np.zeros(0, bool)}
        return self._meta

    def splits(self) -> Dict[str, int]:
        """Usable (status ok) rows per split, in first-seen order."""
        m = self._row_meta()
        return {s: int(((m["split_code"] == i) & m["ok"]).sum()) for i, s in enumerate(m["split_names"])}

    def split_counts(self) -> Dict[str, Dict[str, int]]:
        """Per split: ``total`` rows, ``failed`` rows."""
        m = self._row_meta()
        return {s: {"total": int((m["split_code"] == i).sum()), "failed": int(((m["split_code"] == i) & ~m["ok"]).sum())}
                for i, s in enumerate(m["split_names"])}

    def _split_rows(self, name: str, include_failed: bool) -> np.ndarray:
        m = self._row_meta()
        if name not in m["split_names"]:
            return np.zeros(0, np.int64)
        sel = m["split_code"] == m["split_names"].index(name)
        if not include_failed:
            sel &= m["ok"]
        return np.nonzero(sel)[0].astype(np.int64)

    def _split_parts(self, rows: np.ndarray) -> Iterator[Tuple[np.ndarray, Dict[str, Any]]]:
        """Per shard holding some of ``rows`` (sorted): (positions in ``rows``, that shard's values of them:
        observed, labels (C-wide, mapped), known, ok, sample_id, image)."""
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        for k in np.unique(shard):
            at = np.nonzero(shard == k)[0]
            local = rows[at] - self._starts[k]
            t = self._read(int(k), ["observed", "labels", "sample_id", "image", "status"])
            obs, _ = self._decode(int(k), t.column("observed"))
            lab, lvalid = self._decode(int(k), t.column("labels"))
            lab = lab[local]
            lab[~lvalid[local]] = 0
            yield at, {"observed": self._map_labels(obs[local]), "labels": self._map_labels(lab),
                       "known": lvalid[local], "ok": self._decode(int(k), t.column("status"))[local] == STATUS_OK,
                       "sample_id": self._decode(int(k), t.column("sample_id"))[local].tolist(),
                       "image": self._decode(int(k), t.column("image"))[local].tolist()}

    def split(self, name: str, include_failed: bool = False, sidecars: Optional[bool] = None) -> SplitReader:
        """A :class:`SplitReader` over split ``name`` (an unknown split is an empty reader).

        ``sidecars`` (default: the store's setting) True: for random access (training), the split's labels
        and names are written once to flat files and read per batch (memory: 9 bytes a row). False: for one
        streamed pass (inspect, evaluate): nothing is written; labels and names are read from the shards' row
        groups as asked for (a few row groups in memory)."""
        rows = self._split_rows(name, include_failed)
        use = self.sidecars if sidecars is None else sidecars
        if use and self._mmap_ok() and len(rows):
            return self._split_sidecar(name, include_failed, rows)
        if sidecars is False:
            return self._split_streamed(name, include_failed, rows)
        C = self.num_classes
        observed = np.zeros((len(rows), C), np.int8)
        labels = np.zeros((len(rows), C), np.int8)
        known = np.zeros(len(rows), bool)
        ok = np.zeros(len(rows), bool)
        ids: List[str] = [""] * len(rows)
        images: List[str] = [""] * len(rows)
        for at, part in self._split_parts(rows):
            observed[at], labels[at], known[at], ok[at] = part["observed"], part["labels"], part["known"], part["ok"]
            for i, a in enumerate(at.tolist()):
                ids[a], images[a] = part["sample_id"][i], part["image"][i]
        return SplitReader(self, name, rows, ids, images, observed, labels, known, ok, include_failed)

    def _split_streamed(self, name: str, include_failed: bool, rows: np.ndarray) -> SplitReader:
        """A reader whose labels and names are read from the shards' row groups on demand."""
        known = np.zeros(len(rows), bool)
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        for k in np.unique(shard):
            at = np.nonzero(shard == k)[0]
            col = self._read(int(k), ["labels"]).column("labels")
            col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            known[at] = _validity(col)[rows[at] - self._starts[k]]
        ok = self._row_meta()["ok"][rows].copy()
        lru = _LRU(STREAM_CACHE_BYTES)
        return SplitReader(self, name, rows, _GroupStrings(self, rows, "sample_id", lru),
                           _GroupStrings(self, rows, "image", lru), _GroupRows(self, rows, "observed", lru),
                           _GroupRows(self, rows, "labels", lru), known, ok, include_failed)

    def _group_column(self, k: int, g: int, column: str, lru: "_LRU") -> np.ndarray:
        """Column ``column`` of row group g of shard k (labels mapped to the store's classes, unknown = 0)."""
        key = (column, k, g)
        hit = lru.get(key)
        if hit is not None:
            return hit
        col = self._read(k, [column], [g]).column(column)
        if pa.types.is_fixed_size_list(col.type):
            arr, valid = self._decode(k, col)
            arr = self._map_labels(arr)
            arr[~valid] = 0
        else:
            arr = self._decode(k, col)
        lru.put(key, arr if arr.dtype != object else np.asarray(arr))
        return arr

    def _take_rows(self, rows: np.ndarray, column: str, lru: "_LRU") -> np.ndarray:
        out: Optional[np.ndarray] = None
        for k, g, where, at in self._locate(rows):
            part = self._group_column(k, g, column, lru)[at]
            if out is None:
                out = np.empty((len(rows), *part.shape[1:]), part.dtype)
            out[where] = part
        if out is None:
            out = np.zeros((0, self.num_classes), np.int8) if column in ("observed", "labels") else np.zeros(0, object)
        return out

    def _split_sidecar(self, name: str, include_failed: bool, rows: np.ndarray) -> SplitReader:
        root = self.cache_dir
        assert root is not None
        folder = root / f"split-{sha256_lines([name, str(include_failed)])[:16]}"
        want = {"cache_version": _sc.CACHE_VERSION, "manifest_sha256": self.manifest.get(MANIFEST_CHECKSUM_KEY),
                "split": name, "include_failed": include_failed, "rows": len(rows), "classes": self.num_classes,
                "label_classes_sha256": sha256_lines(self.label_classes), "classes_sha256": sha256_lines(self.classes)}
        for attempt in (0, 1):
            mark = None if attempt else _sc.read_json_mark(folder / "mark.json")
            if mark != want:
                folder.mkdir(parents=True, exist_ok=True)
                with _sc.file_lock(folder / ".lock"):
                    mark = None if attempt else _sc.read_json_mark(folder / "mark.json")
                    if mark != want:
                        for stale in folder.glob(f".*{TEMP_SUFFIX}"):  # a reader killed mid-build
                            stale.unlink(missing_ok=True)
                        self._build_split_sidecar(folder, rows, want)
            try:
                stored_rows = np.load(folder / "rows.npy", allow_pickle=False)
                flags = np.load(folder / "flags.npy", allow_pickle=False)
                crc = np.load(folder / "crc.npy", allow_pickle=False)
                if not np.array_equal(stored_rows, rows) or flags.shape != (len(rows),) or crc.shape != (len(rows), 2):
                    raise ValueError("rows, flags or CRCs do not match the store")
                observed = _sc.FlatArray(folder / "observed.npy", crc[:, 0])
                labels = _sc.FlatArray(folder / "labels.npy", crc[:, 1])
                ids = _sc.StringColumn(folder / "sample_id.off.npy", folder / "sample_id.bin")
                images = _sc.StringColumn(folder / "image.off.npy", folder / "image.bin")
                if observed.shape != (len(rows), self.num_classes) or len(ids) != len(rows) or len(images) != len(rows):
                    raise ValueError("shape does not match the store")
            except (OSError, ValueError) as e:
                if attempt:
                    raise StoreError(f"{folder}: split sidecar unreadable after a rebuild ({e})") from None
                log.warning("%s: split sidecar unreadable (%s); rebuilding it", folder, e)
                continue
            return SplitReader(self, name, rows, ids, images, observed, labels, (flags & 1).astype(bool),
                               (flags & 2).astype(bool), include_failed)
        raise AssertionError("unreachable")

    def _build_split_sidecar(self, folder: Path, rows: np.ndarray, mark: Dict[str, Any]) -> None:
        n, C = len(rows), self.num_classes
        flags = np.zeros(n, np.uint8)
        crc = np.zeros((n, 2), np.uint32)
        with contextlib.ExitStack() as stack:
            def _open(fname: str) -> Any:
                return stack.enter_context(open(stack.enter_context(atomic_path(folder / fname)), "wb"))
            w_obs = _sc.NpyWriter(_open("observed.npy"), (n, C), np.int8)
            w_lab = _sc.NpyWriter(_open("labels.npy"), (n, C), np.int8)
            strings = {c: (_sc.NpyWriter(_open(f"{c}.off.npy"), (n + 1,), np.int64), _open(f"{c}.bin"))
                       for c in ("sample_id", "image")}
            pos = {c: 0 for c in strings}
            for w, _ in strings.values():
                w.write(np.zeros(1, np.int64))
            for at, part in self._split_parts(rows):  # rows are sorted: parts arrive in order
                w_obs.write(part["observed"])
                w_lab.write(part["labels"])
                crc[at, 0] = _sc.row_crcs(np.ascontiguousarray(part["observed"], np.int8))
                crc[at, 1] = _sc.row_crcs(np.ascontiguousarray(part["labels"], np.int8))
                flags[at] = part["known"].astype(np.uint8) | (part["ok"].astype(np.uint8) << 1)
                for c, (w, blob) in strings.items():
                    enc = [x.encode("utf-8") for x in part[c]]
                    lens = np.fromiter((len(e) for e in enc), np.int64, len(enc))
                    w.write(pos[c] + np.cumsum(lens))
                    pos[c] += int(lens.sum())
                    blob.write(b"".join(enc))
            for w in (w_obs, w_lab, *(w for w, _ in strings.values())):
                w.close()
        for fname, arr in (("rows.npy", rows), ("flags.npy", flags), ("crc.npy", crc)):
            with atomic_path(folder / fname) as tmp, open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)
        _sc.write_json_mark(folder / "mark.json", mark)

    def failures(self, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        """Failed rows: ``row``, ``sample_id``, ``split``, ``image``, ``error`` (at most ``limit``)."""
        out: List[Dict[str, Any]] = []
        for start, a in self.iter_shards(("sample_id", "image", "split", "status", "error")):
            for r in np.nonzero(a["status"] != STATUS_OK)[0]:
                if limit is not None and len(out) >= limit:
                    return out
                out.append({"row": int(start + r), "sample_id": a["sample_id"][r], "split": a["split"][r],
                            "image": a["image"][r], "error": a["error"][r]})
        return out

    # -- integrity ------------------------------------------------------------------------------------
    def verify(self) -> Dict[str, Any]:
        """Full check on demand: every shard's sha256 against the manifest (and its mark), and every
        page's CRC by decoding it. Raises :class:`StoreError` listing every bad shard; returns a summary."""
        bad: List[str] = []
        nbytes = 0
        for k, (entry, path) in enumerate(zip(self.manifest.get("shards", []), self.shard_paths())):
            if not path.is_file():
                bad.append(f"{path}: missing")
                continue
            nbytes += path.stat().st_size
            digest = sha256_file(path)
            if digest != entry.get("sha256"):
                bad.append(f"{path}: sha256 {digest[:16]}... does not match the manifest's {str(entry.get('sha256'))[:16]}...")
                continue
            try:
                self._read(k, self.columns)
            except StoreError as e:
                bad.append(str(e))
        if bad:
            raise StoreError(f"{self.root}: {len(bad)} of {len(self._shard_rows)} shard(s) failed verification:\n  "
                             + "\n  ".join(bad) + "\nre-run `vlpl pseudolabel` with the same config to re-do them")
        return {"shards": len(self._shard_rows), "bytes": nbytes, "ok": True}

    # -- whole-store reads (kept for callers not yet on the split readers) ----------------------------
    def table(self, columns: Optional[Sequence[str]] = None) -> pa.Table:
        cols = list(columns) if columns else self.columns
        if not len(self._shard_rows):
            return row_schema(self.num_classes, self.view_spec.num_views, max(self.embedding_dim, 1),
                              self.form).empty_table().select(cols)
        return pa.concat_tables([self._read(k, cols) for k in range(len(self._shard_rows))])

    def iter_tables(self, columns: Optional[Sequence[str]] = None) -> Iterator[pa.Table]:
        cols = list(columns) if columns else self.columns
        for k in range(len(self._shard_rows)):
            yield self._read(k, cols)

    def arrays(self, columns: Sequence[str] = ("sample_id", "split", "observed", "labels", "scores", "status")
               ) -> Dict[str, np.ndarray]:
        """Columns of the WHOLE store as numpy (prefer :meth:`split`). Fixed-size lists become dense
        arrays; null rows become NaN (floats) or -1 (``labels``: unknown); ``labels_known`` is added
        when ``labels`` is asked for. ``scores`` of a compact store are the dense reconstruction (float32)."""
        virtual = "scores" in columns and self.form.name != "dense"
        real = [c for c in columns if not (virtual and c == "scores")]
        if virtual:
            real += [c for c in self.form.columns if c not in real]
        t = self.table(real)
        out: Dict[str, np.ndarray] = {}
        if virtual:
            payload, valid = {}, np.ones(t.num_rows, bool)
            for name, (_, dtype) in self.form.payload().items():
                arr, v = _decode_fixed(t.column(name))
                payload[name], valid = arr.astype(dtype, copy=False), valid & v
            dense = self.form.dense(payload, self._text_embeddings(), self._tie_offsets())
            dense[~valid] = np.nan
            out["scores"] = dense
        for name in columns:
            if virtual and name == "scores":
                continue
            col = t.column(name)
            if pa.types.is_fixed_size_list(col.type):
                arr, valid = _decode_fixed(col)
                if name in ("observed", "labels"):
                    arr = self._map_labels(arr)
                if not valid.all():
                    arr = arr.astype(np.float32) if name != "labels" else arr.copy()
                    arr[~valid] = np.nan if name != "labels" else -1
                out[name] = arr
                if name == "labels":
                    out["labels_known"] = valid
            else:
                out[name] = _strings(col)
        return out

    def scores(self, dtype: Any = np.float32) -> np.ndarray:
        """(N, n_variants, n_views, C) raw cosine scores of the whole store; NaN for failed rows."""
        return self.view_spec.split_variants(self.arrays(("scores",))["scores"].astype(dtype))


def retarget_classes(root: Path, classes: Sequence[str], text_embeddings: np.ndarray,
                     templates: Optional[Sequence[str]] = None, templates_sha256: Optional[str] = None
                     ) -> Dict[str, Any]:
    """Change the class list (and, optionally, the prompts) of an ``embeddings``-form store without an
    image pass: the stored per-view image embeddings are scored against the new ``text_embeddings``
    ((len(classes), D), unit-norm, from the same teacher's text tower) when read.

    Observed and full labels stay those of the classes the shards were written with (``label_classes`` in
    the manifest); a class that is new reads as observed 0 (unknown) and full label 0. Writes
    ``classes.txt``, ``text_embeddings.npy`` and then the manifest (its checksum renewed), under the store
    lock. Returns the new manifest."""
    root = store_path(root)  # type: ignore[assignment]  # a local path or an fsspec URL
    store = ScoreStore(root, sidecars=False)
    if store.form.name != "embeddings":
        raise StoreError(f"{root}: score_format {store.score_format!r}; only an 'embeddings' store can change its "
                         f"classes without an image pass (run `vlpl pseudolabel` with score_format=embeddings)")
    classes = [str(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise StoreError(f"{root}: the new class list has duplicates")
    te = np.asarray(text_embeddings, np.float32)
    if te.shape != (len(classes), store.form.dim):
        raise StoreError(f"{root}: text embeddings of shape {te.shape}, expected ({len(classes)}, {store.form.dim})")
    manifest = {k: v for k, v in store.manifest.items() if k != MANIFEST_CHECKSUM_KEY}
    manifest["label_classes"] = store.label_classes
    manifest["classes"] = classes
    manifest["classes_sha256"] = sha256_lines(classes)
    if templates is not None:
        manifest["templates"] = list(templates)
        manifest["templates_sha256"] = templates_sha256 or templates_hash(templates)
    with StoreWriter(root) as w:
        w.lock()
        try:
            atomic_write_text(root / "classes.txt", "".join(f"{c}\n" for c in classes), hint=_RESUME_HINT)
            with atomic_path(root / "text_embeddings.npy", hint=_RESUME_HINT) as tmp, open(tmp, "wb") as f:
                np.save(f, te)
            out = write_manifest(root / "manifest.json", manifest)
        except WriteError as e:
            raise StoreError(str(e)) from e
    log.info("%s: classes changed to %d (%d with stored labels), no image pass", root, len(classes),
             sum(c in set(store.label_classes) for c in classes))
    return out
