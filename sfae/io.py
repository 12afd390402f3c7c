"""Reading, validating and atomically writing volumes and array files.

All NIfTI reading goes through :func:`read_volume`. It decodes the whole file
with nibabel, so a truncated gzip stream raises (SimpleITK 2.5 returns a partly
zero volume instead), and converts it to a SimpleITK image in LPS world
coordinates. Every writer in the package goes through
:func:`atomic_output`, so an output file is either complete or absent.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk

logger = logging.getLogger(__name__)

VolumeKind = Literal["image", "mask", "segmentation"]

# nibabel's affines map voxel indices to RAS+ millimetres, ITK's geometry is
# LPS+: the first two world axes change sign between the two conventions.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

# Largest distance from 0 or 1 that a mask value stored as float may have.
BINARY_TOLERANCE = 1e-3

# A volume smaller than this along any axis cannot be a brain MRI scan.
MIN_VOXELS_PER_AXIS = 8


class InvalidInputError(ValueError):
    """Raised when an input file or value cannot be used; the message names it and the fix."""


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and move it onto ``path`` on success.

    The temporary file keeps the suffixes of ``path`` (``.nii.gz``, ``.tfm``,
    ``.npz``) because SimpleITK, NumPy and matplotlib choose the format from
    them. If the block raises, the temporary file is removed and ``path`` is
    left as it was, so a killed or failed job never leaves a partial output.

    Args:
        path: Final output path. Its parent folder is created when missing.

    Yields:
        The temporary path to write to.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    # A job killed with SIGKILL cannot remove its temporary file; the next
    # attempt at the same output removes it. Snakemake never runs two jobs for
    # one output at a time, so no other writer can own such a file.
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.partial{glob.escape(suffix)}"):
        stale.unlink(missing_ok=True)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".partial{suffix}", dir=final.parent)
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        yield temporary
        # mkstemp creates the file readable by its owner only; give the output
        # the permissions of any other new file.
        if temporary.exists():
            os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


def _current_umask() -> int:
    """Return the process umask (reading it requires setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(data: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_arrays(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    """Write named arrays to an uncompressed ``.npz`` file, atomically.

    Uncompressed so that loading a split of tens of thousands of slices costs one
    read and no decompression. Object arrays are rejected because loading them
    would need ``allow_pickle``.

    Raises:
        TypeError: If an array has dtype ``object``.
    """
    for name, array in arrays.items():
        if np.asarray(array).dtype == object:
            raise TypeError(f"array {name!r} has dtype object; store strings as a fixed-width unicode array")
    with atomic_output(path) as temporary:
        with open(temporary, "wb") as stream:
            np.savez(stream, **arrays)


def read_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` file written by :func:`write_arrays`.

    Raises:
        InvalidInputError: If the file is missing or not a readable ``.npz`` archive.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"array file not found: {path}; rerun the workflow rule that writes it")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"cannot read array file {path}: {error}; delete it and rerun the workflow") from error


def _load_nifti_array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode a NIfTI file completely and return its 3D array and RAS affine.

    Raises:
        InvalidInputError: If the file is missing, corrupt, truncated or not 3D.
    """
    if not path.is_file():
        raise InvalidInputError(f"NIfTI file not found: {path}; check the data set's path in the config")
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, ValueError, zlib.error) as error:
        reason = " ".join(str(error).split())
        raise InvalidInputError(
            f"cannot read NIfTI file {path}: {reason}; the file is corrupt or truncated, so download or export it again"
        ) from error

    # A trailing singleton axis (shape (x, y, z, 1)) is common in atlases and
    # carries no information; any other 4D volume is a time series.
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InvalidInputError(
            f"NIfTI file {path} has shape {data.shape}, expected a 3D volume; "
            "extract one 3D volume (for example one time point) before running sfae"
        )
    if min(data.shape) < MIN_VOXELS_PER_AXIS:
        raise InvalidInputError(
            f"NIfTI file {path} has shape {data.shape}, too small for a brain volume "
            f"(fewer than {MIN_VOXELS_PER_AXIS} voxels along an axis); check that it is a 3D scan and not a single slice"
        )
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise InvalidInputError(f"NIfTI file {path} has data type {data.dtype}, expected real numbers")
    return data, image.affine


def array_to_image(data: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """Build a SimpleITK image from a NumPy volume and a nibabel (RAS) affine.

    Args:
        data: Volume of shape ``(i, j, k)`` in nibabel's index order.
        affine_ras: 4x4 voxel-to-RAS affine in millimetres.

    Returns:
        Image with the same voxels whose spacing, direction and origin express
        the affine in ITK's LPS convention. A sheared affine is replaced by the
        nearest rotation (ITK cannot store shear), with a warning.
    """
    linear = RAS_TO_LPS @ affine_ras[:3, :3]
    origin = RAS_TO_LPS @ affine_ras[:3, 3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    u, _, vt = np.linalg.svd(direction)
    rotation = u @ vt
    if not np.allclose(rotation, direction, atol=1e-4):
        logger.warning("affine has shear; using the nearest rotation for the image direction")
        direction = rotation
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in direction.ravel()])
    return image


def read_volume(path: str | os.PathLike[str], kind: VolumeKind = "image") -> sitk.Image:
    """Read and validate one 3D NIfTI volume.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        kind: ``"image"`` returns float32 intensities and rejects NaN, infinite
            and all-zero volumes. ``"mask"`` and ``"segmentation"`` return a
            uint8 image of 0 and 1 and reject values other than 0 and 1;
            a segmentation may be empty (a slice range without lesion), a mask
            may not. Multi-class tumour labels must be merged first with
            :func:`binarize_labels`.

    Returns:
        SimpleITK image in LPS world coordinates, in millimetres.

    Raises:
        InvalidInputError: If the file is missing, corrupt, truncated, not 3D,
            or its values do not fit ``kind``. The message names the file.
    """
    path = Path(path)
    data, affine = _load_nifti_array(path)

    if kind == "image":
        values = data.astype(np.float32)
        if not np.all(np.isfinite(values)):
            count = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            raise InvalidInputError(
                f"NIfTI file {path} contains {count} NaN or infinite voxels; "
                "replace them (for example with 0) or export the scan again"
            )
        if not np.any(values):
            raise InvalidInputError(f"NIfTI file {path} is all zeros, so it contains no image; remove it from the data set")
        return array_to_image(values, affine)

    # Masks stored as scaled floats read back as 0.99999994 and the like, so
    # values within BINARY_TOLERANCE of 0 or 1 count as binary.
    unique = np.unique(data)
    rounded = np.round(unique) if np.issubdtype(unique.dtype, np.floating) else unique
    if not np.all(np.isin(rounded, (0, 1))) or np.max(np.abs(unique - rounded), initial=0) > BINARY_TOLERANCE:
        shown = ", ".join(f"{value:g}" for value in unique[:8])
        raise InvalidInputError(
            f"{kind} {path} is not binary (values {shown}{', ...' if unique.size > 8 else ''}); "
            "expected only 0 and 1. Resampling with linear interpolation makes labels non-binary: "
            "resample segmentations with nearest-neighbour interpolation"
        )
    binary = np.round(data).astype(np.uint8) if np.issubdtype(data.dtype, np.floating) else data.astype(np.uint8)
    if kind == "mask" and not np.any(binary):
        raise InvalidInputError(f"brain mask {path} is empty; check the skull stripping output for this scan")
    return array_to_image(binary, affine)


def binarize_labels(path: str | os.PathLike[str]) -> sitk.Image:
    """Read an integer label map (for example BraTS tumour classes) and merge every label > 0 into 1.

    Raises:
        InvalidInputError: If the file cannot be read, or contains negative or
            fractional labels (a sign of linear resampling).
    """
    path = Path(path)
    data, affine = _load_nifti_array(path)
    if not np.all(np.isfinite(data)) or np.any(data < 0) or np.any(np.round(data) != data):
        raise InvalidInputError(
            f"segmentation {path} holds negative, fractional or NaN labels; expected non-negative integer labels "
            "(resample segmentations with nearest-neighbour interpolation)"
        )
    return array_to_image((data > 0).astype(np.uint8), affine)


def write_volume(image: sitk.Image, path: str | os.PathLike[str]) -> None:
    """Write a SimpleITK image to ``path`` (format from its suffix), atomically."""
    with atomic_output(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=str(path).endswith(".gz"))


def same_grid(first: sitk.Image, second: sitk.Image, tolerance_mm: float = 1e-3) -> bool:
    """Return whether two images share size, spacing, origin and direction."""
    return (
        first.GetSize() == second.GetSize()
        and np.allclose(first.GetSpacing(), second.GetSpacing(), atol=tolerance_mm)
        and np.allclose(first.GetOrigin(), second.GetOrigin(), atol=tolerance_mm)
        and np.allclose(first.GetDirection(), second.GetDirection(), atol=1e-4)
    )


def require_same_grid(image: sitk.Image, reference: sitk.Image, image_path: Path | str, reference_path: Path | str) -> None:
    """Raise unless ``image`` lies on the voxel grid of ``reference``.

    Raises:
        InvalidInputError: Naming both files, their sizes and spacings.
    """
    if not same_grid(image, reference, tolerance_mm=1e-2):
        raise InvalidInputError(
            f"{image_path} (size {image.GetSize()}, spacing {tuple(round(s, 3) for s in image.GetSpacing())}) "
            f"is not on the grid of {reference_path} (size {reference.GetSize()}, "
            f"spacing {tuple(round(s, 3) for s in reference.GetSpacing())}); "
            "a segmentation must share its scan's voxel grid"
        )
