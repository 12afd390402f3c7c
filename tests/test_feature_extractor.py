"""Tests of the frozen ResNet18 feature extractor."""

from __future__ import annotations

import re
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import ResNet18_Weights, resnet18

from sfae.io import InvalidInputError
from sfae.models import feature_extractor
from sfae.models.feature_extractor import ResNet18FeatureExtractor, imagenet_weights_path, load_resnet18
from sfae.models.sfae import SFAE


def seeded_resnet18(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return resnet18(weights=None).eval()


def reference_features(network: torch.nn.Module, images: torch.Tensor, layers: tuple[str, ...]) -> torch.Tensor:
    """Slow reference: the full torchvision network on the centered grey slice repeated to RGB."""
    hidden = ((images - 0.5) * 2.0).repeat(1, 3, 1, 1)
    outputs = {}
    with torch.no_grad():
        hidden = network.maxpool(network.relu(network.bn1(network.conv1(hidden))))
        outputs["layer0"] = hidden
        for name in ("layer1", "layer2", "layer3"):
            hidden = getattr(network, name)(hidden)
            outputs[name] = hidden
    maps = [outputs[name] for name in layers]
    size = max((feature_map.shape[-2:] for feature_map in maps), key=lambda shape: shape[0] * shape[1])
    return torch.cat([F.interpolate(feature_map, size=size, mode="bilinear", align_corners=False) for feature_map in maps], dim=1)


@pytest.mark.parametrize(
    ("layers", "channels", "size"),
    [
        (("layer0", "layer1", "layer2"), 256, 32),
        (("layer1", "layer2"), 192, 32),
        (("layer1", "layer2", "layer3"), 448, 32),
        (("layer0", "layer1", "layer2", "layer3"), 512, 32),
        (("layer2", "layer3"), 384, 16),
        (("layer3",), 256, 8),
    ],
)
def test_extractor_layer_combinations_shapes(layers, channels, size):
    extractor = ResNet18FeatureExtractor(layers, weights="random", seed=0)

    features = extractor(torch.rand(2, 1, 128, 128))

    assert extractor.out_channels == channels
    assert extractor.stride == 128 // size
    assert features.shape == (2, channels, size, size)


@pytest.mark.parametrize("layers", [("layer0", "layer1", "layer2"), ("layer1", "layer3")])
def test_extractor_matches_full_network_reference(layers):
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    extractor = ResNet18FeatureExtractor(layers, weights="random", seed=3)

    expected = reference_features(seeded_resnet18(3), images, layers)

    torch.testing.assert_close(extractor(images), expected, rtol=1e-5, atol=1e-5)


def test_extractor_concatenates_in_network_order():
    extractor = ResNet18FeatureExtractor(("layer2", "layer0"), weights="random", seed=0)

    assert extractor.layers == ("layer0", "layer2")
    assert extractor.out_channels == 192


def test_extractor_keeps_only_used_stages():
    extractor = ResNet18FeatureExtractor(("layer0", "layer1"), weights="random", seed=0)
    keys = extractor.state_dict().keys()

    assert any(key.startswith("stages.layer1.") for key in keys)
    assert not any("layer2" in key or "layer3" in key or "layer4" in key or "fc." in key for key in keys)


@pytest.mark.parametrize("layers", [("layer4",), ("layer0", "avgpool")])
def test_extractor_rejects_unknown_layer(layers):
    with pytest.raises(InvalidInputError, match=r"invalid feature extractor layer '(layer4|avgpool)'\. Allowed layers are layer0, layer1, layer2, layer3\."):
        ResNet18FeatureExtractor(layers)


@pytest.mark.parametrize("layers", [(), ("layer1", "layer1")])
def test_extractor_rejects_empty_or_repeated_layers(layers):
    with pytest.raises(InvalidInputError, match="invalid feature extractor layers .*: expected a non-empty list without repeats"):
        ResNet18FeatureExtractor(layers)


def test_extractor_rejects_rgb_input():
    extractor = ResNet18FeatureExtractor(weights="random")

    with pytest.raises(InvalidInputError, match=r"invalid feature extractor input: torch.float32 of shape \(1, 3, 64, 64\), expected float slices of shape \(batch, 1, height, width\)"):
        extractor(torch.rand(1, 3, 64, 64))


def test_extractor_stays_frozen_while_parent_trains():
    torch.manual_seed(0)
    model = SFAE(weights="random", seed=0)
    extractor_state = {name: tensor.clone() for name, tensor in model.extractor.state_dict().items()}
    autoencoder_state = {name: tensor.clone() for name, tensor in model.autoencoder.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(4, 1, 64, 64)

    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model.loss(images).backward()
        optimizer.step()

    assert model.training
    assert not model.extractor.training
    assert not any(module.training for module in model.extractor.modules())
    assert not any(parameter.requires_grad for parameter in model.extractor.parameters())
    for name, tensor in model.extractor.state_dict().items():
        assert torch.equal(tensor, extractor_state[name]), f"extractor {name} changed"
    # The autoencoder's BatchNorm statistics do move, so train mode really was on.
    assert not torch.equal(model.autoencoder.state_dict()["encoder.0.1.running_mean"], autoencoder_state["encoder.0.1.running_mean"])


def test_extractor_train_call_keeps_eval_mode():
    extractor = ResNet18FeatureExtractor(weights="random")

    returned = extractor.train(True)

    assert returned is extractor
    assert not extractor.training
    assert not any(module.training for module in extractor.modules())


def test_extractor_features_do_not_require_grad():
    extractor = ResNet18FeatureExtractor(weights="random")
    images = torch.rand(1, 1, 64, 64, requires_grad=True)

    assert not extractor(images).requires_grad


def test_random_weights_same_seed_identical():
    first = ResNet18FeatureExtractor(weights="random", seed=7).state_dict()
    second = ResNet18FeatureExtractor(weights="random", seed=7).state_dict()

    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_random_weights_different_seeds_differ():
    first = ResNet18FeatureExtractor(weights="random", seed=1).state_dict()
    second = ResNet18FeatureExtractor(weights="random", seed=2).state_dict()

    assert not torch.equal(first["stages.layer0.0.weight"], second["stages.layer0.0.weight"])
    assert not torch.equal(first["stages.layer2.0.conv1.weight"], second["stages.layer2.0.conv1.weight"])


def test_random_weights_leave_global_rng_unchanged():
    torch.manual_seed(123)
    state = torch.get_rng_state()

    ResNet18FeatureExtractor(weights="random", seed=5)

    assert torch.equal(torch.get_rng_state(), state)


def test_path_weights_round_trip(tmp_path):
    network = seeded_resnet18(11)
    path = tmp_path / "resnet18.pth"
    torch.save(network.state_dict(), path)

    from_file = ResNet18FeatureExtractor(weights=path)
    from_seed = ResNet18FeatureExtractor(weights="random", seed=11)

    assert torch.equal(from_file.stages["layer0"][0].weight, network.conv1.weight)
    assert torch.equal(from_file.stages["layer2"][1].bn2.running_var, network.layer2[1].bn2.running_var)
    images = torch.rand(1, 1, 64, 64)
    torch.testing.assert_close(from_file(images), from_seed(images), rtol=0, atol=0)


def test_path_weights_missing_file_error(tmp_path):
    path = tmp_path / "missing.pth"

    with pytest.raises(InvalidInputError, match=f"ResNet18 weights file not found: {re.escape(str(path))}"):
        ResNet18FeatureExtractor(weights=path)


def test_path_weights_corrupt_file_error(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"not a torch file")

    with pytest.raises(InvalidInputError, match=f"cannot read ResNet18 weights file {re.escape(str(path))}"):
        ResNet18FeatureExtractor(weights=path)


def test_path_weights_wrong_keys_error(tmp_path):
    path = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)

    with pytest.raises(InvalidInputError, match=f"{re.escape(str(path))} is not a torchvision ResNet18 state dict"):
        ResNet18FeatureExtractor(weights=path)


def test_path_weights_not_a_dict_error(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)

    with pytest.raises(InvalidInputError, match="contains a Tensor, expected a state dict"):
        ResNet18FeatureExtractor(weights=path)


def test_imagenet_weights_path_follows_torchvision_url(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    path = imagenet_weights_path()

    assert path == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert ResNet18_Weights.IMAGENET1K_V1.url.endswith("/" + path.name)


def test_imagenet_weights_not_cached_and_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline_download(url, destination, hash_prefix=None, progress=True):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline_download)
    folder = tmp_path / "hub" / "checkpoints"

    with pytest.raises(InvalidInputError) as raised:
        ResNet18FeatureExtractor(weights="imagenet")

    message = str(raised.value)
    assert "Name or service not known" in message
    assert f"Place the file resnet18-f37072fd.pth in {folder}" in message
    assert "'random'" in message
    assert "path of a ResNet18 state dict" in message


def test_imagenet_weights_read_from_cache_without_download(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    network = seeded_resnet18(13)
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(network.state_dict(), cached)

    def forbidden_download(*arguments, **keywords):
        raise AssertionError("the cached weights must be used without a download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden_download)

    extractor = ResNet18FeatureExtractor(weights="imagenet")

    assert torch.equal(extractor.stages["layer1"][0].conv1.weight, network.layer1[0].conv1.weight)


def test_load_resnet18_download_timeout_is_restored(monkeypatch, tmp_path):
    import socket

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    seen_timeouts = []

    def offline_download(url, destination, hash_prefix=None, progress=True):
        seen_timeouts.append(socket.getdefaulttimeout())
        raise TimeoutError("timed out")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline_download)
    before = socket.getdefaulttimeout()

    with pytest.raises(InvalidInputError, match="timed out"):
        load_resnet18("imagenet")

    assert seen_timeouts == [feature_extractor.DOWNLOAD_TIMEOUT_S]
    assert socket.getdefaulttimeout() == before
