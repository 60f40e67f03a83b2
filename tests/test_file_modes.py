"""Files written atomically take the permissions the umask gives a normally created file (0o666 & ~umask), not
the 0600 of a private temporary file, so that a team sharing a run or an export folder can read them."""

import os
import stat
from pathlib import Path

import pytest

import tfsearch.store.atomic
from tfsearch.cli import main
from tfsearch.store.atomic import (
    atomic_folder,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    current_umask,
)

# umask -> (mode of a new file, mode of a new folder)
UMASKS = {0o022: (0o644, 0o755), 0o007: (0o660, 0o770)}


@pytest.fixture(params=sorted(UMASKS), ids=lambda mask: f"umask{mask:03o}")
def umask(request):
    """The process's umask set for one test, and the previous one restored after it."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_follow_the_umask(umask, tmp_path):
    file_mode, folder_mode = UMASKS[umask]
    written = {
        "bytes.bin": lambda path: atomic_write(path, lambda handle: handle.write(b"\x00\x01")),
        "table.json": lambda path: atomic_write_json(path, {"a": 1}),
        "report.txt": lambda path: atomic_write_text(path, "text\n"),
    }
    for name, write in written.items():
        path = tmp_path / "new" / "deeper" / name  # parents made by the write
        write(path)
        assert mode(path) == file_mode, name
        write(path)  # and when it replaces an earlier version
        assert mode(path) == file_mode, name
    assert mode(tmp_path / "new") == folder_mode and mode(tmp_path / "new" / "deeper") == folder_mode
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == sorted(written)  # no temp left

    with atomic_folder(tmp_path / "made" / "folder") as folder:
        atomic_write_text(folder / "inside.txt", "x")
    assert mode(tmp_path / "made" / "folder") == folder_mode and mode(tmp_path / "made") == folder_mode
    assert mode(tmp_path / "made" / "folder" / "inside.txt") == file_mode
    assert os.umask(umask) == umask  # reading it left it as it was


def test_the_umask_is_read_without_proc_too(umask, monkeypatch, tmp_path):
    """Where /proc/self/status does not show it, the umask is set and restored under a lock."""
    assert current_umask() == umask
    monkeypatch.setattr(tfsearch.store.atomic, "_PROC_STATUS", str(tmp_path / "no-such-file"))
    assert current_umask() == umask
    atomic_write_text(tmp_path / "file.txt", "x")
    assert mode(tmp_path / "file.txt") == UMASKS[umask][0]
    assert os.umask(umask) == umask


def test_an_exports_files_follow_the_umask(umask, shared_run, tmp_path):
    file_mode, folder_mode = UMASKS[umask]
    out = tmp_path / "out"
    assert main(["export", str(shared_run.run_dir), "--out", str(out), "--categories", "stripes"]) == 0
    assert mode(out / "stripes") == folder_mode and mode(out) == folder_mode
    assert mode(out / "stripes" / "weights.pt") == file_mode
    assert mode(out / "stripes" / "manifest.json") == file_mode


def test_a_map_cache_folder_follows_the_umask(umask, tmp_path):
    from test_map_cache import make_map_set

    from tfsearch.maps.cache import write_map_set

    file_mode, folder_mode = UMASKS[umask]
    target = tmp_path / "maps" / "test" / "epoch-0001"
    write_map_set(target, make_map_set())
    assert mode(target) == folder_mode
    assert {mode(path) for path in target.iterdir()} == {file_mode}
