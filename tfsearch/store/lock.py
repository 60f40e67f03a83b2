"""One driver per run folder: a second `tfsearch run` (or `tfsearch train`) on the same folder is refused,
naming the one that holds it, instead of both restoring the same experiment and training into one folder.

The lock is an advisory `flock` on RUN/.lock, so it goes with its holder, however that process ends; the
file says who holds it. A folder the lock created and nothing else filled is removed when it is released.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tfsearch.errors import InputError
from tfsearch.store.run_folder import now

LOCK_FILE = ".lock"


@contextmanager
def run_lock(folder: Path, command: str) -> Iterator[None]:
    """Hold `folder` for this process while the block runs; InputError naming the holder when it is held."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise InputError(
                f"{folder} is in use by {holder}: one command at a time per run folder; wait for it to end"
                " (or stop it), then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{command} (pid {os.getpid()} on {socket.gethostname()}, since {now()})\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                path.unlink()
                folder.rmdir()
    finally:
        os.close(fd)
