"""Configuration schema and cross-key rules."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from sfae.config import FITTED_METHODS, ConfigError, dataset_root, load_config, validate_config
from sfae.models import METHODS

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture()
def demo_config() -> dict:
    return load_config(REPOSITORY / "config" / "config.yaml")


@pytest.fixture()
def paper_config() -> dict:
    return load_config(REPOSITORY / "config" / "paper.yaml")


def test_config_shipped_files_valid(demo_config, paper_config):
    assert demo_config["datasets"]["demo"]["layout"] == "demo"
    assert set(paper_config["datasets"]) == {"mood", "camcan", "brats2020"}


def test_config_paper_protocol_settings(paper_config):
    mood = paper_config["datasets"]["mood"]
    assert mood["split"] == {"train": 640, "val": 16, "test": 144}
    assert mood["anomalies"] == {"kind": "sink", "fraction": 0.5, "radius_px": [10, 20]}
    assert paper_config["datasets"]["brats2020"]["split"]["val"] == 36
    assert paper_config["preprocessing"]["slices"] == {"start": 55, "stop": 135, "size": 128}
    assert paper_config["experiments"]["brats"] == {"train": "camcan", "evaluate": "brats2020"}


def test_config_unknown_key_rejected(demo_config):
    demo_config["preprocessing"]["slices"]["strat"] = 3
    with pytest.raises(ConfigError, match=r"unknown key at preprocessing\.slices.*strat"):
        validate_config(demo_config)


def test_config_unknown_top_level_key_rejected(demo_config):
    demo_config["resluts"] = "x"
    with pytest.raises(ConfigError, match=r"unknown key at the top level.*resluts"):
        validate_config(demo_config)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("preprocessing", "slices", "size"), 8, r"preprocessing\.slices\.size"),
        (("preprocessing", "registration", "min_dice"), 1.5, r"preprocessing\.registration\.min_dice"),
        (("datasets", "demo", "layout"), "nifti", r"datasets\.demo\.layout"),
        (("datasets", "demo", "split", "val"), "some", r"datasets\.demo\.split\.val"),
        (("datasets", "demo", "anomalies", "kind"), "blob", r"datasets\.demo\.anomalies"),
        (("datasets", "demo", "seed"), -1, r"datasets\.demo\.seed"),
    ],
)
def test_config_invalid_value_named(demo_config, path, value, message):
    target = demo_config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(demo_config)


def test_config_split_size_error_says_what_is_allowed(demo_config):
    demo_config["datasets"]["demo"]["split"]["train"] = "all"
    with pytest.raises(ConfigError, match=r"split\.train: 'all' is not allowed here\. Number of subjects in this split, or \"rest\""):
        validate_config(demo_config)


def test_config_slice_range_ordered(demo_config):
    demo_config["preprocessing"]["slices"]["stop"] = 55
    with pytest.raises(ConfigError, match=r"stop \(55\) must be greater than start \(55\)"):
        validate_config(demo_config)


def test_config_levels_must_match(demo_config):
    demo_config["preprocessing"]["registration"]["smoothing_sigmas_mm"] = [2.0, 1.0]
    with pytest.raises(ConfigError, match="one entry per resolution level"):
        validate_config(demo_config)


def test_config_demo_layout_rejects_file_keys(demo_config):
    demo_config["datasets"]["demo"]["skull_stripped"] = True
    with pytest.raises(ConfigError, match="demo layout sets skull_stripped per volume"):
        validate_config(demo_config)


def test_config_other_layouts_need_file_keys(paper_config):
    del paper_config["datasets"]["camcan"]["registered"]
    with pytest.raises(ConfigError, match=r"datasets\.camcan: layout bids needs the keys registered"):
        validate_config(paper_config)


def test_config_single_rest_split(demo_config):
    demo_config["datasets"]["demo"]["split"]["val"] = "rest"
    with pytest.raises(ConfigError, match="at most one split may be 'rest'"):
        validate_config(demo_config)


def test_config_radius_range_ordered(demo_config):
    demo_config["datasets"]["demo"]["anomalies"]["radius_px"] = [20, 10]
    with pytest.raises(ConfigError, match=r"low \(20\) must not exceed high \(10\)"):
        validate_config(demo_config)


def test_config_segmented_data_rejects_anomalies(paper_config):
    paper_config["datasets"]["brats2020"]["anomalies"] = {"kind": "sink", "fraction": 0.5, "radius_px": [10, 20]}
    with pytest.raises(ConfigError, match="evaluated on its real lesions"):
        validate_config(paper_config)


def test_config_experiment_unknown_dataset(paper_config):
    paper_config["experiments"]["brats"]["evaluate"] = "brats2021"
    with pytest.raises(ConfigError, match="unknown data set 'brats2021'"):
        validate_config(paper_config)


def test_config_experiment_needs_split(paper_config):
    paper_config["experiments"]["brats"]["train"] = "brats2020"
    with pytest.raises(ConfigError, match="has no train split"):
        validate_config(paper_config)


def test_config_evaluation_needs_lesions(paper_config):
    paper_config["datasets"]["mood"]["anomalies"] = None
    with pytest.raises(ConfigError, match="neither segmentations nor synthetic anomalies"):
        validate_config(paper_config)


def test_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_not_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("results: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_config_dataset_root_relative_to_data_root(paper_config):
    paper_config["data_root"] = "/data"
    assert dataset_root(paper_config, "mood") == Path("/data/MOOD/brain_train")
    paper_config["datasets"]["mood"]["path"] = "/elsewhere/mood"
    assert dataset_root(paper_config, "mood") == Path("/elsewhere/mood")


def test_config_schema_documents_every_key():
    """Every property of the schema carries a description (the schema is the reference for users)."""
    schema = yaml.safe_load((REPOSITORY / "config" / "schema.yaml").read_text())
    undocumented = []

    def visit(node, where):
        if isinstance(node, dict):
            for name, child in node.get("properties", {}).items():
                child_has_own = isinstance(child, dict) and ("description" in child or "$ref" in child)
                nested = isinstance(child, dict) and "properties" in child
                if not child_has_own and not nested:
                    undocumented.append(f"{where}.{name}")
                visit(child, f"{where}.{name}")
            for key in ("$defs", "additionalProperties", "items"):
                if isinstance(node.get(key), dict):
                    visit(node[key], where)
            for child in node.get("$defs", {}).values():
                visit(child, where)

    visit(copy.deepcopy(schema), "config")
    assert undocumented == []


def test_config_t_tests_need_two_seeds(demo_config):
    demo_config["training"]["seeds"] = [0]
    with pytest.raises(ConfigError, match="Welch t-tests need at least two"):
        validate_config(demo_config)
    demo_config["evaluation"]["t_tests"] = False
    validate_config(demo_config)


def test_config_reference_method_configured(demo_config):
    del demo_config["methods"]["sfae"]
    with pytest.raises(ConfigError, match=r"evaluation.reference_method 'sfae' is not among the configured methods \(ae_mse, ae_ssim, .*, random\)"):
        validate_config(demo_config)


def test_config_unknown_method_rejected(demo_config):
    demo_config["methods"]["sfea"] = {}
    with pytest.raises(ConfigError, match=r"unknown key at methods.*sfea"):
        validate_config(demo_config)


def test_config_method_settings_checked(demo_config):
    demo_config["methods"]["sfae"]["layers"] = ["layer4"]
    with pytest.raises(ConfigError, match=r"methods\.sfae\.layers\.0"):
        validate_config(demo_config)


def test_config_duplicate_seeds_rejected(demo_config):
    demo_config["training"]["seeds"] = [0, 0]
    with pytest.raises(ConfigError, match=r"training\.seeds"):
        validate_config(demo_config)


def test_config_paper_training_budget(paper_config):
    assert paper_config["training"]["steps"] == 10000
    assert paper_config["training"]["batch_size"] == 64
    assert paper_config["training"]["learning_rate"] == 0.0002
    assert paper_config["training"]["seeds"] == [0, 1, 2, 3, 4]
    assert paper_config["methods"]["sfae"]["weights"] == "imagenet"


@pytest.mark.parametrize(
    ("method", "key", "value", "message"),
    [
        ("ae_ssim", "window_size", 10, r"methods\.ae_ssim\.window_size: 10 is not allowed here\. .*an odd number"),
        ("dfr_ssim", "window_size", 4, r"methods\.dfr_ssim\.window_size: 4 is not allowed here\. .*an odd number"),
        ("vae", "combi_window_size", 6, r"methods\.vae\.combi_window_size: 6 is not allowed here\. .*an odd number"),
        ("vae", "normalization", "group", r"methods\.vae\.normalization"),
        ("fpi", "image_score", "max", r"methods\.fpi\.image_score"),
        ("pii", "alpha_range", [0.5], r"methods\.pii\.alpha_range"),
        ("fanogan", "gan_fraction", 1.0, r"methods\.fanogan\.gan_fraction"),
        ("dfr", "layers", ["relu6_1"], r"methods\.dfr\.layers\.0"),
        ("bm", "std_floor", 0.0, r"methods\.bm\.std_floor"),
    ],
)
def test_config_baseline_setting_checked(demo_config, method, key, value, message):
    demo_config["methods"][method][key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(demo_config)


@pytest.mark.parametrize(
    ("method", "key"),
    [
        # The workflow sets f-AnoGAN's total_steps from the run's steps.
        ("fanogan", "total_steps"),
        # window_size belongs to dfr_ssim only, although both share the dfr settings.
        ("dfr", "window_size"),
        ("dfr_ssim", "windows"),
        ("bm", "steps"),
    ],
)
def test_config_baseline_unknown_setting_rejected(demo_config, method, key):
    demo_config["methods"][method][key] = 5
    with pytest.raises(ConfigError, match=rf"unknown key at methods\.{method}: .*'{key}' was unexpected"):
        validate_config(demo_config)


def test_fitted_methods_match_registry():
    """The workflow's list of fitted methods (no GPU job) is the registry's set of non-trainable methods."""
    assert FITTED_METHODS == {name for name, method in METHODS.items() if not method.trainable}
