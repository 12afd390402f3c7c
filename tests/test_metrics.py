"""Exact pixel metrics from float16 histograms and the image-level metrics, against scikit-learn and slow references."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from sfae.evaluation import metrics
from sfae.evaluation.metrics import (
    BIN_VALUES,
    PixelScoreHistogram,
    UndefinedMetricWarning,
    image_auroc,
    image_labels,
    image_score,
    per_volume_dice,
    pixel_metrics,
    random_scores,
)
from sfae.io import InvalidInputError, read_volume

# (distinct score levels or None for continuous scores, fraction of positive pixels)
RANDOM_CASES = [(3, 0.3), (12, 0.05), (200, 0.5), (None, 0.02), (None, 0.9)]


def round16(scores) -> np.ndarray:
    """The rounding the metrics apply: float32, then float16."""
    return np.asarray(scores).astype(np.float32).astype(np.float16)


def random_pixels(levels: int | None, positive_fraction: float, seed: int, size: int = 20_000):
    """Scores shifted upwards on positive pixels; with ``levels``, drawn from few values so that ties abound."""
    rng = np.random.default_rng(seed)
    labels = rng.random(size) < positive_fraction
    scores = rng.normal(size=size) + 0.8 * labels
    if levels is not None:
        scores = np.round(scores * levels / 4) * 4 / levels
    return scores, labels


def histogram_of(scores, labels, mask=None) -> PixelScoreHistogram:
    histogram = PixelScoreHistogram()
    histogram.update(scores, labels, mask)
    return histogram


def reference_threshold(scores16: np.ndarray, labels: np.ndarray, max_fpr: float) -> float:
    """Smallest distinct score whose prediction ``score >= t`` has FPR <= max_fpr, by brute force."""
    negatives = scores16[~labels].astype(np.float64)
    best = math.inf
    for value in sorted(set(scores16.astype(np.float64).tolist()), reverse=True):
        if np.count_nonzero(negatives >= value) / negatives.size <= max_fpr:
            best = value
    return best


def reference_dice(scores16: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    predicted = scores16.astype(np.float64) >= threshold
    denominator = predicted.sum() + labels.sum()
    return 2 * np.count_nonzero(predicted & labels) / denominator if denominator else 1.0


def roc_curve_threshold(scores16: np.ndarray, labels: np.ndarray, max_fpr: float) -> float:
    fpr, _, thresholds = roc_curve(labels, scores16, drop_intermediate=False)
    return float(thresholds[np.flatnonzero(fpr <= max_fpr)[-1]])


@pytest.mark.parametrize("levels, positive_fraction", RANDOM_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_average_precision_matches_sklearn(levels, positive_fraction, seed):
    scores, labels = random_pixels(levels, positive_fraction, seed)
    expected = average_precision_score(labels, round16(scores))
    assert histogram_of(scores, labels).average_precision() == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("levels, positive_fraction", RANDOM_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_roc_auc_matches_sklearn(levels, positive_fraction, seed):
    scores, labels = random_pixels(levels, positive_fraction, seed)
    expected = roc_auc_score(labels, round16(scores))
    assert histogram_of(scores, labels).roc_auc() == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("levels, positive_fraction", RANDOM_CASES)
@pytest.mark.parametrize("max_fpr", [0.0, 0.01, 0.05, 0.3, 1.0])
def test_threshold_at_fpr_matches_roc_curve_and_reference(levels, positive_fraction, max_fpr):
    scores, labels = random_pixels(levels, positive_fraction, seed=2, size=4_000)
    threshold = histogram_of(scores, labels).threshold_at_fpr(max_fpr)
    assert threshold == roc_curve_threshold(round16(scores), labels, max_fpr)
    assert threshold == reference_threshold(round16(scores), labels, max_fpr)


@pytest.mark.parametrize("levels, positive_fraction", RANDOM_CASES)
def test_dice_at_threshold_matches_reference(levels, positive_fraction):
    scores, labels = random_pixels(levels, positive_fraction, seed=3)
    histogram = histogram_of(scores, labels)
    scores16 = round16(scores)
    present = np.unique(scores16).astype(np.float64)
    thresholds = [-math.inf, math.inf, present[0], present[-1], present[len(present) // 2], 0.123456, -0.0]
    for threshold in thresholds:
        assert histogram.dice_at_threshold(threshold) == pytest.approx(reference_dice(scores16, labels, threshold), rel=1e-12)
    counts = histogram.confusion_at_threshold(present[len(present) // 2])
    predicted = scores16 >= present[len(present) // 2]
    assert counts.true_positives == np.count_nonzero(predicted & labels)
    assert counts.false_positives == np.count_nonzero(predicted & ~labels)
    assert counts.false_negatives == np.count_nonzero(~predicted & labels)
    assert counts.true_negatives == np.count_nonzero(~predicted & ~labels)


def test_metrics_hand_computed_example():
    histogram = histogram_of(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    # Thresholds 0.8, 0.4, 0.35, 0.1 give (recall, precision) (1/2, 1), (1/2, 1/2), (1, 2/3), (1, 1/2).
    assert histogram.average_precision() == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # Positive-negative pairs ranked correctly: 0.8 beats both, 0.35 beats 0.1 only.
    assert histogram.roc_auc() == pytest.approx(3 / 4)
    # FPR is 0, 1/2, 1/2, 1 at the four thresholds, so the lowest threshold with FPR <= 1/2 is 0.35.
    assert histogram.threshold_at_fpr(0.5) == float(np.float16(0.35))
    assert histogram.threshold_at_fpr(0.4) == float(np.float16(0.8))
    # Predicting 0.8, 0.4 and 0.35: TP = 2, FP = 1, FN = 0.
    assert histogram.dice_at_threshold(float(np.float16(0.35))) == pytest.approx(4 / 5)


def test_metrics_hand_computed_ties():
    histogram = histogram_of(np.array([1.0, 1.0, 0.0]), np.array([True, False, True]))
    # Threshold 1 takes both tied pixels at once: recall 1/2, precision 1/2; threshold 0: recall 1, precision 2/3.
    assert histogram.average_precision() == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    # Pairs (positive, negative): (1, 1) is a tie worth one half, (0, 1) is wrong.
    assert histogram.roc_auc() == pytest.approx(0.25)
    # Tied pixels are never split, so FPR 0.5 cannot be reached at score 1: nothing is predicted.
    assert histogram.threshold_at_fpr(0.5) == math.inf
    assert histogram.dice_at_threshold(math.inf) == 0.0


def test_threshold_survives_collinear_roc_points():
    # The ROC points (0.25, 0.5) and (0.5, 1) are collinear with (0, 0): roc_curve's default drop_intermediate
    # removes the middle one, whose threshold is the correct result at max_fpr = 0.3.
    scores = np.array([4.0, 4.0, 4.0, 3.0, 3.0, 3.0, 2.0, 2.0])
    labels = np.array([1, 1, 0, 1, 1, 0, 0, 0], dtype=bool)
    assert histogram_of(scores, labels).threshold_at_fpr(0.3) == 4.0
    assert roc_curve_threshold(round16(scores), labels, 0.3) == 4.0


def test_no_positive_pixels_policy():
    histogram = histogram_of(np.array([0.1, 0.2, 0.3]), np.zeros(3, dtype=bool))
    with pytest.warns(UndefinedMetricWarning, match="without positive pixels"):
        assert math.isnan(histogram.average_precision())
    with pytest.warns(UndefinedMetricWarning, match="without positive samples"):
        assert math.isnan(histogram.roc_auc())
    # scikit-learn 1.9 returns 0.0 here, the difference the module docstring documents.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert average_precision_score(np.zeros(3), [0.1, 0.2, 0.3]) == 0.0
    assert histogram.threshold_at_fpr(0.5) == float(np.float16(0.3))
    assert histogram.dice_at_threshold(0.3) == 0.0
    assert histogram.dice_at_threshold(math.inf) == metrics.EMPTY_DICE


def test_all_positive_pixels_policy():
    histogram = histogram_of(np.array([0.1, 0.2, 0.2]), np.ones(3, dtype=bool))
    assert histogram.average_precision() == 1.0
    assert average_precision_score(np.ones(3), [0.1, 0.2, 0.2]) == 1.0
    with pytest.warns(UndefinedMetricWarning, match="without negative samples"):
        assert math.isnan(histogram.roc_auc())
    with pytest.warns(UndefinedMetricWarning, match="without negative pixels"):
        assert math.isnan(histogram.threshold_at_fpr())
    with pytest.warns(UndefinedMetricWarning):
        result = pixel_metrics(histogram)
    assert math.isnan(result.dice)
    assert result.average_precision == 1.0


def test_single_pixel():
    positive = histogram_of(np.array([0.5]), np.array([True]))
    assert positive.average_precision() == 1.0
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(positive.roc_auc())
    negative = histogram_of(np.array([0.5]), np.array([False]))
    assert negative.threshold_at_fpr(0.0) == math.inf
    assert negative.threshold_at_fpr(1.0) == 0.5


def test_empty_histogram_raises():
    with pytest.raises(InvalidInputError, match="histogram is empty"):
        PixelScoreHistogram().average_precision()
    masked_out = histogram_of(np.ones(4), np.ones(4), mask=np.zeros(4, dtype=bool))
    assert masked_out.n_pixels == 0
    with pytest.raises(InvalidInputError, match="outside the brain mask"):
        masked_out.threshold_at_fpr()


@pytest.mark.parametrize("parts", [2, 5])
def test_merge_equals_single_update(parts):
    scores, labels = random_pixels(12, 0.1, seed=4)
    merged = PixelScoreHistogram()
    merged.merge(PixelScoreHistogram())
    for score_part, label_part in zip(np.array_split(scores, parts), np.array_split(labels, parts)):
        merged.merge(histogram_of(score_part, label_part))
    whole = histogram_of(scores, labels)
    np.testing.assert_array_equal(merged.negatives, whole.negatives)
    np.testing.assert_array_equal(merged.positives, whole.positives)
    assert merged.average_precision() == whole.average_precision()


def test_merge_rejects_other_types():
    with pytest.raises(TypeError, match="PixelScoreHistogram"):
        PixelScoreHistogram().merge(np.zeros(3))


def test_mask_ignores_outside_pixels():
    scores, labels = random_pixels(None, 0.2, seed=5, size=3_000)
    mask = np.random.default_rng(6).random(scores.size) < 0.6
    with_mask = histogram_of(scores.reshape(30, 100), labels.reshape(30, 100), mask.reshape(30, 100).astype(np.uint8))
    selected = histogram_of(scores[mask], labels[mask])
    np.testing.assert_array_equal(with_mask.positives, selected.positives)
    np.testing.assert_array_equal(with_mask.negatives, selected.negatives)
    # NaN outside the brain is never looked at, on the CPU path and the torch path alike.
    scores[~mask] = np.nan
    assert histogram_of(scores, labels, mask).n_pixels == selected.n_pixels
    assert histogram_of(torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(mask)).n_pixels == selected.n_pixels


def test_chunk_boundaries(monkeypatch):
    scores, labels = random_pixels(None, 0.2, seed=7, size=1_001)
    mask = np.arange(scores.size) % 3 != 0
    expected = histogram_of(scores, labels, mask)
    monkeypatch.setattr(metrics, "CPU_CHUNK_PIXELS", 7)
    for histogram in (histogram_of(scores, labels, mask), histogram_of(torch.from_numpy(scores), torch.from_numpy(labels), mask)):
        np.testing.assert_array_equal(histogram.positives, expected.positives)
        np.testing.assert_array_equal(histogram.negatives, expected.negatives)


def test_torch_and_numpy_histograms_identical():
    rng = np.random.default_rng(8)
    scores = (rng.normal(size=(4, 32, 32)) * 3).astype(np.float32)
    scores[0, 0, :4] = [-0.0, 0.0, 65504.0, -65519.0]
    labels = (rng.random(scores.shape) < 0.3).astype(np.int64)
    mask = rng.random(scores.shape) < 0.8
    from_numpy = histogram_of(scores, labels, mask)
    from_torch = histogram_of(torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(mask))
    assert isinstance(from_torch._counts, torch.Tensor)
    np.testing.assert_array_equal(from_torch.negatives, from_numpy.negatives)
    np.testing.assert_array_equal(from_torch.positives, from_numpy.positives)
    from_torch.merge(from_numpy)
    assert from_torch.n_pixels == 2 * from_numpy.n_pixels


def test_float64_rounds_through_float32():
    # Just above the midpoint between the float16 values 1 and 1 + 2**-10: direct rounding gives 1 + 2**-10,
    # but float32 first lands exactly on the midpoint, and ties-to-even then gives 1.
    value = 1 + 2.0**-11 + 2.0**-40
    for histogram in (histogram_of(np.array([value]), [True]), histogram_of(torch.tensor([value], dtype=torch.float64), torch.tensor([True]))):
        assert BIN_VALUES[np.flatnonzero(histogram.positives)].tolist() == [1.0]


def test_signed_zeros_share_a_bin():
    histogram = histogram_of(np.array([-0.0, 0.0, 1.0]), np.array([True, False, False]))
    occupied = np.flatnonzero(histogram.negatives + histogram.positives)
    assert occupied.size == 2
    assert histogram.negatives[occupied[0]] == 1
    assert histogram.positives[occupied[0]] == 1
    assert histogram.dice_at_threshold(-0.0) == histogram.dice_at_threshold(0.0)
    assert histogram.roc_auc() == pytest.approx(roc_auc_score([1, 0, 0], [-0.0, 0.0, 1.0]))


def test_bin_values_ascend():
    finite = BIN_VALUES[np.isfinite(BIN_VALUES)]
    assert np.all(np.diff(finite) >= 0)
    assert np.count_nonzero(np.diff(finite) == 0) == 1  # only -0.0 and +0.0
    assert finite[0] == -65504.0
    assert finite[-1] == 65504.0


@pytest.mark.parametrize("as_tensor", [False, True])
def test_nan_scores_raise(as_tensor):
    scores = np.array([0.1, np.nan, 0.3], dtype=np.float32)
    labels = np.array([True, False, True])
    histogram = histogram_of(np.array([0.5]), np.array([True]))
    with pytest.raises(InvalidInputError, match="1 NaN values"):
        histogram.update(torch.from_numpy(scores) if as_tensor else scores, labels)
    assert histogram.n_pixels == 1


@pytest.mark.parametrize("value", [65520.0, 1e6, -7e4, np.inf, 1e40])
def test_float16_overflow_raises(value):
    with pytest.raises(InvalidInputError, match="beyond float16's largest value 65504"):
        histogram_of(np.array([0.5, value]), np.array([True, False]))


def test_float16_largest_values_accepted():
    histogram = histogram_of(np.array([65504.0, 65519.0, -65504.0]), np.array([True, False, False]))
    assert histogram.threshold_at_fpr(0.0) == math.inf
    assert histogram.threshold_at_fpr(0.5) == 65504.0


def test_doubling_scores_changes_only_threshold():
    scores, labels = random_pixels(30, 0.2, seed=9)
    scores16 = round16(scores)
    original, doubled = histogram_of(scores16, labels), histogram_of(scores16.astype(np.float32) * 2, labels)
    assert doubled.average_precision() == original.average_precision()
    assert doubled.roc_auc() == original.roc_auc()
    assert doubled.threshold_at_fpr() == 2 * original.threshold_at_fpr()
    assert doubled.dice_at_threshold(doubled.threshold_at_fpr()) == original.dice_at_threshold(original.threshold_at_fpr())


def test_update_validates_inputs():
    histogram = PixelScoreHistogram()
    with pytest.raises(InvalidInputError, match="boolean or 0/1, found the value 2"):
        histogram.update(np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(InvalidInputError, match=r"labels have shape \(2,\) but scores have shape \(3,\)"):
        histogram.update(np.zeros(3), np.zeros(2))
    with pytest.raises(InvalidInputError, match="masks must be boolean"):
        histogram.update(np.zeros(3), np.zeros(3), np.array([0.5, 1, 1]))
    with pytest.raises(InvalidInputError, match="expected real numbers"):
        histogram.update(np.zeros(3, dtype=complex), np.zeros(3))
    with pytest.raises(InvalidInputError, match="expected real numbers"):
        histogram.update(torch.zeros(3, dtype=torch.bool), torch.zeros(3))
    with pytest.raises(InvalidInputError, match="max_fpr must lie in"):
        histogram_of(np.zeros(3), np.zeros(3)).threshold_at_fpr(1.5)
    with pytest.raises(InvalidInputError, match="threshold is NaN"):
        histogram_of(np.zeros(3), np.zeros(3)).dice_at_threshold(math.nan)
    assert histogram.n_pixels == 0


def test_histogram_round_trip(tmp_path):
    scores, labels = random_pixels(12, 0.1, seed=10)
    histogram = histogram_of(scores, labels)
    histogram.save(tmp_path / "histogram.npz")
    loaded = PixelScoreHistogram.load(tmp_path / "histogram.npz")
    np.testing.assert_array_equal(loaded.positives, histogram.positives)
    np.testing.assert_array_equal(loaded.negatives, histogram.negatives)
    assert PixelScoreHistogram.from_arrays(PixelScoreHistogram().to_arrays()).n_pixels == 0


def test_histogram_arrays_validated(tmp_path):
    arrays = histogram_of(np.array([0.5]), np.array([True])).to_arrays()
    with pytest.raises(InvalidInputError, match="non-negative integers"):
        PixelScoreHistogram.from_arrays({**arrays, "negatives": -np.ones(metrics.N_BINS, dtype=np.int64)})
    with pytest.raises(InvalidInputError, match="missing \\['positives'\\]"):
        PixelScoreHistogram.from_arrays({"negatives": arrays["negatives"], "bin_values": arrays["bin_values"]})
    with pytest.raises(InvalidInputError, match="bin order"):
        PixelScoreHistogram.from_arrays({**arrays, "bin_values": arrays["bin_values"][::-1].copy()})
    with pytest.raises(InvalidInputError, match="missing.npz"):
        PixelScoreHistogram.load(tmp_path / "missing.npz")


def test_roc_auc_exact_with_huge_counts():
    # 3e9 pixels per class overflow int64 products in a naive formula.
    negatives = np.zeros(metrics.N_BINS, dtype=np.int64)
    positives = np.zeros(metrics.N_BINS, dtype=np.int64)
    low, high = np.searchsorted(BIN_VALUES, [0.25, 0.75])
    negatives[[low, high]] = [3_000_000_001, 1_000_000_000]
    positives[[low, high]] = [7, 2_999_999_999]
    histogram = PixelScoreHistogram.from_arrays({"negatives": negatives, "positives": positives, "bin_values": BIN_VALUES.astype(np.float16)})
    wins = 2_999_999_999 * 3_000_000_001
    ties = Fraction(3_000_000_001 * 7 + 1_000_000_000 * 2_999_999_999, 2)
    expected = (wins + ties) / (4_000_000_001 * 3_000_000_006)
    assert histogram.roc_auc() == float(expected)


def test_pixel_metrics_threshold_sources():
    validation, test = random_pixels(20, 0.1, seed=11), random_pixels(20, 0.1, seed=12)
    validation_histogram, test_histogram = histogram_of(*validation), histogram_of(*test)

    published = pixel_metrics(test_histogram)
    assert published.threshold_source == "same_set"
    assert published.max_fpr == metrics.DEFAULT_MAX_FPR
    assert published.threshold == test_histogram.threshold_at_fpr(0.05)
    assert published.dice == test_histogram.dice_at_threshold(published.threshold)
    assert published.fpr <= 0.05
    assert published.average_precision == test_histogram.average_precision()
    assert published.n_pixels == 20_000

    validation_threshold = validation_histogram.threshold_at_fpr(0.05)
    with_validation_threshold = pixel_metrics(test_histogram, threshold=validation_threshold)
    assert with_validation_threshold.threshold_source == "given"
    assert with_validation_threshold.max_fpr is None
    assert with_validation_threshold.dice == pytest.approx(reference_dice(round16(test[0]), test[1], validation_threshold))


def test_image_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(13)
    labels = rng.random(300) < 0.4
    scores = np.round(rng.normal(size=300) + labels, 1)
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    assert image_auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == image_auroc(scores, labels)


def test_image_auroc_from_label_maps():
    label_maps = np.zeros((4, 3, 3), dtype=np.uint8)
    label_maps[1, 2, 2] = 1
    label_maps[3, 0, 1] = 1
    assert image_labels(label_maps).tolist() == [False, True, False, True]
    # Abnormal slices score 0.9 and 0.4, normal ones 0.1 and 0.4: three wins and one tie out of four pairs.
    assert image_auroc(np.array([0.1, 0.9, 0.4, 0.4]), label_maps) == pytest.approx(3.5 / 4)


def test_image_auroc_degenerate():
    with pytest.warns(UndefinedMetricWarning, match="without positive samples"):
        assert math.isnan(image_auroc(np.array([0.1, 0.2]), np.array([0, 0])))
    with pytest.raises(InvalidInputError, match="1 image scores are NaN"):
        image_auroc(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(InvalidInputError, match="2 image scores but 3 image labels"):
        image_auroc(np.array([0.1, 0.2]), np.array([0, 1, 1]))


def reference_image_score(maps: np.ndarray, masks: np.ndarray, fraction: float) -> list[float]:
    result = []
    for anomaly_map, mask in zip(maps, masks.astype(bool)):
        brain = sorted(round16(anomaly_map[mask]).astype(np.float64).tolist(), reverse=True)
        count = max(1, math.ceil(Fraction(str(fraction)) * len(brain)))
        result.append(sum(brain[:count]) / count if brain else math.nan)
    return result


def test_image_score_hand_computed():
    maps = np.zeros((3, 10, 10), dtype=np.float32)
    masks = np.zeros((3, 10, 10), dtype=bool)
    maps[0, 0, :] = np.arange(1, 11)
    masks[0, 0, :] = True
    maps[1].flat[:25] = np.arange(25)
    masks[1].flat[:25] = True
    maps[1, 9, 9] = 1000.0  # outside the brain
    maps[2, 5, 5] = -3.0
    masks[2, 5, 5] = True
    # 10 pixels -> 1 pixel (10); 25 pixels -> ceil(2.5) = 3 pixels (24, 23, 22); 1 pixel -> itself.
    np.testing.assert_array_equal(image_score(maps, masks), [10.0, 23.0, -3.0])


def test_image_score_count_rounding():
    maps = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    masks = np.ones_like(maps, dtype=bool)
    # 0.07 * 100 evaluates to 7.000000000000001 in float64, which must still mean 7 pixels (93 to 99).
    assert image_score(maps, masks, top_fraction=0.07)[0] == 96.0


def test_image_score_matches_reference_and_torch():
    rng = np.random.default_rng(14)
    maps = rng.random((6, 16, 16)) * 2
    masks = rng.random((6, 16, 16)) < np.linspace(0.02, 1.0, 6)[:, None, None]
    for fraction in (0.1, 0.07, 0.5, 1.0):
        expected = reference_image_score(maps, masks, fraction)
        from_numpy = image_score(maps, masks, fraction)
        from_torch = image_score(torch.from_numpy(maps), torch.from_numpy(masks), fraction)
        np.testing.assert_allclose(from_numpy, expected, rtol=1e-15)
        np.testing.assert_array_equal(from_torch.numpy(), from_numpy)


def test_image_score_empty_mask_and_errors():
    maps = np.ones((2, 4, 4))
    masks = np.ones((2, 4, 4), dtype=bool)
    masks[1] = False
    maps[1, 0, 0] = np.nan  # outside the (empty) brain, so ignored
    with pytest.warns(UndefinedMetricWarning, match="1 slices have an empty brain mask"):
        scores = image_score(maps, masks)
    assert scores[0] == 1.0
    assert math.isnan(scores[1])
    with pytest.raises(InvalidInputError, match="NaN or infinite brain pixels"):
        image_score(np.full((1, 2, 2), 7e4), np.ones((1, 2, 2)))
    with pytest.raises(InvalidInputError, match="top_fraction must lie in"):
        image_score(maps, masks, top_fraction=0.0)
    with pytest.raises(InvalidInputError, match="brain masks have shape"):
        image_score(maps, masks[:1])


def test_empty_batches():
    assert image_score(np.zeros((0, 4, 4)), np.zeros((0, 4, 4), dtype=bool)).shape == (0,)
    assert image_labels(np.zeros((0, 4, 4))).shape == (0,)
    assert per_volume_dice(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)), []) == {}


def test_per_volume_dice():
    predictions = np.zeros((5, 2, 2), dtype=bool)
    labels = np.zeros((5, 2, 2), dtype=bool)
    subjects = ["b", "a", "a", "c", "b"]
    # Subject a, pooled over slices 1 and 2: 2 predicted pixels, 3 lesion pixels, 1 in common -> 2 * 1 / (2 + 3).
    predictions[1, 0, :] = True
    labels[1, 0, 0] = True
    labels[2, 0, 0] = labels[2, 1, 1] = True
    # Subject c: neither prediction nor lesion. Subject b: a lesion and no prediction.
    labels[4, 1, 0] = True
    result = per_volume_dice(predictions, labels, subjects)
    assert list(result) == ["a", "b", "c"]
    assert result["a"] == pytest.approx(2 * 1 / (2 + 3))
    assert result["b"] == 0.0
    assert result["c"] == metrics.EMPTY_DICE
    assert math.isnan(per_volume_dice(predictions, labels, subjects, empty_dice=math.nan)["c"])
    assert per_volume_dice(torch.from_numpy(predictions), torch.from_numpy(labels), subjects) == result
    with pytest.raises(InvalidInputError, match="got 2 subject ids for 5 slices"):
        per_volume_dice(predictions, labels, ["a", "b"])


def test_random_scores_seeded():
    first = random_scores((4, 8, 8), seed=3)
    assert first.dtype == np.float32
    assert first.shape == (4, 8, 8)
    assert np.all((first >= 0) & (first < 1))
    np.testing.assert_array_equal(first, random_scores((4, 8, 8), seed=3))
    assert not np.array_equal(first, random_scores((4, 8, 8), seed=4))
    with pytest.raises(InvalidInputError, match="seed must be a non-negative integer"):
        random_scores(3, seed=-1)


def test_random_floor_on_real_brain(demo_files):
    # Real SRI24 brain slices at 3 mm: the brain mask from the skull-stripped atlas, a spherical "lesion" as labels.
    atlas = read_volume(demo_files["sri24_t1_skullstripped"])
    atlas = sitk.Resample(atlas, [80, 80, 52], sitk.Transform(), sitk.sitkLinear, atlas.GetOrigin(), [3.0, 3.0, 3.0], atlas.GetDirection())
    volume = sitk.GetArrayFromImage(atlas)[15:40]
    masks = volume > 0
    z, y, x = np.indices(volume.shape)
    labels = ((z - 12) ** 2 + (y - 40) ** 2 + (x - 40) ** 2 <= 8**2) & masks

    intensity = histogram_of(volume / volume.max(), labels, masks)
    brain_intensity = round16(volume / volume.max())[masks]
    assert intensity.average_precision() == pytest.approx(average_precision_score(labels[masks], brain_intensity), rel=1e-12)

    noise = random_scores(volume.shape, seed=0)
    floor = pixel_metrics(histogram_of(noise, labels, masks))
    assert floor.average_precision == pytest.approx(labels[masks].mean(), rel=0.25)
    assert floor.roc_auc == pytest.approx(0.5, abs=0.05)
    assert floor.fpr <= 0.05
    expected_scores = reference_image_score(volume.astype(np.float32), masks, 0.1)
    np.testing.assert_allclose(image_score(volume.astype(np.float32), masks), expected_scores, rtol=1e-12)
