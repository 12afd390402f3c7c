"""Self-supervised patch interpolation: the two blending functions, the patch sampler and the segmentation network.

Foreign patch interpolation (FPI, Tan et al., "Detecting Outliers with Foreign
Patch Interpolation", MELBA 2022) and Poisson image interpolation (PII, Tan et
al., "Detecting Outliers with Poisson Image Interpolation", MICCAI 2021) turn
healthy slices into training data. A rectangular patch of slice ``x1`` is
blended with the same patch of another slice ``x2`` with a factor ``alpha``,
and a segmentation network learns to predict ``alpha`` per pixel.

Choices, with the sources that were opened (Tan's code jemtan/FPI,
self_sup_task.py and models/wide_residual_network.py; jemtan/PII,
poissonBlend.py and self_sup_task_poisson.py; the SFAE authors' re-implementation
behind the published FPI and PII numbers, FeliMe/feature-autoencoder,
fae/baselines/fpi/fpi_utils.py, model.py and trainer.py):

- Patches are squares. Their side is a uniform integer between
  ``round(0.1 S)`` and ``round(0.4 S)`` pixels for ``S x S`` slices (13 to 51
  on 128 x 128), and their centre is uniform over the central 80 % of each
  axis, as in both codes (Tan draws half-widths of 5 % to 20 % of the side).
  Both codes clip patches that reach over the image edge. Here a patch is
  shifted instead to lie inside the image with a margin of 1 pixel, which the
  Poisson solve needs for its boundary values.
- Patches need not overlap the brain, as in both codes. A pixel where ``x1`` and
  ``x2`` are equal in every channel (background in both, for example) keeps
  label 0 because nothing changed there (the ``valid_label`` rule of both codes).
- FPI: inside the patch ``(1 - alpha) x1 + alpha x2``. PII: inside the patch,
  the solution of the discrete Poisson equation whose guidance takes, for every
  pair of 4-neighbours, the larger in magnitude of ``(1 - alpha)`` times the
  difference in ``x1`` and ``alpha`` times the difference in ``x2``
  (poissonBlend.py, "favor the stronger gradient"). The Dirichlet boundary is
  the ring of ``x1`` pixels around the patch.
- The label of both is ``alpha`` inside the patch and 0 outside, so it is the
  weight of the foreign slice (Tan's FPI code names the same quantity
  ``1 - interp``, which has the same uniform distribution).
- ``alpha`` is uniform in [0.05, 0.95], as in both codes.

The network follows Tan's wide residual encoder-decoder: pre-activation
residual blocks (Zagoruyko and Komodakis, "Wide Residual Networks", 2016) of two
bias-free 3x3 convolutions, a strided first convolution for downsampling, a
1x1 shortcut where the shape changes, nearest-neighbour upsampling in the
decoder and one sigmoid output channel. It is much narrower, so that training
stays fast on a CPU (Tan: 64 to 256 channels, here ``width`` doubling per
level), and it has U-Net skip connections (Ronneberger et al., 2015), which
Tan's network lacks, so that the thin decoder keeps full-resolution detail.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
from torch import Tensor, nn

from sfae.io import InvalidInputError

logger = logging.getLogger(__name__)

# Interpolation factor range of Tan's code (self_sup_task.py, np.random.uniform(0.05, 0.95)).
ALPHA_RANGE = (0.05, 0.95)
# Patch side as a fraction of the slice side: fpi_utils.py of the SFAE reference
# code draws widths in [round(0.1 S), round(0.4 S)); Tan draws half-widths in
# [round(0.05 S), round(0.2 S)).
PATCH_SIZE_FRACTION = (0.1, 0.4)
# Patch centres lie in the central 80 % of each axis (core_percent=0.8 in both codes).
CENTER_REGION_FRACTION = 0.8
# Pixels between a patch and the image edge: the Poisson solve needs a ring of
# x1 pixels around the patch as boundary values.
PATCH_MARGIN = 1
# Network defaults: channels at full resolution (doubled per level) and
# number of 2x downsamplings. Sized for CPU training; see the module docstring.
WIDTH = 8
DEPTH = 4
# Initial output probability of the network, about the mean label of the
# default sampler: patches cover 7 % of a slice on average and alpha averages
# 0.5. Starting there, as Lin et al. ("Focal Loss for Dense Object Detection",
# 2017) initialize their classifier to the foreground prior, saves the first
# few hundred steps of moving every output from 0.5 down to it.
INITIAL_PROBABILITY = 0.03
# Image-level scores: the SFAE reference code scored FPI and PII by the mean of
# the map over the brain (trainer.py: mean over pixels with x > 0).
IMAGE_SCORES = ("brain_mean", "top_fraction")
# Patch shapes whose LU factorization is kept; 128 x 128 slices use 39.
FACTORIZATION_CACHE_SIZE = 256


@dataclass(frozen=True)
class PatchInterpolationSettings:
    """Settings of FPI and PII, read from the config with their defaults.

    Attributes:
        patch_size_fraction: Smallest and largest patch side as fractions of the slice side.
        alpha_range: Range of the uniform interpolation factor, within [0, 1].
        width: Channels of the network at full resolution.
        depth: Number of 2x downsamplings of the network.
        image_score: ``"brain_mean"`` (mean of the map over the brain) or
            ``"top_fraction"`` (the evaluation's mean of the top 10 % brain pixels).
    """

    patch_size_fraction: tuple[float, float] = PATCH_SIZE_FRACTION
    alpha_range: tuple[float, float] = ALPHA_RANGE
    width: int = WIDTH
    depth: int = DEPTH
    image_score: str = "brain_mean"

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], image_size: int) -> PatchInterpolationSettings:
        """Read and validate the settings for slices of ``image_size`` pixels.

        Raises:
            InvalidInputError: If a setting is invalid or does not fit the slice size;
                the message names the setting.
        """
        size_fraction = _read_range(settings, "patch_size_fraction", PATCH_SIZE_FRACTION, upper=1.0, open_lower=True)
        alpha_range = _read_range(settings, "alpha_range", ALPHA_RANGE, upper=1.0, open_lower=False)
        width = _read_positive_int(settings, "width", WIDTH)
        depth = _read_positive_int(settings, "depth", DEPTH)
        image_score = settings.get("image_score", "brain_mean")
        if image_score not in IMAGE_SCORES:
            raise InvalidInputError(f"invalid setting image_score={image_score!r}: expected one of {', '.join(IMAGE_SCORES)}")
        if image_size % 2**depth:
            raise InvalidInputError(
                f"invalid setting depth={depth} for {image_size}x{image_size} slices: the slice size must be a multiple of 2**depth = {2**depth}"
            )
        low, high = patch_side_range(image_size, size_fraction)
        if low < 1 or high > image_size - 2 * PATCH_MARGIN:
            raise InvalidInputError(
                f"invalid setting patch_size_fraction={list(size_fraction)} for {image_size}x{image_size} slices: "
                f"patch sides {low} to {high} pixels must lie between 1 and {image_size - 2 * PATCH_MARGIN}"
            )
        return cls(size_fraction, alpha_range, width, depth, image_score)


def _read_range(settings: Mapping[str, Any], key: str, default: tuple[float, float], *, upper: float, open_lower: bool) -> tuple[float, float]:
    value = settings.get(key, default)
    try:
        low, high = (float(number) for number in value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"invalid setting {key}={value!r}: expected two numbers [low, high]") from None
    lower_ok = low > 0.0 if open_lower else low >= 0.0
    if not (lower_ok and low <= high <= upper):
        interval = f"(0, {upper:g}]" if open_lower else f"[0, {upper:g}]"
        raise InvalidInputError(f"invalid setting {key}={list(value)}: expected low <= high within {interval}")
    return low, high


def _read_positive_int(settings: Mapping[str, Any], key: str, default: int) -> int:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"invalid setting {key}={value!r}: expected a positive integer")
    return value


def patch_side_range(image_size: int, size_fraction: Sequence[float] = PATCH_SIZE_FRACTION) -> tuple[int, int]:
    """Return the smallest and largest patch side in pixels, both included, for ``image_size`` slices."""
    return round(size_fraction[0] * image_size), round(size_fraction[1] * image_size)


def sample_patches(
    batch_size: int,
    image_size: int,
    *,
    size_fraction: Sequence[float] = PATCH_SIZE_FRACTION,
    alpha_range: Sequence[float] = ALPHA_RANGE,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw one square patch and one interpolation factor per slice from torch's global CPU generator.

    The side is uniform over the integers of :func:`patch_side_range`, the
    centre uniform over the central ``CENTER_REGION_FRACTION`` of each axis,
    and the patch is then shifted to lie ``PATCH_MARGIN`` pixels inside the
    image. ``alpha`` is uniform in ``alpha_range``. Drawing on the CPU keeps the
    patches of a seed the same on every device.

    Args:
        batch_size: Number of patches.
        image_size: Height and width of the square slices in pixels.
        size_fraction: Smallest and largest side as fractions of ``image_size``.
        alpha_range: Range of the interpolation factor.

    Returns:
        ``(top_left, size, alpha)``: int64 ``(batch_size, 2)`` row and column of the
        patch's first pixel, int64 ``(batch_size, 2)`` height and width, and float32
        ``(batch_size,)``, all on the CPU.
    """
    # 1. Side lengths.
    low, high = patch_side_range(image_size, size_fraction)
    side = torch.randint(low, high + 1, (batch_size, 1))

    # 2. Centres in the central region, then shift each patch inside the image.
    first_center = math.floor((1 - CENTER_REGION_FRACTION) / 2 * image_size)
    last_center = math.ceil((1 + CENTER_REGION_FRACTION) / 2 * image_size) - 1
    center = torch.randint(first_center, last_center + 1, (batch_size, 2))
    top_left = torch.minimum(torch.clamp(center - side // 2, min=PATCH_MARGIN), image_size - PATCH_MARGIN - side)

    # 3. Interpolation factors.
    alpha = alpha_range[0] + (alpha_range[1] - alpha_range[0]) * torch.rand(batch_size)
    return top_left, side.expand(batch_size, 2).clone(), alpha


def patch_mask(shape: Sequence[int], top_left: Tensor, size: Tensor) -> Tensor:
    """Return the bool mask ``(batch, 1, height, width)`` of the patches, on the device of ``top_left``.

    Args:
        shape: ``(height, width)`` of the slices.
        top_left: int ``(batch, 2)``, row and column of each patch's first pixel.
        size: int ``(batch, 2)``, height and width of each patch.
    """
    rows = torch.arange(shape[0], device=top_left.device)
    columns = torch.arange(shape[1], device=top_left.device)
    inside_rows = (rows >= top_left[:, :1]) & (rows < top_left[:, :1] + size[:, :1])
    inside_columns = (columns >= top_left[:, 1:]) & (columns < top_left[:, 1:] + size[:, 1:])
    return (inside_rows[:, :, None] & inside_columns[:, None, :])[:, None]


def _validate_blend_input(x1: Tensor, x2: Tensor, top_left: Tensor, size: Tensor, alpha: Tensor, margin: int) -> None:
    """Raise unless the arguments describe a batch of slices and one patch inside each, ``margin`` pixels from the edge."""
    if x1.ndim != 4 or not x1.is_floating_point():
        raise InvalidInputError(f"expected float slices of shape (batch, channels, height, width), got shape {tuple(x1.shape)} and dtype {x1.dtype}")
    if x2.shape != x1.shape:
        raise InvalidInputError(f"foreign slices of shape {tuple(x2.shape)} do not match the slices' shape {tuple(x1.shape)}")
    batch = x1.shape[0]
    if top_left.shape != (batch, 2) or size.shape != (batch, 2) or alpha.shape != (batch,):
        raise InvalidInputError(
            f"expected top_left and size of shape ({batch}, 2) and alpha of shape ({batch},), "
            f"got {tuple(top_left.shape)}, {tuple(size.shape)} and {tuple(alpha.shape)}"
        )
    limits = torch.tensor(x1.shape[-2:], device=top_left.device) - margin
    outside = (size < 1).any(1) | (top_left < margin).any(1) | (top_left + size > limits).any(1)
    if outside.any():
        index = int(outside.nonzero()[0, 0])
        raise InvalidInputError(
            f"patch {index} at top_left {top_left[index].tolist()} of size {size[index].tolist()} does not lie inside the "
            f"{x1.shape[-2]}x{x1.shape[-1]} slice with a margin of {margin} pixels"
        )
    if not ((alpha >= 0) & (alpha <= 1)).all():
        raise InvalidInputError(f"interpolation factors must lie in [0, 1], got {alpha.tolist()}")


def _label(x1: Tensor, x2: Tensor, inside: Tensor, alpha: Tensor) -> Tensor:
    """Return float32 ``alpha`` on patch pixels where ``x1`` and ``x2`` differ in some channel, else 0."""
    changed = inside & (x1 != x2).any(dim=1, keepdim=True)
    return torch.where(changed, alpha.to(device=x1.device, dtype=torch.float32).view(-1, 1, 1, 1), 0.0)


def foreign_patch_interpolation(x1: Tensor, x2: Tensor, top_left: Tensor, size: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Blend a patch of ``x2`` into ``x1``: ``(1 - alpha) x1 + alpha x2`` inside the patch, ``x1`` outside.

    Args:
        x1: Slices, float ``(batch, channels, height, width)``.
        x2: Foreign slices of the same shape.
        top_left: int64 ``(batch, 2)``, row and column of each patch's first pixel.
        size: int64 ``(batch, 2)``, height and width of each patch.
        alpha: Interpolation factors in [0, 1], ``(batch,)``.

    Returns:
        ``(blended, label)``: blended slices like ``x1``, and float32 labels
        ``(batch, 1, height, width)`` that are ``alpha`` inside the patch where ``x1``
        and ``x2`` differ in some channel and 0 elsewhere. ``alpha = 0`` returns ``x1``
        and ``alpha = 1`` puts ``x2`` into the patch, both exactly.

    Raises:
        InvalidInputError: If the shapes do not fit, a patch reaches outside the
            slice or an ``alpha`` is outside [0, 1].
    """
    _validate_blend_input(x1, x2, top_left, size, alpha, margin=0)
    inside = patch_mask(x1.shape[-2:], top_left.to(x1.device), size.to(x1.device))
    weight = alpha.to(device=x1.device, dtype=x1.dtype).view(-1, 1, 1, 1)
    blended = torch.where(inside, (1 - weight) * x1 + weight * x2, x1)
    return blended, _label(x1, x2, inside, alpha)


@functools.lru_cache(maxsize=FACTORIZATION_CACHE_SIZE)
def dirichlet_laplacian_factorization(height: int, width: int) -> scipy.sparse.linalg.SuperLU:
    """Return the LU factorization of the 5-point Laplacian on a ``height x width`` patch with Dirichlet boundary.

    Row ``r * width + c`` of the matrix is the equation of pixel ``(r, c)``: 4 on
    the diagonal and -1 for each 4-neighbour inside the patch. Neighbours
    outside the patch have known values and go to the right-hand side. The
    matrix depends only on the shape, so factorizations are cached per shape.
    """
    def second_difference(n: int) -> scipy.sparse.spmatrix:
        return scipy.sparse.diags([-np.ones(n - 1), 2 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1])

    laplacian = scipy.sparse.kron(scipy.sparse.identity(height), second_difference(width)) + scipy.sparse.kron(
        second_difference(height), scipy.sparse.identity(width)
    )
    return scipy.sparse.linalg.splu(scipy.sparse.csc_matrix(laplacian))


def _mixed_guidance(source: np.ndarray, foreign: np.ndarray, alpha: float) -> np.ndarray:
    """Return the divergence term of PII's guidance for the inner pixels of a patch crop.

    Args:
        source, foreign: float64 ``(channels, height + 2, width + 2)``, the patch with its ring of neighbours.
        alpha: Interpolation factor.

    Returns:
        float64 ``(channels, height, width)``: for each patch pixel ``p``, the sum over
        its 4-neighbours ``q`` of ``(1 - alpha) (x1_p - x1_q)`` or ``alpha (x2_p - x2_q)``,
        whichever is larger in magnitude (the ``x2`` term on ties).
    """
    total = np.zeros((source.shape[0], source.shape[1] - 2, source.shape[2] - 2))
    neighbours = ((slice(None, -2), slice(1, -1)), (slice(2, None), slice(1, -1)), (slice(1, -1), slice(None, -2)), (slice(1, -1), slice(2, None)))
    for rows, columns in neighbours:
        own = (1 - alpha) * (source[:, 1:-1, 1:-1] - source[:, rows, columns])
        foreign_difference = alpha * (foreign[:, 1:-1, 1:-1] - foreign[:, rows, columns])
        total += np.where(np.abs(own) > np.abs(foreign_difference), own, foreign_difference)
    return total


def poisson_image_interpolation(
    x1: Tensor, x2: Tensor, top_left: Tensor, size: Tensor, alpha: Tensor, *, clip_range: tuple[float, float] | None = None
) -> tuple[Tensor, Tensor]:
    """Blend a patch of ``x2`` into ``x1`` in the gradient domain (Poisson image interpolation).

    Inside the patch the result ``u`` solves, for every pixel ``p`` and its
    4-neighbours ``q``, ``sum_q (u_p - u_q) = sum_q v_pq`` with ``u_q = x1_q`` for
    neighbours outside the patch (Dirichlet boundary). The guidance ``v_pq`` is
    ``(1 - alpha)(x1_p - x1_q)`` or ``alpha (x2_p - x2_q)``, whichever is larger in
    magnitude. Each slice and channel is one sparse solve in float64 with a
    cached LU factorization per patch shape, on the CPU.

    Args:
        x1: Slices, float ``(batch, channels, height, width)``.
        x2: Foreign slices of the same shape.
        top_left: int64 ``(batch, 2)``, row and column of each patch's first pixel.
        size: int64 ``(batch, 2)``, height and width of each patch.
        alpha: Interpolation factors in [0, 1], ``(batch,)``.
        clip_range: ``(low, high)`` to clip the patch pixels to, or None to return
            the exact solution. Pixels outside the patches are never clipped.

    Returns:
        ``(blended, label)`` as :func:`foreign_patch_interpolation`, on ``x1``'s device
        and in its dtype. ``alpha = 0`` reproduces ``x1`` up to solver precision, and
        ``alpha = 1`` is Poisson cloning of ``x2``'s patch into ``x1``.

    Raises:
        InvalidInputError: If the shapes do not fit, a patch is not at least
            ``PATCH_MARGIN`` pixels inside the slice or an ``alpha`` is outside [0, 1].
    """
    # 1. Validate and move everything to float64 NumPy arrays.
    _validate_blend_input(x1, x2, top_left, size, alpha, margin=PATCH_MARGIN)
    source = x1.detach().to("cpu", torch.float64).numpy()
    foreign = x2.detach().to("cpu", torch.float64).numpy()
    blended = source.copy()
    corners, sizes, factors = top_left.tolist(), size.tolist(), alpha.tolist()

    # 2. One Dirichlet problem per slice, all channels at once.
    for index, ((row, column), (height, width), factor) in enumerate(zip(corners, sizes, factors)):
        crop = (slice(None), slice(row - 1, row + height + 1), slice(column - 1, column + width + 1))
        ring = source[index][crop]
        right_side = _mixed_guidance(ring, foreign[index][crop], factor)
        right_side[:, 0, :] += ring[:, 0, 1:-1]
        right_side[:, -1, :] += ring[:, -1, 1:-1]
        right_side[:, :, 0] += ring[:, 1:-1, 0]
        right_side[:, :, -1] += ring[:, 1:-1, -1]
        channels = right_side.shape[0]
        solution = dirichlet_laplacian_factorization(height, width).solve(np.ascontiguousarray(right_side.reshape(channels, -1).T))
        patch = solution.T.reshape(channels, height, width)
        if clip_range is not None:
            patch = np.clip(patch, *clip_range)
        blended[index, :, row : row + height, column : column + width] = patch

    # 3. Back to the input's device and dtype, with the label of FPI.
    inside = patch_mask(x1.shape[-2:], top_left.to(x1.device), size.to(x1.device))
    result = torch.from_numpy(blended).to(device=x1.device, dtype=x1.dtype)
    return result, _label(x1, x2, inside, alpha)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: BatchNorm, ReLU, 3x3 convolution, twice, plus a shortcut.

    The first convolution has stride ``stride``. The shortcut is the identity
    when the shape is kept and a bias-free 1x1 convolution of the activated
    input otherwise, as in Tan's wide residual blocks.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = None if in_channels == out_channels and stride == 1 else nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, inputs: Tensor) -> Tensor:
        activated = self.relu(self.norm1(inputs))
        hidden = self.conv2(self.relu(self.norm2(self.conv1(activated))))
        return hidden + (inputs if self.shortcut is None else self.shortcut(activated))


class PatchInterpolationNet(nn.Module):
    """Residual U-Net that maps grey slices to one logit per pixel.

    Level ``i`` (0 to ``depth``) has ``width * 2**i`` channels at ``1 / 2**i``
    of the input size. The encoder is a 3x3 stem convolution and one residual
    block per level, downsampling by a stride-2 block. The decoder upsamples by
    2 (nearest neighbour), concatenates the encoder output of the same level
    and applies one residual block. A BatchNorm, ReLU and 1x1 convolution give
    the logit. With ``width = 8`` and ``depth = 4`` it has about 0.5 million parameters.

    Attributes:
        depth: Number of 2x downsamplings; inputs must be multiples of ``2**depth``.
    """

    def __init__(self, width: int = WIDTH, depth: int = DEPTH, in_channels: int = 1) -> None:
        super().__init__()
        if width < 1 or depth < 1 or in_channels < 1:
            raise InvalidInputError(f"invalid network size width={width}, depth={depth}, in_channels={in_channels}: expected positive integers")
        self.depth = depth
        channels = [width * 2**level for level in range(depth + 1)]

        # 1. Encoder: stem, one block at full resolution, one strided block per level below.
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.encoder = nn.ModuleList([ResidualBlock(width, width)])
        self.encoder.extend(ResidualBlock(channels[level - 1], channels[level], stride=2) for level in range(1, depth + 1))

        # 2. Decoder: from the bottleneck up, each block takes the upsampled input and the skip connection.
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.decoder = nn.ModuleList(ResidualBlock(channels[level] + channels[level - 1], channels[level - 1]) for level in range(depth, 0, -1))
        self.head = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 1, 1))

        # 3. He initialization of every convolution, as Tan's network (he_normal),
        # and an output bias that starts at the mean label.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.constant_(self.head[-1].bias, math.log(INITIAL_PROBABILITY / (1 - INITIAL_PROBABILITY)))

    def forward(self, images: Tensor) -> Tensor:
        """Return logits of shape ``(batch, 1, height, width)`` for slices ``(batch, in_channels, height, width)``.

        Raises:
            InvalidInputError: If the height or width is not a multiple of ``2**depth``.
        """
        height, width = images.shape[-2:]
        if height % 2**self.depth or width % 2**self.depth:
            raise InvalidInputError(f"invalid slice size {height}x{width}: this network needs multiples of {2**self.depth}")

        hidden = self.stem(images)
        skips = []
        for block in self.encoder:
            hidden = block(hidden)
            skips.append(hidden)

        skips.pop()  # the bottleneck itself
        for block in self.decoder:
            hidden = block(torch.cat([self.upsample(hidden), skips.pop()], dim=1))
        return self.head(hidden)
