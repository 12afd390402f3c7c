"""Real Snakemake runs of the preprocessing chain on small real volumes in the MOOD, BIDS and BraTS layouts.

The volumes are demo MRI resampled to 3 mm, registered to the SRI24 atlas
resampled to 3 mm, so that ROBEX runs once (on the one scan with a skull) and
every registration takes a second or two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from layout_trees import write_bids_tree, write_brats_tree, write_mood_tree
from sfae.io import read_arrays, read_volume
from workflow_helpers import REPOSITORY

SPACING_MM = 3.0
SLICE_START, SLICE_STOP, SLICE_SIZE = 18, 45, 64  # slices 55 to 135 of the 1 mm SRI24 grid, at 3 mm


def resample(image: sitk.Image, spacing: float, interpolator=sitk.sitkLinear) -> sitk.Image:
    """Resample to an isotropic spacing, smoothing first when downsampling an intensity image."""
    size = [int(round(length * old / spacing)) for length, old in zip(image.GetSize(), image.GetSpacing())]
    if interpolator != sitk.sitkNearestNeighbor:
        image = sitk.SmoothingRecursiveGaussian(image, spacing / 2)
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), [spacing] * 3, image.GetDirection(), 0.0, image.GetPixelID())


def small_brain(path: Path, mask_path: Path | None = None) -> sitk.Image:
    """A skull-stripped demo volume at 3 mm, exactly zero outside its brain as real skull-stripped scans are.

    The brain is the volume's own mask when one is given, else its non-zero voxels.
    """
    image = read_volume(path)
    mask = read_volume(mask_path, kind="mask") if mask_path is not None else sitk.Cast(image != 0, sitk.sitkUInt8)
    small_mask = resample(sitk.Cast(mask, sitk.sitkFloat32), SPACING_MM) > 0.5
    return sitk.Mask(resample(sitk.Mask(image, mask), SPACING_MM), small_mask)


def tumour_like(atlas: sitk.Image, offset_mm: tuple[float, float, float]) -> sitk.Image:
    """BraTS-style labels (1, 2, 4 in nested spheres) on the atlas grid, ``offset_mm`` from the grid's centre."""
    centre_index = [(size - 1) / 2 for size in atlas.GetSize()]
    center_mm = np.array(atlas.TransformContinuousIndexToPhysicalPoint(centre_index)) + np.array(offset_mm)
    labels = sitk.Image(atlas.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(atlas)
    array = sitk.GetArrayViewFromImage(labels).copy()
    indices = np.indices(array.shape).reshape(3, -1).T[:, ::-1]  # (x, y, z) voxel indices
    direction = np.array(atlas.GetDirection()).reshape(3, 3)
    points = np.array(atlas.GetOrigin()) + (indices * np.array(atlas.GetSpacing())) @ direction.T
    distance = np.linalg.norm(points - center_mm, axis=1).reshape(array.shape)
    array[distance < 18] = 2
    array[distance < 12] = 1
    array[distance < 6] = 4
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(atlas)
    return result


@pytest.fixture(scope="module")
def small_study(tmp_path_factory, demo_files):
    """A data root with MOOD-, BIDS- and BraTS-layout trees of small real volumes, and a config for them."""
    root = tmp_path_factory.mktemp("study")
    atlas = small_brain(demo_files["sri24_t1_skullstripped"])
    sitk.WriteImage(atlas, str(root / "atlas.nii.gz"))

    # MOOD layout: four skull-stripped scans.
    mood = root / "MOOD" / "brain_train"
    scans = [
        small_brain(demo_files["colin27"]),
        small_brain(demo_files["icbm152_2009a"]),
        small_brain(demo_files["icbm152_2009c"], demo_files["icbm152_2009c_mask"]),
        small_brain(demo_files["mni152_nlin6asym"], demo_files["mni152_nlin6asym_mask"]),
    ]
    for path, scan in zip(write_mood_tree(mood, len(scans)), scans):
        sitk.WriteImage(scan, str(path))

    # BIDS layout: one scan with its skull, so ROBEX runs.
    with_skull = resample(read_volume(demo_files["icbm152_2009c"]), SPACING_MM)
    sitk.WriteImage(with_skull, str(root / "with_skull.nii.gz"))
    write_bids_tree(root / "CamCAN" / "BIDS", ["CC110033"], source=root / "with_skull.nii.gz")

    # BraTS layout: skull-stripped scans on the atlas grid with tumour labels.
    sitk.WriteImage(tumour_like(atlas, (15.0, 10.0, 10.0)), str(root / "seg_a.nii.gz"))
    sitk.WriteImage(tumour_like(atlas, (-25.0, 0.0, 20.0)), str(root / "seg_b.nii.gz"))
    write_brats_tree(
        root / "BraTS2020" / "MICCAI_BraTS2020_TrainingData", 3, source=root / "atlas.nii.gz",
        segmentation=lambda number: root / ("seg_a.nii.gz" if number % 2 else "seg_b.nii.gz"),
    )

    config = yaml.safe_load((REPOSITORY / "config" / "paper.yaml").read_text())
    config.update(results=str(root / "results"), data_root=str(root), demo_cache=str(demo_files["sri24_t1"].parents[1]))
    config["atlas"]["path"] = str(root / "atlas.nii.gz")
    config["preprocessing"]["slices"] = {"start": SLICE_START, "stop": SLICE_STOP, "size": SLICE_SIZE}
    config["preprocessing"]["registration"].update(shrink_factors=[2, 1], smoothing_sigmas_mm=[3.0, 0.0], iterations=60, min_dice=0.8)
    config["preprocessing"]["skull_strip"].update(max_brain_volume_ml=2600)
    config["datasets"]["mood"]["split"] = {"train": 2, "val": 1, "test": 1}
    config["datasets"]["mood"]["anomalies"]["radius_px"] = [5.0, 10.0]
    config["datasets"]["brats2020"]["split"] = {"train": 0, "val": 1, "test": "rest"}
    config["training"].update(seeds=[0, 1], steps=3, batch_size=8, checkpoint_every=2, threads=1, gpus=0, device="cpu")
    for method in ("sfae", "dfr", "dfr_ssim"):
        config["methods"][method]["weights"] = "random"
    config["evaluation"].update(batch_size=16, examples=2)
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return root, config_path


def snakemake_command(config_path: Path, *arguments: str) -> list[str]:
    """Run the workflow with Snakemake's working folder (locks, metadata) beside the config."""
    return [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPOSITORY / "Snakefile"),
        "--directory", str(config_path.parent / "work"), "--configfile", str(config_path), "--cores", "2", *arguments,
    ]


def run(command: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def kill_during_robex(command: list[str], log: Path, robex_output: Path) -> None:
    """Start the workflow, SIGKILL it and its jobs while ROBEX runs, as a cluster node failure would."""
    output = log.parents[4] / "killed_run.txt"
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (log.exists() and "ROBEX" in log.read_text()):
            assert process.poll() is None, f"the workflow ended before ROBEX started:\n{output.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "ROBEX did not start within 10 minutes"
            time.sleep(0.5)
        time.sleep(3)
        assert not robex_output.exists(), "ROBEX finished too early for this test"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_workflow_run_preprocessing_resumes_after_kill(small_study):
    root, config_path = small_study
    results = root / "results"
    robex_volume = results / "camcan" / "volumes" / "sub-CC110033"
    robex_log = results / "logs" / "camcan" / "sub-CC110033" / "extract_brain.log"

    # 1. A run killed half-way leaves no partial output of the killed job.
    kill_during_robex(snakemake_command(config_path, "preprocess"), robex_log, robex_volume / "brain.nii.gz")
    assert not (robex_volume / "brain.nii.gz").exists()
    assert not (robex_volume / "brain_mask.nii.gz").exists()

    # 2. The rerun resumes and completes.
    run(snakemake_command(config_path, "--unlock"))
    run(snakemake_command(config_path, "preprocess", "--rerun-incomplete"))

    # 3. Splits: slices of 64 x 64, brain masks, subject ids, by subject.
    train = read_arrays(results / "mood" / "splits" / "train.npz")
    slices_per_volume = SLICE_STOP - SLICE_START
    assert train["images"].shape == (2 * slices_per_volume, SLICE_SIZE, SLICE_SIZE)
    assert train["images"].dtype == np.float32
    assert train["masks"].dtype == bool
    assert train["images"].min() >= 0.0
    assert train["images"].max() <= 1.0
    assert not np.any(train["images"][~train["masks"]])
    assert not np.any(train["labels"])
    assert sorted(set(train["slice_index"].tolist())) == list(range(SLICE_START, SLICE_STOP))
    val = read_arrays(results / "mood" / "splits" / "val.npz")
    test = read_arrays(results / "mood" / "splits" / "test.npz")
    assert not set(train["subject"]) & (set(val["subject"]) | set(test["subject"]))

    # 4. Sink deformations on half of MOOD's val and test slices.
    test_sink = read_arrays(results / "mood" / "splits" / "test_sink.npz")
    assert test_sink["anomalous"].sum() == round(0.5 * slices_per_volume)
    assert np.all(test_sink["labels"].any(axis=(1, 2)) == test_sink["anomalous"])
    assert not np.array_equal(test_sink["images"], test["images"])

    # 5. BraTS: registered scans keep their grid; labels are binary and lie inside the brain.
    brats_test = read_arrays(results / "brats2020" / "splits" / "test.npz")
    assert brats_test["labels"].any()
    assert not np.any(brats_test["labels"] & ~brats_test["masks"])
    camcan = read_arrays(results / "camcan" / "splits" / "train.npz")
    assert camcan["images"].shape[0] == slices_per_volume

    # 6. Registration QC: one row per scan, every Dice above the configured minimum.
    for dataset, count in (("mood", 4), ("camcan", 1), ("brats2020", 3)):
        table = pd.read_csv(results / dataset / "registration_qc.csv")
        assert len(table) == count
        assert (table["dice"] >= 0.8).all(), table

    # 7. Every job wrote its log and benchmark; nothing is left to do.
    logs = list((results / "logs").rglob("*.log"))
    assert logs and all("finished" in log.read_text() for log in logs), [log for log in logs if "finished" not in log.read_text()]
    assert (results / "benchmarks" / "camcan" / "sub-CC110033" / "extract_brain.tsv").exists()
    assert not list(results.rglob("*.partial*"))
    dry = run(snakemake_command(config_path, "preprocess", "-n"))
    assert "Nothing to be done" in dry.stdout + dry.stderr


@pytest.mark.slow
def test_workflow_run_trains_evaluates_reports(small_study):
    """Both experiments, every method of the paper configuration, two seeds of three steps: models, metrics and reports."""
    root, config_path = small_study
    results = root / "results"
    methods = set(yaml.safe_load(config_path.read_text())["methods"])
    assert len(methods) == 11
    run(snakemake_command(config_path))

    for experiment in ("mood", "brats"):
        report = results / "experiments" / experiment / "report"
        summary = (report / "summary.md").read_text()
        for method in methods:
            assert f"| {method} |" in summary
        assert "Feature-extractor weights: dfr: random, dfr_ssim: random, sfae: random" in summary
        per_seed = pd.read_csv(report / "results_per_seed.csv")
        assert len(per_seed) == 2 * len(methods)
        assert per_seed["pixel_ap"].between(0.0, 1.0).all()
        t_tests = pd.read_csv(report / "t_tests.csv")
        assert set(t_tests["method"]) == methods - {"sfae"}
        for figure in ("bar_chart.png", "qualitative.png"):
            assert (report / figure).stat().st_size > 1000

    run_folder = results / "experiments" / "brats" / "sfae" / "seed1"
    metrics = json.loads((run_folder / "metrics.json").read_text())
    assert metrics["experiment"] == "brats"
    assert metrics["seed"] == 1
    assert 0.0 <= metrics["metrics"]["pixel_ap"] <= 1.0
    assert metrics["description"]["extractor_weights"] == "random"
    assert metrics["counts"]["test"]["anomalous_pixels"] > 0
    training = json.loads((run_folder / "training.json").read_text())
    assert training["steps"] == 3
    # The workflow passes the run's 3 steps to f-AnoGAN: 2 GAN steps (half, rounded up), then 1 encoder step.
    fanogan = json.loads((results / "experiments" / "mood" / "fanogan" / "seed0" / "metrics.json").read_text())["description"]
    assert fanogan["total_steps"] == 3
    assert fanogan["gan_steps_done"] == 2
    assert fanogan["encoder_steps_done"] == 1
    assert len(pd.read_csv(run_folder / "loss.csv")) == 3
    assert not (run_folder / "checkpoint" / "last.pt").exists()
    dry = run(snakemake_command(config_path, "-n"))
    assert "Nothing to be done" in dry.stdout + dry.stderr


@pytest.mark.slow
def test_workflow_run_corrupt_scan_fails_with_name(small_study, tmp_path):
    root, config_path = small_study
    data = tmp_path / "data"
    mood = data / "MOOD" / "brain_train"
    scans = sorted((root / "MOOD" / "brain_train").iterdir())
    write_mood_tree(mood, 3, source=scans[0])
    broken = mood / "00001.nii.gz"
    broken.write_bytes(broken.read_bytes()[:2000])

    config = yaml.safe_load(config_path.read_text())
    config.update(results=str(tmp_path / "results"), data_root=str(data))
    config["datasets"] = {"mood": config["datasets"]["mood"]}
    config["datasets"]["mood"]["split"] = {"train": 1, "val": 1, "test": 1}
    config["experiments"] = {"mood": {"train": "mood", "evaluate": "mood"}}
    broken_config = tmp_path / "config.yaml"
    broken_config.write_text(yaml.safe_dump(config))

    result = subprocess.run(snakemake_command(broken_config, "preprocess", "--keep-going"), capture_output=True, text=True, timeout=900)
    assert result.returncode != 0
    log = (tmp_path / "results" / "logs" / "mood" / "00001" / "extract_brain.log").read_text()
    assert f"cannot read NIfTI file {broken}" in log
    assert "corrupt or truncated" in log
    assert not (tmp_path / "results" / "mood" / "volumes" / "00001" / "brain.nii.gz").exists()
    # The other scans were processed regardless (--keep-going).
    assert (tmp_path / "results" / "mood" / "volumes" / "00000" / "slices.npz").exists()
