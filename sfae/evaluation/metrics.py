"""Exact, streaming pixel-level metrics and the image-level metrics of the benchmark.

Protocol (Meissen et al., "Unsupervised Anomaly Localization with Structural
Feature-Autoencoders", 2022):

* Pixel-AP: average precision over all pixels of the whole test set.
* Dice at 5 % FPR: the anomaly maps are binarized at the score whose pixel-wise
  false positive rate over the test set is 5 %, then Dice is taken over all
  pixels of the test set. The published threshold comes from the test labels,
  which leaks test information; :func:`pixel_metrics` also takes a threshold
  chosen on the validation set, and records which of the two was used.
* Image-AUROC: a slice is abnormal when any of its pixels is anomalous. Its
  score is the mean of its top 10 % brain pixels (:func:`image_score`).

Exactness. Every anomaly map is rounded to float16 before any pixel metric.
Scores are first cast to float32 (the dtype of anomaly maps in this package)
and then rounded to float16, so NumPy and PyTorch round float64 input the same
way. float16 has 65,536 bit patterns, so the scores of any number of pixels
take at most 65,536 distinct values, and every ranking metric depends only on
how many positive and how many negative pixels carry each value.
:class:`PixelScoreHistogram` stores exactly these two counts. AP, the FPR
threshold, confusion counts and Dice computed from it are therefore the values
scikit-learn returns for the full arrays of float16-rounded scores. AUROC is the
exact Mann-Whitney statistic, which scikit-learn's trapezoid rule matches to
within rounding (differences of 1e-16 were measured). Memory stays O(65,536) whatever the number of pixels.

Policy for degenerate input:

* An empty histogram (no pixel added, or every pixel outside the brain mask)
  raises :class:`~sfae.io.InvalidInputError`.
* Scores that are NaN, infinite, or beyond float16's range (``|score| >= 65520``
  rounds to infinity) raise InvalidInputError. They are not clipped, because
  clipping would tie every large score at 65504.
* No positive pixel: AP and AUROC are undefined, so both return NaN with an
  :class:`UndefinedMetricWarning`. scikit-learn 1.9 returns AP = 0.0 with a
  warning in this case and NaN for AUROC.
* No negative pixel: AUROC and the FPR threshold return NaN with a warning (as
  scikit-learn's ``roc_auc_score`` and ``roc_curve`` do). AP is 1.0, as in
  scikit-learn.
* Dice of an empty prediction against an empty label set is
  :data:`EMPTY_DICE` (1.0, perfect agreement).
* An image score of a slice with an empty brain mask is NaN, with a warning.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from sfae.io import InvalidInputError, read_arrays, write_arrays

logger = logging.getLogger(__name__)

# Dice is reported at a pixel-wise false positive rate of 5 % (Meissen et al. 2022).
DEFAULT_MAX_FPR = 0.05
# The public reference code of Meissen et al. scored a slice by the mean of its top 10 % brain pixels.
DEFAULT_TOP_FRACTION = 0.1
# Dice when both prediction and labels are empty: the two sets agree perfectly.
EMPTY_DICE = 1.0

N_BINS = 1 << 16
# Pixels per bincount call on the CPU and on an accelerator. Temporaries take
# about 12 bytes per chunk pixel, so an update's memory does not grow with its input.
CPU_CHUNK_PIXELS = 1 << 18
DEVICE_CHUNK_PIXELS = 1 << 24

# The number of decimals ``top_fraction * n`` is rounded to before ceil, so
# that 0.07 * 100 = 7.000000000000001 counts 7 pixels, not 8.
_COUNT_DECIMALS = 6


class UndefinedMetricWarning(UserWarning):
    """Warning that a metric is undefined for the given labels and was returned as NaN."""


def _float16_bins() -> tuple[np.ndarray, np.ndarray]:
    """Return the bit pattern counted in each histogram bin and each bin's value, in ascending score order."""
    patterns = np.arange(N_BINS, dtype=np.int64)

    # Positive floats (sign bit clear) order like their bit patterns and above
    # every negative float. Negative floats order in reverse of their patterns.
    bins = np.where(patterns < 0x8000, patterns + 0x8000, 0xFFFF - patterns)
    pattern_at_bin = np.empty_like(patterns)
    pattern_at_bin[bins] = patterns

    values = patterns.astype(np.uint16).view(np.float16).astype(np.float64)[pattern_at_bin]
    pattern_at_bin.flags.writeable = False
    values.flags.writeable = False
    return pattern_at_bin, values


# BIN_VALUES[i] is the float16 value counted in bin i, ascending (NaN bins at both ends stay empty).
_PATTERN_AT_BIN, BIN_VALUES = _float16_bins()
_NEGATIVE_ZERO_PATTERN = 0x8000
_ALL_PATTERNS = np.arange(N_BINS)
_NAN_PATTERNS = np.flatnonzero(((_ALL_PATTERNS & 0x7C00) == 0x7C00) & ((_ALL_PATTERNS & 0x03FF) != 0))
_INFINITE_PATTERNS = np.array([0x7C00, 0xFC00])


def _torch_module() -> Any:
    """Return the torch module if the caller imported it, else None (this module never imports torch itself)."""
    return sys.modules.get("torch")


def _is_tensor(value: Any) -> bool:
    torch = _torch_module()
    return torch is not None and isinstance(value, torch.Tensor)


def _as_array(value: Any) -> Any:
    """Return a torch tensor unchanged and anything else as a NumPy array."""
    return value if _is_tensor(value) else np.asarray(value)


def _to_numpy(value: Any) -> np.ndarray:
    if _is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _flatten_slices(values: Any) -> Any:
    """Reshape (batch_size, ...) to (batch_size, pixels), also for an empty batch."""
    return values.reshape(values.shape[0], math.prod(values.shape[1:]))


def _require_same_shape(name: str, value: Any, reference_name: str, reference: Any) -> None:
    if tuple(value.shape) != tuple(reference.shape):
        raise InvalidInputError(
            f"{name} have shape {tuple(value.shape)} but {reference_name} have shape {tuple(reference.shape)}; "
            "pass arrays of the same shape"
        )


def _as_bool(values: Any, name: str) -> Any:
    """Return a boolean copy or view of a label or mask array (NumPy or torch) after checking it contains only 0 and 1."""
    if values.dtype == np.bool_ or (_is_tensor(values) and values.dtype == _torch_module().bool):
        return values
    invalid = (values != 0) & (values != 1)
    if bool(invalid.any()):
        raise InvalidInputError(f"{name} must be boolean or 0/1, found the value {values[invalid][0].item()!r}")
    return values != 0


def _pattern_counts_numpy(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Count negative and positive pixels per float16 bit pattern, shape (2, 65536), int64."""
    scores, labels = scores.reshape(-1), labels.reshape(-1)
    mask = None if mask is None else mask.reshape(-1)
    all_counts = np.zeros(N_BINS, dtype=np.int64)
    positive_counts = np.zeros(N_BINS, dtype=np.int64)
    for start in range(0, scores.size, CPU_CHUNK_PIXELS):
        chunk = slice(start, start + CPU_CHUNK_PIXELS)
        rounded = scores[chunk]
        if rounded.dtype != np.float16:
            with np.errstate(over="ignore", invalid="ignore"):
                rounded = rounded.astype(np.float32, copy=False).astype(np.float16)
        patterns = rounded.view(np.uint16)
        positive = _as_bool(labels[chunk], "labels")
        if mask is not None:
            inside = _as_bool(mask[chunk], "masks")
            patterns, positive = patterns[inside], positive[inside]
        all_counts += np.bincount(patterns, minlength=N_BINS)
        positive_counts += np.bincount(patterns[positive], minlength=N_BINS)
    return np.stack([all_counts - positive_counts, positive_counts])


def _pattern_counts_torch(scores: Any, labels: Any, mask: Any) -> Any:
    """Count negative and positive pixels per float16 bit pattern on the tensor's device, shape (2, 65536), int64."""
    torch = _torch_module()
    device = scores.device
    scores = scores.detach().reshape(-1)
    labels = torch.as_tensor(labels, device=device).reshape(-1)
    mask = None if mask is None else torch.as_tensor(mask, device=device).reshape(-1)
    chunk_pixels = CPU_CHUNK_PIXELS if device.type == "cpu" else DEVICE_CHUNK_PIXELS

    # Index = pattern + 65536 * label; pixels outside the mask go to one extra bin that is dropped.
    outside_bin = 2 * N_BINS
    counts = torch.zeros(outside_bin + 1, dtype=torch.int64, device=device)
    for start in range(0, scores.numel(), chunk_pixels):
        chunk = slice(start, start + chunk_pixels)
        rounded = scores[chunk]
        if rounded.dtype != torch.float16:
            rounded = rounded.to(torch.float32).to(torch.float16)
        index = rounded.view(torch.int16).to(torch.int32) & 0xFFFF
        index += _as_bool(labels[chunk], "labels").to(torch.int32) * N_BINS
        if mask is not None:
            index = torch.where(_as_bool(mask[chunk], "masks"), index, outside_bin)
        counts += torch.bincount(index, minlength=outside_bin + 1)
    return counts[:outside_bin].reshape(2, N_BINS)


def _check_finite_patterns(pattern_counts: Any) -> None:
    """Raise if any pixel was counted under a NaN or infinite float16 pattern."""
    totals = _to_numpy(pattern_counts.sum(0))
    nan_count = int(totals[_NAN_PATTERNS].sum())
    infinite_count = int(totals[_INFINITE_PATTERNS].sum())
    if nan_count:
        raise InvalidInputError(
            f"scores contain {nan_count} NaN values; anomaly maps must be finite, so check the model output"
        )
    if infinite_count:
        raise InvalidInputError(
            f"{infinite_count} scores are infinite after rounding to float16 (infinite, or |score| >= 65520, "
            "beyond float16's largest value 65504); rescale the anomaly maps, for example to [0, 1]"
        )


@dataclass(frozen=True)
class ConfusionCounts:
    """Pixel counts of the prediction ``score >= threshold`` against the labels."""

    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int

    @property
    def dice(self) -> float:
        """Dice 2TP / (2TP + FP + FN); :data:`EMPTY_DICE` when prediction and labels are both empty."""
        denominator = 2 * self.true_positives + self.false_positives + self.false_negatives
        return 2 * self.true_positives / denominator if denominator else EMPTY_DICE

    @property
    def fpr(self) -> float:
        """False positive rate FP / (FP + TN); NaN without negative pixels."""
        negatives = self.false_positives + self.true_negatives
        return self.false_positives / negatives if negatives else math.nan

    @property
    def tpr(self) -> float:
        """True positive rate TP / (TP + FN); NaN without positive pixels."""
        positives = self.true_positives + self.false_negatives
        return self.true_positives / positives if positives else math.nan


def _auc_from_counts(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Return the exact AUROC from negative and positive counts per score value, in ascending score order.

    AUROC = P(score of a positive > score of a negative) + P(tie) / 2, the
    area under the ROC curve with ties drawn as diagonal segments. The
    numerator and denominator are exact Python integers and their quotient is
    correctly rounded.
    """
    n_negative, n_positive = int(negatives.sum()), int(positives.sum())
    if n_positive == 0 or n_negative == 0:
        missing = "positive" if n_positive == 0 else "negative"
        warnings.warn(f"AUROC is undefined without {missing} samples; returning NaN", UndefinedMetricWarning, stacklevel=3)
        return math.nan
    positives_above = n_positive - np.cumsum(positives)
    wins = np.dot(negatives.astype(object), positives_above.astype(object))
    ties = np.dot(negatives.astype(object), positives.astype(object))
    return (2 * wins + ties) / (2 * n_positive * n_negative)


class PixelScoreHistogram:
    """Counts of negative and positive pixels per float16 score value: an exact, mergeable summary of a pixel set.

    Bin ``i`` counts the pixels whose float16-rounded score equals
    ``BIN_VALUES[i]``; bins ascend with the score, and -0.0 is counted as +0.0.
    The counts live where the first update's scores lived: in a NumPy array, or
    in a torch tensor on that device. Counts from later input elsewhere are
    moved there.
    """

    def __init__(self) -> None:
        self._counts: Any = None

    def __repr__(self) -> str:
        if self._counts is None:
            return "PixelScoreHistogram(empty)"
        return f"PixelScoreHistogram(n_pixels={self.n_pixels}, n_positive={self.n_positive})"

    def update(self, scores: Any, labels: Any, mask: Any = None) -> None:
        """Add the pixels of a batch, volume or whole split.

        Args:
            scores: Anomaly scores of any shape, a NumPy array or torch tensor of
                any real dtype, on any device. Rounded to float16 (via float32).
            labels: Ground truth of the same shape, boolean or 0/1.
            mask: Optional brain mask of the same shape, boolean or 0/1. Pixels
                outside it are ignored entirely.

        Raises:
            InvalidInputError: If shapes differ, labels or mask contain values other
                than 0 and 1, or a score is NaN or not finite in float16. The
                histogram is unchanged when this is raised.
        """
        # 1. Validate shapes and count pixels per float16 bit pattern where the scores live.
        scores, labels = _as_array(scores), _as_array(labels)
        mask = None if mask is None else _as_array(mask)
        _require_same_shape("labels", labels, "scores", scores)
        if mask is not None:
            _require_same_shape("masks", mask, "scores", scores)
        if _is_tensor(scores):
            if scores.is_complex() or scores.dtype == _torch_module().bool:
                raise InvalidInputError(f"scores have dtype {scores.dtype}, expected real numbers (float or integer)")
            pattern_counts = _pattern_counts_torch(scores, labels, mask)
        else:
            if scores.dtype.kind not in "fiu":
                raise InvalidInputError(f"scores have dtype {scores.dtype}, expected real numbers (float or integer)")
            mask = None if mask is None else _to_numpy(mask)
            pattern_counts = _pattern_counts_numpy(scores, _to_numpy(labels), mask)

        # 2. Reject NaN and infinity before anything is added.
        _check_finite_patterns(pattern_counts)

        # 3. Count -0.0 as +0.0, reorder the patterns by value and accumulate.
        pattern_counts[:, 0] += pattern_counts[:, _NEGATIVE_ZERO_PATTERN]
        pattern_counts[:, _NEGATIVE_ZERO_PATTERN] = 0
        self._add(pattern_counts[:, self._bin_order_like(pattern_counts)])

    def merge(self, other: PixelScoreHistogram) -> None:
        """Add the counts of ``other`` (for example another batch's or volume's histogram) to this one.

        Raises:
            TypeError: If ``other`` is not a PixelScoreHistogram.
        """
        if not isinstance(other, PixelScoreHistogram):
            raise TypeError(f"can only merge a PixelScoreHistogram, got {type(other).__name__}")
        if other._counts is not None:
            self._add(other._counts)

    def _add(self, counts: Any) -> None:
        if self._counts is None:
            self._counts = counts.clone() if _is_tensor(counts) else counts.copy()
        elif _is_tensor(self._counts):
            self._counts += _torch_module().as_tensor(counts, device=self._counts.device)
        else:
            self._counts += _to_numpy(counts)

    @staticmethod
    def _bin_order_like(counts: Any) -> Any:
        if _is_tensor(counts):
            return _torch_module().tensor(_PATTERN_AT_BIN, device=counts.device)
        return _PATTERN_AT_BIN

    def _numpy_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (negatives, positives) per bin as int64 NumPy arrays.

        Raises:
            InvalidInputError: If the histogram contains no pixel.
        """
        if self._counts is None or int(self._counts.sum()) == 0:
            raise InvalidInputError(
                "the pixel score histogram is empty: no pixel was added, or every pixel lay outside the brain mask"
            )
        counts = _to_numpy(self._counts)
        return counts[0], counts[1]

    @property
    def negatives(self) -> np.ndarray:
        """Negative pixels per bin, int64 of shape (65536,), bins in ascending score order."""
        return self._numpy_counts()[0].copy()

    @property
    def positives(self) -> np.ndarray:
        """Positive pixels per bin, int64 of shape (65536,), bins in ascending score order."""
        return self._numpy_counts()[1].copy()

    @property
    def n_positive(self) -> int:
        """Number of positive (anomalous) pixels."""
        return 0 if self._counts is None else int(self._counts[1].sum())

    @property
    def n_pixels(self) -> int:
        """Number of pixels counted."""
        return 0 if self._counts is None else int(self._counts.sum())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return the histogram as arrays: ``negatives`` and ``positives`` (int64, per bin) and ``bin_values`` (float16)."""
        counts = _to_numpy(self._counts) if self._counts is not None else np.zeros((2, N_BINS), np.int64)
        return {"negatives": counts[0].copy(), "positives": counts[1].copy(), "bin_values": BIN_VALUES.astype(np.float16)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PixelScoreHistogram:
        """Rebuild a histogram from the output of :meth:`to_arrays`.

        Raises:
            InvalidInputError: If a key is missing, the counts are not 65,536
                non-negative integers, or the bins were stored in another order.
        """
        missing = {"negatives", "positives", "bin_values"} - set(arrays)
        if missing:
            raise InvalidInputError(f"histogram arrays are missing {sorted(missing)}; write them with PixelScoreHistogram.to_arrays")
        stored_bins = np.asarray(arrays["bin_values"])
        if stored_bins.shape != (N_BINS,) or stored_bins.dtype != np.float16 or not np.array_equal(
            stored_bins.view(np.uint16), BIN_VALUES.astype(np.float16).view(np.uint16)
        ):
            raise InvalidInputError("histogram bin_values do not match this version's float16 bin order; recompute the histogram")
        counts = np.stack([np.asarray(arrays["negatives"]), np.asarray(arrays["positives"])])
        if counts.shape != (2, N_BINS) or counts.dtype.kind not in "iu" or np.any(counts < 0):
            raise InvalidInputError(
                f"histogram counts must be two arrays of {N_BINS} non-negative integers, got shape {counts.shape} "
                f"and dtype {counts.dtype}"
            )
        histogram = cls()
        if counts.any():
            histogram._counts = counts.astype(np.int64)
        return histogram

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the histogram to an uncompressed ``.npz`` file, atomically."""
        write_arrays(path, **self.to_arrays())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PixelScoreHistogram:
        """Read a histogram written by :meth:`save`.

        Raises:
            InvalidInputError: If the file is missing, unreadable or not a histogram; the message names the file.
        """
        try:
            return cls.from_arrays(read_arrays(path))
        except InvalidInputError as error:
            raise InvalidInputError(f"{path}: {error}") from error

    def _descending_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the distinct score values (descending) and the TP and FP counts of ``score >= value``."""
        negatives, positives = self._numpy_counts()
        occupied = np.flatnonzero(negatives + positives)[::-1]
        return BIN_VALUES[occupied], np.cumsum(positives[occupied]), np.cumsum(negatives[occupied])

    def average_precision(self) -> float:
        """Return the average precision, equal to ``sklearn.metrics.average_precision_score``.

        AP = sum over distinct score values t, descending, of
        (R(t) - R(previous t)) * P(t), where P and R are the precision and recall
        of ``score >= t``. Tied pixels enter at the same threshold, as in
        scikit-learn. The arithmetic follows scikit-learn 1.9's order of
        operations, so the two results agree to the last bit in practice.

        Raises:
            InvalidInputError: If the histogram is empty.
        """
        _, true_positives, false_positives = self._descending_curve()
        if true_positives[-1] == 0:
            warnings.warn("average precision is undefined without positive pixels; returning NaN", UndefinedMetricWarning, stacklevel=2)
            return math.nan
        true_positives = true_positives.astype(np.float64)
        false_positives = false_positives.astype(np.float64)
        precision = np.concatenate([(true_positives / (true_positives + false_positives))[::-1], [1.0]])
        recall = np.concatenate([(true_positives / true_positives[-1])[::-1], [0.0]])
        return max(0.0, float(-np.sum(np.diff(recall) * precision[:-1])))

    def roc_auc(self) -> float:
        """Return the exact area under the ROC curve (ties counted as one half), ``sklearn.metrics.roc_auc_score``.

        Raises:
            InvalidInputError: If the histogram is empty.
        """
        negatives, positives = self._numpy_counts()
        return _auc_from_counts(negatives, positives)

    def threshold_at_fpr(self, max_fpr: float = DEFAULT_MAX_FPR) -> float:
        """Return the smallest score value t whose prediction ``score >= t`` has a false positive rate <= ``max_fpr``.

        FPR falls as t rises, so this t gives the largest TPR allowed. t is one
        of the scores present. All pixels tied at t are predicted positive and
        none is split off at random, so the FPR reached can lie below
        ``max_fpr``. This t equals the threshold of
        ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``
        at the last point with ``fpr <= max_fpr``. When even the highest score
        value gives an FPR above ``max_fpr``, that point is roc_curve's first,
        so the result is +inf and nothing is predicted positive.

        Args:
            max_fpr: Largest allowed false positive rate, in [0, 1].

        Returns:
            The threshold as a float; NaN with an UndefinedMetricWarning when
            there is no negative pixel.

        Raises:
            InvalidInputError: If ``max_fpr`` lies outside [0, 1] or the histogram is empty.
        """
        if not 0.0 <= max_fpr <= 1.0:
            raise InvalidInputError(f"max_fpr must lie in [0, 1], got {max_fpr!r}")
        thresholds, _, false_positives = self._descending_curve()
        if false_positives[-1] == 0:
            warnings.warn("the false positive rate is undefined without negative pixels; returning NaN", UndefinedMetricWarning, stacklevel=2)
            return math.nan
        n_within = int(np.count_nonzero(false_positives / false_positives[-1] <= max_fpr))
        return float(thresholds[n_within - 1]) if n_within else math.inf

    def confusion_at_threshold(self, threshold: float) -> ConfusionCounts:
        """Return the pixel counts of the prediction ``float16(score) >= threshold``.

        Raises:
            InvalidInputError: If ``threshold`` is NaN or the histogram is empty.
        """
        if math.isnan(threshold):
            raise InvalidInputError("threshold is NaN; pass a number (+inf predicts no pixel as anomalous)")
        negatives, positives = self._numpy_counts()
        predicted = BIN_VALUES >= threshold
        true_positives = int(positives[predicted].sum())
        false_positives = int(negatives[predicted].sum())
        return ConfusionCounts(
            true_positives=true_positives,
            false_positives=false_positives,
            false_negatives=int(positives.sum()) - true_positives,
            true_negatives=int(negatives.sum()) - false_positives,
        )

    def dice_at_threshold(self, threshold: float) -> float:
        """Return Dice of ``float16(score) >= threshold`` against the labels over all pixels (:attr:`ConfusionCounts.dice`).

        Raises:
            InvalidInputError: If ``threshold`` is NaN or the histogram is empty.
        """
        return self.confusion_at_threshold(threshold).dice


@dataclass(frozen=True)
class PixelMetrics:
    """Pixel-level results of one evaluated set.

    Attributes:
        average_precision: Pixel-AP over all pixels.
        roc_auc: Pixel AUROC.
        dice: Dice of ``score >= threshold`` over all pixels.
        threshold: Score threshold behind ``dice`` (float16 value, +inf or NaN).
        threshold_source: ``"same_set"`` when the threshold was taken from this
            set's own labels at ``max_fpr`` (the published protocol, which leaks
            the test labels), ``"given"`` when the caller passed it (for example
            the validation set's threshold).
        max_fpr: FPR target of a ``"same_set"`` threshold; None for ``"given"``.
        fpr: False positive rate reached at the threshold.
        tpr: True positive rate reached at the threshold.
        n_pixels: Pixels evaluated.
        n_positive: Anomalous pixels among them.
    """

    average_precision: float
    roc_auc: float
    dice: float
    threshold: float
    threshold_source: Literal["same_set", "given"]
    max_fpr: float | None
    fpr: float
    tpr: float
    n_pixels: int
    n_positive: int


def pixel_metrics(histogram: PixelScoreHistogram, max_fpr: float = DEFAULT_MAX_FPR, threshold: float | None = None) -> PixelMetrics:
    """Compute Pixel-AP, pixel AUROC and Dice at a false positive rate from one histogram.

    Args:
        histogram: All pixels of the evaluated set.
        max_fpr: FPR that sets the threshold when ``threshold`` is None.
        threshold: None takes the threshold from this histogram's own labels
            (the published protocol). A number, for example the validation set's
            :meth:`PixelScoreHistogram.threshold_at_fpr`, is used as given.

    Returns:
        The metrics. Dice, FPR and TPR are NaN when the threshold is NaN (no negative pixel).

    Raises:
        InvalidInputError: If the histogram is empty or ``max_fpr`` lies outside [0, 1].
    """
    if threshold is None:
        threshold, source, target_fpr = histogram.threshold_at_fpr(max_fpr), "same_set", max_fpr
    else:
        threshold, source, target_fpr = float(threshold), "given", None

    dice = fpr = tpr = math.nan
    if not math.isnan(threshold):
        counts = histogram.confusion_at_threshold(threshold)
        dice, fpr, tpr = counts.dice, counts.fpr, counts.tpr
    logger.debug("pixel metrics over %d pixels at threshold %r (%s)", histogram.n_pixels, threshold, source)

    return PixelMetrics(
        average_precision=histogram.average_precision(),
        roc_auc=histogram.roc_auc(),
        dice=dice,
        threshold=threshold,
        threshold_source=source,
        max_fpr=target_fpr,
        fpr=fpr,
        tpr=tpr,
        n_pixels=histogram.n_pixels,
        n_positive=histogram.n_positive,
    )


def image_score(anomaly_maps: Any, brain_masks: Any, top_fraction: float = DEFAULT_TOP_FRACTION) -> Any:
    """Score each slice by the mean of its ``top_fraction`` highest brain pixels.

    The count is ``k = max(1, ceil(top_fraction * n))`` for ``n`` brain pixels,
    with ``top_fraction * n`` rounded to 6 decimals first so that float error
    does not add a pixel. Maps are rounded to float16 (via float32) like every
    pixel metric and summed in float64. Each float16 is a multiple of 2**-24, so
    while the summed magnitudes stay below 2**29 the sum is exact, and NumPy and
    torch agree to the bit.

    Args:
        anomaly_maps: Shape (batch_size, ...) of any real dtype, NumPy or torch.
        brain_masks: Same shape, boolean or 0/1.
        top_fraction: Fraction of the brain pixels averaged, in (0, 1].

    Returns:
        float64 scores of shape (batch_size,), a NumPy array or a torch tensor
        on the maps' device. A slice with an empty brain mask scores NaN, with an
        UndefinedMetricWarning.

    Raises:
        InvalidInputError: If shapes differ, ``top_fraction`` is outside (0, 1],
            a mask contains values other than 0 and 1, or a brain pixel is NaN or
            not finite in float16.
    """
    # 1. Validate and flatten to (batch_size, pixels).
    anomaly_maps, brain_masks = _as_array(anomaly_maps), _as_array(brain_masks)
    if not 0.0 < top_fraction <= 1.0:
        raise InvalidInputError(f"top_fraction must lie in (0, 1], got {top_fraction!r}")
    _require_same_shape("brain masks", brain_masks, "anomaly maps", anomaly_maps)
    if len(anomaly_maps.shape) < 2:
        raise InvalidInputError(f"anomaly maps have shape {tuple(anomaly_maps.shape)}, expected (batch_size, height, width)")

    # 2. Round to float16 and push pixels outside the brain to -inf, below every brain pixel.
    if _is_tensor(anomaly_maps):
        torch = _torch_module()
        masks = _flatten_slices(_as_bool(torch.as_tensor(brain_masks, device=anomaly_maps.device), "masks"))
        maps = _flatten_slices(anomaly_maps.detach().to(torch.float32).to(torch.float16).to(torch.float64))
        finite = bool(torch.isfinite(maps[masks]).all())
        values = torch.where(masks, maps, -math.inf).sort(dim=1, descending=True).values
    else:
        masks = _flatten_slices(_as_bool(_to_numpy(brain_masks), "masks"))
        with np.errstate(over="ignore", invalid="ignore"):
            maps = _flatten_slices(anomaly_maps.astype(np.float32).astype(np.float16).astype(np.float64))
        finite = bool(np.isfinite(maps[masks]).all())
        values = -np.sort(-np.where(masks, maps, -np.inf), axis=1)
    if not finite:
        raise InvalidInputError(
            "anomaly maps contain NaN or infinite brain pixels after rounding to float16 (|value| >= 65520); "
            "check the model output and rescale the maps"
        )

    # 3. Mean of the k highest values per slice, from a running sum over the descending values.
    n_brain = masks.sum(1)
    scaled = top_fraction * n_brain.astype(np.float64) if isinstance(n_brain, np.ndarray) else top_fraction * n_brain.double()
    if _is_tensor(values):
        top_count = torch.clamp(torch.ceil(torch.round(scaled, decimals=_COUNT_DECIMALS)), min=1).to(torch.int64)
        top_sum = values.cumsum(1).gather(1, (top_count - 1)[:, None])[:, 0]
    else:
        top_count = np.maximum(1, np.ceil(np.round(scaled, _COUNT_DECIMALS))).astype(np.int64)
        top_sum = np.take_along_axis(values.cumsum(1), (top_count - 1)[:, None], axis=1)[:, 0]
    scores = top_sum / top_count

    # 4. Empty brain masks have no score.
    empty = n_brain == 0
    if bool(empty.any()):
        warnings.warn(f"{int(empty.sum())} slices have an empty brain mask; their image score is NaN", UndefinedMetricWarning, stacklevel=2)
        scores[empty] = math.nan
    return scores


def image_labels(label_maps: Any) -> np.ndarray:
    """Return per-slice labels: True where a slice has at least one anomalous pixel.

    Args:
        label_maps: Shape (batch_size, ...), boolean or 0/1, NumPy or torch.

    Returns:
        Boolean NumPy array of shape (batch_size,).

    Raises:
        InvalidInputError: If the labels contain values other than 0 and 1.
    """
    labels = _as_bool(_to_numpy(label_maps), "labels")
    return _flatten_slices(labels).any(axis=1)


def image_auroc(scores: Any, labels: Any) -> float:
    """Return the image-level AUROC, equal to ``sklearn.metrics.roc_auc_score`` (ties count one half).

    Image scores are not rounded to float16: there are few of them.

    Args:
        scores: Per-slice scores of shape (batch_size,), NumPy or torch.
        labels: Per-slice labels of shape (batch_size,), or label maps of shape
            (batch_size, ...) reduced with :func:`image_labels`.

    Returns:
        The AUROC; NaN with an UndefinedMetricWarning when all slices share one label.

    Raises:
        InvalidInputError: If the lengths differ, a score is NaN or infinite
            (slices with empty brain masks score NaN, so drop them first), or the
            labels contain values other than 0 and 1.
    """
    scores = _to_numpy(scores).astype(np.float64).reshape(-1)
    labels = _to_numpy(labels)
    labels = image_labels(labels) if labels.ndim > 1 else _as_bool(labels, "labels")
    if labels.shape != scores.shape:
        raise InvalidInputError(f"got {scores.size} image scores but {labels.size} image labels; pass one label per slice")
    if not np.all(np.isfinite(scores)):
        raise InvalidInputError(
            f"{int(np.sum(~np.isfinite(scores)))} image scores are NaN or infinite; "
            "slices with empty brain masks score NaN, so remove them before computing the AUROC"
        )
    _, value_index = np.unique(scores, return_inverse=True)
    positives = np.bincount(value_index[labels], minlength=value_index.max(initial=-1) + 1)
    negatives = np.bincount(value_index[~labels], minlength=positives.size)
    return _auc_from_counts(negatives, positives)


def per_volume_dice(predictions: Any, labels: Any, subject_ids: Sequence[Hashable], empty_dice: float = EMPTY_DICE) -> dict[Hashable, float]:
    """Return Dice per subject, pooling all slices of a subject's volume.

    Args:
        predictions: Binary predictions of shape (n_slices, ...), boolean or 0/1, NumPy or torch.
        labels: Ground truth of the same shape.
        subject_ids: Subject of each slice, length n_slices.
        empty_dice: Dice of a volume with neither lesion nor prediction. The
            default 1.0 counts it as perfect agreement; pass NaN to leave such
            volumes out of a later ``np.nanmean``.

    Returns:
        Subject id to Dice, in sorted subject order.

    Raises:
        InvalidInputError: If shapes or lengths differ, or the arrays contain values other than 0 and 1.
    """
    # 1. Per-slice counts, reduced where the arrays live.
    predictions, labels = _as_array(predictions), _as_array(labels)
    _require_same_shape("labels", labels, "predictions", predictions)
    if len(subject_ids) != predictions.shape[0]:
        raise InvalidInputError(f"got {len(subject_ids)} subject ids for {predictions.shape[0]} slices; pass one id per slice")
    if _is_tensor(predictions):
        labels = _torch_module().as_tensor(labels, device=predictions.device)
    else:
        labels = _to_numpy(labels)
    predictions = _flatten_slices(_as_bool(predictions, "predictions"))
    labels = _flatten_slices(_as_bool(labels, "labels"))
    per_slice = [_to_numpy(counts.sum(1)).astype(np.int64) for counts in ((predictions & labels), predictions, labels)]

    # 2. Pool the slices of each subject.
    subjects, subject_index = np.unique(np.asarray(subject_ids), return_inverse=True)
    overlap, predicted, labelled = (np.zeros(subjects.size, np.int64) for _ in range(3))
    for total, counts in zip((overlap, predicted, labelled), per_slice):
        np.add.at(total, subject_index, counts)

    denominator = predicted + labelled
    return {
        subject.item(): (2 * int(common) / int(size) if size else empty_dice)
        for subject, common, size in zip(subjects, overlap, denominator)
    }


def random_scores(shape: int | tuple[int, ...], seed: int) -> np.ndarray:
    """Return uniform float32 scores in [0, 1) from NumPy's default generator: the "Random" floor of the benchmark.

    Such maps give Pixel-AP close to the anomalous fraction of pixels and AUROC close to 0.5.

    Raises:
        InvalidInputError: If ``seed`` is not a non-negative integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(seed).random(shape, dtype=np.float32)
