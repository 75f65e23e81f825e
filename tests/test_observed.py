"""Observed-label simulation (vlpl.data.observed): Cole's single positive, partial keep mask, given."""
from __future__ import annotations

import numpy as np
import pytest

from vlpl.config import ConfigError, ObservedConfig
from vlpl.data.observed import (
    full_observed,
    load_given_observed,
    no_observed,
    partial_keep_mask,
    simulate_observed,
    single_positive_cole,
)


def _random_labels(n: int, c: int, p: float, seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).rand(n, c) < p).astype(np.int8)


def _state_pos(rng: np.random.RandomState) -> tuple:
    _, keys, pos, has_gauss, cached = rng.get_state()
    return (keys.tobytes(), pos, has_gauss, cached)


# --------------------------------------------------------------------------------------------------
# single positive (ALGORITHMS.md 2b)
# --------------------------------------------------------------------------------------------------


def test_cole_step_by_step_on_a_tiny_matrix() -> None:
    labels = np.array(
        [
            [1, 1, 0, 1, 0],  # three positives
            [0, 0, 0, 0, 0],  # no positive: stays all zero
            [0, 1, 0, 0, 0],  # one positive: it is the one kept
            [1, 0, 1, 1, 1],
            [1, 1, 1, 1, 1],  # no negative
        ],
        dtype=np.int8,
    )
    got = single_positive_cole(labels, seed=1200)

    # the reference algorithm, spelled out with an explicit RandomState
    rng = np.random.RandomState(1200)
    pm = 2 * labels.astype(np.float64) - 1
    want = np.zeros_like(labels)
    for i in range(labels.shape[0]):
        idx_pos = np.nonzero(pm[i] == 1.0)[0]
        rng.shuffle(idx_pos)
        want[i, idx_pos[:1]] = 1
        idx_neg = np.nonzero(pm[i] == -1.0)[0]
        rng.shuffle(idx_neg)
        want[i, idx_neg[:0]] = -1
    np.testing.assert_array_equal(got, want)

    # hand-checkable facts
    assert got.dtype == np.int8
    assert got.shape == labels.shape
    assert (got[1] == 0).all()
    np.testing.assert_array_equal(got[2], [0, 1, 0, 0, 0])
    assert ((got == 1).sum(axis=1) == [1, 0, 1, 1, 1]).all()
    assert (labels[got == 1] == 1).all()  # the kept positive is a true positive
    assert not (got == -1).any()


def test_cole_matches_reference_on_a_random_matrix() -> None:
    labels = _random_labels(300, 20, 0.15, seed=3)
    rng = np.random.RandomState(77)
    want = np.zeros_like(labels)
    for i in range(labels.shape[0]):
        pos = np.nonzero(labels[i] == 1)[0]
        rng.shuffle(pos)
        want[i, pos[:1]] = 1
        neg = np.nonzero(labels[i] == 0)[0]
        rng.shuffle(neg)
        want[i, neg[:2]] = -1
    np.testing.assert_array_equal(single_positive_cole(labels, seed=77, num_neg=2), want)


def test_negative_shuffle_consumes_draws() -> None:
    """Skipping the negative shuffle (wrongly) gives different observations for some matrix."""
    labels = _random_labels(50, 10, 0.3, seed=0)

    def without_negative_shuffle(lab: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.RandomState(seed)
        out = np.zeros_like(lab)
        for i in range(lab.shape[0]):
            pos = np.nonzero(lab[i] == 1)[0]
            rng.shuffle(pos)
            out[i, pos[:1]] = 1
        return out

    ours = single_positive_cole(labels, seed=1200)
    assert not np.array_equal(ours, without_negative_shuffle(labels, 1200))
    # both are still valid single-positive observations
    assert (labels[ours == 1] == 1).all()


def test_shuffle_of_empty_or_single_array_consumes_no_draws() -> None:
    """The claim documented in single_positive_cole: numpy's legacy shuffle draws n-1 times."""
    rng = np.random.RandomState(1200)
    before = _state_pos(rng)
    rng.shuffle(np.zeros(0, dtype=np.int64))
    assert _state_pos(rng) == before
    rng.shuffle(np.array([4], dtype=np.int64))
    assert _state_pos(rng) == before
    rng.shuffle(np.array([4, 5], dtype=np.int64))
    assert _state_pos(rng) != before


def test_cole_rows_without_positive_and_num_neg() -> None:
    labels = _random_labels(200, 12, 0.2, seed=5)
    labels[:10] = 0
    obs = single_positive_cole(labels, seed=1200, num_neg=3)
    assert (obs[:10] == 1).sum() == 0
    n_pos = labels.sum(axis=1)
    np.testing.assert_array_equal((obs == 1).sum(axis=1), (n_pos > 0).astype(int))
    np.testing.assert_array_equal((obs == -1).sum(axis=1), np.minimum(3, 12 - n_pos))
    assert (labels[obs == -1] == 0).all()
    assert (labels[obs == 1] == 1).all()


def test_cole_deterministic_and_seed_dependent() -> None:
    labels = _random_labels(100, 15, 0.3, seed=1)
    a = single_positive_cole(labels, seed=1200)
    np.testing.assert_array_equal(a, single_positive_cole(labels, seed=1200))
    assert not np.array_equal(a, single_positive_cole(labels, seed=1201))


def test_cole_rejects_non_binary_labels() -> None:
    with pytest.raises(ValueError, match="row 1, column 2"):
        single_positive_cole(np.array([[0, 1, 0], [1, 0, -1]]))


# --------------------------------------------------------------------------------------------------
# partial keep mask (ALGORITHMS.md 10)
# --------------------------------------------------------------------------------------------------


def test_partial_keep_fraction_and_values() -> None:
    labels = _random_labels(1000, 80, 0.05, seed=2)
    for keep in (0.1, 0.5, 0.9):
        obs = partial_keep_mask(labels, keep=keep, seed=0)
        assert obs.dtype == np.int8
        assert abs((obs != 0).mean() - keep) < 0.01
        kept = obs != 0
        np.testing.assert_array_equal(obs[kept], 2 * labels[kept] - 1)
    assert (partial_keep_mask(labels, keep=0.0) == 0).all()
    np.testing.assert_array_equal(partial_keep_mask(labels, keep=1.0), full_observed(labels))


def test_partial_keep_equals_global_seed_path() -> None:
    labels = _random_labels(37, 11, 0.3, seed=4)
    saved = np.random.get_state()
    try:
        np.random.seed(0)
        u = np.random.rand(37, 11)
    finally:
        np.random.set_state(saved)
    np.testing.assert_array_equal(u, np.random.RandomState(0).rand(37, 11))
    want = np.where(u < 0.3, 2 * labels - 1, 0)
    np.testing.assert_array_equal(partial_keep_mask(labels, keep=0.3, seed=0), want)


# --------------------------------------------------------------------------------------------------
# full / none / given / dispatch
# --------------------------------------------------------------------------------------------------


def test_full_and_none() -> None:
    labels = np.array([[1, 0], [0, 0]], dtype=np.int8)
    np.testing.assert_array_equal(full_observed(labels), [[1, -1], [-1, -1]])
    assert no_observed((2, 3)).shape == (2, 3)
    assert not no_observed((2, 3)).any()


def test_simulate_observed_dispatch_and_default_seeds() -> None:
    labels = _random_labels(60, 9, 0.3, seed=8)
    np.testing.assert_array_equal(
        simulate_observed(labels, ObservedConfig(mode="single_positive")), single_positive_cole(labels, 1200)
    )
    np.testing.assert_array_equal(
        simulate_observed(labels, ObservedConfig(mode="partial", keep=0.4)), partial_keep_mask(labels, 0.4, 0)
    )
    np.testing.assert_array_equal(
        simulate_observed(labels, ObservedConfig(mode="single_positive", seed=5, num_neg=1)),
        single_positive_cole(labels, 5, num_neg=1),
    )
    with pytest.raises(ConfigError, match="unknown mode 'bogus'"):
        simulate_observed(labels, ObservedConfig(mode="bogus"))


def test_load_given_observed(tmp_path) -> None:
    good = np.array([[1, 0, -1], [0, 0, 1]], dtype=np.float32)
    p = tmp_path / "obs.npy"
    np.save(p, good)
    out = load_given_observed(p, num_classes=3, num_rows=2)
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, good)

    with pytest.raises(ConfigError) as e:
        load_given_observed(p, num_classes=3, num_rows=5)
    assert str(p) in str(e.value) and "(5, 3)" in str(e.value) and "(2, 3)" in str(e.value)

    bad = good.copy()
    bad[1, 2] = 2
    np.save(p, bad)
    with pytest.raises(ConfigError) as e:
        load_given_observed(p, num_classes=3, num_rows=2)
    assert str(p) in str(e.value) and "row 1" in str(e.value) and "2" in str(e.value)

    with pytest.raises(ConfigError, match="not found"):
        load_given_observed(tmp_path / "absent.npy", num_classes=3, num_rows=2)
