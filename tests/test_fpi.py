"""Tests of foreign patch interpolation, the patch sampler, the segmentation network and the FPI method."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from atlas_slices import write_atlas_split

from sfae.anomalies import disk_mask
from sfae.io import InvalidInputError
from sfae.models.base import build_method
from sfae.models.fpi import FPIMethod
from sfae.models.patch_interpolation import (
    PatchInterpolationNet,
    PatchInterpolationSettings,
    foreign_patch_interpolation,
    patch_mask,
    patch_side_range,
    sample_patches,
)
from sfae.training import TrainingSettings, train_method

# A small network keeps the CPU tests fast; the defaults are tested separately.
SMALL = {"width": 4, "depth": 3}


def random_pair(batch=2, channels=1, size=8, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x1 = torch.rand(batch, channels, size, size, generator=generator, dtype=dtype)
    x2 = torch.rand(batch, channels, size, size, generator=generator, dtype=dtype) + 2  # differs from x1 everywhere
    return x1, x2


def patches(*rows):
    """Return ``(top_left, size, alpha)`` tensors from rows ``(row, column, height, width, alpha)``."""
    top_left = torch.tensor([[row, column] for row, column, _, _, _ in rows])
    size = torch.tensor([[height, width] for _, _, height, width, _ in rows])
    alpha = torch.tensor([alpha for *_, alpha in rows], dtype=torch.float64)
    return top_left, size, alpha


# Foreign patch interpolation


def test_foreign_patch_interpolation_matches_loop_reference():
    x1, x2 = random_pair()
    top_left, size, alpha = patches((1, 2, 3, 4, 0.3), (0, 0, 8, 2, 0.8))

    blended, label = foreign_patch_interpolation(x1, x2, top_left, size, alpha)

    expected = x1.clone()
    expected_label = torch.zeros(2, 1, 8, 8)
    for index, ((row, column), (height, width), factor) in enumerate(zip(top_left.tolist(), size.tolist(), alpha.tolist())):
        for r in range(row, row + height):
            for c in range(column, column + width):
                expected[index, 0, r, c] = (1 - factor) * x1[index, 0, r, c] + factor * x2[index, 0, r, c]
                expected_label[index, 0, r, c] = factor
    torch.testing.assert_close(blended, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(label, expected_label, rtol=0, atol=0)


def test_fpi_blend_label_alpha_inside():
    x1, x2 = random_pair(batch=1, size=16)
    top_left, size, alpha = patches((3, 5, 6, 7, 0.42))

    _, label = foreign_patch_interpolation(x1, x2, top_left, size, alpha)

    assert label.dtype == torch.float32
    assert label.shape == (1, 1, 16, 16)
    assert torch.all(label[0, 0, 3:9, 5:12] == torch.tensor(0.42, dtype=torch.float32))
    label[0, 0, 3:9, 5:12] = 0
    assert torch.all(label == 0)


def test_foreign_patch_interpolation_outside_patch_unchanged():
    x1, x2 = random_pair(batch=1, size=16)
    top_left, size, alpha = patches((3, 5, 6, 7, 0.42))

    blended, _ = foreign_patch_interpolation(x1, x2, top_left, size, alpha)

    outside = ~patch_mask((16, 16), top_left, size)
    assert torch.equal(blended[outside], x1[outside])
    assert not torch.equal(blended[~outside], x1[~outside])


def test_foreign_patch_interpolation_alpha_zero_returns_x1():
    x1, x2 = random_pair(dtype=torch.float32)
    top_left, size, _ = patches((1, 1, 5, 5, 0.0), (2, 0, 6, 8, 0.0))

    blended, label = foreign_patch_interpolation(x1, x2, top_left, size, torch.zeros(2))

    assert torch.equal(blended, x1)
    assert torch.all(label == 0)


def test_fpi_blend_alpha_one_copies_patch():
    x1, x2 = random_pair(dtype=torch.float32)
    top_left, size, _ = patches((1, 1, 5, 5, 1.0), (2, 0, 6, 8, 1.0))

    blended, label = foreign_patch_interpolation(x1, x2, top_left, size, torch.ones(2))

    assert torch.equal(blended[:, :, 1:6, 1:6][0], x2[0, :, 1:6, 1:6])
    assert torch.equal(blended[1, :, 2:8, 0:8], x2[1, :, 2:8, 0:8])
    assert torch.equal(label[0, 0, 1:6, 1:6], torch.ones(5, 5))


def test_foreign_patch_interpolation_equal_pixels_label_zero():
    # Background in both slices: nothing changes there, so the label stays 0.
    x1 = torch.zeros(1, 1, 8, 8)
    x2 = torch.zeros(1, 1, 8, 8)
    x2[0, 0, 2:4, 2:4] = 1.0
    top_left, size, alpha = patches((1, 1, 4, 4, 0.5))

    blended, label = foreign_patch_interpolation(x1, x2, top_left, size, alpha)

    expected = torch.zeros(8, 8)
    expected[2:4, 2:4] = 0.5
    assert torch.equal(label[0, 0], expected)
    assert torch.equal(blended[0, 0], expected)


def test_foreign_patch_interpolation_any_channel_change_labels_pixel():
    x1 = torch.zeros(1, 2, 6, 6)
    x2 = torch.zeros(1, 2, 6, 6)
    x2[0, 1, 3, 3] = 1.0
    top_left, size, alpha = patches((2, 2, 3, 3, 0.25))

    _, label = foreign_patch_interpolation(x1, x2, top_left, size, alpha)

    assert label.shape == (1, 1, 6, 6)
    assert label[0, 0, 3, 3] == 0.25
    assert label.sum() == 0.25


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ((-1, 0, 3, 3, 0.5), r"patch 1 at top_left \[-1, 0\] of size \[3, 3\] does not lie inside the 8x8 slice"),
        ((6, 6, 3, 3, 0.5), r"patch 1 at top_left \[6, 6\] of size \[3, 3\] does not lie inside"),
        ((2, 2, 0, 3, 0.5), r"patch 1 at top_left \[2, 2\] of size \[0, 3\]"),
        ((2, 2, 3, 3, 1.5), r"interpolation factors must lie in \[0, 1\], got \[0.5, 1.5\]"),
    ],
    ids=["negative_corner", "past_edge", "empty", "alpha_above_one"],
)
def test_foreign_patch_interpolation_rejects_invalid_patch(row, message):
    x1, x2 = random_pair()
    top_left, size, alpha = patches((0, 0, 2, 2, 0.5), row)

    with pytest.raises(InvalidInputError, match=message):
        foreign_patch_interpolation(x1, x2, top_left, size, alpha)


def test_foreign_patch_interpolation_rejects_mismatched_shapes():
    x1, x2 = random_pair()
    top_left, size, alpha = patches((0, 0, 2, 2, 0.5), (0, 0, 2, 2, 0.5))

    with pytest.raises(InvalidInputError, match=r"foreign slices of shape \(2, 1, 8, 7\) do not match the slices' shape \(2, 1, 8, 8\)"):
        foreign_patch_interpolation(x1, x2[..., :7], top_left, size, alpha)
    with pytest.raises(InvalidInputError, match=r"expected top_left and size of shape \(2, 2\) and alpha of shape \(2,\)"):
        foreign_patch_interpolation(x1, x2, top_left[:1], size, alpha)


# Patch sampler


def test_patch_side_range_for_128_slices():
    assert patch_side_range(128) == (13, 51)
    assert patch_side_range(64) == (6, 26)


def test_sample_patches_lie_inside_with_margin():
    torch.manual_seed(0)

    top_left, size, alpha = sample_patches(4000, 128)

    assert top_left.dtype == torch.int64
    assert size.dtype == torch.int64
    assert alpha.dtype == torch.float32
    assert torch.equal(size[:, 0], size[:, 1])  # squares
    assert size.min() == 13
    assert size.max() == 51
    assert top_left.min() >= 1
    assert (top_left + size).max() <= 127
    assert alpha.min() >= 0.05
    assert alpha.max() <= 0.95
    # Centres stay near the central 80 % of the slice (pixels 12 to 115) after the shift inside.
    centers = top_left + size // 2
    assert centers.min() >= 7
    assert centers.max() <= 121


def test_sample_patches_draw_from_global_generator():
    torch.manual_seed(3)
    first = sample_patches(8, 64)
    torch.manual_seed(3)
    second = sample_patches(8, 64)
    third = sample_patches(8, 64)

    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], third[0])


def test_sample_patches_honor_ranges():
    torch.manual_seed(0)

    _, size, alpha = sample_patches(500, 64, size_fraction=(0.25, 0.25), alpha_range=(0.5, 0.6))

    assert torch.all(size == 16)
    assert alpha.min() >= 0.5
    assert alpha.max() <= 0.6


# Settings and network


def test_settings_defaults():
    settings = PatchInterpolationSettings.from_config({}, 128)

    assert settings.patch_size_fraction == (0.1, 0.4)
    assert settings.alpha_range == (0.05, 0.95)
    assert (settings.width, settings.depth, settings.image_score) == (8, 4, "brain_mean")


@pytest.mark.parametrize(
    ("settings", "image_size", "message"),
    [
        ({"alpha_range": [0.5, 0.2]}, 64, r"invalid setting alpha_range=\[0.5, 0.2\]: expected low <= high within \[0, 1\]"),
        ({"alpha_range": 0.5}, 64, r"invalid setting alpha_range=0.5: expected two numbers"),
        ({"patch_size_fraction": [0.0, 0.4]}, 64, r"invalid setting patch_size_fraction=\[0.0, 0.4\]: expected low <= high within \(0, 1\]"),
        ({"patch_size_fraction": [0.1, 1.0]}, 64, r"patch sides 6 to 64 pixels must lie between 1 and 62"),
        ({"width": 0}, 64, r"invalid setting width=0: expected a positive integer"),
        ({"depth": 2.0}, 64, r"invalid setting depth=2.0: expected a positive integer"),
        ({"depth": 5}, 48, r"invalid setting depth=5 for 48x48 slices: the slice size must be a multiple of 2\*\*depth = 32"),
        ({"image_score": "max"}, 64, r"invalid setting image_score='max': expected one of brain_mean, top_fraction"),
    ],
)
def test_settings_reject_invalid_values(settings, image_size, message):
    with pytest.raises(InvalidInputError, match=message):
        PatchInterpolationSettings.from_config(settings, image_size)


def test_network_output_shape_and_size():
    network = PatchInterpolationNet().eval()

    logits = network(torch.rand(2, 1, 128, 128))

    assert logits.shape == (2, 1, 128, 128)
    assert logits.dtype == torch.float32
    assert sum(parameter.numel() for parameter in network.parameters()) == 519_761


def test_network_rejects_size_not_multiple_of_downsampling():
    network = PatchInterpolationNet(width=4, depth=3)

    with pytest.raises(InvalidInputError, match="invalid slice size 60x60: this network needs multiples of 8"):
        network(torch.rand(1, 1, 60, 60))


# The FPI method


def test_fpi_build_method_by_name():
    method = build_method("fpi", {}, seed=0, image_size=128)

    assert isinstance(method, FPIMethod)
    assert method.describe() == {"method": "fpi", "settings": {}}


def test_fpi_predict_shapes_and_brain_mean_scores():
    torch.manual_seed(0)
    method = FPIMethod(SMALL, seed=0, image_size=64).eval()
    images = torch.rand(3, 1, 64, 64)
    masks = torch.zeros(3, 1, 64, 64, dtype=torch.bool)
    masks[0, :, 10:40, 10:40] = True
    masks[1] = True

    prediction = method.predict(images, masks)

    maps = prediction.maps
    assert maps.shape == (3, 1, 64, 64)
    assert maps.dtype == torch.float32
    assert not maps.requires_grad
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0
    assert maps.max() <= 1
    assert prediction.scores.shape == (3,)
    torch.testing.assert_close(prediction.scores[0], maps[0, 0, 10:40, 10:40].mean())
    torch.testing.assert_close(prediction.scores[1], maps[1].mean())
    assert prediction.scores[2] == 0  # empty brain mask


def test_fpi_top_fraction_leaves_scores_to_evaluation():
    method = FPIMethod({**SMALL, "image_score": "top_fraction"}, seed=0, image_size=64).eval()

    prediction = method.predict(torch.rand(2, 1, 64, 64), torch.ones(2, 1, 64, 64, dtype=torch.bool))

    assert prediction.scores is None


def test_fpi_synthesize_blends_next_slice():
    method = FPIMethod(SMALL, seed=0, image_size=64)
    images = torch.stack([torch.full((1, 64, 64), value) for value in (0.1, 0.5, 0.9)])

    torch.manual_seed(5)
    blended, label = method.synthesize(images)
    torch.manual_seed(5)
    top_left, size, alpha = sample_patches(3, 64)

    inside = patch_mask((64, 64), top_left, size)
    foreign_values = torch.tensor([0.9, 0.1, 0.5]).view(3, 1, 1, 1)  # the batch rolled by one
    expected = torch.where(inside, (1 - alpha.view(3, 1, 1, 1)) * images + alpha.view(3, 1, 1, 1) * foreign_values, images)
    torch.testing.assert_close(blended, expected)
    torch.testing.assert_close(label, torch.where(inside, alpha.view(3, 1, 1, 1), 0.0))


def test_fpi_synthesize_rejects_other_slice_size():
    method = FPIMethod(SMALL, seed=0, image_size=64)

    with pytest.raises(InvalidInputError, match=r"invalid slices of shape \(2, 1, 32, 32\): fpi expects \(batch, 1, 64, 64\)"):
        method.synthesize(torch.rand(2, 1, 32, 32))


def test_fpi_few_steps_lower_the_loss(one_thread):
    torch.manual_seed(0)
    method = FPIMethod(SMALL, seed=0, image_size=64)
    optimizers = method.configure_optimizers(1e-2)
    # Flat slices of different grey values: every patch is a visible step in intensity.
    images = torch.linspace(0.1, 0.8, 8).view(8, 1, 1, 1).expand(8, 1, 64, 64).contiguous()
    masks = torch.ones_like(images, dtype=torch.bool)
    # The loss of one step varies with its random patches, so the test follows the
    # loss on a fixed batch of 32 blended slices.
    with torch.no_grad():
        blended, label = method.synthesize(images.repeat(4, 1, 1, 1))

    def fixed_batch_loss():
        with torch.no_grad():
            return F.binary_cross_entropy_with_logits(method.network(blended), label).item()

    method.train()
    before = fixed_batch_loss()
    losses = [method.training_step(images, masks, step, optimizers)["loss"] for step in range(30)]

    assert all(np.isfinite(losses))
    assert fixed_batch_loss() < 0.8 * before


# Real brain slices


@pytest.fixture(scope="module")
def brain_slices(demo_files, tmp_path_factory):
    """Fifty 64x64 axial slices of the SRI24 brain (indices 60 to 109) from the real slicing step, as an npz path."""
    return write_atlas_split(demo_files, tmp_path_factory.mktemp("fpi_brain"), start=60, stop=110)


def training_settings(**changes):
    values = {"steps": 6, "batch_size": 4, "learning_rate": 0.01, "checkpoint_every": 2, "device": "cpu", "threads": 1}
    values.update(changes)
    return TrainingSettings(**values)


def run_training(split, folder, method_name="fpi"):
    return train_method(
        split,
        method_name=method_name,
        method_settings=SMALL,
        seed=1,
        settings=training_settings(),
        model_out=folder / "model.pt",
        report_out=folder / "report.json",
        loss_csv_out=folder / "losses.csv",
        loss_png_out=folder / "losses.png",
        checkpoint_path=folder / "checkpoint.pt",
    )


def read_losses(path):
    with open(path, newline="") as stream:
        return [(row["step"], row["loss"]) for row in csv.DictReader(stream)]


class Interrupted(Exception):
    """Raised by a patched training step in place of the job being killed."""


def test_fpi_resumed_training_is_identical(brain_slices, tmp_path, monkeypatch):
    run_training(brain_slices, tmp_path / "uninterrupted")
    original = FPIMethod.training_step

    def killed_after_four_steps(self, images, masks, step, optimizers):
        if step == 4:
            raise Interrupted("killed before step 5")
        return original(self, images, masks, step, optimizers)

    with monkeypatch.context() as patch:
        patch.setattr(FPIMethod, "training_step", killed_after_four_steps)
        with pytest.raises(Interrupted):
            run_training(brain_slices, tmp_path / "interrupted")
    report = run_training(brain_slices, tmp_path / "interrupted")

    assert report["resumed_from_step"] == 4
    expected = torch.load(tmp_path / "uninterrupted" / "model.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "interrupted" / "model.pt", weights_only=True)["state_dict"]
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert read_losses(tmp_path / "interrupted" / "losses.csv") == read_losses(tmp_path / "uninterrupted" / "losses.csv")


def fit_on_brain_slices(method_class, split, *, steps=150, cooldown=30, batch_size=16, held_out=25):
    """Train a small network on the slices of ``split`` except five around ``held_out``; return it in eval mode.

    Adam at 3e-3 for ``steps`` steps, then at 3e-4 for ``cooldown`` steps, so that
    the BatchNorm running statistics catch up with the weights before eval mode.
    """
    arrays = np.load(split)
    images = torch.from_numpy(arrays["images"]).unsqueeze(1)
    masks = torch.from_numpy(arrays["masks"]).unsqueeze(1)
    train_images = torch.cat([images[: held_out - 2], images[held_out + 3 :]])
    train_masks = torch.cat([masks[: held_out - 2], masks[held_out + 3 :]])

    torch.manual_seed(0)
    method = method_class(SMALL, seed=0, image_size=64)
    optimizers = method.configure_optimizers(3e-3)
    order = torch.Generator().manual_seed(0)
    method.train()
    for step in range(steps + cooldown):
        if step == steps:
            for group in optimizers["adam"].param_groups:
                group["lr"] = 3e-4
        batch = torch.randperm(len(train_images), generator=order)[:batch_size]
        method.training_step(train_images[batch], train_masks[batch], step, optimizers)
    return method.eval(), images[held_out], masks[held_out]


def plant_dark_blob(image, mask, radius=8):
    """Darken a brain disk right of the brain's centre to 40 % of its intensity; return the slice and the disk."""
    rows, columns = np.nonzero(mask[0].numpy())
    disk = torch.from_numpy(disk_mask(tuple(mask.shape[-2:]), (rows.mean(), columns.mean() + 8), radius))[None] & mask
    return torch.where(disk, 0.4 * image, image), disk


def test_fpi_short_fit_finds_dark_blob(brain_slices, one_thread):
    method, image, mask = fit_on_brain_slices(FPIMethod, brain_slices)
    planted, disk = plant_dark_blob(image, mask)

    prediction = method.predict(torch.stack([image, planted]), torch.stack([mask, mask]))

    clean_map, planted_map = prediction.maps
    inside = planted_map[disk].mean().item()
    assert inside > 2 * planted_map[mask & ~disk].mean().item()
    assert inside > clean_map[disk].mean().item()
    assert prediction.scores[1] > prediction.scores[0]
