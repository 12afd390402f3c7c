"""VAE of Zimmerer et al. 2019, localizing anomalies with the "combi" map and detecting them with the KL term.

Zimmerer, Isensee, Petersen, Kohl and Maier-Hein, "Unsupervised Anomaly
Localization using Variational Auto-Encoders" (MICCAI 2019). The network is
the convolutional autoencoder of AE MSE with a variational bottleneck: the
encoder's dense layer outputs a mean and a log-variance of a diagonal Gaussian
posterior (:class:`ConvVAE`). Choices, with the code they come from:

- Architecture: as :mod:`sfae.models.conv_autoencoder`, without normalization,
  the default of the VAE baseline of the SFAE reference code
  (FeliMe/feature-autoencoder, fae/baselines/vae/model.py).
- Loss: mean of ``(x - x_hat)^2`` over all pixels plus ``kl_weight`` times the
  KL divergence from the standard normal prior averaged over the latent
  dimensions and the batch, with ``kl_weight`` 0.05 (fae/baselines/vae/trainer.py,
  whose comment calls the results very sensitive to it). ``x_hat`` is decoded
  from one reparameterized sample, drawn with torch's global random number
  generator so that a resumed training run draws the same noise.
- Localization, the "combi" map: ``(x - x_hat)^2`` times the Gaussian-smoothed,
  min-max normalized absolute gradient of the KL term with respect to the
  input. Both the reference code's VAE and Zimmerer et al.'s public code
  (MIC-DKFZ/vae-anomaly-experiments, brats_script.py, ``test_pixel``) take
  the absolute gradient of the KL term, not of the whole ELBO. They normalize
  it to [0, 1] and then smooth it with a 7-tap Gaussian of sigma 3 pixels and
  zero padding (utils/util.py, ``smooth_tensor``).
  Zimmerer et al. multiply by the pixel's Gaussian negative log-likelihood and
  the SFAE reference code by the squared residual. This module follows the
  SFAE reference code.
- Differences from both codes: ``x_hat`` is decoded from the posterior mean
  (Zimmerer et al. do so in eval mode, the SFAE reference code samples), so
  maps are deterministic. The min-max normalization runs per slice instead of
  over the whole batch, so a slice's map does not depend on which slices share
  its batch or on the evaluation batch size.
- Detection: the KL term of each slice, averaged over the latent dimensions
  as in the reference code's score (a sum would rank slices identically).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfae import ssim
from sfae.io import InvalidInputError
from sfae.models.base import AnomalyMethod, Prediction, register
from sfae.models.conv_autoencoder import CHANNELS, LATENT_DIM, ConvDecoder, ConvEncoder, describe_architecture, read_architecture, validate_architecture

logger = logging.getLogger(__name__)

# Weight of the KL term in the loss, the default of the SFAE reference code
# (fae/baselines/vae/trainer.py, --kl_weight 0.05).
KL_WEIGHT = 0.05
# Gaussian that smooths the normalized KL gradient of the combi map: 7 taps,
# sigma 3 pixels, zero padding. Zimmerer et al.'s smooth_tensor (utils/util.py)
# turns its default kernel_size 8 into 7 taps, and the SFAE reference code
# (fae/baselines/vae/vae_utils.py) uses 7 taps directly.
COMBI_WINDOW_SIZE = 7
COMBI_SIGMA = 3.0


class ConvVAE(nn.Module):
    """Variational autoencoder: the encoder outputs a Gaussian posterior, the decoder maps a latent vector back.

    Attributes:
        latent_dim: Dimensions of the latent space.
        encoder: :class:`~sfae.models.conv_autoencoder.ConvEncoder` with ``2 * latent_dim`` outputs,
            the mean followed by the log-variance.
        decoder: :class:`~sfae.models.conv_autoencoder.ConvDecoder` from ``latent_dim``.
    """

    def __init__(self, image_size: int, channels: Sequence[int] = CHANNELS, latent_dim: int = LATENT_DIM, normalization: str = "none") -> None:
        """Build the encoder and the decoder.

        Args:
            image_size, channels, latent_dim, normalization: As
                :class:`~sfae.models.conv_autoencoder.ConvAutoencoder`.

        Raises:
            InvalidInputError: As :func:`~sfae.models.conv_autoencoder.validate_architecture`.
        """
        super().__init__()
        validate_architecture(image_size, channels, latent_dim, normalization)
        self.latent_dim = latent_dim
        self.encoder = ConvEncoder(image_size, channels, 2 * latent_dim, normalization)
        self.decoder = ConvDecoder(image_size, channels, latent_dim, normalization)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Return the posterior mean and log-variance, each ``(batch, latent_dim)``, of slices ``(batch, 1, size, size)``.

        Raises:
            InvalidInputError: If the slices do not have the size the network was built for.
        """
        mean, log_variance = self.encoder(images).chunk(2, dim=1)
        return mean, log_variance

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(reconstruction, mean, log_variance)``.

        In training mode the reconstruction is decoded from one sample
        ``mean + exp(log_variance / 2) * noise`` with standard normal noise from
        torch's global generator. In eval mode it is decoded from the mean.

        Raises:
            InvalidInputError: If the slices do not have the size the network was built for.
        """
        mean, log_variance = self.encode(images)
        latent = mean
        if self.training:
            latent = mean + torch.randn_like(mean) * torch.exp(0.5 * log_variance)
        return self.decoder(latent), mean, log_variance


def kl_divergence(mean: Tensor, log_variance: Tensor) -> Tensor:
    """Return KL(N(mean, exp(log_variance)) || N(0, 1)) per latent dimension, in nats, shaped like ``mean``."""
    return -0.5 * (1.0 + log_variance - mean.square() - log_variance.exp())


def gaussian_smooth(maps: Tensor, window_size: int, sigma: float) -> Tensor:
    """Smooth maps ``(batch, 1, height, width)`` with a separable Gaussian and zero padding, keeping the shape.

    Raises:
        InvalidInputError: If ``window_size`` is not odd and positive or ``sigma`` is not positive.
    """
    kernel = ssim.gaussian_window(window_size, sigma, dtype=maps.dtype, device=maps.device)
    radius = window_size // 2
    rows_smoothed = F.conv2d(maps, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return F.conv2d(rows_smoothed, kernel.view(1, 1, 1, -1), padding=(0, radius))


def normalize_per_slice(maps: Tensor) -> Tensor:
    """Rescale each map of ``(batch, 1, height, width)`` linearly to [0, 1]. A constant map becomes all 0."""
    flat = maps.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1, 1)
    span = (flat.amax(dim=1).view(-1, 1, 1, 1) - low).clamp_min(torch.finfo(maps.dtype).tiny)
    return (maps - low) / span


def combi_map(images: Tensor, reconstruction: Tensor, kl_gradient: Tensor, *, window_size: int = COMBI_WINDOW_SIZE, sigma: float = COMBI_SIGMA) -> Tensor:
    """Compute the combi anomaly map of Zimmerer et al. 2019.

    Args:
        images: Slices, ``(batch, 1, height, width)``.
        reconstruction: Their reconstruction, same shape.
        kl_gradient: Gradient of each slice's KL term with respect to the slice, same shape.
        window_size, sigma: Taps and standard deviation in pixels of the smoothing Gaussian.

    Returns:
        ``(images - reconstruction)^2`` times the smoothed, per-slice min-max normalized
        ``|kl_gradient|``, of the same shape and non-negative.
    """
    weight = gaussian_smooth(normalize_per_slice(kl_gradient.abs()), window_size, sigma)
    return (images - reconstruction).square() * weight


@register
class VAEMethod(AnomalyMethod):
    """VAE with the combi anomaly map and the KL term as image score.

    Settings (config ``methods.vae``): ``channels``, ``latent_dim`` and
    ``normalization`` of the network (see :func:`~sfae.models.conv_autoencoder.read_architecture`,
    with normalization ``"none"`` by default), ``kl_weight`` (0.05), ``combi_sigma``
    (3.0 pixels) and ``combi_window_size`` (7 taps) of the smoothing Gaussian.
    """

    name = "vae"

    def __init__(self, settings: Mapping[str, Any], *, seed: int, image_size: int) -> None:
        """Build the network, drawing its weights from torch's global random number generator.

        Raises:
            InvalidInputError: If a setting is invalid or ``image_size`` does not fit the network.
        """
        super().__init__(settings, seed=seed, image_size=image_size)
        self.kl_weight = settings.get("kl_weight", KL_WEIGHT)
        self.combi_sigma = settings.get("combi_sigma", COMBI_SIGMA)
        self.combi_window_size = settings.get("combi_window_size", COMBI_WINDOW_SIZE)
        _validate_combi_settings(self.kl_weight, self.combi_sigma, self.combi_window_size)
        self.architecture = read_architecture(settings, image_size, default_normalization="none")
        self.network = ConvVAE(**self.architecture)

    def loss_terms(self, images: Tensor) -> dict[str, Tensor]:
        """Return the scalar ``loss``, its ``reconstruction`` term (mean squared error) and its ``kl`` term.

        ``loss = reconstruction + kl_weight * kl``, where ``kl`` is averaged over
        the latent dimensions and the batch. The reconstruction is decoded from a
        sample in training mode and from the mean in eval mode.
        """
        reconstruction, mean, log_variance = self.network(images)
        reconstruction_error = F.mse_loss(reconstruction, images)
        kl = kl_divergence(mean, log_variance).mean()
        return {"loss": reconstruction_error + self.kl_weight * kl, "reconstruction": reconstruction_error, "kl": kl}

    def loss(self, images: Tensor, masks: Tensor) -> Tensor:
        """Return the negative ELBO surrogate ``reconstruction + kl_weight * kl`` (see :meth:`loss_terms`)."""
        return self.loss_terms(images)["loss"]

    def training_step(self, images: Tensor, masks: Tensor, step: int, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]:
        """Take one Adam step on the loss and return ``loss``, ``reconstruction`` and ``kl``."""
        (optimizer,) = optimizers.values()
        optimizer.zero_grad(set_to_none=True)
        terms = self.loss_terms(images)
        terms["loss"].backward()
        optimizer.step()
        return {key: float(value.detach()) for key, value in terms.items()}

    def predict(self, images: Tensor, masks: Tensor, slice_index: Tensor | None = None) -> Prediction:
        """Return the combi maps and the KL term of each slice as its score.

        The input gradient is taken with autograd switched on locally, so this
        also works inside ``torch.no_grad()``. It is computed with
        :func:`torch.autograd.grad`, which leaves every parameter's ``.grad``
        untouched. Each slice's gradient depends only on that slice, because
        the network has no batch statistics in eval mode.

        Returns:
            Maps float32 ``(batch, 1, height, width)``, non-negative, and scores
            float32 ``(batch,)``, the KL divergence in nats averaged over the latent dimensions.

        Raises:
            RuntimeError: If called inside ``torch.inference_mode()``, which forbids input gradients.
        """
        # 1. The KL term of each slice and its gradient with respect to the slice.
        with torch.enable_grad():
            inputs = images.detach().requires_grad_(True)
            mean, log_variance = self.network.encode(inputs)
            kl = kl_divergence(mean, log_variance).mean(dim=1)
            (kl_gradient,) = torch.autograd.grad(kl.sum(), inputs)

        # 2. Reconstruct from the posterior mean and weight the squared residual.
        with torch.no_grad():
            reconstruction = self.network.decoder(mean.detach())
            maps = combi_map(images, reconstruction, kl_gradient, window_size=self.combi_window_size, sigma=self.combi_sigma)
        return Prediction(maps=maps.float(), scores=kl.detach().float())

    def describe(self) -> dict[str, Any]:
        """Return the method, its settings and every value in effect, defaults included."""
        effective = {
            **describe_architecture(self.architecture),
            "kl_weight": self.kl_weight,
            "combi_sigma": self.combi_sigma,
            "combi_window_size": self.combi_window_size,
        }
        return {**super().describe(), "effective_settings": effective}


def _validate_combi_settings(kl_weight: Any, sigma: Any, window_size: Any) -> None:
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not math.isfinite(kl_weight) or kl_weight < 0:
        raise InvalidInputError(f"invalid vae setting kl_weight={kl_weight!r}: expected a finite number >= 0, such as {KL_WEIGHT}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise InvalidInputError(f"invalid vae setting combi_sigma={sigma!r}: expected a positive number of pixels, such as {COMBI_SIGMA}")
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1 or window_size % 2 == 0:
        raise InvalidInputError(f"invalid vae setting combi_window_size={window_size!r}: expected an odd positive integer, such as {COMBI_WINDOW_SIZE}")
