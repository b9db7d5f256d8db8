-- Loads one batch of staged customer export rows (staged_lines, registered Arrow streams: source_file, line_number,
-- raw_line holding the row as a JSON object of strings) into customers, upserting by customer_id: the newest file wins,
-- since each Shopify export is a snapshot. Rows without a customer_id go to quarantined_customers.
-- Variables: ingested_at, load_id. Leaves per-file counts in temp table batch_file_counts.

create or replace temp table classified_customer_rows as
select
    source_file,
    line_number,
    raw_line,
    nullif(trim(json_extract_string(raw_line, '$.customer_id')), '') as customer_id,
    nullif(trim(json_extract_string(raw_line, '$.email')), '') as email,
    nullif(trim(json_extract_string(raw_line, '$.phone')), '') as phone,
    nullif(trim(json_extract_string(raw_line, '$.first_name')), '') as first_name,
    nullif(trim(json_extract_string(raw_line, '$.last_name')), '') as last_name,
    nullif(trim(json_extract_string(raw_line, '$.city')), '') as city,
    nullif(trim(json_extract_string(raw_line, '$.region')), '') as region,
    nullif(trim(json_extract_string(raw_line, '$.country')), '') as country,
    case lower(trim(json_extract_string(raw_line, '$.accepts_marketing')))
        when 'true' then true when 'yes' then true when '1' then true when 'y' then true
        when 'false' then false when 'no' then false when '0' then false when 'n' then false
    end as accepts_marketing,
    getvariable('ingested_at') as ingested_at,
    getvariable('load_id') as load_id
from staged_lines
where trim(raw_line) <> '';

insert into customers
select customer_id, email, phone, first_name, last_name, city, region, country, accepts_marketing,
       source_file, line_number, ingested_at, load_id
from classified_customer_rows
where customer_id is not null
qualify row_number() over (partition by customer_id order by source_file desc, line_number desc) = 1
on conflict do update set
    email = excluded.email, phone = excluded.phone, first_name = excluded.first_name,
    last_name = excluded.last_name, city = excluded.city, region = excluded.region, country = excluded.country,
    accepts_marketing = excluded.accepts_marketing, source_file = excluded.source_file,
    line_number = excluded.line_number, ingested_at = excluded.ingested_at, load_id = excluded.load_id
    where excluded.source_file >= customers.source_file;   -- an older export arriving late does not win

insert into quarantined_customers
select source_file, line_number, raw_line, 'missing_field', 'required field customer_id is missing or empty',
       ingested_at
from classified_customer_rows
where customer_id is null;

create or replace temp table batch_file_counts as
select
    source_file,
    count(*) as lines,
    count(*) filter (where customer_id is not null) as ingested_rows,
    0 as duplicate_rows,
    count(*) filter (where customer_id is null) as quarantined_rows
from classified_customer_rows
group by source_file;
