-- Merges this run's edges into identity_links (first/last seen, times seen, first source event). Sources: the
-- new observations (cookie <-> identifier, and person identifiers seen on one event), every new event
-- (session <-> cookie), and new customers export rows (customer id <-> email). Hashes (em, ph) link to the plain
-- value only when the hash matches it.
-- Reads: raw_events, customers, new_observations (temp), normalized_email (macro), email_rejection (macro),
--   e164_phone (macro), phone_rejection (macro)
-- Variables: after_load_id, until_load_id, after_customers_load_id
-- Writes: identity_links
-- Leaves: new_links (temp)

create or replace temp table new_links as
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
    on hashed.event_id = phone.event_id and hashed.id_type = 'phone_hash' and hashed.id_value = sha256(phone.id_value)
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
    and phone_rejection(e164_phone(phone)) is null;

insert into identity_links
select left_type, left_value, right_type, right_value,
       min(event_time), max(event_time), count(*), arg_min(event_id, event_time)
from new_links
group by all
on conflict do update set
    first_event_id = if(excluded.first_seen < identity_links.first_seen,
                         excluded.first_event_id, identity_links.first_event_id),
    first_seen = least(identity_links.first_seen, excluded.first_seen),
    last_seen = greatest(identity_links.last_seen, excluded.last_seen),
    times_seen = identity_links.times_seen + excluded.times_seen;
