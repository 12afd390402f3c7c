"""Logging setup for workflow scripts: every rule logs to its own ``log:`` file."""

from __future__ import annotations

import contextlib
import logging
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def rule_logging(snakemake: Any) -> Iterator[logging.Logger]:
    """Send logging and warnings of a workflow script to the rule's log file.

    The rule's name, wildcards and threads are logged first; an exception is
    logged with its traceback, then raised again so the job fails.

    Args:
        snakemake: The object Snakemake injects into ``script:`` files.

    Yields:
        The logger of the rule.
    """
    log_path = Path(snakemake.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)

    rule_logger = logging.getLogger(f"sfae.rule.{snakemake.rule}")
    rule_logger.info(
        "rule %s, wildcards %s, threads %s, python %s on %s",
        snakemake.rule, dict(snakemake.wildcards.items()), snakemake.threads, platform.python_version(), platform.node(),
    )
    start = time.perf_counter()
    try:
        yield rule_logger
    except BaseException:
        rule_logger.exception("rule %s failed", snakemake.rule)
        raise
    else:
        rule_logger.info("rule %s finished in %.1f s", snakemake.rule, time.perf_counter() - start)
    finally:
        handler.flush()
        root.removeHandler(handler)
        handler.close()


def configure_cli_logging(level: int = logging.INFO) -> None:
    """Log to standard error for command-line entry points such as the benchmarks."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
