"""Intensity normalization of one registered scan: histogram equalization inside the brain.

Equalization maps every brain voxel to the empirical cumulative distribution
function (CDF) of the scan's brain intensities, so scans from different
scanners, sequences and intensity scales all end up with brain values spread
uniformly over (0, 1]. The mapping is monotone, so it keeps the order of
intensities (the contrast between tissues) and only changes their spacing.
"""

from __future__ import annotations

import logging

import numpy as np

from sfae.io import InvalidInputError

logger = logging.getLogger(__name__)


def equalize_histogram(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Equalize the histogram of one volume inside its brain mask.

    Each brain voxel of value ``v`` becomes the fraction of brain voxels whose
    value is ``<= v`` (the right-continuous empirical CDF). Voxels of equal
    value therefore get the same output, the brightest brain voxels get exactly
    1 and the darkest get ``count / n`` with ``count`` the number of voxels
    sharing the lowest value, so brain values lie in (0, 1]. Voxels outside the
    mask become 0, which keeps the background distinguishable from every brain
    voxel.

    A brain of one constant value has no contrast to equalize: every brain voxel
    then gets 1 (what the definition gives) and a warning is logged, because the
    scan is most likely broken.

    Args:
        volume: Intensities of any real dtype and any shape (3D for a scan).
        mask: Brain mask of the same shape, bool or 0/1 values.

    Returns:
        float32 array of the shape of ``volume``: CDF values in (0, 1] inside
        the mask, 0 outside.

    Raises:
        InvalidInputError: If the shapes differ, the mask is empty, or a brain
            voxel is NaN or infinite.
    """
    volume = np.asarray(volume)
    mask = np.asarray(mask)
    if volume.shape != mask.shape:
        raise InvalidInputError(
            f"volume of shape {volume.shape} and brain mask of shape {mask.shape} differ; "
            "the mask must lie on the volume's voxel grid"
        )
    brain = mask != 0
    if not np.any(brain):
        raise InvalidInputError(
            f"brain mask of the volume of shape {volume.shape} is empty, so there is no brain to equalize; "
            "check the skull stripping output of this scan"
        )
    values = volume[brain]
    if not np.all(np.isfinite(values)):
        count = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise InvalidInputError(f"{count} brain voxels are NaN or infinite; replace them before equalization")

    # 1. Distinct brain values in increasing order, and for every brain voxel
    #    the position of its value among them.
    distinct, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    if distinct.size == 1:
        logger.warning(
            "all %d brain voxels have the value %g; equalization maps them all to 1", values.size, distinct[0]
        )

    # 2. CDF at each distinct value: the number of brain voxels <= that value,
    #    divided in float64 so that the top value maps to exactly 1.
    cdf = np.cumsum(counts, dtype=np.int64) / values.size

    # 3. Scatter the CDF values back into a zero volume.
    equalized = np.zeros(volume.shape, dtype=np.float32)
    equalized[brain] = cdf[inverse.ravel()].astype(np.float32)
    return equalized
