-- Warehouse tables owned by ingestion. Idempotent: run on every write connection, so a new warehouse file
-- and an old one reach the same shape. Names are stable: analysts and dashboards depend on them (SPEC 7).

-- One row per landing file read (or found unreadable). Its (path, size, modified time, content hash) is what
-- makes re-runs idempotent: a path listed here is never read again.
create table if not exists ingested_files (
    path             varchar primary key,   -- relative to the landing folder, e.g. events/dt=2026-11-28/part-0.ndjson.gz
    kind             varchar not null,      -- events | customers
    size_bytes       bigint not null,
    modified_at      timestamptz not null,
    content_sha256   varchar not null,
    status           varchar not null,      -- ingested | unreadable
    error            varchar,               -- why an unreadable file could not be read
    lines            bigint not null,       -- non-blank lines (rows for Parquet and CSV)
    ingested_rows    bigint not null,
    duplicate_rows   bigint not null,       -- pixel retries of an event_id already kept
    quarantined_rows bigint not null,
    ingested_at      timestamptz not null,
    load_id          bigint not null        -- the ingestion transaction that read it (see raw_events.load_id)
);

-- A landing file whose content changed after it was ingested. Landing files are immutable by contract, so this
-- is reported for a person to look at, never silently re-read.
create table if not exists changed_files (
    path                  varchar not null,
    ingested_sha256       varchar not null,
    current_sha256        varchar not null,
    current_size_bytes    bigint not null,
    detected_at           timestamptz not null,
    primary key (path, current_sha256)
);

create table if not exists raw_events (
    event_id         varchar not null,
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
    raw_json         json not null,         -- the line exactly as received
    source_file      varchar not null,
    line_number      bigint not null,       -- 1-based line (row for Parquet) in source_file
    ingested_at      timestamptz not null,
    -- Numbers ingestion transactions in commit order (the writer holds the file lock), unlike ingested_at, which
    -- is each run's clock: downstream stages take the rows above the last load_id they processed.
    load_id          bigint not null
);

create table if not exists quarantined_events (
    source_file    varchar not null,
    line_number    bigint not null,
    raw_text       varchar not null,
    reason         varchar not null,        -- not_json | invalid_utf8 | not_an_object | missing_field | wrong_type
                                            -- | unparseable_time | future_time | time_before_2000
    detail         varchar not null,        -- what exactly is wrong, for the person fixing the pixel
    event_id       varchar,                 -- when the line has a readable one
    quarantined_at timestamptz not null
);

-- Latest known state of each Shopify customer (SPEC 3.2); a newer export replaces an older row.
create table if not exists customers (
    customer_id       varchar primary key,
    email             varchar,
    phone             varchar,
    first_name        varchar,
    last_name         varchar,
    city              varchar,
    region            varchar,
    country           varchar,
    accepts_marketing boolean,
    source_file       varchar not null,
    line_number       bigint not null,
    ingested_at       timestamptz not null,
    load_id           bigint not null
);

create table if not exists quarantined_customers (
    source_file    varchar not null,
    line_number    bigint not null,
    raw_text       varchar not null,
    reason         varchar not null,        -- missing_field | wrong_type
    detail         varchar not null,
    quarantined_at timestamptz not null
);
