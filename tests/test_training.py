"""Tests of the training loop: settings, batch order, exact resume, outputs and model loading."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from sfae import training
from sfae.io import InvalidInputError, read_volume, write_arrays, write_volume
from sfae.models import METHODS, AnomalyMethod, Prediction
from sfae.preprocessing.slices import slice_volume
from sfae.training import EpochBatchSampler, TrainingSettings, load_trained_method, resolve_device, train_method


class TinyDropoutMethod(AnomalyMethod):
    """Test-only method: a two-layer conv net with BatchNorm and channel dropout that reconstructs its input."""

    name = "tiny_dropout"

    def __init__(self, settings, *, seed, image_size):
        super().__init__(settings, seed=seed, image_size=image_size)
        channels = 4
        self.network = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Dropout2d(settings.get("dropout", 0.5)),
            nn.Conv2d(channels, 1, 3, padding=1),
        )

    def loss(self, images, masks):
        return F.mse_loss(self.network(images), images)

    def predict(self, images, masks, slice_index=None):
        with torch.no_grad():
            return Prediction(maps=(self.network(images) - images).abs())


class Interrupted(Exception):
    """Raised by a patched training step in place of the job being killed."""


@pytest.fixture
def tiny_method(monkeypatch):
    monkeypatch.setitem(METHODS, TinyDropoutMethod.name, TinyDropoutMethod)
    return TinyDropoutMethod


def write_split(path, count=10, size=16, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    images = rng.random((count, size, size), dtype=np.float32)
    arrays = {
        "images": images,
        "masks": images > 0.2,
        "labels": np.zeros(images.shape, dtype=bool),
        "slice_index": np.arange(count, dtype=np.int16),
        "subject": np.array(["sub-01"] * count),
    }
    arrays.update(overrides)
    arrays = {key: value for key, value in arrays.items() if value is not None}
    write_arrays(path, **arrays)
    return path


def outputs(folder):
    return {
        "model_out": folder / "model.pt",
        "report_out": folder / "report.json",
        "loss_csv_out": folder / "losses.csv",
        "loss_png_out": folder / "losses.png",
        "checkpoint_path": folder / "checkpoint.pt",
    }


def settings(**changes):
    values = {"steps": 6, "batch_size": 4, "learning_rate": 0.01, "checkpoint_every": 2, "device": "cpu", "threads": 1}
    values.update(changes)
    return TrainingSettings(**values)


def train_tiny(split, folder, *, seed=3, method_settings=None, **setting_changes):
    return train_method(
        split,
        method_name=TinyDropoutMethod.name,
        method_settings={"dropout": 0.5} if method_settings is None else method_settings,
        seed=seed,
        settings=settings(**setting_changes),
        **outputs(folder),
    )


def read_losses(path):
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    return [(row["step"], row["loss"]) for row in rows]


def read_state_dict(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_state_dict(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def differing_tensors(first, second):
    return [key for key in first if not torch.equal(first[key], second[key])]


def train_tiny_until_killed(split, folder, steps_done=4, **changes):
    """Run ``train_tiny`` but raise :class:`Interrupted` once ``steps_done`` steps are done."""
    original = TinyDropoutMethod.training_step

    def failing_step(self, images, masks, step, optimizers):
        if step == steps_done:
            raise Interrupted(f"killed before step {step + 1}")
        return original(self, images, masks, step, optimizers)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TinyDropoutMethod, "training_step", failing_step)
        with pytest.raises(Interrupted):
            train_tiny(split, folder, **changes)


# Settings and device


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, "steps=0"),
        ("steps", 2.5, "steps=2.5"),
        ("batch_size", True, "batch_size=True"),
        ("checkpoint_every", -1, "checkpoint_every=-1"),
        ("learning_rate", 0.0, "learning_rate=0.0"),
        ("learning_rate", float("nan"), "learning_rate=nan"),
        ("device", "gpu", "device='gpu'"),
        ("device", "cuda:x", "device='cuda:x'"),
        ("threads", 0, "threads=0"),
    ],
)
def test_training_settings_invalid_value_rejected(field, value, message):
    with pytest.raises(InvalidInputError, match=f"invalid training setting {message}"):
        settings(**{field: value})


def test_training_settings_valid_values_accepted():
    accepted = settings(device="cuda:1", threads=None, learning_rate=1)
    assert (accepted.device, accepted.threads, accepted.learning_rate) == ("cuda:1", None, 1)


def test_resolve_device_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(InvalidInputError, match=f"device '{name}' requested but CUDA is not available"):
            resolve_device(name)


def test_train_method_unavailable_cuda_writes_nothing(tiny_method, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    split = write_split(tmp_path / "train.npz")

    with pytest.raises(InvalidInputError, match="CUDA is not available"):
        train_tiny(split, tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists()


# Batch order


def test_epoch_batch_sampler_epochs_are_permutations():
    sampler = EpochBatchSampler(count=10, batch_size=4, seed=0)

    for _ in range(3):
        epoch = torch.cat([sampler.next_batch() for _ in range(2)])  # 10 // 4 = 2 batches per epoch
        assert epoch.shape == (8,)
        assert len(set(epoch.tolist())) == 8
        assert set(epoch.tolist()) <= set(range(10))


def test_epoch_batch_sampler_depends_only_on_seed():
    first = [EpochBatchSampler(10, 4, seed=5).next_batch() for _ in range(2)]
    torch.manual_seed(123)  # the global generator must not matter
    second = [EpochBatchSampler(10, 4, seed=5).next_batch() for _ in range(2)]
    other_seed = EpochBatchSampler(10, 4, seed=6).next_batch()

    assert torch.equal(first[0], second[0])
    assert not torch.equal(first[0], other_seed)


def test_epoch_batch_sampler_resumes_mid_epoch():
    reference = EpochBatchSampler(10, 3, seed=1)
    expected = [reference.next_batch() for _ in range(7)]
    sampler = EpochBatchSampler(10, 3, seed=1)
    for _ in range(4):  # stop in the middle of the second epoch (3 batches per epoch)
        sampler.next_batch()

    resumed = EpochBatchSampler(10, 3, seed=99)
    resumed.load_state_dict(sampler.state_dict())

    for batch in expected[4:]:
        assert torch.equal(resumed.next_batch(), batch)


def test_epoch_batch_sampler_too_few_slices():
    with pytest.raises(InvalidInputError, match="3 slices, fewer than the batch size 4"):
        EpochBatchSampler(count=3, batch_size=4, seed=0)


# Training


def test_train_method_lowers_loss(tiny_method, tmp_path):
    # Ten copies of one smooth slice: without dropout the net learns to reproduce it quickly.
    row = np.linspace(0.1, 0.9, 16, dtype=np.float32)
    images = np.repeat((row[:, None] * row[None, :])[None], 10, axis=0)
    split = write_split(tmp_path / "train.npz", images=images, masks=images > 0.05)

    train_tiny(split, tmp_path / "out", method_settings={"dropout": 0.0}, steps=20, learning_rate=0.02)

    losses = [float(loss) for _, loss in read_losses(tmp_path / "out" / "losses.csv")]
    assert len(losses) == 20
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


def test_train_method_resume_is_exact(tiny_method, tmp_path, caplog):
    split = write_split(tmp_path / "train.npz")
    train_tiny(split, tmp_path / "uninterrupted")

    # Killed during step 5: the checkpoint of step 4 (4 steps done) remains, no output is written.
    train_tiny_until_killed(split, tmp_path / "interrupted")
    checkpoint = torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 4
    assert len(checkpoint["history"]) == 4
    assert sorted(path.name for path in (tmp_path / "interrupted").iterdir()) == ["checkpoint.pt"]

    with caplog.at_level(logging.INFO, logger="sfae.training"):
        report = train_tiny(split, tmp_path / "interrupted")

    assert "resumed from checkpoint" in caplog.text
    assert report["resumed_from_step"] == 4
    assert report["steps"] == 6
    assert not (tmp_path / "interrupted" / "checkpoint.pt").exists()
    assert_same_state_dict(read_state_dict(tmp_path / "uninterrupted" / "model.pt"), read_state_dict(tmp_path / "interrupted" / "model.pt"))
    assert read_losses(tmp_path / "interrupted" / "losses.csv") == read_losses(tmp_path / "uninterrupted" / "losses.csv")


def test_train_method_resume_without_rng_differs(tiny_method, tmp_path, monkeypatch):
    # Control for the resume test: restoring weights, optimizer and batch order
    # but not the generator states changes the dropout masks of steps 5 and 6.
    split = write_split(tmp_path / "train.npz")
    train_tiny(split, tmp_path / "uninterrupted")
    train_tiny_until_killed(split, tmp_path / "interrupted")

    monkeypatch.setattr(training, "_restore_rng_states", lambda states, device: None)
    report = train_tiny(split, tmp_path / "interrupted")

    assert report["resumed_from_step"] == 4
    expected = read_state_dict(tmp_path / "uninterrupted" / "model.pt")
    assert differing_tensors(expected, read_state_dict(tmp_path / "interrupted" / "model.pt"))


def test_train_method_is_deterministic_per_seed(tiny_method, tmp_path):
    split = write_split(tmp_path / "train.npz")
    train_tiny(split, tmp_path / "first", seed=3)
    train_tiny(split, tmp_path / "again", seed=3)
    train_tiny(split, tmp_path / "other", seed=4)

    first = read_state_dict(tmp_path / "first" / "model.pt")
    assert_same_state_dict(first, read_state_dict(tmp_path / "again" / "model.pt"))
    assert differing_tensors(first, read_state_dict(tmp_path / "other" / "model.pt"))


def test_train_method_checkpoints_between_steps_only(tiny_method, tmp_path, monkeypatch):
    written = []
    original = training._write_checkpoint

    def record(path, run, fingerprint, device):
        written.append(run.step)
        original(path, run, fingerprint, device)

    monkeypatch.setattr(training, "_write_checkpoint", record)
    train_tiny(write_split(tmp_path / "train.npz"), tmp_path / "out", steps=6, checkpoint_every=3)

    assert written == [3]  # not at step 6: the final weights go to the model file
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "changes",
    [{"learning_rate": 0.02}, {"seed": 4}, {"method_settings": {"dropout": 0.3}}, {"steps": 8}, {"batch_size": 2}],
    ids=["learning_rate", "seed", "method_settings", "steps", "batch_size"],
)
def test_train_method_ignores_stale_checkpoint(tiny_method, tmp_path, caplog, changes):
    split = write_split(tmp_path / "train.npz")
    train_tiny_until_killed(split, tmp_path / "out")

    with caplog.at_level(logging.WARNING, logger="sfae.training"):
        report = train_tiny(split, tmp_path / "out", **changes)
    train_tiny(split, tmp_path / "fresh", **changes)

    assert "belongs to another run" in caplog.text
    assert report["resumed_from_step"] is None
    assert_same_state_dict(read_state_dict(tmp_path / "fresh" / "model.pt"), read_state_dict(tmp_path / "out" / "model.pt"))


def test_train_method_ignores_other_split_checkpoint(tiny_method, tmp_path, caplog):
    train_tiny_until_killed(write_split(tmp_path / "train.npz", seed=0), tmp_path / "out")

    with caplog.at_level(logging.WARNING, logger="sfae.training"):
        report = train_tiny(write_split(tmp_path / "train.npz", seed=1), tmp_path / "out")

    assert "differs in split_head_sha256" in caplog.text
    assert report["resumed_from_step"] is None


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "truncated"])
def test_train_method_ignores_corrupt_checkpoint(tiny_method, tmp_path, caplog, content):
    # Policy: a checkpoint only saves time, so an unreadable one is ignored with a warning.
    split = write_split(tmp_path / "train.npz")
    checkpoint = tmp_path / "out" / "checkpoint.pt"
    if content == "truncated":
        train_tiny_until_killed(split, tmp_path / "out")
        content = checkpoint.read_bytes()[:2000]
    checkpoint.parent.mkdir(exist_ok=True)
    checkpoint.write_bytes(content)

    with caplog.at_level(logging.WARNING, logger="sfae.training"):
        report = train_tiny(split, tmp_path / "out")
    train_tiny(split, tmp_path / "fresh")

    assert f"checkpoint {checkpoint} is unreadable" in caplog.text
    assert report["resumed_from_step"] is None
    assert not checkpoint.exists()
    assert_same_state_dict(read_state_dict(tmp_path / "fresh" / "model.pt"), read_state_dict(tmp_path / "out" / "model.pt"))


def test_train_method_ignores_mismatched_checkpoint(tiny_method, tmp_path, caplog):
    # A checkpoint with the right fingerprint whose weights do not fit the method
    # (for example after a code change) is ignored, and training starts from step 0.
    split = write_split(tmp_path / "train.npz")
    train_tiny_until_killed(split, tmp_path / "out")
    checkpoint_path = tmp_path / "out" / "checkpoint.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    del checkpoint["method"]["network.0.weight"]
    torch.save(checkpoint, checkpoint_path)

    with caplog.at_level(logging.WARNING, logger="sfae.training"):
        report = train_tiny(split, tmp_path / "out")
    train_tiny(split, tmp_path / "fresh")

    assert "does not fit the method (RuntimeError" in caplog.text
    assert report["resumed_from_step"] is None
    assert_same_state_dict(read_state_dict(tmp_path / "fresh" / "model.pt"), read_state_dict(tmp_path / "out" / "model.pt"))


def test_train_method_outputs_complete(tiny_method, tmp_path):
    split = write_split(tmp_path / "train.npz", count=10)
    threads_before = torch.get_num_threads()

    report = train_tiny(split, tmp_path / "out", steps=5, batch_size=3)

    paths = outputs(tmp_path / "out")
    record = torch.load(paths["model_out"], weights_only=True)
    assert set(record) == set(training.MODEL_KEYS)
    assert (record["method"], record["seed"], record["image_size"], record["steps"]) == ("tiny_dropout", 3, 16, 5)
    assert record["settings"] == {"dropout": 0.5}
    assert record["description"] == {"method": "tiny_dropout", "settings": {"dropout": 0.5}}

    with open(paths["loss_csv_out"], newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["step", "loss", "images_per_s"]
    assert [row["step"] for row in rows] == ["1", "2", "3", "4", "5"]
    assert all(float(row["loss"]) > 0 for row in rows)
    assert float(rows[-1]["images_per_s"]) > 0  # the last step always logs throughput

    assert paths["loss_png_out"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["report_out"].read_text()) == report
    assert report["method"] == "tiny_dropout"
    assert (report["seed"], report["device"], report["steps"], report["batch_size"], report["learning_rate"]) == (3, "cpu", 5, 3, 0.01)
    assert report["training_slices"] == 10
    assert report["resumed_from_step"] is None
    assert report["images_per_s"] > 0
    assert report["seconds"] > 0
    assert report["final_losses"] == {"loss": float(rows[-1]["loss"])}
    assert not paths["checkpoint_path"].exists()
    assert torch.get_num_threads() == threads_before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"masks": None}, r"lacks the arrays \['masks'\]"),
        ({"images": np.zeros((0, 16, 16), np.float32), "masks": np.zeros((0, 16, 16), bool)}, "contains no slices"),
        ({"images": np.zeros((4, 16, 12), np.float32), "masks": np.zeros((4, 16, 12), bool)}, r"expected float32 \(n, size, size\)"),
        ({"images": np.zeros((4, 16, 16), np.float64)}, r"images are float64"),
        ({"masks": np.zeros((10, 16, 16), np.uint8)}, "masks are uint8"),
        ({"images": np.full((10, 16, 16), 2.0, np.float32)}, r"span \[2.0, 2.0\], expected values in \[0, 1\]"),
        ({"images": np.full((10, 16, 16), np.nan, np.float32)}, "expected values in"),
    ],
    ids=["no_masks", "empty", "not_square", "float64", "uint8_masks", "out_of_range", "nan"],
)
def test_train_method_bad_split_writes_nothing(tiny_method, tmp_path, overrides, message):
    split = write_split(tmp_path / "bad_train.npz", **overrides)

    with pytest.raises(InvalidInputError, match=rf"split file .*bad_train\.npz.*{message}"):
        train_tiny(split, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_train_method_missing_split_names_file(tiny_method, tmp_path):
    with pytest.raises(InvalidInputError, match=r"array file not found: .*missing\.npz"):
        train_tiny(tmp_path / "missing.npz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_train_method_batch_larger_than_split(tiny_method, tmp_path):
    split = write_split(tmp_path / "train.npz", count=3)

    with pytest.raises(InvalidInputError, match="3 slices, fewer than the batch size 4"):
        train_tiny(split, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_train_method_diverging_loss_raises(tiny_method, tmp_path, monkeypatch):
    monkeypatch.setattr(TinyDropoutMethod, "training_step", lambda self, images, masks, step, optimizers: {"loss": float("nan")})

    with pytest.raises(FloatingPointError, match=r"diverged at step 1: losses \{'loss': nan\}"):
        train_tiny(write_split(tmp_path / "train.npz"), tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()


def test_train_method_random_fits_without_steps(tmp_path):
    split = write_split(tmp_path / "train.npz")

    report = train_method(
        split, method_name="random", method_settings={}, seed=2, settings=settings(), **outputs(tmp_path / "out")
    )

    paths = outputs(tmp_path / "out")
    assert report["steps"] == 0
    assert report["images_per_s"] is None
    assert report["final_losses"] is None
    assert paths["loss_csv_out"].read_text().splitlines() == ["step,images_per_s"]
    assert paths["loss_png_out"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.load(paths["model_out"], weights_only=True)["steps"] == 0
    assert not paths["checkpoint_path"].exists()

    method = load_trained_method(paths["model_out"], device="cpu")
    images = torch.rand(2, 1, 16, 16)
    prediction = method.predict(images, images > 0.5)
    assert prediction.maps.shape == (2, 1, 16, 16)


# Loading a trained model


def test_load_trained_method_round_trip(tiny_method, tmp_path, monkeypatch):
    built = []
    original = training.build_method

    def capture(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(training, "build_method", capture)
    train_tiny(write_split(tmp_path / "train.npz"), tmp_path / "out")
    trained = built[-1].eval()

    loaded = load_trained_method(tmp_path / "out" / "model.pt", device="cpu")

    assert isinstance(loaded, TinyDropoutMethod)
    assert not loaded.training
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    masks = images > 0.2
    assert torch.equal(loaded.predict(images, masks).maps, trained.predict(images, masks).maps)
    # Eval mode matters: in train mode, dropout and batch statistics change the maps.
    assert not torch.equal(loaded.train().predict(images, masks).maps, trained.predict(images, masks).maps)


def test_load_trained_method_missing_file(tmp_path):
    with pytest.raises(InvalidInputError, match=r"model file not found: .*absent\.pt"):
        load_trained_method(tmp_path / "absent.pt")


def test_load_trained_method_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"garbage")

    with pytest.raises(InvalidInputError, match=r"cannot read model file .*corrupt\.pt"):
        load_trained_method(path)


def test_load_trained_method_incomplete_record(tmp_path):
    path = tmp_path / "incomplete.pt"
    torch.save({"method": "random"}, path)

    with pytest.raises(InvalidInputError, match=r"model file .*incomplete\.pt lacks \['settings', 'seed'"):
        load_trained_method(path)


def test_load_trained_method_unknown_method(tiny_method, tmp_path):
    train_tiny(write_split(tmp_path / "train.npz"), tmp_path / "out")
    record = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    record["method"] = "no_such_method"
    torch.save(record, tmp_path / "unknown.pt")

    with pytest.raises(InvalidInputError, match=r"method of model file .*unknown\.pt: unknown method 'no_such_method'"):
        load_trained_method(tmp_path / "unknown.pt")


def test_load_trained_method_mismatched_weights(tiny_method, tmp_path):
    train_tiny(write_split(tmp_path / "train.npz"), tmp_path / "out")
    record = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    del record["state_dict"]["network.0.weight"]
    torch.save(record, tmp_path / "mismatched.pt")

    with pytest.raises(InvalidInputError, match=r"weights in model file .*mismatched\.pt do not fit method 'tiny_dropout'"):
        load_trained_method(tmp_path / "mismatched.pt")


# SFAE on real brain slices


@pytest.fixture(scope="module")
def brain_split(demo_files, tmp_path_factory):
    """Twelve 64x64 axial slices of the SRI24 brain, written by the real slicing step."""
    folder = tmp_path_factory.mktemp("brain_split")
    image = read_volume(demo_files["sri24_t1_skullstripped"])
    brain = sitk.GetArrayViewFromImage(image) > 0
    mask = sitk.GetImageFromArray(brain.astype(np.uint8))
    mask.CopyInformation(image)
    write_volume(mask, folder / "mask.nii.gz")
    split = folder / "train.npz"
    slice_volume(demo_files["sri24_t1_skullstripped"], folder / "mask.nii.gz", None, split, subject="sri24", start=74, stop=86, size=64)
    return split


def test_train_method_sfae_on_brain_slices(brain_split, tmp_path):
    sfae_settings = {"layers": ["layer0", "layer1", "layer2"], "weights": "random"}

    report = train_method(
        brain_split,
        method_name="sfae",
        method_settings=sfae_settings,
        seed=0,
        settings=settings(steps=3, checkpoint_every=2),
        **outputs(tmp_path / "out"),
    )

    assert report["steps"] == 3
    assert report["training_slices"] == 12
    assert report["description"]["extractor_weights"] == "random"
    losses = [float(loss) for _, loss in read_losses(tmp_path / "out" / "losses.csv")]
    assert len(losses) == 3
    assert all(0 < loss < 2 for loss in losses)  # 1 - mean SSIM lies in [0, 2]

    method = load_trained_method(tmp_path / "out" / "model.pt", device="cpu")
    images = torch.from_numpy(np.load(brain_split)["images"][:2]).unsqueeze(1)
    maps = method.predict(images, images > 0).maps
    assert maps.shape == (2, 1, 64, 64)
    assert torch.isfinite(maps).all()


# GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("memory_fraction", [training.GPU_DATA_MEMORY_FRACTION, 0.0], ids=["data_on_gpu", "data_on_host"])
def test_train_method_cuda_resume(tiny_method, tmp_path, monkeypatch, memory_fraction):
    monkeypatch.setattr(training, "GPU_DATA_MEMORY_FRACTION", memory_fraction)
    split = write_split(tmp_path / "train.npz")
    train_tiny(split, tmp_path / "uninterrupted", device="cuda")
    train_tiny_until_killed(split, tmp_path / "interrupted", device="cuda")

    report = train_tiny(split, tmp_path / "interrupted", device="cuda")

    assert report["device"] == "cuda:0"
    assert report["resumed_from_step"] == 4
    assert report["training_set_on_device"] is (memory_fraction > 0)
    expected = read_state_dict(tmp_path / "uninterrupted" / "model.pt")
    resumed = read_state_dict(tmp_path / "interrupted" / "model.pt")
    for key in expected:
        # cuDNN may pick nondeterministic kernels, so only near equality is required on a GPU.
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-4, atol=1e-5)
