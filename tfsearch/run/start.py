"""Starting a run folder, or continuing one with --resume: the checks that nothing else is continued by
mistake, then the run plan written as config.json with the version that started the run.

`check_start` writes nothing, so a command that fails afterwards (a cluster that refuses the connection)
leaves nothing that blocks the corrected command; `create_run` writes the run folder once it may, and
`prepare_studies` creates the studies in the form `--studies` chose (the stages find that file after).
"""

from __future__ import annotations

import json
from pathlib import Path

from tfsearch import __version__
from tfsearch.errors import InputError
from tfsearch.run.plan import RunPlan
from tfsearch.store.atomic import atomic_write_json
from tfsearch.store.run_folder import CONFIG_FILE, read_config
from tfsearch.store.studies import NETWORK_FILESYSTEMS, filesystem_type, open_studies, studies_file
from tfsearch.transfusion.profiles import Profile

# config.json: the tfsearch version that started the run; not part of the plan, so --resume ignores it
VERSION_KEY = "version"


def check_start(plan: RunPlan, resume: bool) -> None:
    """Whether the run may start (no run of its name yet) or, with `--resume`, continue (the same plan).

    Without `--resume` a run never continues anything: an existing run folder, or an existing experiment
    at its storage (a run of the same name started from another folder or machine), stops it. A `--studies`
    that contradicts the studies file the run already has stops it too, naming the file.
    """
    config = plan.run_dir / CONFIG_FILE
    if config.exists():
        if not resume:
            raise InputError(
                f"{plan.run_dir} already exists; pass --resume to continue it or choose another --name"
            )
        stored = read_config(plan.run_dir)
        try:
            # a profile stored before a field was added reads with that field's value of its base profile
            stored["profile"] = Profile.from_dict(stored["profile"]).to_dict()
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{config}: damaged: its profile cannot be read ({exc})") from None
        current, stored = (json.loads(json.dumps(d)) for d in (plan.describe(), stored))  # tuples as lists
        changed = sorted(k for k, v in current.items() if stored.get(k) != v)
        if changed:
            # the values of plain settings (--patience, --precision, --seeds ...), which a user can retype
            values = "".join(
                f"; {key}: the run has {stored.get(key)!r}, this command {current[key]!r}"
                for key in changed
                if not isinstance(current[key], dict | list) and not isinstance(stored.get(key), dict | list)
            )
            raise InputError(
                f"--resume: this command differs from {config} in {changed}{values}. Resume with the run's"
                " own options, or start a new run under another --name"
            )
        # before one experiment held every category, a training search had one per category (train-CATEGORY):
        # resuming would start the search again beside them, in the same studies
        per_category = [name for name in plan.location.folders("tune") if name.startswith("train-")]
        if per_category:
            raise InputError(
                f"--resume: {plan.location.child('tune', per_category[0]).uri} is a training experiment of an"
                " earlier tfsearch (one per category), which this version cannot continue: start the run"
                " again under another --name"
            )
        studies_file(plan.run_dir, plan.studies)  # a --studies that contradicts the run's studies stops it
        return
    if resume:
        raise InputError(f"--resume: {plan.run_dir} holds no run to resume")
    existing = [folder for folder in ("tune", "train") if plan.location.folders(folder)]
    if existing:
        raise InputError(
            f"--storage: {plan.location.child(existing[0]).uri} already holds a run named {plan.name!r};"
            " resume it from its run folder with --resume, or choose another --name"
        )
    studies_file(plan.run_dir, plan.studies)


def create_run(plan: RunPlan) -> None:
    """Write the run plan (config.json), and upload it to a storage elsewhere."""
    config = plan.run_dir / CONFIG_FILE
    atomic_write_json(config, {**plan.describe(), VERSION_KEY: __version__})
    if plan.storage_is_elsewhere:  # `tfsearch report STORAGE/NAME` can follow the run from the start
        plan.location.upload(config, CONFIG_FILE)


def prepare_studies(plan: RunPlan) -> Path:
    """The run's studies file, created now in the form `--studies` chose where the run has none yet (the
    training and selection stages then find it); a resumed run's own file is kept. Returns its path."""
    path = studies_file(plan.run_dir, plan.studies)
    shared = filesystem_type(plan.run_dir)
    if not path.exists() and path.name.endswith(".db") and shared in NETWORK_FILESYSTEMS and not plan.quiet:
        print(
            f"[run] --studies sqlite on a {shared} file system: SQLite's locks may be unreliable there"
            " (--studies journal avoids them)",
            flush=True,
        )
    open_studies(path)
    return path


def start_run(plan: RunPlan, resume: bool) -> None:
    """Create the run folder and its studies, or check that `--resume` continues the same plan."""
    check_start(plan, resume)
    if not resume:
        create_run(plan)
    prepare_studies(plan)


def started_by(run_dir) -> str:
    """The tfsearch version that started the run in `run_dir` (runs of 0.1 recorded none)."""
    version = read_config(run_dir).get(VERSION_KEY) if (run_dir / CONFIG_FILE).is_file() else None
    return f"tfsearch {version}" if version else "tfsearch 0.1 (which recorded no version)"
