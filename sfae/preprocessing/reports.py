"""Per-data-set tables collected from the per-volume JSON reports."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sfae.io import InvalidInputError, atomic_output

logger = logging.getLogger(__name__)


def write_registration_table(report_paths: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str]) -> pd.DataFrame:
    """Write one CSV row per registered scan: subject, Dice with the atlas mask and the scalar report fields.

    Args:
        report_paths: ``registration.json`` files written by the register rule.
        output: CSV file, written atomically.

    Returns:
        The table, sorted by subject.

    Raises:
        InvalidInputError: If a report is missing or is not JSON.
    """
    rows = []
    for path in report_paths:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InvalidInputError(f"cannot read registration report {path}: {error}; rerun the register rule") from error
        rows.append({key: value for key, value in report.items() if isinstance(value, (str, int, float, bool)) or value is None})
    table = pd.DataFrame(rows)
    if "subject" in table:
        table = table.sort_values("subject").reset_index(drop=True)
        leading = [column for column in ("subject", "dice") if column in table]
        table = table[leading + [column for column in table.columns if column not in leading]]
    with atomic_output(output) as temporary:
        table.to_csv(temporary, index=False)
    if "dice" in table and len(table):
        logger.info("registration Dice over %d scans: min %.3f, median %.3f", len(table), table["dice"].min(), table["dice"].median())
    return table
