-- Who could name each day's shoppers, per method: Klaviyo alone, or Upstack and how. A visitor is a browser cookie
-- (anonymous_id) with a commerce event that day; it counts once, under klaviyo_native when Klaviyo could identify
-- any of its events itself, else under the match method of its first event Upstack resolved, else unidentified.
-- Klaviyo's own match rate is the klaviyo_native share; with Upstack, it is every share but unidentified. Counted
-- from match_rates_sessions.
--
-- day: UTC day
-- identified_by: klaviyo_native, an Upstack match_method (resolved_events.match_method), or unidentified
-- visitors: visitors that day identified that way
-- share_pct: their share of the day's visitors, two decimals
create or replace view match_rates as
with visitors as (
    select day, anonymous_id,
           case when bool_or(klaviyo_native) then 'klaviyo_native'
                else coalesce(arg_min(match_method, (first_resolved_at, match_method))
                                  filter (where match_method is not null), 'unidentified') end as identified_by
    from match_rates_sessions
    group by 1, 2
)
select day, identified_by, count(*) as visitors,
       round(100 * count(*) / sum(count(*)) over (partition by day), 2) as share_pct
from visitors
group by day, identified_by
order by day, visitors desc, identified_by;
