"""Figures of an experiment: grouped metric bars over methods, and example slices with every method's anomaly map.

Figures are drawn on matplotlib's Agg canvas through the object-oriented
``Figure`` API, so no display and no global pyplot state is involved, and are
written atomically as PNG.
"""

from __future__ import annotations

import logging
import math
import os
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from sfae.io import atomic_output

logger = logging.getLogger(__name__)

DPI = 150
# Line width of titles in characters, so long data notes wrap instead of running off the figure.
TITLE_WIDTH = 140
PREDICTION_COLOR = (1.0, 0.15, 0.1)
LABEL_CONTOUR_COLOR = "lime"
MAP_COLORMAP = "inferno"


def method_colors(methods: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """Return one colour per method, by position, so a method keeps its colour in every figure of an experiment."""
    palette = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {method: palette(index % palette.N) for index, method in enumerate(methods)}


def _save(figure: Figure, path: str | os.PathLike[str]) -> None:
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI, bbox_inches="tight")
    logger.info("wrote %s", path)


def _wrap(title: str) -> str:
    return "\n".join(textwrap.fill(line, TITLE_WIDTH) for line in title.splitlines())


def plot_metric_bars(
    means: Mapping[str, Sequence[float]],
    stds: Mapping[str, Sequence[float]],
    metric_labels: Sequence[str],
    title: str,
    path: str | os.PathLike[str],
) -> None:
    """Draw one group of bars per metric, one bar per method, with the standard deviation as error bar.

    Args:
        means: Method to its mean per metric, in the order of ``metric_labels``;
            the dict order is the bar order. NaN draws no bar.
        stds: Method to its standard deviation per metric; NaN draws no error bar.
        metric_labels: Name of each metric, under its group.
        title: Figure title (wrapped when long).
        path: PNG file to write.
    """
    methods = list(means)
    colors = method_colors(methods)
    positions = np.arange(len(metric_labels), dtype=np.float64)
    width = 0.8 / max(len(methods), 1)

    figure = Figure(figsize=(max(6.0, 1.6 * len(metric_labels) + 0.25 * len(methods) * len(metric_labels)), 4.5))
    axes = figure.subplots()
    for index, method in enumerate(methods):
        offsets = positions + (index - (len(methods) - 1) / 2) * width
        errors = np.nan_to_num(np.asarray(stds[method], dtype=np.float64), nan=0.0)
        axes.bar(offsets, means[method], width, yerr=errors, capsize=2, color=colors[method], label=method, error_kw={"linewidth": 0.8})
    axes.set_xticks(positions, list(metric_labels))
    axes.set_ylim(0.0, 1.0)
    axes.set_ylabel("score (mean ± std over seeds)")
    axes.grid(axis="y", linewidth=0.4, alpha=0.5)
    axes.set_axisbelow(True)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes.set_title(_wrap(title), fontsize=9)
    _save(figure, path)


def _overlay(mask: np.ndarray, color: tuple[float, float, float], alpha: float = 0.6) -> np.ndarray:
    """Return an RGBA image that is ``color`` where ``mask`` is set and transparent elsewhere."""
    rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
    rgba[mask] = (*color, alpha)
    return rgba


def round_float16(maps: np.ndarray) -> np.ndarray:
    """Round maps as the metrics do (float32, then float16), as float64; values beyond float16 become infinite."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(maps).astype(np.float32).astype(np.float16).astype(np.float64)


def plot_qualitative(
    images: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    maps: Mapping[str, np.ndarray],
    thresholds: Mapping[str, float],
    row_titles: Sequence[str],
    title: str,
    path: str | os.PathLike[str],
) -> None:
    """Draw example slices: input and ground truth, then per method its anomaly map and the map thresholded.

    The first row shows each slice and its ground truth side by side. Each
    further row belongs to one method and shows, under every slice, its anomaly
    map and the map thresholded, so the figure grows downward with the number
    of methods and keeps a page-like shape. Only brain pixels are shown in the
    maps and predicted in the thresholded maps, as in the metrics. A pixel is
    predicted anomalous when its float16-rounded map value is at least the
    threshold. Each method's maps share one colour scale, from the lowest to
    the highest brain pixel over the shown slices. The ground truth is outlined
    in green on the thresholded maps.

    Args:
        images: float (k, H, W) input slices in [0, 1].
        labels: bool (k, H, W) ground truth.
        masks: bool (k, H, W) brain masks.
        maps: Method to its float (k, H, W) anomaly maps; the dict order is the row order.
        thresholds: Method to the threshold applied; NaN leaves the thresholded map empty.
        row_titles: One label per slice (for example subject and slice index).
        title: Figure title (wrapped when long).
        path: PNG file to write.
    """
    count, methods = len(images), list(maps)
    rows, columns = 1 + len(methods), 2 * count
    # The constrained layout leaves room for the wrapped title above the column headers.
    figure = Figure(figsize=(1.45 * columns + 0.6, 1.45 * rows + 1.2), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    brain_labels = labels & masks

    # 1. The first row: each slice and its ground truth.
    for slice_number in range(count):
        input_axes, truth_axes = axes[0, 2 * slice_number], axes[0, 2 * slice_number + 1]
        input_axes.set_title(f"{row_titles[slice_number]}\ninput", fontsize=7)
        truth_axes.set_title("ground truth", fontsize=7)
        input_axes.imshow(images[slice_number], cmap="gray", vmin=0.0, vmax=1.0)
        truth_axes.imshow(images[slice_number], cmap="gray", vmin=0.0, vmax=1.0)
        truth_axes.imshow(_overlay(brain_labels[slice_number], PREDICTION_COLOR))

    # 2. One row per method: map and thresholded map under each slice.
    for index, method in enumerate(methods):
        row = 1 + index
        rounded = round_float16(maps[method])
        brain_values = rounded[masks & np.isfinite(rounded)]
        low, high = (float(brain_values.min()), float(brain_values.max())) if brain_values.size else (0.0, 1.0)
        threshold = thresholds[method]
        threshold_text = f"≥ {threshold:.4g}" if math.isfinite(threshold) else f"threshold {threshold}"
        axes[row, 0].set_ylabel(f"{method}\nmap | {threshold_text}", fontsize=7)
        for slice_number in range(count):
            map_axes, threshold_axes = axes[row, 2 * slice_number], axes[row, 2 * slice_number + 1]
            map_axes.imshow(np.ma.masked_where(~masks[slice_number], rounded[slice_number]), cmap=MAP_COLORMAP, vmin=low, vmax=high if high > low else low + 1)
            map_axes.set_facecolor("black")
            if math.isnan(threshold):
                predicted = np.zeros_like(masks[slice_number])
            else:
                predicted = (rounded[slice_number] >= threshold) & masks[slice_number]
            threshold_axes.imshow(images[slice_number], cmap="gray", vmin=0.0, vmax=1.0)
            threshold_axes.imshow(_overlay(predicted, PREDICTION_COLOR))
            if brain_labels[slice_number].any():
                threshold_axes.contour(brain_labels[slice_number].astype(np.float32), levels=[0.5], colors=LABEL_CONTOUR_COLOR, linewidths=0.6)

    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(_wrap(title), fontsize=8)
    _save(figure, path)
