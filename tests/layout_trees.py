"""Builders of data set folders in the official MOOD, BIDS (Cam-CAN) and BraTS 2020 layouts.

With ``source=None`` the scans are empty files, enough for discovery and dry
runs. With a source volume every scan is a real NIfTI file (a copy of it).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path


def _place(path: Path, source: Path | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if source is None:
        path.touch()
    else:
        shutil.copyfile(source, path)
    return path


def write_mood_tree(root: Path, count: int, source: Path | None = None) -> list[Path]:
    """MOOD brain_train: ``00000.nii.gz`` ... in one folder."""
    return [_place(root / f"{index:05d}.nii.gz", source) for index in range(count)]


def write_bids_tree(
    root: Path, labels: Sequence[str], modality: str = "T1w", source: Path | None = None, session: str | None = None
) -> list[Path]:
    """Cam-CAN BIDS: ``sub-<label>/anat/sub-<label>_T1w.nii.gz`` (with an optional session level)."""
    paths = []
    for label in labels:
        folder = root / f"sub-{label}"
        name = f"sub-{label}"
        if session is not None:
            folder = folder / f"ses-{session}"
            name += f"_ses-{session}"
        paths.append(_place(folder / "anat" / f"{name}_{modality}.nii.gz", source))
    return paths


def write_brats_tree(
    root: Path,
    count: int,
    modality: str = "t1",
    source: Path | None = None,
    segmentation: Path | None | Callable[[int], Path | None] = None,
    with_segmentations: bool = True,
) -> list[Path]:
    """BraTS 2020 training data: ``BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz`` and ``_seg``."""
    cases = []
    for number in range(1, count + 1):
        case = root / f"BraTS20_Training_{number:03d}"
        _place(case / f"{case.name}_{modality}.nii.gz", source)
        if with_segmentations:
            seg_source = segmentation(number) if callable(segmentation) else segmentation
            _place(case / f"{case.name}_seg.nii.gz", seg_source)
        cases.append(case)
    return cases
