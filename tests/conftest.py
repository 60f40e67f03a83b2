"""Fixtures shared across test files."""

from pathlib import Path

import pytest

from tfsearch.demo import write_demo


@pytest.fixture(scope="session")
def demo_dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset (seed 0), written once per test session: generating it takes a couple of seconds.

    Treat it as read-only; copy it before changing anything.
    """
    return write_demo(tmp_path_factory.mktemp("demo") / "data", seed=0)
