"""Foreign patch interpolation (FPI) of Tan et al. 2020 as a benchmark method.

Every training step blends a random patch of each slice with the same patch of
the next slice in the batch (the batch rolled by one) and trains
:class:`~sfae.models.patch_interpolation.PatchInterpolationNet` to predict the
interpolation factor per pixel: a sigmoid output with binary cross-entropy
against the soft label, as in Tan et al. and the SFAE authors' reference code
(FeliMe/feature-autoencoder, fae/baselines/fpi/trainer.py). The loss is
computed from logits (``binary_cross_entropy_with_logits``), which is the same
function and stable for saturated outputs. At test time the predicted
interpolation factor is the anomaly map.

The image score is the mean of the map over the brain mask by default,
because the reference code scored FPI and PII slices by the mean of the map
over the pixels with a non-zero input. Setting ``image_score`` to
``top_fraction`` leaves scoring to the evaluation (mean of the top 10 % brain
pixels), as for the other methods. Patches, labels and the network are
described in :mod:`sfae.models.patch_interpolation`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sfae.io import InvalidInputError
from sfae.models.base import AnomalyMethod, Prediction, register
from sfae.models.patch_interpolation import PatchInterpolationNet, PatchInterpolationSettings, foreign_patch_interpolation, sample_patches

logger = logging.getLogger(__name__)


@register
class FPIMethod(AnomalyMethod):
    """FPI: a segmentation network trained to find foreign patches blended linearly into healthy slices.

    Settings (config ``methods.fpi``, all optional): ``patch_size_fraction``
    ``[low, high]`` (patch side as fractions of the slice side, default
    ``[0.1, 0.4]``), ``alpha_range`` ``[low, high]`` (default ``[0.05, 0.95]``),
    ``width`` (network channels at full resolution, default 8), ``depth``
    (network downsamplings, default 4) and ``image_score`` (``brain_mean`` or
    ``top_fraction``).

    Attributes:
        config: The validated settings.
        network: The :class:`PatchInterpolationNet`.
    """

    name = "fpi"

    def __init__(self, settings: Mapping[str, Any], *, seed: int, image_size: int) -> None:
        super().__init__(settings, seed=seed, image_size=image_size)
        self.config = PatchInterpolationSettings.from_config(settings, image_size)
        self.network = PatchInterpolationNet(width=self.config.width, depth=self.config.depth)

    def blend(self, images: Tensor, foreign: Tensor, top_left: Tensor, size: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(blended, label)`` for one patch per slice; subclasses change the blending."""
        return foreign_patch_interpolation(images, foreign, top_left, size, alpha)

    def synthesize(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Blend a random patch of the next slice of the batch into every slice.

        Patches and factors come from torch's global CPU generator (see
        :func:`~sfae.models.patch_interpolation.sample_patches`), so a resumed
        training run draws the same ones.

        Args:
            images: float32 ``(batch, 1, image_size, image_size)`` in [0, 1].

        Returns:
            ``(blended, label)``, float32 ``(batch, 1, image_size, image_size)`` each, on the
            device of ``images``.

        Raises:
            InvalidInputError: If the slices do not have the size the method was built for.
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, self.image_size, self.image_size):
            raise InvalidInputError(f"invalid slices of shape {tuple(images.shape)}: {self.name} expects (batch, 1, {self.image_size}, {self.image_size})")
        top_left, size, alpha = sample_patches(
            images.shape[0], self.image_size, size_fraction=self.config.patch_size_fraction, alpha_range=self.config.alpha_range
        )
        foreign = images.roll(1, dims=0)
        return self.blend(images, foreign, top_left.to(images.device), size.to(images.device), alpha.to(images.device))

    def loss(self, images: Tensor, masks: Tensor) -> Tensor:
        """Return the mean binary cross-entropy between the predicted and the true interpolation factors."""
        with torch.no_grad():
            blended, label = self.synthesize(images)
        return F.binary_cross_entropy_with_logits(self.network(blended), label)

    def predict(self, images: Tensor, masks: Tensor, slice_index: Tensor | None = None) -> Prediction:
        """Return the predicted interpolation factor per pixel and, by default, its mean over the brain per slice.

        A slice with an empty brain mask scores 0. The evaluation leaves such
        slices out of the image-level metrics.
        """
        with torch.no_grad():
            maps = torch.sigmoid(self.network(images)).float()
        if self.config.image_score == "top_fraction":
            return Prediction(maps=maps)
        brain = masks.to(maps.dtype)
        brain_pixels = brain.sum(dim=(1, 2, 3))
        scores = (maps * brain).sum(dim=(1, 2, 3)) / brain_pixels.clamp(min=1)
        return Prediction(maps=maps, scores=scores)
