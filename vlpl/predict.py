"""``vlpl predict RUN IMAGES...``: tag new images with a trained run's model.

What it reads:

* the run's best model, ``RUN/best`` (:func:`vlpl.train.model_io.load_model`: safetensors + JSON, no pickle);
* the run's own evaluation preprocessing: decode with the run's ``images`` rules
  (:meth:`vlpl.data.images.ImageSource.open`), resize to ``(s, s)`` as uint8 (:class:`vlpl.train.data.Uint8Resize`,
  ``s = student.image_size``), convert and normalise with the model's mean/std on the device
  (:class:`vlpl.train.data.DeviceNormalize`); the scores are ``sigmoid(model(x))``, as in the run's saved
  ``predictions/<split>.npz`` (on the CPU they are equal to float round-off whatever the batch size);
* IMAGES: image files; folders (recursive, files with an image extension, sorted); list files (``.txt``: one path
  a line, relative to the list file's folder; blank lines and ``#`` comments skipped); webdataset tar shards
  (``.tar`` paths, brace patterns such as ``shards/{000..009}.tar``, or ``wds://`` shard URLs including fsspec
  ones): every sample with an image member, through :mod:`vlpl.data.webdataset` (``wds://<shard>#<key>``
  references, random access by the shard's member index).

Tags (one of):

* **the run's thresholds** (default): per class, the probability threshold that maximises the class's F1 on the
  run's saved validation predictions (``RUN/predictions/<val_split>.npz``; with partial labels, over the annotated
  entries only); a class without a validation positive (partial: without an annotated positive and negative), or
  a run without validation predictions, gets 0.5 (the threshold the run's F1 metrics use). See
  :func:`run_thresholds`.
* ``--threshold X``: one probability threshold for every class;
* ``--thresholds FILE``: per-class probability thresholds, JSON ``{"classes": [...], "thresholds": [...]}``
  (``null``: the class is never tagged), the classes equal to the model's. A ``vlpl calibrate`` file is refused:
  its thresholds are in the teacher's units (cosines or DAMP's phi), not the student's probabilities;
* ``--topk K``: the K highest-scoring classes of each image.

Output (written atomically, whole, the temporary file streamed batch by batch): one row per image in input order,
``image`` (the reference as given / resolved), ``error`` (null, or why the image could not be read: the row has
no scores and no tags; such images are counted and skipped, never fatal), ``tags`` and the per-class scores.

* ``.csv``: ``image,error,tags,<class 1>,...`` (tags joined by ``|``; scores printed with 9 significant digits,
  enough to round-trip a float32);
* ``.jsonl``: ``{"image", "error", "tags": [...], "scores": {class: p}}``;
* ``.parquet``: ``image`` string, ``error`` string, ``tags`` list<string>, ``scores`` fixed_size_list<float32>[C];
  the file's key-value metadata ``vlpl_predict`` holds the classes, the thresholds and where they came from.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from vlpl.config import ImageConfig, load_config, yaml_load
from vlpl.data.images import ImageLoadError, ImageSource, printable

log = logging.getLogger(__name__)

#: file extensions taken as images when a folder is listed (case-insensitive)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
OUTPUT_FORMATS = (".csv", ".jsonl", ".parquet")
THRESHOLDS_FORMAT = "vlpl-predict-thresholds/1"
DEFAULT_THRESHOLD = 0.5
PARQUET_METADATA_KEY = b"vlpl_predict"


class PredictError(ValueError):
    """A bad ``vlpl predict`` input (run, images argument, thresholds, output): the message names it."""


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def _is_tar_pattern(arg: str) -> bool:
    return arg.startswith("wds://") or arg.endswith(".tar") or (".tar" in arg and "{" in arg)


def _tar_refs(arg: str) -> List[str]:
    """``wds://`` references of every sample with an image member in the shard(s) ``arg`` names."""
    from vlpl.data.webdataset import expand, has_protocol, image_member, make_ref, write_index_for

    pattern = arg[len("wds://"):] if arg.startswith("wds://") else arg
    refs: List[str] = []
    for url in expand(pattern):
        shard = url if has_protocol(url) else os.path.realpath(url)
        if not has_protocol(url) and not os.path.isfile(shard):
            raise PredictError(f"vlpl predict: webdataset shard {url} not found (from {arg!r})")
        try:
            index = write_index_for(shard)
        except Exception as e:  # noqa: BLE001 - DatasetFormatError, fsspec errors: name the shard
            raise PredictError(f"vlpl predict: cannot list webdataset shard {url}: {e}") from None
        n0 = len(refs)
        refs += [make_ref(shard, key) for key, members in index.samples.items() if image_member(members)]
        skipped = len(index.samples) - (len(refs) - n0)
        if skipped:
            log.warning("webdataset shard %s: %d sample(s) without an image member skipped", url, skipped)
    return refs


def _list_file(path: Path) -> List[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        out += collect_images([s if os.path.isabs(s) or "://" in s else str(path.parent / s)], _from_list=path)
    return out


def collect_images(inputs: Sequence[str], _from_list: Optional[Path] = None) -> List[str]:
    """Image references (absolute paths, ``wds://`` references) of ``inputs``, in the order given (folders: sorted,
    recursive). A missing path, a folder without images or an unknown file type is a :class:`PredictError`."""
    refs: List[str] = []
    where = f" (listed in {_from_list})" if _from_list else ""
    for arg in inputs:
        arg = str(arg)
        if arg.startswith("wds://") and "#" in arg:  # one member: wds://<shard>#<key>
            refs.append(arg)
            continue
        if _is_tar_pattern(arg):
            refs += _tar_refs(arg)
            continue
        p = Path(arg).expanduser()
        if p.is_dir():
            found = sorted(str(q.resolve()) for q in p.rglob("*")
                           if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file())
            if not found:
                raise PredictError(f"vlpl predict: folder {p}{where} holds no image files "
                                   f"({', '.join(IMAGE_EXTENSIONS)})")
            refs += found
        elif p.suffix.lower() == ".txt":
            if not p.is_file():
                raise PredictError(f"vlpl predict: list file {p}{where} not found")
            refs += _list_file(p)
        elif p.suffix.lower() in IMAGE_EXTENSIONS or p.exists():
            # a named file is kept even when missing or corrupt: it becomes a row with an error, not a crash
            refs.append(str(p.resolve()) if p.exists() else str(p.absolute()))
        else:
            raise PredictError(f"vlpl predict: {arg}{where}: not a file, folder, list file (.txt) or webdataset "
                               f"shard (.tar, wds://)")
    return refs


# --------------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------------


@dataclass
class Tagging:
    """How tags are chosen: per-class ``thresholds`` (C,) (``+inf``: never) or ``topk``; ``source`` says where
    they came from (recorded in the output's metadata)."""

    classes: List[str]
    thresholds: Optional[np.ndarray] = None
    topk: Optional[int] = None
    source: str = ""
    details: Dict[str, Any] = field(default_factory=dict)

    def tags(self, probs: np.ndarray) -> List[List[str]]:
        """The tags of each row of ``probs`` (B, C): classes with ``p >= threshold`` in class order, or the
        ``topk`` highest (ties: the lower class index first), highest first."""
        if self.topk is not None:
            k = min(self.topk, probs.shape[1])
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            return [[self.classes[c] for c in row] for row in order]
        assert self.thresholds is not None
        hit = probs >= self.thresholds[None, :]
        return [[self.classes[c] for c in np.flatnonzero(row)] for row in hit]

    def describe(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"source": self.source, **self.details}
        if self.topk is not None:
            out["topk"] = self.topk
        else:
            assert self.thresholds is not None
            out["thresholds"] = [None if not math.isfinite(t) else float(t) for t in self.thresholds]
        return out


def f1_thresholds(probs: np.ndarray, labels: np.ndarray, default: float = DEFAULT_THRESHOLD,
                  partial: bool = False) -> np.ndarray:
    """Per class, the score ``t`` (one of the class's scores) maximising F1 of ``probs >= t`` against ``labels``;
    ties go to the highest such ``t`` (fewest positives).

    ``labels``: full labels (> 0 positive), or with ``partial`` this project's partial coding (+1 annotated
    positive, -1 annotated negative, 0 unknown: only the annotated entries count, as in the masked mAP). A class
    without a positive (partial: without an annotated positive and an annotated negative) gets ``default``."""
    probs = np.asarray(probs, np.float64)
    lab = np.asarray(labels)
    C = probs.shape[1]
    out = np.full(C, float(default), np.float64)
    for c in range(C):
        rows = lab[:, c] != 0 if partial else slice(None)
        y, sc = lab[rows, c] > 0, probs[rows, c]
        P = int(y.sum())
        if P == 0 or (partial and P == len(y)):
            continue
        order = np.argsort(-sc, kind="stable")
        s, yy = sc[order], y[order]
        tp = np.cumsum(yy)
        n = np.arange(1, len(s) + 1)
        last = np.r_[s[1:] != s[:-1], True]  # the last row of each run of equal scores: all of them are predicted
        f1 = np.where(last, 2 * tp / (n + P), -1.0)
        out[c] = float(s[int(np.argmax(f1))])
    return out


def run_thresholds(run: Union[str, Path], classes: Sequence[str]) -> Tagging:
    """The run's thresholds (see the module docstring): F1-optimal per class on ``RUN/predictions/<val>.npz``."""
    run = Path(run)
    val = "val"
    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        val = str((yaml_load(cfg_path.read_text(encoding="utf-8")) or {}).get("val_split") or "val")
    path = run / "predictions" / f"{val}.npz"
    C = len(classes)
    flat = Tagging(list(classes), np.full(C, DEFAULT_THRESHOLD), source="default",
                   details={"threshold": DEFAULT_THRESHOLD})
    if not path.is_file():
        log.info("no %s: tags at probability %.2f for every class", path, DEFAULT_THRESHOLD)
        flat.details["why"] = f"no {path.name} in {path.parent}"
        return flat
    with np.load(path, allow_pickle=False) as z:
        partial = "labels_kind" in z.files and str(z["labels_kind"]) != "full"
        probs, labels = z["probs"], z["labels"]
    if probs.shape != (len(probs), C) or labels.shape != probs.shape:
        raise PredictError(f"{path}: probs {probs.shape} / labels {labels.shape} do not match the model's {C} classes")
    t = f1_thresholds(probs, labels, partial=partial)
    pos = (labels > 0).any(axis=0)
    fitted = int((pos & (labels < 0).any(axis=0)).sum() if partial else pos.sum())
    log.info("the run's thresholds: F1-optimal on %s (%d images, %s labels) for %d of %d classes, %.2f for the others",
             path, len(probs), "partial" if partial else "full", fitted, C, DEFAULT_THRESHOLD)
    return Tagging(list(classes), t, source="run", details={
        "file": str(path), "method": "per-class F1-optimal threshold on the run's validation predictions"
        + (" (annotated entries only)" if partial else ""), "labels": "partial" if partial else "full",
        "images": int(len(probs)), "fitted_classes": fitted, "default": DEFAULT_THRESHOLD})


def load_thresholds_file(path: Union[str, Path], classes: Sequence[str]) -> Tagging:
    """A per-class probability thresholds file (see the module docstring), checked against ``classes``."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PredictError(f"thresholds file {p} not found") from None
    except (OSError, ValueError) as e:
        raise PredictError(f"thresholds file {p}: not readable JSON ({e})") from None
    if not isinstance(doc, dict):
        raise PredictError(f"thresholds file {p}: expected a JSON object with 'classes' and 'thresholds'")
    fmt = doc.get("format")
    if fmt not in (None, THRESHOLDS_FORMAT):
        unit = f"the teacher's {doc.get('aggregate')!r} aggregate" if "aggregate" in doc else "another unit"
        raise PredictError(f"thresholds file {p}: format {fmt!r} holds thresholds on {unit} (a `vlpl calibrate` file "
                           f"thresholds the teacher's scores), not the student's probabilities; give "
                           f"{THRESHOLDS_FORMAT} thresholds (JSON classes + thresholds), --threshold X or --topk K")
    for k in ("classes", "thresholds"):
        if not isinstance(doc.get(k), list):
            raise PredictError(f"thresholds file {p}: key {k!r} must be a list")
    got = [str(c) for c in doc["classes"]]
    if got != list(classes):
        i = next((i for i, (a, b) in enumerate(zip(got, classes)) if a != b), min(len(got), len(classes)))
        raise PredictError(f"thresholds file {p}: key 'classes' differs from the model's at position {i} "
                           f"({got[i] if i < len(got) else None!r} vs {classes[i] if i < len(classes) else None!r}; "
                           f"{len(got)} vs {len(classes)} classes)")
    if len(doc["thresholds"]) != len(classes):
        raise PredictError(f"thresholds file {p}: key 'thresholds' has {len(doc['thresholds'])} values, "
                           f"expected {len(classes)}")
    try:
        t = np.array([np.inf if v is None else float(v) for v in doc["thresholds"]], np.float64)
    except (TypeError, ValueError):
        raise PredictError(f"thresholds file {p}: key 'thresholds' holds a non-number") from None
    return Tagging(list(classes), t, source="file", details={"file": str(p)})


def write_thresholds_file(path: Union[str, Path], tagging: Tagging) -> Path:
    """Write ``tagging``'s per-class thresholds as a :data:`THRESHOLDS_FORMAT` file (atomic)."""
    from vlpl.store.atomic import atomic_write_json

    assert tagging.thresholds is not None
    atomic_write_json(path, {"format": THRESHOLDS_FORMAT, "classes": tagging.classes,
                             "thresholds": tagging.describe()["thresholds"], "source": tagging.source,
                             **{k: v for k, v in tagging.details.items() if k != "thresholds"}})
    return Path(path)


def choose_tagging(run: Union[str, Path], classes: Sequence[str], *, thresholds: Optional[str] = None,
                   threshold: Optional[float] = None, topk: Optional[int] = None) -> Tagging:
    """The tagging asked for (at most one of ``thresholds`` / ``threshold`` / ``topk``; none: the run's)."""
    given = [n for n, v in (("--thresholds", thresholds), ("--threshold", threshold), ("--topk", topk)) if v is not None]
    if len(given) > 1:
        raise PredictError(f"vlpl predict: give one of --thresholds, --threshold, --topk (got {', '.join(given)})")
    if topk is not None:
        if int(topk) < 1:
            raise PredictError(f"vlpl predict: --topk must be >= 1, got {topk}")
        return Tagging(list(classes), topk=int(topk), source="topk")
    if threshold is not None:
        if not 0.0 <= float(threshold) <= 1.0:
            raise PredictError(f"vlpl predict: --threshold is a probability in [0, 1], got {threshold}")
        return Tagging(list(classes), np.full(len(classes), float(threshold)), source="threshold",
                       details={"threshold": float(threshold)})
    if thresholds is not None:
        return load_thresholds_file(thresholds, classes)
    return run_thresholds(run, classes)


# --------------------------------------------------------------------------------------------------
# the images
# --------------------------------------------------------------------------------------------------


class PredictImages:
    """Map-style dataset: item ``k`` -> ``(uint8 (3, s, s), k, error)``; an image that cannot be read gives a
    zero tensor and its :class:`ImageLoadError` message (or another decode error's), never an exception."""

    def __init__(self, source: ImageSource, refs: Sequence[str], size: int) -> None:
        from vlpl.train.data import Uint8Resize

        self.source, self.refs, self.size = source, refs, int(size)
        self.tf = Uint8Resize(self.size)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, k: int) -> Tuple[Any, int, str]:
        import torch

        try:
            return self.tf(self.source.open(self.refs[k])), k, ""
        except ImageLoadError as e:
            err = str(e)
        except Exception as e:  # noqa: BLE001 - a decoder bug on one odd file must not stop the others
            err = f"cannot decode image {printable(self.refs[k])}: {type(e).__name__}: {e}"
        return torch.zeros(3, self.size, self.size, dtype=torch.uint8), k, err


# --------------------------------------------------------------------------------------------------
# output writers
# --------------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{float(v):.9g}"


class _Writer:
    """Rows to ``tmp`` (the temporary file of :func:`vlpl.store.atomic.atomic_path`), batch by batch."""

    def __init__(self, tmp: Path, suffix: str, classes: List[str], meta: Dict[str, Any]) -> None:
        self.suffix, self.classes, self.meta = suffix, classes, meta
        self.pq: Any = None
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema([("image", pa.string()), ("error", pa.string()),
                                     ("tags", pa.list_(pa.string())),
                                     ("scores", pa.list_(pa.float32(), len(classes)))],
                                    metadata={PARQUET_METADATA_KEY: json.dumps(meta).encode("utf-8")})
            self.pq = pq.ParquetWriter(str(tmp), self.schema)
        else:
            self.f = open(tmp, "w", encoding="utf-8", newline="")
            if suffix == ".csv":
                self.csv = csv.writer(self.f)
                self.csv.writerow(["image", "error", "tags", *classes])

    def write(self, images: List[str], errors: List[Optional[str]], tags: List[Optional[List[str]]],
              probs: np.ndarray) -> None:
        if self.pq is not None:
            import pyarrow as pa

            C = len(self.classes)
            flat = pa.array(np.asarray(probs, np.float32).reshape(-1), pa.float32())
            mask = pa.array([e is not None for e in errors], pa.bool_())
            scores = pa.FixedSizeListArray.from_arrays(flat, C, mask=mask)
            self.pq.write_table(pa.Table.from_arrays(
                [pa.array(images, pa.string()), pa.array(errors, pa.string()), pa.array(tags, pa.list_(pa.string())),
                 scores], schema=self.schema))
            return
        for i, (img, err, tg) in enumerate(zip(images, errors, tags)):
            if self.suffix == ".csv":
                row = [img, err or "", "|".join(tg or [])]
                row += [""] * len(self.classes) if err is not None else [_fmt(v) for v in probs[i]]
                self.csv.writerow(row)
            else:
                rec = {"image": img, "error": err, "tags": tg,
                       "scores": None if err is not None else {c: float(v) for c, v in zip(self.classes, probs[i])}}
                self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.pq is not None:
            self.pq.close()
        else:
            self.f.close()


def read_predictions(path: Union[str, Path]) -> Tuple[List[str], List[Optional[str]], List[Optional[List[str]]],
                                                      np.ndarray, List[str]]:
    """Read a ``vlpl predict`` output back: ``(images, errors, tags, probs (N, C) float32 (NaN rows for errors),
    classes)``, from any of the three formats."""
    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(p)
        meta = json.loads(t.schema.metadata[PARQUET_METADATA_KEY])
        classes = list(meta["classes"])
        rows = t.to_pylist()
        probs = np.array([r["scores"] if r["scores"] is not None else [np.nan] * len(classes) for r in rows],
                         np.float32).reshape(len(rows), len(classes))
        return [r["image"] for r in rows], [r["error"] for r in rows], [r["tags"] for r in rows], probs, classes
    if p.suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            r = csv.reader(f)
            head = next(r)
            classes = head[3:]
            rows = list(r)
        errs = [x[1] or None for x in rows]
        probs = np.array([[float(v) for v in x[3:]] if not x[1] else [np.nan] * len(classes) for x in rows],
                         np.float32).reshape(len(rows), len(classes))
        return ([x[0] for x in rows], errs, [None if e else (x[2].split("|") if x[2] else []) for x, e in zip(rows, errs)],
                probs, classes)
    recs = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    classes = next((list(r["scores"]) for r in recs if r["scores"]), [])
    probs = np.array([[r["scores"][c] for c in classes] if r["scores"] else [np.nan] * len(classes) for r in recs],
                     np.float32).reshape(len(recs), len(classes))
    return [r["image"] for r in recs], [r["error"] for r in recs], [r["tags"] for r in recs], probs, classes


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


@dataclass
class PredictResult:
    """What :func:`predict_images` did: the output file, rows written, rows with an error, the tagging."""

    out: Path
    images: int
    failed: int
    tagging: Tagging


def _run_config(run: Path) -> Dict[str, Any]:
    p = run / "config.yaml"
    if not p.is_file():
        return {}
    doc = yaml_load(p.read_text(encoding="utf-8")) or {}
    return doc if isinstance(doc, dict) else {}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def predict_images(run: Union[str, Path], inputs: Sequence[str], out: Optional[Union[str, Path]] = None, *,
                   thresholds: Optional[str] = None, threshold: Optional[float] = None, topk: Optional[int] = None,
                   batch_size: int = 64, device: Optional[str] = None, num_workers: Union[int, str] = "auto",
                   show_progress: bool = True) -> PredictResult:
    """Score and tag ``inputs`` (see the module docstring) with ``run``'s best model; writes ``out`` (default
    ``RUN/predict/predictions.csv``). Returns a :class:`PredictResult`."""
    import torch
    from torch.utils.data import DataLoader

    from vlpl.progress import progress
    from vlpl.store.atomic import atomic_path
    from vlpl.train.data import DeviceNormalize, auto_prefetch, resolve_num_workers
    from vlpl.train.model_io import load_model

    run = Path(run)
    if not (run / "best").is_dir():
        raise PredictError(f"vlpl predict: {run} is not a finished training run ({run / 'best'} not found: the "
                           f"best model is saved after the first validated epoch)")
    out = Path(out) if out is not None else run / "predict" / "predictions.csv"
    if out.suffix not in OUTPUT_FORMATS:
        raise PredictError(f"vlpl predict: --out {out}: expected a {', '.join(OUTPUT_FORMATS)} file")
    if batch_size < 1:
        raise PredictError(f"vlpl predict: --batch-size must be >= 1, got {batch_size}")
    dev = torch.device(device or default_device())
    model = load_model(run / "best", map_location=dev)
    classes = list(model.context.names)
    tagging = choose_tagging(run, classes, thresholds=thresholds, threshold=threshold, topk=topk)
    refs = collect_images(inputs)
    if not refs:
        raise PredictError("vlpl predict: no images in " + " ".join(map(str, inputs)))
    rcfg = _run_config(run)
    img_cfg = load_config(ImageConfig, base={**(rcfg.get("images") or {}), "allow_outside_root": True},
                          base_source=f"{run / 'config.yaml'} key 'images'")
    source = ImageSource(Path("/"), img_cfg)  # the references are absolute paths / shard URLs given on purpose
    size = _image_size(run)
    workers = resolve_num_workers(num_workers, "--num-workers")
    kw: Dict[str, Any] = {"num_workers": workers, "pin_memory": dev.type == "cuda"}
    if workers:
        kw["prefetch_factor"] = auto_prefetch(workers)
    loader = DataLoader(PredictImages(source, refs, size), batch_size=batch_size, shuffle=False, **kw)
    normalize = DeviceNormalize(model.mean, model.std, dev)
    mp = str(rcfg.get("mixed_precision", "auto"))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16}.get(mp) if dev.type == "cuda" else None
    meta = {"run": str(run.resolve()), "model": str((run / "best").resolve()), "classes": classes,
            "image_size": size, "tagging": tagging.describe()}
    failed = 0
    log.info("vlpl predict: %d images, %s, batch %d, %d workers -> %s", len(refs), dev, batch_size, workers, out)
    with atomic_path(out, "vlpl predict output") as tmp:
        writer = _Writer(tmp, out.suffix, classes, meta)
        try:
            with progress(total=len(refs), desc="predict", unit="img", enabled=show_progress) as bar, \
                    torch.inference_mode():
                for x, k, errs in loader:
                    ok = torch.tensor([not e for e in errs])
                    probs = np.full((len(errs), len(classes)), np.nan, np.float32)
                    if ok.any():
                        xi = normalize(x[ok] if not ok.all() else x)
                        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                            logits = model(xi)
                        probs[ok.numpy()] = torch.sigmoid(logits.float()).cpu().numpy()
                    errors = [e or None for e in errs]
                    for e, kk in zip(errors, k.tolist()):
                        if e is not None:
                            failed += 1
                            log.warning("skipped %s: %s", printable(refs[kk]), e)
                    tags = tagging.tags(np.nan_to_num(probs, nan=-1.0))
                    writer.write([refs[kk] for kk in k.tolist()], errors,
                                 [None if e is not None else t for e, t in zip(errors, tags)], probs)
                    bar.update(len(errs))
        finally:
            writer.close()
    if failed:
        log.warning("vlpl predict: %d of %d images could not be read (rows with an error in %s)", failed, len(refs), out)
    return PredictResult(out=out, images=len(refs), failed=failed, tagging=tagging)


def _image_size(run: Path) -> int:
    from vlpl.train.model_io import read_model_json

    meta = read_model_json(run / "best")
    size = (meta.get("student") or {}).get("image_size")
    if not isinstance(size, int) or size < 1:
        raise PredictError(f"{run / 'best' / 'model.json'}: key 'student.image_size' is {size!r}, expected a size")
    return size


__all__ = ["predict_images", "collect_images", "run_thresholds", "f1_thresholds", "choose_tagging", "Tagging",
           "load_thresholds_file", "write_thresholds_file", "read_predictions", "PredictResult", "PredictError",
           "IMAGE_EXTENSIONS", "THRESHOLDS_FORMAT"]
