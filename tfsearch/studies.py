"""Where a run's Optuna studies live and how they are opened.

SQLite on a local disk; Optuna's `JournalStorage` with a journal file when the run folder is on a network
file system (NFS, Lustre, GPFS, ...), where SQLite's locking is unreliable and Optuna recommends the journal.
A run keeps the form its studies were created in, so a resumed run opens the same file. optuna-dashboard
opens either (`dashboard_command`).
"""

from __future__ import annotations

from pathlib import Path

STUDIES_DB = "studies.db"
STUDIES_JOURNAL = "studies.journal"
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


def studies_file(run_dir: Path) -> Path:
    """The run's studies: the file it already has, else a journal on a network file system, else SQLite."""
    for name in (STUDIES_DB, STUDIES_JOURNAL):
        if (run_dir / name).is_file():
            return run_dir / name
    shared = filesystem_type(run_dir) in NETWORK_FILESYSTEMS
    return run_dir / (STUDIES_JOURNAL if shared else STUDIES_DB)


def open_studies(path: Path | str):
    """An Optuna storage object for a studies file (Ray's OptunaSearch takes objects, not URLs)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".journal"):
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    return optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 120}})


def dashboard_command(path: Path) -> str:
    """The optuna-dashboard command that opens a studies file."""
    path = Path(path).resolve()
    return (
        f"optuna-dashboard {path}" if path.name.endswith(".journal") else f"optuna-dashboard sqlite:///{path}"
    )


def study_name(space: str, dataset: str, category: str | None) -> str:
    """A study's name: one per category, or one per dataset (`all`) with scope global."""
    return f"{space}/{dataset}/{category or 'all'}"
