"""Fixtures shared across test files."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

# no network here: W&B never syncs, and the demo cache stays inside the test session
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

from tfsearch.demo import write_demo  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`--dataset demo` without --data-root generates the demo into $TFSEARCH_CACHE: keep it in tmp."""
    cache = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("TFSEARCH_CACHE")
    os.environ["TFSEARCH_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("TFSEARCH_CACHE", None)
    else:
        os.environ["TFSEARCH_CACHE"] = previous


@pytest.fixture(scope="session")
def demo_dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset (seed 0), written once per test session: generating it takes a couple of seconds.

    Treat it as read-only; copy it before changing anything.
    """
    return write_demo(tmp_path_factory.mktemp("demo") / "data", seed=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance for the whole test session (starting Ray takes seconds). Yields the port on
    which this node exports its Prometheus metrics."""
    ray = pytest.importorskip("ray")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port=port, log_to_driver=False)
    yield port
    ray.shutdown()


def inspect_offline_run(folder: Path) -> dict:
    """What an offline W&B run holds (state, config, summary), read without network by `wandb leet`."""
    result = subprocess.run(
        ["wandb", "leet", "inspect", "--summary", "--json", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)
