-- Version 8 (issue 14): resolved_events, klaviyo_skipped and identity_links lose their primary keys. DuckDB writes a
-- changed index whole at the next checkpoint, so every run that wrote a few rows to one of them paid, at its commit,
-- for an index of the whole history. Each still holds one row per event (per link): identity and mapping fail a run
-- that would write an event twice, in its transaction, as the keys did, and identity merges its links grouped by
-- link. DuckDB cannot drop a constraint, so each table is rebuilt with the same columns and rows, in their order,
-- and takes the old one's name.

create table resolved_events_unkeyed (
    event_id                varchar not null,
    event_name              varchar not null,
    event_time              timestamptz not null,
    shop                    varchar not null,
    anonymous_id            varchar not null,
    session_id              varchar not null,
    browser_cluster_id      varchar not null,
    upstack_id              varchar,
    email                   varchar,
    kx                      varchar,
    phone                   varchar,        -- the person's first phone, from identities (sql/identities.sql)
    match_method            varchar,        -- typed_in_event | same_session | login | customer_file | cookie_history
                                            -- | click_id_handoff | klaviyo_click | probabilistic_ip_ua
    evidence_event_id       varchar,        -- the event whose identifier decided it
    unresolved_reason       varchar,        -- no_evidence | shared_device | conflicting_identity
                                            -- | quarantined_identifier
    klaviyo_native          boolean not null,
    klaviyo_native_reason   varchar,        -- klaviyo_cookie | typed_in_event | typed_in_session
    consent_marketing       boolean,
    resolved_at             timestamptz not null
);

insert into resolved_events_unkeyed select * from resolved_events;
drop table resolved_events;
alter table resolved_events_unkeyed rename to resolved_events;

create table klaviyo_skipped_unkeyed (
    event_id    varchar not null,
    event_name  varchar not null,
    reason      varchar not null,           -- disabled_event | no_consent | unresolved | native_identified
                                            -- | profile_creation_disabled | invalid
    detail      varchar,
    skipped_at  timestamptz not null
);

insert into klaviyo_skipped_unkeyed select * from klaviyo_skipped;
drop table klaviyo_skipped;
alter table klaviyo_skipped_unkeyed rename to klaviyo_skipped;

create table identity_links_unkeyed (
    left_type      varchar not null,
    left_value     varchar not null,
    right_type     varchar not null,
    right_value    varchar not null,
    first_seen     timestamptz not null,
    last_seen      timestamptz not null,
    times_seen     bigint not null,
    first_event_id varchar not null         -- 'customers:<file>' for links from the customers export
);

insert into identity_links_unkeyed select * from identity_links;
drop table identity_links;
alter table identity_links_unkeyed rename to identity_links;
