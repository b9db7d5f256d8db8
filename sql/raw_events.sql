-- Writes one judged batch: accepted first sightings to raw_events (typed once, here) and their event ids' hashes to
-- raw_event_id_hashes, every quarantined line to quarantined_events with a detail a person can act on, and the
-- per-file outcome counts to temp table batch_file_counts for the ingested_files ledger.
-- Input: staged_lines (the batch's lines, registered Arrow streams: upstack_pipeline.ingestion.staged_lines) and temp
-- table line_verdicts (sql/line_verdicts.sql). Variables: ingested_at, load_id, and event_structure, the schema's
-- fields as json_transform reads them (upstack_pipeline.events.READ_STRUCTURE, made from
-- schemas/raw-event.schema.json): one raw_events column each, matched by name.

-- staged_lines are Arrow streams, whose rows DuckDB cannot count before reading them: taking them for the small side,
-- DuckDB would build each join's hash table on the batch's full text (for a 64 MB batch, most of a second per
-- join, and the batch's memory peak). With build_side_probe_side off, a join's build side is its right side as
-- written, so every join of staged_lines below has the lines on the left, streamed past the verdicts they need.
set disabled_optimizers = 'build_side_probe_side';

insert into raw_events by name
select
    event.* exclude (event_time),
    verdict.event_time,                         -- as sql/line_verdicts.sql parsed it
    raw_line as raw_json,
    source_file,
    line_number,
    getvariable('ingested_at') as ingested_at,
    getvariable('load_id') as load_id
from (
    select
        staged.source_file,
        staged.line_number,
        staged.raw_line,
        verdict,
        json_transform(staged.raw_line, getvariable('event_structure')) as event
    from staged_lines as staged
    join (select * from line_verdicts where is_first_sighting) as verdict using (source_file, line_number)
);

insert into raw_event_id_hashes
select event_id_hash(event_id), getvariable('load_id') from line_verdicts where is_first_sighting;

-- A second sighting of an event_id (in this batch or an earlier one) is a pixel retry when it is the same JSON
-- value as the kept one, and a conflicting_duplicate only when a value differs: another payload under an id already
-- kept is a pixel bug that would otherwise lose an event silently. Same value: object key order, whitespace and
-- string escapes do not matter; numbers are equal by value (1, 1.0 and 1e0 are one number, as JSON parsers read
-- them); array order, strings, booleans and null vs absent do; unknown fields count like contract fields.
-- Cost: most retries are byte-identical, and most others differ only in spacing or escapes, which minifying both
-- sides with json() settles. Only what is left (other key order, numbers spelled otherwise, real conflicts) is
-- walked node by node with json_tree, both sides, matched by path. First sightings are never looked at.
-- The kept line of a retry is taken from this batch's staged lines when it was first seen here (retries mostly
-- follow within seconds), and only otherwise from raw_events: raw_json is zstd-compressed there, and decompressing
-- it is what a lookup costs. So raw_json is read by the row id sql/line_verdicts.sql found the kept row at: only
-- the row groups holding them are decompressed (the last hour's, for a retry of the last hour), not every row
-- group of the history, which an hourly run would otherwise pay whenever a retry crosses a file boundary.
-- The quarantine names the first differing path in the kept event's order (then, for keys only the retry has, in
-- the retry's order): the first differing value, or the container whose type changed.
update line_verdicts set reason = 'conflicting_duplicate', bad_path = conflict.path
from (
    -- The accepted lines of the event ids accepted more than once (a few of the batch's), found in the verdicts
    -- first: joined to the staged lines before this filter, every verdict of the batch went into a hash table.
    with repeated as materialized (
        select source_file, line_number, event_id, is_first_sighting, kept_rowid
        from line_verdicts
        where reason is null
            and event_id in (select event_id from line_verdicts where reason is null and not is_first_sighting)
    ),

    sightings as materialized (         -- their text, in one scan of the staged lines
        select verdict.*, staged.raw_line
        from staged_lines as staged
        join repeated as verdict using (source_file, line_number)
    ),

    retries as (
        select source_file, line_number, event_id, raw_line, kept_rowid from sightings where not is_first_sighting
    ),

    kept as materialized (
        select event_id, raw_line as kept_json from sightings where is_first_sighting
        union all
        select event_id, raw_json::varchar
        from raw_events
        where rowid in (select kept_rowid from retries where kept_rowid is not null)
    ),

    pairs as materialized (
        select retry.source_file, retry.line_number, retry.raw_line, kept.kept_json
        from retries as retry
        join kept using (event_id)
        where case  -- cheapest first: the same bytes, then the same text once minified (spacing, escapes)
                when kept.kept_json = retry.raw_line then false
                else json(kept.kept_json) <> json(retry.raw_line)
            end
    ),

    kept_nodes as (
        select pair.source_file, pair.line_number, node.id, node.fullkey, node.type, node.atom
        from pairs as pair, json_tree(pair.kept_json) as node
    ),

    retry_nodes as (
        select pair.source_file, pair.line_number, node.id, node.fullkey, node.type, node.atom
        from pairs as pair, json_tree(pair.raw_line) as node
    ),

    differences as (
        select
            coalesce(kept.source_file, retry.source_file) as source_file,
            coalesce(kept.line_number, retry.line_number) as line_number,
            coalesce(kept.fullkey, retry.fullkey) as fullkey,
            (kept.id is null, coalesce(kept.id, retry.id)) as position
        from kept_nodes as kept
        full join retry_nodes as retry using (source_file, line_number, fullkey)
        where kept.id is null or retry.id is null
            or case
                when kept.type in ('UBIGINT', 'BIGINT') and retry.type in ('UBIGINT', 'BIGINT')
                    then kept.atom::varchar::hugeint <> retry.atom::varchar::hugeint
                when kept.type in ('UBIGINT', 'BIGINT', 'DOUBLE') and retry.type in ('UBIGINT', 'BIGINT', 'DOUBLE')
                    then kept.atom::varchar::double <> retry.atom::varchar::double
                when kept.type <> retry.type then true
                when kept.type = 'VARCHAR' then kept.atom ->> '$' <> retry.atom ->> '$'
                when kept.type = 'BOOLEAN' then kept.atom::varchar <> retry.atom::varchar
                else false  -- both null, or both objects or both arrays: their members are compared by path
            end
    )

    select source_file, line_number, regexp_replace(arg_min(fullkey, position), '^\$\.?', '') as path
    from differences
    group by source_file, line_number
) as conflict
where line_verdicts.source_file = conflict.source_file and line_verdicts.line_number = conflict.line_number;

insert into quarantined_events
select
    source_file,
    line_number,
    staged.raw_line,
    verdict.reason,
    case verdict.reason
        when 'invalid_utf8' then 'the line is not valid UTF-8 (bad bytes are shown as U+FFFD)'
        when 'not_json' then 'the line is not valid JSON'
        when 'not_an_object' then 'the line is a JSON ' || lower(json_type(staged.raw_line)) || ', not an object'
        when 'missing_field' then 'required field ' || verdict.bad_path || ' is missing, null or empty'
        when 'too_long' then verdict.bad_path || ' is longer than the event contract allows'
        when 'conflicting_duplicate' then 'event_id ' || verdict.event_id
            || ' was already ingested with a different ' || verdict.bad_path || '; the first one was kept'
        when 'wrong_type' then verdict.bad_path || ' is a JSON '
            || coalesce(lower(json_type(staged.raw_line, '$.' || verdict.bad_path)), 'value')
            || ', which the event contract does not allow'
        when 'unparseable_time' then 'event_time ' || coalesce('"' || verdict.event_time_text || '"', 'null')
            || ' is not an ISO 8601 date-time with an offset'
        when 'future_time' then 'event_time ' || verdict.event_time_text
            || ' is more than the allowed clock skew ahead of ingestion'
        when 'time_before_2000' then 'event_time ' || verdict.event_time_text || ' is before 2000'
    end,
    verdict.event_id,
    getvariable('ingested_at')
from staged_lines as staged
join line_verdicts as verdict using (source_file, line_number)
where verdict.reason is not null;

create or replace temp table batch_file_counts as
select
    source_file,
    count(*) as lines,
    count(*) filter (where is_first_sighting) as ingested_rows,
    count(*) filter (where reason is null and not is_first_sighting) as duplicate_rows,
    count(*) filter (where reason is not null) as quarantined_rows
from line_verdicts
group by source_file;

reset disabled_optimizers;
