-- Identifiers that translate into exactly one email (customer id, phone, email or phone hash, _kx), kept in
-- email_translations, and the emails each linked cookie carries, typed or translated. Built before browser
-- clusters, so the guard that keeps two people's browsers apart sees an email that came from a login exactly as one
-- that was typed.
--
-- A run changes only the rows of the identifiers it saw with an email, from the row kept and this run's links:
-- links only accumulate, so an identifier seen with a second email stays without a translation (kept with email
-- null, so that a later run knows it) unless one of its emails is quarantined. Counting every translation again read
-- every link and every login of the history on each run. The history is read only for the identifiers whose usable
-- links changed otherwise (temp table retranslated): those whose quarantine changed, and those linked to an email
-- whose quarantine changed; and for every identifier after a run under other settings or SQL (settings_changed).
-- Reads: identity_links, usable_identity_links, usable_identity_observations, browser_links, email_translations,
--   links_this_run (temp), new_observations (temp), supernode_changes (temp), quarantined_identifiers (macro)
-- Variables: settings_changed
-- Writes: email_translations
-- Leaves: retranslated (temp), translation_changes (temp), linked_cookie_emails (temp)

create or replace temp table retranslated as
select id_type, id_value from supernode_changes
where id_type in ('customer_id', 'phone', 'email_hash', 'phone_hash', 'kx')
union
select link.left_type, link.left_value
from identity_links as link
semi join supernode_changes as changed on changed.id_type = 'email' and changed.id_value = link.right_value
where link.right_type = 'email' and link.left_type in ('customer_id', 'phone', 'email_hash', 'phone_hash', 'kx')
union
select left_type, left_value from identity_links
where getvariable('settings_changed')
    and right_type = 'email' and left_type in ('customer_id', 'phone', 'email_hash', 'phone_hash', 'kx');

-- only_from_customer_file: a customer id the pixel never saw on one event with its email (a login whose email
-- only the customers export gives). Taken from the observations, not from which source came first, so it does not
-- depend on whether the export arrived before or after the events.
create or replace temp table translation_changes as
with history as (
    select left_type as id_type, left_value as id_value, min(right_value) as first_email,
           max(right_value) as last_email  -- one email when they are equal: a count of distinct emails costs more
    from usable_identity_links as link
    semi join retranslated on retranslated.id_type = link.left_type and retranslated.id_value = link.left_value
    where right_type = 'email'
    group by left_type, left_value
),
-- The logins of the identifiers read from the history (none or a few on most runs) come first, then the emails of
-- those logins' events. Joined as two sets of observations, logins and emails, the join was built from every email
-- observation of the history, even when no identifier read from the history had a login (0.014 s of the 0.039 s
-- this statement took on the scale benchmark's day).
history_login_events as materialized (
    select event_id, id_value from usable_identity_observations as login
    semi join retranslated on retranslated.id_type = login.id_type and retranslated.id_value = login.id_value
    where login.id_type = 'customer_id'
),
history_logins as (
    select distinct login.id_value, email.id_value as email
    from history_login_events as login
    join (
        select event_id, id_value from usable_identity_observations as email
        semi join history_login_events using (event_id)
        where email.id_type = 'email'
    ) as email using (event_id)
),
-- This run's usable links to an email, of the identifiers not read from the history.
run_links as (
    select left_type as id_type, left_value as id_value, min(right_value) as first_email,
           max(right_value) as last_email
    from links_this_run as link
    anti join retranslated on retranslated.id_type = link.left_type and retranslated.id_value = link.left_value
    anti join quarantined_identifiers() as quarantined
        on quarantined.id_type = link.left_type and quarantined.value = link.left_value
    anti join quarantined_identifiers() as quarantined_email
        on quarantined_email.id_type = 'email' and quarantined_email.value = link.right_value
    where link.right_type = 'email' and link.left_type in ('customer_id', 'phone', 'email_hash', 'phone_hash', 'kx')
    group by left_type, left_value
),
run_logins as (
    select distinct login.id_value, email.id_value as email
    from new_observations as login
    join new_observations as email on email.event_id = login.event_id and email.id_type = 'email'
    where login.id_type = 'customer_id'
),
carried_on as (
    select run.id_type, run.id_value,
           case when kept.id_value is null then if(run.first_email = run.last_email, run.first_email, null)
                when kept.email = run.first_email and kept.email = run.last_email then kept.email
           end as email,  -- else null: seen with a second email, now or before
           coalesce(kept.only_from_customer_file, true) as only_from_customer_file_before
    from run_links as run
    left join email_translations as kept using (id_type, id_value)
)
select history.id_type, history.id_value, if(first_email = last_email, first_email, null) as email,
       history.id_type = 'customer_id' and first_email = last_email and history_logins.email is null
           as only_from_customer_file
from history
left join history_logins on history.id_type = 'customer_id'
    and history_logins.id_value = history.id_value and history_logins.email = history.first_email
union all
select carried_on.id_type, carried_on.id_value, carried_on.email,
       carried_on.id_type = 'customer_id' and carried_on.email is not null
           and carried_on.only_from_customer_file_before and run_logins.email is null
from carried_on
left join run_logins on carried_on.id_type = 'customer_id'
    and run_logins.id_value = carried_on.id_value and run_logins.email = carried_on.email;

delete from email_translations
where getvariable('settings_changed')
    or rowid in (select translation.rowid from email_translations as translation
                 semi join (select id_type, id_value from retranslated
                            union all
                            select id_type, id_value from translation_changes) using (id_type, id_value));

insert into email_translations select * from translation_changes;

-- Emails per cookie, for the cookies browser_links joins (a _kx names a profile, not an email: left out). Their
-- links first (`cookie_links`), then the quarantine that usable_identity_links applies: through the view, DuckDB
-- checked every link of the history against the quarantine before keeping the few of those cookies.
create or replace temp table linked_cookie_emails as
with linked_cookies as (
    select anonymous_id from browser_links union select other_anonymous_id from browser_links
),
cookie_links as materialized (
    select left_type, left_value, right_type, right_value
    from identity_links
    semi join linked_cookies on linked_cookies.anonymous_id = identity_links.left_value
    where left_type = 'anonymous_id' and right_type in ('email', 'customer_id', 'phone', 'email_hash', 'phone_hash')
)
select distinct link.left_value as anonymous_id,
       if(link.right_type = 'email', link.right_value, translation.email) as email
from cookie_links as link
anti join quarantined_identifiers() as quarantined_cookie
    on quarantined_cookie.id_type = link.left_type and quarantined_cookie.value = link.left_value
anti join quarantined_identifiers() as quarantined
    on quarantined.id_type = link.right_type and quarantined.value = link.right_value
left join email_translations as translation
    on translation.id_type = link.right_type and translation.id_value = link.right_value
where if(link.right_type = 'email', link.right_value, translation.email) is not null;
