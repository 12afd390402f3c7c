"""Finding the scans of a data set in its official folder layout.

Each layout turns a root folder into a sorted list of :class:`Subject` records.
Discovery only lists files (no image is read), so the workflow can build its
job graph for thousands of scans in a second. Every layout rejects a folder
with no matching scan and two scans with the same subject id, naming the files.

Layouts:
    demo: the pinned demo volumes in the demo cache (:mod:`sfae.demo_data`).
    mood: a flat folder of scans, one per subject (MOOD ``brain_train``:
        ``00000.nii.gz`` to ``00799.nii.gz``); the subject id is the file name
        without its suffix.
    bids: ``sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>][_<entity>-<value>...]_<modality>.nii[.gz]``
        (Cam-CAN's BIDS release); the subject id is ``sub-<label>`` plus
        ``_ses-<label>`` when there are sessions.
    brats2020: ``BraTS20_Training_<n>/BraTS20_Training_<n>_<modality>.nii[.gz]``
        with the segmentation ``BraTS20_Training_<n>_seg.nii[.gz]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfae import demo_data
from sfae.config import dataset_root
from sfae.io import InvalidInputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SUBJECT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
BRATS_CASE_PATTERN = re.compile(r"^BraTS20_Training_\d{3}$")


@dataclass(frozen=True)
class Subject:
    """One scan of a data set.

    Attributes:
        id: Subject id, unique in the data set, safe as a file name.
        image: The scan.
        segmentation: Lesion segmentation, or None for a healthy scan.
        skull_stripped: Whether the scan has no skull left.
        registered: Whether the scan already lies on the atlas grid.
        group: Subjects of one group always fall into the same split (the
            subject id unless a layout knows of related scans).
    """

    id: str
    image: Path
    segmentation: Path | None
    skull_stripped: bool
    registered: bool
    group: str


def _strip_nifti_suffix(name: str) -> str | None:
    """Return a file name without its NIfTI suffix, or None when it is not a NIfTI file."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _check_unique(subjects: list[Subject], dataset: str) -> list[Subject]:
    """Sort subjects by id and reject duplicate ids.

    Raises:
        InvalidInputError: Naming the duplicate id and both files.
    """
    seen: dict[str, Subject] = {}
    for subject in subjects:
        if subject.id in seen:
            raise InvalidInputError(
                f"data set {dataset}: subject id {subject.id!r} found twice: {seen[subject.id].image} and "
                f"{subject.image}; keep one scan per subject (remove or move the other file)"
            )
        if not SUBJECT_ID_PATTERN.match(subject.id):
            raise InvalidInputError(
                f"data set {dataset}: subject id {subject.id!r} from {subject.image} contains characters other than "
                "letters, digits, '_', '.' and '-'; rename the file"
            )
        seen[subject.id] = subject
    return sorted(seen.values(), key=lambda subject: subject.id)


def _require_folder(root: Path, dataset: str, layout: str) -> None:
    """Raise unless the data set's root folder exists."""
    if not root.is_dir():
        raise InvalidInputError(
            f"data set {dataset} (layout {layout}): folder {root} not found; set datasets.{dataset}.path "
            "or data_root in the config"
        )


def _no_match(root: Path, dataset: str, layout: str, pattern: str) -> InvalidInputError:
    """Return the error for a layout that matched no scan."""
    return InvalidInputError(
        f"data set {dataset} (layout {layout}): no file matching {pattern} under {root}; check "
        f"datasets.{dataset}.path, layout and modality in the config"
    )


def _demo_subjects(config: Mapping[str, Any]) -> list[Subject]:
    """Return the demo volumes, with flags and groups from the catalogue."""
    cache = Path(config["demo_cache"])
    return [
        Subject(entry.key, demo_data.demo_path(cache, entry.key), None, entry.skull_stripped, False, entry.group)
        for entry in demo_data.demo_volumes()
    ]


def _mood_subjects(root: Path, dataset: str, settings: Mapping[str, Any]) -> list[Subject]:
    """Return one subject per NIfTI file directly inside ``root``."""
    _require_folder(root, dataset, "mood")
    subjects = []
    for path in sorted(root.iterdir()):
        stem = _strip_nifti_suffix(path.name)
        if stem is None or not path.is_file():
            continue
        subjects.append(Subject(stem, path, None, settings["skull_stripped"], settings["registered"], stem))
    if not subjects:
        raise _no_match(root, dataset, "mood", "*.nii.gz or *.nii")
    return subjects


def _bids_subjects(root: Path, dataset: str, settings: Mapping[str, Any]) -> list[Subject]:
    """Return one subject (and session) per anatomical scan of the configured modality."""
    _require_folder(root, dataset, "bids")
    modality = settings["modality"]
    subjects = []
    for anat in sorted([*root.glob("sub-*/anat"), *root.glob("sub-*/ses-*/anat")]):
        for path in sorted(anat.iterdir()):
            stem = _strip_nifti_suffix(path.name)
            if stem is None or not stem.endswith(f"_{modality}") or not path.name.startswith("sub-"):
                continue
            entities = dict(part.split("-", 1) for part in stem.split("_")[:-1] if "-" in part)
            subject_id = f"sub-{entities['sub']}" + (f"_ses-{entities['ses']}" if "ses" in entities else "")
            subjects.append(Subject(subject_id, path, None, settings["skull_stripped"], settings["registered"], f"sub-{entities['sub']}"))
    if not subjects:
        raise _no_match(root, dataset, "bids", f"sub-*/[ses-*/]anat/sub-*_{modality}.nii[.gz]")
    return subjects


def _find_nifti(folder: Path, stem: str) -> Path | None:
    """Return ``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists."""
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _brats_subjects(root: Path, dataset: str, settings: Mapping[str, Any]) -> list[Subject]:
    """Return one subject per BraTS 2020 case folder, with its segmentation when configured."""
    _require_folder(root, dataset, "brats2020")
    modality = settings["modality"]
    subjects = []
    for case in sorted(path for path in root.iterdir() if path.is_dir() and BRATS_CASE_PATTERN.match(path.name)):
        image = _find_nifti(case, f"{case.name}_{modality}")
        if image is None:
            raise InvalidInputError(
                f"data set {dataset}: case folder {case} has no {case.name}_{modality}.nii.gz or .nii; "
                f"check datasets.{dataset}.modality (t1, t1ce, t2 or flair) or remove the incomplete case"
            )
        segmentation = None
        if settings["segmentations"]:
            segmentation = _find_nifti(case, f"{case.name}_seg")
            if segmentation is None:
                raise InvalidInputError(
                    f"data set {dataset}: case folder {case} has no segmentation {case.name}_seg.nii.gz or .nii. "
                    "In the official BraTS 2020 release case 355 names it W39_1998.09.19_Segm.nii: rename that file "
                    f"to {case.name}_seg.nii, or set datasets.{dataset}.segmentations to false"
                )
        subjects.append(Subject(case.name, image, segmentation, settings["skull_stripped"], settings["registered"], case.name))
    if not subjects:
        raise _no_match(root, dataset, "brats2020", f"BraTS20_Training_<n>/BraTS20_Training_<n>_{modality}.nii[.gz]")
    return subjects


def discover_subjects(config: Mapping[str, Any], dataset: str) -> list[Subject]:
    """List the scans of one configured data set, sorted by subject id.

    Args:
        config: Validated workflow configuration.
        dataset: Name of a data set in ``config["datasets"]``.

    Returns:
        Subjects sorted by id, so that splits do not depend on the order in
        which the file system lists files.

    Raises:
        InvalidInputError: If the folder is missing, holds no matching scan, a
            BraTS case lacks its scan or segmentation, or two scans share a
            subject id.
    """
    settings = config["datasets"][dataset]
    layout = settings["layout"]
    if layout == "demo":
        subjects = _demo_subjects(config)
    elif layout == "mood":
        subjects = _mood_subjects(dataset_root(config, dataset), dataset, settings)
    elif layout == "bids":
        subjects = _bids_subjects(dataset_root(config, dataset), dataset, settings)
    elif layout == "brats2020":
        subjects = _brats_subjects(dataset_root(config, dataset), dataset, settings)
    else:
        raise InvalidInputError(f"data set {dataset}: unknown layout {layout!r}; use demo, mood, bids or brats2020")
    return _check_unique(subjects, dataset)
