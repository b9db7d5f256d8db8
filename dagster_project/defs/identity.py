"""Identity resolution: who is behind each commerce event. One step, one transaction, writes every identity table,
in the order of upstack_pipeline/identity.py: observations (and rejected values), links, browser links and clusters,
resolved_events (each event's phone the first of its person's, from the translations identities lists), then
identities."""

import dagster as dg

from dagster_project.metadata import markdown_table, percent, plural, table_metadata, table_specs
from dagster_project.resources import UpstackResource
from upstack_pipeline.identity import IdentityOverview, overview, resolve_identities

identity_checks = [
    dg.AssetCheckSpec("shared_device_guard_respected", asset="resolved_events", blocking=True,
                      description="No event is named from the history of a browser that has shown more emails "
                                  "than max_emails_per_browser."),
]

# Each table's deps are the tables its SQL reads, in the order the step runs it (usable_identity_* are views over
# identity_observations, identity_links and identity_rejected_values). identities is built after resolved_events,
# from it. Lineage has no cycles, so the looks back at the previous run's tables are not drawn
# (identity_rejected_values.sql finds in resolved_events and identities what a newly quarantined value named).
IDENTITY_TABLES = {
    "identity_observations": ["raw_events"],
    "identity_rejected_values": ["identity_observations"],
    "identity_links": ["identity_observations", "raw_events", "customers"],
    "browser_links": ["identity_observations", "identity_links", "raw_events"],
    "email_translations": ["identity_links", "identity_observations", "identity_rejected_values"],
    "browser_clusters": ["browser_links", "identity_links", "identity_observations", "identity_rejected_values",
                         "email_translations"],
    "resolved_events": ["raw_events", "customers", "identity_observations", "identity_rejected_values",
                        "identity_links", "browser_clusters", "email_translations"],
    "identities": ["resolved_events", "identity_observations", "identity_rejected_values", "identity_links",
                   "browser_links", "customers", "email_translations"],
    "identity_flags": ["browser_links", "browser_clusters", "resolved_events"],
    "pipeline_state": ["ingested_files"],  # the identity stage's watermark: the last load_id it has read
}


@dg.multi_asset(
    specs=table_specs(IDENTITY_TABLES, group="identity"),
    check_specs=identity_checks,
    description="Resolves the new events' identifiers into people, in one transaction, so the identity tables never "
                "disagree with each other.",
)
def identity_resolution(upstack: UpstackResource):
    settings = upstack.settings()
    run = resolve_identities(settings, now=upstack.now())
    state = overview(settings)
    tables = table_metadata(settings.warehouse(), IDENTITY_TABLES)
    specific = {
        "identity_observations": {
            "summary": dg.MetadataValue.text(
                f"{plural(run.new_observations, 'identifier')} observed this run; "
                f"{plural(run.rejected_values, 'value')} rejected "
                "(placeholders, blocked or malformed)"),
            "new_observations": run.new_observations,
            # A backfill's loads are resolved in chunks, each its own transaction (Settings.identity_chunk_rows).
            "chunks_this_run": run.chunks,
        },
        "identity_rejected_values": {
            "rejected_values_this_run": run.rejected_values,
            "most_rejected_values": dg.MetadataValue.md(markdown_table(state.rejected_values)),
        },
        "identities": {
            "summary": dg.MetadataValue.text(
                f"{plural(state.identities, 'person', 'people')}; guard flags: {flags_text(state)}"),
            "dagster/row_count": state.identities,
        },
        "identity_flags": {
            "flags": dg.MetadataValue.json(state.flags_by_kind),
            "largest_shared_browsers": dg.MetadataValue.md(markdown_table(state.largest_shared_browsers)),
        },
        "resolved_events": resolved_events_metadata(run.events_resolved, state),
    }
    for table, metadata in tables.items():
        yield dg.MaterializeResult(asset_key=table, metadata={**metadata, **specific.get(table, {})})
    yield dg.AssetCheckResult(
        asset_key="resolved_events", check_name="shared_device_guard_respected",
        passed=state.history_attributions_over_guard == 0,
        metadata={"events_over_guard": state.history_attributions_over_guard},
    )


def resolved_events_metadata(events_resolved_this_run: int, state: IdentityOverview) -> dict:
    share = state.resolved_events / state.commerce_events if state.commerce_events else 0.0
    return {
        "summary": dg.MetadataValue.text(
            f"{state.resolved_events:,} of {plural(state.commerce_events, 'commerce event')} resolved ({share:.1%})"
        ),
        "dagster/row_count": state.commerce_events,
        "events_resolved_this_run": events_resolved_this_run,
        "resolved_pct": percent(share),
        "resolved_by_match_method": dg.MetadataValue.json(state.by_match_method),
        "unresolved_by_reason": dg.MetadataValue.json(state.unresolved_by_reason),
    }


def flags_text(state: IdentityOverview) -> str:
    return ", ".join(f"{flag} {count:,}" for flag, count in state.flags_by_kind.items()) or "none"
