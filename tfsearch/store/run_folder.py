"""The run folder's schema: its files, the columns of its tables and the readers that every stage shares.

This module sits at the bottom of the search's layers (plan, trainable, training stage, selection stage,
tables, report): each of them, `tfsearch.store.location` and `tfsearch report` read run folders through the
names here, so none of them imports another stage to learn a column name. It imports neither torch nor Ray.

A run folder (`--runs-root`/NAME) holds:

    config.json     the resolved plan (space, dataset, categories, profile, milestones, protocol, ...)
    studies.db      the Optuna studies (SQLite on a local disk), or studies.journal (Optuna's JournalStorage)
                    when the run folder is on shared storage
    trials.csv      one row per training milestone and per selection candidate (rebuilt from the above)
    selected.csv    per category: the default configuration's and the selected configuration's metrics
                    (with --seeds K > 1: the mean over seeds, a `seeds` column and a `*_std` per metric)
    importance.csv  per dataset (and category): how much epoch, λ and n move the selection metric
    train/CATEGORY/MODEL/   training runs (checkpoints, maps, milestones.json; tfsearch.transfusion.job);
                    with --seeds K > 1 one per seed, MODEL-seed=N (tfsearch.run.plan.seeded_model);
                    early_stop.json in one that stopped early (--patience)
    tune/           Ray Tune's experiment state, which `--resume` restores
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
from datetime import datetime, timezone
from pathlib import Path

from tfsearch.errors import InputError
from tfsearch.maps.metrics import EXTENDED_METRIC_NAMES
from tfsearch.store.atomic import atomic_write_text

CONFIG_FILE = "config.json"
TRIALS_FILE = "trials.csv"
SELECTED_FILE = "selected.csv"
IMPORTANCE_FILE = "importance.csv"
# each training run's log of finished milestones (one row per milestone; see the trainable)
MILESTONE_LOG = "milestones.json"
# a training run that stopped early (`--patience`): where and why (tfsearch.run.training.early_stop)
EARLY_STOP_FILE = "early_stop.json"
RUN_TABLES = (CONFIG_FILE, TRIALS_FILE, SELECTED_FILE, IMPORTANCE_FILE)
TRAIN_FOLDER = "train"
# the training configuration of the profile itself (other ids name searched training hyperparameters)
DEFAULT_MODEL = "default"

TRIAL_COLUMNS = (
    "dataset",
    "category",
    "stage",
    "space",
    "protocol",
    "split",
    "model",
    "epoch",
    "lam",
    "kernel",
    "seg_sigmas",  # k of SegF1's threshold, mean + k std (selection rows)
    *EXTENDED_METRIC_NAMES,
    "objective",
    "study",
    "trial",
    "status",
    "node_id",
    "started_at",
    "finished_at",
    "images_per_second",
    "loss",
)
# selected.csv's per configuration: the test metrics are the paper's five and MVTec AD 2's AU-PRO to FPR 0.05
# and SegF1 (`EXTENDED_METRIC_NAMES`; runs written before them lack `*_test_aupro_05` and `*_test_seg_f1`)
CONFIG_FIELDS = (
    "model",
    "epoch",
    "lam",
    "kernel",
    "seg_sigmas",
    "selection_value",
    *(f"test_{m}" for m in EXTENDED_METRIC_NAMES),
)
# selected.csv: per category, how many of its training runs stopped early (`--patience`; 0 without), the
# epochs they stopped at (";" between several), the epochs they did not train and the device-hours that
# saved (epochs not trained x measured seconds per epoch x the trial's GPUs, or CPUs without GPUs)
EARLY_STOP_COLUMNS = ("stopped_early", "stopped_at_epoch", "epochs_not_trained", "device_hours_saved")
SELECTED_COLUMNS = (
    "dataset",
    "category",
    "space",
    "protocol",
    "selection_metric",
    *(f"default_{f}" for f in CONFIG_FIELDS),
    *(f"selected_{f}" for f in CONFIG_FIELDS),
    # how well the selection data ranked the candidates: configurations (default included) sharing the best
    # selection value, the metric that settled such a tie (--select-on val), and whether nothing did
    "tied_at_best",
    "tie_break_metric",
    "cannot_rank",
    *EARLY_STOP_COLUMNS,
    "status",  # ok | failed (training failed for good; nothing is selected)
    "error",
)
IMPORTANCE_COLUMNS = ("dataset", "scope", "parameter", "importance", "method")
# a run with several seeds per category (`--seeds`) adds these columns; a one-seed run's tables are as above
SEED_COLUMN = "seed"  # trials.csv: the seed of a training row's run (selection rows: the mean over seeds)
SEED_SPREAD_FIELDS = ("selection_value", *(f"test_{m}" for m in EXTENDED_METRIC_NAMES))
SELECTED_SEED_COLUMNS = (
    "seeds",  # how many seeds each `default_*`/`selected_*` metric is the mean of
    *(f"{prefix}_{f}_std" for prefix in ("default", "selected") for f in SEED_SPREAD_FIELDS),
)


def trial_columns(seeds: int) -> tuple[str, ...]:
    """The columns of trials.csv for a run of `seeds` seeds per category."""
    return TRIAL_COLUMNS + ((SEED_COLUMN,) if seeds > 1 else ())


def selected_columns(seeds: int) -> tuple[str, ...]:
    """The columns of selected.csv for a run of `seeds` seeds per category."""
    return SELECTED_COLUMNS + (SELECTED_SEED_COLUMNS if seeds > 1 else ())


def maps_folder(train_dir: Path, epoch: int, split: str = "test") -> Path:
    """The map cache (tfsearch.maps.cache) of one milestone and split inside a training run's folder."""
    return Path(train_dir) / "maps" / split / f"epoch-{epoch:04d}"


def now() -> str:
    """A timestamp as the tables write it (UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_milestone_log(train_dir: Path) -> list[dict]:
    """A training run's finished milestones, oldest first (none before its first)."""
    path = Path(train_dir) / MILESTONE_LOG
    if not path.is_file():
        return []
    log = read_state(path, "a training run's milestone log")
    if not isinstance(log, list) or not all(isinstance(row, dict) and "epoch" in row for row in log):
        raise InputError(f"{path}: damaged: expected a list of milestone records")
    return log


def read_early_stop(train_dir: Path) -> dict | None:
    """Where a training run stopped early (`EARLY_STOP_FILE`), or None when it did not."""
    path = Path(train_dir) / EARLY_STOP_FILE
    if not path.is_file():
        return None
    record = read_state(path, "where a training run stopped early")
    if not isinstance(record, dict) or not {"epoch", "best_epoch", "epochs_not_trained"} <= set(record):
        raise InputError(f"{path}: damaged: expected the record of an early stop")
    return record


def read_config(run_dir: Path) -> dict:
    """The run plan a run folder was started with (its config.json)."""
    path = Path(run_dir) / CONFIG_FILE
    config = read_state(path, "the run's plan")
    if not isinstance(config, dict):
        raise InputError(f"{path}: damaged: expected the run's plan as a JSON object")
    return config


def read_state(path: Path, what: str) -> object:
    """A JSON state file of a run, or InputError naming it: a run never continues from a guess."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(
            f"{path}: not valid JSON ({exc}): cannot read {what}; the file may be damaged"
        ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} ({exc}); the file may be damaged") from None


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    """A table with exactly `columns`, written atomically; NaN and None become empty cells."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: format_cell(row.get(k, "")) for k in columns})
    atomic_write_text(path, out.getvalue())


def format_cell(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return "" if value is None else value


STUDIES_DB = "studies.db"


STUDIES_JOURNAL = "studies.journal"


FORM_FILES = {"sqlite": STUDIES_DB, "journal": STUDIES_JOURNAL}


def existing_studies(run_dir: Path) -> Path | None:
    """The studies file the run folder already holds, if any."""
    for name in (STUDIES_DB, STUDIES_JOURNAL):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def form_of(path: Path) -> str:
    """`journal` or `sqlite`: the form of a studies file, by its name."""
    return "journal" if Path(path).name.endswith(".journal") else "sqlite"


def dashboard_command(path: Path) -> str:
    """The optuna-dashboard command that opens a studies file, quoted for a POSIX shell."""
    path = Path(path).resolve()
    target = str(path) if form_of(path) == "journal" else f"sqlite:///{path}"
    return f"optuna-dashboard {shlex.quote(target)}"


def dashboard_of(run_dir: Path) -> str | None:
    """The optuna-dashboard command for the studies of a run folder; None where it holds none (a run that
    has not started selection, or a copy of a run's tables from an object store)."""
    existing = existing_studies(Path(run_dir))
    return None if existing is None else dashboard_command(existing)
