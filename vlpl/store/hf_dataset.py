"""Train from a published dataset: a ``vlpl export`` output read through the score store's read API (issue 13, item 4).

:class:`DatasetStore` presents the :class:`~vlpl.store.store.ScoreStore` API (``classes``, ``view_spec``,
``score_kind``, ``splits()``, ``split(name)`` -> a :class:`DatasetSplitReader` with the
:class:`~vlpl.store.store.SplitReader` API: ``sample_ids``, ``images``, ``observed_at``, ``labels_at``,
``scores``, ``iter_scores``, ``probabilities``, ``image_embeddings``) over a Hugging Face dataset written by
``vlpl export`` (columns: :mod:`vlpl.export.schema`), so ``vlpl train`` (and anything else that reads a store
through :meth:`ScoreStore.open`) trains from it with the same pseudo-labels as from the store it was exported from.

Where the dataset can be (``store=`` of ``vlpl train``; :func:`is_dataset_source` recognises them):

* ``hf:<repo id>[@<revision>][#<config>]``: a dataset repo on the Hugging Face Hub (``datasets.load_dataset`` with
  the card's ``configs``; the config's ``vlpl_export.json`` fetched with ``huggingface_hub.hf_hub_download``);
  ``#<config>`` picks one when the repo has several (teacher / rule) configs;
* a local export folder (``vlpl export --out DIR``: ``DIR/README.md`` + ``DIR/<config>/``; ``DIR#<config>`` or
  ``DIR/<config>`` when there are several configs), with or without the ``hf:`` prefix;
* a ``DatasetDict.save_to_disk`` folder (``vlpl export --save-to-disk DIR``).

Memory: the rows stay in Arrow files that ``datasets`` memory-maps (its cache for Parquet inputs, the folder
itself for ``save_to_disk``); every read takes just the rows asked for (``scores``, ``observed_at``, ...), so
nothing of size ``N x C`` is held unless a caller asks for a whole matrix (``observed``, ``labels``).

Scores: with ``vlpl export --all-views`` the dataset holds every cached view (``<teacher>_views``, float16), read
back in the store's layout (:class:`~vlpl.store.views.ViewSpec` from the metadata): a dense store's scores are
float16 already, so they come back bit-identical and every rule gives the store's pseudo-labels. Without it the
dataset holds the unflipped global view only (``<teacher>_score``) and the reader presents a one-view layout
(grid 0, no flips); :meth:`DatasetStore.check_training` refuses a rule that reads more than that (DAMP's tiles,
the flipped views of a dynamic variant, ``view: mean|max``) with the rule, the views and ``--all-views`` named.
Stores in a compact score form (``embeddings``, ``topk``) are exported as float16 roundings of their dense
scores: training from such an export equals training from the store read through the same rounding.

Images: with ``vlpl export --with-images`` the ``image`` column holds the images (opened as ``hf://<split>/<i>``
rows of the loaded dataset, :class:`vlpl.data.images.ImageSource`); otherwise it holds paths relative to the
dataset root, and ``data_root=`` must say where the images are (:meth:`DatasetStore.image_source` refuses
without it, naming both fixes). A folder or repo without ``vlpl_export.json`` is refused as not made by vlpl.

Not in an export: the class text embeddings (heads that read them, e.g. ``sigrl`` with
``head.text_embeddings: store``, need the store or ``head.text_embeddings: student``) and the FAISS index
(``knn`` searches the exported image embeddings exactly, which needs ``--embeddings``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from vlpl.store.reader import SplitReaderBase, StoreBase
from vlpl.store.views import ScoreKind, ViewSpec

log = logging.getLogger(__name__)

__all__ = ["HF_STORE_PREFIX", "DatasetStore", "DatasetSplitReader", "DatasetSourceError", "is_dataset_source",
           "open_dataset", "parse_source", "views_needed"]

#: ``store=hf:<repo id or path>``: a dataset exported by ``vlpl export`` (local or on the Hub)
HF_STORE_PREFIX = "hf:"
_METADATA_FILE = "vlpl_export.json"  # vlpl.export.schema.METADATA_FILE (not imported: keeps this module light)


class DatasetSourceError(ValueError):
    """A dataset that cannot be trained from as asked; the message names the dataset, what is missing and the fix."""


# --------------------------------------------------------------------------------------------------
# where the dataset is
# --------------------------------------------------------------------------------------------------
def parse_source(source: Any) -> Tuple[str, Optional[str], Optional[str], bool]:
    """``(location, config, revision, prefixed)`` of a ``store=`` value: ``hf:`` stripped (``prefixed`` says
    whether it was there), ``#<config>`` and, for a hub id, ``@<revision>`` split off. A local path that exists
    as given is never split (its name may hold ``#`` or ``@``)."""
    s = str(source)
    prefixed = s.startswith(HF_STORE_PREFIX)
    if prefixed:
        s = s[len(HF_STORE_PREFIX):]
        if s.startswith("//"):  # hf://user/name: the same as hf:user/name
            s = s[2:]
    if os.path.exists(os.path.expanduser(s)):
        return s, None, None, prefixed
    config = revision = None
    if "#" in s:
        s, config = s.rsplit("#", 1)
        config = config or None
    if not os.path.exists(os.path.expanduser(s)) and "@" in s:
        s, revision = s.rsplit("@", 1)
        revision = revision or None
    return s, config, revision, prefixed


def _local_kind(p: Path) -> Optional[str]:
    """What a local folder is, as a dataset: ``disk`` (save_to_disk), ``export`` (an export folder of configs),
    ``config`` (one config folder), ``foreign`` (a Hugging Face dataset without vlpl's metadata), or None (not a
    dataset: e.g. a score store)."""
    if not p.is_dir() or (p / "manifest.json").is_file() or (p / "ensemble.json").is_file():
        return None
    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
        return "disk" if (p / _METADATA_FILE).is_file() else "foreign"
    if (p / _METADATA_FILE).is_file():
        return "config"
    if any(q.parent.name[:1] != "." for q in p.glob(f"*/{_METADATA_FILE}")):
        return "export"
    if any(p.glob("*.parquet")) or any(p.glob("*.arrow")) or \
            (not (p / "shards").is_dir() and any(p.glob("*/*.parquet"))):
        return "foreign"
    return None


def is_dataset_source(source: Any) -> bool:
    """Whether ``store=`` names a dataset rather than a score store: ``hf:...``, or a local folder that is a
    ``vlpl export`` output (or a Hugging Face dataset, refused later as not made by vlpl). A list of stores (an
    ensemble) is not."""
    if isinstance(source, (list, tuple)) or source is None:
        return False
    if isinstance(source, DatasetStore):
        return True
    if str(source).startswith(HF_STORE_PREFIX):
        return True
    location, _, _, _ = parse_source(source)
    return _local_kind(Path(os.path.expanduser(location))) is not None


def open_dataset(source: Any, config: Optional[str] = None, revision: Optional[str] = None,
                 cache_dir: Optional[str] = None, **ignored: Any) -> "DatasetStore":
    """A :class:`DatasetStore` over ``source`` (see the module docstring). ``config`` / ``revision`` override
    what ``source`` names; ``cache_dir``: where ``datasets`` keeps the Arrow files of Parquet inputs (default its
    own cache). Other keywords (a :class:`ScoreStore`'s ``sidecars``, ``cache_bytes``, ...) do not apply to a
    dataset and are ignored."""
    if ignored:
        log.debug("dataset store: ignoring score-store options %s", sorted(ignored))
    return DatasetStore(source, config=config, revision=revision, cache_dir=cache_dir)


def _load_metadata(path: Path, where: str) -> Dict[str, Any]:
    from vlpl.export.schema import ExportFormatError, read_export_metadata

    try:
        return read_export_metadata(path)
    except ExportFormatError as e:
        raise DatasetSourceError(f"{where}: {e}") from None


def _entry_not_found(e: BaseException) -> bool:
    """Whether a Hub download failed because the repo has no such file (not a network or auth failure)."""
    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # pragma: no cover - older huggingface_hub
        EntryNotFoundError = ()  # type: ignore[assignment,misc]  # noqa: N806
    return isinstance(e, EntryNotFoundError) or type(e).__name__ in ("EntryNotFoundError", "RemoteEntryNotFoundError")


def _not_vlpl(where: str, why: str) -> DatasetSourceError:
    return DatasetSourceError(
        f"{where}: not a dataset made by `vlpl export` ({why}; vlpl reads the classes, views, score kind and rule "
        f"from that file). Export a score store with `vlpl export STORE --out DIR`, or train from the store itself")


# --------------------------------------------------------------------------------------------------
# which views a rule reads
# --------------------------------------------------------------------------------------------------
def views_needed(rule: str, params: Mapping[str, Any], variant: str, spec: ViewSpec) -> Optional[str]:
    """What a rule reads beyond the **unflipped global view**, given the store's view layout ``spec`` and the
    resolved flip ``variant`` (:func:`vlpl.pseudolabel.params.flip_variant`); None when the global view is all it
    reads. A rule this function does not know (a plugin) reads every view."""
    parts: List[str] = []
    tiles = spec.n_views > 1
    tile_names = f"the {spec.n_views - 1} other views per variant ({', '.join(spec.names()[1:spec.n_views])})"
    if rule == "damp" and tiles:
        parts.append(f"{tile_names} (DAMP aggregates the grid tiles)")
    elif rule in ("threshold", "topk") and tiles and params.get("view", "global") != "global":
        parts.append(f"{tile_names} (view={params.get('view')!r} aggregates every view)")
    elif rule == "calibrated" and tiles:
        from vlpl.pseudolabel.calibrate import load_thresholds

        th = load_thresholds(str(params["thresholds"]))
        if getattr(th, "knn", None) or th.aggregate != "global":
            parts.append(f"{tile_names} (the thresholds file's {th.aggregate!r} aggregate)")
    elif rule == "knn" and (tiles or spec.flips):
        parts.append("every cached view of the image and of its neighbours (knn smooths the raw views)")
    elif rule not in ("damp", "vlpl", "threshold", "topk", "calibrated", "knn") and (tiles or spec.flips):
        parts.append(f"every cached view (rule {rule!r} is not one whose views vlpl knows; it may read any)")
    if spec.flips and variant != "unflipped" and not parts:
        parts.append(f"the flipped views (pseudo.variant={variant} takes the flipped variant of a view)")
    return "; ".join(parts) or None


# --------------------------------------------------------------------------------------------------
# reading columns
# --------------------------------------------------------------------------------------------------
def _flat_values(col: Any) -> Any:
    """The innermost values of a (fixed-size) list column, or of an ``Array2D`` extension column, as Arrow."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    while pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type) or pa.types.is_large_list(arr.type):
        arr = arr.flatten()
    return arr


def _matrix(col: Any, shape: Tuple[int, ...], dtype: Any, where: str) -> np.ndarray:
    """``(B, *shape)`` numpy array of a fixed-shape column (no null rows)."""
    vals = np.array(_flat_values(col).to_numpy(zero_copy_only=False), dtype=dtype)  # a writable copy
    n = len(col)
    want = n * int(np.prod(shape))
    if vals.size != want:
        raise DatasetSourceError(f"{where}: {vals.size} values for {n} rows of shape {shape} (expected {want}); "
                                 f"the dataset does not have the layout its {_METADATA_FILE} describes")
    return vals.reshape((n, *shape))


class _Column(Sequence[str]):
    """One string column of a split, read per item (or per slice) from the memory-mapped Arrow table;
    ``fmt`` turns the row position and the stored value into the item (e.g. an ``hf://`` image reference)."""

    def __init__(self, ds: Any, column: Optional[str], fmt: Any = None) -> None:
        self._ds, self._column, self._fmt = ds, column, fmt

    def __len__(self) -> int:
        return len(self._ds)

    def _item(self, i: int) -> str:
        if self._column is None:
            return self._fmt(i, None)
        v = self._ds.data.table.column(self._column)[i].as_py()  # no indices mapping: loaded, never selected
        return self._fmt(i, v) if self._fmt is not None else str(v)

    def __getitem__(self, i: Any) -> Any:  # type: ignore[override]
        n = len(self)
        if isinstance(i, slice):
            return [self._item(k) for k in range(*i.indices(n))]
        if isinstance(i, (list, tuple, np.ndarray)):
            return [self[int(k)] for k in np.asarray(i).reshape(-1)]
        k = int(i)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"position {i} out of range for {n} rows")
        return self._item(k)

    def __iter__(self) -> Iterator[str]:
        n, step = len(self), 4096
        for start in range(0, n, step):
            if self._column is None:
                yield from (self._fmt(k, None) for k in range(start, min(n, start + step)))
                continue
            vals = self._ds.data.table.column(self._column).slice(start, step).to_pylist()
            for k, v in enumerate(vals, start):
                yield self._fmt(k, v) if self._fmt is not None else str(v)

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, (list, tuple, Sequence)) and not isinstance(other, str):
            return len(self) == len(other) and all(x == y for x, y in zip(self, other))
        return NotImplemented


class DatasetSplitReader(SplitReaderBase):
    """One split of an exported dataset with the :class:`~vlpl.store.store.SplitReader` API. Every row of an
    export is ok (failed rows were left out), so ``include_failed`` changes nothing and ``ok`` is all True."""

    def __init__(self, store: "DatasetStore", name: str, ds: Any, include_failed: bool = False) -> None:
        self.store = store
        self.name = name
        self._ds = ds
        self._table = ds.data.table  # pyarrow.Table over the memory-mapped Arrow file(s)
        n = len(ds)
        self.rows = np.arange(n, dtype=np.int64)
        self.ok = np.ones(n, bool)
        self.include_failed = include_failed
        self.sample_ids: Sequence[str] = _Column(ds, "sample_id")
        if store.with_images:
            self.images: Sequence[str] = _Column(ds, None, lambda i, _v: f"hf://{name}/{i}")
        else:
            self.images = _Column(ds, "image")
        if store.has_labels:
            col = ds.data.table.column("labels")
            self.labels_known = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), bool)
        else:
            self.labels_known = np.zeros(n, bool)
        self._observed: Optional[np.ndarray] = None
        self._labels: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.rows)

    def _take(self, columns: Sequence[str], pos: np.ndarray) -> Any:
        """The Arrow table of ``columns`` at positions ``pos`` (in that order): only those rows are read from the
        memory-mapped table (the split has no indices mapping: :meth:`DatasetStore._setup` flattens one)."""
        return self._table.select(list(columns)).take(pos)

    def _where(self, column: str) -> str:
        return f"{self.store.source} split {self.name!r} column {column!r}"

    def observed_at(self, idx: Any) -> np.ndarray:
        """``(B, C)`` int8 observed labels of the rows at positions ``idx``."""
        pos = self._positions(idx)
        return _matrix(self._take(["observed"], pos).column("observed"), (self.store.num_classes,), np.int8,
                       self._where("observed"))

    def labels_at(self, idx: Any) -> np.ndarray:
        """``(B, C)`` int8 labels of the rows at positions ``idx`` (all must have known labels)."""
        pos = self._positions(idx)
        if not self.labels_known[pos].all():
            bad = pos[~self.labels_known[pos]][:3]
            raise ValueError(f"split {self.name!r}: rows {[self.sample_ids[int(i)] for i in bad]} have no full labels")
        return _matrix(self._take(["labels"], pos).column("labels"), (self.store.num_classes,), np.int8,
                       self._where("labels"))

    @property
    def observed(self) -> np.ndarray:
        """``(N, C)`` int8 observed labels, read on first use (per-batch code uses :meth:`observed_at`)."""
        if self._observed is None:
            self._observed = np.array(self.observed_at(self.rows))
        return self._observed

    @property
    def labels(self) -> Optional[np.ndarray]:
        """``(N, C)`` int8 labels when every row has them, else None."""
        if not len(self.rows) or not self.labels_known.all():
            return None
        if self._labels is None:
            self._labels = np.array(self.labels_at(self.rows))
        return self._labels

    def scores(self, idx: Any, device: Any = None) -> Any:
        """``(B, n_variants, n_views, C)`` float32 raw scores of the rows at positions ``idx`` in
        :attr:`view_spec`'s layout (every cached view with ``--all-views``, else the global view alone);
        ``device``: a torch tensor there instead of a numpy array."""
        pos = self._positions(idx)
        st = self.store
        col = st.views_column or st.score_column
        shape = (st.view_spec.num_views, st.num_classes)
        flat = _matrix(self._take([col], pos).column(col), shape, np.float32, self._where(col))
        out = st.view_spec.split_variants(flat)
        if device is None:
            return out
        import torch

        return torch.from_numpy(np.ascontiguousarray(out)).to(device)

    def image_embeddings(self, idx: Any) -> np.ndarray:
        """``(B, D)`` float32 teacher image embeddings (exported with ``--embeddings``)."""
        if not self.store.has_embeddings:
            raise DatasetSourceError(f"{self.store.source}: the dataset has no image embeddings (exported without "
                                     f"--embeddings); re-export with `vlpl export STORE --embeddings`, or train from "
                                     f"the store")
        pos = self._positions(idx)
        return _matrix(self._take(["image_embedding"], pos).column("image_embedding"), (self.store.embedding_dim,),
                       np.float32, self._where("image_embedding"))


class DatasetStore(StoreBase):
    """A ``vlpl export`` dataset read as a score store (see the module docstring).

    Args:
        source: ``hf:<repo id>[@rev][#config]``, a local export folder (``[#config]``), a config folder or a
            ``save_to_disk`` folder (optionally prefixed ``hf:``).
        config: the export config to read (overrides ``#config``); default: the only one.
        revision: a Hub revision (overrides ``@rev``).
        cache_dir: ``datasets``' cache for the Arrow files of Parquet inputs (default: its own).
    """

    is_dataset = True

    def __init__(self, source: Any, config: Optional[str] = None, revision: Optional[str] = None,
                 cache_dir: Optional[str] = None) -> None:
        self.source = str(source)
        location, cfg_name, rev, _prefixed = parse_source(source)
        config = config or cfg_name
        revision = revision or rev
        local = Path(os.path.expanduser(location))
        self.local_dir: Optional[Path] = local if local.exists() else None
        self._cache_dir = cache_dir
        if self.local_dir is not None:
            self.meta, self._dd, self.config_name = self._open_local(local, config)
        else:
            self.meta, self._dd, self.config_name = self._open_hub(location, config, revision)
        self.location = location
        self.revision = revision
        self._setup()

    # -- opening ------------------------------------------------------------------------------------
    def _load(self, *args: Any, **kwargs: Any) -> Any:
        import datasets

        if self._cache_dir is not None:
            kwargs["cache_dir"] = str(self._cache_dir)
        return datasets.load_dataset(*args, **kwargs)

    def _open_local(self, p: Path, config: Optional[str]) -> Tuple[Dict[str, Any], Any, str]:
        import datasets

        kind = _local_kind(p)
        if kind is None and ((p / "manifest.json").is_file() or (p / "ensemble.json").is_file()):
            raise DatasetSourceError(f"hf:{p}: a score store, not an exported dataset; give it without the hf: "
                                     f"prefix (store={p})")
        if kind is None:
            raise _not_vlpl(str(p), f"no {_METADATA_FILE} here or in a config folder")
        if kind == "foreign":
            raise _not_vlpl(str(p), f"it is a dataset, but has no {_METADATA_FILE}")
        if kind == "disk":
            meta = _load_metadata(p / _METADATA_FILE, str(p))
            if config and config != meta.get("config_name"):
                raise DatasetSourceError(f"{p}: a save_to_disk folder of config {meta.get('config_name')!r}, not "
                                         f"{config!r}")
            dd = datasets.load_from_disk(str(p))
            return meta, dd, str(meta.get("config_name") or p.name)
        if kind == "config":
            meta = _load_metadata(p / _METADATA_FILE, str(p))
            return meta, self._load_parquet(p, meta), str(meta.get("config_name") or p.name)
        from vlpl.export.schema import ExportFormatError, find_export_metadata

        try:
            mpath = find_export_metadata(p, config)
        except ExportFormatError as e:
            raise DatasetSourceError(f"{p}: {e} (store=hf:{p}#CONFIG)") from None
        meta = _load_metadata(mpath, str(p))
        return meta, self._load_parquet(mpath.parent, meta), mpath.parent.name

    def _load_parquet(self, folder: Path, meta: Mapping[str, Any]) -> Any:
        """The splits of a local config folder, ``load_dataset("parquet")`` on each split's resolved files.

        Not ``load_dataset(DIR, config)``: datasets 5 caches a local folder's card configs by their relative
        patterns, so two export folders of the same name (or a folder exported again) would share one stale
        cache; explicit absolute files are hashed with their modification times."""
        files: Dict[str, List[str]] = {}
        for split in meta.get("splits") or {}:
            found = sorted(str(f.resolve()) for f in folder.glob(f"{split}-*.parquet"))
            if not found:
                raise DatasetSourceError(f"{folder}: no {split}-*.parquet file, though {_METADATA_FILE} lists split "
                                         f"{split!r}; the export is incomplete")
            files[split] = found
        return self._load("parquet", data_files=files)  # named files: "val" stays "val"

    def _open_hub(self, repo_id: str, config: Optional[str], revision: Optional[str]) -> Tuple[Dict[str, Any], Any, str]:
        import datasets

        where = f"hf:{repo_id}" + (f"@{revision}" if revision else "")
        if repo_id.startswith(("/", ".", "~")) or repo_id.count("/") > 1:
            raise DatasetSourceError(f"{where}: no such folder (a Hub dataset id is NAME or USER/NAME)")
        if config is None:
            try:
                names = list(datasets.get_dataset_config_names(repo_id, revision=revision))
            except Exception as e:  # noqa: BLE001 - name the dataset and what failed
                raise DatasetSourceError(f"{where}: cannot list the dataset's configs ({type(e).__name__}: {e}); "
                                         f"is it a local path that does not exist, or a Hub repo you cannot reach?") \
                    from None
            names = [n for n in names if n != "default"] or names
            if len(names) != 1:
                raise DatasetSourceError(f"{where} has configs {names}; name one: store=hf:{repo_id}#CONFIG")
            config = names[0]
        try:
            from huggingface_hub import hf_hub_download

            mpath = hf_hub_download(repo_id=repo_id, filename=f"{config}/{_METADATA_FILE}", repo_type="dataset",
                                    revision=revision)
        except Exception as e:  # noqa: BLE001
            if _entry_not_found(e):
                raise _not_vlpl(where, f"config {config!r} has no {config}/{_METADATA_FILE}") from None
            raise DatasetSourceError(f"{where}: cannot fetch {config}/{_METADATA_FILE} "
                                     f"({type(e).__name__}: {e})") from None
        meta = _load_metadata(Path(mpath), where)
        dd = self._load(repo_id, config, revision=revision)
        return meta, dd, config

    def _setup(self) -> None:
        from vlpl.export.schema import ExportSchema

        meta = self.meta
        where = f"{self.source} ({_METADATA_FILE})"
        try:
            self.schema = ExportSchema.from_metadata(meta)
        except ValueError as e:
            raise DatasetSourceError(f"{where}: {e}") from None
        self.classes: List[str] = list(self.schema.classes)
        try:
            #: the exporting store's view layout; :attr:`view_spec` is what this dataset presents
            self.store_view_spec = ViewSpec.from_manifest({"views": meta["views"]})
            self.score_kind: ScoreKind = ScoreKind.from_manifest(meta.get("score_kind") or {})
        except (KeyError, ValueError) as e:
            raise DatasetSourceError(f"{where}: {e}") from None
        opts = self.schema.options
        self.with_images = bool(opts.with_images)
        self.all_views = bool(opts.all_views)
        self.has_embeddings = bool(opts.embeddings)
        self.has_labels = bool(self.schema.has_labels)
        self.score_column = self.schema.score_column
        self.views_column = self.schema.views_column
        spec = self.store_view_spec
        self.view_spec: ViewSpec = spec if self.all_views else ViewSpec(
            grid=0, flips=False, image_size=spec.image_size, resize_mode=spec.resize_mode,
            interpolation=spec.interpolation)
        if self.all_views and len(self.schema.view_names) != spec.num_views:
            raise DatasetSourceError(f"{where}: {len(self.schema.view_names)} view names for a layout of "
                                     f"{spec.num_views} views")
        store_meta = meta.get("store") or {}
        self.labels_kind: str = str(store_meta.get("labels_kind") or "full")
        want = [c for c in self.schema.columns]
        for split, ds in self._dd.items():
            missing = [c for c in want if c not in ds.column_names]
            if missing:
                raise DatasetSourceError(f"{self.source} split {split!r}: column(s) {missing} missing, which "
                                         f"{_METADATA_FILE} lists; the dataset was changed after `vlpl export`")
            if getattr(ds, "_indices", None) is not None:
                self._dd[split] = ds.flatten_indices()
        self.manifest = self._manifest()
        self.root = self.local_dir if self.local_dir is not None else Path(self.location)
        log.info("dataset %s (config %s): %s; %s", self.source, self.config_name,
                 ", ".join(f"{s} {len(d)}" for s, d in self._dd.items()),
                 "every view" if self.all_views else "global view only")

    def _manifest(self) -> Dict[str, Any]:
        """A manifest-shaped description (nothing is written): the exporting store's identity as the metadata
        records it, this dataset's view layout and score kind, and per split the loaded data's fingerprint, so a
        training run's ``store.json`` changes when the data does."""
        from vlpl.store.store import MANIFEST_CHECKSUM_KEY, manifest_checksum, sha256_lines

        meta = self.meta
        teacher = meta.get("teacher") or {}
        store_meta = meta.get("store") or {}
        out: Dict[str, Any] = {
            "schema_version": None,
            "model": teacher.get("model"),
            "templates": teacher.get("templates"),
            "templates_sha256": teacher.get("templates_sha256"),
            "classes": list(self.classes),
            "classes_sha256": sha256_lines(self.classes),
            "views": self.view_spec.to_dict(),
            "samples_sha256": None,
            "shard_size": None,
            **self.score_kind.to_dict(),
            "score_format": "dataset",
            "score_form": None,
            "decode": None,
            "dataset": dict(store_meta.get("dataset") or {}),
            "labels_kind": self.labels_kind,
            "observed": store_meta.get("observed"),
            "embedding_dim": int(meta.get("embedding_dim") or 0) if self.has_embeddings else 0,
            "num_rows": int(sum(len(d) for d in self._dd.values())),
            "complete": True,
            "shards": [{"file": f"{self.config_name}/{s}", "rows": len(d), "sha256": getattr(d, "_fingerprint", None)}
                       for s, d in self._dd.items()],
            "export": {"source": self.source, "config": self.config_name, "revision": self.revision,
                       "options": self.schema.options.to_dict(), "rule": meta.get("rule"),
                       "store_manifest_sha256": store_meta.get("manifest_sha256"),
                       "metadata_sha256": hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
                       .hexdigest()},
        }
        out[MANIFEST_CHECKSUM_KEY] = manifest_checksum(out)
        return out

    # -- the store API ------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self.manifest["num_rows"])

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def score_format(self) -> str:
        return "dataset"

    @property
    def label_classes(self) -> List[str]:
        return list(self.classes)

    @property
    def dataset_info(self) -> Dict[str, Any]:
        """The exporting store's ``dataset`` entry (name, format, and the root the image paths were relative to
        on the machine that exported)."""
        return dict(self.manifest["dataset"])

    @property
    def cache_dir(self) -> Optional[Path]:
        return None  # nothing is written beside a dataset (knn's neighbour lists stay in memory)

    def text_embeddings(self) -> Optional[np.ndarray]:
        """None: an export carries no class text embeddings (a head that needs them says so)."""
        return None

    def splits(self) -> Dict[str, int]:
        return {s: len(d) for s, d in self._dd.items()}

    def split_counts(self) -> Dict[str, Dict[str, int]]:
        """Rows per split; an export holds only rows that were ok (``failed_rows_left_out`` in the metadata)."""
        return {s: {"total": len(d), "failed": 0} for s, d in self._dd.items()}

    def split(self, name: str, include_failed: bool = False, sidecars: Optional[bool] = None) -> DatasetSplitReader:
        if name not in self._dd:
            raise KeyError(f"{self.source}: no split {name!r} (splits: {', '.join(self._dd)})")
        return DatasetSplitReader(self, name, self._dd[name], include_failed)

    def failures(self, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        return []

    def prepare_sidecars(self, embeddings: bool = False) -> Optional[Path]:
        return None

    # -- training from it ---------------------------------------------------------------------------
    def image_source(self, data_root: Optional[str] = None, cfg: Any = None) -> Any:
        """The :class:`~vlpl.data.images.ImageSource` of the split readers' ``images``: the dataset's own image
        column (``--with-images``), or files under ``data_root``.

        Raises:
            DatasetSourceError: the dataset holds image paths and no ``data_root`` was given (both fixes named).
            FileNotFoundError: ``data_root`` does not exist.
        """
        from vlpl.data.images import ImageConfig, ImageSource

        cfg = cfg or ImageConfig()
        if self.with_images:
            root = Path(data_root) if data_root else (self.local_dir or Path.cwd())
            return ImageSource(root, cfg, hf=dict(self._dd), hf_image_column="image", hf_path=self.source)
        if not data_root:
            recorded = self.dataset_info.get("root")
            raise DatasetSourceError(
                f"{self.source}: the dataset holds image paths, not images (it was exported without --with-images); "
                f"give data_root=DIR, the folder the paths of column 'image' are relative to"
                f"{f' (it was {recorded} where it was exported)' if recorded else ''}, or re-export it with the "
                f"images: `vlpl export STORE --with-images`")
        root = Path(os.path.expanduser(str(data_root)))
        if not root.is_dir():
            raise FileNotFoundError(f"data_root {root} (the images of dataset {self.source}) does not exist")
        return ImageSource(root, cfg)

    def check_training(self, cfg: Any) -> None:
        """Refuse a training config this dataset cannot serve exactly, before anything is built: a rule that
        reads views the export left out (names the rule, the views and ``vlpl export --all-views``), or image
        embeddings it does not have (``loss.reconstruction``, rule ``knn``: ``--embeddings``)."""
        from vlpl.pseudolabel.params import flip_variant

        pseudo = cfg.pseudo
        if pseudo.rule is not None:
            variant = flip_variant(pseudo.variant, pseudo.dynamic)
            if not self.all_views:
                need = views_needed(pseudo.rule, pseudo.params or {}, variant, self.store_view_spec)
                if need:
                    fix = ""
                    if "flipped views" in need:
                        fix = " (or train on the unflipped views: pseudo.variant=unflipped)"
                    raise DatasetSourceError(
                        f"{self.source}: rule {pseudo.rule!r} reads {need}, but the dataset was exported without "
                        f"them (it holds the unflipped global view only, column {self.score_column!r}); re-export "
                        f"with every view: `vlpl export STORE --all-views`{fix}")
            if pseudo.rule == "knn" and not self.has_embeddings:
                raise DatasetSourceError(f"{self.source}: rule 'knn' finds neighbours by the teacher's image "
                                         f"embeddings, which the dataset does not hold; re-export with "
                                         f"`vlpl export STORE --all-views --embeddings`")
        head = getattr(getattr(cfg, "student", None), "head", None)
        if head is not None and getattr(head, "text_embeddings", "store") == "store":
            self._check_head(str(head.name), dict(head.params or {}))
        if getattr(cfg.loss, "reconstruction", 0) and not self.has_embeddings:
            raise DatasetSourceError(f"{self.source}: loss.reconstruction reads the teacher's image embeddings, which "
                                     f"the dataset does not hold; re-export with `vlpl export STORE --embeddings`")

    def _check_head(self, name: str, params: Dict[str, Any]) -> None:
        """Refuse a head that reads the class text embeddings (an export has none), found by building it once on a
        tiny input size with a class context that answers its request with this refusal (any other problem is left
        to the real build, which reports it)."""
        import vlpl.train.model  # noqa: F401 - registers the built-in heads
        from vlpl.registry import HEADS
        from vlpl.train.model import ClassContext

        source = self.source

        class _NoEmbeddings(ClassContext):
            def require_embeddings(self, who: str) -> np.ndarray:
                raise DatasetSourceError(
                    f"{source}: {who} reads the class text embeddings, which an exported dataset does not carry; "
                    f"train it from the score store, or use the student's own (student.head.text_embeddings="
                    f"student, with an open_clip student), or the linear head")

        try:
            HEADS.create(name, in_features=8, context=_NoEmbeddings(list(self.classes), None), **params)
        except DatasetSourceError:
            raise
        except Exception as e:  # noqa: BLE001 - not ours to report here
            log.debug("head %r probe: %s: %s", name, type(e).__name__, e)
