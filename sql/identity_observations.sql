-- The identifiers carried by the events of this chunk's loads (after variable after_load_id, up to until_load_id),
-- normalised and judged
-- (sql/identifier_normalization.sql). Well-formed ones go to identity_observations and stay in temp table
-- new_observations for the rest of the run (a supernode's too: sql/identity_rejected_values.sql counts them);
-- rejected ones are counted in identity_rejected_values.
-- Reads: raw_events, normalized_email (macro), e164_phone (macro), email_rejection (macro), hash_rejection (macro),
--   phone_rejection (macro), token_rejection (macro), url_parameter (macro)
-- Variables: after_load_id, until_load_id
-- Writes: identity_observations, identity_rejected_values
-- Leaves: new_identifier_candidates (temp), new_observations (temp)

create or replace temp table new_identifier_candidates as
with events as (
    select
        event_id, event_time, shop, anonymous_id, session_id, user_data, event_source_url as url, load_id
    from raw_events
    where load_id > getvariable('after_load_id') and load_id <= getvariable('until_load_id')
),
candidates as (
    select
        event_id, event_time, shop, anonymous_id, session_id, load_id,
        user_data.first_name, user_data.last_name, user_data.city, user_data.region,
        -- Only the identifiers the event carries become rows: most events carry one or none of the ten, and the
        -- rows of the absent ones, each with the event's columns, were most of this statement's work.
        unnest(list_filter([
            {'id_type': 'email', 'raw': user_data.email},
            {'id_type': 'email_hash', 'raw': user_data.em},
            {'id_type': 'phone', 'raw': user_data.phone},
            {'id_type': 'phone_hash', 'raw': user_data.ph},
            {'id_type': 'customer_id', 'raw': user_data.external_id},
            {'id_type': 'kx', 'raw': coalesce(user_data.kx,
                url_decode(url_parameter(url, '_kx')))},
            {'id_type': 'fbclid', 'raw': coalesce(nullif(regexp_extract(user_data.fbc, '^fb\.\d+\.\d+\.(.+)$', 1), ''),
                url_parameter(url, 'fbclid'))},
            {'id_type': 'gclid', 'raw': coalesce(user_data.gclid, url_parameter(url, 'gclid'))},
            {'id_type': 'ttclid', 'raw': coalesce(user_data.ttclid, url_parameter(url, 'ttclid'))},
            {'id_type': 'msclkid', 'raw': coalesce(user_data.msclkid, url_parameter(url, 'msclkid'))}
        ], lambda candidate: candidate.raw is not null)) as candidate
    from events
),
normalised as (
    select
        * exclude (candidate),
        candidate.id_type as id_type,
        case candidate.id_type
            when 'email' then normalized_email(candidate.raw)
            when 'email_hash' then lower(trim(candidate.raw))
            when 'phone_hash' then lower(trim(candidate.raw))
            when 'phone' then e164_phone(candidate.raw)
            else trim(candidate.raw)
        end as id_value,
        candidate.raw as raw_value
    from candidates
)
select
    *,
    case id_type
        when 'email' then email_rejection(id_value, shop)
        when 'email_hash' then hash_rejection(id_value)
        when 'phone_hash' then hash_rejection(id_value)
        when 'phone' then phone_rejection(id_value)
        else token_rejection(id_value)
    end as rejection
from normalised;

create or replace temp table new_observations as
select event_id, event_time, shop, anonymous_id, session_id, id_type, id_value,
       first_name, last_name, city, region, load_id
from new_identifier_candidates
where rejection is null;

insert into identity_observations select * from new_observations;

insert into identity_rejected_values (id_type, value, reason, times_seen, first_seen, last_seen)
select id_type, coalesce(id_value, trim(raw_value)), any_value(rejection), count(*), min(event_time), max(event_time)
from new_identifier_candidates
where rejection is not null
group by id_type, coalesce(id_value, trim(raw_value))
on conflict do update set
    times_seen = identity_rejected_values.times_seen + excluded.times_seen,
    first_seen = least(identity_rejected_values.first_seen, excluded.first_seen),
    last_seen = greatest(identity_rejected_values.last_seen, excluded.last_seen);
