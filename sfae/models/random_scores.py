"""The Random floor: uniform random anomaly maps and image scores.

Its metrics are what a method without any information reaches: Pixel-AP close
to the fraction of anomalous pixels, Image-AUROC close to 0.5.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from sfae.models.base import AnomalyMethod, Prediction, register


@register
class RandomScores(AnomalyMethod):
    """Uniform scores in [0, 1) from a generator seeded with the run's seed; nothing to train."""

    name = "random"
    trainable = False

    def __init__(self, settings: Mapping[str, Any], *, seed: int, image_size: int) -> None:
        super().__init__(settings, seed=seed, image_size=image_size)
        self.generator = torch.Generator().manual_seed(seed)

    def fit(self, images: Tensor, masks: Tensor, slice_index: Tensor) -> None:
        """Do nothing: uniform scores need no training data."""

    def predict(self, images: Tensor, masks: Tensor, slice_index: Tensor | None = None) -> Prediction:
        """Return uniform maps and independent uniform image scores, drawn in batch order on the CPU."""
        batch = images.shape[0]
        maps = torch.rand(images.shape, generator=self.generator, dtype=torch.float32)
        scores = torch.rand(batch, generator=self.generator, dtype=torch.float32)
        return Prediction(maps=maps.to(images.device), scores=scores.to(images.device))
