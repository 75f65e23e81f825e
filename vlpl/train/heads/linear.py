"""``linear``: the papers' head, ``Linear(F, C)`` on the globally pooled feature (ALGORITHMS.md 2c)."""
from __future__ import annotations

import torch
from torch import nn

from vlpl.registry import HEADS
from vlpl.train.heads.base import Head
from vlpl.train.model import ClassContext, ModelOutput


@HEADS.register("linear")
class LinearHead(Head):
    """logits = ``fc(pooled)``; the class context only sets C (text embeddings are not used)."""

    uses_tokens = False

    def __init__(self, in_features: int, context: ClassContext) -> None:
        super().__init__(in_features, context)
        self.fc = nn.Linear(in_features, context.num_classes)

    def forward(self, out: ModelOutput) -> torch.Tensor:
        return self.fc(out.pooled)
