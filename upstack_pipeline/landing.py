"""The landing folder: which files are there, which are new, which changed after we read them.

Files are immutable once written (SPEC 3.1), so a file is identified by its path and content hash. Re-hashing
every old file on every run would make an hourly run cost as much as the whole history, so size and modified
time act as a cheap fingerprint: only a file whose fingerprint moved is hashed again.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

# Suffix -> reader. Longest suffixes first so `x.ndjson.gz` is not taken for something else.
FORMATS: dict[str, dict[str, str]] = {
    "events": {".ndjson.gz": "ndjson", ".jsonl.gz": "ndjson", ".ndjson": "ndjson", ".jsonl": "ndjson",
               ".parquet": "parquet"},
    "customers": {".csv": "csv", ".parquet": "parquet"},
}


@dataclass(frozen=True)
class LandingFile:
    kind: str  # events | customers
    path: str  # relative to the landing folder, POSIX separators: the file's stable name in the warehouse
    absolute: Path
    format: str
    size_bytes: int
    modified_ns: int

    @property
    def modified_at(self) -> datetime:
        # Integer arithmetic: a float of nanoseconds since 1970 cannot hold every microsecond exactly.
        return datetime.fromtimestamp(self.modified_ns // 10**9, tz=timezone.utc).replace(
            microsecond=self.modified_ns // 1000 % 10**6
        )

    @property
    def fingerprint(self) -> str:
        return f"{self.size_bytes}:{self.modified_ns}"

    def sha256(self) -> str:
        digest = hashlib.sha256()
        try:
            with open(self.absolute, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except FileNotFoundError:
            return "missing"  # deleted after ingestion: different from any content we read
        return digest.hexdigest()


@dataclass(frozen=True)
class KnownFile:
    size_bytes: int
    modified_at: datetime
    content_sha256: str


def _format_of(name: str, kind: str) -> str | None:
    for suffix, reader in FORMATS[kind].items():
        if name.endswith(suffix):
            return reader
    return None


def discover(landing_dir: Path, kind: str) -> list[LandingFile]:
    """Data files of one kind under `<landing>/<kind>/`, any nesting, sorted by path.

    Names starting with `.` or `_` are skipped: writers use them for files still being written
    (write `.part-0001.ndjson.gz`, then rename), as Spark and Hive do.
    """
    root = Path(landing_dir) / kind
    found: list[LandingFile] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith((".", "_"))]
        for name in names:
            reader = _format_of(name, kind)
            if reader is None or name.startswith((".", "_")):
                continue
            absolute = Path(folder) / name
            try:
                stat = absolute.stat()
            except FileNotFoundError:  # removed since the folder was listed, or a dangling link
                continue
            found.append(LandingFile(
                kind=kind,
                path=absolute.relative_to(landing_dir).as_posix(),
                absolute=absolute,
                format=reader,
                size_bytes=stat.st_size,
                modified_ns=stat.st_mtime_ns,
            ))
    return sorted(found, key=lambda landing_file: landing_file.path)


@dataclass(frozen=True)
class ChangedFile:
    file: LandingFile
    ingested_sha256: str
    current_sha256: str


def split_new_and_changed(
    files: Iterable[LandingFile], known: Mapping[str, KnownFile]
) -> tuple[list[LandingFile], list[ChangedFile], list[LandingFile]]:
    """(new files to read, files changed since they were read, known files merely touched).

    A touched file (new modified time, same content) is not a change; its stored fingerprint is refreshed so
    it is not hashed again next run.
    """
    new, changed, touched = [], [], []
    for landing_file in files:
        previous = known.get(landing_file.path)
        if previous is None:
            new.append(landing_file)
            continue
        if previous.size_bytes == landing_file.size_bytes and previous.modified_at == landing_file.modified_at:
            continue
        current = landing_file.sha256()
        if current == previous.content_sha256:
            touched.append(landing_file)
        else:
            changed.append(ChangedFile(landing_file, previous.content_sha256, current))
    return new, changed, touched


def batches(files: list[LandingFile], max_bytes: int) -> Iterable[list[LandingFile]]:
    """Consecutive groups of files of about `max_bytes` on disk (at least one file each)."""
    batch: list[LandingFile] = []
    size = 0
    for landing_file in files:
        if batch and size + landing_file.size_bytes > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(landing_file)
        size += landing_file.size_bytes
    if batch:
        yield batch


def snapshot(landing_dir: Path) -> dict[str, str]:
    """Path -> fingerprint of every data file of every kind: what a file sensor compares between ticks."""
    return {
        landing_file.path: landing_file.fingerprint
        for kind in FORMATS
        for landing_file in discover(landing_dir, kind)
    }


def arrivals(previous: Mapping[str, str], current: Mapping[str, str]) -> dict[str, str]:
    """Files that appeared, or whose fingerprint moved, since `previous`."""
    return {path: fingerprint for path, fingerprint in current.items() if previous.get(path) != fingerprint}
