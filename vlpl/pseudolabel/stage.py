"""``vlpl pseudolabel``: score every image and every view with a frozen VLM into a score store.

DataLoader workers decode images (a bad image becomes a failed row, never a crash); the main loop
makes all views of many images on the model's device with tensor ops and runs them through the image
tower in large batches under autocast (bf16 on GPU). Raw cosine scores (V x C) and the global-view
image embedding are written per shard, atomically. Under ``accelerate launch`` / ``torchrun`` process
``rank`` takes the shards ``i % world == rank``; the main process writes the manifest after a barrier.
Batches never straddle a shard, so the numbers in a shard do not depend on how many processes ran,
nor on where an interrupted run resumed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vlpl import __version__
from vlpl.config import PseudolabelConfig, save_resolved
from vlpl.data.readers import load_dataset
from vlpl.data.records import ImageLoadError, LabelledDataset
from vlpl.store.store import SCHEMA_VERSION, ShardRows, StoreWriter, sha256_lines
from vlpl.vlm.backend import VLMBackend, create_backend, resolve_device, template_strings, templates_hash
from vlpl.vlm.views import ViewSpec, make_views_batch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# decoding (DataLoader workers)
# --------------------------------------------------------------------------------------------------


class DecodeDataset(Dataset):
    """Item k -> (dataset index, uint8 (3, H, W) tensor or None, error or None)."""

    def __init__(self, ds: LabelledDataset, max_side: Optional[int] = None) -> None:
        self.ds = ds
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.ds.samples)

    def __getitem__(self, i: int) -> Tuple[int, Optional[torch.Tensor], Optional[str]]:
        try:
            img = self.ds.open_image(i)
            if self.max_side and max(img.size) > self.max_side:
                img.thumbnail((self.max_side, self.max_side))
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
            return i, torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), None
        except ImageLoadError as e:
            return i, None, str(e)
        except Exception as e:  # noqa: BLE001 - any decoder failure is recorded, never fatal
            return i, None, f"{self.ds.samples[i].image}: {type(e).__name__}: {e}"


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
    for s in ds.samples:
        h.update(f"{s.sample_id}\t{s.image}\t{s.split}\t".encode())
        h.update(np.ascontiguousarray(s.observed, np.int8).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------


class Scorer:
    """Views + image tower + cosine against the class embeddings, for a list of decoded images."""

    def __init__(self, backend: VLMBackend, spec: ViewSpec, text: torch.Tensor, max_views: int = 4096) -> None:
        self.backend = backend
        self.spec = spec
        self.text = text.to(backend.device, torch.float32)
        self.mean, self.std = backend.normalization()
        self.max_views = max_views

    @torch.no_grad()
    def __call__(self, images: List[torch.Tensor]) -> Tuple[np.ndarray, np.ndarray]:
        """-> scores (n, V, C) float16, global unflipped image embeddings (n, D) float16."""
        dev = self.backend.device
        views = make_views_batch([im.to(dev, non_blocking=True) for im in images], self.spec, self.mean, self.std)
        feats = torch.cat([self.backend.encode_image(views[k : k + self.max_views])
                           for k in range(0, len(views), self.max_views)])
        feats = feats.view(len(images), self.spec.num_views, -1)
        scores = feats @ self.text.T
        return scores.to(torch.float16).cpu().numpy(), feats[:, 0].to(torch.float16).cpu().numpy()


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def run_pseudolabel(cfg: PseudolabelConfig) -> Path:
    """Build (or resume) the score store at ``cfg.out``; returns its path."""
    from accelerate import PartialState

    state = PartialState(cpu=resolve_device(cfg.teacher.device).type == "cpu")
    out = Path(cfg.out)
    ds = load_dataset(cfg.data)
    if not ds.samples:
        raise ValueError(f"dataset at {cfg.data.root} has no samples")
    device = state.device if cfg.teacher.device == "auto" else torch.device(cfg.teacher.device)
    backend = create_backend(cfg.teacher, device)
    templates = template_strings(cfg.teacher.templates)
    text = backend.encode_text(ds.classes, templates)
    spec = ViewSpec(cfg.views.grid, cfg.views.flips, backend.preprocess.image_size, cfg.views.resize_mode,
                    backend.preprocess.interpolation)
    plan = ShardPlan(math.ceil(len(ds.samples) / cfg.shard_size), cfg.shard_size, len(ds.samples))
    identity: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "vlpl_version": __version__,
        "model": backend.identity(),
        "templates": templates,
        "templates_sha256": templates_hash(templates),
        "classes": list(ds.classes),
        "classes_sha256": sha256_lines(ds.classes),
        "views": spec.to_dict(),
        "score_kind": "cosine",
        "score_format": "dense",
        "score_dtype": "float16",
        "logit_scale": round(backend.logit_scale, 6),
        "embedding_dim": int(text.shape[1]),
        "dataset": {"name": ds.name, "format": cfg.data.format, "root": str(Path(ds.root).resolve())},
        "samples_sha256": samples_digest(ds),
        "shard_size": cfg.shard_size,
        "num_shards": plan.num_shards,
        "splits": {sp: int(n) for sp, n in zip(*np.unique([s.split for s in ds.samples], return_counts=True))},
    }
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as a stored manifest reads back
    writer = StoreWriter(out)
    if state.is_main_process:
        writer.prepare(identity, ds.classes, text.numpy(), overwrite=cfg.overwrite)
        save_resolved(cfg, out / "config.yaml")
    state.wait_for_everyone()

    mine = [i for i in range(plan.num_shards) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if not writer.shard_complete(i, len(plan.rows(i)))]
    if len(todo) < len(mine):
        log.info("resuming: %d of %d shards of this process are already complete", len(mine) - len(todo), len(mine))
    if todo:
        _score_shards(cfg, ds, backend, spec, text, plan, todo, writer,
                      show=cfg.progress and state.is_local_main_process and sys.stderr.isatty())
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = writer.finalize(identity, plan.num_shards, build_index=cfg.index)
        log.info("store %s: %d rows (%d failed), %d views x %d classes", out, manifest["num_rows"],
                 manifest["num_failed"], spec.num_views, len(ds.classes))
    state.wait_for_everyone()
    return out


def _score_shards(cfg: PseudolabelConfig, ds: LabelledDataset, backend: VLMBackend, spec: ViewSpec,
                  text: torch.Tensor, plan: ShardPlan, shards: List[int], writer: StoreWriter, show: bool) -> None:
    batches = plan_batches(plan, shards, cfg.batch_size)
    loader = DataLoader(DecodeDataset(ds, cfg.views.max_side), batch_sampler=batches, collate_fn=_collate,
                        num_workers=cfg.num_workers, pin_memory=backend.device.type == "cuda",
                        persistent_workers=False)
    scorer = Scorer(backend, spec, text)
    C, D, V = len(ds.classes), int(text.shape[1]), spec.num_views
    shard_of = {i: s for s in shards for i in plan.rows(s)}
    buf: Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray, List[Optional[str]]]] = {}
    filled: Dict[int, int] = {}
    total = sum(len(plan.rows(s)) for s in shards)
    t0, n_done, n_failed = time.perf_counter(), 0, 0
    with _progress(total, show, "pseudolabel") as bar:
        for batch in loader:
            good = [(i, im) for i, im, err in batch if im is not None]
            if good:
                scores, emb = scorer([im for _, im in good])
            for k, (i, _) in enumerate(good):
                s = shard_of[i]
                b = buf.setdefault(s, _new_buffer(len(plan.rows(s)), V, C, D))
                r = i - plan.rows(s).start
                b[0][r], b[1][r], b[2][r] = scores[k], emb[k], True
            for i, im, err in batch:
                if im is None:
                    s = shard_of[i]
                    b = buf.setdefault(s, _new_buffer(len(plan.rows(s)), V, C, D))
                    b[3][i - plan.rows(s).start] = err
                    n_failed += 1
                    log.warning("image failed, recorded as a failed row: %s", err)
            for i, _, _ in batch:
                s = shard_of[i]
                filled[s] = filled.get(s, 0) + 1
                if filled[s] == len(plan.rows(s)):
                    _write(writer, ds, plan, s, buf.pop(s))
            n_done += len(batch)
            bar.update(len(batch))
            bar.set_postfix(img_s=f"{n_done / max(time.perf_counter() - t0, 1e-9):.1f}", failed=n_failed)
    dt = time.perf_counter() - t0
    log.info("scored %d images (%d views each) in %.1fs: %.1f images/s, %.1f views/s; %d failed",
             n_done, V, dt, n_done / max(dt, 1e-9), n_done * V / max(dt, 1e-9), n_failed)


def _new_buffer(n: int, V: int, C: int, D: int):
    return (np.zeros((n, V, C), np.float16), np.zeros((n, D), np.float16), np.zeros(n, bool), [None] * n)


def _write(writer: StoreWriter, ds: LabelledDataset, plan: ShardPlan, s: int, b) -> None:
    scores, emb, ok, errors = b
    rows = plan.rows(s)
    samples = [ds.samples[i] for i in rows]
    known = np.array([sm.labels is not None for sm in samples], bool)
    C = len(ds.classes)
    labels = np.stack([sm.labels if sm.labels is not None else np.zeros(C, np.int8) for sm in samples]).astype(np.int8)
    writer.write_shard(s, ShardRows(
        sample_id=[sm.sample_id for sm in samples],
        image=[sm.image for sm in samples],
        split=[sm.split for sm in samples],
        observed=np.stack([sm.observed for sm in samples]).astype(np.int8),
        labels=labels, labels_known=known, scores=scores, image_embedding=emb, ok=ok, error=errors,
    ))
