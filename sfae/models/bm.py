"""BM: pixel-wise z-scores against the healthy training slices at the same atlas position.

Saase et al. 2020 ("Simple statistical methods for unsupervised brain anomaly
detection on MRI are competitive to deep learning methods") showed that
registered healthy scans are enough for a strong baseline: estimate the mean
and standard deviation of every voxel over the training scans and score a new
scan by its distance from the mean in standard deviations. The slices here are
registered to the atlas, so a slice position (the axial index on the atlas
grid) and a pixel name the same anatomy in every scan. The anomaly map is

    |x - mean[position, pixel]| / max(std[position, pixel], std_floor).

Choices and their sources:

- Standard deviations with Bessel's correction (ddof = 1), as in the BM
  baseline of the SFAE reference code (FeliMe/feature-autoencoder,
  fae/baselines/BM/trainer.py).
- Statistics only over the training slices in which the pixel is inside the
  brain mask. The reference code averages over all slices and so counts the
  background value 0 wherever a scan's brain ends earlier. That pulls the mean
  down and inflates the standard deviation along the brain border.
- Fallbacks, because a standard deviation needs ``MIN_SAMPLES`` = 2 values:
  a pixel with fewer brain samples at its position takes the statistics of the
  same pixel pooled over all training positions, and a pixel with fewer than 2
  pooled samples takes those of all training brain pixels. A position that
  never occurs in training uses the pooled statistics for all its pixels.
- ``std_floor`` = 0.01 (1 % of the [0, 1] intensity range) by default, which
  the reference code does not need. Its floor is 1e-7, which only prevents a
  division by zero. A pixel whose training values barely vary (for example
  one seen inside the brain in only two training slices) would otherwise score
  ``|x - mean| / 1e-7``, and such pixels would outrank every real anomaly.
  The floor also bounds the map by 1 / ``std_floor`` = 100, because both
  intensities and means lie in [0, 1]. The evaluation needs this, because it
  rounds maps to float16 (largest value 65504).

The statistics are buffers, so they are part of the state dict and of the
model file. Their number of positions is known only after :meth:`BMMethod.fit`,
and loading a state dict resizes them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from sfae.io import InvalidInputError
from sfae.models.base import AnomalyMethod, Prediction, register

logger = logging.getLogger(__name__)

DEFAULT_STD_FLOOR = 0.01
# Smallest floor whose largest possible z-score (1 / floor) still fits into float16.
MIN_STD_FLOOR = 1.0 / 65504.0
# Minimum number of samples for a standard deviation with Bessel's correction.
MIN_SAMPLES = 2
# Slices accumulated per step of the fit; two float64 buffers of 256 slices of 128 x 128 take 64 MiB.
FIT_CHUNK_SLICES = 256
STATISTICS_BUFFERS = ("positions", "mean", "std")


def position_statistics(images: Tensor, masks: Tensor, slice_index: Tensor, *, chunk_slices: int = FIT_CHUNK_SLICES, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Compute the mean and standard deviation of every pixel at every slice position over the brain pixels.

    The sums are accumulated in float64, ``chunk_slices`` slices at a time, on
    ``device``. Each chunk is copied there on its own, so the training slices
    can stay in CPU memory while the sums are on a GPU.

    Args:
        images: float ``(n, 1, height, width)``, intensities in [0, 1].
        masks: bool ``(n, 1, height, width)``, brain masks.
        slice_index: integer ``(n,)``, axial position of each slice on the atlas grid.
        chunk_slices: Slices per accumulation step.
        device: Device of the sums and results; None takes the device of ``images``.

    Returns:
        ``positions``: int64 ``(p,)``, the sorted distinct slice indices.
        ``mean`` and ``std``: float32 ``(p + 1, height, width)``. Row ``i < p`` belongs to
        ``positions[i]``, and row ``p`` contains the pooled statistics for unseen positions.
        ``pixel_sources``: int64 ``(3,)``, how many of the ``p * height * width`` pixel statistics
        are local, pooled over positions, or global (the fallbacks of the module docstring).

    Raises:
        InvalidInputError: If the shapes or dtypes do not fit, a slice index is negative,
            or the masks contain fewer than ``MIN_SAMPLES`` brain pixels.
    """
    _validate_training_set(images, masks, slice_index)
    device = images.device if device is None else torch.device(device)
    positions, rows = torch.unique(slice_index.to(device=device, dtype=torch.int64), sorted=True, return_inverse=True)
    shape = (positions.numel(), *images.shape[-2:])

    # 1. Count, sum and sum of squares of the brain intensities per position and pixel.
    # The chunk buffers are reused, so no large tensor is allocated per chunk.
    count = torch.zeros(shape, dtype=torch.float64, device=device)
    total = torch.zeros_like(count)
    squares = torch.zeros_like(count)
    brain_buffer = torch.empty((min(chunk_slices, images.shape[0]), *shape[1:]), dtype=torch.float64, device=device)
    value_buffer = torch.empty_like(brain_buffer)
    starts = range(0, images.shape[0], chunk_slices)
    for start in tqdm(starts, desc="BM statistics", unit="chunk", disable=None if len(starts) > 1 else True):
        part = slice(start, start + chunk_slices)
        chunk_rows = rows[part]
        brain = brain_buffer[: chunk_rows.numel()].copy_(masks[part, 0])
        values = value_buffer[: chunk_rows.numel()].copy_(images[part, 0]).mul_(brain)
        count.index_add_(0, chunk_rows, brain)
        total.index_add_(0, chunk_rows, values)
        squares.index_add_(0, chunk_rows, values.square_())

    # 2. Statistics per position, pooled over positions per pixel, and over all brain pixels.
    local_mean, local_std = _moments(count, total, squares)
    pooled_count = count.sum(dim=0)
    pooled_mean, pooled_std = _moments(pooled_count, total.sum(dim=0), squares.sum(dim=0))
    global_count = pooled_count.sum()
    if global_count < MIN_SAMPLES:
        raise InvalidInputError(f"the training masks contain {int(global_count)} brain pixels, but BM needs at least {MIN_SAMPLES} to estimate a standard deviation")
    global_mean, global_std = _moments(global_count, total.sum(), squares.sum())

    # 3. Fall back from local to pooled to global statistics where samples are too few.
    pooled_ok = pooled_count >= MIN_SAMPLES
    pooled_mean = torch.where(pooled_ok, pooled_mean, global_mean)
    pooled_std = torch.where(pooled_ok, pooled_std, global_std)
    local_ok = count >= MIN_SAMPLES
    mean = torch.where(local_ok, local_mean, pooled_mean)
    std = torch.where(local_ok, local_std, pooled_std)
    uses_pooled = ~local_ok & pooled_ok
    pixel_sources = torch.stack([local_ok.sum(), uses_pooled.sum(), (~local_ok & ~pooled_ok).sum()])

    return {
        "positions": positions,
        "mean": torch.cat([mean, pooled_mean[None]]).float(),
        "std": torch.cat([std, pooled_std[None]]).float(),
        "pixel_sources": pixel_sources.long(),
    }


def _moments(count: Tensor, total: Tensor, squares: Tensor) -> tuple[Tensor, Tensor]:
    """Return the mean and the ddof = 1 standard deviation from sums; entries with fewer than 2 samples are 0."""
    safe = count.clamp_min(MIN_SAMPLES)
    mean = torch.where(count > 0, total / count.clamp_min(1), 0.0)
    variance = ((squares - total * mean) / (safe - 1)).clamp_min(0.0)
    return mean, torch.where(count >= MIN_SAMPLES, variance.sqrt(), 0.0)


def _validate_training_set(images: Tensor, masks: Tensor, slice_index: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 1 or not images.is_floating_point():
        raise InvalidInputError(f"invalid BM training images: {images.dtype} of shape {tuple(images.shape)}, expected float (n, 1, height, width)")
    if masks.shape != images.shape or masks.dtype != torch.bool:
        raise InvalidInputError(f"invalid BM training masks: {masks.dtype} of shape {tuple(masks.shape)}, expected bool of the images' shape {tuple(images.shape)}")
    if slice_index.shape != images.shape[:1] or slice_index.is_floating_point() or slice_index.dtype == torch.bool:
        raise InvalidInputError(f"invalid BM slice_index: {slice_index.dtype} of shape {tuple(slice_index.shape)}, expected integers of shape ({images.shape[0]},)")
    if images.shape[0] == 0:
        raise InvalidInputError("BM needs at least one training slice, got none")
    if int(slice_index.min()) < 0:
        raise InvalidInputError(f"invalid BM slice_index {int(slice_index.min())}: slice positions are axial indices on the atlas grid, 0 or more")


@register
class BMMethod(AnomalyMethod):
    """BM as a benchmark method: fitted once, no gradient steps.

    Settings (config ``methods.bm``): ``std_floor``, the smallest standard
    deviation that a z-score divides by, in intensity units.

    Attributes:
        std_floor: The floor in intensity units.
        positions: Buffer, int64 ``(p,)``, the fitted slice positions; empty before :meth:`fit`.
        mean: Buffer, float32 ``(p + 1, image_size, image_size)``; the last row is the pooled fallback.
        std: Buffer, float32, shaped like ``mean``; not floored.
    """

    name = "bm"
    trainable = False

    def __init__(self, settings: Mapping[str, Any], *, seed: int, image_size: int) -> None:
        super().__init__(settings, seed=seed, image_size=image_size)
        floor = settings.get("std_floor", DEFAULT_STD_FLOOR)
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not math.isfinite(floor) or floor < MIN_STD_FLOOR:
            raise InvalidInputError(
                f"invalid std_floor {floor!r}: expected a number of at least {MIN_STD_FLOOR:.3g} (intensity units), "
                "so that z-scores of intensities in [0, 1] stay within float16 range"
            )
        self.std_floor = float(floor)
        self.register_buffer("positions", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("mean", torch.zeros(0, image_size, image_size))
        self.register_buffer("std", torch.zeros(0, image_size, image_size))
        self._fit_summary: dict[str, Any] = {}
        self._warned_positions: set[int] = set()

    def fit(self, images: Tensor, masks: Tensor, slice_index: Tensor) -> None:
        """Estimate the statistics of every position and pixel from all training slices.

        The sums are accumulated on the device of this method's buffers, so the
        slices may stay in CPU memory (see :func:`position_statistics`).

        Raises:
            InvalidInputError: As :func:`position_statistics`, or if the slices are not ``image_size`` square.
        """
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise InvalidInputError(f"BM was built for {self.image_size}x{self.image_size} slices, got training slices of shape {tuple(images.shape)}")
        statistics = position_statistics(images, masks, slice_index, device=self.mean.device)
        for name in STATISTICS_BUFFERS:
            setattr(self, name, statistics[name])

        local, pooled, global_ = (int(value) for value in statistics["pixel_sources"])
        total = local + pooled + global_
        self._fit_summary = {
            "positions": statistics["positions"].tolist(),
            "training_slices": int(images.shape[0]),
            "pixel_statistics_local": local,
            "pixel_statistics_pooled_over_positions": pooled,
            "pixel_statistics_global": global_,
        }
        logger.info(
            "BM fitted on %d slices at %d positions; pixel statistics: %.1f %% local, %.1f %% pooled over positions, %.1f %% global",
            images.shape[0], statistics["positions"].numel(), 100 * local / total, 100 * pooled / total, 100 * global_ / total,
        )

    def predict(self, images: Tensor, masks: Tensor, slice_index: Tensor | None = None) -> Prediction:
        """Return ``|x - mean| / max(std, std_floor)`` per pixel, float32 ``(batch, 1, height, width)``.

        Slices at positions that were not fitted use the pooled statistics, with a
        warning once per position. Image scores come from the maps.

        Raises:
            InvalidInputError: If the method is not fitted, ``slice_index`` is missing or does
                not have one entry per slice, or the slices are not ``image_size`` square.
        """
        if self.positions.numel() == 0:
            raise InvalidInputError("BM is not fitted: call fit() on the training slices, or load a model file written by training")
        if slice_index is None:
            raise InvalidInputError("BM needs the slice_index of every slice, the axial position whose statistics it compares with")
        if images.ndim != 4 or images.shape[1] != 1 or tuple(images.shape[-2:]) != tuple(self.mean.shape[-2:]):
            raise InvalidInputError(f"invalid BM input shape {tuple(images.shape)}: expected (batch, 1, {self.mean.shape[-2]}, {self.mean.shape[-1]})")
        if slice_index.shape != images.shape[:1]:
            raise InvalidInputError(f"invalid BM slice_index of shape {tuple(slice_index.shape)}: expected one entry per slice, ({images.shape[0]},)")

        # 1. Row of every slice's position, or the pooled row for unseen positions.
        slice_index = slice_index.to(device=self.positions.device, dtype=torch.int64)
        rows = torch.searchsorted(self.positions, slice_index).clamp_max(self.positions.numel() - 1)
        seen = self.positions[rows] == slice_index
        rows = torch.where(seen, rows, self.positions.numel())
        self._warn_unseen(slice_index[~seen])

        # 2. Absolute z-scores.
        mean = self.mean[rows].unsqueeze(1)
        std = self.std[rows].unsqueeze(1).clamp_min(self.std_floor)
        maps = (images.to(device=mean.device, dtype=torch.float32) - mean).abs() / std
        return Prediction(maps=maps.to(images.device))

    def _warn_unseen(self, unseen: Tensor) -> None:
        new = sorted(set(unseen.tolist()) - self._warned_positions)
        if new:
            self._warned_positions.update(new)
            logger.warning("slice positions %s were not in the BM training set; their maps use the statistics pooled over all positions", new)

    def describe(self) -> dict[str, Any]:
        """Return the method, its settings, the floor and a summary of the fit (empty before :meth:`fit`)."""
        return {**super().describe(), "std_floor": self.std_floor, "fit": dict(self._fit_summary)}

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *arguments: Any) -> None:
        """Resize the statistics buffers to the stored number of positions before they are copied."""
        for name in STATISTICS_BUFFERS:
            stored = state_dict.get(prefix + name)
            current = getattr(self, name)
            # Only the number of positions may differ. Another slice size is left to
            # the size check of nn.Module, which reports the mismatch.
            if isinstance(stored, Tensor) and stored.ndim == current.ndim and stored.shape[1:] == current.shape[1:]:
                setattr(self, name, torch.empty(stored.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *arguments)
