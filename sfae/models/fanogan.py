"""f-AnoGAN of Schlegl et al. 2019 ("f-AnoGAN: Fast unsupervised anomaly detection with generative adversarial networks", Medical Image Analysis 54).

A Wasserstein GAN with gradient penalty (WGAN-GP, Gulrajani et al. 2017)
learns to generate healthy slices. An encoder is then trained to map a slice
to the latent vector from which the frozen generator reconstructs it, with the
izi_f loss ``mean((x - G(E(x)))**2) + kappa * mean((f(x) - f(G(E(x))))**2)``,
where ``f`` is the critic's last feature layer. The anomaly map is the absolute
residual ``|x - G(E(x))|``, and the image score is the izi_f loss of each slice.

Sources opened, and the choices taken from them:

- The f-AnoGAN baseline of the SFAE authors (FeliMe/feature-autoencoder,
  fae/baselines/f-AnoGAN/model.py and trainer.py) gives the architecture. It
  has residual blocks of base width 64: the critic and the encoder take 5
  downsampling blocks for 128x128 slices with widths 64 -> 128 -> 256 -> 256 ->
  512 -> 512 to a 4x4 bottleneck, and the generator mirrors them. A
  downsampling block is norm, ReLU, 3x3 convolution, norm, ReLU, 1x1
  convolution and 2x2 average pooling, plus a shortcut of average pooling and
  a 1x1 convolution. An upsampling block is BatchNorm, ReLU, upsampling, 3x3
  convolution, BatchNorm, ReLU and a 3x3 convolution, plus a shortcut of
  upsampling and a 1x1 convolution. Here the 1x1 convolutions run at the lower
  resolution of each block (average pooling first, or upsampling after). A 1x1
  convolution commutes with average pooling and with nearest-neighbour
  upsampling, so this computes the same function at a quarter of the cost.
  The same code uses one critic update per generator update, Adam with betas (0.0, 0.9) for all three networks, He
  normal initialization of convolutions, Xavier uniform initialization of the
  linear layers, and zero biases. It trains 10,000 GAN steps and then 10,000
  encoder steps, so ``gan_fraction`` 0.5 splits the budget in the same ratio.
- Schlegl's official code (tSchlegl/f-AnoGAN, wgangp_64x64.py and
  z_encoding_izif.py) gives the rest. Its critic normalizes each sample over
  channels and pixels with a per-channel scale and offset, which is
  ``nn.GroupNorm(1, channels)`` here. The generator and the encoder use
  BatchNorm. The latent prior is the standard normal distribution, and the
  encoder's output is linear by default, which matches it (the SFAE authors'
  encoder ends with tanh). During encoder training the generator runs in
  inference mode, so its BatchNorm uses and keeps its running statistics. The
  image term of izi_f is the mean squared error, and the gradient penalty
  weight is 10.

Deviations, each with its reason:

- Slices in [0, 1]: the generator ends with ``(tanh(a) + 1) / 2``, which equals
  ``sigmoid(2 a)``. Both references scale images to [-1, 1] and end with tanh,
  which differs from this only by an affine change of units.
- Upsampling is nearest-neighbour. Gulrajani's TensorFlow code concatenates
  four copies of the channels and applies ``depth_to_space``, which is exactly
  nearest-neighbour upsampling. The PyTorch port in the SFAE reference uses
  ``pixel_shuffle``, whose channel order makes neighbouring output pixels
  copies of different channels.
- The image term of the encoder loss is the squared error of the f-AnoGAN
  paper. The SFAE authors' trainer used an SSIM loss there instead.
- ``n_critic`` defaults to 1 as in the SFAE authors' code, not 5 as in
  Schlegl's and Gulrajani's code, so that one step costs about as much as one
  step of the other methods.

One training step: with ``gan_steps = floor(gan_fraction * total_steps + 0.5)``,
steps ``0 .. gan_steps - 1`` are GAN steps. Each takes ``n_critic`` critic
updates on the step's batch, with new latent samples and new interpolation
factors for the gradient penalty every time, then one generator update on a
batch of new latent samples. Every later step is one encoder update on the
step's batch, with the generator and the critic frozen. The phase depends only
on ``step``. All random numbers come from torch's global generator, so a
resumed run is exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sfae.io import InvalidInputError
from sfae.models.base import AnomalyMethod, Prediction, register

logger = logging.getLogger(__name__)

# Latent size and gradient penalty weight of both references.
LATENT_DIM = 128
GRADIENT_PENALTY_WEIGHT = 10.0
# Weight of the feature term of izi_f (kappa = 1 in Schlegl et al. 2019 and both references).
KAPPA = 1.0
# Critic updates per generator update, as in the SFAE authors' f-AnoGAN trainer.
N_CRITIC = 1
# Share of the steps spent on the GAN: the SFAE authors trained 10,000 GAN and 10,000 encoder steps.
GAN_FRACTION = 0.5
# Steps of the whole run when the settings do not give them: the published budget of every method.
TOTAL_STEPS = 10_000
# Adam betas of WGAN-GP (Gulrajani et al. 2017), used for all three networks by the SFAE authors.
ADAM_BETAS = (0.0, 0.9)
# Widths of the stem and of each residual block of the critic and the encoder;
# the generator uses them in reverse. CHANNELS is the SFAE authors' network for
# 128x128 slices, 5 blocks to a 4x4 bottleneck. CHANNELS_4_BLOCKS is the 4-block
# network of Schlegl's 64x64 code, the default for sizes that are multiples of
# 16 but not of 32.
CHANNELS = (64, 128, 256, 256, 512, 512)
CHANNELS_4_BLOCKS = (64, 128, 256, 512, 512)

SETTINGS_KEYS = ("latent_dim", "gan_fraction", "total_steps", "n_critic", "gradient_penalty_weight", "kappa", "channels")


@dataclass(frozen=True)
class FAnoGANSettings:
    """Validated settings of :class:`FAnoGANMethod`; the config keys have the same names.

    Attributes:
        latent_dim: Size of the latent vector.
        gan_fraction: Share of ``total_steps`` spent on the GAN, in (0, 1).
        total_steps: Steps of the whole run (set it to the run's ``training.steps``).
        n_critic: Critic updates per GAN step.
        gradient_penalty_weight: Weight of the gradient penalty in the critic loss.
        kappa: Weight of the feature term in izi_f.
        channels: Widths of the stem and of the residual blocks, high to low resolution.
    """

    latent_dim: int
    gan_fraction: float
    total_steps: int
    n_critic: int
    gradient_penalty_weight: float
    kappa: float
    channels: tuple[int, ...]

    @property
    def gan_steps(self) -> int:
        """Number of GAN steps at the start of the run: ``gan_fraction * total_steps`` rounded half up."""
        return math.floor(self.gan_fraction * self.total_steps + 0.5)

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], image_size: int) -> FAnoGANSettings:
        """Read the settings with their defaults and check them.

        Raises:
            InvalidInputError: If a key is unknown, a value is invalid, the split leaves
                no GAN or no encoder step, or ``image_size`` does not fit the channels.
        """
        unknown = sorted(set(settings) - set(SETTINGS_KEYS))
        if unknown:
            raise InvalidInputError(f"unknown fanogan settings {unknown}; valid keys are {list(SETTINGS_KEYS)}")
        default_channels = CHANNELS if image_size % 2 ** (len(CHANNELS) - 1) == 0 else CHANNELS_4_BLOCKS
        channels = settings.get("channels", default_channels)
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or len(channels) < 2 or not all(_is_positive_integer(width) for width in channels):
            raise InvalidInputError(f"invalid fanogan setting channels={channels!r}: expected a list of at least 2 positive integers")
        values = cls(
            latent_dim=_positive_integer(settings, "latent_dim", LATENT_DIM),
            gan_fraction=_number(settings, "gan_fraction", GAN_FRACTION, low=0.0, high=1.0, inclusive=False),
            total_steps=_positive_integer(settings, "total_steps", TOTAL_STEPS),
            n_critic=_positive_integer(settings, "n_critic", N_CRITIC),
            gradient_penalty_weight=_number(settings, "gradient_penalty_weight", GRADIENT_PENALTY_WEIGHT, low=0.0),
            kappa=_number(settings, "kappa", KAPPA, low=0.0),
            channels=tuple(int(width) for width in channels),
        )
        if not 1 <= values.gan_steps < values.total_steps:
            raise InvalidInputError(
                f"fanogan settings gan_fraction={values.gan_fraction} and total_steps={values.total_steps} give {values.gan_steps} GAN steps; "
                "at least one GAN step and one encoder step are needed, so raise total_steps or move gan_fraction toward 0.5"
            )
        multiple = 2 ** (len(values.channels) - 1)
        if image_size < multiple or image_size % multiple:
            raise InvalidInputError(
                f"fanogan with channels {list(values.channels)} ({len(values.channels) - 1} downsampling blocks) needs slices whose size is a multiple of "
                f"{multiple} pixels, got {image_size}; set preprocessing.slices.size accordingly or use fewer channels entries"
            )
        return values


def _is_positive_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_integer(settings: Mapping[str, Any], key: str, default: int) -> int:
    value = settings.get(key, default)
    if not _is_positive_integer(value):
        raise InvalidInputError(f"invalid fanogan setting {key}={value!r}: expected a positive integer")
    return value


def _number(settings: Mapping[str, Any], key: str, default: float, *, low: float, high: float = math.inf, inclusive: bool = True) -> float:
    value = settings.get(key, default)
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    valid = valid and (low <= value <= high if inclusive else low < value < high)
    if not valid:
        interval = f"[{low:g}, {high:g}]" if inclusive else f"({low:g}, {high:g})"
        raise InvalidInputError(f"invalid fanogan setting {key}={value!r}: expected a finite number in {interval}")
    return float(value)


class DownBlock(nn.Module):
    """Residual block that halves the height and width: ``(batch, in, h, w) -> (batch, out, h / 2, w / 2)``."""

    def __init__(self, in_channels: int, out_channels: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.shortcut = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(in_channels, out_channels, 1))
        self.residual = nn.Sequential(
            norm(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            norm(in_channels),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(in_channels, out_channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.residual(x)


class UpBlock(nn.Module):
    """Residual block that doubles the height and width: ``(batch, in, h, w) -> (batch, out, 2 h, 2 w)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.Upsample(scale_factor=2, mode="nearest"))
        self.residual = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.residual(x)


class Generator(nn.Module):
    """Latent vector ``(batch, latent_dim)`` to grey slice ``(batch, 1, image_size, image_size)`` in [0, 1]."""

    def __init__(self, image_size: int, latent_dim: int, channels: Sequence[int]) -> None:
        super().__init__()
        widths = tuple(reversed(channels))
        self.base_size = image_size // 2 ** (len(widths) - 1)
        self.project = nn.Linear(latent_dim, widths[0] * self.base_size**2)
        self.blocks = nn.Sequential(*(UpBlock(widths[i], widths[i + 1]) for i in range(len(widths) - 1)))
        self.output = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(), nn.Conv2d(widths[-1], 1, 3, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        hidden = self.project(z).view(z.shape[0], -1, self.base_size, self.base_size)
        return (torch.tanh(self.output(self.blocks(hidden))) + 1.0) / 2.0


class _DownsamplingNetwork(nn.Module):
    """Stem convolution and downsampling blocks, flattened to ``(batch, channels[-1] * base_size**2)``."""

    def __init__(self, image_size: int, channels: Sequence[int], norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.image_size = image_size
        self.feature_count = channels[-1] * (image_size // 2 ** (len(channels) - 1)) ** 2
        self.stem = nn.Conv2d(1, channels[0], 3, padding=1)
        self.blocks = nn.Sequential(*(DownBlock(channels[i], channels[i + 1], norm) for i in range(len(channels) - 1)))

    def features(self, images: Tensor) -> Tensor:
        """Return the flattened output of the last block, ``(batch, feature_count)``."""
        return self.blocks(self.stem(images)).flatten(1)


class Critic(_DownsamplingNetwork):
    """WGAN critic: one unbounded score per slice. It has no BatchNorm, because the gradient penalty is per sample."""

    def __init__(self, image_size: int, channels: Sequence[int]) -> None:
        super().__init__(image_size, channels, lambda width: nn.GroupNorm(1, width))
        self.head = nn.Linear(self.feature_count, 1)

    def forward(self, images: Tensor) -> Tensor:
        """Return the scores ``(batch,)`` of slices ``(batch, 1, image_size, image_size)``."""
        return self.head(self.features(images)).squeeze(1)


class Encoder(_DownsamplingNetwork):
    """Slice ``(batch, 1, image_size, image_size)`` to latent vector ``(batch, latent_dim)``, linear output."""

    def __init__(self, image_size: int, latent_dim: int, channels: Sequence[int]) -> None:
        super().__init__(image_size, channels, nn.BatchNorm2d)
        self.head = nn.Linear(self.feature_count, latent_dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


class FAnoGAN(nn.Module):
    """Generator, critic and encoder of f-AnoGAN for square grey slices, initialized from torch's global generator.

    Attributes:
        image_size: Height and width of the slices in pixels.
        latent_dim: Size of the latent vector.
    """

    def __init__(self, image_size: int, latent_dim: int = LATENT_DIM, channels: Sequence[int] = CHANNELS) -> None:
        super().__init__()
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.generator = Generator(image_size, latent_dim, channels)
        self.critic = Critic(image_size, channels)
        self.encoder = Encoder(image_size, latent_dim, channels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def sample_latent(self, batch: int, device: torch.device) -> Tensor:
        """Draw latent vectors ``(batch, latent_dim)`` from the standard normal prior with torch's global generator."""
        return torch.randn(batch, self.latent_dim, device=device)

    def izif_terms(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruct slices through encoder and generator and compute both izi_f terms per slice.

        Args:
            images: Slices in [0, 1], ``(batch, 1, image_size, image_size)``.

        Returns:
            ``(reconstruction, residual_term, feature_term)``: the reconstruction of the
            input's shape, the mean squared residual over pixels ``(batch,)`` and the mean
            squared difference of the critic's features ``(batch,)``. Gradients reach the
            networks through the reconstruction only, never through the features of ``images``.
        """
        with torch.no_grad():
            image_features = self.critic.features(images)
        reconstruction = self.generator(self.encoder(images))
        residual_term = (images - reconstruction).pow(2).flatten(1).mean(1)
        feature_term = (image_features - self.critic.features(reconstruction)).pow(2).mean(1)
        return reconstruction, residual_term, feature_term


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor) -> Tensor:
    """Compute the WGAN-GP penalty ``mean((||grad_x critic(x_mix)||_2 - 1)**2)`` (Gulrajani et al. 2017).

    ``x_mix = a * real + (1 - a) * fake`` with one ``a ~ U(0, 1)`` per sample from
    torch's global generator. The result keeps its graph, so it can be backpropagated
    into the critic's parameters.

    Args:
        critic: Maps slices ``(batch, ...)`` to scores ``(batch,)``; each score must depend on its own sample only.
        real, fake: Slices of the same shape ``(batch, ...)``.

    Returns:
        Scalar penalty.
    """
    mixing = torch.rand((real.shape[0],) + (1,) * (real.ndim - 1), device=real.device, dtype=real.dtype)
    mixed = (mixing * real.detach() + (1.0 - mixing) * fake.detach()).requires_grad_(True)
    (gradients,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return (gradients.flatten(1).norm(dim=1) - 1.0).pow(2).mean()


@contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """Stop gradients to the parameters of ``modules`` inside the block, and restore their flags afterwards."""
    parameters = [parameter for module in modules for parameter in module.parameters()]
    flags = [parameter.requires_grad for parameter in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)


@register
class FAnoGANMethod(AnomalyMethod):
    """f-AnoGAN as a benchmark method: WGAN-GP steps, then izi_f encoder steps, within one step budget.

    Settings (config ``methods.fanogan``): see :class:`FAnoGANSettings`. The
    method cannot see the run's ``training.steps``, so ``total_steps`` must be
    set to it for the phases to split the run by ``gan_fraction``. The workflow
    does that (rules/common.smk).

    Attributes:
        config: The validated :class:`FAnoGANSettings`.
        network: The :class:`FAnoGAN` networks.
        phase_steps: int64 buffer ``(2,)``: GAN steps and encoder steps taken, saved with the weights.
    """

    name = "fanogan"

    def __init__(self, settings: Mapping[str, Any], *, seed: int, image_size: int) -> None:
        super().__init__(settings, seed=seed, image_size=image_size)
        self.config = FAnoGANSettings.from_mapping(settings, image_size)
        self.network = FAnoGAN(image_size, self.config.latent_dim, self.config.channels)
        self.register_buffer("phase_steps", torch.zeros(2, dtype=torch.int64))
        self._warned_untrained = False

    def configure_optimizers(self, learning_rate: float) -> dict[str, torch.optim.Optimizer]:
        """Return one Adam per network, all with ``learning_rate`` and betas ``ADAM_BETAS``."""
        return {
            name: torch.optim.Adam(getattr(self.network, name).parameters(), lr=learning_rate, betas=ADAM_BETAS)
            for name in ("generator", "critic", "encoder")
        }

    def training_step(self, images: Tensor, masks: Tensor, step: int, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]:
        """Take a GAN step if ``step < config.gan_steps``, else an encoder step, and return the logged losses.

        GAN steps log ``critic_loss``, ``wasserstein_estimate`` (mean critic score of real
        minus fake slices), ``gradient_penalty`` (all of the last critic update) and
        ``generator_loss``. Encoder steps log ``izif_loss``, ``residual_loss`` and ``feature_loss``.
        The networks' train and eval modes are restored afterwards.
        """
        was_training = self.training
        try:
            if step < self.config.gan_steps:
                losses = self._gan_step(images, optimizers["generator"], optimizers["critic"])
                self.phase_steps[0] += 1
            else:
                if step == self.config.gan_steps:
                    logger.info("fanogan: %d GAN steps done, training the encoder from step %d", step, step + 1)
                if step == self.config.total_steps:
                    logger.warning(
                        "fanogan: step %d is past total_steps=%d, so the GAN took less than gan_fraction of the run; set total_steps to training.steps",
                        step + 1,
                        self.config.total_steps,
                    )
                losses = self._encoder_step(images, optimizers["encoder"])
                self.phase_steps[1] += 1
        finally:
            self.train(was_training)
        return losses

    def _gan_step(self, images: Tensor, generator_optimizer: torch.optim.Optimizer, critic_optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Take ``n_critic`` critic updates on ``images``, then one generator update."""
        generator, critic = self.network.generator.train(), self.network.critic.train()
        batch = images.shape[0]

        # 1. Critic: minimize mean score of fakes - mean score of reals + weight * penalty.
        for _ in range(self.config.n_critic):
            with torch.no_grad():
                fake = generator(self.network.sample_latent(batch, images.device))
            critic_optimizer.zero_grad(set_to_none=True)
            scores = critic(torch.cat([images, fake]))
            wasserstein_estimate = scores[:batch].mean() - scores[batch:].mean()
            penalty = gradient_penalty(critic, images, fake)
            critic_loss = -wasserstein_estimate + self.config.gradient_penalty_weight * penalty
            critic_loss.backward()
            critic_optimizer.step()

        # 2. Generator: maximize the critic's score of new fakes, without gradients for the critic.
        generator_optimizer.zero_grad(set_to_none=True)
        with _frozen(critic):
            generator_loss = -critic(generator(self.network.sample_latent(batch, images.device))).mean()
            generator_loss.backward()
        generator_optimizer.step()
        return {
            "critic_loss": float(critic_loss.detach()),
            "wasserstein_estimate": float(wasserstein_estimate.detach()),
            "gradient_penalty": float(penalty.detach()),
            "generator_loss": float(generator_loss.detach()),
        }

    def _encoder_step(self, images: Tensor, encoder_optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Take one izi_f update of the encoder; the generator and the critic stay in eval mode and unchanged."""
        self.network.generator.eval()
        self.network.critic.eval()
        self.network.encoder.train()
        encoder_optimizer.zero_grad(set_to_none=True)
        with _frozen(self.network.generator, self.network.critic):
            _, residual_term, feature_term = self.network.izif_terms(images)
            residual_loss, feature_loss = residual_term.mean(), feature_term.mean()
            loss = residual_loss + self.config.kappa * feature_loss
            loss.backward()
        encoder_optimizer.step()
        return {"izif_loss": float(loss.detach()), "residual_loss": float(residual_loss.detach()), "feature_loss": float(feature_loss.detach())}

    def predict(self, images: Tensor, masks: Tensor, slice_index: Tensor | None = None) -> Prediction:
        """Return the maps ``|x - G(E(x))|`` and the izi_f score of each slice, computed in eval mode.

        Args:
            images: float32 ``(batch, 1, image_size, image_size)`` in [0, 1].
            masks: Brain masks; not used, because the residual covers the whole slice.
            slice_index: Not used.

        Returns:
            Maps float32 ``(batch, 1, image_size, image_size)`` in [0, 1] and scores
            float32 ``(batch,)``: mean squared residual + kappa * mean squared feature difference.

        Raises:
            InvalidInputError: If the images do not have the shape the networks were built for.
        """
        if images.ndim != 4 or images.shape[1] != 1 or tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise InvalidInputError(f"invalid fanogan input shape {tuple(images.shape)}: expected (batch, 1, {self.image_size}, {self.image_size})")
        if int(self.phase_steps[1]) == 0 and not self._warned_untrained:
            logger.warning("fanogan: the encoder has taken no training step (phase steps %s); its maps are not meaningful", self.phase_steps.tolist())
            self._warned_untrained = True
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                reconstruction, residual_term, feature_term = self.network.izif_terms(images)
        finally:
            self.train(was_training)
        maps = (images - reconstruction).abs().to(torch.float32)
        scores = (residual_term + self.config.kappa * feature_term).to(torch.float32)
        return Prediction(maps=maps, scores=scores)

    def describe(self) -> dict[str, Any]:
        """Return the method, its settings, the phase boundary and the steps each phase took."""
        gan_done, encoder_done = (int(count) for count in self.phase_steps)
        return {
            **super().describe(),
            "gan_steps": self.config.gan_steps,
            "total_steps": self.config.total_steps,
            "gan_steps_done": gan_done,
            "encoder_steps_done": encoder_done,
            "channels": list(self.config.channels),
        }
