"""AE SSIM (Bergmann et al. 2019): the convolutional autoencoder trained and scored with SSIM.

Bergmann et al., "Improving Unsupervised Defect Segmentation by Applying
Structural Similarity to Autoencoders" (VISAPP 2019), train an autoencoder to
maximize the structural similarity between input and reconstruction and use
1 - SSIM per pixel as the anomaly map. Here the network is the one of AE MSE
(:class:`~sfae.models.conv_autoencoder.ConvAutoencoder`, instance
normalization), as in the SFAE reference code, where AE SSIM is the AE
baseline run with ``--loss_fn ssim`` (FeliMe/feature-autoencoder,
fae/baselines/ae/run.sh).

- Loss: 1 - mean SSIM over every pixel of the batch, border and background
  included (:func:`sfae.ssim.ssim_loss`). The reference code minimizes
  -SSIM, which differs by a constant and has the same gradient.
- Map: 1 - SSIM per pixel (:func:`sfae.ssim.ssim_map`), in [0, 2].
- Window: Gaussian with 11 taps and sigma 1.5 pixels, the default of the
  SSIM module of the reference code (fae/utils/pytorch_ssim.py) and the window
  of Wang et al. 2004. The reference pads with zeros, but :mod:`sfae.ssim`
  mirrors the border. The two differ only within 5 pixels of the slice
  border, which lies outside the brain in most slices.
- No image score: the evaluation scores each slice from its map.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from sfae import ssim
from sfae.io import InvalidInputError
from sfae.models.base import AnomalyMethod, Prediction, register
from sfae.models.conv_autoencoder import ConvAutoencoder, describe_architecture, read_architecture

logger = logging.getLogger(__name__)


@register
class AESSIMMethod(AnomalyMethod):
    """Autoencoder with an SSIM loss and 1 - SSIM as anomaly map.

    Settings (config ``methods.ae_ssim``): ``channels``, ``latent_dim`` and
    ``normalization`` of the network (see :func:`~sfae.models.conv_autoencoder.read_architecture`)
    and ``window_size``, the taps of the Gaussian SSIM window (odd, default 11, with sigma fixed at 1.5).
    """

    name = "ae_ssim"

    def __init__(self, settings: Mapping[str, Any], *, seed: int, image_size: int) -> None:
        """Build the autoencoder, drawing its weights from torch's global random number generator.

        Raises:
            InvalidInputError: If a setting is invalid or ``image_size`` does not fit the network.
        """
        super().__init__(settings, seed=seed, image_size=image_size)
        self.window_size = settings.get("window_size", ssim.WANG_WINDOW_SIZE)
        try:
            ssim.gaussian_window(self.window_size, ssim.GAUSSIAN_SIGMA)
        except InvalidInputError as error:
            raise InvalidInputError(f"invalid ae_ssim setting window_size: {error}") from error
        self.architecture = read_architecture(settings, image_size, default_normalization="instance")
        self.network = ConvAutoencoder(**self.architecture)

    def loss(self, images: Tensor, masks: Tensor) -> Tensor:
        """Return 1 - mean SSIM between the slices and their reconstruction over all pixels."""
        return ssim.ssim_loss(self.network(images), images, window_size=self.window_size, sigma=ssim.GAUSSIAN_SIGMA)

    def predict(self, images: Tensor, masks: Tensor, slice_index: Tensor | None = None) -> Prediction:
        """Return 1 - SSIM per pixel, float32 ``(batch, 1, height, width)`` in [0, 2], and no image scores."""
        with torch.no_grad():
            reconstruction = self.network(images)
            maps = 1.0 - ssim.ssim_map(reconstruction, images, window_size=self.window_size, sigma=ssim.GAUSSIAN_SIGMA)
        return Prediction(maps=maps.float())

    def describe(self) -> dict[str, Any]:
        """Return the method, its settings and every value in effect, defaults included."""
        return {**super().describe(), "effective_settings": {**describe_architecture(self.architecture), "window_size": self.window_size}}
