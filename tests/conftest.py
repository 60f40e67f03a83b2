"""Fixtures shared across test files."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

# no network here: W&B never syncs, and the demo cache stays inside the test session
os.environ.setdefault("WANDB_MODE", "disabled")
# one compute thread per process (this one, and the Ray workers, which inherit it): with tiny tensors, two
# processes each spinning two OpenMP threads on two cores run many times slower than one thread each
os.environ.setdefault("OMP_NUM_THREADS", "1")
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


# ------------------------------------------------------------------------------------ S3 (moto)
BUCKET = "tfsearch-test"
# moto accepts any credentials; without the metadata lookup disabled the AWS SDK would query an EC2 address
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def s3_uri(endpoint: str, path: str) -> str:
    return f"s3://{path}?endpoint_override={endpoint}&scheme=http"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 holding an empty bucket; yields its HOST:PORT and stops it after.
    Tests that use it are skipped without moto[server] (the dev extra)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) runs the S3 tests")
    boto3 = pytest.importorskip("boto3")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in CREDENTIALS.items():
            patch.setenv(key, value)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"{host}:{port}"
            client = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            yield endpoint
        finally:
            server.stop()
