"""Cole et al.'s training modes (ALGORITHMS.md §2c) as training phases: ``phases`` in the training config.

* ``linear_fixed_features``: a linear classifier on the frozen backbone's features for the whole run
  (``phases.freeze_backbone: true``; Cole: 25 epochs).
* ``linear_init``: the first ``phases.linear_init_epochs`` epochs train the head alone on the frozen
  backbone (Cole: 25 epochs), then every parameter is trained (Cole: 10 more epochs), i.e.
  ``epochs: 35`` with ``phases.linear_init_epochs: 25``.

Whether the backbone is frozen is a function of the epoch alone (:func:`backbone_frozen`), applied at the start
of every epoch (:func:`apply_phase`), so a run resumed at any step freezes exactly what an uninterrupted run
freezes. A frozen backbone has ``requires_grad`` off (no gradient, so the optimizer skips it: its weights and
its optimizer state stay untouched, and no backward pass runs through it) and is in eval mode (batch-norm
statistics and dropout as for fixed, pre-extracted features). Cole et al. run the two phases of ``linear_init``
as two trainings, each with its own learning rate and batch size (tuned apart: their issue #10) and a fresh
Adam: ``phases.linear_init_lr`` gives the linear phase its own learning rate and ``phases.reset_optimizer``
(default on) starts the end-to-end phase with a fresh optimizer state.

Differences from the released code that remain: Cole et al. pre-extract the features once (no flip
augmentation; here the frozen backbone sees the training augmentation, unless ``hflip: false``); one batch
size serves both phases; the best epoch is chosen over the whole run (Cole: over the end-to-end run), and
ROLE's estimator continues from the last linear epoch (Cole: from the best one). GR/GPR's
``loss.params.linear_init`` (the epochs their schedules wait) is a separate setting: give it the same value
to start the schedules after the phase.
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional

from torch import nn

log = logging.getLogger(__name__)

__all__ = ["backbone_frozen", "apply_phase", "ddp_kwargs", "trainable_parameters"]


def backbone_frozen(phases: Any, epoch: int) -> bool:
    """Whether the backbone is frozen in (1-based) ``epoch`` under the config's ``phases``."""
    return bool(phases.freeze_backbone) or epoch <= int(phases.linear_init_epochs)


def _backbone(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)  # a DDP-wrapped model
    backbone = getattr(inner, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"phases: the model ({type(inner).__name__}) has no backbone module to freeze")
    return backbone


def apply_phase(model: nn.Module, phases: Any, epoch: int, optimizer: Optional[Any] = None,
                scheduler: Optional[Any] = None, start: int = 0, base_lr: Optional[float] = None) -> bool:
    """Set up ``epoch`` (1-based) of a run with ``phases``; call it after ``model.train()``, before the epoch's
    first step (``start``: the micro-steps of the epoch already done, when resuming mid-epoch).

    * the backbone of ``model`` is frozen (``requires_grad`` off, eval mode) or trained;
    * with ``phases.linear_init_lr`` (needs ``optimizer``, ``scheduler`` and ``base_lr``, the run's
      ``optim.lr``): in frozen epochs every parameter group's learning rate is the scheduler's times
      ``linear_init_lr / base_lr``, after them the scheduler's again;
    * with ``phases.reset_optimizer`` (needs ``optimizer``): the first end-to-end epoch after a linear-init
      phase, entered at its first step (``start == 0``), clears the optimizer state (a fresh Adam, as Cole's
      second run); a run resumed inside that epoch keeps the state it saved, so a resume stays exact.

    Every decision is a function of ``(epoch, start)`` and the config. Returns whether the backbone is frozen.
    """
    frozen = backbone_frozen(phases, epoch)
    backbone = _backbone(model)
    backbone.requires_grad_(not frozen)
    if frozen:
        backbone.eval()
        log.info("epoch %d: backbone frozen (%s)", epoch,
                 "freeze_backbone" if phases.freeze_backbone else f"linear_init_epochs={phases.linear_init_epochs}")
    if phases.linear_init_lr is not None and optimizer is not None:
        if scheduler is None or not base_lr:
            raise ValueError("phases.linear_init_lr needs the run's scheduler and optim.lr")
        factor = float(phases.linear_init_lr) / float(base_lr) if frozen else 1.0
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr * factor
    boundary = not phases.freeze_backbone and phases.linear_init_epochs > 0 \
        and epoch == phases.linear_init_epochs + 1 and start == 0
    if boundary and phases.reset_optimizer and optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        inner.state.clear()
        log.info("epoch %d: end-to-end phase, optimizer state reset (phases.reset_optimizer)", epoch)
    return frozen


def ddp_kwargs(phases: Any) -> List[Any]:
    """accelerate kwargs handlers a run with phases needs: under DDP a frozen backbone's parameters get no
    gradient in the frozen epochs, which DDP accepts only with ``find_unused_parameters`` (no effect on one
    process)."""
    if not (phases.freeze_backbone or phases.linear_init_epochs > 0):
        return []
    from accelerate.utils import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(find_unused_parameters=True)]


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that currently require a gradient (for logs and tests)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
