-- Supernode quarantine (README: Identity resolution): an identifier seen on more browsers (cookies) within
-- supernode_window than one person uses is not one person's. It is the placeholder that many shoppers type into a
-- pop-up (asdf@asdf.com, whatever its spelling and whether or not a block list names it), a shop's front-desk
-- phone, or a _kx posted to a group. Such a value is listed in identity_rejected_values with the reason
-- 'many_browsers' and its counts; its observations and links are kept (and counted) but never used: the views
-- usable_identity_observations and usable_identity_links leave it out (sql/warehouse.sql).
--
-- Every run judges the values it saw again, with the settings of the run; a run under other settings or SQL
-- (settings_changed) also every value already quarantined, so a changed threshold releases values. Under the same
-- settings a quarantine can only stay: observations only accumulate, so a value's most browsers within the window
-- never falls (judging every quarantined value again on each run read the history of each, every run). Whatever a
-- value newly quarantined or released named, or may name now, is resolved again (temp table supernode_cookies),
-- which withdraws pending outbox rows that no longer hold.
--
-- Cookies, not browser clusters, are counted: clusters are rebuilt later in the run, and a verdict that does not
-- depend on them is the same however the history was cut into runs.
-- Reads: identity_observations, identity_rejected_values, resolved_events, new_observations (temp),
--   new_identifier_candidates (temp)
-- Variables: max_browsers_per_identifier, supernode_window, settings_changed
-- Writes: identity_rejected_values, identities
-- Leaves: quarantined_identifiers (macro), supernode_verdicts (temp), supernode_changes (temp),
--   supernode_cookies (temp), newly_quarantined (temp), quarantined_kx (variable), quarantined_phones (variable),
--   quarantined_customer_ids (variable)

-- The values quarantined as supernodes, which name nobody, as this step leaves them: the rule the views
-- usable_identity_observations and usable_identity_links apply (sql/warehouse.sql; a view of the warehouse cannot
-- call a temp macro), for what those views cannot reach: this list itself, a run's temp tables, and rows read by
-- row id (sql/email_translations.sql, sql/resolved_events.sql). DuckDB binds a table macro's tables when it is
-- created: it is created here, on a connection that holds identity_rejected_values.
create or replace temp macro quarantined_identifiers() as table
    select id_type, value from identity_rejected_values where reason = 'many_browsers';

create or replace temp table supernode_verdicts as
with candidates as (
    select id_type, id_value from new_observations
    where id_type in ('email', 'email_hash', 'phone', 'phone_hash', 'customer_id', 'kx')
    union
    select id_type, value from quarantined_identifiers() where getvariable('settings_changed')
    union
    -- A quarantined value a rule rejected this run (another shop's own address): sql/identity_observations.sql has
    -- just added to its counts, which are the verdict's, from the observations.
    select quarantined.id_type, quarantined.value
    from quarantined_identifiers() as quarantined
    semi join new_identifier_candidates as rejected
        on rejected.rejection is not null and rejected.id_type = quarantined.id_type
        and coalesce(rejected.id_value, trim(rejected.raw_value)) = quarantined.value
),
seen as (
    select id_type, id_value, anonymous_id, event_time
    from identity_observations
    semi join candidates using (id_type, id_value)
),
totals as (
    select id_type, id_value, count(distinct anonymous_id) as browsers_ever, count(*) as times_seen,
           min(event_time) as first_seen, max(event_time) as last_seen
    from seen
    group by id_type, id_value
),
-- The most browsers within the window, counted only for the values seen on more browsers than the limit in all:
-- no other can be over it in a window, and counting distinct browsers over a sliding window is this step's costly
-- part (most values are seen on one browser).
windowed as (
    select id_type, id_value, max(browsers_in_window) as browsers
    from (
        select id_type, id_value,
               count(distinct anonymous_id) over (
                   partition by id_type, id_value order by event_time
                   range between getvariable('supernode_window') preceding and current row
               ) as browsers_in_window
        from seen
        semi join (select id_type, id_value from totals
                   where browsers_ever > getvariable('max_browsers_per_identifier')) using (id_type, id_value)
    )
    group by id_type, id_value
)
-- browsers: the most within the window; for a value never over the limit in all, that total, which bounds it.
select id_type, id_value, coalesce(windowed.browsers, totals.browsers_ever) as browsers, times_seen, first_seen,
       last_seen, coalesce(windowed.browsers > getvariable('max_browsers_per_identifier'), false) as quarantined
from totals
left join windowed using (id_type, id_value);

create or replace temp table supernode_changes as
select verdict.id_type, verdict.id_value, verdict.quarantined
from supernode_verdicts as verdict
left join quarantined_identifiers() as listed on listed.id_type = verdict.id_type and listed.value = verdict.id_value
where verdict.quarantined <> (listed.value is not null);

delete from identity_rejected_values
where reason = 'many_browsers'
    and (id_type, value) in (select (id_type, id_value) from supernode_verdicts where not quarantined);

-- A value one shop's rules rejected (its own domain) may be a supernode under another's: the verdict wins.
insert into identity_rejected_values (id_type, value, reason, times_seen, first_seen, last_seen, browsers)
select id_type, id_value, 'many_browsers', times_seen, first_seen, last_seen, browsers
from supernode_verdicts
where quarantined
on conflict do update set
    reason = excluded.reason, times_seen = excluded.times_seen, first_seen = excluded.first_seen,
    last_seen = excluded.last_seen, browsers = excluded.browsers;

-- The cookies that saw a changed value, and those whose events it named through a translation (a login or a
-- phone whose email it is).
create or replace temp table supernode_cookies as
select observation.anonymous_id
from identity_observations as observation
semi join supernode_changes using (id_type, id_value)
union
select anonymous_id from resolved_events
where email in (select id_value from supernode_changes where id_type = 'email')
union
select anonymous_id from resolved_events
where kx in (select id_value from supernode_changes where id_type = 'kx');

-- A person anchored on a quarantined value was never one person; others no longer carry it. (A released value
-- comes back with the re-resolution of its cookies, in sql/identities.sql.)
create or replace temp table newly_quarantined as
select id_type, id_value from supernode_changes where quarantined;

delete from identities
where (anchor_type, if(anchor_type = 'email', email, kx)) in (select (id_type, id_value) from newly_quarantined);

set variable quarantined_kx = (select coalesce(list(id_value), []) from newly_quarantined where id_type = 'kx');
set variable quarantined_phones = (
    select coalesce(list(id_value), []) from newly_quarantined where id_type = 'phone');
set variable quarantined_customer_ids = (
    select coalesce(list(id_value), []) from newly_quarantined where id_type = 'customer_id');

-- Most runs quarantine none of these: the first condition, on the variables alone, is then false before any row is
-- read, where the others read every person's lists (0.01 s of an hour at `bench/scale.py --scale 3`).
update identities set
    kx = if(list_contains(getvariable('quarantined_kx'), kx), null, kx),
    phones = list_filter(phones, lambda phone: not list_contains(getvariable('quarantined_phones'), phone)),
    customer_ids = list_filter(customer_ids, lambda customer_id:
        not list_contains(getvariable('quarantined_customer_ids'), customer_id))
where len(getvariable('quarantined_kx')) + len(getvariable('quarantined_phones'))
        + len(getvariable('quarantined_customer_ids')) > 0
    and (list_contains(getvariable('quarantined_kx'), kx)
         or len(list_intersect(phones, getvariable('quarantined_phones'))) > 0
         or len(list_intersect(customer_ids, getvariable('quarantined_customer_ids'))) > 0);
