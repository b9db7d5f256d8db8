"""Klaviyo delivery (SPEC 6): the outbox's pending rows, sent once, within Klaviyo's limits, through faults.

Exactly once from our side: a row is claimed (committed) before its request is sent and settled (committed)
after the answer, so a run killed at any point leaves it pending, claimed or settled. A later run sends pending
and claimed rows; a claimed row may already have arrived, which Klaviyo's dedupe on unique_id makes harmless.
A 400 on a bulk request is narrowed down to the events it names (or by halving) and only those are
dead-lettered; the rest still go.

The requests and their bodies are built in DuckDB (`sql/klaviyo_bodies.sql`) from the JSON the mapping stored: the
step's time is the limits' time, not Python's: the first of a full sync's 83 requests leaves about half a second into
the step. The rows of a refused request are the only ones read back into Python.

Each request has an id, shared by its retries (klaviyo_deliveries.request_id), and a settled row names the request
that settled it (klaviyo_outbox.request_id): narrowing a 400 down sends the rest again as a new request, so the
rows of one batch may name different requests. The view shopper_journey (upstack_pipeline/trace.py) joins them,
and every delivery run creates it, so any synced warehouse has it.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NamedTuple

from upstack_pipeline import faults
from upstack_pipeline.klaviyo.client import Attempt, KlaviyoClient, KlaviyoDestinationError, Outcome, probe
from upstack_pipeline.klaviyo.limits import MAX_BULK_REQUEST_BYTES, MAX_EVENTS_PER_BULK_REQUEST
from upstack_pipeline.klaviyo.mapping import OutboxRow, bulk_create_body, profile_import_body
from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import read_sql, set_variables, transaction

BULK_EVENTS_PATH = "/api/event-bulk-create-jobs"
PROFILES_PER_IMPORT_JOB = 10_000
_POINTER = re.compile(r"/data/attributes/events-bulk-create/data/(\d+)/attributes/events/data/(\d+)")
# Room for the JSON:API envelope around the events when packing a request under Klaviyo's 5 MB.
_ENVELOPE_BYTES = 64 * 1024
# Request bodies are fetched from DuckDB ten at a time (a second's allowance): the first burst leaves at once, few
# bodies are held in memory whatever the size of the outbox, and turning a fetch into Python strings holds the GIL
# for a few milliseconds only. A fetch of 150 held it for tens: a request the pacer had just let go waited behind
# it and arrived late (then a 429 from Klaviyo's fixed windows; now the next second's burst waits for its answer).
_BODIES_AT_ONCE = 10


class Settled(NamedTuple):
    """An outbox row and the request whose answer settled it."""

    row: OutboxRow
    request_id: str


class Refused(NamedTuple):
    """An outbox row Klaviyo refused: its answer's status and what it said about this event."""

    row: OutboxRow
    status: int
    detail: str
    request_id: str


@dataclass
class DeliveryRun:
    configured: bool
    # Why delivery stopped before the outbox was empty (key refused, Klaviyo unreachable, revision refused):
    # what a person must check. The rows it did not send wait as pending.
    stopped: str | None = None
    requests: int = 0
    retried: int = 0
    delivered: int = 0
    # Delivered events older than max_event_age, sent with Klaviyo's backfill flag: recorded on the profile
    # without firing flows (a cart abandoned days ago must not trigger an email now).
    delivered_backfill: int = 0
    dead_lettered: int = 0
    left_pending: int = 0
    profile_import_errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    attempts: list[Attempt] = field(default_factory=list, repr=False)

    @property
    def dead_letter_share(self) -> float:
        settled = self.delivered + self.dead_lettered
        return self.dead_lettered / settled if settled else 0.0

    @property
    def events_per_minute(self) -> float:
        return self.delivered / self.seconds * 60 if self.seconds else 0.0


def deliver(
    settings: Settings,
    *,
    now: datetime,
    client: KlaviyoClient | None = None,
    events_per_request: int = MAX_EVENTS_PER_BULK_REQUEST,
    concurrency: int | None = None,
) -> DeliveryRun:
    """Sends every pending row. Up to `concurrency` requests are in flight, by default a second's allowance (the
    pacer lets no more go: a request counts until a second after its answer); the warehouse is written from this
    thread only, as answers come back."""
    if not settings.klaviyo_api_key and client is None:
        return DeliveryRun(configured=False)
    run = DeliveryRun(configured=True)
    started = time.monotonic()
    own_client = client is None
    client = client or settings.klaviyo_client()
    client.on_attempt = run.attempts.append
    try:
        with settings.warehouse().connect() as connection:
            # Rows a dead run had claimed may or may not have arrived: send them again.
            connection.execute("update klaviyo_outbox set status = 'pending', claimed_at = null "
                               "where status = 'claimed'")
            requests = _plan_requests(connection, events_per_request)
            try:
                if requests:
                    _send_all(connection, client, requests, run, now, concurrency)
                else:
                    # Nothing to send still says whether Klaviyo could take it: an outage or a revoked key shows
                    # on the quiet hourly runs too, not only once events wait.
                    try:
                        probe(client)
                    finally:
                        _record_attempts(connection, run.attempts)
                if settings.destination.list_id:
                    before = len(run.attempts)
                    try:
                        run.profile_import_errors = _add_to_list(connection, client, settings.destination.list_id)
                    finally:
                        _record_attempts(connection, run.attempts[before:])
            except KlaviyoDestinationError as error:
                run.stopped = str(error)
                run.left_pending = connection.execute(
                    "select count(*) from klaviyo_outbox where status = 'pending'").fetchone()[0]
    finally:
        if own_client:
            client.close()
    run.requests = len(run.attempts)
    run.retried = sum(1 for attempt in run.attempts if attempt.status is None or attempt.status >= 429)
    run.seconds = time.monotonic() - started
    return run


def _send_all(connection, client: KlaviyoClient, requests: int, run: DeliveryRun, now: datetime,
              concurrency: int | None) -> None:
    """Sends the planned requests (`_plan_requests`) as the pacer lets them go. A request's answer settles its rows
    by the request's number; one Klaviyo refused in part is narrowed down (`_answered`) off this thread, from its
    rows read back as the mapping stored them."""
    recorded = 0
    in_flight: dict[Future, int] = {}
    counts: dict[int, tuple[int, int]] = {}  # request -> (events, backfill events)

    def settle(done: set[Future]) -> None:
        nonlocal recorded
        for future in done:
            request = in_flight.pop(future)
            result = future.result()
            attempts, recorded = run.attempts[recorded:], len(run.attempts)
            if isinstance(result, Outcome):  # the answer to a whole planned request
                events, backfill = counts.pop(request)
                verdict = _whole(result)
                if verdict is None:  # refused: found out which events, off this thread, from its rows
                    _record_attempts(connection, attempts)
                    in_flight[pool.submit(_answered, client, _rows_of(connection, request), result)] = request
                    continue
                _settle_request(connection, request, result, verdict, now, attempts)
                if verdict == "delivered":
                    run.delivered += events
                    run.delivered_backfill += backfill
                else:
                    run.left_pending += events
            else:  # what narrowing a refused request down found
                delivered, dead, unsent = result
                _settle(connection, delivered, dead, unsent, now, attempts)
                run.delivered += len(delivered)
                run.delivered_backfill += sum(1 for settled in delivered if settled.row.event.get("backfill"))
                run.dead_lettered += len(dead)
                run.left_pending += len(unsent)
            faults.reached("delivery-request")  # test hook: UPSTACK_TEST_STOP_AFTER=delivery-request:N

    # Claimed in one statement before anything is sent: a killed run leaves them claimed, the next run resends.
    connection.execute("update klaviyo_outbox set status = 'claimed', claimed_at = ? where status = 'pending'", [now])
    limit = concurrency or client.pacer.per_second
    with ThreadPoolExecutor(max_workers=limit) as pool:
        try:
            for request, events, backfill, body in _bodies(connection, requests):
                counts[request] = (events, backfill)
                in_flight[pool.submit(client.post, BULK_EVENTS_PATH, body, events=events)] = request
                while len(in_flight) >= limit:
                    settle(wait(in_flight, return_when=FIRST_COMPLETED).done)
            while in_flight:
                settle(wait(in_flight, return_when=FIRST_COMPLETED).done)
        except KlaviyoDestinationError:
            # Requests already in flight finish (quickly: they meet the same cause) and are recorded below.
            pool.shutdown(wait=True, cancel_futures=True)
            # Nothing more can be sent until a person fixes the cause: what this run claimed waits as pending.
            connection.execute("update klaviyo_outbox set status = 'pending', claimed_at = null "
                               "where status = 'claimed'")
            raise
        finally:
            _record_attempts(connection, run.attempts[recorded:])


def _plan_requests(connection, events_per_request: int) -> int:
    """Packs the pending rows into requests (`sql/klaviyo_bodies.sql`); returns how many."""
    set_variables(connection, {"events_per_request": min(events_per_request, MAX_EVENTS_PER_BULK_REQUEST),
                               "max_request_bytes": MAX_BULK_REQUEST_BYTES, "envelope_bytes": _ENVELOPE_BYTES})
    connection.execute(read_sql("klaviyo_bodies"))
    return connection.execute("select count(distinct request) from delivery_rows").fetchone()[0]


def _bodies(connection, requests: int):
    """(request, events, backfill events, body as sent) for each planned request, in order, fetched
    `_BODIES_AT_ONCE` at a time: the first as soon as they are built, the rest while earlier ones wait for the
    pacer."""
    for start in range(0, requests, _BODIES_AT_ONCE):
        chunk = connection.execute(
            "select request, events, backfill, body from delivery_bodies where request >= ? and request < ? "
            "order by request", [start, start + _BODIES_AT_ONCE]).fetchall()
        for request, events, backfill, body in chunk:
            yield request, events, backfill, body.encode()


def _whole(outcome: Outcome) -> str | None:
    """What a whole request's answer makes of its rows: delivered, back to pending (no answer, or still throttled
    after every retry), or None when Klaviyo refused the request and the events it names must be found."""
    if outcome.status is not None and 200 <= outcome.status < 300:
        return "delivered"
    if outcome.status is None or outcome.status >= 429:
        return "pending"
    return None


def _rows_of(connection, request: int) -> list[OutboxRow]:
    """The rows of one planned request, in the order its body holds them."""
    return [OutboxRow(unique_id, profile_key, json.loads(profile), json.loads(event))
            for unique_id, profile_key, profile, event in connection.execute(
                "select unique_id, profile_key, profile, event from delivery_rows where request = ? "
                "order by profile_key, unique_id", [request]).fetchall()]


def _add_to_list(connection, client: KlaviyoClient, list_id: str) -> list[dict]:
    """Adds the people of this run's delivered events to the configured list (Bulk Import Profiles, in jobs of
    at most 10,000 profiles); returns Klaviyo's import errors, which name profiles, never stop events. A person's
    profile is that of their last delivered event."""
    people = [json.loads(profile) for (profile,) in connection.execute(
        "select arg_max(run.profile, run.unique_id) from delivery_rows as run "
        "join klaviyo_outbox using (unique_id) where klaviyo_outbox.status = 'delivered' "
        "group by run.profile_key order by run.profile_key").fetchall()]
    errors: list[dict] = []
    for start in range(0, len(people), PROFILES_PER_IMPORT_JOB):
        errors += client.import_profiles(profile_import_body(people[start:start + PROFILES_PER_IMPORT_JOB], list_id))
    return errors


def _answered(client: KlaviyoClient, rows: list[OutboxRow],
              outcome: Outcome) -> tuple[list[Settled], list[Refused], list[OutboxRow]]:
    """What Klaviyo's answer `outcome` to a request of `rows` makes of them: (delivered, refused, with no answer
    after every retry). A 400 is narrowed down to the events it names (or by halving); the rest are sent again."""
    verdict = _whole(outcome)
    if verdict == "delivered":
        return [Settled(row, outcome.request_id) for row in rows], [], []
    if verdict == "pending":
        return [], [], rows
    named = _rows_named_by_errors(rows, outcome.body)
    if named:
        dead = [Refused(row, outcome.status, named[row.unique_id], outcome.request_id)
                for row in rows if row.unique_id in named]
        rest = [row for row in rows if row.unique_id not in named]
        if not rest:
            return [], dead, []
        delivered, more_dead, unsent = _send(client, rest)
        return delivered, dead + more_dead, unsent
    if len(rows) == 1:
        detail = _details(outcome.body) or f"HTTP {outcome.status}"
        return [], [Refused(rows[0], outcome.status, detail, outcome.request_id)], []
    half = len(rows) // 2
    first, second = _send(client, rows[:half]), _send(client, rows[half:])
    return first[0] + second[0], first[1] + second[1], first[2] + second[2]


def _send(client: KlaviyoClient, rows: list[OutboxRow]) -> tuple[list[Settled], list[Refused], list[OutboxRow]]:
    return _answered(client, rows, client.post(BULK_EVENTS_PATH, bulk_create_body(rows), events=len(rows)))


def _rows_named_by_errors(rows: list[OutboxRow], body: dict | None) -> dict[str, str]:
    """Klaviyo points at the failing event: /data/attributes/events-bulk-create/data/<group>/.../data/<event>."""
    groups: dict[str, list[OutboxRow]] = {}
    for row in rows:
        groups.setdefault(row.profile_key, []).append(row)
    ordered = list(groups.values())
    named = {}
    for error in (body or {}).get("errors") or []:
        match = _POINTER.search(((error.get("source") or {}).get("pointer")) or "")
        if match:
            group, event = int(match.group(1)), int(match.group(2))
            if group < len(ordered) and event < len(ordered[group]):
                named[ordered[group][event].unique_id] = str(error.get("detail") or error.get("title") or "rejected")
    return named


def _details(body: dict | None) -> str:
    return "; ".join(str(error.get("detail") or error.get("title")) for error in (body or {}).get("errors") or [])


def _settle_request(connection, request: int, outcome: Outcome, verdict: str, now: datetime,
                    attempts: list[Attempt]) -> None:
    """One transaction: a whole request's rows delivered (naming the request) or back to pending, as `_whole`'s
    verdict says, and the attempts that decided them."""
    with transaction(connection):
        _record_attempts(connection, attempts)
        if verdict == "delivered":
            connection.execute("update klaviyo_outbox set status = 'delivered', delivered_at = ?, request_id = ? "
                               "from delivery_rows where delivery_rows.request = ? "
                               "and klaviyo_outbox.unique_id = delivery_rows.unique_id",
                               [now, outcome.request_id, request])
        else:
            connection.execute("update klaviyo_outbox set status = 'pending', claimed_at = null "
                               "from delivery_rows where delivery_rows.request = ? "
                               "and klaviyo_outbox.unique_id = delivery_rows.unique_id", [request])


def _set_status(connection, settled: list[Settled] | list[Refused], status: str, stamp_column: str,
                now: datetime) -> None:
    connection.execute(
        f"update klaviyo_outbox set status = ?, {stamp_column} = ?, request_id = settled.request_id "
        "from (select unnest(?) as unique_id, unnest(?) as request_id) as settled "
        "where klaviyo_outbox.unique_id = settled.unique_id",
        [status, now, [each.row.unique_id for each in settled], [each.request_id for each in settled]],
    )


def _settle(connection, delivered: list[Settled], dead: list[Refused], unsent: list[OutboxRow], now: datetime,
            attempts: list[Attempt]) -> None:
    """One transaction: the rows' new status, their dead letters and the requests that decided them."""
    with transaction(connection):
        _record_attempts(connection, attempts)
        if delivered:
            _set_status(connection, delivered, "delivered", "delivered_at", now)
        if unsent:
            connection.execute("update klaviyo_outbox set status = 'pending', claimed_at = null "
                               "from (select unnest(?) as unique_id) as unsent "
                               "where klaviyo_outbox.unique_id = unsent.unique_id",
                               [[row.unique_id for row in unsent]])
        for refused in dead:
            connection.execute(
                "insert or replace into klaviyo_dead_letters select unique_id, event_id, metric_name, ?, ?, ? "
                "from klaviyo_outbox where unique_id = ?",
                [refused.status, refused.detail, now, refused.row.unique_id])
        if dead:
            _set_status(connection, dead, "dead_letter", "claimed_at", now)


def _record_attempts(connection, attempts: list[Attempt]) -> None:
    if attempts:
        connection.executemany(
            "insert into klaviyo_deliveries (sent_at, endpoint, status, events, bytes, latency_ms, error, request_id) "
            "values (?, ?, ?, ?, ?, ?, ?, ?)",
            [[datetime.fromtimestamp(attempt.sent_at, tz=timezone.utc), attempt.endpoint, attempt.status,
              attempt.events, attempt.bytes, attempt.latency_ms, attempt.error, attempt.request_id]
             for attempt in attempts],
        )


def stale_pending_rows(settings: Settings, *, now: datetime) -> int:
    """Outbox rows waiting longer than max_pending_age: delivery is stuck (or not configured)."""
    with settings.warehouse().connect() as connection:
        return connection.execute(
            "select count(*) from klaviyo_outbox where status in ('pending', 'claimed') and created_at < ?",
            [now - settings.destination.max_pending_age]).fetchone()[0]
