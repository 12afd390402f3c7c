"""Subject-level train/val/test splits and the per-split array files.

Splits are drawn by subject group, never by slice: the sorted groups are
shuffled with a generator seeded by the data set's seed alone, then test,
val and train take their counts in that order ("rest" takes what is left).
The assignment therefore depends only on the set of subject ids and the seed,
not on file system order, worker count or any global random state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sfae.io import InvalidInputError, read_arrays, write_arrays

logger = logging.getLogger(__name__)

SPLIT_ORDER = ("test", "val", "train")
SLICE_KEYS = ("images", "masks", "labels", "slice_index", "subject")


def assign_splits(
    subject_groups: Mapping[str, str], sizes: Mapping[str, int | str], seed: int, dataset: str = "data set"
) -> dict[str, list[str]]:
    """Assign every subject to one split.

    Args:
        subject_groups: Subject id to group id. Subjects of one group (for
            example two scans of one person) always share a split; sizes count
            groups.
        sizes: Number of groups per split (``train``, ``val``, ``test``), or
            ``"rest"`` for the groups the other splits leave.
        seed: The data set's seed.
        dataset: Data set name, for messages.

    Returns:
        Split name to sorted subject ids. Subjects that no split takes (when no
        split is ``"rest"``) are left out.

    Raises:
        InvalidInputError: If the counts ask for more groups than exist.
    """
    groups = sorted(set(subject_groups.values()))
    fixed = sum(size for size in sizes.values() if size != "rest")
    if fixed > len(groups):
        requested = ", ".join(f"{split} {sizes[split]}" for split in SPLIT_ORDER)
        raise InvalidInputError(
            f"{dataset}: the split asks for {fixed} subjects ({requested}) but only {len(groups)} were found; "
            f"lower the counts in datasets.{dataset}.split or add scans"
        )

    order = np.random.default_rng(seed).permutation(len(groups))
    shuffled = [groups[index] for index in order]
    group_split: dict[str, str] = {}
    position = 0
    for split in SPLIT_ORDER:
        count = len(groups) - fixed if sizes[split] == "rest" else int(sizes[split])
        for group in shuffled[position : position + count]:
            group_split[group] = split
        position += count

    assignment: dict[str, list[str]] = {split: [] for split in ("train", "val", "test")}
    for subject, group in sorted(subject_groups.items()):
        if group in group_split:
            assignment[group_split[group]].append(subject)
    return assignment


def concatenate_slice_files(paths: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str]) -> dict[str, int]:
    """Concatenate per-volume slice files into one split file, atomically.

    Args:
        paths: Slice files (``images``, ``masks``, ``labels``, ``slice_index``,
            ``subject``), in the order to keep.
        output: The split's ``.npz`` file.

    Returns:
        Summary with the number of volumes and slices.

    Raises:
        InvalidInputError: If there is no input, or a file lacks a key or has
            another slice size than the first.
    """
    if not paths:
        raise InvalidInputError(f"no slice files to write {output}; the split is empty")
    parts: dict[str, list[np.ndarray]] = {key: [] for key in SLICE_KEYS}
    reference_shape = None
    for path in tqdm(paths, desc=f"reading slices for {Path(output).name}", unit="volume", disable=None):
        arrays = read_arrays(path)
        missing = [key for key in SLICE_KEYS if key not in arrays]
        if missing:
            raise InvalidInputError(f"slice file {path} lacks {', '.join(missing)}; delete it and rerun the workflow")
        if reference_shape is None:
            reference_shape = arrays["images"].shape[1:]
        if arrays["images"].shape[1:] != reference_shape:
            raise InvalidInputError(
                f"slice file {path} has slices of {arrays['images'].shape[1:]}, others {reference_shape}; "
                "delete the results of this data set and rerun with one preprocessing.slices.size"
            )
        for key in SLICE_KEYS:
            parts[key].append(arrays[key])

    merged = {key: np.concatenate(parts[key]) for key in SLICE_KEYS}
    write_arrays(output, **merged)
    summary = {"volumes": len(paths), "slices": int(merged["images"].shape[0])}
    logger.info("wrote %s: %d volumes, %d slices", output, summary["volumes"], summary["slices"])
    return summary
