"""Beyond one machine: the launcher configurations in cluster/ and a real multi-node run.

The cloud configurations are checked against Ray's own launcher schema, the KubeRay manifest against the
RayJob/RayCluster fields it may use, and the SLURM script is run with stand-ins for srun, scontrol, ray and
tfsearch that record what it starts. The multi-node run starts a Ray head and two workers on this machine,
inside a network namespace of the test's own (so that their traffic stays on the test's hosts), with an S3
server (moto) as the run storage, and loses a worker mid-run.
"""

import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from test_search import TINY, read_rows, write_space

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"


# ------------------------------------------------------------------------------- cloud launchers
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("provider", ["aws", "gcp"])
def test_launcher_configs_pass_rays_own_checks(provider):
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((CLUSTER / f"{provider}.yaml").read_text())
    jsonschema.validate(config, ray_schema())
    validate_config(fillout_defaults(config))  # what `ray up` runs before it launches anything
    assert config["provider"]["type"] == provider

    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0  # training trials ask for a GPU: never on the head
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert len(workers) == 1 and workers[0]["min_workers"] == 0 and workers[0]["max_workers"] >= 1
    # CPU torch on the head, CUDA torch (PyPI's default Linux wheel) on the GPU workers, tfsearch after it
    assert any(
        "torch --index-url https://download.pytorch.org/whl/cpu" in c for c in config["head_setup_commands"]
    )
    torch_step, install_step = (
        next(i for i, c in enumerate(config["worker_setup_commands"]) if key in c)
        for key in ("pip install torch", "pip install -e /home/ubuntu/tfsearch")
    )
    assert torch_step < install_step and "index-url" not in config["worker_setup_commands"][torch_step]
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    # the datasets sit at one path on every node
    assert any("/data/mvtec" in c for c in config["setup_commands"])


def test_the_schema_check_rejects_a_misspelt_key():
    jsonschema = pytest.importorskip("jsonschema")
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(broken, ray_schema())


# --------------------------------------------------------------------------------------- KubeRay
# The fields of ray.io/v1 RayJob (and the RayCluster spec inside it) and of a pod template that the manifest
# may use: a dict lists the allowed keys (None: free-form below), a one-element list the items' fields.
CONTAINER = {
    "name": None, "image": None, "imagePullPolicy": None, "command": None, "args": None, "env": None,
    "envFrom": None, "ports": [{"containerPort": None, "name": None, "protocol": None}],
    "resources": {"limits": None, "requests": None},
    "volumeMounts": [{"name": None, "mountPath": None, "readOnly": None, "subPath": None}],
    "lifecycle": None, "securityContext": None,
}  # fmt: skip
POD_TEMPLATE = {
    "metadata": {"labels": None, "annotations": None},
    "spec": {
        "containers": [CONTAINER], "volumes": [{"name": None, "persistentVolumeClaim": {"claimName": None,
        "readOnly": None}, "emptyDir": None, "configMap": None, "secret": None}],
        "serviceAccountName": None, "nodeSelector": None, "affinity": None, "restartPolicy": None,
        "tolerations": [{"key": None, "operator": None, "value": None, "effect": None}],
    },
}  # fmt: skip
RAY_JOB = {
    "apiVersion": None,
    "kind": None,
    "metadata": {"name": None, "namespace": None, "labels": None, "annotations": None},
    "spec": {
        "entrypoint": None, "runtimeEnvYAML": None, "jobId": None, "metadata": None, "suspend": None,
        "shutdownAfterJobFinishes": None, "ttlSecondsAfterFinished": None, "activeDeadlineSeconds": None,
        "backoffLimit": None, "submissionMode": None, "submitterPodTemplate": POD_TEMPLATE,
        "entrypointNumCpus": None, "entrypointNumGpus": None, "entrypointResources": None,
        "clusterSelector": None,
        "rayClusterSpec": {
            "rayVersion": None, "enableInTreeAutoscaling": None, "autoscalerOptions": None,
            "headServiceAnnotations": None,
            "headGroupSpec": {"serviceType": None, "rayStartParams": None, "template": POD_TEMPLATE},
            "workerGroupSpecs": [{
                "groupName": None, "replicas": None, "minReplicas": None, "maxReplicas": None,
                "rayStartParams": None, "template": POD_TEMPLATE, "numOfHosts": None, "suspend": None,
            }],
        },
    },
}  # fmt: skip


def unknown_fields(value, allowed, where: str = "") -> list[str]:
    """Paths of the keys in `value` that `allowed` does not list."""
    if allowed is None:
        return []
    if isinstance(allowed, list):
        return [p for i, item in enumerate(value) for p in unknown_fields(item, allowed[0], f"{where}[{i}]")]
    found = []
    for key, child in value.items():
        if key not in allowed:
            found.append(f"{where}.{key}")
        else:
            found += unknown_fields(child, allowed[key], f"{where}.{key}")
    return found


def test_kuberay_rayjob_uses_known_fields_and_runs_the_search():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert unknown_fields(job, RAY_JOB) == []
    assert unknown_fields({"spec": {"surprise": 1}}, RAY_JOB) == [".spec.surprise"]  # the check bites

    entrypoint = job["spec"]["entrypoint"]
    for flag in ("tfsearch run", "--space per_class", "--dataset mvtec", "--address auto", "--storage s3://"):
        assert flag in entrypoint
    assert "--resume" in entrypoint and "config.json" in entrypoint  # a resubmitted job continues the run
    cluster = job["spec"]["rayClusterSpec"]
    assert all(isinstance(v, str) for v in cluster["headGroupSpec"]["rayStartParams"].values())
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (gpu_group,) = cluster["workerGroupSpecs"]
    assert (
        gpu_group["minReplicas"] == 0 and gpu_group["maxReplicas"] >= 1 and cluster["enableInTreeAutoscaling"]
    )
    worker = gpu_group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert "/data" in mounts and "--data-root /data/mvtec" in entrypoint


# ----------------------------------------------------------------------------------------- SLURM
STANDINS = {
    # scontrol show hostnames LIST: the allocation's three nodes
    "scontrol": 'printf "node1\\nnode2\\nnode3\\n"',
    # srun ... -w NODE COMMAND...: run COMMAND "on" NODE
    "srun": 'while [ "${1#-}" != "$1" ]; do [ "$1" = -w ] && { node=$2; shift; }; shift; done\n'
    'echo "srun@$node $*" >> "$STANDIN_LOG"; SHIM_NODE=$node exec "$@"',
    "hostname": 'echo "10.0.0.${SHIM_NODE#node} "',
    "ray": 'echo "ray@${SHIM_NODE:-batch} $*" >> "$STANDIN_LOG"',
    # python3 - ADDRESS N (the wait for N nodes): returns once N stand-in Ray nodes have started
    "python3": "cat > /dev/null; for _ in $(seq 200); do\n"
    '  [ "$(grep -c "^ray@" "$STANDIN_LOG")" -ge "$3" ] && break; sleep 0.05\n'
    'done; echo "python3 $*" >> "$STANDIN_LOG"',
    "tfsearch": 'echo "tfsearch $*" >> "$STANDIN_LOG"; exit "${TFSEARCH_STATUS:-0}"',
}


def run_sbatch(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STANDINS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "standins.log"
    log.unlink(missing_ok=True)
    environment = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "STANDIN_LOG": str(log),
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node[1-3]",
        "SLURM_CPUS_PER_TASK": "32",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        **env,
    }
    result = subprocess.run(
        ["bash", str(CLUSTER / "slurm.sbatch"), "--categories", "bottle"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, log.read_text().splitlines() if log.exists() else []


def test_slurm_script_is_valid_shell():
    subprocess.run(["bash", "-n", str(CLUSTER / "slurm.sbatch")], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); bash -n passed")
    result = subprocess.run(["shellcheck", str(CLUSTER / "slurm.sbatch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_slurm_script_starts_the_cluster_then_runs_and_resumes(tmp_path):
    settings = {"TFSEARCH_DATA_ROOT": "/shared/data/mvtec", "TFSEARCH_STORAGE": "/shared/tfsearch"}
    result, calls = run_sbatch(tmp_path, **settings)
    assert result.returncode == 0, result.stderr
    head = next(c for c in calls if c.startswith("ray@node1 "))
    for flag in ("--head", "--block", "--node-ip-address=10.0.0.1", "--port=6379", "--num-gpus=4",
                 "--num-cpus=32", "--dashboard-host=127.0.0.1", "--temp-dir=/tmp/ray-42"):  # fmt: skip
        assert flag in head.split()
    for node in ("node2", "node3"):
        worker = next(c for c in calls if c.startswith(f"ray@{node} "))
        assert "--address=10.0.0.1:6379" in worker.split() and "--head" not in worker.split()
    # it waits for the head, then for all three nodes, before the search starts
    waits = [c for c in calls if c.startswith("python3 ")]
    assert waits == ["python3 - 10.0.0.1:6379 1", "python3 - 10.0.0.1:6379 3"]
    (run,) = [c for c in calls if c.startswith("tfsearch ")]
    assert calls.index(waits[-1]) < calls.index(run)
    expected = (
        f"tfsearch run --space per_class --dataset mvtec --data-root /shared/data/mvtec --runs-root "
        f"{tmp_path}/runs --name per_class-mvtec --address 10.0.0.1:6379 --storage /shared/tfsearch "
        "--cpus-per-trial 8 --categories bottle"
    )
    assert run == expected

    # the run folder exists: the same job continues it; tfsearch's exit status is the job's
    (tmp_path / "runs" / "per_class-mvtec").mkdir(parents=True)
    (tmp_path / "runs" / "per_class-mvtec" / "config.json").write_text("{}")
    result, calls = run_sbatch(tmp_path, **settings, TFSEARCH_STATUS="3")
    assert result.returncode == 3
    (run,) = [c for c in calls if c.startswith("tfsearch ")]
    assert run.endswith("--cpus-per-trial 8 --resume --categories bottle")


def test_slurm_script_needs_the_storage(tmp_path):
    result, calls = run_sbatch(tmp_path, TFSEARCH_DATA_ROOT="/shared/data/mvtec")
    assert result.returncode != 0 and "TFSEARCH_STORAGE" in result.stderr
    assert calls == []  # nothing was started


# ------------------------------------------------------------------------------ multi-node run
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
S3_PORT = 9000
HEAD_PORT = 6379
CREATE_BUCKET = """
import sys, time, boto3
client = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
for _ in range(120):
    try:
        client.create_bucket(Bucket="cluster-test")
        break
    except Exception:  # the server is still starting
        time.sleep(0.5)
else:
    sys.exit("no S3 server at " + sys.argv[1])
"""


class NamespaceCluster:
    """Ray nodes and an S3 server on this machine, inside the network namespace `name`.

    Each node has its own ports (only the namespace's loopback is up: nothing leaves it), temp dir and
    scratch folder; all share one token. Stopping it kills every process in the namespace, by PID.
    """

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, root
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            **CREDENTIALS,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            "WANDB_MODE": "disabled",
            "PYTHONUNBUFFERED": "1",
        }

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def start_s3(self) -> str:
        log = (self.root / "moto.log").open("w")
        python = sys.executable
        subprocess.Popen(self.command(python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)),
                         env=self.env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        endpoint = f"http://127.0.0.1:{S3_PORT}"
        subprocess.run(
            self.command(python, "-c", CREATE_BUCKET, endpoint), env=self.env, check=True, timeout=90
        )
        return f"127.0.0.1:{S3_PORT}"

    def node_args(self, index: int) -> list[str]:
        base = 7000 + 100 * index
        return [
            "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=2", "--disable-usage-stats",
            f"--temp-dir={self.root / f'node{index}'}", f"--node-manager-port={base + 1}",
            f"--object-manager-port={base + 2}", f"--metrics-export-port={base + 3}",
            f"--dashboard-agent-listen-port={base + 4}", f"--dashboard-agent-grpc-port={base + 5}",
            f"--runtime-env-agent-port={base + 6}", f"--min-worker-port={base + 10}",
            f"--max-worker-port={base + 99}",
        ]  # fmt: skip

    def start_nodes(self, workers: int) -> None:
        head = ["ray", "start", "--head", f"--port={HEAD_PORT}", "--include-dashboard=false",
                "--ray-client-server-port=6999", *self.node_args(0)]  # fmt: skip
        assert self._ray_start(head, 0).wait(timeout=120) == 0, (self.root / "ray-start.log").read_text()
        starts = [
            self._ray_start(["ray", "start", f"--address=127.0.0.1:{HEAD_PORT}", *self.node_args(i)], i)
            for i in range(1, workers + 1)
        ]
        for start in starts:
            assert start.wait(timeout=120) == 0, (self.root / "ray-start.log").read_text()

    def _ray_start(self, args: list[str], index: int) -> subprocess.Popen:
        env = {**self.env, "TFSEARCH_SCRATCH": str(self.scratch(index))}
        self.scratch(index).mkdir()
        log = (self.root / "ray-start.log").open("a")
        return subprocess.Popen(self.command(*args), env=env, stdout=log, stderr=subprocess.STDOUT)

    def scratch(self, index: int) -> Path:
        return self.root / f"scratch{index}"

    def raylet(self, index: int) -> tuple[int, str]:
        """PID and Ray node id of node `index`'s raylet, found by its temp dir."""
        marker = f"--temp_dir={self.root / f'node{index}'}"
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if argv[0].endswith("/raylet") and marker in argv:
                node_id = next(a.split("=", 1)[1] for a in argv if a.startswith("--node_id="))
                return int(proc.name), node_id
        raise AssertionError(f"no raylet with {marker}")

    def stop(self) -> None:
        for _ in range(50):
            pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout
            if not pids.split():
                break
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.2)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def namespace_cluster():
    """A network namespace of this test's own with its loopback up; skipped where namespaces are refused."""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed: no network namespace for the cluster")
    name = f"tfsearch-{os.getpid()}"
    added = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if added.returncode != 0:
        pytest.skip(
            f"network namespaces are not allowed here (`ip netns add` failed: {added.stderr.strip()})"
        )
    # short: Ray's socket paths under the temp dirs must stay within the 107 characters of a Unix socket
    cluster = NamespaceCluster(name, Path(tempfile.mkdtemp(prefix="tfc-", dir="/tmp")))
    try:
        subprocess.run(cluster.command("ip", "link", "set", "lo", "up"), check=True)
        yield cluster
    finally:
        cluster.stop()


def milestone_category(trial_dir: Path) -> str:
    """The category a training trial's scratch folder belongs to, from its job."""
    return json.loads((trial_dir / "job.json").read_text())["category"]


def test_multi_node_run_survives_a_lost_worker(tmp_path, demo_dataset_root, namespace_cluster):
    cluster = namespace_cluster
    endpoint = cluster.start_s3()
    cluster.start_nodes(workers=2)
    raylets = {index: cluster.raylet(index) for index in (0, 1, 2)}  # index: (pid, node id)

    space = write_space(tmp_path, profile_overrides={**TINY["profile_overrides"], "epochs": 3})
    categories = ["disk", "nut", "stripes"]
    storage = f"s3://cluster-test/runs?endpoint_override={endpoint}&scheme=http"
    args = [
        "run", "--space", str(space), "--dataset", "demo", "--data-root", str(demo_dataset_root),
        "--categories", ",".join(categories), "--runs-root", str(tmp_path / "runs"), "--name", "multi",
        "--quiet", "--wandb", "disabled", "--address", f"127.0.0.1:{HEAD_PORT}", "--storage", storage,
    ]  # fmt: skip
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen(
            cluster.command(sys.executable, "-m", "tfsearch.cli", *args),
            env=cluster.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        # lose a worker once a trial there has published milestone 1 and trained on to epoch 2 (of 3)
        deadline, lost = time.time() + 400, None
        while lost is None and time.time() < deadline and driver.poll() is None:
            reached = [
                p for i in (1, 2) for p in cluster.scratch(i).glob("tfsearch-*/checkpoints/epoch-0002")
            ]
            if reached:
                trial_dir = reached[0].parent.parent
                lost = int(trial_dir.parent.name.removeprefix("scratch")), milestone_category(trial_dir)
            time.sleep(0.2)
        assert lost is not None, "no worker trial reached epoch 2:\n" + (tmp_path / "driver.log").read_text()
        lost_node, lost_category = lost
        os.kill(raylets[lost_node][0], signal.SIGKILL)
        assert driver.poll() is None and not (tmp_path / "runs" / "multi" / "selected.csv").exists()
        code = driver.wait(timeout=600)
    assert code == 0, (tmp_path / "driver.log").read_text()[-5000:]

    run = tmp_path / "runs" / "multi"
    train_rows = [r for r in read_rows(run / "trials.csv") if r["stage"] == "train"]
    # every category has each milestone exactly once, and a selected configuration
    assert sorted((r["category"], r["epoch"]) for r in train_rows) == [
        (c, str(e)) for c in categories for e in (1, 2, 3)
    ]
    assert [r["category"] for r in read_rows(run / "selected.csv")] == categories
    for category in categories:
        history = read_rows(run / "cache" / "train" / category / "default" / "history.csv")
        assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    # trials ran on several nodes; the lost worker's trial kept its first milestone and finished elsewhere
    nodes = {r["node_id"] for r in train_rows}
    assert len(nodes) >= 2 and nodes <= {node_id for _, node_id in raylets.values()}
    lost_trial = {int(r["epoch"]): r["node_id"] for r in train_rows if r["category"] == lost_category}
    assert lost_trial[1] == raylets[lost_node][1] and lost_trial[3] != raylets[lost_node][1]
