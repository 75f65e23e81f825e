"""FAISS index over the store's image embeddings (ids = store row numbers), at any scale.

The index type is a FAISS *factory string* (``faiss.index_factory``): ``Flat`` (exact, the default),
``IVF4096,PQ64`` (inverted lists + product quantisation: 64 bytes a vector, for 10M-1B images),
``HNSW32`` (graph, fast and accurate, 4x the memory of Flat), ``OPQ64,IVF65536,PQ64``, ... The metric is
always inner product on unit-norm float32 embeddings, i.e. cosine similarity.

Building (:func:`build_index`, called by ``StoreWriter.finalize`` and usable on any finished store):

1. types that need training (IVF, PQ, ...) are trained on a seeded sample of ``train_sample`` rows
   (read shard by shard: only the sampled rows are kept);
2. vectors are added shard by shard (one shard's embeddings in memory at a time);
3. ids are store row numbers. Failed rows are left out, so the ids are the row numbers of the rows that
   are present. Types with their own ids (IVF) take them directly; the others are wrapped in an
   ``IndexIDMap2`` (``faiss.index_factory`` types without ``add_with_ids``);
4. with ``gpu: auto`` the training and adding run on the GPUs when faiss-gpu is installed
   (``faiss.get_num_gpus() > 0``) and the type has a GPU version (Flat, IVF*; not HNSW), then the index is
   copied back to the CPU and written; otherwise on the CPU (``faiss.omp_set_num_threads`` as set);
5. search parameters (``nprobe`` for IVF, ``efSearch`` for HNSW; see :func:`default_search_params`) are
   set on the index before it is written, so a loaded index searches with them;
6. the file is written atomically; the manifest's ``index`` entry records the factory string, the metric,
   the vector count, how many vectors it was trained on, the search parameters, the device and the time.

An index is derived data: :func:`build_index` on the same store and settings gives the same file (Flat,
IVF, PQ: byte-identical; HNSW: same ids for the same vectors).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from vlpl.store.atomic import atomic_path

if TYPE_CHECKING:
    from vlpl.config import IndexConfig
    from vlpl.store.store import ScoreStore

log = logging.getLogger(__name__)

INDEX_FILE = "index/image_embeddings.faiss"
METRIC = "inner_product"


class IndexBuildError(ValueError):
    """An index setting that cannot be built (a bad factory string, a GPU asked for but absent)."""


def _settings(cfg: Any) -> "IndexConfig":
    """``cfg`` as an :class:`~vlpl.config.IndexConfig` (``None`` or ``True``: the defaults)."""
    from vlpl.config import IndexConfig

    if cfg is None or cfg is True:
        return IndexConfig()
    if isinstance(cfg, str):
        return IndexConfig(factory=cfg)
    if not isinstance(cfg, IndexConfig):
        raise TypeError(f"index settings: expected an IndexConfig, a factory string or True, got {cfg!r}")
    return cfg


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit-norm float32 copy (C-contiguous) of ``vectors`` (N, D)."""
    v = np.array(vectors, dtype=np.float32, order="C", copy=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True).clip(min=1e-12)
    return v


def create_index(dim: int, factory: str) -> Any:
    """An empty inner-product index of ``factory`` type; raises :class:`IndexBuildError` naming the
    ``index.factory`` setting when FAISS cannot parse it."""
    import faiss

    try:
        return faiss.index_factory(int(dim), str(factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise IndexBuildError(f"index.factory {factory!r}: not a FAISS index factory string for dim {dim} "
                              f"({first}); e.g. Flat, IVF4096,PQ64, HNSW32") from None


def _ivf(index: Any) -> Any:
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def takes_ids(index: Any) -> bool:
    """Whether ``index`` stores ids of its own (``add_with_ids``): IVF types and ID maps do; Flat, PQ and
    HNSW do not (they number vectors 0..n-1)."""
    import faiss

    return _ivf(index) is not None or isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2))


def default_search_params(index: Any) -> str:
    """Search parameters for ``index`` (ParameterSpace syntax): ``nprobe = clamp(nlist / 64, 8, 256)`` for
    IVF, ``efSearch=128`` for HNSW, nothing for exact types."""
    import faiss

    ivf = _ivf(index)
    if ivf is not None:
        return f"nprobe={int(min(max(ivf.nlist // 64, 8), 256, ivf.nlist))}"
    inner = faiss.downcast_index(index)
    while isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        inner = faiss.downcast_index(inner.index)
    if hasattr(inner, "hnsw"):
        return "efSearch=128"
    return ""


def set_search_params(index: Any, params: str) -> None:
    """Apply ``params`` (``"nprobe=32,efSearch=64"``) to ``index`` (through ID maps and transforms)."""
    import faiss

    if params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, params)
        except RuntimeError as e:
            raise IndexBuildError(f"index.search_params {params!r}: {str(e).strip().splitlines()[-1]}") from None


def _prepare_training(index: Any, seed: int) -> None:
    """Seed the k-means of IVF coarse quantisers and PQ codebooks, and turn off polysemous training.

    Polysemous training (on by default for ``PQ`` types built by ``index_factory``) re-orders the PQ
    codes for Hamming pre-filtering, which only a search with ``polysemous_ht`` uses (vlpl never sets
    it); it costs minutes even on small samples (measured: 98 s of 100 s for PQ16 on 4,000 vectors).
    """
    import faiss

    ivf = _ivf(index)
    if ivf is not None:
        ivf.cp.seed = int(seed)
    for obj in (ivf, faiss.downcast_index(index)):
        if obj is None:
            continue
        if hasattr(obj, "do_polysemous_training"):
            obj.do_polysemous_training = False
        pq = getattr(obj, "pq", None)
        if pq is not None and hasattr(pq, "cp"):
            pq.cp.seed = int(seed)


class IndexBuilder:
    """Builds one index from chunks of (ids, vectors), on the GPU when asked and possible.

    ``train(vectors)`` (if the type needs it), ``add(ids, vectors)`` any number of times (any int64 ids,
    in any order for ID-taking types), then ``finish()`` returns the CPU index with its search parameters
    set. Vectors are normalised here (cosine).
    """

    def __init__(self, dim: int, cfg: Any = None) -> None:
        import faiss

        self.cfg = _settings(cfg)
        self.dim = int(dim)
        self.index = create_index(self.dim, self.cfg.factory)
        _prepare_training(self.index, self.cfg.seed)
        self.native_ids = takes_ids(self.index)
        self.trained_on = 0
        self._ids: List[np.ndarray] = []  # row ids of vectors added to a type without ids of its own
        self.device = "cpu"
        self.search_params = ""
        self._gpu_index: Any = None
        want = self.cfg.gpu
        ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if want is True and ngpu == 0:
            raise IndexBuildError("index.gpu is true but FAISS sees no GPU (faiss-gpu not installed, or no "
                                  "CUDA device); set index.gpu=auto to build on the CPU")
        if want not in (True, False, "auto"):
            raise IndexBuildError(f"index.gpu: expected auto, true or false, got {want!r}")
        if want is not False and ngpu > 0:
            self._gpu_index = self._to_gpu(self.index, required=want is True)
            if self._gpu_index is not None:
                self.device = f"gpu x{ngpu}"

    def _to_gpu(self, index: Any, required: bool) -> Any:
        import faiss

        try:
            co = faiss.GpuMultipleClonerOptions()
            co.useFloat16 = True  # IVF-PQ lookup tables in float16: needed for large M (PQ64) on the GPU
            co.shard = False
            return faiss.index_cpu_to_all_gpus(index, co=co)
        except (RuntimeError, AttributeError) as e:
            if required:
                raise IndexBuildError(f"index.factory {self.cfg.factory!r} has no GPU version in this FAISS "
                                      f"({str(e).strip().splitlines()[-1] if str(e).strip() else e}); "
                                      f"set index.gpu=auto to build it on the CPU") from None
            log.info("index %s: no GPU version (%s); building on the CPU", self.cfg.factory, type(e).__name__)
            return None

    @property
    def _live(self) -> Any:
        return self._gpu_index if self._gpu_index is not None else self.index

    @property
    def needs_training(self) -> bool:
        return not self._live.is_trained

    def train(self, vectors: np.ndarray) -> None:
        if not self.needs_training:
            return
        x = normalize(vectors)
        if len(x) == 0:
            raise IndexBuildError(f"index.factory {self.cfg.factory!r} needs training vectors and the store has no "
                                  f"usable rows")
        t0 = time.perf_counter()
        self._live.train(x)
        self.trained_on = len(x)
        log.info("index %s trained on %d vectors in %.1fs", self.cfg.factory, len(x), time.perf_counter() - t0)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(ids):
            return
        x = normalize(vectors)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.native_ids:
            self._live.add_with_ids(x, ids)
        else:
            self._live.add(x)
            self._ids.append(ids)

    def finish(self) -> Any:
        """The built index on the CPU, search parameters set (the builder is spent afterwards)."""
        import faiss

        index = faiss.index_gpu_to_cpu(self._gpu_index) if self._gpu_index is not None else self.index
        self._gpu_index = None
        if not self.native_ids:
            ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
            # IndexIDMap2 only wraps an empty index: wrap an empty placeholder, then point it at the filled
            # one (the same object whichever device it was filled on) and give it the row ids
            wrapped = faiss.IndexIDMap2(faiss.IndexFlatIP(index.d))
            wrapped.index = index
            wrapped.referenced_objects = [index]  # keep the Python owner of the inner index alive
            faiss.copy_array_to_vector(ids, wrapped.id_map)
            wrapped.ntotal = index.ntotal
            wrapped.is_trained = index.is_trained
            wrapped.construct_rev_map()
            index = wrapped
        self.search_params = self.cfg.search_params if self.cfg.search_params is not None \
            else default_search_params(index)
        set_search_params(index, self.search_params)
        self._ids = []
        return index


def _sample_rows(num_rows: int, n: int, seed: int) -> np.ndarray:
    """Sorted distinct row numbers: ``min(n, num_rows)`` of ``range(num_rows)``, seeded."""
    n = min(int(n), int(num_rows))
    if n <= 0:
        return np.zeros(0, np.int64)
    if n == num_rows:
        return np.arange(num_rows, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(num_rows, n, replace=False)).astype(np.int64)


def _embedding_chunks(store: "ScoreStore") -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(store row ids, float16 embeddings) of the usable rows, shard by shard."""
    for start, a in store.iter_shards(("image_embedding",)):  # one shard in memory at a time
        ok = a["image_embedding_valid"]
        yield (start + np.nonzero(ok)[0]).astype(np.int64), a["image_embedding"][ok]


def training_sample(store: "ScoreStore", n: int, seed: int) -> np.ndarray:
    """(<= n, D) float16 embeddings of a seeded sample of the store's rows (failed rows drop out), read
    shard by shard keeping only the sampled rows."""
    rows = _sample_rows(store.num_rows, n, seed)
    parts = []
    for ids, emb in _embedding_chunks(store):
        if not len(ids):
            continue
        sel = np.isin(ids, rows[(rows >= ids[0]) & (rows <= ids[-1])], assume_unique=True)
        if sel.any():
            parts.append(emb[sel])
    dim = max(store.embedding_dim, 1)
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float16)


def build_index(store: "ScoreStore", cfg: Any = None, path: Optional[Path] = None) -> Dict[str, Any]:
    """Build the index of ``store`` with settings ``cfg`` (an :class:`~vlpl.config.IndexConfig`; ``None``
    or ``True``: Flat) and write it to ``path`` (default ``STORE/index/image_embeddings.faiss``).

    Returns the manifest's ``index`` entry. Memory: one shard of embeddings, the training sample, and the
    index itself.
    """
    import faiss

    cfg = _settings(cfg)
    dim = int(store.manifest["embedding_dim"])
    t0 = time.perf_counter()
    builder = IndexBuilder(dim, cfg)
    if builder.needs_training:
        if cfg.train_sample < 1:
            raise IndexBuildError(f"index.train_sample is {cfg.train_sample}: index.factory {cfg.factory!r} needs "
                                  f"training vectors (e.g. train_sample: 100000)")
        builder.train(training_sample(store, cfg.train_sample, cfg.seed))
    n = 0
    for ids, emb in _embedding_chunks(store):
        builder.add(ids, emb)
        n += len(ids)
    index = builder.finish()
    out = Path(store.root) / INDEX_FILE if path is None else Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        faiss.write_index(index, str(tmp))
    seconds = time.perf_counter() - t0
    log.info("FAISS index %s: %d vectors of dim %d (trained on %d) in %.1fs on %s -> %s", cfg.factory, n, dim,
             builder.trained_on, seconds, builder.device, out)
    rel = INDEX_FILE if path is None else str(out)
    return {"file": rel, "factory": cfg.factory, "type": describe(index), "metric": METRIC,
            "num_vectors": int(n), "dim": dim, "trained_on": int(builder.trained_on),
            "train_sample": int(cfg.train_sample), "seed": int(cfg.seed), "search_params": builder.search_params,
            "device": builder.device}  # no timing: the manifest of a resumed run must equal an uninterrupted one's


def describe(index: Any) -> str:
    """``IndexIDMap2(IndexHNSWFlat)``-style name of an index and what it wraps."""
    import faiss

    idx = faiss.downcast_index(index)
    name = type(idx).__name__
    inner = getattr(idx, "index", None)
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)) and inner is not None:
        return f"{name}({describe(inner)})"
    return name


def load_index(root: Path) -> Any:
    import faiss

    path = Path(root) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no FAISS index in this store (built with index=false?)")
    return faiss.read_index(str(path))


def search(root: Path, queries: np.ndarray, k: int = 10, search_params: Optional[str] = None
           ) -> Tuple[np.ndarray, np.ndarray]:
    """(similarities, row ids) of the k nearest stored images for each query embedding (cosine).

    ``search_params`` overrides the ones stored with the index (e.g. ``"nprobe=64"``); ids are -1 where
    fewer than k vectors were found."""
    index = load_index(root)
    if search_params:
        set_search_params(index, search_params)
    return index.search(normalize(queries), k)


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Share of the exact top-k ids (``exact``, (Q, >=k)) found in the approximate top-k (``found``)."""
    f, e = np.asarray(found)[:, :k], np.asarray(exact)[:, :k]
    hits = sum(len(np.intersect1d(a[a >= 0], b[b >= 0])) for a, b in zip(f, e))
    return hits / max(int((e >= 0).sum()), 1)
