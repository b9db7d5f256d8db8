"""Landing files into the warehouse: `raw_events` and `customers`, with checks on the landing folder's health."""

import dagster as dg

from dagster_project.metadata import ingestion_metadata
from dagster_project.resources import WAREHOUSE_POOL, UpstackResource
from upstack_pipeline.customers import ingest_customers
from upstack_pipeline.events import ingest_events
from upstack_pipeline.ingestion import landing_health, overview

landing_checks = [
    dg.AssetCheckSpec("landing_files_unchanged", asset="raw_events",
                      description="No landing file was rewritten after it was ingested."),
    dg.AssetCheckSpec("landing_files_readable", asset="raw_events",
                      description="Every landing file could be read (not corrupt, not truncated)."),
    dg.AssetCheckSpec("event_ids_unique", asset="raw_events", blocking=True,
                      description="Each event_id is kept once, whatever the pixel retried."),
]


@dg.asset(
    pool=WAREHOUSE_POOL,
    group_name="ingestion",
    kinds={"duckdb"},
    check_specs=landing_checks,
    description="Storefront events from the landing folder's new files; bad lines go to quarantined_events.",
)
def raw_events(context: dg.AssetExecutionContext, upstack: UpstackResource):
    now = upstack.now()
    report = ingest_events(upstack.settings(), now=now, log=context.log.warning)
    table = overview(upstack.warehouse(), table="raw_events", quarantine_table="quarantined_events",
                     recent_columns="event_id, event_name, event_time, anonymous_id, source_file", now=now)
    yield dg.MaterializeResult(metadata=ingestion_metadata(report, table))
    yield from landing_check_results(upstack)


def landing_check_results(upstack: UpstackResource):
    health = landing_health(upstack.warehouse())
    yield warn_unless_zero(
        "landing_files_unchanged", health.changed_files, "changed_files",
        "landing files changed after ingestion and were not re-read (see table changed_files). "
        "Write new data to new files.",
    )
    yield warn_unless_zero(
        "landing_files_readable", health.unreadable_files, "unreadable_files",
        "landing files could not be read (see ingested_files where status = 'unreadable'). "
        "Re-export them under a new name.",
    )
    yield dg.AssetCheckResult(
        check_name="event_ids_unique", passed=health.repeated_event_ids == 0,
        metadata={"repeated_event_ids": health.repeated_event_ids},
    )


def warn_unless_zero(check_name: str, count: int, label: str, what_to_do: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=check_name, passed=count == 0, severity=dg.AssetCheckSeverity.WARN, metadata={label: count},
        description=None if count == 0 else f"{count} {what_to_do}",
    )


@dg.asset(
    pool=WAREHOUSE_POOL,
    group_name="ingestion",
    kinds={"duckdb"},
    description="Shopify customers export (optional): links customer ids to emails; newest export wins.",
)
def customers(context: dg.AssetExecutionContext, upstack: UpstackResource) -> dg.MaterializeResult:
    now = upstack.now()
    report = ingest_customers(upstack.settings(), now=now, log=context.log.warning)
    table = overview(upstack.warehouse(), table="customers", quarantine_table="quarantined_customers",
                     recent_columns="customer_id, first_name, city, country, source_file", now=now)
    return dg.MaterializeResult(metadata=ingestion_metadata(report, table))
