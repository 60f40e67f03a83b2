"""What `--patience K` saves and what it costs: epochs and device time against the selected image AUROC,
per category, on the realistic demo with the quick profile and a milestone every 10 epochs.

    python -m bench.patience --train --runs-root /tmp/patience      # the full run, then the figures
    python -m bench.patience /tmp/patience/full --patience 2          # the figures from a finished full run
    python -m bench.patience --check --runs-root /tmp/patience-check  # a real --patience run against them

Training is deterministic (a resumed run is bit-identical to one that never stopped) and the stop decision
reads only the milestones up to the stop, so a patience-K run is the full run truncated at its stop: the
same milestones, maps and weights up to there, and nothing after. This bench therefore trains once, without
patience, and works out the patience-K outcome from that run's folder with the code the run itself uses:
each milestone's best value over the space's (λ, n) (`milestone_best`), the stop (`stop_decision`), and the
selection study over the milestones reached (`run_study` on the same candidates). `--check` tests that
claim: it trains a `cpu`-profile run of the demo twice, without and with `--patience`, and compares the
patience run's stop and its selected.csv with what this bench computes from the full run.

Per category it prints: the epoch the category would stop at, the epochs not trained, the training seconds
of those epochs (`history.csv`, as selected.csv's `device_hours_saved` counts them) and the wall seconds from
the stop milestone to the last one (`milestones.json` timestamps: the maps of the milestones not reached
too), and the selected configuration and its test image AUROC with and without early stopping.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import optuna
import yaml

from tfsearch.run.selection.candidates import Candidate, CategoryMaps
from tfsearch.run.selection.study import StudySpec, best_candidate, run_study
from tfsearch.run.space import Space, load_space
from tfsearch.run.training.early_stop import milestone_best, stop_decision
from tfsearch.store.run_folder import read_early_stop, read_milestone_log
from tfsearch.transfusion.job import TrainDir

# the measured space: every (epoch, λ, n) of the per-class search, a milestone every 10 epochs
SPACE = {
    "name": "patience_bench",
    "description": "per category, every (epoch, λ, n) with a milestone every 10 epochs (bench/patience.py)",
    "scope": "per_class",
    "profile": "small",
    "milestones": {"every": 10},
    "selection": {"metric": "image_auroc", "sampler": "exhaustive"},
    "params": {
        "epoch": "milestones",
        "lam": {"low": 0.5, "high": 1.0},
        "kernel": {"choices": [1, 3, 5, 7, 9, 11, 15]},
    },
}
# the test suite's toy size of the network (--toy, and --check)
TOY = {
    "image_size": 32,
    "base_channels": 8,
    "norm_groups": 4,
    "head_norm_groups": 4,
    "time_dim": 32,
    "steps": 4,
}
# --check: the cpu profile at toy size, 12 epochs with a milestone every 2: a minute or two per run on 2
# quiet cores
CHECK_SPACE = {
    **SPACE,
    "name": "patience_check",
    "description": "the cpu profile at toy size, a milestone every 2 of 12 epochs (bench/patience.py)",
    "profile": "cpu",
    "profile_overrides": {"epochs": 12, **TOY},
    "milestones": {"every": 2},
}


def tfsearch_run(
    space: Path, runs_root: Path, name: str, dataset: str, categories: str, *extra: str
) -> subprocess.Popen:
    """`tfsearch run` as a user types it, started in a process of its own."""
    command = [sys.executable, "-m", "tfsearch.cli", "run", "--space", str(space), "--dataset", dataset]
    command += ["--categories", categories, "--runs-root", str(runs_root), "--name", name]
    command += ["--wandb", "disabled", "--quiet", *extra]
    print("$", " ".join(command[1:]), flush=True)
    return subprocess.Popen(command)


def wait(*runs: subprocess.Popen) -> None:
    for run in runs:
        if run.wait() != 0:
            raise SystemExit(f"{' '.join(run.args)} exited with status {run.returncode}")


def write_space(payload: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{payload['name']}.yaml"
    path.write_text(yaml.safe_dump(payload, allow_unicode=True, sort_keys=False))
    return path


def select(space: Space, maps: dict[int, Path], default: Candidate) -> Candidate:
    """The candidate the run's study chooses among the milestones `maps` (an exhaustive study, as run)."""
    checkpoints = [("default", epoch) for epoch in sorted(maps)]
    kernels = space.values("kernel", default.kernel)
    candidates = CategoryMaps({("default", e): path for e, path in maps.items()}, kernels)
    spec = StudySpec("bench", space, {"c": candidates}, checkpoints, default)
    chosen, _ = best_candidate(run_study(optuna.storages.InMemoryStorage(), spec), default)
    return chosen


def selected_row(run_dir: Path, category: str) -> dict | None:
    """The category's row of the run's own selected.csv, if it has one."""
    path = run_dir / "selected.csv"
    if not path.is_file():
        return None
    with path.open() as handle:
        return next((r for r in csv.DictReader(handle) if r["category"] == category), None)


def seconds_after(history: Path, epoch: int) -> tuple[float, float]:
    """Training seconds of the epochs after `epoch`, and of all epochs (`history.csv`)."""
    rows = list(csv.DictReader(history.read_text().splitlines()))
    after = sum(float(r["seconds"]) for r in rows if int(r["epoch"]) > epoch)
    return after, sum(float(r["seconds"]) for r in rows)


def outcome(run_dir: Path, patience: int) -> list[dict]:
    """Per category of a full run: the patience-K stop and the selection with and without it."""
    config = json.loads((run_dir / "config.json").read_text())
    space = load_space(config["space"]["source"])
    lam0, n0 = float(config["profile"]["lam"]), int(config["profile"]["kernel"])
    lams, kernels = space.values("lam", lam0), space.values("kernel", n0)
    split = "val" if config.get("select_on") == "val" else "test"
    last = int(config["milestones"][-1])
    rows = []
    for category in config["categories"]:
        folder = TrainDir(run_dir / "train" / category / "default")
        log = read_milestone_log(folder.root)
        if not log or log[-1]["epoch"] != last:
            continue  # not trained to its last milestone (yet)
        maps = {r["epoch"]: folder.maps(r["epoch"], split) for r in log}
        values = [(e, milestone_best(path, space.metric, lams, kernels)[0]) for e, path in maps.items()]
        decision = stop_decision(values, patience, last)
        stop = decision.epoch if decision else last
        reached = {e: path for e, path in maps.items() if e <= stop}
        full = select(space, maps, Candidate("default", last, lam0, n0))
        recorded = selected_row(run_dir, category)
        keys = ("selected_epoch", "selected_lam", "selected_kernel")
        if recorded and tuple(float(recorded[k]) for k in keys) != (full.epoch, full.lam, full.kernel):
            raise SystemExit(f"{category}: the study here chose {full}, the run's selected.csv {recorded}")
        early = select(space, reached, Candidate("default", stop, lam0, n0))
        test = CategoryMaps({("default", e): folder.maps(e, "test") for e in maps}, kernels)
        saved, total = seconds_after(folder.history_file, stop)
        finished = {r["epoch"]: datetime.fromisoformat(r["finished_at"]) for r in log}
        rows.append(
            {
                "category": category,
                "values": values,
                "stop": stop,
                "best_epoch": decision.best_epoch if decision else None,
                "epochs_not_trained": last - stop,
                "train_s": total,
                "train_s_saved": saved,
                "wall_s": (finished[last] - datetime.fromisoformat(log[0]["started_at"])).total_seconds(),
                "wall_s_saved": (finished[last] - finished[stop]).total_seconds(),
                "full": full,
                "early": early,
                "full_auroc": test.evaluate(full)["image_auroc"],
                "early_auroc": test.evaluate(early)["image_auroc"],
            }
        )
    return rows


def print_outcome(rows: list[dict], patience: int, last: int) -> None:
    print(f"\n--patience {patience}, last milestone {last}:")
    print(
        "| category | best value per milestone | stops at | epochs not trained | training s saved (of) |"
        " wall s saved (of) | selected, full run | image AUROC | selected, patience | image AUROC | Δ |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        values = " ".join(f"{e}:{100 * v:.1f}" for e, v in r["values"])
        full, early = r["full"], r["early"]
        print(
            f"| {r['category']} | {values} | {r['stop']} | {r['epochs_not_trained']} |"
            f" {r['train_s_saved']:.0f} ({r['train_s']:.0f}) | {r['wall_s_saved']:.0f} ({r['wall_s']:.0f}) |"
            f" {full.epoch}, λ {full.lam:g}, n {full.kernel} | {100 * r['full_auroc']:.2f} |"
            f" {early.epoch}, λ {early.lam:g}, n {early.kernel} | {100 * r['early_auroc']:.2f} |"
            f" {100 * (r['early_auroc'] - r['full_auroc']):+.2f} |"
        )
    if rows:
        epochs = sum(r["epochs_not_trained"] for r in rows), last * len(rows)
        train = sum(r["train_s_saved"] for r in rows), sum(r["train_s"] for r in rows)
        wall = sum(r["wall_s_saved"] for r in rows), sum(r["wall_s"] for r in rows)
        mean = sum(100 * (r["early_auroc"] - r["full_auroc"]) for r in rows) / len(rows)
        print(
            f"all {len(rows)}: {epochs[0]} of {epochs[1]} epochs not trained ({epochs[0] / epochs[1]:.1%}),"
            f" training {train[0]:.0f} of {train[1]:.0f} s ({train[0] / train[1]:.1%}), wall {wall[0]:.0f} of"
            f" {wall[1]:.0f} s ({wall[0] / wall[1]:.1%}); mean Δ image AUROC {mean:+.2f} points"
        )


def check(runs_root: Path, patience: int, dataset: str, categories: str) -> bool:
    """Train with the cpu profile without and with `--patience` (side by side); the patience run's stops
    and selected.csv must equal what `outcome` computes from the full run."""
    space = write_space(CHECK_SPACE, runs_root)
    wait(
        tfsearch_run(space, runs_root, "full", dataset, categories),
        tfsearch_run(space, runs_root, "patience", dataset, categories, "--patience", str(patience)),
    )
    computed = {r["category"]: r for r in outcome(runs_root / "full", patience)}
    with (runs_root / "patience" / "selected.csv").open() as handle:
        selected = {r["category"]: r for r in csv.DictReader(handle)}
    ok = True
    for category, r in computed.items():
        stop = read_early_stop(runs_root / "patience" / "train" / category / "default")
        row = selected[category]
        real = (
            stop["epoch"] if stop else None,
            int(row["selected_epoch"]),
            float(row["selected_lam"]),
            int(row["selected_kernel"]),
            float(row["selected_test_image_auroc"]),
        )
        early = r["early"]
        expected = (
            r["stop"] if r["epochs_not_trained"] else None,
            early.epoch,
            early.lam,
            early.kernel,
            r["early_auroc"],
        )
        same = real[:4] == expected[:4] and math.isclose(real[4], expected[4], abs_tol=1e-12)
        ok &= same
        print(
            f"check {category}: --patience {patience} run stopped at {real[0]} and selected {real[1:]};"
            f" computed from the full run: {expected[0]}, {expected[1:]}: {'same' if same else 'DIFFERENT'}"
        )
    return ok


def machine() -> str:
    cpu = platform.processor() or "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else False
    return f"{cpu}, {os.cpu_count()} CPUs, avx512_bf16 {'yes' if bf16 else 'no'}, load {os.getloadavg()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", type=Path, help="a finished full run (without --patience)")
    parser.add_argument("--patience", type=int, nargs="+", default=[2])
    parser.add_argument("--train", action="store_true", help="train the full run first (demo_real, small)")
    parser.add_argument("--check", action="store_true", help="compare a real --patience run (cpu profile)")
    parser.add_argument("--runs-root", type=Path, default=Path("/tmp/tfsearch-patience"))
    parser.add_argument("--categories", default=None, help="default: cork,fibre,marble (--check: stripes)")
    parser.add_argument("--dataset", default=None, help="default: demo_real (--check: demo)")
    parser.add_argument("--profile", default="small", help="--train: the profile (default: small)")
    parser.add_argument("--every", type=int, default=10, help="--train: a milestone every N epochs (10)")
    parser.add_argument(
        "--toy", action="store_true", help="--train: the network at the test suite's toy size"
    )
    args = parser.parse_args()
    print(machine(), flush=True)
    if args.check:
        ok = check(args.runs_root, args.patience[0], args.dataset or "demo", args.categories or "stripes")
        print_outcome(outcome(args.runs_root / "full", args.patience[0]), args.patience[0], 12)  # 12 epochs
        print(machine())
        sys.exit(0 if ok else 1)
    run_dir = args.run_dir
    if args.train:
        payload = {**SPACE, "profile": args.profile, "milestones": {"every": args.every}}
        payload |= {"profile_overrides": TOY} if args.toy else {}
        space = write_space(payload, args.runs_root)
        dataset, categories = args.dataset or "demo_real", args.categories or "cork,fibre,marble"
        wait(tfsearch_run(space, args.runs_root, "full", dataset, categories))
        run_dir = args.runs_root / "full"
    if run_dir is None:
        parser.error("give RUN_DIR, or --train, or --check")
    last = int(json.loads((run_dir / "config.json").read_text())["milestones"][-1])
    for patience in args.patience:
        print_outcome(outcome(run_dir, patience), patience, last)
    print(machine())


if __name__ == "__main__":
    main()
