"""Weights & Biases settings shared by the training trials, the selection studies and the report. Modes:

- `offline` (default): nothing leaves the machine; the runs are written under `<run_dir>/wandb/` and
  `<run_dir>/wandb/SYNC.txt` says how to upload them later (`wandb sync`).
- `online`: needs `--wandb-project` (and a login); `--wandb-entity` picks the team.
- `disabled`: no callback at all.

Every process that logs keeps what W&B stages for upload (the files of logged tables: artifacts) inside the
run folder, not in `~/.local/share/wandb`, so that a run folder copied elsewhere syncs complete: wandb 0.31
reads `WANDB_DATA_DIR` (staging: `DATA_DIR/artifacts/staging`), `WANDB_CACHE_DIR` and `WANDB_ARTIFACT_DIR`
whenever it stages or fetches a file (`wandb_env`). It also prints no run summaries (`WANDB_QUIET`; W&B's
warnings and errors still print).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import string
from collections.abc import Iterator
from pathlib import Path

from tfsearch.errors import InputError
from tfsearch.store.atomic import atomic_write_text

WANDB_MODES = ("offline", "online", "disabled")
DEFAULT_PROJECT = "tfsearch"
SYNC_NOTE = "SYNC.txt"
DATA_FOLDER = "data"  # what W&B staged for the runs beside it, inside a wandb/ folder or an offline run's
# the W&B variables a process that logs needs; cluster.connect passes those the driver has to every worker
WANDB_ENV_VARS = (
    "WANDB_MODE",
    "WANDB_QUIET",
    "WANDB_SILENT",
    "WANDB_DATA_DIR",
    "WANDB_CACHE_DIR",
    "WANDB_ARTIFACT_DIR",
)


def check_mode(mode: str, project: str | None) -> None:
    """Reject a mode W&B cannot run in, naming the flag."""
    if mode not in WANDB_MODES:
        raise InputError(f"--wandb must be one of {WANDB_MODES}, got {mode!r}")
    if mode == "online" and not project:
        raise InputError("--wandb online needs --wandb-project (and a W&B login or WANDB_API_KEY)")


def wandb_env(data: Path) -> dict[str, str]:
    """The environment of a process logging W&B runs whose staged files belong in `data` (absolute): W&B's
    staging, cache and artifact folders under it, and no run summaries printed."""
    data = Path(data).resolve()
    return {
        "WANDB_DATA_DIR": str(data),
        "WANDB_CACHE_DIR": str(data / "cache"),
        "WANDB_ARTIFACT_DIR": str(data / "artifacts"),
        "WANDB_QUIET": "true",
    }


@contextlib.contextmanager
def staged_in(data: Path) -> Iterator[None]:
    """`wandb_env(data)` in this process for the duration, the previous values restored after. W&B reads it
    each time it stages a file: set it once the run has started, around `run.log`, and the staged files go
    into the run's own folder (`run_data(run)`)."""
    changes = wandb_env(data)
    previous = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_folder(run) -> Path:
    """The folder of a started W&B run (`wandb/offline-run-DATE-ID` offline, `wandb/run-DATE-ID` online)."""
    return Path(run.settings.sync_dir)


def run_data(run) -> Path:
    """Where a started run's staged files go: inside its own folder, which then holds all that it syncs."""
    return run_folder(run) / DATA_FOLDER


def run_folders(wandb_root: Path, offline_only: bool = False) -> list[Path]:
    """The run folders W&B wrote under `wandb_root` (W&B's `dir`), oldest first."""
    folder = Path(wandb_root) / "wandb"
    pattern = "offline-run-*" if offline_only else "*run-*"
    found = (p for p in folder.glob(pattern) if p.is_dir() and not p.is_symlink())
    return sorted(found, key=lambda p: p.name.split("run-", 1)[1])


def run_id_of(folder: Path) -> str | None:
    """The id of the run in a run folder, from its log `run-ID.wandb` (the folder's name ends with the id,
    and a `-1` after it when two runs of one id started within a second); None without a log."""
    logs = sorted(Path(folder).glob("run-*.wandb"))
    return logs[0].name.removeprefix("run-").removesuffix(".wandb") if logs else None


def new_run_id() -> str:
    """A fresh run id in W&B's own form (8 lowercase letters and digits)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def drop_other_runs(wandb_root: Path, keep: Path) -> list[Path]:
    """Delete the offline run folders under `wandb_root` other than `keep` (with what they staged), so that
    `wandb sync` finds one run to upload; returns the folders deleted."""
    stale = [p for p in run_folders(wandb_root, offline_only=True) if p.resolve() != Path(keep).resolve()]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def sync_command(wandb_root: Path, runs: list[Path] | None = None) -> str:
    """The shell command that uploads the offline runs `runs`, or all under `wandb_root` (W&B's `dir`)."""
    if runs:
        return "wandb sync " + " ".join(str(Path(r).resolve()) for r in runs)
    return f"wandb sync {Path(wandb_root).resolve() / 'wandb'}/offline-run-*"


def write_sync_note(wandb_root: Path, what: str, runs: list[Path] | None = None) -> Path:
    """Leave the upload instructions beside offline runs, where someone finding them will look."""
    note = Path(wandb_root) / "wandb" / SYNC_NOTE
    atomic_write_text(
        note,
        f"{what} were logged to Weights & Biases offline. To upload them (needs the network and"
        " `wandb login`):\n\n"
        f"    {sync_command(wandb_root, runs)}\n\n"
        "Check one without network: wandb leet inspect --summary --json RUN_FOLDER\n"
        "(or wandb sync --dry-run RUN_FOLDER). Each run folder holds what W&B staged for it (its tables)"
        f" under {DATA_FOLDER}/, or beside it under wandb/{DATA_FOLDER}/: copy the folders whole.\n",
    )
    return note
