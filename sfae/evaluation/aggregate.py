"""Aggregation of every run of an experiment into the results table, Welch t-tests and figures.

Each run (method and training seed) wrote a metrics file and an example file
(:func:`sfae.evaluation.evaluate.evaluate_files`). Per method this module
reports the mean and the sample standard deviation (``ddof = 1``) over seeds.
Meissen et al. (2022) report "mean +- std" over 5 seeds without saying which
standard deviation. Their public code (FeliMe/feature-autoencoder) contains no
script that aggregates seeds, so this could not be checked. ddof = 1 is the
unbiased variance that the Welch t-test uses as well.

Significance: a two-sided Welch t-test (``scipy.stats.ttest_ind(...,
equal_var=False)``) compares every method with the reference method per
metric; ``p <= alpha`` is significant, as in the published protocol. Policy
for tests that cannot be run: when either method has fewer than two finite
values, or both have zero variance, the Welch statistic is undefined. SciPy
1.17 then returns NaN, or an infinite t with p = 0 for two different
constants. Such a test is reported with t and p as NaN, marked "not
testable", and never counted as significant.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from sfae import plotting
from sfae.io import InvalidInputError, atomic_output, read_arrays

logger = logging.getLogger(__name__)

# Significance level of the published protocol (two-sided Welch t-test, p <= 0.05).
DEFAULT_ALPHA = 0.05
# Pixel FPR of the thresholds, for metrics files that do not record it (5 % in the published protocol).
DEFAULT_MAX_FPR = 0.05
# Decimals of the published results table ("0.431 +- 0.007").
DECIMALS = 3
SIGNIFICANCE_MARK = "*"
# Registry name of the Random floor, listed first as in the published table.
FLOOR_METHOD = "random"

OUTPUT_FILES = {
    "results_per_seed": "results_per_seed.csv",
    "summary_csv": "summary.csv",
    "summary_md": "summary.md",
    "t_tests": "t_tests.csv",
    "bar_chart": "bar_chart.png",
    "qualitative": "qualitative.png",
}
# Columns of the results table, as in the published table plus the Dice at the validation threshold.
TABLE_METRICS = ("pixel_ap", "dice_at_fpr_test_threshold", "dice_at_fpr_val_threshold", "image_auroc")
# Metrics compared with the reference method by a Welch t-test.
TESTED_METRICS = (*TABLE_METRICS, "pixel_auroc", "mean_volume_dice_test_threshold", "mean_volume_dice_val_threshold")
T_TEST_COLUMNS = (
    "method", "metric", "reference_method", "reference_mean", "method_mean", "reference_n", "method_n",
    "t_statistic", "p_value", "significant", "testable", "note",
)
_REQUIRED_KEYS = ("experiment", "method", "seed", "metrics")


@dataclass(frozen=True)
class Run:
    """The metrics file of one method and seed."""

    path: Path
    method: str
    seed: int
    metrics: dict[str, float]
    description: dict[str, Any]
    data_note: str | None
    max_fpr: float
    thresholds: dict[str, float]
    seconds: float


def table_labels(max_fpr: float) -> dict[str, str]:
    """Return the column title of each table metric."""
    fpr = f"{100 * max_fpr:g} % FPR"
    return {
        "pixel_ap": "Pixel-AP",
        "dice_at_fpr_test_threshold": f"Dice @ {fpr} (test threshold)",
        "dice_at_fpr_val_threshold": f"Dice @ {fpr} (val threshold)",
        "image_auroc": "Image-AUROC",
    }


def load_run(path: str | os.PathLike[str], experiment: str) -> Run:
    """Read one metrics file and check that it belongs to ``experiment``.

    Raises:
        InvalidInputError: If the file is missing, not JSON, lacks a key, or
            belongs to another experiment. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"metrics file not found: {path}; rerun the evaluation of that method and seed")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"cannot read metrics file {path}: {error}; delete it and rerun the evaluation") from error
    missing = [key for key in _REQUIRED_KEYS if not isinstance(record, dict) or key not in record]
    if missing:
        raise InvalidInputError(f"metrics file {path} lacks {missing}; it was not written by sfae.evaluation.evaluate")
    if record["experiment"] != experiment:
        raise InvalidInputError(
            f"metrics file {path} belongs to experiment {record['experiment']!r}, not {experiment!r}; "
            "pass only the metrics files of this experiment"
        )
    metrics = {key: math.nan if value is None else float(value) for key, value in record["metrics"].items()}
    thresholds = record.get("thresholds") or {}
    seconds = record.get("seconds")
    return Run(
        path=path,
        method=str(record["method"]),
        seed=int(record["seed"]),
        metrics=metrics,
        description=record.get("description") or {},
        data_note=record.get("data_note"),
        max_fpr=float(thresholds.get("max_fpr", DEFAULT_MAX_FPR)),
        thresholds={split: math.nan if thresholds.get(split) is None else float(thresholds[split]) for split in ("test", "val")},
        seconds=math.nan if seconds is None else float(seconds),
    )


def _row_order(methods: set[str], runs: Sequence[Run], method_order: Sequence[str], reference: str) -> list[str]:
    """Order the methods as the published table: the Random floor first, the reference method last."""
    unknown = sorted(methods - set(method_order))
    if unknown:
        files = ", ".join(str(run.path) for run in runs if run.method in unknown)
        raise InvalidInputError(f"methods {unknown} (in {files}) are not in method_order {list(method_order)}; add them")
    absent = [method for method in method_order if method not in methods]
    if absent:
        raise InvalidInputError(f"no metrics file for methods {absent} of method_order; pass their metrics files")
    if reference not in methods:
        raise InvalidInputError(f"reference method {reference!r} has no metrics file; methods found: {sorted(methods)}")
    floors = {run.method for run in runs if run.method == FLOOR_METHOD or run.description.get("method") == FLOOR_METHOD}
    middle = [method for method in method_order if method not in floors and method != reference]
    return [method for method in method_order if method in floors and method != reference] + middle + [reference]


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Return ``mean``, ``std`` (sample standard deviation, ddof = 1; NaN below two values) and ``n`` of the finite values."""
    finite = np.asarray([value for value in values if math.isfinite(value)], dtype=np.float64)
    mean = float(finite.mean()) if finite.size else math.nan
    std = float(finite.std(ddof=1)) if finite.size >= 2 else math.nan
    return {"mean": mean, "std": std, "n": int(finite.size)}


def welch_test(method_values: Sequence[float], reference_values: Sequence[float], alpha: float) -> dict[str, Any]:
    """Compare two samples with a two-sided Welch t-test; see the module docstring for the untestable cases.

    Returns:
        ``t_statistic`` (method minus reference), ``p_value``, ``significant``
        (``p <= alpha``), ``testable`` and a ``note`` saying why a test was not run.
    """
    method = np.asarray([value for value in method_values if math.isfinite(value)], dtype=np.float64)
    reference = np.asarray([value for value in reference_values if math.isfinite(value)], dtype=np.float64)
    untestable = {"t_statistic": math.nan, "p_value": math.nan, "significant": False, "testable": False}
    if method.size < 2 or reference.size < 2:
        return {**untestable, "note": "not testable: fewer than two finite values"}
    if np.all(method == method[0]) and np.all(reference == reference[0]):
        same = "identical" if method[0] == reference[0] else "different"
        return {**untestable, "note": f"not testable: both have zero variance ({same} constant values)"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = stats.ttest_ind(method, reference, equal_var=False)
    note = "; ".join(sorted({str(warning.message) for warning in caught}))
    p_value = float(result.pvalue)
    return {
        "t_statistic": float(result.statistic),
        "p_value": p_value,
        "significant": bool(p_value <= alpha),
        "testable": True,
        "note": f"SciPy warned: {note}" if note else "",
    }


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a CSV file atomically; floats keep full precision (``repr``), NaN is written as ``nan``."""
    with atomic_output(path) as temporary:
        with open(temporary, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(header)
            for row in rows:
                writer.writerow([repr(value) if isinstance(value, float) else value for value in row])


def format_cell(summary: Mapping[str, float], mark: str = "") -> str:
    """Format ``mean ± std`` with the table's decimals, ``n/a`` for no value, the mean alone for one seed."""
    if not math.isfinite(summary["mean"]):
        return "n/a"
    if not math.isfinite(summary["std"]):
        return f"{summary['mean']:.{DECIMALS}f}{mark}"
    return f"{summary['mean']:.{DECIMALS}f} ± {summary['std']:.{DECIMALS}f}{mark}"


def _weights_text(runs: Sequence[Run], methods: Sequence[str]) -> str:
    weights = {}
    for method in methods:
        found = sorted({str(run.description["extractor_weights"]) for run in runs if run.method == method and "extractor_weights" in run.description})
        if found:
            weights[method] = "/".join(found)
    if not weights:
        return "No method reports feature-extractor weights."
    return "Feature-extractor weights: " + ", ".join(f"{method}: {value}" for method, value in weights.items()) + "."


def _markdown(
    experiment: str, methods: Sequence[str], seeds: Mapping[str, list[int]], summaries: Mapping[str, Mapping[str, Mapping[str, float]]],
    tests: Sequence[Mapping[str, Any]], *, reference: str, alpha: float, t_tests: bool, labels: Mapping[str, str],
    weights: str, data_notes: Sequence[str], warnings_text: Sequence[str],
) -> str:
    """Return summary.md: title, data notes, the seeds, the results table and the caveats."""
    # 1. Title and data notes.
    significant = {(test["method"], test["metric"]) for test in tests if test["significant"]}
    lines = [f"# Results of experiment {experiment}", ""]
    for note in data_notes:
        lines += [f"> **Data note.** {note}", ""]

    # 2. The table, each cell marked when the method differs from the reference.
    seed_sets = {tuple(values) for values in seeds.values()}
    if len(seed_sets) == 1:
        shared = next(iter(seed_sets))
        seed_text = f"{len(shared)} seeds ({', '.join(map(str, shared))})"
    else:
        seed_text = "; ".join(f"{method}: {len(seeds[method])} seeds ({', '.join(map(str, seeds[method]))})" for method in methods)
    lines += [
        f"Mean ± sample standard deviation (ddof = 1) over {seed_text}, on the test split.",
        "",
        "| Method | " + " | ".join(labels[key] for key in TABLE_METRICS) + " |",
        "| --- |" + " --- |" * len(TABLE_METRICS),
    ]
    for method in methods:
        cells = [
            format_cell(summaries[method][key], SIGNIFICANCE_MARK if (method, key) in significant else "") for key in TABLE_METRICS
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")

    # 3. What the marks and the two Dice columns mean, the weights and any warnings.
    lines.append("")
    if t_tests:
        lines.append(
            f"Marked with {SIGNIFICANCE_MARK}: differs significantly from {reference} (two-sided Welch t-test, p <= {alpha:g})."
        )
    else:
        lines.append("No t-tests were run (t_tests is off).")
    lines += [
        "",
        f"- {labels['dice_at_fpr_test_threshold']}: threshold chosen on the test labels, as published; it leaks test information.",
        f"- {labels['dice_at_fpr_val_threshold']}: threshold chosen on the validation split and applied to the test split.",
        f"- {weights}",
    ]
    untestable = [f"{test['method']} {test['metric']}" for test in tests if not test["testable"] and test["metric"] in TABLE_METRICS]
    if untestable:
        lines.append(f"- Not testable (t and p reported as NaN in t_tests.csv): {', '.join(untestable)}.")
    lines += [f"- {text}" for text in warnings_text]
    return "\n".join(lines) + "\n"


def _load_examples(
    paths: Sequence[str | os.PathLike[str]], experiment: str, methods: Sequence[str]
) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    """Return, per method, the example file of its smallest seed.

    Raises:
        InvalidInputError: If a file is unreadable or belongs to another
            experiment, a method has no example file, or two methods show
            different slices. The message names the files.
    """
    chosen: dict[str, tuple[int, Path, dict[str, np.ndarray]]] = {}
    for path in map(Path, paths):
        arrays = read_arrays(path)
        missing = [key for key in ("experiment", "method", "seed", "maps", "subject", "slice_index") if key not in arrays]
        if missing:
            raise InvalidInputError(f"example file {path} lacks {missing}; it was not written by sfae.evaluation.evaluate")
        if str(arrays["experiment"]) != experiment:
            raise InvalidInputError(f"example file {path} belongs to experiment {str(arrays['experiment'])!r}, not {experiment!r}")
        method, seed = str(arrays["method"]), int(arrays["seed"])
        if method in methods and (method not in chosen or seed < chosen[method][0]):
            chosen[method] = (seed, path, arrays)

    absent = [method for method in methods if method not in chosen]
    if absent:
        raise InvalidInputError(f"no example file for methods {absent}; pass the example files of every method")
    first_path, first = chosen[methods[0]][1:]
    for method in methods[1:]:
        path, arrays = chosen[method][1:]
        if not (np.array_equal(arrays["subject"], first["subject"]) and np.array_equal(arrays["slice_index"], first["slice_index"])):
            raise InvalidInputError(
                f"example files {first_path} and {path} show different slices; evaluate every method on the same test split"
            )
    return {method: (chosen[method][1], chosen[method][2]) for method in methods}


def _qualitative_figure(
    examples: Mapping[str, tuple[Path, Mapping[str, np.ndarray]]], methods: Sequence[str], title: str, path: Path
) -> None:
    first = examples[methods[0]][1]
    plotting.plot_qualitative(
        images=first["images"],
        labels=first["labels"],
        masks=first["masks"],
        maps={method: examples[method][1]["maps"] for method in methods},
        thresholds={method: float(examples[method][1]["val_threshold"]) for method in methods},
        row_titles=[f"{subject} z={index}" for subject, index in zip(first["subject"].tolist(), first["slice_index"].tolist())],
        title=title,
        path=path,
    )


def aggregate_experiment(
    metrics_paths: Sequence[str | os.PathLike[str]],
    examples_paths: Sequence[str | os.PathLike[str]],
    *,
    experiment: str,
    reference_method: str,
    alpha: float = DEFAULT_ALPHA,
    t_tests: bool = True,
    output_dir: str | os.PathLike[str],
    method_order: Sequence[str],
) -> dict[str, Any]:
    """Aggregate the runs of an experiment into tables, t-tests and figures in ``output_dir``.

    Every file is written atomically:

    * ``results_per_seed.csv``: one row per method and seed, with every
      scalar metric, both thresholds, the evaluation's seconds and the
      metrics file's path.
    * ``summary.csv``: per method ``n_seeds``, ``seeds`` and, per metric,
      ``<metric>_mean``, ``<metric>_std`` and ``<metric>_n`` (finite values).
    * ``summary.md``: the results table with significance marks and the caveats.
    * ``t_tests.csv``: columns :data:`T_TEST_COLUMNS`. It has only the header
      when ``t_tests`` is off.
    * ``bar_chart.png``, and ``qualitative.png`` with the example slices of
      each method's smallest seed, thresholded at the validation threshold.

    Args:
        metrics_paths: Metrics files of every method and seed.
        examples_paths: Example files of the runs (at least one per method).
        experiment: Experiment name; every file must belong to it.
        reference_method: Method every other one is compared with (SFAE in the paper); its row comes last.
        alpha: Significance level of the two-sided Welch t-test (significant when p <= alpha).
        t_tests: Whether to run the t-tests; they need at least two seeds per method.
        output_dir: Folder of the outputs.
        method_order: Every method of the experiment, in table order; the
            Random floor is moved first and the reference method last.

    Returns:
        ``methods`` (row order), ``seeds`` per method, ``summary`` (method to
        metric to ``mean``, ``std``, ``n``), ``t_tests`` (rows of t_tests.csv
        as dicts), ``warnings`` and ``outputs`` (name to path).

    Raises:
        InvalidInputError: If a file is missing, unreadable or from another
            experiment, the message names it. The error is also raised when a
            method and seed appear twice, the methods do not match
            ``method_order`` or ``reference_method``, ``alpha`` is outside
            (0, 1), or ``t_tests`` is on and a method has fewer than two seeds.
    """
    # 1. Read and check the runs.
    if not 0 < alpha < 1:
        raise InvalidInputError(f"alpha must lie in (0, 1), got {alpha!r}")
    if not metrics_paths:
        raise InvalidInputError(f"no metrics files for experiment {experiment!r}; run its evaluations first")
    runs = [load_run(path, experiment) for path in metrics_paths]
    seen: dict[tuple[str, int], Path] = {}
    for run in runs:
        if (run.method, run.seed) in seen:
            raise InvalidInputError(f"metrics files {seen[(run.method, run.seed)]} and {run.path} are both method {run.method}, seed {run.seed}")
        seen[(run.method, run.seed)] = run.path
    methods = _row_order({run.method for run in runs}, runs, method_order, reference_method)
    seeds = {method: sorted(run.seed for run in runs if run.method == method) for method in methods}
    if t_tests:
        few = {method: values for method, values in seeds.items() if len(values) < 2}
        if few:
            raise InvalidInputError(
                f"t-tests need at least two seeds per method, but {few} (method: seeds) have fewer; "
                "add seeds or turn t_tests off for this experiment"
            )
    warnings_text = []
    if len({tuple(values) for values in seeds.values()}) > 1:
        warnings_text.append(f"The methods were run with different seeds: {seeds}.")
        logger.warning("experiment %s: methods were run with different seeds: %s", experiment, seeds)
    max_fprs = {run.max_fpr for run in runs}
    if len(max_fprs) > 1:
        raise InvalidInputError(f"the metrics files of experiment {experiment} use different max_fpr values {sorted(max_fprs)}; evaluate all runs alike")
    max_fpr = max_fprs.pop()
    labels = table_labels(max_fpr)

    # 2. Per-seed rows, per-method summaries and t-tests.
    metric_keys = list(dict.fromkeys(key for run in runs for key in run.metrics))
    by_method = {method: sorted((run for run in runs if run.method == method), key=lambda run: run.seed) for method in methods}
    values = {method: {key: [run.metrics.get(key, math.nan) for run in by_method[method]] for key in metric_keys} for method in methods}
    summaries = {method: {key: summarize(values[method][key]) for key in metric_keys} for method in methods}
    tests = []
    if t_tests:
        for method in methods:
            if method == reference_method:
                continue
            for key in TESTED_METRICS:
                if key not in metric_keys:
                    continue
                result = welch_test(values[method][key], values[reference_method][key], alpha)
                tests.append({
                    "method": method, "metric": key, "reference_method": reference_method,
                    "reference_mean": summaries[reference_method][key]["mean"], "method_mean": summaries[method][key]["mean"],
                    "reference_n": summaries[reference_method][key]["n"], "method_n": summaries[method][key]["n"], **result,
                })

    # 3. Tables.
    output_dir = Path(output_dir)
    outputs = {name: output_dir / filename for name, filename in OUTPUT_FILES.items()}
    _write_csv(
        outputs["results_per_seed"],
        ["method", "seed", *metric_keys, "test_threshold", "val_threshold", "seconds", "path"],
        [
            [run.method, run.seed, *(run.metrics.get(key, math.nan) for key in metric_keys),
             run.thresholds["test"], run.thresholds["val"], run.seconds, str(run.path)]
            for method in methods for run in by_method[method]
        ],
    )
    summary_columns = [f"{key}_{part}" for key in metric_keys for part in ("mean", "std", "n")]
    _write_csv(
        outputs["summary_csv"],
        ["method", "n_seeds", "seeds", *summary_columns],
        [[method, len(seeds[method]), " ".join(map(str, seeds[method])),
          *(summaries[method][key][part] for key in metric_keys for part in ("mean", "std", "n"))] for method in methods],
    )
    _write_csv(outputs["t_tests"], T_TEST_COLUMNS, [[test[column] for column in T_TEST_COLUMNS] for test in tests])
    data_notes = sorted({run.data_note for run in runs if run.data_note})
    weights = _weights_text(runs, methods)
    markdown = _markdown(
        experiment, methods, seeds, summaries, tests, reference=reference_method, alpha=alpha, t_tests=t_tests,
        labels=labels, weights=weights, data_notes=data_notes, warnings_text=warnings_text,
    )
    with atomic_output(outputs["summary_md"]) as temporary:
        temporary.write_text(markdown)

    # 4. Figures.
    caveat = " ".join(data_notes)
    plotting.plot_metric_bars(
        {method: [summaries[method][key]["mean"] for key in TABLE_METRICS] for method in methods},
        {method: [summaries[method][key]["std"] for key in TABLE_METRICS] for method in methods},
        [labels[key].replace(" (", "\n(") for key in TABLE_METRICS],
        f"Experiment {experiment}: mean ± std over seeds. {weights} {caveat}".strip(),
        outputs["bar_chart"],
    )
    examples = _load_examples(examples_paths, experiment, methods)
    shown_seeds = ", ".join(f"{method} {int(examples[method][1]['seed'])}" for method in methods)
    _qualitative_figure(
        examples, methods,
        f"Experiment {experiment}: test slices; maps thresholded at the {100 * max_fpr:g} % FPR threshold of the "
        f"validation split; green: ground truth (seeds: {shown_seeds}). {weights} {caveat}".strip(),
        outputs["qualitative"],
    )
    logger.info("aggregated %d runs of experiment %s into %s", len(runs), experiment, output_dir)
    return {
        "experiment": experiment,
        "methods": methods,
        "reference_method": reference_method,
        "seeds": seeds,
        "summary": summaries,
        "t_tests": tests,
        "warnings": warnings_text,
        "outputs": {name: str(path) for name, path in outputs.items()},
    }
