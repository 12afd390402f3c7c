"""Aggregation of runs into tables, Welch t-tests and figures, from hand-made metrics files with known values."""

from __future__ import annotations

import csv
import logging
import math
import statistics

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import stats

from sfae.evaluation.aggregate import OUTPUT_FILES, aggregate_experiment, welch_test
from sfae.evaluation.evaluate import evaluate_files
from sfae.io import InvalidInputError, write_arrays, write_json
from sfae.models import build_method
from sfae.models.base import AnomalyMethod, Prediction

SEEDS = [0, 1, 2, 3, 4]
# Per method and metric, the value of each seed. ae differs from sfae in Pixel-AP but not in Image-AUROC.
# random and sfae are different constants in the Dice at the val threshold, and one ae value is undefined.
VALUES = {
    "sfae": {
        "pixel_ap": [0.43, 0.44, 0.42, 0.435, 0.425],
        "dice_at_fpr_test_threshold": [0.33, 0.34, 0.335, 0.332, 0.338],
        "dice_at_fpr_val_threshold": [0.3] * 5,
        "image_auroc": [0.77, 0.78, 0.76, 0.775, 0.765],
    },
    "ae": {
        "pixel_ap": [0.09, 0.10, 0.08, 0.095, 0.085],
        "dice_at_fpr_test_threshold": [0.15, 0.16, 0.14, 0.155, None],
        "dice_at_fpr_val_threshold": [0.12, 0.13, 0.11, 0.125, 0.115],
        "image_auroc": [0.771, 0.779, 0.761, 0.77, 0.768],
    },
    "random": {
        "pixel_ap": [0.019, 0.0191, 0.0189, 0.019, 0.019],
        "dice_at_fpr_test_threshold": [0.028, 0.0281, 0.0279, 0.028, 0.028],
        "dice_at_fpr_val_threshold": [0.03] * 5,
        "image_auroc": [0.5, 0.51, 0.49, 0.505, 0.495],
    },
}
REGISTRY = {"sfae": "sfae", "ae": "ae", "random": "random"}
ORDER = ["sfae", "ae", "random"]


def write_run(folder, method, seed, metrics, experiment="demo", data_note="Demo data: templates."):
    description = {"method": REGISTRY.get(method, method), "settings": {}}
    if method == "sfae":
        description["extractor_weights"] = "imagenet"
    path = folder / f"{method}_{seed}.json"
    write_json({
        "experiment": experiment, "method": method, "seed": seed, "description": description, "data_note": data_note,
        "metrics": metrics, "thresholds": {"test": 0.5, "val": 0.4, "max_fpr": 0.05},
    }, path)
    return path


def write_examples(folder, method, seed, experiment="demo", slices=((("a", 3), ("b", 5)))):
    rng = np.random.default_rng(seed)
    count, size = len(slices), 16
    rows, columns = np.mgrid[:size, :size]
    masks = np.broadcast_to((rows - 8) ** 2 + (columns - 8) ** 2 < 36, (count, size, size)).copy()
    labels = masks & ((rows - 7) ** 2 + (columns - 9) ** 2 < 6)
    path = folder / f"{method}_{seed}.npz"
    write_arrays(
        path,
        index=np.arange(count, dtype=np.int64),
        images=np.where(masks, 0.5, 0.0).astype(np.float32),
        masks=masks,
        labels=labels,
        maps=(labels + rng.random((count, size, size))).astype(np.float32),
        image_scores=rng.random(count),
        subject=np.array([subject for subject, _ in slices]),
        slice_index=np.array([index for _, index in slices], dtype=np.int16),
        val_threshold=np.float64(0.9),
        test_threshold=np.float64(0.95),
        experiment=np.array(experiment),
        method=np.array(method),
        seed=np.array(seed, dtype=np.int64),
    )
    return path


def write_all(folder, values=VALUES, seeds=SEEDS):
    metrics_paths, examples_paths = [], []
    for method, metrics in values.items():
        for position, seed in enumerate(seeds):
            metrics_paths.append(write_run(folder, method, seed, {key: series[position] for key, series in metrics.items()}))
            examples_paths.append(write_examples(folder, method, seed))
    return metrics_paths, examples_paths


def aggregate(folder, metrics_paths, examples_paths, **overrides):
    options = {"experiment": "demo", "reference_method": "sfae", "alpha": 0.05, "t_tests": True, "output_dir": folder / "out", "method_order": ORDER}
    return aggregate_experiment(metrics_paths, examples_paths, **{**options, **overrides})


def read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def finite(series):
    return [value for value in series if value is not None]


@pytest.fixture
def aggregated(tmp_path):
    metrics_paths, examples_paths = write_all(tmp_path)
    return tmp_path / "out", aggregate(tmp_path, metrics_paths, examples_paths)


def test_aggregate_summary_matches_hand_computed(aggregated):
    folder, result = aggregated
    rows = {row["method"]: row for row in read_csv(folder / "summary.csv")}
    assert list(rows) == ["random", "ae", "sfae"]
    for method, metrics in VALUES.items():
        assert rows[method]["n_seeds"] == "5"
        assert rows[method]["seeds"] == "0 1 2 3 4"
        for key, series in metrics.items():
            assert float(rows[method][f"{key}_mean"]) == pytest.approx(statistics.mean(finite(series)), rel=1e-12)
            assert float(rows[method][f"{key}_std"]) == pytest.approx(statistics.stdev(finite(series)), rel=1e-12, abs=1e-15)
            assert int(rows[method][f"{key}_n"]) == len(finite(series))
            assert result["summary"][method][key]["n"] == len(finite(series))


def test_aggregate_per_seed_rows(aggregated):
    folder, _ = aggregated
    rows = read_csv(folder / "results_per_seed.csv")
    assert len(rows) == 15
    assert [row["method"] for row in rows[:5]] == ["random"] * 5
    ae_last = next(row for row in rows if row["method"] == "ae" and row["seed"] == "4")
    assert ae_last["dice_at_fpr_test_threshold"] == "nan"
    assert float(ae_last["pixel_ap"]) == 0.085
    assert float(ae_last["test_threshold"]) == 0.5
    assert float(ae_last["val_threshold"]) == 0.4
    assert ae_last["seconds"] == "nan"


def test_aggregate_welch_p_values_equal_scipy(aggregated):
    folder, _ = aggregated
    rows = {(row["method"], row["metric"]): row for row in read_csv(folder / "t_tests.csv")}
    for method in ("ae", "random"):
        for key in ("pixel_ap", "dice_at_fpr_test_threshold", "image_auroc"):
            expected = stats.ttest_ind(finite(VALUES[method][key]), VALUES["sfae"][key], equal_var=False)
            row = rows[(method, key)]
            assert float(row["p_value"]) == pytest.approx(expected.pvalue, rel=1e-12), (method, key)
            assert float(row["t_statistic"]) == pytest.approx(expected.statistic, rel=1e-12), (method, key)
            assert row["significant"] == str(expected.pvalue <= 0.05)
    assert rows[("ae", "pixel_ap")]["significant"] == "True"
    assert rows[("ae", "image_auroc")]["significant"] == "False"
    assert rows[("ae", "dice_at_fpr_test_threshold")]["method_n"] == "4"
    assert all(row["reference_method"] == "sfae" for row in rows.values())


def test_aggregate_zero_variance_not_testable(aggregated):
    folder, _ = aggregated
    rows = {(row["method"], row["metric"]): row for row in read_csv(folder / "t_tests.csv")}
    constant = rows[("random", "dice_at_fpr_val_threshold")]
    assert constant["p_value"] == "nan"
    assert constant["t_statistic"] == "nan"
    assert constant["testable"] == "False"
    assert constant["significant"] == "False"
    assert "zero variance (different constant values)" in constant["note"]
    # ae varies, so its comparison with the constant reference is testable.
    assert rows[("ae", "dice_at_fpr_val_threshold")]["testable"] == "True"


def test_welch_test_policies():
    same = welch_test([0.5, 0.5], [0.5, 0.5], 0.05)
    assert math.isnan(same["p_value"])
    assert not same["testable"]
    assert "identical constant values" in same["note"]
    short = welch_test([0.5, math.nan], [0.1, 0.2], 0.05)
    assert "fewer than two finite values" in short["note"]
    # p exactly at alpha counts as significant (p <= alpha).
    tested = welch_test([1.0, 2.0, 3.0], [2.0, 4.0, 5.0], 0.05)
    assert tested["significant"] is (tested["p_value"] <= 0.05)
    at_alpha = welch_test([1.0, 2.0, 3.0], [2.0, 4.0, 5.0], tested["p_value"])
    assert at_alpha["significant"]


def test_aggregate_markdown_table(aggregated):
    folder, _ = aggregated
    text = (folder / "summary.md").read_text()
    lines = text.splitlines()
    header = "| Method | Pixel-AP | Dice @ 5 % FPR (test threshold) | Dice @ 5 % FPR (val threshold) | Image-AUROC |"
    start = lines.index(header)
    assert lines[start + 1] == "| --- | --- | --- | --- | --- |"

    def cell(method, key, mark):
        series = finite(VALUES[method][key])
        return f"{statistics.mean(series):.3f} ± {statistics.stdev(series):.3f}{mark}"

    assert lines[start + 2] == (
        f"| random | {cell('random', 'pixel_ap', '*')} | {cell('random', 'dice_at_fpr_test_threshold', '*')} "
        f"| 0.030 ± 0.000 | {cell('random', 'image_auroc', '*')} |"
    )
    assert lines[start + 3] == (
        f"| ae | {cell('ae', 'pixel_ap', '*')} | {cell('ae', 'dice_at_fpr_test_threshold', '*')} "
        f"| {cell('ae', 'dice_at_fpr_val_threshold', '*')} | {cell('ae', 'image_auroc', '')} |"
    )
    assert lines[start + 4] == "| sfae | 0.430 ± 0.008 | 0.335 ± 0.004 | 0.300 ± 0.000 | 0.770 ± 0.008 |"
    assert "5 seeds (0, 1, 2, 3, 4)" in text
    assert "sample standard deviation (ddof = 1)" in text
    assert "Marked with *: differs significantly from sfae (two-sided Welch t-test, p <= 0.05)." in text
    assert "leaks test information" in text
    assert "Feature-extractor weights: sfae: imagenet." in text
    assert "> **Data note.** Demo data: templates." in text
    assert "Not testable (t and p reported as NaN in t_tests.csv): random dice_at_fpr_val_threshold." in text


def test_aggregate_writes_figures(aggregated):
    folder, result = aggregated
    for name in ("bar_chart", "qualitative"):
        path = folder / OUTPUT_FILES[name]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = imread(path).shape[:2]
        assert height > 100
        assert width > 200
        assert result["outputs"][name] == str(path)
    assert sorted(path.name for path in folder.iterdir()) == sorted(OUTPUT_FILES.values())


def test_aggregate_one_seed_needs_t_tests_off(tmp_path):
    metrics_paths, examples_paths = write_all(tmp_path, seeds=[7])
    with pytest.raises(InvalidInputError, match=r"t-tests need at least two seeds per method.*'sfae': \[7\]"):
        aggregate(tmp_path, metrics_paths, examples_paths)

    result = aggregate(tmp_path, metrics_paths, examples_paths, t_tests=False)
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "| sfae | 0.430 | 0.330 | 0.300 | 0.770 |" in text
    assert "No t-tests were run" in text
    assert result["t_tests"] == []
    assert read_csv(tmp_path / "out" / "t_tests.csv") == []


def test_aggregate_other_experiment_names_file(tmp_path):
    metrics_paths, examples_paths = write_all(tmp_path)
    stray = write_run(tmp_path / "other", "ae", 9, {"pixel_ap": 0.1}, experiment="brats")
    with pytest.raises(InvalidInputError, match=r"metrics file .*other/ae_9\.json belongs to experiment 'brats'"):
        aggregate(tmp_path, [*metrics_paths, stray], examples_paths)


def test_aggregate_missing_file_names_it(tmp_path):
    metrics_paths, examples_paths = write_all(tmp_path)
    with pytest.raises(InvalidInputError, match=r"metrics file not found: .*missing\.json"):
        aggregate(tmp_path, [*metrics_paths, tmp_path / "missing.json"], examples_paths)


def test_aggregate_duplicate_run_raises(tmp_path):
    metrics_paths, examples_paths = write_all(tmp_path)
    copy = tmp_path / "copy"
    duplicate = write_run(copy, "ae", 0, {"pixel_ap": 0.1})
    with pytest.raises(InvalidInputError, match=r"both method ae, seed 0"):
        aggregate(tmp_path, [*metrics_paths, duplicate], examples_paths)


def test_aggregate_unknown_method_raises(tmp_path):
    metrics_paths, examples_paths = write_all(tmp_path)
    with pytest.raises(InvalidInputError, match=r"methods \['random'\] .* are not in method_order"):
        aggregate(tmp_path, metrics_paths, examples_paths, method_order=["sfae", "ae"])
    with pytest.raises(InvalidInputError, match=r"reference method 'vae' has no metrics file"):
        aggregate(tmp_path, metrics_paths, examples_paths, reference_method="vae")


def test_aggregate_different_seed_sets_warn(tmp_path, caplog):
    metrics_paths, examples_paths = write_all(tmp_path)
    extra = write_run(tmp_path, "ae", 5, {key: series[0] for key, series in VALUES["ae"].items()})
    with caplog.at_level(logging.WARNING, logger="sfae.evaluation.aggregate"):
        result = aggregate(tmp_path, [*metrics_paths, extra], examples_paths)
    assert "different seeds" in caplog.text
    assert result["seeds"]["ae"] == [0, 1, 2, 3, 4, 5]
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "ae: 6 seeds (0, 1, 2, 3, 4, 5)" in text
    assert "The methods were run with different seeds" in text


def test_aggregate_examples_of_other_slices_raise(tmp_path):
    metrics_paths, examples_paths = write_all(tmp_path)
    write_examples(tmp_path, "ae", 0, slices=(("a", 3), ("b", 6)))
    with pytest.raises(InvalidInputError, match=r"example files .*random_0\.npz and .*ae_0\.npz show different slices"):
        aggregate(tmp_path, metrics_paths, examples_paths)


def test_aggregate_missing_examples_raise(tmp_path):
    metrics_paths, examples_paths = write_all(tmp_path)
    without_ae = [path for path in examples_paths if not path.name.startswith("ae_")]
    with pytest.raises(InvalidInputError, match=r"no example file for methods \['ae'\]"):
        aggregate(tmp_path, metrics_paths, without_ae)


class MapsFromImages(AnomalyMethod):
    """A fake method whose anomaly map is its input plus seeded noise."""

    name = "maps_from_images"
    trainable = False

    def __init__(self, seed) -> None:
        super().__init__({}, seed=seed, image_size=16)
        self.noise = np.random.default_rng(seed)

    def predict(self, images, masks, slice_index=None):
        noise = self.noise.normal(scale=0.3, size=tuple(images.shape)).astype(np.float32)
        return Prediction(maps=images + images.new_tensor(noise))


def test_aggregate_evaluated_runs(tmp_path):
    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[:16, :16]
    masks = np.broadcast_to((rows - 8) ** 2 + (columns - 8) ** 2 < 40, (12, 16, 16)).copy()
    labels = masks & ((rows - 6) ** 2 + (columns - 9) ** 2 < 8) & (np.arange(12) % 2 == 0)[:, None, None]
    split = {
        "images": (labels + 0.1 * rng.random(labels.shape)).astype(np.float32),
        "masks": masks,
        "labels": labels,
        "slice_index": np.tile(np.arange(6, dtype=np.int16), 2),
        "subject": np.repeat(np.array(["s1", "s2"]), 6),
    }
    write_arrays(tmp_path / "val.npz", **split)
    write_arrays(tmp_path / "test.npz", **split)
    metrics_paths, examples_paths = [], []
    for name in ("random", "maps"):
        for seed in (0, 1):
            method = build_method("random", {}, seed=seed, image_size=16) if name == "random" else MapsFromImages(seed)
            folder = tmp_path / name / str(seed)
            evaluate_files(
                method, tmp_path / "val.npz", tmp_path / "test.npz", folder / "metrics.json", folder / "examples.npz",
                experiment="demo", method_name=name, seed=seed, data_note="Demo data.", device="cpu",
            )
            metrics_paths.append(folder / "metrics.json")
            examples_paths.append(folder / "examples.npz")

    result = aggregate_experiment(
        metrics_paths, examples_paths, experiment="demo", reference_method="maps", alpha=0.05, t_tests=True,
        output_dir=tmp_path / "out", method_order=["maps", "random"],
    )
    assert result["methods"] == ["random", "maps"]
    assert result["summary"]["maps"]["pixel_ap"]["mean"] > result["summary"]["random"]["pixel_ap"]["mean"]
    assert (tmp_path / "out" / "qualitative.png").stat().st_size > 1000
