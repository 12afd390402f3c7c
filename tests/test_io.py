"""Reading and validating NIfTI volumes, and atomic outputs."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from sfae.io import (
    InvalidInputError,
    atomic_output,
    binarize_labels,
    read_arrays,
    read_volume,
    require_same_grid,
    write_arrays,
    write_json,
    write_volume,
)

AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])


def save_nifti(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def brain_like(shape=(16, 16, 12)) -> np.ndarray:
    data = np.zeros(shape, np.float32)
    data[4:12, 4:12, 3:9] = np.linspace(1, 2, 8)[:, None, None]
    return data


def test_io_read_matches_simpleitk_geometry(tmp_path):
    path = save_nifti(tmp_path / "scan.nii.gz", brain_like())
    ours = read_volume(path)
    reference = sitk.ReadImage(str(path))
    assert ours.GetSize() == reference.GetSize()
    np.testing.assert_allclose(ours.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(ours.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(ours.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(reference))
    assert ours.GetPixelID() == sitk.sitkFloat32


def test_io_read_real_oblique_and_flipped_volumes(demo_files):
    """World geometry of real files with oblique (mean head), LIA (OASIS) and flipped (SRI24) headers equals SimpleITK's."""
    for key in ("pydeface_mean_head", "oasis_template", "sri24_t1_skullstripped", "robex_reference"):
        ours = read_volume(demo_files[key])
        reference = sitk.ReadImage(str(demo_files[key]))
        if reference.GetDimension() == 4:
            size = list(reference.GetSize()[:3]) + [0]
            reference = sitk.Extract(reference, size, [0, 0, 0, 0])
        assert ours.GetSize() == reference.GetSize(), key
        np.testing.assert_allclose(ours.GetOrigin(), reference.GetOrigin(), atol=1e-3, err_msg=key)
        np.testing.assert_allclose(ours.GetDirection(), reference.GetDirection(), atol=1e-4, err_msg=key)


def test_io_trailing_singleton_axis_squeezed(tmp_path):
    path = save_nifti(tmp_path / "scan.nii.gz", brain_like()[..., None])
    assert read_volume(path).GetSize() == (16, 16, 12)


def test_io_missing_file(tmp_path):
    with pytest.raises(InvalidInputError, match=r"NIfTI file not found: .*absent.nii.gz; check the data set's path"):
        read_volume(tmp_path / "absent.nii.gz")


def test_io_corrupt_file(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(os.urandom(400))
    with pytest.raises(InvalidInputError, match=r"cannot read NIfTI file .*scan.nii.gz.*corrupt or truncated"):
        read_volume(path)


def test_io_truncated_file(tmp_path):
    path = save_nifti(tmp_path / "scan.nii.gz", np.random.default_rng(0).random((32, 32, 32)).astype(np.float32))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(InvalidInputError, match="corrupt or truncated"):
        read_volume(path)


def test_io_truncated_uncompressed_file(tmp_path):
    path = save_nifti(tmp_path / "scan.nii", brain_like())
    content = path.read_bytes()
    path.write_bytes(content[: len(content) - 1000])
    with pytest.raises(InvalidInputError, match=r"scan.nii.*corrupt or truncated"):
        read_volume(path)


def test_io_gzip_of_garbage(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 100))
    with pytest.raises(InvalidInputError, match="cannot read NIfTI file"):
        read_volume(path)


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 12, 3)])
def test_io_wrong_dimensions(tmp_path, shape):
    path = save_nifti(tmp_path / "scan.nii.gz", np.ones(shape, np.float32))
    with pytest.raises(InvalidInputError, match=r"has shape .*expected a 3D volume"):
        read_volume(path)


def test_io_single_slice_rejected(tmp_path):
    path = save_nifti(tmp_path / "scan.nii.gz", np.ones((64, 64, 1), np.float32))
    with pytest.raises(InvalidInputError, match="too small for a brain volume"):
        read_volume(path)


def test_io_nan_rejected(tmp_path):
    data = brain_like()
    data[5, 5, 5] = np.nan
    data[6, 6, 6] = np.inf
    path = save_nifti(tmp_path / "scan.nii.gz", data)
    with pytest.raises(InvalidInputError, match=r"contains 2 NaN or infinite voxels"):
        read_volume(path)


def test_io_all_zero_rejected(tmp_path):
    path = save_nifti(tmp_path / "scan.nii.gz", np.zeros((16, 16, 12), np.float32))
    with pytest.raises(InvalidInputError, match="is all zeros"):
        read_volume(path)


def test_io_mask_must_be_binary(tmp_path):
    path = save_nifti(tmp_path / "mask.nii.gz", brain_like())
    with pytest.raises(InvalidInputError, match=r"mask .* is not binary .*nearest-neighbour"):
        read_volume(path, kind="mask")


def test_io_mask_stored_as_scaled_float_accepted(tmp_path):
    data = np.zeros((16, 16, 12), np.float32)
    data[4:12, 4:12, 3:9] = 0.99999994
    data[5, 5, 5] = 1.0000001
    mask = read_volume(save_nifti(tmp_path / "mask.nii.gz", data), kind="mask")
    assert sitk.GetArrayFromImage(mask).sum() == 8 * 8 * 6
    data[6, 6, 6] = 0.9
    with pytest.raises(InvalidInputError, match="is not binary"):
        read_volume(save_nifti(tmp_path / "mask.nii.gz", data), kind="mask")


def test_io_empty_mask_rejected_empty_segmentation_accepted(tmp_path):
    path = save_nifti(tmp_path / "mask.nii.gz", np.zeros((16, 16, 12), np.uint8))
    with pytest.raises(InvalidInputError, match="brain mask .* is empty"):
        read_volume(path, kind="mask")
    segmentation = read_volume(path, kind="segmentation")
    assert segmentation.GetPixelID() == sitk.sitkUInt8


def test_io_binarize_merges_tumour_labels(tmp_path):
    labels = np.zeros((16, 16, 12), np.uint8)
    labels[2, 2, 2], labels[3, 3, 3], labels[4, 4, 4] = 1, 2, 4
    image = binarize_labels(save_nifti(tmp_path / "seg.nii.gz", labels))
    array = sitk.GetArrayFromImage(image)
    assert array.sum() == 3
    assert set(np.unique(array)) == {0, 1}


def test_io_binarize_rejects_fractional_labels(tmp_path):
    labels = np.zeros((16, 16, 12), np.float32)
    labels[2, 2, 2] = 0.5
    with pytest.raises(InvalidInputError, match="negative, fractional or NaN labels"):
        binarize_labels(save_nifti(tmp_path / "seg.nii.gz", labels))


def test_io_grid_mismatch_named(tmp_path):
    image = read_volume(save_nifti(tmp_path / "a.nii.gz", brain_like()))
    other = read_volume(save_nifti(tmp_path / "b.nii.gz", brain_like((16, 16, 13))))
    with pytest.raises(InvalidInputError, match=r"b.nii.gz \(size \(16, 16, 13\).*is not on the grid of a.nii.gz"):
        require_same_grid(other, image, "b.nii.gz", "a.nii.gz")


def test_io_write_volume_round_trip(tmp_path):
    image = read_volume(save_nifti(tmp_path / "a.nii.gz", brain_like()))
    write_volume(image, tmp_path / "out" / "b.nii.gz")
    again = read_volume(tmp_path / "out" / "b.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(again.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["b.nii.gz"]


def test_io_atomic_output_failure_leaves_nothing(tmp_path):
    target = tmp_path / "result.npz"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_io_atomic_output_keeps_previous_on_failure(tmp_path):
    target = tmp_path / "report.json"
    write_json({"version": 1}, target)
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_text("{broken")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{")
    assert '"version": 1' in target.read_text()
    assert os.stat(target).st_mode & 0o044 == 0o044, "output should be readable by group and others like any new file"


def test_io_atomic_output_removes_stale_partial_files(tmp_path):
    stale = tmp_path / ".brain.nii.gz.abc123.partial.nii.gz"
    stale.write_bytes(b"left by a killed job")
    unrelated = tmp_path / ".mask.nii.gz.abc123.partial.nii.gz"
    unrelated.write_bytes(b"another output's file")
    with atomic_output(tmp_path / "brain.nii.gz") as temporary:
        temporary.write_bytes(b"complete")
    assert not stale.exists()
    assert unrelated.exists()
    assert (tmp_path / "brain.nii.gz").read_bytes() == b"complete"


def test_io_arrays_round_trip_and_object_rejected(tmp_path):
    write_arrays(tmp_path / "a.npz", images=np.ones((2, 4, 4), np.float32), subject=np.array(["a", "bc"]))
    arrays = read_arrays(tmp_path / "a.npz")
    assert arrays["subject"].tolist() == ["a", "bc"]
    with pytest.raises(TypeError, match="dtype object"):
        write_arrays(tmp_path / "b.npz", subject=np.array(["a", None], dtype=object))
    assert not (tmp_path / "b.npz").exists()
