-- Upserts the people this run touched into identities (sql/resolved_events.sql gives their events the first of
-- the phones listed here).
-- An identity is anchored on an email or, when nothing ties it to one, a Klaviyo _kx; its upstack_id is derived
-- from the anchor, so it is the same in every run and never renumbered. Phones, customer ids and a _kx join an
-- email's identity only when they translate to that one email (table email_translations).
-- Reads: identities, usable_identity_links, identity_observations, customers, evidence (temp), new_resolutions (temp),
--   email_translations, quarantined_identifiers (macro), upstack_id (macro)
-- Variables: now
-- Writes: identities
-- Leaves: touched_anchors (temp), anchor_links (temp)

create or replace temp table touched_anchors as
select distinct 'email' as anchor_type, email as anchor from evidence where email is not null
union
-- The targets' answers as resolved_events now holds them (sql/resolved_events.sql), without reading it again.
select distinct 'kx', kx from new_resolutions
where kx is not null and email is null;

create or replace temp table anchor_links as
select anchor.anchor_type, anchor.anchor, link.left_value as anonymous_id, link.first_seen, link.last_seen
from touched_anchors as anchor
join usable_identity_links as link
    on link.left_type = 'anonymous_id' and link.right_type = anchor.anchor_type and link.right_value = anchor.anchor;

-- Each touched person's row is replaced whole: deleted, then inserted. An `insert or replace` updates the rows it
-- finds in place, list columns included: on a day of the scale benchmark at three times the people (4,229 people),
-- this file took 0.33 s that way and takes 0.12 s so.
delete from identities where upstack_id in (select upstack_id(anchor_type, anchor) from touched_anchors);

insert into identities
with translated as (
    select email, id_type, list(id_value order by id_value) as id_values
    from email_translations
    semi join touched_anchors on touched_anchors.anchor_type = 'email' and touched_anchors.anchor = email
    group by email, id_type
),
-- The anchors' observations, found by value alone first, then kept as usable_identity_observations keeps them (not
-- quarantined): DuckDB filters a table's scan with a join's keys only when the join has one, and through the view it
-- checked every observation of the history against the quarantine first (0.088 s of CPU against 0.072 s on the
-- scale benchmark's day).
candidate_observations as materialized (
    select id_type, id_value, event_time, first_name, last_name, city, region
    from identity_observations
    semi join (select distinct anchor from touched_anchors) as touched
        on touched.anchor = identity_observations.id_value
),
profile as (
    select id_type as anchor_type, id_value as anchor,
           arg_max(first_name, event_time) filter (where first_name is not null) as first_name,
           arg_max(last_name, event_time) filter (where last_name is not null) as last_name,
           arg_max(city, event_time) filter (where city is not null) as city,
           arg_max(region, event_time) filter (where region is not null) as region
    from candidate_observations as observation
    semi join touched_anchors on touched_anchors.anchor_type = id_type and touched_anchors.anchor = id_value
    anti join quarantined_identifiers() as quarantined
        on quarantined.id_type = observation.id_type and quarantined.value = observation.id_value
    group by id_type, id_value
),
seen as (
    select anchor_type, anchor, min(first_seen) as first_seen, max(last_seen) as last_seen,
           count(distinct anonymous_id) as browser_count
    from anchor_links
    group by anchor_type, anchor
)
select
    upstack_id(anchor.anchor_type, anchor.anchor) as upstack_id,
    anchor.anchor_type,
    if(anchor.anchor_type = 'email', anchor.anchor, null) as email,
    if(anchor.anchor_type = 'kx', anchor.anchor, kx.id_values[1]) as kx,
    coalesce(phone.id_values, []) as phones,
    coalesce(customer.id_values, []) as customer_ids,
    coalesce(profile.first_name, customers.first_name) as first_name,
    coalesce(profile.last_name, customers.last_name) as last_name,
    coalesce(profile.city, customers.city) as city,
    coalesce(profile.region, customers.region) as region,
    coalesce(seen.first_seen, getvariable('now')) as first_seen,
    coalesce(seen.last_seen, getvariable('now')) as last_seen,
    coalesce(seen.browser_count, 0) as browser_count,
    getvariable('now') as updated_at
from touched_anchors as anchor
left join seen using (anchor_type, anchor)
left join profile using (anchor_type, anchor)
left join translated as kx on kx.email = anchor.anchor and kx.id_type = 'kx'
left join translated as phone on phone.email = anchor.anchor and phone.id_type = 'phone'
left join translated as customer on customer.email = anchor.anchor and customer.id_type = 'customer_id'
left join customers on customers.customer_id = customer.id_values[1];

-- identities has no key (sql/warehouse.sql says why): a chunk that would leave one of its people with two rows fails
-- here instead, in its transaction, so nothing of the chunk is written, as the key did. Only the chunk's people are
-- counted: the others' rows are as an earlier chunk, checked the same way, left them. (The delete above removes every
-- row of a touched person, one written by hand too: only an insert that wrote a person twice is caught here.)
select error('identity would leave ' || count(*) || ' of its people with two rows in identities ('
             || min(upstack_id) || ' among them): it writes each person it touched once. Nothing of this chunk was '
             || 'written.')
from (
    select upstack_id from identities
    where upstack_id in (select upstack_id(anchor_type, anchor) from touched_anchors)
    group by upstack_id having count(*) > 1
)
having count(*) > 0;
