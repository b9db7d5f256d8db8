-- Delivery's requests (SPEC 6): the pending outbox packed into Bulk Create Events requests, and each request's body
-- as JSON text, built here from the JSON the mapping stored: no row is parsed or encoded again in Python, so the
-- first request leaves as soon as this table is built, and the bodies keep ahead of Klaviyo's ten a second.
-- Variables: events_per_request (at most Klaviyo's 1,000), max_request_bytes (Klaviyo's 5 MB), envelope_bytes
-- (room for the JSON:API envelope around the events).
--
-- Packing: rows in (profile_key, unique_id) order and consecutive in a request, so that a profile's events travel
-- together (Klaviyo applies one profile per entry). A row weighs max(budget, its bytes x events_per_request), the
-- budget being a request's bytes less the envelope and less the largest row; a request takes the rows whose weight
-- before them falls in one span of events_per_request x budget. Then a request holds at most events_per_request
-- rows and, its last row included, at most max_request_bytes less the envelope; when every row is small (always,
-- in practice) it is exactly events_per_request rows a request, as a row-by-row packer would make them.
-- The packing reads only the keys and sizes (sorting the JSON along with them would cost more than the rest); the
-- JSON joins on after.
create or replace temp table delivery_rows as
with pending as (
    select unique_id, profile_key, strlen(event::varchar) + strlen(profile::varchar) as bytes
    from klaviyo_outbox
    where status = 'pending'
),
budget as (
    select greatest(getvariable('max_request_bytes') - getvariable('envelope_bytes') - coalesce(max(bytes), 0),
                    1)::bigint as bytes
    from pending
),
weighed as (
    select pending.unique_id,
           coalesce(sum(greatest(budget.bytes, pending.bytes * getvariable('events_per_request'))) over (
               order by profile_key, unique_id rows between unbounded preceding and 1 preceding), 0) as before,
           budget.bytes * getvariable('events_per_request') as span
    from pending, budget
)
-- A row heavier than a span (one past the budget: a few MB) spans more than one; the requests are numbered densely
-- all the same, 0, 1, 2, ..., as delivery fetches them.
select (dense_rank() over (order by weighed.before // weighed.span) - 1)::integer as request, unique_id,
       outbox.profile_key,
       outbox.profile::varchar as profile, outbox.event::varchar as event, outbox.backfill
from weighed
join klaviyo_outbox as outbox using (unique_id)
where outbox.status = 'pending';

-- One row per request: its events, how many are backfill, and its body, as `mapping.bulk_create_body` shapes it
-- (entries by profile_key, events by unique_id, each entry's profile its first event's): a refused event's pointer
-- then names the same row whichever built the body.
create or replace temp view delivery_bodies as
with entries as (
    select request, profile_key, count(*) as events, count(*) filter (where backfill) as backfill,
           '{"type":"event-bulk-create","attributes":{"profile":{"data":{"type":"profile","attributes":'
           || arg_min(profile, unique_id) || '}},"events":{"data":['
           || string_agg('{"type":"event","attributes":' || event || '}', ',' order by unique_id)
           || ']}}}' as entry
    from delivery_rows
    group by request, profile_key
)
select request, sum(events)::integer as events, sum(backfill)::integer as backfill,
       '{"data":{"type":"event-bulk-create-job","attributes":{"events-bulk-create":{"data":['
       || string_agg(entry, ',' order by profile_key) || ']}}}}' as body
from entries
group by request;
