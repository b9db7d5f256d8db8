-- Identity resolution measured against the simulator's ground truth (upstack_pipeline/evaluation.py explains the
-- definitions and why they are what they are; this file implements them).
--
-- Inputs: raw_events, resolved_events, and the truth CSVs whose paths are in the variables eval_truth_events and
-- eval_truth_people (SET VARIABLE). The connection is read-only, so everything built here is a temp table; the
-- last statement returns one row per method ('ours' = resolved_events, 'baseline' = cookie -> last typed email).

-- Truth people, normalised the way the comparison needs them (emails trimmed and lower-cased, blanks are null).
create or replace temp table eval_people as
select person_id,
       nullif(lower(trim(email)), '')  as email,
       nullif(trim(customer_id), '')   as customer_id,
       nullif(trim(kx), '')            as kx
from read_csv(getvariable('eval_truth_people'), header = true, delim = ',', all_varchar = true);

-- The universe: every commerce event of raw_events that the truth describes, with who really did it. Sessions are
-- the truth's (identical to the pixel's session_id in the simulator, but the truth is what defines abandonment).
create or replace temp table eval_commerce as
select r.event_id, r.event_name, r.event_time, r.anonymous_id, r.session_id, r.source_file, r.line_number,
       t.person_id,
       t.session_id                                   as truth_session_id,
       coalesce(p.email, nullif(lower(trim(t.email)), '')) as true_email,
       p.kx                                           as true_kx
from raw_events r
join read_csv(getvariable('eval_truth_events'), header = true, delim = ',', all_varchar = true) t
  on t.event_id = r.event_id
left join eval_people p on p.person_id = t.person_id
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
-- Signals at the same instant are taken together: if the true shopper is among them the error is avoidable.
create or replace temp table eval_floor as
with signal_moments as (
    select anonymous_id, event_time, list(distinct person_id) as persons
    from eval_signals
    group by anonymous_id, event_time
),
own_session_signals as (
    select distinct session_id, person_id from eval_signals
)
select c.event_id
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

-- Recall denominator: abandoned-cart AddToCart events whose cookie carried a signal of the true shopper before the
-- event: at an earlier event_time, or (same instant) earlier in the same session in pixel order. The event's own
-- signals do not count: "tied before" is what a resolver can know without this event.
create or replace temp table eval_tied as
select distinct c.event_id
from eval_commerce c
join eval_abandoned_sessions a on a.truth_session_id = c.truth_session_id
join eval_signals s on s.anonymous_id = c.anonymous_id and s.person_id = c.person_id
where c.event_name = 'AddToCart'
  and (s.event_time < c.event_time
       or (s.event_time = c.event_time and s.session_id = c.session_id
           and (s.source_file, s.line_number) < (c.source_file, c.line_number)));

-- Native abandoned-cart sessions: Klaviyo could already identify some event of the session by itself. Taken from
-- resolved_events for both methods, so the lift of ours and of the baseline share one denominator.
create or replace temp table eval_native_sessions as
select c.truth_session_id
from eval_commerce c
join eval_abandoned_sessions a on a.truth_session_id = c.truth_session_id
join resolved_events re on re.event_id = c.event_id
group by c.truth_session_id
having bool_or(coalesce(re.klaviyo_native, false));

-- Baseline "cookie -> last email typed on that cookie": the latest non-blank user_data.email on the same
-- anonymous_id at or before the event (its own row included), no validation and no guards. Rows at the same
-- instant are decided by pixel order (source_file, line_number), the last one wins.
create or replace temp table eval_typed_emails as
select anonymous_id, event_time,
       last(lower(trim(user_data.email)) order by source_file, line_number) as email
from raw_events
where trim(user_data.email) <> ''
group by anonymous_id, event_time;

-- What each method attached to each commerce event. An event missing from resolved_events is unresolved.
create or replace temp table eval_attributions as
select 'ours' as method, c.event_id,
       nullif(lower(trim(re.email)), '') as email,
       nullif(trim(re.kx), '')           as kx
from eval_commerce c
left join resolved_events re on re.event_id = c.event_id
union all
select 'baseline' as method, c.event_id, b.email, null as kx
from eval_commerce c
asof left join eval_typed_emails b on b.anonymous_id = c.anonymous_id and c.event_time >= b.event_time;

-- Correct: the email is the true shopper's; with no email, the Klaviyo exchange id is theirs.
create or replace temp table eval_scored as
select a.method, c.event_id, c.event_name, c.truth_session_id,
       (a.email is not null or a.kx is not null) as resolved,
       case when a.email is not null then coalesce(a.email = c.true_email, false)
            when a.kx is not null then coalesce(a.kx = c.true_kx, false)
            else false end                   as correct,
       f.event_id is not null                as in_floor,
       t.event_id is not null                as tied
from eval_attributions a
join eval_commerce c on c.event_id = a.event_id
left join eval_floor f on f.event_id = a.event_id
left join eval_tied t on t.event_id = a.event_id;

-- Extra sessions: abandoned, not native, and some AddToCart of the session resolved correctly.
with extra as (
    select s.method, count(distinct s.truth_session_id) as extra_sessions
    from eval_scored s
    join eval_abandoned_sessions a on a.truth_session_id = s.truth_session_id
    where s.event_name = 'AddToCart' and s.correct
      and not exists (select 1 from eval_native_sessions n where n.truth_session_id = s.truth_session_id)
    group by s.method
),
per_event as (
    select method,
           count(*) filter (where resolved)                             as resolved,
           count(*) filter (where correct)                              as correct,
           count(*) filter (where resolved and not correct)             as wrong_person,
           count(*) filter (where resolved and not correct and not in_floor) as avoidable_wrong_person,
           count(*) filter (where tied)                                 as recall_tied,
           count(*) filter (where tied and correct)                     as recall_correct
    from eval_scored
    group by method
)
select m.method,
       coalesce(e.resolved, 0)               as resolved,
       coalesce(e.correct, 0)                as correct,
       coalesce(e.wrong_person, 0)           as wrong_person,
       coalesce(e.avoidable_wrong_person, 0) as avoidable_wrong_person,
       coalesce(e.recall_tied, 0)            as recall_tied,
       coalesce(e.recall_correct, 0)         as recall_correct,
       (select count(*) from eval_native_sessions) as native_sessions,
       coalesce(x.extra_sessions, 0)         as extra_sessions,
       (select count(*) from eval_floor)     as floor,
       (select count(*) from eval_commerce)  as commerce_events
from (values ('ours'), ('baseline')) m(method)
left join per_event e on e.method = m.method
left join extra x on x.method = m.method
order by m.method desc;
