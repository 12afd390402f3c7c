"""Real brain slices for the method tests: axial slices of the skull-stripped SRI24 T1 from the demo data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sfae.io import read_volume, write_volume
from sfae.preprocessing.intensity import equalize_histogram
from sfae.preprocessing.slices import extract_slices, slice_volume

ATLAS_KEY = "sri24_t1_skullstripped"


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def atlas_slice_arrays(demo_files: dict[str, Path], start: int, stop: int, size: int = 64) -> dict[str, np.ndarray]:
    """Return axial slices ``start`` to ``stop - 1`` of the SRI24 brain, equalized and resized as the workflow does.

    Returns:
        The arrays of :func:`sfae.preprocessing.slices.extract_slices`: ``images`` float32
        ``(n, size, size)`` in [0, 1], ``masks`` and ``labels`` bool, ``slice_index`` int64.
    """
    image = read_volume(demo_files[ATLAS_KEY])
    volume = sitk.GetArrayFromImage(image)
    brain = volume > 0
    equalized = _like(equalize_histogram(volume, brain), image)
    mask = _like(brain.astype(np.uint8), image)
    labels = _like(np.zeros(brain.shape, dtype=np.uint8), image)
    return extract_slices(equalized, mask, labels, start=start, stop=stop, size=size)


def write_atlas_split(demo_files: dict[str, Path], folder: Path, start: int, stop: int, size: int = 64) -> Path:
    """Write slices ``start`` to ``stop - 1`` of the SRI24 brain with the workflow's slicing step; return the split file."""
    image = read_volume(demo_files[ATLAS_KEY])
    mask = _like((sitk.GetArrayViewFromImage(image) > 0).astype(np.uint8), image)
    write_volume(mask, folder / "mask.nii.gz")
    split = folder / "train.npz"
    slice_volume(demo_files[ATLAS_KEY], folder / "mask.nii.gz", None, split, subject="sri24", start=start, stop=stop, size=size)
    return split
