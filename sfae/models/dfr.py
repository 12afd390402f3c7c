"""Deep Feature Reconstruction (DFR) and its SSIM variant.

DFR (Shi et al. 2020, "Unsupervised anomaly segmentation via deep feature
reconstruction", Neurocomputing) describes every pixel by multi-scale features
of a frozen VGG19 (:class:`~sfae.models.vgg_features.VGG19FeatureExtractor`)
and trains an autoencoder of 1x1 convolutions to reconstruct them. The
autoencoder maps each feature pixel on its own, so it learns the distribution of
normal feature vectors and nothing about their layout. ``dfr`` trains with the
mean squared error and scores each pixel with the squared error averaged over
channels. ``dfr_ssim`` trains the same network with 1 - SSIM and scores with
1 - SSIM averaged over channels (:mod:`sfae.ssim`), as in the benchmark of
Meissen et al. 2022.

Choices and their sources:

- Autoencoder widths ``C -> (C + 2L) / 2 -> 2L -> L`` and back, every 1x1
  convolution but the bottleneck and the output one followed by BatchNorm and
  ReLU. This follows the DFR authors' code (YoungGod/DFR,
  DFR-source/feat_cae.py). The bottleneck and output convolutions are linear
  with a bias there. The SFAE reference code (FeliMe/feature-autoencoder,
  fae/baselines/DFR/model.py) also puts BatchNorm and ReLU after those two.
  Convolutions followed by BatchNorm have no bias here, because BatchNorm
  subtracts it again.
- ``L = 128`` latent channels by default, the default of the SFAE reference
  code's DFR trainer (fae/baselines/DFR/trainer.py), which its run script
  (fae/baselines/DFR/run.sh) does not change. The DFR authors chose ``L`` per data set as the number of
  principal components that explain 90 % of the feature variance. A fixed
  default keeps runs comparable across seeds and data sets.
- Loss: mean squared error over all feature elements. Map: squared error
  averaged over channels (``compute_energy`` in DFR's feat_cae.py).
- Both maps are resized to the slice with ``align_corners=False``, as
  :func:`sfae.ssim.anomaly_map` does. Each feature pixel then sits at the
  centre of the block of slice pixels that it averages. Both reference codes
  use ``align_corners=True``.
- SSIM window of 5 taps (sigma 1.5), which the SFAE reference code uses for
  its DFR SSIM baseline (fae/baselines/DFR/model.py, ``SSIMLoss(window_size=5)``)
  and for SFAE. On 32 x 32 feature maps an 11-tap window would cover a third
  of the map.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfae import ssim
from sfae.io import InvalidInputError
from sfae.models.base import AnomalyMethod, Prediction, register
from sfae.models.vgg_features import DEFAULT_FEATURE_STRIDE, DEFAULT_LAYERS, VGG19FeatureExtractor

logger = logging.getLogger(__name__)

# Latent channels of the DFR baseline in the SFAE reference code (fae/baselines/DFR/trainer.py).
DEFAULT_LATENT_CHANNELS = 128
# Extractor weights when the settings give none, as for SFAE. The published DFR
# numbers used ImageNet weights ("imagenet").
DEFAULT_WEIGHTS = "random"


class ChannelAutoencoder(nn.Module):
    """Autoencoder of 1x1 convolutions that reconstructs each feature vector on its own.

    Attributes:
        in_channels: Channels of the input and of the reconstruction.
        latent_channels: Channels at the bottleneck.
        encoder: ``C -> (C + 2L) / 2 -> 2L -> L``.
        decoder: ``L -> 2L -> (C + 2L) / 2 -> C``.
    """

    def __init__(self, in_channels: int, latent_channels: int = DEFAULT_LATENT_CHANNELS) -> None:
        """Build the encoder and decoder.

        Args:
            in_channels: Feature channels to reconstruct.
            latent_channels: Channels at the bottleneck, fewer than ``in_channels``.

        Raises:
            InvalidInputError: If ``latent_channels`` is not an integer from 1 to ``in_channels - 1``.
        """
        super().__init__()
        if isinstance(latent_channels, bool) or not isinstance(latent_channels, int) or not 1 <= latent_channels < in_channels:
            raise InvalidInputError(
                f"invalid latent_channels {latent_channels!r}: expected an integer from 1 to {in_channels - 1}, "
                f"fewer than the {in_channels} feature channels, so that the autoencoder cannot learn the identity"
            )
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        hidden = (in_channels + 2 * latent_channels) // 2

        self.encoder = nn.Sequential(
            *_block(in_channels, hidden),
            *_block(hidden, 2 * latent_channels),
            nn.Conv2d(2 * latent_channels, latent_channels, kernel_size=1),
        )
        self.decoder = nn.Sequential(
            *_block(latent_channels, 2 * latent_channels),
            *_block(2 * latent_channels, hidden),
            nn.Conv2d(hidden, in_channels, kernel_size=1),
        )

    def forward(self, features: Tensor) -> Tensor:
        """Reconstruct ``features`` of shape ``(batch, in_channels, height, width)``; the output has the same shape.

        Raises:
            InvalidInputError: If the channel count differs from ``in_channels``.
        """
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise InvalidInputError(f"invalid autoencoder input shape {tuple(features.shape)}: expected (batch, {self.in_channels}, height, width)")
        return self.decoder(self.encoder(features))


def _block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class DFR(nn.Module):
    """Frozen VGG19 feature extractor followed by a trainable :class:`ChannelAutoencoder`.

    Attributes:
        extractor: The frozen :class:`VGG19FeatureExtractor`.
        autoencoder: The :class:`ChannelAutoencoder`.
    """

    def __init__(
        self,
        layers: Sequence[str] = DEFAULT_LAYERS,
        weights: str | os.PathLike[str] = DEFAULT_WEIGHTS,
        seed: int = 0,
        feature_stride: int = DEFAULT_FEATURE_STRIDE,
        latent_channels: int = DEFAULT_LATENT_CHANNELS,
    ) -> None:
        """Build the extractor and the autoencoder.

        Args:
            layers, weights, seed, feature_stride: Passed to :class:`VGG19FeatureExtractor`.
                ``seed`` only sets random extractor weights. The autoencoder is initialized
                from the global random number generator.
            latent_channels: Passed to :class:`ChannelAutoencoder`.

        Raises:
            InvalidInputError: As the extractor and the autoencoder.
        """
        super().__init__()
        self.extractor = VGG19FeatureExtractor(layers, weights=weights, seed=seed, feature_stride=feature_stride)
        self.autoencoder = ChannelAutoencoder(self.extractor.out_channels, latent_channels)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Extract the features of ``images`` and reconstruct them.

        Args:
            images: Grey slices in [0, 1], shape ``(batch, 1, height, width)``.

        Returns:
            ``(features, reconstruction)``, both of shape
            ``(batch, channels, height / feature_stride, width / feature_stride)``.
            Only the reconstruction carries gradients.

        Raises:
            InvalidInputError: If the slices have the wrong shape or size.
        """
        features = self.extractor(images)
        return features, self.autoencoder(features)


@register
class DFRMethod(AnomalyMethod):
    """DFR as a benchmark method: squared feature reconstruction error.

    Settings (config ``methods.dfr``): ``layers`` (VGG19 ReLU layers),
    ``weights`` (``imagenet``, ``random`` or a state-dict path),
    ``feature_stride`` (slice pixels per feature pixel along each axis) and
    ``latent_channels``. Random extractor weights are drawn from the run's
    training seed, so each seed has its own extractor.
    """

    name = "dfr"

    def __init__(self, settings: Mapping[str, Any], *, seed: int, image_size: int) -> None:
        super().__init__(settings, seed=seed, image_size=image_size)
        self.network = DFR(
            layers=settings.get("layers", DEFAULT_LAYERS),
            weights=settings.get("weights", DEFAULT_WEIGHTS),
            seed=seed,
            feature_stride=settings.get("feature_stride", DEFAULT_FEATURE_STRIDE),
            latent_channels=settings.get("latent_channels", DEFAULT_LATENT_CHANNELS),
        )
        multiple = self.network.extractor.input_multiple
        if image_size % multiple:
            raise InvalidInputError(
                f"{self.name} with layers up to {self.network.extractor.layers[-1]} and feature_stride "
                f"{self.network.extractor.feature_stride} needs slices whose size is a multiple of {multiple} pixels, "
                f"got {image_size}. Set preprocessing.slices.size to such a multiple."
            )

    def reconstruction_loss(self, features: Tensor, reconstruction: Tensor) -> Tensor:
        """Return the mean squared error over all elements (scalar)."""
        return F.mse_loss(reconstruction, features)

    def feature_anomaly_map(self, features: Tensor, reconstruction: Tensor, size: Sequence[int]) -> Tensor:
        """Return the squared error averaged over channels, resized bilinearly to ``size``: ``(batch, 1, *size)``."""
        error = (reconstruction - features).square().mean(dim=1, keepdim=True)
        return F.interpolate(error, size=tuple(size), mode="bilinear", align_corners=False)

    def loss(self, images: Tensor, masks: Tensor) -> Tensor:
        """Return the reconstruction loss of the features of ``images``."""
        features, reconstruction = self.network(images)
        return self.reconstruction_loss(features, reconstruction)

    def predict(self, images: Tensor, masks: Tensor, slice_index: Tensor | None = None) -> Prediction:
        """Return the anomaly maps ``(batch, 1, height, width)`` float32; image scores come from the maps.

        Runs in eval mode (BatchNorm running statistics) without autograd and restores the previous mode.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                features, reconstruction = self.network(images)
                maps = self.feature_anomaly_map(features, reconstruction, images.shape[-2:])
        finally:
            self.train(was_training)
        return Prediction(maps=maps.float().contiguous())

    def describe(self) -> dict[str, Any]:
        """Return the method, its settings, the extractor weights and the resolved architecture."""
        extractor = self.network.extractor
        return {
            **super().describe(),
            "extractor_weights": str(self.settings.get("weights", DEFAULT_WEIGHTS)),
            "extractor_weights_source": extractor.weights_source,
            "layers": list(extractor.layers),
            "feature_channels": extractor.out_channels,
            "feature_stride": extractor.feature_stride,
            "latent_channels": self.network.autoencoder.latent_channels,
        }


@register
class DFRSSIMMethod(DFRMethod):
    """DFR trained with 1 - SSIM and scored with 1 - SSIM averaged over feature channels.

    Settings (config ``methods.dfr_ssim``): those of ``dfr`` and ``window_size``,
    the taps of the Gaussian SSIM window (sigma 1.5).
    """

    name = "dfr_ssim"

    def __init__(self, settings: Mapping[str, Any], *, seed: int, image_size: int) -> None:
        window_size = settings.get("window_size", ssim.SFAE_WINDOW_SIZE)
        ssim.gaussian_window(window_size, ssim.GAUSSIAN_SIGMA)  # raises for an invalid window before the VGG19 is built
        super().__init__(settings, seed=seed, image_size=image_size)
        self.window_size = window_size

    def reconstruction_loss(self, features: Tensor, reconstruction: Tensor) -> Tensor:
        """Return 1 - mean SSIM over all pixels, channels and images (scalar)."""
        return ssim.ssim_loss(reconstruction, features, window_size=self.window_size)

    def feature_anomaly_map(self, features: Tensor, reconstruction: Tensor, size: Sequence[int]) -> Tensor:
        """Return 1 - SSIM averaged over channels, resized bilinearly to ``size``: ``(batch, 1, *size)``."""
        return ssim.anomaly_map(reconstruction, features, size, window_size=self.window_size)

    def describe(self) -> dict[str, Any]:
        """Return the description of ``dfr`` and the SSIM window size."""
        return {**super().describe(), "window_size": self.window_size}
