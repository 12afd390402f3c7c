"""Poisson image interpolation (PII) of Tan et al. 2021 as a benchmark method.

PII trains like :class:`~sfae.models.fpi.FPIMethod` with the same patches,
labels, network, loss and image score. Only the blending differs: the patch
is the solution of a discrete Poisson equation whose guidance mixes the
gradients of both slices and whose boundary values come from the slice itself
(:func:`~sfae.models.patch_interpolation.poisson_image_interpolation`), so
the patch has no visible seam. Blended patches are clipped to [0, 1], the
intensity range of the slices, as Tan's code (jemtan/PII, poissonBlend.py)
clips to the slice's minimum and maximum.
"""

from __future__ import annotations

from torch import Tensor

from sfae.models.base import register
from sfae.models.fpi import FPIMethod
from sfae.models.patch_interpolation import poisson_image_interpolation

# Intensity range of the slices (histogram-equalized to [0, 1]).
INTENSITY_RANGE = (0.0, 1.0)


@register
class PIIMethod(FPIMethod):
    """PII: a segmentation network trained to find foreign patches blended in the gradient domain.

    Settings as :class:`~sfae.models.fpi.FPIMethod` (config ``methods.pii``).
    The Poisson solve runs on the CPU, one sparse solve per slice.
    """

    name = "pii"

    def blend(self, images: Tensor, foreign: Tensor, top_left: Tensor, size: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(blended, label)`` of Poisson image interpolation, clipped to the intensity range."""
        return poisson_image_interpolation(images, foreign, top_left, size, alpha, clip_range=INTENSITY_RANGE)
