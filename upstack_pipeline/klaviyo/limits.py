"""Klaviyo's documented limits that its published schemas state only in prose, as pure checks.

Klaviyo's OpenAPI spec and the request models of its Python SDK check the *structure* of a payload (required
keys, types, enum values) but not its limits: neither counts events, bytes, properties or characters, neither
checks a time range or that a profile has an identifier, and both accept unknown keys. A payload that breaks one
of these limits passes both validators and is then refused by Klaviyo, often together with every other event in
the same request. This module checks those limits before a payload is written to the outbox or sent, so a bad
event is recorded as `invalid` with a precise reason instead of poisoning a whole batch.

Shapes, verified against Klaviyo's OpenAPI spec revision 2026-07-15 (OAS 3.0.2, `components/schemas`):

Bulk Create Events (`POST /api/event-bulk-create-jobs`), schema `EventsBulkCreateJob`::

    {"data": {                                          # EventsBulkCreateJobResourceObject
        "type": "event-bulk-create-job",                # EventBulkCreateJobEnum
        "attributes": {
            "events-bulk-create": {                     # note the hyphens
                "data": [{                              # EventsBulkCreateQueryResourceObject, one per profile
                    "type": "event-bulk-create",        # EventBulkCreateEnum
                    "attributes": {                     # required: profile, events
                        "backfill": false,              # optional, nullable (entry level)
                        "profile": {"data": {           # OnsiteProfileCreateQueryResourceObject
                            "type": "profile",          # ProfileEnum
                            "id": null,                 # optional, Klaviyo's profile id
                            "attributes": {email, phone_number, external_id, anonymous_id, _kx,
                                           first_name, last_name, organization, locale, title, image,
                                           location: ProfileLocation{address1, address2, city, country,
                                                     latitude, longitude, region, zip, timezone, ip},
                                           properties: {...}},
                            "meta": OnsiteProfileMeta{patch_properties, patch_identifiers}}},   # optional
                        "events": {"data": [{           # BaseEventCreateQueryBulkEntryResourceObject
                            "type": "event",            # EventEnum
                            "attributes": {             # required: properties, metric
                                "properties": {...},
                                "time": "2026-01-31T12:00:00+00:00",   # date-time, nullable
                                "value": 24.0, "value_currency": "USD", "unique_id": "...",
                                "backfill": false,     # optional, nullable (event level too)
                                "metric": {"data": {    # MetricCreateQueryResourceObject
                                    "type": "metric",   # MetricEnum
                                    "attributes": {"name": "...", "service": null}}}}}]}}}]}}}}

Create Event (`POST /api/events`), schema `EventCreateQueryV2`: `{"data": {"type": "event", "attributes":
{properties, time, value, value_currency, unique_id, backfill, metric: {"data": MetricCreateQueryResourceObject},
profile: {"data": EventProfileCreateQueryResourceObject}}}}` (required: properties, metric, profile); there the
profile's `meta` sits inside `attributes`, not beside it.

Bulk Import Profiles (`POST /api/profile-bulk-import-jobs`), schema `ProfileImportJobCreateQuery`: `{"data":
{"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": [ProfileUpsertQueryResourceObject
{type: "profile", id, attributes, meta}]}}, "relationships": {"lists": {"data": [{"type": "list", "id":
"..."}]}}}}`. Its profile attributes document no `anonymous_id`.

Where the limits come from: the operation `bulk_create_events` says "Accepts up to 1,000 events per request. The
maximum allowed payload size is 5MB. A single string cannot exceed 100KB."; event `properties` say "must not
exceed 400 properties"; the metric `name` "must be less than 128 characters"; `time` "must be after the year 1990
and can only be up to 1 year in the future" (we keep the stricter year 2000 that ingestion holds times to); the
operations ask for "at least one profile identifier"; Create Profile says "The maximum allowed sum of profile
strings is 100KB" and Bulk Import Profiles "The maximum allowed payload size per-profile is 100KB"; the bulk
`unique_id` says "If a unique_id is repeated for the same profile and metric, the request will fail and no events
will be processed."

All functions here are pure: no I/O, no clock (the caller passes `now`), and they never raise on a malformed
payload (they report it), only on a naive `now`. The mapping runs them before a row enters the outbox, the emulator
runs them on every request: one definition of what Klaviyo refuses.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

MAX_EVENTS_PER_BULK_REQUEST = 1000
# "5MB" and "100KB" in Klaviyo's prose; read as binary units, as our issue does.
MAX_BULK_REQUEST_BYTES = 5 * 1024 * 1024
MAX_STRING_BYTES = 100 * 1024
# "The maximum allowed sum of profile strings is 100KB" (Create Profile; Bulk Import says 100KB per profile).
MAX_PROFILE_STRINGS_BYTES = 100 * 1024
# "Must not exceed 400 properties."
MAX_PROPERTIES = 400
# "Must be less than 128 characters."
MAX_METRIC_NAME_CHARS = 127
# An event's time must be on or after this instant (the spec says "after the year 1990"; the issue says 2000)...
EARLIEST_EVENT_TIME = datetime(2000, 1, 1, tzinfo=timezone.utc)
# ...and strictly before now + this ("up to 1 year in the future"; 365 days, never more than a calendar year).
MAX_EVENT_TIME_AHEAD = timedelta(days=365)
# Identifier attributes of the profile objects in Create Event and Bulk Create Events
# (EventProfileCreateQueryResourceObject, OnsiteProfileCreateQueryResourceObject), in the spec's order.
# A profile's Klaviyo `id` (beside `attributes`, not in it) also identifies it.
PROFILE_IDENTIFIERS = ("email", "phone_number", "external_id", "anonymous_id", "_kx")
# Keys of the v1/v2 Track and Identify APIs ($email, $first_name, $value, $event_id, ...).
LEGACY_KEY_PREFIX = "$"

BULK_JOB_TYPE = "event-bulk-create-job"
BULK_ENTRY_TYPE = "event-bulk-create"
BULK_EVENTS_KEY = "events-bulk-create"

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")
_CURRENCY = re.compile(r"[A-Z]{3}")


def encode_body(body: Any) -> bytes:
    """The request body as sent: compact UTF-8 JSON, no NaN/Infinity (what httpx's `json=` sends, too).

    The 5 MB limit applies to these bytes, so the delivery client should send exactly what this returns.
    Raises ValueError (NaN, Infinity) or TypeError (a value JSON cannot hold).
    """
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def latest_event_time(now: datetime) -> datetime:
    """The first instant that is too far in the future for an event time (times must be before it)."""
    return now + MAX_EVENT_TIME_AHEAD


def event_violations(
    event_attributes: dict, profile_attributes: dict, *, now: datetime, profile_id: str | None = None
) -> list[str]:
    """The prose limits broken by one event and its profile; empty when it is within all of them.

    `event_attributes` is an event's `attributes` object (bulk entry or Create Event; a `profile` key in it, as in
    Create Event, is skipped here: pass the profile's `attributes` as `profile_attributes` and its Klaviyo `id`, if
    any, as `profile_id`). `now` must be timezone-aware.

    Checked, and what Klaviyo does otherwise:
    - `time`, when present, is an RFC 3339 date-time with an offset, on or after 2000-01-01 and before now + 1 year:
      Klaviyo refuses times before 1990 or more than a year ahead; a time before 2000 in our data is a bug
      (an epoch-0 or a swapped field), and a time without an offset would be read in a zone we did not choose.
    - the metric name is present and under 128 characters: Klaviyo refuses longer names.
    - `properties` is an object with at most 400 top-level keys: Klaviyo documents a cap on properties per event.
    - every string (values and keys, at any depth) is at most 100 KB in UTF-8: Klaviyo refuses larger strings;
      the profile's strings together are at most 100 KB, Klaviyo's cap on a profile.
    - every number is finite: JSON has no NaN or Infinity, so such a body cannot even be sent.
    - no key starts with `$`, in the event or the profile: those are the v1/v2 APIs' special properties; the
      current API has first-class fields for them (`value`, `unique_id`, `first_name`, ...) and does not map `$`
      keys onto those fields, so the data would land as odd custom properties instead of where we meant it.
    - the profile has at least one identifier with a non-empty value: Klaviyo cannot attach the event otherwise
      and refuses it.
    - `value`, when present, is a finite number and `value_currency` a three-letter ISO 4217 code: the schema
      types `value` as a number (a string fails the request) and JSON cannot carry NaN or Infinity.
    """
    _require_aware(now)
    return _event_only_violations(event_attributes, now) + _profile_violations(profile_attributes, profile_id)


def bulk_violations(body: dict, *, now: datetime, size: int | None = None) -> list[str]:
    """The prose limits broken by a Bulk Create Events body (`EventsBulkCreateJob`); empty when within all.

    Request-level checks come first, then each profile entry and each event. Events are named
    `events[k] (unique_id X)`, k counting events in body order across all profile entries; profile entries are
    named `profiles[i]`, i their index in `data.attributes["events-bulk-create"].data`. Messages name no profile
    identifier (they are personal data and these messages end up in logs and dead letters).

    Checked, and what Klaviyo does otherwise:
    - 1 to 1,000 events in the request: Klaviyo refuses the whole request when it holds more.
    - at most 5 MB as sent (see `encode_body`): Klaviyo refuses the whole request when it is larger.
    - no `unique_id` twice in the request: Klaviyo says a unique_id repeated for the same profile and metric makes
      the request fail with no event processed; we keep any repeat out of a request (a repeat across profiles or
      metrics is a mapping bug on our side too, and the retry-safety of `unique_id` relies on it being unique).
    - `event_violations` for every event with its profile (profile problems are reported once per profile entry).

    `size`: the body's bytes as they arrived, when the caller has them (a server does; encoding the body again to
    measure it would cost more than every other check of a bulk body).
    """
    _require_aware(now)
    entries = dig(body, "data", "attributes", BULK_EVENTS_KEY, "data")
    if not isinstance(entries, list):
        return [f'body is not an {BULK_JOB_TYPE}: data.attributes["{BULK_EVENTS_KEY}"].data is not a list']

    violations: list[str] = []
    job_type = dig(body, "data", "type")
    if job_type != BULK_JOB_TYPE:
        violations.append(f"data.type is {job_type!r}, not {BULK_JOB_TYPE!r}")
    try:
        size = len(encode_body(body)) if size is None else size
    except (TypeError, ValueError) as exc:
        violations.append(f"request body cannot be sent as JSON: {exc}")
    else:
        if size > MAX_BULK_REQUEST_BYTES:
            violations.append(
                f"request body is {size:,} bytes as JSON (max {MAX_BULK_REQUEST_BYTES:,} = 5 MB)")

    per_item: list[str] = []
    seen_unique_ids: dict[str, int] = {}
    count = 0
    for i, entry in enumerate(entries):
        where = f"profiles[{i}]"
        entry_type = entry.get("type") if isinstance(entry, dict) else None
        if entry_type != BULK_ENTRY_TYPE:
            per_item.append(f"{where}: type is {entry_type!r}, not {BULK_ENTRY_TYPE!r}")
        attributes = entry.get("attributes") if isinstance(entry, dict) else None
        profile = dig(attributes, "profile", "data")
        profile_attributes = profile.get("attributes") if isinstance(profile, dict) else None
        profile_id = profile.get("id") if isinstance(profile, dict) else None
        per_item += [f"{where}: {m}" for m in _profile_violations(profile_attributes or {}, profile_id)]
        events = dig(attributes, "events", "data")
        if not isinstance(events, list):
            per_item.append(f"{where}: events.data is not a list")
            continue
        if not events:
            per_item.append(f"{where}: has no events")
        for event in events:
            k, count = count, count + 1
            event_attributes = event.get("attributes") if isinstance(event, dict) else None
            unique_id = event_attributes.get("unique_id") if isinstance(event_attributes, dict) else None
            label = f"events[{k}] (unique_id {unique_id})" if unique_id is not None else f"events[{k}] (no unique_id)"
            if isinstance(unique_id, str):
                if unique_id in seen_unique_ids:
                    per_item.append(f"{label}: unique_id repeats events[{seen_unique_ids[unique_id]}] in this request")
                else:
                    seen_unique_ids[unique_id] = k
            per_item += [f"{label}: {m}" for m in _event_only_violations(event_attributes, now)]

    if count > MAX_EVENTS_PER_BULK_REQUEST:
        violations.append(f"request has {count:,} events (max {MAX_EVENTS_PER_BULK_REQUEST:,})")
    elif count == 0:
        violations.append("request has no events")
    return violations + per_item


def _event_only_violations(event_attributes: Any, now: datetime) -> list[str]:
    if not isinstance(event_attributes, dict):
        return ["event attributes are not an object"]
    violations: list[str] = []

    if "time" in event_attributes and event_attributes["time"] is not None:
        violations += _time_violations(event_attributes["time"], now)

    name = dig(event_attributes, "metric", "data", "attributes", "name")
    if not isinstance(name, str) or not name.strip():
        violations.append("metric name is missing or empty")
    elif len(name) > MAX_METRIC_NAME_CHARS:
        violations.append(f"metric name is {len(name)} characters (Klaviyo needs fewer than "
                          f"{MAX_METRIC_NAME_CHARS + 1}): {name[:40]!r}...")

    properties = event_attributes.get("properties")
    if not isinstance(properties, dict):
        violations.append("properties is missing or not an object")
    elif len(properties) > MAX_PROPERTIES:
        violations.append(f"properties has {len(properties)} top-level keys (max {MAX_PROPERTIES})")

    value = event_attributes.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        violations.append(f"value {value!r} is not a number")  # NaN and Infinity: see the walk below
    currency = event_attributes.get("value_currency")
    if currency is not None and not (isinstance(currency, str) and _CURRENCY.fullmatch(currency)):
        violations.append(f"value_currency {currency!r} is not a three-letter ISO 4217 code")

    own = {key: item for key, item in event_attributes.items() if key != "profile"}
    violations += _string_and_key_violations(own, "")
    return violations


def _profile_violations(profile_attributes: Any, profile_id: Any = None) -> list[str]:
    if not isinstance(profile_attributes, dict):
        return ["profile attributes are not an object"]
    violations: list[str] = []
    identified = _non_empty(profile_id) or any(_non_empty(profile_attributes.get(k)) for k in PROFILE_IDENTIFIERS)
    if not identified:
        violations.append(f"profile has no identifier (needs a non-empty one of {', '.join(PROFILE_IDENTIFIERS)}, "
                          "or a Klaviyo profile id)")
    violations += _string_and_key_violations(profile_attributes, "profile.data.attributes")
    total = profile_strings_bytes(profile_attributes)
    if total > MAX_PROFILE_STRINGS_BYTES:
        violations.append(
            f"profile strings total {total:,} bytes in UTF-8 (max {MAX_PROFILE_STRINGS_BYTES:,} = 100 KB)")
    return violations


def profile_strings_bytes(profile_attributes: Any) -> int:
    """What Klaviyo counts against a profile's 100 KB: its strings' UTF-8 bytes, keys included (the strings
    `_walk` yields, summed without the paths it builds: the emulator sums every profile of every request)."""
    if isinstance(profile_attributes, str):
        return len(profile_attributes.encode("utf-8", "surrogatepass"))
    if isinstance(profile_attributes, dict):
        return sum(profile_strings_bytes(key if isinstance(key, str) else str(key)) + profile_strings_bytes(item)
                   for key, item in profile_attributes.items())
    if isinstance(profile_attributes, (list, tuple)):
        return sum(profile_strings_bytes(item) for item in profile_attributes)
    return 0


def fit_profile(profile_attributes: dict) -> tuple[dict, list[str]]:
    """The profile without the strings Klaviyo would refuse, and a note for each one dropped.

    Klaviyo refuses an event whose profile breaks a string limit, so a pasted essay in a name field would cost the
    shopper's cart event. Dropping the field (longest first, until the profile fits) keeps the event; truncating
    would send a wrong name. Identifiers are never dropped: without them the event has no one to belong to, and
    `event_violations` reports the profile instead.
    """
    fitted = json.loads(json.dumps(profile_attributes))
    notes: list[str] = []
    droppable = sorted(
        ((where, len(text.encode("utf-8", "surrogatepass"))) for where, kind, text in _walk(fitted, "")
         if kind == "string" and where.split(".")[0].split("[")[0] not in PROFILE_IDENTIFIERS),
        key=lambda entry: -entry[1])
    for where, size in droppable:
        too_long = size > MAX_STRING_BYTES
        if not too_long and profile_strings_bytes(fitted) <= MAX_PROFILE_STRINGS_BYTES:
            break
        _drop(fitted, where)
        notes.append(f"dropped profile {where} ({size:,} bytes): Klaviyo takes strings of at most "
                     f"{MAX_STRING_BYTES:,} bytes and {MAX_PROFILE_STRINGS_BYTES:,} bytes of strings per profile")
    return fitted, notes


def _drop(attributes: dict, where: str) -> None:
    """Removes the key at dotted path `where`, and any object it leaves empty: an empty `location` would tell
    Klaviyo nothing and still cost a key."""
    keys = where.split(".")
    parents = [attributes]
    for key in keys[:-1]:
        parents.append(parents[-1][key])
    del parents[-1][keys[-1]]
    for parent, key in zip(reversed(parents[:-1]), reversed(keys[:-1])):
        if parent[key]:
            break
        del parent[key]


def _time_violations(raw: Any, now: datetime) -> list[str]:
    if not isinstance(raw, str) or not _RFC3339.fullmatch(raw):
        return [f"time {raw!r} is not an RFC 3339 date-time with an offset (like 2026-01-31T12:00:00+00:00)"]
    try:
        time = datetime.fromisoformat(raw)
    except ValueError:
        return [f"time {raw!r} is not a valid date-time"]
    if time < EARLIEST_EVENT_TIME:
        return [f"time {time.isoformat()} is before {EARLIEST_EVENT_TIME.year}"]
    latest = latest_event_time(now)
    if time >= latest:
        return [f"time {time.isoformat()} is not before now + 1 year ({latest.isoformat()})"]
    return []


def _string_and_key_violations(value: Any, path: str) -> list[str]:
    if _plainly_within(value):
        return []
    violations: list[str] = []
    for where, kind, item in _walk(value, path):
        where = where if len(where) <= 200 else where[:200] + "..."
        if kind == "number":
            violations.append(f"number at {where or '(top)'} is {item} (JSON has no NaN or Infinity)")
            continue
        if kind == "key" and item.startswith(LEGACY_KEY_PREFIX):
            violations.append(f"key {where} starts with {LEGACY_KEY_PREFIX!r} (a legacy v1/v2 special property)")
        size = len(item.encode("utf-8", "surrogatepass"))
        if size > MAX_STRING_BYTES:
            violations.append(f"{'key' if kind == 'key' else 'string'} at {where or '(top)'} is {size:,} bytes "
                              f"in UTF-8 (max {MAX_STRING_BYTES:,} = 100 KB)")
    return violations


# A string of this many characters is at most MAX_STRING_BYTES in UTF-8 (4 bytes a character at most).
_PLAINLY_SHORT = MAX_STRING_BYTES // 4
# Values that never break a string, key or number limit (a str may be too long, a float may be NaN).
_SCALARS = frozenset({int, bool, type(None)})


def _plainly_within(value: Any) -> bool:
    """True when no key or string can break a limit that `_string_and_key_violations` checks: every string short
    enough in characters alone, no key starting with `$`, every float finite. The emulator checks a whole bulk body
    per request, ten a second: this walk builds no paths and encodes nothing, and a False (any doubt, or a type a
    JSON parser does not make) sends the value through the exact walk, which names what is wrong."""
    kind = type(value)
    if kind is str:
        return len(value) <= _PLAINLY_SHORT
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or len(key) > _PLAINLY_SHORT or key.startswith(LEGACY_KEY_PREFIX):
                return False
            item_kind = type(item)
            if item_kind is str:
                if len(item) > _PLAINLY_SHORT:
                    return False
            elif item_kind not in _SCALARS and not _plainly_within(item):
                return False
        return True
    if kind is list:
        return all(type(item) in _SCALARS or _plainly_within(item) for item in value)
    if kind is float:
        return math.isfinite(value)
    return value is None or kind is int or kind is bool


def _walk(value: Any, path: str) -> Iterator[tuple[str, str, str]]:
    """Yields (path, "key" | "string", text) for every key and string value at any depth, and (path, "number",
    text) for every number JSON cannot carry (NaN, Infinity)."""
    if isinstance(value, str):
        yield path, "string", value
    elif isinstance(value, float) and not math.isfinite(value):
        yield path, "number", str(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            key_text = key if isinstance(key, str) else str(key)
            child = f"{path}.{key_text}" if path else key_text
            yield child, "key", key_text
            yield from _walk(item, child)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")


def dig(value: Any, *keys: str) -> Any:
    """value[keys[0]][keys[1]]..., or None where a level is missing or not an object (bodies may be malformed)."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _non_empty(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(timezone.utc))")
