"""A small, real, multi-label demo dataset built offline from the photographs bundled with scikit-image.

``skimage.data`` ships a handful of photographs inside the wheel (no download). Each was looked at and
labelled by hand with a small list of concrete objects / scenes; crops of a photograph are labelled
for what the crop itself shows (a subset of the photograph's objects), which gives enough images for a
train / test split. Only functions that load without network access are used (``eagle``, ``lily`` and
``skin`` need a pooch download and are left out; ``cat`` and ``chelsea`` are the same photograph).

Caveat for reading results: test images are crops of photographs whose other crops (or whole) are in
train, so the demo measures whether the pipeline runs end to end, not generalisation.

The folder written by :func:`materialize_demo_dataset` has the layout of ``vlpl``'s ``folder`` format
(see :func:`vlpl.data.readers.read_folder`)::

    dst/images/<name>.jpg   dst/labels.csv (image,split,labels; labels joined by "|")   dst/classes.txt
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from vlpl.store.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["DEMO_CLASSES", "DEMO_IMAGES", "materialize_demo_dataset", "demo_labels_csv"]

DEMO_CLASSES: List[str] = [
    "person", "flag", "rocket", "helmet", "camera", "tripod", "building", "sky", "grass", "tower",
    "cat", "cup", "spoon", "table", "motorcycle", "box", "coin", "text", "galaxy", "brick",
]

JPEG_QUALITY = 92

# One entry per demo image: the skimage.data function, an optional crop box (left, upper, right,
# lower) in the source's pixel coordinates, the labels (everything of DEMO_CLASSES that is visible),
# and the split. "name" is the output file stem.
DEMO_IMAGES: List[Dict[str, Any]] = [
    # astronaut (512x512, colour): NASA portrait of astronaut Eileen Collins in an orange suit; a US
    # flag on the left, a space-shuttle model (orbiter + boosters + tank) on the right, a black helmet
    # bottom right.
    {"name": "astronaut", "source": "astronaut", "box": None,
     "labels": ["person", "flag", "rocket", "helmet"], "split": "train"},
    {"name": "astronaut_upper", "source": "astronaut", "box": (0, 0, 512, 300),  # face, flag, shuttle; no helmet
     "labels": ["person", "flag", "rocket"], "split": "test"},
    {"name": "astronaut_flag", "source": "astronaut", "box": (0, 0, 70, 220),  # stars and stripes only
     "labels": ["flag"], "split": "train"},
    {"name": "astronaut_shuttle", "source": "astronaut", "box": (350, 0, 470, 290),  # the shuttle model
     "labels": ["rocket"], "split": "train"},
    {"name": "astronaut_face", "source": "astronaut", "box": (140, 10, 310, 200),  # head and neck ring
     "labels": ["person"], "split": "train"},
    {"name": "astronaut_helmet", "source": "astronaut", "box": (330, 370, 512, 512),  # black helmet only
     "labels": ["helmet"], "split": "test"},
    # camera (512x512, grey): the "cameraman": a man in a dark coat filming with a camera on a tripod,
    # on a lawn, buildings (domes, a tower block) and sky behind.
    {"name": "cameraman", "source": "camera", "box": None,
     "labels": ["person", "camera", "tripod", "grass", "sky", "building"], "split": "train"},
    {"name": "cameraman_buildings", "source": "camera", "box": (330, 90, 512, 225),  # skyline under sky
     "labels": ["building", "sky"], "split": "test"},
    {"name": "cameraman_tripod", "source": "camera", "box": (250, 330, 430, 512),  # tripod legs on grass
     "labels": ["tripod", "grass"], "split": "train"},
    {"name": "cameraman_sky", "source": "camera", "box": (300, 0, 512, 90),  # plain sky
     "labels": ["sky"], "split": "train"},
    {"name": "cameraman_head", "source": "camera", "box": (150, 60, 330, 200),  # head, camera, sky behind
     "labels": ["person", "camera", "sky"], "split": "test"},
    # chelsea (300x451, colour): close-up of a tabby cat's face.
    {"name": "cat", "source": "chelsea", "box": None, "labels": ["cat"], "split": "train"},
    {"name": "cat_face", "source": "chelsea", "box": (100, 30, 340, 300), "labels": ["cat"], "split": "test"},
    {"name": "cat_left", "source": "chelsea", "box": (0, 0, 230, 300), "labels": ["cat"], "split": "train"},
    # coffee (400x600, colour): an espresso cup on a saucer with a spoon, on a wooden table.
    {"name": "coffee", "source": "coffee", "box": None, "labels": ["cup", "spoon", "table"], "split": "train"},
    {"name": "coffee_cup", "source": "coffee", "box": (170, 10, 420, 290),  # cup, spoon, wood top-left
     "labels": ["cup", "spoon", "table"], "split": "test"},
    {"name": "coffee_spoon", "source": "coffee", "box": (330, 110, 425, 330),  # cup side and spoon on saucer
     "labels": ["cup", "spoon"], "split": "train"},
    {"name": "coffee_table", "source": "coffee", "box": (440, 0, 600, 110),  # bare wooden table top
     "labels": ["table"], "split": "train"},
    # rocket (427x640, colour): a Falcon 9 on its launch pad at dusk between lattice towers, dark-blue
    # sky, pad lights.
    {"name": "rocket", "source": "rocket", "box": None, "labels": ["rocket", "tower", "sky"], "split": "train"},
    {"name": "rocket_body", "source": "rocket", "box": (270, 110, 370, 400),  # the rocket against the sky
     "labels": ["rocket", "sky"], "split": "test"},
    {"name": "rocket_tower_left", "source": "rocket", "box": (0, 0, 100, 427),  # lattice tower, sky
     "labels": ["tower", "sky"], "split": "train"},
    {"name": "rocket_tower_right", "source": "rocket", "box": (540, 0, 640, 427),  # lattice tower, sky
     "labels": ["tower", "sky"], "split": "test"},
    {"name": "rocket_sky", "source": "rocket", "box": (100, 0, 540, 110),  # dusk sky only
     "labels": ["sky"], "split": "train"},
    # stereo_motorcycle (left view, 500x741, colour): a red Yamaha motorcycle in a garage, shelves of
    # cardboard boxes behind it.
    {"name": "motorcycle", "source": "stereo_motorcycle", "box": None,
     "labels": ["motorcycle", "box"], "split": "train"},
    {"name": "motorcycle_front", "source": "stereo_motorcycle", "box": (100, 80, 700, 460),  # bike, boxes behind
     "labels": ["motorcycle", "box"], "split": "test"},
    {"name": "motorcycle_boxes", "source": "stereo_motorcycle", "box": (590, 20, 741, 250),  # shelves of boxes
     "labels": ["box"], "split": "train"},
    {"name": "motorcycle_wheel", "source": "stereo_motorcycle", "box": (110, 230, 480, 460),  # wheel, engine
     "labels": ["motorcycle"], "split": "train"},
    # coins (303x384, grey): 24 ancient Greek coins laid out in rows on a dark background.
    {"name": "coins", "source": "coins", "box": None, "labels": ["coin"], "split": "train"},
    {"name": "coins_top_left", "source": "coins", "box": (0, 0, 200, 150), "labels": ["coin"], "split": "test"},
    {"name": "coins_bottom_right", "source": "coins", "box": (190, 150, 384, 303), "labels": ["coin"],
     "split": "train"},
    # page (191x384, grey): a photographed book page, "Region-based segmentation", printed text and code.
    {"name": "page", "source": "page", "box": None, "labels": ["text"], "split": "train"},
    {"name": "page_top", "source": "page", "box": (0, 0, 384, 110), "labels": ["text"], "split": "test"},
    # text (172x448, grey): handwritten maths formulas on lined paper, at an angle.
    {"name": "handwriting", "source": "text", "box": None, "labels": ["text"], "split": "train"},
    {"name": "handwriting_right", "source": "text", "box": (224, 0, 448, 172), "labels": ["text"], "split": "test"},
    # hubble_deep_field (872x1000, colour): the Hubble eXtreme Deep Field, galaxies on black.
    {"name": "deep_field", "source": "hubble_deep_field", "box": None, "labels": ["galaxy"], "split": "train"},
    {"name": "deep_field_top_left", "source": "hubble_deep_field", "box": (0, 0, 500, 436), "labels": ["galaxy"],
     "split": "test"},
    # grass (512x512, grey): a close-up of a lawn.
    {"name": "grass", "source": "grass", "box": None, "labels": ["grass"], "split": "train"},
    {"name": "grass_corner", "source": "grass", "box": (256, 256, 512, 512), "labels": ["grass"], "split": "test"},
    # brick (512x512, grey): a brick wall (or paving) in a running-bond pattern.
    {"name": "brick", "source": "brick", "box": None, "labels": ["brick"], "split": "train"},
    {"name": "brick_corner", "source": "brick", "box": (0, 0, 256, 256), "labels": ["brick"], "split": "test"},
]


def _load_source(name: str) -> np.ndarray:
    """The photograph as an (H, W, 3) uint8 array, from the files inside the scikit-image wheel."""
    try:
        import skimage.data as skd
    except ImportError as e:  # pragma: no cover - skimage is a dependency
        raise ImportError("the demo dataset needs scikit-image (pip install scikit-image)") from e
    if name == "stereo_motorcycle":
        arr = skd.stereo_motorcycle()[0]  # (left image, right image, disparity)
    else:
        arr = getattr(skd, name)()
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name}() returned {arr.dtype}; expected a uint8 photograph")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def _crop(arr: np.ndarray, box: Optional[Tuple[int, int, int, int]], name: str) -> np.ndarray:
    if box is None:
        return arr
    left, upper, right, lower = box
    h, w = arr.shape[:2]
    if not (0 <= left < right <= w and 0 <= upper < lower <= h):
        raise ValueError(f"demo image {name!r}: crop box {box} is outside the {w}x{h} source")
    return arr[upper:lower, left:right]


def _jpeg(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def demo_labels_csv() -> str:
    """The exact ``labels.csv`` text of the demo dataset."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "split", "labels"])
    for item in DEMO_IMAGES:
        w.writerow([f"images/{item['name']}.jpg", item["split"], "|".join(item["labels"])])
    return buf.getvalue()


def _check_table() -> None:
    names = [d["name"] for d in DEMO_IMAGES]
    if len(set(names)) != len(names):
        raise AssertionError("demo image names must be unique")
    for d in DEMO_IMAGES:
        unknown = [c for c in d["labels"] if c not in DEMO_CLASSES]
        if unknown or not d["labels"] or d["split"] not in ("train", "test"):
            raise AssertionError(f"demo image {d['name']!r}: bad labels {d['labels']} or split {d['split']!r}")


def materialize_demo_dataset(dst: Path) -> Path:
    """Write the demo dataset to ``dst`` (JPEG images, ``labels.csv``, ``classes.txt``); returns ``dst``.

    Deterministic (same bytes for the same scikit-image and Pillow) and idempotent: when ``dst``
    already holds this exact ``labels.csv`` and ``classes.txt`` and every image, nothing is rewritten.
    Each file is written atomically; ``labels.csv`` last, so an interrupted run is redone next time.
    """
    _check_table()
    dst = Path(dst)
    labels_text = demo_labels_csv()
    classes_text = "".join(f"{c}\n" for c in DEMO_CLASSES)
    labels_path, classes_path = dst / "labels.csv", dst / "classes.txt"
    images = [dst / "images" / f"{d['name']}.jpg" for d in DEMO_IMAGES]
    if (labels_path.is_file() and labels_path.read_text(encoding="utf-8") == labels_text
            and classes_path.is_file() and classes_path.read_text(encoding="utf-8") == classes_text
            and all(p.is_file() and p.stat().st_size > 0 for p in images)):
        log.info("demo dataset already at %s (%d images)", dst, len(images))
        return dst
    log.info("writing the demo dataset (%d images from skimage.data) to %s", len(DEMO_IMAGES), dst)
    sources: Dict[str, np.ndarray] = {}
    for item, path in zip(DEMO_IMAGES, images):
        src = item["source"]
        if src not in sources:
            sources[src] = _load_source(src)
        atomic_write_bytes(path, _jpeg(_crop(sources[src], item.get("box"), item["name"])))
    atomic_write_text(classes_path, classes_text)
    atomic_write_text(labels_path, labels_text)
    n_test = sum(d["split"] == "test" for d in DEMO_IMAGES)
    log.info("demo dataset: %d images (train %d, test %d), %d classes", len(DEMO_IMAGES),
             len(DEMO_IMAGES) - n_test, n_test, len(DEMO_CLASSES))
    return dst
