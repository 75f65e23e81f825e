"""FLOP counts and GPU peaks for the throughput / MFU numbers of the trainer and of ``benchmarks/``.

Counts come from torch's ``FlopCounterMode`` (matmuls and convolutions), which has two blind spots that
both matter for ViTs, so every count here goes through :func:`count_flops` / :func:`forward_flops`:

* the fused CPU attention kernel counts 0 FLOPs: attention runs on SDPA's math backend while counting;
* ``nn.MultiheadAttention``'s fused inference fast path (open_clip's ViT under ``no_grad`` in eval mode)
  is not counted at all: the forward runs with grad enabled on an input that requires grad, which takes
  the ordinary path (the same arithmetic; nothing is backpropagated).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

#: Dense bf16 peak FLOP/s of the GPUs MFU is reported for (vendor datasheets).
PEAK_FLOPS: Dict[str, float] = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs counted while running ``fn()``, attention on SDPA's math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def forward_flops(module: torch.nn.Module, x: torch.Tensor, forward: Optional[Callable[..., Any]] = None) -> float:
    """Forward FLOPs of ``module`` (or of its method ``forward``) on input ``x``, leaving it untouched.

    Runs in eval mode, so BatchNorm running statistics are not updated by the counting pass, and restores
    the module's mode afterwards; grad is enabled on a copy of ``x`` (see the module docstring).
    """
    was_training = module.training
    module.eval()
    try:
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            return count_flops(lambda: (forward or module)(x))
    finally:
        module.train(was_training)


def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak FLOP/s of the GPU ``device``; None on a CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
