"""What a finished run chose, read back for export: `selected.csv`'s row per category, the run plan in
`config.json`, and the training run (weights and maps) each selection points at."""

from __future__ import annotations

import csv
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tfsearch.errors import InputError
from tfsearch.maps.metrics import METRIC_NAMES, SEG_THRESHOLD_SIGMAS
from tfsearch.store import run_folder
from tfsearch.store.location import Location
from tfsearch.store.run_folder import CONFIG_FILE, SELECTED_FILE
from tfsearch.transfusion.job import CHECKPOINT_FILE, MODEL_FILE, MODEL_STATE_KEY, TrainDir, TrainJob

# characters that make a name a path (or cut it short in the operating system's calls)
_PATH_CHARACTERS = ("/", "\\", "\0")


def plain_name(value: object, where: str) -> str:
    """`value` when it is a plain file or folder name: a non-empty string without a path separator, not "."
    or "..", so that joined to a folder it stays in that folder; else an InputError naming `where` (the file
    and key it was read from)."""
    if (
        not isinstance(value, str)
        or value in ("", ".", "..")
        or any(character in value for character in _PATH_CHARACTERS)
    ):
        raise InputError(
            f"{where} is {value!r}: expected a plain name (no path separator, not empty, '.' or '..')"
        )
    return value


# ------------------------------------------------------------------------------------------ the run
@dataclass(frozen=True)
class Selected:
    """One category's row of `selected.csv`: the chosen configuration and its metrics."""

    dataset: str
    category: str
    space: str
    protocol: str
    selection_metric: str
    model: str
    epoch: int
    lam: float
    kernel: int
    selection_value: float
    test_metrics: dict[str, float]
    seg_sigmas: float = SEG_THRESHOLD_SIGMAS  # k of SegF1's threshold (the default in runs before it)


def read_selected(run: Path) -> tuple[list[Selected], dict[str, str]]:
    """The selected configurations, and the categories whose training failed for good with their errors
    (nothing was selected for them)."""
    path = run / SELECTED_FILE
    if not path.is_file():
        raise InputError(f"{run} holds no finished run: {path} is missing (has `tfsearch run` finished?)")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and "category" not in rows[0]:
        raise InputError(f"{path} has no category column: expected the columns of tfsearch's selected.csv")
    failed = {row["category"]: row.get("error", "") for row in rows if row.get("status") == "failed"}
    rows = [row for row in rows if row["category"] not in failed]
    if any(row.get("seeds") for row in rows):
        raise InputError(
            f"{path}: a run trained with several seeds per category (--seeds) selects a configuration by the"
            " mean over its seeds, of which there is no one model to export; exporting such runs is not"
            " supported yet"
        )
    try:
        selected = [
            Selected(
                dataset=row["dataset"],
                category=row["category"],
                space=row["space"],
                protocol=row["protocol"],
                selection_metric=row["selection_metric"],
                model=row["selected_model"],
                epoch=int(row["selected_epoch"]),
                lam=float(row["selected_lam"]),
                kernel=int(row["selected_kernel"]),
                selection_value=_number(row["selected_selection_value"]),
                test_metrics={m: _number(row[f"selected_test_{m}"]) for m in METRIC_NAMES},
                seg_sigmas=float(row.get("selected_seg_sigmas") or SEG_THRESHOLD_SIGMAS),
            )
            for row in rows
        ]
    except (KeyError, ValueError) as exc:
        raise InputError(
            f"{path}: malformed row ({exc}); expected the columns of tfsearch's selected.csv"
        ) from None
    for row in selected:
        plain_name(row.category, f"{path} category")
        plain_name(row.model, f"{path} selected_model of {row.category}")
    return selected, failed


def _number(cell: str) -> float:
    return float(cell) if cell else math.nan


class TrainingRun:
    """Where a category's training run of a search lives: its job, maps and checkpoints.

    The run folder's own `train/` when it is there; else the `storage` named in config.json: a folder, or
    an object store, whose job and maps the run keeps in its `cache/` (fetched here when missing) and whose
    checkpoints are downloaded to a scratch folder.
    """

    def __init__(self, run: Path, config: dict, category: str, model: str) -> None:
        relative = Path("train") / category / model
        self.remote: Location | None = None
        if (run / "train").is_dir():
            root = run / relative
        else:
            storage = Location.parse(config["storage"], flag=f"{run / CONFIG_FILE} storage")
            if storage.is_local:
                root = storage.local_path / relative
            else:
                self.remote = storage.child(*relative.parts)
                root = run / "cache" / relative
        self.dir = TrainDir(root)
        if self.remote is not None and not self.dir.job_file.is_file():
            self.remote.download(self.dir.job_file.name, self.dir.job_file)

    def maps(self, epoch: int, split: str) -> Path:
        folder = self.dir.maps(epoch, split)
        if self.remote is not None and not folder.is_dir():
            self.remote.download(self.relative(folder), folder)
        return folder

    def model_state(self, epoch: int) -> tuple[dict, str]:
        """The model's state dict at `epoch`, and nothing else of the checkpoint; with the file it came
        from, relative to the training run (the milestone's model.pt, or trainer.pt in older runs)."""
        folder = self.dir.checkpoint(epoch)
        scratch = None
        try:
            if self.remote is None:
                path = self.dir.weights(epoch)
            else:
                scratch = Path(tempfile.mkdtemp(prefix="tfsearch-export-"))
                path = next(
                    (
                        scratch / name
                        for name in (MODEL_FILE, CHECKPOINT_FILE)
                        if self.remote.download(self.relative(folder / name), scratch / name)
                    ),
                    folder / MODEL_FILE,
                )
            if not path.is_file():
                where = self.remote.uri if self.remote is not None else self.dir.root
                raise InputError(
                    f"no weights of the selected epoch {epoch} in {where}: {path.name} is missing"
                )
            named = self.name(folder / path.name)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises several types for a truncated or damaged file
                detail = " ".join(str(exc).split())[:300]
                raise InputError(
                    f"cannot read {named}, the weights of the selected epoch {epoch}: it may be damaged or "
                    f"truncated ({type(exc).__name__}: {detail})"
                ) from None
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        if not isinstance(state, dict) or not isinstance(state.get(MODEL_STATE_KEY), dict):
            raise InputError(f"{named} is not a tfsearch checkpoint: no {MODEL_STATE_KEY!r} state dict")
        return state[MODEL_STATE_KEY], self.relative(folder / path.name)

    def name(self, path: Path) -> str:
        """How a message names a file of the training run: its URI in an object store, else its path."""
        if self.remote is None:
            return str(path)
        return self.remote.child(*Path(self.relative(path)).parts).uri

    def load_job(self) -> TrainJob:
        """The training run's job (`job.json`); a damaged one is an InputError naming it."""
        try:
            return self.dir.load_job()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(
                f"cannot read {self.name(self.dir.job_file)}: it may be damaged ({type(exc).__name__}: {exc})"
            ) from None

    def relative(self, path: Path) -> str:
        return path.relative_to(self.dir.root).as_posix()


def read_config(run: Path) -> dict:
    path = run / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"RUN {run} is not a tfsearch run folder: {path} is missing")
    return run_folder.read_config(run)
