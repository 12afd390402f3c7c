"""Running Snakemake on this repository from tests, and reading its job counts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def run_snakemake(*arguments: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``python -m snakemake`` in the repository root and return the finished process."""
    command = [sys.executable, "-m", "snakemake", *arguments]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed with exit code {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def job_counts(output: str) -> dict[str, int]:
    """Parse the 'Job stats' table of a Snakemake dry run into rule name to job count."""
    counts: dict[str, int] = {}
    table = output[output.index("Job stats:") :]
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match is None:
            break
        counts[match.group(1)] = int(match.group(2))
    return counts
