"""An autoscaling Ray cluster on this machine, for tests and benchmarks of what a cloud cluster does.

The head runs Ray's fake multi-node node provider (`ray.autoscaler._private.fake_multi_node`): its
autoscaler answers resource demand by starting worker nodes as local processes, each with the resources of
its node type (logical GPUs included), and stops them when idle, as a cloud provider would start and stop
machines. A head that advertises 0 CPUs and 0 GPUs, like the launchers' heads, leaves every trial to the
workers, so a run must raise demand the autoscaler can see.

Everything lives under one folder of its own: the head's ports are free ports picked at start, Ray's temp
dir (which the worker nodes share) is inside the folder, and `stop` kills, by PID, exactly the processes
whose command line names that folder, never other Ray instances on the machine (`ray stop` would).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ray.util import get_node_ip_address

HEAD_TYPE = "ray.head.default"  # the head's node type name, which the fake provider expects
WORKER_TYPE = "gpu_worker"


def node_ip() -> str:
    """The address Ray gives this machine's nodes (and the fake provider's worker nodes take)."""
    return get_node_ip_address()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeAutoscalingCluster:
    """A head with no resources for work and one worker type, from 0 up to `max_workers` nodes."""

    def __init__(self, root: Path, worker_resources: dict[str, float], max_workers: int) -> None:
        self.root = Path(root).resolve()
        self.worker_resources = dict(worker_resources)
        self.max_workers = max_workers
        self.port = free_port()
        self.address = f"{node_ip()}:{self.port}"
        self.log = self.root / "ray-start.log"
        # Ray's token authentication, with a token of this cluster's own: a driver needs `client_env()`
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def config(self) -> dict:
        """The autoscaling config: the keys `ray up` files have, with the fake provider."""
        return {
            "cluster_name": "tfsearch-fake",
            "max_workers": self.max_workers,
            "provider": {
                "type": "fake_multinode",
                "gcs_address": self.address,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "launch_multiple": True,  # a launch of N nodes starts N (by default the provider starts 1)
            },
            "available_node_types": {
                HEAD_TYPE: {"resources": {"CPU": 0, "GPU": 0}, "node_config": {}, "max_workers": 0},
                WORKER_TYPE: {
                    "resources": self.worker_resources,
                    "node_config": {},
                    "min_workers": 0,
                    "max_workers": self.max_workers,
                },
            },
            "head_node_type": HEAD_TYPE,
            "upscaling_speed": float(self.max_workers),  # all the nodes a demand needs in one step
            "idle_timeout_minutes": 5,
            "auth": {},
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def client_env(self) -> dict[str, str]:
        """This process's environment with what a driver of this cluster needs (its token)."""
        return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **self.auth}

    def env(self) -> dict[str, str]:
        """The environment of the head, which its autoscaler passes on to the worker nodes it starts."""
        return {
            **self.client_env(),
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def start(self, timeout: float = 180) -> None:
        """Start the head and its autoscaler; no worker node runs until there is demand for one."""
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "autoscaling.json"
        config.write_text(json.dumps(self.config(), indent=2))
        ports = {
            "--port": self.port,
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--metrics-export-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--ray-client-server-port": free_port(),
        }
        command = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--num-cpus=0", "--num-gpus=0",
            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self.root / 'ray'}",
            f"--autoscaling-config={config}", *(f"{flag}={port}" for flag, port in ports.items()),
        ]  # fmt: skip
        try:
            with self.log.open("a") as log:
                started = subprocess.run(
                    command, env=self.env(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout
                )
            if started.returncode != 0:
                output = self.log.read_text()
                raise RuntimeError(f"`ray start --head` failed ({started.returncode}):\n{output}")
        except BaseException:
            self.stop()  # whatever of the head had started
            raise

    def raylets(self) -> dict[str, bool]:
        """The node id of each running node of this cluster, and whether it is the head."""
        return {
            next(a.split("=", 1)[1] for a in argv if a.startswith("--node_id=")): "--head" in argv
            for argv in self.command_lines().values()
            if argv[0].endswith("/raylet")
        }

    def processes(self) -> list[int]:
        """PIDs of every process of this cluster: those whose command line names its folder, and their
        descendants (a raylet's agents name no folder, and outlive a raylet that is killed)."""
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        found = set(self.command_lines())
        grown = True
        while grown:
            children = {pid for pid, parent in parents.items() if parent in found} - found - {os.getpid()}
            found |= children
            grown = bool(children)
        return sorted(found)

    def command_lines(self) -> dict[int, list[str]]:
        """By PID, the arguments of each process of this cluster (its command line names the folder)."""
        marker, found = str(self.root), {}
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                argv = cmdline.read_bytes().decode(errors="replace").split("\0")
                if any(marker in arg for arg in argv) and int(cmdline.parent.name) != os.getpid():
                    found[int(cmdline.parent.name)] = argv
        return found

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM to this cluster's processes, then SIGKILL to whatever is left after `timeout` s. The
        processes are listed once, first: a killed raylet's agents no longer descend from it."""
        pids = self.processes()
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.2)

    def __enter__(self) -> FakeAutoscalingCluster:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
