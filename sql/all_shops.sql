-- The agency's view: every shop's analysts' copy at once, read-only (upstack_pipeline/all_shops.py attaches them
-- and leaves, for each published table T, a view shops_T: its rows with a `shop` column first). Here the same
-- names the one-shop copy has, summed over the shops, so `upstack report --all-shops` reads them as it reads one
-- shop's; shares and the lift are recomputed from the summed counts, never averaged. `shop_weekly` keeps the shops
-- apart: the agency's weekly numbers.
--
-- Views (temporary, in the connection that attached the shops): daily_lift, delivery_funnel, match_rates,
-- recovered_orders, commerce_metrics, published, shop_weekly.

create or replace temp view daily_lift as
select day, metric,
       sum(abandoned_sessions) as abandoned_sessions,
       sum(klaviyo_native_sessions) as klaviyo_native_sessions,
       sum(upstack_identified_sessions) as upstack_identified_sessions,
       sum(unidentified_sessions) as unidentified_sessions,
       sum(upstack_sent_sessions) as upstack_sent_sessions,
       sum(upstack_delivered_sessions) as upstack_delivered_sessions,
       sum(upstack_backfill_sessions) as upstack_backfill_sessions,
       sum(upstack_refused_sessions) as upstack_refused_sessions,
       sum(upstack_pending_sessions) as upstack_pending_sessions,
       sum(cart_value_reached) as cart_value_reached,
       round(100 * sum(upstack_delivered_sessions) / nullif(sum(klaviyo_native_sessions), 0), 2) as lift_pct,
       sum(recovered_orders) as recovered_orders,
       sum(recovered_revenue) as recovered_revenue
from shops_daily_lift
group by day, metric;

create or replace temp view delivery_funnel as
select day, metric, sum(columns(* exclude (shop, day, metric)))
from shops_delivery_funnel
group by day, metric;

create or replace temp view match_rates as
select day, identified_by, sum(visitors) as visitors,
       round(100 * sum(visitors) / sum(sum(visitors)) over (partition by day), 2) as share_pct
from shops_match_rates
group by day, identified_by;

create or replace temp view recovered_orders as
select * from shops_recovered_orders;

-- Shops may name their metrics with other templates: one row per event, the first shop's names.
create or replace temp view commerce_metrics as
select event_name, arg_min(columns(* exclude (shop, event_name)), shop)
from shops_commerce_metrics
group by event_name;

-- The numbers are as fresh as the stalest shop.
create or replace temp view published as
select min(published_at) as published_at, string_agg(warehouse, ', ' order by shop) as warehouse
from shops_published;

create or replace temp view shop_weekly as
select shop,
       date_trunc('week', day)::date as week,  -- ISO weeks, Monday first
       sum(abandoned_sessions) as abandoned_sessions,
       sum(klaviyo_native_sessions) as klaviyo_native_sessions,
       sum(upstack_delivered_sessions) as upstack_delivered_sessions,
       round(100 * sum(upstack_delivered_sessions) / nullif(sum(klaviyo_native_sessions), 0), 2) as lift_pct,
       sum(cart_value_reached) as cart_value_reached,
       sum(recovered_orders) as recovered_orders,
       sum(recovered_revenue) as recovered_revenue
from shops_daily_lift
where metric = 'Added to Cart'
group by shop, week
order by week desc, shop;
