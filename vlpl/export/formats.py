"""The papers' file formats: ``vlpl export --format cole`` and ``--format laion``.

**Cole** (Cole et al. 2021's ``formatted_*.npy``, read by the SPML papers' released code and by
:func:`vlpl.data.readers.read_cole`; ALGORITHMS.md 2b "Files")::

    OUT/classes.txt                          one class name a line (the files carry no names)
    OUT/formatted_train_images.npy           (N,) image paths, relative to the dataset root
    OUT/formatted_train_labels.npy           (N, C) full labels in {0, 1}
    OUT/formatted_train_labels_obs.npy       (N, C) observed labels in {-1, 0, 1}
    OUT/formatted_train_labels_pseudo.npy    (N, C) the rule's pseudo-labels in {-1, 0, 1} (ours)
    OUT/formatted_val_*.npy                  the same for Cole's "val", which is the test set
    OUT/vlpl_export.json                     where it came from (store, rule, mapping of splits)

Cole's ``train`` holds the store's ``train`` and ``val`` splits (their code carves its own validation set out of
``train``), Cole's ``val`` the store's ``test`` split. Full labels are required on every exported row (the format
has no "unknown"); a store with partial annotations is refused. Arrays are written row batch by row batch into
``.npy`` memory maps, so memory holds one batch.

**LAION / clip-retrieval** (the layout ``clip-retrieval inference`` writes and its index/filter tools read)::

    OUT/img_emb/img_emb_0000.npy             (n, D) float16 image embeddings, L2-normalised, in row order
    OUT/metadata/metadata_0000.parquet       image_path, caption, sample_id, split, observed_positives,
                                             pseudo_positives (class names), row i <-> embedding row i
    OUT/vlpl_export.json

``caption`` is the image's positive class names (observed positives, then the other pseudo-positives) joined by
``", "``; ``pseudo_positives`` is the rule's +1 classes.
Files hold ``rows_per_file`` rows each (the last one fewer), numbered from 0 with at least 4 digits.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from vlpl.export.rows import iter_batches, open_store, resolve_rule, split_names
from vlpl.export.schema import EXPORT_SCHEMA_VERSION, METADATA_FILE

log = logging.getLogger(__name__)

__all__ = ["COLE_SPLITS", "export_cole", "export_laion"]

#: Cole's split name -> the store splits it holds, in order
COLE_SPLITS: Dict[str, Sequence[str]] = {"train": ("train", "val"), "val": ("test",)}


def _common_meta(store: Any, fmt: str, rule: str, params: Dict[str, Any], argv: Optional[Sequence[str]],
                 source: Any) -> Dict[str, Any]:
    from vlpl.export.hf import redact
    from vlpl.provenance import provenance

    prov = provenance(argv)
    prov["command"] = redact(prov.get("command") or "")
    prov.pop("host", None)  # the files are meant to be shared
    return {
        "schema_version": EXPORT_SCHEMA_VERSION,
        "format": fmt,
        "store": {"source": redact(str(source)), "manifest_sha256": store.manifest.get("manifest_sha256"),
                  "dataset": store.manifest.get("dataset"), "observed": store.manifest.get("observed"),
                  "labels_kind": store.manifest.get("labels_kind") or "full"},
        "teacher": {"model": store.manifest.get("model"), "templates_sha256": store.manifest.get("templates_sha256")},
        "classes": list(store.classes),
        "rule": {"name": rule, "params": params, "variant": "unflipped"},
        "provenance": prov,
    }


def _ok_count(store: Any, split: str) -> int:
    return len(store.split(split, sidecars=False))


def export_cole(cfg: Any, argv: Optional[Sequence[str]] = None) -> Path:
    """Write the Cole ``formatted_*.npy`` files of ``cfg.store`` (an :class:`vlpl.config.ExportConfig`) into
    ``cfg.out`` (see the module docstring); returns ``cfg.out``."""
    from numpy.lib.format import open_memmap

    from vlpl.store.atomic import atomic_path, atomic_write_json, atomic_write_text

    name, params = resolve_rule(cfg.rule, cfg.rule_params, cfg.thresholds)
    store = open_store(cfg.store)
    kind = store.manifest.get("labels_kind") or "full"
    if kind != "full":
        raise ValueError(f"{cfg.store}: labels_kind {kind!r}: Cole's formatted_*_labels.npy hold full labels in "
                         f"{{0, 1}}; export a store with full labels, or use --format hf (labels in {{-1, 0, 1}})")
    have = split_names(store)
    wanted = set(cfg.splits or have)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    c = store.num_classes
    mapping: Dict[str, List[str]] = {}
    counts: Dict[str, int] = {}
    for cole, ours in COLE_SPLITS.items():
        use = [s for s in ours if s in have and s in wanted]
        mapping[cole] = use
        n = sum(_ok_count(store, s) for s in use)
        counts[cole] = n
        paths: List[str] = []
        files = {k: out / f"formatted_{cole}_{k}.npy" for k in ("labels", "labels_obs", "labels_pseudo")}
        with atomic_path(files["labels"]) as t_lab, atomic_path(files["labels_obs"]) as t_obs, \
                atomic_path(files["labels_pseudo"]) as t_ps:
            arrays = {k: open_memmap(t, mode="w+", dtype=np.int8, shape=(n, c))
                      for k, t in (("labels", t_lab), ("labels_obs", t_obs), ("labels_pseudo", t_ps))}
            i = 0
            for split in use:
                for b in iter_batches(store, split, name, params, cfg.batch_size, aggregate=False):
                    if not b.labels_known.all():
                        bad = [b.sample_ids[j] for j in np.flatnonzero(~b.labels_known)[:3]]
                        raise ValueError(f"{cfg.store}: split {split!r} rows {bad} have no full labels; Cole's "
                                         f"formatted_*_labels.npy needs them for every row (use --format hf)")
                    k = len(b.positions)
                    arrays["labels"][i:i + k] = b.labels
                    arrays["labels_obs"][i:i + k] = b.observed
                    arrays["labels_pseudo"][i:i + k] = b.pseudo
                    paths.extend(b.images)
                    i += k
            for a in arrays.values():
                a.flush()
            del arrays
        with atomic_path(out / f"formatted_{cole}_images.npy") as tmp:
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
                np.save(f, np.asarray(paths, dtype=str), allow_pickle=False)
    atomic_write_text(out / "classes.txt", "".join(f"{x}\n" for x in store.classes))
    meta = _common_meta(store, "cole", name, params, argv, cfg.store)
    meta.update({"splits": {k: {"store_splits": v, "rows": counts[k]} for k, v in mapping.items()},
                 "files": {"images": "formatted_{split}_images.npy", "labels": "formatted_{split}_labels.npy",
                           "observed": "formatted_{split}_labels_obs.npy",
                           "pseudo_labels": "formatted_{split}_labels_pseudo.npy", "classes": "classes.txt"},
                 "image_root": (store.dataset_info or {}).get("root")})
    atomic_write_json(out / METADATA_FILE, meta)
    log.info("Cole format -> %s (train: %d rows from %s, val: %d rows from %s)", out, counts["train"],
             "+".join(mapping["train"]) or "-", counts["val"], "+".join(mapping["val"]) or "-")
    return out


def _names(mask: np.ndarray, classes: Sequence[str]) -> List[str]:
    return [classes[j] for j in np.flatnonzero(mask)]


def export_laion(cfg: Any, argv: Optional[Sequence[str]] = None, rows_per_file: Optional[int] = None) -> Path:
    """Write the clip-retrieval / LAION embedding layout of ``cfg.store`` into ``cfg.out`` (module docstring);
    returns ``cfg.out``. ``rows_per_file`` (default ``cfg.rows_per_file``): rows per ``img_emb`` /
    ``metadata`` file pair."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlpl.store.atomic import atomic_path, atomic_write_json

    name, params = resolve_rule(cfg.rule, cfg.rule_params, cfg.thresholds)
    store = open_store(cfg.store)
    if not store.embedding_dim:
        raise ValueError(f"{cfg.store}: the store has no image embeddings (embedding_dim 0): nothing to export")
    per_file = int(rows_per_file or getattr(cfg, "rows_per_file", 0) or 1_000_000)
    if per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {per_file}")
    splits = split_names(store, cfg.splits)
    total = sum(_ok_count(store, s) for s in splits)
    n_files = max(1, -(-total // per_file))
    width = max(4, len(str(n_files - 1)))
    out = Path(cfg.out)
    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    classes = list(store.classes)
    schema = pa.schema([("image_path", pa.string()), ("caption", pa.string()), ("sample_id", pa.string()),
                        ("split", pa.string()), ("observed_positives", pa.list_(pa.string())),
                        ("pseudo_positives", pa.list_(pa.string()))])
    buf: Dict[str, List[Any]] = {k: [] for k in (*schema.names, "emb")}
    written: List[Dict[str, Any]] = []

    def flush() -> None:
        k = len(written)
        stem = f"{k:0{width}d}"
        emb = np.concatenate(buf["emb"]) if buf["emb"] else np.zeros((0, store.embedding_dim), np.float16)
        with atomic_path(out / "img_emb" / f"img_emb_{stem}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, emb, allow_pickle=False)
        table = pa.table({n: pa.array(buf[n], type=schema.field(n).type) for n in schema.names}, schema=schema)
        with atomic_path(out / "metadata" / f"metadata_{stem}.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
        written.append({"img_emb": f"img_emb/img_emb_{stem}.npy", "metadata": f"metadata/metadata_{stem}.parquet",
                        "rows": int(len(emb))})
        for v in buf.values():
            v.clear()

    pending = 0
    for split in splits:
        for b in iter_batches(store, split, name, params, cfg.batch_size, embeddings=True, aggregate=False):
            e = b.embeddings.astype(np.float32)
            norm = np.linalg.norm(e, axis=1, keepdims=True)
            e = np.where(norm > 0, e / np.maximum(norm, 1e-12), 0.0).astype(np.float16)
            start = 0
            while start < len(e):
                take = min(per_file - pending, len(e) - start)
                sl = slice(start, start + take)
                for j in range(start, start + take):
                    obs = _names(b.observed[j] == 1, classes)
                    ps = _names(b.pseudo[j] == 1, classes)
                    buf["image_path"].append(b.images[j])
                    buf["caption"].append(", ".join(obs + [x for x in ps if x not in obs]))
                    buf["sample_id"].append(b.sample_ids[j])
                    buf["split"].append(split)
                    buf["observed_positives"].append(obs)
                    buf["pseudo_positives"].append(ps)
                buf["emb"].append(e[sl])
                pending += take
                start += take
                if pending == per_file:
                    flush()
                    pending = 0
    if pending or not written:
        flush()
    keep = {w[k] for w in written for k in ("img_emb", "metadata")}
    for old in [*out.glob("img_emb/img_emb_*.npy"), *out.glob("metadata/metadata_*.parquet")]:
        if f"{old.parent.name}/{old.name}" not in keep:  # a previous export's extra files
            old.unlink()
            log.info("removed %s (left by a previous export with more rows)", old)
    meta = _common_meta(store, "laion", name, params, argv, cfg.store)
    meta.update({"splits": splits, "rows": total, "embedding_dim": store.embedding_dim, "files": written,
                 "embedding": "the teacher's global-view image embedding, L2-normalised, float16",
                 "caption": "observed positives then pseudo-positives (class names), joined by ', '",
                 "image_root": (store.dataset_info or {}).get("root")})
    atomic_write_json(out / METADATA_FILE, meta)
    log.info("clip-retrieval layout -> %s (%d rows in %d file pair(s))", out, total, len(written))
    return out
