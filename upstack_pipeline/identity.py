"""Identity resolution (SPEC 4): which person is behind each commerce event, and how we know.

The work is set-based DuckDB SQL in `sql/`, the files of `STEPS` run in that order inside one transaction per
chunk of new loads (one chunk on an hourly run; a backfill's in chunks of about `Settings.identity_chunk_rows` rows):

1. `identifier_normalization` + `identity_observations`: identifiers of the new events, normalised, with
   placeholders and blocked addresses rejected (and counted); `identity_rejected_values`: values now seen on
   more browsers than one person uses, quarantined as supernodes.
2. `identity_links`: the edges between identifiers observed together, merged into the graph.
3. `browser_links` + `browser_clusters` (+ `browser_cluster_labels_step`, repeated, + `browser_clusters_finish`):
   cookies that are one browser (a shared session, an ad click handed from an in-app browser to Safari), under
   the guards of `IdentitySettings`.
4. `resolved_events`: the events whose answer may have changed, resolved again.
5. `shared_device_guard_scope` + `shared_device_guard_check`: the shared-device guard's check counted again on the
   browser clusters whose evidence or events changed; the clusters over 0 are kept in pipeline_state (stage
   `shared_device_guard`) for the overview.
6. `identities`: the people touched, upserted, and named on their events.

Only what is new since the last chunk (raw_events.load_id above the stage's watermark, up to the chunk's last load)
is read, plus the browser clusters it touches, so an hourly run costs in proportion to the hour, not the history,
and a backfill's chunk in proportion to the chunk. Each chunk's commit moves the watermark to its last load; a run
that dies leaves its chunk uncommitted, and the next run does that chunk's work again. A run with no new load and
the same guards and SQL as the last one (pipeline_state.fingerprint) would change nothing, so it records the time
and stops; and the overview computed after a run is kept in pipeline_state.overview until a run changes something
again.

The files hand their results on in temp tables, which no schema names, so each file says at its top, after the
comment on why it exists, what it takes and what it leaves, in lines that tests/test_identity_steps.py checks
against the SQL and against a real run, step by step:

    -- Reads: raw_events, identity_links, new_observations (temp), upstack_id (macro)
    -- Variables: after_load_id, now
    -- Writes: browser_links, identity_flags
    -- Leaves: touched_sessions (temp), quarantined_kx (variable)

Reads: what it selects from (after `from` or `join`): warehouse tables and views by name, and what an earlier step
left, marked (temp) or (macro). Variables: the session variables it reads and does not set itself (set by
`_set_variables`, or left by an earlier step). Writes: the tables it inserts into, updates or deletes from, an
earlier step's temp table marked (temp). Leaves: the temp tables, temp macros and session variables it creates,
which last until the connection closes. A line with nothing to list is left out; a long one goes on in lines
indented under it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import duckdb
import polars as pl

from upstack_pipeline.settings import PIXEL_TO_KLAVIYO_METRIC, IdentitySettings, Settings
from upstack_pipeline.warehouse import frame, read_sql, set_variables, transaction

STAGE = "identity"
# The events resolved and sent: the pixel events Klaviyo has a metric for (sql/resolved_events.sql reads the list).
COMMERCE_EVENTS = tuple(PIXEL_TO_KLAVIYO_METRIC)
MAX_LABEL_STEPS = 1000
# Repeated until no label moves: connected components by min-label propagation take as many steps as the widest
# cluster, and SQL has no loop.
LABEL_STEP = "browser_cluster_labels_step"
# The identity SQL files in the order a run executes them: each reads only what the ones before it leave.
STEPS = (
    "identifier_normalization", "identity_observations", "identity_rejected_values", "identity_links",
    "browser_links", "email_translations", "browser_clusters", LABEL_STEP, "browser_clusters_finish",
    "resolved_events", "shared_device_guard_scope", "shared_device_guard_check", "identities",
)
# pipeline_state's row holding, as JSON {cluster: events}, the clusters over 0 in sql/shared_device_guard_check.sql,
# counted under its fingerprint as of its load_id: the overview's number, kept per run instead of recounted.
GUARD_STAGE = "shared_device_guard"
# pipeline_state's row holding the overview's counts of resolved_events (events, resolved, by match method, unresolved
# by reason) and its browsers with the most emails, as `overview` last counted them, brought up to date by each chunk
# from the rows it wrote and replaced instead of counted again over the history (`_carry_counts`).
COUNTS_STAGE = "identity_counts"


@dataclass(frozen=True)
class IdentityRun:
    """What one run did, summed over its chunks (an event resolved again in a later chunk counts again)."""

    new_observations: int
    rejected_values: int
    events_resolved: int
    label_steps: int
    chunks: int


def resolve_identities(
    settings: Settings, *, now: datetime,
    after_step: Callable[[duckdb.DuckDBPyConnection, str], None] | None = None,
) -> IdentityRun:
    """Resolves the loads after the watermark in chunks of whole loads, about `settings.identity_chunk_rows`
    ingested rows each, each chunk a transaction of every step that moves the watermark to its last load: a chunk
    is what an hourly run would have done had those loads been its hour, so what a backfill's steps hold of the new
    events is set by the chunk, and a run killed mid-backfill resumes at the chunk it was in, losing and duplicating
    nothing.

    `after_step` sees the run's connection after each step (after the last repeat of LABEL_STEP) of each chunk,
    inside its transaction: the temp tables a step leaves vanish with the connection, so this is the only place to
    look at them (tests/test_identity_steps.py does)."""
    fingerprint = _fingerprint(settings.identity)
    with settings.warehouse().connect() as connection:
        watermark, last_fingerprint = _last_run(connection)
        guard_fingerprint = _guard_breaches(connection)[0]
        chunks = _chunks(connection, watermark, settings.identity_chunk_rows)
        if not chunks:
            # Nothing new, under the same guards: every step would find nothing to change (the supernode verdicts,
            # the clusters and the translations are functions of the tables and the settings alone). A watched run
            # does every step, so that each can be looked at.
            if fingerprint == last_fingerprint and after_step is None:
                connection.execute("update pipeline_state set updated_at = ? where stage = ?", [now, STAGE])
                return IdentityRun(new_observations=0, rejected_values=0, events_resolved=0, label_steps=0,
                                   chunks=0)
            chunks = [(watermark, watermark)]
        # The guard's counts kept are counted again in full under other guards or SQL (or none kept yet), and what
        # the last run's settings decided (translations, quarantines) is decided again when they or the SQL changed
        # (or on the first run): by the first chunk, whose commit keeps them under this run's fingerprint.
        runs = [_resolve_chunk(connection, settings.identity, after_load_id=after, until_load_id=until, now=now,
                               fingerprint=fingerprint, guard_recount=number == 0 and guard_fingerprint != fingerprint,
                               settings_changed=number == 0 and last_fingerprint != fingerprint,
                               after_step=after_step) for number, (after, until) in enumerate(chunks)]
    return IdentityRun(**{name: sum(getattr(run, name) for run in runs) for name in vars(runs[0])})


def _chunks(connection: duckdb.DuckDBPyConnection, watermark: int, chunk_rows: int) -> list[tuple[int, int]]:
    """(after_load_id, until_load_id) of each chunk: consecutive loads of about `chunk_rows` rows (events and
    customers rows alike; customers exports share the load_id sequence), never splitting a load, at least one each.
    Loads, not events, are walked here: a backfill has one per ingestion batch (128 MiB of files by default)."""
    loads = connection.execute("""
        select load_id, sum(ingested_rows) from ingested_files where load_id > ? group by load_id order by load_id
    """, [watermark]).fetchall()
    chunks, after, rows = [], watermark, 0
    for number, (load_id, load_rows) in enumerate(loads):
        rows += load_rows
        following = loads[number + 1][1] if number + 1 < len(loads) else None
        if following is None or rows + following > chunk_rows:
            chunks.append((after, load_id))
            after, rows = load_id, 0
    return chunks


def _resolve_chunk(
    connection: duckdb.DuckDBPyConnection, identity: IdentitySettings, *, after_load_id: int, until_load_id: int,
    now: datetime, fingerprint: str, guard_recount: bool, settings_changed: bool,
    after_step: Callable[[duckdb.DuckDBPyConnection, str], None] | None,
) -> IdentityRun:
    with transaction(connection):
        _set_variables(connection, identity, after_load_id=after_load_id, until_load_id=until_load_id, now=now,
                       guard_recount=guard_recount, settings_changed=settings_changed)
        label_steps = 0
        for step in STEPS:
            if step == LABEL_STEP:
                label_steps = _propagate_cluster_labels(connection)
            else:
                connection.execute(read_sql(step))
            if after_step is not None:
                after_step(connection, step)
        run = IdentityRun(
            new_observations=_count(connection, "new_observations"),
            rejected_values=_count(connection, "new_identifier_candidates where rejection is not null"),
            events_resolved=_count(connection, "targets"),
            label_steps=label_steps,
            chunks=1,
        )
        _carry_counts(connection, fingerprint, after_load_id=after_load_id, until_load_id=until_load_id, now=now)
        connection.execute("insert or replace into pipeline_state (stage, load_id, updated_at, fingerprint, overview) "
                           "values (?, ?, ?, ?, null)", [STAGE, until_load_id, now, fingerprint])
        # The counts kept for the clusters not counted again, and the new ones over 0.
        connection.execute("""
            insert or replace into pipeline_state (stage, load_id, updated_at, fingerprint, overview)
            select ?, ?, ?, ?, coalesce(json_group_object(cluster_id, events), '{}') from (
                select key as cluster_id, value::bigint as events
                from json_each((select overview from pipeline_state
                                where stage = ? and not getvariable('guard_recount')))
                where key not in (select cluster_id from guard_counted)
                union all
                select cluster_id, events from guard_breaches
            )""", [GUARD_STAGE, until_load_id, now, fingerprint, GUARD_STAGE])
    return run


def _last_run(connection: duckdb.DuckDBPyConnection) -> tuple[int, str | None]:
    row = connection.execute("select load_id, fingerprint from pipeline_state where stage = ?", [STAGE]).fetchone()
    return (row[0], row[1]) if row else (0, None)


def _guard_breaches(connection: duckdb.DuckDBPyConnection) -> tuple[str | None, dict[str, int]]:
    """The fingerprint the guard's counts kept were counted under (None: none kept) and the clusters over 0."""
    row = connection.execute("select fingerprint, overview from pipeline_state where stage = ?",
                             [GUARD_STAGE]).fetchone()
    return (row[0], json.loads(row[1])) if row else (None, {})


def _fingerprint(identity: IdentitySettings) -> str:
    """What a run depends on besides the tables: the guards, the commerce events and this release's SQL."""
    text = repr((identity, COMMERCE_EVENTS, [read_sql(step) for step in STEPS]))
    return hashlib.sha256(text.encode()).hexdigest()


def _set_variables(
    connection: duckdb.DuckDBPyConnection, identity: IdentitySettings, *, after_load_id: int, until_load_id: int,
    now: datetime, guard_recount: bool, settings_changed: bool,
) -> None:
    variables = {
        # The chunk's loads: after_load_id < load_id <= until_load_id.
        "after_load_id": after_load_id,
        "until_load_id": until_load_id,
        "commerce_events": list(COMMERCE_EVENTS),
        # Customers exports share the load_id sequence with events, so one watermark (and one bound) covers both.
        "after_customers_load_id": after_load_id,
        "now": now,
        "blocked_emails": [entry.lower() for entry in identity.blocked_emails],
        "max_emails_per_browser": identity.max_emails_per_browser,
        "max_browsers_per_cluster": identity.max_browsers_per_cluster,
        "max_browsers_per_identifier": identity.max_browsers_per_identifier,
        "supernode_window": identity.supernode_window,
        "click_handoff_window": identity.click_handoff_window,
        "cookie_lifetime": identity.cookie_lifetime,
        "probabilistic_matching": identity.probabilistic_matching,
        "probabilistic_window": identity.probabilistic_window,
        # Whether sql/shared_device_guard_check.sql counts every cluster, not only those this chunk touched.
        "guard_recount": guard_recount,
        # Whether the identity settings or SQL differ from the last run's: sql/identity_rejected_values.sql then
        # judges every quarantined value again and sql/email_translations.sql translates every identifier.
        "settings_changed": settings_changed,
    }
    set_variables(connection, variables)


def _propagate_cluster_labels(connection: duckdb.DuckDBPyConnection) -> int:
    """Repeats one min-label step until no label moves: as many steps as the widest cluster, not one per event."""
    step_sql = read_sql(LABEL_STEP)
    for step in range(1, MAX_LABEL_STEPS + 1):
        if connection.execute(step_sql).fetchone()[0] == 0:
            return step
    raise RuntimeError(f"browser clusters did not converge in {MAX_LABEL_STEPS} steps")


def _count(connection: duckdb.DuckDBPyConnection, relation: str) -> int:
    return connection.execute(f"select count(*) from {relation}").fetchone()[0]


@dataclass(frozen=True)
class IdentityOverview:
    """The state of resolution after a run, for operators (asset metadata) and checks."""

    commerce_events: int
    resolved_events: int
    by_match_method: dict[str, int]
    unresolved_by_reason: dict[str, int]
    identities: int
    rejected_values: pl.DataFrame  # the most frequent, with their reason
    flags_by_kind: dict[str, int]
    largest_shared_browsers: pl.DataFrame
    history_attributions_over_guard: int  # must be 0: history used on a browser past max_emails_per_browser


def overview(settings: Settings, *, limit: int = 5) -> IdentityOverview:
    """Put together once after each run that changed something, then kept in pipeline_state.overview (with the
    settings and the limit it was put together under) for the runs that change nothing: only resolve_identities
    writes these tables, and every run of it that does clears the copy. The numbers that would read the history are
    not counted again: each run brings resolved_events' counts and the browsers with the most emails up to date
    (COUNTS_STAGE), and keeps the shared-device guard's check (GUARD_STAGE), counted again only on the clusters it
    changed; each is counted whole only when none is kept under this release's settings and SQL (and the browsers
    after a run that changed a quarantine). The rest is read from small tables."""
    key = {"fingerprint": _fingerprint(settings.identity), "limit": limit}
    with settings.warehouse().connect() as connection:
        kept = connection.execute("select overview from pipeline_state where stage = ?", [STAGE]).fetchone()
        if kept and kept[0] is not None and (memo := json.loads(kept[0]))["key"] == key:
            return _from_memo(memo["overview"])
        state = _count_overview(connection, settings.identity, limit, key["fingerprint"])
        if kept:
            connection.execute("update pipeline_state set overview = ? where stage = ?",
                                [json.dumps({"key": key, "overview": _to_memo(state)}), STAGE])
    return state


def _count_overview(connection: duckdb.DuckDBPyConnection, guard: IdentitySettings, limit: int,
                    fingerprint: str) -> IdentityOverview:
    def pairs(query: str) -> dict:
        return dict(connection.execute(query).fetchall())

    load_id, updated_at, last_fingerprint = connection.execute(
        "select load_id, updated_at, fingerprint from pipeline_state where stage = ?", [STAGE]).fetchone() or (
        None, None, None)
    counts = _kept_counts(connection, load_id, fingerprint) if last_fingerprint == fingerprint else None
    if counts is not None and counts["commerce_events"] != connection.execute(
            "select count(*) from resolved_events").fetchall()[0][0]:
        counts = None  # the table changed otherwise (by hand): counted again
    if counts is None:
        counts = {"fingerprint": fingerprint, **_counted_events(connection)}
    shared = counts.get("largest_shared_browsers")
    if shared is None or shared["limit"] < limit:
        shared = {"limit": limit, "rows": _shared_browsers(connection, "usable_identity_links", limit=limit)}
    if load_id is not None:
        _keep_counts(connection, {**counts, "largest_shared_browsers": shared}, load_id=load_id, updated_at=updated_at)
    kept_under, breaches = _guard_breaches(connection)
    over_guard = sum(breaches.values()) if kept_under == fingerprint else _count_guard(connection, guard)
    return IdentityOverview(
        commerce_events=counts["commerce_events"],
        resolved_events=counts["resolved_events"],
        by_match_method=counts["by_match_method"],
        unresolved_by_reason=counts["unresolved_by_reason"],
        identities=connection.execute("select count(*) from identities").fetchall()[0][0],
        rejected_values=frame(connection.sql(
            "select id_type, value, reason, times_seen from identity_rejected_values "
            "order by times_seen desc, value limit $limit", params={"limit": limit})),
        flags_by_kind=pairs("select flag, count(*) from identity_flags group by 1 order by 2 desc"),
        largest_shared_browsers=pl.DataFrame([tuple(row) for row in shared["rows"][:limit]],
                                             schema={"anonymous_id": pl.String, "emails": pl.Int64}, orient="row"),
        history_attributions_over_guard=over_guard,
    )


def _counted_events(connection: duckdb.DuckDBPyConnection) -> dict:
    """The overview's counts of resolved_events, counted over the whole table."""
    rows = connection.execute("""
        select match_method, unresolved_reason, count(*) from resolved_events group by all""").fetchall()
    return _events_counts({"commerce_events": 0, "resolved_events": 0, "by_match_method": {},
                           "unresolved_by_reason": {}}, rows)


def _events_counts(counts: dict, changes: list[tuple[str | None, str | None, int]]) -> dict:
    """`counts` with `changes` (match method, unresolved reason, rows added: negative for rows taken away) added,
    each dict of counts without its zeros and in the order of its counts, largest first."""
    total, resolved = counts["commerce_events"], counts["resolved_events"]
    by_method, by_reason = dict(counts["by_match_method"]), dict(counts["unresolved_by_reason"])
    for method, reason, rows in changes:
        total += rows
        if method is not None:
            resolved += rows
            by_method[method] = by_method.get(method, 0) + rows
        if reason is not None:
            by_reason[reason] = by_reason.get(reason, 0) + rows

    def ordered(found: dict) -> dict:
        return dict(sorted(((key, rows) for key, rows in found.items() if rows), key=lambda item: (-item[1], item[0])))

    return {"commerce_events": total, "resolved_events": resolved, "by_match_method": ordered(by_method),
            "unresolved_by_reason": ordered(by_reason)}


def _kept_counts(connection: duckdb.DuckDBPyConnection, load_id: int | None, fingerprint: str) -> dict | None:
    """The counts COUNTS_STAGE keeps, when they were kept as of identity's run up to `load_id` under `fingerprint`;
    else None. (A run of another release in between, which does not bring them up to date, moves identity's marks.)"""
    row = connection.execute("select load_id, fingerprint, overview from pipeline_state where stage = ?",
                             [COUNTS_STAGE]).fetchone()
    if row is None or row[2] is None or (row[0], row[1]) != (load_id, fingerprint):
        return None
    return json.loads(row[2])


def _keep_counts(connection: duckdb.DuckDBPyConnection, counts: dict, *, load_id: int, updated_at: datetime) -> None:
    connection.execute("insert or replace into pipeline_state (stage, load_id, updated_at, fingerprint, overview) "
                       "values (?, ?, ?, ?, ?)",
                       [COUNTS_STAGE, load_id, updated_at, counts["fingerprint"], json.dumps(counts)])


def _carry_counts(connection: duckdb.DuckDBPyConnection, fingerprint: str, *, after_load_id: int,
                  until_load_id: int, now: datetime) -> None:
    """The counts COUNTS_STAGE keeps, brought up to date with the rows this chunk wrote to resolved_events and the
    rows it replaced (sql/resolved_events.sql leaves both), and with the browsers whose emails its links added to:
    an hourly run's overview then reads its few rows instead of counting the history. Called before the chunk
    records its run: counts not kept as of the run before (up to `after_load_id`, under `fingerprint`: other
    settings or SQL, or a run of another release in between) are dropped, for the next overview to count. So is
    the list of browsers when this chunk changed a quarantine: a quarantined email leaves every browser that showed
    it, which its links do not say."""
    last = connection.execute("select load_id, fingerprint from pipeline_state where stage = ?", [STAGE]).fetchone()
    counts = _kept_counts(connection, after_load_id, fingerprint) if last == (after_load_id, fingerprint) else None
    if counts is None:
        connection.execute("delete from pipeline_state where stage = ?", [COUNTS_STAGE])
        return
    changes = connection.execute("""
        select match_method, unresolved_reason, sum(rows)::bigint from (
            select match_method, unresolved_reason, 1 as rows
            from new_resolutions anti join previous_resolutions using (event_id)
            union all
            select match_method, unresolved_reason, 1 from changed_resolutions
            union all
            select match_method, unresolved_reason, -1
            from previous_resolutions semi join changed_resolutions using (event_id)
        )
        group by all""").fetchall()
    counts = {**counts, **_events_counts(counts, changes)}
    shared = counts.get("largest_shared_browsers")
    if shared is not None and connection.execute("select count(*) from supernode_changes").fetchone()[0]:
        shared = None
    elif shared is not None:
        # A browser's emails only grow while no quarantine changes: the browsers its links touched, counted again,
        # and the kept ones are still the largest. Their links are found first, then the quarantine applied as
        # usable_identity_links applies it (through the view, every link of the history was checked first).
        touched = _shared_browsers(connection, """(
            with candidate_links as materialized (
                select * from identity_links
                semi join (select left_value from links_this_run
                           where left_type = 'anonymous_id' and right_type = 'email') as touched using (left_value)
            )
            select link.* from candidate_links as link
            anti join quarantined_identifiers() as quarantined_cookie
                on quarantined_cookie.id_type = link.left_type and quarantined_cookie.value = link.left_value
            anti join quarantined_identifiers() as quarantined
                on quarantined.id_type = link.right_type and quarantined.value = link.right_value
        )""")
        recounted = {cookie for cookie, _ in touched}
        rows = [row for row in shared["rows"] if row[0] not in recounted] + touched
        shared = {"limit": shared["limit"], "rows": sorted(rows, key=lambda row: (-row[1], row[0]))[:shared["limit"]]}
    _keep_counts(connection, {**counts, "largest_shared_browsers": shared}, load_id=until_load_id, updated_at=now)


def _shared_browsers(connection: duckdb.DuckDBPyConnection, links: str, *, limit: int | None = None) -> list[list]:
    """The browsers (cookies) that showed more than one email, each with how many, most first (the first `limit`):
    from `links`, SQL for identity links without the quarantined ones (usable_identity_links, or a chunk's few)."""
    return [list(row) for row in connection.execute(f"""
        select left_value as anonymous_id, count(distinct right_value) as emails
        from {links} where left_type = 'anonymous_id' and right_type = 'email'
        group by left_value having count(distinct right_value) > 1
        order by emails desc, anonymous_id limit $limit""", {"limit": limit}).fetchall()]


def _count_guard(connection: duckdb.DuckDBPyConnection, guard: IdentitySettings) -> int:
    """The guard's check over every cluster, for an overview asked under other guards than the last run's."""
    set_variables(connection, {"guard_recount": True, "cookie_lifetime": guard.cookie_lifetime,
                               "max_emails_per_browser": guard.max_emails_per_browser})
    connection.execute("create or replace temp table guard_clusters (cluster_id varchar)")
    connection.execute(read_sql("shared_device_guard_check"))
    return connection.execute("select coalesce(sum(events), 0) from guard_breaches").fetchone()[0]


FRAMES = ("rejected_values", "largest_shared_browsers")


def _to_memo(state: IdentityOverview) -> dict:
    memo = dict(vars(state))
    for name in FRAMES:
        memo[name] = {"columns": memo[name].columns, "rows": memo[name].rows()}
    return memo


def _from_memo(memo: dict) -> IdentityOverview:
    frames = {name: pl.DataFrame(memo[name]["rows"], schema=memo[name]["columns"], orient="row") for name in FRAMES}
    return IdentityOverview(**{**memo, **frames})
