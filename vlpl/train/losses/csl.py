"""CSL, the class-aware selective loss for partially annotated data (ALGORITHMS.md §9): ``csl``.

Faithful to the released code (``PartialSelectiveLoss``, ``edit_targets_parital_labels``,
``negative_backprop_fun_jit``, ``ComputePrior``, ``ModelEma`` in Alibaba-MIIL/PartialLabelingCSL @ 534f3ce),
restated in vlpl's label coding (§1: +1 annotated positive, -1 annotated negative, 0 un-annotated; CSL's own
code uses 1 / 0 / -1).

**Selective weights** ``W`` (§9b), computed without gradient:

* ``mode=negative``: ``W = 1`` everywhere (every un-annotated label is a negative);
* ``mode=ignore``: ``W = 0`` on un-annotated labels;
* ``mode=selective``: starting from ``W = 1``,

  1. *prior rule* (when a class prior is set and ``prior_threshold > 0``): the un-annotated labels of every
     class with ``prior_c > prior_threshold`` get ``W = 0`` (annotated labels keep ``W = 1``);
  2. *likelihood rule*: among **all** un-annotated entries of the batch (those already ignored by the prior
     rule included, as released), flattened row-major, the ``likelihood_topk * B`` with the smallest shifted
     negative probability ``p_m = min(1 - p + clip, 1)`` (the most likely positives) get ``W = 0``. Ties keep
     the flattened order (a stable sort; the released ``argsort`` is unstable);
  3. every other un-annotated label is a negative.

**P-ASL** (§9c), the sum over the batch::

    L = - sum_{n,c} W [ a+ y+ (1 - p)^g+ log p  +  a- y- p_m'^g- log p_m  +  au yu p_m'^gu log p_m ]

with ``p_m' = 1 - p_m`` (the focusing factors are computed without gradient), ``log`` clamped at 1e-8, and
``y+``, ``y-``, ``yu`` the indicators of annotated positive, annotated negative and un-annotated. The
reduction is a **sum** (as released; the other vlpl losses use the batch mean). Under data parallelism the
likelihood rule ranks the entries of the global batch and each process's sum is multiplied by the process
count, so that after DDP's gradient averaging the step equals the 1-process step on the global batch.

**Class prior** (§9b ``ComputePrior``): every training forward adds ``sigmoid(s)`` of the (global) batch to
a per-class running sum that is never reset (:meth:`CSLLoss.prior_estimate` = sum / count, the released
``train_avg_preds.csv``). Where the prior comes from (``prior``):

* ``model`` (the paper's, the faithful default): ``vlpl train`` first trains a temporary model with this loss
  in Ignore mode, in ``<out>/prior_model/`` (a normal, resumable run), and its running average becomes the
  prior (:func:`prepare_csl_prior`);
* ``clip`` (Decision 7, ours): the frequency of each class on the training split, an annotated label counting
  as itself and an un-annotated one as the pseudo-positive of ``prior_rule`` on the store's cached zero-shot
  scores (no temporary model);
* ``file``: ``prior_file`` (a CSV with a header row and columns class name, prior: the released format, e.g.
  ``outputs/priors/prior_fpc_1000.csv``), matched to the store's classes by name;
* ``none``: no prior rule.

For ``model``, ``clip`` and ``file`` ``vlpl train`` writes the prior the run uses to ``<out>/csl_prior.csv``
(store class order) with its provenance in ``<out>/csl_prior.json``, and records the file in the run's
config (``loss.params.prior_file``). The prior is a buffer of the loss, so it is checkpointed.

**Model EMA** (§9d, ``ModelEma(model, 0.9997)`` updated after every optimizer step): ``ema_decay > 0`` keeps a
:class:`timm.utils.ModelEmaV3` of the student inside the loss (:meth:`CSLLoss.bind_model`,
:meth:`CSLLoss.after_step`), so that its weights are checkpointed with the loss state and a resumed run has
the EMA of an uninterrupted one. Validation scores both models and keeps the better mAP (the released
``validate_multi`` returns ``max(regular, EMA)``); ``best/`` holds the model that scored it (the released
code saved the regular weights even when the EMA's score was the higher: a deviation, documented in
docs/CSL_SATL.md).
"""
from __future__ import annotations

import csv
import gc
import io
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vlpl.registry import LOSSES
from vlpl.store.store import sha256_file
from vlpl.train import loss_params as P
from vlpl.train.losses.base import LossBatch, SPMLLoss

log = logging.getLogger(__name__)

__all__ = ["CSLLoss", "selective_weights", "read_prior_csv", "write_prior_csv", "prepare_csl_prior",
           "clip_prior", "PRIOR_FILE", "PRIOR_INFO", "PRIOR_PHASE_DIR"]

#: the prior a run uses (store class order), its provenance, and the temporary model's run directory
PRIOR_FILE = "csl_prior.csv"
PRIOR_INFO = "csl_prior.json"
PRIOR_PHASE_DIR = "prior_model"
LOG_CLAMP = 1e-8


def selective_weights(unann: torch.Tensor, annotated: torch.Tensor, neg_prob: torch.Tensor, mode: str,
                      likelihood_topk: int, prior: Optional[torch.Tensor] = None,
                      prior_threshold: float = 0.0, num_rows: Optional[int] = None) -> torch.Tensor:
    """The ``(B, C)`` float weights ``W`` of CSL's modes (module docstring, ALGORITHMS.md §9b).

    Args:
        unann: ``(B, C)`` bool, un-annotated entries.
        annotated: ``(B, C)`` bool, annotated entries (positive or negative).
        neg_prob: ``(B, C)`` shifted negative probability ``p_m = min(1 - p + clip, 1)`` (the likelihood rule
            ignores the ``K B`` un-annotated entries with the smallest ``p_m``).
        mode: ``negative``, ``ignore`` or ``selective``.
        likelihood_topk: ``K``.
        prior: ``(C,)`` class prior, or None (no prior rule).
        prior_threshold: the prior rule ignores classes with ``prior > prior_threshold`` (0: no prior rule).
        num_rows: ``B`` of ``K B`` (default: the rows given).
    """
    if mode == "negative":
        return torch.ones_like(neg_prob)
    if mode == "ignore":
        return (~unann).to(neg_prob.dtype)
    if mode != "selective":
        raise ValueError(f"csl: mode must be one of {', '.join(P.CSL_MODES)}; got {mode!r}")
    keep = torch.ones_like(unann)
    if prior is not None and prior_threshold > 0:
        frequent = prior.to(neg_prob.device) > prior_threshold
        keep = (~frequent).unsqueeze(0).expand_as(keep) | annotated
    k = int(likelihood_topk) * int(unann.shape[0] if num_rows is None else num_rows)
    if k > 0:
        flat_unann = unann.reshape(-1).nonzero().squeeze(1)
        if flat_unann.numel():
            order = torch.sort(neg_prob.reshape(-1)[flat_unann], stable=True).indices
            keep = keep.clone().reshape(-1)
            keep[flat_unann[order[:k]]] = False
            keep = keep.reshape(unann.shape)
    return keep.to(neg_prob.dtype)


@LOSSES.register("csl")
class CSLLoss(SPMLLoss):
    """CSL: selective weights (prior + likelihood rules) and P-ASL, with the class-prior accumulator and the
    model EMA (module docstring; ALGORITHMS.md §9b-9d).

    Args:
        mode: ``negative``, ``ignore`` or ``selective`` (§9a).
        gamma_pos, gamma_neg, gamma_unann: P-ASL focusing exponents (§9d: 0, 1, 2; COCO FPC-1000 0, 3, 4;
            RPS-0.5 0, 1, 4).
        alpha_pos, alpha_neg, alpha_unann: P-ASL weights (1).
        clip: ``m`` of ``p_m = min(1 - p + m, 1)`` (0).
        likelihood_topk: ``K`` of the likelihood rule (5).
        prior_threshold: the prior rule's threshold (0.05; COCO recipes 0.5).
        prior: where the class prior comes from (``model``, ``clip``, ``file``, ``none``).
        prior_file: the prior CSV (header; class name, prior), rows in the training classes' order. With
            ``prior`` ``model`` or ``clip`` ``vlpl train`` writes it (:func:`prepare_csl_prior`); a loss built
            without it has no prior until :meth:`set_prior`, and its selective forward refuses to run.
        prior_epochs: epochs of the temporary model (``prior=model``; the trainer reads it).
        prior_rule: the rule of ``prior=clip`` (the trainer reads it).
        ema_decay: decay of the model EMA (0: none).
    """

    def __init__(
        self,
        observed: Any,
        *,
        mode: str = P.CSLParams.mode,
        gamma_pos: float = P.CSLParams.gamma_pos,
        gamma_neg: float = P.CSLParams.gamma_neg,
        gamma_unann: float = P.CSLParams.gamma_unann,
        alpha_pos: float = P.CSLParams.alpha_pos,
        alpha_neg: float = P.CSLParams.alpha_neg,
        alpha_unann: float = P.CSLParams.alpha_unann,
        clip: float = P.CSLParams.clip,
        likelihood_topk: int = P.CSLParams.likelihood_topk,
        prior_threshold: float = P.CSLParams.prior_threshold,
        prior: str = P.CSLParams.prior,
        prior_file: Optional[str] = P.CSLParams.prior_file,
        prior_epochs: Optional[int] = P.CSLParams.prior_epochs,
        prior_rule: str = P.CSLParams.prior_rule,
        ema_decay: float = P.CSLParams.ema_decay,
    ) -> None:
        super().__init__(observed, 0.0)
        self.mode = mode
        self.gamma_pos, self.gamma_neg, self.gamma_unann = float(gamma_pos), float(gamma_neg), float(gamma_unann)
        self.alpha_pos, self.alpha_neg, self.alpha_unann = float(alpha_pos), float(alpha_neg), float(alpha_unann)
        self.clip = float(clip)
        self.likelihood_topk = int(likelihood_topk)
        self.prior_threshold = float(prior_threshold)
        self.prior_source = prior
        self.prior_epochs = prior_epochs
        self.prior_rule = prior_rule
        self.ema_decay = float(ema_decay)
        C = self.num_classes
        # the prior the rules use (set from prior_file / set_prior), and the ComputePrior accumulator
        self.register_buffer("prior", torch.zeros(C, dtype=torch.float32))
        self.register_buffer("prior_set", torch.zeros((), dtype=torch.bool))
        self.register_buffer("pred_sum", torch.zeros(C, dtype=torch.float64))
        self.register_buffer("pred_count", torch.zeros((), dtype=torch.float64))
        self.ema: Optional[nn.Module] = None
        if prior_file:
            self.set_prior(read_prior_csv(Path(prior_file), num_classes=C))

    prior: torch.Tensor
    prior_set: torch.Tensor
    pred_sum: torch.Tensor
    pred_count: torch.Tensor

    def extra_repr(self) -> str:
        return (f"N={self.num_examples}, C={self.num_classes}, mode={self.mode}, gammas=({self.gamma_pos:g}, "
                f"{self.gamma_neg:g}, {self.gamma_unann:g}), clip={self.clip:g}, K={self.likelihood_topk}, "
                f"prior={self.prior_source}, prior_threshold={self.prior_threshold:g}, ema_decay={self.ema_decay:g}")

    # -- the class prior ---------------------------------------------------------------------------------

    def set_prior(self, values: Any) -> None:
        """Use ``values`` (``(C,)``, in [0, 1]) as the class prior of the prior rule."""
        v = torch.as_tensor(np.asarray(values, dtype=np.float32)).reshape(-1)
        if v.numel() != self.num_classes:
            raise ValueError(f"csl: the prior has {v.numel()} values, the training set {self.num_classes} classes")
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()) or bool((v > 1).any()):
            raise ValueError("csl: prior values must be probabilities in [0, 1]")
        self.prior.copy_(v.to(self.prior.device))
        self.prior_set.fill_(True)

    @property
    def has_prior(self) -> bool:
        return bool(self.prior_set)

    def prior_estimate(self) -> torch.Tensor:
        """``(C,)`` float64: the running average of ``sigmoid(s)`` over every training batch so far (CSL's
        ``ComputePrior.avg_pred_train``); zeros before the first batch."""
        return (self.pred_sum / self.pred_count.clamp(min=1.0)).cpu()

    def _uses_prior(self) -> bool:
        return self.mode == "selective" and self.prior_source != "none" and self.prior_threshold > 0

    # -- the model EMA -----------------------------------------------------------------------------------

    def bind_model(self, model: nn.Module) -> None:
        """Build the model EMA (``ema_decay > 0``) as a copy of ``model`` (the unwrapped student, before it is
        prepared for devices/DDP); its weights are part of this loss's ``state_dict``. The trainer calls it
        right after building the loss, before loading a checkpoint."""
        if self.ema_decay <= 0:
            return
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(_unwrap(model), decay=self.ema_decay)
        for p in ema.parameters():
            p.requires_grad_(False)
        self.ema = ema

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """After every optimizer step: ``ema = decay ema + (1 - decay) model`` over the whole state_dict
        (parameters and float buffers; integer buffers copied), as the released ``ModelEma.update``."""
        if self.ema is not None:
            self.ema.update(_unwrap(model))

    def eval_models(self) -> Dict[str, nn.Module]:
        """Extra models validation scores beside the student: ``{"ema": the EMA model}`` when there is one."""
        return {} if self.ema is None else {"ema": self.ema.module}

    def average_gradients(self) -> None:
        """As :meth:`SPMLLoss.average_gradients`, over the trainable parameters only (not the EMA copy)."""
        if not self.distributed:
            return
        world = dist.get_world_size()
        for param in self.parameters():
            if not param.requires_grad:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad.div_(world)

    def train(self, mode: bool = True) -> "CSLLoss":
        super().train(mode)
        if self.ema is not None:
            self.ema.module.eval()  # an EMA is only ever evaluated (ModelEmaV3 keeps it in eval mode)
        return self

    # -- the loss ----------------------------------------------------------------------------------------

    def _global_weights(self, unann: torch.Tensor, annotated: torch.Tensor, neg_prob: torch.Tensor
                        ) -> torch.Tensor:
        """:func:`selective_weights` over the global batch of all processes; this process's rows."""
        prior = self.prior if self._uses_prior() else None
        if not self.distributed or self.mode != "selective" or self.likelihood_topk == 0:
            return selective_weights(unann, annotated, neg_prob, self.mode, self.likelihood_topk, prior,
                                     self.prior_threshold)
        b = torch.tensor([unann.shape[0]], device=neg_prob.device)
        sizes = [torch.zeros_like(b) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, b)
        start = int(sum(int(t) for t in sizes[:dist.get_rank()]))
        packed = torch.stack([neg_prob, unann.to(neg_prob.dtype), annotated.to(neg_prob.dtype)])  # (3, B, C)
        every = self._gather_rows(packed.permute(1, 0, 2).contiguous())  # (B_global, 3, C)
        w = selective_weights(every[:, 1] > 0.5, every[:, 2] > 0.5, every[:, 0], self.mode, self.likelihood_topk,
                              prior, self.prior_threshold)
        return w[start:start + unann.shape[0]]

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        _, p, _, m = self._prepare(batch)
        if self.training:
            with torch.no_grad():  # ComputePrior.update: every training batch, never reset
                p_all = self._gather_rows(p.detach())
                self.pred_sum += p_all.sum(0).to(self.pred_sum)
                self.pred_count += float(p_all.shape[0])
        if self._uses_prior() and not self.has_prior:
            raise RuntimeError(f"csl: prior={self.prior_source!r} but no class prior is set: `vlpl train` computes it "
                               f"before training (its first phase); with the Python API pass prior_file or call "
                               f"set_prior(values)")
        xs_neg = 1.0 - p
        if self.clip > 0:
            xs_neg = (xs_neg + self.clip).clamp(max=1.0)
        unann = m.unk > 0
        with torch.no_grad():
            weights = self._global_weights(unann, (m.pos + m.neg) > 0, xs_neg.detach())
            focus = torch.pow(1.0 - p * m.pos - xs_neg * (m.neg + m.unk),
                              self.gamma_pos * m.pos + self.gamma_neg * m.neg + self.gamma_unann * m.unk)
        log_pos = torch.log(p.clamp(min=LOG_CLAMP))
        log_neg = torch.log(xs_neg.clamp(min=LOG_CLAMP))
        scale = float(dist.get_world_size()) if self.distributed else 1.0  # the global batch's sum (docstring)
        wf = weights * focus * (-scale)
        terms = {
            "obs_pos": (wf * self.alpha_pos * m.pos * log_pos).sum(),
            "obs_neg": (wf * self.alpha_neg * m.neg * log_neg).sum(),
            "unannotated": (wf * self.alpha_unann * m.unk * log_neg).sum(),
        }
        total = terms["obs_pos"] + terms["obs_neg"] + terms["unannotated"]
        out = {"loss": total, **{k: v.detach() for k, v in terms.items()}}
        out["num_ignored"] = (m.unk * (1.0 - weights)).sum().detach()
        return out

    # -- the first phase (vlpl train) ---------------------------------------------------------------------

    @classmethod
    def prepare_training(cls, cfg: Any) -> Any:
        """Called by ``run_train`` before anything else: the class prior of ``prior`` (model / clip / file),
        written to ``<out>/csl_prior.csv``, and the config to train with (``loss.params.prior_file`` set to
        it). See :func:`prepare_csl_prior`."""
        return prepare_csl_prior(cfg)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ---- prior files ------------------------------------------------------------------------------------------


def read_prior_csv(path: Path, num_classes: Optional[int] = None, classes: Optional[Sequence[str]] = None
                   ) -> np.ndarray:
    """The class prior in ``path``: a CSV with a header row and (class name, prior) rows (the released
    ``train_avg_preds.csv`` / ``prior_fpc_1000.csv`` format). With ``classes`` the rows are matched by name and
    returned in that order (every class must be there); otherwise they are taken in file order and there must
    be ``num_classes`` of them."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise ValueError(f"csl prior_file {path}: cannot read it ({e.strerror or e})") from None
    body = [r for r in rows[1:] if r and any(x.strip() for x in r)]
    names, values = [], []
    for i, r in enumerate(body, start=2):
        if len(r) < 2:
            raise ValueError(f"csl prior_file {path}, line {i}: expected 'class name, prior', got {r!r}")
        try:
            v = float(r[1])
        except ValueError:
            raise ValueError(f"csl prior_file {path}, line {i}: the prior {r[1]!r} is not a number") from None
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"csl prior_file {path}, line {i}: the prior {v} is not in [0, 1]")
        names.append(r[0].strip())
        values.append(v)
    if classes is not None:
        table = dict(zip(names, values))
        missing = [c for c in classes if c not in table]
        if missing:
            raise ValueError(f"csl prior_file {path}: no prior for {len(missing)} of the store's classes "
                             f"(e.g. {missing[:3]}); it has {len(names)} rows")
        return np.asarray([table[c] for c in classes], dtype=np.float64)
    if num_classes is not None and len(values) != num_classes:
        raise ValueError(f"csl prior_file {path}: {len(values)} rows, expected one per class ({num_classes})")
    return np.asarray(values, dtype=np.float64)


def write_prior_csv(path: Path, classes: Sequence[str], values: Any) -> None:
    """Write a prior file (header ``class,prior``; the released format) atomically."""
    from vlpl.store.atomic import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", "prior"])
    for c, v in zip(classes, np.asarray(values, dtype=np.float64)):
        w.writerow([c, repr(float(v))])
    atomic_write_text(Path(path), buf.getvalue())


# ---- where the prior comes from (the trainer's first phase) -----------------------------------------------


def clip_prior(split: Any, rule: str, batch_size: int = 256) -> np.ndarray:
    """Decision 7 (ours): ``(C,)`` class frequencies on a store split from the cached zero-shot scores.

    For each image and class: 1 for an annotated positive, 0 for an annotated negative, and for an
    un-annotated label 1 iff ``rule`` (with its default parameters; the unflipped views) makes it a
    pseudo-positive. The prior is the mean over the split's images."""
    from vlpl.pseudolabel.rules import apply_rule

    try:
        from vlpl.pseudolabel.rules import RuleRows
    except ImportError:  # pragma: no cover - an older rules module
        RuleRows = None  # type: ignore[assignment]
    total: Optional[np.ndarray] = None
    n = 0
    for pos, scores in split.iter_scores(batch_size):
        obs = torch.from_numpy(np.ascontiguousarray(split.observed_at(pos))).to(torch.int8)
        extra = {"rows": RuleRows(split, pos)} if RuleRows is not None else {}
        pseudo = apply_rule(rule, torch.as_tensor(scores).float(), obs, dynamic=False, **extra)
        positive = (obs == 1) | ((obs == 0) & (pseudo == 1))
        s = positive.double().sum(0).numpy()
        total = s if total is None else total + s
        n += len(pos)
    if total is None or n == 0:
        raise ValueError("csl prior=clip: the training split has no rows")
    return total / n


def _run_prior_phase(cfg: Any, params: Any, out: Path) -> np.ndarray:
    """Train the temporary Ignore-mode model in ``out / prior_model`` (a normal run: resumable with
    ``resume=true``) and return its running-average prediction per class."""
    from vlpl.train.loop import run_epochs, setup

    phase_params = {**cfg.loss.params, "mode": "ignore", "prior": "none", "prior_file": None, "ema_decay": 0.0}
    phase = replace(cfg, out=str(out / PRIOR_PHASE_DIR), loss=replace(cfg.loss, params=phase_params),
                    epochs=int(params.prior_epochs or cfg.epochs))
    log.info("csl prior=model: training the temporary Ignore-mode model (%d epochs) in %s", phase.epochs, phase.out)
    run = setup(phase)
    run_epochs(run)
    assert isinstance(run.loss, CSLLoss)
    if float(run.loss.pred_count) == 0:
        raise RuntimeError(f"csl prior=model: the temporary model in {phase.out} saw no training batch")
    values = run.loss.prior_estimate().numpy()
    run.accelerator.wait_for_everyone()
    del run
    gc.collect()
    return values


def prepare_csl_prior(cfg: Any) -> Any:
    """The class prior of a ``csl`` run (``prior`` model / clip / file), before its training starts.

    Writes ``<out>/csl_prior.csv`` (store class order; read by the loss through ``loss.params.prior_file``)
    and ``<out>/csl_prior.json`` (where it came from, its sha256), and returns the config with
    ``loss.params.prior_file`` pointing at it. A prior already written for the same source is reused, so a
    resumed run does not redo it; ``prior=model`` trains the temporary model in ``<out>/prior_model`` (its
    own checkpoints: a kill there resumes there). Nothing is done for ``mode`` negative / ignore or
    ``prior=none``."""
    from vlpl.config import ConfigError
    from vlpl.store.atomic import atomic_write_json
    from vlpl.store.store import ScoreStore

    params = P.loss_params("csl", cfg.loss.params, where="loss.params")
    if params.mode != "selective" or params.prior == "none" or params.prior_threshold == 0:
        return cfg
    out = Path(cfg.out)
    target = out / PRIOR_FILE
    if params.prior_file and Path(params.prior_file).resolve() == target.resolve() and target.is_file():
        return cfg  # already prepared (the resolved config of this run)
    if params.prior_file and params.prior != "file":
        raise ConfigError(f"loss.params.prior_file: a prior file goes with loss.params.prior=file; prior="
                          f"{params.prior} computes its own (into {target})")
    store = ScoreStore.open(cfg.store, weights=cfg.ensemble_weights)  # a store, a teacher ensemble, an export
    classes = list(store.classes)
    source: Dict[str, Any] = {"prior": params.prior, "classes": len(classes)}
    if params.prior == "file":
        source["file"] = str(Path(str(params.prior_file)).resolve())
        source["file_sha256"] = sha256_file(Path(str(params.prior_file)))
    elif params.prior == "clip":
        source["rule"] = params.prior_rule
    else:
        source["epochs"] = int(params.prior_epochs or cfg.epochs)
        source["run"] = str(out / PRIOR_PHASE_DIR)
    info_path = out / PRIOR_INFO
    done = None
    if target.is_file() and info_path.is_file():
        try:
            done = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            done = None
    if done is not None and done.get("source") == source and done.get("sha256") == sha256_file(target):
        log.info("csl: using the class prior already computed in %s (%s)", target, params.prior)
    else:
        try:
            if params.prior == "file":
                values = read_prior_csv(Path(str(params.prior_file)), classes=classes)
            elif params.prior == "clip":
                values = clip_prior(store.split("train"), params.prior_rule)
            else:
                values = _run_prior_phase(cfg, params, out)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        # several processes: after the temporary model (a process group) the main process writes and the others
        # wait; before any process group (clip, file) every process writes the same bytes (atomic renames)
        grouped = dist.is_available() and dist.is_initialized()
        if not grouped or dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_prior_csv(target, classes, values)
            atomic_write_json(info_path, {"source": source, "sha256": sha256_file(target)})
        if grouped:
            dist.barrier()
        top = np.argsort(-np.asarray(values))[:5]
        if not grouped or dist.get_rank() == 0:
            log.info("csl: class prior (%s) written to %s; %d classes above prior_threshold %g; top: %s",
                     params.prior, target, int((np.asarray(values) > params.prior_threshold).sum()),
                     params.prior_threshold, ", ".join(f"{classes[i]} {values[i]:.3f}" for i in top))
    new_params = {**cfg.loss.params, "prior_file": str(target)}
    return replace(cfg, loss=replace(cfg.loss, params=new_params))

