-- Klaviyo's metric and ours for each commerce event, under the current settings: replaced whole every run, so a new
-- UPSTACK_METRIC_TEMPLATE renames them here at once. Variables: klaviyo_metrics, metric_names, enabled_events,
-- backup_utm_campaigns.
delete from commerce_metrics;

insert into commerce_metrics
select event_name, getvariable('klaviyo_metrics')[event_name], getvariable('metric_names')[event_name],
       list_contains(getvariable('enabled_events'), event_name),
       getvariable('backup_utm_campaigns')[getvariable('klaviyo_metrics')[event_name]]
from (select unnest(map_keys(getvariable('klaviyo_metrics'))) as event_name);
