"""Shared helpers of the benchmark scripts: device and version record, in-memory images, JSON output.

Not part of the ``vlpl`` package: the scripts import it from their own folder.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent
COCO256 = REPO_ROOT.parent / "shared" / "data" / "coco256"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """GPU name from torch, or the CPU model name from /proc/cpuinfo (platform.processor() otherwise)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    s = re.sub(r"\(r\)|\(tm\)", "", text.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s[:48].strip("-") or "unknown"


def environment(device: torch.device) -> Dict[str, Any]:
    """Exact versions and the device, as timm records its benchmark results."""
    import open_clip
    import timm

    import vlpl

    env: Dict[str, Any] = {
        "device_type": device.type,
        "device": device_name(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "timm": timm.__version__,
        "open_clip": open_clip.__version__,
        "vlpl": vlpl.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_num_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        import os

        env["cpu_count"] = os.cpu_count()
    return env


def now_date() -> str:
    return _dt.date.today().isoformat()


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time of a block, synchronising the device at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def load_images(n: int, seed: int = 0, fallback_size: Tuple[int, int] = (480, 640)) -> Tuple[list, str]:
    """``n`` decoded RGB PIL images (fully loaded in memory), cycling over the coco256 images.

    Falls back to random uint8 images of ``fallback_size`` (H, W) when ../shared/data/coco256 is absent.
    Returns (images, source description).
    """
    from PIL import Image

    files = sorted((COCO256 / "images").rglob("*.jpg")) if (COCO256 / "images").is_dir() else []
    if files:
        out = []
        for k in range(n):
            with Image.open(files[k % len(files)]) as im:
                out.append(im.convert("RGB"))  # convert() loads the pixels: decoding is done here
        distinct = min(n, len(files))
        return out, f"coco256 ({distinct} distinct real COCO images, decoded once, kept in memory)"
    rng = np.random.default_rng(seed)
    h, w = fallback_size
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]
    return out, f"random uint8 images {w}x{h} (coco256 not found at {COCO256})"


def pil_to_uint8(img: Any) -> torch.Tensor:
    """PIL RGB image -> uint8 (3, H, W) tensor (what vlpl's decode workers produce)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def default_out(name: str, device: torch.device, date: str) -> Path:
    return RESULTS_DIR / f"{name}-{slug(device_name(device))}-{date}.json"


def write_json(path: Path, obj: Dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
    return path


def variant_rows(variants: Dict[str, Dict[str, Any]], rate_key: str, frac_key: str) -> List[List[str]]:
    """One table row per variant: median and per-round images/s, a rate column, TFLOP/s and a fraction."""
    rows = []
    for k, v in variants.items():
        frac = v[frac_key]
        rows.append([k, f"{v['images_per_s_median']:.2f}", " ".join(f"{x:.2f}" for x in v["images_per_s_rounds"]),
                     f"{v[rate_key]:.1f}", f"{v['achieved_tflops_per_s']:.3f}",
                     "-" if frac is None else f"{100 * frac:.1f}%"])
    return rows


def add_common_args(p: Any, out_default: str) -> None:
    """The arguments both scripts take: CLIP weights, rounds, device, classes, seed, result file."""
    p.add_argument("--clip-pretrained", default="none",
                   help="open_clip pretrained tag or checkpoint file; 'none' = random init (speed only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--classes", type=int, default=80, help="number of classes C")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"result JSON (default benchmarks/results/{out_default}.json)")


def class_names(n: int) -> List[str]:
    """The coco256 class names when there are n of them, else 'class i' (names only affect the prompts)."""
    f = COCO256 / "classes.txt"
    if f.is_file():
        names = [s.strip() for s in f.read_text().splitlines() if s.strip()]
        if len(names) == n:
            return names
    return [f"class {i}" for i in range(n)]


def run_main(run: Any, parse_args: Any, report: Any, argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    """The scripts' entry point: quiet third-party logs, run, print the report, return the result dict."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    res = run(parse_args(argv))
    print(report(res))
    return res


def table(rows: List[List[str]], header: List[str]) -> str:
    cols = [header] + rows
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def git_commit() -> Optional[str]:
    """The repository's HEAD commit (recorded with every result), or None outside a git checkout."""
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None
