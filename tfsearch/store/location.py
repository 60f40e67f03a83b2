"""Where a run's shared files live: a local or shared folder, or an object store (s3://, gs://), as one
pyarrow filesystem and a folder in it.

`tfsearch run --storage` takes either form. A folder is used in place. An object store cannot be written in
place by the trainer, memory-mapped by the selection or hold SQLite, so files move between it and local
folders with the helpers here: whole folders up and down, each file atomically, and a map set's `meta.json`
last, so that a copy cut short is never mistaken for a complete map set.

Credentials come from each node's own environment (instance role, service account, `AWS_*` variables);
they are never part of a URI that tfsearch stores. An S3-compatible server is named in the URI
(`s3://bucket/runs?endpoint_override=host:9000&scheme=http`) or through `AWS_ENDPOINT_URL`, which
pyarrow honours.
"""

from __future__ import annotations

import hashlib
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from tfsearch.data.demo import cache_dir
from tfsearch.errors import InputError
from tfsearch.maps.cache import META_FILE
from tfsearch.store.atomic import atomic_write
from tfsearch.store.run_folder import MILESTONE_LOG, RUN_TABLES

# URI schemes pyarrow opens; anything without "://" is a folder
SCHEMES = ("file", "s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")
# written last within their folder: a folder without it is incomplete (see tfsearch.maps.cache)
COMMIT_LAST = (META_FILE,)
CHUNK = 1 << 20


@dataclass(frozen=True)
class Location:
    """A folder in some filesystem: `uri` as the user wrote it (sub-folders appended), `path` inside it."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    @classmethod
    def parse(cls, text: str, flag: str = "--storage") -> Location:
        """A folder path or a URI; InputError naming `flag` for an unknown scheme or a malformed URI."""
        if "://" not in text:
            folder = Path(text).expanduser().resolve()
            return cls(str(folder), pafs.LocalFileSystem(), str(folder))
        scheme = text.split("://", 1)[0].lower()
        if scheme not in SCHEMES:
            raise InputError(
                f"{flag} {text}: unknown scheme {scheme!r}; expected a folder or a URI with one of "
                f"{', '.join(s + '://' for s in SCHEMES)}"
            )
        try:
            filesystem, path = pafs.FileSystem.from_uri(text)
        except (ValueError, OSError) as exc:
            raise InputError(f"{flag} {text}: cannot open it ({first_line(exc)})") from None
        return cls(text, filesystem, path.rstrip("/"))

    @classmethod
    def local(cls, folder: Path) -> Location:
        return cls.parse(str(folder))

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local folder")
        return Path(self.path)

    def child(self, *parts: str) -> Location:
        """A sub-folder; a URI keeps its query (e.g. `?endpoint_override=...`) after the longer path."""
        relative = posixpath.join(*parts)
        if self.is_local:
            return Location.local(Path(self.path) / relative)
        split = urlsplit(self.uri)
        uri = urlunsplit(split._replace(path=posixpath.join(split.path or "/", relative)))
        return Location(uri, self.filesystem, posixpath.join(self.path, relative))

    def _full(self, relative: str) -> str:
        return posixpath.join(self.path, relative) if relative else self.path

    # --- checks
    def check(self, flag: str = "--storage") -> None:
        """Fail before any training when the storage cannot be reached, or its bucket does not exist."""
        if self.is_local:
            try:
                Path(self.path).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError(f"{flag} {self.uri}: cannot create the folder ({exc.strerror})") from None
            return
        bucket = self.path.split("/", 1)[0]
        try:
            info = self.filesystem.get_file_info(bucket)
        except OSError as exc:
            raise InputError(f"{flag} {self.uri}: storage not reachable ({first_line(exc)})") from None
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"{flag} {self.uri}: the bucket {bucket!r} does not exist (create it first)")

    # --- reading
    def read_text(self, relative: str) -> str | None:
        """A small file's text, or None when it is not there."""
        if self.filesystem.get_file_info(self._full(relative)).type != pafs.FileType.File:
            return None
        with self.filesystem.open_input_stream(self._full(relative)) as stream:
            return stream.read().decode("utf-8")

    def files(self, relative: str = "") -> list[str]:
        """Every file below `relative`, as paths relative to `relative`, in upload order (see `ordered`)."""
        base = self._full(relative)
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        found = [
            posixpath.relpath(info.path, base)
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File
        ]
        return ordered(found)

    def folders(self, relative: str = "") -> list[str]:
        """Names of the sub-folders of `relative` (none when it does not exist)."""
        selector = pafs.FileSelector(self._full(relative), recursive=False, allow_not_found=True)
        return sorted(
            posixpath.basename(info.path)
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.Directory
        )

    # --- copying
    def upload(self, local: Path, relative: str) -> None:
        """Copy a local file, or a folder with everything in it, to `relative` (training runs in a storage
        folder are written in place; this copies into object stores, and publishes a run's results)."""
        local = Path(local)
        if local.is_file():
            self._put(local, self._full(relative))
            return
        # file by file, commit files last (pyarrow's copy_files has no order: a reader could take a
        # half-copied map set for a complete one)
        names = ordered([p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()])
        for name in names:
            self._put(local / name, self._full(posixpath.join(relative, name)))

    def upload_folder(self, local: Path, relative: str) -> None:
        """Copy a folder whose files need no order (a report, W&B runs), with parallel transfers."""
        pafs.copy_files(
            str(Path(local).resolve()),
            self._full(relative),
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.filesystem,
            use_threads=True,
        )

    def download(self, relative: str, local: Path) -> bool:
        """Copy the file or folder `relative` to `local`, each file atomically; False when it is absent."""
        info = self.filesystem.get_file_info(self._full(relative))
        if info.type == pafs.FileType.NotFound:
            return False
        if info.type == pafs.FileType.File:
            self._get(info.path, Path(local))
            return True
        for name in self.files(relative):
            self._get(self._full(posixpath.join(relative, name)), Path(local) / name)
        return True

    def delete(self, relative: str) -> None:
        """Remove one file (nothing when it is not there)."""
        target = self._full(relative)
        if self.filesystem.get_file_info(target).type == pafs.FileType.File:
            self.filesystem.delete_file(target)

    def _put(self, source: Path, target: str) -> None:
        """One file copied whole: readers see all of it or none (a rename in a folder, one object PUT)."""
        with source.open("rb") as reader:
            if self.is_local:
                atomic_write(Path(target), lambda handle: shutil.copyfileobj(reader, handle, CHUNK))
                return
            with self.filesystem.open_output_stream(target) as writer:
                shutil.copyfileobj(reader, writer, CHUNK)

    def _get(self, source: str, target: Path) -> None:
        with self.filesystem.open_input_stream(source) as stream:
            atomic_write(target, lambda handle: shutil.copyfileobj(stream, handle, CHUNK))


def ordered(names: list[str]) -> list[str]:
    """Sorted, with each folder's commit file (a map set's meta.json) after everything else."""
    return sorted(names, key=lambda name: (posixpath.basename(name) in COMMIT_LAST, name))


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def run_location(storage: str, name: str) -> Location:
    """`--storage STORAGE` for run NAME: STORAGE/NAME, checked to be reachable."""
    root = Location.parse(storage)
    root.check()
    return root.child(name)


def local_run_dir(path_or_uri: str | Path, cache: Path | None = None) -> Path:
    """A run folder `tfsearch report` can read: the folder itself, or for a URI a local copy of the run's
    tables (config.json, trials.csv, selected.csv; the training logs of a run that has not finished yet).

    The copy goes to CACHE/runs/<hash of the URI>/NAME (CACHE: `$TFSEARCH_CACHE`, else ~/.cache/tfsearch).
    """
    text = str(path_or_uri)
    if "://" not in text:
        return Path(text)
    location = Location.parse(text, flag="RUN_DIR")
    location.check(flag="RUN_DIR")
    if location.read_text("config.json") is None:
        raise InputError(f"RUN_DIR {text}: not a run: config.json is missing there")
    if cache is None:
        cache = cache_dir()
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    local = Path(cache) / "runs" / digest / posixpath.basename(location.path)
    for table in RUN_TABLES:
        if not location.download(table, local / table):
            (local / table).unlink(missing_ok=True)  # a table the stored run no longer has
    if not (local / "trials.csv").is_file():
        for category in location.folders("train"):
            for model in location.folders(f"train/{category}"):
                relative = f"train/{category}/{model}/{MILESTONE_LOG}"
                location.download(relative, local / relative)
    return local
