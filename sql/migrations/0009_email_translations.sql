-- Version 9 (issue 14): the identifiers' translations into one email are kept in a table of their own, which
-- sql/email_translations.sql changes only for the identifiers a run can change, instead of a temp table counted
-- again from every link and login of the history on each run (2.2 s of an hourly run at 20 million events). It
-- starts empty: the first identity run of this release has other SQL than the last one, and so translates every
-- identifier (variable settings_changed).

create table email_translations (
    id_type                 varchar not null,   -- customer_id | phone | email_hash | phone_hash | kx
    id_value                varchar not null,
    email                   varchar,            -- null: seen with more than one email, so no translation
    only_from_customer_file boolean not null    -- a customer id never seen on an event with its email (a login
                                                -- whose email only the customers export gives)
);
