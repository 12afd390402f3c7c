"""Frozen multi-layer ResNet18 feature extractor of SFAE.

A grey-value slice is passed through the first stages of a torchvision
ResNet18. The outputs of the chosen stages are resized bilinearly to the
largest of them and concatenated along channels. The extractor is frozen: it
stays in eval mode whatever mode its parent is put in, its parameters do not
require gradients, and its forward pass runs without autograd, so neither the
weights nor the BatchNorm running statistics ever change.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet, ResNet18_Weights, resnet18

from sfae.io import InvalidInputError

logger = logging.getLogger(__name__)

# Stages of a torchvision ResNet18 that can be extracted, in network order, with
# their output channels and their stride relative to the input image.
# "layer0" is the stem: conv1, bn1, relu and maxpool.
LAYER_CHANNELS = {"layer0": 64, "layer1": 64, "layer2": 128, "layer3": 256}
LAYER_STRIDES = {"layer0": 4, "layer1": 4, "layer2": 8, "layer3": 16}
LAYER_NAMES = tuple(LAYER_CHANNELS)

# Layers 0, 1 and 2 (64 + 64 + 128 = 256 channels), the default of the SFAE
# reference code (fae/configs/base_config.py).
DEFAULT_LAYERS = ("layer0", "layer1", "layer2")

IMAGENET_WEIGHTS = ResNet18_Weights.IMAGENET1K_V1
# Seconds to wait for the download server before giving up on the ImageNet
# weights, so an offline compute node fails at once instead of hanging.
DOWNLOAD_TIMEOUT_S = 30.0

# The SFAE reference code (FeliMe/feature-autoencoder, fae/models/feature_extractor.py)
# maps slices with intensities in [0, 1] to [-1, 1] before the ResNet, instead of
# the ImageNet mean and standard deviation. This module does the same, so the
# features match the ones behind the published numbers.
INPUT_CENTER = 0.5
INPUT_SCALE = 2.0


class ResNet18FeatureExtractor(nn.Module):
    """Frozen ResNet18 that maps grey slices to concatenated multi-layer feature maps.

    Attributes:
        layers: Extracted stages in network order.
        out_channels: Channels of the output, the sum over ``layers``.
        stride: Ratio between the input size and the output size (4 for layer0 or layer1,
            8 for layer2, 16 for layer3 as the largest map).
    """

    def __init__(self, layers: Sequence[str] = DEFAULT_LAYERS, weights: str | os.PathLike[str] = "random", seed: int = 0) -> None:
        """Build the extractor and load its weights.

        Args:
            layers: Stages to extract, any non-empty subset of ``LAYER_NAMES``. They are
                concatenated in network order whatever order they are given in.
            weights: ``"imagenet"`` for torchvision's ``IMAGENET1K_V1`` weights read from
                the torch hub cache, ``"random"`` for torchvision's random initialization
                drawn from ``seed``, or the path of a ResNet18 state dict file.
            seed: Seed of the random initialization. Ignored unless ``weights`` is ``"random"``.

        Raises:
            InvalidInputError: If a layer name is unknown or repeated, or the weights cannot be loaded.
        """
        super().__init__()
        self.layers = _validate_layers(layers)
        self.out_channels = sum(LAYER_CHANNELS[name] for name in self.layers)
        self.stride = LAYER_STRIDES[self.layers[0]]

        # 1. Load the full network, then keep only the stages that are used.
        network = load_resnet18(weights, seed)
        stages = {
            "layer0": nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool),
            "layer1": network.layer1,
            "layer2": network.layer2,
            "layer3": network.layer3,
        }
        last = LAYER_NAMES.index(self.layers[-1])
        self.stages = nn.ModuleDict({name: stages[name] for name in LAYER_NAMES[: last + 1]})

        # 2. Freeze.
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> ResNet18FeatureExtractor:
        """Keep eval mode whatever ``mode`` is, so BatchNorm running statistics never update."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Extract and concatenate the feature maps.

        Args:
            images: Grey slices with intensities in [0, 1], shape ``(batch, 1, height, width)``, float.

        Returns:
            Features of shape ``(batch, out_channels, h, w)`` without gradients, where
            ``(h, w)`` is the size of the largest extracted stage output, which is
            ``(height / stride, width / stride)`` when both are multiples of the stride.

        Raises:
            InvalidInputError: If ``images`` is not a float tensor with one channel.
        """
        if images.ndim != 4 or images.shape[1] != 1 or not images.is_floating_point():
            raise InvalidInputError(f"invalid feature extractor input: {images.dtype} of shape {tuple(images.shape)}, expected float slices of shape (batch, 1, height, width)")

        # 1. Center the intensities and repeat the grey channel for the RGB stem.
        hidden = ((images - INPUT_CENTER) * INPUT_SCALE).expand(-1, 3, -1, -1)

        # 2. Run the stages and keep the requested outputs.
        outputs = []
        for name, stage in self.stages.items():
            hidden = stage(hidden)
            if name in self.layers:
                outputs.append(hidden)

        # 3. Resize every map to the largest (the first) and concatenate.
        size = outputs[0].shape[-2:]
        resized = [output if output.shape[-2:] == size else F.interpolate(output, size=size, mode="bilinear", align_corners=False) for output in outputs]
        return torch.cat(resized, dim=1)


def load_resnet18(weights: str | os.PathLike[str], seed: int = 0) -> ResNet:
    """Build a torchvision ResNet18 with ImageNet, seeded random or file weights.

    Args:
        weights: ``"imagenet"``, ``"random"`` or the path of a ResNet18 state dict.
        seed: Seed of the random initialization, used only for ``"random"``. The global
            random number generator state is left unchanged.

    Returns:
        The network on the CPU, in eval mode.

    Raises:
        InvalidInputError: If the ImageNet weights are neither cached nor downloadable, or
            the state dict file is missing, unreadable or not a ResNet18 state dict.
    """
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = resnet18(weights=None)
        return network.eval()

    network = resnet18(weights=None)
    if weights == "imagenet":
        state_dict = _load_imagenet_state_dict()
        source = "torchvision ImageNet weights"
    else:
        state_dict = _read_state_dict(Path(weights))
        source = str(weights)
    try:
        network.load_state_dict(state_dict)
    except RuntimeError as error:
        raise InvalidInputError(f"{source} is not a torchvision ResNet18 state dict: {error}") from error
    return network.eval()


def imagenet_weights_path() -> Path:
    """Return where torchvision caches the ResNet18 ImageNet weights.

    This is ``torch.hub.get_dir()/checkpoints/resnet18-f37072fd.pth``, so it follows
    ``TORCH_HOME`` and ``torch.hub.set_dir``.
    """
    file_name = IMAGENET_WEIGHTS.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _load_imagenet_state_dict() -> dict[str, Tensor]:
    """Read the cached ImageNet weights, downloading them first if they are missing."""
    path = imagenet_weights_path()
    if not path.is_file():
        logger.info("downloading %s to %s", IMAGENET_WEIGHTS.url, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        hash_prefix = re.search(r"-([a-f0-9]+)\.", path.name).group(1)
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.download_url_to_file(IMAGENET_WEIGHTS.url, str(path), hash_prefix=hash_prefix, progress=False)
        except (OSError, URLError, RuntimeError) as error:
            raise InvalidInputError(
                f"the ResNet18 ImageNet weights are not cached and the download from {IMAGENET_WEIGHTS.url} failed ({error}). "
                f"Place the file {path.name} in {path.parent} (torch.hub.get_dir()/checkpoints), "
                "or set the extractor weights to 'random' or to the path of a ResNet18 state dict."
            ) from error
        finally:
            socket.setdefaulttimeout(previous_timeout)
    return _read_state_dict(path)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise InvalidInputError(f"ResNet18 weights file not found: {path}. Give the path of a state dict saved with torch.save(model.state_dict(), path), or use 'imagenet' or 'random'.")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises pickle, zip and runtime errors for corrupt files
        raise InvalidInputError(f"cannot read ResNet18 weights file {path}: {error}") from error
    if not isinstance(state_dict, dict):
        raise InvalidInputError(f"ResNet18 weights file {path} contains a {type(state_dict).__name__}, expected a state dict (a dict of tensors)")
    return state_dict


def _validate_layers(layers: Sequence[str]) -> tuple[str, ...]:
    """Return the layers in network order, rejecting unknown or repeated layers and an empty list."""
    if isinstance(layers, str):
        layers = (layers,)
    layers = tuple(layers)
    unknown = [name for name in layers if name not in LAYER_CHANNELS]
    if unknown:
        raise InvalidInputError(f"invalid feature extractor layer {unknown[0]!r}. Allowed layers are {', '.join(LAYER_NAMES)}.")
    if not layers or len(set(layers)) != len(layers):
        raise InvalidInputError(f"invalid feature extractor layers {list(layers)}: expected a non-empty list without repeats")
    return tuple(name for name in LAYER_NAMES if name in layers)
