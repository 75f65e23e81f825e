"""``vlpl pseudolabel``: score every image and every view with a frozen VLM into a score store.

DataLoader workers decode images (a bad image becomes a failed row, never a crash; with ``decode: device``
they only check JPEGs and the loop decodes them on the device, :mod:`vlpl.pseudolabel.device_decode`); the
main loop makes all views of a batch on the model's device with batched tensor ops
(:func:`vlpl.vlm.views.make_views_batch`) and runs them through the image tower in large batches under
autocast (bf16 on GPU), then hands the per-view features, still on the device, to the shard writer
(:mod:`vlpl.store.async_writer`; ``writer: background`` by default, a thread behind a queue of
``writer_queue`` batches), which computes the stored form (raw cosine scores V x C, or a compact form), the
global-view image embedding, copies them to the host and writes each shard atomically once its last row is
in. The loop never waits for the device. Under ``accelerate launch`` / ``torchrun`` process
``rank`` takes the shards ``i % world == rank``; the main process writes the manifest after a barrier.
Batches never straddle a shard, so the numbers in a shard do not depend on how many processes ran,
nor on where an interrupted run resumed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vlpl import __version__
from vlpl.config import ConfigError, PseudolabelConfig, save_resolved
from vlpl.data.images import ALPHA_BACKGROUND, ImageLoadError, ImageSource, is_valid_utf8, printable
from vlpl.data.readers import load_dataset
from vlpl.data.records import LabelledDataset
from vlpl.progress import progress
from vlpl.pseudolabel.device_decode import EncodedJPEG, decode_on_device, probe_jpeg
from vlpl.store.async_writer import BackgroundWriter, InlineWriter, ScoredBatch, ShardAssembler, ShardBuffer
from vlpl.store.atomic import atomic_write_json
from vlpl.store.formats import ScoreForm, encode_views
from vlpl.store.fs import store_path
from vlpl.store.store import (
    SCHEMA_VERSION,
    ShardRows,
    StoreWriter,
    sha256_file,
    sha256_lines,
    shard_name,
    templates_hash,
)
from vlpl.vlm.backend import (
    VLMBackend,
    class_prompts,
    create_backend,
    load_descriptions,
    resolve_device,
    template_strings,
)
from vlpl.vlm.views import ViewSpec, _index, dense_view_scores, make_views_batch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# decoding (DataLoader workers)
# --------------------------------------------------------------------------------------------------


#: the failure share is checked once this many images are done (and always at the end)
MIN_IMAGES_FOR_FAILURE_CHECK = 50
#: how many failures the stop summary quotes
FAILURES_SHOWN = 5


class TooManyFailedImages(ValueError):
    """More than ``max_failed_fraction`` of the images failed to decode; completed shards were kept."""


class DecodeDataset(Dataset):
    """Item k -> ``(dataset index, uint8 (3, H, W) tensor or None, error or None, reason or None)``.

    Decoding goes through :meth:`vlpl.data.images.ImageSource.open` (the decode rules); then the image is
    downscaled to ``max_side`` and checked against the view grid: each of the ``grid x grid`` tiles needs at
    least one pixel, so a smaller image (2x2 with grid 4, 100000x1) is a failed row naming the file, not an
    error later in the view maker. Errors never escape: a bad image is a failed row.
    """

    def __init__(self, source: ImageSource, refs: Sequence[str], max_side: Optional[int] = None, grid: int = 0,
                 device_jpeg: bool = False) -> None:
        self.source = source
        self.refs = list(refs)
        self.max_side = max_side
        self.grid = grid
        # decode: device - a JPEG that needs no special rule comes back as an EncodedJPEG (its bytes), decoded
        # on the teacher's device by the main loop (vlpl/pseudolabel/device_decode.py)
        self.device_jpeg = device_jpeg

    def __len__(self) -> int:
        return len(self.refs)

    def decode(self, ref: str) -> torch.Tensor:
        """Open ``ref`` and return it as a uint8 (3, H, W) tensor; raises :class:`ImageLoadError`."""
        if not is_valid_utf8(ref):
            raise ImageLoadError(
                f"cannot use image {printable(ref)}: its file name is not valid UTF-8, and the store keeps names as "
                f"UTF-8 text; rename the file", ref, "file name not UTF-8")
        img = self.source.open(ref)
        if self.max_side and max(img.size) > self.max_side:
            img.thumbnail((self.max_side, self.max_side))
        w, h = img.size
        if self.grid and (w < self.grid or h < self.grid):
            raise ImageLoadError(
                f"cannot use image {printable(self._name(ref))}: {w}x{h} pixels is smaller than the "
                f"{self.grid}x{self.grid} view grid (views.grid; every tile needs at least 1x1 pixel)",
                ref, "smaller than the view grid")
        arr = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def _name(self, ref: str) -> str:
        return ref if "://" in ref else str(self.source.root / ref)

    def __getitem__(self, i: int) -> Tuple[int, Any, Optional[str], Optional[str]]:
        if self.device_jpeg and is_valid_utf8(self.refs[i]):
            enc = probe_jpeg(self.source, self.refs[i], self.max_side, self.grid)
            if enc is not None:
                return i, enc, None, None
        return self.cpu_item(i)

    def cpu_item(self, i: int) -> Tuple[int, Optional[torch.Tensor], Optional[str], Optional[str]]:
        """Item ``i`` decoded by the CPU path (PIL, the decode rules); a bad image is a failed row."""
        ref = self.refs[i]
        try:
            return i, self.decode(ref), None, None
        except ImageLoadError as e:
            return i, None, printable(str(e)), e.reason  # printable: the store keeps errors as UTF-8
        except Exception as e:  # noqa: BLE001 - any decoder failure is recorded, never fatal
            return i, None, f"cannot decode image {printable(self._name(ref))}: {type(e).__name__}: {e}", "decoder error"


def _collate(items: List[Any]) -> List[Any]:
    return items


# --------------------------------------------------------------------------------------------------
# sharding
# --------------------------------------------------------------------------------------------------


@dataclass
class ShardPlan:
    num_shards: int
    shard_size: int
    num_rows: int

    def rows(self, i: int) -> range:
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.num_rows))


def plan_batches(plan: ShardPlan, shards: Sequence[int], batch_size: int) -> List[List[int]]:
    """Batches of dataset indices, never straddling a shard (determinism across resumes/processes)."""
    out: List[List[int]] = []
    for s in shards:
        r = list(plan.rows(s))
        out += [r[k : k + batch_size] for k in range(0, len(r), batch_size)]
    return out


def samples_digest(ds: LabelledDataset) -> str:
    h = hashlib.sha256()
    for s in ds.samples:  # surrogateescape: names read from non-UTF-8 bytes hash as those bytes
        h.update(f"{s.sample_id}\t{s.image}\t{s.split}\t".encode("utf-8", "surrogateescape"))
        h.update(np.ascontiguousarray(s.observed, np.int8).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------


class Scorer:
    """Views + image tower + cosine against the class embeddings, for a list of decoded images."""

    def __init__(self, backend: VLMBackend, spec: ViewSpec, text: torch.Tensor, max_views: int = 4096,
                 form: Optional[ScoreForm] = None) -> None:
        self.backend = backend
        self.spec = spec
        self.text = text.to(backend.device, torch.float32)
        self.mean, self.std = backend.normalization()
        self.max_views = max_views
        self.form = form

    @torch.no_grad()
    def features(self, images: List[torch.Tensor]) -> Any:
        """-> the teacher's per-view image features (n, V, D), unit norm, left on the device: nothing here
        waits for the device (the uint8 images go over with ``non_blocking``, the views are made there).

        With the dense view (``spec.dense``): a :class:`DenseFeatures` of the image crops' features
        (n, num_image_views, D) and the dense view's scores (n, n_variants, C), from the global crops' patch
        tokens (one pass of the tower for those crops: their pooled embedding comes from the same pass)."""
        dev, spec = self.backend.device, self.spec
        views = make_views_batch([im.to(dev, non_blocking=True) for im in images], spec, self.mean, self.std)
        n, vi = len(images), spec.num_image_views
        if not spec.dense:
            feats = torch.cat([self.backend.encode_image(views[k : k + self.max_views])
                               for k in range(0, len(views), self.max_views)])
            return feats.view(n, vi, -1)
        first = {v * spec.n_image_views for v in range(spec.n_variants)}  # the global crops, per image
        g_rows = [k * vi + v for k in range(n) for v in sorted(first)]
        r_rows = [k * vi + v for k in range(n) for v in range(vi) if v not in first]
        g_idx, r_idx = _index(g_rows, dev), _index(r_rows, dev)  # pinned, non-blocking: no host sync
        rest, glob = views.index_select(0, r_idx), views.index_select(0, g_idx)
        feats = torch.empty((n * vi, self.text.shape[1]), dtype=torch.float32, device=dev)
        if r_rows:
            feats.index_copy_(0, r_idx, torch.cat([self.backend.encode_image(rest[k : k + self.max_views])
                                                   for k in range(0, len(rest), self.max_views)]))
        pooled, dense = [], []
        step = max(1, self.max_views // 16)  # patch tokens are ~P times the pooled features
        for k in range(0, len(glob), step):
            p, tokens = self.backend.encode_image_tokens(glob[k : k + step])
            pooled.append(p)
            dense.append(dense_view_scores(tokens, self.text, spec.dense_topk))
        feats.index_copy_(0, g_idx, torch.cat(pooled))
        return DenseFeatures(feats.view(n, vi, -1), torch.cat(dense).view(n, spec.n_variants, -1))

    @torch.no_grad()
    def __call__(self, images: List[torch.Tensor]) -> Tuple[Any, np.ndarray]:
        """-> scores (n, V, C) float16 (with a ``form``: that form's payload columns, computed on the
        device, :func:`vlpl.store.formats.encode_views`), global unflipped image embeddings (n, D) float16."""
        feats = self.features(images)
        emb = _image_features(feats)[:, 0].to(torch.float16).cpu().numpy()
        if self.form is not None:
            return _encode_payload(self.form, self.spec, feats, self.text), emb
        return view_scores(self.spec, feats, self.text).to(torch.float16).cpu().numpy(), emb


class DenseFeatures(NamedTuple):
    """A batch's features with the dense view: the image crops' ``feats`` (n, num_image_views, D) and the dense
    view's ``dense`` scores (n, n_variants, C)."""

    feats: torch.Tensor
    dense: torch.Tensor


def _image_features(payload: Any) -> torch.Tensor:
    return payload.feats if isinstance(payload, DenseFeatures) else payload


def view_scores(spec: ViewSpec, payload: Any, text: torch.Tensor) -> torch.Tensor:
    """(n, V, C) float32 raw scores of a batch in the store's layout: the crops' cosines, and with the dense view
    its row inserted after each variant's tiles (:class:`vlpl.store.views.ViewSpec`)."""
    feats = _image_features(payload)
    scores = feats.float() @ text.float().T  # (n, num_image_views, C)
    if not isinstance(payload, DenseFeatures):
        return scores
    n, C = scores.shape[0], scores.shape[2]
    crops = scores.view(n, spec.n_variants, spec.n_image_views, C)
    return torch.cat([crops, payload.dense[:, :, None].float()], dim=2).reshape(n, spec.num_views, C)


def _encode_payload(form: ScoreForm, spec: ViewSpec, payload: Any, text: torch.Tensor) -> Dict[str, np.ndarray]:
    """The form's payload columns of a batch (:func:`vlpl.store.formats.encode_views`); with the dense view the
    dense form's float16 scores in the store's layout (the other forms refuse the dense view up front)."""
    if isinstance(payload, DenseFeatures):
        return {"scores": view_scores(spec, payload, text).to(torch.float16).cpu().numpy()}
    return encode_views(form, payload, text)


def dataset_entry(cfg: PseudolabelConfig, ds: LabelledDataset) -> Dict[str, Any]:
    """The manifest's ``dataset`` entry: name, format, and what reopens the images
    (:meth:`ImageSource.describe`: the root and, for a Hugging Face dataset, its path, image column and the
    split mapping), read back by :meth:`ImageSource.from_store`."""
    entry: Dict[str, Any] = {"name": ds.name, "format": cfg.data.format, **ds.image_source.describe()}
    if "hf" in entry:
        entry["hf"]["splits"] = dict(cfg.data.hf_splits)
    return entry


def decode_identity(cfg: PseudolabelConfig, device: Optional[torch.device] = None) -> Dict[str, Any]:
    """What decides the pixels the teacher sees (part of the store's identity: a resume must match it).
    With ``decode: device`` the JPEG decoder is recorded too (``torchvision.io.decode_jpeg`` on the device
    type: nvJPEG's pixels may differ from libjpeg-turbo's); the default CPU path adds nothing."""
    im = cfg.data.images
    out: Dict[str, Any] = {"max_pixels": im.max_pixels, "exif_transpose": im.exif_transpose,
                           "allow_outside_root": im.allow_outside_root, "max_side": cfg.views.max_side,
                           "alpha_background": list(ALPHA_BACKGROUND), "sixteen_bit": "high byte"}
    if cfg.decode == "device":
        out["jpeg_decoder"] = f"torchvision.io.decode_jpeg on {(device or torch.device('cpu')).type}"
    return out


@dataclass
class Tally:
    """Images done and failed (this process), failures by reason, the first few failures."""

    done: int = 0
    failed: int = 0
    earlier_done: int = 0  # in shards completed by an earlier run
    earlier_failed: int = 0
    stopped: bool = False
    by_reason: Dict[str, int] = field(default_factory=dict)
    first: List[str] = field(default_factory=list)

    def add_failure(self, error: str, reason: str) -> None:
        self.failed += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if len(self.first) < FAILURES_SHOWN:
            self.first.append(error)

    @property
    def total_done(self) -> int:
        return self.done + self.earlier_done

    @property
    def total_failed(self) -> int:
        return self.failed + self.earlier_failed

    def too_many(self, max_fraction: float, at_end: bool = False) -> bool:
        n = self.total_done
        if n == 0 or (not at_end and n < MIN_IMAGES_FOR_FAILURE_CHECK):
            return False
        return self.total_failed / n > max_fraction

    @staticmethod
    def merge(parts: Sequence["Tally"]) -> "Tally":
        out = Tally()
        for t in parts:
            out.done += t.done
            out.failed += t.failed
            out.earlier_done += t.earlier_done
            out.earlier_failed += t.earlier_failed
            out.stopped |= t.stopped
            for k, v in t.by_reason.items():
                out.by_reason[k] = out.by_reason.get(k, 0) + v
            out.first += t.first[: max(FAILURES_SHOWN - len(out.first), 0)]
        return out

    def summary(self, max_fraction: float, out: Path) -> str:
        n, f = self.total_done, self.total_failed
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
        if self.earlier_failed:
            reasons += (", " if reasons else "") + f"in shards completed earlier: {self.earlier_failed}"
        first = "".join(f"\n  - {e}" for e in self.first)
        return (f"pseudolabel stopped: {f} of {n} images scored so far failed ({100.0 * f / max(n, 1):.1f}% > "
                f"max_failed_fraction {100.0 * max_fraction:g}%). Completed shards are kept in {out}. "
                f"Failures by reason: {reasons or 'none'}. First failures:{first or ' none'}\n"
                f"Fix or remove those files (or raise max_failed_fraction) and run the same command again: "
                f"completed shards are skipped.")


def run_pseudolabel(cfg: PseudolabelConfig, stats: Optional[Dict[str, Any]] = None) -> Path:
    """Build (or resume) the score store at ``cfg.out``; returns its path.

    ``stats``: a dict to fill with this process's scoring-loop timings (:func:`_score_shards`: images,
    seconds, ``writer_wait_s`` and ``stall_share``, the share of the loop spent waiting on the shard writer).

    Raises:
        TooManyFailedImages: more than ``cfg.max_failed_fraction`` of the images failed (checked once
            :data:`MIN_IMAGES_FOR_FAILURE_CHECK` images are done, and at the end); the completed shards are
            kept and the manifest is not finalised.
    """
    from accelerate import PartialState

    if not 0.0 <= cfg.max_failed_fraction <= 1.0:
        raise ConfigError(f"max_failed_fraction: expected a share in [0, 1], got {cfg.max_failed_fraction}")
    _check_pipeline_settings(cfg)
    if cfg.teachers:  # a teacher ensemble: one store per teacher + OUT/ensemble.json (vlpl/pseudolabel/ensemble.py)
        from vlpl.pseudolabel.ensemble import run_ensemble_pseudolabel

        return run_ensemble_pseudolabel(cfg, stats)
    state = PartialState(cpu=resolve_device(cfg.teacher.device).type == "cpu")
    out = store_path(cfg.out)  # a local path, or an fsspec URL (s3://..., docs/REMOTE_STORES.md)
    ds = load_dataset(cfg.data)
    if not ds.samples:
        raise ValueError(f"dataset at {cfg.data.root} has no samples")
    device = state.device if cfg.teacher.device == "auto" else torch.device(cfg.teacher.device)
    backend = create_backend(cfg.teacher, device)
    text, prompt_entry, prompts_record = teacher_text(cfg, backend, ds.classes)
    resize_mode = backend.resize_mode if cfg.views.resize_mode == "model" else cfg.views.resize_mode
    spec = _view_spec(cfg, backend, resize_mode)
    plan = ShardPlan(math.ceil(len(ds.samples) / cfg.shard_size), cfg.shard_size, len(ds.samples))
    identity: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "vlpl_version": __version__,
        "model": backend.identity(),
        **prompt_entry,  # templates, templates_sha256 (covering the descriptions), descriptions
        "classes": list(ds.classes),
        "classes_sha256": sha256_lines(ds.classes),
        "views": spec.to_dict(),
        "decode": decode_identity(cfg, backend.device),
        **backend.score_kind().to_dict(),  # score_kind, logit_scale (+ logit_bias): docs/TEACHERS.md
        "text_context_length": backend.context_length,
        **_score_form(cfg, spec, len(ds.classes), int(text.shape[1])).manifest_entry(),
        "score_dtype": "float16",
        "embedding_dim": int(text.shape[1]),
        "dataset": dataset_entry(cfg, ds),
        "labels_kind": ds.labels_kind,  # full | partial (vlpl.store.store.labels_kind_of)
        "observed": ds.observed_protocol,  # mode, seed, parameter (vlpl.data.observed.protocol_entry)
        "samples_sha256": samples_digest(ds),
        "shard_size": cfg.shard_size,
        "num_shards": plan.num_shards,
        "splits": {sp: int(n) for sp, n in zip(*np.unique([s.split for s in ds.samples], return_counts=True))},
    }
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as a stored manifest reads back
    writer = StoreWriter(out)
    try:
        if state.is_main_process:
            writer.prepare(identity, ds.classes, text.numpy(), overwrite=cfg.overwrite)
            if prompts_record is not None:  # the prompts used, beside the manifest (docs/TEACHERS.md)
                atomic_write_json(out / PROMPTS_FILE, prompts_record)
            save_resolved(cfg, out / "config.yaml")
        state.wait_for_everyone()

        mine = [i for i in range(plan.num_shards) if i % state.num_processes == state.process_index]
        todo = [i for i in mine if not writer.shard_complete(i, len(plan.rows(i)))]
        tally = Tally()
        for i in mine:
            if i not in todo:
                mark = _shard_mark(writer, i)
                tally.earlier_done += int(mark.get("rows", len(plan.rows(i))))
                tally.earlier_failed += int(mark.get("failed", 0))
        if len(todo) < len(mine):
            log.info("resuming: %d of %d shards of this process are already complete", len(mine) - len(todo),
                     len(mine))
        if todo:
            _score_shards(cfg, ds, backend, spec, text, plan, todo, writer, tally,
                          show=cfg.progress and state.is_local_main_process, stats=stats)
        state.wait_for_everyone()
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            tally = Tally.merge(gather_object([tally]))
        if tally.stopped or tally.too_many(cfg.max_failed_fraction, at_end=True):
            raise TooManyFailedImages(tally.summary(cfg.max_failed_fraction, out))
        if state.is_main_process:
            manifest = writer.finalize(identity, plan.num_shards, build_index=cfg.index)
            log.info("store %s: %d rows (%d failed), %d views x %d classes", out, manifest["num_rows"],
                     manifest["num_failed"], spec.num_views, len(ds.classes))
        state.wait_for_everyone()
    finally:
        writer.close()
    return out


PROMPTS_FILE = "prompts.json"


def _view_spec(cfg: PseudolabelConfig, backend: VLMBackend, resize_mode: str) -> ViewSpec:
    """The store's views from ``views.*`` and the teacher's preprocessing; with ``views.dense`` the dense
    patch-token view (refused, naming the key, for a score form other than dense or a tower without patch
    tokens: checked here on one blank crop, before anything is written)."""
    try:
        spec = ViewSpec(cfg.views.grid, cfg.views.flips, backend.preprocess.image_size, resize_mode,
                        backend.preprocess.interpolation, dense=cfg.views.dense, dense_topk=cfg.views.dense_topk)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if spec.dense:
        if cfg.score_format != "dense":
            raise ConfigError(f"views.dense: the dense patch-token view is stored with score_format=dense only "
                              f"(got score_format={cfg.score_format!r})")
        backend.encode_image_tokens(torch.zeros((1, 3, *spec.image_size), device=backend.device))
    return spec


def teacher_text(cfg: PseudolabelConfig, backend: VLMBackend, classes: Sequence[str]
                 ) -> Tuple[torch.Tensor, Dict[str, Any], Optional[Dict[str, Any]]]:
    """The class text embeddings (C, D) and what the store records about the prompts.

    Templates alone: open_clip's prompt ensembling (:meth:`VLMBackend.encode_text`). With
    ``teacher.descriptions``: each class's templated names plus its descriptions, every prompt's embedding
    normalised, averaged per class and re-normalised (:meth:`VLMBackend.encode_prompts`); ``templates_sha256``
    then covers the descriptions too, the manifest's ``descriptions`` names the file, its sha256 and the count,
    and the third value (written to ``prompts.json`` beside the manifest) lists every description used.
    """
    desc_file = cfg.teacher.descriptions
    templates = template_strings(cfg.teacher.templates, allow_empty=bool(desc_file))
    if not desc_file:
        return backend.encode_text(classes, templates), {"templates": templates,
                                                          "templates_sha256": templates_hash(templates)}, None
    descriptions = load_descriptions(desc_file, classes)
    text = backend.encode_prompts(class_prompts(classes, templates, descriptions))
    lines = templates + ["#descriptions"] + [f"{c}\t{d}" for c in classes for d in descriptions[c]]
    path = Path(desc_file).expanduser()
    entry = {"templates": templates, "templates_sha256": templates_hash(lines),
             "descriptions": {"file": str(path), "sha256": sha256_file(path), "prompts_file": PROMPTS_FILE,
                              "num_descriptions": sum(len(v) for v in descriptions.values())}}
    record = {"templates": templates, "descriptions": descriptions,
              "combination": "per class: each template formatted with the class name, then each description; "
                             "every prompt's text embedding L2-normalised, averaged, re-normalised"}
    log.info("teacher text: %d templates + %d descriptions over %d classes (%s)", len(templates),
             entry["descriptions"]["num_descriptions"], len(classes), path)
    return text, entry, record


def _score_form(cfg: PseudolabelConfig, spec: ViewSpec, C: int, D: int) -> ScoreForm:
    """The store's score form from ``score_format`` / ``topk`` (a bad value is a ConfigError naming the key)."""
    try:
        return ScoreForm.create(cfg.score_format, spec.num_views, C, D, cfg.topk)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _shard_mark(writer: StoreWriter, i: int) -> Dict[str, Any]:
    try:
        mark = json.loads((writer.shard_dir / f"{shard_name(i)}.json").read_text())
        return mark if isinstance(mark, dict) else {}
    except (OSError, ValueError):
        return {}


def _score_shards(cfg: PseudolabelConfig, ds: LabelledDataset, backend: VLMBackend, spec: ViewSpec,
                  text: torch.Tensor, plan: ShardPlan, shards: List[int], writer: StoreWriter, tally: Tally,
                  show: bool, stats: Optional[Dict[str, Any]] = None) -> None:
    """Score ``shards``; the shard writer (:func:`_shard_writer`) writes each as soon as its last row is in.
    Stops early (``tally.stopped``) when the failure share passes ``cfg.max_failed_fraction``: the shards
    already complete are written, the others dropped.

    The loop only decodes, makes views and runs the image tower; it hands the features (still on the
    device) to the writer, which computes the stored form, copies it to the host and writes the shard.
    """
    batches = plan_batches(plan, shards, cfg.batch_size)
    decoder = DecodeDataset(ds.image_source, [s.image for s in ds.samples], cfg.views.max_side, cfg.views.grid,
                            device_jpeg=cfg.decode == "device")
    loader = DataLoader(decoder, batch_sampler=batches, collate_fn=_collate,
                        num_workers=cfg.num_workers, pin_memory=backend.device.type == "cuda",
                        persistent_workers=False)
    C, D, V = len(ds.classes), int(text.shape[1]), spec.num_views
    form = _score_form(cfg, spec, C, D)
    scorer = Scorer(backend, spec, text, form=form)
    assembler = ShardAssembler({s: plan.rows(s) for s in shards}, _shard_fields(form, D),
                               encode=_encoder(form, scorer.text, spec),
                               write=lambda s, b: _write(writer, ds, plan, s, b, form))
    total = sum(len(plan.rows(s)) for s in shards)
    t0 = time.perf_counter()
    batches_in = iter(loader)  # the decode workers are forked before the writer thread starts
    sink = _shard_writer(cfg, assembler)
    with sink, progress(total, "pseudolabel", "img", enabled=show) as bar:
        for batch in batches_in:
            if decoder.device_jpeg:
                batch = _decode_jpegs(batch, decoder, backend.device)
            good = [(i, im) for i, im, _, _ in batch if im is not None]
            errors: Dict[int, str] = {}
            for i, im, err, reason in batch:
                if im is None:
                    errors[i] = err
                    tally.add_failure(err, reason)
                    log.warning("image failed, recorded as a failed row: %s", err)
            sink.submit(ScoredBatch(rows=[i for i, _, _, _ in batch], good=[i for i, _ in good],
                                    payload=scorer.features([im for _, im in good]) if good else None,
                                    errors=errors))
            tally.done += len(batch)
            bar.update(len(batch), failed=tally.failed)
            if tally.too_many(cfg.max_failed_fraction):
                tally.stopped = True
                log.error("%d of %d images failed so far (> max_failed_fraction %g): stopping after the "
                          "completed shards", tally.total_failed, tally.total_done, cfg.max_failed_fraction)
                break
    dt = time.perf_counter() - t0
    log.info("scored %d images (%d views each) in %.1fs: %.1f images/s, %.1f views/s; %d failed; the loop "
             "waited %.2fs (%.1f%%) on the %s shard writer", tally.done, V, dt, tally.done / max(dt, 1e-9),
             tally.done * V / max(dt, 1e-9), tally.failed, sink.wait_s, 100.0 * sink.wait_s / max(dt, 1e-9),
             cfg.writer)
    if stats is not None:
        stats.update(images=tally.done, seconds=dt, writer=cfg.writer, writer_wait_s=sink.wait_s,
                     writer_drain_s=getattr(sink, "drain_s", 0.0),
                     stall_share=sink.wait_s / max(dt, 1e-9), images_per_s=tally.done / max(dt, 1e-9),
                     max_pending=getattr(sink, "max_pending", 0), max_queued=getattr(sink, "max_seen", 0))


# --------------------------------------------------------------------------------------------------
# the shard writer (vlpl/store/async_writer.py): what the loop hands over, and how a shard is written
# --------------------------------------------------------------------------------------------------

WRITERS = ("background", "inline")
DECODERS = ("cpu", "device")


def _decode_jpegs(batch: List[Any], decoder: DecodeDataset, device: torch.device) -> List[Any]:
    """The batch's :class:`EncodedJPEG` items decoded on ``device`` in one call; an image the device cannot
    decode is decoded by the CPU path instead (so its failure, if any, is the same failed row as there)."""
    todo = [k for k, item in enumerate(batch) if isinstance(item[1], EncodedJPEG)]
    if not todo:
        return batch
    out = list(batch)
    for k, img in zip(todo, decode_on_device([batch[k][1] for k in todo], device)):
        if img is None:
            log.info("device JPEG decode failed for %s: decoding it on the CPU", printable(decoder.refs[batch[k][0]]))
            out[k] = decoder.cpu_item(batch[k][0])
        else:
            out[k] = (batch[k][0], img, None, None)
    return out


def _check_pipeline_settings(cfg: PseudolabelConfig) -> None:
    """``writer``, ``writer_queue``, ``decode``: a bad value is a ConfigError naming the key."""
    if cfg.writer not in WRITERS:
        raise ConfigError(f"writer: expected one of {', '.join(WRITERS)}, got {cfg.writer!r}")
    if not isinstance(cfg.writer_queue, int) or cfg.writer_queue < 0:
        raise ConfigError(f"writer_queue: expected a number of batches >= 0 (0 = one shard's worth), got "
                          f"{cfg.writer_queue!r}")
    if cfg.decode not in DECODERS:
        raise ConfigError(f"decode: expected one of {', '.join(DECODERS)}, got {cfg.decode!r}")


def _shard_writer(cfg: PseudolabelConfig, assembler: ShardAssembler) -> Any:
    """The configured writer around ``assembler``: a :class:`BackgroundWriter` holding at most
    ``writer_queue`` batches (0: one shard's worth, at least 2), or an :class:`InlineWriter`."""
    if cfg.writer == "inline":
        return InlineWriter(assembler)
    pending = cfg.writer_queue or max(2, math.ceil(cfg.shard_size / cfg.batch_size))
    return BackgroundWriter(assembler, pending)


def _shard_fields(form: ScoreForm, D: int) -> Dict[str, Tuple[Tuple[int, ...], Any]]:
    """The per-row arrays a shard buffer keeps: the form's payload columns and the global image embedding."""
    return {**form.payload(), "image_embedding": ((D,), np.float16)}


def _encoder(form: ScoreForm, text: torch.Tensor, spec: Optional[ViewSpec] = None):
    """features (n, V, D) on the device (with the dense view: :class:`DenseFeatures`) -> the rows' arrays on the
    host (run by the shard writer)."""

    def encode(feats: Any) -> Dict[str, np.ndarray]:
        with torch.no_grad():
            out = dict(_encode_payload(form, spec, feats, text) if spec is not None else encode_views(form, feats, text))
            out["image_embedding"] = _image_features(feats)[:, 0].to(torch.float16).cpu().numpy()
        return out

    return encode


def _write(writer: StoreWriter, ds: LabelledDataset, plan: ShardPlan, s: int, b: ShardBuffer, form: ScoreForm) -> None:
    payload = {k: b.arrays[k] for k in form.columns}
    emb, ok, errors = b.arrays["image_embedding"], b.ok, b.errors
    rows = plan.rows(s)
    samples = [ds.samples[i] for i in rows]
    known = np.array([sm.labels is not None for sm in samples], bool)
    C = len(ds.classes)
    labels = np.stack([sm.labels if sm.labels is not None else np.zeros(C, np.int8) for sm in samples]).astype(np.int8)
    writer.write_shard(s, ShardRows(
        sample_id=[printable(sm.sample_id) for sm in samples],  # a non-UTF-8 name is a failed row, shown escaped
        image=[printable(sm.image) for sm in samples],
        split=[sm.split for sm in samples],
        observed=np.stack([sm.observed for sm in samples]).astype(np.int8),
        labels=labels, labels_known=known, scores=None, image_embedding=emb, ok=ok, error=errors,
        payload=payload, form=form,
    ))
