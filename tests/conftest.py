"""Fixtures shared across test files."""

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

# no network here: W&B never syncs, and the demo cache stays inside the test session
os.environ.setdefault("WANDB_MODE", "disabled")
# one compute thread per process (this one, and the Ray workers, which inherit it): with tiny tensors, two
# processes each spinning two OpenMP threads on two cores run many times slower than one thread each
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# moto's test credentials, never real ones, for every process of the session: the Ray nodes started here
# pass them to the workers of any driver, so runs with an S3 storage work in-process and from a CLI driver.
# moto accepts any credentials; without the metadata lookup disabled the AWS SDK would query an EC2 address
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
os.environ.update(CREDENTIALS)

from tfsearch.data.demo import write_demo  # noqa: E402
from tfsearch.infra.fake_cluster import free_port  # noqa: E402


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


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory: pytest.TempPathFactory, demo_dataset_root: Path, ray_instance):
    """One finished tiny per-class run of the demo's disk and stripes, shared by the tests that only read a
    finished run (each Ray run costs about a minute here, mostly worker start-up): the end-to-end checks,
    relative paths, export and predict, and the S3 run compared with it (whose driver is killed and resumed).

    It is typed as a user would, from `root`: `--data-root mv --runs-root runs --storage store`, all relative.
    stripes starts training only once disk's selection study has chosen, so disk's selection visibly starts
    before the last training ends. Treat it as read-only; copy it before changing anything.
    """
    import optuna
    from test_search import run_args, write_space

    from tfsearch.cli import build_parser
    from tfsearch.run.pipeline import execute
    from tfsearch.run.plan import make_plan
    from tfsearch.run.training.trainable import train_category

    root = tmp_path_factory.mktemp("shared-run")
    (root / "mv").symlink_to(demo_dataset_root)
    space = write_space(root)
    argv = [*run_args(space, Path("runs"), Path("mv"), "shared", "--categories", "disk,stripes")]
    argv += ["--storage", "store"]
    previous = Path.cwd()
    os.chdir(root)
    try:
        plan = make_plan(build_parser().parse_args(argv))
        studies = f"sqlite:///{plan.run_dir / 'studies.db'}"

        def stripes_waits_for_the_disk_study(config: dict, settings: dict) -> None:
            if config["category"] == "stripes":
                deadline = time.monotonic() + 240
                while time.monotonic() < deadline:
                    summaries = optuna.get_all_study_summaries(studies)
                    if any(s.study_name == "tiny/demo/disk" and "choice" in s.user_attrs for s in summaries):
                        break
                    time.sleep(1)
                else:
                    raise RuntimeError("disk's study never finished while stripes waited")
            train_category(config, settings)

        selected = execute(plan, trainable=stripes_waits_for_the_disk_study)
    finally:
        os.chdir(previous)
    return SimpleNamespace(
        root=root, argv=argv, plan=plan, run_dir=plan.run_dir, train=plan.training_root, selected=selected
    )


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


def s3_uri(endpoint: str, path: str) -> str:
    return f"s3://{path}?endpoint_override={endpoint}&scheme=http"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 holding an empty bucket; yields its HOST:PORT and stops it after.
    Tests that use it are skipped without moto[server] (the dev extra)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) runs the S3 tests")
    boto3 = pytest.importorskip("boto3")
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
