"""What analysts and marketers read: views over the warehouse, and the one lift every surface reports.

The views (`sql/<view>.sql`) are the pipeline's, recreated at the end of every sync so they always match this
release's tables: `daily_lift` (the one definition of lift), `delivery_funnel`, `match_rates`, `recovered_orders`
and `shopper_journey` (one row per commerce event, the story `upstack trace` tells). Each file's header says what a
row is and what each column means; the UI's catalog, the README and `view_docs()` read it there.

`lift_totals` is the lift of `daily_lift` summed over days: the sync summary, the asset metadata and
`upstack evaluate` print it, so no surface computes a lift of its own.

Analysts never hold the warehouse: `publish_for_analysts` copies the views' rows into a small separate file after
each sync, swapped in whole, so a notebook left open on it never blocks the pipeline (DuckDB lets one process
write a file, and a reader holds it too). A sync that changed none of the tables the views read (`SOURCES`, by
the digest the copy's `published` table keeps) leaves the copy as it is: its rows would come out the same.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import duckdb

from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import ColumnDoc, TableDoc, new_schema_ddl, read_sql

# In the order they are created: daily_lift reads recovered_orders.
VIEWS = ("recovered_orders", "daily_lift", "delivery_funnel", "match_rates", "shopper_journey")
# What the analysts' copy holds. shopper_journey stays in the warehouse: a row per event with its raw line and the
# payloads sent (emails, names) is too big and too personal to copy after every sync; `upstack trace` and
# `upstack sql --warehouse` read it there.
PUBLISHED_VIEWS = VIEWS[:4]
# The metric whose lift is the headline: abandoned carts, what backup flows exist for first.
HEADLINE_METRIC = "Added to Cart"
# What the views read, digested whole; raw_events and quarantined_events only grow, in the loads ingested_files
# lists, so their counts and that ledger stand for them.
SOURCES = ("resolved_events", "klaviyo_outbox", "klaviyo_skipped", "klaviyo_deliveries", "klaviyo_dead_letters",
           "commerce_metrics", "ingested_files")
APPEND_ONLY_SOURCES = ("raw_events", "quarantined_events")


def create_views(connection: duckdb.DuckDBPyConnection) -> None:
    """Each view, with its description as its DuckDB comment, so analysts see it in duckdb_views() too."""
    for view in VIEWS:
        sql = read_sql(view)
        connection.execute(sql)
        description = _header(sql)[0].replace("'", "''")  # a COMMENT takes a literal, not a parameter
        connection.execute(f"comment on view {view} is '{description}'")


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


def publish_for_analysts(connection: duckdb.DuckDBPyConnection, warehouse_path: Path, *, now: datetime,
                         sources: str) -> Path:
    """Writes the views' rows (and commerce_metrics) to `<warehouse>.analytics.duckdb`, built aside and renamed
    over the previous one: a reader of the old file keeps reading it, and never sees half a file. `sources`, the
    digest of the warehouse rows they were computed from, is recorded with them."""
    target = analytics_path(warehouse_path)
    building = target.with_name(target.name + ".building")
    building.unlink(missing_ok=True)
    connection.execute("attach ? as analytics", [str(building)])
    try:
        for table in (*PUBLISHED_VIEWS, "commerce_metrics"):
            connection.execute(f"create table analytics.{table} as select * from {table}")
        connection.execute("create table analytics.published (published_at timestamptz, warehouse varchar, "
                           "sources varchar)")
        connection.execute("insert into analytics.published values (?, ?, ?)", [now, str(warehouse_path), sources])
    finally:
        connection.execute("detach analytics")
    os.replace(building, target)
    return target


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
        create_views(warehouse)
        published = analytics_path(settings.warehouse_path)
        sources = _sources_digest(warehouse)
        if _published_sources(published) != sources:
            publish_for_analysts(warehouse, settings.warehouse_path, now=now, sources=sources)
        with duckdb.connect(str(published), read_only=True) as views:
            state = overview(views, warehouse, now=now, quiet_time=settings.alerts.max_quiet_time)
    return replace(state, published=published)


def _sources_digest(connection: duckdb.DuckDBPyConnection) -> str:
    """Changes whenever a row the views read changes, or this release's views do; costs a scan of the sources'
    rows, a fraction of computing the views."""
    digests = [f"(select count(*) || ':' || coalesce(sum(hash(t)::hugeint), 0) from {table} as t)" for table in SOURCES]
    counts = [f"(select count(*) from {table})" for table in APPEND_ONLY_SOURCES]
    found = connection.execute(f"select concat_ws('|', {', '.join(digests + counts)})").fetchone()[0]
    return hashlib.sha256((found + "".join(read_sql(view) for view in VIEWS)).encode()).hexdigest()


def _published_sources(published: Path) -> str | None:
    """The sources' digest the analysts' copy was computed from; None when there is no copy, or an older release's
    (which did not record it)."""
    if not published.exists():
        return None
    with duckdb.connect(str(published), read_only=True) as copy:
        recorded = copy.execute("select 1 from duckdb_columns() where table_name = 'published' "
                                "and column_name = 'sources'").fetchone()
        return copy.execute("select max(sources) from published").fetchone()[0] if recorded else None


def readme_views() -> str:
    """The README's list of the views and their columns, from the files' headers (a test keeps the two equal)."""
    blocks = []
    for view, doc in view_docs().items():
        rows = "\n".join(f"| `{column.name}` | {column.description} |" for column in doc.columns)
        blocks.append(f"**`{view}`**: {doc.description}\n\n| column | meaning |\n|---|---|\n{rows}")
    return "\n\n".join(blocks)
