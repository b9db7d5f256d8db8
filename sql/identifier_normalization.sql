-- How raw identifier values become identifiers, or are rejected. Temp macros, defined per connection before the
-- identity SQL runs, so events and the customers export are judged by exactly the same rules. blocked_emails lists
-- 'exact@address', '@domain' and 'local@' entries.
-- Variables: blocked_emails
-- Leaves: normalized_email (macro), email_rejection (macro), e164_phone (macro), phone_rejection (macro),
--   hash_rejection (macro), token_rejection (macro), upstack_id (macro), url_parameter (macro)

create or replace temp macro normalized_email(raw) as lower(trim(raw));

create or replace temp macro email_rejection(email, shop) as case
    when email in ('', 'undefined', 'null', 'none', 'n/a', 'na', 'anonymous', '-', '0') then 'placeholder'
    when not regexp_full_match(email, '[a-z0-9._%+''-]+@[a-z0-9-]+(\.[a-z0-9-]+)*\.[a-z]{2,}') then 'invalid_email'
    when list_contains(getvariable('blocked_emails'), email)
        or list_contains(getvariable('blocked_emails'), '@' || split_part(email, '@', 2))
        or list_contains(getvariable('blocked_emails'), split_part(email, '@', 1) || '@') then 'blocklisted'
    when split_part(email, '@', 2) = lower(shop) or lower(shop) like '%.' || split_part(email, '@', 2)
        then 'store_address'
end;

-- E.164: an explicit '+' keeps its country code; ten digits are taken as North American (+1).
create or replace temp macro e164_phone(raw) as case
    when trim(raw) like '+%' and length(regexp_replace(raw, '[^0-9]', '', 'g')) between 8 and 15
        then '+' || regexp_replace(raw, '[^0-9]', '', 'g')
    when length(regexp_replace(raw, '[^0-9]', '', 'g')) = 10 then '+1' || regexp_replace(raw, '[^0-9]', '', 'g')
    when length(regexp_replace(raw, '[^0-9]', '', 'g')) = 11 and regexp_replace(raw, '[^0-9]', '', 'g') like '1%'
        then '+' || regexp_replace(raw, '[^0-9]', '', 'g')
end;

create or replace temp macro phone_rejection(phone) as case
    when phone is null then 'invalid_phone'
    when right(phone, 10) in ('5555555555', '1234567890', '0123456789', '9876543210')
        or replace(right(phone, 10), left(right(phone, 10), 1), '') = '' then 'placeholder'
end;

-- em / ph: SHA-256 hex of the normalised email or E.164 phone.
create or replace temp macro hash_rejection(value) as case
    when value = sha256('') then 'placeholder'
    when not regexp_full_match(value, '[0-9a-f]{64}') then 'invalid_hash'
end;

create or replace temp macro token_rejection(value) as case
    when lower(value) in ('', 'undefined', 'null', 'none', '0', '-1', 'nan', 'false', 'true') then 'placeholder'
end;

-- A person's upstack_id, from the identifier that anchors them ('email', else Klaviyo's 'kx'): the same person gets
-- the same id in every run and rebuild, and two anchors never share one. resolved_events and identities both use it.
create or replace temp macro upstack_id(anchor_type, anchor) as 'up_' || left(sha256(anchor_type || ':' || anchor), 20);

-- A URL's query parameter as it is written (not decoded), null when absent or empty. The regular expression runs only
-- on URLs that hold the name: most hold none of the click ids, and running it on every URL for each of them was
-- most of what reading an event's identifiers cost.
create or replace temp macro url_parameter(url, name) as
    if(contains(url, name || '='), nullif(regexp_extract(url, '[?&]' || name || '=([^&#]+)', 1), ''), null);
