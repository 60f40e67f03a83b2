"""The plan's price against the run it prices: `tfsearch run`'s estimate beside the measured training time.

    python -m bench.plan                                   # demo, cpu profile, disk and stripes
    python -m bench.plan --profile small --categories stripes --epochs 20

The estimate is made as `tfsearch run` makes it (`tfsearch.run.estimate.estimate`, its calibration measured
into a fresh cache), then the same run is started as a subprocess in a temporary runs folder. Its "[done]
training X s" line is the measured wall time of the training stage; each training run's milestone log gives
its own duration (started_at to the last finished_at, whole seconds), beside the estimated device time of
its trial. The goal is an estimate within ±20 % of the measured wall time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--categories", default="disk,stripes")
    parser.add_argument("--space", default="per_class")
    parser.add_argument("--epochs", type=int)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    os.environ["TFSEARCH_CACHE"] = str(
        scratch / "cache"
    )  # the calibration is measured now, under today's load
    run_args = [
        "run", "--space", args.space, "--dataset", args.dataset, "--profile", args.profile,
        "--categories", args.categories, "--runs-root", str(scratch / "runs"), "--wandb", "disabled",
        *(["--epochs", str(args.epochs)] if args.epochs else []),
    ]  # fmt: skip

    from tfsearch.cli import build_parser
    from tfsearch.run.cost import plan_lines
    from tfsearch.run.estimate import estimate
    from tfsearch.run.plan import make_plan
    from tfsearch.store.run_folder import read_milestone_log

    plan = make_plan(build_parser().parse_args(run_args))
    started = time.perf_counter()
    cost = estimate(plan)
    print(f"estimate made in {time.perf_counter() - started:.1f} s (calibration measured now)")
    print("\n".join(plan_lines(plan, cost)))
    load_before = os.getloadavg()[0]
    completed = subprocess.run(
        [sys.executable, "-m", "tfsearch.cli", *run_args], capture_output=True, text=True, check=False
    )
    load_after = os.getloadavg()[0]
    if completed.returncode != 0:
        print(completed.stdout[-4000:], completed.stderr[-4000:], sep="\n")
        raise SystemExit(f"the run failed with status {completed.returncode}")
    measured = float(re.search(r"\[done\] training ([0-9.]+) s", completed.stdout).group(1))

    print("\nthe run's own lines: its plan, and the time left as its milestones came")
    for line in completed.stdout.splitlines():
        if line.startswith("[plan]") or "left about" in line:
            print(line)
    print(f"\nload average (1 min): {load_before:.2f} before the run, {load_after:.2f} after")
    print("| category | trial: estimated device time | trial: measured (milestone log) | ratio |")
    print("|---|---|---|---|")
    for category in cost.categories:
        log = read_milestone_log(plan.train_dir(category.category, "default"))
        start = datetime.fromisoformat(log[0]["started_at"])
        end = datetime.fromisoformat(log[-1]["finished_at"])
        took = (end - start).total_seconds()
        estimated = category.device_seconds
        print(f"| {category.category} | {estimated:.0f} s | {took:.0f} s | {estimated / took:.2f} |")
    print(
        f"\ntraining stage: estimated wall time {cost.wall_seconds:.0f} s on {cost.slots.count} slot(s),"
        f" measured {measured:.0f} s ([done] training):"
        f" estimate / measured = {cost.wall_seconds / measured:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
