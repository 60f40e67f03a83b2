"""What selection costs on top of training: `--space per_class` against `--space single`, side by side.

    python bench/search.py                                   # demo, cpu profile, 2 categories
    python bench/search.py --epochs 20 --categories stripes,weave,disk,nut

Both runs train the same categories with the same profile and milestones (training is the floor); `single`
evaluates only the default configuration, `per_class` runs an Optuna study per category on the cached maps.
Each run is a fresh `tfsearch run` process (Ray start-up included in both). It prints both wall times, their
ratio (goal ≤ 1.15), and the training epochs each category ran, which must equal the last milestone whatever
the trial budget.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(space: str, args: argparse.Namespace, root: Path) -> float:
    command = [sys.executable, "-m", "tfsearch.cli", "run", "--space", space, "--dataset", args.dataset]
    command += ["--profile", args.profile, "--epochs", str(args.epochs), "--categories", args.categories]
    command += ["--runs-root", str(root), "--name", space, "--quiet", "--wandb", "disabled"]
    if args.data_root:
        command += ["--data-root", args.data_root]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "WANDB_MODE": "disabled"})
    return time.perf_counter() - started


def epochs_trained(run_dir: Path) -> dict[str, int]:
    counts = {}
    for history in sorted(run_dir.glob("train/*/*/history.csv")):
        with history.open() as handle:
            counts[history.parent.parent.name] = len(list(csv.DictReader(handle)))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--data-root")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--categories", default="stripes,disk")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tfsearch-bench-") as folder:
        root = Path(folder)
        single = timed_run("single", args, root)
        per_class = timed_run("per_class", args, root)
        with (root / "per_class" / "trials.csv").open() as handle:
            candidates = sum(row["stage"] == "select" for row in csv.DictReader(handle))
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.dataset} {args.categories}")
        print(f"profile {args.profile}, {args.epochs} epochs")
        print(f"single:    {single:7.1f} s")
        print(f"per_class: {per_class:7.1f} s  ({candidates} selection candidates)")
        print(f"ratio per_class / single: {per_class / single:.3f}  (goal <= 1.15)")
        print(f"epochs trained per category, single:    {epochs_trained(root / 'single')}")
        print(f"epochs trained per category, per_class: {epochs_trained(root / 'per_class')}")


if __name__ == "__main__":
    main()
