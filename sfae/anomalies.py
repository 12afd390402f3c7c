"""Synthetic anomalies for healthy evaluation data: radial sink and source deformations.

A deformation resamples the pixels inside a disk from positions on the same
ray from the disk's centre. The anomaly keeps the intensities of the tissue
around it, so it cannot be found by thresholding. Only its shape is abnormal.
Tan et al., "Detecting Outliers with Foreign Patch Interpolation" (2020),
introduced the two kinds for the MOOD 2020 challenge. The reference code of the
Structural Feature-Autoencoder (Meissen et al. 2022) used sink deformations with
radii of 10 to 20 pixels on 128 x 128 slices as its MOOD test anomalies.

Which slices get an anomaly, and its centre and radius, depend only on the data
set seed and the slice's identity (subject id and slice index). They do not
depend on the order of the slices, the number of workers or which other slices
exist, so every method and every training seed is evaluated on the same anomalies.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from sfae.io import InvalidInputError, read_arrays, write_arrays
from sfae.splits import SLICE_KEYS

logger = logging.getLogger(__name__)

ANOMALY_KEYS = ("anomalous", "anomaly_center", "anomaly_radius")
KINDS = ("sink", "source")


def _sink_factor(distance: np.ndarray) -> np.ndarray:
    """Return ``f(d) = 2 - d**2``, the sink's source position factor (see :func:`sink_deformation`)."""
    return 2.0 - distance**2


def _source_factor(distance: np.ndarray) -> np.ndarray:
    """Return ``f(d) = d**2``, the source's source position factor (see :func:`source_deformation`)."""
    return distance**2


def disk_mask(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    """Return the bool mask of the pixels whose centre lies strictly closer than ``radius`` to ``center``.

    Args:
        shape: ``(height, width)`` of the slice.
        center: ``(row, column)`` in pixels; may be fractional.
        radius: In pixels.
    """
    rows = np.arange(shape[0], dtype=np.float64)[:, None] - center[0]
    columns = np.arange(shape[1], dtype=np.float64)[None, :] - center[1]
    return rows**2 + columns**2 < radius**2


def _validate_deformation_input(
    image: np.ndarray, brain_mask: np.ndarray, center: tuple[float, float], radius: float
) -> None:
    """Raise unless the arguments of a deformation describe one slice, its mask and a disk."""
    if image.ndim != 2 or not np.issubdtype(image.dtype, np.floating):
        raise InvalidInputError(
            f"expected one float 2D slice, got an array of shape {image.shape} and dtype {image.dtype}"
        )
    if brain_mask.shape != image.shape:
        raise InvalidInputError(
            f"brain mask of shape {brain_mask.shape} does not match the slice's shape {image.shape}"
        )
    if len(center) != 2 or not all(math.isfinite(value) for value in center):
        raise InvalidInputError(f"center must be a finite (row, column) pair in pixels, got {center!r}")
    if not (math.isfinite(radius) and radius > 0):
        raise InvalidInputError(f"radius must be a positive number of pixels, got {radius!r}")


def _radial_deformation(
    image: np.ndarray,
    center: tuple[float, float],
    radius: float,
    brain_mask: np.ndarray,
    factor: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Resample the brain pixels of a disk from ``center + (p - center) * factor(d)``.

    Returns:
        The deformed float32 slice and the bool label (disk and brain mask).
    """
    image = np.asarray(image)
    brain_mask = np.asarray(brain_mask, dtype=bool)
    center = (float(center[0]), float(center[1]))
    radius = float(radius)
    _validate_deformation_input(image, brain_mask, center, radius)
    height, width = image.shape

    # 1. Bounding box of the disk, clipped to the slice; only its pixels can change.
    top = max(math.floor(center[0] - radius), 0)
    bottom = min(math.ceil(center[0] + radius) + 1, height)
    left = max(math.floor(center[1] - radius), 0)
    right = min(math.ceil(center[1] + radius) + 1, width)
    deformed = image.astype(np.float32, copy=True)
    label = np.zeros(image.shape, dtype=bool)
    if top >= bottom or left >= right:
        return deformed, label

    # 2. The label: brain pixels of the box that lie inside the disk.
    row_offsets = np.arange(top, bottom, dtype=np.float64)[:, None] - center[0]
    column_offsets = np.arange(left, right, dtype=np.float64)[None, :] - center[1]
    squared_distance = row_offsets**2 + column_offsets**2
    inside = (squared_distance < radius**2) & brain_mask[top:bottom, left:right]
    label[top:bottom, left:right] = inside

    # 3. Source position of every labelled pixel on its ray from the centre,
    #    sampled bilinearly; positions outside the slice take the nearest edge
    #    pixel. The whole slice is the input because a sink reaches beyond the disk.
    scale = factor(np.sqrt(squared_distance[inside]) / radius)
    source_rows = center[0] + np.broadcast_to(row_offsets, inside.shape)[inside] * scale
    source_columns = center[1] + np.broadcast_to(column_offsets, inside.shape)[inside] * scale
    values = ndimage.map_coordinates(
        image.astype(np.float32, copy=False), [source_rows, source_columns], order=1, mode="nearest"
    )
    window = deformed[top:bottom, left:right]
    window[inside] = values
    return deformed, label


def sink_deformation(
    image: np.ndarray, center: tuple[float, float], radius: float, *, brain_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a sink deformation: the tissue of a disk appears drawn into its centre.

    Each brain pixel ``p`` inside the disk takes the bilinearly interpolated
    value at ``c + (p - c) * f(d)`` with ``d = |p - c| / radius`` and
    ``f(d) = 2 - d**2``, so the source lies ``(p - c) * (1 - d**2)`` beyond
    the pixel. This ``f`` is the "pull inward" deformation of Tan et al.'s
    public MOOD example (jemtan/FPI,
    synthetic/example_synthesizing_outliers_mood.ipynb), which the Structural
    Feature-Autoencoder's reference code (FeliMe/feature-autoencoder,
    fae/data/artificial_anomalies.py) uses as its sink deformation. Using the
    same ``f`` keeps the test anomalies those of the published results. That
    code rounded source positions to whole pixels; bilinear sampling here
    avoids the blocky steps that rounding leaves. Properties of this ``f``:

    - sources lie farther from the centre than their pixels, so image content
      flows toward the centre. The middle of the disk shows a shrunk copy of a
      wider area (twice as wide near the centre). The centre pixel keeps its
      own value;
    - the source distance ``g(d) = d * f(d) = d * (2 - d**2)`` is 1 at the rim,
      so the deformation is continuous there and pixels near the rim barely change;
    - ``g`` peaks at ``d = sqrt(2/3)`` with ``g = 1.089``, so sources reach up to
      8.9 % of the radius beyond the disk, and the outer ring ``d > 0.816``
      shows a mirrored copy of the tissue just inside and outside the rim.

    Only brain pixels inside the disk change; the label is exactly those pixels.

    Args:
        image: float slice ``(height, width)``, 0 outside the brain.
        center: ``(row, column)`` of the disk's centre in pixels.
        radius: Disk radius in pixels; pixels closer than ``radius`` are inside.
        brain_mask: bool ``(height, width)``; pixels outside it never change.

    Returns:
        ``(deformed, label)``: float32 ``(height, width)`` and bool ``(height, width)``.

    Raises:
        InvalidInputError: If the image is not a float 2D slice, the mask's shape
            differs, or the centre or radius is invalid.
    """
    return _radial_deformation(image, center, radius, brain_mask, _sink_factor)


def source_deformation(
    image: np.ndarray, center: tuple[float, float], radius: float, *, brain_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a source deformation: the tissue of a disk appears pushed out from its centre.

    Each brain pixel ``p`` inside the disk takes the bilinearly interpolated
    value at ``c + (p - c) * f(d)`` with ``d = |p - c| / radius`` and
    ``f(d) = d**2``. This is the "push outward" deformation of Tan et al.'s
    public MOOD example, which the Structural Feature-Autoencoder's reference
    code uses as its source deformation (both cited in :func:`sink_deformation`).
    The source distance ``g(d) = d**3`` grows monotonically from 0 at the
    centre to 1 at the rim, so the centre region looks magnified, every value
    comes from inside the disk and the deformation is continuous at the rim.

    Args and returns as :func:`sink_deformation`.

    Raises:
        InvalidInputError: As :func:`sink_deformation`.
    """
    return _radial_deformation(image, center, radius, brain_mask, _source_factor)


DEFORMATIONS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "sink": sink_deformation,
    "source": source_deformation,
}


def subject_key(subject: str) -> int:
    """Return a 64-bit integer derived from the SHA-256 of the subject id.

    Python's ``hash()`` of a string changes between processes, so it must
    never seed anything.
    """
    return int.from_bytes(hashlib.sha256(subject.encode("utf-8")).digest()[:8], "big")


def _validate_slice_arrays(arrays: Mapping[str, np.ndarray]) -> int:
    """Raise unless ``arrays`` follows the slice-file contract, and return the slice count."""
    missing = [key for key in SLICE_KEYS if key not in arrays]
    if missing:
        raise InvalidInputError(f"slice arrays lack the keys {missing}; expected {list(SLICE_KEYS)}")
    present = [key for key in ANOMALY_KEYS if key in arrays]
    if present:
        raise InvalidInputError(
            f"slice arrays already contain synthetic anomalies (keys {present}); add anomalies to the slice file "
            "written by slicing, not to an anomaly file"
        )

    images = arrays["images"]
    if images.ndim != 3 or not np.issubdtype(images.dtype, np.floating):
        raise InvalidInputError(
            f"images must be a float array (n, height, width), got shape {images.shape} and dtype {images.dtype}"
        )
    count = images.shape[0]
    for key in ("masks", "labels"):
        if arrays[key].shape != images.shape or arrays[key].dtype != bool:
            raise InvalidInputError(
                f"{key} must be a bool array of the images' shape {images.shape}, got shape {arrays[key].shape} "
                f"and dtype {arrays[key].dtype}"
            )
    for key in ("slice_index", "subject"):
        if arrays[key].shape != (count,):
            raise InvalidInputError(f"{key} must have shape ({count},), got {arrays[key].shape}")
    if not np.issubdtype(arrays["slice_index"].dtype, np.integer) or np.any(arrays["slice_index"] < 0):
        raise InvalidInputError("slice_index must hold non-negative integers")
    if arrays["subject"].dtype.kind != "U":
        raise InvalidInputError(f"subject must be a unicode string array, got dtype {arrays['subject'].dtype}")

    identities = set(zip(arrays["subject"].tolist(), arrays["slice_index"].tolist()))
    if len(identities) != count:
        raise InvalidInputError(
            f"{count - len(identities)} slices repeat a (subject, slice_index) pair; every slice must be "
            "unique, because the pair seeds its anomaly"
        )
    return count


def _validate_anomaly_settings(kind: str, fraction: float, radius_px: tuple[float, float], seed: int) -> None:
    """Raise unless the anomaly settings are usable; the message names the config key."""
    if kind not in KINDS:
        raise InvalidInputError(f"anomalies.kind must be one of {list(KINDS)}, got {kind!r}")
    if not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
        raise InvalidInputError(f"anomalies.fraction must be a number in [0, 1], got {fraction!r}")
    if (
        len(radius_px) != 2
        or not all(isinstance(value, (int, float)) and math.isfinite(value) and value > 0 for value in radius_px)
        or radius_px[0] > radius_px[1]
    ):
        raise InvalidInputError(
            f"anomalies.radius_px must be [low, high] with 0 < low <= high pixels, got {radius_px!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInputError(f"the data set seed must be a non-negative integer, got {seed!r}")


def _draw_slice_parameters(
    subjects: np.ndarray, slice_index: np.ndarray, seed: int, radius_px: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw each slice's selection priority, radius and centre position from its own generator.

    The generator of a slice is seeded by ``SeedSequence([seed, subject_key,
    slice_index])``, so the three numbers depend on nothing but the seed and
    the slice's identity.

    Returns:
        float64 arrays ``(n,)``: priority in [0, 1), radius in ``radius_px``,
        and a uniform number in [0, 1) that picks the centre among the brain pixels.
    """
    draws = np.empty((len(subjects), 3), dtype=np.float64)
    for position, (subject, index) in enumerate(zip(subjects.tolist(), slice_index.tolist())):
        generator = np.random.default_rng(np.random.SeedSequence([seed, subject_key(subject), index]))
        draws[position] = generator.random(3)
    low, high = radius_px
    return draws[:, 0], low + (high - low) * draws[:, 1], draws[:, 2]


def add_anomalies(
    arrays: Mapping[str, np.ndarray], *, kind: str, fraction: float, radius_px: tuple[float, float], seed: int
) -> dict[str, np.ndarray]:
    """Give one synthetic deformation to a fixed fraction of the slices.

    Exactly ``round(fraction * n)`` slices (halves round up) get one anomaly.
    Each slice draws a priority from its own generator (see
    :func:`_draw_slice_parameters`); the slices sorted by priority form a
    seeded permutation, and the first ones in it that contain brain get the
    anomalies. Its radius is uniform in ``radius_px`` (continuous, where the
    reference code drew whole pixels) and its centre uniform among the slice's
    brain pixels. Because every draw comes from the slice's
    own generator, a slice gets the same anomaly however the slices are
    ordered or split across workers. Existing labels are kept: the output
    label is the input label or the anomaly's label.

    Args:
        arrays: A slice file's arrays (``images``, ``masks``, ``labels``,
            ``slice_index``, ``subject``), not changed.
        kind: ``"sink"`` or ``"source"`` (:func:`sink_deformation`,
            :func:`source_deformation`).
        fraction: Fraction of the slices that get an anomaly, in [0, 1].
        radius_px: ``(low, high)`` radius range in pixels.
        seed: Data set seed.

    Returns:
        New arrays: the five slice keys (``images`` and ``labels`` changed) and
        ``anomalous`` bool ``(n,)``, ``anomaly_center`` float32 ``(n, 2)``
        (row, column in pixels) and ``anomaly_radius`` float32 ``(n,)`` in
        pixels, NaN where a slice has no anomaly.

    Raises:
        InvalidInputError: If the arrays break the slice-file contract, a
            setting is invalid, or fewer slices contain brain than anomalies
            are requested.
    """
    # 1. Validate, then draw every slice's parameters from its identity.
    count = _validate_slice_arrays(arrays)
    _validate_anomaly_settings(kind, fraction, radius_px, seed)
    subjects = arrays["subject"]
    slice_index = arrays["slice_index"]
    masks = arrays["masks"]
    priority, radii, centre_draws = _draw_slice_parameters(subjects, slice_index, seed, radius_px)
    # Deform with the float32 radius that is stored, so that the stored centre
    # and radius reproduce the label exactly (disk_mask and the brain mask).
    radii = radii.astype(np.float32)

    # 2. Pick the anomalous slices: by priority (identity breaks ties), skipping
    #    slices without brain, which cannot hold an anomaly.
    requested = math.floor(fraction * count + 0.5)
    has_brain = masks.reshape(count, -1).any(axis=1)
    if requested > np.count_nonzero(has_brain):
        raise InvalidInputError(
            f"{requested} anomalous slices requested (fraction {fraction} of {count} slices) but only "
            f"{np.count_nonzero(has_brain)} slices contain brain; lower anomalies.fraction or widen the slice range"
        )
    order = np.lexsort((slice_index, subjects, priority))
    selected = np.sort(order[has_brain[order]][:requested])

    # 3. Deform the selected slices.
    images = arrays["images"].astype(np.float32, copy=True)
    labels = arrays["labels"].copy()
    anomalous = np.zeros(count, dtype=bool)
    centers = np.full((count, 2), np.nan, dtype=np.float32)
    radius_out = np.full(count, np.nan, dtype=np.float32)
    deform = DEFORMATIONS[kind]
    width = masks.shape[2]
    for position in tqdm(selected, desc=f"{kind} deformations", unit="slice"):
        brain_pixels = np.flatnonzero(masks[position])
        pick = min(int(centre_draws[position] * brain_pixels.size), brain_pixels.size - 1)
        center = divmod(int(brain_pixels[pick]), width)
        images[position], label = deform(images[position], center, radii[position], brain_mask=masks[position])
        labels[position] |= label
        anomalous[position] = True
        centers[position] = center
        radius_out[position] = radii[position]

    return {
        "images": images,
        "masks": masks.copy(),
        "labels": labels,
        "slice_index": slice_index.copy(),
        "subject": subjects.copy(),
        "anomalous": anomalous,
        "anomaly_center": centers,
        "anomaly_radius": radius_out,
    }


def add_anomalies_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    kind: str,
    fraction: float,
    radius_px: tuple[float, float],
    seed: int,
) -> dict[str, Any]:
    """Read a slice file, add synthetic anomalies (:func:`add_anomalies`) and write the anomaly file atomically.

    Returns:
        Summary for the log: paths, settings, ``slices``, ``anomalous_slices``,
        ``mean_radius_px`` and ``mean_labelled_pixels`` (brain pixels inside
        each anomaly's disk, averaged over the anomalous slices). Both means
        are None when no slice is anomalous.

    Raises:
        InvalidInputError: If the input file is missing or unreadable, or as
            :func:`add_anomalies`. The output is then not written.
    """
    arrays = read_arrays(input_path)
    try:
        result = add_anomalies(arrays, kind=kind, fraction=fraction, radius_px=radius_px, seed=seed)
    except InvalidInputError as error:
        raise InvalidInputError(f"cannot add anomalies to {input_path}: {error}") from error
    write_arrays(output_path, **result)

    anomalous = np.flatnonzero(result["anomalous"])
    shape = result["masks"].shape[1:]
    labelled = [
        np.count_nonzero(
            disk_mask(shape, tuple(result["anomaly_center"][i]), float(result["anomaly_radius"][i]))
            & result["masks"][i]
        )
        for i in anomalous
    ]
    summary = {
        "input": str(input_path),
        "output": str(output_path),
        "kind": kind,
        "fraction": fraction,
        "radius_px": list(radius_px),
        "seed": seed,
        "slices": int(result["anomalous"].size),
        "anomalous_slices": int(anomalous.size),
        "mean_radius_px": float(np.mean(result["anomaly_radius"][anomalous])) if anomalous.size else None,
        "mean_labelled_pixels": float(np.mean(labelled)) if anomalous.size else None,
    }
    logger.info(
        "added %d %s deformations to %d slices of %s -> %s",
        summary["anomalous_slices"],
        kind,
        summary["slices"],
        input_path,
        output_path,
    )
    return summary
