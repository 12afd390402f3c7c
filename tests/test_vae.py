"""Tests of the VAE: its network, loss, combi map and KL score."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from atlas_slices import atlas_slice_arrays
from scipy import ndimage
from torch import nn

from sfae.anomalies import disk_mask
from sfae.io import InvalidInputError, write_arrays
from sfae.models import build_method
from sfae.models.vae import (
    ConvVAE,
    VAEMethod,
    combi_map,
    gaussian_smooth,
    kl_divergence,
    normalize_per_slice,
)
from sfae.training import TrainingSettings, train_method

SMALL = {"channels": [8, 16, 32, 64], "latent_dim": 16}


@pytest.fixture(scope="module")
def brain_slices(demo_files):
    """Forty 64x64 axial slices (60 to 99) of the SRI24 brain, equalized and sliced as the workflow does."""
    arrays = atlas_slice_arrays(demo_files, start=60, stop=100)
    return torch.from_numpy(arrays["images"]).unsqueeze(1), torch.from_numpy(arrays["masks"]).unsqueeze(1)


# The small networks and batches here run faster on one thread than on two.
pytestmark = pytest.mark.usefixtures("one_thread")


def fit(method, images, masks, steps, learning_rate=5e-3):
    torch.manual_seed(0)
    method.train()
    optimizers = method.configure_optimizers(learning_rate)
    losses = [method.training_step(images, masks, step, optimizers)["loss"] for step in range(steps)]
    return method.eval(), losses


def slow_combi_map(method, image):
    """Combi map of one slice (1, 64, 64) with NumPy and SciPy: autograd on the slice alone, then min-max and scipy smoothing."""
    inputs = image[None].clone().requires_grad_(True)
    mean, log_variance = method.network.encode(inputs)
    kl = (-0.5 * (1 + log_variance - mean**2 - torch.exp(log_variance))).mean()
    kl.backward()
    magnitude = inputs.grad[0, 0].abs().double().numpy()
    normalized = (magnitude - magnitude.min()) / (magnitude.max() - magnitude.min())
    # 7 taps, because scipy keeps int(truncate * sigma + 0.5) = 3 taps on each side, and zero padding.
    smoothed = ndimage.gaussian_filter(normalized, sigma=3.0, truncate=1.0, mode="constant", cval=0.0)
    with torch.no_grad():
        reconstruction = method.network.decoder(mean)[0, 0].double().numpy()
    return (image[0].double().numpy() - reconstruction) ** 2 * smoothed


# The network and its parts


def test_vae_network_shapes():
    network = ConvVAE(64).train()
    images = torch.rand(2, 1, 64, 64)

    mean, log_variance = network.encode(images)
    reconstruction, forward_mean, _ = network(images)

    assert mean.shape == log_variance.shape == (2, 128)
    assert network.encoder.dense.out_features == 256
    assert network.decoder.dense.in_features == 128
    assert reconstruction.shape == (2, 1, 64, 64)
    torch.testing.assert_close(forward_mean, mean)


def test_vae_network_has_no_normalization_by_default():
    network = ConvVAE(64)

    kinds = {type(module) for module in network.modules()}

    assert nn.InstanceNorm2d not in kinds
    assert nn.BatchNorm2d not in kinds
    assert {nn.Conv2d, nn.ConvTranspose2d, nn.LeakyReLU, nn.Linear} <= kinds


def test_vae_forward_samples_in_training():
    network = ConvVAE(64, **SMALL).train()
    images = torch.rand(2, 1, 64, 64)

    torch.manual_seed(5)
    first, mean, log_variance = network(images)
    torch.manual_seed(5)
    again, _, _ = network(images)
    torch.manual_seed(5)
    noise = torch.randn_like(mean)

    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(first, network.decoder(mean + noise * torch.exp(0.5 * log_variance)))
    assert not torch.allclose(first, network.decoder(mean))


def test_vae_forward_decodes_mean_in_eval():
    network = ConvVAE(64, **SMALL).eval()
    images = torch.rand(2, 1, 64, 64)

    reconstruction, mean, _ = network(images)
    again, _, _ = network(images)

    torch.testing.assert_close(reconstruction, network.decoder(mean), rtol=0, atol=0)
    torch.testing.assert_close(again, reconstruction, rtol=0, atol=0)


def test_kl_divergence_matches_torch_distributions():
    mean = torch.tensor([[0.0, 1.5, -2.0], [0.3, 0.0, 0.0]])
    log_variance = torch.tensor([[0.0, -1.0, 0.5], [2.0, 0.0, -3.0]])

    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * log_variance)), torch.distributions.Normal(0.0, 1.0)
    )

    torch.testing.assert_close(kl_divergence(mean, log_variance), expected)
    assert kl_divergence(torch.zeros(1, 4), torch.zeros(1, 4)).abs().max() == 0


def test_gaussian_smooth_matches_scipy_with_zero_padding():
    maps = torch.rand(2, 1, 20, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    smoothed = gaussian_smooth(maps, 7, 3.0)

    for i in range(2):
        expected = ndimage.gaussian_filter(maps[i, 0].numpy(), sigma=3.0, truncate=1.0, mode="constant", cval=0.0)
        np.testing.assert_allclose(smoothed[i, 0].numpy(), expected, rtol=1e-12, atol=1e-12)


def test_normalize_per_slice_rescales_each_slice():
    maps = torch.stack([torch.tensor([[2.0, 4.0], [6.0, 10.0]]), torch.full((2, 2), 3.0)])[:, None]

    normalized = normalize_per_slice(maps)

    torch.testing.assert_close(normalized[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(normalized[1], torch.zeros(1, 2, 2))  # a constant map has no contrast and becomes 0


def test_combi_map_weights_squared_residual():
    images = torch.zeros(1, 1, 9, 9)
    reconstruction = torch.full((1, 1, 9, 9), 0.5)
    gradient = torch.zeros(1, 1, 9, 9)
    gradient[0, 0, 4, 4] = -2.0  # the absolute value counts

    maps = combi_map(images, reconstruction, gradient, window_size=3, sigma=1.0)

    kernel = np.exp(-np.array([1.0, 0.0, 1.0]) / 2)
    kernel /= kernel.sum()
    expected = np.zeros((9, 9))
    expected[3:6, 3:6] = 0.25 * np.outer(kernel, kernel)
    np.testing.assert_allclose(maps[0, 0].numpy(), expected, rtol=1e-6, atol=1e-9)


# The method


def test_vae_builds_from_registry_with_defaults():
    method = build_method("vae", {}, seed=0, image_size=128)

    assert isinstance(method, VAEMethod)
    assert method.describe() == {
        "method": "vae",
        "settings": {},
        "effective_settings": {
            "channels": [32, 64, 128, 256],
            "latent_dim": 128,
            "normalization": "none",
            "kl_weight": 0.05,
            "combi_sigma": 3.0,
            "combi_window_size": 7,
        },
    }


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kl_weight": -0.1}, "invalid vae setting kl_weight=-0.1"),
        ({"kl_weight": float("nan")}, "invalid vae setting kl_weight=nan"),
        ({"combi_sigma": 0}, "invalid vae setting combi_sigma=0"),
        ({"combi_window_size": 8}, "invalid vae setting combi_window_size=8: expected an odd positive integer"),
        ({"latent_dim": -1}, "invalid autoencoder latent_dim -1"),
        ({"normalization": "layer"}, "invalid autoencoder normalization 'layer'"),
    ],
)
def test_vae_rejects_invalid_settings(settings, message):
    with pytest.raises(InvalidInputError, match=message):
        VAEMethod(settings, seed=0, image_size=64)


def test_vae_loss_terms_weight_kl():
    method = VAEMethod({**SMALL, "kl_weight": 0.5}, seed=0, image_size=64).train()
    images = torch.rand(3, 1, 64, 64)

    torch.manual_seed(2)
    terms = method.loss_terms(images)
    torch.manual_seed(2)
    reconstruction, mean, log_variance = method.network(images)

    expected_reconstruction = ((images - reconstruction) ** 2).mean()
    expected_kl = (-0.5 * (1 + log_variance - mean**2 - torch.exp(log_variance))).sum() / mean.numel()
    torch.testing.assert_close(terms["reconstruction"], expected_reconstruction)
    torch.testing.assert_close(terms["kl"], expected_kl)
    torch.testing.assert_close(terms["loss"], expected_reconstruction + 0.5 * expected_kl)
    torch.manual_seed(2)
    torch.testing.assert_close(method.loss(images, images > 0.1), terms["loss"])


def test_vae_training_step_logs_every_term():
    method = VAEMethod(SMALL, seed=0, image_size=64).train()
    optimizers = method.configure_optimizers(1e-3)
    images = torch.rand(4, 1, 64, 64)

    logged = method.training_step(images, images > 0.1, 0, optimizers)

    assert set(logged) == {"loss", "reconstruction", "kl"}
    assert all(isinstance(value, float) for value in logged.values())
    assert logged["loss"] == pytest.approx(logged["reconstruction"] + 0.05 * logged["kl"], rel=1e-5)


def test_vae_predict_matches_slow_per_slice_reference():
    method = VAEMethod(SMALL, seed=0, image_size=64).eval()
    images = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(3))

    prediction = method.predict(images, images > 0.1)

    assert prediction.maps.shape == (3, 1, 64, 64)
    assert prediction.maps.dtype == torch.float32
    assert prediction.scores.shape == (3,)
    assert prediction.scores.dtype == torch.float32
    assert torch.isfinite(prediction.maps).all()
    assert prediction.maps.min() >= 0
    for i in range(3):
        np.testing.assert_allclose(prediction.maps[i, 0].numpy(), slow_combi_map(method, images[i]), rtol=1e-4, atol=1e-7)


def test_vae_predict_scores_are_kl_per_slice():
    method = VAEMethod(SMALL, seed=0, image_size=64).eval()
    images = torch.rand(2, 1, 64, 64)

    scores = method.predict(images, images > 0.1).scores

    with torch.no_grad():
        mean, log_variance = method.network.encode(images)
    torch.testing.assert_close(scores, kl_divergence(mean, log_variance).mean(dim=1))


def test_vae_predict_leaves_no_gradients():
    method = VAEMethod(SMALL, seed=0, image_size=64).eval()
    images = torch.rand(2, 1, 64, 64)

    prediction = method.predict(images, images > 0.1)

    assert all(parameter.grad is None for parameter in method.parameters())
    assert not images.requires_grad
    assert images.grad is None
    assert not prediction.maps.requires_grad
    assert not prediction.scores.requires_grad


def test_vae_predict_inside_no_grad():
    method = VAEMethod(SMALL, seed=0, image_size=64).eval()
    images = torch.rand(2, 1, 64, 64)
    expected = method.predict(images, images > 0.1)

    with torch.no_grad():
        prediction = method.predict(images, images > 0.1)

    torch.testing.assert_close(prediction.maps, expected.maps, rtol=0, atol=0)
    torch.testing.assert_close(prediction.scores, expected.scores, rtol=0, atol=0)


def test_vae_few_steps_lower_the_loss(brain_slices):
    images, masks = brain_slices

    _, losses = fit(VAEMethod({}, seed=0, image_size=64), images[::4], masks[::4], steps=8, learning_rate=2e-3)

    assert sum(losses[-3:]) / 3 < 0.7 * losses[0]


def test_vae_map_and_score_higher_with_bright_disk(brain_slices):
    images, masks = brain_slices
    method, _ = fit(VAEMethod(SMALL, seed=0, image_size=64), images[::2], masks[::2], steps=40)
    disk = torch.from_numpy(disk_mask((64, 64), (34, 30), 6)) & masks[21, 0]
    anomalous = images[21:22].clone()
    anomalous[0, 0][disk] = 1.0

    prediction = method.predict(torch.cat([images[21:22], anomalous]), masks[21:22].expand(2, -1, -1, -1))

    maps = prediction.maps[:, 0]
    brain_outside = masks[21, 0] & ~disk
    assert maps[1][disk].mean() > 2 * maps[1][brain_outside].mean()
    assert maps[1][disk].mean() > 2 * maps[0][disk].mean()
    assert prediction.scores[1] > prediction.scores[0]


class Interrupted(Exception):
    """Raised by a patched training step in place of the job being killed."""


def train(split, folder):
    training = TrainingSettings(steps=4, batch_size=4, learning_rate=1e-3, checkpoint_every=2, device="cpu", threads=1)
    outputs = {
        "model_out": folder / "model.pt",
        "report_out": folder / "report.json",
        "loss_csv_out": folder / "losses.csv",
        "loss_png_out": folder / "losses.png",
        "checkpoint_path": folder / "checkpoint.pt",
    }
    return train_method(split, method_name="vae", method_settings=SMALL, seed=1, settings=training, **outputs)


def read_losses(path):
    with open(path, newline="") as stream:
        return [(row["loss"], row["reconstruction"], row["kl"]) for row in csv.DictReader(stream)]


def test_vae_resume_matches_uninterrupted_run(brain_slices, tmp_path, monkeypatch):
    # The reparameterization noise comes from torch's global generator, which the checkpoint restores.
    images, masks = brain_slices
    split = tmp_path / "train.npz"
    write_arrays(split, images=images[::4, 0].numpy(), masks=masks[::4, 0].numpy(), slice_index=np.arange(60, 100, 4, dtype=np.int16))
    train(split, tmp_path / "uninterrupted")
    original = VAEMethod.training_step

    def killed_after_two_steps(self, images, masks, step, optimizers):
        if step == 2:
            raise Interrupted
        return original(self, images, masks, step, optimizers)

    with monkeypatch.context() as patch:
        patch.setattr(VAEMethod, "training_step", killed_after_two_steps)
        with pytest.raises(Interrupted):
            train(split, tmp_path / "interrupted")
    report = train(split, tmp_path / "interrupted")

    assert report["resumed_from_step"] == 2
    expected = torch.load(tmp_path / "uninterrupted" / "model.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "interrupted" / "model.pt", weights_only=True)["state_dict"]
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert read_losses(tmp_path / "interrupted" / "losses.csv") == read_losses(tmp_path / "uninterrupted" / "losses.csv")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vae_predict_on_cuda_matches_cpu():
    method = VAEMethod(SMALL, seed=0, image_size=64).eval()
    images = torch.rand(2, 1, 64, 64)
    on_cpu = method.predict(images, images > 0.1)

    on_cuda = method.to("cuda").predict(images.cuda(), images.cuda() > 0.1)

    assert on_cuda.maps.device.type == "cuda"
    torch.testing.assert_close(on_cuda.maps.cpu(), on_cpu.maps, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(on_cuda.scores.cpu(), on_cpu.scores, rtol=1e-3, atol=1e-6)
