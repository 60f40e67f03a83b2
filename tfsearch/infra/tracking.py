"""Weights & Biases logging of the training trials through Ray Tune's own W&B integration.

Each training trial becomes one W&B run (grouped under the run's name) that logs the metrics the trial reports
at every milestone. Modes:

- `offline` (default): nothing leaves the machine; the runs are written under `<run_dir>/wandb/` and
  `<run_dir>/wandb/SYNC.txt` says how to upload them later (`wandb sync`).
- `online`: needs `--wandb-project` (and a login); `--wandb-entity` picks the team.
- `disabled`: no callback at all.

Ray Tune logs from a helper actor, which reads its mode from its own environment: `WANDB_MODE` set only in the
driver is lost on a cluster started separately, and the actor then fails without telling Tune (stack-notes).
So the mode goes to `wandb.init` explicitly, and the driver's environment says the same, which Ray's callback
checks for an API key before it starts.
"""

from __future__ import annotations

import os
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


def tune_callbacks(run_dir: Path, name: str, mode: str, project: str | None, entity: str | None) -> list:
    """Ray Tune callbacks that log every training trial to W&B; [] when `mode` is disabled."""
    check_mode(mode, project)
    if mode == "disabled":
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback

    os.environ["WANDB_MODE"] = mode
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if mode == "offline":
        write_sync_note(run_dir, f"The training trials of run {name!r}")
    return [
        WandbLoggerCallback(
            project=project or DEFAULT_PROJECT,
            group=name,
            entity=entity,
            mode=mode,
            dir=str(run_dir),  # wandb.init writes into DIR/wandb/
            job_type="train",
            tags=[name],
            # Ray names each W&B run by its trial id: a trial retried or continued on --resume logs on into
            # its run instead of restarting it (Ray's default is resume=False)
            resume="allow",
        )
    ]
