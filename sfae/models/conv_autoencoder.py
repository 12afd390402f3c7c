"""Convolutional autoencoder with a dense bottleneck for grey slices, shared by AE MSE, AE SSIM and the VAE.

The encoder halves the slice size with each strided convolution, a dense layer
maps the flattened result to the latent code, and the decoder mirrors the
encoder with transposed convolutions back to one output channel. AE MSE and
AE SSIM (:mod:`sfae.models.ae_mse`, :mod:`sfae.models.ae_ssim`) use
:class:`ConvAutoencoder`. The VAE (:mod:`sfae.models.vae`) builds the same
encoder with twice the code size, for the mean and the log-variance.

Choices follow the baseline models of the SFAE reference code
(FeliMe/feature-autoencoder, fae/baselines/ae/model.py and
fae/baselines/vae/model.py, in the version whose trainers read the shared
fae/configs/base_config.py):

- Encoder blocks: 3x3 convolution with stride 2 and padding 1 without bias,
  then the normalization, then LeakyReLU with PyTorch's default slope 0.01.
- Bottleneck: flatten, a dense layer to the code, a dense layer back to the
  last encoder shape, both without bias.
- Decoder blocks: 4x4 transposed convolution with stride 2 and padding 1
  without bias, which doubles the size exactly, then normalization and
  LeakyReLU. The last transposed convolution maps the first encoder channel
  count to one channel and is followed by nothing: the output is linear, with
  no sigmoid, so reconstructions are not confined to [0, 1].
- Normalization: instance normalization (no affine parameters, no running
  statistics) in the AE, none in the VAE. Those are the defaults of the
  reference AE and VAE. ``"batch"`` is offered for experiments.
- Channels 32, 64, 128, 256 and a 128-dimensional code, the sizes in the
  reference models' examples. The reference trainers' command-line defaults
  use five blocks (16 to 256 channels) and a 256-dimensional code, which the
  settings ``channels`` and ``latent_dim`` can select.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sfae.io import InvalidInputError

logger = logging.getLogger(__name__)

# Sizes of the reference baseline models (see the module docstring).
CHANNELS = (32, 64, 128, 256)
LATENT_DIM = 128
ENCODER_KERNEL_SIZE = 3
DECODER_KERNEL_SIZE = 4
# PyTorch's default LeakyReLU slope, which the reference code uses.
NEGATIVE_SLOPE = 0.01
NORMALIZATIONS = ("instance", "batch", "none")


class ConvEncoder(nn.Module):
    """Strided convolution blocks, then a dense layer from the flattened maps to a code vector.

    Attributes:
        image_size: Height and width of the input slices in pixels.
        out_features: Length of the code vector.
        blocks: The convolution blocks, each halving the height and width.
        dense: The bias-free dense layer from ``channels[-1] * s * s`` to ``out_features``,
            with ``s = image_size / 2 ** len(channels)``.
    """

    def __init__(self, image_size: int, channels: Sequence[int], out_features: int, normalization: str) -> None:
        """Build the blocks and the dense layer.

        Raises:
            InvalidInputError: As :func:`validate_architecture`, or if ``out_features`` is not positive.
        """
        super().__init__()
        channels = validate_architecture(image_size, channels, out_features, normalization)
        self.image_size = image_size
        self.out_features = out_features
        blocks = []
        in_channels = 1
        for out_channels in channels:
            convolution = nn.Conv2d(in_channels, out_channels, ENCODER_KERNEL_SIZE, stride=2, padding=ENCODER_KERNEL_SIZE // 2, bias=False)
            blocks.append(_block(convolution, out_channels, normalization))
            in_channels = out_channels
        self.blocks = _to_preferred_memory_format(nn.Sequential(*blocks), normalization)
        bottleneck_size = image_size // 2 ** len(channels)
        self.dense = nn.Linear(channels[-1] * bottleneck_size**2, out_features, bias=False)

    def forward(self, images: Tensor) -> Tensor:
        """Encode slices of shape ``(batch, 1, image_size, image_size)`` into codes ``(batch, out_features)``.

        Raises:
            InvalidInputError: If the slices do not have that shape.
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, self.image_size, self.image_size):
            raise InvalidInputError(
                f"invalid slice batch shape {tuple(images.shape)}: this autoencoder was built for "
                f"(batch, 1, {self.image_size}, {self.image_size}), so build the method with the slices' size"
            )
        return self.dense(self.blocks(images).flatten(1))


class ConvDecoder(nn.Module):
    """A dense layer from the code to the last encoder shape, then transposed convolution blocks to one channel.

    Attributes:
        dense: The bias-free dense layer from ``latent_dim`` to ``channels[-1] * s * s``.
        unflatten: Reshapes the dense output to ``(channels[-1], s, s)``.
        blocks: Transposed convolution blocks with normalization and LeakyReLU,
            then the last transposed convolution to one channel, with a linear output.
    """

    def __init__(self, image_size: int, channels: Sequence[int], latent_dim: int, normalization: str) -> None:
        """Build the decoder that mirrors :class:`ConvEncoder` with the same arguments.

        Raises:
            InvalidInputError: As :func:`validate_architecture`.
        """
        super().__init__()
        channels = validate_architecture(image_size, channels, latent_dim, normalization)
        bottleneck_size = image_size // 2 ** len(channels)
        self.dense = nn.Linear(latent_dim, channels[-1] * bottleneck_size**2, bias=False)
        self.unflatten = nn.Unflatten(1, (channels[-1], bottleneck_size, bottleneck_size))

        # Transposed 4x4 convolutions with stride 2 and padding 1: (n - 1) * 2 - 2 + 4 = 2 n.
        blocks = []
        for in_channels, out_channels in zip(reversed(channels[1:]), reversed(channels[:-1])):
            transposed = nn.ConvTranspose2d(in_channels, out_channels, DECODER_KERNEL_SIZE, stride=2, padding=1, bias=False)
            blocks.append(_block(transposed, out_channels, normalization))
        blocks.append(nn.ConvTranspose2d(channels[0], 1, DECODER_KERNEL_SIZE, stride=2, padding=1, bias=False))
        self.blocks = _to_preferred_memory_format(nn.Sequential(*blocks), normalization)

    def forward(self, codes: Tensor) -> Tensor:
        """Decode codes ``(batch, latent_dim)`` into slices ``(batch, 1, image_size, image_size)``."""
        return self.blocks(self.unflatten(self.dense(codes)))


class ConvAutoencoder(nn.Module):
    """Deterministic autoencoder: :class:`ConvEncoder` to a ``latent_dim`` code, then :class:`ConvDecoder`.

    Attributes:
        encoder: The :class:`ConvEncoder`.
        decoder: The :class:`ConvDecoder`.
    """

    def __init__(self, image_size: int, channels: Sequence[int] = CHANNELS, latent_dim: int = LATENT_DIM, normalization: str = "instance") -> None:
        """Build the encoder and the decoder.

        Args:
            image_size: Height and width of the slices in pixels, a multiple of ``2 ** len(channels)``.
            channels: Output channels of the encoder blocks. The decoder uses them in reverse.
            latent_dim: Length of the code.
            normalization: ``"instance"``, ``"batch"`` or ``"none"``, after every convolution but the last.

        Raises:
            InvalidInputError: As :func:`validate_architecture`.
        """
        super().__init__()
        self.encoder = ConvEncoder(image_size, channels, latent_dim, normalization)
        self.decoder = ConvDecoder(image_size, channels, latent_dim, normalization)

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruct slices of shape ``(batch, 1, image_size, image_size)`` into a tensor of the same shape.

        Raises:
            InvalidInputError: If the slices do not have that shape.
        """
        return self.decoder(self.encoder(images))


def validate_architecture(image_size: int, channels: Sequence[int], latent_dim: int, normalization: str) -> tuple[int, ...]:
    """Check the network sizes and return the channels as a tuple of ints.

    Raises:
        InvalidInputError: If a channel count or ``latent_dim`` is not a positive integer,
            ``channels`` is empty, ``normalization`` is unknown, ``image_size`` is not a
            multiple of ``2 ** len(channels)``, or instance normalization would see a 1x1 map.
    """
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or not channels or not all(_is_positive_int(count) for count in channels):
        raise InvalidInputError(f"invalid autoencoder channels {channels!r}: expected a non-empty list of positive integers, such as {list(CHANNELS)}")
    if not _is_positive_int(latent_dim):
        raise InvalidInputError(f"invalid autoencoder latent_dim {latent_dim!r}: expected a positive integer, such as {LATENT_DIM}")
    if normalization not in NORMALIZATIONS:
        raise InvalidInputError(f"invalid autoencoder normalization {normalization!r}: expected one of {', '.join(NORMALIZATIONS)}")
    factor = 2 ** len(channels)
    if not _is_positive_int(image_size) or image_size % factor:
        raise InvalidInputError(
            f"invalid slice size {image_size!r} for an autoencoder with {len(channels)} blocks: the size must be a multiple of "
            f"{factor}, so set preprocessing.slices.size accordingly or change the channels"
        )
    if normalization == "instance" and image_size == factor:
        raise InvalidInputError(
            f"slice size {image_size} leaves a 1x1 map after {len(channels)} blocks, which instance normalization cannot "
            f"normalize, so use slices of at least {2 * factor} pixels, fewer channels, or another normalization"
        )
    return tuple(int(count) for count in channels)


def read_architecture(settings: Mapping[str, Any], image_size: int, *, default_normalization: str) -> dict[str, Any]:
    """Read ``channels``, ``latent_dim`` and ``normalization`` from a method's settings, with defaults.

    Args:
        settings: The method's config settings. Missing keys take the reference defaults.
        image_size: Slice height and width in pixels.
        default_normalization: Normalization when the settings name none.

    Returns:
        Keyword arguments for :class:`ConvAutoencoder` (or the VAE network): ``image_size``,
        ``channels`` (tuple of ints), ``latent_dim`` and ``normalization``.

    Raises:
        InvalidInputError: As :func:`validate_architecture`.
    """
    channels = settings.get("channels", CHANNELS)
    latent_dim = settings.get("latent_dim", LATENT_DIM)
    normalization = settings.get("normalization", default_normalization)
    channels = validate_architecture(image_size, channels, latent_dim, normalization)
    return {"image_size": image_size, "channels": channels, "latent_dim": latent_dim, "normalization": normalization}


def describe_architecture(architecture: Mapping[str, Any]) -> dict[str, Any]:
    """Return the JSON-ready ``channels``, ``latent_dim`` and ``normalization`` of :func:`read_architecture`'s result."""
    return {"channels": list(architecture["channels"]), "latent_dim": architecture["latent_dim"], "normalization": architecture["normalization"]}


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _to_preferred_memory_format(blocks: nn.Sequential, normalization: str) -> nn.Sequential:
    """Store the convolution weights channels-last, except next to instance normalization.

    Channels-last weights make the convolutions, and so their outputs, use the
    NHWC layout. On 2 CPU threads (AMD EPYC, torch 2.14) that made a training
    step at batch 64 and 128x128 about 40 % faster without normalization and
    about 25 % faster with batch normalization. Other jobs shared the cores
    during the measurement, so the figures are rough. Instance normalization was
    slower on NHWC tensors than the convolutions gained, so those networks keep
    the default layout. The layout changes no result beyond float rounding.
    """
    if normalization == "instance":
        return blocks
    return blocks.to(memory_format=torch.channels_last)


def _block(convolution: nn.Module, channels: int, normalization: str) -> nn.Sequential:
    """Return the convolution, the normalization (if any) and LeakyReLU in sequence."""
    layers = [convolution]
    if normalization == "instance":
        layers.append(nn.InstanceNorm2d(channels))
    elif normalization == "batch":
        layers.append(nn.BatchNorm2d(channels))
    layers.append(nn.LeakyReLU(NEGATIVE_SLOPE))
    return nn.Sequential(*layers)
