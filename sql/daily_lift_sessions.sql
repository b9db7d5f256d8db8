-- The sessions daily_lift counts: one row per session abandoned for a metric (an event of the metric, no Placed
-- Order), with who could identify it and what of it reached Klaviyo. daily_lift sums these rows per day and metric.
-- A sync keeps them beside the analysts' copy (<warehouse>.analytics-sessions.duckdb, with a hash of the session id,
-- session_key, in its place), so it recomputes the sessions it changed and sums their days again instead of
-- recomputing whole days.
--
-- event_name: the metric's event (commerce_metrics.event_name)
-- session_id: the storefront session (the pixel's session_id)
-- day: UTC day of the session's first event of the metric
-- value: the highest value (custom_data.value) of the session's events of the metric, in the shop's currency
-- resolved: Upstack named someone for an event of the metric (resolved_events.match_method)
-- sent: an event of the metric went to klaviyo_outbox
-- delivered: Klaviyo accepted one of them
-- backfill: delivered, and every one Klaviyo accepted went as backfill (recorded on the profile, no flow)
-- refused: Klaviyo refused one of them (klaviyo_dead_letters)
-- pending: one of them still waits in the outbox
-- klaviyo_native: Klaviyo could identify an event of the session itself
-- upstack_only: resolved, and Klaviyo could not identify the session itself
create or replace view daily_lift_sessions as
with sessions_of_metric as (
    select resolved.event_name, resolved.session_id,
           (min(resolved.event_time) at time zone 'UTC')::date as day,
           max(raw.custom_data.value) as value,
           bool_or(resolved.match_method is not null) as resolved,
           bool_or(outbox.unique_id is not null) as sent,
           bool_or(outbox.status = 'delivered') as delivered,
           bool_or(outbox.status = 'delivered') and bool_and(outbox.status <> 'delivered' or outbox.backfill)
               as backfill,
           bool_or(outbox.status = 'dead_letter') as refused,
           bool_or(outbox.status in ('pending', 'claimed')) as pending
    from resolved_events as resolved
    join raw_events as raw using (event_id)
    left join klaviyo_outbox as outbox on outbox.unique_id = resolved.event_id
    where resolved.event_name in (select event_name from commerce_metrics where backup_utm_campaign is not null)
    group by all
),
session_facts as (
    select session_id, bool_or(klaviyo_native) as klaviyo_native, bool_or(event_name = 'Purchase') as purchased
    from resolved_events
    where session_id in (select session_id from sessions_of_metric)
    group by session_id
)
select metric.*, facts.klaviyo_native, not facts.klaviyo_native and metric.resolved as upstack_only
from sessions_of_metric as metric
join session_facts as facts using (session_id)
where not facts.purchased;
