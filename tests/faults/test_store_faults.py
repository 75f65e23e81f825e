"""Store faults: single-bit flips in shards and in the manifest, a shard changed on disk before a resume.

Each flip must be either detected on read, as a StoreError naming the file, or provably harmless: every
decoded value of the store identical to the original's. "Lost" counts flips that changed the data
silently (must be 0).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
from conftest import TINY_TEACHER, make_subset_dataset

from tests.faults.conftest import LONG, trials
from vlpl.store.store import ScoreStore, StoreError, row_schema

COLUMNS = row_schema(1, 1, 1).names


@pytest.fixture(scope="module")
def store_data(coco256_root, tmp_path_factory) -> Path:
    return make_subset_dataset(coco256_root, tmp_path_factory.mktemp("sfdata"), 10, 4)


def _build(data: Path, out: Path) -> Path:
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel

    return run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], [
        f"data.root={data}", f"out={out}", "shard_size=8", "num_workers=0", "progress=false", "views.grid=1",
        "index=false"]))


@pytest.fixture(scope="module")
def clean_store(store_data, tmp_path_factory) -> Path:
    return _build(store_data, tmp_path_factory.mktemp("sfstore") / "store")


def _decode_all(root: Path) -> List[Dict[str, Any]]:
    """Every value of every shard, through the store's reader (each read CRC- and schema-checked)."""
    return [a for _, a in ScoreStore(root).iter_shards(COLUMNS)]


def _same(a: List[Dict[str, Any]], b: List[Dict[str, Any]]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for k in x:
            u, v = x[k], y[k]
            if u.dtype == object or v.dtype == object:
                if u.tolist() != v.tolist():
                    return False
            elif u.shape != v.shape or not np.array_equal(u, v, equal_nan=u.dtype.kind == "f"):
                return False
    return True


def test_bit_flips_in_a_shard_are_detected_or_harmless(clean_store, tmp_path, record_fault):
    n = trials(40, 400)
    original = _decode_all(clean_store)
    shard = clean_store / "shards" / "part-00000.parquet"
    data = shard.read_bytes()
    rng = np.random.default_rng(20261130)
    work = tmp_path / "s"
    shutil.copytree(clean_store, work)
    target = work / "shards" / "part-00000.parquet"
    detected = harmless = lost = 0
    silent: List[str] = []
    for _ in range(n):
        bit = int(rng.integers(len(data) * 8))
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        target.write_bytes(bytes(flipped))
        try:
            got = _decode_all(work)
        except StoreError as e:
            assert "part-00000.parquet" in str(e), f"bit {bit}: error does not name the shard: {e}"
            detected += 1
            continue
        if _same(got, original):
            harmless += 1
        else:
            lost += 1
            silent.append(f"bit {bit} of {len(data) * 8}")
    record_fault("store", "1-bit flip in a shard", n, detected + harmless, lost,
                 f"{detected} detected on read (StoreError naming the shard), {harmless} left every decoded value "
                 f"identical; reads check page CRCs, schema and row count")
    assert lost == 0, f"{lost} of {n} flips changed the data silently: {silent[:10]}"
    assert detected >= n // 2  # most bits are data pages: the CRC must catch them


def test_bit_flips_in_the_manifest_are_detected_or_harmless(clean_store, tmp_path, record_fault):
    """Every single bit of manifest.json (a few thousand): a flip is named or leaves the parsed manifest equal."""
    path = clean_store / "manifest.json"
    data = path.read_bytes()
    original = json.loads(data)
    work = tmp_path / "s"
    shutil.copytree(clean_store, work)
    target = work / "manifest.json"
    bits = range(len(data) * 8) if LONG else np.random.default_rng(7).choice(len(data) * 8, 600, replace=False)
    detected = harmless = lost = 0
    for bit in bits:
        flipped = bytearray(data)
        flipped[int(bit) // 8] ^= 1 << (int(bit) % 8)
        target.write_bytes(bytes(flipped))
        try:
            store = ScoreStore(work)
        except StoreError as e:
            assert "manifest.json" in str(e)
            detected += 1
            continue
        if store.manifest == original:
            harmless += 1
        else:
            lost += 1
    record_fault("store", "1-bit flip in manifest.json", len(bits), detected + harmless, lost,
                 f"{detected} detected on open (checksum or JSON, naming manifest.json), {harmless} parse to the "
                 f"same manifest")
    assert lost == 0


def test_resume_redoes_a_shard_whose_bytes_changed(store_data, clean_store, tmp_path, record_fault):
    """A complete shard whose bytes no longer match its recorded sha256 is re-done on resume, not skipped."""
    out = tmp_path / "store"
    shutil.copytree(clean_store, out)
    shard = out / "shards" / "part-00001.parquet"
    good = shard.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 3] ^= 0x04
    shard.write_bytes(bytes(bad))
    other = (out / "shards" / "part-00000.parquet").stat().st_mtime_ns
    _build(store_data, out)
    assert shard.read_bytes() == good  # re-done, byte-identical to the original
    assert (out / "shards" / "part-00000.parquet").stat().st_mtime_ns == other  # the intact shard was skipped
    assert _same(_decode_all(out), _decode_all(clean_store))
    record_fault("store", "shard bytes changed before resume", 1, 1, 0,
                 "the shard's sha256 no longer matched its mark: re-done byte-identical, intact shard skipped")
