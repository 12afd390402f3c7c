"""Tests of the synthetic sink and source deformations and of their seeded placement."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from sfae.anomalies import (
    add_anomalies,
    add_anomalies_file,
    disk_mask,
    sink_deformation,
    source_deformation,
    subject_key,
)
from sfae.io import InvalidInputError, read_arrays, write_arrays

# Source distance g(d) = |source - c| / radius for a pixel at normalized distance d.
SOURCE_DISTANCE = {
    "sink": lambda d: d * (2.0 - d**2),
    "source": lambda d: d**3,
}
DEFORMATIONS = {"sink": sink_deformation, "source": source_deformation}
# Largest sink source distance, at d = sqrt(2/3): sources reach this far (in radii).
SINK_MAX_REACH = math.sqrt(2 / 3) * (2 - 2 / 3)


def deform_slowly(image, center, radius, brain_mask, kind):
    """Reference: per-pixel loop with explicit bilinear interpolation and clamped coordinates."""
    height, width = image.shape
    deformed = image.astype(np.float64).copy()
    label = np.zeros(image.shape, dtype=bool)
    for row in range(height):
        for column in range(width):
            offset = np.array([row - center[0], column - center[1]], dtype=np.float64)
            distance = math.hypot(*offset) / radius
            if distance >= 1.0 or not brain_mask[row, column]:
                continue
            label[row, column] = True
            factor = 2.0 - distance**2 if kind == "sink" else distance**2
            source_row = min(max(center[0] + offset[0] * factor, 0.0), height - 1.0)
            source_column = min(max(center[1] + offset[1] * factor, 0.0), width - 1.0)
            top, left = int(math.floor(source_row)), int(math.floor(source_column))
            bottom, right = min(top + 1, height - 1), min(left + 1, width - 1)
            dy, dx = source_row - top, source_column - left
            deformed[row, column] = (
                image[top, left] * (1 - dy) * (1 - dx)
                + image[top, right] * (1 - dy) * dx
                + image[bottom, left] * dy * (1 - dx)
                + image[bottom, right] * dy * dx
            )
    return deformed, label


def smooth_image(shape=(64, 64), seed=0):
    """Return a smooth random float32 image in [0, 1]."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma=3)
    return ((noise - noise.min()) / (noise.max() - noise.min())).astype(np.float32)


@pytest.mark.parametrize("kind", ["sink", "source"])
def test_deformation_radial_profile_is_analytic(kind):
    # On a cone image |p - c| the centre row is piecewise linear with its kink on
    # a pixel, so bilinear sampling is exact there: the deformed value is the
    # source distance radius * g(d).
    rows, columns = np.mgrid[:64, :64]
    cone = np.hypot(rows - 32, columns - 32).astype(np.float32)
    radius = 12.0

    deformed, _ = DEFORMATIONS[kind](cone, (32, 32), radius, brain_mask=np.ones((64, 64), dtype=bool))

    offsets = np.arange(-11, 12)
    expected = radius * SOURCE_DISTANCE[kind](np.abs(offsets) / radius)
    np.testing.assert_allclose(deformed[32, 32 + offsets], expected, atol=1e-4)
    np.testing.assert_allclose(deformed[32 + offsets, 32], expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["sink", "source"])
def test_deformation_linear_ramp_is_exact(kind):
    # Bilinear interpolation reproduces a linear ramp exactly, so every deformed
    # value is the ramp at the analytic source position.
    rows, columns = np.mgrid[:64, :64].astype(np.float64)
    ramp = (0.1 + 0.01 * rows + 0.004 * columns).astype(np.float32)
    center, radius = (30.4, 27.8), 10.5

    deformed, label = DEFORMATIONS[kind](ramp, center, radius, brain_mask=np.ones((64, 64), dtype=bool))

    distance = np.hypot(rows - center[0], columns - center[1]) / radius
    factor = 2.0 - distance**2 if kind == "sink" else distance**2
    source_rows = center[0] + (rows - center[0]) * factor
    source_columns = center[1] + (columns - center[1]) * factor
    expected = 0.1 + 0.01 * source_rows + 0.004 * source_columns
    np.testing.assert_allclose(deformed[label], expected[label], atol=1e-5)
    np.testing.assert_array_equal(deformed[~label], ramp[~label])
    assert np.abs(deformed - ramp).max() > 0.02


@pytest.mark.parametrize("kind", ["sink", "source"])
def test_deformation_matches_slow_reference(kind):
    # The disk crosses the slice's top edge, so clamping is exercised too.
    image = smooth_image(seed=1)
    brain_mask = np.zeros((64, 64), dtype=bool)
    brain_mask[:, 5:60] = True
    center, radius = (4.3, 40.6), 13.2

    deformed, label = DEFORMATIONS[kind](image, center, radius, brain_mask=brain_mask)
    expected, expected_label = deform_slowly(image, center, radius, brain_mask, kind)

    np.testing.assert_array_equal(label, expected_label)
    np.testing.assert_allclose(deformed, expected, atol=1e-6)


def test_sink_deformation_centre_keeps_its_value():
    image = smooth_image(seed=2)

    deformed, _ = sink_deformation(image, (30, 25), 15.0, brain_mask=np.ones((64, 64), dtype=bool))

    assert deformed[30, 25] == image[30, 25]
    # One pixel off the centre the source is 2 pixels away, still close to the centre.
    assert abs(deformed[30, 26] - image[30, 25]) < np.abs(image[28:33, 23:28] - image[30, 25]).max() + 1e-6


@pytest.mark.parametrize("kind", ["sink", "source"])
def test_deformation_continuous_at_rim(kind):
    # Ramp along columns with slope 0.01: a value change of v means a source
    # displacement of 100 v pixels along the columns.
    columns = np.tile(np.arange(64, dtype=np.float32), (64, 1))
    ramp = 0.1 + 0.01 * columns
    center, radius = (32.0, 32.0), 14.0
    rows_grid, columns_grid = np.mgrid[:64, :64]
    distance = np.hypot(rows_grid - 32, columns_grid - 32) / radius

    deformed, _ = DEFORMATIONS[kind](ramp, center, radius, brain_mask=np.ones((64, 64), dtype=bool))

    change = np.abs(deformed - ramp)
    rim = (distance >= 0.97) & (distance < 1.0)
    # Largest displacement in the rim ring: radius * d * |f(d) - 1| at d = 0.97.
    rim_displacement = radius * 0.97 * (1 - 0.97**2)
    assert change[rim].max() <= 0.01 * rim_displacement + 1e-6
    assert np.all(change[distance >= 1.0] == 0)
    assert change.max() > 0.01 * 3.0


@pytest.mark.parametrize("kind", ["sink", "source"])
def test_deformation_label_is_disk_and_brain(kind):
    image = smooth_image(seed=3)
    rows, columns = np.mgrid[:64, :64]
    brain_mask = ((rows - 32) / 26.0) ** 2 + ((columns - 32) / 20.0) ** 2 < 1
    center, radius = (20.0, 45.5), 12.5

    _, label = DEFORMATIONS[kind](image, center, radius, brain_mask=brain_mask)

    disk = (rows - center[0]) ** 2 + (columns - center[1]) ** 2 < radius**2
    np.testing.assert_array_equal(label, disk & brain_mask)
    np.testing.assert_array_equal(label, disk_mask((64, 64), center, radius) & brain_mask)
    assert np.count_nonzero(disk & ~brain_mask) > 0


@pytest.mark.parametrize("kind", ["sink", "source"])
def test_deformation_outside_brain_unchanged(kind):
    image = smooth_image(seed=4)
    brain_mask = np.zeros((64, 64), dtype=bool)
    brain_mask[:, :32] = True

    deformed, label = DEFORMATIONS[kind](image, (30.0, 31.0), 14.0, brain_mask=brain_mask)

    np.testing.assert_array_equal(deformed[~brain_mask], image[~brain_mask])
    np.testing.assert_array_equal(deformed[~label], image[~label])
    assert not np.array_equal(deformed[label], image[label])


@pytest.mark.parametrize("kind, reach", [("sink", SINK_MAX_REACH), ("source", 1.0)])
def test_deformation_intensities_come_from_surrounding_tissue(kind, reach):
    # Every value inside the anomaly lies within the intensity range of the
    # tissue its sources are taken from: the disk widened to the largest source
    # distance, plus one pixel for the bilinear neighbours.
    image = np.random.default_rng(5).random((64, 64)).astype(np.float32)
    image[20:44, 20:44] = 0.3 + 0.4 * image[20:44, 20:44]
    center, radius = (32.0, 32.0), 8.0

    deformed, label = DEFORMATIONS[kind](image, center, radius, brain_mask=np.ones((64, 64), dtype=bool))

    region = disk_mask((64, 64), center, reach * radius + math.sqrt(2))
    assert deformed[label].min() >= image[region].min()
    assert deformed[label].max() <= image[region].max()
    assert deformed[label].min() >= 0.3
    assert deformed[label].max() <= 0.7


def test_deformation_rejects_invalid_input():
    image = np.zeros((16, 16), dtype=np.float32)
    brain_mask = np.ones((16, 16), dtype=bool)
    with pytest.raises(InvalidInputError, match="radius must be a positive number of pixels, got 0"):
        sink_deformation(image, (8, 8), 0.0, brain_mask=brain_mask)
    with pytest.raises(InvalidInputError, match=r"brain mask of shape \(16, 15\) does not match"):
        sink_deformation(image, (8, 8), 3.0, brain_mask=brain_mask[:, :15])
    with pytest.raises(InvalidInputError, match=r"expected one float 2D slice, got an array of shape \(2, 16, 16\)"):
        source_deformation(np.zeros((2, 16, 16), dtype=np.float32), (8, 8), 3.0, brain_mask=brain_mask)
    with pytest.raises(InvalidInputError, match="center must be a finite"):
        source_deformation(image, (np.nan, 8), 3.0, brain_mask=brain_mask)


def make_slices(subjects=6, per_subject=7, size=32, seed=0, empty_every=None):
    """Return slice arrays per the slice-file contract: random images inside an elliptical brain."""
    rng = np.random.default_rng(seed)
    count = subjects * per_subject
    rows, columns = np.mgrid[:size, :size]
    brain = ((rows - size / 2) / (size * 0.4)) ** 2 + ((columns - size / 2) / (size * 0.3)) ** 2 < 1
    masks = np.repeat(brain[None], count, axis=0)
    if empty_every:
        masks[::empty_every] = False
    images = (rng.random((count, size, size)) * masks).astype(np.float32)
    return {
        "images": images,
        "masks": masks,
        "labels": np.zeros((count, size, size), dtype=bool),
        "slice_index": np.tile(np.arange(40, 40 + per_subject, dtype=np.int16), subjects),
        "subject": np.repeat(np.array([f"sub-{number:02d}" for number in range(subjects)]), per_subject),
    }


SETTINGS = {"kind": "sink", "radius_px": (3.0, 6.0), "seed": 11}


def test_add_anomalies_exact_count_and_contract():
    arrays = make_slices(subjects=37, per_subject=1)

    result = add_anomalies(arrays, fraction=0.5, **SETTINGS)

    # 0.5 * 37 = 18.5 rounds up to 19.
    assert result["anomalous"].dtype == bool
    assert result["anomalous"].sum() == 19
    assert result["anomaly_center"].dtype == np.float32
    assert result["anomaly_center"].shape == (37, 2)
    assert result["anomaly_radius"].dtype == np.float32
    assert result["anomaly_radius"].shape == (37,)
    anomalous = result["anomalous"]
    assert np.all(np.isnan(result["anomaly_center"][~anomalous]))
    assert np.all(np.isnan(result["anomaly_radius"][~anomalous]))
    assert np.all((result["anomaly_radius"][anomalous] >= 3.0) & (result["anomaly_radius"][anomalous] <= 6.0))
    for position in np.flatnonzero(anomalous):
        row, column = result["anomaly_center"][position].astype(int)
        assert arrays["masks"][position, row, column]
        expected_label = disk_mask((32, 32), (row, column), float(result["anomaly_radius"][position]))
        np.testing.assert_array_equal(result["labels"][position], expected_label & arrays["masks"][position])
    assert not result["labels"][~anomalous].any()
    np.testing.assert_array_equal(result["images"][~anomalous], arrays["images"][~anomalous])
    assert result["images"].dtype == np.float32
    assert result["subject"].dtype.kind == "U"
    assert result["slice_index"].dtype == np.int16


def test_add_anomalies_leaves_input_unchanged():
    arrays = make_slices()
    copies = {key: value.copy() for key, value in arrays.items()}

    add_anomalies(arrays, fraction=1.0, **SETTINGS)

    for key, value in copies.items():
        np.testing.assert_array_equal(arrays[key], value)


def test_add_anomalies_reproducible():
    arrays = make_slices()

    first = add_anomalies(arrays, fraction=0.4, **SETTINGS)
    second = add_anomalies(arrays, fraction=0.4, **SETTINGS)

    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_add_anomalies_independent_of_slice_order():
    arrays = make_slices()
    permutation = np.random.default_rng(99).permutation(len(arrays["images"]))
    shuffled = {key: value[permutation] for key, value in arrays.items()}

    original = add_anomalies(arrays, fraction=0.4, **SETTINGS)
    reordered = add_anomalies(shuffled, fraction=0.4, **SETTINGS)

    for key in original:
        np.testing.assert_array_equal(reordered[key], original[key][permutation])


def test_add_anomalies_halves_match_whole():
    # Two workers, each with half of the slices, give every slice the anomaly it
    # gets when one worker processes all of them.
    arrays = make_slices()
    halves = [np.arange(0, 21), np.arange(21, 42)]

    whole = add_anomalies(arrays, fraction=1.0, **SETTINGS)
    for half in halves:
        part = add_anomalies({key: value[half] for key, value in arrays.items()}, fraction=1.0, **SETTINGS)
        for key in whole:
            np.testing.assert_array_equal(part[key], whole[key][half])

    # With a fraction below 1 the selected sets differ, but a slice selected in
    # both runs gets the same anomaly.
    whole = add_anomalies(arrays, fraction=0.5, **SETTINGS)
    part = add_anomalies({key: value[halves[0]] for key, value in arrays.items()}, fraction=0.5, **SETTINGS)
    both = np.flatnonzero(part["anomalous"] & whole["anomalous"][halves[0]])
    assert both.size > 0
    for key in ("images", "labels", "anomaly_center", "anomaly_radius"):
        np.testing.assert_array_equal(part[key][both], whole[key][halves[0]][both])


def test_add_anomalies_different_seeds_differ():
    arrays = make_slices()

    first = add_anomalies(arrays, fraction=0.5, **SETTINGS)
    second = add_anomalies(arrays, fraction=0.5, **{**SETTINGS, "seed": 12})

    assert not np.array_equal(first["anomalous"], second["anomalous"])
    assert not np.array_equal(first["images"], second["images"])


def test_add_anomalies_keeps_existing_labels():
    arrays = make_slices()
    arrays["labels"][:, 10:14, 12:18] = True

    result = add_anomalies(arrays, fraction=1.0, **SETTINGS)

    for position in range(len(arrays["images"])):
        center = tuple(float(value) for value in result["anomaly_center"][position])
        disk = disk_mask((32, 32), center, float(result["anomaly_radius"][position]))
        expected = arrays["labels"][position] | (disk & arrays["masks"][position])
        np.testing.assert_array_equal(result["labels"][position], expected)


def test_add_anomalies_skips_slices_without_brain():
    arrays = make_slices(empty_every=3)

    result = add_anomalies(arrays, fraction=0.6, **SETTINGS)

    assert result["anomalous"].sum() == round(0.6 * 42)
    assert not result["anomalous"][::3].any()


def test_add_anomalies_too_few_brain_slices_rejected():
    arrays = make_slices(subjects=1, per_subject=4)
    arrays["masks"][:2] = False

    with pytest.raises(InvalidInputError, match="3 anomalous slices requested .* only 2 slices contain brain"):
        add_anomalies(arrays, fraction=0.75, **SETTINGS)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"kind": "blob"}, r"anomalies\.kind must be one of \['sink', 'source'\], got 'blob'"),
        ({"fraction": 1.5}, r"anomalies\.fraction must be a number in \[0, 1\], got 1\.5"),
        ({"radius_px": (6.0, 3.0)}, r"anomalies\.radius_px must be \[low, high\]"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
    ],
)
def test_add_anomalies_invalid_settings_rejected(override, message):
    settings = {**SETTINGS, "fraction": 0.5, **override}
    with pytest.raises(InvalidInputError, match=message):
        add_anomalies(make_slices(), **settings)


def test_add_anomalies_duplicate_slices_rejected():
    arrays = make_slices(subjects=1, per_subject=3)
    arrays["slice_index"][:] = 40

    with pytest.raises(InvalidInputError, match=r"2 slices repeat a \(subject, slice_index\) pair"):
        add_anomalies(arrays, fraction=0.5, **SETTINGS)


def test_add_anomalies_twice_rejected():
    once = add_anomalies(make_slices(), fraction=0.5, **SETTINGS)
    with pytest.raises(InvalidInputError, match="already contain synthetic anomalies"):
        add_anomalies(once, fraction=0.5, **SETTINGS)


def test_subject_key_stable_across_processes():
    # Hard-coded from the SHA-256 of "sub-001", so a change of hash or byte order fails.
    assert subject_key("sub-001") == 2183646415056876413


def test_add_anomalies_file_writes_summary(tmp_path):
    arrays = make_slices()
    write_arrays(tmp_path / "test.npz", **arrays)

    summary = add_anomalies_file(tmp_path / "test.npz", tmp_path / "out" / "test_sink.npz", fraction=0.5, **SETTINGS)

    result = read_arrays(tmp_path / "out" / "test_sink.npz")
    expected = add_anomalies(arrays, fraction=0.5, **SETTINGS)
    assert set(result) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(result[key], expected[key])
    anomalous = result["anomalous"]
    assert summary["slices"] == 42
    assert summary["anomalous_slices"] == 21
    assert summary["mean_radius_px"] == pytest.approx(float(np.mean(result["anomaly_radius"][anomalous])))
    labelled = (result["labels"] & ~arrays["labels"]).reshape(42, -1).sum(axis=1)[anomalous]
    assert summary["mean_labelled_pixels"] == pytest.approx(labelled.mean())


def test_add_anomalies_file_failure_leaves_output_untouched(tmp_path):
    arrays = make_slices(subjects=1, per_subject=4)
    arrays["masks"][:] = False
    write_arrays(tmp_path / "test.npz", **arrays)
    output = tmp_path / "test_sink.npz"
    output.write_bytes(b"previous output")

    with pytest.raises(InvalidInputError, match=r"cannot add anomalies to .*test\.npz: 2 anomalous slices requested"):
        add_anomalies_file(tmp_path / "test.npz", output, fraction=0.5, **SETTINGS)

    assert output.read_bytes() == b"previous output"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["test.npz", "test_sink.npz"]
