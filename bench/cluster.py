"""Busy GPU slots: a search on a fake autoscaling cluster of N GPU workers, and the same search on one node.

    python bench/cluster.py --workers 3 --categories disk,nut,stripes --seeds 2 --epochs 10

The cluster is `tfsearch.infra.fake_cluster`: a head with no CPUs or GPUs for work, and worker nodes of
{CPU: 1, GPU: 1} that Ray's autoscaler starts on demand, up to `--workers` (all of them processes on this
machine, sharing its cores). `tfsearch run --space single` trains every category × seed there with one GPU
per trial (`--allow-cpu`: the GPUs are logical), then the same search runs on this machine as one node, its
CPUs as the slots (`--gpus-per-trial 0`). It prints both wall times and, for the cluster, the fraction of
worker-slot time that trials were busy, from the first trial's start to the last one's end (goal ≥ 0.8 when
categories × seeds ≥ slots): "held" counts each trial actor's life from the actor table of Ray's GCS
(process start-up and data loading included), "training" only the span its milestones cover in trials.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from tfsearch.data.demo import write_demo
from tfsearch.infra.fake_cluster import FakeAutoscalingCluster

# run on the cluster as a driver of its own (Ray reads the cluster's token when it is imported): every
# actor's class, node and lifetime, from the GCS (there is no dashboard to ask)
ACTOR_TABLE = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
from ray._private.state import actors
print(json.dumps([
    {"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "start": a["StartTime"] / 1000,
     "end": a["EndTime"] / 1000}
    for a in actors().values()
]))
"""


def search_command(args: argparse.Namespace, data_root: Path, runs: Path, name: str) -> list[str]:
    return [
        sys.executable, "-m", "tfsearch.cli", "run", "--space", "single", "--dataset", "demo",
        "--data-root", str(data_root), "--profile", "cpu", "--epochs", str(args.epochs),
        "--categories", args.categories, "--seeds", str(args.seeds), "--runs-root", str(runs),
        "--name", name, "--quiet", "--wandb", "disabled",
    ]  # fmt: skip


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**env, "WANDB_MODE": "disabled"})
    return time.perf_counter() - started


def training_spans(run_dir: Path) -> list[tuple[float, float]]:
    """Per training trial (category, seed): from its start to its last milestone, from trials.csv."""
    spans: dict[tuple[str, str], tuple[float, float]] = {}
    with (run_dir / "trials.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["stage"] != "train":
                continue
            key = (row["category"], row.get("seed", ""))
            start = datetime.fromisoformat(row["started_at"]).timestamp()
            end = datetime.fromisoformat(row["finished_at"]).timestamp()
            low, high = spans.get(key, (start, end))
            spans[key] = (min(low, start), max(high, end))
    return list(spans.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3, help="GPU worker nodes at most (one slot each)")
    parser.add_argument("--categories", default="disk,nut,stripes")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10, help="cpu profile epochs per trial")
    args = parser.parse_args()
    trials = len(args.categories.split(",")) * args.seeds

    with tempfile.TemporaryDirectory(prefix="tfb-", dir="/tmp") as folder:  # short: Ray's socket paths
        root = Path(folder)
        data_root = write_demo(root / "data", seed=0)
        cluster = FakeAutoscalingCluster(root / "c", {"CPU": 1, "GPU": 1}, max_workers=args.workers)
        with cluster:
            command = search_command(args, data_root, root / "runs", "cluster")
            command += ["--address", cluster.address, "--gpus-per-trial", "1", "--allow-cpu"]
            cluster_wall = timed(command, cluster.client_env())
            table = subprocess.run(
                [sys.executable, "-c", ACTOR_TABLE, cluster.address],
                env=cluster.client_env(),
                capture_output=True,
                text=True,
                check=True,
            )
            workers = {node for node, is_head in cluster.raylets().items() if not is_head}
        held = [(a["start"], a["end"]) for a in json.loads(table.stdout) if a["node"] in workers]
        training = training_spans(root / "runs" / "cluster")
        first, last = min(s for s, _ in held), max(e for _, e in held)
        slot_time = args.workers * (last - first)

        one_node_wall = timed(
            [*search_command(args, data_root, root / "runs", "one-node"), "--gpus-per-trial", "0"],
            dict(os.environ),
        )

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    print(
        f"search: {args.categories} × {args.seeds} seeds = {trials} trials, cpu profile, {args.epochs} epochs"
    )
    print(f"fake cluster: up to {args.workers} GPU workers of {{CPU: 1, GPU: 1}}, {len(workers)} started")
    print(f"  wall time {cluster_wall:.1f} s; trial actors on workers: {len(held)}")
    span = f"{args.workers} slots × {last - first:.1f} s from the first trial's start to the last one's end"
    print(f"  slot time {slot_time:.1f} s ({span})")
    print(f"  busy fraction, held:     {sum(e - s for s, e in held) / slot_time:.3f}  (goal >= 0.8)")
    print(f"  busy fraction, training: {sum(e - s for s, e in training) / slot_time:.3f}")
    print(f"one node ({os.cpu_count()} CPUs as slots): wall time {one_node_wall:.1f} s")
    print(f"ratio cluster / one node: {cluster_wall / one_node_wall:.3f}")


if __name__ == "__main__":
    main()
