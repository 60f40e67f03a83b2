"""Weights & Biases settings shared by the training trials, the selection studies and the report. Modes:

- `offline` (default): nothing leaves the machine; the runs are written under `<run_dir>/wandb/` and
  `<run_dir>/wandb/SYNC.txt` says how to upload them later (`wandb sync`).
- `online`: needs `--wandb-project` (and a login); `--wandb-entity` picks the team.
- `disabled`: no callback at all.
"""

from __future__ import annotations

from pathlib import Path

from tfsearch.errors import InputError
from tfsearch.store.atomic import atomic_write_text

WANDB_MODES = ("offline", "online", "disabled")
DEFAULT_PROJECT = "tfsearch"
SYNC_NOTE = "SYNC.txt"


def check_mode(mode: str, project: str | None) -> None:
    """Reject a mode W&B cannot run in, naming the flag."""
    if mode not in WANDB_MODES:
        raise InputError(f"--wandb must be one of {WANDB_MODES}, got {mode!r}")
    if mode == "online" and not project:
        raise InputError("--wandb online needs --wandb-project (and a W&B login or WANDB_API_KEY)")


def sync_command(wandb_root: Path) -> str:
    """The shell command that uploads every offline run written under `wandb_root` (W&B's `dir`)."""
    return f"wandb sync {wandb_root.resolve() / 'wandb'}/offline-run-*"


def write_sync_note(wandb_root: Path, what: str) -> Path:
    """Leave the upload instructions beside offline runs, where someone finding them will look."""
    note = wandb_root / "wandb" / SYNC_NOTE
    atomic_write_text(
        note,
        f"{what} were logged to Weights & Biases offline. To upload them (needs the network and"
        " `wandb login`):\n\n"
        f"    {sync_command(wandb_root)}\n\n"
        "Check one without network: wandb leet inspect --summary --json RUN_FOLDER\n",
    )
    return note
