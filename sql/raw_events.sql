-- Writes one classified batch (temp table classified_lines) to raw_events and quarantined_events, and leaves the
-- per-file outcome counts in temp table batch_file_counts for the ingested_files ledger.
-- An event_id already in raw_events, or seen earlier in this batch, is a pixel retry: counted, not kept again.

create or replace temp table accepted_lines as
select
    classified.*,
    row_number() over (partition by event.event_id order by source_file, line_number) = 1
        and not exists (select 1 from raw_events as kept where kept.event_id = classified.event.event_id)
        as is_first_sighting
from classified_lines as classified
where reason is null;

insert into raw_events
select
    event.event_id,
    event.event_name,
    event_time,
    event.shop,
    event.anonymous_id,
    event.session_id,
    event.event_source_url,
    event.referrer,
    event.user_data,
    event.custom_data,
    event.consent,
    raw_line::json,
    source_file,
    line_number,
    ingested_at
from accepted_lines
where is_first_sighting;

insert into quarantined_events
select source_file, line_number, raw_line, reason, detail, event_id_text, ingested_at
from classified_lines
where reason is not null;

create or replace temp table batch_file_counts as
select
    source_file,
    count(*) as lines,
    count(*) filter (where outcome = 'ingested') as ingested_rows,
    count(*) filter (where outcome = 'duplicate') as duplicate_rows,
    count(*) filter (where outcome = 'quarantined') as quarantined_rows
from (
    select source_file, if(is_first_sighting, 'ingested', 'duplicate') as outcome from accepted_lines
    union all
    select source_file, 'quarantined' from classified_lines where reason is not null
)
group by source_file;
