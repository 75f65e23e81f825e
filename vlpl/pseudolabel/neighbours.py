"""Neighbour-consensus pseudo-labels: the rule ``knn`` (issue 12, item 6; ours, none of the anchors has it).

A teacher's zero-shot score for one image is noisy; images that look alike (close in the teacher's image
embedding space) mostly share labels. ``knn`` smooths each image's cached scores with those of its ``k``
nearest **training** images, then runs any other rule (the ``base``: DAMP, VLPL, threshold, calibrated, ...)
on the smoothed scores::

    s'_i = (1 - alpha) * s_i + alpha * sum_j w_ij * s_j          j in the k nearest training images of i

* **neighbours**: from the store's FAISS index over image embeddings (``STORE/index``, cosine; any factory
  type), restricted to the ``train`` split, the image itself excluded (a query asks the index for more than
  ``k`` and keeps the first ``k`` results that are training rows other than itself, asking again for more
  when too few were). A store without an index is searched exactly (FAISS ``IndexFlatIP`` over the training
  embeddings, in memory, with a warning). Images of other splits (val/test, in ``vlpl evaluate``) get
  training neighbours too.
* **weights** ``w_ij`` from the cosine similarities ``sim_ij`` of the k neighbours (``weighting``):
  ``softmax`` = ``softmax_j(sim_ij / tau)`` (default, ``tau = 0.05``: image-image cosines of near neighbours
  differ by a few hundredths, which this temperature turns into a clear preference for the closest),
  ``power`` = ``max(sim_ij, 0)^power / sum`` (``power = 3``), ``uniform`` = ``1/k``. A missing neighbour
  (a split with fewer than ``k + 1`` training images) has weight 0; an image with none keeps ``s_i``.
* **what is smoothed**: the raw cached cosines, per (variant, view) slot of the image: view ``v`` of image
  ``i`` is mixed with view ``v`` of its neighbours (``views: all``; for the grid tiles that is the same
  region of the neighbour image), or only the global view (``views: global``). The image keeps its own
  flip variant (the dynamic draw of Decision 4); a neighbour contributes the mean of its flip variants.
  Cosines are linear, so the smoothing happens before any rule's softmax or aggregation, which is why the
  wrapper composes with every rule.

Why a wrapper rule (``rule: knn, params: {base: damp, base_params: {...}, k, alpha}``) rather than a
``neighbours:`` option on every rule: the smoothing is one operation on the scores, independent of what the
rule does with them; one wrapper gives it to every rule, present and future (plugins too), without adding
the same four parameters to every schema and every rule function, and the base rule's own parameters stay
validated by its own schema.

The neighbour lists are computed once per (store, split, k) and cached beside the store in its cache
folder (``STORE/cache/neighbours/<split>-k<k>.npz`` + a ``.json`` mark holding the store's
``manifest_sha256``, ``k`` and the file's sha256; written atomically, mark last). A mark that does not
match (another store content, another k) or a file whose sha256 differs is rebuilt.

The rule needs to know which rows it labels: the trainer and ``vlpl evaluate`` pass
:class:`vlpl.pseudolabel.rules.RuleRows` (``needs_rows``). Called without them it raises.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from vlpl.pseudolabel.params import KnnParams, rule_params
from vlpl.registry import RULES
from vlpl.store.atomic import atomic_path, atomic_write_json
from vlpl.store.store import sha256_file

log = logging.getLogger(__name__)

__all__ = ["NeighbourTable", "neighbour_table", "compute_neighbours", "neighbour_weights", "smooth_scores",
           "neighbour_smoothed", "knn", "CACHE_SUBDIR", "SMOOTHING_KEYS"]

CACHE_SUBDIR = "neighbours"
TRAIN = "train"


@dataclass(frozen=True)
class NeighbourTable:
    """The k nearest training images of every row of a split.

    ``positions`` ``(N, k)`` int64: positions in the **train** split's reader (-1: no neighbour);
    ``sims`` ``(N, k)`` float32 cosine similarities (0 where missing), nearest first; ``rows`` ``(N,)`` the
    store row ids of the split's rows (failed rows left out), which :meth:`lookup` maps readers' rows to.
    """

    split: str
    k: int
    positions: np.ndarray
    sims: np.ndarray
    rows: np.ndarray
    source: str  # "index:<factory>" or "exact"

    def __post_init__(self) -> None:
        sorted_rows, order = _train_lookup(np.asarray(self.rows, dtype=np.int64))
        object.__setattr__(self, "_sorted", sorted_rows)
        object.__setattr__(self, "_order", order)

    def lookup(self, store_rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(positions, sims)`` ``(B, k)`` of the rows with these store row ids (a row the table lacks, e.g.
        a failed one, gets no neighbour: -1 / 0)."""
        ids = np.asarray(store_rows, dtype=np.int64).reshape(-1)
        at = _to_train_positions(ids, self._sorted, self._order)  # type: ignore[attr-defined]
        found = at >= 0
        pos = np.full((len(ids), self.k), -1, np.int64)
        sims = np.zeros((len(ids), self.k), np.float32)
        pos[found] = self.positions[at[found]]
        sims[found] = self.sims[at[found]]
        return pos, sims


# --------------------------------------------------------------------------------------------------
# computing the lists
# --------------------------------------------------------------------------------------------------
def _train_lookup(train_rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    order = np.argsort(train_rows, kind="stable")
    return train_rows[order], order


def _to_train_positions(ids: np.ndarray, sorted_rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Store row ids -> train positions (-1 where the id is not a training row or is -1)."""
    if not len(sorted_rows):
        return np.full(ids.shape, -1, np.int64)
    i = np.clip(np.searchsorted(sorted_rows, ids), 0, len(sorted_rows) - 1)
    hit = (sorted_rows[i] == ids) & (ids >= 0)
    return np.where(hit, order[i], -1).astype(np.int64)


def _exact_index(train: Any, batch_size: int) -> Any:
    import faiss

    from vlpl.store.index import normalize

    dim = int(getattr(train.store, "primary", train.store).embedding_dim)  # an ensemble: its primary's embeddings
    flat = faiss.IndexFlatIP(dim)
    index = faiss.IndexIDMap2(flat)
    for s in range(0, len(train), batch_size):
        pos = np.arange(s, min(s + batch_size, len(train)))
        index.add_with_ids(normalize(np.nan_to_num(train.image_embeddings(pos))),
                           np.ascontiguousarray(train.rows[pos], dtype=np.int64))
    return index


def compute_neighbours(store: Any, split: str = TRAIN, k: int = 10, *, batch_size: int = 1024,
                       show_progress: bool = False) -> NeighbourTable:
    """The k nearest training images of every row of ``split`` (see the module docstring), not cached."""
    from vlpl.progress import progress
    from vlpl.store.index import INDEX_FILE, load_index, normalize

    if k < 1:
        raise ValueError(f"k: expected >= 1, got {k}")
    train = store.split(TRAIN)
    query = train if split == TRAIN else store.split(split)
    sorted_rows, order = _train_lookup(np.asarray(train.rows, dtype=np.int64))
    # a teacher ensemble's image embeddings and index are its primary member's (docs/TEACHERS.md); the index holds
    # row ids, mapped to this split's own positions (rows failed in another member are left out) by the lookup
    emb = getattr(store, "primary", store)
    if (Path(emb.root) / INDEX_FILE).is_file():
        index = load_index(emb.root)
        source = f"index:{(emb.manifest.get('index') or {}).get('factory', 'Flat')}"
    else:
        log.warning("%s has no FAISS index (%s): searching the %d training embeddings exactly, in memory",
                    store.root, INDEX_FILE, len(train))
        index = _exact_index(train, batch_size)
        source = "exact"
    ntotal = int(index.ntotal)
    n_train = max(len(train), 1)
    first = min(ntotal, int(math.ceil((k + 1) * ntotal / n_train)) + 8)
    N = len(query)
    positions = np.full((N, k), -1, np.int64)
    sims = np.zeros((N, k), np.float32)
    with progress(total=N, desc=f"neighbours {split} k={k}", unit="img", enabled=show_progress) as bar:
        for s in range(0, N, batch_size):
            pos = np.arange(s, min(s + batch_size, N))
            q = normalize(np.nan_to_num(query.image_embeddings(pos)))
            own = np.asarray(query.rows[pos], dtype=np.int64)
            todo = np.arange(len(pos))
            kk = first
            while len(todo):
                d, ids = index.search(q[todo], max(kk, 1))
                tp = _to_train_positions(ids, sorted_rows, order)
                keep = (tp >= 0) & (ids != own[todo, None])
                count = keep.sum(axis=1)
                short = (count < k) & (kk < ntotal)  # ask these again for more results
                first_k = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the first k kept, in rank order
                take = np.arange(first_k.shape[1])[None, :] < np.minimum(count, k)[:, None]
                done = ~short
                rows_ = s + todo[done]
                positions[rows_, : first_k.shape[1]] = np.where(take, np.take_along_axis(tp, first_k, 1), -1)[done]
                sims[rows_, : first_k.shape[1]] = np.where(take, np.take_along_axis(d, first_k, 1), 0.0)[done]
                todo = todo[short]
                kk = min(ntotal, kk * 2)
            bar.update(len(pos))
    return NeighbourTable(split=split, k=k, positions=positions, sims=sims,
                          rows=np.asarray(query.rows, dtype=np.int64).copy(), source=source)


# --------------------------------------------------------------------------------------------------
# the cache beside the store
# --------------------------------------------------------------------------------------------------
def _cache_files(store: Any, split: str, k: int) -> Optional[Tuple[Path, Path]]:
    d = getattr(store, "cache_dir", None)  # a teacher ensemble has none of its own: its tables stay in memory
    if d is None:
        return None
    folder = Path(d) / CACHE_SUBDIR
    return folder / f"{split}-k{k}.npz", folder / f"{split}-k{k}.json"


def _read_cached(store: Any, split: str, k: int, files: Tuple[Path, Path]) -> Optional[NeighbourTable]:
    data, mark_path = files
    if not (data.is_file() and mark_path.is_file()):
        return None
    try:
        mark = json.loads(mark_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        log.warning("%s: unreadable neighbour mark; rebuilding", mark_path)
        return None
    want = store.manifest.get("manifest_sha256")
    if mark.get("manifest_sha256") != want or mark.get("k") != k or mark.get("split") != split:
        log.info("%s: made for another store content or k; rebuilding", data)
        return None
    if sha256_file(data) != mark.get("sha256"):
        log.warning("%s: sha256 differs from its mark (a damaged or partial file); rebuilding", data)
        return None
    with np.load(data) as z:
        table = NeighbourTable(split=split, k=k, positions=z["positions"], sims=z["sims"], rows=z["rows"],
                               source=str(mark.get("source", "")))
    if table.positions.shape != (len(table.rows), k):
        log.warning("%s: shape %s does not match its %d rows; rebuilding", data, table.positions.shape,
                    len(table.rows))
        return None
    return table


def _write_cached(store: Any, table: NeighbourTable, files: Tuple[Path, Path]) -> None:
    data, mark_path = files
    data.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(data) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, positions=table.positions, sims=table.sims, rows=table.rows)
    atomic_write_json(mark_path, {"manifest_sha256": store.manifest.get("manifest_sha256"), "split": table.split,
                                  "k": table.k, "source": table.source, "rows": int(len(table.positions)),
                                  "sha256": sha256_file(data)})


_TABLES: Dict[Tuple[str, Optional[str], str, int], NeighbourTable] = {}


def neighbour_table(store: Any, split: str = TRAIN, k: int = 10, *, rebuild: bool = False,
                    show_progress: bool = False) -> NeighbourTable:
    """The neighbour lists of ``split``: from this process's memory, else the store's cache (checked), else
    computed (:func:`compute_neighbours`) and cached. Without a writable cache folder they are computed and
    kept in memory only."""
    key = (str(Path(store.root).resolve()), store.manifest.get("manifest_sha256"), split, int(k))
    if not rebuild and key in _TABLES:
        return _TABLES[key]
    files = _cache_files(store, split, k)
    table = None if rebuild or files is None else _read_cached(store, split, k, files)
    if table is None:
        table = compute_neighbours(store, split, k, show_progress=show_progress)
        if files is not None:
            _write_cached(store, table, files)
        elif hasattr(store, "primary"):  # a teacher ensemble: no cache folder of its own
            log.info("%s: a teacher ensemble; its neighbour lists are kept in memory (not cached)", store.root)
        else:
            log.warning("%s: no writable cache folder; neighbour lists kept in memory only", store.root)
    _TABLES[key] = table
    return table


# --------------------------------------------------------------------------------------------------
# smoothing
# --------------------------------------------------------------------------------------------------
def neighbour_weights(sims: Any, valid: Any, weighting: str = KnnParams.weighting, tau: float = KnnParams.tau,
                      power: float = KnnParams.power) -> Any:
    """``(B, k)`` torch weights from similarities (rows of valid neighbours sum to 1; no valid one: all 0)."""
    import torch

    sims = torch.as_tensor(sims, dtype=torch.float32)
    valid = torch.as_tensor(valid, dtype=torch.bool, device=sims.device)
    if weighting == "softmax":
        logits = torch.where(valid, sims / tau, torch.full_like(sims, -math.inf))
        w = torch.softmax(logits, dim=1)
    elif weighting == "power":
        w = torch.where(valid, sims.clamp(min=0) ** power, torch.zeros_like(sims))
        w = w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)
    elif weighting == "uniform":
        w = valid.float() / valid.float().sum(dim=1, keepdim=True).clamp(min=1)
    else:
        raise ValueError(f"weighting: expected softmax, power or uniform, got {weighting!r}")
    return torch.nan_to_num(torch.where(valid, w, torch.zeros_like(w)), nan=0.0)


def smooth_scores(scores: Any, neighbour_scores: Any, weights: Any, alpha: float, views: str = "all") -> Any:
    """``s' = (1 - alpha) s + alpha sum_j w_j s_j``.

    ``scores`` ``(B, n_views, C)``; ``neighbour_scores`` ``(B, k, n_views, C)``; ``weights`` ``(B, k)`` (a
    row of zeros: the image keeps its scores). ``views="global"`` smooths view 0 only.
    """
    import torch

    w = weights.to(scores.device, scores.dtype)
    mixed = torch.einsum("bk,bkvc->bvc", w, neighbour_scores.to(scores.device, scores.dtype))
    has = (w.sum(dim=1) > 0)[:, None, None]
    out = torch.where(has, (1 - alpha) * scores + alpha * mixed, scores)
    if views == "global":
        out = torch.cat([out[:, :1], scores[:, 1:]], dim=1)
    return out


_TRAIN_READERS: Dict[Tuple[str, Optional[str]], Any] = {}


def _train_reader(split: Any) -> Any:
    """The train split's reader whose positions the neighbour tables hold (failed rows left out)."""
    if split.name == TRAIN and not getattr(split, "include_failed", False):
        return split
    store = split.store
    key = (str(Path(store.root).resolve()), store.manifest.get("manifest_sha256"))
    if key not in _TRAIN_READERS:
        _TRAIN_READERS[key] = store.split(TRAIN)
    return _TRAIN_READERS[key]


SMOOTHING_KEYS = ("k", "alpha", "weighting", "tau", "power", "views")


def neighbour_smoothed(scores: Any, rows: Any, *, k: int = KnnParams.k, alpha: float = KnnParams.alpha,
                       weighting: str = KnnParams.weighting, tau: float = KnnParams.tau,
                       power: float = KnnParams.power, views: str = KnnParams.views) -> Any:
    """``(B, n_views, C)`` scores of the batch ``rows`` smoothed with their neighbours' (the module docstring):
    the neighbour lists of ``rows.split`` (cached), the neighbours' cached scores (mean of their flip variants)
    read from the train split, weights from the similarities, then :func:`smooth_scores`."""
    import torch

    pos = np.asarray(rows.positions, dtype=np.int64).reshape(-1)
    if scores.dim() != 3 or scores.shape[0] != len(pos):
        raise ValueError(f"knn: scores must be (B, n_views, C) with B = {len(pos)} rows; got {tuple(scores.shape)}")
    table = neighbour_table(rows.split.store, rows.split.name, k)
    nb, sims = table.lookup(np.asarray(rows.split.rows)[pos])  # (B, k) train positions, similarities
    valid = nb >= 0
    B, kk = nb.shape
    nbr = torch.zeros((B, kk) + tuple(scores.shape[1:]), dtype=scores.dtype, device=scores.device)
    if valid.any():
        uniq, inv = np.unique(nb[valid], return_inverse=True)
        got = _train_reader(rows.split).scores(uniq)  # (U, variants, views, C)
        mean = torch.as_tensor(np.asarray(got, dtype=np.float32)).mean(dim=1).to(scores.device, scores.dtype)
        nbr[torch.from_numpy(valid).to(scores.device)] = mean[torch.from_numpy(inv.reshape(-1)).to(scores.device)]
    w = neighbour_weights(torch.from_numpy(sims), torch.from_numpy(valid), weighting, tau, power)
    return smooth_scores(scores, nbr, w, alpha, views)


_WARNED: set = set()


def _check_thresholds_file(p: KnnParams) -> None:
    """Warn (once per file) when the base rule's thresholds file was fitted on other scores than these smoothed
    ones (``vlpl calibrate --knn-k/--knn-alpha`` records the smoothing it fitted on)."""
    path = (p.base_params or {}).get("thresholds")
    if not path or path in _WARNED:
        return
    from vlpl.pseudolabel.calibrate import load_thresholds

    fitted = load_thresholds(path).knn
    mine = {key: getattr(p, key) for key in SMOOTHING_KEYS}
    if fitted != mine:
        _WARNED.add(path)
        log.warning("knn: the thresholds file %s was fitted on %s scores, these are smoothed with %s: fit it on "
                    "the same smoothing (vlpl calibrate STORE --knn-k %d --knn-alpha %g) for consistent thresholds",
                    path, "unsmoothed" if fitted is None else f"smoothed ({fitted})", mine, p.k, p.alpha)


@RULES.register("knn", params=KnnParams)
def knn(scores: Any, observed: Any, *, base: str = KnnParams.base,
        base_params: Optional[Dict[str, Any]] = KnnParams.base_params, k: int = KnnParams.k,
        alpha: float = KnnParams.alpha, weighting: str = KnnParams.weighting, tau: float = KnnParams.tau,
        power: float = KnnParams.power, views: str = KnnParams.views, rows: Any = None) -> Any:
    """Neighbour consensus, then the ``base`` rule (see the module docstring; options: :class:`KnnParams`).

    Args:
        scores: ``(B, n_views, C)`` raw cosines of the batch (one flip variant per view chosen).
        observed: ``(B, C)`` in {-1, 0, 1}, handed to the base rule.
        rows: :class:`vlpl.pseudolabel.rules.RuleRows` of the batch (split reader + positions); required.

    Returns:
        the base rule's ``(B, C)`` int8 pseudo-labels on the smoothed scores.
    """

    p = KnnParams(base=base, base_params=base_params, k=k, alpha=alpha, weighting=weighting, tau=tau, power=power,
                  views=views)
    if rows is None:
        raise ValueError("pseudo-label rule 'knn' reads the cached scores of each image's neighbours, so it needs "
                         "the batch's rows (RuleRows: split reader + positions); `vlpl train` and `vlpl evaluate` "
                         "pass them. Call it through apply_rule(..., rows=RuleRows(split, positions))")
    smoothed = neighbour_smoothed(scores, rows, k=p.k, alpha=p.alpha, weighting=p.weighting, tau=p.tau,
                                  power=p.power, views=p.views)
    _check_thresholds_file(p)
    fn = RULES.get(p.base)
    given = dict(p.base_params or {})
    bp = rule_params(p.base, given, where="pseudo.params.base_params")
    extra = {"rows": rows} if getattr(fn, "needs_rows", False) else {}
    return fn(smoothed, observed, **bp.kwargs(), **bp.extras(given), **extra)


knn.needs_rows = True  # type: ignore[attr-defined]
