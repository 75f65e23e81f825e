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
statistics and dropout as for fixed, pre-extracted features). The head keeps its optimizer state across the
phase boundary; the backbone's optimizer state starts when it first receives a gradient.

Differences from the released code: Cole et al. pre-extract the features once (no flip augmentation; here the
frozen backbone sees the training augmentation, unless ``hflip: false``), and run the two phases as two
trainings with their own learning rate and batch size (their issue #10) and a fresh Adam; here one run has one
learning rate schedule and batch size for both phases. GR/GPR's ``loss.params.linear_init`` (the epochs their
schedules wait) is a separate setting: give it the same value to start the schedules after the phase.
"""
from __future__ import annotations

import logging
from typing import Any, List

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


def apply_phase(model: nn.Module, phases: Any, epoch: int) -> bool:
    """Freeze (``requires_grad`` off, eval mode) or unfreeze the backbone of ``model`` for ``epoch``; call it
    after ``model.train()``. Returns whether the backbone is frozen."""
    frozen = backbone_frozen(phases, epoch)
    backbone = _backbone(model)
    backbone.requires_grad_(not frozen)
    if frozen:
        backbone.eval()
        log.info("epoch %d: backbone frozen (%s)", epoch,
                 "freeze_backbone" if phases.freeze_backbone else f"linear_init_epochs={phases.linear_init_epochs}")
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
