"""Evaluation of a method on split files, checked against scikit-learn on the float16-rounded brain pixels."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from sfae.anomalies import add_anomalies
from sfae.evaluation.evaluate import evaluate_files, evaluate_method, load_split, select_examples
from sfae.evaluation.metrics import per_volume_dice
from sfae.io import InvalidInputError, read_arrays, read_volume, write_arrays
from sfae.models import build_method
from sfae.models.base import AnomalyMethod, Prediction
from sfae.preprocessing.slices import extract_slices

SIZE = 16


class MapsFromImages(AnomalyMethod):
    """A fake method whose anomaly map is its input image, optionally changed by ``transform(maps, masks)``.

    Split files whose images are the wanted maps (for example the labels) give
    a method of known quality.
    """

    name = "maps_from_images"
    trainable = False

    def __init__(self, transform=None, scores=None) -> None:
        super().__init__({}, seed=0, image_size=SIZE)
        self.transform = transform
        self.scores = scores

    def predict(self, images, masks, slice_index=None):
        maps = images.clone() if self.transform is None else self.transform(images.clone(), masks)
        return Prediction(maps=maps, scores=None if self.scores is None else self.scores(maps))


class Recording(AnomalyMethod):
    """Wrap a method and keep every map and image score it returns, in call order."""

    name = "recording"

    def __init__(self, inner: AnomalyMethod) -> None:
        super().__init__({}, seed=0, image_size=inner.image_size)
        self.inner = inner
        self.maps: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []

    def predict(self, images, masks, slice_index=None):
        prediction = self.inner.predict(images, masks)
        self.maps.append(prediction.maps.detach().cpu().numpy()[:, 0])
        if prediction.scores is not None:
            self.scores.append(prediction.scores.detach().cpu().numpy())
        return prediction

    def describe(self):
        return self.inner.describe()


def disk(center, radius, size=SIZE):
    rows, columns = np.mgrid[:size, :size]
    return (rows - center[0]) ** 2 + (columns - center[1]) ** 2 < radius**2


def make_split(seed, subjects=("s1", "s2", "s3"), slices=6, noise=0.6, lesion_fraction=0.5):
    """Brain disks with lesion disks in a fraction of the slices; images = labels + Gaussian noise (the maps)."""
    rng = np.random.default_rng(seed)
    count = len(subjects) * slices
    masks = np.stack([disk((8 + rng.integers(-1, 2), 8), 6 + rng.integers(0, 2)) for _ in range(count)])
    labels = np.zeros_like(masks)
    for position in range(count):
        if rng.random() < lesion_fraction:
            labels[position] = disk(tuple(rng.integers(5, 11, size=2)), rng.integers(2, 4)) & masks[position]
    images = (labels + noise * rng.normal(size=labels.shape)).astype(np.float32)
    return {
        "images": images,
        "masks": masks,
        "labels": labels,
        "slice_index": np.tile(np.arange(slices, dtype=np.int16), len(subjects)),
        "subject": np.repeat(np.array(subjects), slices),
    }


def write_split(path, arrays):
    write_arrays(path, **arrays)
    return path


def round16(values):
    return np.asarray(values).astype(np.float32).astype(np.float16).astype(np.float64)


def fpr_threshold(scores16, labels, max_fpr=0.05):
    fpr, _, thresholds = roc_curve(labels, scores16, drop_intermediate=False)
    return float(thresholds[np.flatnonzero(fpr <= max_fpr)[-1]])


def dice(predicted, labels):
    denominator = predicted.sum() + labels.sum()
    return 2 * np.count_nonzero(predicted & labels) / denominator if denominator else 1.0


def top_fraction_scores(maps, masks, fraction=0.1):
    """Slow reference image score: mean of the ceil(fraction * n) highest float16 brain pixels of each slice."""
    scores = []
    for slice_map, slice_mask in zip(maps, masks):
        values = np.sort(round16(slice_map)[slice_mask])[::-1]
        count = max(1, math.ceil(round(fraction * values.size, 6)))
        scores.append(values[:count].mean())
    return np.array(scores)


def reference_metrics(val, test, val_maps, test_maps, test_scores=None):
    """Every metric of the evaluation, computed from the full pixel arrays with scikit-learn and by hand."""
    val16, test16 = round16(val_maps), round16(test_maps)
    val_threshold = fpr_threshold(val16[val["masks"]], val["labels"][val["masks"]])
    brain = test["masks"]
    scores, labels = test16[brain], test["labels"][brain]
    test_threshold = fpr_threshold(scores, labels)
    slice_labels = (test["labels"] & brain).reshape(len(brain), -1).any(1)
    if test_scores is None:
        test_scores = top_fraction_scores(test_maps, brain)
    return {
        "pixel_ap": average_precision_score(labels, scores),
        "pixel_auroc": roc_auc_score(labels, scores),
        "dice_at_fpr_test_threshold": dice(scores >= test_threshold, labels),
        "dice_at_fpr_val_threshold": dice(scores >= val_threshold, labels),
        "image_auroc": roc_auc_score(slice_labels, test_scores),
        "val_pixel_ap": average_precision_score(val["labels"][val["masks"]], val16[val["masks"]]),
        "thresholds": (test_threshold, val_threshold),
        "volume_dice": {
            key: per_volume_dice((test16 >= threshold) & brain, test["labels"] & brain, test["subject"].tolist())
            for key, threshold in (("test_threshold", test_threshold), ("val_threshold", val_threshold))
        },
    }


@pytest.fixture
def splits(tmp_path):
    val = make_split(1, subjects=("v1", "v2"), noise=0.4)
    test = make_split(2, subjects=("t1", "t2", "t3", "t4"), noise=0.6)
    return val, test, write_split(tmp_path / "val.npz", val), write_split(tmp_path / "test.npz", test)


def test_evaluate_perfect_maps_score_one(tmp_path):
    val, test = make_split(1, noise=0.0), make_split(2, noise=0.0)
    results, _ = evaluate_method(
        MapsFromImages(), write_split(tmp_path / "val.npz", val), write_split(tmp_path / "test.npz", test), device="cpu"
    )
    metrics = results["metrics"]
    for key in ("pixel_ap", "pixel_auroc", "dice_at_fpr_test_threshold", "dice_at_fpr_val_threshold", "image_auroc",
                "mean_volume_dice_test_threshold", "mean_volume_dice_val_threshold", "val_pixel_ap"):
        assert metrics[key] == 1.0, key
    assert results["thresholds"]["test"] == 1.0
    assert results["thresholds"]["val"] == 1.0


def test_evaluate_noisy_maps_match_sklearn(splits):
    val, test, val_path, test_path = splits
    results, _ = evaluate_method(MapsFromImages(), val_path, test_path, batch_size=5, device="cpu")
    expected = reference_metrics(val, test, val["images"], test["images"])
    metrics = results["metrics"]

    for key in ("pixel_ap", "pixel_auroc", "dice_at_fpr_test_threshold", "dice_at_fpr_val_threshold", "image_auroc", "val_pixel_ap"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
    assert (results["thresholds"]["test"], results["thresholds"]["val"]) == expected["thresholds"]
    # Noise of different strength in the two splits gives different thresholds, so the test of the val threshold bites.
    assert expected["thresholds"][0] != expected["thresholds"][1]
    assert 0.1 < metrics["pixel_ap"] < 0.99


def test_evaluate_per_volume_dice_matches_reference(splits):
    val, test, val_path, test_path = splits
    results, _ = evaluate_method(MapsFromImages(), val_path, test_path, batch_size=4, device="cpu")
    expected = reference_metrics(val, test, val["images"], test["images"])["volume_dice"]

    per_volume = results["per_volume_dice"]
    assert sorted(per_volume) == ["t1", "t2", "t3", "t4"]
    for key in ("test_threshold", "val_threshold"):
        for subject, value in expected[key].items():
            assert per_volume[subject][f"dice_{key}"] == pytest.approx(value, rel=1e-12), (key, subject)
        with_lesion = [subject for subject in expected[key] if per_volume[subject]["anomalous_pixels"] > 0]
        mean = np.mean([expected[key][subject] for subject in with_lesion])
        assert results["metrics"][f"mean_volume_dice_{key}"] == pytest.approx(mean, rel=1e-12)
    for subject in per_volume:
        rows = test["subject"] == subject
        assert per_volume[subject]["anomalous_pixels"] == np.count_nonzero(test["labels"][rows] & test["masks"][rows])
        assert per_volume[subject]["brain_pixels"] == np.count_nonzero(test["masks"][rows])


def test_evaluate_lesion_free_volume_left_out_of_mean(tmp_path):
    val = make_split(1, noise=0.3)
    test = make_split(2, subjects=("clean", "lesion1", "lesion2"), noise=0.3)
    test["labels"][test["subject"] == "clean"] = False
    results, _ = evaluate_method(
        MapsFromImages(), write_split(tmp_path / "val.npz", val), write_split(tmp_path / "test.npz", test), device="cpu"
    )
    per_volume = results["per_volume_dice"]
    assert per_volume["clean"]["anomalous_pixels"] == 0
    # Noise above the threshold predicts pixels in the lesion-free volume, so its Dice is 0.
    assert per_volume["clean"]["dice_test_threshold"] == 0.0
    mean = np.mean([per_volume[name]["dice_test_threshold"] for name in ("lesion1", "lesion2")])
    assert results["metrics"]["mean_volume_dice_test_threshold"] == pytest.approx(mean)


def test_evaluate_ignores_pixels_outside_brain(splits, tmp_path):
    val, test, val_path, test_path = splits
    reference, reference_examples = evaluate_method(MapsFromImages(), val_path, test_path, device="cpu")

    # Huge and NaN map values and extra labels outside the brain must change nothing.
    def poison(maps, masks):
        maps[~masks] = 1e9
        maps[..., 0, 0] = math.nan
        return maps

    test_outside = dict(test, labels=test["labels"] | ~test["masks"])
    poisoned_test = write_split(tmp_path / "test_outside.npz", test_outside)
    results, examples = evaluate_method(MapsFromImages(poison), val_path, poisoned_test, device="cpu")

    assert results["metrics"] == reference["metrics"]
    assert results["thresholds"] == reference["thresholds"]
    assert results["per_volume_dice"] == reference["per_volume_dice"]
    assert results["counts"]["test"]["anomalous_pixels"] == reference["counts"]["test"]["anomalous_pixels"]
    assert results["counts"]["test"]["anomalous_pixels_outside_brain"] == np.count_nonzero(~test["masks"])
    assert np.array_equal(examples["index"], reference_examples["index"])


def test_evaluate_nan_in_brain_raises_naming_method(splits):
    _, _, val_path, test_path = splits

    def nan_inside(maps, masks):
        maps[masks] = math.nan
        return maps

    with pytest.raises(InvalidInputError, match=r"method broken on the val split .*NaN"):
        evaluate_method(MapsFromImages(nan_inside), val_path, test_path, device="cpu", method_name="broken")


def test_evaluate_huge_values_in_brain_raise(splits):
    _, _, val_path, test_path = splits

    def huge_inside(maps, masks):
        maps[masks] = maps[masks] * 1e6
        return maps

    with pytest.raises(InvalidInputError, match=r"method huge on the val split .*65520"):
        evaluate_method(MapsFromImages(huge_inside), val_path, test_path, device="cpu", method_name="huge")


def test_evaluate_wrong_map_shape_raises(splits):
    _, _, val_path, test_path = splits
    with pytest.raises(InvalidInputError, match=r"method cropped .*returned maps of shape \(\d+, 1, 8, 8\)"):
        evaluate_method(MapsFromImages(lambda maps, masks: maps[..., :8, :8]), val_path, test_path, device="cpu", method_name="cropped")


def test_evaluate_uses_method_image_scores(splits):
    val, test, val_path, test_path = splits
    # Scores that rank slices by minus their top pixel: the AUROC falls below 0.5.
    method = MapsFromImages(scores=lambda maps: -maps.amax(dim=(1, 2, 3)))
    results, _ = evaluate_method(method, val_path, test_path, device="cpu")
    slice_labels = (test["labels"] & test["masks"]).reshape(len(test["labels"]), -1).any(1)
    expected = roc_auc_score(slice_labels, -test["images"].reshape(len(slice_labels), -1).max(1).astype(np.float64))
    assert results["metrics"]["image_auroc"] == pytest.approx(expected)
    assert results["metrics"]["image_auroc"] < 0.5
    assert results["settings"]["image_scores"] == "method"


def test_evaluate_random_method_matches_sklearn(splits):
    val, test, val_path, test_path = splits
    method = Recording(build_method("random", {}, seed=3, image_size=SIZE))
    results, examples = evaluate_method(method, val_path, test_path, batch_size=7, device="cpu")

    maps = np.concatenate(method.maps)
    scores = np.concatenate(method.scores).astype(np.float64)
    n_val = len(val["images"])
    expected = reference_metrics(val, test, maps[:n_val], maps[n_val:], test_scores=scores[n_val:])
    for key in ("pixel_ap", "pixel_auroc", "dice_at_fpr_test_threshold", "dice_at_fpr_val_threshold", "image_auroc", "val_pixel_ap"):
        assert results["metrics"][key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
    assert np.array_equal(examples["maps"], maps[n_val:][examples["index"]])
    # The floor: AP near the anomalous fraction of brain pixels, AUROC near one half.
    counts = results["counts"]["test"]
    assert results["metrics"]["pixel_ap"] == pytest.approx(counts["anomalous_pixels"] / counts["brain_pixels"], abs=0.03)
    assert results["metrics"]["pixel_auroc"] == pytest.approx(0.5, abs=0.05)


def test_evaluate_examples_identical_across_methods(splits):
    _, test, val_path, test_path = splits
    _, first = evaluate_method(MapsFromImages(), val_path, test_path, device="cpu", examples=3)
    _, second = evaluate_method(build_method("random", {}, seed=0, image_size=SIZE), val_path, test_path, device="cpu", examples=3)

    for key in ("index", "images", "labels", "masks", "subject", "slice_index"):
        assert np.array_equal(first[key], second[key]), key
    assert not np.array_equal(first["maps"], second["maps"])
    assert len(first["index"]) == 3
    assert (first["labels"] & first["masks"]).reshape(3, -1).any(1).all()
    # Four subjects have lesions, so three of them, evenly spaced, give one slice each.
    assert len(set(first["subject"].tolist())) == 3
    assert np.array_equal(first["maps"], test["images"][first["index"]])


def test_select_examples_largest_lesions_in_turn():
    labels = np.zeros((6, 4, 4), dtype=bool)
    labels[1, :1, :1] = True  # subject a, 1 pixel
    labels[2, :2, :2] = True  # subject a, 4 pixels
    labels[4, :1, :3] = True  # subject b, 3 pixels
    split = {
        "labels": labels,
        "masks": np.ones_like(labels),
        "subject": np.array(["a", "a", "a", "b", "b", "b"]),
        "slice_index": np.array([0, 1, 2, 0, 1, 2], dtype=np.int16),
    }
    # Two subjects for three examples: the largest lesion of each, then the second largest of a.
    assert select_examples(split, 3).tolist() == [1, 2, 4]
    assert select_examples(split, 2).tolist() == [2, 4]
    assert select_examples(split, 1).tolist() == [2]


def test_select_examples_without_abnormal_slices_warns():
    split = {
        "labels": np.zeros((5, 2, 2), dtype=bool),
        "masks": np.ones((5, 2, 2), dtype=bool),
        "subject": np.array(["a"] * 5),
        "slice_index": np.arange(5, dtype=np.int16),
    }
    with pytest.warns(UserWarning, match="no abnormal slice"):
        assert select_examples(split, 3).tolist() == [0, 2, 4]


def test_evaluate_degenerate_test_split_writes_null(splits, tmp_path):
    val, test, val_path, _ = splits
    healthy = write_split(tmp_path / "healthy.npz", dict(test, labels=np.zeros_like(test["labels"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        record = evaluate_files(
            MapsFromImages(), val_path, healthy, tmp_path / "metrics.json", tmp_path / "examples.npz",
            experiment="demo", method_name="maps", seed=0, data_note=None, device="cpu",
        )
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == json.loads(json.dumps(record))
    for key in ("pixel_ap", "pixel_auroc", "image_auroc", "mean_volume_dice_test_threshold"):
        assert written["metrics"][key] is None, key
    assert any("pixel_ap" in note and "null" in note for note in written["notes"])
    assert any("average precision is undefined" in note for note in written["notes"])
    # Without anomalous pixels the Dice of an empty prediction is 1, of any prediction 0.
    assert written["metrics"]["dice_at_fpr_test_threshold"] == 0.0


def test_evaluate_files_writes_metrics_and_examples(splits, tmp_path):
    _, test, val_path, test_path = splits
    record = evaluate_files(
        build_method("random", {}, seed=2, image_size=SIZE), val_path, test_path,
        tmp_path / "out" / "metrics.json", tmp_path / "out" / "examples.npz",
        experiment="demo", method_name="random", seed=2, data_note="Demo data: templates.", device="cpu", examples=2,
    )
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(written) == {
        "experiment", "method", "seed", "description", "data_note", "val_split", "test_split", "metrics", "thresholds",
        "counts", "per_volume_dice", "settings", "device", "seconds", "protocol", "notes",
    }
    assert (written["experiment"], written["method"], written["seed"]) == ("demo", "random", 2)
    assert written["data_note"] == "Demo data: templates."
    assert written["description"] == {"method": "random", "settings": {}}
    assert set(written["protocol"]) == set(written["metrics"])
    assert "test labels" in written["protocol"]["dice_at_fpr_test_threshold"]
    assert written["counts"]["test"]["slices"] == len(test["images"])
    assert written["counts"]["test"]["brain_pixels"] == np.count_nonzero(test["masks"])
    assert written["counts"]["test"]["abnormal_slices"] == np.count_nonzero((test["labels"] & test["masks"]).any((1, 2)))
    assert written["device"] == "cpu"
    assert record["metrics"] == written["metrics"]

    examples = read_arrays(tmp_path / "out" / "examples.npz")
    assert examples["maps"].shape == (2, SIZE, SIZE)
    assert str(examples["method"]) == "random"
    assert int(examples["seed"]) == 2
    assert str(examples["experiment"]) == "demo"
    assert float(examples["val_threshold"]) == written["thresholds"]["val"]
    assert float(examples["test_threshold"]) == written["thresholds"]["test"]


def test_load_split_missing_key_names_file(tmp_path):
    path = write_split(tmp_path / "broken.npz", {"images": np.zeros((2, 4, 4), np.float32)})
    with pytest.raises(InvalidInputError, match=r"test split file .*broken\.npz lacks \['masks'"):
        load_split(path, "test")


def test_load_split_wrong_mask_dtype_names_file(tmp_path):
    arrays = make_split(0)
    arrays["masks"] = arrays["masks"].astype(np.uint8)
    path = write_split(tmp_path / "uint8.npz", arrays)
    with pytest.raises(InvalidInputError, match=r"uint8\.npz: masks must be bool"):
        load_split(path, "val")


def mri_split(path, subject, start, stop, seed):
    """Axial 64 x 64 slices of a real skull-stripped T1 volume with sink deformations."""
    image = read_volume(path)
    values = sitk.GetArrayFromImage(image)
    mask = sitk.GetImageFromArray((values > 0).astype(np.uint8))
    mask.CopyInformation(image)
    labels = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(image)
    scaled = sitk.Cast(image, sitk.sitkFloat32) / float(values.max())
    arrays = extract_slices(scaled, mask, labels, start=start, stop=stop, size=64)
    arrays["subject"] = np.array([subject] * (stop - start))
    return add_anomalies(arrays, kind="sink", fraction=0.5, radius_px=(5.0, 10.0), seed=seed)


def merge(*parts):
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def test_evaluate_untrained_sfae_on_real_mri(demo_files, tmp_path):
    val = mri_split(demo_files["colin27"], "colin27", 70, 80, seed=1)
    test = merge(
        mri_split(demo_files["sri24_t1_skullstripped"], "sri24", 60, 76, seed=2),
        mri_split(demo_files["icbm152_2009a"], "icbm152", 70, 86, seed=3),
    )
    method = Recording(build_method("sfae", {"weights": "random"}, seed=0, image_size=64))
    record = evaluate_files(
        method, write_split(tmp_path / "val.npz", val), write_split(tmp_path / "test.npz", test),
        tmp_path / "metrics.json", tmp_path / "examples.npz",
        experiment="demo", method_name="sfae", seed=0, data_note="demo", batch_size=8, device="cpu",
    )

    maps = np.concatenate(method.maps)
    expected = reference_metrics(val, test, maps[: len(val["images"])], maps[len(val["images"]) :])
    for key in ("pixel_ap", "pixel_auroc", "dice_at_fpr_test_threshold", "dice_at_fpr_val_threshold", "image_auroc"):
        assert record["metrics"][key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
    assert record["description"]["extractor_weights"] == "random"
    assert record["counts"]["test"]["abnormal_slices"] == 16
    assert sorted(record["per_volume_dice"]) == ["icbm152", "sri24"]
    examples = read_arrays(tmp_path / "examples.npz")
    assert np.array_equal(examples["index"], select_examples(test, 4))
