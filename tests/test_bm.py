"""Tests of BM: per-position pixel statistics of healthy slices and absolute z-score maps."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from atlas_slices import atlas_slice_arrays

from sfae.anomalies import sink_deformation
from sfae.io import InvalidInputError, write_arrays
from sfae.models import bm as bm_module
from sfae.models.base import build_method
from sfae.models.bm import MIN_SAMPLES, position_statistics
from sfae.training import TrainingSettings, load_trained_method, train_method


def reference_statistics(images: np.ndarray, masks: np.ndarray, slice_index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slow reference of the documented policy: loops over positions and pixels with NumPy's mean and std (ddof=1)."""
    positions = np.unique(slice_index)
    height, width = images.shape[-2:]
    brain_values = images[masks]
    global_stats = (brain_values.mean(), brain_values.std(ddof=1))
    pooled = np.zeros((2, height, width))
    for row in range(height):
        for column in range(width):
            values = images[:, row, column][masks[:, row, column]]
            pooled[:, row, column] = (values.mean(), values.std(ddof=1)) if values.size >= MIN_SAMPLES else global_stats
    statistics = np.zeros((2, positions.size + 1, height, width))
    statistics[:, -1] = pooled
    for index, position in enumerate(positions):
        at_position = slice_index == position
        for row in range(height):
            for column in range(width):
                values = images[at_position, row, column][masks[at_position, row, column]]
                statistics[:, index, row, column] = (values.mean(), values.std(ddof=1)) if values.size >= MIN_SAMPLES else pooled[:, row, column]
    return positions, statistics[0], statistics[1]


def random_training_set(count=60, size=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 1, size, size, generator=generator, dtype=torch.float64).float()
    masks = torch.rand(count, 1, size, size, generator=generator) > 0.3
    masks[:, :, 0, 0] = False  # never brain: global fallback
    masks[:, :, 0, 1] = torch.arange(count).view(count, 1) == 0  # brain in one slice only: global fallback
    slice_index = torch.randint(20, 26, (count,), generator=generator)
    masks[slice_index == 22, :, 1, 1] = False  # never brain at position 22 only: pooled fallback there
    return images, masks, slice_index


# Statistics


def test_position_statistics_match_slow_reference():
    images, masks, slice_index = random_training_set()

    statistics = position_statistics(images, masks, slice_index)
    positions, mean, std = reference_statistics(images[:, 0].double().numpy(), masks[:, 0].numpy(), slice_index.numpy())

    assert statistics["positions"].tolist() == positions.tolist()
    assert statistics["mean"].dtype == torch.float32
    np.testing.assert_allclose(statistics["mean"].numpy(), mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(statistics["std"].numpy(), std, rtol=0, atol=1e-6)


def test_position_statistics_count_fallbacks():
    images, masks, slice_index = random_training_set()

    statistics = position_statistics(images, masks, slice_index)

    local, pooled, global_ = statistics["pixel_sources"].tolist()
    positions = statistics["positions"].numel()
    assert local + pooled + global_ == positions * 36
    assert global_ == 2 * positions  # pixels (0, 0) and (0, 1) at every position
    assert pooled >= 1  # pixel (1, 1) at position 22


def test_position_statistics_hand_computed():
    # One pixel. Position 5 has values 0.2 and 0.4, position 7 only 0.9, and a
    # value outside the brain at position 7 is ignored.
    images = torch.tensor([0.2, 0.4, 0.9, 0.7]).view(4, 1, 1, 1)
    masks = torch.tensor([True, True, True, False]).view(4, 1, 1, 1)
    slice_index = torch.tensor([5, 5, 7, 7])

    statistics = position_statistics(images, masks, slice_index)

    pooled_mean, pooled_std = 0.5, math.sqrt(((0.2 - 0.5) ** 2 + (0.4 - 0.5) ** 2 + (0.9 - 0.5) ** 2) / 2)
    assert statistics["positions"].tolist() == [5, 7]
    torch.testing.assert_close(statistics["mean"].flatten(), torch.tensor([0.3, pooled_mean, pooled_mean]))
    torch.testing.assert_close(statistics["std"].flatten(), torch.tensor([math.sqrt(0.02), pooled_std, pooled_std]))
    assert statistics["pixel_sources"].tolist() == [1, 1, 0]


def test_position_statistics_chunks_give_same_result():
    images, masks, slice_index = random_training_set(count=37)

    whole = position_statistics(images, masks, slice_index, chunk_slices=1000)
    chunked = position_statistics(images, masks, slice_index, chunk_slices=4)

    for key in whole:
        assert torch.equal(whole[key], chunked[key]), key


def test_position_statistics_float64_accumulation():
    # 3000 values 0.9 + 1e-6 k. Float32 sums of squares (about 2430) would carry an error of
    # about 1e-4, 5 % of the sum of squared deviations (about 2.2e-3).
    images = (0.9 + 1e-6 * torch.arange(3000, dtype=torch.float64)).float().view(-1, 1, 1, 1)

    statistics = position_statistics(images, torch.ones_like(images, dtype=torch.bool), torch.zeros(3000, dtype=torch.int64))

    expected = images.double().std().item()
    assert statistics["std"][0, 0, 0].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"masks": torch.zeros(4, 1, 3, 3, dtype=torch.bool)}, "the training masks contain 0 brain pixels, but BM needs at least 2"),
        ({"masks": torch.ones(4, 1, 3, 3)}, "invalid BM training masks: torch.float32"),
        ({"images": torch.rand(4, 3, 3)}, "invalid BM training images"),
        ({"slice_index": torch.zeros(3, dtype=torch.int64)}, r"invalid BM slice_index: torch.int64 of shape \(3,\), expected integers of shape \(4,\)"),
        ({"slice_index": torch.zeros(4)}, "invalid BM slice_index: torch.float32"),
        ({"slice_index": torch.tensor([0, 1, -1, 2])}, "invalid BM slice_index -1"),
    ],
)
def test_position_statistics_rejects_invalid_input(change, message):
    arguments = {"images": torch.rand(4, 1, 3, 3), "masks": torch.ones(4, 1, 3, 3, dtype=torch.bool), "slice_index": torch.arange(4)}
    arguments.update(change)

    with pytest.raises(InvalidInputError, match=message):
        position_statistics(**arguments)


# Method


def fitted_method(size=6, **settings):
    images, masks, slice_index = random_training_set(size=size)
    method = build_method("bm", settings, seed=0, image_size=size)
    method.fit(images, masks, slice_index)
    return method


def test_bm_predict_is_absolute_z_score():
    method = fitted_method()
    images = torch.rand(3, 1, 6, 6)
    slice_index = torch.tensor([21, 25, 20])

    maps = method.predict(images, images > 0, slice_index).maps

    rows = torch.tensor([1, 5, 0])  # positions 20 to 25 are rows 0 to 5
    expected = (images[:, 0] - method.mean[rows]).abs() / method.std[rows].clamp_min(0.01)
    assert maps.shape == (3, 1, 6, 6)
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps[:, 0], expected, rtol=0, atol=0)


def test_bm_predict_hand_computed():
    images = torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1, 1)
    method = build_method("bm", {}, seed=0, image_size=1)
    method.fit(images, torch.ones_like(images, dtype=torch.bool), torch.tensor([3, 3, 3]))

    maps = method.predict(torch.tensor([0.7]).view(1, 1, 1, 1), None, torch.tensor([3])).maps

    assert maps.item() == pytest.approx(0.3 / 0.2)  # mean 0.4, std 0.2


def test_bm_std_floor_bounds_constant_pixels():
    images = torch.full((4, 1, 2, 2), 0.5)
    method = build_method("bm", {"std_floor": 0.05}, seed=0, image_size=2)
    method.fit(images, torch.ones_like(images, dtype=torch.bool), torch.zeros(4, dtype=torch.int64))

    maps = method.predict(torch.full((1, 1, 2, 2), 0.6), None, torch.tensor([0])).maps

    assert torch.count_nonzero(method.std) == 0
    torch.testing.assert_close(maps, torch.full((1, 1, 2, 2), 0.1 / 0.05))


def test_bm_maps_fit_float16_with_default_floor():
    method = fitted_method()
    extremes = torch.stack([torch.zeros(1, 6, 6), torch.ones(1, 6, 6)])

    maps = method.predict(extremes, None, torch.tensor([20, 21])).maps

    assert maps.max() <= 1 / bm_module.DEFAULT_STD_FLOOR
    assert torch.isfinite(maps.half()).all()


def test_bm_unseen_position_uses_pooled_statistics(caplog):
    method = fitted_method()
    images = torch.rand(2, 1, 6, 6)

    with caplog.at_level(logging.WARNING, logger="sfae.models.bm"):
        maps = method.predict(images, None, torch.tensor([40, 40])).maps
        method.predict(images, None, torch.tensor([40, 40]))

    expected = (images[:, 0] - method.mean[-1]).abs() / method.std[-1].clamp_min(0.01)
    torch.testing.assert_close(maps[:, 0], expected, rtol=0, atol=0)
    assert caplog.text.count("slice positions [40] were not in the BM training set") == 1


def test_bm_state_dict_round_trip():
    method = fitted_method()
    fresh = build_method("bm", {}, seed=1, image_size=6)

    fresh.load_state_dict(method.state_dict())

    images = torch.rand(2, 1, 6, 6)
    slice_index = torch.tensor([22, 99])
    assert fresh.positions.tolist() == list(range(20, 26))
    torch.testing.assert_close(fresh.predict(images, None, slice_index).maps, method.predict(images, None, slice_index).maps, rtol=0, atol=0)


def test_bm_load_state_dict_other_slice_size_error():
    method = fitted_method(size=6)
    other = build_method("bm", {}, seed=0, image_size=8)

    with pytest.raises(RuntimeError, match="size mismatch for mean"):
        other.load_state_dict(method.state_dict())


def test_bm_train_method_writes_loadable_model(tmp_path):
    images, masks, slice_index = random_training_set(size=8)
    split = tmp_path / "train.npz"
    write_arrays(
        split,
        images=images[:, 0].numpy(),
        masks=masks[:, 0].numpy(),
        labels=np.zeros((60, 8, 8), dtype=bool),
        slice_index=slice_index.numpy().astype(np.int16),
        subject=np.array(["s"] * 60),
    )
    settings = TrainingSettings(steps=5, batch_size=4, learning_rate=1e-3, checkpoint_every=2, device="cpu", threads=1)
    folder = tmp_path / "out"

    outputs = {
        "model_out": folder / "model.pt",
        "report_out": folder / "report.json",
        "loss_csv_out": folder / "losses.csv",
        "loss_png_out": folder / "losses.png",
        "checkpoint_path": folder / "checkpoint.pt",
    }

    report = train_method(split, method_name="bm", method_settings={"std_floor": 0.02}, seed=0, settings=settings, **outputs)
    method = load_trained_method(folder / "model.pt", device="cpu")

    assert report["steps"] == 0
    assert report["description"]["std_floor"] == 0.02
    assert report["description"]["fit"]["training_slices"] == 60
    assert report["description"]["fit"]["positions"] == list(range(20, 26))
    reference = position_statistics(images, masks, slice_index)
    torch.testing.assert_close(method.mean, reference["mean"], rtol=0, atol=0)
    torch.testing.assert_close(method.std, reference["std"], rtol=0, atol=0)
    assert method.std_floor == 0.02


def test_bm_predict_before_fit_error():
    method = build_method("bm", {}, seed=0, image_size=4)

    with pytest.raises(InvalidInputError, match=r"BM is not fitted: call fit\(\)"):
        method.predict(torch.rand(1, 1, 4, 4), None, torch.tensor([0]))


def test_bm_predict_without_slice_index_error():
    method = fitted_method()

    with pytest.raises(InvalidInputError, match="BM needs the slice_index of every slice"):
        method.predict(torch.rand(1, 1, 6, 6), None)


@pytest.mark.parametrize(
    ("shape", "slice_index", "message"),
    [((1, 1, 8, 8), [20], r"invalid BM input shape \(1, 1, 8, 8\): expected \(batch, 1, 6, 6\)"), ((2, 1, 6, 6), [20], r"invalid BM slice_index of shape \(1,\): expected one entry per slice, \(2,\)")],
)
def test_bm_predict_rejects_invalid_input(shape, slice_index, message):
    method = fitted_method()

    with pytest.raises(InvalidInputError, match=message):
        method.predict(torch.rand(shape), None, torch.tensor(slice_index))


def test_bm_fit_rejects_other_slice_size():
    method = build_method("bm", {}, seed=0, image_size=8)

    with pytest.raises(InvalidInputError, match=r"BM was built for 8x8 slices, got training slices of shape \(2, 1, 6, 6\)"):
        method.fit(torch.rand(2, 1, 6, 6), torch.ones(2, 1, 6, 6, dtype=torch.bool), torch.arange(2))


@pytest.mark.parametrize("floor", [0, -1.0, 1e-6, math.nan, True, "0.1"])
def test_bm_rejects_invalid_std_floor(floor):
    with pytest.raises(InvalidInputError, match=r"invalid std_floor .*: expected a number of at least 1.53e-05"):
        build_method("bm", {"std_floor": floor}, seed=0, image_size=4)


def test_bm_is_not_trainable_and_describes_floor():
    method = build_method("bm", {}, seed=0, image_size=4)

    assert not method.trainable
    assert method.describe() == {"method": "bm", "settings": {}, "std_floor": 0.01, "fit": {}}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bm_cuda_fit_from_cpu_slices_matches_cpu():
    images, masks, slice_index = random_training_set()
    on_cpu = fitted_method()
    method = build_method("bm", {}, seed=0, image_size=6).to("cuda")

    method.fit(images, masks, slice_index)
    maps = method.predict(images[:4].cuda(), None, slice_index[:4].cuda()).maps

    assert method.mean.device.type == "cuda"
    assert maps.device.type == "cuda"
    torch.testing.assert_close(maps.cpu(), on_cpu.predict(images[:4], None, slice_index[:4]).maps, rtol=1e-5, atol=1e-5)


# Real brain slices


@pytest.fixture(scope="module")
def brain_slices(demo_files):
    """Forty 64x64 axial slices (60 to 99) of the SRI24 brain, equalized and sliced as the workflow does."""
    return atlas_slice_arrays(demo_files, start=60, stop=100)


@pytest.fixture(scope="module")
def fitted_on_brain(brain_slices):
    """BM fitted on five copies of positions 70 to 89, each shifted by -2 to 2 slices: registered brains with some anatomical variation."""
    positions = np.arange(70, 90)
    images, masks = [], []
    for shift in (-2, -1, 0, 1, 2):
        images.append(brain_slices["images"][positions - 60 + shift])
        masks.append(brain_slices["masks"][positions - 60 + shift])
    method = build_method("bm", {}, seed=0, image_size=64)
    method.fit(torch.from_numpy(np.concatenate(images)).unsqueeze(1), torch.from_numpy(np.concatenate(masks)).unsqueeze(1), torch.from_numpy(np.tile(positions, 5)))
    return method


@pytest.mark.parametrize(("position", "center"), [(80, (32, 24)), (75, (28, 40)), (85, (36, 30))])
def test_bm_map_higher_inside_sink_deformation(fitted_on_brain, brain_slices, position, center):
    image = brain_slices["images"][position - 60]
    brain = brain_slices["masks"][position - 60]
    deformed, label = sink_deformation(image, center, 8.0, brain_mask=brain)

    maps = fitted_on_brain.predict(torch.from_numpy(deformed)[None, None], torch.from_numpy(brain)[None, None], torch.tensor([position])).maps[0, 0].numpy()

    assert label.sum() > 100
    assert maps[label].mean() > 2 * maps[brain & ~label].mean()
