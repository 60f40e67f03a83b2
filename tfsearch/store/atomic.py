"""Atomic file writes: a reader (or a crash) never sees a half-written result or checkpoint.

Each writer fills a temporary file in the destination's folder, flushes it to disk and renames it over the
destination; `os.replace` is atomic on POSIX file systems. `atomic_folder` does the same for a folder of
files: it appears under its name complete, or not at all.

The files and folders take the permissions the process's umask gives a file or folder made with `open` or
`mkdir` (0o666 & ~umask, 0o777 & ~umask), not the 0600 / 0700 of `tempfile`'s private temporary ones, so a
team sharing a run folder can read what a run wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_UMASK_LOCK = threading.Lock()
_PROC_STATUS = "/proc/self/status"


def current_umask() -> int:
    """The process's umask, read without changing it where the system shows it (Linux 4.7+:
    /proc/self/status `Umask:`); elsewhere set and restored under a lock, set meanwhile to 0o077 so that
    a file another thread creates in that instant is private, never more open than meant."""
    try:
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a file made now with `open(path, "w")`: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode of a folder made now with `mkdir`: 0o777 less the umask."""
    return 0o777 & ~current_umask()


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it to `path` (with the mode the umask
    gives a new file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), file_mode())
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; renamed to `path` when the block ends without an exception,
    removed with everything in it otherwise, so that `path` never holds a partial folder.

    `path` must not exist or be an empty folder (which the rename replaces); an OSError (FileExistsError or
    one of errno ENOTEMPTY / EEXIST) says that something else took the name meanwhile, and the temporary
    folder is removed then too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, folder_mode())
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
