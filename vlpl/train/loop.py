"""``vlpl train``: a short loop over named parts, readable top to bottom (accelerate's examples' style)::

    run = setup(cfg)                      # accelerator, resume checks, data, model, loss, rule, optimizer
    for epoch in ...:
        train_epoch(run, epoch)           # train_step per batch; a checkpoint every N steps / M minutes
        validate(run, epoch)              # EM+APL pass, scheduler, val/test mAP, best/
        checkpoint(run)                   # end of every epoch
    finish(run)                           # summary.json

Observed labels and cached CLIP scores come from the score store; pseudo-labels are derived from the cached
scores at every step by a registered rule (no CLIP forward pass in the loop). The loss is a registered
:class:`~vlpl.train.losses.SPMLLoss` that owns its label state (ROLE estimates, APL soft negatives, LL-Cp
corrections), checkpointed with the model.

Exact resume: vlpl owns the data order (:class:`~vlpl.train.data.EpochOrder`: permutation and flips from
``(seed, epoch)``; the training DataLoader is not handed to accelerate) and every random draw is re-seeded
from ``(seed, epoch, step)`` (:mod:`vlpl.train.step`), so a run killed at any point and resumed from its
last checkpoint ends with the weights of an uninterrupted run, byte for byte.

Input (issue 10.5, :mod:`vlpl.train.data`): DataLoader workers (``num_workers: auto`` from the CPUs) build
whole uint8 micro-batches; they travel pinned and ``non_blocking`` to the device, where they are flipped,
converted and normalised (on a CPU device the workers do that too); the rule's scores are read a few batches
ahead on a thread and the rule runs on the device. The loss is read back to the host every ``log_every``
steps only. ``compile: true`` runs the training forward through ``torch.compile``.

Run directory::

    config.yaml  classes.txt  store.json  metrics.jsonl  summary.json
    checkpoints/step_NNNNNNNNN/   vlpl checkpoint (vlpl/train/checkpoint.py: safetensors + plain data, hashed)
    best/                         the model at the best clean-val mAP
    predictions/<split>.npz       probs, labels, sample_ids of val and test at the best epoch
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlpl.config import ConfigError, TrainConfig, save_resolved, to_dict, yaml_load
from vlpl.data.images import ImageDataset, ImageSource
from vlpl.eval.report import run_summary_baseline
from vlpl.eval.selection import Selector, keeps_split, prediction_arrays
from vlpl.progress import progress as progress_bar
from vlpl.provenance import provenance
from vlpl.registry import LOSSES
from vlpl.store.atomic import atomic_path, atomic_write_json, atomic_write_text
from vlpl.store.store import IDENTITY_KEYS, ScoreStore, SplitReader
from vlpl.train.checkpoint import (
    CheckpointContent,
    fault_point,
    foreign_entries,
    list_checkpoints,
    load_latest,
    remove_orphans,
    save_checkpoint,
    set_rng_state,
)
from vlpl.train.data import (
    DeviceNormalize,
    EpochOrder,
    TrainImages,
    Uint8Resize,
    auto_prefetch,
    model_input,
    prefetch_scores,
    resolve_num_workers,
)
from vlpl.train.flops import forward_flops, peak_flops
from vlpl.train.losses import ObservedLabels, SPMLLoss, build_reconstruction, create_loss
from vlpl.train.model import ClassContext, Classifier, create_classifier
from vlpl.train.model_io import load_model, save_model
from vlpl.train.optim import create_optimizer, create_scheduler
from vlpl.train.phases import apply_phase, ddp_kwargs
from vlpl.train.step import RuleRunner, StepState, TrainBatch, train_step

log = logging.getLogger(__name__)

# keys that may differ between a run and its resumption (everything else must match: see _check_resume)
RESUME_MAY_CHANGE = ("epochs", "progress", "num_workers", "prefetch_factor", "log_every", "checkpoint_every_steps",
                     "checkpoint_every_minutes", "resume", "keep_checkpoints", "store", "out")
# keys written by the run itself (what it found, not what it was asked): not compared on resume
RECORDED_KEYS = ("student.pretrained_tag",)


@dataclass
class Progress:
    """Where the run is; saved as plain JSON in every checkpoint.

    ``epoch``: the last completed epoch; ``step``: micro-steps done in the run; ``epoch_step``: micro-steps
    done in epoch ``epoch + 1`` (0 at an epoch boundary: a mid-epoch checkpoint resumes at the next batch);
    ``epoch_*``: the running sums of the epoch in progress; ``metrics_bytes``: the length of metrics.jsonl
    when the checkpoint was written (a resumed run truncates it there: no duplicate records).
    """

    epoch: int = 0
    step: int = 0
    epoch_step: int = 0
    best_map: Optional[float] = None
    best_epoch: int = 0
    since_best: int = 0
    stop_reason: Optional[str] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    epoch_loss_sum: float = 0.0
    epoch_images: int = 0
    epoch_time_s: float = 0.0
    metrics_bytes: int = 0
    last_checkpoint_step: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Progress":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"progress.json: unknown keys {unknown}")
        return cls(**d)


class JsonlLog:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, rec: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()

    def size(self) -> int:
        return self.path.stat().st_size if self.enabled and self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Drop what was logged after a checkpoint (a resumed run logs those steps again)."""
        if self.enabled and self.path.exists() and self.path.stat().st_size > size:
            with open(self.path, "r+b") as f:
                f.truncate(size)


@dataclass
class Run:
    """Everything :func:`setup` builds; the named parts read and update it."""

    cfg: TrainConfig
    accelerator: Any
    out: Path
    store: ScoreStore
    train: SplitReader
    evals: Dict[str, SplitReader]
    model: torch.nn.Module
    loss: SPMLLoss
    rule: Optional[RuleRunner]
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    order: EpochOrder
    train_images: TrainImages
    normalize: DeviceNormalize
    num_workers: int
    eval_loaders: Dict[str, DataLoader]
    pass_loader: Optional[DataLoader]
    state: StepState
    progress: Progress
    metrics: JsonlLog
    flops: Optional[float]
    peak: Optional[float]
    main: bool
    last_checkpoint_time: float = field(default_factory=time.monotonic)
    selector: Any = None  # vlpl.eval.selection.Selector: the best-epoch criterion and the per-split scores


# ---- helpers -------------------------------------------------------------------------------------------


def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision: expected auto, no, bf16 or fp16, got {cfg.mixed_precision!r}")
    return cfg.mixed_precision


def _flops_per_image(model: torch.nn.Module, size: int) -> Optional[float]:
    """Forward FLOPs of one image, for throughput and MFU reporting (None if they cannot be counted)."""
    try:
        dev = next(model.parameters()).device
        return forward_flops(model, torch.zeros(1, 3, size, size, device=dev))
    except Exception:  # noqa: BLE001 - reporting only
        return None


def _save_npz(path: Path, **arrays: Any) -> None:
    """``np.savez`` with fixed zip timestamps, so identical runs write identical bytes."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
                z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def store_identity(store: ScoreStore) -> Dict[str, Any]:
    """What makes a store the same training data: the manifest's identity keys and its shards' sha256."""
    m = store.manifest
    ident = {k: m.get(k) for k in IDENTITY_KEYS}
    shards = "\n".join(f"{s.get('file')}:{s.get('sha256')}" for s in m.get("shards", []))
    ident["shards_sha256"] = hashlib.sha256(shards.encode()).hexdigest()
    ident["num_rows"] = m.get("num_rows")
    return json.loads(json.dumps(ident))  # plain JSON types, as read back from store.json


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict) and d:
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= n else s[:n - 3] + "..."


def _check_resume(cfg: TrainConfig, out: Path, ident: Dict[str, Any]) -> None:
    """Before anything is written: the resumed run's config and store must be the run's own (issue 9.4)."""
    saved_path = out / "config.yaml"
    if saved_path.exists():
        try:
            saved = yaml_load(saved_path.read_text(encoding="utf-8")) or {}
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{saved_path}: cannot read the run's saved config ({e})") from e
        old, new = _flatten(saved), _flatten(json.loads(json.dumps(to_dict(cfg))))
        diffs = [k for k in sorted(set(old) | set(new))
                 if k.split(".")[0] not in RESUME_MAY_CHANGE and k not in RECORDED_KEYS and old.get(k) != new.get(k)]
        if diffs:
            detail = "; ".join(f"{k}: run has {_short(old.get(k))}, now {_short(new.get(k))}" for k in diffs)
            raise ConfigError(f"resume=true: the config differs from the run's {saved_path} ({detail}). Only "
                              f"{', '.join(RESUME_MAY_CHANGE)} may change on resume; use another out= for a new run")
    saved_store = out / "store.json"
    if saved_store.exists():
        old_ident = json.loads(saved_store.read_text(encoding="utf-8"))
        diffs = [k for k in sorted(set(old_ident) | set(ident)) if old_ident.get(k) != ident.get(k)]
        if diffs:
            detail = "; ".join(f"{k}: run has {_short(old_ident.get(k))}, store {cfg.store} has {_short(ident.get(k))}"
                               for k in diffs)
            raise ConfigError(f"resume=true: the store is not the one this run trained on ({detail})")


def _terms_over_processes(accelerator: Any, terms: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Loss terms of the global batch for the log: the mean over processes of each process's batch mean
    (equal slices), and the sum for counts (``num_*``). A collective: every process calls it."""
    vals = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).to(accelerator.device)
    if accelerator.num_processes > 1:
        vals = accelerator.reduce(vals, reduction="mean")
    return {n: v * accelerator.num_processes if n.startswith("num_") else v for n, v in zip(terms, vals.tolist())}


@torch.no_grad()
def predict(accelerator: Any, model: torch.nn.Module, loader: DataLoader, n: int, num_classes: int,
            normalize: Optional[DeviceNormalize] = None) -> np.ndarray:
    """Sigmoid outputs (n, C) in dataset order, gathered over processes; ``normalize`` turns the loader's
    uint8 batches into the model's input on the device."""
    probs = np.zeros((n, num_classes), np.float32)
    for p, k in predict_batches(accelerator, model, loader, normalize):
        probs[k] = p
    return probs


def predict_batches(accelerator: Any, model: torch.nn.Module, loader: DataLoader,
                    normalize: Optional[DeviceNormalize] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """:func:`predict` a batch at a time: ``(probs (b, C) float32, positions (b,))`` numpy pairs, gathered over
    processes, in the loader's order (memory: one batch, whatever the set's size)."""
    model.eval()
    for x, k in loader:
        if normalize is not None:
            x = model_input(x, None, normalize)
        with accelerator.autocast():
            logits = model(x)
        p, k = accelerator.gather_for_metrics((torch.sigmoid(logits.float()), k))
        yield p.cpu().numpy(), k.cpu().numpy()


def _loader_kwargs(cfg: TrainConfig, workers: int, device: torch.device) -> Dict[str, Any]:
    """DataLoader settings of every loader of the run: workers, their prefetch depth, pinned memory on CUDA."""
    kw: Dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kw["prefetch_factor"] = cfg.prefetch_factor or auto_prefetch(workers)
    return kw


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"


# ---- the named parts ------------------------------------------------------------------------------------


def setup(cfg: TrainConfig) -> Run:
    """Accelerator, resume checks (before anything is written), data, model, loss, rule, optimizer, state."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    out = Path(cfg.out)
    # split_batches: eval_batch_size is a global batch whatever the process count (the prepared eval loaders).
    # It must go through DataLoaderConfiguration: Accelerator(split_batches=True) is silently ignored
    # (huggingface/accelerate#3177). The training loader is vlpl's own (EpochOrder), never prepared.
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(split_batches=True),
                              kwargs_handlers=ddp_kwargs(cfg.phases))
    W = accelerator.num_processes
    for key in ("batch_size", "eval_batch_size"):  # both are global batches, split across processes
        if getattr(cfg, key) % W:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be divisible by the {W} processes")
    if cfg.grad_accum < 1:
        raise ConfigError(f"grad_accum must be >= 1, got {cfg.grad_accum}")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    main = accelerator.is_main_process

    # ---- the store, and the resume checks: nothing is written before they pass --------------------------
    store = ScoreStore.open(cfg.store, weights=cfg.ensemble_weights)  # a store, or a teacher ensemble
    if hasattr(store, "check_training"):  # a `vlpl export` dataset refuses what it cannot serve (issue 13.4)
        store.check_training(cfg)
    ident = store_identity(store)
    ckdir = out / "checkpoints"
    held = list_checkpoints(ckdir) + foreign_entries(ckdir)
    if held and not cfg.resume:
        raise ConfigError(f"{out} already holds a run ({held[-1].name}); pass resume=true to continue it, "
                          f"or choose another out=")
    content: Optional[CheckpointContent] = None
    if cfg.resume and held:
        _check_resume(cfg, out, ident)
        content = load_latest(ckdir)  # verified; foreign files refused unread
    images = store.image_source(cfg.data_root, cfg.images) if hasattr(store, "image_source") else \
        ImageSource.from_store(store.dataset_info, cfg.data_root, cfg.images)  # a dataset's own images (13.4)

    # ---- data: the store's read API (labels in memory, scores read per batch) ---------------------------
    use_rule = cfg.pseudo.rule is not None
    train = store.split("train")
    evals = {s: store.split(s) for s in (cfg.val_split, cfg.test_split) if s in store.splits()}
    evals = {s: d for s, d in evals.items() if keeps_split(cfg.select, s, cfg.val_split, d)}  # vlpl.eval.selection
    selector = Selector(cfg.select, evals.get(cfg.val_split), cfg.pseudo.rule, cfg.pseudo.params)
    if not len(train):
        raise ValueError(f"store {cfg.store} has no usable 'train' rows")
    for s, counts in store.split_counts().items():
        if counts["failed"] and (s == "train" or s in evals):
            log.warning("%s: %d rows failed in the pseudolabel stage and are left out", s, counts["failed"])
    if cfg.val_split not in evals:
        log.warning("no labelled '%s' split: the last epoch is kept instead of the best by val mAP", cfg.val_split)

    # ---- model, loss, rule, optimizer ---------------------------------------------------------------
    set_seed(cfg.seed)
    model = create_classifier(cfg.student, ClassContext.from_store(store))
    cfg.student.pretrained_tag = model.pretrained_tag  # the weights actually loaded, recorded in config.yaml
    # the observed labels stay in the store: the loss and the rule read the batch's rows (observed_at)
    train_obs = ObservedLabels(train, shape=(len(train), store.num_classes))
    loss_fn = create_loss(cfg.loss.name, train_obs, **cfg.loss.params)
    loss_fn.bind_model(model)  # a loss keeping a copy of the student (CSL's model EMA): before prepare/resume
    if loss_fn.requires_pseudo and not use_rule:
        raise ConfigError(f"loss {cfg.loss.name!r} needs pseudo-labels: set pseudo.rule (e.g. damp)")
    if cfg.loss.reconstruction:  # Decision 5 (ours, off by default): before the optimizer takes its parameters
        try:
            loss_fn.set_reconstruction(build_reconstruction(
                model, cfg.loss.reconstruction, store.embedding_dim, cfg.student.image_size, seed=cfg.seed,
                lr=cfg.optim.head_lr if cfg.optim.head_lr is not None else cfg.optim.lr))
        except ValueError as e:
            raise ConfigError(f"loss.reconstruction: {e}") from e
    rule = RuleRunner(cfg.pseudo.rule, cfg.pseudo.params, cfg.pseudo.dynamic,
                      lambda pos: torch.from_numpy(train.scores(pos)), train_obs, split=train,
                      variant=cfg.pseudo.variant) \
        if use_rule else None
    optimizer = create_optimizer(cfg.optim, model, loss_fn.param_groups(cfg.optim.lr))
    scheduler = create_scheduler(cfg.optim, optimizer, cfg.epochs)  # per epoch; not prepared: we step it
    flops = _flops_per_image(model, cfg.student.image_size)

    # input pipeline (issue 10.5): workers decode + resize to uint8; convert, normalise, flip on the device
    try:
        workers = resolve_num_workers(cfg.num_workers)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.prefetch_factor is not None and cfg.prefetch_factor < 1:
        raise ConfigError(f"prefetch_factor: expected a count >= 1 or null, got {cfg.prefetch_factor}")
    # (training on the CPU: the workers do the float work too, in parallel, instead of the main process)
    normalize = DeviceNormalize(model.mean, model.std, accelerator.device)
    in_worker = normalize if accelerator.device.type == "cpu" and workers > 0 else None
    tf = Uint8Resize(cfg.student.image_size, normalize=in_worker)
    loader_kw = _loader_kwargs(cfg, workers, accelerator.device)
    order = EpochOrder(len(train), cfg.batch_size, cfg.seed, cfg.hflip, W, accelerator.process_index,
                       cfg.max_steps_per_epoch)
    train_images = TrainImages(ImageDataset(images, train.images, Uint8Resize(cfg.student.image_size)),
                               normalize=in_worker)
    eval_loaders = {s: DataLoader(ImageDataset(images, d.images, tf), batch_size=cfg.eval_batch_size,
                                  shuffle=False, **loader_kw) for s, d in evals.items()}
    pass_loader = DataLoader(ImageDataset(images, train.images, tf), batch_size=cfg.eval_batch_size, shuffle=False,
                             **loader_kw) if loss_fn.needs_train_pass else None
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_loaders = {s: accelerator.prepare(dl) for s, dl in eval_loaders.items()}
    if pass_loader is not None:
        pass_loader = accelerator.prepare(pass_loader)
    loss_fn.to(accelerator.device)
    loss_fn.set_distributed(W > 1)  # global-batch statistics, synced loss state
    state = StepState(optimizer=optimizer, device=accelerator.device, seed=cfg.seed, grad_accum=cfg.grad_accum,
                      num_processes=W, process_index=accelerator.process_index, autocast=accelerator.autocast,
                      backward=accelerator.backward, no_sync=accelerator.no_sync,
                      forward=torch.compile(model) if cfg.compile else None,
                      image_embeddings=(lambda pos: torch.from_numpy(train.image_embeddings(pos)))
                      if loss_fn.uses_features else None)

    # ---- outputs, then the checkpoint's state -------------------------------------------------------
    metrics = JsonlLog(out / "metrics.jsonl", main)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for orphan in remove_orphans(ckdir):
            log.info("removed %s (a checkpoint write that did not finish)", orphan)
        save_resolved(cfg, out / "config.yaml")
        atomic_write_text(out / "classes.txt", "".join(f"{c}\n" for c in store.classes))
        atomic_write_json(out / "store.json", ident)
    prog = Progress()
    if content is not None:
        accelerator.unwrap_model(model).load_state_dict(content.model)
        loss_fn.load_state_dict(content.loss)
        optimizer.load_state_dict(content.optimizer)
        scheduler.load_state_dict(content.scheduler)
        set_rng_state(content.rng)
        prog = Progress.from_dict(content.progress)
        metrics.truncate(prog.metrics_bytes)
        log.info("resumed from %s (epoch %d done, %d steps into epoch %d)", content.path, prog.epoch,
                 prog.epoch_step, prog.epoch + 1)
    elif main and metrics.path.exists():
        metrics.path.unlink()
    accelerator.wait_for_everyone()
    return Run(cfg=cfg, accelerator=accelerator, out=out, store=store, train=train, evals=evals, model=model,
               loss=loss_fn, rule=rule, optimizer=optimizer, scheduler=scheduler, order=order,
               train_images=train_images, normalize=normalize, num_workers=workers, eval_loaders=eval_loaders, pass_loader=pass_loader, state=state,
               progress=prog, metrics=metrics, flops=flops, peak=peak_flops(accelerator.device), main=main,
               selector=selector)


def _checkpoint_due(run: Run, log_step: bool) -> bool:
    """Every ``checkpoint_every_steps`` micro-steps and/or ``checkpoint_every_minutes`` minutes. The time
    test runs on the main process at log steps and is broadcast, so all processes agree."""
    cfg, p = run.cfg, run.progress
    if cfg.checkpoint_every_steps and p.step - p.last_checkpoint_step >= cfg.checkpoint_every_steps:
        return True
    if cfg.checkpoint_every_minutes is None:
        return False
    due = time.monotonic() - run.last_checkpoint_time >= 60.0 * cfg.checkpoint_every_minutes
    if run.accelerator.num_processes == 1:
        return due
    if not log_step:
        return False
    from accelerate.utils import broadcast

    flag = broadcast(torch.tensor([int(due)], device=run.accelerator.device), from_process=0)
    return bool(flag.item())


def train_epoch(run: Run, epoch: int) -> None:
    """The training batches of ``epoch`` (from the checkpoint's position when resuming mid-epoch)."""
    cfg, p, acc, order = run.cfg, run.progress, run.accelerator, run.order
    start = p.epoch_step
    run.loss.set_epoch(epoch, cfg.epochs)
    run.model.train()
    apply_phase(run.model, cfg.phases, epoch, run.optimizer, run.scheduler, start, cfg.optim.lr)  # Cole's phases
    run.loss.train()
    # a worker builds a whole micro-batch (uint8); the rule's scores are read a few batches ahead on a thread
    loader: Any = DataLoader(run.train_images, sampler=order.plans(epoch, start), batch_size=None,
                             **_loader_kwargs(cfg, run.num_workers, acc.device))
    if run.rule is not None:
        loader = prefetch_scores(loader, run.train.scores, pin=acc.device.type == "cuda")
    steps = order.steps_per_epoch
    loss_sum = torch.tensor(p.epoch_loss_sum, dtype=torch.float64, device=acc.device)
    t_epoch = t_last = t_start = time.perf_counter()
    wait, n_img_log = 0.0, 0
    W = acc.num_processes
    with progress_bar(total=steps - start, desc=f"epoch {epoch}/{cfg.epochs}", unit="step",
                      enabled=cfg.progress and run.main) as bar:
        t_fetch = time.perf_counter()
        for s, item in enumerate(loader, start=start):
            wait += time.perf_counter() - t_fetch
            if item["step"] != s:  # the plans and the loop must agree on the position (exact resume)
                raise RuntimeError(f"training loader gave step {item['step']} where step {s} was expected")
            batch = TrainBatch(images=model_input(item["images"], item["flip"], run.normalize), index=item["index"],
                               flip=item["flip"], epoch=epoch, step=p.step,
                               global_index=item["global_index"].numpy() if W > 1 else None,
                               sync=(s + 1) % cfg.grad_accum == 0 or s == steps - 1, scores=item.get("scores"),
                               global_flip=torch.from_numpy(order.flips(epoch)[item["global_index"].numpy()])
                               if W > 1 else None)
            out = train_step(batch, run.model, run.loss, run.rule, run.state)
            p.step += 1
            p.epoch_step = s + 1
            loss_sum += out.terms["loss"].double()
            n = len(out.global_index)
            p.epoch_images += n
            n_img_log += n
            bar.update(1)
            fault_point("step")
            log_step = p.step % cfg.log_every == 0 or s == steps - 1
            if log_step:
                now = time.perf_counter()
                ips = n_img_log / max(now - t_last, 1e-9)
                rec = _step_record(run, epoch, out, ips, wait / max(now - t_start, 1e-9))
                run.metrics.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{ips:.1f}")
                t_last, n_img_log = now, 0
            if out.stepped and s < steps - 1 and _checkpoint_due(run, log_step):
                p.epoch_loss_sum = float(loss_sum)
                p.epoch_time_s += time.perf_counter() - t_epoch
                t_epoch = time.perf_counter()
                checkpoint(run)
            t_fetch = time.perf_counter()
    p.epoch_loss_sum = float(loss_sum)
    p.epoch_time_s += time.perf_counter() - t_epoch
    run.loss.sync_state()


def _step_record(run: Run, epoch: int, out: Any, ips: float, wait_frac: float) -> Dict[str, Any]:
    opt = run.optimizer
    rec: Dict[str, Any] = {"kind": "step", "epoch": epoch, "step": run.progress.step,
                           **_terms_over_processes(run.accelerator, out.terms),
                           "lr": opt.param_groups[0]["lr"], "head_lr": opt.param_groups[1]["lr"],
                           "images_per_s": ips, "data_wait_frac": wait_frac}
    if out.pseudo is not None:  # over the global batch
        idx = torch.from_numpy(np.asarray(out.global_index)).long()
        unk = run.rule.observed.rows(idx) == 0
        pseudo = out.pseudo.cpu()  # a log step: the one place the pseudo-labels come back to the host
        rec["pseudo_pos_per_image"] = float(((pseudo == 1) & unk).sum() / len(idx))
        rec["pseudo_neg_per_image"] = float(((pseudo == -1) & unk).sum() / len(idx))
    if run.flops:
        rec["tflops_per_s"] = 3 * run.flops * ips / 1e12  # forward + backward ~ 3x forward
        if run.peak:
            rec["mfu"] = 3 * run.flops * ips / run.peak
    return rec


def validate(run: Run, epoch: int) -> None:
    """End of ``epoch``: EM+APL's pass over the training set, the scheduler, val/test mAP, best/, early stop."""
    cfg, p, acc = run.cfg, run.progress, run.accelerator
    C = run.store.num_classes
    extra: Dict[str, float] = {}
    if run.pass_loader is not None:  # streamed: the loss reads the pass batch by batch (bounded memory)
        extra = run.loss.end_epoch_stream(
            ((torch.from_numpy(pr), torch.from_numpy(k))
             for pr, k in predict_batches(acc, run.model, run.pass_loader, run.normalize)),
            epoch, workdir=run.out if run.out.is_dir() else None)
    run.scheduler.step()
    maps: Dict[str, float] = {}
    preds: Dict[str, np.ndarray] = {}
    for s, dl in run.eval_loaders.items():
        preds[s] = predict(acc, run.model, dl, len(run.evals[s]), C, run.normalize)
        maps[s] = run.selector.score(s, run.evals[s], preds[s], is_val=s == cfg.val_split)
        fault_point("validate")
    val_map = maps.get(cfg.val_split)
    best_model = None
    for name, other in run.loss.eval_models().items():
        # a loss's extra models (CSL's model EMA) are scored too; the better val score counts, best/ holds its model
        o_preds = {s: predict(acc, other, dl, len(run.evals[s]), C, run.normalize) for s, dl in run.eval_loaders.items()}
        o_maps = {s: run.selector.score(s, run.evals[s], o_preds[s], is_val=s == cfg.val_split) for s in o_preds}
        extra.update({"val_map_model": maps.get(cfg.val_split), f"val_map_{name}": o_maps.get(cfg.val_split)})
        if val_map is not None and o_maps.get(cfg.val_split) is not None and o_maps[cfg.val_split] > val_map:
            preds, maps, val_map, best_model = o_preds, o_maps, o_maps[cfg.val_split], other
            extra["scored_by"] = name
    improved = val_map is None or p.best_map is None or val_map > p.best_map
    if improved:
        p.best_map = val_map if val_map is not None else p.best_map
        p.best_epoch, p.since_best = epoch, 0
        if run.main:
            _save_best(run, preds, best_model)
    else:
        p.since_best += 1
    n_steps = max(p.epoch_step, 1)
    train_loss = _terms_over_processes(acc, {"loss": torch.tensor(p.epoch_loss_sum / n_steps)})["loss"]
    rec = {"kind": "epoch", "epoch": epoch, "step": p.step, "train_loss": train_loss,
           "val_map": val_map, "test_map": maps.get(cfg.test_split), "epoch_time_s": p.epoch_time_s,
           "images_per_s": p.epoch_images / max(p.epoch_time_s, 1e-9), "best_epoch": p.best_epoch,
           "select": run.selector.criterion, **extra}
    p.history.append(rec)
    run.metrics.write(rec)
    log.info("epoch %d: train loss %.4f, val mAP %s, test mAP %s, %.1f img/s", epoch, train_loss,
             _fmt(val_map), _fmt(rec["test_map"]), rec["images_per_s"])
    if val_map is not None and cfg.early_stop_drop is not None and p.best_map is not None \
            and val_map < p.best_map - cfg.early_stop_drop:
        p.stop_reason = f"val mAP {val_map:.2f} fell more than {cfg.early_stop_drop} below the best {p.best_map:.2f}"
    if cfg.early_stop_patience is not None and p.since_best >= cfg.early_stop_patience:
        p.stop_reason = f"no better val mAP for {p.since_best} epoch(s)"
    p.epoch, p.epoch_step = epoch, 0
    p.epoch_loss_sum, p.epoch_images, p.epoch_time_s = 0.0, 0, 0.0
    fault_point("epoch_end")


def checkpoint(run: Run) -> None:
    """Save the run's state (a collective: every process calls it; the main process writes)."""
    acc, p = run.accelerator, run.progress
    run.loss.sync_state()  # LL-Cp writes of every process, before the main process saves them
    model_state = acc.get_state_dict(run.model)
    acc.wait_for_everyone()
    if run.main:
        p.last_checkpoint_step = p.step
        p.metrics_bytes = run.metrics.size()
        save_checkpoint(run.out / "checkpoints", p.step, model_state, run.loss.state_dict(),
                        run.optimizer.state_dict(), run.scheduler.state_dict(), p.to_dict(),
                        run.cfg.keep_checkpoints)
    p.last_checkpoint_step = p.step
    run.last_checkpoint_time = time.monotonic()
    acc.wait_for_everyone()


def _store_path(store: Any) -> Any:
    """The run's store as summary.json records it: an absolute path, or a list of them (a teacher ensemble given
    as store=[A,B])."""
    from vlpl.store.fs import is_url

    if isinstance(store, str) and store.startswith("hf:"):  # an exported dataset (a hub id): as given
        return store

    def one(p: Any) -> str:  # an fsspec URL (s3://..., memory://...) as given: Path() would collapse its //
        return str(p) if is_url(str(p)) else str(Path(p).resolve())

    return [one(p) for p in store] if isinstance(store, (list, tuple)) else one(store)


def finish(run: Run) -> None:
    """summary.json, and the accelerator's end."""
    cfg, p = run.cfg, run.progress
    if run.main:
        best = next((h for h in p.history if h["epoch"] == p.best_epoch), {})
        summary = {
            "method": cfg.method, "dataset": cfg.dataset, "loss": cfg.loss.name, "rule": cfg.pseudo.rule,
            "store": _store_path(cfg.store), "backbone": f"{cfg.student.kind}:{cfg.student.name}",
            "epochs_run": len(p.history), "best_epoch": p.best_epoch,
            "best_val_map": best.get("val_map"), "test_map_at_best": best.get("test_map"),
            "stop_reason": p.stop_reason, "num_train": len(run.train),
            "num_eval": {s: len(d) for s, d in run.evals.items()}, "flops_per_image_forward": run.flops,
            "provenance": provenance(),  # command, commit, device (vlpl.provenance; the results page needs them)
            "select": run.selector.criterion if cfg.val_split in run.evals else "last",
        }
        if cfg.test_split in run.evals:  # the zero-label baseline: the teacher's own zero-shot mAP (issue 14.13)
            summary["teacher_baseline"] = run_summary_baseline(run.store, cfg.test_split, cfg.pseudo.rule,
                                                               cfg.pseudo.params, summary["test_map_at_best"])
        atomic_write_json(run.out / "summary.json", summary)
        log.info("best epoch %d: val mAP %s, test mAP %s -> %s", p.best_epoch, _fmt(summary["best_val_map"]),
                 _fmt(summary["test_map_at_best"]), run.out)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()


def run_train(cfg: TrainConfig) -> Path:
    """Train a classifier on a score store (see the module docstring); returns the run directory."""
    # a loss's first phase (CSL's class prior: e.g. its temporary Ignore-mode model); SPMLLoss's default: nothing
    prepare = getattr(LOSSES.get(cfg.loss.name), "prepare_training", None)
    if prepare is not None:
        cfg = prepare(cfg)
    run = setup(cfg)
    run_epochs(run)
    finish(run)
    return run.out


def run_epochs(run: Run) -> None:
    """Train from the epoch after the last finished one to ``run.cfg.epochs``: each epoch trained, validated and
    checkpointed; stops early when validation sets ``run.progress.stop_reason``."""
    for epoch in range(run.progress.epoch + 1, run.cfg.epochs + 1):
        if run.progress.stop_reason:
            break
        train_epoch(run, epoch)
        validate(run, epoch)
        checkpoint(run)
        if run.progress.stop_reason:
            log.info("early stop after epoch %d: %s", epoch, run.progress.stop_reason)


# ---- the best model -------------------------------------------------------------------------------------


def _save_best(run: Run, preds: Dict[str, np.ndarray], model: Optional[torch.nn.Module] = None) -> None:
    """best/ (vlpl.train.model_io: safetensors + JSON, byte-identical for identical weights) and the
    predictions of the eval splits; ``model``: a loss's extra model that scored them (CSL's EMA), else the student."""
    if model is not None:
        save_model(run.out / "best", model, run.cfg.student, state_dict=model.state_dict())
    else:
        model = run.accelerator.unwrap_model(run.model)
        save_model(run.out / "best", model, run.cfg.student, state_dict=run.accelerator.get_state_dict(run.model))
    for s, pr in preds.items():
        _save_npz(run.out / "predictions" / f"{s}.npz", probs=pr, **prediction_arrays(run.evals[s]),
                  sample_ids=np.asarray(run.evals[s].sample_ids, dtype=str))


def load_best(run: Path) -> Tuple[Classifier, List[str]]:
    """The best model of a finished run, rebuilt from best/ alone (no pickle, nothing imported by name
    from the files), in eval mode, with its class names."""
    model = load_model(Path(run) / "best")
    return model.eval(), list(model.context.names)
