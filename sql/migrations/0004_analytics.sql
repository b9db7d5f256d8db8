-- Version 4 (issue 13): what analysts' views need. Each Klaviyo request gets an id, shared by its retries, that the
-- outbox rows it settled carry (a shopper's trace goes from the event to the request and Klaviyo's answer); and
-- commerce_metrics names each commerce event's Klaviyo metric.

alter table klaviyo_outbox add column request_id varchar;
alter table klaviyo_deliveries add column request_id varchar;

create table commerce_metrics (
    event_name     varchar primary key,
    klaviyo_metric varchar not null,
    metric_name    varchar not null,
    enabled        boolean not null,
    backup_utm_campaign varchar
);
