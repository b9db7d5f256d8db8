-- Sorts one batch of staged landing lines into raw_events, quarantined_events, or duplicates, set-based.
--
-- Input: temp table staged_lines(source_file, line_number, raw_line, invalid_utf8).
-- Parameters (from upstack_pipeline.events): $required_fields; $field_names/$field_paths/$field_types, the JSON
-- types each object field may have ('MISSING' = absent key); $item_names/$item_paths/$item_types, the same for
-- each custom_data.items[] element; $now, the ingestion clock; $max_skew, how far ahead of it a time may be.
-- Output: temp table classified_lines, one row per non-blank line with either a reason or a typed event.

create or replace temp table classified_lines as
with probed as (
    select
        source_file,
        line_number,
        raw_line,
        invalid_utf8,
        json_valid(raw_line) as is_json,
        -- JSON functions only ever see valid JSON (NULL otherwise), whatever order DuckDB evaluates them in.
        if(json_valid(raw_line), raw_line, null) as document
    from staged_lines
    where trim(raw_line) <> ''                  -- blank lines (a trailing newline) are not events
),

object_lines as (
    select
        *,
        json_type(document) as document_type,
        json_type(document, $field_paths) as field_types,
        json_transform(document, '{"custom_data": {"items": ["JSON"], "discount_codes": ["JSON"]}}').custom_data
            as nested_lists
    from probed
),

contract_checked as (
    select
        *,
        [$field_names[i] for i in range(1, len($field_names) + 1)
            if not list_contains($field_types[i], coalesce(field_types[i], 'MISSING'))] as bad_fields,
        list_transform(nested_lists.items, lambda item:
            case when json_type(item) = 'OBJECT' then json_type(item, $item_paths) end) as item_field_types
    from object_lines
),

violations as (
    select
        *,
        bad_fields
        || coalesce(flatten(list_transform(range(1, len(item_field_types) + 1), lambda k:
            case when item_field_types[k] is null then ['custom_data.items[' || (k - 1) || ']']
            else ['custom_data.items[' || (k - 1) || '].' || $item_names[f] for f in range(1, len($item_names) + 1)
                  if not list_contains($item_types[f], coalesce(item_field_types[k][f], 'MISSING'))]
            end)), [])
        || coalesce([('custom_data.discount_codes[' || (k - 1) || ']')
            for k in range(1, len(nested_lists.discount_codes) + 1)
            if json_type(nested_lists.discount_codes[k]) <> 'VARCHAR'], []) as bad_paths,
        json_extract_string(document, '$.event_time') as event_time_text
    from contract_checked
),

typed as (
    select
        *,
        case when document_type = 'OBJECT' and len(bad_paths) = 0 then
            json_transform(document, '{
                "event_id": "VARCHAR", "event_name": "VARCHAR", "event_time": "VARCHAR", "shop": "VARCHAR",
                "anonymous_id": "VARCHAR", "session_id": "VARCHAR",
                "event_source_url": "VARCHAR", "referrer": "VARCHAR",
                "user_data": {
                    "email": "VARCHAR", "phone": "VARCHAR", "em": "VARCHAR", "ph": "VARCHAR",
                    "external_id": "VARCHAR", "first_name": "VARCHAR", "last_name": "VARCHAR",
                    "city": "VARCHAR", "region": "VARCHAR", "zip": "VARCHAR", "country": "VARCHAR",
                    "kx": "VARCHAR", "klaviyo_identified": "BOOLEAN",
                    "fbp": "VARCHAR", "fbc": "VARCHAR", "gclid": "VARCHAR", "ttclid": "VARCHAR",
                    "msclkid": "VARCHAR", "client_ip_address": "VARCHAR", "client_user_agent": "VARCHAR"},
                "custom_data": {
                    "value": "DOUBLE", "currency": "VARCHAR", "order_id": "VARCHAR", "checkout_url": "VARCHAR",
                    "discount_codes": ["VARCHAR"], "search_term": "VARCHAR",
                    "items": [{"id": "VARCHAR", "name": "VARCHAR", "price": "DOUBLE", "quantity": "DOUBLE",
                               "sku": "VARCHAR", "variant": "VARCHAR", "brand": "VARCHAR",
                               "category": "VARCHAR", "url": "VARCHAR", "image_url": "VARCHAR"}]},
                "consent": {"analytics": "BOOLEAN", "marketing": "BOOLEAN", "sale_of_data": "BOOLEAN"}
            }')
        end as event,
        -- RFC 3339: a date-time with an explicit offset; without one the instant is a guess.
        case when regexp_full_match(
                event_time_text,
                '\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}(:?\d{2})?)')
            then try_cast(event_time_text as timestamptz)
        end as event_time
    from violations
),

reasoned as (
    select
        *,
        bad_paths[1] as bad_path,
        -- Required fields come first in the contract, so a missing one is always the first bad field.
        field_types[list_position($field_names, bad_paths[1])] is null
            or field_types[list_position($field_names, bad_paths[1])] = 'NULL' as required_missing,
        case
            when trim(event.event_id) = '' then 'event_id'
            when trim(event.event_name) = '' then 'event_name'
            when trim(event.shop) = '' then 'shop'
            when trim(event.anonymous_id) = '' then 'anonymous_id'
            when trim(event.session_id) = '' then 'session_id'
        end as empty_required
    from typed
)

select
    source_file,
    line_number,
    raw_line,
    case
        when invalid_utf8 then 'invalid_utf8'
        when not is_json then 'not_json'
        when document_type <> 'OBJECT' then 'not_an_object'
        when required_missing and list_contains($required_fields, bad_path) then 'missing_field'
        when bad_path is not null then 'wrong_type'
        when empty_required is not null then 'missing_field'
        when event_time is null then 'unparseable_time'
        when event_time > $now + $max_skew then 'future_time'
        when event_time < timestamptz '2000-01-01 00:00:00+00' then 'time_before_2000'
    end as reason,
    case
        when invalid_utf8 then 'the line is not valid UTF-8 (bad bytes shown as U+FFFD)'
        when not is_json then 'the line is not valid JSON'
        when document_type <> 'OBJECT' then 'the line is a JSON ' || lower(document_type) || ', not an object'
        when required_missing and list_contains($required_fields, bad_path) then 'required field ' || bad_path || ' is missing or null'
        when bad_path is not null then
            bad_path || ' has JSON type ' || coalesce(json_type(document, '$.' || bad_path), 'unknown')
            || ', which the event contract does not allow'
        when empty_required is not null then 'required field ' || empty_required || ' is an empty string'
        when event_time is null then 'event_time ' || coalesce('"' || event_time_text || '"', 'null')
            || ' is not an ISO 8601 date-time with an offset'
        when event_time > $now + $max_skew then 'event_time ' || event_time_text || ' is more than '
            || $max_skew || ' ahead of the ingestion clock'
        when event_time < timestamptz '2000-01-01 00:00:00+00' then 'event_time ' || event_time_text
            || ' is before 2000'
    end as detail,
    case when document_type = 'OBJECT' then json_extract_string(document, '$.event_id') end as event_id_text,
    event,
    event_time,
    $now as ingested_at
from reasoned;
