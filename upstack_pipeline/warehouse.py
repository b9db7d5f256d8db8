"""Access to the DuckDB warehouse: connections (held for a whole run), the schema and its upgrades, and the SQL kept
in `sql/`.

DuckDB lets one process hold the file for writing at a time. A run's steps run one after another in its process,
which holds the file from the run's start to its end (`Warehouse.held_open`), and the run queue allows one run per
shop at a time; but a notebook, a second `upstack sync` or the UI's launched run can still hold the lock for a
while, so opening a connection waits for the lock (with backoff) instead of failing the run on the first
collision.

Schema versions. A warehouse outlives releases: it holds the history identity resolution reads and the record of
what Klaviyo was sent, so a new release must keep it, never ask for a new file. The table
`warehouse_schema_version` says which schema the file has (one row per step that brought it there).

- `sql/warehouse.sql` is the whole current schema. An empty file gets it and is stamped `SCHEMA_VERSION`.
- `sql/migrations/NNNN_<what>.sql` moves a warehouse from version NNNN - 1 to NNNN. A file that is behind gets
  the migrations it lacks, all in one transaction with their version rows: an upgrade either completes or leaves
  the file exactly as the older release left it, so that release can still open it.
- Version 1 is the schema of the first release (commit 16a0543), which recorded no version: a file with our tables
  but no version table is taken as version 1 and gets every migration. Unreleased commits between that release
  and versioning changed the schema in place too, so the migrations written for those changes (0002) are
  idempotent (`add column if not exists`, `create or replace view`): they meet such files halfway done. Later
  migrations only ever run on files whose version says exactly what they hold.
- A file newer than this release is refused (`WarehouseTooNewError`): this release's SQL could misread it or
  write rows the newer schema does not expect.

A release that changes the schema edits `sql/warehouse.sql` and adds the next migration, which makes the same
change to an existing file (a new column goes last in its table in warehouse.sql, where `alter table ... add
column` puts it). `tests/test_warehouse_migrations.py` upgrades a first-release warehouse and checks that it ends
with the schema of a new one.

Opening a read-write connection costs two catalog queries when the file is current, and a look at whether its
checkpoints may vacuum (`apply_vacuum_hold`); it writes nothing. It attaches the file with the row group size the
pipeline writes (`ROW_GROUP_ROWS`), in DuckDB's in-memory database of the process's instance for that file. A
read-only connection never migrates: a file that is behind is read as it is; a newer one is refused there too.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import duckdb
import polars as pl

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"

VERSION_TABLE = "warehouse_schema_version"
BASELINE_VERSION = 1  # the first release's schema, which has no migration file: it predates them
# A table every warehouse from before versioning has: with it and no version table, a file is at version 1.
PRE_VERSIONING_MARKER = "raw_events"

_VERSION_TABLE_DDL = f"""
-- One row per step that brought the file to its schema version, and when.
create table if not exists {VERSION_TABLE} (
    version     integer primary key,
    applied_at  timestamptz not null,
    description varchar not null  -- 'new warehouse', the migration file, or how a pre-versioning file was taken
)"""

log = logging.getLogger(__name__)

# The rows of a row group a read-write connection writes (DuckDB's default is 122,880). DuckDB commits a
# transaction's new rows of a table one of two ways: once they fill a row group, it keeps the row groups its
# statements already wrote, compressed, on every core; fewer are copied into the table at the commit and compressed
# again by its checkpoint, on one core. A day's 75,000 raw events at `bench/scale.py --scale 3` cost 0.45 s of the
# ingestion's commit that way, against 0.02 s merged (and 0.3 s less of CPU in all). A quarter of DuckDB's size
# makes a day's or a few hours' events a bulk append; a smaller one would grow the file further (this one grew the
# full sync's warehouse by a tenth). DuckDB keeps no row group size in the file: each read-write connection
# attaches the file with it (`Warehouse._attach_for_writing`); other tools' writes use DuckDB's.
ROW_GROUP_ROWS = 30_720


class WarehouseError(RuntimeError):
    """A warehouse problem the person running the pipeline must act on; the message says what to do."""


class WarehouseBusyError(WarehouseError):
    """Another process kept the warehouse file locked for longer than we were willing to wait."""


class WarehouseTooNewError(WarehouseError):
    """The warehouse was written by a newer release of upstack-flows than this one."""


class WarehouseOutOfMemoryError(WarehouseError):
    """DuckDB needed more memory than it may use; the step's open transaction was rolled back."""


class WarehouseMigrationError(WarehouseError):
    """A migration failed; the transaction was rolled back and the file kept its previous version."""


@dataclass(frozen=True)
class Migration:
    version: int  # the version the warehouse has after it
    name: str     # the file name, recorded in the version table
    sql: str


def read_sql(name: str) -> str:
    """The text of `sql/<name>.sql`."""
    return (SQL_DIR / f"{name}.sql").read_text()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> tuple[Migration, ...]:
    """The migrations in `directory`, in order. Their numbers must run 2, 3, ... without a gap or a repeat: a
    misnumbered file would silently skip or re-run a step on someone's warehouse, so it fails loudly here."""
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = re.fullmatch(r"(\d{4})_[a-z0-9_]+\.sql", path.name)
        if not match:
            raise RuntimeError(f"{path}: a migration is named NNNN_<what>.sql (lower case, digits, underscores)")
        migrations.append(Migration(int(match.group(1)), path.name, path.read_text()))
    expected = list(range(BASELINE_VERSION + 1, BASELINE_VERSION + 1 + len(migrations)))
    if [migration.version for migration in migrations] != expected:
        raise RuntimeError(f"the migrations in {directory} must be numbered {expected} in order, found "
                           f"{[migration.name for migration in migrations]}")
    return tuple(migrations)


MIGRATIONS = load_migrations()
SCHEMA_VERSION = MIGRATIONS[-1].version if MIGRATIONS else BASELINE_VERSION  # what this release creates and knows


def schema_version(connection: duckdb.DuckDBPyConnection) -> int | None:
    """The schema version of the open file: None when it has none of our tables yet, `BASELINE_VERSION` when it
    is from before versioning."""
    tables = {name for (name,) in connection.execute(
        "select table_name from duckdb_tables() where database_name = current_database() and schema_name = 'main'"
    ).fetchall()}
    if VERSION_TABLE in tables:
        version = connection.execute(f"select max(version) from {VERSION_TABLE}").fetchone()[0]
        if version is not None:
            return version
    return BASELINE_VERSION if PRE_VERSIONING_MARKER in tables else None


# pipeline_state's row (fingerprint 'hold' or 'vacuum') saying whether checkpoints may vacuum: a checkpoint's vacuum
# merges the partly filled row groups of every table, whichever table the connection wrote, so raw_events' tail of
# small appends is merged (rewritten) by the next checkpoint of any stage. Ingestion decides when that merge is worth
# its cost (upstack_pipeline.ingestion.decide_vacuum) and every read-write connection follows its word. The row's
# overview is the tail the last decision recorded (ingestion.RawEventsTail), from which the next runs bound it.
VACUUM_STAGE = "checkpoint_vacuum"


def apply_vacuum_hold(connection: duckdb.DuckDBPyConnection) -> None:
    """The connection's checkpoints vacuum unless ingestion last said to hold (max_vacuum_tasks is a setting of the
    whole database instance, so it is set either way: another connection of this process may have held it)."""
    row = connection.execute("select fingerprint from pipeline_state where stage = ?", [VACUUM_STAGE]).fetchone()
    connection.execute("set max_vacuum_tasks = 0" if row and row[0] == "hold" else "reset max_vacuum_tasks")


def cursor_on_same_database(connection: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A cursor of `connection` whose unqualified names mean the same database's tables: a cursor starts in its
    instance's default database, not the one its connection USEs (a read-write connection's instance has the
    warehouse attached: `Warehouse._attach_for_writing`)."""
    database = connection.execute("select current_database()").fetchone()[0]
    cursor = connection.cursor()
    try:
        cursor.execute(f'use "{database}"')
    except BaseException:
        cursor.close()
        raise
    return cursor


@contextmanager
def transaction(connection: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Commits the block's statements, or rolls them back when it raises. A failed statement leaves the transaction
    aborted, and DuckDB then refuses further statements: without a rollback, whatever the caller runs next (a
    `finally` resetting a setting) fails in its turn and hides the error that matters. (A COMMIT of an aborted
    transaction is accepted and writes nothing: a block must not catch a DuckDB error and carry on.) A commit that
    fails has ended the transaction itself, so it is left out of the rollback."""
    connection.begin()
    try:
        yield
    except BaseException:
        connection.rollback()
        raise
    connection.commit()


def _pool_blocks(connection: duckdb.DuckDBPyConnection) -> None:
    """Lets DuckDB keep the memory of the blocks it frees (its buffers: row groups being written, hash tables,
    sorts) for its next blocks, up to its memory limit, instead of handing it back to the system and faulting fresh
    pages in again: a full sync of 1.85 million events took a third fewer page faults, and its identity 0.6-0.9 s
    less. On by default: DuckDB's default limit (80% of the machine's memory) is also the most it lets the pool
    reserve. A limit set above that leaves the pool off, and DuckDB's allocator serves every block as it does
    without one. The pool only ever grows: the process keeps up to its peak of buffers resident until its last
    connection to the warehouse closes (a sync holds one for its whole run); DuckDB's memory limit still bounds
    what it holds."""
    try:
        connection.execute("set block_allocator_memory = current_setting('memory_limit')")
    except duckdb.InvalidInputException:
        pass


def _is_lock_conflict(error: duckdb.Error) -> bool:
    return "lock" in str(error).lower()


class Warehouse:
    def __init__(self, path: Path, *, lock_timeout_seconds: float = 600.0, memory_limit: str | None = None,
                 temp_directory: Path | None = None, migrations: Sequence[Migration] = MIGRATIONS):
        """`memory_limit` ('4GB') and `temp_directory` bound what DuckDB holds in memory and say where it spills
        the rest (None: DuckDB's defaults, 80% of RAM and `<file>.tmp`). `migrations` are this release's; tests
        pass others to see a failing one roll back."""
        self.path = Path(path)
        self.lock_timeout_seconds = lock_timeout_seconds
        self.config = {key: str(value) for key, value in
                       (("memory_limit", memory_limit), ("temp_directory", temp_directory)) if value}
        self.migrations = tuple(migrations)
        self.latest_version = self.migrations[-1].version if self.migrations else BASELINE_VERSION

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection in UTC; read-write ones see the current schema (a new file is created, an older one
        upgraded in place). Closed, and the file lock released, on exit."""
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = self._open(read_only)
        try:
            connection.execute("set TimeZone = 'UTC'")
            _pool_blocks(connection)
            version = self._check_version(connection)
            if not read_only:
                if version != self.latest_version:
                    self._bring_up_to_date(connection)
                apply_vacuum_hold(connection)
            yield connection
        except duckdb.OutOfMemoryException as error:
            raise WarehouseOutOfMemoryError(
                f"DuckDB ran out of memory on {self.path} ({str(error).splitlines()[0]}). Its limit is "
                f"{self.config.get('memory_limit', '80% of RAM (the default)')}: raise UPSTACK_DUCKDB_MEMORY_LIMIT "
                "(the warehouse resource's memory_limit in a run's config), point UPSTACK_DUCKDB_TEMP_DIR at a disk "
                "with room to spill to, or, when ingestion or identity ran out, give it less at a time "
                "(UPSTACK_INGEST_BATCH_BYTES, UPSTACK_IDENTITY_CHUNK_ROWS); then run again: what the step had not "
                "committed was rolled back, and the next run carries on from what it had."
            ) from error
        finally:
            connection.close()

    @contextmanager
    def held_open(self) -> Iterator[None]:
        """Keeps the file open in this process for the block: every read-write `connect` inside it joins that one
        DuckDB database instance (`_attach_for_writing`: the instance named after the file, with the same
        settings) instead of opening the file again. A sync's steps then share a buffer pool instead of each
        reading the file afresh, and their closes no longer each checkpoint: what they commit is as durable in the
        write-ahead log, and is checkpointed when the log passes DuckDB's threshold or when the block ends. (A
        read-only `connect` inside the block is refused: DuckDB opens a file once per process.)"""
        with self.connect():
            yield

    def _attach_for_writing(self) -> duckdb.DuckDBPyConnection:
        """A connection to a database instance of this process named after the file, which has the file attached
        with row groups of ROW_GROUP_ROWS (DuckDB's instance cache: every read-write connection of the process
        joins the one instance, as it does for a file opened by name). The instance is closed, and the file
        checkpointed and its lock released, with its last connection; its temporary files go where DuckDB puts a
        file database's."""
        name = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:32]
        config = {"temp_directory": f"{self.path}.tmp", **self.config}
        connection = duckdb.connect(f":memory:upstack_{name}", config=config)
        try:
            connection.execute(f"attach if not exists ? as warehouse (row_group_size {ROW_GROUP_ROWS})",
                               [str(self.path)])
            connection.execute("use warehouse")
        except BaseException:
            connection.close()
            raise
        return connection

    def _check_version(self, connection: duckdb.DuckDBPyConnection) -> int | None:
        version = schema_version(connection)
        if version is not None and version > self.latest_version:
            raise WarehouseTooNewError(
                f"The warehouse {self.path} has schema version {version}, but this release of upstack-flows "
                f"knows versions up to {self.latest_version}: a newer release has upgraded it, and this one could "
                "misread it or damage it, so it leaves the file untouched. Upgrade upstack-flows to the release "
                "that wrote it (or a later one), or set UPSTACK_WAREHOUSE to another warehouse file."
            )
        return version

    def _bring_up_to_date(self, connection: duckdb.DuckDBPyConnection) -> None:
        """Creates the schema in an empty file, or runs the migrations an older file lacks: in one transaction,
        so a failed or killed upgrade leaves the file as it was."""
        with transaction(connection):
            # Read again inside the transaction: another connection of this process may have just done the work.
            version = self._check_version(connection)
            if version is None:
                self._create(connection)
            elif version < self.latest_version:
                self._migrate(connection, version)

    def _create(self, connection: duckdb.DuckDBPyConnection) -> None:
        connection.execute(_VERSION_TABLE_DDL)
        connection.execute(read_sql("warehouse"))
        self._record(connection, self.latest_version, "new warehouse")

    def _migrate(self, connection: duckdb.DuckDBPyConnection, found: int) -> None:
        connection.execute(_VERSION_TABLE_DDL)
        if found == BASELINE_VERSION:  # say how a file without a version was taken (unless its table says 1)
            connection.execute(f"insert or ignore into {VERSION_TABLE} values (?, now(), ?)",
                               [BASELINE_VERSION, "found without a version: taken as the first release's schema"])
        pending = [migration for migration in self.migrations if migration.version > found]
        for migration in pending:
            try:
                connection.execute(migration.sql)
            except duckdb.OutOfMemoryException:
                raise  # not the migration's fault: Warehouse.connect says which settings to change
            except duckdb.Error as error:
                raise WarehouseMigrationError(
                    f"Upgrading the warehouse {self.path} from schema version {found} to {self.latest_version} "
                    f"failed in sql/migrations/{migration.name}: {error}. Nothing was changed: the file is still at "
                    f"version {found}, which the release that wrote it can still open. This is a bug in upstack-flows: "
                    "report it with this message."
                ) from error
            self._record(connection, migration.version, migration.name)
        log.info("Upgraded the warehouse %s from schema version %s to %s (%s)", self.path, found,
                 self.latest_version, ", ".join(migration.name for migration in pending))

    @staticmethod
    def _record(connection: duckdb.DuckDBPyConnection, version: int, description: str) -> None:
        connection.execute(f"insert into {VERSION_TABLE} values (?, now(), ?)", [version, description])

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout_seconds
        delay = 0.05
        while True:
            try:
                if read_only:
                    return duckdb.connect(str(self.path), read_only=True, config=self.config)
                return self._attach_for_writing()
            except (duckdb.IOException, duckdb.ConnectionException) as error:
                if not _is_lock_conflict(error) or time.monotonic() >= deadline:
                    if _is_lock_conflict(error):
                        raise WarehouseBusyError(
                            f"The warehouse {self.path} stayed locked by another process for "
                            f"{self.lock_timeout_seconds:.0f} s. Close notebooks or DuckDB shells that have it "
                            "open for writing, or wait for the running sync to finish, then run again."
                        ) from error
                    if "not a valid DuckDB database file" in str(error):
                        raise WarehouseError(
                            f"{self.path} is not a DuckDB warehouse (another file under that name, or a broken "
                            "copy). Point UPSTACK_WAREHOUSE (or the shop's `warehouse` in the shops file) at the "
                            "warehouse, or move this file away to start a new one."
                        ) from error
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)


@dataclass(frozen=True)
class ColumnDoc:
    name: str
    type: str  # as DuckDB names it, e.g. VARCHAR, TIMESTAMP WITH TIME ZONE, STRUCT(...)
    nullable: bool
    description: str | None


@dataclass(frozen=True)
class TableDoc:
    name: str
    description: str
    columns: tuple[ColumnDoc, ...]


def new_schema_ddl() -> str:
    """What a new warehouse file is created with: the version table and `sql/warehouse.sql`."""
    return _VERSION_TABLE_DDL + ";\n" + read_sql("warehouse")


def table_docs() -> dict[str, TableDoc]:
    """The tables of a new warehouse, with their columns as DuckDB creates them from the DDL (`sql/warehouse.sql`
    and the version table's), described by that DDL's comments: the comment lines just above `create table` describe
    the table; a comment after a column (continued on the lines below it, in the same place) or the comment lines
    just above it describe the column. Views are left out: they are the pipeline's own."""
    ddl = new_schema_ddl()
    with duckdb.connect() as connection:
        connection.execute(ddl)
        columns = connection.execute("""
            select table_name, column_name, data_type, is_nullable
            from duckdb_columns() join duckdb_tables() using (database_name, schema_name, table_name)
            where schema_name = 'main' order by table_name, column_index""").fetchall()
    described: dict[str, tuple[str, dict[str, str]]] = {}
    above: list[str] = []  # the comment lines since the last line of code
    table, depth, continued, column_comment_at = None, 0, None, -1
    for line in ddl.splitlines():
        code, _, comment = line.partition("--")
        code, comment = code.strip(), comment.strip()
        if not code:
            if comment and table and continued and line.index("--") == column_comment_at:
                described[table][1][continued] += " " + comment
            else:
                above, continued = ([*above, comment] if comment else []), None
            continue
        if table is None:
            if match := re.match(r"create table if not exists (\w+)", code):
                table, depth = match.group(1), code.count("(") - code.count(")")
                described[table] = (" ".join(above), {})
            above = []
            continue
        if depth == 1 and (match := re.match(r"(\w+)\s", code)) and match.group(1) not in ("primary", "unique"):
            described[table][1][match.group(1)] = " ".join([*above, comment]).strip()
            continued, column_comment_at = (match.group(1), line.index("--")) if comment else (None, -1)
        above = []
        depth += code.count("(") - code.count(")")
        if depth <= 0:
            table = None
    docs: dict[str, TableDoc] = {}
    for name, column, data_type, nullable in columns:
        description, column_comments = described[name]
        column_doc = ColumnDoc(column, data_type, nullable, column_comments.get(column) or None)
        docs[name] = TableDoc(name, description, (*(docs[name].columns if name in docs else ()), column_doc))
    return docs


def event_id_hashes_cover(connection: duckdb.DuckDBPyConnection) -> bool:
    """Whether raw_event_id_hashes has as many rows as raw_events, as ingestion writes them (a row each): DuckDB counts
    both from its metadata, without a scan. They differ only after rows were added to raw_events by hand; other hand
    edits of its event ids or loads need the hashes deleted (sql/warehouse.sql says so)."""
    return connection.execute(
        "select (select count(*) from raw_events) = (select count(*) from raw_event_id_hashes)").fetchone()[0]


def frame(relation: duckdb.DuckDBPyRelation) -> pl.DataFrame:
    """A query's rows as a polars frame, read through the Arrow C stream interface: the relation's own `.pl()`
    imports pyarrow (0.06-0.1 s), a fixed cost of every run that shows an operator a preview."""
    return pl.DataFrame(relation)


def set_variables(connection: duckdb.DuckDBPyConnection, variables: dict) -> None:
    """DuckDB session variables for the SQL files of a stage (read there with getvariable): unlike prepared
    parameters they reach every statement of a multi-statement file."""
    for name, value in variables.items():
        if isinstance(value, dict):  # a MAP, looked up with getvariable(name)[key]
            connection.execute(f"set variable {name} = map(?::varchar[], ?::varchar[])",
                               [list(value), list(value.values())])
        else:
            connection.execute(f"set variable {name} = ?", [value])
