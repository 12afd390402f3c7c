"""Structural Feature-Autoencoder (SFAE) of Meissen et al. 2022.

A frozen ResNet18 maps a slice to multi-layer feature maps, a fully
convolutional autoencoder reconstructs them, and the autoencoder is trained to
maximize the SSIM between features and reconstruction. The anomaly map is
1 - SSIM averaged over feature channels and resized to the slice.

Architecture facts not fixed by the paper's text follow the authors' public
reference code (FeliMe/feature-autoencoder, fae/models/models.py):
- The encoder's final 5x5 convolution keeps the last hidden channel count
  (300 -> 300) and is followed by nothing (no BatchNorm, activation or dropout).
- The decoder's transposed convolutions have 6x6 kernels, stride 2 and padding
  2. They double the size exactly, and every output pixel receives the same
  number of kernel taps. A 5x5 kernel with output padding 1 would also double
  the size, but its pixels would alternate between 3 and 2 taps per axis,
  which tends to leave a checkerboard pattern.
- The decoder channels mirror the encoder, 300 -> 200 -> 150 -> 100, and the
  last transposed convolution outputs the feature channel count (256 for
  layers 0-2), which a bias-free 1x1 convolution then maps to the output.
- Dropout drops whole channels (``nn.Dropout2d``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sfae import ssim
from sfae.io import InvalidInputError
from sfae.models.base import AnomalyMethod, Prediction, register
from sfae.models.feature_extractor import DEFAULT_LAYERS, ResNet18FeatureExtractor

logger = logging.getLogger(__name__)

# Autoencoder defaults of the SFAE reference code. Its fae/configs/base_config.py
# sets hidden channels 100, 150, 200, 300 and dropout 0.1. Its fae/models/models.py
# uses 5x5 encoder and 6x6 decoder kernels and LeakyReLU with PyTorch's default
# negative slope 0.01.
HIDDEN_CHANNELS = (100, 150, 200, 300)
KERNEL_SIZE = 5
DECODER_KERNEL_SIZE = 6
DROPOUT = 0.1
NEGATIVE_SLOPE = 0.01


class FeatureAutoencoder(nn.Module):
    """Fully convolutional autoencoder for feature maps.

    Each of the ``len(hidden)`` encoder blocks halves the height and width, so the
    input height and width must be multiples of ``2 ** len(hidden)`` (16 by default).

    Attributes:
        in_channels: Channels of the input and of the reconstruction.
        downsampling_factor: Ratio between the input size and the bottleneck size.
        encoder: Strided convolution blocks, then the final stride-1 convolution.
        decoder: Transposed convolution blocks, then the 1x1 output convolution.
    """

    def __init__(self, in_channels: int, hidden: Sequence[int] = HIDDEN_CHANNELS, dropout: float = DROPOUT, negative_slope: float = NEGATIVE_SLOPE) -> None:
        """Build the encoder and decoder.

        Args:
            in_channels: Feature channels to reconstruct.
            hidden: Encoder output channels per block. The decoder uses them in reverse.
            dropout: Probability of zeroing a whole channel after every block.
            negative_slope: Slope of LeakyReLU for negative inputs.

        Raises:
            InvalidInputError: If a channel count is not positive or ``dropout`` is outside [0, 1).
        """
        super().__init__()
        hidden = tuple(int(channels) for channels in hidden)
        if in_channels < 1 or not hidden or min(hidden) < 1:
            raise InvalidInputError(f"invalid channel counts in_channels={in_channels} and hidden={hidden}: expected positive integers")
        if not 0.0 <= dropout < 1.0:
            raise InvalidInputError(f"invalid dropout {dropout}: expected a probability in [0, 1)")
        self.in_channels = in_channels
        self.downsampling_factor = 2 ** len(hidden)

        # 1. Encoder: strided 5x5 blocks, then a 5x5 stride-1 convolution at the bottleneck.
        encoder = []
        channels = in_channels
        for out_channels in hidden:
            convolution = nn.Conv2d(channels, out_channels, KERNEL_SIZE, stride=2, padding=KERNEL_SIZE // 2, bias=False)
            encoder.append(_block(convolution, out_channels, dropout, negative_slope))
            channels = out_channels
        encoder.append(nn.Conv2d(channels, channels, KERNEL_SIZE, stride=1, padding=KERNEL_SIZE // 2, bias=False))
        self.encoder = nn.Sequential(*encoder)

        # 2. Decoder: transposed blocks back through the hidden channels to in_channels,
        # then a 1x1 convolution. Output size (n - 1) * 2 - 2 * 2 + 6 = 2 n.
        decoder = []
        for out_channels in (*reversed(hidden[:-1]), in_channels):
            convolution = nn.ConvTranspose2d(channels, out_channels, DECODER_KERNEL_SIZE, stride=2, padding=2, bias=False)
            decoder.append(_block(convolution, out_channels, dropout, negative_slope))
            channels = out_channels
        decoder.append(nn.Conv2d(in_channels, in_channels, 1, bias=False))
        self.decoder = nn.Sequential(*decoder)

    def forward(self, features: Tensor) -> Tensor:
        """Reconstruct the features.

        Args:
            features: Shape ``(batch, in_channels, height, width)``, height and width
                multiples of ``downsampling_factor``.

        Returns:
            Reconstruction of the same shape.

        Raises:
            InvalidInputError: If the channel count or the spatial size does not fit.
        """
        height, width = features.shape[-2:]
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise InvalidInputError(f"invalid autoencoder input shape {tuple(features.shape)}: expected (batch, {self.in_channels}, height, width)")
        if height % self.downsampling_factor or width % self.downsampling_factor:
            raise InvalidInputError(f"invalid feature map size {height}x{width}: the autoencoder needs height and width that are multiples of {self.downsampling_factor}")
        return self.decoder(self.encoder(features))


class SFAE(nn.Module):
    """Frozen ResNet18 feature extractor followed by a trainable feature autoencoder.

    Only ``autoencoder`` has trainable parameters. Input slices must have a height
    and width that are multiples of ``extractor.stride * autoencoder.downsampling_factor``
    (64 for layers 0-2 and the default autoencoder), such as 128x128.

    Attributes:
        extractor: The frozen :class:`ResNet18FeatureExtractor`.
        autoencoder: The :class:`FeatureAutoencoder`.
        window_size: Taps of the Gaussian SSIM window.
        sigma: Standard deviation of the SSIM window in feature-map pixels.
    """

    def __init__(
        self,
        layers: Sequence[str] = DEFAULT_LAYERS,
        weights: str | os.PathLike[str] = "random",
        seed: int = 0,
        hidden: Sequence[int] = HIDDEN_CHANNELS,
        dropout: float = DROPOUT,
        window_size: int = ssim.SFAE_WINDOW_SIZE,
        sigma: float = ssim.GAUSSIAN_SIGMA,
    ) -> None:
        """Build the extractor and the autoencoder.

        Args:
            layers, weights, seed: Passed to :class:`ResNet18FeatureExtractor`. ``seed`` only
                sets the random extractor weights. The autoencoder is initialized from the
                global random number generator.
            hidden, dropout: Passed to :class:`FeatureAutoencoder`.
            window_size, sigma: Gaussian window of the SSIM in loss and anomaly map.

        Raises:
            InvalidInputError: As the extractor, the autoencoder and :func:`sfae.ssim.gaussian_window`.
        """
        super().__init__()
        ssim.gaussian_window(window_size, sigma)  # raises for an invalid window before any network is built
        self.extractor = ResNet18FeatureExtractor(layers, weights=weights, seed=seed)
        self.autoencoder = FeatureAutoencoder(self.extractor.out_channels, hidden=hidden, dropout=dropout)
        self.window_size = window_size
        self.sigma = sigma

    @property
    def input_multiple(self) -> int:
        """Number that the slice height and width must be multiples of."""
        return self.extractor.stride * self.autoencoder.downsampling_factor

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Extract the features of ``images`` and reconstruct them.

        Args:
            images: Grey slices in [0, 1], shape ``(batch, 1, height, width)``.

        Returns:
            ``(features, reconstruction)``, both of shape ``(batch, channels, height / s, width / s)``
            with ``s = extractor.stride``. Only the reconstruction carries gradients.

        Raises:
            InvalidInputError: If the slices have the wrong shape or size.
        """
        height, width = images.shape[-2:]
        if height % self.input_multiple or width % self.input_multiple:
            raise InvalidInputError(
                f"invalid slice size {height}x{width}: SFAE with layers {list(self.extractor.layers)} needs height and width that are multiples of {self.input_multiple}, such as 128x128"
            )
        features = self.extractor(images)
        return features, self.autoencoder(features)

    def loss(self, images: Tensor) -> Tensor:
        """Compute the training loss, 1 - mean SSIM between reconstruction and features.

        Args:
            images: Grey slices in [0, 1], shape ``(batch, 1, height, width)``.

        Returns:
            Scalar loss. The mean includes the border pixels of the feature maps.
        """
        features, reconstruction = self(images)
        return ssim.ssim_loss(reconstruction, features, window_size=self.window_size, sigma=self.sigma)

    def anomaly_map(self, images: Tensor) -> Tensor:
        """Compute the pixel-wise anomaly map, 1 - SSIM averaged over feature channels.

        Runs in eval mode (dropout off, BatchNorm running statistics used) without
        autograd, and restores the previous mode afterwards.

        Args:
            images: Grey slices in [0, 1], shape ``(batch, 1, height, width)``.

        Returns:
            Anomaly map of shape ``(batch, 1, height, width)``, bilinearly upsampled from
            the feature resolution, values in [0, 2] with higher meaning more anomalous.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                features, reconstruction = self(images)
                return ssim.anomaly_map(reconstruction, features, images.shape[-2:], window_size=self.window_size, sigma=self.sigma)
        finally:
            self.train(was_training)


def _block(convolution: nn.Module, channels: int, dropout: float, negative_slope: float) -> nn.Sequential:
    """Return convolution, BatchNorm, LeakyReLU and channel dropout in sequence."""
    return nn.Sequential(convolution, nn.BatchNorm2d(channels), nn.LeakyReLU(negative_slope), nn.Dropout2d(dropout))


@register
class SFAEMethod(AnomalyMethod):
    """SFAE as a benchmark method: the :class:`SFAE` network behind the common method interface.

    Settings (config ``methods.sfae``): ``layers`` (ResNet18 stages),
    ``weights`` (``imagenet``, ``random`` or a state-dict path) and
    ``window_size`` of the SSIM. Random extractor weights are drawn from the
    run's training seed, so each seed has its own extractor.
    """

    name = "sfae"

    def __init__(self, settings: Mapping[str, Any], *, seed: int, image_size: int) -> None:
        super().__init__(settings, seed=seed, image_size=image_size)
        self.network = SFAE(
            layers=tuple(settings.get("layers", DEFAULT_LAYERS)),
            weights=settings.get("weights", "random"),
            seed=seed,
            window_size=settings.get("window_size", ssim.SFAE_WINDOW_SIZE),
        )
        if image_size % self.network.input_multiple:
            raise InvalidInputError(
                f"SFAE with layers {list(self.network.extractor.layers)} needs slices whose size is a multiple of "
                f"{self.network.input_multiple} pixels, got {image_size}; set preprocessing.slices.size accordingly"
            )

    def loss(self, images: Tensor, masks: Tensor) -> Tensor:
        """Return 1 - mean SSIM between the features of ``images`` and their reconstruction."""
        return self.network.loss(images)

    def predict(self, images: Tensor, masks: Tensor, slice_index: Tensor | None = None) -> Prediction:
        """Return 1 - SSIM averaged over feature channels, at the slice size; scores come from the maps."""
        return Prediction(maps=self.network.anomaly_map(images))

    def describe(self) -> dict[str, Any]:
        """Return the method, its settings and the extractor weights that were used."""
        return {**super().describe(), "extractor_weights": str(self.settings.get("weights", "random"))}
