"""The trainable classifier: a backbone (timm by name, or an open_clip image tower) + a head.

Heads are registry entries (``HEADS``), so label-graph heads (SigRL's GMC / SVFR, roadmap) plug in
without touching the trainer: a head is built as ``HEADS.create(name, in_features, num_classes, **kw)``
and maps pooled features (B, F) to logits (B, C).
"""
from __future__ import annotations

import logging
import os
from typing import Iterator, Tuple

import torch
from torch import nn

from vlpl.config import ConfigError, StudentConfig
from vlpl.registry import HEADS

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@HEADS.register("linear")
class LinearHead(nn.Module):
    """``Linear(F, C)``: the papers' head on globally pooled features (ALGORITHMS.md 2c)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, num_features: int,
                 mean: Tuple[float, ...], std: Tuple[float, ...]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_features = num_features
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.head.parameters() if p.requires_grad)


class _OpenClipTower(nn.Module):
    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        return out[0] if isinstance(out, tuple) else out


def _timm_backbone(cfg: StudentConfig) -> Tuple[nn.Module, int, Tuple[float, ...], Tuple[float, ...]]:
    import timm

    if cfg.name not in timm.list_models(pretrained=False) and not timm.is_model(cfg.name):
        raise ConfigError(f"model.name: {cfg.name!r} is not a timm model (see timm.list_models())")
    model = None
    if cfg.pretrained:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            log.warning("HF_HUB_OFFLINE=1: no ImageNet weights for %s; using random initialisation", cfg.name)
        else:
            try:
                model = timm.create_model(cfg.name, pretrained=True, num_classes=0)
            except Exception as e:  # noqa: BLE001 - offline, no cache, or no such weights
                log.warning("could not load ImageNet weights for %s (%s: %s); using random initialisation",
                            cfg.name, type(e).__name__, str(e).splitlines()[0][:200])
    if model is None:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0)
    pc = getattr(model, "pretrained_cfg", {}) or {}
    mean, std = tuple(pc.get("mean", IMAGENET_MEAN)), tuple(pc.get("std", IMAGENET_STD))
    return model, int(model.num_features), mean, std


def _open_clip_backbone(cfg: StudentConfig) -> Tuple[nn.Module, int, Tuple[float, ...], Tuple[float, ...]]:
    import open_clip

    from vlpl.vlm.backend import register_bundled_configs

    register_bundled_configs()
    model = open_clip.create_model(cfg.name, pretrained=cfg.open_clip_pretrained, weights_only=True)
    pp = open_clip.get_model_preprocess_cfg(model)
    dim = int(model.visual.output_dim)
    return _OpenClipTower(model.visual), dim, tuple(pp["mean"]), tuple(pp["std"])


def create_classifier(cfg: StudentConfig, num_classes: int) -> Classifier:
    if cfg.kind == "timm":
        backbone, nf, mean, std = _timm_backbone(cfg)
    elif cfg.kind == "open_clip":
        backbone, nf, mean, std = _open_clip_backbone(cfg)
    else:
        raise ConfigError(f"model.kind: expected 'timm' or 'open_clip', got {cfg.kind!r}")
    if cfg.normalization == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif cfg.normalization != "model":
        raise ConfigError(f"model.normalization: expected 'imagenet' or 'model', got {cfg.normalization!r}")
    head = HEADS.create(cfg.head.name, nf, num_classes, **cfg.head.params)
    return Classifier(backbone, head, nf, mean, std)
