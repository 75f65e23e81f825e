"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

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
