"""Tests of f-AnoGAN: networks, settings, both training phases, predictions and exact resume."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from atlas_slices import write_atlas_split
from torch import nn

from sfae.io import InvalidInputError, write_arrays
from sfae.models import METHODS
from sfae.models.fanogan import (
    ADAM_BETAS,
    Critic,
    Encoder,
    FAnoGAN,
    FAnoGANMethod,
    FAnoGANSettings,
    Generator,
    gradient_penalty,
)
from sfae.training import TrainingSettings, train_method

SIZE = 64
SMALL_CHANNELS = [8, 16, 16, 32]  # 3 blocks: 64 -> 8 pixels at the bottleneck
SMALL = {"channels": SMALL_CHANNELS, "latent_dim": 16, "total_steps": 10}


def build(settings=None, *, size=SIZE, seed=0):
    torch.manual_seed(seed)
    method = FAnoGANMethod(SMALL if settings is None else settings, seed=seed, image_size=size)
    return method.train()


def state_of(module):
    return {key: value.clone() for key, value in module.state_dict().items()}


def changed_tensors(before, module):
    after = module.state_dict()
    return [key for key in before if not torch.equal(before[key], after[key])]


def random_slices(count=4, size=SIZE, seed=0):
    return torch.rand(count, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def brain_split(demo_files, tmp_path_factory):
    """24 axial 64x64 slices of the SRI24 brain (every other slice of 60..107), written by the real slicing step."""
    folder = tmp_path_factory.mktemp("fanogan_split")
    arrays = dict(np.load(write_atlas_split(demo_files, folder, start=60, stop=108, size=SIZE)))
    split = folder / "every_other.npz"
    write_arrays(split, **{key: value[::2] for key, value in arrays.items()})
    return split


def brain_tensors(split):
    arrays = np.load(split)
    return torch.from_numpy(arrays["images"]).unsqueeze(1), torch.from_numpy(arrays["masks"]).unsqueeze(1)


# Networks


def test_networks_output_shapes_and_range():
    torch.manual_seed(0)
    generator, critic, encoder = Generator(SIZE, 16, SMALL_CHANNELS), Critic(SIZE, SMALL_CHANNELS), Encoder(SIZE, 16, SMALL_CHANNELS)
    images = random_slices(3)

    with torch.no_grad():
        fakes = generator(torch.randn(3, 16))
    assert fakes.shape == (3, 1, SIZE, SIZE)
    assert fakes.dtype == torch.float32
    assert float(fakes.min()) >= 0.0
    assert float(fakes.max()) <= 1.0
    assert critic(images).shape == (3,)
    assert critic.features(images).shape == (3, 32 * 8 * 8)
    assert encoder(images).shape == (3, 16)


@pytest.mark.parametrize(("size", "blocks", "bottleneck"), [(128, 5, 4), (80, 4, 5)])
def test_default_channels_by_slice_size(size, blocks, bottleneck):
    method = build({}, size=size)
    network = method.network

    assert len(network.critic.blocks) == blocks
    assert network.generator.base_size == bottleneck
    assert network.critic.feature_count == 512 * bottleneck**2
    assert network.latent_dim == 128
    assert network.generator.project.in_features == 128


def test_critic_has_no_batchnorm():
    critic = FAnoGAN(SIZE, 16, SMALL_CHANNELS).critic

    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in critic.modules())
    assert any(isinstance(module, nn.GroupNorm) for module in critic.modules())


def test_critic_scores_each_slice_independently():
    # Required by the gradient penalty: a slice's score must not depend on the rest of the batch.
    torch.manual_seed(0)
    critic = Critic(SIZE, SMALL_CHANNELS)
    images = random_slices(4)

    together = critic(images)
    alone = torch.cat([critic(images[i : i + 1]) for i in range(4)])

    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


# Settings


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"latent_dim": 0}, "latent_dim=0"),
        ({"n_critic": 1.5}, "n_critic=1.5"),
        ({"total_steps": True}, "total_steps=True"),
        ({"gan_fraction": 1.0}, r"gan_fraction=1.0: expected a finite number in \(0, 1\)"),
        ({"gan_fraction": 0}, "gan_fraction=0"),
        ({"gradient_penalty_weight": -1.0}, r"gradient_penalty_weight=-1.0: expected a finite number in \[0, inf\]"),
        ({"kappa": float("nan")}, "kappa=nan"),
        ({"channels": [8]}, r"channels=\[8\]: expected a list of at least 2 positive integers"),
        ({"channels": "8,16"}, "channels='8,16'"),
        ({"channels": [8, 0, 16]}, r"channels=\[8, 0, 16\]"),
    ],
)
def test_settings_invalid_value_rejected(changes, message):
    with pytest.raises(InvalidInputError, match=f"invalid fanogan setting {message}"):
        FAnoGANSettings.from_mapping({**SMALL, **changes}, SIZE)


def test_settings_unknown_key_rejected():
    with pytest.raises(InvalidInputError, match=r"unknown fanogan settings \['critic_iterations'\]"):
        FAnoGANSettings.from_mapping({**SMALL, "critic_iterations": 5}, SIZE)


@pytest.mark.parametrize(("fraction", "total"), [(0.5, 1), (0.1, 4), (0.99, 20)])
def test_settings_split_without_both_phases_rejected(fraction, total):
    with pytest.raises(InvalidInputError, match=f"gan_fraction={fraction} and total_steps={total} give"):
        FAnoGANSettings.from_mapping({**SMALL, "gan_fraction": fraction, "total_steps": total}, SIZE)


def test_settings_slice_size_must_fit_channels():
    with pytest.raises(InvalidInputError, match="needs slices whose size is a multiple of 8 pixels, got 60"):
        FAnoGANMethod(SMALL, seed=0, image_size=60)
    with pytest.raises(InvalidInputError, match="multiple of 16 pixels, got 72"):
        FAnoGANMethod({}, seed=0, image_size=72)


@pytest.mark.parametrize(("fraction", "total", "gan_steps"), [(0.5, 10_000, 5000), (0.5, 7, 4), (0.3, 10, 3), (0.29, 100, 29), (0.25, 2, 1)])
def test_settings_gan_steps_rounded_half_up(fraction, total, gan_steps):
    assert FAnoGANSettings.from_mapping({"gan_fraction": fraction, "total_steps": total}, 128).gan_steps == gan_steps


def test_settings_defaults_from_empty_mapping():
    config = FAnoGANSettings.from_mapping({}, 128)

    assert (config.latent_dim, config.gan_fraction, config.total_steps, config.n_critic) == (128, 0.5, 10_000, 1)
    assert (config.gradient_penalty_weight, config.kappa) == (10.0, 1.0)
    assert config.channels == (64, 128, 256, 256, 512, 512)


# Gradient penalty


def test_gradient_penalty_of_linear_critic():
    # critic(x) = <w, x> has the gradient w at every point, so the penalty is (|w| - 1)^2
    # and its gradient with respect to w is 2 (|w| - 1) w / |w|, whatever the mixing factors.
    weight = torch.tensor([[3.0, 0.0], [0.0, 4.0]], requires_grad=True)  # |w| = 5
    real, fake = torch.rand(6, 1, 2, 2), torch.rand(6, 1, 2, 2)

    penalty = gradient_penalty(lambda x: (x[:, 0] * weight).sum((1, 2)), real, fake)
    penalty.backward()

    assert penalty.item() == pytest.approx(16.0)
    torch.testing.assert_close(weight.grad, 2 * 4 * weight.detach() / 5)


def test_gradient_penalty_matches_per_slice_loop():
    torch.manual_seed(0)
    critic = Critic(SIZE, SMALL_CHANNELS)
    real, fake = random_slices(3, seed=1), random_slices(3, seed=2)

    torch.manual_seed(7)
    penalty = gradient_penalty(critic, real, fake)

    torch.manual_seed(7)
    mixing = torch.rand(3, 1, 1, 1)
    expected = []
    for i in range(3):
        mixed = (mixing[i] * real[i] + (1 - mixing[i]) * fake[i]).unsqueeze(0).requires_grad_(True)
        (gradient,) = torch.autograd.grad(critic(mixed).sum(), mixed)
        expected.append((gradient.norm() - 1) ** 2)
    torch.testing.assert_close(penalty, torch.stack(expected).mean(), rtol=1e-4, atol=1e-6)


# Training phases


def test_configure_optimizers_one_adam_per_network():
    method = build()

    optimizers = method.configure_optimizers(3e-4)

    assert sorted(optimizers) == ["critic", "encoder", "generator"]
    for name, optimizer in optimizers.items():
        assert isinstance(optimizer, torch.optim.Adam)
        (group,) = optimizer.param_groups
        assert (group["lr"], group["betas"]) == (3e-4, ADAM_BETAS)
        assert {id(p) for p in group["params"]} == {id(p) for p in getattr(method.network, name).parameters()}


def test_phase_switch_at_gan_steps():
    method = build({**SMALL, "gan_fraction": 0.3})  # 3 GAN steps of 10
    optimizers = method.configure_optimizers(1e-3)
    images = random_slices()

    for step in range(3):
        encoder_before = state_of(method.network.encoder)
        losses = method.training_step(images, images > 0, step, optimizers)
        assert sorted(losses) == ["critic_loss", "generator_loss", "gradient_penalty", "wasserstein_estimate"]
        assert not changed_tensors(encoder_before, method.network.encoder)

    generator_before, critic_before = state_of(method.network.generator), state_of(method.network.critic)
    losses = method.training_step(images, images > 0, 3, optimizers)

    assert sorted(losses) == ["feature_loss", "izif_loss", "residual_loss"]
    assert not changed_tensors(generator_before, method.network.generator)
    assert not changed_tensors(critic_before, method.network.critic)
    assert method.phase_steps.tolist() == [3, 1]


def test_gan_step_updates_generator_and_critic_only():
    method = build({**SMALL, "n_critic": 3})
    optimizers = method.configure_optimizers(1e-3)
    generator_before, critic_before = state_of(method.network.generator), state_of(method.network.critic)

    method.training_step(random_slices(), None, 0, optimizers)

    assert changed_tensors(generator_before, method.network.generator)
    assert changed_tensors(critic_before, method.network.critic)
    assert optimizers["critic"].state[next(method.network.critic.parameters())]["step"].item() == 3
    assert optimizers["generator"].state[next(method.network.generator.parameters())]["step"].item() == 1
    assert not optimizers["encoder"].state


def test_encoder_step_freezes_generator_and_critic():
    method = build({**SMALL, "gan_fraction": 0.1})  # 1 GAN step of 10
    optimizers = method.configure_optimizers(1e-3)
    images = random_slices()
    method.training_step(images, None, 0, optimizers)
    generator_before, critic_before, encoder_before = (state_of(getattr(method.network, name)) for name in ("generator", "critic", "encoder"))
    generator_optimizer_before = optimizers["generator"].state_dict()["state"][0]["exp_avg"].clone()
    method.zero_grad(set_to_none=True)

    method.training_step(images, None, 1, optimizers)

    # Weights and BatchNorm running statistics of the generator stay as they were.
    assert not changed_tensors(generator_before, method.network.generator)
    assert not changed_tensors(critic_before, method.network.critic)
    assert changed_tensors(encoder_before, method.network.encoder)
    assert all(parameter.grad is None for parameter in method.network.critic.parameters())
    assert all(parameter.grad is None for parameter in method.network.generator.parameters())
    assert torch.equal(optimizers["generator"].state_dict()["state"][0]["exp_avg"], generator_optimizer_before)
    assert all(parameter.requires_grad for parameter in method.parameters())
    assert method.training and method.network.generator.training


def test_encoder_steps_lower_izif_loss(brain_split):
    images, masks = brain_tensors(brain_split)
    method = build({**SMALL, "total_steps": 40, "gan_fraction": 0.25})
    optimizers = method.configure_optimizers(1e-3)

    losses = [method.training_step(images[:8], masks[:8], step, optimizers) for step in range(40)]

    izif = [entry["izif_loss"] for entry in losses[10:]]
    assert len(izif) == 30
    assert np.mean(izif[-3:]) < 0.7 * np.mean(izif[:3])


def test_gan_steps_raise_wasserstein_estimate(brain_split):
    # Starting from a random generator, the critic learns to tell real brain slices from fakes.
    images, masks = brain_tensors(brain_split)
    method = build({**SMALL, "total_steps": 40})
    optimizers = method.configure_optimizers(1e-3)

    losses = [method.training_step(images[:8], masks[:8], step, optimizers) for step in range(10)]

    estimates = [entry["wasserstein_estimate"] for entry in losses]
    assert np.mean(estimates[-3:]) > np.mean(estimates[:3]) + 0.1


# Prediction


def test_predict_maps_and_scores_match_izif_per_slice():
    method = build({**SMALL, "kappa": 0.5})
    optimizers = method.configure_optimizers(1e-3)
    images = random_slices()
    for step in range(6):
        method.training_step(images, None, step, optimizers)
    method.eval()

    prediction = method.predict(images, images > 0.5)

    assert prediction.maps.shape == (4, 1, SIZE, SIZE)
    assert prediction.maps.dtype == torch.float32
    assert prediction.scores.dtype == torch.float32
    assert torch.isfinite(prediction.maps).all()
    network = method.network
    with torch.no_grad():
        for i in range(4):
            image = images[i : i + 1]
            reconstruction = network.generator(network.encoder(image))
            residual = ((image - reconstruction) ** 2).mean()
            features = ((network.critic.features(image) - network.critic.features(reconstruction)) ** 2).mean()
            torch.testing.assert_close(prediction.maps[i : i + 1], (image - reconstruction).abs(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(prediction.scores[i], residual + 0.5 * features, rtol=1e-4, atol=1e-6)


def test_predict_runs_in_eval_mode_and_restores_mode():
    method = build()
    images = random_slices()
    generator_before = state_of(method.network.generator)

    first = method.predict(images, None)

    assert method.training and method.network.generator.training
    assert not changed_tensors(generator_before, method.network.generator)  # BatchNorm statistics untouched
    assert torch.equal(first.maps, method.eval().predict(images, None).maps)


def test_predict_rejects_wrong_shape():
    method = build()

    with pytest.raises(InvalidInputError, match=r"invalid fanogan input shape \(2, 1, 32, 32\): expected \(batch, 1, 64, 64\)"):
        method.predict(random_slices(2, size=32), None)


def test_predict_warns_when_encoder_untrained(caplog):
    method = build()

    method.predict(random_slices(2), None)

    assert "the encoder has taken no training step" in caplog.text


def test_map_higher_inside_planted_blob(brain_split):
    images, masks = brain_tensors(brain_split)
    method = build({**SMALL, "total_steps": 60})
    optimizers = method.configure_optimizers(1e-3)
    order = torch.Generator().manual_seed(0)
    for step in range(60):
        batch = torch.randperm(images.shape[0], generator=order)[:8]
        method.training_step(images[batch], masks[batch], step, optimizers)
    method.eval()

    # A dark disk of radius 6 pixels in the middle slice's brain, like a hypointense lesion.
    clean, brain = images[12:13], masks[12:13]
    rows, columns = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    disk = ((rows - 36) ** 2 + (columns - 24) ** 2 < 36)[None, None] & brain
    anomalous = torch.where(disk, torch.zeros_like(clean), clean)
    maps = method.predict(torch.cat([clean, anomalous]), torch.cat([brain, brain])).maps

    assert int(disk.sum()) > 100
    inside, outside = maps[1][disk[0]].mean(), maps[1][(brain & ~disk)[0]].mean()
    assert inside > 2 * outside
    assert inside > 2 * maps[0][disk[0]].mean()


# Training loop


class Interrupted(Exception):
    """Raised by a patched training step in place of the job being killed."""


def train_fanogan(split, folder, steps=6):
    return train_method(
        split,
        method_name="fanogan",
        method_settings={**SMALL, "total_steps": steps},
        seed=1,
        settings=TrainingSettings(steps=steps, batch_size=4, learning_rate=1e-3, checkpoint_every=2, device="cpu", threads=1),
        model_out=folder / "model.pt",
        report_out=folder / "report.json",
        loss_csv_out=folder / "losses.csv",
        loss_png_out=folder / "losses.png",
        checkpoint_path=folder / "checkpoint.pt",
    )


def read_rows(path):
    with open(path, newline="") as stream:
        return [{key: value for key, value in row.items() if key != "images_per_s"} for row in csv.DictReader(stream)]


@pytest.mark.parametrize("killed_at", [2, 4], ids=["killed_in_gan_phase", "killed_in_encoder_phase"])
def test_train_method_resume_across_phases_is_exact(brain_split, tmp_path, monkeypatch, killed_at):
    assert METHODS["fanogan"] is FAnoGANMethod
    train_fanogan(brain_split, tmp_path / "uninterrupted")

    original = FAnoGANMethod.training_step

    def failing_step(self, images, masks, step, optimizers):
        if step == killed_at:
            raise Interrupted(f"killed before step {step + 1}")
        return original(self, images, masks, step, optimizers)

    with monkeypatch.context() as patch:
        patch.setattr(FAnoGANMethod, "training_step", failing_step)
        with pytest.raises(Interrupted):
            train_fanogan(brain_split, tmp_path / "interrupted")
    report = train_fanogan(brain_split, tmp_path / "interrupted")

    assert report["resumed_from_step"] == killed_at
    assert (report["description"]["gan_steps_done"], report["description"]["encoder_steps_done"]) == (3, 3)
    expected = torch.load(tmp_path / "uninterrupted" / "model.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "interrupted" / "model.pt", weights_only=True)["state_dict"]
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    rows = read_rows(tmp_path / "interrupted" / "losses.csv")
    assert rows == read_rows(tmp_path / "uninterrupted" / "losses.csv")
    assert [bool(row["critic_loss"]) for row in rows] == [True, True, True, False, False, False]
    assert all(math.isfinite(float(row["izif_loss"])) for row in rows[3:])


# GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_and_predict_on_cuda():
    method = build().cuda()
    optimizers = method.configure_optimizers(1e-3)
    images = random_slices().cuda()
    for step in range(6):
        losses = method.training_step(images, None, step, optimizers)
        assert all(math.isfinite(value) for value in losses.values())

    prediction = method.eval().predict(images, None)

    assert prediction.maps.device.type == "cuda"
    assert prediction.scores.device.type == "cuda"
    assert torch.isfinite(prediction.maps).all()
