-- Identity resolution measured against the simulator's ground truth (upstack_pipeline/sandbox/evaluation.py explains the
-- definitions and why they are what they are; this file implements them).
--
-- Inputs: raw_events, resolved_events, klaviyo_outbox, and the truth CSVs whose paths are in the variables
-- eval_truth_events and eval_truth_people (SET VARIABLE). The connection is read-only, so everything built here is a
-- temp table; the last statement returns one row per method ('ours' = resolved_events and the outbox, 'baseline' =
-- cookie -> last typed email).

-- Truth people, normalised the way the comparison needs them (emails trimmed and lower-cased, blanks are null).
create or replace temp table eval_people as
select person_id,
       nullif(lower(trim(email)), '')  as email,
       nullif(trim(customer_id), '')   as customer_id,
       nullif(trim(kx), '')            as kx
from read_csv(getvariable('eval_truth_people'), header = true, delim = ',', all_varchar = true);

-- The universe: every commerce event of raw_events that the truth describes, with who really did it. Sessions are
-- the truth's (identical to the pixel's session_id in the simulator, but the truth is what defines abandonment).
-- Sendable: what a backup flow may receive at all, whoever resolves it: Klaviyo could not identify the event
-- natively (klaviyo_native, from resolved_events, so both methods share it) and the shopper did not decline
-- marketing.
create or replace temp table eval_commerce as
select r.event_id, r.event_name, r.event_time, r.anonymous_id, r.session_id, r.source_file, r.line_number,
       t.person_id,
       t.session_id                                   as truth_session_id,
       coalesce(p.email, nullif(lower(trim(t.email)), '')) as true_email,
       p.kx                                           as true_kx,
       coalesce(re.klaviyo_native, false)             as native,
       not coalesce(re.klaviyo_native, false) and r.consent.marketing is distinct from false as sendable
from raw_events r
join read_csv(getvariable('eval_truth_events'), header = true, delim = ',', all_varchar = true) t
  on t.event_id = r.event_id
left join eval_people p on p.person_id = t.person_id
left join resolved_events re on re.event_id = r.event_id
where r.event_name in ('ViewContent', 'AddToCart', 'InitiateCheckout', 'Purchase');

-- Identity signals: a raw_events row (any event type) carrying an identifier that belongs to a known person.
-- Values that map to nobody (placeholder emails, the store's support address, blanks) are not signals at all.
create or replace temp table eval_signals as
select r.anonymous_id, r.session_id, r.event_time, r.source_file, r.line_number, p.person_id
from raw_events r join eval_people p on p.email = lower(trim(r.user_data.email))
union
select r.anonymous_id, r.session_id, r.event_time, r.source_file, r.line_number, p.person_id
from raw_events r join eval_people p on p.customer_id = r.user_data.external_id
union
select r.anonymous_id, r.session_id, r.event_time, r.source_file, r.line_number, p.person_id
from raw_events r join eval_people p on p.kx = r.user_data.kx;

-- Floor: the latest signal on the event's cookie strictly before the event names only other people, and the true
-- shopper gave no signal of their own anywhere in the session (so not even stitching back could find them).
-- Signals at the same instant are taken together: if the true shopper is among them the error is avoidable. Only
-- naming one of those people is unavoidable (eval_scored): naming anyone else, a placeholder say, is not.
create or replace temp table eval_floor as
with signal_moments as (
    select anonymous_id, event_time, list(distinct person_id) as persons
    from eval_signals
    group by anonymous_id, event_time
),
own_session_signals as (
    select distinct session_id, person_id from eval_signals
)
select c.event_id, m.persons
from eval_commerce c
asof join signal_moments m on m.anonymous_id = c.anonymous_id and c.event_time > m.event_time
where not list_contains(m.persons, c.person_id)
  and not exists (select 1 from own_session_signals o
                  where o.session_id = c.session_id and o.person_id = c.person_id);

-- Abandoned-cart sessions: a truth session with an AddToCart and no Purchase.
create or replace temp table eval_abandoned_sessions as
select truth_session_id
from eval_commerce
group by truth_session_id
having bool_or(event_name = 'AddToCart') and not bool_or(event_name = 'Purchase');

-- AddToCart events of abandoned sessions whose cookie carried a signal of the true shopper before the event: at an
-- earlier event_time, or (same instant) earlier in the same session in pixel order. The event's own signals do not
-- count: "tied before" is what a resolver can know without this event.
create or replace temp table eval_tied as
select distinct c.event_id
from eval_commerce c
join eval_abandoned_sessions a on a.truth_session_id = c.truth_session_id
join eval_signals s on s.anonymous_id = c.anonymous_id and s.person_id = c.person_id
where c.event_name = 'AddToCart'
  and (s.event_time < c.event_time
       or (s.event_time = c.event_time and s.session_id = c.session_id
           and (s.source_file, s.line_number) < (c.source_file, c.line_number)));

-- Native abandoned-cart sessions: Klaviyo could already identify some event of the session by itself.
create or replace temp table eval_native_sessions as
select c.truth_session_id
from eval_commerce c
join eval_abandoned_sessions a on a.truth_session_id = c.truth_session_id
group by c.truth_session_id
having bool_or(c.native);

-- Reachable: abandoned-cart sessions with a cart tied before to the shopper, who did not decline marketing. A
-- session is reached when Klaviyo identifies it natively or a method sends one of its carts to the right person.
create or replace temp table eval_reachable_sessions as
select distinct c.truth_session_id
from eval_tied t
join eval_commerce c using (event_id)
join raw_events r using (event_id)
where r.consent.marketing is distinct from false;

-- Baseline "cookie -> last email typed on that cookie": the latest non-blank user_data.email on the same
-- anonymous_id at or before the event (its own row included), no validation and no guards. Rows at the same
-- instant are decided by pixel order (source_file, line_number), the last one wins.
create or replace temp table eval_typed_emails as
select anonymous_id, event_time,
       last(lower(trim(user_data.email)) order by source_file, line_number) as email
from raw_events
where trim(user_data.email) <> ''
group by anonymous_id, event_time;

-- What Klaviyo received from us for each event: the profile its outbox row was sent (or is to be sent) with.
-- Refused rows (dead letters) reached nobody.
create or replace temp table eval_outbox as
select event_id,
       if(profile_key like 'email:%', substr(profile_key, 7), null) as email,
       if(profile_key like 'kx:%', substr(profile_key, 4), null) as kx
from klaviyo_outbox
where unique_id = event_id and status <> 'dead_letter';

-- What each method attached to each commerce event, and what it sent. Ours: resolved_events and the outbox. The
-- baseline sends what it attaches to a sendable event.
create or replace temp table eval_attributions as
select 'ours' as method, c.event_id,
       nullif(lower(trim(re.email)), '') as email,
       nullif(trim(re.kx), '')           as kx,
       sent.email                        as sent_email,
       sent.kx                           as sent_kx
from eval_commerce c
left join resolved_events re on re.event_id = c.event_id
left join eval_outbox sent on sent.event_id = c.event_id
union all
select 'baseline' as method, c.event_id, b.email, null as kx, if(c.sendable, b.email, null), null
from eval_commerce c
asof left join eval_typed_emails b on b.anonymous_id = c.anonymous_id and c.event_time >= b.event_time;

-- Correct: the email is the true shopper's; with no email, the Klaviyo exchange id is theirs.
create or replace temp macro eval_is_correct(email, kx, true_email, true_kx) as
    case when email is not null then coalesce(email = true_email, false)
         when kx is not null then coalesce(kx = true_kx, false)
         else false end;

-- Whom an email (or, without one, a kx) names: a known person, or nobody (a placeholder, the support address).
create or replace temp macro eval_named(named_email, named_kx) as
    if(named_email is not null, (select person_id from eval_people p where p.email = named_email),
       (select person_id from eval_people p where p.kx = named_kx));

create or replace temp table eval_scored as
select a.method, c.event_id, c.event_name, c.truth_session_id, c.native,
       (a.email is not null or a.kx is not null)                   as resolved,
       eval_is_correct(a.email, a.kx, c.true_email, c.true_kx)      as correct,
       (a.sent_email is not null or a.sent_kx is not null)         as sent,
       eval_is_correct(a.sent_email, a.sent_kx, c.true_email, c.true_kx) as sent_correct,
       coalesce(list_contains(f.persons, eval_named(a.email, a.kx)), false)           as in_floor,
       coalesce(list_contains(f.persons, eval_named(a.sent_email, a.sent_kx)), false) as sent_in_floor
from eval_attributions a
join eval_commerce c on c.event_id = a.event_id
left join eval_floor f on f.event_id = a.event_id;

-- Per method and abandoned session: was one of its carts sent to the right person?
with session_sends as (
    select s.method, s.truth_session_id, bool_or(s.event_name = 'AddToCart' and s.sent_correct) as cart_sent
    from eval_scored s
    join eval_abandoned_sessions a on a.truth_session_id = s.truth_session_id
    group by all
),
per_session as (
    select x.method,
           count(*) filter (where x.cart_sent and n.truth_session_id is null)    as extra_sessions,
           count(*) filter (where r.truth_session_id is not null)                as reachable_sessions,
           count(*) filter (where r.truth_session_id is not null
                            and (x.cart_sent or n.truth_session_id is not null)) as reached_sessions
    from session_sends x
    left join eval_native_sessions n on n.truth_session_id = x.truth_session_id
    left join eval_reachable_sessions r on r.truth_session_id = x.truth_session_id
    group by x.method
),
per_event as (
    select method,
           count(*) filter (where resolved)                                  as resolved,
           count(*) filter (where correct)                                   as correct,
           count(*) filter (where resolved and not correct)                  as wrong_person,
           count(*) filter (where resolved and not correct and not in_floor) as avoidable_wrong_person,
           count(*) filter (where sent)                                      as sent,
           count(*) filter (where sent and not sent_correct)                 as sent_wrong_person,
           count(*) filter (where sent and not sent_correct and not sent_in_floor) as sent_avoidable_wrong_person
    from eval_scored
    group by method
)
select m.method, e.*, x.* exclude (method),
       (select count(*) from eval_native_sessions) as native_sessions,
       (select count(*) from eval_floor)           as floor,
       (select count(*) from eval_floor join eval_commerce using (event_id) where sendable) as sent_floor,
       (select count(*) from eval_commerce)        as commerce_events,
       (select count(*) from eval_abandoned_sessions) as abandoned_sessions
from (values ('ours'), ('baseline')) m(method)
join per_event e on e.method = m.method
join per_session x on x.method = m.method
order by m.method desc;
