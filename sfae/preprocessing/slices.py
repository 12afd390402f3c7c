"""Axial slices of registered scans, in one display orientation and at one size.

:func:`slice_volume` turns one registered scan (image, brain mask, optional
lesion segmentation, all on the atlas grid) into a slice file. It equalizes the
histogram inside the brain in 3D, then takes the axial slices of a configured
index range, orients them and resizes them (:func:`extract_slices`).

Orientation comes from world coordinates, not from the order of the voxel
array: every slice is shown as seen from the feet (radiological convention),
anterior at the top (row 0) and the patient's left on the right of the image.
In ITK's LPS world coordinates that means that rows run toward posterior (+y)
and columns toward the patient's left (+x). So two files with the same voxels
stored in different array orders, like the SRI24 atlas with and without skull
(direction diag(1, -1, 1) and diag(-1, -1, 1)), give identical slices.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from sfae.io import InvalidInputError, read_volume, require_same_grid, write_arrays
from sfae.preprocessing.intensity import equalize_histogram

logger = logging.getLogger(__name__)

# Largest deviation of a direction cosine from 0 or +-1 that still counts as
# axis-aligned (1e-3 is about 0.06 degrees). Images on the atlas grid are exactly
# axis-aligned, so a larger deviation means that the image was not registered.
AXIS_ALIGNMENT_TOLERANCE = 1e-3

# Binary masks are resized by bilinear interpolation of 0/1 values and kept
# where the interpolated value reaches this threshold (see _resize_binary).
BINARY_THRESHOLD = 0.5

WORLD_AXIS_NAMES = ("left-right (x)", "posterior-anterior (y)", "superior-inferior (z)")


def _display_transform(image: sitk.Image) -> tuple[bool, bool, bool]:
    """Return how to turn an array slice ``(j, i)`` into display orientation.

    Returns:
        ``(transpose, flip_rows, flip_columns)``, applied in this order to
        arrays whose last two axes are the image's index axes ``j`` and ``i``.

    Raises:
        InvalidInputError: If the direction matrix is oblique, or the third
            index axis is not the superior-inferior axis.
    """
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    signs = np.round(direction)

    # 1. The direction must be a permutation matrix with signs: every index
    #    axis (column) runs along exactly one world axis.
    is_signed_permutation = (
        np.all(np.abs(signs).sum(axis=0) == 1)
        and np.all(np.abs(signs).sum(axis=1) == 1)
        and np.max(np.abs(direction - signs)) <= AXIS_ALIGNMENT_TOLERANCE
    )
    if not is_signed_permutation:
        formatted_direction = np.array2string(direction, precision=4, suppress_small=True)
        raise InvalidInputError(
            f"image direction matrix {formatted_direction} is oblique; slicing supports only axis-aligned images "
            "(a permutation of the world axes with signs). Register the scan to the atlas first, "
            "which puts it on the atlas grid"
        )
    index_axis_of_world = np.argmax(np.abs(signs), axis=1)

    # 2. Slices are taken along the third index axis (k), which must therefore
    #    be the superior-inferior world axis.
    if index_axis_of_world[2] != 2:
        world_axis = WORLD_AXIS_NAMES[int(np.argmax(np.abs(signs[:, 2])))]
        raise InvalidInputError(
            f"the third index axis of the image runs along the {world_axis} world axis, "
            "so its slices are not axial; slices are taken along the third index axis, which must be "
            "the superior-inferior axis (as on the atlas grid). Register or reorient the scan first"
        )

    # 3. Rows must run toward posterior (+y) and columns toward the patient's
    #    left (+x). Array slices have index axis j as rows and i as columns.
    row_axis = index_axis_of_world[1]
    column_axis = index_axis_of_world[0]
    transpose = row_axis == 0
    flip_rows = signs[1, row_axis] < 0
    flip_columns = signs[0, column_axis] < 0
    return bool(transpose), bool(flip_rows), bool(flip_columns)


def _orient(stack: np.ndarray, transpose: bool, flip_rows: bool, flip_columns: bool) -> np.ndarray:
    """Apply :func:`_display_transform`'s result to a stack of shape ``(n, j, i)``."""
    if transpose:
        stack = stack.transpose(0, 2, 1)
    if flip_rows:
        stack = stack[:, ::-1, :]
    if flip_columns:
        stack = stack[:, :, ::-1]
    return np.ascontiguousarray(stack)


def _pad_to_square(stack: np.ndarray) -> np.ndarray:
    """Pad a stack ``(n, h, w)`` with zeros, centred, to ``(n, s, s)`` with ``s = max(h, w)``.

    Padding instead of stretching keeps the anatomy's aspect ratio when the
    slices are resized to a square.
    """
    _, height, width = stack.shape
    side = max(height, width)
    if height == width:
        return stack
    top = (side - height) // 2
    left = (side - width) // 2
    return np.pad(stack, ((0, 0), (top, side - height - top), (left, side - width - left)))


def _resize_square(stack: np.ndarray, size: int, *, anti_aliasing: bool) -> np.ndarray:
    """Resize a float stack ``(n, s, s)`` to ``(n, size, size)`` by bilinear interpolation.

    Pixels are treated as areas whose outer edges stay aligned (``grid_mode``),
    and values outside the slice count as 0. When downsampling with
    ``anti_aliasing``, a Gaussian prefilter of standard deviation
    ``(scale - 1) / 2`` input pixels (``scale = s / size``, the default of
    scikit-image's ``resize``) removes frequencies that the coarser grid cannot
    represent. Upsampling uses no prefilter.
    """
    side = stack.shape[-1]
    scale = side / size
    if anti_aliasing and scale > 1:
        sigma = (scale - 1) / 2
        stack = ndimage.gaussian_filter(stack, sigma=(0, sigma, sigma), mode="constant", cval=0.0)
    if side == size:
        return stack.copy()
    zoom = (1.0, size / side, size / side)
    return ndimage.zoom(stack, zoom, order=1, mode="grid-constant", cval=0.0, grid_mode=True, prefilter=False)


def _resize_binary(stack: np.ndarray, size: int) -> np.ndarray:
    """Resize a binary stack ``(n, s, s)`` to a bool stack ``(n, size, size)``.

    The 0/1 values are interpolated bilinearly and thresholded at 0.5. The
    0.5 iso-line of the interpolated mask follows the original boundary to a
    fraction of a pixel, while nearest-neighbour sampling moves it by up to half
    an input pixel depending on where the output grid happens to fall.
    Thresholding makes the output binary again, so masks and labels never take
    fractional values.
    """
    resized = _resize_square(stack.astype(np.float32), size, anti_aliasing=False)
    return resized >= BINARY_THRESHOLD


def _validate_slice_range(start: int, stop: int, size: int, depth: int) -> None:
    """Raise unless ``start..stop-1`` are valid slice indices of ``depth`` slices and ``size`` is positive."""
    for name, value in (("start", start), ("stop", stop), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidInputError(f"preprocessing.slices.{name} must be an integer, got {value!r}")
    if size < 1:
        raise InvalidInputError(f"preprocessing.slices.size must be at least 1 pixel, got {size}")
    if not 0 <= start < stop <= depth:
        raise InvalidInputError(
            f"slice range {start}..{stop - 1} (preprocessing.slices.start={start}, "
            f"preprocessing.slices.stop={stop}) does not fit the volume's {depth} axial slices; "
            f"set 0 <= start < stop <= {depth} in the config"
        )


def extract_slices(
    image: sitk.Image, mask: sitk.Image, labels: sitk.Image, *, start: int, stop: int, size: int
) -> dict[str, np.ndarray]:
    """Take axial slices ``start..stop-1``, orient them and resize them to ``size`` x ``size``.

    Slice ``k`` is index ``k`` along the image's third index axis (axis 0 of
    ``sitk.GetArrayFromImage``), which must be the superior-inferior axis.
    Every slice is oriented by world coordinates: anterior at the top (row 0),
    the patient's left on the right. Non-square slices are first padded with
    zeros, centred, to a square. The image is set to 0 outside the brain mask
    before resizing, so that no skull or background leaks into the brain. It is
    then smoothed against aliasing when downsampling, interpolated bilinearly,
    clipped to [0, 1] and set to 0 outside the resized mask. Masks and labels
    are interpolated bilinearly and thresholded at 0.5, so they stay binary.
    Pixels are taken as square: the atlas grid is isotropic, and anisotropic
    in-plane spacing is resized as if it were not (with a warning).

    Args:
        image: 3D intensities, expected in [0, 1] (histogram-equalized).
        mask: Brain mask on the image's grid, 0/1.
        labels: Lesion segmentation on the image's grid, 0/1 (all 0 when healthy).
        start: First slice index kept.
        stop: Slice index after the last one kept.
        size: Output height and width in pixels.

    Returns:
        ``images``: float32 ``(n, size, size)`` in [0, 1], 0 outside the brain;
        ``masks`` and ``labels``: bool ``(n, size, size)``;
        ``slice_index``: int16 ``(n,)``, the index ``k`` of each slice;
        with ``n = stop - start``.

    Raises:
        InvalidInputError: If the images are not 3D or not on one grid, the
            direction is oblique or not axial, or the slice range does not fit
            the volume.
    """
    # 1. Validate the geometry and the slice range.
    if image.GetDimension() != 3:
        raise InvalidInputError(f"expected a 3D image, got {image.GetDimension()} dimensions")
    require_same_grid(mask, image, "the brain mask", "the image")
    require_same_grid(labels, image, "the lesion segmentation", "the image")
    depth = image.GetSize()[2]
    _validate_slice_range(start, stop, size, depth)
    transpose, flip_rows, flip_columns = _display_transform(image)
    spacing_x, spacing_y = image.GetSpacing()[:2]
    if not np.isclose(spacing_x, spacing_y, rtol=0.01):
        logger.warning(
            "in-plane spacing %.3f x %.3f mm is anisotropic; slices are resized as if pixels were square",
            spacing_x,
            spacing_y,
        )

    # 2. Cut the slab of slices (array order (k, j, i)) and orient it.
    slab = slice(start, stop)
    image_stack = sitk.GetArrayViewFromImage(image)[slab].astype(np.float32)
    mask_stack = sitk.GetArrayViewFromImage(mask)[slab] != 0
    label_stack = sitk.GetArrayViewFromImage(labels)[slab] != 0
    image_stack = np.where(mask_stack, image_stack, np.float32(0))
    stacks = [_orient(stack, transpose, flip_rows, flip_columns) for stack in (image_stack, mask_stack, label_stack)]

    # 3. Pad to square and resize.
    image_stack, mask_stack, label_stack = (_pad_to_square(stack) for stack in stacks)
    images = _resize_square(image_stack, size, anti_aliasing=True)
    masks = _resize_binary(mask_stack, size)
    labels_resized = _resize_binary(label_stack, size)

    # 4. Keep the image in [0, 1] and inside the resized brain mask.
    images = np.clip(images, 0.0, 1.0).astype(np.float32)
    images[~masks] = 0.0
    return {
        "images": images,
        "masks": masks,
        "labels": labels_resized,
        "slice_index": np.arange(start, stop, dtype=np.int16),
    }


def slice_volume(
    image_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str] | None,
    output_path: str | os.PathLike[str],
    *,
    subject: str,
    start: int,
    stop: int,
    size: int,
) -> dict[str, Any]:
    """Write the slice file of one registered scan.

    Reads the scan, its brain mask and its lesion segmentation, checks that all
    three share one voxel grid, equalizes the histogram inside the brain mask
    over the whole volume, then takes, orients and resizes the axial slices
    ``start..stop-1`` (:func:`extract_slices`). The output is an ``.npz`` file
    with ``images``, ``masks``, ``labels`` and ``slice_index`` as returned by
    :func:`extract_slices` and ``subject``, a fixed-width unicode array ``(n,)``
    repeating ``subject``. It is written atomically.

    Args:
        image_path: Registered scan (NIfTI).
        mask_path: Its brain mask (NIfTI, 0/1).
        labels_path: Its lesion segmentation (NIfTI, 0/1), or None for a
            healthy scan, whose labels are then all False.
        output_path: Slice file to write (``.npz``).
        subject: Subject id stored with every slice.
        start: First slice index kept (``preprocessing.slices.start``).
        stop: Slice index after the last one kept (``preprocessing.slices.stop``).
        size: Output height and width in pixels (``preprocessing.slices.size``).

    Returns:
        Summary for the log: subject, output path, slice count, size, the slice
        range, the number of slices with brain and with lesion, and the number
        of lesion pixels.

    Raises:
        InvalidInputError: If a file is missing or invalid, the files do not
            share a grid, the subject id is empty, or the slice range does not
            fit the volume. The message names the file.
    """
    if not isinstance(subject, str) or not subject:
        raise InvalidInputError(f"subject id must be a non-empty string, got {subject!r}")

    # 1. Read the three volumes and check that they share one grid.
    image = read_volume(image_path, "image")
    mask = read_volume(mask_path, "mask")
    require_same_grid(mask, image, mask_path, image_path)
    if labels_path is None:
        labels = sitk.Image(image.GetSize(), sitk.sitkUInt8)
        labels.CopyInformation(image)
    else:
        labels = read_volume(labels_path, "segmentation")
        require_same_grid(labels, image, labels_path, image_path)

    # 2. Equalize the histogram inside the brain, over the whole volume.
    equalized = equalize_histogram(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(mask))
    equalized_image = sitk.GetImageFromArray(equalized)
    equalized_image.CopyInformation(image)

    # 3. Take, orient and resize the slices.
    try:
        arrays = extract_slices(equalized_image, mask, labels, start=start, stop=stop, size=size)
    except InvalidInputError as error:
        raise InvalidInputError(f"cannot slice {image_path}: {error}") from error
    count = arrays["images"].shape[0]
    arrays["subject"] = np.full(count, subject, dtype=f"<U{len(subject)}")

    # 4. Write the slice file and summarize it.
    write_arrays(output_path, **arrays)
    summary = {
        "subject": subject,
        "output": str(output_path),
        "slices": count,
        "size": size,
        "slice_range": [start, stop],
        "slices_with_brain": int(np.count_nonzero(arrays["masks"].any(axis=(1, 2)))),
        "slices_with_lesion": int(np.count_nonzero(arrays["labels"].any(axis=(1, 2)))),
        "lesion_pixels": int(np.count_nonzero(arrays["labels"])),
    }
    logger.info(
        "sliced %s: %d slices of %d x %d (%d with brain, %d with lesion) -> %s",
        subject,
        count,
        size,
        size,
        summary["slices_with_brain"],
        summary["slices_with_lesion"],
        output_path,
    )
    return summary
