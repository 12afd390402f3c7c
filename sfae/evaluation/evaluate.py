"""Evaluation of one trained method on the val and test splits of an experiment.

The method predicts anomaly maps batch by batch. No map is kept beyond its
batch: the pixel metrics come from float16 score histograms
(:class:`~sfae.evaluation.metrics.PixelScoreHistogram`), so memory does not
grow with the number of pixels, and every value equals what scikit-learn
returns for the full arrays of float16-rounded brain pixels.

Protocol (Meissen et al., "Unsupervised Anomaly Localization with Structural
Feature-Autoencoders", 2022), with the additions this package makes:

* Only pixels inside the brain mask count. Pixels outside it never enter a
  pixel metric, an image score or a per-volume Dice, whatever their map value
  or label.
* Pixel-AP, pixel AUROC and Dice at 5 % FPR over all brain pixels of the test
  split. The published Dice takes the 5 % FPR threshold from the test labels
  (``dice_at_fpr_test_threshold``), which leaks test information. The same
  Dice at the threshold chosen on the validation split is reported beside it
  (``dice_at_fpr_val_threshold``).
* Image-AUROC: a slice is abnormal when one of its brain pixels is anomalous.
  Its score is the method's own image score when it returns one, else the mean
  of its top 10 % brain pixels. Slices with an empty brain mask are left out
  of the image-level metrics for every method alike.
* Per-volume Dice of every test subject at both thresholds. Its mean is taken
  over the subjects with at least one anomalous brain pixel: the Dice of a
  lesion-free volume is 1.0 when nothing is predicted and 0.0 otherwise, so it
  measures false positives, not localization. Such volumes are still listed.
* Undefined metrics (no anomalous or no normal pixel, for example) are NaN
  with an :class:`~sfae.evaluation.metrics.UndefinedMetricWarning`, as in
  :mod:`sfae.evaluation.metrics`, and are written to JSON as null with a note.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from sfae.evaluation.metrics import (
    BIN_VALUES,
    DEFAULT_MAX_FPR,
    DEFAULT_TOP_FRACTION,
    N_BINS,
    ConfusionCounts,
    PixelScoreHistogram,
    UndefinedMetricWarning,
    image_auroc,
    image_score,
    pixel_metrics,
)
from sfae.io import InvalidInputError, read_arrays, write_arrays, write_json
from sfae.models.base import AnomalyMethod
from sfae.splits import SLICE_KEYS

logger = logging.getLogger(__name__)

# Number of abnormal test slices shown in the qualitative figure.
DEFAULT_EXAMPLES = 4
# Slices per forward pass; the training batch size of the protocol.
DEFAULT_BATCH_SIZE = 64
# Per-subject histogram counts are int32; one volume has far fewer brain pixels.
_MAX_SUBJECT_PIXELS = np.iinfo(np.int32).max


def protocol_description(max_fpr: float, top_fraction: float) -> dict[str, str]:
    """Return one line per key of a metrics file's ``metrics`` section, saying what it measures."""
    fpr = f"{100 * max_fpr:g} %"
    return {
        "pixel_ap": "Average precision over all brain pixels of the test split (maps rounded to float16).",
        "pixel_auroc": "Area under the ROC curve over all brain pixels of the test split.",
        "dice_at_fpr_test_threshold": (
            f"Dice over all test brain pixels, binarized at the {fpr} FPR threshold of the test split itself; "
            "the published protocol, which uses the test labels to choose the threshold."
        ),
        "dice_at_fpr_val_threshold": (
            f"Dice over all test brain pixels, binarized at the {fpr} FPR threshold of the validation split; "
            "no test label is used."
        ),
        "fpr_at_test_threshold": "Pixel false positive rate on the test split at the test threshold.",
        "tpr_at_test_threshold": "Pixel true positive rate on the test split at the test threshold.",
        "fpr_at_val_threshold": "Pixel false positive rate on the test split at the validation threshold.",
        "tpr_at_val_threshold": "Pixel true positive rate on the test split at the validation threshold.",
        "image_auroc": (
            "AUROC of the slice scores on the test split; a slice with an anomalous brain pixel is abnormal. "
            f"Scores are the method's own or the mean of the top {100 * top_fraction:g} % brain pixels."
        ),
        "mean_volume_dice_test_threshold": (
            "Mean per-subject Dice at the test threshold, over test subjects with anomalous brain pixels."
        ),
        "mean_volume_dice_val_threshold": (
            "Mean per-subject Dice at the validation threshold, over test subjects with anomalous brain pixels."
        ),
        "val_pixel_ap": "Average precision over all brain pixels of the validation split.",
        "val_pixel_auroc": "Area under the ROC curve over all brain pixels of the validation split.",
        "val_dice_at_fpr": f"Dice over the validation brain pixels at the validation split's {fpr} FPR threshold.",
        "val_image_auroc": "Image-AUROC on the validation split.",
    }


def load_split(path: str | os.PathLike[str], split: str) -> dict[str, np.ndarray]:
    """Read a split file and check the arrays that the evaluation uses.

    Args:
        path: ``.npz`` with ``images`` float (n, height, width) in [0, 1],
            ``masks`` and ``labels`` bool of the same shape, ``slice_index``
            integer (n,) and ``subject`` unicode (n,). Anomaly keys may be present
            and are not used.
        split: Split name, for messages.

    Returns:
        The five arrays.

    Raises:
        InvalidInputError: If the file is missing, unreadable, empty, or an
            array is absent or of the wrong shape or dtype. The message names the file.
    """
    arrays = read_arrays(path)
    missing = [key for key in SLICE_KEYS if key not in arrays]
    if missing:
        raise InvalidInputError(f"{split} split file {path} lacks {missing}; rerun the workflow rule that writes it")
    images = arrays["images"]
    if images.ndim != 3 or not np.issubdtype(images.dtype, np.floating):
        raise InvalidInputError(
            f"{split} split file {path}: images must be float (n, height, width), got shape {images.shape} and dtype {images.dtype}"
        )
    if images.shape[0] == 0:
        raise InvalidInputError(f"{split} split file {path} contains no slice; give the {split} split at least one subject")
    for key in ("masks", "labels"):
        if arrays[key].shape != images.shape or arrays[key].dtype != bool:
            raise InvalidInputError(
                f"{split} split file {path}: {key} must be bool of shape {images.shape}, "
                f"got shape {arrays[key].shape} and dtype {arrays[key].dtype}"
            )
    for key in ("slice_index", "subject"):
        if arrays[key].shape != images.shape[:1]:
            raise InvalidInputError(f"{split} split file {path}: {key} must have shape ({images.shape[0]},), got {arrays[key].shape}")
    return {key: arrays[key] for key in SLICE_KEYS}


def select_examples(split: Mapping[str, np.ndarray], count: int) -> np.ndarray:
    """Pick the slices of the qualitative figure from the labels alone, so every method and seed shows the same ones.

    Abnormal slices (an anomalous brain pixel) are grouped by subject. With at
    least ``count`` such subjects, ``count`` of them evenly spaced in sorted
    order each give their slice with the largest lesion. With fewer, the
    subjects take turns giving their largest, then second largest lesion, and
    so on. Ties go to the lower slice index. Without abnormal slices, evenly
    spaced slices of the whole split are taken, with a warning.

    Args:
        split: Arrays of :func:`load_split`.
        count: Number of slices wanted.

    Returns:
        int64 positions in the split, sorted by (subject, slice_index); fewer
        than ``count`` when the split has fewer candidates.
    """
    lesion_pixels = (split["labels"] & split["masks"]).reshape(len(split["labels"]), -1).sum(1)
    subjects, slice_index = split["subject"], split["slice_index"]
    abnormal = np.flatnonzero(lesion_pixels > 0)
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if abnormal.size == 0:
        warnings.warn("the test split has no abnormal slice; the example slices are evenly spaced normal slices", UserWarning, stacklevel=2)
        ordered = np.lexsort((slice_index, subjects))
        picks = np.unique(np.round(np.linspace(0, ordered.size - 1, min(count, ordered.size))).astype(np.int64))
        return np.sort(ordered[picks])

    # Per subject, its abnormal slices from the largest lesion down.
    by_subject: dict[str, list[int]] = {}
    for position in abnormal[np.lexsort((slice_index[abnormal], -lesion_pixels[abnormal]))]:
        by_subject.setdefault(str(subjects[position]), []).append(int(position))
    names = sorted(by_subject)
    if len(names) >= count:
        chosen = [names[i] for i in np.round(np.linspace(0, len(names) - 1, count)).astype(np.int64)]
        picks = [by_subject[name][0] for name in chosen]
    else:
        picks = []
        for rank in range(max(len(slices) for slices in by_subject.values())):
            picks.extend(by_subject[name][rank] for name in names if rank < len(by_subject[name]))
        picks = picks[:count]
    picks = np.asarray(picks, dtype=np.int64)
    return picks[np.lexsort((slice_index[picks], subjects[picks]))]


def _predict_batches(
    method: AnomalyMethod, split: Mapping[str, np.ndarray], *, method_name: str, split_name: str, batch_size: int,
    device: torch.device, top_fraction: float,
) -> Iterator[tuple[slice, Tensor, Tensor, Tensor, np.ndarray, str]]:
    """Yield ``(rows, maps, labels, masks, image_scores, score_source)`` per batch.

    Maps, labels and masks are (batch, 1, H, W) on ``device``; ``score_source``
    is ``"method"`` or ``"top_fraction_mean"``.

    Raises:
        InvalidInputError: If the method returns maps or scores of the wrong
            shape, or NaN or infinite image scores; the message names the method.
    """
    count = len(split["images"])
    for start in tqdm(range(0, count, batch_size), desc=f"{method_name} on {split_name}", unit="batch", disable=None):
        rows = slice(start, min(start + batch_size, count))
        images = torch.from_numpy(np.ascontiguousarray(split["images"][rows], dtype=np.float32))[:, None].to(device)
        masks = torch.from_numpy(np.ascontiguousarray(split["masks"][rows]))[:, None].to(device)
        labels = torch.from_numpy(np.ascontiguousarray(split["labels"][rows]))[:, None].to(device)

        # Methods decide about autograd themselves: some need input gradients.
        slice_index = torch.from_numpy(np.ascontiguousarray(split["slice_index"][rows], dtype=np.int64)).to(device)
        prediction = method.predict(images, masks, slice_index=slice_index)
        maps = prediction.maps.detach()
        where = f"method {method_name} on the {split_name} split (slices {rows.start} to {rows.stop - 1})"
        if tuple(maps.shape) != tuple(images.shape):
            raise InvalidInputError(f"{where} returned maps of shape {tuple(maps.shape)}, expected {tuple(images.shape)}")

        if prediction.scores is None:
            source = "top_fraction_mean"
            with warnings.catch_warnings():
                # Slices with an empty brain mask score NaN; they are left out of the image metrics later.
                warnings.simplefilter("ignore", UndefinedMetricWarning)
                try:
                    scores = image_score(maps, masks, top_fraction).cpu().numpy()
                except InvalidInputError as error:
                    raise InvalidInputError(f"{where}: {error}") from error
        else:
            source = "method"
            scores = prediction.scores.detach().to(torch.float64).cpu().numpy()
            if scores.shape != (images.shape[0],):
                raise InvalidInputError(f"{where} returned image scores of shape {scores.shape}, expected ({images.shape[0]},)")
            if not np.all(np.isfinite(scores)):
                raise InvalidInputError(f"{where} returned NaN or infinite image scores; check the model output")
        yield rows, maps, labels, masks, scores, source


def _add_pixels(histogram: PixelScoreHistogram, maps: Tensor, labels: Tensor, masks: Tensor, where: str) -> None:
    """Add brain pixels to a histogram; invalid maps raise an error that names the method and the slices."""
    try:
        histogram.update(maps, labels, mask=masks)
    except InvalidInputError as error:
        raise InvalidInputError(f"{where}: {error}") from error


def _record(notes: list[str], name: str, function: Callable[..., Any], *args: Any) -> Any:
    """Call ``function``; each UndefinedMetricWarning it raises becomes a note on ``name`` and a log warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UndefinedMetricWarning)
        value = function(*args)
    for warning in caught:
        if issubclass(warning.category, UndefinedMetricWarning):
            notes.append(f"{name}: {warning.message}")
            logger.warning("%s: %s", name, warning.message)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return value


def _image_metrics(scores: np.ndarray, split: Mapping[str, np.ndarray], split_name: str, notes: list[str]) -> tuple[float, dict[str, int]]:
    """Return the image AUROC of a split and its slice counts; slices without brain are left out."""
    in_brain_labels = (split["labels"] & split["masks"]).reshape(len(scores), -1).any(1)
    has_brain = split["masks"].reshape(len(scores), -1).any(1)
    without_brain = int(np.count_nonzero(~has_brain))
    if without_brain:
        notes.append(f"{split_name}: {without_brain} slices with an empty brain mask are left out of the image-level metrics")
    if not has_brain.any():
        notes.append(f"{split_name}_image_auroc: no slice contains brain")
        auroc = math.nan
    else:
        auroc = _record(notes, f"{split_name}_image_auroc", image_auroc, scores[has_brain], in_brain_labels[has_brain])
    counts = {
        "slices": len(scores),
        "abnormal_slices": int(np.count_nonzero(in_brain_labels)),
        "slices_without_brain": without_brain,
    }
    return auroc, counts


def _pixel_counts(histogram: PixelScoreHistogram, split: Mapping[str, np.ndarray]) -> dict[str, int]:
    labels, masks = split["labels"], split["masks"]
    return {
        "brain_pixels": histogram.n_pixels,
        "anomalous_pixels": histogram.n_positive,
        "anomalous_pixels_outside_brain": int(np.count_nonzero(labels & ~masks)),
    }


def _test_pass(
    method: AnomalyMethod, test: Mapping[str, np.ndarray], test_path: str | os.PathLike[str], example_index: np.ndarray,
    score_sources: set[str], options: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Predict the test split once and keep one float16 histogram per subject, the slice scores and the example maps.

    The test threshold is known only after the whole pass, so the per-volume
    Dice at it needs each subject's full histogram. Each is (2, 65536) int32,
    512 KiB: 144 MOOD test volumes take 72 MiB, 335 BraTS test volumes 168 MiB,
    whatever the number of slices. A second pass would cost a second inference
    and would change the maps of stochastic methods.

    Returns:
        Sorted subject ids (n_subjects,), histograms (n_subjects, 2, 65536)
        int32 in ascending score order (negatives, positives), brain pixels per
        subject (n_subjects,) int64, slice scores (n_slices,) float64 and
        example maps (k, H, W) float32.

    Raises:
        InvalidInputError: As :func:`_predict_batches`, or when a map's brain
            pixel is NaN or beyond float16's range.
    """
    name, device = options["method_name"], options["device"]
    subjects, subject_of_slice = np.unique(test["subject"], return_inverse=True)
    subject_counts = np.zeros((subjects.size, 2, N_BINS), dtype=np.int32)
    subject_pixels = np.zeros(subjects.size, dtype=np.int64)
    scores_out = np.empty(len(test["images"]), dtype=np.float64)
    example_maps = np.zeros((example_index.size, *test["images"].shape[1:]), dtype=np.float32)

    for rows, maps, labels, masks, scores, source in _predict_batches(method, test, split_name="test", **options):
        score_sources.add(source)
        scores_out[rows] = scores
        batch_subjects = subject_of_slice[rows]
        for subject in np.unique(batch_subjects):
            members = torch.from_numpy(np.flatnonzero(batch_subjects == subject)).to(device)
            histogram = PixelScoreHistogram()
            _add_pixels(histogram, maps[members], labels[members], masks[members], f"method {name} on the test split {test_path}")
            subject_pixels[subject] += histogram.n_pixels
            if subject_pixels[subject] > _MAX_SUBJECT_PIXELS:
                raise InvalidInputError(
                    f"test subject {subjects[subject]} of {test_path} has more than {_MAX_SUBJECT_PIXELS} brain pixels, "
                    "beyond the int32 histogram counts; split the volume into several subject ids"
                )
            arrays = histogram.to_arrays()
            subject_counts[subject, 0] += arrays["negatives"].astype(np.int32)
            subject_counts[subject, 1] += arrays["positives"].astype(np.int32)
        in_batch = (example_index >= rows.start) & (example_index < rows.stop)
        if in_batch.any():
            picked = torch.from_numpy(example_index[in_batch] - rows.start).to(device)
            example_maps[in_batch] = maps[picked, 0].float().cpu().numpy()
    return subjects, subject_counts, subject_pixels, scores_out, example_maps


def _volume_dice(subject_counts: np.ndarray, threshold: float) -> np.ndarray:
    """Return the Dice of ``float16(score) >= threshold`` per subject from per-subject histograms (n_subjects, 2, 65536)."""
    predicted = BIN_VALUES >= threshold
    negatives_above = subject_counts[:, 0, predicted].sum(1, dtype=np.int64)
    positives_above = subject_counts[:, 1, predicted].sum(1, dtype=np.int64)
    positives = subject_counts[:, 1].sum(1, dtype=np.int64)
    negatives = subject_counts[:, 0].sum(1, dtype=np.int64)
    dice = np.array([
        ConfusionCounts(int(tp), int(fp), int(p - tp), int(n - fp)).dice
        for tp, fp, p, n in zip(positives_above, negatives_above, positives, negatives)
    ])
    return dice


def evaluate_method(
    method: AnomalyMethod,
    val_path: str | os.PathLike[str],
    test_path: str | os.PathLike[str],
    *,
    max_fpr: float = DEFAULT_MAX_FPR,
    top_fraction: float = DEFAULT_TOP_FRACTION,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    examples: int = DEFAULT_EXAMPLES,
    method_name: str | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluate a trained method on the validation and test splits.

    Args:
        method: The trained method; it is moved to ``device`` and put in eval mode.
        val_path: Validation split file (:func:`load_split`); chooses the validation threshold.
        test_path: Test split file.
        max_fpr: Pixel false positive rate that sets both thresholds (5 % in the protocol).
        top_fraction: Fraction of brain pixels averaged into an image score
            when the method returns none (10 % in the reference code).
        batch_size: Slices per forward pass.
        device: Torch device; None takes CUDA when available, else the CPU.
        examples: Number of test slices kept for the qualitative figure (:func:`select_examples`).
        method_name: Name for messages and progress bars; the registry name by default.

    Returns:
        ``(results, example_arrays)``. ``results`` contains:

        * ``metrics``: the keys of :func:`protocol_description`, NaN where undefined.
        * ``thresholds``: ``test`` and ``val`` as float16 score values, +inf
          when no score value reaches the FPR and NaN without normal pixels,
          and ``max_fpr``.
        * ``counts``: per split, slices, abnormal slices, slices without
          brain, subjects, brain pixels, anomalous pixels and anomalous pixels
          outside the brain (ignored).
        * ``per_volume_dice``: per test subject, ``dice_test_threshold``,
          ``dice_val_threshold``, ``anomalous_pixels`` and ``brain_pixels``.
        * ``notes``, ``settings``, ``device`` and ``seconds``.

        ``example_arrays`` contains ``index`` int64 (k,), ``images`` float32
        (k, H, W), ``masks`` and ``labels`` bool (k, H, W), ``maps`` float32
        (k, H, W) as returned by the method, ``image_scores`` float64 (k,),
        ``subject`` unicode (k,), ``slice_index`` (k,), and the 0-d float64
        ``val_threshold`` and ``test_threshold``.

    Raises:
        InvalidInputError: If a split file is invalid, the method returns maps
            or scores of the wrong shape, or a brain pixel of a map is NaN or
            beyond float16's range (``|value| >= 65520``); such maps are not
            clipped, because clipping would tie every large score. The message
            names the method.
    """
    started = time.perf_counter()
    name = method_name or method.name
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    method.to(device)
    method.eval()
    notes: list[str] = []
    options = {"method_name": name, "batch_size": batch_size, "device": device, "top_fraction": top_fraction}

    # 1. Validation split: one histogram and the slice scores; it sets the validation threshold.
    val = load_split(val_path, "val")
    val_histogram = PixelScoreHistogram()
    val_scores = np.empty(len(val["images"]), dtype=np.float64)
    score_sources = set()
    for rows, maps, labels, masks, scores, source in _predict_batches(method, val, split_name="val", **options):
        score_sources.add(source)
        _add_pixels(val_histogram, maps, labels, masks, f"method {name} on the val split {val_path}")
        val_scores[rows] = scores
    if val_histogram.n_pixels == 0:
        raise InvalidInputError(f"val split file {val_path} has no brain pixel; check its brain masks")
    val_pixels = _record(notes, "val_pixel_metrics", pixel_metrics, val_histogram, max_fpr)
    val_auroc, val_counts = _image_metrics(val_scores, val, "val", notes)

    # 2. Test split: per-subject histograms, the slice scores and the example maps.
    test = load_split(test_path, "test")
    example_index = select_examples(test, examples)
    subjects, subject_counts, subject_pixels, test_scores, example_maps = _test_pass(
        method, test, test_path, example_index, score_sources, options
    )
    test_histogram = PixelScoreHistogram.from_arrays({
        "negatives": subject_counts[:, 0].sum(0, dtype=np.int64),
        "positives": subject_counts[:, 1].sum(0, dtype=np.int64),
        "bin_values": BIN_VALUES.astype(np.float16),
    })
    if test_histogram.n_pixels == 0:
        raise InvalidInputError(f"test split file {test_path} has no brain pixel; check its brain masks")

    # 3. Test metrics at the test threshold (published) and at the validation threshold.
    at_test = _record(notes, "test_pixel_metrics", pixel_metrics, test_histogram, max_fpr)
    val_threshold = val_pixels.threshold
    if math.isnan(val_threshold):
        at_val = None
        notes.append("dice_at_fpr_val_threshold: the validation threshold is undefined (no normal validation pixel)")
    else:
        at_val = _record(notes, "test_pixel_metrics_at_val_threshold", pixel_metrics, test_histogram, max_fpr, val_threshold)
    test_auroc, test_counts = _image_metrics(test_scores, test, "test", notes)

    # 4. Per-volume Dice at both thresholds, from the per-subject histograms.
    subject_positives = subject_counts[:, 1].sum(1, dtype=np.int64)
    with_lesion = subject_positives > 0
    if not with_lesion.any():
        notes.append("mean_volume_dice: no test subject has an anomalous brain pixel")
    per_volume: dict[str, dict[str, Any]] = {
        str(subject): {"anomalous_pixels": int(positives), "brain_pixels": int(pixels)}
        for subject, positives, pixels in zip(subjects, subject_positives, subject_pixels)
    }
    volume_means = {}
    for key, threshold in (("test_threshold", at_test.threshold), ("val_threshold", val_threshold)):
        dice = np.full(subjects.size, math.nan) if math.isnan(threshold) else _volume_dice(subject_counts, threshold)
        for subject, value in zip(subjects, dice):
            per_volume[str(subject)][f"dice_{key}"] = float(value)
        volume_means[key] = float(np.mean(dice[with_lesion])) if with_lesion.any() else math.nan

    metrics = {
        "pixel_ap": at_test.average_precision,
        "pixel_auroc": at_test.roc_auc,
        "dice_at_fpr_test_threshold": at_test.dice,
        "dice_at_fpr_val_threshold": at_val.dice if at_val else math.nan,
        "fpr_at_test_threshold": at_test.fpr,
        "tpr_at_test_threshold": at_test.tpr,
        "fpr_at_val_threshold": at_val.fpr if at_val else math.nan,
        "tpr_at_val_threshold": at_val.tpr if at_val else math.nan,
        "image_auroc": test_auroc,
        "mean_volume_dice_test_threshold": volume_means["test_threshold"],
        "mean_volume_dice_val_threshold": volume_means["val_threshold"],
        "val_pixel_ap": val_pixels.average_precision,
        "val_pixel_auroc": val_pixels.roc_auc,
        "val_dice_at_fpr": val_pixels.dice,
        "val_image_auroc": val_auroc,
    }
    results = {
        "metrics": metrics,
        "thresholds": {"test": at_test.threshold, "val": val_threshold, "max_fpr": max_fpr},
        "counts": {
            "test": {**test_counts, "subjects": int(subjects.size), **_pixel_counts(test_histogram, test)},
            "val": {**val_counts, "subjects": int(np.unique(val["subject"]).size), **_pixel_counts(val_histogram, val)},
        },
        "per_volume_dice": per_volume,
        "notes": notes,
        "settings": {"max_fpr": max_fpr, "top_fraction": top_fraction, "batch_size": batch_size,
                     "image_scores": " and ".join(sorted(score_sources))},
        "device": str(device),
        "seconds": time.perf_counter() - started,
    }
    example_arrays = {
        "index": example_index,
        "images": test["images"][example_index].astype(np.float32),
        "masks": test["masks"][example_index],
        "labels": test["labels"][example_index],
        "maps": example_maps,
        "image_scores": test_scores[example_index],
        "subject": test["subject"][example_index],
        "slice_index": test["slice_index"][example_index],
        "val_threshold": np.float64(val_threshold),
        "test_threshold": np.float64(at_test.threshold),
    }
    logger.info(
        "%s: pixel AP %.4f, Dice %.4f (test threshold) / %.4f (val threshold), image AUROC %.4f in %.1f s",
        name, metrics["pixel_ap"], metrics["dice_at_fpr_test_threshold"], metrics["dice_at_fpr_val_threshold"],
        metrics["image_auroc"], results["seconds"],
    )
    return results, example_arrays


def _json_value(value: Any) -> Any:
    """Return ``value`` with NaN and infinity as None and NumPy scalars, paths and tuples as JSON types."""
    if isinstance(value, Mapping):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _threshold_notes(thresholds: Mapping[str, float], max_fpr: float) -> list[str]:
    notes = []
    for split, value in thresholds.items():
        if split != "max_fpr" and math.isinf(value):
            notes.append(
                f"thresholds.{split} is +inf (written as null): even the highest score value has a pixel FPR above "
                f"{max_fpr:g} on the {split} split, so no pixel is predicted anomalous at it"
            )
    return notes


def evaluate_files(
    method: AnomalyMethod,
    val_path: str | os.PathLike[str],
    test_path: str | os.PathLike[str],
    metrics_out: str | os.PathLike[str],
    examples_out: str | os.PathLike[str],
    *,
    experiment: str,
    method_name: str,
    seed: int,
    data_note: str | None,
    max_fpr: float = DEFAULT_MAX_FPR,
    top_fraction: float = DEFAULT_TOP_FRACTION,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    examples: int = DEFAULT_EXAMPLES,
) -> dict[str, Any]:
    """Evaluate a trained method (:func:`evaluate_method`) and write its metrics file and example file, atomically.

    Args:
        method: The trained method, for example from ``sfae.training.load_trained_method``.
        val_path: Validation split file.
        test_path: Test split file.
        metrics_out: JSON file to write.
        examples_out: ``.npz`` file of the example slices to write.
        experiment: Experiment name from the config.
        method_name: Method name from the config (may differ from the registry name, for example in an ablation).
        seed: Training seed of the run.
        data_note: Caveat every report of these data must state (for example
            :data:`sfae.demo_data.DEMO_DATA_NOTE`), or None.
        max_fpr: As in :func:`evaluate_method`.
        top_fraction: As in :func:`evaluate_method`.
        batch_size: As in :func:`evaluate_method`.
        device: As in :func:`evaluate_method`.
        examples: As in :func:`evaluate_method`.

    Returns:
        The record written to ``metrics_out``: ``experiment``, ``method``,
        ``seed``, ``description`` (the method's ``describe()``, for example its
        extractor weights), ``data_note``, ``val_split``, ``test_split``,
        ``metrics``, ``thresholds`` (``test``, ``val``, ``max_fpr``),
        ``counts``, ``per_volume_dice``, ``settings``, ``device``, ``seconds``,
        ``protocol`` (one line per metric) and ``notes``. NaN and infinite
        values are written as null, each with a note.

    Raises:
        InvalidInputError: As :func:`evaluate_method`. Nothing is written then.
    """
    # 1. Evaluate.
    results, example_arrays = evaluate_method(
        method, val_path, test_path, max_fpr=max_fpr, top_fraction=top_fraction, batch_size=batch_size,
        device=device, examples=examples, method_name=method_name,
    )

    # 2. Give every value that JSON cannot hold a note, and assemble the record.
    notes = list(results["notes"]) + _threshold_notes(results["thresholds"], max_fpr)
    undefined = [key for key, value in results["metrics"].items() if not math.isfinite(value)]
    if undefined:
        notes.append(f"undefined for these data and written as null: {', '.join(undefined)}")
    record = {
        "experiment": experiment,
        "method": method_name,
        "seed": seed,
        "description": _json_value(method.describe()),
        "data_note": data_note,
        "val_split": str(val_path),
        "test_split": str(test_path),
        "metrics": _json_value(results["metrics"]),
        "thresholds": _json_value(results["thresholds"]),
        "counts": _json_value(results["counts"]),
        "per_volume_dice": _json_value(results["per_volume_dice"]),
        "settings": _json_value(results["settings"]),
        "device": results["device"],
        "seconds": results["seconds"],
        "protocol": protocol_description(max_fpr, top_fraction),
        "notes": notes,
    }

    # 3. Write the example slices first, so a complete metrics file implies complete examples.
    write_arrays(
        examples_out,
        **example_arrays,
        experiment=np.array(experiment),
        method=np.array(method_name),
        seed=np.array(seed, dtype=np.int64),
    )
    write_json(record, metrics_out)
    logger.info("wrote %s and %s", metrics_out, examples_out)
    return record
