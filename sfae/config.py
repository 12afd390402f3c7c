"""Loading and validating the workflow configuration.

The JSON schema in ``config/schema.yaml`` fixes every key, type and range and
rejects unknown keys. :func:`validate_config` applies it, then checks the rules
that a schema cannot express (references between data sets and experiments,
per-layout keys, ordered ranges). Errors name the offending key and value.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

logger = logging.getLogger(__name__)

REPOSITORY = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPOSITORY / "config" / "schema.yaml"
SPLITS = ("train", "val", "test")
# Methods fitted once on the training slices instead of trained by gradient
# steps (``trainable = False`` in :mod:`sfae.models`). The workflow fits them in
# a rule without a GPU. The list lives here, so that building the job graph
# does not import torch.
FITTED_METHODS = frozenset({"bm", "random"})

# Keys that describe a data set's files; the demo layout fixes them per volume.
FILE_KEYS = ("path", "skull_stripped", "registered", "segmentations")


class ConfigError(ValueError):
    """Raised for an invalid configuration; the message names the key and the fix."""


def load_schema() -> dict[str, Any]:
    """Return the configuration schema as a dictionary."""
    with open(SCHEMA_PATH) as stream:
        return yaml.safe_load(stream)


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML configuration file and validate it.

    Raises:
        ConfigError: If the file is missing, not YAML, or invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    try:
        with open(path) as stream:
            config = yaml.safe_load(stream)
    except yaml.YAMLError as error:
        raise ConfigError(f"configuration file {path} is not valid YAML: {error}") from error
    validate_config(config, source=str(path))
    return config


def _key_path(error: jsonschema.ValidationError) -> str:
    """Return the dotted key path of a schema error, or 'the top level'."""
    return ".".join(str(part) for part in error.absolute_path) or "the top level"


def validate_config(config: Any, source: str = "the configuration") -> None:
    """Validate a configuration against the schema and the cross-key rules.

    Args:
        config: Parsed configuration.
        source: Where the configuration came from, for messages.

    Raises:
        ConfigError: Naming the first invalid key, its value and the rule.
    """
    # 1. The schema: types, ranges, enums, unknown keys.
    validator = jsonschema.Draft202012Validator(load_schema())
    # An invalid value inside an allOf also makes every key of that branch
    # "unevaluated", so those errors come last: the invalid value is the cause.
    errors = sorted(
        validator.iter_errors(config),
        key=lambda error: (error.validator == "unevaluatedProperties", len(error.absolute_path), list(map(str, error.absolute_path))),
    )
    if errors:
        error = errors[0]
        if error.validator in ("additionalProperties", "unevaluatedProperties"):
            raise ConfigError(f"{source}: unknown key at {_key_path(error)}: {error.message}; see config/schema.yaml for the valid keys")
        message = error.message
        if error.validator in ("oneOf", "anyOf", "not") and "description" in error.schema:
            # "is not valid under any of the given schemas" does not say what is valid.
            allowed = " ".join(error.schema["description"].split())
            message = f"{error.instance!r} is not allowed here. {allowed}"
        raise ConfigError(f"{source}: invalid value at {_key_path(error)}: {message}")

    # 2. Rules across keys.
    for name, dataset in config["datasets"].items():
        _validate_dataset(name, dataset, source)

    slices = config["preprocessing"]["slices"]
    if slices["stop"] <= slices["start"]:
        raise ConfigError(f"{source}: preprocessing.slices.stop ({slices['stop']}) must be greater than start ({slices['start']})")

    registration = config["preprocessing"]["registration"]
    if len(registration["shrink_factors"]) != len(registration["smoothing_sigmas_mm"]):
        raise ConfigError(
            f"{source}: preprocessing.registration.shrink_factors and smoothing_sigmas_mm need one entry per "
            f"resolution level, got {len(registration['shrink_factors'])} and {len(registration['smoothing_sigmas_mm'])}"
        )

    skull_strip = config["preprocessing"]["skull_strip"]
    if skull_strip["min_brain_volume_ml"] >= skull_strip["max_brain_volume_ml"]:
        raise ConfigError(f"{source}: preprocessing.skull_strip.min_brain_volume_ml must be below max_brain_volume_ml")

    for name, experiment in config["experiments"].items():
        _validate_experiment(name, experiment, config["datasets"], source)

    evaluation = config["evaluation"]
    if evaluation["reference_method"] not in config["methods"]:
        raise ConfigError(
            f"{source}: evaluation.reference_method {evaluation['reference_method']!r} is not among the configured "
            f"methods ({', '.join(config['methods'])}); add it to methods or choose another"
        )
    seeds = config["training"]["seeds"]
    if evaluation["t_tests"] and len(seeds) < 2:
        raise ConfigError(
            f"{source}: training.seeds has {len(seeds)} seed, but the Welch t-tests need at least two; "
            "add seeds or set evaluation.t_tests to false"
        )


def _validate_dataset(name: str, dataset: Mapping[str, Any], source: str) -> None:
    """Check the per-layout keys, the split sizes and the anomaly settings of one data set."""
    prefix = f"{source}: datasets.{name}"
    if dataset["layout"] == "demo":
        present = [key for key in FILE_KEYS if key in dataset]
        if present:
            raise ConfigError(
                f"{prefix}: the demo layout sets {', '.join(present)} per volume from its catalogue; remove these keys"
            )
    else:
        missing = [key for key in (*FILE_KEYS, "modality") if key not in dataset]
        if missing:
            raise ConfigError(f"{prefix}: layout {dataset['layout']} needs the keys {', '.join(missing)}")

    rest = [split for split in SPLITS if dataset["split"][split] == "rest"]
    if len(rest) > 1:
        raise ConfigError(f"{prefix}.split: at most one split may be 'rest', got {', '.join(rest)}")

    anomalies = dataset.get("anomalies")
    if anomalies is not None:
        low, high = anomalies["radius_px"]
        if low > high:
            raise ConfigError(f"{prefix}.anomalies.radius_px: low ({low}) must not exceed high ({high})")
        if dataset.get("segmentations", False):
            raise ConfigError(
                f"{prefix}: a data set with segmentations is evaluated on its real lesions; set anomalies: null"
            )


def _validate_experiment(name: str, experiment: Mapping[str, str], datasets: Mapping[str, Any], source: str) -> None:
    """Check that an experiment refers to data sets that have the splits it needs."""
    prefix = f"{source}: experiments.{name}"
    for role, needed in (("train", ("train",)), ("evaluate", ("val", "test"))):
        dataset_name = experiment[role]
        if dataset_name not in datasets:
            raise ConfigError(f"{prefix}.{role}: unknown data set {dataset_name!r}; known: {', '.join(sorted(datasets))}")
        dataset = datasets[dataset_name]
        for split in needed:
            if dataset["split"][split] == 0:
                raise ConfigError(f"{prefix}.{role}: data set {dataset_name!r} has no {split} split (datasets.{dataset_name}.split.{split} is 0)")
        if role == "evaluate" and not has_lesions(dataset):
            raise ConfigError(
                f"{prefix}.evaluate: data set {dataset_name!r} has neither segmentations nor synthetic anomalies; "
                f"set datasets.{dataset_name}.anomalies"
            )


def has_lesions(dataset: Mapping[str, Any]) -> bool:
    """Return whether a data set's evaluation splits contain anomalies (real or synthetic)."""
    return bool(dataset.get("segmentations", False)) or dataset.get("anomalies") is not None


def dataset_root(config: Mapping[str, Any], name: str) -> Path:
    """Return a data set's root folder, resolving a relative path against ``data_root``."""
    path = Path(os.path.expanduser(config["datasets"][name]["path"]))
    if path.is_absolute():
        return path
    return Path(os.path.expanduser(config["data_root"])) / path


def evaluation_datasets(config: Mapping[str, Any]) -> list[str]:
    """Return the sorted names of data sets evaluated by some experiment."""
    return sorted({experiment["evaluate"] for experiment in config["experiments"].values()})


def training_datasets(config: Mapping[str, Any]) -> list[str]:
    """Return the sorted names of data sets trained on by some experiment."""
    return sorted({experiment["train"] for experiment in config["experiments"].values()})
