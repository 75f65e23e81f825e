"""Streaming Hugging Face datasets as a ``vlpl pseudolabel`` input (``data.format: hf`` + ``data.hf_streaming: true``).

The dataset is opened with ``datasets.load_dataset(data.hf_path, streaming=True)`` (a hub id, or a local folder
of Parquet / JSON / ... files: ``datasets`` no longer runs loading scripts), so nothing is downloaded or
converted up front. ``data.hf_splits``, ``data.hf_image_column`` and ``data.hf_label_column`` mean what they mean
for the non-streaming ``hf`` format (:func:`vlpl.data.readers.read_hf`), and the labels are read the same way.

**Row order.** A stream has no random access, so its rows are given an order once and for all: the order of its
*source files* (the ``IterableDataset``'s shards, ``ds.shard(num_shards=ds.n_shards, index=j)``, ``j = 0 ..
n_shards-1``, one data file each for file-based datasets), and within a file the order the file is read in. Row
``k`` of split ``S`` is ``hfs://S/k`` (sample id ``S/k``). One listing pass over the label column (every process
makes the same one) gives each file's row count and the labels; the official splits, Cole's observed-label
simulation and the train/val carving then follow exactly as for the other formats, and the store's shards are
planned by row count (``shard_size`` rows a shard, :class:`vlpl.pseudolabel.stage.ShardPlan`).

**Processes and resume.** As for the folder input: process ``rank`` of ``world`` (``accelerate launch`` /
``torchrun``) scores the store shards ``i % world == rank``; a shard already written (its completion mark and
manifest entry) is skipped on resume, and ``samples_sha256`` (ids + observed labels) must match, so a stream that
changed since the store was started is refused instead of mixed. A process reads its rows through a per-file
*cursor* (:class:`StreamRows`): it opens only the source files that hold rows of its shards, reads them forward,
and skips (without decoding) the rows of other processes' shards; a jump backwards re-opens the file
(``.skip(r)``). The stage visits rows in store order (train rows ascending, then val, then test), so a split is
read about twice when a val split is carved from it (``data.val_fraction: 0`` reads it once). DataLoader workers
each keep their own cursors and take every ``num_workers``-th batch (the cursors read with
``IterableDataset.iter``, so ``datasets``' own per-worker file sharding never applies).

**Reopening.** The store records the location and the per-file row counts (``manifest.dataset.hf.stream``);
:meth:`vlpl.data.images.ImageSource.open` reopens ``hfs://S/k`` through the same cursors (:data:`SCHEMES`
``["hfs"]``). That is fast in order and slow at random: training many epochs from a large streamed source is
better served by ``vlpl export --with-images`` or a local copy (``data.hf_streaming: false``).
"""
from __future__ import annotations

import bisect
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from vlpl.config import DataConfig
from vlpl.data.images import SCHEMES, ImageLoadError, ImageSource, printable
from vlpl.data.readers import (
    OFFICIAL_SPLITS,
    DatasetFormatError,
    OfficialSplits,
    RawItem,
    _classes_path,
    _hf_labels,
    _merge_hf_class_names,
    check_hf_splits,
    hf_location,
    read_class_list,
)

logger = logging.getLogger(__name__)

HFS_PREFIX = "hfs://"
#: rows per batch of the listing pass
LIST_BATCH = 1000


def open_stream(location: str, columns: Optional[List[str]] = None) -> Any:
    """``datasets.load_dataset(location, streaming=True)``: an ``IterableDatasetDict``.

    ``columns``: read only these columns where the dataset's builder can (Parquet's ``columns``: the listing pass
    then reads no image bytes, 287 -> 61 ms on a 256-image coco256 Parquet file); other builders read every
    column (the caller selects).

    Raises:
        DatasetFormatError: it cannot be opened, or has no splits; the message names the location.
    """
    import datasets

    if columns:
        try:
            return _as_dict(datasets.load_dataset(location, streaming=True, columns=list(columns)), location)
        except (TypeError, ValueError) as e:  # a builder without a `columns` option
            logger.debug("%s: no column pushdown (%s): reading every column", location, e)
    try:
        ds = datasets.load_dataset(location, streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (missing files, no builder, ...)
        raise DatasetFormatError(f"cannot stream the Hugging Face dataset {location!r} (data.hf_path): "
                                 f"{type(e).__name__}: {e}") from None
    return _as_dict(ds, location)


def _as_dict(ds: Any, location: str) -> Any:
    import datasets

    if not isinstance(ds, (dict, datasets.IterableDatasetDict)):
        raise DatasetFormatError(f"{location}: a single dataset has no splits; data.hf_splits names splits")
    return ds


def raw_images(d: Any, column: str) -> Any:
    """The stream with its image column left encoded (``Image(decode=False)``: ``{"bytes", "path"}``)."""
    import datasets

    if d.features is not None and isinstance(d.features.get(column), datasets.Image):
        return d.cast_column(column, datasets.Image(decode=False))
    return d


def source_file(d: Any, j: int) -> Any:
    """Source file ``j`` of a stream: ``d.shard(num_shards=d.n_shards, index=j)`` (contiguous)."""
    return d.shard(num_shards=d.n_shards, index=j, contiguous=True)


@dataclass
class StreamingSplits(OfficialSplits):
    """What :func:`read_hf_streaming` returns: the official splits plus the stream's layout, which
    :func:`vlpl.data.readers.load_dataset` hands to the dataset's :class:`ImageSource` (:meth:`attach_source`).

    Attributes:
        stream: ``{"file_rows": {hf split: [rows of source file 0, 1, ...]}}`` (with ``data.max_samples``, the
            files up to the one holding the last row kept).
    """

    stream: Dict[str, Any] = field(default_factory=dict)

    def attach_source(self, ds: Any) -> None:
        ds.hf_path = self.hf_path
        ds._source = ImageSource(Path(ds.root), ds.image_config, hf_image_column=self.hf_image_column,
                                 hf_path=self.hf_path, hf_stream=self.stream)


def read_hf_streaming(cfg: DataConfig) -> StreamingSplits:
    """``data.format: hf`` with ``data.hf_streaming: true`` (see the module docstring): one listing pass over
    the label column of each mapped split, file by file."""
    location = hf_location(cfg)
    root = Path(cfg.root)
    check_hf_splits(cfg)
    streams = open_stream(location)
    parts: Dict[str, Tuple[str, Any]] = {}
    classes: Optional[List[str]] = None
    for ours in OFFICIAL_SPLITS:
        name = cfg.hf_splits.get(ours)
        if name is None:
            continue
        if name not in streams:
            raise DatasetFormatError(f"{cfg.hf_path}: no split {name!r} (data.hf_splits.{ours}); available: "
                                     f"{', '.join(streams.keys())}")
        d = streams[name]
        feats = d.features
        if feats is not None and cfg.hf_image_column not in feats:
            raise DatasetFormatError(f"{cfg.hf_path} split {name!r}: no column {cfg.hf_image_column!r} "
                                     f"(data.hf_image_column; columns: {', '.join(feats)})")
        classes = _merge_hf_class_names(classes, feats, cfg)
        parts[ours] = (name, d)
    if classes is None:
        classes = read_class_list(_classes_path(cfg, root))
    out: Dict[str, List[RawItem]] = {"train": [], "test": []}
    file_rows: Dict[str, List[int]] = {}
    listing: Optional[Any] = None
    for ours, (name, d) in parts.items():
        feats = d.features
        has_labels = feats is None or cfg.hf_label_column in feats
        where = f"{cfg.hf_path} split {name!r}"
        counts: List[int] = []
        values: List[Any] = []
        if has_labels and feats is not None:  # the label column alone, where the builder can
            listing = listing if listing is not None else open_stream(location, [cfg.hf_label_column])
            lst = listing[name]
            if lst.n_shards != d.n_shards:
                lst = d
        else:
            lst = d
        for j in range(d.n_shards):
            if cfg.max_samples is not None and sum(counts) >= cfg.max_samples:
                break  # data.max_samples: the first rows are enough; later files are never listed nor read
            part = source_file(lst, j)
            cols = [cfg.hf_label_column] if has_labels else [cfg.hf_image_column]
            n = 0
            try:
                for batch in part.select_columns(cols).iter(batch_size=LIST_BATCH):
                    col = batch[cols[0]]
                    n += len(col)
                    if has_labels:
                        values += list(col)
            except KeyError:
                if feats is not None:
                    raise
                has_labels, values = False, []  # features unknown and no label column after all
                n = sum(len(b[cfg.hf_image_column]) for b in part.select_columns([cfg.hf_image_column]).iter(
                    batch_size=LIST_BATCH))
            counts.append(n)
        file_rows[name] = counts
        total = sum(counts)
        if has_labels and values:
            labels: List[Optional[np.ndarray]] = list(_hf_labels(values, feats.get(cfg.hf_label_column)
                                                                 if feats is not None else None, classes, where))
        else:
            logger.warning("%s: no column %r; full labels unknown", where, cfg.hf_label_column)
            labels = [None] * total
        out[ours] = [RawItem(f"{name}/{k}", f"{HFS_PREFIX}{name}/{k}", labels[k]) for k in range(total)]
        logger.info("%s (streaming): %d rows in %d source files", where, total, len(counts))
    return StreamingSplits(root=root, classes=classes, train=out["train"], test=out["test"], hf=None,
                           hf_image_column=cfg.hf_image_column, hf_path=location,
                           default_name=Path(str(cfg.hf_path)).name or "hf",
                           stream={"file_rows": file_rows, "order": "source files (IterableDataset shards) in order, "
                                                                     "rows in file order"})


# --------------------------------------------------------------------------------------------------
# reading rows back: per-file cursors (SCHEMES["hfs"])
# --------------------------------------------------------------------------------------------------


#: rows a cursor reads at a time
CURSOR_BATCH = 32


def _cells(part: Any, column: str, start: int) -> Iterator[Any]:
    """The ``column`` cells of a source file from row ``start`` on. Read with ``IterableDataset.iter`` (batches):
    iterating the dataset itself inside a DataLoader worker would make ``datasets`` hand the worker only some of
    the files (its own worker sharding), which is not the row order this module defines."""
    for batch in (part.skip(start) if start else part).iter(batch_size=CURSOR_BATCH):
        yield from batch[column]


class _Cursor:
    """A forward iterator over the image cells of one source file of a split, at row ``pos`` of that file."""

    def __init__(self, part: Any, column: str, start: int) -> None:
        self.it: Iterator[Any] = _cells(part, column, start)
        self.pos = start


class StreamRows:
    """Row access to a streamed split by row number, through one forward cursor per source file.

    Args:
        location: the dataset (a local folder or hub id).
        image_column: its image column (read encoded).
        file_rows: hf split -> rows per source file, as recorded when the store was made.
    """

    def __init__(self, location: str, image_column: str, file_rows: Dict[str, List[int]]) -> None:
        self.location = location
        self.image_column = image_column
        self.file_rows = {s: [int(n) for n in v] for s, v in file_rows.items()}
        self.starts = {s: np.concatenate([[0], np.cumsum(v)]).astype(np.int64).tolist() for s, v in self.file_rows.items()}
        self._streams: Optional[Any] = None
        self._cursors: Dict[Tuple[str, int], _Cursor] = {}
        self._lock = threading.Lock()
        self.reopened = 0  # how many times a cursor was re-opened (a backwards jump or a first visit)

    def _split(self, split: str) -> Any:
        if self._streams is None:
            self._streams = open_stream(self.location, [self.image_column])
        if split not in self._streams:
            raise KeyError(f"no split {split!r} in the stream (available: {', '.join(self._streams)})")
        # (opened with the image column alone where the builder can: open_stream's `columns`)
        return raw_images(self._streams[split].select_columns([self.image_column]), self.image_column)

    def locate(self, split: str, k: int) -> Tuple[int, int]:
        """Row ``k`` of ``split`` -> (source file, row within the file)."""
        if split not in self.starts:
            raise KeyError(f"no split {split!r} recorded for the stream (recorded: {', '.join(self.starts)})")
        starts = self.starts[split]
        if not 0 <= k < starts[-1]:
            raise IndexError(f"row {k} out of range: split {split!r} has {starts[-1]} rows")
        j = bisect.bisect_right(starts, k) - 1
        return j, k - starts[j]

    def row(self, split: str, k: int) -> Any:
        """The encoded image cell of row ``k`` of ``split``."""
        j, r = self.locate(split, k)
        with self._lock:
            cur = self._cursors.get((split, j))
            if cur is None or cur.pos > r:
                d = self._split(split)
                if d.n_shards < len(self.file_rows[split]):
                    raise IndexError(f"the stream of split {split!r} now has {d.n_shards} source files; the store "
                                     f"was made from {len(self.file_rows[split])} or more")
                cur = self._cursors[(split, j)] = _Cursor(source_file(d, j), self.image_column, r)
                self.reopened += 1
            try:
                while cur.pos < r:
                    next(cur.it)
                    cur.pos += 1
                value = next(cur.it)
            except StopIteration:
                del self._cursors[(split, j)]
                raise IndexError(f"source file {j} of split {split!r} ended before its row {r}; it had "
                                 f"{self.file_rows[split][j]} rows when the store was made") from None
            cur.pos += 1
            return value


_ROWS: Dict[Tuple[str, str, str], StreamRows] = {}
_ROWS_PID = os.getpid()
_ROWS_LOCK = threading.Lock()


def stream_rows(source: ImageSource) -> StreamRows:
    """This process's :class:`StreamRows` of a streaming image source (a forked worker starts its own cursors)."""
    global _ROWS_PID
    key = (str(source.hf_path), source.hf_image_column, repr(sorted((source.hf_stream or {}).get("file_rows", {}).items())))
    with _ROWS_LOCK:
        if os.getpid() != _ROWS_PID:  # never share an open stream with the parent process
            _ROWS.clear()
            _ROWS_PID = os.getpid()  # (fsspec resets its own event-loop lock in a forked child: register_at_fork)
        rows = _ROWS.get(key)
        if rows is None:
            rows = _ROWS[key] = StreamRows(str(source.hf_path), source.hf_image_column,
                                           (source.hf_stream or {}).get("file_rows", {}))
        return rows


def open_row(source: ImageSource, rest: str) -> Tuple[Any, str]:
    """``SCHEMES["hfs"]``: the encoded image of ``hfs://<split>/<k>`` and its name for errors.

    Raises:
        ImageLoadError: no streaming dataset attached, the row is out of range or its cell holds no image.
    """
    ref = HFS_PREFIX + rest
    shown = f"{printable(ref)} ({printable(str(source.hf_path))})"
    if source.hf_stream is None or not source.hf_path:
        raise ImageLoadError(f"cannot open {printable(ref)}: no streaming Hugging Face dataset is attached to this "
                             f"image source (a store records it in manifest dataset.hf)", ref, "no dataset")
    split, _, index = rest.rpartition("/")
    try:
        value = stream_rows(source).row(split, int(index))
    except (KeyError, IndexError, ValueError) as e:
        raise ImageLoadError(f"cannot read {shown}: {e}", ref, "missing row") from None
    except DatasetFormatError as e:
        raise ImageLoadError(f"cannot read {shown}: {e}", ref, "no dataset") from None
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"], ref
        if value.get("path"):
            return value["path"], ref
        raise ImageLoadError(f"cannot read {shown}: the image cell has neither bytes nor a path", ref, "empty cell")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), ref
    raise ImageLoadError(f"cannot read {shown}: column {source.hf_image_column!r} holds {type(value).__name__}, "
                         f"not an image", ref, "not an image")


SCHEMES["hfs"] = open_row

__all__ = ["HFS_PREFIX", "StreamingSplits", "StreamRows", "open_stream", "read_hf_streaming", "stream_rows", "open_row",
           "source_file"]
