"""Configuration validation, subject discovery, output paths and input functions.

The configuration is validated against config/schema.yaml before anything else,
so a misspelt key or an invalid value stops the workflow with a message that
names it, before any job runs.
"""

import os
import sys
from pathlib import Path

# Jobs import the sfae package from this checkout, whether or not it is
# installed in the job's environment (conda environments hold only the
# dependencies): Snakemake passes this process's sys.path on to every Python
# script it runs.
REPOSITORY = Path(workflow.basedir).resolve()
sys.path.insert(0, str(REPOSITORY))

from sfae import demo_data
from sfae.config import FITTED_METHODS, SPLITS, ConfigError, evaluation_datasets, training_datasets, validate_config
from sfae.io import InvalidInputError
from sfae.layouts import SUBJECT_ID_PATTERN, discover_subjects
from sfae.splits import assign_splits

try:
    validate_config(config, source="workflow configuration")
except ConfigError as error:
    raise WorkflowError(str(error)) from None


RESULTS = config["results"].rstrip("/")
DEMO_CACHE = config["demo_cache"].rstrip("/")
TRAINING_DATASETS = training_datasets(config)
EVALUATION_DATASETS = evaluation_datasets(config)
USED_DATASETS = sorted(set(TRAINING_DATASETS) | set(EVALUATION_DATASETS))
ANOMALY_KINDS = ("sink", "source")


def _discover_all():
    """Subjects of every used data set; the errors of all data sets are reported together."""
    subjects, errors = {}, []
    for dataset in USED_DATASETS:
        try:
            subjects[dataset] = {subject.id: subject for subject in discover_subjects(config, dataset)}
        except InvalidInputError as error:
            errors.append(str(error))
    if errors:
        raise WorkflowError("\n".join(errors))
    return subjects


SUBJECTS = _discover_all()


def _assign(dataset):
    settings = config["datasets"][dataset]
    groups = {subject_id: subject.group for subject_id, subject in SUBJECTS[dataset].items()}
    try:
        return assign_splits(groups, settings["split"], settings["seed"], dataset)
    except InvalidInputError as error:
        raise WorkflowError(str(error)) from None


SPLIT_SUBJECTS = {dataset: _assign(dataset) for dataset in USED_DATASETS}


def _needed_splits(dataset):
    needed = set()
    if dataset in TRAINING_DATASETS:
        needed.add("train")
    if dataset in EVALUATION_DATASETS:
        needed.update(("val", "test"))
    return sorted(needed)


for _dataset in USED_DATASETS:
    for _split in _needed_splits(_dataset):
        if not SPLIT_SUBJECTS[_dataset][_split]:
            raise WorkflowError(
                f"data set {_dataset}: the {_split} split is empty ({len(SUBJECTS[_dataset])} subjects found); "
                f"adjust datasets.{_dataset}.split in the config"
            )


EXPERIMENTS = sorted(config["experiments"])
METHODS = list(config["methods"])
# Wildcard patterns of the methods trained by gradient steps and of the fitted
# ones; "(?!)" matches nothing when a group is empty.
TRAINED_METHOD_PATTERN = "|".join(method for method in METHODS if method not in FITTED_METHODS) or "(?!)"
FITTED_METHOD_PATTERN = "|".join(method for method in METHODS if method in FITTED_METHODS) or "(?!)"
SEEDS = config["training"]["seeds"]


wildcard_constraints:
    dataset="|".join(USED_DATASETS),
    experiment="|".join(EXPERIMENTS),
    method="|".join(METHODS),
    seed=r"\d+",
    subject=SUBJECT_ID_PATTERN.pattern.strip("^$"),
    split="|".join(SPLITS),
    kind="|".join(ANOMALY_KINDS),


# Output paths. Logs and benchmarks mirror them under logs/ and benchmarks/.
VOLUME = f"{RESULTS}/{{dataset}}/volumes/{{subject}}"
SPLIT_FILE = f"{RESULTS}/{{dataset}}/splits/{{split}}.npz"
ANOMALY_FILE = f"{RESULTS}/{{dataset}}/splits/{{split}}_{{kind}}.npz"
RUN = f"{RESULTS}/experiments/{{experiment}}/{{method}}/seed{{seed}}"
REPORT = f"{RESULTS}/experiments/{{experiment}}/report"
REPORT_FILES = ("summary.md", "summary.csv", "results_per_seed.csv", "t_tests.csv", "bar_chart.png", "qualitative.png")
LOGS = f"{RESULTS}/logs"
BENCHMARKS = f"{RESULTS}/benchmarks"


def atlas_path():
    """The skull-stripped atlas: the configured file, or the SRI24 T1 from the demo cache."""
    if config["atlas"]["path"] is not None:
        return os.path.expanduser(config["atlas"]["path"])
    return str(demo_data.demo_path(DEMO_CACHE, demo_data.ATLAS_KEY))


def get_subject(wildcards):
    """The Subject record of a job's data set and subject wildcards."""
    return SUBJECTS[wildcards.dataset][wildcards.subject]


def get_raw_image(wildcards):
    return str(get_subject(wildcards).image)


def get_brain_extraction_method(wildcards):
    return "nonzero" if get_subject(wildcards).skull_stripped else "robex"


def get_registration_inputs(wildcards):
    """Brain, mask and atlas of one scan, plus its segmentation when it has one."""
    inputs = {
        "brain": f"{RESULTS}/{wildcards.dataset}/volumes/{wildcards.subject}/brain.nii.gz",
        "mask": f"{RESULTS}/{wildcards.dataset}/volumes/{wildcards.subject}/brain_mask.nii.gz",
        "atlas": atlas_path(),
    }
    segmentation = get_subject(wildcards).segmentation
    if segmentation is not None:
        inputs["segmentation"] = str(segmentation)
    return inputs


def get_split_slices(wildcards):
    """Slice files of the subjects in one split, in subject order."""
    return [
        f"{RESULTS}/{wildcards.dataset}/volumes/{subject}/slices.npz"
        for subject in SPLIT_SUBJECTS[wildcards.dataset][wildcards.split]
    ]


def get_dataset_registration_reports(wildcards):
    """Registration reports of every subject of a data set that some split uses."""
    subjects = sorted(subject for split in SPLITS for subject in SPLIT_SUBJECTS[wildcards.dataset][split])
    return [f"{RESULTS}/{wildcards.dataset}/volumes/{subject}/registration.json" for subject in subjects]


def get_anomaly_settings(wildcards):
    return config["datasets"][wildcards.dataset]["anomalies"]


def get_dataset_seed(wildcards):
    return config["datasets"][wildcards.dataset]["seed"]


def evaluation_file(dataset, split):
    """The file a method is evaluated on: the split with synthetic anomalies, or the split itself."""
    anomalies = config["datasets"][dataset].get("anomalies")
    if anomalies is None:
        return SPLIT_FILE.format(dataset=dataset, split=split)
    return ANOMALY_FILE.format(dataset=dataset, split=split, kind=anomalies["kind"])


def training_file(dataset):
    return SPLIT_FILE.format(dataset=dataset, split="train")


def preprocessing_targets():
    """Every file that training and evaluation read, plus the registration QC tables."""
    targets = [training_file(dataset) for dataset in TRAINING_DATASETS]
    targets += [evaluation_file(dataset, split) for dataset in EVALUATION_DATASETS for split in ("val", "test")]
    targets += [f"{RESULTS}/{dataset}/registration_qc.csv" for dataset in USED_DATASETS]
    return targets


def get_training_split(wildcards):
    return training_file(config["experiments"][wildcards.experiment]["train"])


def get_evaluation_splits(wildcards):
    dataset = config["experiments"][wildcards.experiment]["evaluate"]
    return {"val": evaluation_file(dataset, "val"), "test": evaluation_file(dataset, "test")}


def get_method_training(wildcards):
    """Training settings of one method: the shared ones with its own steps and batch size, when set."""
    training = dict(config["training"])
    method = config["methods"][wildcards.method]
    for key in ("steps", "batch_size"):
        if key in method:
            training[key] = method[key]
    return training


def get_method_settings(wildcards):
    """A method's own settings, without the training overrides.

    f-AnoGAN splits its steps between the GAN and the encoder, so it also gets
    the number of steps of its run as ``total_steps``.
    """
    settings = {key: value for key, value in config["methods"][wildcards.method].items() if key not in ("steps", "batch_size")}
    if wildcards.method == "fanogan":
        settings["total_steps"] = get_method_training(wildcards)["steps"]
    return settings


def get_data_note(wildcards):
    """The demo data note when an experiment trains or evaluates on demo volumes, else None."""
    experiment = config["experiments"][wildcards.experiment]
    layouts = {config["datasets"][experiment[role]]["layout"] for role in ("train", "evaluate")}
    return demo_data.DEMO_DATA_NOTE if "demo" in layouts else None


def get_experiment_runs(wildcards):
    """Metrics and examples of every method and seed of one experiment."""
    runs = [f"{RESULTS}/experiments/{wildcards.experiment}/{method}/seed{seed}" for method in METHODS for seed in SEEDS]
    return {"metrics": [f"{run}/metrics.json" for run in runs], "examples": [f"{run}/examples.npz" for run in runs]}


def report_targets():
    return [f"{RESULTS}/experiments/{experiment}/report/{name}" for experiment in EXPERIMENTS for name in REPORT_FILES]


def all_targets():
    return preprocessing_targets() + report_targets()
