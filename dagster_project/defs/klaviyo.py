"""Klaviyo: resolved commerce events -> the outbox of payloads and the skipped events (klaviyo_mapping) -> Klaviyo
(klaviyo_delivery, which records its requests and refused events, and sets each outbox row's status)."""

import dagster as dg

from dagster_project.metadata import percent, plural, table_metadata, table_specs
from dagster_project.resources import UpstackResource
from upstack_pipeline.klaviyo.delivery import DeliveryRun, deliver, stale_pending_rows
from upstack_pipeline.klaviyo.mapping import MappingOverview, MappingRun, map_events, overview

mapping_checks = [
    dg.AssetCheckSpec("every_commerce_event_decided", asset="klaviyo_outbox", blocking=True,
                      description="Every commerce event of an idle session is in the outbox or skipped with a "
                                  "reason, and never both."),
    dg.AssetCheckSpec("payloads_complete", asset="klaviyo_outbox", blocking=True,
                      description="Every outbox payload carries its metric's key properties, and a numeric value "
                                  "where money is involved."),
]

# One decision per commerce event, into one table or the other, from the same inputs (identity_links tells when a
# session went idle). Each reads the other only to leave decided events alone.
MAPPING_TABLES = {
    **dict.fromkeys(("klaviyo_outbox", "klaviyo_skipped"), ["resolved_events", "identities", "raw_events",
                                                              "identity_links"]),
    "commerce_metrics": [],  # from the settings alone
}


@dg.multi_asset(
    specs=table_specs(MAPPING_TABLES, group="klaviyo"),
    check_specs=mapping_checks,
    description="Decides each commerce event once its session is idle: Klaviyo events to send (klaviyo_outbox) or "
                "the reason it is not sent (klaviyo_skipped); commerce_metrics names the metrics.",
)
def klaviyo_mapping(upstack: UpstackResource):
    settings = upstack.settings()
    now = upstack.now()
    run = map_events(settings, now=now)
    state = overview(settings, now=now)
    tables = table_metadata(settings.warehouse(), MAPPING_TABLES)
    yield dg.MaterializeResult(asset_key="klaviyo_outbox",
                               metadata={**tables["klaviyo_outbox"], **payload_metadata(run, state)})
    yield dg.MaterializeResult(asset_key="klaviyo_skipped", metadata={
        **tables["klaviyo_skipped"], "skipped_this_run": run.skipped,
        "skipped_by_reason": dg.MetadataValue.json(state.skipped_by_reason),
    })
    yield dg.MaterializeResult(asset_key="commerce_metrics", metadata=tables["commerce_metrics"])
    yield dg.AssetCheckResult(
        asset_key="klaviyo_outbox", check_name="every_commerce_event_decided",
        passed=state.undecided_idle_events == 0 and state.decided_twice == 0,
        metadata={"undecided_idle_events": state.undecided_idle_events, "decided_twice": state.decided_twice,
                  "held_back_active_sessions": state.held_back},
    )
    yield dg.AssetCheckResult(
        asset_key="klaviyo_outbox", check_name="payloads_complete",
        passed=state.rows_missing_key_properties == 0 and state.money_rows_without_numeric_value == 0,
        metadata={"rows_missing_key_properties": state.rows_missing_key_properties,
                  "money_rows_without_numeric_value": state.money_rows_without_numeric_value},
    )


def payload_metadata(run: MappingRun, state: MappingOverview) -> dict:
    per_metric = ", ".join(f"{metric} {count:,}" for metric, count in state.outbox_by_metric.items()) or "none"
    per_reason = ", ".join(f"{reason} {count:,}" for reason, count in state.skipped_by_reason.items()) or "none"
    return {
        "summary": dg.MetadataValue.text(
            f"{plural(run.outbox_rows, 'Klaviyo event')} queued, {plural(run.skipped, 'commerce event')} skipped "
            f"this run; {state.held_back:,} wait for their session to go idle. Outbox: {per_metric}. "
            f"Skipped: {per_reason}"),
        "outbox_rows_this_run": run.outbox_rows,
        "reviewed_for_klaviyo_limits_this_run": run.reviewed_for_limits,
        "outbox_by_metric": dg.MetadataValue.json(state.outbox_by_metric),
        "cart_links_by_source": dg.MetadataValue.json(state.cart_links_by_source),
        "held_back": state.held_back,
        "raw_events_by_name": dg.MetadataValue.json(state.raw_events_by_name),
    }


delivery_checks = [
    dg.AssetCheckSpec("destination_healthy", asset="klaviyo_deliveries",
                      description="Klaviyo is reachable and accepts the API key, its scopes and our API revision."),
    dg.AssetCheckSpec("no_stale_pending_rows", asset="klaviyo_deliveries",
                      description="No outbox row has waited longer than max_pending_age."),
    dg.AssetCheckSpec("dead_letter_share", asset="klaviyo_dead_letters",
                      description="Klaviyo refused at most max_dead_letter_share of this run's events."),
]

# Delivery also writes klaviyo_outbox (each row's status, claimed_at, delivered_at), which klaviyo_mapping owns:
# an asset has one step that materializes it, so this step records what it settled as an observation of it.
DELIVERY_TABLES = dict.fromkeys(("klaviyo_deliveries", "klaviyo_dead_letters"), ["klaviyo_outbox"])


@dg.multi_asset(
    specs=table_specs(DELIVERY_TABLES, group="klaviyo"),
    check_specs=delivery_checks,
    description="Sends pending outbox rows to Klaviyo's Bulk Create Events API and settles each row's status; every "
                "request is recorded in klaviyo_deliveries, refused events in klaviyo_dead_letters.",
)
def klaviyo_delivery(context: dg.AssetExecutionContext, upstack: UpstackResource):
    settings = upstack.settings()
    now = upstack.now()
    run = deliver(settings, now=now)
    if run.stopped:
        context.log.error(run.stopped)
    stale = stale_pending_rows(settings, now=now)
    limits = settings.destination
    tables = table_metadata(settings.warehouse(), DELIVERY_TABLES)
    yield dg.MaterializeResult(asset_key="klaviyo_deliveries",
                               metadata={**tables["klaviyo_deliveries"], **delivery_metadata(run)})
    yield dg.MaterializeResult(asset_key="klaviyo_dead_letters", metadata={
        **tables["klaviyo_dead_letters"], "dead_lettered_this_run": run.dead_lettered})
    yield dg.AssetObservation(asset_key="klaviyo_outbox", metadata={
        "delivered_this_run": run.delivered, "dead_lettered_this_run": run.dead_lettered,
        "left_pending": run.left_pending})
    yield dg.AssetCheckResult(
        asset_key="klaviyo_deliveries", check_name="destination_healthy",
        passed=run.configured and run.stopped is None,
        severity=dg.AssetCheckSeverity.ERROR if run.stopped else dg.AssetCheckSeverity.WARN,
        description=run.stopped or (None if run.configured else
                                    "KLAVIYO_API_KEY is not set: set it, then run `upstack klaviyo check-key`."),
    )
    yield dg.AssetCheckResult(
        asset_key="klaviyo_deliveries", check_name="no_stale_pending_rows", passed=stale == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"stale_pending_rows": stale,
                  "max_pending_age_minutes": int(limits.max_pending_age.total_seconds() // 60)},
        description=None if stale == 0 else "Events wait in the outbox; see this asset's destination_healthy check "
                                            "and table klaviyo_deliveries for Klaviyo's answers.",
    )
    yield dg.AssetCheckResult(
        asset_key="klaviyo_dead_letters", check_name="dead_letter_share",
        passed=run.dead_letter_share <= limits.max_dead_letter_share, severity=dg.AssetCheckSeverity.WARN,
        metadata={"dead_letter_pct": percent(run.dead_letter_share), "dead_lettered": run.dead_lettered},
        description=None if run.dead_letter_share <= limits.max_dead_letter_share else
        "Klaviyo refused events: its reasons are in table klaviyo_dead_letters.",
    )


def delivery_metadata(run: DeliveryRun) -> dict:
    if not run.configured:
        return {"summary": dg.MetadataValue.text(
            "KLAVIYO_API_KEY is not set: nothing sent; the outbox keeps every event until it is.")}
    sent = (f"{plural(run.delivered, 'event')} delivered in {plural(run.requests, 'request')} "
            f"({run.retried:,} retried)")
    if run.delivered_backfill:
        sent += (f", {run.delivered_backfill:,} of them as backfill (older than max_event_age: recorded on the "
                 "profile without firing flows)")
    outcome = f"{run.dead_lettered:,} dead-lettered, {run.left_pending:,} left pending"
    summary = (f"STOPPED: {run.stopped} So far: {sent}; {outcome}" if run.stopped
               else f"{sent}; {outcome}; {run.events_per_minute:,.0f} events/min")
    return {
        "summary": dg.MetadataValue.text(summary),
        "delivered": run.delivered,
        "delivered_backfill": run.delivered_backfill,
        "requests": run.requests,
        "retried_requests": run.retried,
        "dead_lettered": run.dead_lettered,
        "left_pending": run.left_pending,
        "events_per_minute": dg.MetadataValue.float(round(run.events_per_minute, 1)),
    }
