"""Tests of slice extraction: orientation by world coordinates, resizing, ranges and the slice file."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from skimage.transform import resize

from sfae.io import InvalidInputError, read_arrays, read_volume, write_volume
from sfae.preprocessing.intensity import equalize_histogram
from sfae.preprocessing.slices import extract_slices, slice_volume

# Direction matrices (columns: world direction of the index axes i, j, k in LPS).
DIRECTIONS = {
    "identity": np.eye(3),
    "sri24_skullstripped": np.diag([1.0, -1.0, 1.0]),
    "sri24_with_skull": np.diag([-1.0, -1.0, 1.0]),
    "x_flipped": np.diag([-1.0, 1.0, 1.0]),
    "z_flipped": np.diag([1.0, 1.0, -1.0]),
    "in_plane_swapped": np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
    "swapped_with_signs": np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
    "swapped_all_flipped": np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]),
}


def make_image(
    array_kji: np.ndarray, direction: np.ndarray, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0)
) -> sitk.Image:
    """Build an image from an array in SimpleITK's (k, j, i) order with the given geometry."""
    image = sitk.GetImageFromArray(array_kji)
    image.SetDirection([float(value) for value in np.asarray(direction).ravel()])
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    return image


def voxel_at_world(image: sitk.Image, point) -> tuple[int, int, int]:
    """Return the (k, j, i) array index of the voxel at a world point (LPS, mm)."""
    i, j, k = image.TransformPhysicalPointToIndex([float(value) for value in point])
    return k, j, i


def binary_like(reference: sitk.Image, array_kji: np.ndarray) -> sitk.Image:
    """Build a uint8 image on the grid of ``reference``."""
    image = sitk.GetImageFromArray(array_kji.astype(np.uint8))
    image.CopyInformation(reference)
    return image


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_extract_slices_orients_by_world_coordinates(name):
    # A 21 x 21 x 6 grid; the centre voxel's world point is the same for every direction.
    direction = DIRECTIONS[name]
    center_index = np.array([10, 10, 0])
    origin = -direction @ center_index
    image = make_image(np.zeros((6, 21, 21), dtype=np.float32), direction, origin=tuple(origin))
    values = np.zeros((6, 21, 21), dtype=np.float32)
    mask = np.ones((6, 21, 21), dtype=np.uint8)
    labels = np.zeros((6, 21, 21), dtype=np.uint8)
    for slice_number in range(6):
        height = float(direction[2, 2] * slice_number)
        # Image marker: 6 mm anterior (-y in LPS) and 3 mm to the patient's left (+x).
        values[voxel_at_world(image, (3.0, -6.0, height))] = (slice_number + 1) / 10
        # Label marker: 4 mm posterior, on the midline.
        labels[voxel_at_world(image, (0.0, 4.0, height))] = 1
        # Mask hole: 5 mm to the patient's right, 2 mm posterior.
        mask[voxel_at_world(image, (-5.0, 2.0, height))] = 0
    image = make_image(values, direction, origin=tuple(origin))

    arrays = extract_slices(image, binary_like(image, mask), binary_like(image, labels), start=1, stop=5, size=21)

    for position in range(4):
        top_right = np.argwhere(arrays["images"][position] > 0)
        assert top_right.tolist() == [[10 - 6, 10 + 3]]
        assert arrays["images"][position][4, 13] == pytest.approx((position + 2) / 10)
        assert np.argwhere(arrays["labels"][position]).tolist() == [[10 + 4, 10]]
        assert np.argwhere(~arrays["masks"][position]).tolist() == [[10 + 2, 10 - 5]]
    np.testing.assert_array_equal(arrays["slice_index"], [1, 2, 3, 4])


def test_extract_slices_shapes_and_dtypes():
    rng = np.random.default_rng(0)
    values = rng.random((12, 40, 40)).astype(np.float32) * 1.2
    mask = np.zeros((12, 40, 40), dtype=np.uint8)
    mask[:, 5:35, 8:30] = 1
    image = make_image(values, np.eye(3))

    arrays = extract_slices(image, binary_like(image, mask), binary_like(image, mask * 0), start=3, stop=10, size=16)

    assert set(arrays) == {"images", "masks", "labels", "slice_index"}
    assert arrays["images"].shape == (7, 16, 16)
    assert arrays["images"].dtype == np.float32
    assert arrays["masks"].shape == (7, 16, 16)
    assert arrays["masks"].dtype == bool
    assert arrays["labels"].shape == (7, 16, 16)
    assert arrays["labels"].dtype == bool
    assert arrays["slice_index"].dtype == np.int16
    np.testing.assert_array_equal(arrays["slice_index"], np.arange(3, 10))
    assert arrays["images"].min() >= 0.0
    assert arrays["images"].max() <= 1.0
    assert np.all(arrays["images"][~arrays["masks"]] == 0)
    assert not arrays["labels"].any()


@pytest.mark.parametrize("size", [24, 64, 100])
def test_extract_slices_resize_matches_skimage(size):
    # A smooth image inside a full mask, so that masking does not interfere.
    rng = np.random.default_rng(1)
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.random((3, 60, 60)), sigma=(0, 2, 2))
    values = ((noise - noise.min()) / (noise.max() - noise.min())).astype(np.float32)
    image = make_image(values, np.eye(3))
    ones = np.ones(values.shape, dtype=np.uint8)

    arrays = extract_slices(image, binary_like(image, ones), binary_like(image, ones * 0), start=0, stop=3, size=size)

    for position in range(3):
        expected = resize(
            values[position], (size, size), order=1, mode="constant", cval=0, clip=False, anti_aliasing=True
        )
        np.testing.assert_allclose(arrays["images"][position], np.clip(expected, 0, 1), atol=1e-5)


@pytest.mark.parametrize("size", [128, 100, 300])
def test_extract_slices_labels_stay_binary(size):
    rows, columns = np.mgrid[:240, :240]
    disk = (rows - 100.3) ** 2 + (columns - 130.7) ** 2 < 37.0**2
    labels = np.repeat(disk[None], 2, axis=0).astype(np.uint8)
    image = make_image(np.full((2, 240, 240), 0.5, dtype=np.float32), np.eye(3))
    ones = np.ones((2, 240, 240), dtype=np.uint8)

    arrays = extract_slices(image, binary_like(image, ones), binary_like(image, labels), start=0, stop=2, size=size)

    resized = arrays["labels"][0]
    assert resized.dtype == bool
    # The disk on the output grid: pixel edges stay aligned, so a pixel centre
    # c maps to (c + 0.5) / scale - 0.5 on the input grid.
    scale = size / 240
    out_rows, out_columns = np.mgrid[:size, :size]
    expected = (out_rows + 0.5 - (100.3 + 0.5) * scale) ** 2 + (
        out_columns + 0.5 - (130.7 + 0.5) * scale
    ) ** 2 < (37.0 * scale) ** 2
    intersection = np.count_nonzero(resized & expected)
    union = np.count_nonzero(resized | expected)
    assert intersection / union > 0.95
    assert np.count_nonzero(resized) * (240 / size) ** 2 == pytest.approx(np.count_nonzero(disk), rel=0.05)


def test_extract_slices_pads_non_square_to_keep_aspect():
    # 20 rows (posterior-anterior) by 30 columns (left-right), identity direction.
    values = np.full((1, 20, 30), 0.5, dtype=np.float32)
    image = make_image(values, np.eye(3))
    ones = np.ones(values.shape, dtype=np.uint8)

    arrays = extract_slices(image, binary_like(image, ones), binary_like(image, ones * 0), start=0, stop=1, size=30)

    brain_rows = np.flatnonzero(arrays["masks"][0].any(axis=1))
    assert brain_rows.tolist() == list(range(5, 25))
    assert arrays["masks"][0].all(axis=0).sum() == 0
    assert np.all(arrays["images"][0][5:25] == 0.5)
    assert np.all(arrays["images"][0][:5] == 0)


@pytest.mark.parametrize("start, stop", [(-1, 4), (3, 3), (5, 2), (0, 9)])
def test_extract_slices_range_rejected(start, stop):
    image = make_image(np.zeros((8, 10, 10), dtype=np.float32), np.eye(3))
    ones = np.ones((8, 10, 10), dtype=np.uint8)

    with pytest.raises(
        InvalidInputError,
        match=rf"slice range {start}\.\.{stop - 1} \(preprocessing\.slices\.start={start}, "
        rf"preprocessing\.slices\.stop={stop}\) does not fit the volume's 8 axial slices",
    ):
        extract_slices(image, binary_like(image, ones), binary_like(image, ones * 0), start=start, stop=stop, size=10)


def test_extract_slices_oblique_rejected():
    angle = np.deg2rad(10.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    image = make_image(np.zeros((4, 10, 10), dtype=np.float32), rotation)
    ones = np.ones((4, 10, 10), dtype=np.uint8)

    with pytest.raises(InvalidInputError, match="is oblique; slicing supports only axis-aligned images"):
        extract_slices(image, binary_like(image, ones), binary_like(image, ones * 0), start=0, stop=2, size=10)


def test_extract_slices_non_axial_third_axis_rejected():
    coronal = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    image = make_image(np.zeros((4, 10, 10), dtype=np.float32), coronal)
    ones = np.ones((4, 10, 10), dtype=np.uint8)

    with pytest.raises(InvalidInputError, match=r"third index axis .* posterior-anterior \(y\) world axis"):
        extract_slices(image, binary_like(image, ones), binary_like(image, ones * 0), start=0, stop=2, size=10)


def test_extract_slices_grid_mismatch_rejected():
    image = make_image(np.zeros((4, 10, 10), dtype=np.float32), np.eye(3))
    mask = make_image(np.ones((4, 10, 10), dtype=np.uint8), np.eye(3), spacing=(2.0, 2.0, 2.0))

    with pytest.raises(InvalidInputError, match="the brain mask .* is not on the grid of the image"):
        extract_slices(image, mask, binary_like(image, np.zeros((4, 10, 10))), start=0, stop=2, size=10)


def write_scan(folder, values, mask, labels=None, spacing=(1.0, 1.0, 1.0)):
    """Write image, mask and optional labels as NIfTI files with an identity direction."""
    paths = {}
    for name, array in (("image", values), ("mask", mask), ("labels", labels)):
        if array is None:
            paths[name] = None
            continue
        image = make_image(array, np.eye(3), spacing=spacing if name != "labels" else (1.0, 1.0, 1.0))
        paths[name] = folder / f"{name}.nii.gz"
        write_volume(image, paths[name])
    return paths


def synthetic_scan(shape=(10, 24, 24), seed=0):
    """Return positive intensities with distinct values, an ellipsoid brain mask and a lesion."""
    rng = np.random.default_rng(seed)
    values = (rng.random(shape) * 3000.0 + 100.0).astype(np.float32)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    mask = (((y - 12) / 10.0) ** 2 + ((x - 12) / 8.0) ** 2 < 1) & (z >= 1)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[4:7, 10:14, 9:12] = 1
    return values, mask.astype(np.uint8), labels


def test_slice_volume_writes_slice_file(tmp_path):
    values, mask, labels = synthetic_scan()
    paths = write_scan(tmp_path, values, mask, labels)
    output = tmp_path / "slices" / "sub-01.npz"

    summary = slice_volume(
        paths["image"], paths["mask"], paths["labels"], output, subject="sub-01", start=2, stop=8, size=24
    )

    arrays = read_arrays(output)
    assert set(arrays) == {"images", "masks", "labels", "slice_index", "subject"}
    assert arrays["images"].dtype == np.float32
    assert arrays["images"].shape == (6, 24, 24)
    assert arrays["subject"].dtype.kind == "U"
    assert arrays["subject"].tolist() == ["sub-01"] * 6
    # Identity direction and no resizing: the slices are the equalized volume itself.
    equalized = equalize_histogram(values, mask)
    np.testing.assert_array_equal(arrays["images"], equalized[2:8])
    np.testing.assert_array_equal(arrays["masks"], mask[2:8] == 1)
    np.testing.assert_array_equal(arrays["labels"], labels[2:8] == 1)
    assert summary["slices"] == 6
    assert summary["slices_with_lesion"] == 3
    assert summary["lesion_pixels"] == 36


def test_slice_volume_without_labels_is_healthy(tmp_path):
    values, mask, _ = synthetic_scan()
    paths = write_scan(tmp_path, values, mask)

    slice_volume(paths["image"], paths["mask"], None, tmp_path / "out.npz", subject="h1", start=0, stop=10, size=16)

    arrays = read_arrays(tmp_path / "out.npz")
    assert arrays["labels"].dtype == bool
    assert not arrays["labels"].any()
    assert arrays["masks"][1:].any(axis=(1, 2)).all()
    assert not arrays["masks"][0].any()


def test_slice_volume_range_error_names_file(tmp_path):
    values, mask, labels = synthetic_scan()
    paths = write_scan(tmp_path, values, mask, labels)

    with pytest.raises(InvalidInputError, match=r"cannot slice .*image\.nii\.gz: .*preprocessing\.slices\.stop=11"):
        slice_volume(
            paths["image"], paths["mask"], paths["labels"], tmp_path / "o.npz", subject="s", start=0, stop=11, size=8
        )
    assert not (tmp_path / "o.npz").exists()


def test_slice_volume_grid_mismatch_rejected(tmp_path):
    values, mask, labels = synthetic_scan()
    paths = write_scan(tmp_path, values, mask, labels, spacing=(1.0, 1.0, 2.0))

    with pytest.raises(InvalidInputError, match=r"labels\.nii\.gz .* is not on the grid of .*image\.nii\.gz"):
        slice_volume(
            paths["image"], paths["mask"], paths["labels"], tmp_path / "o.npz", subject="s", start=0, stop=4, size=8
        )


def normalized_with_mask(path):
    """Read a demo volume, scale it to [0, 1] and return it with its non-zero mask."""
    image = read_volume(path)
    values = sitk.GetArrayFromImage(image)
    scaled = sitk.GetImageFromArray(values / values.max())
    scaled.CopyInformation(image)
    return scaled, binary_like(image, values > 0)


def test_extract_slices_sri24_orientations_agree(demo_files):
    # The skull-stripped SRI24 atlas (direction diag(1, -1, 1)) and the SRI24 with
    # skull (diag(-1, -1, 1)) store the same head with the left-right array axis
    # reversed. Transferring the atlas brain mask onto the other grid through
    # world coordinates (SimpleITK resampling) must give identical slice masks.
    stripped, brain = normalized_with_mask(demo_files["sri24_t1_skullstripped"])
    with_skull, _ = normalized_with_mask(demo_files["sri24_t1"])
    brain_on_skull_grid = sitk.Resample(
        brain, with_skull, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    assert stripped.GetDirection() != with_skull.GetDirection()
    no_lesion = np.zeros(sitk.GetArrayViewFromImage(brain).shape)

    first = extract_slices(stripped, brain, binary_like(stripped, no_lesion), start=70, stop=90, size=80)
    second = extract_slices(
        with_skull, brain_on_skull_grid, binary_like(with_skull, no_lesion), start=70, stop=90, size=80
    )

    np.testing.assert_array_equal(first["masks"], second["masks"])
    inside = first["masks"]
    assert inside.sum() > 20 * 1000
    assert np.corrcoef(first["images"][inside], second["images"][inside])[0, 1] > 0.98

    # Control: slicing in raw array order, ignoring the direction, disagrees.
    raw_first = sitk.GetArrayViewFromImage(stripped)[70:90]
    raw_second = sitk.GetArrayViewFromImage(with_skull)[70:90]
    raw_brain = sitk.GetArrayViewFromImage(brain)[70:90] > 0
    assert np.corrcoef(raw_first[raw_brain], raw_second[raw_brain])[0, 1] < 0.9
