-- The verdict on each staged landing line of one batch: a reason to quarantine it, or accepted (and then
-- whether it is the first sighting of its event_id, or a pixel retry); and, when an earlier batch wrote its
-- event_id, the row id of the raw_events row that keeps it. Narrow on purpose: the wide typed rows are built once,
-- straight into raw_events (sql/raw_events.sql), for accepted first sightings only.
--
-- Input: staged_lines(source_file, line_number, raw_line, invalid_utf8), the batch's lines in as many
-- parts as DuckDB has threads (upstack_pipeline.ingestion.staged_lines), read side by side; and the kept events,
-- raw_events, looked up through raw_event_id_hashes (macro event_id_hash).
-- Parameters (from upstack_pipeline.events, made from schemas/raw-event.schema.json): $required_fields and
-- $max_lengths, their longest allowed length; $extracted_paths, the JSON paths of custom_data.items,
-- custom_data.discount_codes and then of each of $required_fields, in that order;
-- $field_names / $field_paths / $field_types, the JSON types each object field may have ('MISSING' = absent
-- key), where $field_paths has one more entry, '$', first, for the document itself; $item_names / $item_paths /
-- $item_types, the same for each custom_data.items[] element; $leading_items, how many items are typed with the line
-- itself, and $leading_item_names / $leading_item_paths / $leading_item_types their element and field checks in the
-- order the quarantine names them ($leading_item_paths has one more entry: the first item past them), with
-- $leading_item_elements, the position of each check's element among them; $now, the ingestion clock; $max_skew, how
-- far ahead of it an event_time may be.

-- Each join below has its small side on the right, as written: the batch's ids, then the loads they were kept in,
-- whose hash table DuckDB turns into a filter on raw_events' load_id, which its zone maps skip row groups by. Left
-- to choose, DuckDB built that join on raw_events' side instead and read every event id of the history.
-- (sql/raw_events.sql runs next with the same setting, and resets it.)
set disabled_optimizers = 'build_side_probe_side';

create or replace temp table line_verdicts as
with lines as (
    select source_file, line_number, raw_line, invalid_utf8, json_valid(raw_line) as is_json
    from staged_lines
    where not regexp_full_match(raw_line, '\s*')  -- blank lines (a trailing newline) are not events
),

-- One pass over the lines, valid JSON or not: the lines are not copied aside to judge the others separately.
parsed as (                                     -- JSON functions only ever see valid JSON: else path_types is null
    select
        source_file,
        line_number,
        invalid_utf8,
        -- The leading items' types come from the same parse: most events carry one item, and parsing the items
        -- again, then each item, cost a quarter of this query.
        case when is_json then json_type(raw_line, $field_paths || $leading_item_paths) end as path_types,
        case when is_json then json_extract_string(raw_line, $extracted_paths) end as extracted
            -- items, codes, then $required_fields
    from lines
),

checked as (
    select
        source_file,
        line_number,
        invalid_utf8,
        path_types,
        extracted[list_position($required_fields, 'event_id') + 2] as event_id,
        extracted[list_position($required_fields, 'event_time') + 2] as event_time_text,
        [$field_names[i] for i in range(1, len($field_names) + 1)
            if not list_contains($field_types[i], coalesce(path_types[i + 1], 'MISSING'))] as bad_fields,
        [$required_fields[i] for i in range(1, len($required_fields) + 1)
            if regexp_full_match(extracted[i + 2], '\s*')][1] as empty_field,
        [$required_fields[i] for i in range(1, len($required_fields) + 1)
            if length(extracted[i + 2]) > $max_lengths[i]][1] as too_long_field,
        -- An absent leading item is no item (a field of it is absent with it); one that is there must be an object.
        [$leading_item_names[i] for i in range(1, len($leading_item_names) + 1)
            if path_types[len($field_paths) + $leading_item_elements[i]] is not null
                and not list_contains($leading_item_types[i], coalesce(path_types[len($field_paths) + i], 'MISSING'))]
            as bad_leading_items,
        -- The items past the leading ones, when there are any: only an array has them (a string where an array
        -- belongs is a wrong type, not something to parse).
        case when path_types[len($field_paths) + len($leading_item_paths)] is not null then
            list_transform(json_transform(extracted[1], '["JSON"]')[$leading_items + 1:],
                           lambda item: json_type(item, $item_paths))
        end as item_path_types,
        case when path_types[list_position($field_names, 'custom_data.discount_codes') + 1] = 'ARRAY' then
            json_type(extracted[2], '$[*]')
        end as discount_code_types
    from parsed
),

violations as (
    select
        *,
        bad_fields
        || bad_leading_items
        || coalesce(flatten(list_transform(range(1, len(item_path_types) + 1), lambda k:
            case when coalesce(item_path_types[k][1], 'NULL') <> 'OBJECT'
                then ['custom_data.items[' || (k - 1 + $leading_items) || ']']
            else ['custom_data.items[' || (k - 1 + $leading_items) || '].' || $item_names[f]
                  for f in range(1, len($item_names) + 1)
                  if not list_contains($item_types[f], coalesce(item_path_types[k][f + 1], 'MISSING'))]
            end)), [])
        || coalesce(['custom_data.discount_codes[' || (k - 1) || ']'
            for k in range(1, len(discount_code_types) + 1) if discount_code_types[k] <> 'VARCHAR'], [])
            as bad_paths,
        -- RFC 3339: a date-time with an explicit offset; without one the instant is a guess.
        case when regexp_full_match(
                event_time_text,
                '\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-](0\d|1[0-4])(:?[0-5]\d)?)')
            then try_cast(event_time_text as timestamptz)
        end as event_time
    from checked
),

judged as materialized (  -- read twice below: parse each line once
    select
        source_file,
        line_number,
        event_id,
        event_time_text,
        case
            when invalid_utf8 then 'invalid_utf8'
            when path_types is null then 'not_json'
            when path_types[1] <> 'OBJECT' then 'not_an_object'
            when list_contains($required_fields, bad_paths[1])
                and coalesce(path_types[list_position($field_names, bad_paths[1]) + 1], 'NULL') = 'NULL'
                then 'missing_field'
            when len(bad_paths) > 0 then 'wrong_type'
            when empty_field is not null then 'missing_field'
            when too_long_field is not null then 'too_long'
            when event_time is null then 'unparseable_time'
            when event_time > $now + $max_skew then 'future_time'
            when event_time < timestamptz '2000-01-01 00:00:00+00' then 'time_before_2000'
        end as reason,
        if(path_types is null, null, coalesce(bad_paths[1], empty_field, too_long_field)) as bad_path,
        event_time
    from violations
),

-- This batch's event_ids kept by an earlier batch, and the row keeping each: sql/raw_events.sql compares a retry
-- with that row, read by its row id. Probing with the batch's ids, not the other way round, keeps each hash table the
-- size of the batch: a day's increment must not cost a table of the history. The history's event ids are not read
-- whole: their hashes are (raw_event_id_hashes, 8 bytes a row), and raw_events' event ids only in the loads holding
-- a match, whose row groups raw_events' zone maps on load_id pick out (it is written in load order). Most batches
-- match none. Reading every event id cost 0.08 s a run at 1.8 million events, 0.6 s at 19 million.
accepted_ids as materialized (
    select distinct event_id from judged where reason is null
),

kept_loads as (
    select distinct load_id from raw_event_id_hashes
    semi join (select event_id_hash(event_id) as id_hash from accepted_ids) as batch using (id_hash)
),

-- The loads' rows first, on their own: given both semi joins in one FROM, DuckDB's join order put the batch's ids
-- first whenever the batch was the smaller side (a run of a few lines) and read every event id of the history for
-- them, 72 MB at 1.8 million events; with the join order as written (optimizer join_order off), it still did.
-- Materialized, so that DuckDB plans it apart rather than inlining it into one join again. It holds the event ids of
-- the loads that kept any of the batch's: a retry's load (one batch of the history), or for a batch re-sending old
-- events, the loads that have them: about 6 MB per 100,000 events.
rows_of_kept_loads as materialized (
    select event_id, rowid as kept_rowid from raw_events semi join kept_loads using (load_id)
),

kept_before as (
    select event_id, min(kept_rowid) as kept_rowid
    from rows_of_kept_loads
    semi join accepted_ids using (event_id)
    group by event_id
)

select source_file, line_number, event_id, reason, bad_path, event_time_text, event_time, kept.kept_rowid,
       reason is null
           and row_number() over (partition by reason is null, event_id order by source_file, line_number) = 1
           and kept.kept_rowid is null as is_first_sighting
from judged
left join kept_before as kept using (event_id);
