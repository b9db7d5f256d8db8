-- Resolves the commerce events this run can change: new ones, and those on browser clusters that got new
-- evidence, new members, or a customers export row. Everything else in resolved_events stays as it was, and so
-- does the row of an event resolved again to the same answer, so a run costs in proportion to what is new.
--
-- For each event, in order (README: Identity resolution):
--   1. an email seen in the same session (typed in this event, else the latest one before it in the session, else
--      the first one after it: back-stitching), a login, or a phone/hash that translates to exactly one email;
--      else a Klaviyo _kx of the session;
--   2. else the browser cluster's history before the event, as far back as a cookie lives (cookie_lifetime): the
--      latest email, unless the cluster has shown more than max_emails_per_browser emails (a shared device), or a
--      later _kx when the cluster carries no email. A _kx never renames a browser's owner: in its own session,
--      on a browser that carries an email the _kx is not known to belong to, the event is left unresolved (a
--      forwarded Klaviyo email must not send one person's cart to another); later sessions keep the browser's
--      email unless the _kx is known to belong to someone else;
--   3. else unresolved, with the reason.
-- Person identifiers only translate into an email; they never join two browsers (sql/browser_clusters.sql), and a
-- value quarantined as a supernode is never used (usable_identity_observations, sql/identity_rejected_values.sql).
--
-- Reads: browser_clusters, identity_links, customers, raw_events, resolved_events, identity_observations,
--   email_translations, new_observations (temp), reclustered_cookies (temp), supernode_cookies (temp),
--   upstack_id (macro), quarantined_identifiers (macro)
-- Variables: after_load_id, until_load_id, after_customers_load_id, commerce_events, cookie_lifetime,
--   max_emails_per_browser, now
-- Writes: identity_flags, resolved_events
-- Leaves: cookie_cluster (temp), affected_cookies (temp), affected_rows (temp), previous_resolutions (temp),
--   targets (temp), target_observation_rows (temp), evidence (temp), new_resolutions (temp),
--   changed_resolutions (temp), replaced_resolutions (temp)

create or replace temp table cookie_cluster as
select anonymous_id, browser_cluster_id, linked_by from browser_clusters;

-- The cookies whose events may resolve differently now.
create or replace temp table affected_cookies as
with seeds as (
    select anonymous_id from new_observations
    where id_type in ('email', 'email_hash', 'phone', 'phone_hash', 'customer_id', 'kx')
    union
    -- cookies that saw an identifier this run saw too: its translation may have changed. Not a quarantined one: it
    -- names nobody before this run and after (one whose verdict changed brings supernode_cookies), and a
    -- placeholder typed again would send every browser that ever typed it through this step, every run.
    select link.left_value
    from identity_links as link
    semi join (
        select id_type, id_value from new_observations as observation
        anti join quarantined_identifiers() as quarantined
            on quarantined.id_type = observation.id_type and quarantined.value = observation.id_value
        where observation.id_type in ('email_hash', 'phone', 'phone_hash', 'customer_id', 'kx')
    ) as touched on touched.id_type = link.right_type and touched.id_value = link.right_value
    where link.left_type = 'anonymous_id'
    union
    select link.left_value
    from identity_links as link
    semi join customers on customers.customer_id = link.right_value
        and customers.load_id > getvariable('after_customers_load_id')
        and customers.load_id <= getvariable('until_load_id')
    where link.left_type = 'anonymous_id' and link.right_type = 'customer_id'
    union
    select anonymous_id from reclustered_cookies
    union
    select anonymous_id from supernode_cookies
),
seed_clusters as (
    select coalesce(cookie_cluster.browser_cluster_id, seeds.anonymous_id) as cluster_id
    from seeds left join cookie_cluster using (anonymous_id)
    union
    select old_cluster_id from reclustered_cookies where old_cluster_id is not null
)
select distinct anonymous_id from (
    select anonymous_id from seeds
    union all
    select cookie_cluster.anonymous_id from cookie_cluster semi join seed_clusters
        on seed_clusters.cluster_id = cookie_cluster.browser_cluster_id
    union all
    select anonymous_id from reclustered_cookies
);

-- The affected cookies' earlier events as resolved_events holds them now, read once: they are the targets that have a
-- row (the chunk's new events have none yet: a load's rows are written with the watermark that moves past it), so
-- the comparison below and the rows it replaces come from here too, the latter deleted by their row id (found by
-- event id, every event id of the history was read). Their row ids first, from the narrow columns, then their rows
-- by row id, so that only the row groups holding them are read whole (joined on the cookie, and again on the event
-- id, every row of the history was read with every column: 1.5 s of an hourly run at 19 million events, for 2,449
-- rows). Without resolved_at, which nothing below compares: each column read by row id decodes the row groups
-- holding those rows (a sixth of this read on the scale benchmark's day).
create or replace temp table affected_rows as
select rowid as resolved_rowid from resolved_events
semi join affected_cookies using (anonymous_id)
where event_time >= getvariable('now') - getvariable('cookie_lifetime');

create or replace temp table previous_resolutions as
select rowid as resolved_rowid, * exclude (resolved_at) from resolved_events
where rowid in (select resolved_rowid from affected_rows);

create or replace temp table targets as
with new_commerce as (
    select event_id, event_name, event_time, shop, anonymous_id, session_id,
           coalesce(user_data.klaviyo_identified, false) as klaviyo_identified, consent.marketing as consent_marketing
    from raw_events
    where load_id > getvariable('after_load_id') and load_id <= getvariable('until_load_id')
        and list_contains(getvariable('commerce_events'), event_name)
),
earlier_affected as (
    select event_id, event_name, event_time, shop, anonymous_id, session_id,
           coalesce(klaviyo_native_reason = 'klaviyo_cookie', false) as klaviyo_identified, consent_marketing
    from previous_resolutions
)
select targets.*, coalesce(cookie_cluster.browser_cluster_id, targets.anonymous_id) as cluster_id
from (select * from new_commerce union all select * from earlier_affected) as targets
left join cookie_cluster using (anonymous_id);

-- What every identifying observation on the targets' clusters says about the person. A quarantined value typed
-- as an email (a placeholder, or the email of someone with more browsers than the guard allows) names nobody, but
-- still says that someone identified themselves there: it ends the browser's previous email as a new email would
-- (source 'quarantined', no email), so a false quarantine costs a send, never sends to the wrong person.
-- Only the observations of the targets' clusters' cookies are read: a filter on each observation's cluster, known
-- only after joining cookie_cluster, sent every observation of the history through the quarantine and translation
-- joins; the cookies, known first, filter the scan itself (a cookie is in at most one cluster, so it is the same).
-- Their row ids first, from the narrow anonymous_id column, then their rows by row id: joined on the cookie, every
-- observation of the history was read with every column (1 s of an hourly run at 19 million events).
create or replace temp table target_observation_rows as
with target_cookies as (
    select anonymous_id from cookie_cluster semi join targets on targets.cluster_id = cookie_cluster.browser_cluster_id
    union
    select cluster_id from targets anti join cookie_cluster on cookie_cluster.anonymous_id = targets.cluster_id
)
select observation.rowid as observation_rowid
from identity_observations as observation
semi join target_cookies using (anonymous_id)
where observation.id_type in ('email', 'email_hash', 'phone', 'phone_hash', 'customer_id', 'kx');

-- Usable observations (not quarantined, as usable_identity_observations has them) name a person; quarantined emails
-- only end a browser's previous email.
create or replace temp table evidence as
with target_observations as materialized (
    select * from identity_observations where rowid in (select observation_rowid from target_observation_rows)
)
select
    observation.event_id,
    observation.event_time,
    observation.anonymous_id,
    observation.session_id,
    coalesce(cookie_cluster.browser_cluster_id, observation.anonymous_id) as cluster_id,
    case when observation.id_type = 'email' then observation.id_value
         when observation.id_type <> 'kx' then translation.email end as email,
    case when observation.id_type = 'kx' then observation.id_value end as kx,
    case observation.id_type
        when 'email' then 'typed'
        when 'email_hash' then 'typed'
        when 'phone' then 'phone'
        when 'phone_hash' then 'phone'
        when 'customer_id' then if(translation.only_from_customer_file, 'customer_file', 'login')
        when 'kx' then 'kx'
    end as source,
    -- Which of several observations at one instant names the event (a login carries an email and a customer
    -- id): the strongest, so the answer never depends on the order rows happen to be read in.
    case observation.id_type
        when 'email' then 0 when 'email_hash' then 0 when 'customer_id' then 1 when 'phone' then 2
        when 'phone_hash' then 2 else 3
    end as source_rank
from target_observations as observation
anti join quarantined_identifiers() as quarantined
    on quarantined.id_type = observation.id_type and quarantined.value = observation.id_value
left join cookie_cluster using (anonymous_id)
left join email_translations as translation
    on translation.id_type = observation.id_type and translation.id_value = observation.id_value
where observation.id_type = 'email' or observation.id_type = 'kx' or translation.email is not null

union all
select
    observation.event_id, observation.event_time, observation.anonymous_id, observation.session_id,
    coalesce(cookie_cluster.browser_cluster_id, observation.anonymous_id), null, null, 'quarantined', 0
from target_observations as observation
semi join quarantined_identifiers() as quarantined
    on quarantined.id_type = observation.id_type and quarantined.value = observation.id_value
left join cookie_cluster using (anonymous_id)
where observation.id_type in ('email', 'email_hash');

-- Each target's row as this run resolves it, in resolved_events' column order, without resolved_at.
create or replace temp table new_resolutions as
with session_evidence as (                      -- each row once per kind of identity it carries
    select * from (
        select 'email' as kind, * from evidence where email is not null or source = 'quarantined'
        union all
        select 'kx', * from evidence where kx is not null
    )
    qualify row_number() over (partition by kind, cluster_id, session_id, event_time
                               order by source_rank, email, kx, event_id) = 1
),
-- Each target once per kind of evidence its session has: most sessions have none, and the window below would only
-- sort the events of those to pair them with nothing.
target_kinds as (
    select target.*, kinds.kind
    from targets as target
    join (select distinct kind, session_id, cluster_id from session_evidence) as kinds using (session_id, cluster_id)
),
-- The nearest evidence of each kind in the session on either side of each event (evidence at the event's instant
-- counts as before it), found in one sort of the targets and their sessions' evidence together, without pairing
-- every event with every evidence row (a long session would otherwise cost its length squared). Each carries only
-- the fields of its evidence that the answer reads. Two ASOF joins, before and after, sorted both sides each: 0.28 s
-- of this statement on the scale benchmark's day against 0.24 s so.
nearest as (
    select event_id, kind, before, after from (
        select event_id, kind, is_target,
               last_value(evidence ignore nulls) over (in_session rows between unbounded preceding and current row)
                   as before,
               first_value(evidence ignore nulls) over (in_session rows between current row and unbounded following)
                   as after
        from (
            select event_id, kind, session_id, cluster_id, event_time, true as is_target,
                   null::struct(event_id varchar, email varchar, kx varchar, source varchar) as evidence
            from target_kinds
            union all
            select null, kind, session_id, cluster_id, event_time, false,
                   {'event_id': event_id, 'email': email, 'kx': kx, 'source': source}
            from session_evidence
        )
        window in_session as (partition by kind, session_id, cluster_id order by event_time, is_target)
    )
    where is_target
),
own_email as (
    select target.event_id,
           arg_min({'event_id': evidence.event_id, 'email': evidence.email, 'kx': evidence.kx,
                    'source': evidence.source}, evidence.email) as evidence
    from targets as target
    join evidence on evidence.event_id = target.event_id
    where evidence.source = 'typed'
    group by target.event_id
),
typed_sessions as (                             -- Klaviyo sees what is typed, placeholders included
    select distinct session_id, cluster_id from evidence where source in ('typed', 'quarantined')
),
email_rows as (
    select * from evidence where email is not null or source = 'quarantined'
),
-- The clusters that showed more emails in all than one browser may: only they can have shown more within a cookie's
-- lifetime, so only theirs are counted over that sliding window (most clusters show one email).
crowded_clusters as (
    select cluster_id from email_rows group by cluster_id
    having count(distinct email) > getvariable('max_emails_per_browser')
),
email_history as (                              -- per cluster, how many distinct emails so far (null: too few)
    select * from (
        select
            *,
            count(distinct email) over (
                partition by cluster_id order by event_time
                range between getvariable('cookie_lifetime') preceding and current row
            ) as emails_so_far
        from email_rows semi join crowded_clusters using (cluster_id)
        union all by name
        select *, null::bigint as emails_so_far
        from email_rows anti join crowded_clusters using (cluster_id)
    )
    qualify row_number() over (partition by cluster_id, event_time order by source_rank, email, event_id) = 1
),
kx_history as (
    select * from evidence where kx is not null
    qualify row_number() over (partition by cluster_id, event_time order by kx, event_id) = 1
),
-- The cluster's latest email and latest _kx before each event, within a cookie's lifetime, found the same way: one
-- sort of the targets and their clusters' history together (at the same instant the event comes first: only what
-- came before it counts). Two more ASOF joins, one per kind, took 0.01 s more on that day.
cluster_history as (
    select event_id,
           if(last_email.event_time >= event_time - getvariable('cookie_lifetime'), last_email, null) as last_email,
           if(last_kx.event_time >= event_time - getvariable('cookie_lifetime'), last_kx, null) as last_kx
    from (
        select event_id, event_time, is_target,
               last_value(email_row ignore nulls) over latest as last_email,
               last_value(kx_row ignore nulls) over latest as last_kx
        from (
            select event_id, cluster_id, event_time, true as is_target,
                   null::struct(event_id varchar, event_time timestamptz, anonymous_id varchar, email varchar,
                                source varchar, emails_so_far bigint) as email_row,
                   null::struct(event_id varchar, event_time timestamptz, kx varchar) as kx_row
            from targets
            semi join (select cluster_id from email_history union select cluster_id from kx_history) using (cluster_id)
            union all
            select null, cluster_id, event_time, false,
                   {'event_id': event_id, 'event_time': event_time, 'anonymous_id': anonymous_id, 'email': email,
                    'source': source, 'emails_so_far': emails_so_far}, null
            from email_history
            union all
            select null, cluster_id, event_time, false, null,
                   {'event_id': event_id, 'event_time': event_time, 'kx': kx}
            from kx_history
        )
        window latest as (partition by cluster_id order by event_time, is_target desc
                          rows between unbounded preceding and current row)
    )
    where is_target
),
decided as (                                    -- each target once: every join below is on at most one row
    select
        target.*,
        -- This event's own email first, then the latest before it in the session, then the first after it.
        coalesce(own_email.evidence, email_nearest.before, email_nearest.after) as email_evidence,
        coalesce(kx_nearest.before, kx_nearest.after) as kx_evidence,
        own_email.evidence is not null as typed_in_event,
        typed_sessions.session_id is not null as typed_in_session,
        cluster_history.last_email as history_email,
        cluster_history.last_kx as history_kx,
        coalesce(cluster_history.last_email.emails_so_far, 0) > getvariable('max_emails_per_browser') as shared_device,
        kx_owner.email as kx_known_email
    from targets as target
    left join own_email on own_email.event_id = target.event_id
    left join nearest as email_nearest on email_nearest.event_id = target.event_id and email_nearest.kind = 'email'
    left join nearest as kx_nearest on kx_nearest.event_id = target.event_id and kx_nearest.kind = 'kx'
    left join typed_sessions
        on typed_sessions.session_id = target.session_id and typed_sessions.cluster_id = target.cluster_id
    left join cluster_history on cluster_history.event_id = target.event_id
    left join email_translations as kx_owner
        on kx_owner.id_type = 'kx'
        and kx_owner.id_value = coalesce(coalesce(kx_nearest.before, kx_nearest.after).kx, cluster_history.last_kx.kx)
),
resolutions as (
    select
        *,
        case
            when email_evidence.source = 'quarantined' then 'quarantined'
            when email_evidence is not null then 'session_email'
            when kx_evidence is not null and history_email is not null and not shared_device
                 and kx_known_email is distinct from history_email.email then 'conflict'
            when kx_evidence is not null then 'session_kx'
            when shared_device then 'shared_device'
            when history_email.source = 'quarantined'
                 and (history_kx is null or history_kx.event_time < history_email.event_time) then 'quarantined'
            when history_email is not null
                 and (history_kx is null or history_kx.event_time < history_email.event_time) then 'history_email'
            when history_kx is not null and history_email.source = 'quarantined' then 'history_kx'
            when history_kx is not null and history_email is not null
                 and kx_known_email <> history_email.email then 'conflict'
            when history_kx is not null and history_email is not null then 'history_email'
            when history_kx is not null then 'history_kx'
        end as decision
    from decided
)
select
    event_id,
    event_name,
    event_time,
    shop,
    anonymous_id,
    session_id,
    cluster_id as browser_cluster_id,
    case when decision in ('session_email', 'history_email')
             then upstack_id('email', coalesce(email_evidence.email, history_email.email))
         when decision in ('session_kx', 'history_kx')
             then upstack_id('kx', coalesce(kx_evidence.kx, history_kx.kx))
    end as upstack_id,
    case decision
        when 'session_email' then email_evidence.email
        when 'history_email' then history_email.email
    end as email,
    case decision
        when 'session_kx' then kx_evidence.kx
        when 'history_kx' then history_kx.kx
    end as kx,
    -- The identity's first phone: sql/identities.sql lists an email's phones from the same translations (a _kx
    -- identity has none), and every email named here is one of the identities it writes for this run.
    first_phone.phone,
    case
        when decision = 'session_email' and typed_in_event and email_evidence.event_id = event_id
            then 'typed_in_event'
        when decision = 'session_email' and email_evidence.source in ('login', 'customer_file')
            then email_evidence.source
        when decision = 'session_email' then 'same_session'
        when decision in ('session_kx', 'history_kx') then 'klaviyo_click'
        when decision = 'history_email' and history_email.anonymous_id <> anonymous_id then
            case when cookie_cluster.linked_by like '%ip_user_agent%' then 'probabilistic_ip_ua'
                 when cookie_cluster.linked_by like '%click_id_handoff%' then 'click_id_handoff'
                 else 'cookie_history' end
        when decision = 'history_email' and history_email.source in ('login', 'customer_file')
            then history_email.source
        when decision = 'history_email' then 'cookie_history'
    end as match_method,
    case decision
        when 'session_email' then email_evidence.event_id
        when 'session_kx' then kx_evidence.event_id
        when 'history_email' then history_email.event_id
        when 'history_kx' then history_kx.event_id
    end as evidence_event_id,
    case
        when decision = 'shared_device' then 'shared_device'
        when decision = 'conflict' then 'conflicting_identity'
        when decision = 'quarantined' then 'quarantined_identifier'
        when decision is null then 'no_evidence'
    end as unresolved_reason,
    klaviyo_identified or typed_in_session as klaviyo_native,
    case when klaviyo_identified then 'klaviyo_cookie'
         when typed_in_event then 'typed_in_event'
         when typed_in_session then 'typed_in_session' end as klaviyo_native_reason,
    consent_marketing
from resolutions
left join cookie_cluster using (anonymous_id)
-- Joined on the email alone: a lookup per row, written as a subquery, was joined on the two evidence structs.
left join (
    select email, min(id_value) as phone from email_translations where id_type = 'phone' group by email
) as first_phone
    on first_phone.email = case when decision in ('session_email', 'history_email')
                                    then coalesce(email_evidence.email, history_email.email) end;

insert into identity_flags
select 'shared_device', browser_cluster_id, 'more than ' || getvariable('max_emails_per_browser')
       || ' emails: its history names nobody', getvariable('now')
from new_resolutions where unresolved_reason = 'shared_device'
group by browser_cluster_id
on conflict do nothing;

-- Only the rows whose answer changed are written, stamped with this run's now: most targets come out as they were
-- (every event of a cluster that got one new event), and a row rewritten unchanged would cost its delete and its
-- insert, and send mapping and analytics to look at it again (they take the rows stamped since their last run).
-- An event without a row yet is written as it is, straight from new_resolutions (a backfill's are nearly all of its
-- targets: comparing them would hash every column, and setting them aside copy every row, for nothing); EXCEPT
-- compares the others' whole rows, nulls as equal, and keeps those that changed.
create or replace temp table changed_resolutions as
select * from new_resolutions semi join previous_resolutions using (event_id)
except
select * exclude (resolved_rowid) from previous_resolutions;

-- The rows about to be replaced, with the cluster each was counted under (sql/shared_device_guard_scope.sql).
create or replace temp table replaced_resolutions as
select resolved_rowid, event_id, browser_cluster_id from previous_resolutions
where event_id in (select event_id from changed_resolutions);

delete from resolved_events where rowid in (select resolved_rowid from replaced_resolutions);

insert into resolved_events by name
select *, getvariable('now') as resolved_at from (
    select * from new_resolutions anti join previous_resolutions using (event_id)
    union all
    select * from changed_resolutions
);

-- resolved_events has no key (sql/warehouse.sql says why): a chunk that would leave an event of its own with two
-- rows fails here instead, in its transaction, so nothing of the chunk is written, as a key would have failed it.
select error('identity would leave ' || count(*) || ' of its events with two rows in resolved_events ('
             || min(event_id) || ' among them): it writes an event once unless raw_events holds its event_id twice '
             || '(the check event_ids_unique on raw_events says so) or identity''s watermark (pipeline_state, stage '
             || 'identity) was set back by hand. Nothing of this chunk was written.')
from (
    select event_id from resolved_events semi join new_resolutions using (event_id)
    group by event_id having count(*) > 1
)
having count(*) > 0;
