"""Structural similarity (SSIM) per pixel and per channel, with a Gaussian window.

The map follows Wang et al. 2004 with population (co)variances. It equals the
full map of ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False, data_range=1.0, full=True)`` in scikit-image 0.26,
border pixels included, with one deliberate difference in the window.
scikit-image always truncates its Gaussian at 3.5 sigma (11 taps for sigma 1.5)
and uses ``win_size`` only to crop the border before averaging. Here the
Gaussian has exactly ``window_size`` taps, so both agree for window size 11 and
sigma 1.5, and for window size 5 scikit-image would need its filter truncated
at radius 2.

Borders are handled as ``scipy.ndimage.gaussian_filter(mode="reflect")`` does,
which scikit-image uses: the signal is mirrored about the edge with the edge
sample repeated (``d c b a | a b c d``). That is NumPy's ``"symmetric"`` mode,
not PyTorch's ``F.pad(mode="reflect")``, which leaves the edge sample out.

:func:`ssim_loss` averages the full map, border pixels included. scikit-image's
mean SSIM instead crops ``(win_size - 1) // 2`` pixels on each side first,
which would drop 23 % of a 32x32 feature map for window size 5.

The Gaussian filter of one axis, mirrored borders included, is a banded
matrix, so filtering an image takes two matrix products and the gradient uses
the transposed matrices. Forward and backward passes run in chunks of images
with a hand-written gradient (see :class:`_SSIMFunction`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sfae.io import InvalidInputError

logger = logging.getLogger(__name__)

# Gaussian window of the SFAE reference code (Meissen et al. 2022, public
# repository FeliMe/feature-autoencoder, fae/utils/pytorch_ssim.py and
# fae/models/models.py): 5 taps, sigma 1.5.
SFAE_WINDOW_SIZE = 5
# Window of Wang et al. 2004, also the default of the SSIM module in the SFAE
# reference code: 11 taps, sigma 1.5.
WANG_WINDOW_SIZE = 11
GAUSSIAN_SIGMA = 1.5

# Stabilizing constants of Wang et al. 2004, C1 = (K1 L)^2 and C2 = (K2 L)^2,
# with data range L = 1 as in the SFAE reference code. The reference code keeps
# L = 1 for feature maps too, although their values are not confined to [0, 1].
K1 = 0.01
K2 = 0.03
DATA_RANGE = 1.0
C1 = (K1 * DATA_RANGE) ** 2
C2 = (K2 * DATA_RANGE) ** 2

# Elements per map that one chunk of the CPU computation holds, 2 images of
# 256 x 32 x 32 features (2 MB per float32 map), so that the intermediates of a
# chunk stay in the CPU cache. On a 2-core AMD EPYC (Zen 4) the SSIM forward and
# backward time changed by less than 10 % between 2**18 and 2**20.
CPU_CHUNK_ELEMENTS = 2**19


def gaussian_window(window_size: int, sigma: float, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Build a 1D Gaussian kernel with ``window_size`` taps that sums to 1.

    The taps are ``exp(-k^2 / (2 sigma^2))`` for ``k = -r..r``, ``r = (window_size - 1) / 2``,
    the same weights as ``scipy.ndimage.gaussian_filter`` truncated at radius ``r``.

    Args:
        window_size: Number of taps, odd and positive.
        sigma: Standard deviation in pixels, positive.
        dtype: Floating-point dtype of the kernel.
        device: Device of the kernel.

    Returns:
        Kernel of shape ``(window_size,)``.

    Raises:
        InvalidInputError: If ``window_size`` is not an odd positive integer or ``sigma`` is not positive.
    """
    _validate_window(window_size, sigma)
    radius = (window_size - 1) // 2
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = kernel / kernel.sum()
    return kernel.to(dtype=dtype, device=device)


def ssim_map(x: Tensor, y: Tensor, *, window_size: int = SFAE_WINDOW_SIZE, sigma: float = GAUSSIAN_SIGMA, c1: float = C1, c2: float = C2) -> Tensor:
    """Compute the SSIM of every pixel of every channel.

    Args:
        x: Images or feature maps, shape ``(batch, channels, height, width)``, floating point.
        y: Tensor of the same shape, dtype and device as ``x``.
        window_size: Taps of the Gaussian window, odd.
        sigma: Standard deviation of the Gaussian window in pixels.
        c1: Constant that stabilizes the luminance term, ``(K1 * data_range)^2``.
        c2: Constant that stabilizes the contrast-structure term, ``(K2 * data_range)^2``.

    Returns:
        SSIM of shape ``(batch, channels, height, width)``, 1 where ``x`` equals ``y``.
        Differentiable once with respect to both inputs.

    Raises:
        InvalidInputError: If the shapes differ or are not 4D, the dtype is not floating point,
            or the window is invalid.
    """
    _validate_pair(x, y)
    kernel = gaussian_window(window_size, sigma, dtype=x.dtype, device=x.device)
    row_filter = gaussian_filter_matrix(x.shape[-2], kernel)
    column_filter = gaussian_filter_matrix(x.shape[-1], kernel)
    return _SSIMFunction.apply(x, y, row_filter, column_filter, c1, c2, _images_per_chunk(x), torch.is_grad_enabled())


def ssim_loss(x: Tensor, y: Tensor, *, window_size: int = SFAE_WINDOW_SIZE, sigma: float = GAUSSIAN_SIGMA, c1: float = C1, c2: float = C2) -> Tensor:
    """Compute 1 - mean SSIM over all pixels, channels and images, border pixels included.

    Args:
        x: Reconstruction, shape ``(batch, channels, height, width)``.
        y: Target of the same shape.
        window_size, sigma, c1, c2: As in :func:`ssim_map`.

    Returns:
        Scalar tensor, 0 for identical inputs.

    Raises:
        InvalidInputError: As :func:`ssim_map`.
    """
    return 1.0 - ssim_map(x, y, window_size=window_size, sigma=sigma, c1=c1, c2=c2).mean()


def anomaly_map(
    x: Tensor,
    y: Tensor,
    output_size: Sequence[int],
    *,
    window_size: int = SFAE_WINDOW_SIZE,
    sigma: float = GAUSSIAN_SIGMA,
    c1: float = C1,
    c2: float = C2,
) -> Tensor:
    """Compute 1 - SSIM averaged over channels and resized to ``output_size``.

    Args:
        x: Reconstruction, shape ``(batch, channels, height, width)``.
        y: Target of the same shape.
        output_size: ``(height, width)`` of the returned map in pixels.
        window_size, sigma, c1, c2: As in :func:`ssim_map`.

    Returns:
        Anomaly map of shape ``(batch, 1, *output_size)``, bilinearly resized with
        ``align_corners=False``. Values lie in [0, 2], and higher values are more anomalous.

    Raises:
        InvalidInputError: As :func:`ssim_map`, or if ``output_size`` is not two positive integers.
    """
    if len(output_size) != 2 or any(int(size) < 1 for size in output_size):
        raise InvalidInputError(f"invalid output_size {tuple(output_size)}: expected (height, width) with positive sizes")
    dissimilarity = 1.0 - ssim_map(x, y, window_size=window_size, sigma=sigma, c1=c1, c2=c2).mean(dim=1, keepdim=True)
    return F.interpolate(dissimilarity, size=tuple(int(size) for size in output_size), mode="bilinear", align_corners=False)


def gaussian_filter_matrix(size: int, kernel: Tensor) -> Tensor:
    """Build the matrix that Gaussian-filters one axis of length ``size`` with mirrored borders.

    Row ``i`` contains the kernel centred on ``i``. Taps that fall outside the
    axis are added to the sample they mirror onto, as in ``scipy.ndimage`` mode
    ``"reflect"``, also when the kernel is longer than the axis. Filtering an
    image is then ``rows @ image @ columns.T``, and the adjoint filter, which the
    gradient needs, is ``rows.T @ image @ columns``.

    Args:
        size: Length of the axis in pixels.
        kernel: 1D kernel of odd length, as from :func:`gaussian_window`.

    Returns:
        Matrix of shape ``(size, size)`` with the dtype and device of ``kernel``. Every row sums to 1.
    """
    radius = (kernel.numel() - 1) // 2
    positions = torch.arange(-radius, size + radius, device=kernel.device) % (2 * size)
    sources = torch.where(positions >= size, 2 * size - 1 - positions, positions)
    rows = torch.arange(size, device=kernel.device)
    matrix = torch.zeros(size, size, dtype=kernel.dtype, device=kernel.device)
    for tap in range(kernel.numel()):
        matrix.index_put_((rows, sources[rows + tap]), kernel[tap].expand(size), accumulate=True)
    return matrix


def _images_per_chunk(x: Tensor) -> int:
    """Return the number of images per chunk, which is the whole batch on a GPU."""
    if x.device.type != "cpu":
        return max(1, x.shape[0])
    return max(1, CPU_CHUNK_ELEMENTS // max(1, x[0].numel()))


def _filter(moments: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """Apply ``rows @ moments @ columns.T`` to every channel of every image."""
    return torch.matmul(rows, torch.matmul(moments, columns.T))


def _local_moments(x: Tensor, y: Tensor, rows: Tensor, columns: Tensor) -> tuple[Tensor, ...]:
    """Return the filtered means of x, y, x^2, y^2 and xy, each shaped like ``x``."""
    moments = torch.stack([x, y, x * x, y * y, x * y], dim=1)
    return _filter(moments, rows, columns).unbind(dim=1)


class _SSIMFunction(torch.autograd.Function):
    """SSIM map with a hand-written gradient, computed in chunks of images.

    Autograd through the plain formula keeps about twenty full-size intermediate
    tensors. For a batch of 64 SFAE feature maps (64 x 256 x 32 x 32) they are
    67 MB each, and on a CPU the memory traffic made the SSIM slower than the
    whole autoencoder. Here every intermediate lives only for one chunk of
    images, small enough for the CPU cache. The forward pass saves three maps
    for the gradient (four when both inputs require it), the partial
    derivatives of S with respect to the filtered moments.

    With A1 = 2 mx my + c1, A2 = 2 (mxy - mx my) + c2, B1 = mx^2 + my^2 + c1,
    B2 = mxx + myy - mx^2 - my^2 + c2 and S = A1 A2 / (B1 B2), and with G the
    Gaussian filter and G^T its adjoint, an upstream gradient g gives

        dL/dx = G^T(g dS/dmx) + 2 x G^T(g dS/dmxx) + y G^T(g dS/dmxy)
        dS/dmx = 2 my (A2 - A1) / (B1 B2) + 2 mx (S / B2 - S / B1)
        dS/dmxx = -S / B2,  dS/dmxy = 2 A1 / (B1 B2)

    and dL/dy by swapping x and y (dS/dmyy equals dS/dmxx).
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, rows: Tensor, columns: Tensor, c1: float, c2: float, chunk: int, grad_enabled: bool) -> Tensor:
        # needs_input_grad reflects requires_grad even under torch.no_grad().
        needs_x, needs_y = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        ssim = torch.empty_like(x)
        # Partial derivatives along dimension 1: [dS/dmx,] [dS/dmy,] dS/dmxx, dS/dmxy.
        partial_count = needs_x + needs_y + 2 if needs_x or needs_y else 0
        partials = x.new_empty((x.shape[0], partial_count, *x.shape[1:]))

        for start in range(0, x.shape[0], chunk):
            part = slice(start, start + chunk)

            # 1. Moments, the four factors of S, and S.
            mean_x, mean_y, mean_xx, mean_yy, mean_xy = _local_moments(x[part], y[part], rows, columns)
            product = mean_x * mean_y
            square_x = mean_x * mean_x
            square_y = mean_y * mean_y
            a1 = 2.0 * product + c1
            a2 = 2.0 * (mean_xy - product) + c2
            b1 = square_x + square_y + c1
            b2 = mean_xx + mean_yy - square_x - square_y + c2
            inverse_denominator = 1.0 / (b1 * b2)
            ssim_part = torch.mul(a1 * a2, inverse_denominator, out=ssim[part])
            if not partial_count:
                continue

            # 2. Partial derivatives of S for the backward pass.
            luminance = 2.0 * (a2 - a1) * inverse_denominator
            contrast = 2.0 * ssim_part * (1.0 / b2 - 1.0 / b1)
            chunk_partials = partials[part]
            index = 0
            if needs_x:
                torch.addcmul(mean_y * luminance, mean_x, contrast, out=chunk_partials[:, index])
                index += 1
            if needs_y:
                torch.addcmul(mean_x * luminance, mean_y, contrast, out=chunk_partials[:, index])
            torch.div(ssim_part, b2, out=chunk_partials[:, -2]).neg_()
            torch.mul(a1, 2.0 * inverse_denominator, out=chunk_partials[:, -1])

        ctx.save_for_backward(x, y, rows, columns, partials)
        ctx.chunk = chunk
        return ssim

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ssim: Tensor) -> tuple[Tensor | None, ...]:
        x, y, rows, columns, partials = ctx.saved_tensors
        needs_x, needs_y = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(x) if needs_x else None
        grad_y = torch.empty_like(y) if needs_y else None

        for start in range(0, x.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            x_part, y_part = x[part], y[part]

            # 1. Upstream gradient times the partials, back through the filter in one call.
            weighted = partials[part] * grad_ssim[part].unsqueeze(1)
            adjoint = _filter(weighted, rows.T, columns.T)
            adjoint_square, adjoint_cross = adjoint[:, -2], adjoint[:, -1]

            # 2. Back through the products x^2, y^2 and xy.
            if needs_x:
                torch.add(adjoint[:, 0], 2.0 * x_part * adjoint_square + y_part * adjoint_cross, out=grad_x[part])
            if needs_y:
                torch.add(adjoint[:, int(needs_x)], 2.0 * y_part * adjoint_square + x_part * adjoint_cross, out=grad_y[part])

        return grad_x, grad_y, None, None, None, None, None, None


def _validate_window(window_size: int, sigma: float) -> None:
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1 or window_size % 2 == 0:
        raise InvalidInputError(f"window_size must be an odd positive integer, got {window_size!r}")
    if not math.isfinite(sigma) or sigma <= 0:
        raise InvalidInputError(f"sigma must be a positive number of pixels, got {sigma!r}")


def _validate_pair(x: Tensor, y: Tensor) -> None:
    if x.ndim != 4:
        raise InvalidInputError(f"invalid SSIM input shape {tuple(x.shape)}: expected (batch, channels, height, width)")
    if x.shape != y.shape:
        raise InvalidInputError(f"SSIM inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not x.is_floating_point() or x.dtype != y.dtype:
        raise InvalidInputError(f"SSIM inputs must share one floating-point dtype, got {x.dtype} and {y.dtype}")
