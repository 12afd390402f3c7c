"""Summarize the per-job benchmark files of a workflow run as a Markdown table.

Every rule with a ``benchmark:`` directive writes wall time and peak memory of
its job to ``<results>/benchmarks/<data set>/<subject>/<rule>.tsv``. This script
collects them for one data set, with the registration Dice from
``registration_qc.csv``, so that the timings of the demo run (ROBEX,
registration, slicing, per volume) can be recorded in BENCHMARKS.md::

    snakemake --cores all
    python benchmarks/workflow_step_timings.py --results results --dataset demo --output timings.md
"""

from __future__ import annotations

import argparse
import logging
import platform
from pathlib import Path

import pandas as pd

from sfae.io import atomic_output
from sfae.logs import configure_cli_logging

logger = logging.getLogger("benchmarks.workflow_step_timings")

PER_VOLUME_RULES = ("extract_brain", "register", "extract_slices")


def collect(results: Path, dataset: str) -> pd.DataFrame:
    """Return one row per volume with the seconds and peak memory of each per-volume rule."""
    rows = []
    for folder in sorted((results / "benchmarks" / dataset).iterdir()):
        if not folder.is_dir() or folder.name == "splits":
            continue
        row: dict[str, object] = {"volume": folder.name}
        for rule in PER_VOLUME_RULES:
            path = folder / f"{rule}.tsv"
            if path.is_file():
                record = pd.read_csv(path, sep="\t").iloc[-1]
                row[f"{rule} s"] = round(float(record["s"]), 1)
                row[f"{rule} MiB"] = round(float(record["max_rss"]), 0)
        rows.append(row)
    table = pd.DataFrame(rows)
    qc_path = results / dataset / "registration_qc.csv"
    if qc_path.is_file():
        qc = pd.read_csv(qc_path)[["subject", "dice"]].rename(columns={"subject": "volume", "dice": "registration Dice"})
        table = table.merge(qc.round(3), on="volume", how="left")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"), help="results folder of the workflow run")
    parser.add_argument("--dataset", default="demo", help="data set name in the config")
    parser.add_argument("--output", type=Path, required=True, help="Markdown file to write")
    arguments = parser.parse_args()
    configure_cli_logging()

    table = collect(arguments.results, arguments.dataset)
    split_times = sorted((arguments.results / "benchmarks" / arguments.dataset / "splits").glob("*.tsv"))
    lines = [
        f"Per-job wall time (s) and peak resident memory (MiB) from Snakemake's benchmark files, data set "
        f"{arguments.dataset}, on {platform.node()} ({platform.processor() or platform.machine()}).",
        "",
        table.to_markdown(index=False),
        "",
    ]
    for path in split_times:
        record = pd.read_csv(path, sep="\t").iloc[-1]
        lines.append(f"- {path.stem}: {float(record['s']):.1f} s, {float(record['max_rss']):.0f} MiB")
    with atomic_output(arguments.output) as temporary:
        temporary.write_text("\n".join(lines) + "\n")
    logger.info("wrote %s", arguments.output)


if __name__ == "__main__":
    main()
