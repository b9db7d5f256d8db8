-- The one definition of lift (README "Lift and the analysts' views"), from the warehouse alone: per UTC day and
-- abandonment metric, the abandoned sessions, who could identify them, what reached Klaviyo, and the orders the
-- backup flow brought back. A session is abandoned for a metric when it has an event of that metric (a product
-- viewed, a cart, a checkout) and no Placed Order. Klaviyo identified it natively when it could name any event of the session itself. lift_pct is
-- upstack_delivered_sessions per 100 klaviyo_native_sessions: the abandoned sessions only the backup flow can
-- reach, for every hundred the native flow reaches. The sessions are counted from daily_lift_sessions.
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
with lift as (
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
           -- values summed as decimals: the same total in any order of the rows (a copy updated by session holds them
           -- in another order than one computed whole)
           coalesce(sum(value::decimal(38, 9)) filter (where upstack_only and delivered), 0)::double
               as cart_value_reached
    from daily_lift_sessions
    group by all
),
recovered as (
    select day, metric.event_name, count(*) as recovered_orders,
           sum(value::decimal(38, 9))::double as recovered_revenue
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
