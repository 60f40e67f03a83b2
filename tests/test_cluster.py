"""Beyond one machine: the launcher configurations in cluster/ and a real multi-node run.

The cloud configurations are checked against Ray's own launcher schema, the KubeRay manifest against the
RayJob/RayCluster fields it may use, and the SLURM script is run with stand-ins for srun, scontrol, ray and
tfsearch that record what it starts. The multi-node run starts a Ray head and two workers on this machine,
inside a network namespace of the test's own (so that their traffic stays on the test's hosts), with an S3
server (moto) as the run storage, and loses a worker mid-run.
"""

import contextlib
import json
import os
import re
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
from conftest import CREDENTIALS
from test_search import TINY, read_rows, write_space

from tfsearch.infra.fake_cluster import FakeAutoscalingCluster

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"


# ------------------------------------------------------------------------------- cloud launchers
# Ray's container images, pinned: rayproject/ray:RAY_VERSION-py3MINOR, with -gpu for the CUDA build
RAY_IMAGE = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py3(?P<minor>\d+)(?P<gpu>-gpu)?")
# the AWS host image: Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04), through its SSM parameter
DLAMI = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/"
# fields of the Compute API's Scheduling object (instances.insert) a launcher file may set, with their values
COMPUTE_SCHEDULING = {
    "provisioningModel": {"STANDARD", "SPOT"},
    "instanceTerminationAction": {"DELETE", "STOP"},
    "onHostMaintenance": {"MIGRATE", "TERMINATE"},
    "automaticRestart": {True, False},
    "preemptible": {True, False},
}


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def launcher_config(provider: str) -> dict:
    return yaml.safe_load((CLUSTER / f"{provider}.yaml").read_text())


def pinned_ray_image(image: str) -> tuple[str, int, bool]:
    """(Ray version, Python 3 minor version, CUDA build) of a pinned Ray image."""
    match = RAY_IMAGE.fullmatch(image)
    assert match, f"{image} is not a pinned rayproject/ray:VERSION-py3X[-gpu] image"
    return match["ray"], int(match["minor"]), match["gpu"] is not None


def advertised_resources(node_type: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The CPUs and GPUs that `ray start` on a head of this node type offers to tasks.

    The launcher hands the type's resources to `ray start` in RAY_OVERRIDE_RESOURCES; Ray's own resource
    spec resolves them (quantities of zero are left out, as in `ray status`).
    """
    from ray._private.ray_constants import RESOURCES_ENVIRONMENT_VARIABLE
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    monkeypatch.setenv(RESOURCES_ENVIRONMENT_VARIABLE, json.dumps(node_type["resources"]))
    resolved = ResourceAndLabelSpec().resolve(is_head=True, node_ip_address="127.0.0.1").to_resource_dict()
    return {name: amount for name, amount in resolved.items() if name in ("CPU", "GPU")}


@pytest.mark.parametrize("provider", ["aws", "gcp"])
def test_launcher_configs_pass_rays_own_checks(provider, monkeypatch):
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = launcher_config(provider)
    jsonschema.validate(config, ray_schema())
    validate_config(fillout_defaults(config))  # what `ray up` runs before it launches anything
    assert config["provider"]["type"] == provider

    # the head offers trials nothing (the driver and the selection run there); GPU workers from 0 up
    head = config["available_node_types"][config["head_node_type"]]
    assert advertised_resources(head, monkeypatch) == {}
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert len(workers) == 1 and workers[0]["min_workers"] == 0 and workers[0]["max_workers"] >= 1
    assert workers[0]["resources"]["GPU"] >= 1 and workers[0]["resources"]["CPU"] >= 4  # --cpus-per-trial 4

    # every command runs in Ray's container: pinned tags, Python >= 3.10, the Ray version setup installs
    docker = config["docker"]
    (ray_pin,) = re.findall(r"ray\[[a-z,]+\]==([\d.]+)", " ".join(config["setup_commands"]))
    for key, cuda in (("head_image", False), ("image", True)):
        ray_version, python_minor, cuda_build = pinned_ray_image(docker[key])
        assert (ray_version, cuda_build) == (ray_pin, cuda) and python_minor >= 10, docker[key]
    assert "--gpus all" in docker["worker_run_options"]
    assert "sys.version_info >= (3, 10)" in config["setup_commands"][0]  # fails setup loudly otherwise

    # CPU torch on the head, CUDA torch (PyPI's default Linux wheel) on the GPU workers, tfsearch after it
    assert any(
        "torch --index-url https://download.pytorch.org/whl/cpu" in c for c in config["head_setup_commands"]
    )
    torch_step, install_step = (
        next(i for i, c in enumerate(config["worker_setup_commands"]) if key in c)
        for key in ("pip install torch", "pip install -e ~/tfsearch")
    )
    assert torch_step < install_step and "index-url" not in config["worker_setup_commands"][torch_step]
    starts = [
        c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c
    ]
    assert len(starts) == 2 and all("--metrics-export-port=8080" in c.split() for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0].split()
    # the datasets sit at one path on every node, on the host's disk
    assert any("/data/mvtec" in c for c in config["setup_commands"])
    assert "--volume=/data:/data" in docker["run_options"]
    # the job the header submits: one GPU per trial, the run storage in the bucket
    (submitted,) = re.findall(
        r"ray job submit .*?(?=\n#\s+ray down)", (CLUSTER / f"{provider}.yaml").read_text(), re.S
    )
    scheme = {"aws": "s3", "gcp": "gs"}[provider]
    assert "--gpus-per-trial 1" in submitted and f"--storage {scheme}://YOUR-BUCKET/" in submitted


@pytest.mark.parametrize("provider", ["aws", "gcp"])
def test_launcher_copies_each_dataset_once(provider, tmp_path):
    bucket = {"aws": "s3", "gcp": "gs"}[provider] + "://YOUR-BUCKET/datasets/"
    copies = [
        command.replace(bucket, f"{tmp_path}/bucket/").replace("/data/", f"{tmp_path}/data/")
        for command in launcher_config(provider)["setup_commands"]
        if bucket in command
    ]
    assert len(copies) == 2  # MVTec AD and VisA
    for name in ("mvtec_anomaly_detection/bottle/train/good", "visa_pytorch/candle/train/good"):
        (tmp_path / "bucket" / name).mkdir(parents=True)
        (tmp_path / "bucket" / name / "000.png").write_text(name)
    (tmp_path / "data").mkdir()
    for command in copies:
        subprocess.run(["bash", "-c", command], check=True, timeout=60)
    copied = {
        p.relative_to(tmp_path / "data").as_posix(): p.read_text() for p in (tmp_path / "data").rglob("*.png")
    }
    assert copied == {
        "mvtec/bottle/train/good/000.png": "mvtec_anomaly_detection/bottle/train/good",
        "visa/candle/train/good/000.png": "visa_pytorch/candle/train/good",
    }
    # a second setup (ray up again) copies nothing: the bucket is gone and it still succeeds
    shutil.rmtree(tmp_path / "bucket")
    for command in copies:
        subprocess.run(["bash", "-c", command], check=True, timeout=60)
    assert len(list((tmp_path / "data").rglob("*.png"))) == 2


def test_aws_launcher_boots_a_named_ami_and_its_head_may_pass_the_workers_role():
    pytest.importorskip("boto3")
    from ray.autoscaler._private.aws.config import DEFAULT_RAY_IAM_ROLE, DEFAULT_RAY_INSTANCE_PROFILE

    text = (CLUSTER / "aws.yaml").read_text()
    config = yaml.safe_load(text)
    # an ImageId on every node type: without one Ray falls back to its old default Deep Learning AMI
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["ImageId"].startswith(DLAMI)
    # the workers get Ray's instance profile; the head (Ray's role) needs iam:PassRole on that role
    profile = config["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]["Arn"]
    account, profile_name = re.fullmatch(r"arn:aws:iam::(.+):instance-profile/(.+)", profile).groups()
    assert profile_name == DEFAULT_RAY_INSTANCE_PROFILE
    assert f"aws iam put-role-policy --role-name {DEFAULT_RAY_IAM_ROLE} " in text
    (policy,) = re.findall(r"^#\s+'(\{.*\})'$", text, flags=re.MULTILINE)
    assert json.loads(policy)["Statement"] == [
        {
            "Effect": "Allow",
            "Action": "iam:PassRole",
            "Resource": f"arn:aws:iam::{account}:role/{DEFAULT_RAY_IAM_ROLE}",
        }
    ]


def scheduling_errors(scheduling) -> list[str]:
    """What the Compute API would refuse in a node's `scheduling`: it takes one object of known fields."""
    if not isinstance(scheduling, dict):
        return [f"scheduling is a {type(scheduling).__name__}, not an object"]
    return [f"scheduling.{k}: {v!r}" for k, v in scheduling.items() if v not in COMPUTE_SCHEDULING.get(k, ())]


def test_gcp_launcher_workers_are_spot_through_one_scheduling_object():
    config = launcher_config("gcp")
    worker = config["available_node_types"]["gpu_worker"]
    assert scheduling_errors(worker["node_config"]["scheduling"]) == []
    assert worker["node_config"]["scheduling"]["provisioningModel"] == "SPOT"
    assert scheduling_errors([{"provisioningModel": "SPOT"}]) == ["scheduling is a list, not an object"]
    assert scheduling_errors({"provisioningModel": "spot"}) == ["scheduling.provisioningModel: 'spot'"]
    # the worker type's list replaces the global one: the host folders first, then the driver install
    assert worker["initialization_commands"][0] == config["initialization_commands"][0]
    assert "nvidia-smi" in worker["initialization_commands"][1]


@pytest.mark.parametrize(
    "path", [("available_node_types", "gpu_worker", "min_worker"), ("docker", "worker_run_option")]
)
def test_the_schema_check_rejects_a_misspelt_key(path):
    jsonschema = pytest.importorskip("jsonschema")
    broken = launcher_config("aws")
    section = broken
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = 0
    with pytest.raises(jsonschema.ValidationError, match=path[-1]):
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
        "securityContext": {"fsGroup": None, "fsGroupChangePolicy": None, "runAsUser": None,
                            "runAsGroup": None, "runAsNonRoot": None},
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


# the KubeRay release that added each RayJob field the manifest may use; the others exist since 1.0
RAY_JOB_FIELDS_SINCE = {"submissionMode": (1, 1), "activeDeadlineSeconds": (1, 1), "backoffLimit": (1, 2)}
# Ray's images run as the user ray: uid 1000, group users (gid 100)
IMAGE_GID = 100


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


def writable_claims(pod_spec: dict) -> list[str]:
    """The persistent volume claims a pod mounts for writing."""
    return [
        volume["name"]
        for volume in pod_spec["volumes"]
        if "persistentVolumeClaim" in volume and not volume["persistentVolumeClaim"].get("readOnly")
    ]


def test_kuberay_rayjob_uses_known_fields_and_runs_the_search():
    text = (CLUSTER / "kuberay-rayjob.yaml").read_text()
    job = yaml.safe_load(text)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert unknown_fields(job, RAY_JOB) == []
    assert unknown_fields({"spec": {"surprise": 1}}, RAY_JOB) == [".spec.surprise"]  # the check bites
    # the header names a KubeRay release that has every field used
    named = tuple(int(n) for n in re.search(r"KubeRay >= (\d+)\.(\d+)", text.splitlines()[0]).groups())
    assert named >= max(RAY_JOB_FIELDS_SINCE.get(field, (1, 0)) for field in job["spec"]) == (1, 2)

    entrypoint = job["spec"]["entrypoint"]
    for flag in ("tfsearch run", "--space per_class", "--dataset mvtec", "--address auto", "--storage s3://",
                 "--gpus-per-trial 1"):  # fmt: skip
        assert flag in entrypoint
    assert "--resume" in entrypoint and "config.json" in entrypoint  # a resubmitted job continues the run
    cluster = job["spec"]["rayClusterSpec"]
    head_group, (gpu_group,) = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    for group in (head_group, gpu_group):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
    # the head offers trials nothing (the driver and the selection run there)
    assert (head_group["rayStartParams"]["num-cpus"], head_group["rayStartParams"]["num-gpus"]) == ("0", "0")
    head = head_group["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert (
        gpu_group["minReplicas"] == 0 and gpu_group["maxReplicas"] >= 1 and cluster["enableInTreeAutoscaling"]
    )
    worker = gpu_group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert "/data" in mounts and "--data-root /data/mvtec" in entrypoint
    # the head writes the run folder to a claimed volume: the pod gives it the image's group (uid 1000 writes)
    head_spec, worker_spec = (group["template"]["spec"] for group in (head_group, gpu_group))
    assert writable_claims(head_spec) == ["runs"] and writable_claims(worker_spec) == []
    assert head_spec["securityContext"]["fsGroup"] == IMAGE_GID


def test_kuberay_image_is_rays_pinned_image_at_the_clusters_version():
    manifest = (CLUSTER / "kuberay-rayjob.yaml").read_text()
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    ray_version = yaml.safe_load(manifest)["spec"]["rayClusterSpec"]["rayVersion"]
    # the GPU workers' image is the Dockerfile's default; the CPU head's a build argument named in both files
    (gpu_base,) = re.findall(r"^ARG BASE=(\S+)$", dockerfile, flags=re.MULTILINE)
    (cpu_base,) = set(re.findall(r"--build-arg BASE=(\S+)", dockerfile + manifest))
    for image, cuda in ((gpu_base, True), (cpu_base, False)):
        version, python_minor, cuda_build = pinned_ray_image(image)
        assert (version, cuda_build) == (ray_version, cuda) and python_minor >= 10, image


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
    # the first node is a GPU node like the others: it keeps its CPUs and GPUs for trials
    for flag in ("--head", "--block", "--node-ip-address=10.0.0.1", "--port=6379", "--num-gpus=4",
                 "--num-cpus=32", "--dashboard-host=127.0.0.1", "--metrics-export-port=8080",
                 "--temp-dir=/tmp/ray-42"):  # fmt: skip
        assert flag in head.split()
    for node in ("node2", "node3"):
        worker = next(c for c in calls if c.startswith(f"ray@{node} ")).split()
        assert "--address=10.0.0.1:6379" in worker and "--metrics-export-port=8080" in worker
        assert "--head" not in worker
    # it waits for the head, then for all three nodes, before the search starts
    waits = [c for c in calls if c.startswith("python3 ")]
    assert waits == ["python3 - 10.0.0.1:6379 1", "python3 - 10.0.0.1:6379 3"]
    (run,) = [c for c in calls if c.startswith("tfsearch ")]
    assert calls.index(waits[-1]) < calls.index(run)
    expected = (
        f"tfsearch run --space per_class --dataset mvtec --data-root /shared/data/mvtec --runs-root "
        f"{tmp_path}/runs --name per_class-mvtec --address 10.0.0.1:6379 --storage /shared/tfsearch "
        "--gpus-per-trial 1 --cpus-per-trial 8 --categories bottle"
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
        assert self._ray_start(head, 0).wait(timeout=120) == 0, self.start_failure(0)
        # one after another: `ray start` gives a node 30 s to register, which two nodes starting at once on
        # two loaded cores can miss
        for i in range(1, workers + 1):
            worker = ["ray", "start", f"--address=127.0.0.1:{HEAD_PORT}", *self.node_args(i)]
            assert self._ray_start(worker, i).wait(timeout=120) == 0, self.start_failure(i)

    def start_failure(self, index: int) -> str:
        """`ray start`'s output and the end of the node's raylet log, for the message of a failed start."""
        raylet = self.root / f"node{index}" / "session_latest" / "logs" / "raylet.out"
        tail = raylet.read_text(errors="replace")[-3000:] if raylet.is_file() else f"(no {raylet})"
        return (self.root / "ray-start.log").read_text() + "\n--- raylet.out ---\n" + tail

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


def with_descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from the parent ids in /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # the fields after the command name, which may hold spaces, start with state and parent id
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    family = [pid]
    for member in family:
        family += [child for child, parent in parents.items() if parent == member]
    return family


def milestone_category(trial_dir: Path) -> str:
    """The category a training trial's scratch folder belongs to, from its job."""
    return json.loads((trial_dir / "job.json").read_text())["category"]


def test_multi_node_run_survives_a_lost_worker(tmp_path, demo_dataset_root, namespace_cluster):
    cluster = namespace_cluster
    endpoint = cluster.start_s3()
    cluster.start_nodes(workers=2)
    raylets = {index: cluster.raylet(index) for index in (0, 1, 2)}  # index: (pid, node id)

    space = write_space(tmp_path, profile_overrides={**TINY["profile_overrides"], "epochs": 4})
    categories = ["disk", "stripes"]  # on 3 one-CPU nodes: the lost trial finds a free node at once
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
        # lose a worker machine (its raylet and every worker process on it) once a trial there has published
        # milestone 1 and trained on to epoch 2 (of 4): a worker outlives its raylet for a moment, long enough
        # on a fast machine to report another epoch, so it goes with it as with a machine that is switched off
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
        for pid in with_descendants(raylets[lost_node][0]):
            os.kill(pid, signal.SIGKILL)
        assert driver.poll() is None and not (tmp_path / "runs" / "multi" / "selected.csv").exists()
        code = driver.wait(timeout=600)
    assert code == 0, (tmp_path / "driver.log").read_text()[-5000:]

    run = tmp_path / "runs" / "multi"
    train_rows = [r for r in read_rows(run / "trials.csv") if r["stage"] == "train"]
    # every category has each milestone exactly once, and a selected configuration
    assert sorted((r["category"], r["epoch"]) for r in train_rows) == [
        (c, str(e)) for c in categories for e in (1, 2, 3, 4)
    ]
    assert [r["category"] for r in read_rows(run / "selected.csv")] == categories
    for category in categories:
        history = read_rows(run / "cache" / "train" / category / "default" / "history.csv")
        assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4]
    # trials ran on several nodes; the lost worker's trial kept its first milestone and finished elsewhere
    nodes = {r["node_id"] for r in train_rows}
    assert len(nodes) >= 2 and nodes <= {node_id for _, node_id in raylets.values()}
    lost_trial = {int(r["epoch"]): r["node_id"] for r in train_rows if r["category"] == lost_category}
    assert lost_trial[1] == raylets[lost_node][1] and lost_trial[4] != raylets[lost_node][1]


# ------------------------------------------------------------------------------ autoscaling cluster
@pytest.fixture
def autoscaling_cluster():
    """A head without CPUs or GPUs for work and up to 3 worker nodes of {CPU: 2, GPU: 1} started on demand
    by Ray's fake node provider; only its own processes are stopped after."""
    # short: Ray's socket paths under the temp dir must stay within the 107 characters of a Unix socket
    root = Path(tempfile.mkdtemp(prefix="tfa-", dir="/tmp"))
    cluster = FakeAutoscalingCluster(root, {"CPU": 2, "GPU": 1}, max_workers=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_an_autoscaling_cluster_starts_gpu_workers_for_every_trial(
    tmp_path, demo_dataset_root, autoscaling_cluster
):
    cluster = autoscaling_cluster
    (head,) = cluster.raylets()  # no worker node before there is work
    # the tiny network under the paper profile's name: a GPU profile, each trial asks for one GPU by default
    space = write_space(tmp_path, profile="paper")
    categories = ["disk", "nut", "stripes"]
    args = [
        "run", "--space", str(space), "--dataset", "demo", "--data-root", str(demo_dataset_root),
        "--categories", ",".join(categories), "--runs-root", str(tmp_path / "runs"), "--name", "autoscaled",
        "--wandb", "disabled", "--address", cluster.address, "--allow-cpu",
    ]  # fmt: skip
    env = {**cluster.client_env(), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    # a driver without the cluster's token is refused within seconds, naming the flag and the token variable,
    # and leaves nothing that stops the corrected command below
    tokenless = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    started = time.monotonic()
    refused = subprocess.run(
        [sys.executable, "-m", "tfsearch.cli", *args],
        env={**tokenless, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"--address {cluster.address}: the Ray cluster there refused this driver's token" in refused.stderr
    assert "RAY_AUTH_TOKEN" in refused.stderr.splitlines()[-1]
    assert time.monotonic() - started < 60
    assert not (tmp_path / "runs" / "autoscaled").exists()
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.run(
            [sys.executable, "-m", "tfsearch.cli", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    output = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, output[-5000:]

    run = tmp_path / "runs" / "autoscaled"
    train_rows = [r for r in read_rows(run / "trials.csv") if r["stage"] == "train"]
    assert sorted((r["category"], r["epoch"]) for r in train_rows) == [
        (c, e) for c in categories for e in "12"
    ]
    # each trial held a GPU of a worker node started on demand, never the head. The plan's calibration (a
    # task holding a trial's GPU) starts the first worker before the trials are submitted, and a trial this
    # tiny may end before the next worker joins, so a worker may hold two trials one after the other
    workers = {node for node, is_head in cluster.raylets().items() if not is_head}
    placed = {r["category"]: r["node_id"] for r in train_rows}
    assert len(workers) >= 2 and set(placed.values()) <= workers and head not in placed.values()
    assert "[plan] calibration" in output  # measured on a worker: the head has no GPU
    # the trials said that they trained on the CPU of a node whose GPU torch cannot see
    assert "on the CPU: GPU held without CUDA" in output
    selected = read_rows(run / "selected.csv")
    assert sorted(r["category"] for r in selected) == categories
    assert all(r["status"] == "ok" for r in selected), selected
