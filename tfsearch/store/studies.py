"""Where a run's Optuna studies live and how they are opened.

SQLite on a local disk; Optuna's `JournalStorage` with a journal file when the run folder is on a network
file system (NFS, Lustre, GPFS, ...), where SQLite's locking is unreliable and Optuna recommends the journal.
`tfsearch run --studies sqlite|journal` chooses the form instead (`STUDIES_FORMS`): for a file system not
recognised here, or for many writers. A run keeps the form its studies were created in, so a resumed run
opens the same file, and a `--studies` that contradicts it is refused. optuna-dashboard opens either
(`tfsearch.store.run_folder.dashboard_command`).

Enumerated studies add thousands of finished trials at once. Optuna's `Study.add_trials` writes them one by
one, and with `RDBStorage` each costs a transaction and about twenty ORM statements (0.07–0.19 s a trial on
the shared 2-core machine, longer than scoring the candidate); `add_finished_trials` writes them in one
transaction instead (1 ms a trial, `bench/results/study-storage.md`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import optuna
from optuna.distributions import (
    check_distribution_compatibility,
    distribution_to_json,
    json_to_distribution,
)
from optuna.storages.journal import JournalFileBackend

from tfsearch.errors import InputError
from tfsearch.store.run_folder import (
    FORM_FILES,
    STUDIES_JOURNAL,
    existing_studies,
    form_of,
)

# `tfsearch run --studies`: auto (the default) detects the form from the file system, the others choose it
AUTO = "auto"
STUDIES_FORMS = (AUTO, *FORM_FILES)
# file system types (as /proc/mounts names them) that many nodes share over a network
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "cephfs", "glusterfs",
        "fuse.glusterfs", "fuse.cephfs", "fuse.sshfs", "9p", "afs", "panfs", "wekafs", "orangefs", "pvfs2",
    }
)  # fmt: skip


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the file system holding `path` (or its nearest existing parent), from /proc/mounts;
    None where that cannot be read (not Linux)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = Path(path).resolve()
    best, kind = -1, None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes spaces in mount points as \040
        point = Path(fields[1].replace("\\040", " "))
        if (target == point or point in target.parents) and len(point.parts) > best:
            best, kind = len(point.parts), fields[2]
    return kind


def studies_file(run_dir: Path, form: str = AUTO) -> Path:
    """The run's studies: the file it already has; else the file of `form` (`sqlite`, `journal`), or with
    `auto` a journal on a network file system and SQLite elsewhere. A `form` that contradicts the file the
    run already has is an InputError naming that file: a run keeps the form it started with."""
    if form not in STUDIES_FORMS:
        raise InputError(f"--studies {form}: expected one of {', '.join(STUDIES_FORMS)}")
    existing = existing_studies(run_dir)
    if existing is not None:
        if form != AUTO and existing.name != FORM_FILES[form]:
            kind = "an Optuna journal" if existing.name == STUDIES_JOURNAL else "SQLite"
            raise InputError(
                f"--studies {form}: {existing} already holds this run's studies as {kind}, and a run keeps"
                f" the form it started with: leave --studies out (or give --studies {form_of(existing)})"
            )
        return existing
    if form == AUTO:
        form = "journal" if filesystem_type(run_dir) in NETWORK_FILESYSTEMS else "sqlite"
    return Path(run_dir) / FORM_FILES[form]


def open_studies(path: Path | str):
    """An Optuna storage object for a studies file (Ray's OptunaSearch takes objects, not URLs)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.name.endswith(".journal"):
            storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        else:
            storage = optuna.storages.RDBStorage(
                f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 120}}
            )
        storage.get_all_studies()  # reads the whole file now: a damaged one fails here, named
    except Exception as exc:  # sqlalchemy's and the journal's own errors, which differ by form and version
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{path}: cannot be read as the run's Optuna studies ({reason}); the file may be damaged"
        ) from None
    return storage


def add_finished_trials(storage, study, trials: Sequence) -> range:
    """Add finished trials (`optuna.trial.create_trial`) to `study`, which lives in `storage`, and return
    their trial numbers: the same records `study.add_trials` makes, numbered after the study's trials, but
    into an `RDBStorage` with one multi-row insert per table in one transaction. A study runs in one task at
    a time, so no other writer numbers trials of it meanwhile. Other storages get `study.add_trials`."""
    for trial in trials:
        if not trial.state.is_finished():
            raise ValueError(f"only finished trials are added in bulk, got a {trial.state.name} one")
    if not isinstance(storage, optuna.storages.RDBStorage):
        first = len(study.get_trials(deepcopy=False))
        study.add_trials(trials)
        return range(first, first + len(trials))
    if not trials:
        return range(0)
    return _insert_trials(storage, storage.get_study_id_from_name(study.study_name), trials)


def _insert_trials(storage, study_id: int, trials: Sequence) -> range:
    """Rows of Optuna's RDB schema (its own table models) for `trials`, as `RDBStorage.create_new_trial`
    writes them from a template trial, in one transaction."""
    # Optuna's private RDB models (see the module docstring for why and the versions tested)
    import sqlalchemy as sa
    from optuna.storages._rdb import models

    table = models.TrialModel.__table__
    params_table = models.TrialParamModel.__table__
    with storage.engine.begin() as connection:
        known = connection.execute(
            sa.select(params_table.c.param_name, sa.func.min(params_table.c.distribution_json))
            .join(table, table.c.trial_id == params_table.c.trial_id)
            .where(table.c.study_id == study_id)
            .group_by(params_table.c.param_name)
        ).all()
        for name, stored in known:  # the check `set_trial_param` makes against the study's earlier trials
            previous = json_to_distribution(stored)
            for distribution in {t.distributions[name] for t in trials if name in t.distributions}:
                check_distribution_compatibility(previous, distribution)
        first = connection.execute(
            sa.select(sa.func.count()).select_from(table).where(table.c.study_id == study_id)
        ).scalar_one()
        connection.execute(
            sa.insert(table),
            [
                {
                    "number": first + offset,
                    "study_id": study_id,
                    "state": trial.state,
                    "datetime_start": _naive_utc(trial.datetime_start),
                    "datetime_complete": _naive_utc(trial.datetime_complete),
                }
                for offset, trial in enumerate(trials)
            ],
        )
        ids = dict(
            connection.execute(
                sa.select(table.c.number, table.c.trial_id).where(
                    table.c.study_id == study_id, table.c.number >= first
                )
            ).all()
        )
        tables = {
            "values": models.TrialValueModel,
            "params": models.TrialParamModel,
            "user_attrs": models.TrialUserAttributeModel,
            "system_attrs": models.TrialSystemAttributeModel,
            "intermediate_values": models.TrialIntermediateValueModel,
        }
        rows: dict[str, list[dict]] = {kind: [] for kind in tables}
        for offset, trial in enumerate(trials):
            trial_id = ids[first + offset]
            for objective, value in enumerate(trial.values or ()):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                rows["values"].append(
                    {"trial_id": trial_id, "objective": objective, "value": stored, "value_type": kind}
                )
            for name, value in trial.params.items():
                distribution = trial.distributions[name]
                rows["params"].append(
                    {
                        "trial_id": trial_id,
                        "param_name": name,
                        "param_value": distribution.to_internal_repr(value),
                        "distribution_json": distribution_to_json(distribution),
                    }
                )
            for kind, attrs in (("user_attrs", trial.user_attrs), ("system_attrs", trial.system_attrs)):
                rows[kind] += [
                    {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()
                ]
            for step, value in trial.intermediate_values.items():
                stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
                rows["intermediate_values"].append(
                    {
                        "trial_id": trial_id,
                        "step": step,
                        "intermediate_value": stored,
                        "intermediate_value_type": kind,
                    }
                )
        for kind, model in tables.items():
            if rows[kind]:
                connection.execute(sa.insert(model.__table__), rows[kind])
    return range(first, first + len(trials))


def _naive_utc(moment: datetime | None) -> datetime | None:
    """As RDBStorage stores trial datetimes: naive UTC (FrozenTrial's are naive local time)."""
    return None if moment is None else moment.astimezone(timezone.utc).replace(tzinfo=None)


def study_name(space: str, dataset: str, category: str | None) -> str:
    """A study's name: one per category, or one per dataset (`all`) with scope global."""
    return f"{space}/{dataset}/{category or 'all'}"
