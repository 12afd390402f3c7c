"""The interface every anomaly localization method implements, and the registry of methods by name.

A method is an ``nn.Module`` built from its config settings, a seed and the
slice size. Trainable methods take one optimization step at a time on a batch
of healthy slices; statistical methods fit once on all of them. Every method
predicts an anomaly map per slice (higher is more anomalous) and, optionally,
its own image-level score. The training loop (:mod:`sfae.training`) and the
evaluation (:mod:`sfae.evaluation.evaluate`) only see this interface, so a new
method needs one module and one :func:`register` call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sfae.io import InvalidInputError

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    """Output of :meth:`AnomalyMethod.predict` for a batch of slices.

    Attributes:
        maps: Anomaly maps, float32, shape ``(batch, 1, height, width)``, at the
            input's size; higher values are more anomalous.
        scores: Image-level anomaly scores, float32, shape ``(batch,)``, or None
            to score each slice from its map (mean of the top 10 % brain pixels).
    """

    maps: Tensor
    scores: Tensor | None = None


class AnomalyMethod(nn.Module):
    """Base class of the methods.

    Subclasses set :attr:`name`, build their networks in ``__init__`` and
    implement :meth:`loss` (or override :meth:`training_step`) and
    :meth:`predict`. Statistical methods set :attr:`trainable` to False and
    implement :meth:`fit` instead.

    Attributes:
        name: Registry name, as in the config's ``methods`` section.
        trainable: Whether the method is trained by gradient steps.
        settings: The method's settings from the config.
        seed: Training seed of this run.
        image_size: Height and width of the slices in pixels.
    """

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = True

    def __init__(self, settings: Mapping[str, Any], *, seed: int, image_size: int) -> None:
        super().__init__()
        self.settings = dict(settings)
        self.seed = seed
        self.image_size = image_size

    def configure_optimizers(self, learning_rate: float) -> dict[str, torch.optim.Optimizer]:
        """Return the optimizers by name; by default one Adam over every parameter that requires gradients."""
        parameters = [parameter for parameter in self.parameters() if parameter.requires_grad]
        return {"adam": torch.optim.Adam(parameters, lr=learning_rate)}

    def loss(self, images: Tensor, masks: Tensor) -> Tensor:
        """Return the scalar training loss of a batch of healthy slices (with gradients).

        Args:
            images: float32, ``(batch, 1, height, width)``, in [0, 1].
            masks: bool, ``(batch, 1, height, width)``, brain masks.
        """
        raise NotImplementedError(f"method {self.name} implements neither loss() nor training_step()")

    def training_step(self, images: Tensor, masks: Tensor, step: int, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]:
        """Take one optimization step on a batch and return the logged loss values.

        The default computes :meth:`loss`, backpropagates it and steps the one
        optimizer. Methods with several phases or optimizers (f-AnoGAN)
        override it; ``step`` counts from 0 over the whole training.
        """
        (optimizer,) = optimizers.values()
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(images, masks)
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}

    def fit(self, images: Tensor, masks: Tensor, slice_index: Tensor) -> None:
        """Fit a statistical method on all training slices at once (methods with ``trainable = False``).

        Args:
            images: float32, ``(n, 1, height, width)``, in [0, 1].
            masks: bool, ``(n, 1, height, width)``, brain masks.
            slice_index: int64, ``(n,)``, each slice's axial index on the atlas
                grid, for methods with statistics per position (BM).
        """
        raise NotImplementedError(f"method {self.name} is trained by gradient steps, not fitted")

    def predict(self, images: Tensor, masks: Tensor, slice_index: Tensor | None = None) -> Prediction:
        """Return anomaly maps (and optionally image scores) for a batch of slices, in evaluation mode.

        Args:
            images: float32, ``(batch, 1, height, width)``, in [0, 1].
            masks: bool, ``(batch, 1, height, width)``, brain masks.
            slice_index: int64, ``(batch,)``, axial indices on the atlas grid;
                methods that do not need them ignore them.
        """
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Return what a report must state about this run (for example the extractor weights)."""
        return {"method": self.name, "settings": self.settings}


METHODS: dict[str, type[AnomalyMethod]] = {}


def register(method: type[AnomalyMethod]) -> type[AnomalyMethod]:
    """Add a method class to the registry under its :attr:`~AnomalyMethod.name` (a class decorator).

    Raises:
        ValueError: If the name is empty or taken.
    """
    if not method.name or method.name in METHODS:
        raise ValueError(f"method name {method.name!r} is empty or registered twice")
    METHODS[method.name] = method
    return method


def build_method(name: str, settings: Mapping[str, Any], *, seed: int, image_size: int) -> AnomalyMethod:
    """Build a registered method from its config settings.

    Raises:
        InvalidInputError: If no method of that name is registered.
    """
    if name not in METHODS:
        raise InvalidInputError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](settings, seed=seed, image_size=image_size)
