"""Frozen multi-scale VGG19 feature extractor of DFR.

Deep Feature Reconstruction (Shi et al. 2020, "Unsupervised anomaly
segmentation via deep feature reconstruction", Neurocomputing) describes every
pixel by the outputs of several ReLU layers of an ImageNet VGG19. Each output
map is resized bilinearly to the input size and averaged over non-overlapping
``stride`` x ``stride`` blocks, which gives every layer the same resolution
(input size / ``stride``). The maps are then concatenated along channels.

Choices and their sources:

- Layers relu1_1 to relu4_4 (12 maps, 3456 channels) by default. These are the
  layers of the DFR authors' experiments (YoungGod/DFR, DFR-source/main.py)
  and of the DFR baseline in the Structural Feature-Autoencoder reference code
  (FeliMe/feature-autoencoder, fae/baselines/DFR/model.py, ``VGG19LAYERS[:12]``).
- Block stride 4: both codes resize to the input size and average 4 x 4 blocks
  with stride 4, so 128 x 128 slices give 32 x 32 feature maps.
- Resizing uses ``align_corners=False``, where both codes use ``True``. Then
  the feature pixel of each block sits at the block's centre for every layer,
  and the maps line up with those of the SFAE ResNet18 extractor.
- Torchvision's VGG19 with zero padding, as in the SFAE reference code. The
  DFR authors' own VGG pads by reflection.
- Inputs in [0, 1] are mapped to [-1, 1] and the grey channel is repeated to
  RGB, as in :mod:`sfae.models.feature_extractor`, so that every feature
  method gets the same input. The SFAE reference code's DFR passes [0, 1]
  unchanged, and the DFR authors normalize with the ImageNet mean and
  standard deviation (DFR-source/MVTec.py).

Resizing and block averaging are both linear, and they act on the rows and the
columns separately. Each layer's map is therefore reduced by one small matrix
per axis (:func:`aggregation_matrix`). The full-size resized maps (3456
channels at the input size) are never stored.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from urllib.error import URLError

import torch
from torch import Tensor, nn
from torchvision.models import VGG19_Weights

from sfae.io import InvalidInputError
from sfae.models.feature_extractor import DOWNLOAD_TIMEOUT_S, INPUT_CENTER, INPUT_SCALE

logger = logging.getLogger(__name__)

# Output channels of the convolutions of torchvision's VGG19 ("configuration E"
# of Simonyan and Zisserman 2015), with "M" for a 2 x 2 max pooling.
VGG19_CONFIGURATION = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def _relu_layers() -> dict[str, tuple[int, int, int]]:
    """Return ``{name: (index in vgg19().features, channels, stride)}`` for the 16 ReLU layers."""
    layers = {}
    index, block, convolution, stride = 0, 1, 0, 1
    for entry in VGG19_CONFIGURATION:
        if entry == "M":
            index += 1
            block, convolution, stride = block + 1, 0, stride * 2
            continue
        convolution += 1
        layers[f"relu{block}_{convolution}"] = (index + 1, entry, stride)
        index += 2
    return layers


# ReLU layer name -> (index of the ReLU in torchvision's ``vgg19().features``,
# output channels, stride relative to the input). relu1_1 is index 1, relu4_4 index 26.
RELU_LAYERS = _relu_layers()
LAYER_NAMES = tuple(RELU_LAYERS)
DEFAULT_LAYERS = LAYER_NAMES[:12]
# Block size and stride of the feature averaging (both DFR codes use 4 x 4 blocks, stride 4).
DEFAULT_FEATURE_STRIDE = 4

IMAGENET_WEIGHTS = VGG19_Weights.IMAGENET1K_V1


class VGG19FeatureExtractor(nn.Module):
    """Frozen VGG19 that maps grey slices to concatenated, block-averaged ReLU feature maps.

    Only the convolutions up to the deepest requested layer are built. Their
    state dict keys are those of torchvision's ``vgg19().features``
    (``features.0.weight`` and so on).

    Attributes:
        layers: Extracted ReLU layers in network order.
        feature_stride: Ratio between the input size and the output size.
        out_channels: Channels of the output, the sum over ``layers``.
        input_multiple: Number that the input height and width must be multiples of:
            ``feature_stride`` and the stride of the deepest layer (8 for relu4_*).
        weights_source: Where the weights came from, for reports.
        features: The convolutions, ReLUs and max poolings, indexed as in torchvision.
    """

    def __init__(
        self,
        layers: Sequence[str] = DEFAULT_LAYERS,
        weights: str | os.PathLike[str] = "random",
        seed: int = 0,
        feature_stride: int = DEFAULT_FEATURE_STRIDE,
    ) -> None:
        """Build the extractor and load its weights.

        Args:
            layers: ReLU layers to extract, a non-empty subset of ``LAYER_NAMES``
                (``relu1_1`` to ``relu5_4``). They are concatenated in network
                order whatever order they are given in.
            weights: ``"imagenet"`` for torchvision's ``IMAGENET1K_V1`` weights read from
                the torch hub cache (downloaded when missing), ``"random"`` for
                torchvision's VGG initialization drawn from ``seed``, or the path of a
                state dict with the keys of torchvision's ``vgg19().features``
                (``features.N.weight`` and ``features.N.bias``).
            seed: Seed of the random initialization. Ignored unless ``weights`` is ``"random"``.
            feature_stride: Block size and stride of the feature averaging, in input pixels.

        Raises:
            InvalidInputError: If a layer name is unknown or repeated, ``feature_stride`` is
                not a positive integer, or the weights cannot be loaded.
        """
        super().__init__()
        self.layers = validate_layers(layers)
        if isinstance(feature_stride, bool) or not isinstance(feature_stride, int) or feature_stride < 1:
            raise InvalidInputError(f"invalid feature_stride {feature_stride!r}: expected a positive integer number of pixels")
        self.feature_stride = feature_stride
        self.out_channels = sum(RELU_LAYERS[name][1] for name in self.layers)
        self.input_multiple = math.lcm(feature_stride, RELU_LAYERS[self.layers[-1]][2])
        self._capture = {RELU_LAYERS[name][0]: name for name in self.layers}

        # 1. Build the layers up to the deepest requested ReLU and load their weights.
        self.features, self.weights_source = load_vgg19_features(RELU_LAYERS[self.layers[-1]][0] + 1, weights, seed)

        # 2. Freeze.
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> VGG19FeatureExtractor:
        """Keep eval mode whatever ``mode`` is, so the extractor behaves the same in training and evaluation."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Extract, resize, block-average and concatenate the feature maps.

        Args:
            images: Grey slices with intensities in [0, 1], float, shape
                ``(batch, 1, height, width)``; height and width multiples of ``input_multiple``.

        Returns:
            Features of shape ``(batch, out_channels, height / feature_stride, width / feature_stride)``,
            dtype of ``images``, without gradients.

        Raises:
            InvalidInputError: If ``images`` is not a float tensor with one channel, or its
                height or width is not a multiple of ``input_multiple``.
        """
        if images.ndim != 4 or images.shape[1] != 1 or not images.is_floating_point():
            raise InvalidInputError(f"invalid feature extractor input: {images.dtype} of shape {tuple(images.shape)}, expected float slices of shape (batch, 1, height, width)")
        height, width = images.shape[-2:]
        if height % self.input_multiple or width % self.input_multiple:
            raise InvalidInputError(
                f"invalid slice size {height}x{width}: VGG19 features of layers up to {self.layers[-1]} with feature_stride "
                f"{self.feature_stride} need height and width that are multiples of {self.input_multiple}"
            )

        # 1. Centre the intensities and repeat the grey channel for the RGB input. Channels-last
        # layout made the convolutions about 15 % faster on a 2-core AMD EPYC, and each requested
        # map can then be reduced by two matrix products without reordering its memory.
        hidden = ((images - INPUT_CENTER) * INPUT_SCALE).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)

        # 2. Run the network. Each requested ReLU output is reduced to the output size at
        # once, so that at most one full-resolution map per layer is alive.
        outputs = []
        for index, module in enumerate(self.features):
            hidden = module(hidden)
            if index in self._capture:
                rows = aggregation_matrix(hidden.shape[-2], height, self.feature_stride, dtype=hidden.dtype, device=hidden.device)
                columns = aggregation_matrix(hidden.shape[-1], width, self.feature_stride, dtype=hidden.dtype, device=hidden.device)
                outputs.append(_aggregate(hidden, rows, columns))

        # 3. Concatenate along channels in the standard layout, because sfae.ssim was two to five
        # times slower on channels-last maps. The 1x1 convolutions are as fast on either.
        return torch.cat(outputs, dim=1).contiguous()


def _aggregate(feature_map: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """Return ``rows @ feature_map @ columns.T`` for every channel, computed as two large matrix products.

    Args:
        feature_map: ``(batch, channels, height, width)``, best in channels-last layout.
        rows: ``(out_height, height)``.
        columns: ``(out_width, width)``.

    Returns:
        ``(batch, channels, out_height, out_width)``, a channels-last view.
    """
    batch, channels, height, width = feature_map.shape
    pixels_last = feature_map.permute(0, 2, 3, 1).reshape(batch, height, width * channels)
    reduced = torch.matmul(rows, pixels_last).reshape(batch * rows.shape[0], width, channels)
    reduced = torch.matmul(columns, reduced)
    return reduced.reshape(batch, rows.shape[0], columns.shape[0], channels).permute(0, 3, 1, 2)


def aggregation_matrix(source_size: int, image_size: int, stride: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Build the matrix that resizes one axis to ``image_size`` and averages blocks of ``stride`` pixels.

    Resizing is bilinear with ``align_corners=False``, as ``torch.nn.functional.interpolate``
    does it (source coordinates below 0 are clamped to 0). Row ``j`` of the result
    averages the resized pixels ``j * stride`` to ``(j + 1) * stride - 1``. For a map
    ``X`` of shape ``(..., source_size, source_size)``, ``A @ X @ A.T`` equals
    ``avg_pool2d(interpolate(X, image_size, mode="bilinear"), stride)`` up to rounding.

    Args:
        source_size: Length of the axis of the feature map, in pixels.
        image_size: Length of the axis of the input image, a multiple of ``stride``.
        stride: Block size in input pixels.
        dtype: Floating-point dtype of the matrix; it is computed in float64 first.
        device: Device of the matrix.

    Returns:
        Matrix of shape ``(image_size // stride, source_size)``; every row sums to 1.
    """
    # 1. Bilinear interpolation weights from the source axis to the image axis.
    positions = torch.arange(image_size, dtype=torch.float64)
    source = ((positions + 0.5) * (source_size / image_size) - 0.5).clamp_min(0.0)
    lower = source.floor().long().clamp_max(source_size - 1)
    upper = (lower + 1).clamp_max(source_size - 1)
    weight = source - lower
    resize = torch.zeros(image_size, source_size, dtype=torch.float64)
    resize.index_put_((torch.arange(image_size), lower), 1.0 - weight, accumulate=True)
    resize.index_put_((torch.arange(image_size), upper), weight, accumulate=True)

    # 2. Average blocks of ``stride`` image pixels.
    blocks = resize.reshape(image_size // stride, stride, source_size).mean(dim=1)
    return blocks.to(dtype=dtype, device=device)


def validate_layers(layers: Sequence[str]) -> tuple[str, ...]:
    """Return the layers in network order, rejecting unknown or repeated layers and an empty list.

    Raises:
        InvalidInputError: If a name is not a VGG19 ReLU layer, a name repeats, or none is given.
    """
    if isinstance(layers, str):
        layers = (layers,)
    layers = tuple(layers)
    unknown = [name for name in layers if name not in RELU_LAYERS]
    if unknown:
        raise InvalidInputError(f"invalid VGG19 layer {unknown[0]!r}. Allowed layers are {', '.join(LAYER_NAMES)}.")
    if not layers or len(set(layers)) != len(layers):
        raise InvalidInputError(f"invalid VGG19 layers {list(layers)}: expected a non-empty list without repeats")
    return tuple(name for name in LAYER_NAMES if name in layers)


def build_vgg19_features(depth: int) -> nn.Sequential:
    """Return the first ``depth`` modules of torchvision's ``vgg19().features`` with uninitialized weights.

    The convolutions are created with ``nn.utils.skip_init``, which draws no random
    numbers, so the caller must load or initialize every parameter.
    """
    modules: list[nn.Module] = []
    channels = 3
    for entry in VGG19_CONFIGURATION:
        if entry == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            modules.extend([nn.utils.skip_init(nn.Conv2d, channels, entry, kernel_size=3, padding=1), nn.ReLU(inplace=True)])
            channels = entry
        if len(modules) >= depth:
            break
    return nn.Sequential(*modules[:depth])


def load_vgg19_features(depth: int, weights: str | os.PathLike[str], seed: int = 0) -> tuple[nn.Sequential, str]:
    """Build the first ``depth`` modules of VGG19's ``features`` with ImageNet, seeded random or file weights.

    Args:
        depth: Number of modules of ``vgg19().features`` to keep (27 ends at relu4_4).
        weights: ``"imagenet"``, ``"random"`` or the path of a state dict (see
            :class:`VGG19FeatureExtractor`). Keys of deeper layers and of the classifier are ignored.
        seed: Seed of the random initialization, used only for ``"random"``. The global
            random number generator state is left unchanged.

    Returns:
        ``(features, source)``: the modules on the CPU, and a description of the weights.

    Raises:
        InvalidInputError: If the ImageNet weights are neither cached nor downloadable, or
            the state dict file is missing, unreadable or lacks a needed tensor of the right shape.
    """
    features = build_vgg19_features(depth)
    if weights == "random":
        # Torchvision's VGG initialization: Kaiming normal weights (fan_out, ReLU gain) and zero
        # biases, drawn layer by layer from the seed. A layer's weights therefore do not depend
        # on how many layers are kept. They differ from vgg19(weights=None) after
        # torch.manual_seed(seed), which first draws the default initialization of every layer.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in features:
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(module.bias)
        return features, f"random (torchvision's VGG initialization, seed {seed})"

    if weights == "imagenet":
        path = imagenet_weights_path()
        _download_imagenet_weights(path)
        source = f"imagenet (torchvision {IMAGENET_WEIGHTS}, {path.name})"
    else:
        path = Path(weights)
        source = str(path)
    features.load_state_dict(_select_features(_read_state_dict(path), features, path))
    return features, source


def imagenet_weights_path() -> Path:
    """Return where torchvision caches the VGG19 ImageNet weights.

    This is ``torch.hub.get_dir()/checkpoints/vgg19-dcbb9e9d.pth``, so it follows
    ``TORCH_HOME`` and ``torch.hub.set_dir``.
    """
    file_name = IMAGENET_WEIGHTS.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _download_imagenet_weights(path: Path) -> None:
    """Download the ImageNet weights to ``path`` unless they are cached there."""
    if path.is_file():
        return
    logger.info("downloading %s to %s", IMAGENET_WEIGHTS.url, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hash_prefix = re.search(r"-([a-f0-9]+)\.", path.name).group(1)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(IMAGENET_WEIGHTS.url, str(path), hash_prefix=hash_prefix, progress=False)
    except (OSError, URLError, RuntimeError) as error:
        raise InvalidInputError(
            f"the VGG19 ImageNet weights are not cached and the download from {IMAGENET_WEIGHTS.url} failed ({error}). "
            f"Place the file {path.name} in {path.parent} (torch.hub.get_dir()/checkpoints), "
            "or set the extractor weights to 'random' or to the path of a VGG19 state dict."
        ) from error
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise InvalidInputError(
            f"VGG19 weights file not found: {path}. Give the path of a state dict saved with "
            "torch.save(vgg19.state_dict(), path), or use 'imagenet' or 'random'."
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises pickle, zip and runtime errors for corrupt files
        raise InvalidInputError(f"cannot read VGG19 weights file {path}: {error}") from error
    if not isinstance(state_dict, dict):
        raise InvalidInputError(f"VGG19 weights file {path} contains a {type(state_dict).__name__}, expected a state dict (a dict of tensors)")
    return state_dict


def _select_features(state_dict: dict[str, Tensor], features: nn.Sequential, path: Path) -> dict[str, Tensor]:
    """Return the tensors of ``state_dict`` that ``features`` needs, checking that each exists with the right shape."""
    selected = {}
    for key, expected in features.state_dict().items():
        tensor = state_dict.get(f"features.{key}")
        if not isinstance(tensor, Tensor) or tensor.shape != expected.shape:
            found = "missing" if tensor is None else f"of shape {tuple(getattr(tensor, 'shape', ()))}"
            raise InvalidInputError(
                f"{path} is not a torchvision VGG19 state dict: features.{key} is {found}, expected shape {tuple(expected.shape)}"
            )
        selected[key] = tensor
    return selected
