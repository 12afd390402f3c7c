"""AE MSE: a convolutional autoencoder trained with the mean squared error, scored by the squared residual.

The network is :class:`~sfae.models.conv_autoencoder.ConvAutoencoder` with
instance normalization, as the AE baseline of the SFAE reference code
(FeliMe/feature-autoencoder, fae/baselines/ae/model.py with ``--loss_fn
mse``). The loss is the mean of ``(x - x_hat)^2`` over every pixel of the
batch, background included, as in that code. The anomaly map is the squared
residual ``(x - x_hat)^2`` per pixel. The method returns no image score, so the
evaluation scores each slice from its map (the mean of its top 10 % brain
pixels) as for every method without its own score.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sfae.models.base import AnomalyMethod, Prediction, register
from sfae.models.conv_autoencoder import ConvAutoencoder, describe_architecture, read_architecture

logger = logging.getLogger(__name__)


@register
class AEMSEMethod(AnomalyMethod):
    """Autoencoder with an L2 reconstruction loss and the squared residual as anomaly map.

    Settings (config ``methods.ae_mse``): ``channels``, ``latent_dim`` and
    ``normalization`` of the network (see :func:`~sfae.models.conv_autoencoder.read_architecture`).
    """

    name = "ae_mse"

    def __init__(self, settings: Mapping[str, Any], *, seed: int, image_size: int) -> None:
        """Build the autoencoder, drawing its weights from torch's global random number generator.

        Raises:
            InvalidInputError: If a setting is invalid or ``image_size`` does not fit the network.
        """
        super().__init__(settings, seed=seed, image_size=image_size)
        self.architecture = read_architecture(settings, image_size, default_normalization="instance")
        self.network = ConvAutoencoder(**self.architecture)

    def loss(self, images: Tensor, masks: Tensor) -> Tensor:
        """Return the mean squared error between the slices and their reconstruction over all pixels."""
        return F.mse_loss(self.network(images), images)

    def predict(self, images: Tensor, masks: Tensor, slice_index: Tensor | None = None) -> Prediction:
        """Return the squared residual ``(x - x_hat)^2``, float32 ``(batch, 1, height, width)``, and no image scores."""
        with torch.no_grad():
            reconstruction = self.network(images)
            maps = (images - reconstruction).square()
        return Prediction(maps=maps.float())

    def describe(self) -> dict[str, Any]:
        """Return the method, its settings and every value in effect, defaults included."""
        return {**super().describe(), "effective_settings": {**describe_architecture(self.architecture)}}
