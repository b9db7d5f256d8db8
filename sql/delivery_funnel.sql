-- Where each day's commerce events went, per metric, as a funnel from the pixel to Klaviyo: every line the pixel
-- sent is in exactly one of quarantined, waiting, the skip reasons, pending, delivered or refused. Quarantined lines
-- count under the event_name and day their JSON gives, or under metric '(unreadable)' and the day they were
-- quarantined. The ingested events are counted per session in delivery_funnel_sessions.
--
-- day: UTC day of the event (for an unreadable quarantined line, of its quarantine)
-- metric: Klaviyo's standard name (commerce_metrics.klaviyo_metric), or '(unreadable)'
-- pixel_events: lines received: quarantined plus ingested
-- quarantined: lines kept out of raw_events (quarantined_events, with the reason)
-- ingested: events in raw_events
-- waiting: ingested events not decided yet (their session is still active, or the next run decides them)
-- unresolved: skipped: nobody could be named (klaviyo_skipped reason unresolved)
-- klaviyo_native: skipped: Klaviyo identifies them itself (send mode backup)
-- no_consent: skipped: the shopper declined marketing
-- other_skipped: skipped for another reason (disabled_event, profile_creation_disabled, invalid)
-- sent: events that went to the outbox: pending plus delivered plus refused
-- pending: in the outbox, not yet accepted or refused
-- delivered: accepted by Klaviyo
-- refused: refused by Klaviyo (klaviyo_dead_letters)
create or replace view delivery_funnel as
with quarantined_lines as (
    select quarantined_at,
           case when json_valid(raw_text) then json_extract_string(raw_text, '$.event_name') end as event_name,
           case when json_valid(raw_text) then json_extract_string(raw_text, '$.event_time') end as event_time
    from quarantined_events
),
quarantined as (
    select coalesce((try_cast(event_time as timestamptz) at time zone 'UTC')::date,
                    (quarantined_at at time zone 'UTC')::date) as day,
           coalesce(metric.klaviyo_metric, '(unreadable)') as metric
    from quarantined_lines as line
    left join commerce_metrics as metric using (event_name)
    where metric.event_name is not null or line.event_name is null
),
counts as (
    select day, metric, count(*) as quarantined, 0 as ingested, 0 as waiting, 0 as unresolved, 0 as klaviyo_native,
           0 as no_consent, 0 as other_skipped, 0 as pending, 0 as delivered, 0 as refused
    from quarantined group by all
    union all
    select day, metric, 0, ingested, waiting, unresolved, klaviyo_native, no_consent, other_skipped, pending, delivered,
           refused
    from delivery_funnel_sessions
)
select day, metric,
       sum(quarantined + ingested)::bigint as pixel_events,
       sum(quarantined)::bigint as quarantined, sum(ingested)::bigint as ingested, sum(waiting)::bigint as waiting,
       sum(unresolved)::bigint as unresolved, sum(klaviyo_native)::bigint as klaviyo_native,
       sum(no_consent)::bigint as no_consent, sum(other_skipped)::bigint as other_skipped,
       sum(pending + delivered + refused)::bigint as sent, sum(pending)::bigint as pending,
       sum(delivered)::bigint as delivered, sum(refused)::bigint as refused
from counts
group by all
order by day, metric;
