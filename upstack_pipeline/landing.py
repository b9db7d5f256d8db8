"""The landing folder: which files are there, which are new, which changed after we read them.

Files are immutable once written (SPEC 3.1), so a file is identified by its path and content hash. Re-hashing
every old file on every run would make an hourly run cost as much as the whole history, so size and modified
time act as a cheap fingerprint: only a file whose fingerprint moved is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Mapping

# Suffix -> reader. Longest suffixes first so `x.ndjson.gz` is not taken for something else.
FORMATS: dict[str, dict[str, str]] = {
    "events": {".ndjson.gz": "ndjson", ".jsonl.gz": "ndjson", ".ndjson": "ndjson", ".jsonl": "ndjson",
               ".parquet": "parquet"},
    "customers": {".csv": "csv", ".parquet": "parquet"},
}


class LandingFolderError(ValueError):
    """The landing folder is not where the settings say: nothing can be ingested until the path is fixed."""


def check_landing_folder(landing_dir: Path) -> None:
    """Raises LandingFolderError naming the path and the variable to fix: a mistyped UPSTACK_LANDING_DIR must
    not pass for a quiet day with no new files."""
    landing_dir = Path(landing_dir)
    where = f"UPSTACK_LANDING_DIR is {str(landing_dir)!r} (absolute: {landing_dir.absolute()})"
    if not landing_dir.is_dir():
        raise LandingFolderError(f"the landing folder does not exist: {where}. Set UPSTACK_LANDING_DIR to the "
                                 "folder your pixel's files land in (it holds events/ and, optionally, customers/).")
    if not (landing_dir / "events").is_dir():
        raise LandingFolderError(f"the landing folder has no events/ folder: {where}. Pixel files go in "
                                 "<landing>/events/ (any nesting): check UPSTACK_LANDING_DIR, or create events/ "
                                 "if the pixel has not written anything yet.")


def _in_progress(name: str) -> bool:
    return name.startswith((".", "_"))


def accepted_names() -> str:
    """The names each folder takes, for messages: `events/ *.ndjson.gz, ...; customers/ *.csv, ...`."""
    return "; ".join(f"{kind}/ " + ", ".join(f"*{suffix}" for suffix in suffixes) for kind, suffixes in FORMATS.items())


def ignored_files(landing_dir: Path) -> list[str]:
    """Files a person put where data goes that no reader takes (a `.json`, a `.csv` among the events, a file
    at the top of the landing folder), relative to it. Named in the summary so they are not silently lost."""
    landing_dir = Path(landing_dir)
    ignored = []
    for entry in sorted(landing_dir.iterdir()) if landing_dir.is_dir() else []:
        if entry.is_file() and not _in_progress(entry.name):
            ignored.append(entry.name)
    for kind in FORMATS:
        for folder, subfolders, names in os.walk(landing_dir / kind):
            subfolders[:] = [name for name in subfolders if not _in_progress(name)]
            for name in names:
                if not _in_progress(name) and _format_of(name, kind) is None:
                    ignored.append((Path(folder) / name).relative_to(landing_dir).as_posix())
    return sorted(ignored)


@dataclass(frozen=True)
class LandingFile:
    kind: str  # events | customers
    path: str  # relative to the landing folder, POSIX separators: the file's stable name in the warehouse
    absolute: Path
    format: str
    size_bytes: int
    modified_ns: int
    # When the file appeared here: its inode change time, which a copy or a move sets even when it keeps an
    # old modified time (rsync -t, cp -p, mv), or the modified time if later.
    arrived_ns: int = 0

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
        subfolders[:] = [name for name in subfolders if not _in_progress(name)]
        for name in names:
            reader = _format_of(name, kind)
            if reader is None or _in_progress(name):
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
                arrived_ns=max(stat.st_mtime_ns, stat.st_ctime_ns),
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


# A file sensor looks this far behind its previous listing: a file being written or moved while the folder was
# listed, or stamped by a clock a little behind ours, can show an arrival time slightly before that listing.
ARRIVAL_GRACE = timedelta(minutes=10)


@dataclass(frozen=True)
class ArrivalCursor:
    """What a file sensor remembers between ticks: when it last listed the folder (a high-water mark) and the
    fingerprints of the files that arrived within ARRIVAL_GRACE before that. Its size follows the files of the
    last few minutes, not the history: after a quiet spell it is a timestamp and an empty map."""

    listed_ns: int = 0
    recent: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> "ArrivalCursor":
        """A cursor of another shape (an older release kept every path) starts afresh: one extra run."""
        try:
            stored = json.loads(text) if text else {}
            return cls(int(stored["listed_ns"]), dict(stored["recent"]))
        except (ValueError, KeyError, TypeError):
            return cls()

    def dumps(self) -> str:
        return json.dumps({"listed_ns": self.listed_ns, "recent": self.recent}, separators=(",", ":"),
                          sort_keys=True)


def arrivals(landing_dir: Path, cursor: ArrivalCursor,
             grace: timedelta = ARRIVAL_GRACE) -> tuple[dict[str, str], ArrivalCursor]:
    """(path -> fingerprint of the data files that arrived or changed since `cursor`, the next cursor)."""
    listed_ns = time.time_ns()  # before listing: a file landing during the listing is seen now or next time
    files = [landing_file for kind in FORMATS for landing_file in discover(landing_dir, kind)]
    grace_ns = int(grace.total_seconds() * 10**9)
    arrived = {landing_file.path: landing_file.fingerprint for landing_file in files
               if landing_file.arrived_ns >= cursor.listed_ns - grace_ns
               and cursor.recent.get(landing_file.path) != landing_file.fingerprint}
    recent = {landing_file.path: landing_file.fingerprint for landing_file in files
              if landing_file.arrived_ns >= listed_ns - grace_ns}
    return arrived, ArrivalCursor(listed_ns, recent)
