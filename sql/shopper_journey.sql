-- One row per commerce event (ViewContent, AddToCart, InitiateCheckout, Purchase), from the landing line it came on
-- to Klaviyo's last answer about it: the person behind it and how we know (or why nobody), what the mapping decided,
-- the Klaviyo event sent and the request that settled it. Unresolved events are rows too, with no upstack_id. The
-- Klaviyo columns are those of the event's own Klaviyo event (unique_id = event_id: for a Purchase its Placed Order;
-- its Ordered Product lines are the outbox rows <event_id>:<line>). `upstack trace` tells the same story as text.
--
-- upstack_id: the person (identities), null when nobody could be named
-- email: the person's email, null for a person known only by a Klaviyo _kx
-- event_id: the pixel's event id
-- event_name: ViewContent, AddToCart, InitiateCheckout or Purchase
-- event_time: when the pixel says it happened
-- session_id: the pixel's session
-- anonymous_id: the pixel's cookie (the browser)
-- source_file: the landing file it came in, relative to the landing folder
-- line_number: its line (row for Parquet) in source_file
-- raw_json: the line exactly as received
-- match_method: how the person was named (typed_in_event, same_session, login, customer_file, cookie_history,
--   click_id_handoff, klaviyo_click, probabilistic_ip_ua)
-- evidence_event_id: the event whose identifier named them
-- unresolved_reason: why nobody was named (no_evidence, shared_device, conflicting_identity, quarantined_identifier)
-- klaviyo_native: Klaviyo could identify the shopper itself
-- klaviyo_native_reason: how (klaviyo_cookie, typed_in_event, typed_in_session)
-- decision: outbox (a Klaviyo event), skipped (a reason), or undecided (its session is still active)
-- outbox_status: pending, claimed, delivered or dead_letter
-- skipped_reason: why it is not sent (klaviyo_skipped: disabled_event, no_consent, unresolved, native_identified,
--   profile_creation_disabled, invalid)
-- skipped_detail: the reason's detail (e.g. the Klaviyo limit an invalid payload breaks)
-- metric_name: the Klaviyo metric it was sent as, e.g. Added to Cart from Upstack
-- profile_key: the profile it goes to: email:<address> or kx:<_kx>
-- profile: the Klaviyo profile attributes sent with it (JSON)
-- event: the Klaviyo event attributes sent (JSON: properties, time, value, unique_id, backfill)
-- request_id: the request that delivered or dead-lettered it (klaviyo_deliveries.request_id)
-- http_status: Klaviyo's answer to that request's last attempt; null when no answer came
-- klaviyo_error: Klaviyo's errors for that attempt, summarised, or why no answer came
-- sent_at: when that request's last attempt was sent
-- attempts: how many attempts the request took (429, 5xx, timeouts and dropped connections are retried)
-- dead_letter_detail: what Klaviyo said about this event when it refused it (klaviyo_dead_letters)
create or replace view shopper_journey as
with requests as (
    -- A request's retries share its request_id: its last attempt holds Klaviyo's final answer.
    select request_id, status, error, sent_at, count(*) over (partition by request_id) as attempts
    from klaviyo_deliveries
    where request_id is not null
    qualify row_number() over (partition by request_id order by sent_at desc) = 1
)
select
    resolved.upstack_id,
    resolved.email,
    resolved.event_id,
    resolved.event_name,
    resolved.event_time,
    resolved.session_id,
    resolved.anonymous_id,
    raw.source_file,
    raw.line_number,
    raw.raw_json,
    resolved.match_method,
    resolved.evidence_event_id,
    resolved.unresolved_reason,
    resolved.klaviyo_native,
    resolved.klaviyo_native_reason,
    case when outbox.unique_id is not null then 'outbox'
         when skipped.event_id is not null then 'skipped'
         else 'undecided' end as decision,
    outbox.status as outbox_status,
    skipped.reason as skipped_reason,
    skipped.detail as skipped_detail,
    outbox.metric_name,
    outbox.profile_key,
    outbox.profile,
    outbox.event,
    outbox.request_id,
    request.status as http_status,
    request.error as klaviyo_error,
    request.sent_at,
    request.attempts,
    dead.detail as dead_letter_detail
from resolved_events as resolved
left join raw_events as raw using (event_id)
left join klaviyo_outbox as outbox on outbox.unique_id = resolved.event_id
left join klaviyo_skipped as skipped on skipped.event_id = resolved.event_id
left join requests as request on request.request_id = outbox.request_id
left join klaviyo_dead_letters as dead on dead.unique_id = resolved.event_id;
