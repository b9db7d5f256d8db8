-- The visits match_rates counts: one row per UTC day, browser cookie and session with a commerce event that day,
-- with whether Klaviyo could identify it and the first event Upstack resolved. match_rates counts a cookie once a
-- day over its sessions. A sync keeps them beside the analysts' copy (<warehouse>.analytics-sessions.duckdb, with a
-- hash of the session id, session_key, in its place), so it recomputes the sessions it changed and counts their
-- days again instead of recomputing whole days.
--
-- day: UTC day
-- anonymous_id: the browser cookie (the pixel's anonymous_id)
-- session_id: the storefront session
-- klaviyo_native: Klaviyo could identify one of the session's events that day itself
-- first_resolved_at: the time of the session's first event that day Upstack resolved; null when none
-- match_method: how Upstack resolved that event (resolved_events.match_method)
create or replace view match_rates_sessions as
select (event_time at time zone 'UTC')::date as day, anonymous_id, session_id,
       bool_or(klaviyo_native) as klaviyo_native,
       min(event_time) filter (where match_method is not null) as first_resolved_at,
       -- of two resolved at the same instant, the first method by name: the same answer however the rows are ordered
       arg_min(match_method, (event_time, match_method)) filter (where match_method is not null) as match_method
from resolved_events
group by 1, 2, 3;
