"""Reading run folders for the report: the plan, the tables, `importance.csv`, and where each category's
final-epoch test maps lie. A run that has not finished is read as far as it got; `missing` says what lacks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tfsearch.errors import InputError
from tfsearch.maps.cache import map_set_exists
from tfsearch.maps.metrics import EXTRA_METRIC_NAMES
from tfsearch.store.run_folder import (
    CONFIG_FIELDS,
    CONFIG_FILE,
    DEFAULT_MODEL,
    IMPORTANCE_COLUMNS,
    IMPORTANCE_FILE,
    MILESTONE_LOG,
    SELECTED_FILE,
    TRAIN_FOLDER,
    TRIALS_FILE,
    maps_folder,
    read_config,
)
from tfsearch.transfusion.profiles import PROFILES
from tfsearch.transfusion.protocol import paper_protocol_note

TRIAL_NEEDS = ("category", "stage", "model", "epoch", "lam", "kernel", "split", "image_auroc")
# selected.csv's columns that a run written before them lacks: read as absent, not as a damaged table
SELECTED_OPTIONAL = ("selection_value", "seg_sigmas", *(f"test_{m}" for m in EXTRA_METRIC_NAMES))
SELECTED_NEEDS = (
    "dataset",
    "category",
    "protocol",
    *(
        f"{prefix}_{f}"
        for prefix in ("default", "selected")
        for f in CONFIG_FIELDS
        if f not in SELECTED_OPTIONAL
    ),
)
TEXT_COLUMNS = dict.fromkeys(
    ("dataset", "category", "stage", "space", "protocol", "split", "model", "status", "scope", "parameter",
     "method", "stopped_at_epoch"),
    str,
)  # fmt: skip
CONFIG_NEEDS = {"dataset": str, "categories": list, "space": dict, "profile": dict}
# profile fields that do not change what a trained model scores (how often it is saved, inference batching)
NOT_COMPARED = ("name", "milestone_every", "inference_batch")
# the space that tunes the epochs only, per class, at the default λ and n: what supplementary Tables 3-4 did
PER_CLASS_EPOCHS_SPACE = "per_class_epochs"


@dataclass
class RunResults:
    """What one run folder holds; `missing` says, for the reader, what it does not hold yet."""

    path: Path
    config: dict
    trials: pd.DataFrame
    selected: pd.DataFrame
    importance: pd.DataFrame | None = None
    missing: list[str] = field(default_factory=list)
    # the run's name in this report where two runs share a name (`distinct_names`)
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or str(self.config.get("name") or self.path.name)

    @property
    def dataset(self) -> str:
        return str(self.config["dataset"])

    @property
    def categories(self) -> list[str]:
        return [str(c) for c in self.config["categories"]]

    @property
    def space(self) -> str:
        return str(self.config["space"].get("name", "?"))

    @property
    def scope(self) -> str:
        return str(self.config.get("scope", "per_class"))

    @property
    def select_on(self) -> str:
        return str(self.config.get("select_on", "test"))

    @property
    def is_sweep(self) -> bool:
        """A grid over (λ, n) shared by all categories, not a table of its own."""
        return self.scope == "global" and self.config.get("selection", {}).get("sampler") == "grid"

    @property
    def searched(self) -> bool:
        return self.scope != "single" and not self.is_sweep

    @property
    def default_lam(self) -> float:
        return float(self.config["profile"].get("lam", PROFILES["paper"].lam))

    @property
    def default_kernel(self) -> int:
        return int(self.config["profile"].get("kernel", PROFILES["paper"].kernel))

    @property
    def patience(self) -> int:
        """`--patience` of the run: milestones without improvement that stopped a category (0: never)."""
        return int(self.config.get("patience", 0))

    def early_stops(self) -> pd.DataFrame:
        """The rows of selected.csv whose category stopped training early (`--patience`); none for a run
        written before early stopping existed."""
        if "stopped_early" not in self.selected.columns:
            return self.selected.iloc[0:0]
        stopped = pd.to_numeric(self.selected["stopped_early"], errors="coerce").fillna(0) > 0
        return self.selected[stopped]

    @property
    def early_stop_note(self) -> str | None:
        """`Run R trained with early stopping (patience K): …`, naming the categories that stopped, their
        epochs and the device-hours saved; None for a run without early stopping."""
        if not self.patience:
            return None
        stops = self.early_stops()
        text = f"Run {self.name} trained with early stopping (patience {self.patience})"
        if not len(stops):
            return f"{text}: every category trained to its last milestone, epoch {self.final_epoch}."
        named = ", ".join(
            f"{row['category']} at epoch {row['stopped_at_epoch']}" for _, row in stops.iterrows()
        )
        hours = float(pd.to_numeric(stops["device_hours_saved"], errors="coerce").sum())
        return (
            f"{text}: {named} stopped before epoch {self.final_epoch}, saving {hours:.3g} device-hours; their"
            " configurations are chosen from the milestones they reached, their default at their last one."
        )

    @property
    def final_epoch(self) -> int | None:
        milestones = self.config.get("milestones") or [self.config["profile"].get("epochs")]
        return int(milestones[-1]) if milestones[-1] is not None else None

    def differs_from_paper(self) -> list[str]:
        """The profile's settings that differ from the paper's (`PROFILES["paper"]`), as
        `field ours (paper theirs)`; empty when a comparison with the published numbers is like for like."""
        paper = json.loads(json.dumps(PROFILES["paper"].to_dict()))  # tuples as JSON writes them
        ours = self.config["profile"]
        return [
            f"{key} {ours.get(key, 'not recorded')} (paper {value})"
            for key, value in paper.items()
            if key not in NOT_COMPARED and ours.get(key) != value
        ]

    @property
    def paper_note(self) -> str | None:
        """`not the paper's protocol: …` for a paper-profile run without DTD textures or foreground masks."""
        return paper_protocol_note(self.config)

    def training_roots(self) -> list[Path]:
        """Folders that may hold this run's train/: the run folder, its cache of an object store, a local
        --storage folder."""
        roots = [self.path, self.path / "cache"]
        storage = self.config.get("storage")
        if storage and "://" not in str(storage):
            roots.append(Path(storage))
        return roots

    def test_maps(self, category: str) -> Path | None:
        """The final-epoch test map cache of the category's default training configuration, if present."""
        epoch = self.final_epoch
        if epoch is None:
            return None
        model = DEFAULT_MODEL
        chosen = self.selected[self.selected["category"] == category] if len(self.selected) else self.selected
        if len(chosen) and isinstance(chosen["default_model"].iloc[0], str):
            model = chosen["default_model"].iloc[0]
        return self.maps_of(category, model, epoch)

    def maps_of(self, category: str, model: str, epoch: int) -> Path | None:
        """The test map cache of one training configuration and milestone of a category, if present."""
        for root in self.training_roots():
            folder = maps_folder(root / TRAIN_FOLDER / category / model, epoch, "test")
            if map_set_exists(folder):
                return folder
        return None


def _read_table(path: Path, needs: tuple[str, ...]) -> pd.DataFrame:
    # only empty cells are missing values: a category may be called "NA" or "null"
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=TEXT_COLUMNS)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV table ({exc})") from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file, expected a header with {list(needs)}") from None
    absent = [c for c in needs if c not in frame.columns]
    if absent:
        raise InputError(f"{path}: columns {absent} are missing (expected the table `tfsearch run` writes)")
    return frame


def _milestone_rows(run_dir: Path, config: dict) -> pd.DataFrame:
    """Training milestones from the training folders' logs: what an interrupted run has before trials.csv."""
    roots = [run_dir] + ([Path(config["storage"])] if config.get("storage") else [])
    for root in roots:
        logs = sorted((root / TRAIN_FOLDER).glob(f"*/*/{MILESTONE_LOG}"))
        if logs:
            rows = [
                {**record, "stage": "train", "dataset": config["dataset"]}
                for log in logs
                for record in json.loads(log.read_text())
            ]
            return pd.DataFrame(rows)
    return pd.DataFrame(columns=list(TRIAL_NEEDS))


def _read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise InputError(f"{path}: not a run folder (no such directory)")
    if not config_path.is_file():
        raise InputError(
            f"{path}: not a run folder: config.json is missing (expected a folder written by `tfsearch run`,"
            " e.g. runs/NAME)"
        )
    config = read_config(path)
    absent = [k for k in CONFIG_NEEDS if k not in config]
    if absent:
        raise InputError(
            f"{config_path}: keys {absent} are missing (expected the plan `tfsearch run` writes)"
        )
    for key, kind in CONFIG_NEEDS.items():
        if not isinstance(config[key], kind):
            raise InputError(f"{config_path}: {key}: expected a {kind.__name__}, got {config[key]!r}")
    return config


def load_run(path: Path) -> RunResults:
    """Read a run folder; InputError when it is not one, a note per file a finished run would also hold."""
    path = Path(path)
    config = _read_config(path)
    missing = []
    trials_path, selected_path = path / TRIALS_FILE, path / SELECTED_FILE
    if trials_path.is_file():
        trials = _read_table(trials_path, TRIAL_NEEDS)
    else:
        trials = _milestone_rows(path, config)
        found = f"{len(trials)} training milestones read from the training logs" if len(trials) else "none"
        missing.append(
            f"{trials_path} is missing: the run has not finished (it is written after selection); "
            f"training progress: {found}"
        )
    if selected_path.is_file():
        selected = _read_table(selected_path, SELECTED_NEEDS)
        if "status" in selected.columns:
            failed = selected[selected["status"] == "failed"]
            selected = selected[selected["status"] != "failed"].reset_index(drop=True)
            missing += [
                f"{row['dataset']}/{row['category']}: failed ({row['error']}); nothing selected, no Δ, left "
                "out of every table and mean"
                for row in failed.to_dict("records")
            ]
    else:
        selected = pd.DataFrame(columns=list(SELECTED_NEEDS))
        missing.append(
            f"{selected_path} is missing: selection has not finished, so its single-configuration and "
            "tuned tables are left out"
        )
    importance_path = path / IMPORTANCE_FILE
    importance = _read_table(importance_path, IMPORTANCE_COLUMNS) if importance_path.is_file() else None
    return RunResults(path, config, trials, selected, importance, missing)


def distinct_names(runs: list[RunResults]) -> None:
    """Give runs that share a name (the same `--name` under two runs roots) one each in this report: the
    name and its folder's parent (`NAME@PARENT`), numbered if that is shared too, so that no run's row or
    table replaces another's."""
    names = [run.name for run in runs]
    taken: set[str] = set()
    for run, name in zip(runs, names, strict=True):
        if names.count(name) == 1:
            taken.add(name)
            continue
        label, number = f"{name}@{run.path.parent.name}", 2
        while label in taken or label in names:
            label, number = f"{name}@{run.path.parent.name}-{number}", number + 1
        run.label = label
        taken.add(label)
