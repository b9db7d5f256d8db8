"""What analysts and marketers read: views over the warehouse, and the one lift every surface reports.

The views (`sql/<view>.sql`) are the pipeline's, recreated at the end of every sync so they always match this
release's tables: `daily_lift` (the one definition of lift), `delivery_funnel`, `match_rates`, `recovered_orders`
and `shopper_journey` (one row per commerce event, the story `upstack trace` tells); the first three are sums of
rows per session (`daily_lift_sessions`, `delivery_funnel_sessions`, `match_rates_sessions`). Each file's header
says what a row is and what each column means; the UI's catalog, the README and `view_docs()` read it there.

`lift_totals` is the lift of `daily_lift` summed over days: the sync summary, the asset metadata and
`upstack evaluate` print it, so no surface computes a lift of its own.

Analysts never hold the warehouse: `publish_for_analysts` copies the views' rows into a small separate file after
each sync, swapped in whole, so a notebook left open on it never blocks the pipeline (DuckDB lets one process
write a file, and a reader holds it too).

Every published view's rows are keyed by a UTC day, and each is computed from rows that depend only on the events
of one session: the sessions' rows (`*_sessions`, kept beside the copy keyed by a hash of the session id, see
`session_rows_path`) and recovered_orders' own rows, one per order. So a sync recomputes only the sessions it
changed: those that got new raw events or whose rows in the event tables the views read changed (by a digest per
session the copy keeps in `published_sessions`, with each session's days in `published_session_days`). The
sessions to digest again are those of the rows identity, mapping and delivery stamped since the copy (each stamps
its run's time), and the tables' totals must agree, or every session is digested. It runs the views' own SQL over
those sessions' events (temp tables of the same names shadow the warehouse's on one cursor), puts their rows in
place of their previous ones, and sums again the days they touched (and the days of new quarantine) into a file
copy of the previous copy, with the record of sessions changed. Nothing touched, the copy stays as it is. A copy
that is missing, from another release, or from other views or metrics is computed again over the whole history.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path

import duckdb

from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import (
    ColumnDoc,
    TableDoc,
    cursor_on_same_database,
    new_schema_ddl,
    read_sql,
    schema_version,
    transaction,
)

# In the order they are created: each after the views it reads (daily_lift reads recovered_orders too).
VIEWS = ("recovered_orders", "daily_lift_sessions", "daily_lift", "delivery_funnel_sessions", "delivery_funnel",
         "match_rates_sessions", "match_rates", "shopper_journey")
# What the analysts' copy holds for analysts. shopper_journey stays in the warehouse: a row per event with its raw
# line and the payloads sent (emails, names) is too big and too personal to copy after every sync; `upstack trace`
# and `upstack sql --warehouse` read it there.
PUBLISHED_VIEWS = ("recovered_orders", "daily_lift", "delivery_funnel", "match_rates")
# The rows per session three published views sum: kept beside the copy (`session_rows_path`), with session_key (a
# hash of the session id, as published_sessions has it) in place of session_id, so a sync recomputes only the
# sessions it changed.
SESSION_VIEWS = ("daily_lift_sessions", "delivery_funnel_sessions", "match_rates_sessions")
# The metric whose lift is the headline: abandoned carts, what backup flows exist for first.
HEADLINE_METRIC = "Added to Cart"
# The tables the published views read by event (raw_events and resolved_events by event_id, the outbox and the
# skip records by their event_id). A day's rows are computed from a slice of them, the events of the day's sessions.
# raw_events only grows, in loads (ingested_files.load_id); the others change in place, so a digest per session
# finds the sessions that changed. Slices and digests carry only the columns the published views name (`_read_columns`):
# identity rewrites a person's phone and browser cluster on every event of theirs, in days long gone, and no
# published view reads either; nor the line as received, the costliest column to read.
EVENT_SOURCES = ("raw_events", "resolved_events", "klaviyo_outbox", "klaviyo_skipped")
# Read whole by the published views: quarantine only grows, in loads too, and stays small; commerce_metrics is the
# settings' (its rows are in the digest of the views: a change recomputes everything).
WHOLE_SOURCES = ("quarantined_events", "commerce_metrics")
# The changing event tables, and the time their writers stamp on every row they write (identity's run, mapping's,
# delivery's claims and settlements): where to look first for what changed since the copy.
STAMPS = {"resolved_events": "resolved_at", "klaviyo_skipped": "skipped_at",
          "klaviyo_outbox": "greatest(created_at, claimed_at, delivered_at)"}
SESSION_TABLES = ("resolved", "skipped", "outbox")  # their columns in the per-session digests, in that order
# The layout of the copy's own record (published, published_sessions, published_session_days) and of the rows per
# session beside it (which name the copy's sources they match): a copy of another layout is computed again whole.
COPY_FORMAT = 2
# At most this many runs of consecutive days in a day filter (`_on_their_days`).
MAX_DAY_RUNS = 16


def create_views(connection: duckdb.DuckDBPyConnection) -> None:
    """Each view, with its description as its DuckDB comment, so analysts see it in duckdb_views() too."""
    for view in VIEWS:
        sql = read_sql(view)
        connection.execute(sql)
        description = _header(sql)[0].replace("'", "''")  # a COMMENT takes a literal, not a parameter
        connection.execute(f"comment on view {view} is '{description}'")


def ensure_views(connection: duckdb.DuckDBPyConnection) -> None:
    """`create_views` unless the warehouse holds them as this release and schema define them already: recreating
    them writes the catalog, which costs a checkpoint of the warehouse on every sync. The views' SQL, the schema
    version and DuckDB's version are recorded in pipeline_state (stage `analytics_views`) when they are created."""
    fingerprint = hashlib.sha256(repr(([read_sql(view) for view in VIEWS], schema_version(connection),
                                       duckdb.__version__)).encode()).hexdigest()
    found = connection.execute("""
        select (select fingerprint from pipeline_state where stage = 'analytics_views'),
               (select count(*) from duckdb_views()
                where database_name = current_database() and schema_name = 'main' and view_name in ?)""",
                               [list(VIEWS)]).fetchone()
    if found == (fingerprint, len(VIEWS)):
        return
    create_views(connection)
    connection.execute("""
        insert or replace into pipeline_state (stage, load_id, updated_at, fingerprint)
        select 'analytics_views', coalesce(max(load_id), 0), now(), ? from ingested_files""", [fingerprint])


def view_docs() -> dict[str, TableDoc]:
    """Each view described by its file's header: the prose above the column lines describes the view, and a line
    `-- column: text` (continued on the lines below it) describes a column. Columns and types are DuckDB's, from
    the views created on an empty warehouse."""
    with duckdb.connect() as connection:
        connection.execute(new_schema_ddl())
        create_views(connection)
        found = connection.execute("""
            select table_name, column_name, data_type, is_nullable from duckdb_columns()
            where table_name in ? order by table_name, column_index""", [list(VIEWS)]).fetchall()
    docs = {}
    for view in VIEWS:
        description, columns = _header(read_sql(view))
        docs[view] = TableDoc(view, description, tuple(ColumnDoc(name, data_type, nullable, columns.get(name))
                                                       for table, name, data_type, nullable in found if table == view))
    return docs


def _header(sql: str) -> tuple[str, dict[str, str]]:
    prose: list[str] = []
    columns: dict[str, str] = {}
    current = None
    for line in sql.splitlines():
        if not line.startswith("--"):
            break
        text = line[2:].strip()
        if match := re.fullmatch(r"(\w+): (.+)", text):
            current = match.group(1)
            columns[current] = match.group(2)
        elif current and text:
            columns[current] += " " + text
        elif text:
            prose.append(text)
    return " ".join(prose), columns


@dataclass(frozen=True)
class LiftTotals:
    """`daily_lift` of one metric summed over a span of days."""

    metric: str
    abandoned_sessions: int
    klaviyo_native_sessions: int
    upstack_identified_sessions: int
    upstack_delivered_sessions: int
    upstack_refused_sessions: int
    cart_value_reached: float
    recovered_orders: int
    recovered_revenue: float

    @property
    def lift(self) -> float:
        """Sessions only the backup flow reaches per session the native flow reaches (0.012 is 1.2%)."""
        return self.upstack_delivered_sessions / self.klaviyo_native_sessions if self.klaviyo_native_sessions else 0.0

    def sentence(self) -> str:
        sessions = "session" if self.upstack_delivered_sessions == 1 else "sessions"
        return (f"lift {self.lift:.1%} ({self.upstack_delivered_sessions:,} abandoned {self.metric} {sessions} only "
                f"Upstack reached / {self.klaviyo_native_sessions:,} Klaviyo reaches itself)")


def lift_totals(connection: duckdb.DuckDBPyConnection, *, metric: str = HEADLINE_METRIC,
                since: date | None = None, until: date | None = None) -> LiftTotals:
    """`daily_lift` of `metric` from day `since` to day `until`, both included (open when None)."""
    row = connection.execute("""
        select coalesce(sum(abandoned_sessions), 0), coalesce(sum(klaviyo_native_sessions), 0),
               coalesce(sum(upstack_identified_sessions), 0), coalesce(sum(upstack_delivered_sessions), 0),
               coalesce(sum(upstack_refused_sessions), 0), coalesce(sum(cart_value_reached), 0),
               coalesce(sum(recovered_orders), 0), coalesce(sum(recovered_revenue), 0)
        from daily_lift
        where metric = $metric and ($since is null or day >= $since) and ($until is null or day <= $until)""",
                             {"metric": metric, "since": since, "until": until}).fetchall()[0]
    return LiftTotals(metric, *(int(value) for value in row[:5]), float(row[5]), int(row[6]), float(row[7]))


def publish_for_analysts(connection: duckdb.DuckDBPyConnection, warehouse_path: Path, *, now: datetime) -> Path:
    """Writes the views' rows (and commerce_metrics) to `<warehouse>.analytics.duckdb`, built aside and renamed
    over the previous one: a reader of the old file keeps reading it, and never sees half a file. Only the sessions
    the warehouse changed since the previous copy are computed again, and the days they touched summed again into a
    file copy of the previous copy (see the module's docstring)."""
    target = analytics_path(warehouse_path)
    building = target.with_name(target.name + ".building")
    cursor = cursor_on_same_database(connection)  # its temp tables and views, shadowing the warehouse's, go with it
    try:
        sources = _sources(cursor)
        stale = _find_stale(cursor, target, sources)
        try:
            if stale.days is not None and not stale.days:
                return target
            with _session_rows_attached(cursor, session_rows_path(warehouse_path)):
                if stale.days is not None and not _session_rows_match_previous(cursor):
                    # Rows per session of another copy (a sync stopped between writing them and renaming the copy,
                    # or their file removed): computed whole again.
                    _drop_slices(cursor)
                    stale = replace(stale, days=None)
                _write_session_rows(cursor, stale, sources)
                building.unlink(missing_ok=True)
                if stale.days is not None:
                    shutil.copyfile(target, building)  # a file copy: what the sync did not touch is not rewritten
                with _attached(cursor, building, "analytics"):
                    _write_copy(cursor, stale, sources, now, warehouse_path)
        finally:
            if stale.previous:
                cursor.execute("detach previous")
    finally:
        cursor.close()
    os.replace(building, target)
    return target


def stale_days(connection: duckdb.DuckDBPyConnection, copy_path: Path) -> set[date] | None:
    """The days of the copy at `copy_path` that the warehouse's rows have made stale; None: every day."""
    with cursor_on_same_database(connection) as cursor:
        stale = _find_stale(cursor, copy_path, _sources(cursor))
        if stale.previous:
            cursor.execute("detach previous")
        return stale.days


@dataclass(frozen=True)
class _Stale:
    """What a sync recomputes: the rows of the changed sessions and `days` (None: every session and day), and
    whether the previous copy is attached as `previous` and is one to update (this release's, of the same views
    and metrics). The copy's record of sessions is then updated by session (`candidate_sessions` replaced by
    `candidate_digests`, `new_session_days` added) unless `session_digests` and `session_days` hold all of it."""

    days: set[date] | None
    previous: bool = False
    digests_whole: bool = True
    days_whole: bool = True


def _sources(cursor: duckdb.DuckDBPyConnection) -> dict:
    """What the copy's rows are computed from: the views' SQL and commerce_metrics (a digest of both, of the copy's
    format, and of DuckDB's version, whose hash() keys the sessions), the last load of raw events and quarantine,
    each changing event table's rows and the sum of their hashes (of the columns the views name), and the latest
    time its writer stamped on a row."""
    metrics = cursor.execute("select * from commerce_metrics order by event_name").fetchall()
    views = hashlib.sha256(repr(([read_sql(view) for view in VIEWS], metrics, COPY_FORMAT, duckdb.__version__))
                           .encode()).hexdigest()
    load_id = cursor.execute("select coalesce(max(load_id), 0) from ingested_files").fetchone()[0]
    read = _read_columns(cursor, named=False)
    found = cursor.execute("select " + ", ".join(
        f"(select [count(*)::hugeint, coalesce(sum(hash({read[table]})::hugeint), 0), epoch_us(max({stamp}))] "
        f"from {table})" for table, stamp in STAMPS.items())).fetchone()
    return {"views": views, "load_id": load_id,
            "tables": {table: [int(rows), int(total)] for table, (rows, total, _) in zip(STAMPS, found)},
            "stamps": {table: stamp for table, (_, _, stamp) in zip(STAMPS, found)}}


def _digest_sessions(cursor: duckdb.DuckDBPyConnection, into: str) -> None:
    """`into` on `cursor`: per session, the rows of each changing event table about its events and the sum of
    their hashes (of the columns the views name). Sums add up: a table's sessions sum to the table's total in
    `_sources`, which is how a copy built from a few sessions' digests is checked against the whole tables."""
    read = _read_columns(cursor, named=False)
    # Each event's rows in one pass, under the session of its resolved_events row (an order's outbox rows, one per
    # line, summed first). A row whose event is not in resolved_events has no session (null), which no slice can
    # recompute: its change recomputes everything. Sessions are keyed by a hash of their id, which keeps the copy's
    # record small: two sessions sharing a key are only ever recomputed together.
    cursor.execute(f"""
        create temp table {into} as
        select if(resolved.session_id is null, null, hash(resolved.session_id)) as session_key,
               count(resolved.row_hash)::hugeint as resolved_rows,
               coalesce(sum(resolved.row_hash::hugeint), 0) as resolved_sum,
               count(skipped.row_hash)::hugeint as skipped_rows,
               coalesce(sum(skipped.row_hash::hugeint), 0) as skipped_sum,
               coalesce(sum(outbox.rows), 0)::hugeint as outbox_rows,
               coalesce(sum(outbox.row_hash), 0)::hugeint as outbox_sum
        from (select event_id, session_id, hash({read['resolved_events']}) as row_hash from resolved_events)
            as resolved
        full join (select event_id, hash({read['klaviyo_skipped']}) as row_hash from klaviyo_skipped) as skipped
            using (event_id)
        full join (select event_id, count(*) as rows, sum(hash({read['klaviyo_outbox']})::hugeint) as row_hash
                   from klaviyo_outbox group by event_id) as outbox
            using (event_id)
        group by all""")


def _unchanged(previous: dict, sources: dict) -> bool:
    """No published row can differ: same views and metrics, no new load, the same rows (by their sums). The stamps
    may have moved (a row rewritten with the same values the views read)."""
    return all(previous.get(key) == sources[key] for key in ("views", "load_id", "tables"))


def _find_stale(cursor: duckdb.DuckDBPyConnection, copy_path: Path, sources: dict) -> _Stale:
    """The days of the copy at `copy_path` whose rows may differ now: every day of a session whose rows changed or
    that got new raw events, and the days of new quarantine; None: every day (no copy, or one from other views or
    metrics, a later load, or another release; or most sessions' days changed anyway). Leaves them in
    `touched_days` on `cursor`, the changed sessions in `changed_sessions`, and the copy's new record of
    sessions."""
    previous = _attach_previous(cursor, copy_path)
    if previous is not None and _unchanged(previous, sources):
        cursor.execute("detach previous")
        return _Stale(set())
    if previous is not None and (previous["views"] != sources["views"] or previous["load_id"] > sources["load_id"]):
        cursor.execute("detach previous")
        previous = None
    if previous is None:
        _digest_sessions(cursor, "session_digests")
        _every_session_day(cursor)
        return _Stale(None)
    try:
        # raw_events only grows, in loads: the new loads' sessions are changed, and their days the only new ones.
        cursor.execute(f"""
            create temp table new_session_days as
            select distinct hash(session_id) as session_key, (event_time at time zone 'UTC')::date as day
            from {_warehouse_table(cursor, 'raw_events')} where load_id > ?""", [previous["load_id"]])
        cursor.execute("""
            create temp view session_days_now as
            select * from previous.published_session_days union all select * from new_session_days""")
        _new_quarantine_days(cursor, previous["load_id"])
        located = _located_changes(cursor, previous, sources)
        if not located:
            # A change the writers' stamps do not lead to (a row deleted, or written without its stamp): every
            # session's digest against the copy's.
            _digest_sessions(cursor, "session_digests")
            _changed_sessions(cursor, "session_digests", "previous.published_sessions")
            if cursor.execute("select count(*) from changed_sessions where session_key is null").fetchone()[0]:
                _every_session_day(cursor)
                return _Stale(None, previous=True)
        # The changed sessions' days, read from the copy's record once: the days to sum again, how much of the
        # history they are, and the days the slices of their events are read on (`_shadow_with_slice`).
        cursor.execute("""
            create temp table changed_session_days as
            select * from session_days_now semi join changed_sessions using (session_key)""")
        cursor.execute("""
            create temp table touched_days as
            select day from quarantine_days union select day from changed_session_days""")
        days = {day for (day,) in cursor.execute("select day from touched_days").fetchall()}
        # From half the sessions' days on, the slices would be most of the history: computing it whole costs less.
        changed, every = cursor.execute(
            "select (select count(*) from changed_session_days), (select count(*) from session_days_now)").fetchone()
        if 2 * changed >= every:
            _drop_slices(cursor)
            days = None
        return _Stale(days, previous=True, digests_whole=not located, days_whole=False)
    except BaseException:
        cursor.execute("detach previous")
        raise


def _new_quarantine_days(cursor: duckdb.DuckDBPyConnection, load_id: int) -> None:
    """`quarantine_days`: the days delivery_funnel gives the lines quarantined after load `load_id`, by its own
    rules (the view over those lines alone)."""
    cursor.execute("create temp table new_loads as select path from ingested_files where load_id > ?", [load_id])
    cursor.execute(f"""
        create temp view quarantined_events as
        select * from {_warehouse_table(cursor, 'quarantined_events')}
        semi join new_loads on new_loads.path = source_file""")
    cursor.execute(f"create temp view raw_events as select * from {_warehouse_table(cursor, 'raw_events')} limit 0")
    cursor.execute("create temp table quarantine_days as select distinct day from delivery_funnel")
    cursor.execute("drop view temp.main.quarantined_events; drop view temp.main.raw_events")


def _located_changes(cursor: duckdb.DuckDBPyConnection, previous: dict, sources: dict) -> bool:
    """Finds the sessions whose digest changed (`changed_sessions`) and their new digests (`candidate_digests`, of
    the `candidate_sessions`) by digesting again only the sessions of the rows their writers stamped since the copy
    was computed (identity's resolved_at, mapping's skipped_at and created_at, delivery's claimed_at and
    delivered_at, each its run's now) and of the new loads. The stamps only point the way: the copy's per-session
    sums, those sessions' taken out and their new ones put in, must add up to the tables' totals now, or some change
    lies elsewhere (a row deleted, or one written without a stamp, or with a clock set back) and this answers
    False, leaving nothing behind. True leaves the candidates' events too, as the temp tables resolved_events,
    klaviyo_skipped and klaviyo_outbox that the views read next."""
    since = {table: previous["stamps"].get(table) for table in STAMPS}

    def stamped(table: str, columns: str) -> str:
        return (f"select {columns} from {_warehouse_table(cursor, table)} "
                f"where ${table}::bigint is null or {STAMPS[table]} > make_timestamptz(${table}::bigint)")

    # A row identity stamped names its session itself. Only events whose skip or outbox rows were stamped without
    # their resolved_events row (mapping deciding a session identity resolved in an earlier run) are looked up in
    # the whole table: on most runs none, and a join with nothing to look up reads nothing.
    cursor.execute(f"""
        create temp table candidate_sessions as
        with resolved as ({stamped('resolved_events', 'event_id, session_id')}),
        decided as (
            select event_id from ({stamped('klaviyo_skipped', 'event_id')})
            union
            select event_id from ({stamped('klaviyo_outbox', 'event_id')})
            except
            select event_id from resolved)
        select if(session_id is null, null, hash(session_id)) as session_key from resolved
        union
        select if(found.session_id is null, null, hash(found.session_id))
        from decided
        left join {_warehouse_table(cursor, 'resolved_events')} as found using (event_id)
        union
        select session_key from new_session_days""", since)
    if cursor.execute("select count(*) from candidate_sessions where session_key is null").fetchone()[0]:
        cursor.execute("drop table temp.main.candidate_sessions")
        return False
    columns = _read_columns(cursor)
    within, times = _on_their_days(cursor, "candidate_sessions")
    # Their rows' ids first, from the two columns that find them, then their rows by row id: identity rewrites a few
    # events of old days on most runs, so these days may span the history, and every row of them was read with every
    # column the views read (0.065 s of CPU on the scale benchmark's day, against 0.048 s).
    cursor.execute(f"""
        create temp table resolved_events as
        select {columns['resolved_events']} from {_warehouse_table(cursor, 'resolved_events')}
        where rowid in (select rowid from {_warehouse_table(cursor, 'resolved_events')}
                        where {within} and hash(session_id) in (select session_key from candidate_sessions))""", times)
    for table in ("klaviyo_skipped", "klaviyo_outbox"):
        _slice_of_events(cursor, table, columns[table], "resolved_events")
    _digest_sessions(cursor, "candidate_digests")
    sums = ", ".join(f"coalesce(sum({table}_{part}), 0)" for table in SESSION_TABLES for part in ("rows", "sum"))
    negated = ", ".join(f"-{table}_{part} as {table}_{part}" for table in SESSION_TABLES for part in ("rows", "sum"))
    moved = cursor.execute(f"""
        select {sums} from (
            select {negated} from previous.published_sessions semi join candidate_sessions using (session_key)
            union all
            select * exclude (session_key) from candidate_digests)""").fetchone()
    expected = [int(value) for table in STAMPS for value in previous["tables"][table]]
    if [before + change for before, change in zip(expected, moved)] != [
            value for table in STAMPS for value in sources["tables"][table]]:
        cursor.execute("drop table temp.main.candidate_sessions; drop table temp.main.candidate_digests")
        _drop_slices(cursor)
        return False
    _changed_sessions(cursor, "candidate_digests",
                      "(select * from previous.published_sessions semi join candidate_sessions using (session_key))")
    return True


def _changed_sessions(cursor: duckdb.DuckDBPyConnection, current: str, published: str) -> None:
    """`changed_sessions`: the sessions whose digest in `current` is not the one in `published` (either may lack
    it), and the new loads' sessions (whose raw events the digests do not cover)."""
    cursor.execute(f"""
        create temp table changed_sessions as
        select coalesce(current.session_key, published.session_key) as session_key
        from {current} as current
        full join {published} as published on published.session_key is not distinct from current.session_key
        where {_digest_differs('current', 'published')}
        union
        select session_key from new_session_days""")


def _digest_differs(current: str, published: str) -> str:
    """SQL: the session's digest in `current` is not the one in `published` (either may be missing)."""
    columns = [f"{table}_{part}" for table in SESSION_TABLES for part in ("rows", "sum")]
    return (f"[{', '.join(f'{current}.{column}' for column in columns)}] is distinct from "
            f"[{', '.join(f'{published}.{column}' for column in columns)}]")


def _every_session_day(cursor: duckdb.DuckDBPyConnection) -> None:
    """`session_days` on `cursor`: each session's UTC days, from every raw event."""
    cursor.execute(f"""
        create temp table session_days as
        select distinct hash(session_id) as session_key, (event_time at time zone 'UTC')::date as day
        from {_warehouse_table(cursor, 'raw_events')}""")


def _attach_previous(cursor: duckdb.DuckDBPyConnection, copy_path: Path) -> dict | None:
    """What the copy at `copy_path` was computed from, the copy left attached as `previous`; None, and nothing
    attached, when there is no copy, or one this release did not write. An attach to the connection the sync
    holds, not a connection of its own: a new database instance costs more than the few rows read here."""
    if not copy_path.exists():
        return None
    cursor.execute("attach ? as previous (read_only)", [str(copy_path)])
    try:
        if cursor.execute("select 1 from duckdb_tables() "
                          "where database_name = 'previous' and table_name = 'published_sessions'").fetchone():
            return json.loads(cursor.execute("select max(sources) from previous.published").fetchone()[0])
    except BaseException:
        cursor.execute("detach previous")
        raise
    cursor.execute("detach previous")
    return None


def session_rows_path(warehouse_path: Path) -> Path:
    """`<warehouse>.analytics-sessions.duckdb`: the rows per session the published views are summed from. The
    pipeline's own file (no analyst opens it), so a sync updates it in place instead of copying it with the
    analysts' copy: at 19 million events it holds 15 million rows (280 MB), which the copy would be copied with on
    every sync."""
    return warehouse_path.with_name(warehouse_path.stem + ".analytics-sessions.duckdb")


@contextmanager
def _attached(cursor: duckdb.DuckDBPyConnection, path: Path, alias: str, *, read_only: bool = False) -> Iterator[None]:
    """`path` attached to `cursor` as `alias` for the block."""
    cursor.execute(f"attach ? as {alias}" + (" (read_only)" if read_only else ""), [str(path)])
    try:
        yield
    finally:
        cursor.execute(f"detach {alias}")


@contextmanager
def _session_rows_attached(cursor: duckdb.DuckDBPyConnection, path: Path) -> Iterator[None]:
    """`path` attached as `session_rows` for the block; a file DuckDB cannot read is removed first (its rows are
    computed again: they are derived from the warehouse alone)."""
    with ExitStack() as attached:  # only the attach is retried: an error inside the block is the caller's
        try:
            attached.enter_context(_attached(cursor, path, "session_rows"))
        except duckdb.Error as error:
            if isinstance(error, duckdb.IOException) and "Could not set lock on file" in str(error):
                raise RuntimeError(f"{path} is open in another process ({error}). It is the pipeline's own file, "
                                   "not for analysts (they read the analysts' copy): close it there and run again"
                                   ) from error
            for damaged in (path, Path(f"{path}.wal")):
                damaged.unlink(missing_ok=True)
            attached.enter_context(_attached(cursor, path, "session_rows"))
        yield


def _session_rows_match_previous(cursor: duckdb.DuckDBPyConnection) -> bool:
    """The rows per session are those the previous copy (attached as `previous`) was summed from: they record that
    copy's sources."""
    if not cursor.execute("select 1 from duckdb_tables() "
                          "where database_name = 'session_rows' and table_name = 'summed_into'").fetchone():
        return False
    return cursor.execute("select (select sources from session_rows.summed_into) = "
                          "(select max(sources) from previous.published)").fetchone()[0] is True


def _write_session_rows(cursor: duckdb.DuckDBPyConnection, stale: _Stale, sources: dict) -> None:
    """The rows per session: all computed again (`stale.days` None), or the changed sessions' (`changed_sessions`)
    in place of theirs, from slices of their events. In one transaction with the sources of the copy they are about
    to be summed into (`summed_into`): a sync stopped before that copy is renamed leaves rows that match no copy,
    which the next sync computes again whole."""
    whole = stale.days is None
    if not whole:
        _shadow_with_slice(cursor, sliced_already=not stale.digests_whole)
    with transaction(cursor):
        for view in SESSION_VIEWS:
            rows = f"select * exclude (session_id), hash(session_id) as session_key from {view}"
            if whole:
                cursor.execute(f"create or replace table session_rows.{view} as {rows}")
            else:
                cursor.execute(f"delete from session_rows.{view} "
                               f"where session_key in (select session_key from changed_sessions)")
                cursor.execute(f"insert into session_rows.{view} {rows}")
        cursor.execute("create or replace table session_rows.summed_into as select ?::varchar as sources",
                       [json.dumps(sources)])


def _write_copy(cursor: duckdb.DuckDBPyConnection, stale: _Stale, sources: dict, now: datetime,
                warehouse_path: Path) -> None:
    """The copy attached as `analytics` (a file copy of the previous copy when only some days are computed, else a
    new file): the computed days' rows in place of those days', and the record of what they were computed from.
    Every day when `stale.days` is None; else the days the changed sessions and new quarantine touched
    (`touched_days`)."""
    _write_published_views(cursor, whole=stale.days is None)
    _write_record(cursor, stale, sources, now, warehouse_path)


def _write_published_views(cursor: duckdb.DuckDBPyConnection, *, whole: bool) -> None:
    """The published views' rows in the copy: all computed again (`whole`), or those of the touched days, summed
    from the rows per session (`_write_session_rows` put the changed sessions' in)."""
    days = "" if whole else " where day in (select day from touched_days)"
    # From here on, the published views read the rows per session of those days.
    for view in SESSION_VIEWS:
        cursor.execute(f"create temp view {view} as select * from session_rows.{view}{days}")
    # recovered_orders' rows of those days: the copy's, but the changed sessions', which are computed again; in the
    # view's order (sql/recovered_orders.sql). daily_lift reads them.
    cursor.execute("create temp table computed_recovered_orders as select * from recovered_orders" if whole else """
        create temp table computed_recovered_orders as
        select * from (
            select * from analytics.recovered_orders
            where day in (select day from touched_days)
                and hash(session_id) not in (select session_key from changed_sessions)
            union all
            select * from recovered_orders)
        order by day, event_id""")
    cursor.execute("create temp view recovered_orders as select * from computed_recovered_orders")
    for view in PUBLISHED_VIEWS:
        if view != "recovered_orders":
            cursor.execute(f"create temp table computed_{view} as select * from {view}{days}")
    for view in PUBLISHED_VIEWS:
        if whole:
            cursor.execute(f"create or replace table analytics.{view} as select * from computed_{view}")
        else:
            # Days are whole in either part, each part in the view's order: ordered by day, then by the row's
            # place in its part, the copy holds the rows in the order the view gives them.
            cursor.execute(f"""
                create or replace table analytics.{view} as
                select * exclude (place) from (
                    select *, rowid as place from analytics.{view} where day not in (select day from touched_days)
                    union all
                    select *, rowid from computed_{view})
                order by day, place""")


def _write_record(cursor: duckdb.DuckDBPyConnection, stale: _Stale, sources: dict, now: datetime,
                  warehouse_path: Path) -> None:
    """What the copy was computed from (`published`, with commerce_metrics), and its record of sessions."""
    whole = stale.days is None
    cursor.execute("create or replace table analytics.commerce_metrics as select * from commerce_metrics")
    cursor.execute("create or replace table analytics.published (published_at timestamptz, warehouse varchar, "
                   "sources varchar)")
    cursor.execute("insert into analytics.published values (?, ?, ?)",
                   [now, str(warehouse_path), json.dumps(sources)])
    if stale.previous and whole:
        # Every day computed into a new file: the record of sessions is the previous copy's, updated below.
        for table, record_whole in (("published_sessions", stale.digests_whole),
                                    ("published_session_days", stale.days_whole)):
            if not record_whole:
                cursor.execute(f"create table analytics.{table} as select * from previous.{table}")
    if stale.digests_whole:
        cursor.execute("create or replace table analytics.published_sessions as select * from session_digests")
    else:
        cursor.execute("delete from analytics.published_sessions "
                       "where session_key in (select session_key from candidate_sessions)")
        cursor.execute("insert into analytics.published_sessions select * from candidate_digests")
    if stale.days_whole:
        cursor.execute("create or replace table analytics.published_session_days as select * from session_days")
    else:
        cursor.execute("""
            insert into analytics.published_session_days
            select * from new_session_days as new
            anti join analytics.published_session_days as known using (session_key, day)""")


def _warehouse_table(cursor: duckdb.DuckDBPyConnection, name: str) -> str:
    """The warehouse's own table or view, past a temp one of the same name."""
    database = cursor.execute("select current_database()").fetchone()[0]
    return f'"{database}".main.{name}'


def _shadow_with_slice(cursor: duckdb.DuckDBPyConnection, *, sliced_already: bool) -> None:
    """On `cursor`, each event table the views read becomes a temp table of the same name holding only the events
    of the changed sessions (`changed_sessions`): their rows per session depend on those events alone.
    `sliced_already`: all but raw_events are, with the other candidates' events, by `_located_changes`."""
    within, times = _on_their_days(cursor, "changed_sessions", "changed_session_days")
    columns = _read_columns(cursor)
    cursor.execute(f"""
        create temp table raw_events as
        select {columns["raw_events"]} from {_warehouse_table(cursor, "raw_events")}
        where {within} and hash(session_id) in (select session_key from changed_sessions)""", times)
    if sliced_already:
        # The candidates whose digest did not change lie on any day (identity rewrites old events with the same
        # values): their events are left out here rather than read from raw_events on those days too.
        cursor.execute("""
            delete from resolved_events where hash(session_id) not in (select session_key from changed_sessions);
            delete from klaviyo_skipped where event_id not in (select event_id from resolved_events);
            delete from klaviyo_outbox where event_id not in (select event_id from resolved_events)""")
        return
    # resolved_events holds each event's time as raw_events does: the same runs skip its other days too.
    _slice_of_events(cursor, "resolved_events", columns["resolved_events"], "raw_events", within, times)
    for table in EVENT_SOURCES[2:]:
        _slice_of_events(cursor, table, columns[table], "raw_events")


def _drop_slices(cursor: duckdb.DuckDBPyConnection) -> None:
    """The slices `_located_changes` leaves (if it did), where the warehouse's tables are to be read whole after
    all."""
    cursor.execute("; ".join(f"drop table if exists temp.main.{table}" for table in EVENT_SOURCES[1:]))


def _slice_of_events(cursor: duckdb.DuckDBPyConnection, table: str, columns: str, events: str,
                     within: str = "true", times: list[datetime] | None = None) -> None:
    """The warehouse table's `columns` for the events of temp table `events`, as a temp table named `table` that
    shadows it on `cursor`; `within` (with its parameters `times`) may narrow the scan first."""
    cursor.execute(f"""
        create temp table {table} as
        select {columns} from {_warehouse_table(cursor, table)} as source
        semi join {events} on {events}.event_id = source.event_id
        where {within}""", times or [])


def _on_their_days(cursor: duckdb.DuckDBPyConnection, sessions: str,
                   session_days: str = "session_days_now") -> tuple[str, list[datetime]]:
    """SQL: an event_time on a day of the sessions in table `sessions`, by their days in `session_days` (all of
    session_days_now, or the part of it those sessions have), with its parameters.
    Those days come in runs of consecutive days. raw_events is written in loads, mostly a day's files at a time,
    so a filter on those runs' times skips the row groups of other days before any session id is hashed.
    resolved_events appends each run's new rows, so its other recent days are skipped too (a backfill's rows, and
    old days' events resolved again, lie in no order of time: those are read whole, as without the filter).

    Every row is tested against every run, so past MAX_DAY_RUNS the filter costs more than it skips (an identity
    run that re-resolves old events scatters their days): the runs closest together are merged until that many are
    left, so only the widest gaps are skipped."""
    runs = cursor.execute(f"""
        select min(day), max(day) + 1 from (
            select day, day - row_number() over (order by day)::int as run
            from (select distinct day from {session_days} semi join {sessions} using (session_key)))
        group by run
        order by 1""").fetchall()
    while len(runs) > MAX_DAY_RUNS:
        _, closest = min((runs[index + 1][0] - runs[index][1], index) for index in range(len(runs) - 1))
        runs[closest:closest + 2] = [(runs[closest][0], runs[closest + 1][1])]
    times = [datetime.combine(day, datetime.min.time(), timezone.utc) for run in runs for day in run]
    return "(" + (" or ".join(["(event_time >= ? and event_time < ?)"] * len(runs)) or "false") + ")", times


def _read_columns(connection: duckdb.DuckDBPyConnection, *, named: bool = True) -> dict[str, str]:
    """Each event table's columns that a published view's SQL names (a word of it, comments aside), as a select
    list (`named`) or as a list of expressions to hash. A name that only happens to be a word there (`day`) costs a
    column read, never a column missed. Of a struct column that the views only ever read fields of
    (`custom_data.value`), only those fields: a slice then copies three numbers and strings of a cart, not its
    items."""
    sql = "\n".join(line.split("--")[0] for view in PUBLISHED_VIEWS + SESSION_VIEWS
                    for line in read_sql(view).splitlines())
    found = connection.execute("""
        select table_name, column_name, data_type like 'STRUCT(%' from duckdb_columns()
        where database_name = current_database() and schema_name = 'main' and table_name in ?
        order by column_index""", [list(EVENT_SOURCES)]).fetchall()
    return dict(_columns_named(sql, tuple(found), named))


@lru_cache(maxsize=8)
def _columns_named(sql: str, found: tuple[tuple[str, str, bool], ...], named: bool) -> dict[str, str]:
    """`_read_columns` of the views' `sql` and the tables' columns `found`: cached on both, since a run with
    something new asks four times and reading the SQL's words costs more than the catalog's answer."""
    words = set(re.findall(r"\w+", sql))

    def expression(column: str, is_struct: bool) -> str:
        fields = re.findall(rf'\b{column}\s*\.\s*"?(\w+)', sql)
        if not is_struct or len(fields) != len(re.findall(rf"\b{column}\b", sql)):
            return f'"{column}"'
        packed = ", ".join(f'"{field}" := "{column}"."{field}"' for field in dict.fromkeys(fields))
        return f"struct_pack({packed})" + (f' as "{column}"' if named else "")

    return {table: ", ".join(expression(column, is_struct) for name, column, is_struct in found
                             if name == table and column in words)
            for table in EVENT_SOURCES}


def analytics_path(warehouse_path: Path) -> Path:
    return warehouse_path.with_name(warehouse_path.stem + ".analytics.duckdb")


@dataclass(frozen=True)
class AnalyticsOverview:
    """The numbers a run records for the UI's plots and the alert checks judge."""

    lift: LiftTotals  # every day in the warehouse
    lift_last_7_days: LiftTotals
    lift_yesterday: LiftTotals
    lift_trailing_week: LiftTotals  # the 7 days before yesterday
    visitors_last_7_days: int
    klaviyo_identified_visitors_last_7_days: int
    identified_visitors_last_7_days: int  # by Klaviyo or by Upstack
    delivered_last_day: int
    refused_last_day: int
    oldest_pending_minutes: float
    pixel_events_in_quiet_window: int
    rows: dict[str, int] = field(default_factory=dict)  # each view's rows
    published: Path | None = None  # the analysts' copy written with it

    @property
    def delivery_success(self) -> float | None:
        """Of the events Klaviyo answered for in the last day, the share it accepted; None when it answered none."""
        answered = self.delivered_last_day + self.refused_last_day
        return self.delivered_last_day / answered if answered else None

    def match_rate(self, identified: int) -> float:
        return identified / self.visitors_last_7_days if self.visitors_last_7_days else 0.0


def overview(views: duckdb.DuckDBPyConnection, warehouse: duckdb.DuckDBPyConnection, *, now: datetime,
             quiet_time: timedelta) -> AnalyticsOverview:
    """The numbers, with the lift and match rates read from `views` (any connection holding daily_lift and
    match_rates: the analysts' copy, where each view was computed once) and the rest from the warehouse's tables."""
    today = now.astimezone(timezone.utc).date()
    yesterday = today - timedelta(days=1)
    visitors, klaviyo, identified = views.execute("""
        select coalesce(sum(visitors), 0),
               coalesce(sum(visitors) filter (where identified_by = 'klaviyo_native'), 0),
               coalesce(sum(visitors) filter (where identified_by <> 'unidentified'), 0)
        from match_rates where day > $today - 7""", {"today": today}).fetchall()[0]
    delivered, refused, oldest_pending, quiet_events = warehouse.execute("""
        select (select count(*) from klaviyo_outbox where status = 'delivered' and delivered_at > $since),
               (select count(*) from klaviyo_dead_letters where dead_at > $since),
               (select coalesce(epoch($now - min(created_at)) / 60, 0) from klaviyo_outbox
                where status in ('pending', 'claimed')),
               (select count(*) from raw_events where event_time > $quiet_since)""",
                                                                {"since": now - timedelta(days=1), "now": now,
                                                                 "quiet_since": now - quiet_time}).fetchall()[0]
    return AnalyticsOverview(
        lift=lift_totals(views),
        lift_last_7_days=lift_totals(views, since=today - timedelta(days=6)),
        lift_yesterday=lift_totals(views, since=yesterday, until=yesterday),
        lift_trailing_week=lift_totals(views, since=yesterday - timedelta(days=7), until=yesterday - timedelta(days=1)),
        visitors_last_7_days=int(visitors), klaviyo_identified_visitors_last_7_days=int(klaviyo),
        identified_visitors_last_7_days=int(identified), delivered_last_day=delivered, refused_last_day=refused,
        oldest_pending_minutes=float(oldest_pending), pixel_events_in_quiet_window=quiet_events,
        rows={**{view: views.execute(f"select count(*) from {view}").fetchall()[0][0] for view in PUBLISHED_VIEWS},
              # one row per commerce event, which resolved_events counts without computing the view
              "shopper_journey": warehouse.execute("select count(*) from resolved_events").fetchall()[0][0]},
    )


def refresh(settings: Settings, *, now: datetime) -> AnalyticsOverview:
    """What a sync ends with: the views recreated, their rows published for analysts, the numbers measured (from
    the published rows: computing a view over the whole history once per sync is enough)."""
    with settings.warehouse().connect() as warehouse:
        ensure_views(warehouse)
        published = publish_for_analysts(warehouse, settings.warehouse_path, now=now)
        # The copy attached to the sync's connection, on a cursor of its own that reads it by default: a new
        # database instance for a few sums costs more than the sums.
        with warehouse.cursor() as views:
            database = views.execute("select current_database()").fetchone()[0]
            with _attached(views, published, "analysts_copy", read_only=True):
                views.execute("use analysts_copy")
                try:
                    state = overview(views, warehouse, now=now, quiet_time=settings.alerts.max_quiet_time)
                finally:
                    views.execute(f'use "{database}"')  # DuckDB detaches no database that is in use
            counted = _session_row_counts(views, session_rows_path(settings.warehouse_path))
    return replace(state, published=published, rows={**state.rows, **counted})


def _session_row_counts(cursor: duckdb.DuckDBPyConnection, path: Path) -> dict[str, int]:
    """Each session view's rows as last written, for the run's metadata: 0 for a file removed or unreadable since
    (the next sync with something new computes it again, or says why it cannot), which is no reason to fail this
    one."""
    try:
        with _attached(cursor, path, "session_rows", read_only=True):
            return {view: cursor.execute(f"select count(*) from session_rows.{view}").fetchone()[0]
                    for view in SESSION_VIEWS}
    except duckdb.Error:
        return dict.fromkeys(SESSION_VIEWS, 0)


def readme_views() -> str:
    """The README's list of the views and their columns, from the files' headers (a test keeps the two equal)."""
    blocks = []
    for view, doc in view_docs().items():
        rows = "\n".join(f"| `{column.name}` | {column.description} |" for column in doc.columns)
        blocks.append(f"**`{view}`**: {doc.description}\n\n| column | meaning |\n|---|---|\n{rows}")
    return "\n\n".join(blocks)
