-- Same-browser evidence between cookies, from what this run touched: sessions seen on two cookies, ad clicks
-- opened on exactly two cookies within the handoff window, and (only when probabilistic matching is on) a new
-- cookie that starts on the same IP and user agent minutes after another one stopped: a cookie reset.
-- Reads: raw_events, identity_links, new_observations (temp)
-- Variables: after_load_id, until_load_id, max_browsers_per_cluster, click_handoff_window, probabilistic_matching,
--   probabilistic_window, now
-- Writes: browser_links, identity_flags
-- Leaves: touched_sessions (temp), touched_click_ids (temp), click_cookies (temp)

create or replace temp table touched_sessions as
select distinct session_id from raw_events
where load_id > getvariable('after_load_id') and load_id <= getvariable('until_load_id');

insert into browser_links
with session_cookies as (
    select link.left_value as session_id, link.right_value as anonymous_id, link.first_seen
    from identity_links as link
    semi join touched_sessions as touched on touched.session_id = link.left_value
    where link.left_type = 'session_id'
),
shared_sessions as (
    select session_id from session_cookies
    group by session_id
    having count(*) between 2 and getvariable('max_browsers_per_cluster')
)
select one.anonymous_id, other.anonymous_id, 'shared_session', one.session_id,
       greatest(one.first_seen, other.first_seen)
from session_cookies as one
join session_cookies as other on other.session_id = one.session_id and other.anonymous_id > one.anonymous_id
semi join shared_sessions on shared_sessions.session_id = one.session_id
on conflict do nothing;

create or replace temp table touched_click_ids as
select distinct id_type, id_value from new_observations
where id_type in ('fbclid', 'gclid', 'ttclid', 'msclkid');

create or replace temp table click_cookies as
select link.right_type as id_type, link.right_value as id_value, link.left_value as anonymous_id, link.first_seen
from identity_links as link
semi join touched_click_ids as touched on touched.id_type = link.right_type and touched.id_value = link.right_value
where link.left_type = 'anonymous_id';

insert into browser_links
select one.anonymous_id, other.anonymous_id, 'click_id_handoff', one.id_type || ':' || one.id_value,
       greatest(one.first_seen, other.first_seen)
from click_cookies as one
join click_cookies as other
    on other.id_type = one.id_type and other.id_value = one.id_value and other.anonymous_id > one.anonymous_id
where abs(epoch(other.first_seen) - epoch(one.first_seen)) <= epoch(getvariable('click_handoff_window'))
    and (select count(*) from click_cookies as every
         where every.id_type = one.id_type and every.id_value = one.id_value) = 2
on conflict do nothing;

insert into identity_flags
select 'shared_click_id', id_type || ':' || id_value, count(*) || ' browsers opened it', getvariable('now')
from click_cookies
group by id_type, id_value
having count(*) > 2
on conflict do nothing;

insert into browser_links
with chunk_cookies as (                         -- each cookie of this chunk, as it first appears in it
    select anonymous_id, arg_min(user_data.client_ip_address, event_time) as ip,
           arg_min(user_data.client_user_agent, event_time) as user_agent, min(event_time) as first_time
    from raw_events
    where getvariable('probabilistic_matching')
        and load_id > getvariable('after_load_id') and load_id <= getvariable('until_load_id')
    group by anonymous_id
),
-- Those whose very first event is in this chunk. The earlier cookies are read only with matching on: a run with it
-- off (the default) otherwise hashed every cookie of the history to look up none.
new_cookies as (
    select * from chunk_cookies
    anti join (select anonymous_id from raw_events
               where getvariable('probabilistic_matching') and load_id <= getvariable('after_load_id')) as earlier
        using (anonymous_id)
),
candidates as (
    select fresh.anonymous_id, previous.anonymous_id as previous_id, fresh.ip, fresh.first_time
    from new_cookies as fresh
    join raw_events as previous
        on previous.user_data.client_ip_address = fresh.ip
        and previous.user_data.client_user_agent = fresh.user_agent
        and previous.anonymous_id <> fresh.anonymous_id
        and previous.event_time between fresh.first_time - getvariable('probabilistic_window') and fresh.first_time
    group by all
)
select least(anonymous_id, any_value(previous_id)), greatest(anonymous_id, any_value(previous_id)),
       'ip_user_agent', 'ip:' || any_value(ip), any_value(first_time)
from candidates
group by anonymous_id
having count(distinct previous_id) = 1         -- one candidate only: a crowd on one IP proves nothing
on conflict do nothing;
