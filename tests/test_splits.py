"""Subject-level splits and split array files."""

from __future__ import annotations

import numpy as np
import pytest

from sfae.io import InvalidInputError, read_arrays, write_arrays
from sfae.splits import assign_splits, concatenate_slice_files


def groups_of(count: int) -> dict[str, str]:
    return {f"s{index:03d}": f"s{index:03d}" for index in range(count)}


def test_splits_counts_and_disjoint():
    assignment = assign_splits(groups_of(20), {"train": "rest", "val": 2, "test": 5}, seed=0)
    assert [len(assignment[split]) for split in ("train", "val", "test")] == [13, 2, 5]
    everyone = assignment["train"] + assignment["val"] + assignment["test"]
    assert sorted(everyone) == sorted(groups_of(20))
    assert all(assignment[split] == sorted(assignment[split]) for split in assignment)


def test_splits_independent_of_input_order():
    subjects = groups_of(30)
    shuffled = dict(reversed(list(subjects.items())))
    sizes = {"train": 20, "val": 3, "test": "rest"}
    assert assign_splits(subjects, sizes, seed=4) == assign_splits(shuffled, sizes, seed=4)


def test_splits_seed_changes_assignment():
    sizes = {"train": "rest", "val": 3, "test": 5}
    assert assign_splits(groups_of(30), sizes, seed=0) != assign_splits(groups_of(30), sizes, seed=1)


def test_splits_groups_stay_together():
    subjects = {f"s{index}": f"g{index // 2}" for index in range(12)}
    for seed in range(10):
        assignment = assign_splits(subjects, {"train": "rest", "val": 1, "test": 2}, seed=seed)
        split_of = {subject: split for split, members in assignment.items() for subject in members}
        for index in range(0, 12, 2):
            assert split_of[f"s{index}"] == split_of[f"s{index + 1}"]
        assert len(assignment["val"]) == 2 and len(assignment["test"]) == 4


def test_splits_without_rest_leave_subjects_out():
    assignment = assign_splits(groups_of(10), {"train": 0, "val": 2, "test": 3}, seed=0)
    assert assignment["train"] == []
    assert len(assignment["val"]) + len(assignment["test"]) == 5


def test_splits_too_many_requested():
    with pytest.raises(InvalidInputError, match=r"asks for 12 subjects .* only 10 were found; lower the counts in datasets.mood.split"):
        assign_splits(groups_of(10), {"train": 10, "val": 1, "test": 1}, seed=0, dataset="mood")


def write_slice_file(path, subject: str, count: int, size: int = 8):
    write_arrays(
        path,
        images=np.full((count, size, size), 0.5, np.float32),
        masks=np.ones((count, size, size), bool),
        labels=np.zeros((count, size, size), bool),
        slice_index=np.arange(count, dtype=np.int16),
        subject=np.array([subject] * count),
    )


def test_splits_concatenate_keeps_order(tmp_path):
    write_slice_file(tmp_path / "a.npz", "a", 3)
    write_slice_file(tmp_path / "b.npz", "bb", 2)
    summary = concatenate_slice_files([tmp_path / "b.npz", tmp_path / "a.npz"], tmp_path / "split.npz")
    arrays = read_arrays(tmp_path / "split.npz")
    assert summary == {"volumes": 2, "slices": 5}
    assert arrays["subject"].tolist() == ["bb", "bb", "a", "a", "a"]
    assert arrays["slice_index"].tolist() == [0, 1, 0, 1, 2]
    assert arrays["images"].dtype == np.float32 and arrays["masks"].dtype == bool


def test_splits_concatenate_rejects_mixed_sizes(tmp_path):
    write_slice_file(tmp_path / "a.npz", "a", 1, size=8)
    write_slice_file(tmp_path / "b.npz", "b", 1, size=16)
    with pytest.raises(InvalidInputError, match=r"has slices of \(16, 16\), others \(8, 8\)"):
        concatenate_slice_files([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "split.npz")
    assert not (tmp_path / "split.npz").exists()


def test_splits_concatenate_rejects_missing_key(tmp_path):
    write_arrays(tmp_path / "a.npz", images=np.zeros((1, 8, 8), np.float32))
    with pytest.raises(InvalidInputError, match="lacks masks, labels, slice_index, subject"):
        concatenate_slice_files([tmp_path / "a.npz"], tmp_path / "split.npz")


def test_splits_concatenate_corrupt_file(tmp_path):
    (tmp_path / "a.npz").write_bytes(b"not an archive")
    with pytest.raises(InvalidInputError, match="cannot read array file"):
        concatenate_slice_files([tmp_path / "a.npz"], tmp_path / "split.npz")
