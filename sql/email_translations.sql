-- Identifiers that translate into exactly one email (customer id, phone, email or phone hash, _kx), and the
-- emails each linked cookie carries, typed or translated. Built before browser clusters, so the guard that keeps
-- two people's browsers apart sees an email that came from a login exactly as one that was typed.
-- Reads: usable_identity_links, usable_identity_observations, browser_links
-- Leaves: email_translations (temp), linked_cookie_emails (temp)

-- only_from_customer_file: a customer id the pixel never saw on one event with its email (a login whose email
-- only the customers export gives). Taken from the observations, not from which source came first, so it does not
-- depend on whether the export arrived before or after the events.
create or replace temp table email_translations as
with translations as (
    select left_type as id_type, left_value as id_value, min(right_value) as email
    from usable_identity_links
    where left_type in ('customer_id', 'phone', 'email_hash', 'phone_hash', 'kx') and right_type = 'email'
    group by left_type, left_value
    having min(right_value) = max(right_value)  -- one email: a count of distinct emails costs a grouping more
),
logins_with_email as (
    select distinct login.id_value, email.id_value as email
    from usable_identity_observations as login
    join usable_identity_observations as email on email.event_id = login.event_id and email.id_type = 'email'
    where login.id_type = 'customer_id'
)
select translations.*,
       translations.id_type = 'customer_id' and logins_with_email.email is null as only_from_customer_file
from translations
left join logins_with_email on translations.id_type = 'customer_id'
    and logins_with_email.id_value = translations.id_value and logins_with_email.email = translations.email;

-- Emails per cookie, for the cookies browser_links joins (a _kx names a profile, not an email: left out).
create or replace temp table linked_cookie_emails as
with linked_cookies as (
    select anonymous_id from browser_links union select other_anonymous_id from browser_links
)
select distinct link.left_value as anonymous_id,
       if(link.right_type = 'email', link.right_value, translation.email) as email
from usable_identity_links as link
semi join linked_cookies on linked_cookies.anonymous_id = link.left_value
left join email_translations as translation
    on translation.id_type = link.right_type and translation.id_value = link.right_value
where link.left_type = 'anonymous_id'
    and link.right_type in ('email', 'customer_id', 'phone', 'email_hash', 'phone_hash')
    and if(link.right_type = 'email', link.right_value, translation.email) is not null;
