"""Quality-control image of a registration: three orthogonal views through the atlas centre.

Top row: the atlas with the outline of the registered brain mask. Bottom row:
the registered brain with the outline of the atlas brain mask. Both images are
reoriented to LPS first, so the views look the same whatever the storage order
of the arrays. They follow the radiological convention (the subject's right on
the left of the image), with anterior at the top of axial views and superior at
the top of coronal and sagittal views.
"""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sfae.io import atomic_output

DPI = 120
FIGURE_SIZE_INCHES = (9.0, 6.4)
# Grey values are clipped at these percentiles of the non-zero voxels.
DISPLAY_PERCENTILES = (1.0, 99.0)
REGISTERED_MASK_COLOR = "tab:red"
ATLAS_MASK_COLOR = "tab:cyan"


def write_registration_qc(
    atlas: sitk.Image,
    registered_image: sitk.Image,
    registered_mask: sitk.Image,
    path: str | os.PathLike[str],
    title: str,
) -> None:
    """Write a PNG of the atlas and the registered brain with each other's brain outline, atomically.

    Args:
        atlas: Skull-stripped atlas; its non-zero voxels are the atlas brain mask.
        registered_image: Brain resampled onto the atlas grid.
        registered_mask: uint8 registered brain mask on the atlas grid.
        path: Output ``.png`` (about 1080 x 770 pixels).
        title: Figure title, for example naming the subject and the Dice overlap.
    """
    # 1. Reorient to LPS and take (z, y, x) arrays: x grows to the subject's
    # left, y to posterior, z to superior.
    atlas_array = _lps_array(atlas)
    image_array = _lps_array(registered_image)
    mask_array = _lps_array(registered_mask) != 0
    atlas_mask_array = atlas_array != 0
    spacing_x, spacing_y, spacing_z = sitk.DICOMOrient(atlas, "LPS").GetSpacing()
    centre = [size // 2 for size in atlas_array.shape]

    # 2. One row per image, one column per view.
    figure = Figure(figsize=FIGURE_SIZE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3)
    rows = (
        (atlas_array, mask_array, REGISTERED_MASK_COLOR, "atlas, registered mask outline"),
        (image_array, atlas_mask_array, ATLAS_MASK_COLOR, "registered brain, atlas mask outline"),
    )
    for row, (grey, outline, color, label) in enumerate(rows):
        limits = _display_limits(grey)
        views = (
            ("axial", grey[centre[0]], outline[centre[0]], spacing_y / spacing_x, "upper"),
            ("coronal", grey[:, centre[1]], outline[:, centre[1]], spacing_z / spacing_x, "lower"),
            ("sagittal", grey[:, :, centre[2]], outline[:, :, centre[2]], spacing_z / spacing_y, "lower"),
        )
        for column, (view, grey_slice, outline_slice, aspect, origin) in enumerate(views):
            _draw_view(axes[row, column], grey_slice, outline_slice, limits, aspect, origin, color)
            axes[row, column].set_title(f"{view}: {label}" if column == 0 else view, fontsize=8)
        axes[row, 0].text(0.02, 0.5, "R", color="yellow", fontsize=9, transform=axes[row, 0].transAxes)
        axes[row, 1].text(0.02, 0.5, "R", color="yellow", fontsize=9, transform=axes[row, 1].transAxes)
    figure.suptitle(title, fontsize=10)

    # 3. Write atomically.
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)


def _lps_array(image: sitk.Image) -> np.ndarray:
    """Return the voxels of ``image`` reoriented to LPS as a ``(z, y, x)`` array."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def _display_limits(array: np.ndarray) -> tuple[float, float]:
    """Return grey-value limits from percentiles of the non-zero voxels (0 and 1 when all are zero)."""
    values = array[array != 0]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, DISPLAY_PERCENTILES)
    return float(min(low, 0.0)), float(max(high, low + 1e-6))


def _draw_view(
    axis: Axes,
    grey: np.ndarray,
    outline: np.ndarray,
    limits: tuple[float, float],
    aspect: float,
    origin: str,
    color: str,
) -> None:
    """Draw one slice in grey with the 0.5 contour of a binary slice on top."""
    axis.imshow(grey, cmap="gray", vmin=limits[0], vmax=limits[1], aspect=aspect, origin=origin, interpolation="nearest")
    if outline.any() and not outline.all():
        # Without an origin argument, contour puts row i at y = i, as imshow does for either origin.
        axis.contour(outline.astype(np.float32), levels=[0.5], colors=color, linewidths=0.8)
    axis.set_axis_off()
