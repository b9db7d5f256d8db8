-- The warehouse's whole current schema: what a new (empty) warehouse file is created with. An existing file is
-- brought to this same shape by sql/migrations/ (upstack_pipeline/warehouse.py), so every change here comes with
-- the migration that makes it in place; a new column goes last in its table, where `alter table` puts it. Names are
-- stable: analysts and dashboards depend on them (SPEC 7). The version table, warehouse_schema_version, is created
-- by upstack_pipeline/warehouse.py.
--
-- The comments just above each table and on its columns are what the Dagster UI's catalog shows for it (table_docs
-- in upstack_pipeline/warehouse.py): write them for the analyst who queries the table.
--
-- The values each run looks history rows up by, and nothing else, are stored uncompressed (`using compression
-- uncompressed`): raw_events', resolved_events' and klaviyo_skipped's event_id, and identity_links' two values.
-- DuckDB has no index joins, so finding a run's few rows reads such a column whole, several times a run, and DuckDB's
-- default string compression (DICT_FSST) costs more to decode and to write than the bytes it saves: at the scale
-- benchmark's size, one more day net of nothing new took 3.2-3.3 s against 3.3-3.6 s, for a warehouse 14% larger
-- (README: speed). Migration 0010_uncompressed_lookup_keys.sql made the change to existing files.

-- How far each incremental stage has got: the last raw_events/customers load_id it processed.
create table if not exists pipeline_state (
    stage      varchar primary key,
    load_id    bigint not null,
    updated_at timestamptz not null,
    fingerprint varchar,    -- what else its last run read (settings, sources): unchanged and no new load, it skips
    overview   json         -- the numbers its overview last computed; null once a run changes something
                            -- (checkpoint_vacuum: raw_events' tail as ingestion last measured it)
);
-- The stages that run after identity, whose step records this table, have their rows from the start (load_id 0, no
-- fingerprint: never run), so the count identity's step records is the table's at the end of the sync. (A file
-- upgraded from before version 7 gets them at its first sync: an upgrade changes no row of an existing table.)
insert into pipeline_state (stage, load_id, updated_at) values
    ('klaviyo_mapping', 0, timestamptz '1970-01-01 00:00:00+00'),
    ('analytics_views', 0, timestamptz '1970-01-01 00:00:00+00')
on conflict do nothing;

------------------------------------------------------------------------------------------------ ingestion

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

-- One row per storefront event, the first sighting of each event_id: the contract's fields typed, user_data,
-- custom_data and consent as structs, the line as received, and where and when it was read.
create table if not exists raw_events (
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
    -- (Not part of raw_json's description, hence the blank line below.) Stored with zstd: JSON lines share most of
    -- their bytes, so it takes a quarter of the space of DuckDB's default string compression (DICT_FSST) and is
    -- several times cheaper to write, which was most of what an ingestion and the checkpoint after it cost.

    raw_json         json using compression zstd not null,  -- the line exactly as received
    source_file      varchar not null,
    line_number      bigint not null,       -- 1-based line (row for Parquet) in source_file
    ingested_at      timestamptz not null,
    -- Numbers ingestion transactions in commit order (the writer holds the file lock), unlike ingested_at, which
    -- is each run's clock: downstream stages take the rows above the last load_id they processed.
    load_id          bigint not null
);

-- The key raw_event_id_hashes holds an event_id by: the upper 64 bits of its MD5 as DuckDB's md5_number reads it.
-- The warehouse's one stored macro (the others are temp macros of the SQL that uses them), because the stored keys
-- depend on it; MD5 because DuckDB's own hash() may differ between its releases, and every stored key would then
-- miss (tests/test_ingestion.py computes the key without DuckDB).
create macro if not exists event_id_hash(event_id) as (md5_number(event_id) >> 64)::ubigint;

-- Internal to ingestion. One row per raw_events row: a hash of its event_id and its load. How ingestion finds the
-- few event ids of a batch that an earlier batch kept (a pixel's retries) without reading every event id of the
-- history: it scans these 8 bytes a row, then reads raw_events' event ids only in the loads that hold a match.
-- Written with raw_events, in the same transaction; rebuilt from it when the two tables' row counts differ (rows
-- added to raw_events by hand). After changing raw_events' event ids or loads by hand otherwise, delete its rows:
-- the next ingestion rebuilds it.
create table if not exists raw_event_id_hashes (
    id_hash  ubigint not null,              -- event_id_hash(event_id)
    load_id  bigint not null                -- the row's raw_events.load_id
);

-- One row per landing line that is not a usable event, with what is wrong with it: never dropped silently.
create table if not exists quarantined_events (
    source_file    varchar not null,
    line_number    bigint not null,
    raw_text       varchar not null,
    reason         varchar not null,        -- not_json | invalid_utf8 | not_an_object | missing_field | wrong_type
                                            -- | too_long | unparseable_time | future_time | time_before_2000
                                            -- | conflicting_duplicate
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

-- One row per customers export row that cannot be kept (no customer_id).
create table if not exists quarantined_customers (
    source_file    varchar not null,
    line_number    bigint not null,
    raw_text       varchar not null,
    reason         varchar not null,        -- missing_field
    detail         varchar not null,
    quarantined_at timestamptz not null
);

------------------------------------------------------------------------------------------------ identity

-- Every usable identifier seen on an event, normalised (emails trimmed and lower-cased, phones in E.164).
-- The timeline identity resolution reads: small next to raw_events, since most events carry none.
create table if not exists identity_observations (
    event_id          varchar not null,
    event_time        timestamptz not null,
    shop              varchar not null,
    anonymous_id      varchar not null,
    session_id        varchar not null,
    id_type           varchar not null,     -- email | email_hash | phone | phone_hash | customer_id | kx
                                            -- | fbclid | gclid | ttclid | msclkid
    id_value          varchar not null,
    first_name        varchar,
    last_name         varchar,
    city              varchar,
    region            varchar,
    load_id           bigint not null
);

-- Values that looked like identifiers but are never used as one: placeholders, blocked or malformed values, and
-- supernodes (seen on more browsers than one person uses, sql/identity_rejected_values.sql).
create table if not exists identity_rejected_values (
    id_type     varchar not null,
    value       varchar not null,
    reason      varchar not null,           -- placeholder | invalid_email | blocklisted | store_address
                                            -- | invalid_phone | invalid_hash | many_browsers
    times_seen  bigint not null,
    first_seen  timestamptz not null,
    last_seen   timestamptz not null,
    browsers    bigint,                     -- many_browsers: the most browsers (cookies) that showed it within
                                            -- the supernode window
    primary key (id_type, value)
);

-- No primary key, for the reason given at resolved_events below: sql/identity_links.sql merges each run's links,
-- grouped by link, into it, so it holds one row per link all the same.

-- Edges between identifiers observed together (SPEC 4): cookie <-> email/phone/customer id/_kx/click ids,
-- session <-> cookie, customer id <-> email (events and the customers export), email hash <-> email, ... One row per
-- link (its four values).
create table if not exists identity_links (
    left_type      varchar not null,
    left_value     varchar using compression uncompressed not null,
    right_type     varchar not null,
    right_value    varchar using compression uncompressed not null,
    first_seen     timestamptz not null,
    last_seen      timestamptz not null,
    times_seen     bigint not null,
    first_event_id varchar not null         -- 'customers:<file>' for links from the customers export
);

-- What identity resolution may use: every observation and link but those of a value quarantined as a supernode
-- (reason many_browsers in identity_rejected_values). Its sightings are kept and counted, so a higher threshold
-- can release it.
create or replace view usable_identity_observations as
select * from identity_observations as observation
where not exists (select 1 from identity_rejected_values as quarantined
                  where quarantined.reason = 'many_browsers'
                      and quarantined.id_type = observation.id_type and quarantined.value = observation.id_value);

create or replace view usable_identity_links as
select * from identity_links as link
where not exists (select 1 from identity_rejected_values as quarantined
                  where quarantined.reason = 'many_browsers'
                      and quarantined.id_type = link.left_type and quarantined.value = link.left_value)
    and not exists (select 1 from identity_rejected_values as quarantined
                    where quarantined.reason = 'many_browsers'
                        and quarantined.id_type = link.right_type and quarantined.value = link.right_value);

-- Each identifier seen with an email (customer id, phone, email or phone hash, _kx), and the one email it translates
-- into, from the usable links: kept by sql/email_translations.sql, which changes only what a run can change. No
-- primary key, for the reason given at resolved_events below: one row per identifier all the same.
create table if not exists email_translations (
    id_type                 varchar not null,   -- customer_id | phone | email_hash | phone_hash | kx
    id_value                varchar not null,
    email                   varchar,            -- null: seen with more than one email, so no translation
    only_from_customer_file boolean not null    -- a customer id never seen on an event with its email (a login
                                                -- whose email only the customers export gives)
);

-- Same-browser evidence between two cookies: one session on both, or one ad click opened in both within minutes.
create table if not exists browser_links (
    anonymous_id       varchar not null,
    other_anonymous_id varchar not null,
    linked_by          varchar not null,    -- shared_session | click_id_handoff | ip_user_agent (probabilistic)
    evidence           varchar not null,    -- the session id or the click id
    first_seen         timestamptz not null,
    primary key (anonymous_id, other_anonymous_id, linked_by)
);

-- Cookies that belong to a multi-cookie browser cluster; a cookie not listed is a cluster of its own.
create table if not exists browser_clusters (
    anonymous_id       varchar primary key,
    browser_cluster_id varchar not null,
    linked_by          varchar not null     -- how the cluster's cookies were joined, e.g. 'click_id_handoff'
);

-- What the guards refused, for a person to review: shared devices, shared click ids, oversize clusters,
-- conflicting emails.
create table if not exists identity_flags (
    flag        varchar not null,           -- shared_device | shared_click_id | oversize_cluster
                                            -- | conflicting_emails
    subject     varchar not null,           -- the cookie, cluster, click id or _kx
    detail      varchar not null,
    flagged_at  timestamptz not null,
    primary key (flag, subject)
);

-- No primary key (since schema version 11), for the reason given at resolved_events below: one row per upstack_id
-- all the same, since sql/identities.sql deletes a touched person's row before writing it again, and fails an identity
-- chunk that would leave one of its people with two rows.

-- People: one per email (the strongest identifier), plus one per Klaviyo _kx never tied to an email.
create table if not exists identities (
    upstack_id     varchar not null,        -- derived from the anchor, so it never changes between runs
    anchor_type    varchar not null,        -- email | kx
    email          varchar,
    kx             varchar,
    phones         varchar[],
    customer_ids   varchar[],
    first_name     varchar,
    last_name      varchar,
    city           varchar,
    region         varchar,
    first_seen     timestamptz not null,
    last_seen      timestamptz not null,
    browser_count  bigint not null,
    updated_at     timestamptz not null
);

-- No primary key, as raw_events has none: DuckDB writes a changed index whole at the next checkpoint, so a key here
-- made every run's commit cost in proportion to the history. It holds one row per event_id all the same: identity
-- deletes an event's row before writing its new one, in the same transaction, and fails a chunk that would leave
-- one of its events with two rows (the end of sql/resolved_events.sql).

-- One row per commerce event (ViewContent, AddToCart, InitiateCheckout, Purchase): who is behind it and how we
-- know, or why nobody.
create table if not exists resolved_events (
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

------------------------------------------------------------------------------------------------ klaviyo

-- One row per Klaviyo event to send (Placed Order also gives one Ordered Product per line). The event and its
-- profile are stored as Klaviyo's JSON:API attribute objects, ready to be grouped by profile into bulk requests.
create table if not exists klaviyo_outbox (
    unique_id     varchar primary key,      -- Klaviyo's dedupe key: event_id, or event_id:<line> for Ordered Product
    event_id      varchar not null,
    event_name    varchar not null,         -- the pixel's
    metric_name   varchar not null,         -- Klaviyo's, e.g. 'Added to Cart from Upstack'
    profile_key   varchar not null,         -- 'email:<address>' or 'kx:<_kx>': events are sent grouped by it
    profile       json not null,            -- profile attributes (identifier, names, location, upstack_* properties)
    event         json not null,            -- event attributes (properties, time, value, unique_id, metric, backfill)
    backfill      boolean not null,         -- older than max_event_age: recorded by Klaviyo without firing flows
    status        varchar not null,         -- pending | claimed | delivered | dead_letter
    created_at    timestamptz not null,
    -- Claimed just before its request is sent, settled after: a row still claimed when a run starts was
    -- in flight when a run died, and is sent again (its unique_id makes that harmless on Klaviyo's side).
    claimed_at    timestamptz,
    delivered_at  timestamptz,
    notes         varchar,                  -- what was changed to fit Klaviyo's limits (a profile string dropped)
    request_id    varchar                   -- the request that settled it (klaviyo_deliveries.request_id)
);

-- The Klaviyo metric of each commerce event the pixel sends, and our name for it under the current
-- UPSTACK_METRIC_TEMPLATE: kept by the mapping stage, so analysts' views and queries name metrics as Klaviyo does.
create table if not exists commerce_metrics (
    event_name     varchar primary key,     -- the pixel's: ViewContent | AddToCart | InitiateCheckout | Purchase
    klaviyo_metric varchar not null,        -- Klaviyo's standard name, e.g. 'Added to Cart'
    metric_name    varchar not null,        -- ours, e.g. 'Added to Cart from Upstack'
    enabled        boolean not null,        -- in UPSTACK_ENABLED_EVENTS
    backup_utm_campaign varchar             -- utm_campaign of the links of the backup flow it triggers (README
                                            -- "Backup flows in Klaviyo"); null when no backup flow starts from it
);

-- No primary key, for the reason given at resolved_events: mapping skips only undecided events, and fails a run
-- that would skip one of its events twice (upstack_pipeline.klaviyo.mapping), so it holds one row per event_id.

-- Commerce events that are not sent, and why; with the outbox it accounts for every decided commerce event.
create table if not exists klaviyo_skipped (
    event_id    varchar using compression uncompressed not null,
    event_name  varchar not null,
    reason      varchar not null,           -- disabled_event | no_consent | unresolved | native_identified
                                            -- | profile_creation_disabled | invalid
    detail      varchar,
    skipped_at  timestamptz not null
);

-- One row per HTTP request to Klaviyo (retries included). Never the API key.
create table if not exists klaviyo_deliveries (
    sent_at     timestamptz not null,
    endpoint    varchar not null,
    status      integer,                    -- null when no answer came (timeout, dropped connection)
    events      integer not null,
    bytes       bigint not null,
    latency_ms  double not null,
    error       varchar,
    request_id  varchar                     -- one per request, shared by its retries (klaviyo_outbox.request_id)
);

-- Outbox rows Klaviyo refused, with its reason; they are not sent again.
create table if not exists klaviyo_dead_letters (
    unique_id    varchar primary key,
    event_id     varchar not null,
    metric_name  varchar not null,
    status       integer,
    detail       varchar not null,
    dead_at      timestamptz not null
);
