"""Dataset readers: from files on disk (or a Hugging Face dataset) to a :class:`LabelledDataset`.

:func:`load_dataset` dispatches on ``cfg.format`` through :data:`READERS`. Every format reader
returns an :class:`OfficialSplits`: per *official* split (``train`` and ``test``) the ordered list of
``(sample_id, image, full labels or None)``. The common code in :func:`build_dataset` then, exactly
as Cole et al. (ALGORITHMS.md 2b, Decision 8):

1. keeps the first ``cfg.max_samples`` rows of each official split (before everything else);
2. simulates the observed labels per official split, in file order (``cfg.observed``; see
   :mod:`vlpl.data.observed`), train and test each with their own RandomState;
3. carves the validation split out of the official train split with :func:`train_val_split`.

Formats (``cfg.format``):

* ``folder`` — ``labels.csv`` (``image,split,labels``, names joined by ``|``) or ``labels.jsonl``,
  plus ``classes.txt``: :func:`read_folder`. With columns ``positives,negatives`` instead of ``labels`` the
  file holds real partial annotations (everything not listed is unknown).
* ``openimages`` — OpenImages image-level CSVs (``ImageID,Source,LabelName,Confidence``) and the
  class-descriptions CSV: :func:`read_openimages` (partial annotations).
* ``vg200`` — VG-200 as the MLR-PL release lays it out: :func:`read_vg200`.
* ``coco`` — official instances JSON: :func:`read_coco`.
* ``voc`` — ``VOCdevkit/VOC2012/ImageSets/Main``: :func:`read_voc`.
* ``cole`` — Cole's ``formatted_*.npy``: :func:`read_cole`.
* ``hf`` — a Hugging Face dataset (``save_to_disk`` folder or hub id): :func:`read_hf`; with
  ``hf_streaming: true`` streamed (:mod:`vlpl.data.streaming`).
* ``webdataset`` — tar shards (``urls``): :mod:`vlpl.data.webdataset`.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

import numpy as np

from vlpl.config import ConfigError, DataConfig, resolve_path
from vlpl.data.observed import MODES, load_given_observed, no_observed, protocol_entry, simulate_observed
from vlpl.data.records import HF_PREFIX, LabelledDataset, Sample

logger = logging.getLogger(__name__)

OFFICIAL_SPLITS = ("train", "test")

#: The 20 PASCAL VOC classes in the standard (alphabetical) order used by Cole's formatted files.
VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip

COCO_DEFAULT_ANNOTATIONS = {
    "train": "annotations/instances_train2014.json",
    "test": "annotations/instances_val2014.json",
}
COCO_DEFAULT_IMAGE_DIRS = {"train": "train2014", "test": "val2014"}


class DatasetFormatError(ValueError):
    """A dataset file is missing or malformed; the message names the file and what is wrong."""


class RawItem(NamedTuple):
    """One row of an official split, as a format reader returns it."""

    sample_id: str
    image: str
    labels: Optional[np.ndarray]  # (C,) int8 in {0,1}; {-1,0,1} for partial annotations; None when unknown


@dataclass
class OfficialSplits:
    """What a format reader returns: the official train and test splits, in file order.

    Attributes:
        root: the folder image paths are relative to (becomes :attr:`LabelledDataset.root`).
        classes: class names.
        train: rows of the official train split (the source of our train and val).
        test: rows of the official test split (VOC/COCO "val").
        carved_val: optional bool mask over ``train``: rows already assigned to a validation split by
            the dataset itself (``folder`` rows with split ``val``); when set, no Cole split is drawn.
        given_observed: default ``.npy`` files per official split for ``observed.mode: given`` when
            ``observed.file`` is not set (``cole``: ``formatted_{train,val}_labels_obs.npy``).
        hf: the Hugging Face DatasetDict that ``hf://`` images are decoded from.
        hf_image_column: its image column.
        hf_path: where ``hf`` was loaded from (absolute local path or hub id).
        default_name: the dataset name used when ``cfg.name`` is not set.
        labels_kind: ``"full"`` (``RawItem.labels`` in {0,1}: every entry known) or ``"partial"`` (real partial
            annotations, ``RawItem.labels`` in {-1,0,1} with 0 = unknown; they are also the observed labels of
            ``observed.mode: given``).
    """

    root: Path
    classes: List[str]
    train: List[RawItem]
    test: List[RawItem]
    carved_val: Optional[np.ndarray] = None
    given_observed: Dict[str, Path] = field(default_factory=dict)
    hf: Any = None
    hf_path: Optional[str] = None
    hf_image_column: str = "image"
    default_name: Optional[str] = None
    labels_kind: str = "full"


# --------------------------------------------------------------------------------------------------
# Common helpers
# --------------------------------------------------------------------------------------------------


def _sample_id_from_path(image: str) -> str:
    """The image path relative to the root, in POSIX form, without its extension."""
    p = PurePosixPath(str(image).replace("\\", "/"))
    return str(p.with_suffix("")) if p.suffix else str(p)


def read_class_list(path: Path) -> List[str]:
    """Read a class list: one name per line, blank lines ignored, names stripped, no duplicates."""
    if not path.is_file():
        raise DatasetFormatError(f"class list {path} not found (expected one class name per line)")
    names = [line.strip() for _, line in _text_lines(path)]
    names = [n for n in names if n]
    if not names:
        raise DatasetFormatError(f"class list {path} is empty")
    seen: Set[str] = set()
    for n in names:
        if n in seen:
            raise DatasetFormatError(f"class list {path}: class {n!r} appears more than once")
        seen.add(n)
    return names


def _classes_path(cfg: DataConfig, root: Path) -> Path:
    return resolve_path(root, cfg.classes) if cfg.classes is not None else root / "classes.txt"  # type: ignore[return-value]


def _multi_hot(indices: Sequence[int], num_classes: int) -> np.ndarray:
    v = np.zeros(num_classes, dtype=np.int8)
    if len(indices):
        v[np.asarray(indices, dtype=np.int64)] = 1
    return v


def train_val_split(n: int, val_fraction: float = 0.2, seed: int = 1200) -> Tuple[np.ndarray, np.ndarray]:
    """Cole's train/val split of the official train split (ALGORITHMS.md 2b).

    ``perm = np.random.RandomState(seed).permutation(n)``; ``n_val = int(np.round(val_fraction * n))``
    (numpy rounds half to even, as Python's ``round`` does; for ``val_fraction = 0.2`` no tie can
    occur); val = ``perm[n - n_val:]``, train = ``perm[:n - n_val]``, both sorted. For VOC (5,717)
    this gives 4,574/1,143 and for COCO (82,081) 65,665/16,416.

    When ``n_val`` is 0 the val split is empty (the reference's ``perm[-0:]`` would instead select
    everything; that case never arises with its datasets).

    Returns:
        ``(train_idx, val_idx)``, sorted int64 arrays, disjoint, together ``0..n-1``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: expected a value in [0, 1), got {val_fraction}")
    perm = np.random.RandomState(seed).permutation(n)
    n_val = int(np.round(val_fraction * n))
    n_train = n - n_val
    return np.sort(perm[:n_train]).astype(np.int64), np.sort(perm[n_train:]).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# folder: labels.csv / labels.jsonl + classes.txt
# --------------------------------------------------------------------------------------------------

FOLDER_COLUMNS = ("image", "split", "labels")
#: the columns (JSON keys) of a labels file with real partial annotations
PARTIAL_COLUMNS = ("image", "split", "positives", "negatives")
FOLDER_SPLITS = ("train", "val", "test")


class _Row(NamedTuple):
    """One row of a folder labels file: names of its positives and, for a partial file, its negatives."""

    line_no: int
    image: str
    split: str
    positives: List[str]
    negatives: Optional[List[str]]  # None: a full-label file (everything not positive is negative)


def read_folder(cfg: DataConfig) -> OfficialSplits:
    """Images in a folder, labels in ``labels.csv`` or ``labels.jsonl``, names in ``classes.txt``.

    * ``labels.csv``: columns ``image,split,labels``; ``labels`` is the set of class names joined by
      ``|`` (empty: no label, an all-zero row).
    * ``labels.jsonl``: one object per line with keys ``image``, ``split`` and ``labels`` (a list of
      class names).
    * **Real partial annotations**: columns (keys) ``image,split,positives,negatives`` instead, ``positives`` and
      ``negatives`` written as ``labels`` is (names joined by ``|``; JSON lists). Listed positives are +1, listed
      negatives -1, every other class unknown (0); the dataset's labels are then ``partial``
      (:attr:`OfficialSplits.labels_kind`) and ``observed.mode: given`` takes them as the observed labels.
      A class listed both positive and negative on one row is an error.
    * ``image`` is relative to ``cfg.root``; ``split`` is ``train`` or ``test`` (the official
      splits), or ``val``. ``val`` rows are an already-carved validation split: they belong to the
      official train split (observed labels are simulated over ``train`` + ``val`` rows together in
      file order) and, when any is present, Cole's random train/val split is **not** drawn.
    * ``cfg.labels`` chooses the file (``.jsonl`` suffix: JSON lines, else CSV); by default
      ``labels.csv``, else ``labels.jsonl``. ``cfg.classes`` defaults to ``classes.txt``.
    * ``sample_id`` is the image path without its extension.
    * Strict: exactly one of the two column sets (keys), every CSV row with as many fields as the header,
      UTF-8 text (a leading BOM is accepted); every error names the file and the line.
    """
    root = Path(cfg.root)
    classes = read_class_list(_classes_path(cfg, root))
    index = {n: i for i, n in enumerate(classes)}
    C = len(classes)
    if cfg.labels is not None:
        lpath = resolve_path(root, cfg.labels)
        assert lpath is not None
        if not lpath.is_file():
            raise DatasetFormatError(f"label file {lpath} not found")
    else:
        candidates = [root / "labels.csv", root / "labels.jsonl"]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise DatasetFormatError(
                f"no label file in {root}: expected {candidates[0].name} or {candidates[1].name}"
            )
        lpath = found[0]
    rows = _read_jsonl_rows(lpath) if lpath.suffix.lower() == ".jsonl" else _read_csv_rows(lpath)
    partial = bool(rows) and rows[0].negatives is not None

    def columns(names: List[str], line_no: int, what: str) -> List[int]:
        idx = []
        for name in names:
            if name not in index:
                raise DatasetFormatError(
                    f"{lpath}, line {line_no}: unknown class name {name!r} in {what} (not in the class list)"
                )
            idx.append(index[name])
        return idx

    train: List[RawItem] = []
    is_val: List[bool] = []
    test: List[RawItem] = []
    for row in rows:
        if not row.image:
            raise DatasetFormatError(f"{lpath}, line {row.line_no}: empty image path")
        if row.split not in FOLDER_SPLITS:
            raise DatasetFormatError(
                f"{lpath}, line {row.line_no}: split {row.split!r}; expected one of: {', '.join(FOLDER_SPLITS)}"
            )
        pos = columns(row.positives, row.line_no, "positives" if partial else "labels")
        if row.negatives is None:
            vec = _multi_hot(pos, C)
        else:
            neg = columns(row.negatives, row.line_no, "negatives")
            both = sorted(set(pos) & set(neg))
            if both:
                raise DatasetFormatError(
                    f"{lpath}, line {row.line_no}: class {classes[both[0]]!r} is listed both as a positive and as "
                    f"a negative; an annotation is one or the other"
                )
            vec = _multi_hot(pos, C) - _multi_hot(neg, C)
        item = RawItem(_sample_id_from_path(row.image), row.image, vec)
        if row.split == "test":
            test.append(item)
        else:
            train.append(item)
            is_val.append(row.split == "val")
    carved = np.array(is_val, dtype=bool) if any(is_val) else None
    return OfficialSplits(root=root, classes=classes, train=train, test=test, carved_val=carved,
                          default_name=root.name, labels_kind="partial" if partial else "full")


def _names(raw: str) -> List[str]:
    """Class names of one CSV cell: joined by ``|``, stripped, empty ones dropped."""
    raw = raw.strip()
    return [n for n in (x.strip() for x in raw.split("|")) if n] if raw else []


def _text_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 text file, a leading BOM dropped; a line that is not UTF-8 is an
    error naming the file and the line (a Latin-1 file, say)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetFormatError(
                    f"{path}, line {line_no}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    f"save the file as UTF-8"
                ) from None


def _column_set(header: List[str]) -> Optional[Tuple[str, ...]]:
    """Which of the two accepted column sets ``header`` is (any order), or None."""
    for cols in (FOLDER_COLUMNS, PARTIAL_COLUMNS):
        if sorted(header) == sorted(cols):
            return cols
    return None


def _read_csv_rows(path: Path) -> List[_Row]:
    """Rows of an ``image,split,labels`` or ``image,split,positives,negatives`` CSV: exactly one of these
    column sets (any order), every row with as many fields as the header."""
    lines = _text_lines(path)
    counter = {"line": 0}

    def text() -> Iterator[str]:
        for line_no, line in lines:
            counter["line"] = line_no
            yield line

    reader = csv.reader(text())
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DatasetFormatError(f"{path}: empty file; expected a header line {','.join(FOLDER_COLUMNS)} "
                                 f"(or {','.join(PARTIAL_COLUMNS)})") from None
    except csv.Error as e:
        raise DatasetFormatError(f"{path}, line {counter['line']}: {e}") from None
    cols = _column_set(header)
    if cols is None:
        ref = PARTIAL_COLUMNS if any(h in ("positives", "negatives") for h in header) else FOLDER_COLUMNS
        missing = [c for c in ref if c not in header]
        extra = [c for c in header if c not in ref]
        dup = sorted({c for c in header if header.count(c) > 1})
        what = "; ".join(x for x in (
            f"missing column(s) {', '.join(missing)}" if missing else "",
            f"unexpected column(s) {', '.join(repr(c) for c in extra)}" if extra else "",
            f"repeated column(s) {', '.join(dup)}" if dup else "") if x)
        raise DatasetFormatError(
            f"{path}, line 1: {what}; expected exactly the columns {','.join(FOLDER_COLUMNS)} (full labels) or "
            f"{','.join(PARTIAL_COLUMNS)} (partial annotations) (found: {','.join(header) or 'none'})"
        )
    expected = ", ".join(cols)
    col = {c: header.index(c) for c in cols}
    partial = cols == PARTIAL_COLUMNS
    out = []
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DatasetFormatError(f"{path}, line {counter['line']}: {e}") from None
        line_no = counter["line"]
        if not fields or all(not v.strip() for v in fields) and len(fields) <= 1:
            continue  # blank line
        if len(fields) != len(header):
            raise DatasetFormatError(
                f"{path}, line {line_no}: {len(fields)} field(s), expected {len(header)} ({expected})"
            )
        image, split = fields[col["image"]].strip(), fields[col["split"]].strip()
        if partial:
            out.append(_Row(line_no, image, split, _names(fields[col["positives"]]),
                            _names(fields[col["negatives"]])))
        else:
            out.append(_Row(line_no, image, split, _names(fields[col["labels"]]), None))
    return out


def _read_jsonl_rows(path: Path) -> List[_Row]:
    """Rows of a JSON-lines file: one object per line with exactly the keys image, split, labels, or (every
    line alike) image, split, positives, negatives."""
    out = []
    cols: Optional[Tuple[str, ...]] = None
    for line_no, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{path}, line {line_no}: not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise DatasetFormatError(f"{path}, line {line_no}: expected an object with keys {', '.join(FOLDER_COLUMNS)}"
                                     f" (or {', '.join(PARTIAL_COLUMNS)})")
        this = _column_set(list(obj))
        if this is None or (cols is not None and this != cols):
            ref = cols or (PARTIAL_COLUMNS if "positives" in obj or "negatives" in obj else FOLDER_COLUMNS)
            missing = [k for k in ref if k not in obj]
            extra = [k for k in obj if k not in ref]
            what = "; ".join(x for x in (f"missing key(s) {', '.join(missing)}" if missing else "",
                                         f"unexpected key(s) {', '.join(repr(k) for k in extra)}" if extra else "")
                             if x)
            same = " (every line must use the keys of the first)" if cols is not None else ""
            raise DatasetFormatError(f"{path}, line {line_no}: {what}; expected exactly the keys {', '.join(ref)}{same}")
        cols = this
        for key in ("image", "split"):
            if not isinstance(obj[key], str):
                raise DatasetFormatError(f"{path}, line {line_no}: {key!r} must be a string, got {obj[key]!r}")
        lists = {}
        for key in cols[2:]:
            v = obj[key]
            if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
                raise DatasetFormatError(f"{path}, line {line_no}: {key!r} must be a list of class names")
            lists[key] = [n.strip() for n in v if n.strip()]
        if cols == PARTIAL_COLUMNS:
            out.append(_Row(line_no, obj["image"].strip(), obj["split"].strip(), lists["positives"],
                            lists["negatives"]))
        else:
            out.append(_Row(line_no, obj["image"].strip(), obj["split"].strip(), lists["labels"], None))
    return out


# --------------------------------------------------------------------------------------------------
# coco: official instances JSON
# --------------------------------------------------------------------------------------------------


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetFormatError(f"annotation file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path}: not valid JSON: {e}") from None


def read_coco(cfg: DataConfig) -> OfficialSplits:
    """COCO official instances JSON per official split (Cole's ``format_coco.py``, ALGORITHMS.md 2b).

    * ``cfg.annotations``: ``{"train": ..., "test": ...}`` (default
      ``annotations/instances_{train,val}2014.json``); ``cfg.image_dirs`` the image folders
      (default ``train2014`` / ``val2014``), relative to ``cfg.root``.
    * Class ``k`` is the ``k``-th entry of the JSON's ``categories`` list (category ids are not
      contiguous); classes are the category names. Both JSON files must list the same categories.
    * Image-level label: positive iff the image has at least one instance of the category.
    * Images are sorted by ``str(image_id)`` (Cole sorts the ids as strings); with
      ``cfg.image_order: json`` they keep the order of the JSON's ``images`` list instead, which is
      pycocotools' ``coco.imgs`` order and so the rows the MLR-PL keep-ratio protocol draws its mask over
      (``HCP-MLR-PL datasets/coco2014.py``: ``ids = list(coco.imgs.keys())``; ALGORITHMS.md 10).
    * ``cfg.keep_unannotated=False`` (Cole) keeps only images with at least one annotation; True
      (the MLR-PL protocol, ALGORITHMS.md 10) also keeps the others, as all-zero rows.
    * Image path: ``<image_dir>/<file_name>`` from the JSON's ``images`` list; ``sample_id`` is that
      path without the extension, e.g. ``train2014/COCO_train2014_000000000009``.
    """
    root = Path(cfg.root)
    if cfg.image_order not in ("id_str", "json"):
        raise ConfigError(f"data.image_order: expected 'id_str' (Cole) or 'json' (the instances JSON's images "
                          f"order, MLR-PL), got {cfg.image_order!r}")
    ann_files = {**COCO_DEFAULT_ANNOTATIONS, **cfg.annotations}
    image_dirs = {**COCO_DEFAULT_IMAGE_DIRS, **cfg.image_dirs}
    classes: Optional[List[str]] = None
    cat_ids: Optional[List[Any]] = None
    first_file: Optional[Path] = None
    out: Dict[str, List[RawItem]] = {}
    for split in OFFICIAL_SPLITS:
        path = resolve_path(root, ann_files[split])
        assert path is not None
        data = _load_json(path)
        if not isinstance(data, dict) or "categories" not in data or "annotations" not in data:
            raise DatasetFormatError(f"{path}: expected a COCO instances JSON with 'categories' and 'annotations'")
        cats = data["categories"]
        ids = [c["id"] for c in cats]
        names = [str(c["name"]) for c in cats]
        if classes is None:
            classes, cat_ids, first_file = names, ids, path
        elif names != classes or ids != cat_ids:
            raise DatasetFormatError(
                f"{path} and {first_file} list different categories (ids or names or order); "
                "both splits must use the same category list"
            )
        col = {cid: k for k, cid in enumerate(ids)}
        file_names = {img["id"]: img.get("file_name") for img in data.get("images", [])}
        pos: Dict[Any, Set[int]] = {}
        for a in data["annotations"]:
            cid = a["category_id"]
            if cid not in col:
                raise DatasetFormatError(
                    f"{path}: annotation {a.get('id')!r} has category_id {cid!r}, not in 'categories'"
                )
            pos.setdefault(a["image_id"], set()).add(col[cid])
        keep_ids = set(pos)
        if cfg.keep_unannotated:
            keep_ids |= set(file_names)
        n_unannotated = len(set(file_names) - set(pos))
        items = []
        if cfg.image_order == "json":
            order = [i for i in dict.fromkeys(img["id"] for img in data.get("images", [])) if i in keep_ids]
            order += sorted(keep_ids - set(order), key=str)  # annotated ids missing from 'images': error below
        else:
            order = sorted(keep_ids, key=str)
        for img_id in order:
            fname = file_names.get(img_id)
            if not fname:
                raise DatasetFormatError(f"{path}: image id {img_id!r} is annotated but has no 'images' entry")
            image = str(PurePosixPath(image_dirs[split]) / fname)
            labels = _multi_hot(sorted(pos.get(img_id, ())), len(names))
            items.append(RawItem(_sample_id_from_path(image), image, labels))
        logger.info(
            "coco %s: %d images (%d without annotations %s)", split, len(items), n_unannotated,
            "kept" if cfg.keep_unannotated else "dropped",
        )
        out[split] = items
    assert classes is not None
    return OfficialSplits(root=root, classes=classes, train=out["train"], test=out["test"],
                          default_name=root.name or "coco")


# --------------------------------------------------------------------------------------------------
# voc: VOCdevkit/VOC2012 ImageSets/Main
# --------------------------------------------------------------------------------------------------


def read_voc(cfg: DataConfig) -> OfficialSplits:
    """PASCAL VOC from ``ImageSets/Main/<cls>_{train,val}.txt`` (Cole's ``format_pascal.py``).

    ``cfg.root`` is ``VOCdevkit/VOC2012``. Classes: :data:`VOC_CLASSES` (or ``cfg.classes`` if set).
    Each line is ``<image id> <flag>`` with flag 1 (positive), 0 (difficult) or -1 (negative);
    difficult counts as negative (ALGORITHMS.md 2b). An image is kept iff it is positive for at
    least one class, so images negative or difficult for every class are dropped. Official
    ``train`` is our train (+ val), official ``val`` is our test.

    Image order: ALGORITHMS.md does not state it; as in Cole's ``format_pascal.py`` the image file
    names ``<id>.jpg`` are sorted as strings. Images are ``JPEGImages/<id>.jpg``; ``sample_id`` is
    ``JPEGImages/<id>``.
    """
    root = Path(cfg.root)
    classes = read_class_list(resolve_path(root, cfg.classes)) if cfg.classes else list(VOC_CLASSES)  # type: ignore[arg-type]
    main = root / "ImageSets" / "Main"
    out: Dict[str, List[RawItem]] = {}
    for ours, theirs in (("train", "train"), ("test", "val")):
        pos: Dict[str, List[int]] = {}
        for k, cls in enumerate(classes):
            path = main / f"{cls}_{theirs}.txt"
            if not path.is_file():
                raise DatasetFormatError(f"VOC class list {path} not found (cfg.root must be VOCdevkit/VOC2012)")
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, start=1):
                    parts = line.split()
                    if not parts:
                        continue
                    if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
                        raise DatasetFormatError(
                            f"{path}, line {line_no}: expected '<image id> <1|0|-1>', got {line.rstrip()!r}"
                        )
                    if parts[1] == "1":
                        pos.setdefault(parts[0], []).append(k)
        items = []
        for fname in sorted(f"{i}.jpg" for i in pos):
            image_id = fname[: -len(".jpg")]
            image = f"JPEGImages/{fname}"
            items.append(RawItem(_sample_id_from_path(image), image, _multi_hot(pos[image_id], len(classes))))
        out[ours] = items
    return OfficialSplits(root=root, classes=classes, train=out["train"], test=out["test"], default_name="voc")


# --------------------------------------------------------------------------------------------------
# cole: formatted_{train,val}_{images,labels}.npy
# --------------------------------------------------------------------------------------------------


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetFormatError(f"{path} not found")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DatasetFormatError(
            f"{path}: cannot read without pickle ({e}); save string arrays with a unicode dtype"
        ) from None
    except OSError as e:
        raise DatasetFormatError(f"{path}: not a readable .npy file: {e}") from None


def read_cole(cfg: DataConfig) -> OfficialSplits:
    """Cole's pre-formatted files (ALGORITHMS.md 2b, "Files").

    ``cfg.root`` holds ``formatted_{train,val}_images.npy`` (relative image paths) and
    ``formatted_{train,val}_labels.npy`` (N x C in {0,1}); Cole's "val" is our test. Image paths are
    relative to ``cfg.image_root`` (default ``cfg.root``), which becomes the dataset root. The class
    list is ``cfg.classes`` (default ``<root>/classes.txt``); the files carry no names, so one of the
    two must exist. When ``formatted_{train,val}_labels_obs.npy`` exist they are the default files
    of ``observed.mode: given``.
    """
    root = Path(cfg.root)
    cpath = _classes_path(cfg, root)
    if not cpath.is_file():
        raise ConfigError(
            f"data.classes: format 'cole' needs a class list (one name per line); {cpath} not found"
        )
    classes = read_class_list(cpath)
    image_root = resolve_path(root, cfg.image_root) if cfg.image_root else root
    assert image_root is not None
    out: Dict[str, List[RawItem]] = {}
    given: Dict[str, Path] = {}
    for ours, theirs in (("train", "train"), ("test", "val")):
        ipath = root / f"formatted_{theirs}_images.npy"
        lpath = root / f"formatted_{theirs}_labels.npy"
        images = _load_npy(ipath)
        labels = _load_npy(lpath)
        if images.ndim != 1:
            raise DatasetFormatError(f"{ipath}: expected a 1-d array of paths, got shape {images.shape}")
        if labels.shape != (len(images), len(classes)):
            raise DatasetFormatError(
                f"{lpath}: shape {labels.shape}, expected ({len(images)}, {len(classes)}) "
                f"({len(images)} images in {ipath.name}, {len(classes)} classes in {cpath})"
            )
        bad = ~np.isin(labels, (0, 1))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DatasetFormatError(f"{lpath}: row {r}, column {c} holds {labels[r, c]!r}; expected 0 or 1")
        lab = labels.astype(np.int8)
        out[ours] = [RawItem(_sample_id_from_path(str(p)), str(p), lab[i]) for i, p in enumerate(images)]
        obs = root / f"formatted_{theirs}_labels_obs.npy"
        if obs.is_file():
            given[ours] = obs
    return OfficialSplits(root=image_root, classes=classes, train=out["train"], test=out["test"],
                          given_observed=given, default_name=root.name)


# --------------------------------------------------------------------------------------------------
# hf: Hugging Face datasets
# --------------------------------------------------------------------------------------------------


def hf_location(cfg: DataConfig) -> str:
    """Where ``cfg.hf_path`` points: the absolute local path when it exists, else the hub id as given."""
    if not cfg.hf_path:
        raise ConfigError("data.hf_path: format 'hf' needs a save_to_disk folder or a hub dataset id")
    local = resolve_path(cfg.root, cfg.hf_path)
    assert local is not None
    return str(local.resolve()) if local.exists() else cfg.hf_path


def open_hf_dict(location: str) -> Any:
    """Open a Hugging Face ``DatasetDict``: a ``save_to_disk`` folder, another local path, or a hub id.

    Raises:
        DatasetFormatError: it is a single ``Dataset`` (no splits).
    """
    import datasets

    local = Path(location)
    if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        ds = datasets.load_from_disk(str(local))
    else:
        ds = datasets.load_dataset(location)
    if isinstance(ds, datasets.Dataset):
        raise DatasetFormatError(
            f"{location}: a single Dataset has no splits; save a DatasetDict whose splits data.hf_splits names"
        )
    return ds


def _open_hf(cfg: DataConfig) -> Any:
    return open_hf_dict(hf_location(cfg))


def check_hf_splits(cfg: DataConfig) -> None:
    """``data.hf_splits`` maps our official splits (``train``, optionally ``test``) to the dataset's split names."""
    unknown = [s for s in cfg.hf_splits if s not in OFFICIAL_SPLITS]
    if unknown:
        raise ConfigError(f"data.hf_splits: keys must be 'train' and/or 'test', got {unknown}")
    if "train" not in cfg.hf_splits:
        raise ConfigError("data.hf_splits: needs a 'train' entry (the official train split)")


def _merge_hf_class_names(classes: Optional[List[str]], features: Any, cfg: DataConfig) -> Optional[List[str]]:
    """The class names of a split's label column (a ``ClassLabel`` feature), checked against those of the splits
    read before (``classes``; None: none known yet); ``features`` None or without names keeps ``classes``."""
    names = _hf_label_names(features.get(cfg.hf_label_column)) if features is not None else None
    if names is None:
        return classes
    if classes is not None and names != classes:
        raise DatasetFormatError(f"{cfg.hf_path}: splits disagree on the class names of {cfg.hf_label_column!r}")
    return names


def _hf_label_names(feature: Any) -> Optional[List[str]]:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        return list(inner.names)
    return None


def _hf_labels(values: List[Any], feature: Any, classes: List[str], where: str) -> List[np.ndarray]:
    """Convert a label column to multi-hot rows (see :func:`read_hf` for the accepted forms)."""
    import datasets

    C = len(classes)
    index = {n: i for i, n in enumerate(classes)}
    if isinstance(feature, datasets.ClassLabel):  # single-label column; -1 (or None) means no label
        return [_multi_hot([int(v)] if v is not None and int(v) >= 0 else [], C) for v in values]
    inner = getattr(feature, "feature", None)
    fixed_len = getattr(feature, "length", -1)
    is_names = isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")
    multi_hot = False
    if not is_names and not isinstance(inner, datasets.ClassLabel):
        if fixed_len == C:
            multi_hot = True
        elif values and all(v is not None and len(v) == C and all(x in (0, 1) for x in v) for v in values):
            multi_hot = True
    out = []
    for r, v in enumerate(values):
        if v is None:
            raise DatasetFormatError(f"{where}, row {r}: missing labels")
        if multi_hot:
            if len(v) != C or any(x not in (0, 1) for x in v):
                raise DatasetFormatError(f"{where}, row {r}: expected a 0/1 vector of length {C}, got {v!r}")
            out.append(np.asarray(v, dtype=np.int8))
            continue
        idx = []
        for x in v:
            if isinstance(x, str):
                if x not in index:
                    raise DatasetFormatError(f"{where}, row {r}: unknown class name {x!r}")
                idx.append(index[x])
            else:
                k = int(x)
                if not 0 <= k < C:
                    raise DatasetFormatError(f"{where}, row {r}: class index {k} out of range 0..{C - 1}")
                idx.append(k)
        out.append(_multi_hot(idx, C))
    return out


def read_hf(cfg: DataConfig) -> OfficialSplits:
    """A Hugging Face dataset with an ``Image()`` column and a multi-label column.

    * ``cfg.hf_path``: a folder written by ``save_to_disk`` (read with ``datasets.load_from_disk``),
      another local path or a hub id (read with ``datasets.load_dataset``). It must be a
      ``DatasetDict``; ``cfg.hf_splits`` maps our official splits (``train``, ``test``) to its split
      names (a split left out of the mapping is empty).
    * ``cfg.hf_image_column`` must be an ``Image()`` feature; images are decoded from the dataset
      (``image = "hf://<hfsplit>/<index>"``, ``sample_id = "<hfsplit>/<index>"``).
    * ``cfg.hf_label_column`` holds, per row, a list of class indices (e.g. ``Sequence(ClassLabel)``),
      a list of class names, a 0/1 multi-hot list of length C, or a single ``ClassLabel`` (-1: no label). A list of
      integers is read as multi-hot when the feature has fixed length C, or when every row has
      length C and only 0/1 values; otherwise as indices. When the column is absent the full
      labels are unknown (``None``).
    * Classes: the ``ClassLabel`` names when the label feature has them, else ``cfg.classes``
      (default ``<root>/classes.txt``).
    """
    if getattr(cfg, "hf_streaming", False):  # datasets.load_dataset(..., streaming=True): vlpl/data/streaming.py
        from vlpl.data.streaming import read_hf_streaming

        return read_hf_streaming(cfg)
    ds = _open_hf(cfg)
    root = Path(cfg.root)
    check_hf_splits(cfg)
    classes: Optional[List[str]] = None
    parts: Dict[str, Tuple[str, Any]] = {}
    for ours in OFFICIAL_SPLITS:
        name = cfg.hf_splits.get(ours)
        if name is None:
            continue
        if name not in ds:
            raise DatasetFormatError(
                f"{cfg.hf_path}: no split {name!r} (data.hf_splits.{ours}); available: {', '.join(ds.keys())}"
            )
        d = ds[name]
        import datasets

        if cfg.hf_image_column not in d.features or not isinstance(d.features[cfg.hf_image_column], datasets.Image):
            raise DatasetFormatError(
                f"{cfg.hf_path} split {name!r}: column {cfg.hf_image_column!r} is missing or not an Image() "
                f"feature (columns: {', '.join(d.column_names)})"
            )
        classes = _merge_hf_class_names(classes, d.features, cfg)
        parts[ours] = (name, d)
    if classes is None:
        classes = read_class_list(_classes_path(cfg, root))
    out: Dict[str, List[RawItem]] = {"train": [], "test": []}
    for ours, (name, d) in parts.items():
        n = len(d)
        if cfg.hf_label_column in d.features:
            values = d.select_columns([cfg.hf_label_column]).with_format("arrow")[:][cfg.hf_label_column].to_pylist()
            labels: List[Optional[np.ndarray]] = list(
                _hf_labels(values, d.features[cfg.hf_label_column], classes, f"{cfg.hf_path} split {name!r}")
            )
        else:
            logger.warning("%s split %r: no column %r; full labels unknown", cfg.hf_path, name, cfg.hf_label_column)
            labels = [None] * n
        out[ours] = [RawItem(f"{name}/{i}", f"{HF_PREFIX}{name}/{i}", labels[i]) for i in range(n)]
    return OfficialSplits(root=root, classes=classes, train=out["train"], test=out["test"], hf=ds,
                          hf_image_column=cfg.hf_image_column, hf_path=hf_location(cfg),
                          default_name=Path(str(cfg.hf_path)).name or "hf")


# --------------------------------------------------------------------------------------------------
# openimages: image-level CSVs with human-verified positives and negatives
# --------------------------------------------------------------------------------------------------

OPENIMAGES_COLUMNS = ("ImageID", "Source", "LabelName", "Confidence")
OPENIMAGES_DEFAULT_ANNOTATIONS = {
    "train": "oidv6-train-annotations-human-imagelabels.csv",
    "test": "test-annotations-human-imagelabels.csv",
}
OPENIMAGES_DEFAULT_IMAGE_DIRS = {"train": "train", "val": "validation", "test": "test"}
OPENIMAGES_DEFAULT_CLASSES = "oidv6-class-descriptions.csv"


def _read_csv_table(path: Path, what: str) -> Any:
    """A CSV as a pyarrow table of strings (header row required); errors name the file."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if not path.is_file():
        raise DatasetFormatError(f"{what} {path} not found")
    try:
        with open(path, "rb") as f:
            first = f.readline().decode("utf-8-sig", errors="replace")
        names = next(csv.reader([first]), [])
        return pacsv.read_csv(
            path, convert_options=pacsv.ConvertOptions(column_types={n.strip(): pa.string() for n in names}),
            parse_options=pacsv.ParseOptions(newlines_in_values=False))
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetFormatError(f"{path}: not a readable CSV ({e})") from None


def read_openimages_classes(path: Path) -> Tuple[List[str], List[str]]:
    """The class-descriptions CSV: rows ``MID,DisplayName`` (a header ``LabelName,DisplayName`` or
    ``MID,DisplayName`` is skipped; OpenImages V4's file has none). Returns ``(mids, names)`` in file order.
    A MID listed twice is an error; a display name shared by several MIDs (OpenImages has a few) becomes
    ``"<name> (<MID>)"`` for each of them, so class names stay unique."""
    if not path.is_file():
        raise DatasetFormatError(f"class descriptions {path} not found (expected a CSV of MID,DisplayName rows)")
    mids: List[str] = []
    names: List[str] = []
    where: Dict[str, int] = {}
    for line_no, line in _text_lines(path):
        try:
            fields = next(csv.reader([line]), [])
        except csv.Error as e:
            raise DatasetFormatError(f"{path}, line {line_no}: {e}") from None
        if not fields or all(not f.strip() for f in fields):
            continue
        if line_no == 1 and [f.strip() for f in fields] in (["LabelName", "DisplayName"], ["MID", "DisplayName"]):
            continue
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise DatasetFormatError(f"{path}, line {line_no}: expected 'MID,DisplayName', got {line.rstrip()!r}")
        mid = fields[0].strip()
        if mid in where:
            raise DatasetFormatError(f"{path}, line {line_no}: MID {mid!r} already listed on line {where[mid]}")
        where[mid] = line_no
        mids.append(mid)
        names.append(fields[1].strip())
    if not mids:
        raise DatasetFormatError(f"class descriptions {path} list no class")
    counts: Dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    dup = {n for n, k in counts.items() if k > 1}
    if dup:
        logger.info("%s: %d display name(s) shared by several MIDs; those classes are named '<name> (<MID>)'",
                    path, len(dup))
        names = [f"{n} ({m})" if n in dup else n for n, m in zip(names, mids)]
    return mids, names


def _openimages_split(path: Path, mid_index: Dict[str, int], C: int, image_dir: str) -> List[RawItem]:
    """Rows of one OpenImages image-level CSV, one item per ImageID (sorted), labels in {-1,0,1}. Vectorised with
    pyarrow.compute (the train file has tens of millions of rows); errors name the file and line."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _read_csv_table(path, "image-level label file")
    header = table.column_names
    missing = [c for c in OPENIMAGES_COLUMNS if c not in header]
    if missing:
        raise DatasetFormatError(f"{path}, line 1: missing column(s) {', '.join(missing)}; expected "
                                 f"{','.join(OPENIMAGES_COLUMNS)} (found: {','.join(header)})")
    cols = {name: pc.utf8_trim_whitespace(table.column(name).combine_chunks())
            for name in ("ImageID", "LabelName", "Confidence")}
    for name, a in cols.items():
        empty = pc.fill_null(pc.equal(pc.utf8_length(a), 0), True).to_numpy(zero_copy_only=False)
        if empty.any():
            raise DatasetFormatError(f"{path}, line {int(np.argmax(empty)) + 2}: empty {name}")
    conf = cols["Confidence"]
    is_pos = pc.is_in(conf, value_set=pa.array(["1", "1.0"])).to_numpy(zero_copy_only=False)
    is_neg = pc.is_in(conf, value_set=pa.array(["0", "0.0"])).to_numpy(zero_copy_only=False)
    bad = ~(is_pos | is_neg)
    if bad.any():
        r = int(np.argmax(bad))
        raise DatasetFormatError(f"{path}, line {r + 2}: Confidence {conf[r].as_py()!r}; expected 1 (a verified "
                                 f"positive) or 0 (a verified negative)")
    enc = cols["LabelName"].dictionary_encode()
    mids = enc.dictionary.to_pylist()
    to_class = np.array([mid_index.get(m, -1) for m in mids], np.int64)
    col = to_class[enc.indices.to_numpy(zero_copy_only=False)]
    if (col < 0).any():
        r = int(np.argmax(col < 0))
        raise DatasetFormatError(f"{path}, line {r + 2}: LabelName {cols['LabelName'][r].as_py()!r} is not in the "
                                 f"class descriptions (unknown class)")
    enc = cols["ImageID"].dictionary_encode()
    names = np.array(enc.dictionary.to_pylist(), dtype=object)
    order = np.argsort(names, kind="stable")
    rank = np.empty(len(names), np.int64)
    rank[order] = np.arange(len(names))
    inv = rank[enc.indices.to_numpy(zero_copy_only=False)]  # row -> position of its image, sorted by ImageID
    uniq = names[order]
    pos = np.zeros((len(uniq), C), bool)
    neg = np.zeros((len(uniq), C), bool)
    pos[inv[is_pos], col[is_pos]] = True
    neg[inv[is_neg], col[is_neg]] = True
    clash = pos & neg  # one (image, class) given both as a positive and as a negative
    if clash.any():
        i, c = (int(x) for x in np.argwhere(clash)[0])
        rows = np.nonzero((inv == i) & (col == c))[0] + 2
        raise DatasetFormatError(f"{path}, lines {', '.join(map(str, rows[:4]))}: image {uniq[i]!r} has class "
                                 f"{cols['LabelName'][int(rows[0]) - 2].as_py()!r} both as a positive (Confidence 1) "
                                 f"and as a negative (Confidence 0)")
    lab = pos.astype(np.int8) - neg.astype(np.int8)
    return [RawItem(_sample_id_from_path(f"{image_dir}/{i}.jpg"), f"{image_dir}/{i}.jpg", lab[k])
            for k, i in enumerate(uniq.tolist())]


def read_openimages(cfg: DataConfig) -> OfficialSplits:
    """OpenImages image-level labels (human-verified positives and negatives; ALGORITHMS.md 9f).

    * ``cfg.annotations``: per official split (``train``, ``test``, and optionally ``val``, a validation split
      carved by the dataset, e.g. OpenImages' own ``validation``) an image-level CSV with the columns
      ``ImageID,Source,LabelName,Confidence`` (others ignored). ``Confidence`` 1 is a verified positive (+1),
      0 a verified negative (-1); every (image, class) not in the file is unknown (0). Defaults:
      ``oidv6-train-annotations-human-imagelabels.csv`` and ``test-annotations-human-imagelabels.csv``.
    * ``cfg.classes``: the class-descriptions CSV (``MID,DisplayName``; default
      ``oidv6-class-descriptions.csv``); its rows, in file order, are the classes, so a descriptions file cut
      down to the trainable classes restricts the class set. A ``LabelName`` not in it is an error.
    * Images: ``<image_dirs[split]>/<ImageID>.jpg`` (defaults ``train``, ``validation``, ``test``); one row per
      ImageID that the CSV names, sorted by ImageID; ``sample_id`` is the path without the extension.
    * Errors name the file and line: a missing column, an empty field, a Confidence other than 0/1, an unknown
      MID, or one (image, class) given both as a positive and as a negative (repeated equal rows, e.g. from
      two ``Source`` values, are fine).

    The labels are partial (:attr:`OfficialSplits.labels_kind`): ``observed.mode: given`` trains on them and
    ``vlpl evaluate`` scores the test split with the masked mAP.
    """
    root = Path(cfg.root)
    cpath = resolve_path(root, cfg.classes or OPENIMAGES_DEFAULT_CLASSES)
    assert cpath is not None
    mids, classes = read_openimages_classes(cpath)
    mid_index = {m: k for k, m in enumerate(mids)}
    files = {**OPENIMAGES_DEFAULT_ANNOTATIONS, **cfg.annotations}
    unknown = [k for k in files if k not in FOLDER_SPLITS]
    if unknown:
        raise ConfigError(f"data.annotations: keys must be train, val and/or test for format openimages, got {unknown}")
    dirs = {**OPENIMAGES_DEFAULT_IMAGE_DIRS, **cfg.image_dirs}
    out: Dict[str, List[RawItem]] = {}
    for split, f in files.items():
        path = resolve_path(root, f)
        assert path is not None
        out[split] = _openimages_split(path, mid_index, len(classes), dirs.get(split, split))
        logger.info("openimages %s: %d images from %s", split, len(out[split]), path)
    val = out.get("val", [])
    carved = np.array([False] * len(out["train"]) + [True] * len(val), bool) if val else None
    return OfficialSplits(root=root, classes=classes, train=out["train"] + val, test=out.get("test", []),
                          carved_val=carved, default_name="openimages", labels_kind="partial")


# --------------------------------------------------------------------------------------------------
# vg200: Visual Genome 200 classes, as the MLR-PL release (HCP-MLR-PL) lays it out
# --------------------------------------------------------------------------------------------------

VG_DEFAULT_LISTS = {"train": "train_list_500.txt", "test": "test_list_500.txt"}
VG_DEFAULT_LABELS = "vg_category_200_labels_index.json"
VG_DEFAULT_IMAGE_DIR = "VG_100K"


def read_vg200(cfg: DataConfig) -> OfficialSplits:
    """VG-200 in the files of the MLR-PL code release (ALGORITHMS.md 10; docs/PARTIAL_LABELS.md).

    * ``cfg.annotations``: the image lists per official split, one image file name per line (defaults
      ``train_list_500.txt``, ``test_list_500.txt``); row order is line order (the order the protocol's
      keep mask is drawn over).
    * ``cfg.labels``: a JSON object mapping each image file name to the list of its positive class indices
      (0-based; default ``vg_category_200_labels_index.json``); every other class is negative (full labels).
    * ``cfg.classes``: the class names, one per line, in index order (default ``classes.txt``). The release
      ships no names (only word vectors), so this file must be supplied; its length is C.
    * Images: ``<image_dirs[split]>/<name>`` (default ``VG_100K`` for both splits).
    """
    root = Path(cfg.root)
    cpath = _classes_path(cfg, root)
    if not cpath.is_file():
        raise ConfigError(f"data.classes: format 'vg200' needs the 200 class names, one per line in index order; "
                          f"{cpath} not found (the MLR-PL release ships none: see docs/PARTIAL_LABELS.md)")
    classes = read_class_list(cpath)
    C = len(classes)
    lpath = resolve_path(root, cfg.labels or VG_DEFAULT_LABELS)
    assert lpath is not None
    index = _load_json(lpath)
    if not isinstance(index, dict):
        raise DatasetFormatError(f"{lpath}: expected a JSON object mapping image names to lists of class indices")
    files = {**VG_DEFAULT_LISTS, **cfg.annotations}
    unknown = [k for k in files if k not in OFFICIAL_SPLITS]
    if unknown:
        raise ConfigError(f"data.annotations: keys must be train and/or test for format vg200, got {unknown}")
    out: Dict[str, List[RawItem]] = {}
    for split in OFFICIAL_SPLITS:
        path = resolve_path(root, files[split])
        assert path is not None
        if not path.is_file():
            raise DatasetFormatError(f"image list {path} not found (one image file name per line)")
        image_dir = cfg.image_dirs.get(split, VG_DEFAULT_IMAGE_DIR)
        items = []
        for line_no, line in _text_lines(path):
            name = line.strip()
            if not name:
                continue
            if name not in index:
                raise DatasetFormatError(f"{path}, line {line_no}: image {name!r} has no entry in {lpath}")
            idx = index[name]
            if not isinstance(idx, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in idx):
                raise DatasetFormatError(f"{lpath}: entry {name!r} must be a list of class indices, got {idx!r}")
            out_of_range = [k for k in idx if not 0 <= k < C]
            if out_of_range:
                raise DatasetFormatError(f"{lpath}: entry {name!r} has class index {out_of_range[0]}, outside "
                                         f"0..{C - 1} ({C} classes in {cpath})")
            image = str(PurePosixPath(image_dir) / name)
            items.append(RawItem(_sample_id_from_path(image), image, _multi_hot(sorted(set(idx)), C)))
        out[split] = items
    return OfficialSplits(root=root, classes=classes, train=out["train"], test=out["test"], default_name="vg200")


# --------------------------------------------------------------------------------------------------
# Common assembly
# --------------------------------------------------------------------------------------------------

READERS: Dict[str, Callable[[DataConfig], OfficialSplits]] = {
    "folder": read_folder,
    "coco": read_coco,
    "voc": read_voc,
    "cole": read_cole,
    "hf": read_hf,
    "openimages": read_openimages,
    "vg200": read_vg200,
    "webdataset": lambda cfg: _read_webdataset(cfg),
}


def _read_webdataset(cfg: DataConfig) -> OfficialSplits:
    """``webdataset``: tar shards (``data.urls``), :func:`vlpl.data.webdataset.read_webdataset`."""
    from vlpl.data.webdataset import read_webdataset

    return read_webdataset(cfg)


def _split_labels(items: List[RawItem], split: str, C: int) -> Optional[np.ndarray]:
    """The split's label matrix (full {0,1} or partial {-1,0,1}, as read), or None when unknown."""
    known = [it.labels is not None for it in items]
    if not items:
        return np.zeros((0, C), dtype=np.int8)
    if not any(known):
        return None
    if not all(known):
        raise DatasetFormatError(f"official {split} split: full labels are known for some rows only")
    return np.stack([it.labels for it in items]).astype(np.int8)  # type: ignore[misc]


def _observed_for_split(
    cfg: DataConfig, raw: OfficialSplits, split: str, labels: Optional[np.ndarray], n: int, n_full: int
) -> np.ndarray:
    ocfg = cfg.observed
    C = len(raw.classes)
    if raw.labels_kind == "partial" and ocfg.mode not in ("given", "none"):
        raise ConfigError(
            f"data.observed.mode: {ocfg.mode!r} simulates observed labels from full labels, but this dataset's "
            f"labels are partial annotations (format {cfg.format!r}); use mode 'given' (the annotations are the "
            f"observed labels) or 'none'"
        )
    if ocfg.mode == "given" and raw.labels_kind == "partial" and ocfg.file is None:
        if labels is None or split == "test":  # the test split's annotations are for evaluation only
            return no_observed((n, C))
        logger.info("observed labels of official %s split: the dataset's partial annotations", split)
        return labels.astype(np.int8).copy()
    if ocfg.mode == "given":
        path: Optional[Path] = None
        if split == "train" and ocfg.file is not None:
            path = resolve_path(cfg.root, ocfg.file)
        elif split in raw.given_observed:
            path = raw.given_observed[split]
        if path is None:
            if split == "train":
                raise ConfigError("data.observed.file: mode 'given' needs an N x C .npy of observed labels")
            return no_observed((n, C))
        obs = load_given_observed(path, C, (n_full, n))
        logger.info("observed labels of official %s split read from %s", split, path)
        return obs[:n]
    if ocfg.mode == "none":
        return no_observed((n, C))
    if labels is None:
        if split == "train":
            raise ConfigError(
                f"data.observed.mode: {ocfg.mode!r} simulates from full labels, which are unknown for the "
                "official train split; use 'given' or 'none'"
            )
        logger.info("official test split has no full labels: its observed labels are all 0")
        return no_observed((n, C))
    return simulate_observed(labels, ocfg)


def build_dataset(raw: OfficialSplits, cfg: DataConfig) -> LabelledDataset:
    """Truncate, simulate observed labels and carve val, as described in the module docstring."""
    if cfg.observed.mode not in MODES:
        raise ConfigError(f"data.observed.mode: unknown mode {cfg.observed.mode!r}; expected one of: {', '.join(MODES)}")
    if cfg.max_samples is not None and cfg.max_samples < 0:
        raise ConfigError(f"data.max_samples: expected a non-negative integer, got {cfg.max_samples}")
    C = len(raw.classes)
    official = {"train": raw.train, "test": raw.test}
    n_full = {s: len(v) for s, v in official.items()}
    carved = raw.carved_val
    if cfg.max_samples is not None:
        official = {s: v[: cfg.max_samples] for s, v in official.items()}
        if carved is not None:
            carved = carved[: cfg.max_samples]
            carved = carved if carved.any() else None
    observed: Dict[str, np.ndarray] = {}
    labels: Dict[str, Optional[np.ndarray]] = {}
    for s, items in official.items():
        labels[s] = _split_labels(items, s, C)
        observed[s] = _observed_for_split(cfg, raw, s, labels[s], len(items), n_full[s])

    n_train = len(official["train"])
    if carved is not None:
        train_idx, val_idx = np.nonzero(~carved)[0], np.nonzero(carved)[0]
        logger.info("official train split comes with %d val rows: Cole's random split not drawn", len(val_idx))
    elif cfg.val_fraction > 0:
        train_idx, val_idx = train_val_split(n_train, cfg.val_fraction, cfg.split_seed)
    else:
        if cfg.val_fraction < 0:
            raise ConfigError(f"data.val_fraction: expected a value in [0, 1), got {cfg.val_fraction}")
        train_idx, val_idx = np.arange(n_train), np.zeros(0, dtype=np.int64)

    samples: List[Sample] = []
    for split, src, idx in (("train", "train", train_idx), ("val", "train", val_idx),
                            ("test", "test", np.arange(len(official["test"])))):
        items, obs = official[src], observed[src]
        for i in idx:
            it = items[int(i)]
            samples.append(Sample(it.sample_id, it.image, split,
                                  None if it.labels is None else np.asarray(it.labels, dtype=np.int8),
                                  obs[int(i)].copy()))
    seen: Dict[str, str] = {}
    for s in samples:
        if s.sample_id in seen:
            raise DatasetFormatError(
                f"sample id {s.sample_id!r} appears twice (images {seen[s.sample_id]!r} and {s.image!r})"
            )
        seen[s.sample_id] = s.image
    name = cfg.name or raw.default_name or cfg.format
    ds = LabelledDataset(root=raw.root, classes=list(raw.classes), samples=samples, name=name,
                         _hf=raw.hf, _hf_image_column=raw.hf_image_column, hf_path=raw.hf_path,
                         image_config=cfg.images, labels_kind=raw.labels_kind,
                         observed_protocol=protocol_entry(cfg.observed))
    logger.info(
        "dataset %s (%s): %d classes, train %d / val %d / test %d, observed mode %s",
        name, cfg.format, C, len(train_idx), len(val_idx), len(official["test"]), cfg.observed.mode,
    )
    return ds


def load_dataset(cfg: DataConfig) -> LabelledDataset:
    """Read the dataset described by ``cfg`` (see the module docstring for the steps and formats)."""
    reader = READERS.get(cfg.format)
    if reader is None:
        raise ConfigError(f"data.format: unknown format {cfg.format!r}; expected one of: {', '.join(READERS)}")
    if cfg.observed.mode not in MODES:
        raise ConfigError(f"data.observed.mode: unknown mode {cfg.observed.mode!r}; expected one of: {', '.join(MODES)}")
    raw = reader(cfg)
    ds = build_dataset(raw, cfg)
    attach = getattr(raw, "attach_source", None)  # a streaming source sets the dataset's ImageSource itself
    if attach is not None:
        attach(ds)
    return ds
