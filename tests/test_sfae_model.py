"""Tests of the feature autoencoder and the SFAE model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sfae import ssim
from sfae.io import InvalidInputError
from sfae.models.sfae import SFAE, FeatureAutoencoder


def block_output_shapes(sequential: nn.Sequential, inputs: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []
    hidden = inputs
    for block in sequential:
        hidden = block(hidden)
        shapes.append(tuple(hidden.shape[1:]))
    return shapes


def test_autoencoder_layer_shapes_for_128_input():
    autoencoder = FeatureAutoencoder(256).eval()
    features = torch.rand(2, 256, 32, 32)

    encoder_shapes = block_output_shapes(autoencoder.encoder, features)
    decoder_shapes = block_output_shapes(autoencoder.decoder, autoencoder.encoder(features))

    assert encoder_shapes == [(100, 16, 16), (150, 8, 8), (200, 4, 4), (300, 2, 2), (300, 2, 2)]
    assert decoder_shapes == [(200, 4, 4), (150, 8, 8), (100, 16, 16), (256, 32, 32), (256, 32, 32)]
    assert autoencoder(features).shape == features.shape


def test_autoencoder_layer_types():
    autoencoder = FeatureAutoencoder(256)

    for block in list(autoencoder.encoder)[:4]:
        convolution, normalization, activation, dropout = block
        assert (convolution.kernel_size, convolution.stride, convolution.padding, convolution.bias) == ((5, 5), (2, 2), (2, 2), None)
        assert isinstance(normalization, nn.BatchNorm2d)
        assert activation.negative_slope == 0.01
        assert isinstance(dropout, nn.Dropout2d) and dropout.p == 0.1
    final_encoder = autoencoder.encoder[4]
    assert (final_encoder.kernel_size, final_encoder.stride, final_encoder.bias) == ((5, 5), (1, 1), None)
    for block in list(autoencoder.decoder)[:4]:
        transposed = block[0]
        assert isinstance(transposed, nn.ConvTranspose2d)
        assert (transposed.kernel_size, transposed.stride, transposed.padding, transposed.bias) == ((6, 6), (2, 2), (2, 2), None)
    output = autoencoder.decoder[4]
    assert (output.in_channels, output.out_channels, output.kernel_size, output.bias) == (256, 256, (1, 1), None)


def test_autoencoder_parameter_count():
    # Encoder 5x5 convolutions, decoder 6x6 transposed convolutions, the 1x1 output
    # convolution (all without bias) and two parameters per BatchNorm channel.
    encoder = 25 * (256 * 100 + 100 * 150 + 150 * 200 + 200 * 300 + 300 * 300)
    decoder = 36 * (300 * 200 + 200 * 150 + 150 * 100 + 100 * 256) + 256 * 256
    batch_norm = 2 * (100 + 150 + 200 + 300) + 2 * (200 + 150 + 100 + 256)
    autoencoder = FeatureAutoencoder(256)

    count = sum(parameter.numel() for parameter in autoencoder.parameters())

    assert encoder + decoder + batch_norm == 10_285_048
    assert count == 10_285_048


@pytest.mark.parametrize("size", [(24, 32), (32, 40)])
def test_autoencoder_rejects_size_not_multiple_of_16(size):
    autoencoder = FeatureAutoencoder(8)

    with pytest.raises(InvalidInputError, match=f"invalid feature map size {size[0]}x{size[1]}: the autoencoder needs height and width that are multiples of 16"):
        autoencoder(torch.rand(1, 8, *size))


def test_autoencoder_rejects_wrong_channel_count():
    autoencoder = FeatureAutoencoder(8)

    with pytest.raises(InvalidInputError, match=r"invalid autoencoder input shape \(1, 9, 16, 16\): expected \(batch, 8, height, width\)"):
        autoencoder(torch.rand(1, 9, 16, 16))


@pytest.mark.parametrize(("keywords", "message"), [({"dropout": 1.0}, r"invalid dropout 1.0: expected a probability in \[0, 1\)"), ({"hidden": (10, 0)}, r"invalid channel counts in_channels=8 and hidden=\(10, 0\)")])
def test_autoencoder_rejects_bad_settings(keywords, message):
    with pytest.raises(InvalidInputError, match=message):
        FeatureAutoencoder(8, **keywords)


def test_sfae_forward_shapes_and_gradients():
    model = SFAE(weights="random", seed=0)
    images = torch.rand(2, 1, 128, 128)

    features, reconstruction = model(images)

    assert features.shape == (2, 256, 32, 32)
    assert reconstruction.shape == (2, 256, 32, 32)
    assert not features.requires_grad
    assert reconstruction.requires_grad


def test_sfae_rejects_slice_size_not_multiple_of_64():
    model = SFAE(weights="random")

    with pytest.raises(InvalidInputError, match=r"invalid slice size 96x96: SFAE with layers \['layer0', 'layer1', 'layer2'\] needs height and width that are multiples of 64"):
        model(torch.rand(1, 1, 96, 96))


def test_sfae_input_multiple_depends_on_layers():
    assert SFAE(layers=("layer1", "layer2")).input_multiple == 64
    assert SFAE(layers=("layer2", "layer3")).input_multiple == 128


def test_sfae_loss_is_one_minus_mean_ssim():
    model = SFAE(weights="random", seed=0).eval()
    images = torch.rand(2, 1, 64, 64)

    loss = model.loss(images)
    features, reconstruction = model(images)

    expected = 1 - ssim.ssim_map(reconstruction, features, window_size=5, sigma=1.5).mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


def test_sfae_anomaly_map_matches_manual_computation():
    model = SFAE(weights="random", seed=0)
    images = torch.rand(2, 1, 64, 64)

    model.train()
    first = model.anomaly_map(images)
    second = model.anomaly_map(images)

    assert model.training
    assert first.shape == (2, 1, 64, 64)
    assert not first.requires_grad
    # Dropout is off, so two calls in a training run agree.
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        features, reconstruction = model(images)
        expected = ssim.anomaly_map(reconstruction, features, (64, 64))
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    assert first.min() >= 0
    assert first.max() <= 2


def test_sfae_anomaly_map_rises_inside_perturbed_square():
    torch.manual_seed(0)
    model = SFAE(weights="random", seed=0)
    images = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.1 + 0.45
    optimizer = torch.optim.Adam(model.autoencoder.parameters(), lr=1e-3)
    model.train()
    for _ in range(10):
        optimizer.zero_grad()
        model.loss(images).backward()
        optimizer.step()
    perturbed = images[:1].clone()
    perturbed[..., 24:40, 24:40] = 1.0

    maps = model.anomaly_map(torch.cat([images[:1], perturbed]))[:, 0]
    increase = maps[1] - maps[0]

    inside = increase[26:38, 26:38].mean().item()
    far_border = increase[:8].mean().item()
    assert inside > 0.15
    assert inside > 2 * far_border


def test_sfae_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = SFAE(weights="random", seed=0)
    images = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(model.autoencoder.parameters(), lr=1e-3)

    model.train()
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = model.loss(images)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    # Training-mode losses: after 10 steps the BatchNorm running statistics
    # (momentum 0.1) are still mostly their initial values, so eval mode lags.
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1


def test_sfae_only_autoencoder_parameters_are_trainable():
    model = SFAE(weights="random")

    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}

    assert trainable
    assert all(name.startswith("autoencoder.") for name in trainable)


def test_sfae_rejects_even_window():
    with pytest.raises(InvalidInputError, match="window_size must be an odd positive integer"):
        SFAE(window_size=4)
