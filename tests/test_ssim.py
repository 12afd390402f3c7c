"""Tests of sfae.ssim against scikit-image, SciPy and a plain autograd reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import skimage.metrics._structural_similarity as skimage_ssim_module
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from sfae import ssim
from sfae.io import InvalidInputError

# Float32 against the float64 reference on data in [0, 1]; the observed error is
# about 2e-6 and comes from the cancellation in E[x^2] - E[x]^2.
FLOAT32_TOLERANCE = 2e-5


def skimage_map(x: np.ndarray, y: np.ndarray, window_size: int) -> np.ndarray:
    """Return scikit-image's full SSIM map of (batch, channels, height, width) arrays."""
    maps = [
        structural_similarity(
            first,
            second,
            channel_axis=0,
            gaussian_weights=True,
            sigma=ssim.GAUSSIAN_SIGMA,
            win_size=window_size,
            use_sample_covariance=False,
            data_range=1.0,
            full=True,
        )[1]
        for first, second in zip(x, y)
    ]
    return np.stack(maps)


def scipy_map(x: np.ndarray, y: np.ndarray, window_size: int) -> np.ndarray:
    """Slow reference: the SSIM formula with scipy.ndimage.gaussian_filter truncated at the window radius."""
    radius = (window_size - 1) // 2
    maps = np.empty_like(x)
    for index in np.ndindex(x.shape[:2]):
        first, second = x[index], y[index]

        def blur(image: np.ndarray) -> np.ndarray:
            return scipy.ndimage.gaussian_filter(image, ssim.GAUSSIAN_SIGMA, mode="reflect", radius=radius)

        mean_x, mean_y = blur(first), blur(second)
        variance_x = blur(first * first) - mean_x**2
        variance_y = blur(second * second) - mean_y**2
        covariance = blur(first * second) - mean_x * mean_y
        maps[index] = ((2 * mean_x * mean_y + ssim.C1) * (2 * covariance + ssim.C2)) / ((mean_x**2 + mean_y**2 + ssim.C1) * (variance_x + variance_y + ssim.C2))
    return maps


def autograd_map(x: torch.Tensor, y: torch.Tensor, window_size: int) -> torch.Tensor:
    """Plain autograd reference: mirrored padding by indexing, then a 2D depthwise convolution."""
    radius = (window_size - 1) // 2
    kernel_1d = ssim.gaussian_window(window_size, ssim.GAUSSIAN_SIGMA, dtype=x.dtype)
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).expand(x.shape[1], 1, window_size, window_size)

    def mirror(size: int) -> torch.Tensor:
        index = np.pad(np.arange(size), radius, mode="symmetric")
        return torch.from_numpy(index)

    def blur(image: torch.Tensor) -> torch.Tensor:
        padded = image.index_select(2, mirror(image.shape[2])).index_select(3, mirror(image.shape[3]))
        return F.conv2d(padded, kernel, groups=image.shape[1])

    mean_x, mean_y = blur(x), blur(y)
    variance_x = blur(x * x) - mean_x**2
    variance_y = blur(y * y) - mean_y**2
    covariance = blur(x * y) - mean_x * mean_y
    return ((2 * mean_x * mean_y + ssim.C1) * (2 * covariance + ssim.C2)) / ((mean_x**2 + mean_y**2 + ssim.C1) * (variance_x + variance_y + ssim.C2))


def random_pair(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    return generator.random(shape), generator.random(shape)


def test_ssim_map_matches_skimage_window_11():
    x, y = random_pair((2, 3, 20, 17))

    ours = ssim.ssim_map(torch.from_numpy(x), torch.from_numpy(y), window_size=ssim.WANG_WINDOW_SIZE).numpy()

    np.testing.assert_allclose(ours, skimage_map(x, y, ssim.WANG_WINDOW_SIZE), rtol=0, atol=1e-10)


def test_ssim_map_matches_truncated_skimage_window_5(monkeypatch):
    # scikit-image 0.26 filters with a Gaussian truncated at 3.5 sigma whatever
    # win_size is (win_size only crops the border of the mean). Truncating its
    # filter at radius 2 gives the 5-tap window of SFAE.
    original_gaussian = skimage_ssim_module.gaussian

    def gaussian_radius_2(image, sigma, truncate, mode, **kwargs):
        assert mode == "reflect"
        return original_gaussian(image, sigma=sigma, truncate=2.0 / sigma, mode=mode, **kwargs)

    monkeypatch.setattr(skimage_ssim_module, "gaussian", gaussian_radius_2)
    x, y = random_pair((2, 4, 16, 13), seed=1)

    ours = ssim.ssim_map(torch.from_numpy(x), torch.from_numpy(y), window_size=ssim.SFAE_WINDOW_SIZE).numpy()

    np.testing.assert_allclose(ours, skimage_map(x, y, ssim.SFAE_WINDOW_SIZE), rtol=0, atol=1e-10)


@pytest.mark.parametrize("window_size", [ssim.SFAE_WINDOW_SIZE, ssim.WANG_WINDOW_SIZE])
def test_ssim_map_float32_close_to_float64_reference(window_size):
    x, y = random_pair((2, 3, 32, 32), seed=2)

    ours = ssim.ssim_map(torch.from_numpy(x).float(), torch.from_numpy(y).float(), window_size=window_size)

    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.double().numpy(), scipy_map(x, y, window_size), rtol=0, atol=FLOAT32_TOLERANCE)


@pytest.mark.parametrize("channels", [1, 3, 256])
def test_ssim_map_any_channel_count_matches_skimage(channels):
    x, y = random_pair((1, channels, 12, 12), seed=channels)

    ours = ssim.ssim_map(torch.from_numpy(x), torch.from_numpy(y), window_size=ssim.WANG_WINDOW_SIZE).numpy()

    np.testing.assert_allclose(ours, skimage_map(x, y, ssim.WANG_WINDOW_SIZE), rtol=0, atol=1e-10)


@pytest.mark.parametrize(("height", "width", "window_size"), [(3, 4, 5), (4, 4, 11), (1, 6, 5), (2, 2, 11)])
def test_ssim_map_image_smaller_than_window_matches_scipy(height, width, window_size):
    # scikit-image rejects images smaller than the window; SciPy mirrors repeatedly.
    x, y = random_pair((1, 2, height, width), seed=3)

    ours = ssim.ssim_map(torch.from_numpy(x), torch.from_numpy(y), window_size=window_size).numpy()

    np.testing.assert_allclose(ours, scipy_map(x, y, window_size), rtol=0, atol=1e-10)


def test_ssim_map_identical_inputs_give_one():
    x = torch.rand(2, 5, 16, 16)

    result = ssim.ssim_map(x, x.clone())

    torch.testing.assert_close(result, torch.ones_like(result), rtol=0, atol=1e-5)


def test_ssim_map_constant_images_hand_computed():
    # Constant images have zero (co)variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.2, 0.6
    x = torch.full((1, 1, 12, 12), a, dtype=torch.float64)
    y = torch.full((1, 1, 12, 12), b, dtype=torch.float64)
    expected = (2 * a * b + ssim.C1) / (a * a + b * b + ssim.C1)

    result = ssim.ssim_map(x, y)

    torch.testing.assert_close(result, torch.full_like(result, expected), rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.numpy(), skimage_map(x.numpy(), y.numpy(), ssim.WANG_WINDOW_SIZE), rtol=0, atol=1e-12)


def test_ssim_map_gradient_passes_gradcheck():
    generator = torch.Generator().manual_seed(4)
    x = torch.rand(2, 2, 6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    y = torch.rand(2, 2, 6, 5, dtype=torch.float64, generator=generator, requires_grad=True)

    assert torch.autograd.gradcheck(lambda first, second: ssim.ssim_map(first, second), (x, y))
    assert torch.autograd.gradcheck(lambda first: ssim.ssim_map(first, y.detach(), window_size=11), (x,))


@pytest.mark.parametrize("window_size", [ssim.SFAE_WINDOW_SIZE, ssim.WANG_WINDOW_SIZE])
def test_ssim_map_gradient_matches_autograd_reference(window_size):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 16, 12, dtype=torch.float64, generator=generator, requires_grad=True)
    y = torch.randn(3, 4, 16, 12, dtype=torch.float64, generator=generator, requires_grad=True)
    weights = torch.rand(3, 4, 16, 12, dtype=torch.float64, generator=generator)

    ours = torch.autograd.grad((ssim.ssim_map(x, y, window_size=window_size) * weights).sum(), (x, y))
    reference = torch.autograd.grad((autograd_map(x, y, window_size) * weights).sum(), (x, y))

    torch.testing.assert_close(ours[0], reference[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(ours[1], reference[1], rtol=0, atol=1e-10)


def test_ssim_loss_gradient_only_where_required():
    reconstruction = torch.rand(2, 3, 8, 8, requires_grad=True)
    target = torch.rand(2, 3, 8, 8)

    ssim.ssim_loss(reconstruction, target).backward()

    assert reconstruction.grad is not None
    assert torch.isfinite(reconstruction.grad).all()
    assert reconstruction.grad.abs().sum() > 0
    assert target.grad is None


def test_ssim_map_chunked_equals_unchunked(monkeypatch):
    generator = torch.Generator().manual_seed(6)
    x = torch.rand(7, 3, 10, 10, dtype=torch.float64, generator=generator, requires_grad=True)
    y = torch.rand(7, 3, 10, 10, dtype=torch.float64, generator=generator)
    weights = torch.rand(7, 3, 10, 10, dtype=torch.float64, generator=generator)
    whole = ssim.ssim_map(x, y)
    (whole_gradient,) = torch.autograd.grad((whole * weights).sum(), x)

    # 3 images of 300 elements per chunk: chunks of 3, 3 and 1 images.
    monkeypatch.setattr(ssim, "CPU_CHUNK_ELEMENTS", 900)
    chunked = ssim.ssim_map(x, y)
    (chunked_gradient,) = torch.autograd.grad((chunked * weights).sum(), x)

    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-14)
    torch.testing.assert_close(chunked_gradient, whole_gradient, rtol=0, atol=1e-14)


def test_ssim_map_under_no_grad_matches_grad_mode():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    y = torch.rand(2, 3, 8, 8)
    with_grad = ssim.ssim_map(x, y)

    with torch.no_grad():
        without_grad = ssim.ssim_map(x, y)

    assert with_grad.requires_grad
    assert not without_grad.requires_grad
    torch.testing.assert_close(without_grad, with_grad.detach(), rtol=0, atol=0)


def test_ssim_loss_averages_full_map_including_border():
    x, y = (torch.from_numpy(array) for array in random_pair((2, 3, 12, 12), seed=7))
    full_map = ssim.ssim_map(x, y)
    cropped_mean = full_map[..., 2:-2, 2:-2].mean()

    loss = ssim.ssim_loss(x, y)

    torch.testing.assert_close(loss, 1 - full_map.mean(), rtol=0, atol=1e-12)
    assert abs(loss.item() - (1 - cropped_mean.item())) > 1e-4


def test_ssim_loss_identical_inputs_is_zero():
    x = torch.rand(2, 4, 16, 16)

    assert ssim.ssim_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-5)


def test_anomaly_map_shape_and_channel_mean():
    x, y = (torch.from_numpy(array) for array in random_pair((2, 3, 8, 8), seed=8))
    expected_small = 1 - ssim.ssim_map(x, y).mean(dim=1, keepdim=True)

    same_size = ssim.anomaly_map(x, y, (8, 8))
    upsampled = ssim.anomaly_map(x, y, (32, 32))

    torch.testing.assert_close(same_size, expected_small, rtol=0, atol=1e-12)
    assert upsampled.shape == (2, 1, 32, 32)
    torch.testing.assert_close(upsampled, F.interpolate(expected_small, size=(32, 32), mode="bilinear", align_corners=False), rtol=0, atol=1e-12)


def test_anomaly_map_identical_inputs_is_zero():
    x = torch.rand(1, 6, 8, 8)

    result = ssim.anomaly_map(x, x.clone(), (16, 16))

    assert result.abs().max().item() < 1e-5


def test_gaussian_filter_matrix_hand_computed():
    kernel = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    expected = torch.tensor([[0.75, 0.25, 0.0], [0.25, 0.5, 0.25], [0.0, 0.25, 0.75]], dtype=torch.float64)

    torch.testing.assert_close(ssim.gaussian_filter_matrix(3, kernel), expected, rtol=0, atol=0)


def test_gaussian_window_matches_scipy_kernel():
    impulse = np.zeros(11)
    impulse[5] = 1.0
    expected = scipy.ndimage.gaussian_filter1d(impulse, 1.5, mode="constant", radius=2)[3:8]

    window = ssim.gaussian_window(5, 1.5, dtype=torch.float64).numpy()

    np.testing.assert_allclose(window, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("x_shape", "y_shape", "message"),
    [
        ((2, 3, 8, 8), (2, 3, 8, 9), "same shape"),
        ((3, 8, 8), (3, 8, 8), r"invalid SSIM input shape \(3, 8, 8\): expected \(batch, channels, height, width\)"),
    ],
)
def test_ssim_map_rejects_bad_shapes(x_shape, y_shape, message):
    with pytest.raises(InvalidInputError, match=message):
        ssim.ssim_map(torch.rand(x_shape), torch.rand(y_shape))


def test_ssim_map_rejects_integer_input():
    x = torch.ones(1, 1, 8, 8, dtype=torch.int64)

    with pytest.raises(InvalidInputError, match="floating-point dtype"):
        ssim.ssim_map(x, x)


@pytest.mark.parametrize(("window_size", "sigma", "message"), [(4, 1.5, "odd positive integer, got 4"), (0, 1.5, "got 0"), (5, 0.0, "sigma must be a positive"), (5, float("nan"), "sigma")])
def test_ssim_map_rejects_bad_window(window_size, sigma, message):
    x = torch.rand(1, 1, 8, 8)

    with pytest.raises(InvalidInputError, match=message):
        ssim.ssim_map(x, x, window_size=window_size, sigma=sigma)


def test_anomaly_map_rejects_bad_output_size():
    x = torch.rand(1, 1, 8, 8)

    with pytest.raises(InvalidInputError, match=r"invalid output_size \(0, 8\)"):
        ssim.anomaly_map(x, x, (0, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ssim_map_gpu_matches_cpu():
    x = torch.rand(3, 16, 32, 32, requires_grad=True)
    y = torch.rand(3, 16, 32, 32)
    cpu_map = ssim.ssim_map(x, y)
    (cpu_gradient,) = torch.autograd.grad(cpu_map.sum(), x)

    x_gpu = x.detach().cuda().requires_grad_()
    gpu_map = ssim.ssim_map(x_gpu, y.cuda())
    (gpu_gradient,) = torch.autograd.grad(gpu_map.sum(), x_gpu)

    torch.testing.assert_close(gpu_map.cpu(), cpu_map, rtol=0, atol=1e-5)
    torch.testing.assert_close(gpu_gradient.cpu(), cpu_gradient, rtol=1e-4, atol=1e-5)
