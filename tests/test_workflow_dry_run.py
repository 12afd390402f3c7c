"""Dry runs of the workflow: job graphs of the demo and the paper configuration, the SLURM profile, lint."""

from __future__ import annotations

from pathlib import Path

import pytest

from layout_trees import write_bids_tree, write_brats_tree, write_mood_tree
from workflow_helpers import job_counts, run_snakemake

MOOD_SCANS, CAMCAN_SCANS, BRATS_CASES = 800, 653, 369


def dry_run(tmp_path, *arguments, config=()):
    result = run_snakemake(
        "-n", "--cores", "2", *arguments,
        "--config", f"results={tmp_path / 'results'}", f"demo_cache={tmp_path / 'cache'}", *config,
    )
    return result.stdout + result.stderr


def test_workflow_demo_dry_run_job_counts(tmp_path):
    counts = job_counts(dry_run(tmp_path))
    assert counts == {
        "fetch_atlas": 1,
        "fetch_demo_volumes": 1,
        "extract_brain": 7,
        "register": 7,
        "extract_slices": 7,
        "registration_qc": 1,
        "make_split": 3,
        "add_anomalies": 2,
        # SFAE, the nine baselines and the Random floor, five seeds each;
        # BM and Random are fitted, not trained.
        "train_method": 45,
        "fit_method": 10,
        "evaluate_method": 55,
        "aggregate_experiment": 1,
        "all": 1,
        "total": 141,
    }


@pytest.fixture(scope="module")
def paper_data_root(tmp_path_factory):
    """Empty scan files in the official MOOD, Cam-CAN BIDS and BraTS 2020 layouts, at the published sizes."""
    root = tmp_path_factory.mktemp("data")
    write_mood_tree(root / "MOOD" / "brain_train", MOOD_SCANS)
    write_bids_tree(root / "CamCAN" / "BIDS", [f"CC{index:06d}" for index in range(CAMCAN_SCANS)])
    write_brats_tree(root / "BraTS2020" / "MICCAI_BraTS2020_TrainingData", BRATS_CASES)
    return root


def test_workflow_paper_dry_run_job_counts(tmp_path, paper_data_root):
    output = dry_run(tmp_path, "--configfile", "config/paper.yaml", config=[f"data_root={paper_data_root}"])
    counts = job_counts(output)
    volumes = MOOD_SCANS + CAMCAN_SCANS + BRATS_CASES
    assert counts["extract_brain"] == volumes
    assert counts["register"] == volumes
    assert counts["extract_slices"] == volumes
    # MOOD: train, val, test; Cam-CAN: train; BraTS: val, test.
    assert counts["make_split"] == 6
    # Sink deformations on MOOD's val and test splits only.
    assert counts["add_anomalies"] == 2
    assert counts["registration_qc"] == 3
    assert counts["fetch_atlas"] == 1
    assert "fetch_demo_volumes" not in counts
    # Two experiments (MOOD; Cam-CAN to BraTS) x eleven methods x five seeds.
    assert counts["train_method"] == 90
    assert counts["fit_method"] == 20
    assert counts["evaluate_method"] == 110
    assert counts["aggregate_experiment"] == 2
    relative = output.replace(str(tmp_path) + "/", "")
    assert "results/mood/splits/test_sink.npz" in relative
    assert "results/experiments/brats/sfae/seed4/model.pt" in relative
    assert "BraTS20_Training_369_seg.nii.gz" in output
    assert "results/demo/" not in output, "the paper configuration must not inherit the demo data set"


def test_workflow_paper_without_data_names_path(tmp_path):
    result = run_snakemake(
        "-n", "--configfile", "config/paper.yaml", "--config", f"data_root={tmp_path}", check=False
    )
    assert result.returncode != 0
    assert f"folder {tmp_path}/MOOD/brain_train not found; set datasets.mood.path or data_root" in result.stdout + result.stderr


def test_workflow_invalid_config_stops_before_jobs(tmp_path):
    result = run_snakemake("-n", "--config", "resluts=x", check=False)
    assert result.returncode != 0
    assert "unknown key at the top level" in result.stdout + result.stderr


def job_resources(output: str, rule: str) -> list[str]:
    """The 'resources:' lines of every job of one rule in a dry run's output."""
    lines = []
    for block in output.split("\nrule ")[1:]:
        if block.startswith(f"{rule}:"):
            lines += [line.strip() for line in block.splitlines() if line.strip().startswith("resources:")]
    return lines


def test_workflow_slurm_profile_dry_run(tmp_path):
    output = dry_run(tmp_path, "--profile", "slurm", "--cores", "64")
    assert job_counts(output)["total"] == 141
    training = job_resources(output, "train_method")
    assert len(training) == 45
    assert all("slurm_partition=SET:gpu_partition" in line and "gpu=1" in line for line in training)
    fitting = job_resources(output, "fit_method")
    assert len(fitting) == 10
    assert all("slurm_partition=SET:cpu_partition" in line and "gpu=" not in line for line in fitting)
    registration = job_resources(output, "register")
    assert len(registration) == 7
    assert all("slurm_partition=SET:cpu_partition" in line and "gpu=" not in line for line in registration)


def test_workflow_lint_clean():
    result = run_snakemake("--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_workflow_rerun_one_method_schedules_only_its_jobs(tmp_path):
    """After a complete run, forcing one method's models reruns its training, evaluation and the report only."""
    results, cache = tmp_path / "results", tmp_path / "cache"
    config = [f"results={results}", f"demo_cache={cache}"]
    everything = run_snakemake("-n", "--forceall", "--cores", "2", "--config", *config).stdout

    # Mark the whole workflow as done: create every output file.
    outputs = [
        path.strip()
        for line in everything.splitlines()
        if line.strip().startswith("output:")
        for path in line.strip().removeprefix("output:").split(",")
    ]
    assert len(outputs) > 100
    for path in outputs:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).touch()
    assert "Nothing to be done" in run_snakemake("-n", "--cores", "2", "--config", *config).stdout

    # The README's command: force the five training jobs of one baseline, with the SLURM profile.
    models = [str(results / "experiments" / "demo" / "ae_mse" / f"seed{seed}" / "model.pt") for seed in range(5)]
    rerun = run_snakemake("-n", "--profile", "slurm", "--cores", "64", "--config", *config, "--forcerun", *models).stdout
    counts = job_counts(rerun)
    assert counts == {"train_method": 5, "evaluate_method": 5, "aggregate_experiment": 1, "all": 1, "total": 12}
    scheduled = [line.split(":", 1)[1].strip() for line in rerun.splitlines() if line.strip().startswith("output:")]
    method_outputs = [path for path in scheduled if "/report/" not in path]
    assert method_outputs and all("/demo/ae_mse/seed" in path for path in method_outputs), method_outputs
