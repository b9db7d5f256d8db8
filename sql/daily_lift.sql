-- The one definition of lift (README "Lift and the analysts' views"), from the warehouse alone: per UTC day and
-- abandonment metric, the abandoned sessions, who could identify them, what reached Klaviyo, and the orders the
-- backup flow brought back. A session is abandoned for a metric when it has an event of that metric (a product
-- viewed, a cart, a checkout) and no Placed Order. Klaviyo identified it natively when it could name any event of the session itself. lift_pct is
-- upstack_delivered_sessions per 100 klaviyo_native_sessions: the abandoned sessions only the backup flow can
-- reach, for every hundred the native flow reaches.
--
-- day: UTC day of the session's first event of the metric
-- metric: Klaviyo's standard name of the metric that starts the abandonment flow (commerce_metrics.klaviyo_metric)
-- abandoned_sessions: sessions with an event of the metric and no Placed Order
-- klaviyo_native_sessions: of those, sessions Klaviyo could identify by itself (its cookie, an email typed there)
-- upstack_identified_sessions: of those, sessions Klaviyo could not identify and Upstack did
-- unidentified_sessions: sessions nobody could identify
-- upstack_sent_sessions: Upstack-only sessions with an event of the metric in klaviyo_outbox
-- upstack_delivered_sessions: Upstack-only sessions with an event Klaviyo accepted (flows fire unless backfill)
-- upstack_backfill_sessions: of those, sessions whose events went as backfill (recorded on the profile, no flow)
-- upstack_refused_sessions: Upstack-only sessions with an event Klaviyo refused (klaviyo_dead_letters)
-- upstack_pending_sessions: Upstack-only sessions with an event still waiting in the outbox
-- cart_value_reached: the value (custom_data.value) of the delivered sessions' events of the metric, their highest
-- per session, in the shop's currency
-- lift_pct: 100 * upstack_delivered_sessions / klaviyo_native_sessions, two decimals; null with no native session
-- recovered_orders: Placed Order events that day in sessions that landed from the backup flow's links
-- (utm_campaign = commerce_metrics.backup_utm_campaign)
-- recovered_revenue: their value
create or replace view daily_lift as
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
),
abandoned as (
    select metric.*, facts.klaviyo_native, not facts.klaviyo_native and metric.resolved as upstack_only
    from sessions_of_metric as metric
    join session_facts as facts using (session_id)
    where not facts.purchased
),
lift as (
    select day, event_name,
           count(*) as abandoned_sessions,
           count(*) filter (where klaviyo_native) as klaviyo_native_sessions,
           count(*) filter (where upstack_only) as upstack_identified_sessions,
           count(*) filter (where not klaviyo_native and not resolved) as unidentified_sessions,
           count(*) filter (where upstack_only and sent) as upstack_sent_sessions,
           count(*) filter (where upstack_only and delivered) as upstack_delivered_sessions,
           count(*) filter (where upstack_only and backfill) as upstack_backfill_sessions,
           count(*) filter (where upstack_only and refused) as upstack_refused_sessions,
           count(*) filter (where upstack_only and pending) as upstack_pending_sessions,
           coalesce(sum(value) filter (where upstack_only and delivered), 0) as cart_value_reached
    from abandoned
    group by all
),
recovered as (
    select day, metric.event_name, count(*) as recovered_orders, sum(value) as recovered_revenue
    from recovered_orders
    join commerce_metrics as metric on metric.klaviyo_metric = recovered_orders.metric
    group by all
)
select day, metric.klaviyo_metric as metric,
       coalesce(abandoned_sessions, 0) as abandoned_sessions,
       coalesce(klaviyo_native_sessions, 0) as klaviyo_native_sessions,
       coalesce(upstack_identified_sessions, 0) as upstack_identified_sessions,
       coalesce(unidentified_sessions, 0) as unidentified_sessions,
       coalesce(upstack_sent_sessions, 0) as upstack_sent_sessions,
       coalesce(upstack_delivered_sessions, 0) as upstack_delivered_sessions,
       coalesce(upstack_backfill_sessions, 0) as upstack_backfill_sessions,
       coalesce(upstack_refused_sessions, 0) as upstack_refused_sessions,
       coalesce(upstack_pending_sessions, 0) as upstack_pending_sessions,
       coalesce(cart_value_reached, 0) as cart_value_reached,
       round(100 * upstack_delivered_sessions / nullif(klaviyo_native_sessions, 0), 2) as lift_pct,
       coalesce(recovered_orders, 0) as recovered_orders,
       coalesce(recovered_revenue, 0) as recovered_revenue
from lift
full join recovered using (day, event_name)
join commerce_metrics as metric using (event_name)
order by day, metric;
