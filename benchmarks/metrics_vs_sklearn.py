"""Benchmark the streaming pixel metrics against scikit-learn on 2e7 and 2e8 pixels.

For each pixel count N, two methods compute Pixel-AP, pixel AUROC, the 5 % FPR
threshold and Dice at that threshold on the same data:

* ``sklearn``: the whole test set in memory (float32 scores, bool labels),
  ``average_precision_score`` and ``roc_curve(drop_intermediate=False)``, then
  the threshold and Dice with NumPy on the full arrays. This is how public
  implementations of the protocol evaluate.
* ``ours``: :class:`sfae.evaluation.metrics.PixelScoreHistogram` updated chunk
  by chunk, then :func:`sfae.evaluation.metrics.pixel_metrics`.

The scores are float16 values (stored as float32 for scikit-learn, which
represents them exactly), so both methods see identical scores. Each chunk of data is
generated from ``(seed, chunk index)``, so the streaming worker keeps at most one chunk
in memory, and both workers see the same pixels.

Each (method, N) runs in its own worker process. Times cover the metric
computation only, not data generation. Peak memory is the worker's VmHWM from
/proc/self/status: the peak resident set of its own address space, which, unlike
``ru_maxrss``, does not carry the parent's peak across exec. The table reports
it in total and above the worker's peak right after its imports. The targets are
judged on the latter, which contains the method's data and temporaries but not
the imported library code that every Python process of this kind carries (about
150 MiB in both workers when this was written). The summary also gives the ratio
of the totals.

Before scikit-learn runs at a larger N, its memory is extrapolated linearly from
the smaller run, and the run is skipped when the estimate exceeds
``--memory-fraction`` of the available memory.

Usage::

    .venv/bin/python benchmarks/metrics_vs_sklearn.py --output /tmp/metrics_vs_sklearn.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# The script runs from a checkout where sfae need not be installed.
REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from machine import cpu_model, peak_rss_mib  # noqa: E402  (benchmarks/machine.py, beside this script)

logger = logging.getLogger("metrics_vs_sklearn")

DEFAULT_SIZES = (20_000_000, 200_000_000)
# Pixels generated at once; the streaming worker keeps one chunk in memory at a time.
GENERATION_CHUNK = 1 << 20
# About 2 % of the pixels are anomalous, the Pixel-AP of the Random row (0.019 on MOOD, Meissen et al. 2022).
POSITIVE_FRACTION = 0.02
# Shift of the anomalous pixels' scores: gives a Pixel-AP of about 0.3 with many float16 ties.
POSITIVE_SHIFT = 0.4
MAX_FPR = 0.05
SPEEDUP_TARGET = 50
MEMORY_RATIO_TARGET = 20
WORKER_TIMEOUT_S = 3600


def available_memory_mib() -> float:
    """Return MemAvailable from /proc/meminfo in MiB (0 where it cannot be read, which skips large scikit-learn runs)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def generate_chunks(n_pixels: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (float16 scores, bool labels) chunks of at most GENERATION_CHUNK pixels, n_pixels in total."""
    for index, start in enumerate(range(0, n_pixels, GENERATION_CHUNK)):
        size = min(GENERATION_CHUNK, n_pixels - start)
        rng = np.random.default_rng([seed, index])
        labels = rng.random(size, dtype=np.float32) < POSITIVE_FRACTION
        scores = rng.random(size, dtype=np.float32)
        scores[labels] += POSITIVE_SHIFT
        yield scores.astype(np.float16), labels


def run_sklearn(n_pixels: int, seed: int) -> dict[str, float]:
    """Compute the metrics with scikit-learn on the full arrays."""
    from sklearn.metrics import auc, average_precision_score, roc_curve

    baseline = peak_rss_mib()
    scores = np.empty(n_pixels, dtype=np.float32)
    labels = np.empty(n_pixels, dtype=bool)
    for start, (score_chunk, label_chunk) in zip(range(0, n_pixels, GENERATION_CHUNK), generate_chunks(n_pixels, seed)):
        scores[start : start + score_chunk.size] = score_chunk
        labels[start : start + label_chunk.size] = label_chunk

    start_time = time.perf_counter()
    average_precision = average_precision_score(labels, scores)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    threshold = float(thresholds[np.flatnonzero(fpr <= MAX_FPR)[-1]])
    predicted = scores >= threshold
    true_positives = np.count_nonzero(predicted & labels)
    dice = 2 * true_positives / (np.count_nonzero(predicted) + np.count_nonzero(labels))
    seconds = time.perf_counter() - start_time

    return {
        "seconds": seconds,
        "average_precision": float(average_precision),
        "roc_auc": float(auc(fpr, tpr)),
        "threshold": threshold,
        "dice": float(dice),
        "baseline_mib": baseline,
    }


def run_ours(n_pixels: int, seed: int) -> dict[str, float]:
    """Compute the metrics by streaming the chunks through a PixelScoreHistogram."""
    from tqdm import tqdm

    from sfae.evaluation.metrics import PixelScoreHistogram, pixel_metrics

    baseline = peak_rss_mib()
    histogram = PixelScoreHistogram()
    seconds = 0.0
    n_chunks = -(-n_pixels // GENERATION_CHUNK)
    for scores, labels in tqdm(generate_chunks(n_pixels, seed), total=n_chunks, desc="ours", mininterval=5):
        start_time = time.perf_counter()
        histogram.update(scores, labels)
        seconds += time.perf_counter() - start_time

    start_time = time.perf_counter()
    result = pixel_metrics(histogram, max_fpr=MAX_FPR)
    seconds += time.perf_counter() - start_time

    return {
        "seconds": seconds,
        "average_precision": result.average_precision,
        "roc_auc": result.roc_auc,
        "threshold": result.threshold,
        "dice": result.dice,
        "baseline_mib": baseline,
    }


def worker(method: str, n_pixels: int, seed: int, result_path: Path) -> None:
    """Run one method in this process and write its result and peak memory as JSON."""
    result = run_sklearn(n_pixels, seed) if method == "sklearn" else run_ours(n_pixels, seed)
    result["peak_mib"] = peak_rss_mib()
    result_path.write_text(json.dumps(result))


def run_worker(method: str, n_pixels: int, seed: int) -> dict[str, float] | None:
    """Run one method in a fresh Python process; return its result, or None when it failed or timed out."""
    with tempfile.TemporaryDirectory() as folder:
        result_path = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--worker", method, "--pixels", str(n_pixels), "--seed", str(seed), "--result", str(result_path)]
        logger.info("running %s on %d pixels", method, n_pixels)
        try:
            completed = subprocess.run(command, timeout=WORKER_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            logger.error("%s on %d pixels timed out after %d s", method, n_pixels, WORKER_TIMEOUT_S)
            return None
        if completed.returncode != 0 or not result_path.is_file():
            logger.error("%s on %d pixels failed with exit status %d", method, n_pixels, completed.returncode)
            return None
        result = json.loads(result_path.read_text())
    logger.info("%s on %d pixels: %.2f s, peak %.0f MiB", method, n_pixels, result["seconds"], result["peak_mib"])
    return result


def format_row(n_pixels: int, method: str, result: dict[str, float]) -> str:
    above = result["peak_mib"] - result["baseline_mib"]
    return (
        f"| {n_pixels:.0e} | {method} | {result['seconds']:.2f} | {result['peak_mib']:.0f} | {above:.0f} | "
        f"{result['average_precision']:.12f} | {result['roc_auc']:.12f} | {result['threshold']!r} | {result['dice']:.12f} |"
    )


def compare(n_pixels: int, ours: dict[str, float], reference: dict[str, float]) -> str:
    """Return one summary line: speed-up, memory ratio and whether the values agree."""
    speedup = reference["seconds"] / ours["seconds"]
    memory_ratio = (reference["peak_mib"] - reference["baseline_mib"]) / max(ours["peak_mib"] - ours["baseline_mib"], 1.0)
    total_memory_ratio = reference["peak_mib"] / ours["peak_mib"]
    equal = (
        ours["average_precision"] == reference["average_precision"]
        and ours["threshold"] == reference["threshold"]
        and ours["dice"] == reference["dice"]
    )
    auc_difference = abs(ours["roc_auc"] - reference["roc_auc"])
    met = speedup >= SPEEDUP_TARGET and memory_ratio >= MEMORY_RATIO_TARGET and equal and auc_difference <= 1e-12
    return (
        f"- N = {n_pixels:.0e}: {speedup:.0f}x faster, {memory_ratio:.0f}x less memory above the import baseline "
        f"({total_memory_ratio:.1f}x less in total); "
        f"AP, threshold and Dice {'bit-identical' if equal else 'DIFFERENT'}; |AUROC difference| = {auc_difference:.1e}; "
        f"targets (>= {SPEEDUP_TARGET}x faster, <= 1/{MEMORY_RATIO_TARGET} memory, equal values) {'met' if met else 'NOT met'}."
    )


def benchmark(sizes: list[int], seed: int, memory_fraction: float) -> str:
    """Run every method at every size and return the Markdown report."""
    import sklearn

    rows, summaries, notes = [], [], []
    sklearn_mib_per_pixel = None
    for n_pixels in sorted(sizes):
        ours = run_worker("ours", n_pixels, seed)
        reference = None
        estimate = None if sklearn_mib_per_pixel is None else sklearn_mib_per_pixel * n_pixels
        if estimate is not None and estimate > memory_fraction * available_memory_mib():
            notes.append(
                f"- N = {n_pixels:.0e}: scikit-learn skipped, its estimated {estimate / 1024:.1f} GiB above the import "
                f"baseline exceed {memory_fraction:.0%} of the {available_memory_mib() / 1024:.1f} GiB available."
            )
        else:
            if estimate is not None:
                notes.append(f"- N = {n_pixels:.0e}: scikit-learn estimated at {estimate / 1024:.1f} GiB above its import baseline before running.")
            reference = run_worker("sklearn", n_pixels, seed)
            if reference is None:
                notes.append(f"- N = {n_pixels:.0e}: scikit-learn failed or timed out (see the log).")
        if reference is not None:
            sklearn_mib_per_pixel = (reference["peak_mib"] - reference["baseline_mib"]) / n_pixels
            rows.append(format_row(n_pixels, "scikit-learn", reference))
        if ours is not None:
            rows.append(format_row(n_pixels, "ours (streaming)", ours))
        if ours is not None and reference is not None:
            summaries.append(compare(n_pixels, ours, reference))

    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    header = [
        "# Pixel metrics: streaming float16 histogram vs scikit-learn",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores, {memory_gib:.0f} GiB memory; "
        f"Python {platform.python_version()}, NumPy {np.__version__}, scikit-learn {sklearn.__version__}.",
        f"Data: {POSITIVE_FRACTION:.0%} anomalous pixels, float16 scores, seed {seed}. "
        f"Time: metric computation only (scikit-learn: AP, roc_curve, {MAX_FPR:.0%} FPR threshold, Dice; "
        "ours: histogram updates over 1 Mi-pixel chunks and all metrics). Memory: worker VmHWM in MiB, in total and above "
        "the peak after the worker's imports.",
        "",
        "| N pixels | method | time (s) | peak RSS (MiB) | above imports (MiB) | Pixel-AP | AUROC | threshold | Dice |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join(header + rows + [""] + summaries + notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, help="Markdown file the report is written to")
    parser.add_argument("--sizes", type=float, nargs="+", default=list(DEFAULT_SIZES), help="pixel counts to benchmark")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated scores and labels")
    parser.add_argument(
        "--memory-fraction", type=float, default=0.6, help="skip scikit-learn when its estimated memory exceeds this fraction of the available memory"
    )
    parser.add_argument("--worker", choices=("ours", "sklearn"), help=argparse.SUPPRESS)
    parser.add_argument("--pixels", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    if arguments.worker:
        worker(arguments.worker, arguments.pixels, arguments.seed, arguments.result)
        return
    if arguments.output is None:
        parser.error("--output is required")

    from sfae.io import atomic_output

    report = benchmark([int(size) for size in arguments.sizes], arguments.seed, arguments.memory_fraction)
    with atomic_output(arguments.output) as temporary:
        temporary.write_text(report)
    logger.info("wrote %s", arguments.output)


if __name__ == "__main__":
    main()
