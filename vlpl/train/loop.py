"""``vlpl train``: one training function, readable top to bottom (accelerate's examples' style).

Observed labels and cached CLIP scores come from the score store; pseudo-labels are derived from
the cached scores at every step by a registered rule (no CLIP forward pass in the loop). The loss is a
registered :class:`~vlpl.train.losses.SPMLLoss` that owns its label state (ROLE estimates, APL soft
negatives, LL-Cp corrections), checkpointed with the model.

Run directory::

    config.yaml  classes.txt  metrics.jsonl  summary.json
    checkpoints/epoch_NNN/     accelerate state (model, optimizer, scheduler, RNG, loss state, progress)
    best/model.pt              weights at the best clean-val mAP
    predictions/<split>.npz    probs, labels, sample_ids of val and test at the best epoch
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlpl.config import ConfigError, TrainConfig, save_resolved
from vlpl.eval.metrics import mean_average_precision
from vlpl.pseudolabel.rules import apply_rule
from vlpl.registry import RULES, check_kwargs
from vlpl.store.atomic import atomic_path, atomic_write_json, atomic_write_text
from vlpl.store.store import ScoreStore
from vlpl.train.data import EpochShuffle, ImageRows, SplitData, image_transform, load_split
from vlpl.train.flops import forward_flops, peak_flops
from vlpl.train.losses import LossBatch, create_loss
from vlpl.train.model import Classifier, create_classifier

log = logging.getLogger(__name__)

class Progress:
    """Training progress that is checkpointed with the model (accelerate custom object)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.step = 0
        self.best_map = -math.inf
        self.best_epoch = 0
        self.since_best = 0
        self.history: List[Dict[str, Any]] = []

    def state_dict(self) -> Dict[str, Any]:
        return dict(epoch=self.epoch, step=self.step, best_map=self.best_map, best_epoch=self.best_epoch,
                    since_best=self.since_best, history=json.dumps(self.history))

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.epoch, self.step = int(d["epoch"]), int(d["step"])
        self.best_map, self.best_epoch = float(d["best_map"]), int(d["best_epoch"])
        self.since_best, self.history = int(d["since_best"]), json.loads(d["history"])


class JsonlLog:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, rec: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()


def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision: expected auto, no, bf16 or fp16, got {cfg.mixed_precision!r}")
    return cfg.mixed_precision


def _optimizer(cfg: TrainConfig, model: Classifier, extra_groups: List[dict]) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = [{"params": list(model.backbone_parameters()), "lr": o.lr, "name": "backbone"},
              {"params": list(model.head_parameters()), "lr": o.head_lr if o.head_lr is not None else o.lr,
               "name": "head"}] + extra_groups
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    raise ConfigError(f"optim.name: expected 'adam' or 'adamw', got {o.name!r}")


def _scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch."""
    o, E = cfg.optim, cfg.epochs
    if o.scheduler == "none":
        fn = lambda e: 1.0  # noqa: E731
    elif o.scheduler == "cosine":
        fn = lambda e: 0.5 * (1 + math.cos(math.pi * min(e, E) / E))  # noqa: E731
    elif o.scheduler == "step":
        fn = lambda e: o.gamma ** (e // o.step_size)  # noqa: E731
    else:
        raise ConfigError(f"optim.scheduler: expected none, cosine or step, got {o.scheduler!r}")
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)


def _flops_per_image(model: Classifier, size: int) -> Optional[float]:
    """Forward FLOPs of one image, for throughput and MFU reporting (None if they cannot be counted)."""
    try:
        dev = next(model.parameters()).device
        return forward_flops(model, torch.zeros(1, 3, size, size, device=dev))
    except Exception:  # noqa: BLE001 - reporting only
        return None


def _save_npz(path: Path, **arrays: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _checkpoint_dirs(out: Path) -> List[Path]:
    d = out / "checkpoints"
    return sorted(p for p in d.glob("epoch_*") if (p / "complete.json").exists()) if d.exists() else []


def _save_checkpoint(accelerator: Any, out: Path, epoch: int, keep: int) -> None:
    """Save to a temporary directory, mark it complete, rename; then prune to the newest ``keep``
    (accelerate's own rotation deletes the old checkpoint before the new one is written)."""
    ckdir = out / "checkpoints"
    final = ckdir / f"epoch_{epoch:03d}"
    tmp = ckdir / f".tmp-epoch_{epoch:03d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "complete.json", {"epoch": epoch})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoint_dirs(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


@torch.no_grad()
def predict(accelerator: Any, model: torch.nn.Module, loader: DataLoader, n: int, num_classes: int) -> np.ndarray:
    """Sigmoid outputs (n, C) in dataset order, gathered over processes."""
    model.eval()
    probs = np.zeros((n, num_classes), np.float32)
    for x, k in loader:
        with accelerator.autocast():
            logits = model(x)
        p, k = accelerator.gather_for_metrics((torch.sigmoid(logits.float()), k))
        probs[k.cpu().numpy()] = p.cpu().numpy()
    return probs


def _terms_over_processes(accelerator: Any, terms: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Loss terms of the global batch for the log: the mean over processes of each process's batch mean
    (equal slices), and the sum for counts (``num_*``). A collective: every process calls it."""
    vals = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).to(accelerator.device)
    if accelerator.num_processes > 1:
        vals = accelerator.reduce(vals, reduction="mean")
    return {n: v * accelerator.num_processes if n.startswith("num_") else v for n, v in zip(terms, vals.tolist())}


def run_train(cfg: TrainConfig) -> Path:
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    # split_batches: batch_size is the global batch (the papers' number) whatever the process count. It must go
    # through DataLoaderConfiguration: Accelerator(split_batches=True) is accepted and silently ignored
    # (huggingface/accelerate#3177), which left every process with a whole batch.
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    if not accelerator.split_batches:  # guard against the option being dropped again
        raise RuntimeError("accelerate did not enable split_batches; vlpl's global batch size depends on it")
    for key in ("batch_size", "eval_batch_size"):  # both are global batches, split across processes
        if getattr(cfg, key) % accelerator.num_processes:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be divisible by the {accelerator.num_processes} "
                              f"processes")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    main = accelerator.is_main_process

    # ---- data from the store ------------------------------------------------------------------------
    store = ScoreStore(Path(cfg.store))
    C = store.num_classes
    arrays = store.arrays(("sample_id", "image", "split", "observed", "labels", "scores", "status"))
    data_root = Path(cfg.data_root or store.manifest["dataset"]["root"])
    if not data_root.is_dir():
        raise FileNotFoundError(f"data_root {data_root} (images of the store {cfg.store}) does not exist; "
                                f"set data_root=...")
    use_rule = cfg.pseudo.rule is not None
    train = load_split(store, arrays, "train", with_scores=use_rule)
    evals = {s: load_split(store, arrays, s, with_scores=False) for s in (cfg.val_split, cfg.test_split)}
    evals = {s: d for s, d in evals.items() if len(d) and d.labels is not None}
    if not len(train):
        raise ValueError(f"store {cfg.store} has no usable 'train' rows")
    if cfg.val_split not in evals:
        log.warning("no labelled '%s' split: the last epoch is kept instead of the best by val mAP", cfg.val_split)
    del arrays

    # ---- model, loss, rule, optimiser ---------------------------------------------------------------
    set_seed(cfg.seed)
    model = create_classifier(cfg.student, C)
    loss_fn = create_loss(cfg.loss.name, torch.from_numpy(train.observed), **cfg.loss.params)
    if loss_fn.requires_pseudo and not use_rule:
        raise ConfigError(f"loss {cfg.loss.name!r} needs pseudo-labels: set pseudo.rule (e.g. damp)")
    if use_rule:
        check_kwargs(RULES.get(cfg.pseudo.rule), cfg.pseudo.params, f"pseudo-label rule {cfg.pseudo.rule!r}")
    optimizer = _optimizer(cfg, model, loss_fn.param_groups(cfg.optim.lr))
    scheduler = _scheduler(cfg, optimizer)
    flops = _flops_per_image(model, cfg.student.image_size)

    tf_train = image_transform(cfg.student.image_size, model.mean, model.std, train=True, hflip=cfg.hflip)
    tf_eval = image_transform(cfg.student.image_size, model.mean, model.std, train=False, hflip=False)
    sampler = EpochShuffle(len(train), cfg.seed)
    pin = accelerator.device.type == "cuda"
    train_loader = DataLoader(ImageRows(data_root, train.images, tf_train), batch_size=cfg.batch_size,
                              sampler=sampler, num_workers=cfg.num_workers, pin_memory=pin, drop_last=False)
    eval_loaders = {s: DataLoader(ImageRows(data_root, d.images, tf_eval), batch_size=cfg.eval_batch_size,
                                  shuffle=False, num_workers=cfg.num_workers, pin_memory=pin)
                    for s, d in evals.items()}
    pass_loader = DataLoader(ImageRows(data_root, train.images, tf_train), batch_size=cfg.eval_batch_size,
                             shuffle=False, num_workers=cfg.num_workers, pin_memory=pin) \
        if loss_fn.needs_train_pass else None

    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {s: accelerator.prepare(dl) for s, dl in eval_loaders.items()}
    if pass_loader is not None:
        pass_loader = accelerator.prepare(pass_loader)
    loss_fn.to(accelerator.device)
    loss_fn.set_distributed(accelerator.num_processes > 1)  # global-batch statistics, synced loss state
    progress = Progress()
    accelerator.register_for_checkpointing(loss_fn, progress)

    # ---- outputs and resume -------------------------------------------------------------------------
    ckpts = _checkpoint_dirs(out)
    if ckpts and not cfg.resume:
        raise ConfigError(f"{out} already holds a run ({ckpts[-1].name}); pass resume=true to continue it, "
                          f"or choose another out=")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out / "config.yaml")
        atomic_write_text(out / "classes.txt", "".join(f"{c}\n" for c in store.classes))
    if ckpts and cfg.resume:
        accelerator.load_state(str(ckpts[-1]))
        log.info("resumed from %s (epoch %d done, best val mAP %.2f at epoch %d)", ckpts[-1], progress.epoch,
                 progress.best_map, progress.best_epoch)
    elif main and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    metrics = JsonlLog(out / "metrics.jsonl", main)
    train_obs = torch.from_numpy(train.observed)
    train_scores = torch.from_numpy(train.scores) if use_rule else None
    peak = peak_flops(accelerator.device)
    show = cfg.progress and main and sys.stderr.isatty()
    steps_per_epoch = len(train_loader) if cfg.max_steps_per_epoch is None \
        else min(len(train_loader), cfg.max_steps_per_epoch)

    # ---- epochs -------------------------------------------------------------------------------------
    stop_reason = None
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        set_seed(cfg.seed * 1000 + epoch)  # an epoch's randomness does not depend on what ran before
        sampler.set_epoch(epoch)
        rule_gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        loss_fn.set_epoch(epoch, cfg.epochs)
        model.train()
        loss_fn.train()
        t_epoch = t_last = time.perf_counter()
        wait, n_img, n_img_log, loss_sum, n_steps = 0.0, 0, 0, 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", disable=not show, dynamic_ncols=True)
        t_fetch = time.perf_counter()
        for step, (x, k) in enumerate(train_loader):
            if step >= steps_per_epoch:
                break
            wait += time.perf_counter() - t_fetch
            kc = k.cpu()
            pseudo = None
            if use_rule:
                # the rule runs on the whole global batch in every process (it is cheap), so the dynamic
                # flip draws are those of a 1-process run; each process keeps its own slice
                k_all = accelerator.gather(k).cpu() if accelerator.num_processes > 1 else kc
                pseudo_all = apply_rule(cfg.pseudo.rule, train_scores[k_all].float(), train_obs[k_all],
                                        dynamic=cfg.pseudo.dynamic, generator=rule_gen, **cfg.pseudo.params)
                start = accelerator.process_index * len(kc)
                pseudo = pseudo_all[start:start + len(kc)].to(accelerator.device)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(x)
                terms = loss_fn(LossBatch(logits=logits.float(), index=k.to(accelerator.device), pseudo=pseudo))
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients:
                    loss_fn.average_gradients()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            n_steps += 1
            loss_sum += float(terms["loss"].detach())
            n_img += len(k) * accelerator.num_processes
            n_img_log += len(k) * accelerator.num_processes  # k is this process's share of the batch
            bar.update(1)
            if progress.step % cfg.log_every == 0 or step == steps_per_epoch - 1:
                now = time.perf_counter()
                ips = n_img_log / max(now - t_last, 1e-9)
                rec: Dict[str, Any] = {"kind": "step", "epoch": epoch, "step": progress.step,
                                       **_terms_over_processes(accelerator, terms),
                                       "lr": optimizer.param_groups[0]["lr"], "head_lr": optimizer.param_groups[1]["lr"],
                                       "images_per_s": ips, "data_wait_frac": wait / max(now - t_epoch, 1e-9)}
                if pseudo is not None:  # over the global batch
                    unk = train_obs[k_all] == 0
                    rec["pseudo_pos_per_image"] = float(((pseudo_all == 1) & unk).sum() / len(k_all))
                    rec["pseudo_neg_per_image"] = float(((pseudo_all == -1) & unk).sum() / len(k_all))
                if flops:
                    rec["tflops_per_s"] = 3 * flops * ips / 1e12  # forward + backward ~ 3x forward
                    if peak:
                        rec["mfu"] = 3 * flops * ips / peak
                metrics.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{ips:.1f}")
                t_last, n_img_log = now, 0
            t_fetch = time.perf_counter()
        bar.close()
        train_time = time.perf_counter() - t_epoch
        loss_fn.sync_state()

        extra: Dict[str, float] = {}
        if pass_loader is not None:
            probs = predict(accelerator, model, pass_loader, len(train), C)
            extra = loss_fn.end_epoch(torch.from_numpy(probs).to(accelerator.device),
                                      torch.arange(len(train), device=accelerator.device), epoch)
        scheduler.step()

        maps: Dict[str, float] = {}
        preds: Dict[str, np.ndarray] = {}
        for s, dl in eval_loaders.items():
            preds[s] = predict(accelerator, model, dl, len(evals[s]), C)
            maps[s] = mean_average_precision(evals[s].labels, preds[s])["map"]
        val_map = maps.get(cfg.val_split)
        improved = val_map is None or val_map > progress.best_map
        progress.epoch = epoch
        if improved:
            progress.best_map = val_map if val_map is not None else progress.best_map
            progress.best_epoch, progress.since_best = epoch, 0
            if main:
                _save_best(accelerator, model, out, preds, evals)
        else:
            progress.since_best += 1
        train_loss = _terms_over_processes(accelerator, {"loss": torch.tensor(loss_sum / max(n_steps, 1))})["loss"]
        rec = {"kind": "epoch", "epoch": epoch, "step": progress.step, "train_loss": train_loss,
               "val_map": val_map, "test_map": maps.get(cfg.test_split), "epoch_time_s": train_time,
               "images_per_s": n_img / max(train_time, 1e-9), "best_epoch": progress.best_epoch, **extra}
        progress.history.append(rec)
        metrics.write(rec)
        log.info("epoch %d: train loss %.4f, val mAP %s, test mAP %s, %.1f img/s", epoch, rec["train_loss"],
                 _fmt(val_map), _fmt(rec["test_map"]), rec["images_per_s"])

        if val_map is not None and cfg.early_stop_drop is not None and val_map < progress.best_map - cfg.early_stop_drop:
            stop_reason = f"val mAP {val_map:.2f} fell more than {cfg.early_stop_drop} below the best {progress.best_map:.2f}"
        if cfg.early_stop_patience is not None and progress.since_best >= cfg.early_stop_patience:
            stop_reason = f"no better val mAP for {progress.since_best} epoch(s)"
        if stop_reason:
            progress.epoch = cfg.epochs  # a resumed run does not train past an early stop
        _save_checkpoint(accelerator, out, epoch, cfg.keep_checkpoints)
        if stop_reason:
            log.info("early stop after epoch %d: %s", epoch, stop_reason)
            break

    if main:
        best = next((h for h in progress.history if h["epoch"] == progress.best_epoch), {})
        summary = {
            "method": cfg.method, "dataset": cfg.dataset, "loss": cfg.loss.name, "rule": cfg.pseudo.rule,
            "store": str(Path(cfg.store).resolve()), "backbone": f"{cfg.student.kind}:{cfg.student.name}",
            "epochs_run": len(progress.history), "best_epoch": progress.best_epoch,
            "best_val_map": best.get("val_map"), "test_map_at_best": best.get("test_map"),
            "stop_reason": stop_reason, "num_train": len(train),
            "num_eval": {s: len(d) for s, d in evals.items()}, "flops_per_image_forward": flops,
        }
        atomic_write_json(out / "summary.json", summary)
        log.info("best epoch %d: val mAP %s, test mAP %s -> %s", progress.best_epoch, _fmt(summary["best_val_map"]),
                 _fmt(summary["test_map_at_best"]), out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _save_best(accelerator: Any, model: torch.nn.Module, out: Path, preds: Dict[str, np.ndarray],
               evals: Dict[str, SplitData]) -> None:
    state = accelerator.get_state_dict(model)
    with atomic_path(out / "best" / "model.pt") as tmp:
        torch.save(state, tmp)
    for s, p in preds.items():
        _save_npz(out / "predictions" / f"{s}.npz", probs=p, labels=evals[s].labels,
                  sample_ids=np.asarray(evals[s].sample_ids))


def load_best(run: Path) -> Tuple[Classifier, List[str]]:
    """The best model of a finished run, ready for inference."""
    from vlpl.config import load_config

    cfg = load_config(TrainConfig, [Path(run) / "config.yaml"])
    cfg.student.pretrained = False  # the run's weights replace them anyway
    classes = (Path(run) / "classes.txt").read_text().splitlines()
    model = create_classifier(cfg.student, len(classes))
    model.load_state_dict(torch.load(Path(run) / "best" / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), classes
