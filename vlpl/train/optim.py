"""Optimizer by timm name and the per-epoch learning-rate schedule.

``optim.name`` is any name ``timm.optim.list_optimizers()`` knows (adam, adamw, sgd, lamb, ...; a
``lookahead_`` prefix works too) and is created through ``timm.optim.create_optimizer_v2`` on vlpl's
parameter groups: the backbone at ``optim.lr``, the head at ``optim.head_lr`` (``lr`` when null), then the
loss's own groups (e.g. ROLE's label estimator). ``optim.params`` are passed to the optimizer as they are
(``momentum``, ``betas``, ``eps``, ``nesterov``, ...). Note timm's own defaults: ``sgd`` is Nesterov SGD
with momentum 0.9 (``momentum`` is plain SGD with momentum 0.9).
"""
from __future__ import annotations

import difflib
import logging
import math
from typing import Any, Dict, List, Sequence

import torch

from vlpl.config import ConfigError, OptimConfig

log = logging.getLogger(__name__)

SCHEDULERS = ("none", "cosine", "step")


def param_groups(cfg: OptimConfig, model: Any, extra_groups: Sequence[Dict[str, Any]] = ()) -> List[Dict[str, Any]]:
    """``[backbone at lr, head at head_lr] + extra_groups``; each group carries its ``name``."""
    return [{"params": list(model.backbone_parameters()), "lr": cfg.lr, "name": "backbone"},
            {"params": list(model.head_parameters()), "lr": cfg.head_lr if cfg.head_lr is not None else cfg.lr,
             "name": "head"}] + [dict(g) for g in extra_groups]


def _check_name(name: str) -> None:
    import timm.optim

    known = timm.optim.list_optimizers()
    parts = name.lower().split("_")
    base, prefix = parts[-1], parts[:-1]
    if base in known and prefix in ([], ["lookahead"]):
        return
    close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ConfigError(f"optim.name: {name!r} is not a timm optimizer (see timm.optim.list_optimizers()){hint}")


def create_optimizer(cfg: OptimConfig, model: Any,
                     extra_groups: Sequence[Dict[str, Any]] = ()) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over :func:`param_groups` (``model``: a
    :class:`~vlpl.train.model.Classifier`, or anything with ``backbone_parameters()`` and
    ``head_parameters()``), through ``timm.optim.create_optimizer_v2``."""
    from timm.optim import create_optimizer_v2, get_optimizer_info

    _check_name(cfg.name)
    groups = param_groups(cfg, model, extra_groups)
    kwargs = dict(cfg.params)
    for reserved in ("lr", "weight_decay", "opt"):
        if reserved in kwargs:
            raise ConfigError(f"optim.params.{reserved}: set optim.{'name' if reserved == 'opt' else reserved} "
                              f"instead (optim.params holds the optimizer's other arguments)")
    # timm drops these silently for an optimizer without them: a misspelt intent is an error here
    info = get_optimizer_info(cfg.name.lower().split("_")[-1])
    for key, has in (("momentum", info.has_momentum), ("eps", info.has_eps), ("betas", info.has_betas)):
        if key in kwargs and not has:
            raise ConfigError(f"optim.params.{key}: optimizer {cfg.name!r} has no {key!r} argument "
                              f"({info.description})")
    try:
        return create_optimizer_v2(groups, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)
    except TypeError as e:  # an argument this optimizer does not take
        raise ConfigError(f"optim.params: {sorted(kwargs)} for optimizer {cfg.name!r}: {e}") from None


def create_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer,
                     epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A ``LambdaLR`` stepped once per epoch: ``none`` (constant), ``cosine`` (to 0 at ``epochs``) or
    ``step`` (x ``gamma`` every ``step_size`` epochs)."""
    E = max(1, int(epochs))
    if cfg.scheduler == "none":
        def fn(e: int) -> float:
            return 1.0
    elif cfg.scheduler == "cosine":
        def fn(e: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(e, E) / E))
    elif cfg.scheduler == "step":
        if cfg.step_size < 1:
            raise ConfigError(f"optim.step_size: expected a positive integer, got {cfg.step_size}")
        gamma, step = cfg.gamma, cfg.step_size

        def fn(e: int) -> float:
            return gamma ** (e // step)
    else:
        raise ConfigError(f"optim.scheduler: expected one of {', '.join(SCHEDULERS)}, got {cfg.scheduler!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
