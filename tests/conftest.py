"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data`` (the real test data); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found: {SHARED_DATA} is absent (real test data lives outside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def coco256_root() -> Path:
    """``<repo>/../shared/data/coco256`` (256 real COCO images with full labels); skips when absent."""
    root = SHARED_DATA / "coco256"
    if not (root / "labels.csv").is_file():
        pytest.skip(f"../shared/data/coco256 not found: {root} is absent (real test data lives outside the repo)")
    return root


def make_subset_dataset(src: Path, dst: Path, n_train: int, n_test: int = 0,
                        bad: Sequence[Tuple[int, str, bytes, str, str]] = ()) -> Path:
    """A folder-format dataset with the first ``n_train`` train and ``n_test`` test images of coco256.

    ``bad``: (position in labels.csv, file name, file bytes, split, labels) rows to insert, e.g. corrupt
    or truncated images.
    """
    import csv

    rows = list(csv.DictReader(open(src / "labels.csv")))
    keep = [r for r in rows if r["split"] == "train"][:n_train] + [r for r in rows if r["split"] == "test"][:n_test]
    (dst / "images").mkdir(parents=True)
    out = []
    for r in keep:
        name = Path(r["image"]).name
        (dst / "images" / name).write_bytes((src / r["image"]).read_bytes())
        out.append({"image": f"images/{name}", "split": r["split"], "labels": r["labels"]})
    for pos, name, data, split, labels in bad:
        (dst / "images" / name).write_bytes(data)
        out.insert(pos, {"image": f"images/{name}", "split": split, "labels": labels})
    with open(dst / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "split", "labels"])
        w.writeheader()
        w.writerows(out)
    (dst / "classes.txt").write_text((src / "classes.txt").read_text())
    return dst


TINY_TEACHER = REPO_ROOT / "configs" / "models" / "tiny.yaml"


@pytest.fixture(scope="session")
def coco256_store(coco256_root, tmp_path_factory) -> Path:
    """One score store over all of coco256 (tiny random teacher, grid 2 with flips: V = 10), built once per
    session and shared by every test that only READS a store. A test that writes to a store (resume,
    corruption, overwrite) must build its own."""
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel

    out = tmp_path_factory.mktemp("coco256") / "store"
    run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], [
        f"data.root={coco256_root}", f"out={out}", "shard_size=128", "num_workers=0", "progress=false",
        "views.grid=2"]))
    return out


@pytest.fixture(scope="session")
def coco256_partial_store(coco256_root, tmp_path_factory) -> Path:
    """coco256 with the MLR-PL partial-label protocol at p = 0.5 (ALGORITHMS.md 10: each label kept with probability
    0.5, seed 0; full labels on val/test), tiny teacher, grid 2: READ-only, as ``coco256_store``."""
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel

    out = tmp_path_factory.mktemp("coco256_partial") / "store"
    run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], [
        f"data.root={coco256_root}", f"out={out}", "shard_size=128", "num_workers=0", "progress=false",
        "views.grid=2", "data.observed.mode=partial", "data.observed.keep=0.5"]))
    return out


@pytest.fixture(scope="session")
def coco256_real_partial_store(coco256_root, tmp_path_factory) -> Path:
    """coco256 with REAL partial annotations (configs/datasets/coco256_partial_real.yaml: a positives/negatives
    labels file, observed mode given, labels_kind partial on every split), tiny teacher, grid 2: READ-only."""
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel

    data = REPO_ROOT / "configs" / "datasets"
    out = tmp_path_factory.mktemp("coco256_real_partial") / "store"
    run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER, data / "coco256_partial_real.yaml"], [
        f"data.root={coco256_root}", f"data.labels={data / 'coco256_partial_real.csv'}", f"out={out}",
        "shard_size=128", "num_workers=0", "progress=false", "views.grid=2"]))
    return out
