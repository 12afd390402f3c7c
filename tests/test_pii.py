"""Tests of Poisson image interpolation and the PII method."""

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
    dirichlet_laplacian_factorization,
    foreign_patch_interpolation,
    patch_mask,
    poisson_image_interpolation,
    sample_patches,
)
from sfae.models.pii import PIIMethod
from sfae.training import TrainingSettings, train_method

SMALL = {"width": 4, "depth": 3}


NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def random_pair(batch=2, channels=1, size=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x1 = torch.rand(batch, channels, size, size, generator=generator, dtype=torch.float64)
    x2 = torch.rand(batch, channels, size, size, generator=generator, dtype=torch.float64) + 2  # differs from x1 everywhere
    return x1, x2


def patches(*rows):
    """Return ``(top_left, size, alpha)`` tensors from rows ``(row, column, height, width, alpha)``."""
    top_left = torch.tensor([[row, column] for row, column, _, _, _ in rows])
    size = torch.tensor([[height, width] for _, _, height, width, _ in rows])
    alpha = torch.tensor([alpha for *_, alpha in rows], dtype=torch.float64)
    return top_left, size, alpha


def reference_guidance(x1, x2, row, column, alpha):
    """Sum over the 4-neighbours of the mixed guidance at one pixel, one pair of differences at a time."""
    total = 0.0
    for dr, dc in NEIGHBOURS:
        own = (1 - alpha) * (x1[row, column] - x1[row + dr, column + dc])
        foreign = alpha * (x2[row, column] - x2[row + dr, column + dc])
        total += own if abs(own) > abs(foreign) else foreign
    return total


def reference_laplacian(u, row, column):
    return sum(u[row, column] - u[row + dr, column + dc] for dr, dc in NEIGHBOURS)


# Poisson image interpolation


@pytest.mark.parametrize("alpha", [0.05, 0.5, 0.95])
def test_poisson_image_interpolation_satisfies_poisson_equation(alpha):
    x1, x2 = random_pair(batch=1)
    x2 = x2 * 3  # gradients of x2 are larger on average, so both branches of the mixing rule occur
    top_left, size, factors = patches((2, 3, 7, 5, alpha))

    blended, _ = poisson_image_interpolation(x1, x2, top_left, size, factors)

    u, a, b = blended[0, 0].numpy(), x1[0, 0].numpy(), x2[0, 0].numpy()
    for row in range(2, 9):
        for column in range(3, 8):
            expected = reference_guidance(a, b, row, column, alpha)
            assert reference_laplacian(u, row, column) == pytest.approx(expected, abs=1e-10), (row, column)


def test_poisson_image_interpolation_mixes_both_gradients():
    # With alpha = 0.5, each pair takes the larger of the two differences: here the
    # foreign slice's in some places and the slice's own in others.
    x1, x2 = random_pair(batch=1)
    a, b = x1[0, 0].numpy(), x2[0, 0].numpy()
    chosen_foreign = [abs(b[5, 5] - b[5 + dr, 5 + dc]) >= abs(a[5, 5] - a[5 + dr, 5 + dc]) for dr, dc in NEIGHBOURS]
    assert any(chosen_foreign)
    assert not all(chosen_foreign)

    blended, _ = poisson_image_interpolation(x1, x2, *patches((3, 3, 6, 6, 0.5)))

    assert reference_laplacian(blended[0, 0].numpy(), 5, 5) == pytest.approx(reference_guidance(a, b, 5, 5, 0.5), abs=1e-10)


def test_poisson_image_interpolation_boundary_and_outside_unchanged():
    x1, x2 = random_pair()
    top_left, size, alpha = patches((1, 1, 10, 10, 0.7), (4, 2, 3, 8, 0.3))

    blended, _ = poisson_image_interpolation(x1, x2, top_left, size, alpha)

    outside = ~patch_mask((12, 12), top_left, size)
    assert torch.equal(blended[outside], x1[outside])
    # The ring around the first patch is the image border itself, the Dirichlet boundary.
    assert torch.equal(blended[0, 0, 0], x1[0, 0, 0])
    assert torch.equal(blended[0, 0, :, 11], x1[0, 0, :, 11])
    assert not torch.equal(blended[~outside], x1[~outside])


def test_poisson_image_interpolation_alpha_zero_reproduces_x1():
    x1, x2 = random_pair()
    top_left, size, _ = patches((1, 1, 10, 10, 0.0), (3, 2, 5, 7, 0.0))

    blended, label = poisson_image_interpolation(x1, x2, top_left, size, torch.zeros(2, dtype=torch.float64))

    torch.testing.assert_close(blended, x1, rtol=0, atol=1e-12)
    assert torch.all(label == 0)


def test_pii_blend_alpha_one_copies_gradients():
    # Alpha 1 clones x2's patch, but only its gradients: x2 = x1 + 5 gives back x1,
    # where foreign patch interpolation gives x1 + 5.
    x1, _ = random_pair(batch=1)
    top_left, size, alpha = patches((2, 2, 8, 8, 1.0))

    blended, label = poisson_image_interpolation(x1, x1 + 5, top_left, size, alpha)
    linear, _ = foreign_patch_interpolation(x1, x1 + 5, top_left, size, alpha)

    torch.testing.assert_close(blended, x1, rtol=0, atol=1e-12)
    torch.testing.assert_close(linear[0, 0, 2:10, 2:10], x1[0, 0, 2:10, 2:10] + 5)
    assert torch.all(label[0, 0, 2:10, 2:10] == 1)


def test_pii_blend_label_alpha_inside():
    x1, x2 = random_pair(batch=1)
    top_left, size, alpha = patches((2, 3, 7, 5, 0.35))

    _, label = poisson_image_interpolation(x1, x2, top_left, size, alpha)

    assert label.dtype == torch.float32
    assert torch.all(label[0, 0, 2:9, 3:8] == torch.tensor(0.35, dtype=torch.float32))
    label[0, 0, 2:9, 3:8] = 0
    assert torch.all(label == 0)


def test_poisson_image_interpolation_channels_solved_separately():
    x1, x2 = random_pair(batch=1, channels=2)
    top_left, size, alpha = patches((2, 2, 6, 7, 0.6))

    both, _ = poisson_image_interpolation(x1, x2, top_left, size, alpha)
    first, _ = poisson_image_interpolation(x1[:, :1], x2[:, :1], top_left, size, alpha)
    second, _ = poisson_image_interpolation(x1[:, 1:], x2[:, 1:], top_left, size, alpha)

    torch.testing.assert_close(both, torch.cat([first, second], dim=1), rtol=0, atol=1e-14)


def test_poisson_image_interpolation_clips_only_the_patch():
    x1 = torch.full((1, 1, 10, 10), 0.9, dtype=torch.float64)
    x1[0, 0, 0, 0] = 1.5  # outside the patch and above the clip range
    x2 = torch.zeros(1, 1, 10, 10, dtype=torch.float64)
    x2[0, 0, 4:6, 4:6] = 3.0  # a strong bump whose gradients push the patch above 1
    top_left, size, alpha = patches((2, 2, 6, 6, 0.9))

    exact, _ = poisson_image_interpolation(x1, x2, top_left, size, alpha)
    clipped, _ = poisson_image_interpolation(x1, x2, top_left, size, alpha, clip_range=(0.0, 1.0))

    assert exact.max() > 1.5
    assert clipped[0, 0, 2:8, 2:8].max() == 1.0
    torch.testing.assert_close(clipped[0, 0, 2:8, 2:8], exact[0, 0, 2:8, 2:8].clamp(0, 1))
    assert clipped[0, 0, 0, 0] == 1.5


def test_poisson_image_interpolation_keeps_dtype_and_device():
    x1, x2 = random_pair()
    top_left, size, alpha = patches((1, 1, 4, 4, 0.5), (2, 2, 5, 5, 0.5))

    blended, label = poisson_image_interpolation(x1.float(), x2.float(), top_left, size, alpha.float())

    assert blended.dtype == torch.float32
    assert blended.device == x1.device
    assert label.shape == (2, 1, 12, 12)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ((0, 3, 4, 4, 0.5), r"patch 1 at top_left \[0, 3\] of size \[4, 4\] does not lie inside the 12x12 slice with a margin of 1 pixels"),
        ((3, 3, 4, 9, 0.5), r"patch 1 at top_left \[3, 3\] of size \[4, 9\] does not lie inside"),
        ((3, 3, 4, 4, -0.1), r"interpolation factors must lie in \[0, 1\]"),
    ],
    ids=["touches_top_edge", "touches_right_edge", "negative_alpha"],
)
def test_poisson_image_interpolation_rejects_invalid_patch(row, message):
    x1, x2 = random_pair()
    top_left, size, alpha = patches((1, 1, 2, 2, 0.5), row)

    with pytest.raises(InvalidInputError, match=message):
        poisson_image_interpolation(x1, x2, top_left, size, alpha)


def test_dirichlet_laplacian_factorization_matches_dense_matrix():
    height, width = 3, 4
    dense = np.zeros((height * width, height * width))
    for row in range(height):
        for column in range(width):
            index = row * width + column
            dense[index, index] = 4
            for dr, dc in NEIGHBOURS:
                if 0 <= row + dr < height and 0 <= column + dc < width:
                    dense[index, (row + dr) * width + column + dc] = -1
    right_side = np.arange(height * width, dtype=np.float64)

    solution = dirichlet_laplacian_factorization(height, width).solve(right_side)

    np.testing.assert_allclose(solution, np.linalg.solve(dense, right_side), rtol=0, atol=1e-12)
    assert dirichlet_laplacian_factorization(height, width) is dirichlet_laplacian_factorization(height, width)


# The PII method


def test_pii_build_method_by_name():
    method = build_method("pii", {}, seed=0, image_size=128)

    assert isinstance(method, PIIMethod)
    assert isinstance(method, FPIMethod)
    assert method.describe() == {"method": "pii", "settings": {}}


def test_pii_synthesize_matches_poisson_blend_of_next_slice():
    method = PIIMethod(SMALL, seed=0, image_size=64)
    images = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))

    torch.manual_seed(5)
    blended, label = method.synthesize(images)
    torch.manual_seed(5)
    top_left, size, alpha = sample_patches(3, 64)

    expected, expected_label = poisson_image_interpolation(images, images.roll(1, dims=0), top_left, size, alpha, clip_range=(0.0, 1.0))
    assert torch.equal(blended, expected)
    assert torch.equal(label, expected_label)
    assert blended.min() >= 0
    assert blended.max() <= 1


def test_pii_predict_shapes_and_scores():
    method = PIIMethod(SMALL, seed=0, image_size=64).eval()
    images = torch.rand(2, 1, 64, 64)
    masks = torch.ones(2, 1, 64, 64, dtype=torch.bool)

    prediction = method.predict(images, masks)

    assert prediction.maps.shape == (2, 1, 64, 64)
    assert prediction.maps.dtype == torch.float32
    assert torch.isfinite(prediction.maps).all()
    torch.testing.assert_close(prediction.scores, prediction.maps.mean(dim=(1, 2, 3)))


def test_pii_few_steps_lower_the_loss(one_thread):
    torch.manual_seed(0)
    method = PIIMethod(SMALL, seed=0, image_size=64)
    optimizers = method.configure_optimizers(1e-2)
    # Stripes of a different period and direction per slice: a blended patch shows
    # foreign stripes. (Flat slices would not do: PII blends gradients, so a flat
    # patch blended into a flat slice leaves no trace.)
    coordinates = torch.arange(64, dtype=torch.float32)
    periods = torch.tensor([4.0, 6.0, 9.0, 13.0] * 2).view(8, 1, 1, 1)
    rows, columns = coordinates.view(1, 1, 64, 1), coordinates.view(1, 1, 1, 64)
    phase = torch.where(torch.arange(8).view(8, 1, 1, 1) < 4, rows, columns) * 2 * torch.pi / periods
    images = 0.5 + 0.3 * torch.sin(phase)
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
    return write_atlas_split(demo_files, tmp_path_factory.mktemp("pii_brain"), start=60, stop=110)


def run_training(split, folder):
    return train_method(
        split,
        method_name="pii",
        method_settings=SMALL,
        seed=1,
        settings=TrainingSettings(steps=6, batch_size=4, learning_rate=0.01, checkpoint_every=2, device="cpu", threads=1),
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


def test_pii_resumed_training_is_identical(brain_slices, tmp_path, monkeypatch):
    run_training(brain_slices, tmp_path / "uninterrupted")
    original = PIIMethod.training_step

    def killed_after_four_steps(self, images, masks, step, optimizers):
        if step == 4:
            raise Interrupted("killed before step 5")
        return original(self, images, masks, step, optimizers)

    with monkeypatch.context() as patch:
        patch.setattr(PIIMethod, "training_step", killed_after_four_steps)
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


def fit_on_brain_slices(split, *, steps=150, cooldown=30, batch_size=16, held_out=25):
    """Train a small PII network on the slices of ``split`` except five around ``held_out``; return it in eval mode.

    Adam at 3e-3 for ``steps`` steps, then at 3e-4 for ``cooldown`` steps, so that
    the BatchNorm running statistics catch up with the weights before eval mode.
    """
    arrays = np.load(split)
    images = torch.from_numpy(arrays["images"]).unsqueeze(1)
    masks = torch.from_numpy(arrays["masks"]).unsqueeze(1)
    train_images = torch.cat([images[: held_out - 2], images[held_out + 3 :]])
    train_masks = torch.cat([masks[: held_out - 2], masks[held_out + 3 :]])

    torch.manual_seed(0)
    method = PIIMethod(SMALL, seed=0, image_size=64)
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


def test_pii_short_fit_finds_dark_blob(brain_slices, one_thread):
    method, image, mask = fit_on_brain_slices(brain_slices)
    rows, columns = np.nonzero(mask[0].numpy())
    disk = torch.from_numpy(disk_mask((64, 64), (rows.mean(), columns.mean() + 8), 8))[None] & mask
    planted = torch.where(disk, 0.4 * image, image)  # a hypointense lesion at 40 % of the tissue's intensity

    prediction = method.predict(torch.stack([image, planted]), torch.stack([mask, mask]))

    clean_map, planted_map = prediction.maps
    inside = planted_map[disk].mean().item()
    assert inside > 2 * planted_map[mask & ~disk].mean().item()
    assert inside > clean_map[disk].mean().item()
    assert prediction.scores[1] > prediction.scores[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pii_training_step_on_cuda():
    method = PIIMethod(SMALL, seed=0, image_size=64).cuda()
    optimizers = method.configure_optimizers(1e-3)
    images = torch.rand(4, 1, 64, 64, device="cuda")

    losses = method.training_step(images, images > 0.2, 0, optimizers)
    prediction = method.eval().predict(images, images > 0.2)

    assert np.isfinite(losses["loss"])
    assert prediction.maps.device.type == "cuda"
