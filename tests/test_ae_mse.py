"""Tests of the shared convolutional autoencoder and of AE MSE."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from atlas_slices import atlas_slice_arrays
from torch import nn

from sfae.anomalies import disk_mask
from sfae.io import InvalidInputError, write_arrays
from sfae.models import build_method
from sfae.models.ae_mse import AEMSEMethod
from sfae.models.conv_autoencoder import ConvAutoencoder, read_architecture
from sfae.training import TrainingSettings, train_method

SMALL = {"channels": [8, 16, 32, 64], "latent_dim": 16}


def block_output_shapes(blocks: nn.Sequential, inputs: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []
    hidden = inputs
    for block in blocks:
        hidden = block(hidden)
        shapes.append(tuple(hidden.shape[1:]))
    return shapes


@pytest.fixture(scope="module")
def brain_slices(demo_files):
    """Forty 64x64 axial slices (60 to 99) of the SRI24 brain, equalized and sliced as the workflow does."""
    arrays = atlas_slice_arrays(demo_files, start=60, stop=100)
    return torch.from_numpy(arrays["images"]).unsqueeze(1), torch.from_numpy(arrays["masks"]).unsqueeze(1)


# The small networks and batches here run faster on one thread than on two.
pytestmark = pytest.mark.usefixtures("one_thread")


def fit(method, images, masks, steps, learning_rate=3e-3):
    torch.manual_seed(0)
    method.train()
    optimizers = method.configure_optimizers(learning_rate)
    losses = [method.training_step(images, masks, step, optimizers)["loss"] for step in range(steps)]
    return method.eval(), losses


def plant_bright_disk(image, mask, center=(34, 30), radius=6):
    """Return a copy of ``image`` (1, 1, H, W) with the brain pixels of a disk set to 1 and the disk's mask."""
    disk = torch.from_numpy(disk_mask(tuple(image.shape[-2:]), center, radius)) & mask[0, 0]
    anomalous = image.clone()
    anomalous[0, 0][disk] = 1.0
    return anomalous, disk


# The network


@pytest.mark.parametrize("size", [128, 64])
def test_autoencoder_layer_shapes(size):
    network = ConvAutoencoder(size)
    images = torch.rand(2, 1, size, size)
    bottleneck = size // 16

    encoder_shapes = block_output_shapes(network.encoder.blocks, images)
    code = network.encoder(images)
    decoder_shapes = block_output_shapes(network.decoder.blocks, network.decoder.unflatten(network.decoder.dense(code)))

    assert encoder_shapes == [(32, size // 2, size // 2), (64, size // 4, size // 4), (128, size // 8, size // 8), (256, bottleneck, bottleneck)]
    assert code.shape == (2, 128)
    assert decoder_shapes == [(128, size // 8, size // 8), (64, size // 4, size // 4), (32, size // 2, size // 2), (1, size, size)]
    assert network(images).shape == images.shape


def test_autoencoder_layer_types():
    network = ConvAutoencoder(64)

    for block in network.encoder.blocks:
        convolution, normalization, activation = block
        assert (convolution.kernel_size, convolution.stride, convolution.padding, convolution.bias) == ((3, 3), (2, 2), (1, 1), None)
        assert isinstance(normalization, nn.InstanceNorm2d)
        assert not normalization.affine
        assert activation.negative_slope == 0.01
    for block in list(network.decoder.blocks)[:-1]:
        transposed, normalization, activation = block
        assert (transposed.kernel_size, transposed.stride, transposed.padding, transposed.bias) == ((4, 4), (2, 2), (1, 1), None)
        assert isinstance(normalization, nn.InstanceNorm2d)
        assert isinstance(activation, nn.LeakyReLU)
    output = network.decoder.blocks[-1]
    assert isinstance(output, nn.ConvTranspose2d)  # linear output: no normalization, activation or sigmoid follows
    assert (output.in_channels, output.out_channels, output.bias) == (32, 1, None)
    assert network.encoder.dense.bias is None
    assert network.decoder.dense.bias is None


def test_autoencoder_parameter_count():
    convolutions = 9 * (1 * 32 + 32 * 64 + 64 * 128 + 128 * 256)
    transposed = 16 * (256 * 128 + 128 * 64 + 64 * 32 + 32 * 1)
    dense = 2 * (256 * 8 * 8 * 128)
    network = ConvAutoencoder(128)

    count = sum(parameter.numel() for parameter in network.parameters())

    assert convolutions + transposed + dense == 5_270_304
    assert count == 5_270_304


@pytest.mark.parametrize(("normalization", "module"), [("batch", nn.BatchNorm2d), ("none", None)])
def test_autoencoder_normalization_choices(normalization, module):
    network = ConvAutoencoder(64, normalization=normalization)

    first_block = list(network.encoder.blocks[0])

    if module is None:
        assert [type(layer) for layer in first_block] == [nn.Conv2d, nn.LeakyReLU]
    else:
        assert isinstance(first_block[1], module)


@pytest.mark.parametrize(("normalization", "channels_last"), [("none", True), ("batch", True), ("instance", False)])
def test_autoencoder_memory_format_keeps_output(normalization, channels_last):
    network = ConvAutoencoder(64, normalization=normalization).eval()
    contiguous = ConvAutoencoder(64, normalization=normalization).eval()
    contiguous.load_state_dict(network.state_dict())
    contiguous.to(memory_format=torch.contiguous_format)
    images = torch.rand(2, 1, 64, 64)

    weight = network.encoder.blocks[1][0].weight

    assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert contiguous.encoder.blocks[1][0].weight.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(network(images), contiguous(images), rtol=1e-4, atol=1e-5)


def test_autoencoder_rejects_other_slice_size():
    network = ConvAutoencoder(64)

    with pytest.raises(InvalidInputError, match=r"invalid slice batch shape \(2, 1, 128, 128\): this autoencoder was built for \(batch, 1, 64, 64\)"):
        network(torch.rand(2, 1, 128, 128))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"image_size": 72}, "invalid slice size 72 for an autoencoder with 4 blocks: the size must be a multiple of 16"),
        ({"image_size": 16}, "slice size 16 leaves a 1x1 map after 4 blocks"),
        ({"channels": []}, r"invalid autoencoder channels \[\]"),
        ({"channels": [32, 0]}, r"invalid autoencoder channels \[32, 0\]"),
        ({"channels": "32"}, "invalid autoencoder channels '32'"),
        ({"latent_dim": 0}, "invalid autoencoder latent_dim 0"),
        ({"latent_dim": True}, "invalid autoencoder latent_dim True"),
        ({"normalization": "group"}, "invalid autoencoder normalization 'group': expected one of instance, batch, none"),
    ],
)
def test_autoencoder_rejects_invalid_architecture(arguments, message):
    keywords = {"image_size": 64, **arguments}

    with pytest.raises(InvalidInputError, match=message):
        ConvAutoencoder(**keywords)


def test_autoencoder_without_instance_norm_accepts_one_pixel_bottleneck():
    network = ConvAutoencoder(16, normalization="none")

    assert network(torch.rand(1, 1, 16, 16)).shape == (1, 1, 16, 16)


def test_read_architecture_defaults_and_overrides():
    assert read_architecture({}, 128, default_normalization="instance") == {
        "image_size": 128,
        "channels": (32, 64, 128, 256),
        "latent_dim": 128,
        "normalization": "instance",
    }
    custom = read_architecture({"channels": [16, 32, 64, 128, 256], "latent_dim": 256, "normalization": "batch"}, 128, default_normalization="none")
    assert custom == {"image_size": 128, "channels": (16, 32, 64, 128, 256), "latent_dim": 256, "normalization": "batch"}


# The method


def test_ae_mse_builds_from_registry_with_defaults():
    method = build_method("ae_mse", {}, seed=0, image_size=128)

    assert isinstance(method, AEMSEMethod)
    assert method.describe() == {
        "method": "ae_mse",
        "settings": {},
        "effective_settings": {"channels": [32, 64, 128, 256], "latent_dim": 128, "normalization": "instance"},
    }


def test_ae_mse_rejects_invalid_slice_size():
    with pytest.raises(InvalidInputError, match="invalid slice size 100 .* set preprocessing.slices.size accordingly"):
        AEMSEMethod({}, seed=0, image_size=100)


def test_ae_mse_loss_is_mean_squared_residual():
    method = AEMSEMethod(SMALL, seed=0, image_size=64)
    images = torch.rand(3, 1, 64, 64)

    loss = method.loss(images, images > 0.1)

    expected = ((images - method.network(images)) ** 2).sum() / images.numel()
    torch.testing.assert_close(loss, expected)


def test_ae_mse_predict_returns_squared_residual():
    method = AEMSEMethod(SMALL, seed=0, image_size=64).eval()
    images = torch.rand(3, 1, 64, 64)

    prediction = method.predict(images, images > 0.1)

    with torch.no_grad():
        expected = (images - method.network(images)) ** 2
    assert prediction.maps.shape == (3, 1, 64, 64)
    assert prediction.maps.dtype == torch.float32
    assert prediction.scores is None
    assert not prediction.maps.requires_grad
    assert torch.isfinite(prediction.maps).all()
    torch.testing.assert_close(prediction.maps, expected, rtol=0, atol=0)


def test_ae_mse_few_steps_lower_the_loss(brain_slices):
    images, masks = brain_slices
    method = AEMSEMethod({}, seed=0, image_size=64)

    _, losses = fit(method, images[::4], masks[::4], steps=8)

    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]


def test_ae_mse_map_higher_inside_bright_disk(brain_slices):
    images, masks = brain_slices
    method, _ = fit(AEMSEMethod(SMALL, seed=0, image_size=64), images[::2], masks[::2], steps=40, learning_rate=5e-3)
    anomalous, disk = plant_bright_disk(images[21:22], masks[21:22])

    maps = method.predict(torch.cat([images[21:22], anomalous]), masks[21:22].expand(2, -1, -1, -1)).maps[:, 0]

    brain_outside = masks[21, 0] & ~disk
    assert maps[1][disk].mean() > 2 * maps[1][brain_outside].mean()
    assert maps[1][disk].mean() > 2 * maps[0][disk].mean()


# Training through the generic loop


class Interrupted(Exception):
    """Raised by a patched training step in place of the job being killed."""


@pytest.fixture(scope="module")
def brain_split(brain_slices, tmp_path_factory):
    images, masks = brain_slices
    path = tmp_path_factory.mktemp("ae_mse_split") / "train.npz"
    write_arrays(path, images=images[::4, 0].numpy(), masks=masks[::4, 0].numpy(), slice_index=np.arange(60, 100, 4, dtype=np.int16))
    return path


def loss_column(path):
    with open(path, newline="") as stream:
        return [row["loss"] for row in csv.DictReader(stream)]


def train(split, folder, method_settings):
    training = TrainingSettings(steps=4, batch_size=4, learning_rate=1e-3, checkpoint_every=2, device="cpu", threads=1)
    outputs = {
        "model_out": folder / "model.pt",
        "report_out": folder / "report.json",
        "loss_csv_out": folder / "losses.csv",
        "loss_png_out": folder / "losses.png",
        "checkpoint_path": folder / "checkpoint.pt",
    }
    return train_method(split, method_name="ae_mse", method_settings=method_settings, seed=1, settings=training, **outputs)


def test_ae_mse_resume_matches_uninterrupted_run(brain_split, tmp_path, monkeypatch):
    train(brain_split, tmp_path / "uninterrupted", SMALL)
    original = AEMSEMethod.training_step

    def killed_after_two_steps(self, images, masks, step, optimizers):
        if step == 2:
            raise Interrupted
        return original(self, images, masks, step, optimizers)

    with monkeypatch.context() as patch:
        patch.setattr(AEMSEMethod, "training_step", killed_after_two_steps)
        with pytest.raises(Interrupted):
            train(brain_split, tmp_path / "interrupted", SMALL)
    report = train(brain_split, tmp_path / "interrupted", SMALL)

    assert report["resumed_from_step"] == 2
    expected = torch.load(tmp_path / "uninterrupted" / "model.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "interrupted" / "model.pt", weights_only=True)["state_dict"]
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert loss_column(tmp_path / "interrupted" / "losses.csv") == loss_column(tmp_path / "uninterrupted" / "losses.csv")
