"""Writing and reading back the trials of an enumerated study, per way of storing them.

    python -m bench.study_storage              # 300 trials shaped like the exhaustive bench's candidates
    python -m bench.study_storage --trials 12240 --bulk-only    # the built-in per_class grid, bulk only

Each way adds the same finished trials to a fresh study, then a fresh storage object reads them back (as the
run's tables do, `tfsearch.run.selection.stage.run_studies`), and the same loaded study reads them a second
time (as importance.csv and W&B do after trials.csv, from Optuna's cache of finished trials): Optuna's
`Study.add_trials` into SQLite (`RDBStorage`) and into a journal file (`JournalStorage`), and
`tfsearch.store.studies.add_finished_trials` into SQLite (one transaction; alone with `--bulk-only`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import optuna

from bench.selection import KERNELS
from tfsearch.store.studies import add_finished_trials, open_studies

optuna.logging.set_verbosity(optuna.logging.WARNING)


def candidates(count: int) -> list[optuna.trial.FrozenTrial]:
    """Finished trials with the parameters and user_attrs of exhaustive-selection candidates."""
    choices = optuna.distributions.CategoricalDistribution
    milestones = [50 * (i + 1) for i in range(30)]
    lams = [0.5 + 0.025 * i for i in range(21)]
    distributions = {
        "checkpoint": choices([f"default@{e}" for e in milestones]),
        "lam": choices(lams),
        "kernel": choices(KERNELS),
    }
    trials = []
    for index in range(count):
        epoch, lam, kernel = milestones[index % 30], lams[index % 21], KERNELS[index % 8]
        trials.append(
            optuna.trial.create_trial(
                params={"checkpoint": f"default@{epoch}", "lam": lam, "kernel": kernel},
                distributions=distributions,
                value=0.9,
                user_attrs={"model": "default", "epoch": epoch, "lam": lam, "kernel": kernel,
                            "metrics": {"c": {"image_auroc": 0.9}}},
            )
        )  # fmt: skip
    return trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--bulk-only", action="store_true", help="add_finished_trials into SQLite alone")
    args = parser.parse_args()
    trials = candidates(args.trials)
    ways = {
        "Study.add_trials, SQLite": ("studies.db", lambda storage, study: study.add_trials(trials)),
        "Study.add_trials, journal": ("studies.journal", lambda storage, study: study.add_trials(trials)),
        "add_finished_trials, SQLite": ("studies.db", lambda s, study: add_finished_trials(s, study, trials)),
    }
    if args.bulk_only:
        ways = {way: ways[way] for way in ("add_finished_trials, SQLite",)}
    print(f"{args.trials} trials; load average at start {os.getloadavg()}")
    for way, (name, add) in ways.items():
        with tempfile.TemporaryDirectory(prefix="tfsearch-bench-storage-") as folder:
            path = Path(folder) / name
            storage = open_studies(path)
            study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
            started = time.perf_counter()
            add(storage, study)
            write_s = time.perf_counter() - started
            started = time.perf_counter()
            loaded = optuna.load_study(study_name="s", storage=open_studies(path))
            read = loaded.get_trials(deepcopy=False)
            read_s = time.perf_counter() - started
            started = time.perf_counter()
            again = loaded.get_trials(deepcopy=False)
            again_s = time.perf_counter() - started
            assert len(read) == len(again) == args.trials
        per_trial = 1000 / args.trials
        print(f"{way}: write {write_s:.2f} s ({write_s * per_trial:.2f} ms a trial),", end=" ")
        print(f"read back {read_s:.2f} s ({read_s * per_trial:.2f} ms a trial),", end=" ")
        print(f"again through the same study {again_s:.2f} s")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
