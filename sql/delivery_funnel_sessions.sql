-- Where each session's commerce events went, per UTC day and metric: delivery_funnel's counts of ingested events,
-- one row per session, day and metric (delivery_funnel sums them per day and adds the quarantined lines, which
-- belong to no session). A sync keeps them beside the analysts' copy (<warehouse>.analytics-sessions.duckdb, with a
-- hash of the session id, session_key, in its place), so it recomputes the sessions it changed and sums their days
-- again instead of recomputing whole days.
--
-- day: UTC day of the events
-- metric: Klaviyo's standard name (commerce_metrics.klaviyo_metric)
-- session_id: the storefront session
-- ingested: the session's events that day in raw_events
-- waiting: of those, not decided yet (their session is still active, or the next run decides them)
-- unresolved: skipped: nobody could be named (klaviyo_skipped reason unresolved)
-- klaviyo_native: skipped: Klaviyo identifies them itself (send mode backup)
-- no_consent: skipped: the shopper declined marketing
-- other_skipped: skipped for another reason (disabled_event, profile_creation_disabled, invalid)
-- pending: in the outbox, not yet accepted or refused
-- delivered: accepted by Klaviyo
-- refused: refused by Klaviyo (klaviyo_dead_letters)
create or replace view delivery_funnel_sessions as
with ingested as (
    select (raw.event_time at time zone 'UTC')::date as day, metric.klaviyo_metric as metric, raw.session_id,
           skipped.reason, outbox.status
    from raw_events as raw
    join commerce_metrics as metric using (event_name)
    left join klaviyo_skipped as skipped using (event_id)
    left join klaviyo_outbox as outbox on outbox.unique_id = raw.event_id
)
select day, metric, session_id,
       count(*) as ingested,
       count(*) filter (where reason is null and status is null) as waiting,
       count(*) filter (where reason = 'unresolved') as unresolved,
       count(*) filter (where reason = 'native_identified') as klaviyo_native,
       count(*) filter (where reason = 'no_consent') as no_consent,
       count(*) filter (where reason not in ('unresolved', 'native_identified', 'no_consent')) as other_skipped,
       count(*) filter (where status in ('pending', 'claimed')) as pending,
       count(*) filter (where status = 'delivered') as delivered,
       count(*) filter (where status = 'dead_letter') as refused
from ingested
group by all;
