"""One way to open an image, in every stage: references, decode rules, confinement, errors.

An image *reference* is what a dataset row (and the store's ``image`` column) names:

* a path relative to the data root (``images/train2017/0001.jpg``);
* ``hf://<split>/<index>``: row ``index`` of split ``split`` of a Hugging Face dataset;
* further schemes are added in :data:`SCHEMES`: a function
  ``(source, rest_of_ref) -> (file object or bytes, name)`` per ``<scheme>://`` prefix; those of
  :data:`LAZY_SCHEMES` register themselves on first use: ``wds://<shard url>#<key>``, a webdataset tar member
  (:mod:`vlpl.data.webdataset`), and ``hfs://<split>/<index>``, a row of a streamed Hugging Face dataset
  (:mod:`vlpl.data.streaming`).

:meth:`ImageSource.open` (or :func:`open_image`) turns a reference into an RGB ``uint8`` PIL image
under these **decode rules** (one place, so the teacher and the student see the same pixels):

1. **Pixel budget before decoding**: width x height is read from the header; more than
   ``ImageConfig.max_pixels`` is refused before a single pixel is decoded. PIL's own
   decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``) stays on as well.
2. **Complete files only**: the whole image is decoded up front (``Image.load()``), so a truncated
   file is an error here, never a silently padded image (unless some code in the process has set
   ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``; a warning says so once).
3. **EXIF orientation** is applied (``PIL.ImageOps.exif_transpose``) when
   ``ImageConfig.exif_transpose``: the pixels are those a viewer shows. A file whose EXIF cannot be
   applied is an error (its orientation would be a guess).
4. **Modes**: 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I``) is scaled to 8 bits by keeping the
   high byte (``value >> 8``; ``I`` is first clipped to 0..65535, the 16-bit range PNG and TIFF
   decode to); images with transparency (``RGBA``, ``LA``, ``PA``, palette or grey/RGB with a
   ``transparency`` colour) are composited over the fixed background :data:`ALPHA_BACKGROUND`
   (white, as a browser shows them; dropping alpha would expose whatever colour hides under the
   transparent pixels); ``CMYK``, ``1``, ``L``, ``P``, ``YCbCr`` go through PIL's ``convert("RGB")``.
   Multi-frame files (GIF, TIFF) give their first frame.
5. **Root confinement**: a path reference must stay inside the data root once resolved (``..`` and
   symlinks followed); absolute paths, ``..`` escapes and symlinks pointing out of the root are refused
   unless ``ImageConfig.allow_outside_root``. Only regular files are opened (a FIFO or a device named
   ``x.jpg`` is refused instead of blocking the reader).

Every failure is an :class:`ImageLoadError` that names the file (its path, or the ``hf://`` row) and
the reason; :attr:`ImageLoadError.reason` is a short category used to count failures by kind.

:class:`ImageDataset` is the map-style dataset the training and evaluation loaders use; it yields
``(transform(image), k)`` like the training reader did.
"""
from __future__ import annotations

import collections.abc
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps

from vlpl.config import ImageConfig

logger = logging.getLogger(__name__)

HF_PREFIX = "hf://"
#: The colour transparent pixels are composited over (RGB).
ALPHA_BACKGROUND: Tuple[int, int, int] = (255, 255, 255)

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

_warned_truncated_flag = False


class ImageLoadError(Exception):
    """An image could not be opened or decoded; the message names the file (or HF row) and the reason.

    Attributes:
        ref: the image reference as the dataset names it.
        reason: a short category ("file not found", "truncated file", "too many pixels", ...), for
            counting failures by kind.
    """

    def __init__(self, message: str, ref: str = "", reason: str = "unreadable") -> None:
        super().__init__(message)
        self.ref = ref
        self.reason = reason

    def __reduce__(self):  # keep ref and reason across DataLoader worker processes
        return (type(self), (str(self), self.ref, self.reason))


def printable(ref: str) -> str:
    """``ref`` with undecodable file-name bytes (surrogate escapes) shown as ``\\udcXX``: safe to log and store."""
    return ref.encode("utf-8", "backslashreplace").decode("utf-8")


def is_valid_utf8(ref: str) -> bool:
    """Whether ``ref`` can be stored as UTF-8 (a name read from non-UTF-8 bytes holds lone surrogates)."""
    try:
        ref.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# --------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------


def _check_truncated_flag() -> None:
    global _warned_truncated_flag
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated_flag:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True somewhere in this process: "
            "truncated images will be padded silently instead of raising ImageLoadError"
        )
        _warned_truncated_flag = True


def _reason_of(e: BaseException) -> str:
    text = str(e).lower()
    if isinstance(e, Image.DecompressionBombError):
        return "too many pixels"
    if any(t in text for t in ("truncated", "broken data stream", "premature end", "unexpected end")):
        return "truncated file"
    if isinstance(e, Image.UnidentifiedImageError) or "cannot identify" in text:
        return "not an image"
    return "corrupt image"


def to_rgb(im: Image.Image) -> Image.Image:
    """A decoded image in any PIL mode -> 8-bit RGB under the module's mode rules (rule 4)."""
    mode = im.mode
    if mode == "RGB":
        return im if "transparency" not in im.info else _composite(im)
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(im)
        if mode == "I":
            arr = np.clip(arr, 0, 65535)
        grey = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        return _composite(im)
    return im.convert("RGB")


def _composite(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def decode_image(data: Union[bytes, BinaryIO, str, os.PathLike], name: str, cfg: ImageConfig) -> Image.Image:
    """Decode one image from bytes, a binary file object or a path, under the decode rules.

    Args:
        data: the encoded image.
        name: how errors name it (a path, or ``hf://split/index``).
        cfg: pixel budget and EXIF switch.

    Returns:
        An RGB image (mode ``"RGB"``, 8 bits per channel), fully decoded.

    Raises:
        ImageLoadError: empty, not an image, too many pixels, truncated or corrupt, or a mode that cannot
            be converted; the message names ``name``.
    """
    shown = printable(name)

    def fail(reason: str, detail: str) -> ImageLoadError:
        return ImageLoadError(f"cannot decode image {shown}: {reason}: {detail}", name, reason)

    _check_truncated_flag()
    if isinstance(data, (str, os.PathLike)):
        try:
            with open(data, "rb") as f:
                return decode_image(f, name, cfg)
        except OSError as e:
            raise fail("unreadable file", e.strerror or str(e)) from None
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise fail("empty file", "0 bytes")
        data = io.BytesIO(bytes(data))
    start = data.tell()
    try:
        im = Image.open(data)
    except Image.DecompressionBombError as e:
        raise fail("too many pixels", str(e)) from None
    except Image.UnidentifiedImageError:
        raise fail("not an image", "no image format PIL reads recognises its bytes") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types by format
        raise fail(_reason_of(e), f"{type(e).__name__}: {e}") from None
    orig = im
    try:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise fail("empty image", f"{w}x{h} pixels")
        if w * h > cfg.max_pixels:  # from the header: nothing decoded yet
            raise fail("too many pixels", f"{w}x{h} = {w * h} pixels exceeds the budget of {cfg.max_pixels} "
                       f"(images.max_pixels)")
        try:
            im.load()
            if im.format == "PNG":  # PIL decodes a PNG that lost its tail silently: check every chunk to IEND
                data.seek(start)
                with Image.open(data) as check:
                    check.verify()
        except Exception as e:  # noqa: BLE001
            raise fail(_reason_of(e), f"{type(e).__name__}: {e}") from None
        if cfg.exif_transpose:
            try:
                im = ImageOps.exif_transpose(im)
            except Exception as e:  # noqa: BLE001
                raise fail("bad EXIF orientation", f"{type(e).__name__}: {e}") from None
        try:
            out = to_rgb(im)
        except Exception as e:  # noqa: BLE001
            raise fail("unsupported mode", f"mode {im.mode!r}: {type(e).__name__}: {e}") from None
        if out is orig:  # already RGB: a copy, so that closing the file (multi-frame files keep it) leaves it
            out = orig.copy()
        return out
    finally:
        orig.close()


# --------------------------------------------------------------------------------------------------
# references and sources
# --------------------------------------------------------------------------------------------------

#: ``<scheme>://`` -> opener ``(source, rest) -> (bytes or binary file, name for errors)``; the file
#: references (no scheme) are handled by :meth:`ImageSource.resolve`. Add webdataset members here.
SCHEMES: Dict[str, Callable[["ImageSource", str], Tuple[Union[bytes, BinaryIO], str]]] = {}
#: schemes whose opener registers itself when its module is imported (imported on first use)
LAZY_SCHEMES: Dict[str, str] = {"wds": "vlpl.data.webdataset", "hfs": "vlpl.data.streaming"}


def _scheme_of(ref: str) -> Optional[str]:
    head, sep, _ = ref.partition("://")
    if sep and head and head.isascii() and head.replace("-", "").replace("_", "").isalnum():
        return head
    return None


@dataclass
class ImageSource:
    """Where a dataset's image references point, and the rules to open them.

    Attributes:
        root: the data root path references are relative to.
        cfg: the decode rules' settings (``images:`` in the stage configs).
        hf: for ``hf://`` references, a mapping from split name to a ``datasets.Dataset``.
        hf_image_column: the image column of ``hf``.
        hf_path: where ``hf`` was loaded from (a local folder or a hub id), recorded in the store.
        hf_stream: for ``hfs://`` references (a Hugging Face dataset read with ``streaming=True``, ``hf_path`` its
            location): the stream's row layout (:mod:`vlpl.data.streaming`), recorded in the store.
    """

    root: Path
    cfg: ImageConfig = field(default_factory=ImageConfig)
    hf: Optional[Mapping[str, Any]] = field(default=None, repr=False)
    hf_image_column: str = "image"
    hf_path: Optional[str] = None
    hf_stream: Optional[Dict[str, Any]] = None
    _root_real: Optional[Path] = field(default=None, init=False, repr=False, compare=False)
    _hf_raw: Dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # -- files ----------------------------------------------------------------------------------------
    @property
    def root_real(self) -> Path:
        """The data root with symlinks resolved."""
        if self._root_real is None:
            self._root_real = Path(os.path.realpath(self.root))
        return self._root_real

    def resolve(self, ref: str) -> Path:
        """The file a path reference names, checked against the root confinement rule.

        Raises:
            ImageLoadError: an empty reference, an absolute path, or a path that resolves (``..``,
                symlinks) outside the data root, unless ``cfg.allow_outside_root``.
        """
        shown = printable(ref)
        if not ref:
            raise ImageLoadError("cannot open image: empty image reference", ref, "empty reference")
        absolute = PurePosixPath(ref).is_absolute() or bool(PureWindowsPath(ref).drive)
        if absolute and not self.cfg.allow_outside_root:
            raise ImageLoadError(
                f"cannot open image {shown}: absolute path refused (references are relative to the data root "
                f"{self.root}; set images.allow_outside_root=true to allow)", ref, "outside the data root")
        path = Path(ref) if absolute else self.root / ref
        real = Path(os.path.realpath(path))
        if not self.cfg.allow_outside_root and not real.is_relative_to(self.root_real):
            why = "a symlink" if ".." not in PurePosixPath(ref.replace("\\", "/")).parts else "'..'"
            raise ImageLoadError(
                f"cannot open image {printable(str(path))}: resolves through {why} to {printable(str(real))}, outside "
                f"the data root {self.root_real} (set images.allow_outside_root=true to allow)",
                ref, "outside the data root")
        return real

    def _open_file(self, ref: str) -> Image.Image:
        real = self.resolve(ref)
        shown = printable(str(self.root / ref))
        try:
            st = real.stat()
        except FileNotFoundError:
            raise ImageLoadError(f"cannot open image {shown}: file not found", ref, "file not found") from None
        except OSError as e:
            raise ImageLoadError(f"cannot open image {shown}: {e.strerror or e}", ref, "unreadable file") from None
        import stat

        if not stat.S_ISREG(st.st_mode):
            raise ImageLoadError(f"cannot open image {shown}: not a regular file", ref, "not a regular file")
        if st.st_size == 0:
            raise ImageLoadError(f"cannot decode image {shown}: empty file: 0 bytes", ref, "empty file")
        try:
            f = open(real, "rb")
        except OSError as e:
            raise ImageLoadError(f"cannot open image {shown}: {e.strerror or e}", ref, "unreadable file") from None
        with f:
            try:
                return decode_image(f, str(self.root / ref), self.cfg)
            except ImageLoadError as e:
                e.ref = ref
                raise

    # -- Hugging Face ---------------------------------------------------------------------------------
    def _hf_split(self, split: str) -> Any:
        """The split with its image column read as raw bytes (``Image(decode=False)``): decoded here."""
        if split not in self._hf_raw:
            import datasets

            d = self.hf[split]  # type: ignore[index]
            d = d.select_columns([self.hf_image_column])
            if isinstance(d.features[self.hf_image_column], datasets.Image):
                d = d.cast_column(self.hf_image_column, datasets.Image(decode=False))
            self._hf_raw[split] = d
        return self._hf_raw[split]

    def _open_hf(self, ref: str) -> Image.Image:
        shown = printable(ref)
        if self.hf is None:
            raise ImageLoadError(f"cannot open {shown}: no Hugging Face dataset is attached to this image source "
                                 f"(a store records it in its manifest's dataset.hf entry; a store made before that "
                                 f"must be rebuilt)", ref, "no dataset")
        rest = ref[len(HF_PREFIX):]
        split, _, index = rest.rpartition("/")
        try:
            if split not in self.hf:
                raise KeyError(f"no split {split!r} (available: {', '.join(self.hf)})")
            value = self._hf_split(split)[int(index)][self.hf_image_column]
        except Exception as e:  # noqa: BLE001
            raise ImageLoadError(f"cannot read {shown}: {type(e).__name__}: {e}", ref, "missing row") from None
        try:
            if isinstance(value, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
                if value.get("bytes") is not None:
                    data: Any = value["bytes"]
                elif value.get("path"):
                    data = value["path"]
                else:
                    raise ImageLoadError(f"cannot read {shown}: the image cell has neither bytes nor a path", ref,
                                         "empty cell")
            elif isinstance(value, Image.Image):  # a non-Image() column holding PIL images
                buf = io.BytesIO()
                value.save(buf, format="PNG")
                data = buf.getvalue()
            else:
                raise ImageLoadError(f"cannot read {shown}: column {self.hf_image_column!r} holds "
                                     f"{type(value).__name__}, not an image", ref, "not an image")
            return decode_image(data, ref, self.cfg)
        except ImageLoadError as e:
            e.ref = ref
            raise

    # -- the one entry point --------------------------------------------------------------------------
    def open(self, ref: str) -> Image.Image:
        """Open and decode the image ``ref`` names (see the module docstring for rules and schemes).

        Returns:
            A fully decoded RGB image (``mode == "RGB"``, uint8).

        Raises:
            ImageLoadError: naming the file or row and the reason.
        """
        if ref.startswith(HF_PREFIX):
            return self._open_hf(ref)
        scheme = _scheme_of(ref)
        if scheme is not None:
            opener = SCHEMES.get(scheme)
            if opener is None and scheme in LAZY_SCHEMES:
                import importlib

                importlib.import_module(LAZY_SCHEMES[scheme])
                opener = SCHEMES.get(scheme)
            if opener is None:
                raise ImageLoadError(
                    f"cannot open image {printable(ref)}: no opener for references of scheme {scheme!r} "
                    f"(known: file paths, hf://{''.join(', ' + s + '://' for s in SCHEMES)})", ref, "unknown scheme")
            data, name = opener(self, ref[len(scheme) + 3:])
            try:
                return decode_image(data, name, self.cfg)
            except ImageLoadError as e:
                e.ref = ref
                raise
        return self._open_file(ref)

    # -- store round trip -----------------------------------------------------------------------------
    def describe(self) -> Dict[str, Any]:
        """What a store records (its manifest's ``dataset`` entry) to reopen these images later."""
        out: Dict[str, Any] = {"root": str(self.root_real)}
        if self.hf is not None:
            out["hf"] = {"path": self.hf_path, "image_column": self.hf_image_column}
        elif self.hf_stream is not None:  # streaming: the location and the stream's row layout
            out["hf"] = {"path": self.hf_path, "image_column": self.hf_image_column, "streaming": True,
                         "stream": self.hf_stream}
        return out

    @classmethod
    def from_store(cls, store_dataset_info: Mapping[str, Any], data_root_override: Optional[str],
                   cfg: Optional[ImageConfig] = None) -> "ImageSource":
        """The image source of a score store, from its manifest's ``dataset`` entry.

        Args:
            store_dataset_info: ``manifest["dataset"]``: ``root`` and, for a store made from a Hugging Face
                dataset, ``hf: {path, image_column, splits}`` (``path`` a local folder or a hub id; a relative
                local path is taken relative to the root).
            data_root_override: a data root to use instead of the recorded one (the images moved).
            cfg: decode rules (default :class:`ImageConfig`).

        Raises:
            FileNotFoundError: the data root does not exist, or the recorded Hugging Face dataset cannot
                be found.
        """
        cfg = cfg or ImageConfig()
        if "root" not in store_dataset_info and not data_root_override:
            raise FileNotFoundError("the store records no dataset root: set data_root=...")
        root = Path(data_root_override or store_dataset_info["root"])
        # webdataset shards and streamed rows may all be remote (fsspec URLs, a hub id): the root is then not needed
        # to reopen them (a local shard that is gone is a failed open naming it)
        remote_ok = (store_dataset_info.get("format") == "webdataset"
                     or bool((store_dataset_info.get("hf") or {}).get("streaming")))
        if not root.is_dir() and not remote_ok:
            raise FileNotFoundError(f"data root {root} (the images of the store) does not exist; set data_root=... "
                                    f"to where they are now")
        hf_info = store_dataset_info.get("hf")
        if not hf_info:
            return cls(root, cfg)
        from vlpl.data.readers import open_hf_dict

        location = str(hf_info["path"])
        if not Path(location).is_absolute() and (root / location).exists():
            location = str(root / location)
        if hf_info.get("streaming"):  # hfs:// rows are re-read from the stream (vlpl/data/streaming.py)
            return cls(root, cfg, hf_image_column=str(hf_info.get("image_column", "image")), hf_path=location,
                       hf_stream=dict(hf_info.get("stream") or {}))
        try:
            hf = open_hf_dict(location)
        except Exception as e:  # noqa: BLE001
            raise FileNotFoundError(f"cannot reopen the Hugging Face dataset {location!r} of the store "
                                    f"(manifest dataset.hf.path): {type(e).__name__}: {e}") from e
        return cls(root, cfg, hf=hf, hf_image_column=str(hf_info.get("image_column", "image")), hf_path=location)

    def __getstate__(self) -> Dict[str, Any]:  # DataLoader workers: re-derive the raw-bytes views there
        state = dict(self.__dict__)
        state["_hf_raw"] = {}
        return state


def open_image(ref: str, source: ImageSource) -> Image.Image:
    """``source.open(ref)``: the one function every stage opens an image with."""
    return source.open(ref)


class ImageDataset:
    """Map-style dataset over image references: item ``k`` -> ``(transform(image), k)``.

    A decode failure raises :class:`ImageLoadError` naming the file. Works with ``torch.utils.data.DataLoader``
    (``__len__`` and ``__getitem__``) and with its worker processes.
    """

    def __init__(self, source: ImageSource, refs: Sequence[str], transform: Optional[Callable[[Image.Image], Any]] = None
                 ) -> None:
        self.source = source
        # a sequence (a list, or the store's on-disk StringColumn) is indexed in place: no O(N) copy of the refs
        self.refs = refs if isinstance(refs, collections.abc.Sequence) and not isinstance(refs, str) else list(refs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, k: int) -> Tuple[Any, int]:
        img = self.source.open(self.refs[k])
        return (self.transform(img) if self.transform is not None else img), k
