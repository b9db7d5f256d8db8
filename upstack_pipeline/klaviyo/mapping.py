"""Klaviyo mapping (SPEC 5): each decided commerce event becomes Klaviyo events in the outbox, or a skip reason.

The mapping itself is set-based SQL (`sql/klaviyo_outbox.sql`) over every undecided event at once; this module
sets its parameters, reports what it did, and turns outbox rows into the request bodies Klaviyo's API takes.

A run costs in proportion to what is new (issue 14). Only identity writes resolved_events, stamping each row it
writes (a new event, or an answer that changed) with its run's now (resolved_at); a row whose answer stayed the same
keeps its stamp, and its decision stands. So the events a run must look at are those stamped at or after the
last mapping run's now, plus those it held back (their sessions were active). That run is recorded in
pipeline_state (stage `klaviyo_mapping`: identity's load_id then, its now, and a fingerprint of the settings, the
SQL, the schema and identity's own fingerprint). Every event is looked at instead when there is no such record,
the fingerprint changed, or identity has run since with an earlier now (a clock set back); and again, in the same
transaction, when a run ends with more undecided events than it held back (a decision deleted by hand), so that
nothing is left undecided for good.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from typing import Iterable, Mapping

import duckdb

from upstack_pipeline.klaviyo import limits
from upstack_pipeline.klaviyo.flows import BACKUP_FLOWS
from upstack_pipeline.settings import ORDER_LINE_METRIC, PIXEL_TO_KLAVIYO_METRIC, DestinationSettings, Settings
from upstack_pipeline.warehouse import event_id_hashes_cover, read_sql, schema_version, set_variables, transaction

SKIP_REASONS = ("disabled_event", "no_consent", "unresolved", "native_identified", "profile_creation_disabled",
                "invalid")
# The properties without which a metric's flow templates render empty: checked on every outbox row.
KEY_PROPERTIES = {
    "Viewed Product": ("ProductID", "ProductName"),
    "Added to Cart": ("AddedItemProductID", "CartValue", "Items", "CheckoutURL"),
    "Started Checkout": ("CartValue", "Items", "CheckoutURL"),
    "Placed Order": ("OrderID", "Revenue", "Items"),
    "Ordered Product": ("OrderID", "ProductID"),
}
MONEY_METRICS = ("Added to Cart", "Started Checkout", "Placed Order", "Ordered Product")
STAGE = "klaviyo_mapping"  # its row in pipeline_state


@dataclass(frozen=True)
class MappingRun:
    events_decided: int
    outbox_rows: int
    skipped: int
    reviewed_for_limits: int  # events past the SQL's bound of Klaviyo's limits, judged one by one
    every_event: bool = False  # looked at every undecided event, not only those (re)resolved since the last run


def map_events(settings: Settings, *, now: datetime) -> MappingRun:
    with settings.warehouse().connect() as connection, transaction(connection):
        variables = _variables(settings.destination, now)
        fingerprint, identity_load_id, incremental, last_run = _last_run(connection, variables)
        set_variables(connection, variables)
        before = _counts(connection)
        connection.execute(read_sql("commerce_metrics"))
        decided, reviewed = _decide(connection, incremental=incremental, last_run=last_run or now, now=now)
        every_event = not incremental
        if incremental and not _only_held_back_left(connection):
            more = _decide(connection, incremental=False, last_run=now, now=now)
            decided, reviewed, every_event = decided + more[0], reviewed + more[1], True
        _fail_if_skipped_twice(connection)
        connection.execute("insert or replace into pipeline_state (stage, load_id, updated_at, fingerprint, overview) "
                           "values (?, ?, ?, ?, null)", [STAGE, identity_load_id, now, fingerprint])
        after = _counts(connection)
    return MappingRun(events_decided=decided, outbox_rows=after[0] - before[0], skipped=after[1] - before[1],
                      reviewed_for_limits=reviewed, every_event=every_event)


def _decide(connection: duckdb.DuckDBPyConnection, *, incremental: bool, last_run: datetime,
            now: datetime) -> tuple[int, int]:
    """Runs the mapping SQL: (events decided, events judged against Klaviyo's limits)."""
    set_variables(connection, {"incremental": incremental, "last_run": last_run,
                               "event_id_hashes_cover": event_id_hashes_cover(connection)})
    connection.execute(read_sql("klaviyo_outbox"))
    reviewed = _review_rows_near_the_limits(connection, now)
    return connection.execute("select count(*) from candidates").fetchone()[0], reviewed


def _last_run(connection: duckdb.DuckDBPyConnection, variables: dict) -> tuple[str, int, bool, datetime | None]:
    """(this run's fingerprint, identity's load_id, whether only what is new needs looking at, the last run's now)."""
    identity = connection.execute(
        "select load_id, updated_at, fingerprint from pipeline_state where stage = 'identity'").fetchone()
    identity_load_id, identity_now, identity_fingerprint = identity or (0, None, None)
    unstamped = {name: value for name, value in variables.items() if name not in ("now", "latest_event_time")}
    fingerprint = hashlib.sha256(repr((sorted(unstamped.items()), read_sql("klaviyo_outbox"),
                                       schema_version(connection), identity_fingerprint)).encode()).hexdigest()
    last = connection.execute("select load_id, updated_at, fingerprint from pipeline_state where stage = ?",
                              [STAGE]).fetchone()
    incremental = (last is not None and last[2] == fingerprint
                   and (identity_load_id == last[0] or (identity_now is not None and identity_now >= last[1])))
    return fingerprint, identity_load_id, incremental, last[1] if incremental else None


# How many commerce events are undecided, from the tables' sizes alone (an event is in the outbox or skipped, once:
# one decided twice fails the decided_twice check, and one skipped twice fails its run): no event is looked up.
UNDECIDED_BY_SIZES = ("((select count(*) from resolved_events) - (select count(distinct event_id) from klaviyo_outbox)"
                      " - (select count(*) from klaviyo_skipped))")


def _fail_if_skipped_twice(connection: duckdb.DuckDBPyConnection) -> None:
    """klaviyo_skipped has no key (sql/warehouse.sql says why): a run that would skip one of its events twice fails
    here instead, in its transaction, so nothing of it is written, as a key would have failed it."""
    connection.execute("""
        select error('mapping would leave ' || count(*) || ' of its events with two rows in klaviyo_skipped ('
                     || min(event_id) || ' among them): it decides an event once unless resolved_events holds it '
                     || 'twice. Nothing of this run was written.')
        from (
            select event_id from klaviyo_skipped
            semi join (select event_id from klaviyo_skipped where skipped_at = getvariable('now')) using (event_id)
            group by event_id having count(*) > 1
        )
        having count(*) > 0""")


def _only_held_back_left(connection: duckdb.DuckDBPyConnection) -> bool:
    """Whether the events still undecided are just those this run held back: every commerce event is in the outbox
    or skipped (each once), or waits for its session to go idle."""
    return connection.execute(f"""
        select {UNDECIDED_BY_SIZES} = (select count(*) from undecided) - (select count(*) from candidates)
    """).fetchone()[0]


def _variables(destination: DestinationSettings, now: datetime) -> dict:
    names = destination.metric_names
    return {
        "now": now,
        "send_mode": destination.send_mode,
        "klaviyo_metrics": PIXEL_TO_KLAVIYO_METRIC,
        "backup_utm_campaigns": {flow.metric: flow.utm_campaign for flow in BACKUP_FLOWS},
        "metric_names": {event: names[metric] for event, metric in PIXEL_TO_KLAVIYO_METRIC.items()},
        "order_line_metric_name": names[ORDER_LINE_METRIC],
        "enabled_events": list(destination.enabled_events),
        "create_profiles": destination.create_profiles,
        "update_profiles": destination.update_profiles,
        "respect_consent": destination.respect_consent,
        "max_event_age": destination.max_event_age,
        "hold_back": destination.hold_back,
        "max_string_bytes": limits.MAX_STRING_BYTES,
        "max_profile_strings_bytes": limits.MAX_PROFILE_STRINGS_BYTES,
        "max_properties": limits.MAX_PROPERTIES,
        "max_metric_name_chars": limits.MAX_METRIC_NAME_CHARS,
        "earliest_event_time": limits.EARLIEST_EVENT_TIME,
        "latest_event_time": limits.latest_event_time(now),
        "profile_identifiers": list(limits.PROFILE_IDENTIFIERS),
    }


def _review_rows_near_the_limits(connection: duckdb.DuckDBPyConnection, now: datetime) -> int:
    """Judges the rows `klaviyo_outbox.sql` left out as possibly beyond Klaviyo's limits, with the checks the
    emulator runs (`limits`): a profile string too long is dropped with a note and the event goes; an event that
    still breaks a limit is skipped as `invalid` with what broke, so it never reaches Klaviyo to be refused along
    with the rest of its request. All rows of a pixel event share one verdict: an order is not sent in part.

    Python, not SQL, because it walks each payload; the SQL's bound keeps this to the rare row that needs it.
    """
    rows = connection.execute("""
        select unique_id, event_id, event_name, metric_name, profile_key, profile, event, backfill
        from mapped where needs_review order by event_id, unique_id
    """).fetchall()
    accepted, skipped = [], []
    for event_id, event_rows in groupby(rows, key=lambda row: row[1]):
        event_rows = list(event_rows)
        fitted, problems = [], []
        for unique_id, _, event_name, metric_name, profile_key, profile, event, backfill in event_rows:
            profile, notes = limits.fit_profile(json.loads(profile))
            row = OutboxRow(unique_id, profile_key, profile, json.loads(event))
            problems += [f"{metric_name}: {problem}" for problem in _limit_violations(row, now)]
            fitted.append([unique_id, event_id, event_name, metric_name, profile_key, json.dumps(profile),
                           json.dumps(row.event), backfill, "; ".join(notes) or None])
        if problems:
            shown = problems[:3] + ([f"and {len(problems) - 3} more"] if len(problems) > 3 else [])
            skipped.append([event_id, event_rows[0][2], "invalid", "; ".join(shown), now])
        else:
            accepted += fitted
    if accepted:
        connection.executemany("""
            insert into klaviyo_outbox (unique_id, event_id, event_name, metric_name, profile_key, profile, event,
                                        backfill, status, created_at, notes)
            values (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?) on conflict do nothing
        """, [row[:8] + [now, row[8]] for row in accepted])
    if skipped:
        connection.executemany("insert into klaviyo_skipped values (?, ?, ?, ?, ?)", skipped)
    return len({row[1] for row in rows})


def _limit_violations(row: OutboxRow, now: datetime) -> list[str]:
    """What Klaviyo would refuse in this row sent on its own: the limits on the event and its profile, and the
    request size, since a row over 5 MB could never be sent in any request."""
    violations = limits.event_violations(row.event, row.profile, now=now)
    try:
        size = len(limits.encode_body(bulk_create_body([row])))
    except (TypeError, ValueError) as error:  # NaN or Infinity, named above; or text that is not UTF-8
        return violations or [f"the event cannot be sent as JSON: {error}"]
    if size > limits.MAX_BULK_REQUEST_BYTES:
        violations.append(f"the event alone makes a request of {size:,} bytes "
                          f"(max {limits.MAX_BULK_REQUEST_BYTES:,} = 5 MB)")
    return violations


def _counts(connection: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    return connection.execute(
        "select (select count(*) from klaviyo_outbox), (select count(*) from klaviyo_skipped)").fetchone()


@dataclass(frozen=True)
class OutboxRow:
    unique_id: str
    profile_key: str
    profile: dict
    event: dict


def event_create_body(row: OutboxRow) -> dict:
    """Body of POST /api/events (one event): Klaviyo's EventCreateQueryV2."""
    attributes = dict(row.event)
    attributes["profile"] = {"data": {"type": "profile", "attributes": row.profile}}
    return {"data": {"type": "event", "attributes": attributes}}


def bulk_create_body(rows: Iterable[OutboxRow]) -> dict:
    """Body of POST /api/event-bulk-create-jobs: the events grouped by profile, as Klaviyo's EventsBulkCreateJob.

    Klaviyo applies one profile per group, so rows of one profile_key travel together; the caller keeps a
    request within the limits of `upstack_pipeline.klaviyo.limits`.
    """
    groups: dict[str, list[OutboxRow]] = {}
    for row in rows:
        groups.setdefault(row.profile_key, []).append(row)
    return {"data": {"type": "event-bulk-create-job", "attributes": {"events-bulk-create": {"data": [
        {
            "type": "event-bulk-create",
            "attributes": {
                "profile": {"data": {"type": "profile", "attributes": group[0].profile}},
                "events": {"data": [{"type": "event", "attributes": row.event} for row in group]},
            },
        }
        for group in groups.values()
    ]}}}}


def profile_import_body(profiles: Iterable[Mapping], list_id: str | None) -> dict:
    """Body of POST /api/profile-bulk-import-jobs: Klaviyo's ProfileImportJobCreateQuery, with the optional list."""
    body: dict = {"data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": [
        {"type": "profile", "attributes": dict(profile)} for profile in profiles
    ]}}}}
    if list_id:
        body["data"]["relationships"] = {"lists": {"data": [{"type": "list", "id": list_id}]}}
    return body


@dataclass(frozen=True)
class MappingOverview:
    """After a run: what went where, and the completeness the blocking checks demand."""

    outbox_by_metric: dict[str, int]
    skipped_by_reason: dict[str, int]
    held_back: int  # undecided because their session is still active
    raw_events_by_name: dict[str, int]  # every name the pixel sent, mapped or not: nothing disappears unseen
    undecided_idle_events: int  # must be 0: idle sessions' events are all decided
    decided_twice: int  # must be 0: an event is in the outbox or skipped, never both
    # Of the rows still to send (delivered ones are history, mapped by the release of their day):
    rows_missing_key_properties: int  # must be 0
    money_rows_without_numeric_value: int  # must be 0
    # How cart events link back to the cart: mostly `cart_page` means the pixel's lines name no variant id.
    cart_links_by_source: dict[str, int]


def overview(settings: Settings, *, now: datetime) -> MappingOverview:
    destination = settings.destination
    names = destination.metric_names
    # Metric names are settings: they reach SQL as bound values only, whatever characters the template holds.
    required = {"metric_name": [names[metric] for metric in KEY_PROPERTIES],
                "keys": [list(keys) for keys in KEY_PROPERTIES.values()]}
    money_metrics = [names[metric] for metric in MONEY_METRICS]
    with settings.warehouse().connect() as connection:
        def pairs(query: str) -> dict:
            return dict(connection.execute(query).fetchall())

        undecided_idle, held_back = _undecided(connection, now, destination.hold_back)
        return MappingOverview(
            outbox_by_metric=pairs("select metric_name, count(*) from klaviyo_outbox group by 1 order by 2 desc"),
            skipped_by_reason=pairs("select reason, count(*) from klaviyo_skipped group by 1 order by 2 desc"),
            held_back=held_back,
            raw_events_by_name=pairs("select event_name, count(*) from raw_events group by 1 order by 2 desc"),
            undecided_idle_events=undecided_idle,
            decided_twice=connection.execute(
                "select count(distinct event_id) from klaviyo_outbox semi join klaviyo_skipped using (event_id)"
            ).fetchone()[0],
            rows_missing_key_properties=connection.execute("""
                select count(*)
                from klaviyo_outbox join (select unnest(?::varchar[]) as metric_name, unnest(?::varchar[][]) as keys)
                    using (metric_name)
                where status in ('pending', 'claimed') and len(list_filter(keys, lambda key:
                    coalesce(json_type(event, '$.properties.' || key), 'NULL') = 'NULL')) > 0
            """, [required["metric_name"], required["keys"]]).fetchone()[0],
            money_rows_without_numeric_value=connection.execute(
                "select count(*) from klaviyo_outbox where status in ('pending', 'claimed') "
                "and list_contains(?::varchar[], metric_name) "
                "and coalesce(json_type(event, '$.value'), 'NULL') not in ('DOUBLE', 'BIGINT', 'UBIGINT')",
                [money_metrics]).fetchone()[0],
            cart_links_by_source=pairs(
                "select event->>'$.properties.upstack_checkout_url_source' as source, count(*) from klaviyo_outbox "
                "where source is not null group by 1 order by 2 desc"),
        )


def _undecided(connection: duckdb.DuckDBPyConnection, now: datetime, hold_back) -> tuple[int, int]:
    """(undecided events of idle sessions, of active ones). Counted from the active sessions' events alone when
    the tables' sizes say every undecided event is one of those: resolved_events' rows less the events decided
    (each once) is how many are undecided. Otherwise each event is looked up in the outbox and the skipped."""
    # The active sessions' events first, materialized: joined in one FROM, DuckDB took every event of the history
    # through the outbox's anti join before keeping the active sessions' (0.59 -> 0.47 s at 19 million events).
    undecided, waiting = connection.execute(f"""
        with active as (
            select distinct left_value as session_id from identity_links
            where left_type = 'session_id' and last_seen > ?::timestamptz - ?::interval
        ),
        active_events as materialized (
            select event_id from resolved_events semi join active using (session_id)
        )
        select {UNDECIDED_BY_SIZES},
               (select count(*) from active_events as resolved
                anti join klaviyo_outbox as sent on sent.event_id = resolved.event_id
                anti join klaviyo_skipped as skipped on skipped.event_id = resolved.event_id)
    """, [now, hold_back]).fetchone()
    if undecided == waiting:
        return 0, waiting
    return connection.execute("""
        with undecided as (
            select resolved.event_id, resolved.session_id from resolved_events as resolved
            anti join klaviyo_outbox as sent on sent.event_id = resolved.event_id
            anti join klaviyo_skipped as skipped on skipped.event_id = resolved.event_id
        ),
        activity as (
            select left_value as session_id, max(last_seen) as last_seen from identity_links
            semi join undecided on undecided.session_id = identity_links.left_value
            where left_type = 'session_id' group by left_value
        )
        select count(*) filter (where activity.last_seen <= ?::timestamptz - ?::interval),
               count(*) filter (where activity.last_seen > ?::timestamptz - ?::interval)
        from undecided left join activity using (session_id)
    """, [now, hold_back, now, hold_back]).fetchone()
