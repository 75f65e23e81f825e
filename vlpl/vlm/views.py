"""DAMP views (ALGORITHMS.md 7c, Decisions 3-4) made with batched tensor ops on the model's device.

From one decoded image (uint8, 3 x H x W) we make a global view and a g x g non-overlapping grid of
tiles, each resized to the model's input size, and each also horizontally flipped. Tile (i, j) is the
box ``[j*floor(W/g), (j+1)*floor(W/g)) x [i*floor(H/g), (i+1)*floor(H/g))`` of the original-resolution
image (the remainder pixels at the right and bottom edges belong to no tile, as in the released code).
The flipped variant of a view is the horizontal mirror of that view (each tile flips on its own), so
the cached pair is exactly what the released code's per-view random flip draws from.

Layout of the ``V = n_variants x (1 + g^2)`` views, variant-major::

    v = variant * (1 + g^2) + view,   variant 0 = unflipped, 1 = flipped,
    view 0 = global, view 1 + i*g + j = tile (i, j)

The layout arithmetic (indices, reshapes, names) is :class:`vlpl.store.views.ViewSpec`.

No PIL work per crop: the resize is ``torch.nn.functional.interpolate`` (bicubic, antialiased, rounded
to uint8 levels as PIL does) so it runs on the GPU.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from vlpl.store.views import ViewSpec  # the layout itself (torch-free); re-exported here

__all__ = ["ViewSpec", "tile_boxes", "make_views", "make_views_batch"]


def tile_boxes(height: int, width: int, grid: int) -> List[Tuple[int, int, int, int]]:
    """(top, left, bottom, right) of each tile, row-major."""
    th, tw = height // grid, width // grid
    return [(i * th, j * tw, (i + 1) * th, (j + 1) * tw) for i in range(grid) for j in range(grid)]


def _resize(batch: torch.Tensor, size: Tuple[int, int], mode: str, interpolation: str) -> torch.Tensor:
    """(N, 3, h, w) float in [0, 255] -> (N, 3, *size), as open_clip's eval transform would."""
    h, w = batch.shape[-2:]
    oh, ow = size
    if mode == "shortest":
        # torchvision's Resize(int) on the shorter side (long side truncated), then a centre crop
        s = max(oh, ow)
        rh, rw = (s, max(ow, int(s * w / h))) if h <= w else (max(oh, int(s * h / w)), s)
    else:
        rh, rw = oh, ow
    if (rh, rw) != (h, w):
        antialias = interpolation in ("bilinear", "bicubic")
        batch = F.interpolate(batch, size=(rh, rw), mode=interpolation, antialias=antialias,
                              align_corners=False if interpolation != "nearest" else None)
        batch = batch.round_().clamp_(0, 255)  # PIL resizes to uint8 levels
    if (rh, rw) != (oh, ow):
        top, left = int(round((rh - oh) / 2.0)), int(round((rw - ow) / 2.0))
        batch = batch[..., top : top + oh, left : left + ow]
    return batch


def make_views(
    image: torch.Tensor,
    spec: ViewSpec,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """All views of one image: uint8 (3, H, W) on the target device -> (V, 3, h, w) normalised."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
    H, W = image.shape[-2:]
    if spec.grid and (H < spec.grid or W < spec.grid):
        raise ValueError(f"image of {W}x{H} pixels is too small for a {spec.grid}x{spec.grid} grid")
    img = image.to(torch.float32).unsqueeze(0)
    views = [_resize(img, spec.image_size, spec.resize_mode, spec.interpolation)]
    if spec.grid:
        tiles = torch.cat([img[..., t:b, le:r] for t, le, b, r in tile_boxes(H, W, spec.grid)])
        views.append(_resize(tiles, spec.image_size, spec.resize_mode, spec.interpolation))
    out = torch.cat(views)  # (1 + g^2, 3, h, w)
    if spec.flips:
        out = torch.cat([out, out.flip(-1)])
    m = torch.tensor(mean, device=out.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=out.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return ((out - m) / s).to(dtype)


def make_views_batch(
    images: Sequence[torch.Tensor], spec: ViewSpec, mean: Sequence[float], std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Views of several images, concatenated: (len(images) * V, 3, h, w)."""
    return torch.cat([make_views(im, spec, mean, std, dtype) for im in images])
