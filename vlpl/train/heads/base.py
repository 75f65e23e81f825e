"""The base class of classifier heads (see :mod:`vlpl.train.heads`)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from vlpl.train.model import ClassContext, ModelOutput


class Head(nn.Module):
    """``Head(in_features, context, **params)``; ``forward(out: ModelOutput) -> logits (B, C)``.

    ``uses_tokens``: whether ``forward`` reads ``out.tokens`` (False lets the backbone skip them).
    """

    uses_tokens: ClassVar[bool] = True

    def __init__(self, in_features: int, context: ClassContext) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.num_classes = context.num_classes

    def forward(self, out: ModelOutput) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
