"""Landing files into the warehouse: one step writes the events' and the customers' tables and the file ledger they
share, with checks on the landing folder's health."""

from datetime import datetime

import dagster as dg

from dagster_project.metadata import ingestion_metadata, table_metadata, table_specs
from dagster_project.resources import UpstackResource
from upstack_pipeline.customers import ingest_customers
from upstack_pipeline.events import ingest_events
from upstack_pipeline.ingestion import landing_health, overview
from upstack_pipeline.warehouse import VERSION_TABLE, Warehouse

landing_checks = [
    dg.AssetCheckSpec("landing_files_unchanged", asset="raw_events",
                      description="No landing file was rewritten after it was ingested."),
    dg.AssetCheckSpec("landing_files_readable", asset="raw_events",
                      description="Every landing file could be read (not corrupt, not truncated)."),
    dg.AssetCheckSpec("event_ids_unique", asset="raw_events", blocking=True,
                      description="Each event_id is kept once, whatever the pixel retried: no row this run "
                                  "ingested repeats an event_id already in raw_events."),
]

INGESTION_TABLES = {
    # The step opens the warehouse first in every run, so this is where a new file gets its schema and an older
    # one its migrations (any step that opens the file first would do the same).
    VERSION_TABLE: [],
    # Events and customers files share one ledger: whichever kind a file is, its row is written by this step.
    "ingested_files": [],
    "changed_files": ["ingested_files"],
    "raw_events": [],
    # The duplicate check's hashes of raw_events' event ids (sql/warehouse.sql), written with raw_events' rows.
    "raw_event_id_hashes": ["raw_events"],
    "quarantined_events": [],
    "customers": [],
    "quarantined_customers": [],
}


@dg.multi_asset(
    specs=table_specs(INGESTION_TABLES, group="ingestion"),
    check_specs=landing_checks,
    description="The landing folder's new files into the warehouse: the Shopify customers exports (optional; a newer "
                "export wins), then the storefront events; bad lines are quarantined, every file is in the ledger.",
)
def ingestion(context: dg.AssetExecutionContext, upstack: UpstackResource):
    now = upstack.now()
    settings = upstack.settings()
    warehouse = settings.warehouse()
    customers = ingest_customers(settings, now=now, log=context.log.warning)
    events = ingest_events(settings, now=now, log=context.log.warning)
    tables = table_metadata(warehouse, INGESTION_TABLES)
    customers_table = overview(warehouse, table="customers", quarantine_table="quarantined_customers",
                               recent_columns="customer_id, first_name, city, country, source_file", now=now)
    events_table = overview(warehouse, table="raw_events", quarantine_table="quarantined_events",
                            recent_columns="event_id, event_name, event_time, anonymous_id, source_file", now=now)
    yield dg.MaterializeResult(asset_key="raw_events",
                               metadata={**tables["raw_events"], **ingestion_metadata(events, events_table)})
    yield dg.MaterializeResult(asset_key="customers",
                               metadata={**tables["customers"], **ingestion_metadata(customers, customers_table)})
    yield dg.MaterializeResult(asset_key="quarantined_events", metadata={
        **tables["quarantined_events"], "quarantined_this_run": events.quarantined_rows})
    yield dg.MaterializeResult(asset_key="quarantined_customers", metadata={
        **tables["quarantined_customers"], "quarantined_this_run": customers.quarantined_rows})
    yield dg.MaterializeResult(asset_key="ingested_files", metadata={
        **tables["ingested_files"], "files_read_this_run": events.files_read + customers.files_read})
    yield dg.MaterializeResult(asset_key="changed_files", metadata={
        **tables["changed_files"], "found_this_run": len(events.changed_files) + len(customers.changed_files)})
    yield dg.MaterializeResult(asset_key="raw_event_id_hashes", metadata=tables["raw_event_id_hashes"])
    yield dg.MaterializeResult(asset_key=VERSION_TABLE, metadata=tables[VERSION_TABLE])
    yield from landing_check_results(warehouse, now)


def landing_check_results(warehouse: Warehouse, now: datetime):
    health = landing_health(warehouse, now=now)
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
        asset_key="raw_events", check_name="event_ids_unique", passed=health.repeated_event_ids == 0,
        metadata={"repeated_event_ids": health.repeated_event_ids},
    )


def warn_unless_zero(check_name: str, count: int, label: str, what_to_do: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key="raw_events", check_name=check_name, passed=count == 0, severity=dg.AssetCheckSeverity.WARN,
        metadata={label: count}, description=None if count == 0 else f"{count} {what_to_do}",
    )
