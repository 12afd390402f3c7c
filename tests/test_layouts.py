"""Subject discovery in the demo, MOOD, BIDS and BraTS 2020 layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from layout_trees import write_bids_tree, write_brats_tree, write_mood_tree
from sfae.io import InvalidInputError
from sfae.layouts import discover_subjects


def make_config(layout: str, path: Path, **overrides) -> dict:
    dataset = {
        "layout": layout,
        "path": str(path),
        "modality": {"mood": "T2", "bids": "T1w", "brats2020": "t1"}.get(layout, "T1"),
        "skull_stripped": True,
        "registered": False,
        "segmentations": layout == "brats2020",
        "seed": 0,
        "split": {"train": "rest", "val": 0, "test": 0},
        "anomalies": None,
    }
    dataset.update(overrides)
    return {"data_root": "/", "demo_cache": "/cache", "datasets": {"data": dataset}}


def test_layouts_demo_lists_catalogue_volumes():
    subjects = discover_subjects({"demo_cache": "/cache", "datasets": {"data": {"layout": "demo"}}}, "data")
    ids = [subject.id for subject in subjects]
    assert ids == sorted(ids)
    assert "colin27" in ids and "robex_reference" in ids
    assert "sri24_t1_skullstripped" not in ids
    by_id = {subject.id: subject for subject in subjects}
    assert by_id["colin27"].skull_stripped and not by_id["robex_reference"].skull_stripped
    assert by_id["icbm152_2009a"].group == by_id["icbm152_2009c"].group
    assert by_id["colin27"].image == Path("/cache/files/colin27.nii")


def test_layouts_mood_sorted_flat_folder(tmp_path):
    write_mood_tree(tmp_path, 3)
    (tmp_path / "notes.txt").touch()
    (tmp_path / "00010.nii").touch()
    subjects = discover_subjects(make_config("mood", tmp_path), "data")
    assert [subject.id for subject in subjects] == ["00000", "00001", "00002", "00010"]
    assert subjects[0].image == tmp_path / "00000.nii.gz"
    assert subjects[0].segmentation is None
    assert subjects[0].skull_stripped


def test_layouts_mood_duplicate_subject(tmp_path):
    write_mood_tree(tmp_path, 2)
    (tmp_path / "00001.nii").touch()
    with pytest.raises(InvalidInputError, match=r"subject id '00001' found twice: .*00001.nii.* and .*00001.nii.gz"):
        discover_subjects(make_config("mood", tmp_path), "data")


def test_layouts_mood_empty_folder(tmp_path):
    with pytest.raises(InvalidInputError, match=r"data set data \(layout mood\): no file matching"):
        discover_subjects(make_config("mood", tmp_path), "data")


def test_layouts_missing_folder(tmp_path):
    with pytest.raises(InvalidInputError, match=r"folder .*absent not found; set datasets.data.path"):
        discover_subjects(make_config("bids", tmp_path / "absent"), "data")


def test_layouts_relative_path_uses_data_root(tmp_path):
    write_mood_tree(tmp_path / "MOOD" / "brain_train", 2)
    config = make_config("mood", Path("MOOD/brain_train"))
    config["data_root"] = str(tmp_path)
    assert len(discover_subjects(config, "data")) == 2


def test_layouts_bids_modality_and_sessions(tmp_path):
    write_bids_tree(tmp_path, ["CC110033", "CC110037"])
    write_bids_tree(tmp_path, ["CC110033"], modality="T2w")
    write_bids_tree(tmp_path, ["CC120001"], session="1")
    subjects = discover_subjects(make_config("bids", tmp_path), "data")
    assert [subject.id for subject in subjects] == ["sub-CC110033", "sub-CC110037", "sub-CC120001_ses-1"]
    assert subjects[2].group == "sub-CC120001"
    assert subjects[0].image.name == "sub-CC110033_T1w.nii.gz"


def test_layouts_bids_two_runs_duplicate(tmp_path):
    write_bids_tree(tmp_path, ["CC110033"])
    (tmp_path / "sub-CC110033" / "anat" / "sub-CC110033_run-2_T1w.nii.gz").touch()
    with pytest.raises(InvalidInputError, match="subject id 'sub-CC110033' found twice"):
        discover_subjects(make_config("bids", tmp_path), "data")


def test_layouts_bids_no_match_names_pattern(tmp_path):
    write_bids_tree(tmp_path, ["CC110033"], modality="T2w")
    with pytest.raises(InvalidInputError, match=r"no file matching sub-\*/\[ses-\*/\]anat/sub-\*_T1w"):
        discover_subjects(make_config("bids", tmp_path), "data")


def test_layouts_brats_images_and_segmentations(tmp_path):
    write_brats_tree(tmp_path, 3)
    (tmp_path / "survival_info.csv").touch()
    (tmp_path / "not_a_case").mkdir()
    subjects = discover_subjects(make_config("brats2020", tmp_path), "data")
    assert [subject.id for subject in subjects] == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"]
    assert subjects[1].segmentation == tmp_path / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz"
    assert subjects[1].image.name == "BraTS20_Training_002_t1.nii.gz"


def test_layouts_brats_missing_segmentation(tmp_path):
    write_brats_tree(tmp_path, 2)
    (tmp_path / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz").unlink()
    (tmp_path / "BraTS20_Training_002" / "W39_1998.09.19_Segm.nii").touch()
    with pytest.raises(InvalidInputError, match=r"BraTS20_Training_002 has no segmentation.*rename that file to BraTS20_Training_002_seg.nii"):
        discover_subjects(make_config("brats2020", tmp_path), "data")


def test_layouts_brats_segmentations_optional(tmp_path):
    write_brats_tree(tmp_path, 2, with_segmentations=False)
    subjects = discover_subjects(make_config("brats2020", tmp_path, segmentations=False), "data")
    assert all(subject.segmentation is None for subject in subjects)


def test_layouts_brats_missing_modality(tmp_path):
    write_brats_tree(tmp_path, 1, modality="flair")
    with pytest.raises(InvalidInputError, match=r"has no BraTS20_Training_001_t1.nii.gz or .nii; check datasets.data.modality"):
        discover_subjects(make_config("brats2020", tmp_path), "data")


def test_layouts_invalid_subject_characters(tmp_path):
    (tmp_path / "scan 1.nii.gz").touch()
    with pytest.raises(InvalidInputError, match="contains characters other than"):
        discover_subjects(make_config("mood", tmp_path), "data")
