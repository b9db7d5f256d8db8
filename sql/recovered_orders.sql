-- One row per order placed in a session that landed from a backup flow's link: what the backup flows brought back.
-- A session's landing is its first event; its URL's utm_campaign names the flow (the README's "Backup flows in
-- Klaviyo" says how to tag the links). Orders from native flows' links are not counted: their campaigns differ.
--
-- day: UTC day of the order
-- event_id: the Placed Order event (raw_events.event_id)
-- order_id: the shop's order id
-- session_id: the session that landed from the flow's link
-- landing_url: the URL it landed on
-- utm_campaign: the backup flow's campaign (commerce_metrics.backup_utm_campaign)
-- metric: Klaviyo's standard name of the metric that starts that backup flow
-- value: the order's value (custom_data.value)
-- currency: its currency
-- email: who placed it, when resolved
create or replace view recovered_orders as
with orders as (
    select event_id, event_time, session_id, custom_data.order_id as order_id, custom_data.value as value,
           custom_data.currency as currency
    from raw_events
    where event_name = 'Purchase'
),
landings as (
    select session_id, arg_min(event_source_url, event_time) as landing_url
    from raw_events
    where session_id in (select session_id from orders)
    group by session_id
),
campaigns as (
    select session_id, landing_url,
           lower(nullif(regexp_extract(landing_url, '[?&]utm_campaign=([^&#]*)', 1), '')) as utm_campaign
    from landings
)
select (orders.event_time at time zone 'UTC')::date as day, orders.event_id, orders.order_id, orders.session_id,
       campaigns.landing_url, campaigns.utm_campaign, metric.klaviyo_metric as metric, orders.value, orders.currency,
       resolved.email
from orders
join campaigns using (session_id)
join commerce_metrics as metric on metric.backup_utm_campaign = campaigns.utm_campaign
left join resolved_events as resolved using (event_id)
order by day, orders.event_id;
