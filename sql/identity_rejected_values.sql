-- Supernode quarantine (shared/identity-design.md 3): an identifier seen on more browsers (cookies) within
-- supernode_window than one person uses is not one person's. It is the placeholder that many shoppers type into a
-- pop-up (asdf@asdf.com, whatever its spelling and whether or not a block list names it), a shop's front-desk
-- phone, or a _kx posted to a group. Such a value joins identity_rejected_values with the reason 'many_browsers'
-- and its counts; its observations, links and the identity anchored on it are deleted, so no later step can use
-- it; every cookie that carried it is handed to re-resolution (temp table quarantined_cookies), which withdraws
-- what it named from the outbox.
-- The decision is taken once and kept: later sightings are rejected on arrival (sql/identity_observations.sql),
-- so an hourly run and a full rebuild quarantine the same values.
--
-- Cookies, not browser clusters, are counted: clusters are rebuilt later in the run, and a quarantine that does
-- not depend on them decides the same way however the history was cut into runs.
-- Variables: max_browsers_per_identifier, supernode_window.
-- Input: temp table new_observations (this run's usable identifiers).

create or replace temp table new_supernodes as
with touched as (
    select distinct id_type, id_value from new_observations
    where id_type in ('email', 'email_hash', 'phone', 'phone_hash', 'customer_id', 'kx')
),
history as (
    select observation.id_type, observation.id_value, observation.event_time, observation.anonymous_id,
           count(distinct observation.anonymous_id) over (
               partition by observation.id_type, observation.id_value order by observation.event_time
               range between getvariable('supernode_window') preceding and current row
           ) as browsers_in_window
    from identity_observations as observation
    semi join touched using (id_type, id_value)
)
select id_type, id_value, max(browsers_in_window) as browsers, count(*) as times_seen,
       min(event_time) as first_seen, max(event_time) as last_seen
from history
group by id_type, id_value
having max(browsers_in_window) > getvariable('max_browsers_per_identifier');

-- Never a conflict: a value already rejected never becomes an observation.
insert into identity_rejected_values (id_type, value, reason, times_seen, first_seen, last_seen, browsers)
select id_type, id_value, 'many_browsers', times_seen, first_seen, last_seen, browsers
from new_supernodes;

create or replace temp table quarantined_cookies as
select distinct observation.anonymous_id
from identity_observations as observation
semi join new_supernodes using (id_type, id_value);

delete from identity_observations
where (id_type, id_value) in (select (id_type, id_value) from new_supernodes);

delete from new_observations
where (id_type, id_value) in (select (id_type, id_value) from new_supernodes);

delete from identity_links
where (left_type, left_value) in (select (id_type, id_value) from new_supernodes)
   or (right_type, right_value) in (select (id_type, id_value) from new_supernodes);

-- A person anchored on it was never one person (sql/identities.sql rebuilds the others it touched).
delete from identities
where (anchor_type, if(anchor_type = 'email', email, kx)) in (select (id_type, id_value) from new_supernodes);
