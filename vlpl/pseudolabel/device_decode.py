"""JPEG decoding on the teacher's device (``decode: device``; issue 10 item 6).

The DataLoader workers do everything but the pixels: :func:`probe_jpeg` resolves the reference through
:meth:`vlpl.data.images.ImageSource.resolve` (root confinement, symlinks), reads the file's bytes, and reads
the header with PIL (no pixel decoded): format, mode, size, EXIF orientation. Only a file that the CPU
path would decode without any special rule takes the device path:

* a plain file reference (no ``hf://`` or other scheme), a regular non-empty file;
* JPEG, 8-bit ``RGB`` or ``L`` (CMYK/YCCK, 12-bit and anything else go to PIL and its mode rules);
* the whole stream present (starts with SOI ``FFD8``, ends with EOI ``FFD9``: a truncated file goes to PIL,
  which refuses it as the decode rules say, where nvJPEG might decode it padded);
* within the pixel budget (``images.max_pixels``), at least ``grid`` pixels each way, not above
  ``views.max_side`` (PIL's thumbnail is not reproduced on the device);
* a readable EXIF orientation 1-8 (applied here with tensor flips/transposes, exactly as
  ``PIL.ImageOps.exif_transpose`` maps them; ignored when ``images.exif_transpose`` is false).

Everything else, and any image whose device decode fails or gives another size than its header, is
decoded by the CPU path (:meth:`DecodeDataset.decode` in the stage: the same rules, the same failed rows
and messages as with ``decode: cpu``). :func:`decode_on_device` decodes a batch with
``torchvision.io.decode_jpeg(..., device=...)``: nvJPEG on CUDA; on a CPU device torchvision's
libjpeg-turbo, whose pixels equal PIL's (tested on coco256), which is how the path is tested without a GPU.
nvJPEG's pixels may differ from libjpeg-turbo's by a few levels (IDCT and chroma upsampling), so the
decoder is part of the store's identity (``decode.jpeg_decoder``).
"""
from __future__ import annotations

import io
import logging
import stat
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from PIL import Image

from vlpl.data.images import HF_PREFIX, ImageSource, _scheme_of

log = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"


@dataclass
class EncodedJPEG:
    """A JPEG the worker checked for the device path.

    Attributes:
        data: the file's bytes, uint8 (n,).
        width, height: the stored size (before the orientation is applied), from the header.
        orientation: EXIF orientation 1-8 to apply (1: none, or ``exif_transpose`` off).
    """

    data: torch.Tensor
    width: int
    height: int
    orientation: int = 1


def probe_jpeg(source: ImageSource, ref: str, max_side: Optional[int] = None, grid: int = 0
               ) -> Optional[EncodedJPEG]:
    """``ref``'s bytes and header facts when it can be decoded on the device, else None (then the CPU path
    decodes it, or names its error). Never raises for a bad file."""
    if ref.startswith(HF_PREFIX) or _scheme_of(ref) is not None:
        return None
    try:
        real = source.resolve(ref)
        st = real.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size < 4:
            return None
        data = real.read_bytes()
    except Exception:  # noqa: BLE001 - the CPU path reports it
        return None
    if not data.startswith(_SOI) or not data.rstrip(b"\x00\r\n ").endswith(_EOI):
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only: no pixel is decoded here
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
            w, h = im.size
            orientation = 1
            if source.cfg.exif_transpose:
                orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        return None
    if w <= 0 or h <= 0 or w * h > source.cfg.max_pixels or (grid and (w < grid or h < grid)):
        return None
    if max_side and max(w, h) > max_side:
        return None
    return EncodedJPEG(torch.frombuffer(bytearray(data), dtype=torch.uint8), w, h, orientation)


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) -> the image as a viewer shows it under EXIF ``orientation`` (PIL's ``exif_transpose``:
    2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 270, 7 transverse, 8 rotate 90)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


def decode_on_device(items: Sequence[EncodedJPEG], device: torch.device) -> List[Optional[torch.Tensor]]:
    """Decode ``items`` on ``device`` to uint8 (3, H, W) RGB, oriented, contiguous; None where the device
    decoder fails or disagrees with the header (the caller decodes those on the CPU path)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not items:
        return []
    datas = [it.data for it in items]
    try:
        out: List[Optional[torch.Tensor]] = list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except Exception as e:  # noqa: BLE001 - one bad image fails the whole batched call: retry one by one
        log.debug("batched device JPEG decode failed (%s); decoding one by one", e)
        out = []
        for d in datas:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except Exception:  # noqa: BLE001
                out.append(None)
    result: List[Optional[torch.Tensor]] = []
    for it, img in zip(items, out):
        if img is None or tuple(img.shape) != (3, it.height, it.width):
            result.append(None)
            continue
        result.append(apply_orientation(img, it.orientation).contiguous())
    return result
