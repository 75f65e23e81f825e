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

The layout arithmetic (indices, reshapes, names) is :class:`vlpl.store.views.ViewSpec`. With the dense
patch-token view (``ViewSpec.dense``) the functions here still make only the ``num_image_views`` image crops
(that layout without the dense rows); the dense rows come from the global crops' patch tokens
(:meth:`vlpl.vlm.backend.VLMBackend.encode_image_tokens`, :func:`dense_view_scores`).

No PIL work per crop: the resize is ``torch.nn.functional.interpolate`` (bicubic, antialiased, rounded
to uint8 levels as PIL does) so it runs on the GPU.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vlpl.store.views import ViewSpec  # the layout itself (torch-free); re-exported here

__all__ = ["ViewSpec", "tile_boxes", "grid_tiles", "make_views", "make_views_batch", "dense_view_scores"]

#: source pixels per tensor operation of :func:`make_views_batch` on a CPU (about three 640 x 480 images):
#: measured faster than whole-batch passes, whose float copies fall out of the caches
CPU_CHUNK_PIXELS = 1 << 20


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
    """All image crops of one image: uint8 (3, H, W) on the target device -> (num_image_views, 3, h, w)
    normalised (V of them without the dense view)."""
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
    dtype: torch.dtype = torch.float32, chunk_pixels: Optional[int] = -1,
) -> torch.Tensor:
    """Views of several images, concatenated: (len(images) * V, 3, h, w), equal to
    ``torch.cat([make_views(im, ...) for im in images])`` element for element.

    Batched: images are grouped by size (H, W); each group's global views are one ``interpolate`` call, its
    g x g tiles are cut with one reshape (no loop over tiles) and resized in one call; the flip is one
    ``flip`` over the whole batch and the normalisation one in-place pass with the mean/std made once. The
    arithmetic per pixel is the same as :func:`make_views` (the same antialiased resize, rounding and
    ``(x - 255 mean) / (255 std)``), so the result is identical, not just close. The only Python loop is
    over the distinct sizes in the batch (and, on a CPU, over cache-sized chunks of a group).

    ``chunk_pixels``: at most this many source pixels per tensor operation (None: a whole size group at
    once; -1, the default: None on CUDA, :data:`CPU_CHUNK_PIXELS` elsewhere, where working sets that stay
    in the CPU's caches are faster than one large pass). It does not change the result.
    """
    if not len(images):
        raise ValueError("make_views_batch: no images")
    for k, im in enumerate(images):
        if im.ndim != 3 or im.shape[0] != 3:
            raise ValueError(f"image {k}: expected a (3, H, W) image tensor, got shape {tuple(im.shape)}")
        if spec.grid and (im.shape[1] < spec.grid or im.shape[2] < spec.grid):
            raise ValueError(f"image {k} of {im.shape[2]}x{im.shape[1]} pixels is too small for a "
                             f"{spec.grid}x{spec.grid} grid")
    device = images[0].device
    n, nv, g = len(images), spec.n_image_views, spec.grid
    h, w = spec.image_size
    out = torch.empty((n, spec.num_image_views, 3, h, w), dtype=torch.float32, device=device)
    groups: Dict[Tuple[int, int], List[int]] = {}
    for k, im in enumerate(images):
        groups.setdefault((int(im.shape[1]), int(im.shape[2])), []).append(k)
    if chunk_pixels == -1:
        chunk_pixels = None if device.type == "cuda" else CPU_CHUNK_PIXELS
    for (H, W), group in groups.items():
        step = len(group) if chunk_pixels is None else max(1, chunk_pixels // (H * W))
        for c in range(0, len(group), step):
            ks = group[c : c + step]
            batch = torch.stack([images[k] for k in ks]).to(torch.float32)  # (m, 3, H, W)
            idx = slice(ks[0], ks[-1] + 1) if ks[-1] - ks[0] == len(ks) - 1 else _index(ks, device)
            out[idx, 0] = _resize(batch, spec.image_size, spec.resize_mode, spec.interpolation)
            if g:
                out[idx, 1:nv] = _resize(grid_tiles(batch, g), spec.image_size, spec.resize_mode,
                                         spec.interpolation).view(len(ks), g * g, 3, h, w)
    if spec.flips:
        out[:, nv:] = out[:, :nv].flip(-1)
    m, s = _norm_tensors(mean, std, device)
    out = out.view(n * spec.num_image_views, 3, h, w).sub_(m).div_(s)
    return out if dtype == torch.float32 else out.to(dtype)


def _index(ks: List[int], device: torch.device) -> torch.Tensor:
    """``ks`` as an index tensor on ``device``; on CUDA through pinned memory with ``non_blocking``, so that
    the host does not wait for the device's queued work (a pageable copy would)."""
    t = torch.tensor(ks, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def grid_tiles(batch: torch.Tensor, grid: int) -> torch.Tensor:
    """The g x g tiles of a same-size batch (m, 3, H, W) -> (m * g * g, 3, H // g, W // g), row-major per
    image (tile (i, j) of :func:`tile_boxes`), by one reshape: remainder rows/columns are dropped."""
    m, c, H, W = batch.shape
    th, tw = H // grid, W // grid
    x = batch[..., : grid * th, : grid * tw].reshape(m, c, grid, th, grid, tw)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(m * grid * grid, c, th, tw)


_NORM_CACHE: Dict[Tuple[Tuple[float, ...], Tuple[float, ...], str], Tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_tensors(mean: Sequence[float], std: Sequence[float], device: torch.device
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """255 mean and 255 std as (1, 3, 1, 1) float32 on ``device``, made once per (mean, std, device)."""
    key = (tuple(float(x) for x in mean), tuple(float(x) for x in std), str(device))
    if key not in _NORM_CACHE:
        m = torch.tensor(key[0], device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        s = torch.tensor(key[1], device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        _NORM_CACHE[key] = (m, s)
    return _NORM_CACHE[key]


def dense_view_scores(tokens: torch.Tensor, text: torch.Tensor, topk: int = 1,
                      max_elements: int = 1 << 26) -> torch.Tensor:
    """The dense view's score per class (ours; the TagCLIP / PIAA idea of local image-text evidence):
    ``(N, P, D)`` unit-norm projected patch tokens and ``(C, D)`` unit-norm class embeddings ->
    ``(N, C)``: for each class, the mean of its ``topk`` highest patch cosines (``topk=1``: the max over
    patches). Computed in chunks of images so that at most ``max_elements`` patch-class cosines are held."""
    if tokens.ndim != 3 or text.ndim != 2 or tokens.shape[2] != text.shape[1]:
        raise ValueError(f"dense_view_scores: tokens (N, P, D) and text (C, D) with the same D; got "
                         f"{tuple(tokens.shape)} and {tuple(text.shape)}")
    n, p, _ = tokens.shape
    k = min(int(topk), p)
    step = max(1, max_elements // max(1, p * text.shape[0]))
    t = text.to(tokens.device, torch.float32)
    out = []
    for a in range(0, n, step):
        cos = tokens[a : a + step].float() @ t.T  # (n', P, C)
        best = cos.max(dim=1).values if k == 1 else cos.topk(k, dim=1).values.mean(dim=1)
        out.append(best)
    return torch.cat(out) if out else tokens.new_zeros((0, text.shape[0]), dtype=torch.float32)
