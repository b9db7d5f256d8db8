"""Moving landing files into the warehouse exactly once.

Shared by every kind of landing file (events, customers): find the files not read yet, report the ones that
changed after they were read, stage each batch of new files as lines, let the kind's SQL sort the lines into its
tables, and record each file in the `ingested_files` ledger in the same transaction. A run killed at any point
therefore leaves each file either fully ingested and recorded, or untouched and read again next run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from itertools import accumulate
from pathlib import Path
from typing import Callable, Protocol

import duckdb
import polars as pl

from upstack_pipeline import faults
from upstack_pipeline.landing import (
    ChangedFile,
    KnownFile,
    LandingFile,
    batches,
    discover,
    split_new_and_changed,
)
from upstack_pipeline.warehouse import (
    ROW_GROUP_ROWS,
    VACUUM_STAGE,
    Warehouse,
    event_id_hashes_cover,
    frame,
    schema_version,
    set_variables,
    transaction,
)

COUNT_NAMES = ("lines", "ingested_rows", "duplicate_rows", "quarantined_rows")
STAGED_SCHEMA = {"source_file": pl.String, "line_number": pl.Int64, "raw_line": pl.String, "invalid_utf8": pl.Boolean}
JSON_LINE = pl.Extension("arrow.json", pl.String)  # a line as DuckDB's JSON type (see staged_lines)
# raw_events' tail: the partly filled row groups after its last full one (of ROW_GROUP_ROWS rows: warehouse.py).
# Each ingestion run's commit starts a new row group, and a checkpoint's vacuum merges the tail whenever its row
# groups fit in fewer: every small run would then pay for rewriting (zstd raw_json and all) up to a row group of
# history, the previous runs' rows, whatever its own size. So checkpoints hold the vacuum (upstack_pipeline.warehouse
# .apply_vacuum_hold) until the tail holds two row groups' worth (a merge then rewrites at most twice the rows that
# arrived since the last one) or TAIL_VACUUM_GROUPS row groups: scans stay short, and the other tables' partly deleted
# row groups (identity's re-resolved events) are reclaimed by the checkpoints after that run.
TAIL_VACUUM_ROWS = 2 * ROW_GROUP_ROWS
TAIL_VACUUM_GROUPS = 24
# A batch's commit checkpoints (WRITTEN_ONCE is the checkpoint_threshold the batches run with): DuckDB then writes
# its rows once, compressed, into the database file (a commit that checkpoints skips the WAL once the batch is big
# enough: auto_checkpoint_skip_wal_threshold). Otherwise a batch smaller than a row group, such as an hourly run's
# (DuckDB writes larger appends to the file as they go), went to the WAL first, uncompressed (53 MB for a
# day's 25,000 lines), and was written again by the next checkpoint: about 0.25 s of the day's 1.6 s. Durability is
# the same: a run killed before the checkpoint completes leaves neither the rows nor the ledger's entries.
WRITTEN_ONCE = "0B"
# What a batch knows of each of its files before its lines are sorted: the ingested_files columns but the counts.
LEDGER_SCHEMA = {"path": pl.String, "kind": pl.String, "size_bytes": pl.Int64,
                 "modified_at": pl.Datetime("us", "UTC"), "content_sha256": pl.String, "status": pl.String,
                 "error": pl.String}


class ArrowStream:
    """A polars frame as DuckDB reads it through the Arrow C stream interface, each scan a new stream of its chunks.
    Registered as a bare polars frame, it would go through pyarrow instead: a conversion of the batch's lines, and
    pyarrow's import (about 0.2 s) in every process that ingests anything, a fixed cost of an hourly run."""

    def __init__(self, frame: pl.DataFrame):
        self.frame = frame

    def __arrow_c_stream__(self, requested_schema: object = None) -> object:
        return self.frame.__arrow_c_stream__(requested_schema)


class UnreadableFileError(Exception):
    """A landing file that cannot be read at all (corrupt gzip, broken Parquet)."""


class FileKind(Protocol):
    """What one kind of landing file needs beyond the shared bookkeeping."""

    kind: str
    # The DuckDB settings write_batch changes for some of its statements and resets after them: reset again after
    # the batches, since a failed statement ends the batch before its own reset.
    statement_settings: tuple[str, ...]

    def read_lines(self, landing_file: LandingFile, data: bytes) -> pl.DataFrame:
        """The file's bytes as staged lines: line_number, raw_line, invalid_utf8 (see STAGED_SCHEMA)."""

    def write_batch(self, connection: duckdb.DuckDBPyConnection, now: datetime) -> None:
        """Sort the batch's lines (staged_lines: see ingestion.staged_lines) into the kind's tables; leave temp table
        batch_file_counts.

        SQL variables `ingested_at` and `load_id` are set for the rows it writes.
        """


@dataclass
class IngestReport:
    kind: str
    files_read: int = 0
    unreadable_files: dict[str, str] = field(default_factory=dict)
    changed_files: list[str] = field(default_factory=list)
    # Files in the landing folder that match no accepted name (e.g. `.json`, `.csv` among events): not read.
    ignored_files: list[str] = field(default_factory=list)
    lines: int = 0
    ingested_rows: int = 0
    duplicate_rows: int = 0
    quarantined_rows: int = 0

    def add(self, counts: dict[str, int]) -> None:
        for name in COUNT_NAMES:
            setattr(self, name, getattr(self, name) + counts[name])


def ingest_new_files(
    warehouse: Warehouse,
    landing_dir: Path,
    file_kind: FileKind,
    *,
    now: datetime,
    batch_bytes: int,
    log: Callable[[str], None] = lambda message: None,
) -> IngestReport:
    report = IngestReport(kind=file_kind.kind)
    if not (Path(landing_dir) / file_kind.kind).is_dir():
        log(f"There is no folder {Path(landing_dir) / file_kind.kind}: no {file_kind.kind} files to ingest. "
            "Check UPSTACK_LANDING_DIR if you expected some.")
    # One connection for the whole ingestion: deciding which files are new and ingesting them happen under the
    # same file lock, so a concurrent sync waits and then finds nothing left to do instead of racing us.
    with warehouse.connect() as connection:
        connection.execute("set max_vacuum_tasks = 0")  # the batches' commits may checkpoint: see decide_vacuum
        new, changed, touched = split_new_and_changed(
            discover(landing_dir, file_kind.kind), _known_files(connection, file_kind.kind)
        )
        _record_changed_and_touched(connection, changed, touched, now)
        report.changed_files = [change.file.path for change in changed]
        for change in changed:
            log(f"{change.file.path} changed after it was ingested (sha256 {change.ingested_sha256[:12]}... -> "
                f"{change.current_sha256[:12]}...); it is not read again. Landing files must be immutable: "
                "write new data to a new file.")
        ingested_any = False
        connection.execute(f"set checkpoint_threshold = '{WRITTEN_ONCE}'")
        try:
            for batch in batches(new, batch_bytes):
                _ingest_batch(connection, batch, file_kind, now, report)
                ingested_any = True
        finally:  # settings are the database's: other connections of this process get DuckDB's own back, even
                  # after a failed batch
            for setting in ("checkpoint_threshold", *file_kind.statement_settings):
                connection.execute(f"reset {setting}")
        if ingested_any:
            decide_vacuum(connection, now)
    for path, error in report.unreadable_files.items():
        log(f"{path} could not be read and was recorded as unreadable: {error}")
    return report


def _ingest_batch(
    connection: duckdb.DuckDBPyConnection, batch: list[LandingFile], file_kind: FileKind, now: datetime,
    report: IngestReport,
) -> None:
    """One transaction: the batch's rows, its quarantine and its ledger entries land together or not at all."""
    staged, ledger, unreadable = _stage(batch, file_kind)
    with transaction(connection):
        counts = _write_batch(connection, staged, ledger, file_kind, now)
    faults.reached(f"{file_kind.kind}-batch")  # test hook: UPSTACK_TEST_STOP_AFTER=events-batch:N
    report.add(counts)
    report.files_read += len(batch) - len(unreadable)
    report.unreadable_files.update(unreadable)


def _write_batch(
    connection: duckdb.DuckDBPyConnection, staged: pl.DataFrame, ledger: pl.DataFrame, file_kind: FileKind,
    now: datetime,
) -> dict[str, int]:
    """The batch's rows, quarantine and ledger entries written (not committed); returns the batch's counts."""
    next_load = connection.execute("select coalesce(max(load_id), 0) + 1 from ingested_files").fetchone()[0]
    set_variables(connection, {"ingested_at": now, "load_id": next_load})
    with staged_lines(connection, staged):
        file_kind.write_batch(connection, now)
    connection.register("batch_files", ArrowStream(ledger))
    # One statement for the batch's ledger rows (a file with no lines has no counts: zeros).
    rows = connection.execute(f"""
        insert into ingested_files by name
        select
            file.*,
            {", ".join(f"coalesce(counts.{name}, 0) as {name}" for name in COUNT_NAMES)},
            getvariable('ingested_at') as ingested_at,
            getvariable('load_id') as load_id
        from batch_files as file
        left join batch_file_counts as counts on counts.source_file = file.path
        order by file.path
        returning {", ".join(COUNT_NAMES)}
    """).fetchall()
    connection.unregister("batch_files")
    return {name: sum(column) for name, column in zip(COUNT_NAMES, zip(*rows))}


@contextmanager
def staged_lines(connection: duckdb.DuckDBPyConnection, staged: pl.DataFrame) -> Iterator[None]:
    """For the block: the batch's lines as temp view `staged_lines`, one Arrow stream per DuckDB thread, unioned.
    Dropped when the block ends; a block that raises leaves them to the rollback and the connection's close
    (dropping a view in the aborted transaction would raise in its turn, and hide the error).

    One stream is read by one thread: parsing and checking a batch's JSON (sql/line_verdicts.sql) ran on one core,
    and a day's 25,000 lines took 0.55 s where two streams take 0.37 s; typing the accepted ones into raw_events
    (sql/raw_events.sql) is on every core too. Each stream leaves at most one partly filled row group of its own
    (a batch of less than a row group per stream is merged into one at its commit)."""
    # The lines reach DuckDB typed JSON (Arrow's canonical extension type arrow.json), which DuckDB takes as it is.
    # As VARCHAR, each accepted line was parsed once more by its cast to raw_events.raw_json (JSON): 0.2 s of the
    # 3.4 s of writes of a 640,000-line full sync. No statement relies on a staged line being valid JSON before the
    # kind's SQL has judged it (json_valid); a quarantined line keeps its bytes as they came.
    staged = staged.with_columns(pl.col("raw_line").cast(JSON_LINE))
    sizes = stream_sizes(staged.height, _threads(connection))
    parts = [f"staged_lines_{number}" for number in range(len(sizes))]
    for part, offset, size in zip(parts, accumulate([0, *sizes]), sizes):
        connection.register(part, ArrowStream(staged.slice(offset, size)))
    connection.execute("create or replace temp view staged_lines as "
                       + " union all ".join(f"select * from {part}" for part in parts))
    yield
    connection.execute("drop view staged_lines")
    for part in parts:
        connection.unregister(part)


def stream_sizes(lines: int, threads: int) -> list[int]:
    """How many of a batch's `lines` each of its streams (staged_lines) takes: as many as there are threads, of
    equal size but the last; one for an empty batch."""
    size = max(1, -(-lines // threads))  # ceiling
    return [min(size, lines - start) for start in range(0, lines, size)] or [0]


def _threads(connection: duckdb.DuckDBPyConnection) -> int:
    return int(connection.execute("select current_setting('threads')").fetchall()[0][0])


def decide_vacuum(connection: duckdb.DuckDBPyConnection, now: datetime) -> None:
    """Whether checkpoints may vacuum from now until the next ingestion run that writes rows, from raw_events' tail
    (see TAIL_VACUUM_ROWS); recorded for every stage's connection, and set on this one's database instance for its
    next checkpoint (at the run's end, when the run holds the warehouse: Warehouse.held_open).
    Only a cost decision: whichever way a killed run leaves it, the next run decides again.

    Measuring the tail reads the storage of every column of every row group (1 s at 19 million events), a cost of
    the history that an hourly run must not pay. So each decision records a tail the runs after it bound from the
    ledger alone (_tail_bound): a hold the tail it measured, a merge what a merge is meant to leave, a row group at
    most after the last full one. The runs of loads that fit in a row group (hourly runs) then merge when the bound
    reaches a threshold, unmeasured, and a load whose every stream fills a row group (a day's run of a big store,
    on two cores) bounds the tail by its own streams' last row groups; other loads' runs measure once their bound
    reaches a threshold (0.12 s at 1.9 million events), and so does a first run, or one after raw_events changed
    otherwise. A record made while raw_events was empty (by the customers export's run, which comes first, or a run
    that added no rows) counts as none: every row group is then the loads' since, so measuring costs in proportion
    to what they wrote, where their bound (a first sync's streams fill row groups: on two threads, nearly two row
    groups' worth) would leave no room and have the next run, however small, measure the whole table. Should a
    merge leave more (DuckDB merges a few row groups at a time) or not happen (a run killed first), the next merge
    comes sooner than it was due: a cost, never a wrong row."""
    known = _known_tail(connection)
    bound = _tail_bound(connection, known) if known and known.table_rows else None
    tail = bound or _measured_tail(connection)
    vacuum = tail.worth_merging
    if vacuum:
        memo = dataclasses.replace(tail, rows=min(tail.rows, ROW_GROUP_ROWS), row_groups=1).memo
    else:
        memo = known.memo if bound else tail.memo
    connection.execute(
        "insert or replace into pipeline_state (stage, load_id, updated_at, fingerprint, overview) "
        "values (?, (select coalesce(max(load_id), 0) from ingested_files), ?, ?, ?)",
        [VACUUM_STAGE, now, "vacuum" if vacuum else "hold", memo])
    connection.execute("reset max_vacuum_tasks" if vacuum else "set max_vacuum_tasks = 0")


@dataclass(frozen=True)
class RawEventsTail:
    """raw_events' tail (rows, row groups: measured, or at most) after load `load_id`, with what identifies that
    layout: the table's row count and the schema version (a migration may rebuild the table)."""

    rows: int
    row_groups: int
    load_id: int
    table_rows: int
    schema_version: int | None

    @property
    def worth_merging(self) -> bool:
        """Whether a checkpoint's merge of this tail is worth its cost (TAIL_VACUUM_ROWS, TAIL_VACUUM_GROUPS)."""
        return self.rows >= TAIL_VACUUM_ROWS or self.row_groups >= TAIL_VACUUM_GROUPS

    @property
    def memo(self) -> str:
        """As pipeline_state.overview keeps it for VACUUM_STAGE."""
        return json.dumps(dataclasses.asdict(self))


def _measured_tail(connection: duckdb.DuckDBPyConnection) -> RawEventsTail:
    groups, rows = connection.execute("""
        with row_groups as (
            select row_group_id, sum(count) as rows from pragma_storage_info('raw_events')
            where column_id = 0 and column_path = '[0]'  -- the first column's values: its row count
            group by row_group_id
        )
        select count(*), coalesce(sum(rows), 0) from row_groups
        where row_group_id > (select coalesce(max(row_group_id), -1) from row_groups where rows >= ?)
    """, [ROW_GROUP_ROWS]).fetchone()
    return RawEventsTail(rows=rows, row_groups=groups, **_layout_marks(connection))


def _layout_marks(connection: duckdb.DuckDBPyConnection) -> dict:
    load_id, table_rows = connection.execute(
        "select (select coalesce(max(load_id), 0) from ingested_files), (select count(*) from raw_events)"
    ).fetchone()
    return {"load_id": load_id, "table_rows": table_rows, "schema_version": schema_version(connection)}


def _known_tail(connection: duckdb.DuckDBPyConnection) -> RawEventsTail | None:
    """The tail the last decision recorded (see decide_vacuum), or None when it recorded none."""
    row = connection.execute("select overview from pipeline_state where stage = ?", [VACUUM_STAGE]).fetchone()
    return RawEventsTail(**json.loads(row[0])) if row and row[0] is not None else None


def _tail_bound(connection: duckdb.DuckDBPyConnection, known: RawEventsTail) -> RawEventsTail | None:
    """At most how large the tail is now, while only ingestion has changed raw_events, from the known tail and the
    loads since, each one commit of its batch's streams (staged_lines), in order:
    - a load whose every stream wrote a row group or more leaves the earlier rows behind full row groups, and at
      most one partly filled row group per stream: its tail is at most those, but how full each is, its rows alone
      do not say (its rejected lines may fall in any stream);
    - a load that fits in a row group adds one row group (its streams' rows are merged at its commit);
    - any other load adds all its rows, in ceil(rows / ROW_GROUP_ROWS) row groups and one more: its streams leave
      full row groups and a few partly filled ones.
    The first and the last overstate the tail: a bound past a threshold after either is measured instead (None).
    At --scale 1 the full sync's one load was bounded at two nearly full row groups where 838 rows were left, and
    the next day's run merged on that bound, 0.25 s of checkpoint for nothing.
    Streams are counted as this connection's threads split the load's lines (the ledger's, which leave blank lines
    out), and a stream's rows are its lines but at most all the load's rejected ones. Also None when raw_events
    changed otherwise as far as its row count or the schema version shows (rows not in the ledger, a rebuilt
    table). A change that keeps the count (an analyst's update of a nested column is a delete and an append), or a
    load under other threads, can hold the merge past a threshold until the bound catches up, a dozen small runs at
    most: a cost, never a wrong row."""
    loads = connection.execute("""
        select sum(ingested_rows), sum(lines) from ingested_files
        where kind = 'events' and load_id > ? group by load_id having sum(ingested_rows) > 0 order by load_id
    """, [known.load_id]).fetchall()
    now = _layout_marks(connection)
    if now["table_rows"] != known.table_rows + sum(rows for rows, _ in loads) or (
            now["schema_version"] != known.schema_version):
        return None
    threads = _threads(connection)
    rows_bound, groups_bound, overstated = known.rows, known.row_groups, False
    for rows, lines in loads:
        streams = stream_sizes(lines, threads)
        if min(streams) - (lines - rows) >= ROW_GROUP_ROWS:
            rows_bound = min(len(streams) * (ROW_GROUP_ROWS - 1), rows - len(streams) * ROW_GROUP_ROWS)
            groups_bound, overstated = len(streams), True
        elif rows <= ROW_GROUP_ROWS:
            rows_bound, groups_bound = rows_bound + rows, groups_bound + 1
        else:
            rows_bound, groups_bound = rows_bound + rows, groups_bound + math.ceil(rows / ROW_GROUP_ROWS) + 1
            overstated = True
    bound = RawEventsTail(rows=rows_bound, row_groups=groups_bound, **now)
    return None if overstated and bound.worth_merging else bound


def _stage(batch: list[LandingFile], file_kind: FileKind) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, str]]:
    """(the batch's staged lines, its ledger rows without their counts, path -> why unreadable).

    Reads each file once: the ledger's size and hash describe exactly the bytes that were ingested. Files are
    read on every core: hashing, gunzip and splitting into lines release the GIL."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        staged_files = list(pool.map(lambda landing_file: _stage_file(landing_file, file_kind), batch))
    frames = [lines for _, lines, _ in staged_files if lines is not None]
    unreadable = {landing_file.path: error for landing_file, (_, _, error) in zip(batch, staged_files) if error}
    ledger = pl.DataFrame({
        "path": [landing_file.path for landing_file in batch],
        "kind": [landing_file.kind for landing_file in batch],
        "size_bytes": [size for (size, _), _, _ in staged_files],
        "modified_at": [landing_file.modified_at for landing_file in batch],
        "content_sha256": [sha256 for (_, sha256), _, _ in staged_files],
        "status": ["unreadable" if error else "ingested" for _, _, error in staged_files],
        "error": [error for _, _, error in staged_files],
    }, schema=LEDGER_SCHEMA)
    staged = pl.concat(frames) if frames else pl.DataFrame(schema=STAGED_SCHEMA)
    return staged, ledger, unreadable


def _stage_file(
    landing_file: LandingFile, file_kind: FileKind
) -> tuple[tuple[int, str], pl.DataFrame | None, str | None]:
    """(size and sha256 of the bytes read, their staged lines or None, why the file is unreadable or None)."""
    try:
        data = landing_file.absolute.read_bytes()
    except OSError as error:
        return (0, hashlib.sha256(b"").hexdigest()), None, f"could not be opened: {error}"
    fingerprint = (len(data), hashlib.sha256(data).hexdigest())
    try:
        lines = file_kind.read_lines(landing_file, data)
    except UnreadableFileError as error:
        return fingerprint, None, str(error)
    return fingerprint, staged_rows(lines, landing_file.path), None


def staged_rows(lines: pl.DataFrame, source_file: str) -> pl.DataFrame:
    """A file's lines (FileKind.read_lines) as rows of a batch's staged lines: named by their file, in STAGED_SCHEMA."""
    return lines.with_columns(source_file=pl.lit(source_file)).select(
        pl.col(name).cast(dtype) for name, dtype in STAGED_SCHEMA.items())


def _known_files(connection: duckdb.DuckDBPyConnection, kind: str) -> dict[str, KnownFile]:
    rows = connection.execute(
        "select path, size_bytes, modified_at, content_sha256 from ingested_files where kind = ?", [kind]
    ).fetchall()
    return {path: KnownFile(size, modified_at, sha) for path, size, modified_at, sha in rows}


def _record_changed_and_touched(
    connection: duckdb.DuckDBPyConnection, changed: list[ChangedFile], touched: list[LandingFile], now: datetime
) -> None:
    """One statement each for the changed files and the touched ones, however many: a landing folder copied back
    from a backup touches every file (a statement per file took 0.7 s for a month of hourly files)."""
    if not changed and not touched:
        return
    changes = pl.DataFrame({
        "path": [change.file.path for change in changed],
        "ingested_sha256": [change.ingested_sha256 for change in changed],
        "current_sha256": [change.current_sha256 for change in changed],
        "current_size_bytes": [change.file.size_bytes for change in changed],
    }, schema={"path": pl.String, "ingested_sha256": pl.String, "current_sha256": pl.String,
               "current_size_bytes": pl.Int64})
    touches = pl.DataFrame({"path": [landing_file.path for landing_file in touched],
                            "modified_at": [landing_file.modified_at for landing_file in touched]},
                           schema={"path": pl.String, "modified_at": LEDGER_SCHEMA["modified_at"]})
    try:
        connection.register("changes", ArrowStream(changes))
        connection.register("touches", ArrowStream(touches))
        connection.execute("insert or ignore into changed_files by name select *, ? as detected_at from changes", [now])
        connection.execute("""
            update ingested_files set modified_at = touches.modified_at
            from touches where ingested_files.path = touches.path""")
    finally:
        connection.unregister("changes")
        connection.unregister("touches")


@dataclass(frozen=True)
class TableOverview:
    """What an operator wants to see after an ingestion: totals, this run's quarantine, a few sample rows."""

    total_rows: int
    total_quarantined: int
    quarantined_this_run_by_reason: dict[str, int]
    recent_rows: pl.DataFrame
    quarantined_this_run: pl.DataFrame


def overview(
    warehouse: Warehouse, *, table: str, quarantine_table: str, recent_columns: str, now: datetime, limit: int = 5
) -> TableOverview:
    with warehouse.connect() as connection:
        total_rows = connection.execute(f"select count(*) from {table}").fetchone()[0]
        total_quarantined = connection.execute(f"select count(*) from {quarantine_table}").fetchone()[0]
        by_reason = dict(connection.execute(
            f"select reason, count(*) from {quarantine_table} where quarantined_at = ? group by reason "
            "order by count(*) desc", [now]
        ).fetchall())
        recent = frame(connection.sql(
            f"select {recent_columns} from {table} order by ingested_at desc, source_file desc, line_number desc "
            f"limit {limit}"
        ))
        quarantined = frame(connection.sql(
            f"select source_file, line_number, reason, detail from {quarantine_table} where quarantined_at = ? "
            f"order by source_file, line_number limit {limit * 2}", params=[now]
        ))
    return TableOverview(total_rows, total_quarantined, by_reason, recent, quarantined)


@dataclass(frozen=True)
class LandingHealth:
    changed_files: int  # rewritten after ingestion (table changed_files)
    unreadable_files: int  # ingested_files with status 'unreadable'
    # Rows ingested this run whose event_id another raw_events row holds too; 0 unless the ledger is broken.
    repeated_event_ids: int


def landing_health(warehouse: Warehouse, *, now: datetime) -> LandingHealth:
    """Counts the run's own rows against the table (a join built on this run's rows), not every event_id in
    history: an hourly run stays in proportion to its hour, and a repeat is caught by the run that made it.
    raw_events is append-only, so a smaller rowid is an earlier row: the kept one. An earlier row with the same
    event_id has the same hash, so only the loads raw_event_id_hashes names for this run's hashes are read (this run's
    own among them), as sql/line_verdicts.sql reads them; all of raw_events when the hashes do not cover it."""
    with warehouse.connect() as connection:
        loads = """
            and other.load_id in (
                select load_id from raw_event_id_hashes
                semi join (select event_id_hash(event_id) as id_hash from this_run) as run using (id_hash))
        """ if event_id_hashes_cover(connection) else ""
        return LandingHealth(*connection.execute(f"""
            with this_run as materialized (
                select event_id, rowid as row from raw_events where ingested_at = $now
            )
            select
                (select count(*) from changed_files),
                (select count(*) from ingested_files where status = 'unreadable'),
                (select count(*)
                 from this_run
                 join raw_events as other using (event_id)
                 where other.rowid < this_run.row{loads})  -- kept first, so this one repeats it
        """, {"now": now}).fetchone())
