"""``vlpl export --format hf``: a score store's pseudo-labels as a Hugging Face ``DatasetDict``.

One split per store split, built by streaming the store (:func:`vlpl.export.rows.iter_batches`) into an Arrow file
written by ``datasets``' own ``ArrowWriter`` with the explicit :class:`~vlpl.export.schema.ExportSchema` features, one
table per batch built column-wise from the batch's arrays, then opened with ``Dataset.from_file`` (memory-mapped), so
memory holds one batch whatever the store's size. (``Dataset.from_generator`` does the same row by row: measured on a
synthetic 8,192 x 1,000-class store, V = 10, one shared CPU thread, 190 rows/s against 337 rows/s this way.) The
export folder is laid out as the Hub lays out a dataset repo::

    OUT/README.md                                   the dataset card (:mod:`vlpl.export.card`), one config entry
                                                    per config folder present
    OUT/<config>/<split>-00000-of-0000N.parquet     the rows (features kept in the Parquet schema metadata)
    OUT/<config>/vlpl_export.json                   what the columns are and where they came from

``<config>`` is ``<teacher>_<rule>`` unless named: exporting the same store with another rule (or another
teacher's store) into the same ``OUT`` adds a config. ``load_dataset("parquet", data_dir=OUT/<config>)`` and
``load_dataset(OUT, <config>)`` read it back; ``--save-to-disk DIR`` also writes ``DatasetDict.save_to_disk``
(``load_from_disk``) with the same metadata and card, and ``--push-to-hub`` uploads it (:mod:`vlpl.export.hub`).
Every file is written atomically (a config folder is replaced whole).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np

from vlpl.export.rows import iter_batches, open_store, resolve_rule, split_names
from vlpl.export.schema import (
    METADATA_FILE,
    RULE_AGGREGATES,
    ExportOptions,
    ExportSchema,
    build_metadata,
    default_teacher_name,
    teacher_prefix,
)

log = logging.getLogger(__name__)

__all__ = ["HFExport", "export_schema", "build_dataset_dict", "write_parquet_files", "measure_quality",
           "export_hf", "redact", "parquet_files"]

#: a Hugging Face token as it appears in text (``hf_`` + 30-odd letters and digits)
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_SPLIT_RE = re.compile(r"^\w+(\.\w+)*$")  # the split names datasets accepts
#: cap on ``rows x classes`` of the arrays the card's quality numbers are computed from (float32: 40 MB a column)
QUALITY_CELLS = 10_000_000


def redact(text: str) -> str:
    """``text`` with anything shaped like a Hugging Face token replaced by ``hf_***``."""
    return _TOKEN_RE.sub("hf_***", str(text))


@dataclass
class HFExport:
    """What :func:`export_hf` wrote."""

    out: Path
    config_name: str
    metadata: Dict[str, Any]
    files: Dict[str, List[str]] = field(default_factory=dict)  # split -> parquet files, relative to out
    saved_to: Optional[Path] = None
    pushed_to: Optional[str] = None


def export_schema(store: Any, rule: str, params: Mapping[str, Any], options: ExportOptions,
                  teacher_name: Optional[str] = None, splits: Optional[Sequence[str]] = None) -> ExportSchema:
    """The :class:`ExportSchema` of exporting ``store`` with ``rule``: its classes, views and embedding size, a
    ``labels`` column when any exported row has labels, the rule's aggregate when it has one."""
    rule_score = rule in RULE_AGGREGATES
    if rule == "calibrated":
        from vlpl.pseudolabel.calibrate import load_thresholds

        rule_score = not getattr(load_thresholds(params["thresholds"]), "knn", None)
    has_labels = any(bool(np.asarray(store.split(s, sidecars=False).labels_known).any())
                     for s in split_names(store, splits))
    return ExportSchema(
        classes=list(store.classes),
        teacher=teacher_prefix(teacher_name or default_teacher_name(store.manifest)),
        view_names=store.view_spec.names(),
        rule=rule,
        embedding_dim=int(store.embedding_dim or 0),
        has_labels=has_labels,
        options=options,
        rule_score=rule_score,
    )


def _schema_args(schema: ExportSchema) -> Dict[str, Any]:
    return {"classes": list(schema.classes), "teacher": schema.teacher, "view_names": list(schema.view_names),
            "rule": schema.rule, "embedding_dim": schema.embedding_dim, "has_labels": schema.has_labels,
            "options": schema.options.to_dict(), "rule_score": schema.rule_score}


def _image_value(source: Any, ref: str) -> Any:
    """The ``Image()`` value of ``ref``: a file's own bytes (no re-encoding; root confinement checked by
    :meth:`ImageSource.resolve`), or the decoded image of another reference (``hf://``, webdataset members)."""
    from vlpl.data.images import HF_PREFIX, _scheme_of

    if not ref.startswith(HF_PREFIX) and _scheme_of(ref) is None:
        return {"bytes": source.resolve(ref).read_bytes(), "path": ref}
    return source.open(ref)


def _fixed(values: np.ndarray, width: int, pa_type: Any, valid: Optional[np.ndarray] = None) -> Any:
    """A fixed-size list array of ``width`` from an (n, width) numpy array (nulls where ``valid`` is False)."""
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=pa_type)
    mask = None if valid is None or valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(flat, width, mask=mask)


def _class_list(mask: np.ndarray) -> Any:
    """``list<int64>`` of the True columns of each row of an (n, C) bool mask (ClassLabel ids, ascending)."""
    import pyarrow as pa

    rows, cols = np.nonzero(mask)
    offsets = np.zeros(len(mask) + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=len(mask)), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(cols.astype(np.int64)))


def _batch_table(b: Any, schema: ExportSchema, features: Any, spec: Any, source: Any) -> Any:
    """One batch of rows as an Arrow table of ``features``' schema, built column-wise from the batch's arrays."""
    import pyarrow as pa

    n, c = b.observed.shape
    glob = b.scores[:, 0, 0]  # (n, C) unflipped global view
    glob16 = glob.astype(np.float16)
    cols: Dict[str, Any] = {}
    if source is not None:
        encode = features["image"].encode_example
        cols["image"] = pa.array([encode(_image_value(source, ref)) for ref in b.images],
                                 type=features["image"].pa_type)
    else:
        cols["image"] = pa.array(b.images, pa.string())
    cols["sample_id"] = pa.array(b.sample_ids, pa.string())
    cols["observed"] = _fixed(b.observed.astype(np.int8), c, pa.int8())
    cols["pseudo_positives"] = _class_list(b.pseudo == 1)
    cols["pseudo_negatives"] = _class_list(b.pseudo == -1)
    cols[schema.score_column] = _fixed(glob16, c, pa.float16())
    if schema.rule_score_column:
        cols[schema.rule_score_column] = _fixed(b.aggregate.astype(np.float16), c, pa.float16())
    if schema.views_column:
        views = spec.flatten(b.scores).astype(np.float16)  # (n, V, C)
        v = views.shape[1]
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * v * c + 1, c, dtype=np.int32)),
                                         pa.array(views.reshape(-1), pa.float16()))
        outer = pa.ListArray.from_arrays(pa.array(np.arange(0, n * v + 1, v, dtype=np.int32)), inner)
        ext = features.arrow_schema.field(schema.views_column).type
        cols[schema.views_column] = pa.ExtensionArray.from_storage(ext, outer.cast(ext.storage_type))
    if schema.options.embeddings:
        cols["image_embedding"] = _fixed(b.embeddings.astype(np.float16), schema.embedding_dim, pa.float16())
    if schema.has_labels:
        cols["labels"] = _fixed(b.labels.astype(np.int8), c, pa.int8(), valid=b.labels_known)
    k = min(int(schema.options.sparse_topk or 0), c)
    if k:
        top = np.argsort(-glob, axis=1, kind="stable")[:, :k]  # best first; ties: the lower class id first
        item = pa.StructArray.from_arrays(
            [pa.array(top.reshape(-1).astype(np.int64)),
             pa.array(np.take_along_axis(glob16, top, axis=1).reshape(-1), pa.float16())],
            names=["class", "score"])
        cols[schema.topk_column] = pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                                           item)
    arrow_schema = features.arrow_schema
    return pa.Table.from_arrays([cols[name].cast(arrow_schema.field(name).type) if not isinstance(
        cols[name].type, pa.ExtensionType) else cols[name] for name in arrow_schema.names], schema=arrow_schema)


def _write_split(job: Dict[str, Any], features: Any, path: Path) -> int:
    """Stream one store split into the Arrow file ``path`` with datasets' ``ArrowWriter`` (one table per batch);
    returns the rows written."""
    from datasets.arrow_writer import ArrowWriter

    from vlpl.progress import progress

    store = open_store(job["store"])
    schema = ExportSchema(**{**job["schema"], "options": ExportOptions(**job["schema"]["options"])})
    opts = schema.options
    source = None
    if opts.with_images:
        from vlpl.data.images import ImageSource

        source = ImageSource.from_store(store.dataset_info, job.get("data_root"))
    spec = store.view_spec
    total = len(store.split(job["split"], sidecars=False))  # ok rows: failed ones are left out
    with ArrowWriter(features=features, path=str(path)) as writer, \
            progress(total=total, desc=f"export {job['split']}", unit="img", enabled=job.get("progress", True)) as bar:
        for b in iter_batches(store, job["split"], schema.rule, job["params"], job["batch_size"],
                              embeddings=opts.embeddings, aggregate=schema.rule_score_column is not None):
            writer.write_table(_batch_table(b, schema, features, spec, source))
            bar.update(len(b.positions))
        n, _ = writer.finalize()
    return int(n)


@contextlib.contextmanager
def _quiet_datasets_bars() -> Iterator[None]:
    """datasets' own progress bars off while vlpl's reporter runs (restored after)."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def build_dataset_dict(store_source: Any, schema: ExportSchema, params: Mapping[str, Any], cache_dir: Path,
                       splits: Optional[Sequence[str]] = None, *, data_root: Optional[str] = None,
                       batch_size: int = 256, progress: bool = True) -> Any:
    """A ``datasets.DatasetDict`` (one split per store split) of ``schema``'s columns, streamed from the store into
    Arrow files in ``cache_dir`` (:func:`_write_split`) and memory-mapped from there.

    Args:
        store_source: a store path, a list of store paths (an ensemble), or an ensemble directory.
        schema: :func:`export_schema`'s result.
        params: the rule's full parameters (:func:`vlpl.export.rows.resolve_rule`).
        cache_dir: where the Arrow files are written (the returned datasets memory-map them: keep it until they
            are no longer used).
        splits: the store splits to export (default: all).
        data_root: where the images are now, if not the store's recorded root (``options.with_images``).
        batch_size: rows read from the store at a time.
    """
    import datasets

    src = [str(s) for s in store_source] if isinstance(store_source, (list, tuple)) else str(store_source)
    store = open_store(src)
    features = schema.features()
    out = {}
    with _quiet_datasets_bars():
        for split in split_names(store, splits):
            if not _SPLIT_RE.match(split):
                raise ValueError(f"store split name {split!r} is not a valid datasets split name (letters, digits, _)")
            job = {"store": src, "split": split, "schema": _schema_args(schema), "params": dict(params),
                   "batch_size": int(batch_size), "data_root": data_root, "progress": progress,
                   "manifest_sha256": store.manifest.get("manifest_sha256")}
            path = Path(cache_dir) / f"{split}.arrow"
            _write_split(job, features, path)
            out[split] = datasets.Dataset.from_file(str(path), info=datasets.DatasetInfo(features=features),
                                                    split=datasets.NamedSplit(split))
    return datasets.DatasetDict(out)


def _num_shards(ds: Any, max_shard_size: Any) -> int:
    from datasets.utils.py_utils import convert_file_size_to_int

    limit = convert_file_size_to_int(max_shard_size)
    return max(1, int(math.ceil(ds.data.nbytes / max(1, limit))))


def write_parquet_files(dd: Any, folder: Path, max_shard_size: Any = "500MB") -> Dict[str, List[str]]:
    """Each split as ``<split>-NNNNN-of-NNNNN.parquet`` files of at most about ``max_shard_size`` in ``folder``
    (the names ``push_to_hub`` gives; datasets infers the splits from them). Returns split -> file names."""
    folder.mkdir(parents=True, exist_ok=True)
    files: Dict[str, List[str]] = {}
    for split, ds in dd.items():
        n = _num_shards(ds, max_shard_size)
        names = []
        for i in range(n):
            name = f"{split}-{i:05d}-of-{n:05d}.parquet"
            ds.shard(num_shards=n, index=i, contiguous=True).to_parquet(str(folder / name))
            names.append(name)
        files[split] = names
    return files


def parquet_files(folder: Path) -> Dict[str, List[str]]:
    """split -> the ``<split>-*.parquet`` files of an export config folder, sorted."""
    out: Dict[str, List[str]] = {}
    for p in sorted(Path(folder).glob("*.parquet")):
        out.setdefault(p.name.split("-")[0], []).append(p.name)
    return out


# --------------------------------------------------------------------------------------------------
# quality (the card's numbers), measured on the exported columns
# --------------------------------------------------------------------------------------------------
def _fixed_matrix(col: Any, width: int, dtype: Any) -> np.ndarray:
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    vals = arr.flatten() if arr.null_count == 0 else arr.fill_null(pa.scalar([0] * width, arr.type)).flatten()
    return np.asarray(vals.to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, width)


def _class_lists(col: Any, width: int) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    out = np.zeros((len(arr), width), bool)
    rows = np.asarray(pc.list_parent_indices(arr).to_numpy(zero_copy_only=False), np.int64)
    cls = np.asarray(pc.list_flatten(arr).to_numpy(zero_copy_only=False), np.int64)
    out[rows, cls] = True
    return out


def measure_quality(dd: Any, schema: ExportSchema, labels_kind: str = "full", max_rows: int = 20000
                    ) -> Dict[str, Any]:
    """Per split with labels: the pseudo-labels' precision / recall / F1 (unobserved entries, ALGORITHMS.md
    §7g.8; :func:`vlpl.eval.quality.pseudo_label_quality`) and the teacher's mAP (Cole's, in percent) of the
    exported global score and rule aggregate, on the first ``max_rows`` labelled rows (fewer for very many
    classes: at most :data:`QUALITY_CELLS` rows x classes). Partial labels: the masked mAP only."""
    from vlpl.eval.metrics import masked_average_precision, mean_average_precision
    from vlpl.eval.quality import pseudo_label_quality

    if not schema.has_labels:
        return {}
    c = schema.num_classes
    cap = max(1, min(int(max_rows), QUALITY_CELLS // c))
    score_cols = [schema.score_column] + ([schema.rule_score_column] if schema.rule_score_column else [])
    cols = ["labels", "observed", "pseudo_positives", "pseudo_negatives", *score_cols]
    out: Dict[str, Any] = {}
    for split, ds in dd.items():
        parts: Dict[str, List[np.ndarray]] = {k: [] for k in ("y", "z", "p", *score_cols)}
        n = 0
        for tbl in ds.select_columns(cols).with_format("arrow").iter(batch_size=1024):
            known = np.asarray(tbl.column("labels").is_valid().to_numpy(zero_copy_only=False), bool)
            if not known.any():
                continue
            idx = np.flatnonzero(known)[: cap - n]
            t = tbl.take(idx)
            parts["y"].append(_fixed_matrix(t.column("labels"), c, np.int8))
            parts["z"].append(_fixed_matrix(t.column("observed"), c, np.int8))
            p = _class_lists(t.column("pseudo_positives"), c).astype(np.int8)
            p[_class_lists(t.column("pseudo_negatives"), c)] = -1
            parts["p"].append(p)
            for s in score_cols:
                parts[s].append(_fixed_matrix(t.column(s), c, np.float32))
            n += len(idx)
            if n >= cap:
                break
        if not n:
            continue
        y, z, p = (np.concatenate(parts[k]) for k in ("y", "z", "p"))
        entry: Dict[str, Any] = {"rows": n, "rows_in_split": len(ds), "teacher_map": {}}
        for s in score_cols:
            scores = np.concatenate(parts[s])
            if labels_kind == "partial":
                entry["teacher_map"][s] = {"masked_map": masked_average_precision(y, scores)["map"]}
            else:
                m = mean_average_precision(y, scores)
                entry["teacher_map"][s] = {"map": m["map"], "map_pos": m["map_pos"]}
        if labels_kind != "partial":
            q = pseudo_label_quality(p, y, z)
            entry["pseudo_labels"] = {
                "excluding_observed": {k: q["excluding_observed"][k] for k in ("precision", "recall", "f1",
                                                                                 "per_image")},
                "including_observed": {k: q["including_observed"][k] for k in ("precision", "recall", "f1",
                                                                                 "per_image")},
                "negatives": {k: q["negatives"][k] for k in ("count", "per_image", "precision")},
            }
        out[split] = entry
    return out


# --------------------------------------------------------------------------------------------------
# the export
# --------------------------------------------------------------------------------------------------
def _metadata(store: Any, schema: ExportSchema, params: Mapping[str, Any], dd: Any, source: Any,
              argv: Optional[Sequence[str]], config_name: str, license: str) -> Dict[str, Any]:
    from vlpl.provenance import provenance

    prov = provenance(argv)
    prov["command"] = redact(prov.get("command") or "")
    prov.pop("host", None)  # published with the dataset: the machine's name is nobody's business
    meta = build_metadata(schema, manifest=store.manifest, views=store.view_spec.to_dict(),
                          score_kind=store.score_kind.to_dict(), rule_params=params,
                          splits={k: len(v) for k, v in dd.items()}, store=redact(str(source)), provenance=prov)
    meta["config_name"] = config_name
    meta["license"] = license
    meta["failed_rows_left_out"] = int(sum((~np.asarray(store.split(s, include_failed=True, sidecars=False).ok)).sum()
                                           for s in dd))  # of the exported splits
    return meta


def _prompts(store: Any) -> Optional[Dict[str, Any]]:
    """The store's ``prompts.json`` (templates and class descriptions), when it has one."""
    import json

    root = getattr(store, "root", None)
    path = Path(root) / "prompts.json" if root else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); the card lists the manifest's templates only", path, e)
        return None


_BUILD_PREFIX = ".vlpl-export-build."


def _remove_stale_builds(out: Path) -> None:
    """Remove the Arrow build folders of exports into ``out`` that were killed (their process is gone)."""
    for d in out.glob(f"{_BUILD_PREFIX}*"):
        try:
            pid = int(d.name[len(_BUILD_PREFIX):].split(".")[0])
            os.kill(pid, 0)
            continue  # a live export (this machine): leave it
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        log.info("removed %s, left by an interrupted export", d)


def export_hf(cfg: Any, argv: Optional[Sequence[str]] = None) -> HFExport:
    """Export ``cfg.store`` (an :class:`vlpl.config.ExportConfig`) as a Hugging Face dataset into ``cfg.out``.

    Writes ``OUT/<config>/`` (Parquet shards + ``vlpl_export.json``) and ``OUT/README.md`` (the card, covering
    every config in ``OUT``); then, when asked, ``save_to_disk`` and ``push_to_hub`` (:mod:`vlpl.export.hub`).
    ``argv``: the command line recorded in the metadata (default ``sys.argv``; tokens redacted).
    """
    from vlpl.export.card import write_card
    from vlpl.store.atomic import atomic_dir, atomic_write_json

    name, params = resolve_rule(cfg.rule, cfg.rule_params, cfg.thresholds)
    options = ExportOptions(with_images=bool(cfg.with_images), all_views=bool(cfg.all_views),
                            embeddings=bool(cfg.embeddings), sparse_topk=int(cfg.sparse_topk) or None)
    store = open_store(cfg.store)
    schema = export_schema(store, name, params, options, cfg.teacher_name, cfg.splits)
    config_name = cfg.config_name or f"{schema.teacher}_{teacher_prefix(name)}"
    if config_name == "data" or not re.match(r"^[A-Za-z0-9][\w.-]*$", config_name):
        raise ValueError(f"config_name {config_name!r}: letters, digits, '_', '-', '.' (and not 'data')")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    build = Path(tempfile.mkdtemp(prefix=f"{_BUILD_PREFIX}{os.getpid()}.", dir=out))
    try:
        dd = build_dataset_dict(cfg.store, schema, params, build, cfg.splits, data_root=cfg.data_root,
                                batch_size=cfg.batch_size)
        meta = _metadata(store, schema, params, dd, cfg.store, argv, config_name, cfg.license)
        meta["quality"] = measure_quality(dd, schema, str(store.manifest.get("labels_kind") or "full"),
                                          cfg.quality_rows)
        prompts = _prompts(store)
        if prompts is not None:
            meta["teacher"]["prompts"] = prompts
        with atomic_dir(out / config_name) as tmp, _quiet_datasets_bars():
            files = write_parquet_files(dd, tmp, cfg.max_shard_size)
            atomic_write_json(tmp / METADATA_FILE, meta)
        card = write_card(out)
        log.info("exported %s (%s) -> %s", config_name, ", ".join(f"{k}: {len(v)} rows" for k, v in dd.items()), out)
        result = HFExport(out=out, config_name=config_name, metadata=meta, files=files)
        if cfg.save_to_disk:
            save = Path(cfg.save_to_disk)
            with atomic_dir(save) as tmp, _quiet_datasets_bars():
                dd.save_to_disk(str(tmp))
                atomic_write_json(tmp / METADATA_FILE, meta)
                shutil.copyfile(card, tmp / "README.md")
            result.saved_to = save
            log.info("saved with DatasetDict.save_to_disk -> %s", save)
        if cfg.push_to_hub:
            from vlpl.export.hub import push_export

            result.pushed_to = push_export(dd, out, config_name, cfg.push_to_hub, private=cfg.private,
                                           revision=cfg.revision, max_shard_size=cfg.max_shard_size)
        return result
    finally:
        shutil.rmtree(build, ignore_errors=True)
