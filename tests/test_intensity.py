"""Tests of histogram equalization inside the brain mask."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from sfae.io import InvalidInputError
from sfae.preprocessing.intensity import equalize_histogram


def equalize_slowly(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reference: for each brain voxel, count the brain voxels with a value <= its own."""
    brain_values = volume[mask]
    result = np.zeros(volume.shape, dtype=np.float64)
    for index in zip(*np.nonzero(mask)):
        result[index] = np.count_nonzero(brain_values <= volume[index]) / brain_values.size
    return result


def test_equalize_histogram_hand_computed_with_ties():
    volume = np.array([[[5, 1], [3, 3]], [[9, 100], [0, 7]]], dtype=np.float32)
    mask = np.array([[[1, 1], [1, 1]], [[1, 0], [0, 1]]], dtype=bool)

    equalized = equalize_histogram(volume, mask)

    # Brain values 1, 3, 3, 5, 7, 9: the CDF is 1/6, 3/6, 3/6, 4/6, 5/6, 6/6.
    expected = np.array([[[4 / 6, 1 / 6], [3 / 6, 3 / 6]], [[1.0, 0.0], [0.0, 5 / 6]]], dtype=np.float32)
    np.testing.assert_allclose(equalized, expected, rtol=1e-7)
    assert equalized.dtype == np.float32
    assert equalized[0, 1, 0] == equalized[0, 1, 1]


def test_equalize_histogram_matches_slow_reference():
    rng = np.random.default_rng(3)
    volume = rng.integers(0, 20, size=(6, 7, 8)).astype(np.int16)
    mask = rng.random((6, 7, 8)) < 0.6

    np.testing.assert_allclose(equalize_histogram(volume, mask), equalize_slowly(volume, mask), rtol=1e-6)


def test_equalize_histogram_range_and_background():
    rng = np.random.default_rng(4)
    volume = rng.normal(400, 80, size=(10, 12, 14)).astype(np.float32)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[2:8, 3:10, 4:12] = True
    volume[~mask] = 5000.0

    equalized = equalize_histogram(volume, mask)

    assert np.all(equalized[~mask] == 0)
    assert np.all(equalized[mask] > 0)
    assert equalized[mask].max() == 1.0
    assert equalized[mask].min() == pytest.approx(1 / mask.sum())


def test_equalize_histogram_invariant_to_monotone_transform():
    rng = np.random.default_rng(5)
    volume = rng.gamma(2.0, 100.0, size=(9, 10, 11))
    mask = rng.random(volume.shape) < 0.7
    transformed = np.exp(volume / 300.0) * 7.0 + 3.0 * volume - 12.0

    np.testing.assert_array_equal(equalize_histogram(volume, mask), equalize_histogram(transformed, mask))


def test_equalize_histogram_changes_under_non_monotone_transform():
    rng = np.random.default_rng(6)
    volume = rng.normal(0.0, 1.0, size=(8, 8, 8))
    mask = np.ones(volume.shape, dtype=bool)

    assert not np.array_equal(equalize_histogram(volume, mask), equalize_histogram(volume**2, mask))


def test_equalize_histogram_constant_brain_warns(caplog):
    volume = np.full((4, 4, 4), 250.0)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[1:3, 1:3, 1:3] = True

    with caplog.at_level(logging.WARNING, logger="sfae.preprocessing.intensity"):
        equalized = equalize_histogram(volume, mask)

    assert np.all(equalized[mask] == 1.0)
    assert np.all(equalized[~mask] == 0.0)
    assert "maps them all to 1" in caplog.text


def test_equalize_histogram_empty_mask_rejected():
    with pytest.raises(InvalidInputError, match="brain mask .* is empty"):
        equalize_histogram(np.ones((4, 4, 4)), np.zeros((4, 4, 4), dtype=bool))


def test_equalize_histogram_shape_mismatch_rejected():
    with pytest.raises(InvalidInputError, match=r"shape \(4, 4, 4\) .* shape \(4, 4, 5\) differ"):
        equalize_histogram(np.ones((4, 4, 4)), np.ones((4, 4, 5), dtype=bool))


def test_equalize_histogram_nan_in_brain_rejected():
    volume = np.ones((4, 4, 4))
    volume[1, 1, 1] = np.nan
    with pytest.raises(InvalidInputError, match="1 brain voxels are NaN or infinite"):
        equalize_histogram(volume, np.ones((4, 4, 4), dtype=bool))


def test_equalize_histogram_full_volume_is_fast():
    # One SRI24-sized scan (240 x 240 x 155) with about 1.5 million brain voxels.
    rng = np.random.default_rng(7)
    volume = rng.normal(600.0, 150.0, size=(155, 240, 240)).astype(np.float32)
    z, y, x = np.ogrid[:155, :240, :240]
    mask = ((z - 77) / 70.0) ** 2 + ((y - 120) / 100.0) ** 2 + ((x - 120) / 80.0) ** 2 < 1

    started = time.perf_counter()
    equalized = equalize_histogram(volume, mask)
    elapsed = time.perf_counter() - started

    assert equalized.shape == volume.shape
    # A per-voxel Python loop takes minutes; the vectorised version about half a second.
    assert elapsed < 5.0
