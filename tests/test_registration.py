"""Tests of sfae.preprocessing.registration and the registration QC image, on real volumes downsampled to 3 mm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from sfae.io import InvalidInputError, read_volume
from sfae.preprocessing.qc import write_registration_qc
from sfae.preprocessing import registration
from sfae.preprocessing.registration import (
    RegistrationSettings,
    dice_overlap,
    failed_qc_path,
    register_volume,
)

SPACING_MM = 3.0
SETTINGS = RegistrationSettings(
    seed=0,
    min_dice=0.85,
    histogram_bins=32,
    sampling_fraction=0.25,
    shrink_factors=(2, 1),
    smoothing_sigmas_mm=(3.0, 0.0),
    iterations=100,
)
# The synthetic misalignment: about 9 degrees around the vertical axis, 4 degrees
# around the left-right axis, and a shift of about 11 mm.
ROTATION_RAD = (0.07, 0.0, 0.15)
TRANSLATION_MM = (6.0, -8.0, 4.0)
LESION_RADIUS_MM = 15.0


def _resample_to_spacing(image: sitk.Image, spacing_mm: float, interpolator: int = sitk.sitkLinear) -> sitk.Image:
    """Resample ``image`` onto a grid of the same extent and direction with isotropic ``spacing_mm``."""
    size = [int(round(n * s / spacing_mm)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(
        image, size, sitk.Transform(), interpolator, image.GetOrigin(), (spacing_mm,) * 3, image.GetDirection(), 0.0,
        image.GetPixelID(),
    )


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def _outputs(folder: Path) -> dict[str, Path]:
    """Output paths of one register_volume call inside ``folder``."""
    return {
        "image_out": folder / "registered_brain.nii.gz",
        "mask_out": folder / "registered_mask.nii.gz",
        "labels_out": folder / "registered_labels.nii.gz",
        "transform_out": folder / "atlas_transform.tfm",
        "report_out": folder / "registration.json",
        "qc_out": folder / "registration_qc.png",
    }


def _brain_points(mask: sitk.Image, step: int = 4) -> list[tuple[float, ...]]:
    """World coordinates of every ``step``-th voxel of a mask along each axis."""
    indices = np.argwhere(sitk.GetArrayViewFromImage(mask)[::step, ::step, ::step] != 0) * step
    return [mask.TransformIndexToPhysicalPoint([int(i) for i in index[::-1]]) for index in indices]


def _ball(reference: sitk.Image, centre: tuple[float, ...], radius_mm: float) -> sitk.Image:
    """uint8 image on the grid of ``reference``: 1 within ``radius_mm`` of the world point ``centre``."""
    indices = np.indices(reference.GetSize()[::-1]).reshape(3, -1)[::-1]  # (x, y, z) index of every voxel
    direction = np.reshape(reference.GetDirection(), (3, 3))
    points = np.reshape(reference.GetOrigin(), (3, 1)) + direction @ (np.reshape(reference.GetSpacing(), (3, 1)) * indices)
    inside = np.linalg.norm(points - np.reshape(centre, (3, 1)), axis=0) <= radius_mm
    ball = sitk.GetImageFromArray(inside.reshape(reference.GetSize()[::-1]).astype(np.uint8))
    ball.CopyInformation(reference)
    return ball


@pytest.fixture(scope="module")
def atlas_3mm(demo_files, tmp_path_factory) -> Path:
    """SRI24 skull-stripped atlas at 3 mm (80 x 80 x 52)."""
    folder = tmp_path_factory.mktemp("atlas")
    atlas = read_volume(demo_files["sri24_t1_skullstripped"])
    return _write(_resample_to_spacing(atlas, SPACING_MM), folder / "atlas_3mm.nii.gz")


@pytest.fixture(scope="module")
def known_misalignment(atlas_3mm, tmp_path_factory) -> dict:
    """The atlas moved by a known rigid transform onto a larger grid, with a lesion ball, registered once.

    The moving brain is ``atlas(S(p))``, so the registration should find ``T``
    with ``S(T(x)) = x``.
    """
    folder = tmp_path_factory.mktemp("misaligned")
    atlas = read_volume(atlas_3mm)
    atlas_mask = sitk.Cast(sitk.NotEqual(atlas, 0.0), sitk.sitkUInt8)
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(atlas_mask)
    centre = statistics.GetCentroid(1)

    shift = sitk.Euler3DTransform(centre, *ROTATION_RAD, TRANSLATION_MM)
    padding = 8
    grid = sitk.Image([size + 2 * padding for size in atlas.GetSize()], sitk.sitkFloat32)
    grid.SetSpacing(atlas.GetSpacing())
    grid.SetDirection(atlas.GetDirection())
    grid.SetOrigin(atlas.TransformContinuousIndexToPhysicalPoint([-padding] * 3))
    moving = sitk.Resample(atlas, grid, shift, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moving_mask = sitk.Cast(sitk.NotEqual(moving, 0.0), sitk.sitkUInt8)

    # A lesion ball in atlas space, carried into the moving grid with the same transform.
    lesion_atlas = _ball(atlas, centre, LESION_RADIUS_MM)
    lesion_moving = sitk.Resample(lesion_atlas, grid, shift, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

    paths = {
        "brain": _write(moving, folder / "brain.nii.gz"),
        "mask": _write(moving_mask, folder / "mask.nii.gz"),
        "segmentation": _write(lesion_moving, folder / "segmentation.nii.gz"),
    }
    outputs = _outputs(folder / "threads2")
    report = register_volume(
        paths["brain"], paths["mask"], paths["segmentation"], atlas_3mm, **outputs, settings=SETTINGS,
        already_registered=False, threads=2, subject="moved_atlas",
    )
    return {
        "paths": paths, "outputs": outputs, "report": report, "shift": shift, "atlas_mask": atlas_mask,
        "lesion_atlas": lesion_atlas, "folder": folder,
    }


def test_register_volume_recovers_known_transform(known_misalignment):
    transform = sitk.ReadTransform(str(known_misalignment["outputs"]["transform_out"]))
    shift = known_misalignment["shift"]
    points = _brain_points(known_misalignment["atlas_mask"])
    errors = [np.linalg.norm(np.subtract(shift.TransformPoint(transform.TransformPoint(p)), p)) for p in points]
    assert len(points) > 100
    assert np.mean(errors) < 1.0  # a third of a 3 mm voxel
    assert np.max(errors) < 2.5


def test_register_volume_reports_dice_and_metrics(known_misalignment):
    report = known_misalignment["report"]
    written = json.loads(known_misalignment["outputs"]["report_out"].read_text())
    assert written == report
    assert report["subject"] == "moved_atlas"
    assert report["dice"] > 0.9  # two resamplings at 3 mm blur the outline by about a voxel
    assert [stage["stage"] for stage in report["stages"]] == ["rigid", "affine"]
    for stage in report["stages"]:
        assert stage["final_metric"] < -0.3  # Mattes MI is reported negated: lower is better
        assert len(stage["iterations_per_level"]) == len(SETTINGS.shrink_factors)
        assert stage["iterations"] > 0
    assert report["final_metric"] == report["stages"][-1]["final_metric"]
    assert report["threads"] == 2
    assert report["settings"]["shrink_factors"] == [2, 1]
    assert len(report["transform"]["parameters"]) == 12


def test_register_volume_outputs_on_atlas_grid(known_misalignment, atlas_3mm):
    atlas = read_volume(atlas_3mm)
    outputs = known_misalignment["outputs"]
    image = sitk.ReadImage(str(outputs["image_out"]))
    mask = sitk.ReadImage(str(outputs["mask_out"]))
    for output in (image, mask, sitk.ReadImage(str(outputs["labels_out"]))):
        assert output.GetSize() == atlas.GetSize()
        assert np.allclose(output.GetOrigin(), atlas.GetOrigin())
    assert image.GetPixelID() == sitk.sitkFloat32
    assert mask.GetPixelID() == sitk.sitkUInt8
    image_array = sitk.GetArrayFromImage(image)
    mask_array = sitk.GetArrayFromImage(mask)
    assert set(np.unique(mask_array)) == {0, 1}
    assert np.all(image_array[mask_array == 0] == 0)
    assert np.count_nonzero(image_array) > 0.9 * np.count_nonzero(mask_array)
    assert outputs["qc_out"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not failed_qc_path(outputs["qc_out"]).exists()


def test_register_volume_segmentation_follows_transform(known_misalignment):
    labels = sitk.ReadImage(str(known_misalignment["outputs"]["labels_out"]))
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    assert values.tolist() == [0, 1]
    assert dice_overlap(labels, known_misalignment["lesion_atlas"]) > 0.8


def test_register_volume_transform_round_trips(known_misalignment):
    report = known_misalignment["report"]
    transform = sitk.ReadTransform(str(known_misalignment["outputs"]["transform_out"]))
    expected = sitk.AffineTransform(3)
    expected.SetFixedParameters(report["transform"]["fixed_parameters"])
    expected.SetParameters(report["transform"]["parameters"])
    for point in [(0.0, 0.0, 0.0), (-120.0, 100.0, 70.0), (-60.0, 180.0, 20.0)]:
        assert np.allclose(transform.TransformPoint(point), expected.TransformPoint(point), atol=1e-6)


def test_register_volume_same_result_for_any_thread_count(known_misalignment, atlas_3mm):
    paths = known_misalignment["paths"]
    outputs = _outputs(known_misalignment["folder"] / "threads1")
    register_volume(
        paths["brain"], paths["mask"], paths["segmentation"], atlas_3mm, **outputs, settings=SETTINGS,
        already_registered=False, threads=1, subject="moved_atlas",
    )
    first = sitk.ReadTransform(str(known_misalignment["outputs"]["transform_out"]))
    second = sitk.ReadTransform(str(outputs["transform_out"]))
    assert first.GetParameters() == second.GetParameters()


def test_register_volume_real_template(demo_files, atlas_3mm, tmp_path):
    # ICBM152 2009c masked by its own brain mask: a different head from the atlas.
    image = read_volume(demo_files["icbm152_2009c"])
    template_mask = sitk.Cast(read_volume(demo_files["icbm152_2009c_mask"]) > 0.5, sitk.sitkUInt8)
    template_mask.CopyInformation(image)
    brain = _resample_to_spacing(sitk.Mask(image, template_mask), SPACING_MM)
    mask = sitk.Cast(sitk.NotEqual(brain, 0.0), sitk.sitkUInt8)
    report = register_volume(
        _write(brain, tmp_path / "brain.nii.gz"), _write(mask, tmp_path / "mask.nii.gz"), None, atlas_3mm,
        **_outputs(tmp_path / "out"), settings=SETTINGS, already_registered=False, threads=2, subject="icbm152_2009c",
    )
    assert report["dice"] > 0.92
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "registered_labels.nii.gz")))
    assert labels.dtype == np.uint8
    assert not labels.any()


def test_register_volume_rejects_segmentation_off_grid(known_misalignment, atlas_3mm, tmp_path):
    paths = known_misalignment["paths"]
    segmentation = _resample_to_spacing(sitk.ReadImage(str(paths["segmentation"])), 2.0, sitk.sitkNearestNeighbor)
    segmentation_path = _write(segmentation, tmp_path / "segmentation_2mm.nii.gz")
    outputs = _outputs(tmp_path / "out")
    with pytest.raises(InvalidInputError, match=r"segmentation_2mm\.nii\.gz.*is not on the grid of .*brain\.nii\.gz"):
        register_volume(
            paths["brain"], paths["mask"], segmentation_path, atlas_3mm, **outputs, settings=SETTINGS,
            already_registered=False, threads=1, subject="off_grid",
        )
    assert not any(path.exists() for path in outputs.values())


def test_register_volume_low_dice_leaves_only_failed_qc(atlas_3mm, tmp_path):
    # The atlas with an eroded mask lies on the atlas grid but overlaps the atlas mask with Dice < 0.999.
    atlas = read_volume(atlas_3mm)
    eroded = sitk.BinaryErode(sitk.Cast(sitk.NotEqual(atlas, 0.0), sitk.sitkUInt8), [1, 1, 1])
    mask_path = _write(eroded, tmp_path / "eroded_mask.nii.gz")
    outputs = _outputs(tmp_path / "out")
    strict = RegistrationSettings(**{**SETTINGS.__dict__, "min_dice": 0.999})
    with pytest.raises(InvalidInputError, match=r"subject low_dice .*Dice 0\.\d+ .*below min_dice 0\.999.*QC image"):
        register_volume(
            atlas_3mm, mask_path, None, atlas_3mm, **outputs, settings=strict, already_registered=True, threads=1,
            subject="low_dice",
        )
    assert not any(path.exists() for path in outputs.values())
    failed_qc = failed_qc_path(outputs["qc_out"])
    assert failed_qc.name == "registration_qc.failed.png"
    assert failed_qc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A later successful run removes the stale failure image.
    report = register_volume(
        atlas_3mm, mask_path, None, atlas_3mm, **outputs, settings=SETTINGS, already_registered=True, threads=1,
        subject="low_dice",
    )
    assert 0.85 < report["dice"] < 0.999
    assert not failed_qc.exists()
    assert all(path.exists() for path in outputs.values())


def test_register_volume_tiny_brain_fails_cleanly(atlas_3mm, tmp_path):
    # A 2 mm cube of tissue at 0.5 mm: no metric sample on the 3 mm atlas maps into it, so ITK raises.
    data = np.zeros((12, 12, 12), dtype=np.float32)
    data[4:8, 4:8, 4:8] = 1.0 + np.random.default_rng(0).random((4, 4, 4), dtype=np.float32)
    brain = sitk.GetImageFromArray(data)
    brain.SetSpacing((0.5, 0.5, 0.5))
    brain_path = _write(brain, tmp_path / "tiny.nii.gz")
    mask_path = _write(sitk.Cast(sitk.NotEqual(brain, 0.0), sitk.sitkUInt8), tmp_path / "tiny_mask.nii.gz")
    outputs = _outputs(tmp_path / "out")
    message = r"subject tiny .*tiny\.nii\.gz.* failed in SimpleITK: .*All samples map outside moving image buffer.*orientation"
    with pytest.raises(InvalidInputError, match=message):
        register_volume(
            brain_path, mask_path, None, atlas_3mm, **outputs, settings=SETTINGS, already_registered=False, threads=1,
            subject="tiny",
        )
    assert not any(path.exists() for path in outputs.values())
    assert not failed_qc_path(outputs["qc_out"]).exists()


def test_register_volume_interrupt_is_not_bad_input(known_misalignment, atlas_3mm, tmp_path, monkeypatch):
    """Ctrl-C during the optimization surfaces as an interrupt, not as an error blaming the scan."""

    def interrupted(counts):
        raise KeyboardInterrupt

    monkeypatch.setattr(registration, "_increment_last", interrupted)
    outputs = _outputs(tmp_path / "out")
    paths = known_misalignment["paths"]
    with pytest.raises(KeyboardInterrupt, match="registration of subject moved_atlas was interrupted"):
        register_volume(
            paths["brain"], paths["mask"], None, atlas_3mm, **outputs, settings=SETTINGS, already_registered=False,
            threads=1, subject="moved_atlas",
        )
    assert not any(path.exists() for path in outputs.values())


def test_register_volume_already_registered_copies_on_grid(atlas_3mm, tmp_path):
    atlas = read_volume(atlas_3mm)
    mask_path = _write(sitk.Cast(sitk.NotEqual(atlas, 0.0), sitk.sitkUInt8), tmp_path / "mask.nii.gz")
    outputs = _outputs(tmp_path / "out")
    report = register_volume(
        atlas_3mm, mask_path, None, atlas_3mm, **outputs, settings=SETTINGS, already_registered=True, threads=1,
        subject="on_grid",
    )
    assert report["dice"] == 1.0
    assert report["stages"] == []
    assert report["final_metric"] is None
    registered = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs["image_out"])))
    assert np.array_equal(registered, sitk.GetArrayFromImage(atlas))
    transform = sitk.ReadTransform(str(outputs["transform_out"]))
    assert np.allclose(transform.TransformPoint((10.0, -20.0, 30.0)), (10.0, -20.0, 30.0))


def test_register_volume_already_registered_rejects_off_grid(known_misalignment, atlas_3mm, tmp_path):
    paths = known_misalignment["paths"]
    outputs = _outputs(tmp_path / "out")
    message = r"brain\.nii\.gz is declared as registered but is not on the grid .*registered: false"
    with pytest.raises(InvalidInputError, match=message):
        register_volume(
            paths["brain"], paths["mask"], None, atlas_3mm, **outputs, settings=SETTINGS, already_registered=True,
            threads=1, subject="off_grid",
        )
    assert not any(path.exists() for path in outputs.values())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"smoothing_sigmas_mm": (1.0,)}, "equal length"),
        ({"shrink_factors": (), "smoothing_sigmas_mm": ()}, "non-empty"),
        ({"shrink_factors": (2, 0)}, "shrink_factors must all be >= 1"),
        ({"sampling_fraction": 0.0}, r"sampling_fraction must lie in \(0, 1\]"),
        ({"min_dice": 1.5}, r"min_dice must lie in \[0, 1\]"),
        ({"histogram_bins": 4}, "histogram_bins must be >= 8"),
        ({"iterations": 0}, "iterations must be >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_registration_settings_rejects_invalid(changes, message):
    with pytest.raises(ValueError, match=message):
        RegistrationSettings(**{**SETTINGS.__dict__, **changes})


def test_dice_overlap_hand_computed():
    first = sitk.GetImageFromArray(np.array([[[1, 1, 0, 0]]], dtype=np.uint8))
    second = sitk.GetImageFromArray(np.array([[[0, 1, 1, 1]]], dtype=np.uint8))
    assert dice_overlap(first, second) == pytest.approx(2 * 1 / (2 + 3))
    assert dice_overlap(first, first) == 1.0
    assert dice_overlap(first * 0, second * 0) == 0.0


def test_failed_qc_path_inserts_suffix():
    assert failed_qc_path("results/s1/registration_qc.png") == Path("results/s1/registration_qc.failed.png")


def test_write_registration_qc_png_size(atlas_3mm, tmp_path):
    atlas = read_volume(atlas_3mm)
    mask = sitk.Cast(sitk.NotEqual(atlas, 0.0), sitk.sitkUInt8)
    path = tmp_path / "qc.png"
    write_registration_qc(atlas, atlas, mask, path, "atlas: Dice 1.000")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1080, 768)
    assert [item.name for item in tmp_path.iterdir()] == ["qc.png"]
