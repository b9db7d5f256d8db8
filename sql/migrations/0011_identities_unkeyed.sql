-- Version 11 (issue 14): identities loses its primary key, as resolved_events, klaviyo_skipped and identity_links did
-- in version 8. DuckDB keeps a table's key in an index that it loads to change a row and writes whole at the next
-- checkpoint, so every run that touched people paid for an index of every person: at 2.4 million people (the
-- 20-million-event backfill's) about 0.17 s of a run that touched thousands, and 160 MB of the file. It still holds
-- one row per upstack_id: sql/identities.sql deletes a touched person's row before writing it again and fails an
-- identity chunk that would leave one of its people with two rows, in its transaction, as the key did. DuckDB cannot
-- drop a constraint, so the table is rebuilt with the same columns and rows, in their order, and takes the old one's
-- name.

create table identities_unkeyed (
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

insert into identities_unkeyed select * from identities;
drop table identities;
alter table identities_unkeyed rename to identities;
