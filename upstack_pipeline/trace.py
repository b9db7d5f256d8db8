"""One shopper's story, for the person answering "why did Klaviyo get this event, or not?".

Every step is already in the warehouse (the landing line in raw_events, the ties in identity_links and
browser_links, the resolution in resolved_events, the decision in klaviyo_outbox or klaviyo_skipped, the requests in
klaviyo_deliveries); what was missing is the thread through them. The view shopper_journey is that thread, one row
per commerce event, and `trace()` reads it for one person with the ties that named them, in a handful of set-based
queries over the few rows a person has. `format_trace()` is the text `upstack trace` prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import duckdb

from upstack_pipeline.klaviyo.mapping import KEY_PROPERTIES
from upstack_pipeline.settings import PIXEL_TO_KLAVIYO_METRIC, Settings

JOURNEY_VIEW = "shopper_journey"
WHAT_TO_PASS = ("Pass an event_id (the pixel's), an upstack_id (up_ and 20 hex digits, from identities or "
                "resolved_events), an anonymous_id (the pixel's cookie) or an email address (any case).")

# Identifier types (identity_links, identity_rejected_values) as a support engineer says them.
_IDENTIFIER_NAMES = {"anonymous_id": "cookie", "session_id": "session", "email": "email", "email_hash": "email hash",
                     "phone": "phone", "phone_hash": "phone hash", "customer_id": "customer id", "kx": "_kx",
                     "fbclid": "fbclid", "gclid": "gclid", "ttclid": "ttclid", "msclkid": "msclkid"}
_CLICK_IDS = ("fbclid", "gclid", "ttclid", "msclkid")
_BROWSER_RULES = {
    "shared_session": "one session on both cookies: one browser (its cookie was reset mid-session)",
    "click_id_handoff": "one ad click opened on both within 30 minutes: an in-app browser handing over to the "
                        "phone's own",
    "ip_user_agent": "same IP and user agent within 10 minutes of a new cookie (probabilistic matching)",
}
_SKIP_REASONS = {
    "disabled_event": "this pixel event is not in UPSTACK_ENABLED_EVENTS",
    "no_consent": "the shopper's consent.marketing is false",
    "unresolved": "nobody could be named",
    "native_identified": "Klaviyo identifies it itself, and send mode backup sends only what it cannot",
    "profile_creation_disabled": "UPSTACK_CREATE_PROFILES is false and only a _kx proves Klaviyo has the profile",
    "invalid": "the payload breaks one of Klaviyo's limits",
}
_OUTBOX_STATUSES = {
    "pending": "waiting for the next delivery run",
    "claimed": "in a request whose answer was never recorded (a run stopped); the next run sends it again, and "
               "Klaviyo's dedupe on unique_id absorbs a copy that had arrived",
    "delivered": "Klaviyo accepted it",
    "dead_letter": "Klaviyo refused it; it is not sent again",
}


@dataclass(frozen=True)
class Person:
    upstack_id: str
    email: str | None
    kx: str | None
    phones: list[str]
    customer_ids: list[str]
    first_name: str | None
    last_name: str | None
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True)
class Tie:
    """Something that joined two identifiers, or a guard that refused to: what, when, on what evidence, by which
    rule."""

    when: datetime | None
    what: str
    evidence: str
    rule: str


@dataclass(frozen=True)
class JourneyEvent:
    """A row of shopper_journey as trace() reads it: the view is the one place its parts are defined
    (sql/shopper_journey.sql), so the text and an analyst's query tell the same story."""

    upstack_id: str | None
    email: str | None
    event_id: str
    event_name: str
    event_time: datetime
    session_id: str
    anonymous_id: str
    source_file: str | None
    line_number: int | None
    raw_json: str | None
    match_method: str | None
    evidence_event_id: str | None
    unresolved_reason: str | None
    klaviyo_native: bool
    klaviyo_native_reason: str | None
    decision: str
    outbox_status: str | None
    skipped_reason: str | None
    skipped_detail: str | None
    metric_name: str | None
    profile_key: str | None
    profile: dict | None
    event: dict | None
    request_id: str | None
    http_status: int | None
    klaviyo_error: str | None
    sent_at: datetime | None
    attempts: int | None
    dead_letter_detail: str | None
    # Not in the view: the evidence event where it is another one (its name, time, session, landing line), and a
    # Purchase's Ordered Product lines by outbox status.
    evidence: str | None = None
    order_lines: dict[str, int] = field(default_factory=dict)


_VIEW_COLUMNS = [column.name for column in fields(JourneyEvent) if column.name not in ("evidence", "order_lines")]


@dataclass(frozen=True)
class Trace:
    needle: str
    # What the needle was taken for, the first that matches of: event_id, upstack_id, anonymous_id, email (most
    # specific first). None when nothing matched: the notes say what to pass.
    found_as: str | None
    person: Person | None
    # The cookies (anonymous_id) the story covers: the person's, with the other cookies of their browser clusters;
    # without a person, the needle's browser.
    browsers: list[str]
    ties: list[Tie]
    events: list[JourneyEvent]
    notes: list[str]


def trace(settings: Settings, needle: str) -> Trace:
    """The story behind `needle`: an event_id, an upstack_id, an anonymous_id or an email, tried in that order.
    Reads the warehouse read-only, so it can run beside a notebook; it waits while a sync writes."""
    needle = needle.strip()
    if not settings.warehouse_path.exists():
        return _no_story(needle, [
            f"There is no warehouse at {settings.warehouse_path}: set UPSTACK_WAREHOUSE, or run `upstack sync`."])
    with settings.warehouse().connect(read_only=True) as connection:
        if not connection.execute("select count(*) from duckdb_views() where view_name = ?",
                                  [JOURNEY_VIEW]).fetchone()[0]:
            return _no_story(needle, [
                f"The warehouse has no {JOURNEY_VIEW} view yet: run `upstack sync` (every sync creates it)."])
        return _trace(connection, needle)


def _trace(connection: duckdb.DuckDBPyConnection, needle: str) -> Trace:
    found_as = _kind(connection, needle)
    if found_as is None:
        return _no_story(needle, _unmatched(connection, needle))
    notes: list[str] = []
    upstack_id, cookies, only_event = None, [], None
    if found_as == "event_id":
        only_event = needle
        row = connection.execute("select upstack_id, anonymous_id from resolved_events where event_id = ?",
                                 [needle]).fetchone()
        if row is None:
            name, cookie, source_file, line = connection.execute(
                "select event_name, anonymous_id, source_file, line_number from raw_events where event_id = ?",
                [needle]).fetchone()
            notes.append(f"{needle} is a {name} event ({source_file} line {line}, cookie {cookie}), not a commerce "
                         "event: nothing of it goes to Klaviyo.")
            row = (None, cookie)
        upstack_id, cookies = row[0], [row[1]]
    elif found_as == "upstack_id":
        upstack_id = needle
    elif found_as == "email":
        upstack_id = connection.execute("select upstack_id from identities where email = lower(?)",
                                        [needle]).fetchone()[0]
    else:
        cookies = [needle]
        people = _people_of_cookie(connection, needle)
        if people:
            upstack_id = people[0][0]
            if len(people) > 1:
                others = ", ".join(email or kx for _, email, kx in people[1:])
                notes.append(f"Cookie {needle} also names {others} (a shared device?): this is the story of the "
                             f"latest, {people[0][1] or people[0][2]}; trace the others by email.")

    person = _person(connection, upstack_id) if upstack_id else None
    identifiers = _identifiers(person)
    cookies = _cluster_cookies(connection, cookies + _person_cookies(connection, person, identifiers))
    if only_event is not None:
        events = _journey(connection, "event_id = ?", [only_event])
    elif person is not None:
        # The person's events, and those on their browsers that named nobody: "why was my cart not sent?"
        events = _journey(connection, "upstack_id = ? or (upstack_id is null and list_contains(?, anonymous_id))",
                          [person.upstack_id, cookies])
    else:
        events = _journey(connection, "list_contains(?, anonymous_id)", [cookies])
    return Trace(needle, found_as, person, cookies, _ties(connection, identifiers, cookies), events, notes)


def _no_story(needle: str, notes: list[str]) -> Trace:
    return Trace(needle, None, None, browsers=[], ties=[], events=[], notes=notes)


def _kind(connection: duckdb.DuckDBPyConnection, needle: str) -> str | None:
    found = connection.execute("""
        select kind from (
            select 1 as rank, 'event_id' as kind where exists (select 1 from raw_events where event_id = $needle)
            union all
            select 2, 'upstack_id' where exists (select 1 from identities where upstack_id = $needle)
            union all
            select 3, 'anonymous_id' where exists (select 1 from raw_events where anonymous_id = $needle)
            union all
            select 4, 'email' where exists (select 1 from identities where email = lower($needle))
        ) order by rank limit 1""", {"needle": needle}).fetchone()
    return found[0] if found else None


def _unmatched(connection: duckdb.DuckDBPyConnection, needle: str) -> list[str]:
    """What the needle is, when it is no one: a quarantined line, or a value never used as an identifier."""
    notes = [f"Nothing in the warehouse matches {needle!r}. {WHAT_TO_PASS}"]
    for source_file, line, reason, detail in connection.execute(
            "select source_file, line_number, reason, detail from quarantined_events where event_id = ? "
            "order by source_file, line_number", [needle]).fetchall():
        notes.append(f"{needle} is the event_id of a line that was quarantined, never ingested: {source_file} line "
                     f"{line}, {reason} ({detail}).")
    for id_type, value, reason, browsers in connection.execute(
            "select id_type, value, reason, browsers from identity_rejected_values "
            "where value = ? or value = lower(?) order by id_type", [needle, needle]).fetchall():
        seen = f", seen on {browsers} browsers" if browsers else ""
        notes.append(f"{_IDENTIFIER_NAMES.get(id_type, id_type)} {value} is never used as an identifier: "
                     f"{reason}{seen} (table identity_rejected_values).")
    return notes


def _people_of_cookie(connection: duckdb.DuckDBPyConnection, cookie: str) -> list[tuple[str, str | None, str | None]]:
    """(upstack_id, email, _kx) of everyone a cookie names, the latest first: by its resolved events, or by the
    person identifiers it showed."""
    return connection.execute("""
        with named as (
            select upstack_id, event_time as seen_at from resolved_events
            where anonymous_id = $cookie and upstack_id is not null
            union all
            select identities.upstack_id, link.last_seen
            from identity_links as link
            join identities on identities.anchor_type = link.right_type
                and link.right_value = if(identities.anchor_type = 'email', identities.email, identities.kx)
            where link.left_type = 'anonymous_id' and link.left_value = $cookie
        )
        select upstack_id, any_value(identities.email), any_value(identities.kx)
        from named join identities using (upstack_id)
        group by upstack_id order by max(seen_at) desc, upstack_id""", {"cookie": cookie}).fetchall()


def _person(connection: duckdb.DuckDBPyConnection, upstack_id: str) -> Person | None:
    row = connection.execute("""
        select upstack_id, email, kx, phones, customer_ids, first_name, last_name, first_seen, last_seen
        from identities where upstack_id = ?""", [upstack_id]).fetchone()
    return None if row is None else Person(*row)


def _person_cookies(connection: duckdb.DuckDBPyConnection, person: Person | None,
                    identifiers: list[tuple[str, str]]) -> list[str]:
    """The cookies that showed one of the person's identifiers, or whose events name them."""
    if person is None:
        return []
    return [cookie for (cookie,) in connection.execute("""
        with identifiers as (select unnest($types) as id_type, unnest($values) as id_value)
        select link.left_value from identity_links as link
        semi join identifiers on identifiers.id_type = link.right_type and identifiers.id_value = link.right_value
        where link.left_type = 'anonymous_id'
        union
        select anonymous_id from resolved_events where upstack_id = $upstack_id""",
        {"types": [kind for kind, _ in identifiers], "values": [value for _, value in identifiers],
         "upstack_id": person.upstack_id}).fetchall()]


def _identifiers(person: Person | None) -> list[tuple[str, str]]:
    if person is None:
        return []
    return ([("email", person.email)] if person.email else []) + ([("kx", person.kx)] if person.kx else []) \
        + [("phone", phone) for phone in person.phones] \
        + [("customer_id", customer_id) for customer_id in person.customer_ids]


def _cluster_cookies(connection: duckdb.DuckDBPyConnection, cookies: list[str]) -> list[str]:
    """The cookies, with every other cookie of their browser clusters."""
    return [cookie for (cookie,) in connection.execute("""
        select distinct coalesce(member.anonymous_id, seed.anonymous_id) as cookie
        from (select unnest($cookies) as anonymous_id) as seed
        left join browser_clusters as cluster using (anonymous_id)
        left join browser_clusters as member on member.browser_cluster_id = cluster.browser_cluster_id
        order by cookie""", {"cookies": cookies}).fetchall()]


def _ties(connection: duckdb.DuckDBPyConnection, identifiers: list[tuple[str, str]], cookies: list[str]) -> list[Tie]:
    parameters = {"types": [kind for kind, _ in identifiers], "values": [value for _, value in identifiers],
                  "cookies": cookies}
    links = connection.execute("""
        with identifiers as (select unnest($types) as id_type, unnest($values) as id_value),
        touching as (
            select link.* from identity_links as link
            semi join identifiers on identifiers.id_type = link.left_type and identifiers.id_value = link.left_value
            union
            select link.* from identity_links as link
            semi join identifiers on identifiers.id_type = link.right_type and identifiers.id_value = link.right_value
            union
            select * from identity_links where left_type = 'anonymous_id' and list_contains($cookies, left_value)
        )
        select touching.*, raw.source_file, raw.line_number
        from touching left join raw_events as raw on raw.event_id = touching.first_event_id
        order by first_seen, left_type, left_value, right_type, right_value""", parameters).fetchall()
    ties = [_link_tie(*link) for link in links]
    for cookie, other, linked_by, evidence, first_seen in connection.execute("""
            select anonymous_id, other_anonymous_id, linked_by, evidence, first_seen from browser_links
            where list_contains($cookies, anonymous_id) or list_contains($cookies, other_anonymous_id)
            order by first_seen""", {"cookies": cookies}).fetchall():
        ties.append(Tie(first_seen, f"cookie {cookie} = cookie {other}", f"{linked_by} {evidence}",
                        _BROWSER_RULES.get(linked_by, linked_by)))
    clusters = connection.execute("""
        select browser_cluster_id, list(anonymous_id order by anonymous_id), any_value(linked_by)
        from browser_clusters where browser_cluster_id in (
            select browser_cluster_id from browser_clusters where list_contains($cookies, anonymous_id))
        group by browser_cluster_id order by browser_cluster_id""", {"cookies": cookies}).fetchall()
    for cluster_id, members, linked_by in clusters:
        ties.append(Tie(None, f"browser {cluster_id}: cookies {', '.join(members)}", f"joined by {linked_by}",
                        "one browser: the history of each cookie names the sessions of all"))
    # A guard's subject is a cookie, a cluster, two cookies ('a ~ b'), a click id or an identifier.
    subjects = cookies + [cluster_id for cluster_id, _, _ in clusters] + [value for _, value in identifiers] \
        + [link[3] for link in links if link[0] == "anonymous_id"]
    for flag, subject, detail, flagged_at in connection.execute("""
            select flag, subject, detail, flagged_at from identity_flags
            where list_contains($subjects, subject) or list_has_any(string_split(subject, ' ~ '), $cookies)
            order by flagged_at, flag, subject""", {"subjects": subjects, "cookies": cookies}).fetchall():
        ties.append(Tie(flagged_at, f"flag {flag} on {subject}", detail,
                        "a guard refused a tie: nobody rather than maybe the wrong person (identity_flags)"))
    for id_type, value, reason, times_seen, first_seen, last_seen, browsers in connection.execute("""
            with typed as (
                select unnest([lower(trim(user_data.email)), trim(user_data.phone), lower(trim(user_data.em)),
                               lower(trim(user_data.ph)), trim(user_data.external_id), trim(user_data.kx)]) as value
                from raw_events where list_contains($cookies, anonymous_id)
            )
            select id_type, value, reason, times_seen, first_seen, last_seen, browsers
            from identity_rejected_values
            where list_contains($subjects, value) or value in (select value from typed)
            order by first_seen, id_type, value""", {"subjects": subjects, "cookies": cookies}).fetchall():
        on_browsers = f", on {browsers} browsers" if browsers else ""
        ties.append(Tie(first_seen, f"{_IDENTIFIER_NAMES.get(id_type, id_type)} {value} rejected: {reason}",
                        f"seen {_times(times_seen)}{on_browsers}, last {_when(last_seen)}",
                        "never used as an identifier (identity_rejected_values)"))
    return sorted(ties, key=lambda tie: (tie.when is None, tie.when or datetime.min))


def _link_tie(left_type, left_value, right_type, right_value, first_seen, last_seen, times_seen, first_event_id,
              source_file, line_number) -> Tie:
    what = f"{_IDENTIFIER_NAMES.get(left_type, left_type)} {left_value} <-> " \
           f"{_IDENTIFIER_NAMES.get(right_type, right_type)} {right_value}"
    if first_event_id.startswith("customers:"):
        via = f"the customers export {first_event_id.removeprefix('customers:')}"
    else:
        via = f"event {first_event_id}" + (f" ({source_file} line {line_number})" if source_file else "")
    evidence = f"first seen {_when(first_seen)} via {via}; {_times(times_seen)}, last {_when(last_seen)}"
    if left_type == "anonymous_id" and right_type in _CLICK_IDS:
        rule = "ad click on this browser; opened on another cookie within 30 minutes, it joins them"
    elif left_type == "anonymous_id" and right_type == "kx":
        rule = "Klaviyo link opened on this browser: names its sessions when no email does (klaviyo_click)"
    elif left_type == "anonymous_id":
        rule = "seen on this browser: names its session (same_session) and its later ones (cookie_history)"
    elif first_event_id.startswith("customers:"):
        rule = "customers export: a login names its email (customer_file)"
    else:
        rule = "seen together on one event: translates to this email when it names no other"
    return Tie(first_seen, what, evidence, rule)


def _journey(connection: duckdb.DuckDBPyConnection, where: str, parameters: list) -> list[JourneyEvent]:
    rows = connection.execute(
        f"select {', '.join(_VIEW_COLUMNS)} from {JOURNEY_VIEW} where {where} order by event_time, event_id",
        parameters).fetchall()
    events = [dict(zip(_VIEW_COLUMNS, row)) for row in rows]
    event_ids = [event["event_id"] for event in events]
    evidence = {event_id: f"{event_id}, {name} at {_when(at)}, session {session} ({source_file} line {line})"
                for event_id, name, at, session, source_file, line in connection.execute(
                    "select event_id, event_name, event_time, session_id, source_file, line_number from raw_events "
                    "where list_contains(?, event_id)",
                    [[event["evidence_event_id"] for event in events if event["evidence_event_id"]]]).fetchall()}
    order_lines: dict[str, dict[str, int]] = {}
    for event_id, status, count in connection.execute(
            "select event_id, status, count(*) from klaviyo_outbox where list_contains(?, event_id) "
            "and unique_id <> event_id group by all order by all", [event_ids]).fetchall():
        order_lines.setdefault(event_id, {})[status] = count
    return [JourneyEvent(**{**event, "profile": _json(event["profile"]), "event": _json(event["event"])},
                         evidence=None if event["evidence_event_id"] in (None, event["event_id"])
                         else evidence.get(event["evidence_event_id"], event["evidence_event_id"]),
                         order_lines=order_lines.get(event["event_id"], {}))
            for event in events]


def format_trace(trace: Trace) -> str:
    """Plain text, top to bottom: the person, what tied them, then each commerce event from its landing line to
    Klaviyo's answer."""
    lines = [f"Trace of {trace.needle}: " + (f"found as an {trace.found_as}" if trace.found_as else "no match")]
    lines += [f"  {note}" for note in trace.notes]
    person = trace.person
    if person is not None:
        name = " ".join(part for part in (person.first_name, person.last_name) if part)
        lines += ["", f"Person {person.upstack_id}",
                  f"  email {person.email or '-'}, _kx {person.kx or '-'}" + (f", name {name}" if name else ""),
                  f"  phones {', '.join(person.phones) or '-'}, customer ids {', '.join(person.customer_ids) or '-'}",
                  f"  seen {_when(person.first_seen)} to {_when(person.last_seen)}",
                  f"  browsers ({len(trace.browsers)}): {', '.join(trace.browsers) or '-'}"]
    elif trace.browsers:
        lines += ["", f"Browser {', '.join(trace.browsers)} (no person named)"]
    if trace.ties:
        lines += ["", "Ties (what tied these identifiers, and what the guards refused), oldest first"]
        for tie in trace.ties:
            lines += [f"  {tie.what}", f"      {tie.evidence}", f"      rule: {tie.rule}"]
    if trace.found_as is not None:
        lines += ["", f"Commerce events ({len(trace.events)}), in time order"]
        lines += [line for event in trace.events for line in _event_lines(event)]
        if not trace.events:
            lines.append("  none")
    return "\n".join(lines) + "\n"


def _event_lines(event: JourneyEvent) -> list[str]:
    lines = [f"  {_when(event.event_time)}  {event.event_name} {event.event_id}  (cookie {event.anonymous_id}, "
             f"session {event.session_id})",
             f"      landed:    {event.source_file} line {event.line_number}"]
    if event.match_method:
        evidence = "this event" if event.evidence is None else event.evidence
        lines.append(f"      resolved:  {event.email or event.upstack_id} by {event.match_method}, evidence {evidence}")
    else:
        lines.append(f"      resolved:  nobody ({event.unresolved_reason})")
    if event.klaviyo_native:
        lines.append(f"      Klaviyo identifies it natively ({event.klaviyo_native_reason})")
    if event.decision == "skipped":
        detail = f" ({event.skipped_detail})" if event.skipped_detail else ""
        lines.append(f"      decision:  skipped, {event.skipped_reason}{detail}")
        lines.append(f"      not sent:  {_SKIP_REASONS.get(event.skipped_reason, event.skipped_reason)}")
        return lines
    if event.decision == "undecided":
        lines.append("      decision:  none yet: its session has not been idle 30 minutes; a later sync decides it")
        return lines
    lines.append(f"      decision:  outbox, {event.outbox_status}: {_OUTBOX_STATUSES.get(event.outbox_status, '')}")
    lines.append(f"      payload:   {_payload(event)}")
    if event.order_lines:
        lines.append("      lines:     Ordered Product events: "
                     + ", ".join(f"{count} {status}" for status, count in event.order_lines.items()))
    if event.request_id is None:
        lines.append("      request:   none yet")
    else:
        # Klaviyo's errors come summarised with their status ("HTTP 400: ..."), a lost answer with its cause.
        answer = event.klaviyo_error or (f"HTTP {event.http_status}" if event.http_status else "no answer")
        lines.append(f"      request:   {event.request_id}: {answer} ({_times(event.attempts, 'attempt')}, "
                     f"the last sent {_when(event.sent_at)})")
    if event.dead_letter_detail:
        lines.append(f"      refused:   {event.dead_letter_detail}")
    return lines


def _payload(event: JourneyEvent) -> str:
    """The metric, the profile it goes to and the properties a flow's email renders, on one line."""
    attributes = event.event or {}
    properties = attributes.get("properties") or {}
    keys = [key for key in KEY_PROPERTIES.get(PIXEL_TO_KLAVIYO_METRIC.get(event.event_name), ()) if key != "Items"]
    parts = [f"{key} {_compact(properties[key])}" for key in [*keys, "ItemNames"] if key in properties]
    if attributes.get("value") is not None:
        parts.append(f"value {_compact(attributes['value'])} {attributes.get('value_currency') or ''}".rstrip())
    if attributes.get("backfill"):
        parts.append("backfill (older than 24 hours when sent: recorded without firing flows)")
    return f"{event.metric_name} for {event.profile_key}: {', '.join(parts)}"


def _compact(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_compact(item) for item in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json(text: str | None) -> dict | None:
    return None if text is None else json.loads(text)


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _times(count: int | None, noun: str = "time") -> str:
    return f"{count or 0} {noun}{'' if count == 1 else 's'}"
