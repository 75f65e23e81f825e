"""THE training step: :func:`train_step`, used by ``run_train``, ``benchmarks/train_throughput.py`` and the tests.

One call = one micro-batch: pseudo-labels of the global batch from the cached scores (the rule runs on the
whole global batch in every process, so the dynamic flip draws are those of a 1-process run; each process
keeps its slice), the forward pass under autocast, the loss, the backward pass, and - at the end of an
accumulation group - the loss's own gradient averaging, the optimizer step and ``zero_grad``.

Every random draw is a function of ``(seed, epoch, step)``: the rule's flip draws use a generator seeded
from them, and the global torch RNG (dropout, stochastic depth) is re-seeded from them before the forward
pass (with the process index: each process its own dropout masks). A run resumed at any step therefore draws
what an uninterrupted run draws.

No host synchronisation happens here: the rule runs on the device (its cached scores - prefetched and pinned
by the loop, or read here - and the observed rows are copied ``non_blocking``; its random variant draws are
made on a CPU generator and moved, the draws of the CPU path), and the loss terms are returned as (detached)
device tensors; the loop reads them every ``log_every`` steps. ``StepState.forward`` may hold a
``torch.compile``-d model (``compile: true``), used for the forward pass only.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Optional

import numpy as np
import torch
from torch import nn

from vlpl.pseudolabel.params import flip_variant
from vlpl.pseudolabel.rules import RuleRows, apply_rule
from vlpl.registry import RULES, check_kwargs
from vlpl.train.data import SEED_RULE, SEED_STEP, generator, mix_seed
from vlpl.train.losses import LossBatch, ObservedLabels, SPMLLoss

log = logging.getLogger(__name__)


@dataclass
class TrainBatch:
    """One micro-batch of this process, and where it sits in the run.

    ``images`` (b, 3, H, W) on the device; ``index`` (b,) positions of the samples in the training split;
    ``flip`` (b,) bool, whether each image was mirrored (drawn by the data order, recorded so that a rule
    can follow the student's augmentation); ``global_index`` (B,) positions of the whole global batch of
    all processes (the rule runs on it; ``None``: this process's batch is the global batch); ``epoch``
    (1-based) and ``step`` (the run's global micro-step, 0-based) seed the step's random draws;
    ``sync``: this micro-batch ends a gradient-accumulation group (the optimizer steps); ``scores``: the
    rule's ``(B, variants, views, C)`` cached scores of ``global_index`` already read (e.g. by
    :func:`vlpl.train.data.prefetch_scores`; ``None``: the rule reads them).
    """

    images: torch.Tensor
    index: torch.Tensor
    flip: torch.Tensor
    epoch: int
    step: int
    global_index: Optional[np.ndarray] = None
    sync: bool = True
    scores: Optional[torch.Tensor] = None
    #: (B,) bool flips of the whole global batch (``None``: ``global_index`` is None and ``flip`` is it); read by a
    #: rule that follows the student's flip (``pseudo.variant: follow_student_flip``)
    global_flip: Optional[torch.Tensor] = None


@dataclass
class StepOutput:
    """What a step returns: ``terms`` (detached loss terms, device tensors; ``loss`` is the total),
    ``pseudo`` (B, C) int8 pseudo-labels of the global batch (``None`` without a rule), ``global_index``
    (B,) the global batch's positions, ``stepped`` whether the optimizer stepped."""

    terms: Dict[str, torch.Tensor]
    pseudo: Optional[torch.Tensor]
    global_index: np.ndarray
    stepped: bool


@dataclass
class StepState:
    """The machinery a step needs, independent of accelerate (the benchmark uses the defaults).

    ``autocast()``, ``backward(loss)`` and ``no_sync(model)`` default to plain torch; ``run_train`` passes
    accelerate's (mixed precision, DDP gradient sync, fp16 loss scaling). ``forward``: the callable that runs
    the forward pass (e.g. ``torch.compile(model)``; ``None``: the model itself). ``image_embeddings(positions)``:
    the teacher's cached ``(b, D)`` image embeddings of training-split positions (a store reader), read only
    when the loss carries the reconstruction term (``loss.uses_features``, Decision 5).
    """

    optimizer: torch.optim.Optimizer
    device: torch.device
    seed: int = 0
    grad_accum: int = 1
    num_processes: int = 1
    process_index: int = 0
    autocast: Callable[[], ContextManager[Any]] = nullcontext
    backward: Callable[[torch.Tensor], None] = field(default=lambda loss: loss.backward())
    no_sync: Callable[[nn.Module], ContextManager[Any]] = field(default=lambda model: nullcontext())
    forward: Optional[Callable[..., Any]] = None
    image_embeddings: Optional[Callable[[np.ndarray], torch.Tensor]] = None


class RuleRunner:
    """A registered pseudo-label rule bound to its parameters and to the training split's cached scores.

    ``scores(positions)`` returns ``(B, n_variants, n_views, C)`` float32 scores of those positions of the
    training split (a store reader); ``observed``: the split's ``(N, C)`` observed labels, a reader with
    ``observed_at`` (the split, or an :class:`~vlpl.train.losses.ObservedLabels`) or a matrix; only the
    batch's rows are read, and go to the device.
    """

    def __init__(self, name: str, params: Dict[str, Any], dynamic: bool,
                 scores: Callable[[np.ndarray], torch.Tensor], observed: Any, split: Any = None,
                 variant: Optional[str] = None) -> None:
        check_kwargs(RULES.get(name), params, f"pseudo-label rule {name!r}")
        self.name, self.params, self.dynamic = name, dict(params), bool(dynamic)
        # which cached flip variant each view takes (pseudo.variant; None: from dynamic), checked here
        self.variant = flip_variant(variant, self.dynamic)
        self.scores, self.observed = scores, ObservedLabels(observed)
        self.split = split  # the training split's reader: rules with ``needs_rows`` (knn, calibrated) get RuleRows

    def __call__(self, positions: np.ndarray, gen: Optional[torch.Generator], scores: Optional[torch.Tensor] = None,
                 device: Optional[torch.device] = None, flips: Optional[torch.Tensor] = None,
                 observed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C) int8 pseudo-labels of the rows at ``positions``, computed on ``device`` (default: where the
        scores are); ``gen`` draws the dynamic flip variants (a CPU generator gives the same draws on any
        device); ``scores``: the rows' cached scores if already read (else ``self.scores(positions)``);
        ``flips``: (B,) each row's flip as the student saw it (``follow_student_flip``); ``observed``: the rows'
        (B, C) int8 observed labels if already read (else read here)."""
        pos = np.asarray(positions)
        if scores is None:
            scores = self.scores(pos)
        dev = scores.device if device is None else torch.device(device)
        obs = self.observed.rows(pos) if observed is None else observed
        return apply_rule(self.name, scores.to(dev, non_blocking=True).float(), obs.to(dev, non_blocking=True),
                          dynamic=self.dynamic, generator=gen, variant=self.variant, flips=flips,
                          rows=RuleRows(self.split, pos) if self.split is not None else None, **self.params)


def step_seed(seed: int, epoch: int, step: int, process_index: int = 0) -> int:
    """The seed of the global torch RNG for micro-step ``step`` of ``epoch`` in process ``process_index``
    (dropout and the like: each process its own masks, the same ones again after a resume)."""
    return mix_seed(seed, SEED_STEP, epoch, step, process_index)


def train_step(batch: TrainBatch, model: nn.Module, loss: SPMLLoss, rule: Optional[RuleRunner],
               state: StepState) -> StepOutput:
    """One training micro-step (see the module docstring). ``model`` and ``loss`` must be in train mode."""
    local = batch.index.detach().cpu().numpy()
    global_index = local if batch.global_index is None else np.asarray(batch.global_index)
    pseudo_all: Optional[torch.Tensor] = None
    pseudo: Optional[torch.Tensor] = None
    # the batch's observed rows, read once: the loss's (unless it keeps a label state of its own) and, with one
    # process (the rule's rows are the batch's), the rule's too
    observed = loss.observed_labels.rows(local) if loss.label_state is None else None
    if rule is not None:
        pseudo_all = rule(global_index, generator(state.seed, SEED_RULE, batch.epoch, batch.step), batch.scores,
                          state.device, flips=batch.flip if batch.global_index is None else batch.global_flip,
                          observed=observed if batch.global_index is None else None)
        b = len(local)
        start = state.process_index * b if batch.global_index is not None else 0
        pseudo = pseudo_all[start:start + b]
    torch.manual_seed(step_seed(state.seed, batch.epoch, batch.step, state.process_index))
    sync_ctx = nullcontext() if batch.sync else state.no_sync(model)
    with sync_ctx:
        features = embeddings = None
        with state.autocast():
            if getattr(loss, "uses_features", False):  # the reconstruction term (Decision 5; off by default)
                logits, aux = (model if state.forward is None else state.forward)(batch.images, with_aux=True)
                features = aux["reconstruction"].float()
            else:
                logits = (model if state.forward is None else state.forward)(batch.images)
        if features is not None:
            if state.image_embeddings is None:
                raise ValueError("the loss's reconstruction term needs StepState.image_embeddings (a store reader)")
            embeddings = state.image_embeddings(local).to(state.device, non_blocking=True)
        terms = loss(LossBatch(logits=logits.float(), index=batch.index.to(state.device, non_blocking=True),
                               pseudo=pseudo, features=features, image_embedding=embeddings,
                               observed=None if observed is None else observed.to(state.device, non_blocking=True)))
        total = terms["loss"] / state.grad_accum if state.grad_accum > 1 else terms["loss"]
        state.backward(total)
    if batch.sync:
        loss.average_gradients()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        loss.after_step(model)  # e.g. CSL's model EMA, updated after every optimizer step
    return StepOutput(terms={k: v.detach() for k, v in terms.items()}, pseudo=pseudo_all,
                      global_index=global_index, stepped=batch.sync)
