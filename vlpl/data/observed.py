"""Observed-label simulation: from full labels to incomplete (observed) labels.

All functions are pure numpy. Observed labels follow ALGORITHMS.md 1: ``+1`` observed positive,
``0`` unknown, ``-1`` observed negative, stored as int8.

* :func:`single_positive_cole` — Cole et al.'s single-positive protocol (ALGORITHMS.md 2b,
  Decision 8), bit-identical to ``preproc/generate_observed_labels.py``.
* :func:`partial_keep_mask` — the MLR-PL keep-ratio protocol (ALGORITHMS.md 10).
* :func:`fixed_per_class` / :func:`random_per_sample` — CSL's FPC(N) and RPS(q) simulations (ALGORITHMS.md
  9e), seeded (the reference draws from numpy's unseeded global state; ours records its seed in the store).
* :func:`full_observed` / :func:`no_observed` — the full-label upper bound and zero-shot use.
* :func:`load_given_observed` — observed labels read from an ``.npy`` file, checked.
* :func:`simulate_observed` — dispatch on an :class:`~vlpl.config.ObservedConfig` mode.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from vlpl.config import ConfigError, ObservedConfig

logger = logging.getLogger(__name__)

DEFAULT_SEEDS = {"single_positive": 1200, "partial": 0, "fpc": 0, "rps": 0}
MODES = ("single_positive", "partial", "fpc", "rps", "given", "full", "none")
#: the modes that draw from a seeded RandomState
SEEDED_MODES = ("single_positive", "partial", "fpc", "rps")


def _check_labels01(labels01: np.ndarray) -> np.ndarray:
    a = np.asarray(labels01)
    if a.ndim != 2:
        raise ValueError(f"labels must be an (N, C) matrix, got shape {a.shape}")
    bad = ~np.isin(a, (0, 1))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"labels must be in {{0,1}}; row {r}, column {c} holds {a[r, c]!r}")
    return a


def single_positive_cole(labels01: np.ndarray, seed: int = 1200, num_neg: int = 0) -> np.ndarray:
    """Cole et al.'s single-positive observation (ALGORITHMS.md 2b, step list "Single-positive sampling").

    One ``np.random.RandomState(seed)`` is created for the whole matrix (one split). For each row,
    in order:

    1. ``idx_pos`` = indices of the positives; ``rng.shuffle(idx_pos)``; the first one is kept as +1;
    2. ``idx_neg`` = indices of the negatives; ``rng.shuffle(idx_neg)`` — **always**, even when
       ``num_neg == 0``, because the shuffle consumes draws and the reference does it; the first
       ``num_neg`` are kept as -1.

    A row with no positive keeps no positive (it stays all 0 when ``num_neg == 0``). Shuffling an
    array of 0 or 1 elements consumes no draws with numpy's legacy ``RandomState.shuffle`` (its
    Fisher-Yates loop runs ``n - 1`` times); this is checked in ``tests/test_observed.py``, so
    such rows leave the stream exactly where the reference leaves it.

    Args:
        labels01: ``(N, C)`` full labels in {0,1}, rows in the split's file order.
        seed: the RandomState seed (Cole: 1200).
        num_neg: observed negatives per row (Cole's SPML: 0).

    Returns:
        ``(N, C)`` int8 in {-1,0,1}.
    """
    a = _check_labels01(labels01)
    if num_neg < 0:
        raise ValueError(f"num_neg must be >= 0, got {num_neg}")
    pm = 2 * a.astype(np.int64) - 1  # +-1, as the reference converts first
    rng = np.random.RandomState(seed)
    obs = np.zeros(a.shape, dtype=np.int8)
    for i in range(pm.shape[0]):
        idx_pos = np.nonzero(pm[i] == 1)[0]
        rng.shuffle(idx_pos)
        obs[i, idx_pos[:1]] = 1
        idx_neg = np.nonzero(pm[i] == -1)[0]
        rng.shuffle(idx_neg)
        obs[i, idx_neg[:num_neg]] = -1
    return obs


def partial_keep_mask(labels01: np.ndarray, keep: float, seed: int = 0) -> np.ndarray:
    """MLR-PL partial labels (ALGORITHMS.md 10): keep each entry of the +-1 matrix iff ``u < keep``.

    ``u = np.random.RandomState(seed).rand(N, C)``, which is the same stream as the reference's
    ``np.random.seed(seed); np.random.rand(N, C)`` (C order; checked in the tests) without touching
    numpy's global state.

    Returns:
        ``(N, C)`` int8: +1/-1 where kept, 0 elsewhere.
    """
    a = _check_labels01(labels01)
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    u = np.random.RandomState(seed).rand(*a.shape)
    pm = (2 * a.astype(np.int8) - 1).astype(np.int8)
    return np.where(u < keep, pm, 0).astype(np.int8)


def fixed_per_class(labels01: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """CSL's FPC(N) ("fix_per_class", ALGORITHMS.md 9e): per class, ``min(N, #pos)`` annotated positives and
    ``min(N, #neg)`` annotated negatives, drawn uniformly without replacement; everything else unknown.

    The draws replay CSL's ``coco_simulation.py`` call for call on one ``RandomState(seed)``: for each class
    ``c`` in order, ``rng.choice(idx_pos, min(N, len(idx_pos)), replace=False)`` then the same for the
    negatives (``idx_*`` = ``np.where`` over the rows, increasing). With ``np.random.seed(seed)`` set before
    the reference runs, its simulated matrix equals ours (the reference itself sets no seed).

    Returns:
        ``(N, C)`` int8: +1 / -1 at the drawn entries, 0 elsewhere.
    """
    a = _check_labels01(labels01)
    if int(per_class) != per_class or per_class < 0:
        raise ValueError(f"per_class must be a non-negative integer, got {per_class!r}")
    n = int(per_class)
    rng = np.random.RandomState(seed)
    out = np.zeros(a.shape, dtype=np.int8)
    for c in range(a.shape[1]):
        idx_pos = np.where(a[:, c] == 1)[0]
        idx_neg = np.where(a[:, c] == 0)[0]
        pos = rng.choice(idx_pos, min(n, len(idx_pos)), replace=False)
        neg = rng.choice(idx_neg, min(n, len(idx_neg)), replace=False)
        out[pos, c] = 1
        out[neg, c] = -1
    return out


def random_per_sample(labels01: np.ndarray, drop: float, seed: int = 0) -> np.ndarray:
    """CSL's RPS(q) ("random_per_sample", ALGORITHMS.md 9e): each label independently becomes unknown with
    probability ``q = drop``; the others keep their +1 / -1.

    ``u = RandomState(seed).random_sample((N, C))`` (the reference's ``np.random.random(S.shape)``, C order);
    an entry is dropped iff ``u < drop``. Note the complement of :func:`partial_keep_mask`: RPS(q) on the same
    seed keeps exactly the entries that the keep-ratio protocol with ``keep = q`` drops.

    Returns:
        ``(N, C)`` int8: +1 / -1 where kept, 0 where dropped.
    """
    a = _check_labels01(labels01)
    if not 0.0 <= drop <= 1.0:
        raise ValueError(f"drop must be in [0, 1], got {drop}")
    u = np.random.RandomState(seed).random_sample(a.shape)
    pm = (2 * a.astype(np.int8) - 1).astype(np.int8)
    return np.where(u < drop, 0, pm).astype(np.int8)


def full_observed(labels01: np.ndarray) -> np.ndarray:
    """Every label observed: +1 for positives, -1 for negatives (the full-label upper bound)."""
    a = _check_labels01(labels01)
    return (2 * a.astype(np.int8) - 1).astype(np.int8)


def no_observed(shape: Tuple[int, int]) -> np.ndarray:
    """Nothing observed: an all-zero int8 matrix of ``shape``."""
    return np.zeros(shape, dtype=np.int8)


def load_given_observed(
    path: Union[str, Path], num_classes: int, num_rows: Union[int, Tuple[int, ...]]
) -> np.ndarray:
    """Read observed labels from an ``.npy`` file (rows in the official train order).

    Args:
        path: the ``.npy`` file (N x C, values in {-1,0,1}; any numeric dtype).
        num_classes: expected ``C``.
        num_rows: expected ``N``, or a tuple of accepted row counts.

    Raises:
        ConfigError: the file is missing/unreadable, or has the wrong shape or a bad value; the
            message names the file, the expected shape, and the first bad row and value.
    """
    path = Path(path)
    accepted = (num_rows,) if isinstance(num_rows, int) else tuple(num_rows)
    expected = " or ".join(f"({n}, {num_classes})" for n in dict.fromkeys(accepted))
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"observed-label file {path} not found (expected an N x C .npy, shape {expected})") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"observed-label file {path}: cannot read it as .npy: {e}") from None
    if arr.ndim != 2 or arr.shape[1] != num_classes or arr.shape[0] not in accepted:
        raise ConfigError(f"observed-label file {path}: shape {arr.shape}, expected {expected}")
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
        raise ConfigError(f"observed-label file {path}: dtype {arr.dtype} is not numeric")
    bad = ~np.isin(arr, (-1, 0, 1))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ConfigError(
            f"observed-label file {path}: row {r}, column {c} holds {arr[r, c]!r}; values must be -1, 0 or 1"
        )
    return arr.astype(np.int8)


def resolve_seed(cfg: ObservedConfig) -> Optional[int]:
    """The seed in effect: ``cfg.seed``, else 1200 for single_positive and 0 for partial, fpc and rps."""
    return cfg.seed if cfg.seed is not None else DEFAULT_SEEDS.get(cfg.mode)


def protocol_entry(cfg: ObservedConfig) -> Dict[str, Any]:
    """What produced the observed labels, for the store manifest: the mode, the seed in effect (for the
    seeded modes) and the mode's own parameter (``keep``, ``per_class``, ``drop``, ``num_neg`` or ``file``)."""
    entry: Dict[str, Any] = {"mode": cfg.mode}
    if cfg.mode in SEEDED_MODES:
        entry["seed"] = resolve_seed(cfg)
    if cfg.mode == "single_positive":
        entry["num_neg"] = cfg.num_neg
    elif cfg.mode == "partial":
        entry["keep"] = cfg.keep
    elif cfg.mode == "fpc":
        entry["per_class"] = cfg.per_class
    elif cfg.mode == "rps":
        entry["drop"] = cfg.drop
    elif cfg.mode == "given" and cfg.file is not None:
        entry["file"] = cfg.file
    return entry


def simulate_observed(labels01: np.ndarray, cfg: ObservedConfig) -> np.ndarray:
    """Observed labels of one official split from its full labels, by ``cfg.mode``.

    Each call starts its own RandomState, so train and test are simulated independently with the
    same seed, as Cole does (ALGORITHMS.md 2b: "The same procedure runs on the test split").
    ``given`` is not handled here (see :func:`load_given_observed`).
    """
    mode = cfg.mode
    if mode == "single_positive":
        return single_positive_cole(labels01, seed=int(resolve_seed(cfg)), num_neg=cfg.num_neg)  # type: ignore[arg-type]
    if mode == "partial":
        if not 0.0 < cfg.keep <= 1.0:
            raise ConfigError(f"data.observed.keep: expected the known-label proportion p in (0, 1] "
                              f"(the protocol's 0.1 .. 0.9), got {cfg.keep}")
        return partial_keep_mask(labels01, keep=cfg.keep, seed=int(resolve_seed(cfg)))  # type: ignore[arg-type]
    if mode == "fpc":
        if isinstance(cfg.per_class, bool) or not isinstance(cfg.per_class, int) or cfg.per_class < 1:
            raise ConfigError(f"data.observed.per_class: expected FPC's N, an integer >= 1, got {cfg.per_class!r}")
        return fixed_per_class(labels01, per_class=cfg.per_class, seed=int(resolve_seed(cfg)))  # type: ignore[arg-type]
    if mode == "rps":
        if not 0.0 <= cfg.drop < 1.0:
            raise ConfigError(f"data.observed.drop: expected RPS's q (share of labels made unknown) in [0, 1), "
                              f"got {cfg.drop}")
        return random_per_sample(labels01, drop=cfg.drop, seed=int(resolve_seed(cfg)))  # type: ignore[arg-type]
    if mode == "full":
        return full_observed(labels01)
    if mode == "none":
        return no_observed(np.asarray(labels01).shape)
    if mode == "given":
        raise ValueError("simulate_observed does not handle mode 'given'; use load_given_observed")
    raise ConfigError(f"data.observed.mode: unknown mode {mode!r}; expected one of: {', '.join(MODES)}")
