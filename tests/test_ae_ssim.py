"""Tests of AE SSIM: the convolutional autoencoder trained and scored with SSIM."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from atlas_slices import atlas_slice_arrays
from skimage.metrics import structural_similarity

from sfae import ssim
from sfae.anomalies import disk_mask
from sfae.io import InvalidInputError, write_arrays
from sfae.models import build_method
from sfae.models.ae_ssim import AESSIMMethod
from sfae.training import TrainingSettings, train_method

SMALL = {"channels": [8, 16, 32, 64], "latent_dim": 16}


@pytest.fixture(scope="module")
def brain_slices(demo_files):
    """Forty 64x64 axial slices (60 to 99) of the SRI24 brain, equalized and sliced as the workflow does."""
    arrays = atlas_slice_arrays(demo_files, start=60, stop=100)
    return torch.from_numpy(arrays["images"]).unsqueeze(1), torch.from_numpy(arrays["masks"]).unsqueeze(1)


# The small networks and batches here run faster on one thread than on two.
pytestmark = pytest.mark.usefixtures("one_thread")


def fit(method, images, masks, steps, learning_rate):
    torch.manual_seed(0)
    method.train()
    optimizers = method.configure_optimizers(learning_rate)
    losses = [method.training_step(images, masks, step, optimizers)["loss"] for step in range(steps)]
    return method.eval(), losses


def test_ae_ssim_builds_from_registry_with_defaults():
    method = build_method("ae_ssim", {}, seed=0, image_size=128)

    assert isinstance(method, AESSIMMethod)
    assert method.window_size == 11
    assert method.describe()["effective_settings"] == {
        "channels": [32, 64, 128, 256],
        "latent_dim": 128,
        "normalization": "instance",
        "window_size": 11,
    }


@pytest.mark.parametrize("window_size", [4, 0, 2.5])
def test_ae_ssim_rejects_invalid_window(window_size):
    with pytest.raises(InvalidInputError, match="invalid ae_ssim setting window_size: window_size must be an odd positive integer"):
        AESSIMMethod({"window_size": window_size}, seed=0, image_size=64)


def test_ae_ssim_loss_is_one_minus_mean_ssim():
    method = AESSIMMethod(SMALL, seed=0, image_size=64).eval()
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))

    loss = method.loss(images, images > 0.1)

    with torch.no_grad():
        reconstruction = method.network(images).numpy()
    expected = np.mean([
        structural_similarity(
            images[i, 0].numpy(), reconstruction[i, 0], gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0, full=True,
        )[1].mean()
        for i in range(2)
    ])
    assert loss.item() == pytest.approx(1.0 - expected, abs=1e-5)


def test_ae_ssim_predict_matches_scikit_image_map():
    method = AESSIMMethod(SMALL, seed=0, image_size=64).eval()
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))

    prediction = method.predict(images, images > 0.1)

    with torch.no_grad():
        reconstruction = method.network(images).numpy()
    assert prediction.maps.shape == (2, 1, 64, 64)
    assert prediction.maps.dtype == torch.float32
    assert prediction.scores is None
    assert torch.isfinite(prediction.maps).all()
    assert prediction.maps.min() >= 0
    assert prediction.maps.max() <= 2
    for i in range(2):
        _, reference = structural_similarity(
            images[i, 0].numpy(), reconstruction[i, 0], gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0, full=True,
        )
        np.testing.assert_allclose(prediction.maps[i, 0].numpy(), 1.0 - reference, atol=1e-5)


def test_ae_ssim_window_size_setting_changes_map():
    torch.manual_seed(0)
    default = AESSIMMethod(SMALL, seed=0, image_size=64).eval()
    narrow = AESSIMMethod({**SMALL, "window_size": 5}, seed=0, image_size=64).eval()
    narrow.load_state_dict(default.state_dict())
    images = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(2))

    default_map = default.predict(images, images > 0.1).maps
    narrow_map = narrow.predict(images, images > 0.1).maps

    with torch.no_grad():
        reconstruction = narrow.network(images)
    expected = 1.0 - ssim.ssim_map(reconstruction, images, window_size=5, sigma=1.5)
    torch.testing.assert_close(narrow_map, expected, rtol=0, atol=0)
    assert not torch.allclose(default_map, narrow_map)


def test_ae_ssim_few_steps_lower_the_loss(brain_slices):
    images, masks = brain_slices

    _, losses = fit(AESSIMMethod(SMALL, seed=0, image_size=64), images[::4], masks[::4], steps=10, learning_rate=1e-2)

    assert sum(losses[-3:]) / 3 < losses[0] - 0.1


def test_ae_ssim_map_higher_inside_bright_disk(brain_slices):
    images, masks = brain_slices
    method, _ = fit(AESSIMMethod(SMALL, seed=0, image_size=64), images[::2], masks[::2], steps=60, learning_rate=1e-2)
    disk = torch.from_numpy(disk_mask((64, 64), (34, 30), 6)) & masks[21, 0]
    anomalous = images[21:22].clone()
    anomalous[0, 0][disk] = 1.0

    maps = method.predict(torch.cat([images[21:22], anomalous]), masks[21:22].expand(2, -1, -1, -1)).maps[:, 0]

    brain_outside = masks[21, 0] & ~disk
    assert maps[1][disk].mean() > 1.5 * maps[1][brain_outside].mean()
    assert maps[1][disk].mean() > 1.5 * maps[0][disk].mean()


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
    return train_method(split, method_name="ae_ssim", method_settings=SMALL, seed=1, settings=training, **outputs)


def loss_column(path):
    with open(path, newline="") as stream:
        return [row["loss"] for row in csv.DictReader(stream)]


def test_ae_ssim_resume_matches_uninterrupted_run(brain_slices, tmp_path, monkeypatch):
    images, masks = brain_slices
    split = tmp_path / "train.npz"
    write_arrays(split, images=images[::4, 0].numpy(), masks=masks[::4, 0].numpy(), slice_index=np.arange(60, 100, 4, dtype=np.int16))
    train(split, tmp_path / "uninterrupted")
    original = AESSIMMethod.training_step

    def killed_after_two_steps(self, images, masks, step, optimizers):
        if step == 2:
            raise Interrupted
        return original(self, images, masks, step, optimizers)

    with monkeypatch.context() as patch:
        patch.setattr(AESSIMMethod, "training_step", killed_after_two_steps)
        with pytest.raises(Interrupted):
            train(split, tmp_path / "interrupted")
    report = train(split, tmp_path / "interrupted")

    assert report["resumed_from_step"] == 2
    expected = torch.load(tmp_path / "uninterrupted" / "model.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "interrupted" / "model.pt", weights_only=True)["state_dict"]
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert loss_column(tmp_path / "interrupted" / "losses.csv") == loss_column(tmp_path / "uninterrupted" / "losses.csv")
