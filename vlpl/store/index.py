"""FAISS index over the store's image embeddings (ids = row numbers in store order).

Exact inner-product search (``IndexFlatIP``) on unit-norm float32 embeddings, i.e. cosine
similarity; failed rows are left out, so ids are the row numbers of the rows that are present.
Rebuildable from the shards at any time (:func:`build_index`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Tuple

import numpy as np

from vlpl.store.atomic import atomic_path

if TYPE_CHECKING:
    from vlpl.store.store import ScoreStore

log = logging.getLogger(__name__)

INDEX_FILE = "index/image_embeddings.faiss"


def build_index(store: "ScoreStore") -> Dict[str, Any]:
    import faiss

    dim = int(store.manifest["embedding_dim"])
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    n = 0
    for start, a in store.iter_shards(("image_embedding",)):  # one shard in memory at a time
        ok = a["image_embedding_valid"]
        ids = (start + np.nonzero(ok)[0]).astype(np.int64)
        vecs = np.ascontiguousarray(a["image_embedding"][ok], dtype=np.float32)
        if len(vecs):
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)
            index.add_with_ids(vecs, ids)
            n += len(ids)
    path = Path(store.root) / INDEX_FILE
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    log.info("FAISS index: %d vectors of dim %d -> %s", n, dim, path)
    return {"file": INDEX_FILE, "type": "IndexIDMap2(IndexFlatIP)", "metric": "inner_product",
            "num_vectors": int(n), "dim": int(dim)}


def load_index(root: Path) -> Any:
    import faiss

    path = Path(root) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no FAISS index in this store (built with index=false?)")
    return faiss.read_index(str(path))


def search(root: Path, queries: np.ndarray, k: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """(similarities, row ids) of the k nearest stored images for each query embedding."""
    index = load_index(root)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True).clip(min=1e-12)
    return index.search(q, k)
