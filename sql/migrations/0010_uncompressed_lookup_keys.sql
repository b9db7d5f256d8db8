-- Version 10 (issue 14): the values each run looks history rows up by are stored uncompressed: raw_events',
-- resolved_events' and klaviyo_skipped's event_id, and identity_links' left_value and right_value (sql/warehouse.sql
-- says why). DuckDB cannot change a column's compression in place, so each of the four tables is rebuilt with the
-- same columns and rows, in their order (load_id stays a watermark, and rows keep their place), and takes the old
-- one's name. A one-time cost of the upgrade: raw_events is the biggest table (its raw_json is copied as it is
-- stored, zstd).

create table raw_events_rebuilt (
    event_id         varchar using compression uncompressed not null,
    event_name       varchar not null,
    event_time       timestamptz not null,
    shop             varchar not null,
    anonymous_id     varchar not null,
    session_id       varchar not null,
    event_source_url varchar,
    referrer         varchar,
    user_data struct(
        email varchar, phone varchar, em varchar, ph varchar, external_id varchar,
        first_name varchar, last_name varchar, city varchar, region varchar, zip varchar, country varchar,
        kx varchar, klaviyo_identified boolean,
        fbp varchar, fbc varchar, gclid varchar, ttclid varchar, msclkid varchar,
        client_ip_address varchar, client_user_agent varchar
    ),
    custom_data struct(
        value double, currency varchar, order_id varchar, checkout_url varchar,
        discount_codes varchar[], search_term varchar,
        items struct(
            id varchar, name varchar, price double, quantity double, sku varchar, variant varchar,
            brand varchar, category varchar, url varchar, image_url varchar
        )[]
    ),
    consent struct(analytics boolean, marketing boolean, sale_of_data boolean),
    raw_json         json using compression zstd not null,
    source_file      varchar not null,
    line_number      bigint not null,
    ingested_at      timestamptz not null,
    load_id          bigint not null
);
insert into raw_events_rebuilt select * from raw_events;
drop table raw_events;
alter table raw_events_rebuilt rename to raw_events;

create table resolved_events_rebuilt (
    event_id                varchar using compression uncompressed not null,
    event_name              varchar not null,
    event_time              timestamptz not null,
    shop                    varchar not null,
    anonymous_id            varchar not null,
    session_id              varchar not null,
    browser_cluster_id      varchar not null,
    upstack_id              varchar,
    email                   varchar,
    kx                      varchar,
    phone                   varchar,
    match_method            varchar,
    evidence_event_id       varchar,
    unresolved_reason       varchar,
    klaviyo_native          boolean not null,
    klaviyo_native_reason   varchar,
    consent_marketing       boolean,
    resolved_at             timestamptz not null
);
insert into resolved_events_rebuilt select * from resolved_events;
drop table resolved_events;
alter table resolved_events_rebuilt rename to resolved_events;

create table klaviyo_skipped_rebuilt (
    event_id    varchar using compression uncompressed not null,
    event_name  varchar not null,
    reason      varchar not null,
    detail      varchar,
    skipped_at  timestamptz not null
);
insert into klaviyo_skipped_rebuilt select * from klaviyo_skipped;
drop table klaviyo_skipped;
alter table klaviyo_skipped_rebuilt rename to klaviyo_skipped;

create table identity_links_rebuilt (
    left_type      varchar not null,
    left_value     varchar using compression uncompressed not null,
    right_type     varchar not null,
    right_value    varchar using compression uncompressed not null,
    first_seen     timestamptz not null,
    last_seen      timestamptz not null,
    times_seen     bigint not null,
    first_event_id varchar not null
);
insert into identity_links_rebuilt select * from identity_links;
drop table identity_links;
alter table identity_links_rebuilt rename to identity_links;
