-- Merges this run's edges into identity_links (first/last seen, times seen, first source event). Sources: the
-- new observations (cookie <-> identifier, and person identifiers seen on one event), every new event
-- (session <-> cookie), and new customers export rows (customer id <-> email). Hashes (em, ph) link to the plain
-- value only when the hash matches it.
-- Reads: raw_events, customers, identity_links, new_observations (temp), normalized_email (macro),
--   email_rejection (macro), e164_phone (macro), phone_rejection (macro)
-- Variables: after_load_id, until_load_id, after_customers_load_id
-- Writes: identity_links
-- Leaves: links_this_run (temp), merged_links (temp)

-- Each link of this run once, merged into identity_links by its four values: a link the table has is replaced by
-- its merged row, and a new one is inserted. identity_links has no key to upsert on (sql/warehouse.sql says why);
-- grouped by link, each of this run's links replaces one row or adds one.
create or replace temp table links_this_run as
with new_links as (
    select 'anonymous_id' as left_type, anonymous_id as left_value, id_type as right_type, id_value as right_value,
           event_time, event_id
    from new_observations

    union all
    select 'session_id', session_id, 'anonymous_id', anonymous_id, event_time, event_id
    from raw_events
    where load_id > getvariable('after_load_id') and load_id <= getvariable('until_load_id')

    union all                                       -- person identifiers seen together on one event
    select other.id_type, other.id_value, 'email', email.id_value, email.event_time, email.event_id
    from new_observations as email
    join new_observations as other
        on other.event_id = email.event_id
        and other.id_type in ('customer_id', 'phone', 'kx', 'email_hash', 'phone_hash')
    where email.id_type = 'email'
        and (other.id_type <> 'email_hash' or other.id_value = sha256(email.id_value))

    union all                                       -- a phone hash names its phone when both are seen
    select hashed.id_type, hashed.id_value, 'phone', phone.id_value, phone.event_time, phone.event_id
    from new_observations as phone
    join new_observations as hashed
        on hashed.event_id = phone.event_id and hashed.id_type = 'phone_hash'
        and hashed.id_value = sha256(phone.id_value)
    where phone.id_type = 'phone'

    union all
    select 'customer_id', customer_id, 'email', normalized_email(email), ingested_at, 'customers:' || source_file
    from customers
    where load_id > getvariable('after_customers_load_id') and load_id <= getvariable('until_load_id')
        and email is not null
        and email_rejection(normalized_email(email), '') is null

    union all
    select 'customer_id', customer_id, 'phone', e164_phone(phone), ingested_at, 'customers:' || source_file
    from customers
    where load_id > getvariable('after_customers_load_id') and load_id <= getvariable('until_load_id')
        and phone is not null
        and phone_rejection(e164_phone(phone)) is null
)
select left_type, left_value, right_type, right_value,
       min(event_time) as first_seen, max(event_time) as last_seen, count(*) as times_seen,
       arg_min(event_id, event_time) as first_event_id
from new_links
group by all;

-- The links the table has, merged with this run's sighting: found by a scan of identity_links' left values, then
-- deleted by rowid and inserted again as new rows. An UPDATE in place cost more than the scan (on the scale
-- benchmark's day, 0.1 s for 1,400 links seen again, spread over every row group of the history), and an anti join
-- for the new links was a second scan. The scan is filtered on left_value alone first: DuckDB filters a scan with a
-- join's keys only when the join has one, and joined on all four values every column of every link was read (0.07 s
-- against 0.04 s on that day). It reads left_value alone for the row ids (`seen_rows`), and the links' other columns
-- by those row ids (`known`): `select *` from the semi join read every column of the table whole, however few the
-- keys (for 20 new lines, 0.090 s against 0.039 s at 930,000 links).
create or replace temp table merged_links as
with seen_rows as materialized (
    select rowid as known_rowid
    from identity_links
    semi join (select distinct left_value from links_this_run) as seen using (left_value)
),
known as materialized (
    select rowid as known_rowid, *
    from identity_links
    where rowid in (select known_rowid from seen_rows)
)
select
    known.known_rowid,
    seen.left_type, seen.left_value, seen.right_type, seen.right_value,
    least(known.first_seen, seen.first_seen) as first_seen,
    greatest(known.last_seen, seen.last_seen) as last_seen,
    known.times_seen + seen.times_seen as times_seen,
    if(seen.first_seen < known.first_seen, seen.first_event_id, known.first_event_id) as first_event_id
from known
join links_this_run as seen
    on seen.left_type = known.left_type and seen.left_value = known.left_value
    and seen.right_type = known.right_type and seen.right_value = known.right_value;

delete from identity_links where rowid in (select known_rowid from merged_links);

insert into identity_links by name
select * exclude (known_rowid) from merged_links
union all by name
select * from links_this_run
anti join merged_links using (left_type, left_value, right_type, right_value);
