-- Version 8 (issue 14): identity resolution keeps the identifiers that translate into one email in a table,
-- counted again each run only for the identifiers the run may have changed, instead of over the whole history in a
-- temp table. Created empty: the first run with this release's SQL counts every identifier (translate_all).

-- The identifiers that translate into exactly one email (sql/email_translations.sql): a customer id, phone, email
-- or phone hash, or Klaviyo _kx whose usable links name one email and no other. Identity resolution names a person
-- through them; an identifier linked to two emails translates to neither. Kept up to date run by run.
create table if not exists email_translations (
    id_type                 varchar not null,   -- customer_id | phone | email_hash | phone_hash | kx
    id_value                varchar not null,
    email                   varchar not null,   -- the one email its links name
    only_from_customer_file boolean not null    -- a customer id whose email only the customers export gives
);
