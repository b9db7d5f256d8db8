"""Klaviyo: resolved commerce events -> the outbox of payloads to send (klaviyo_payloads)."""

from datetime import datetime, timezone

import dagster as dg

from dagster_project.resources import WAREHOUSE_POOL, UpstackResource
from upstack_pipeline.klaviyo.mapping import MappingOverview, map_events, overview

mapping_checks = [
    dg.AssetCheckSpec("every_commerce_event_decided", asset="klaviyo_payloads", blocking=True,
                      description="Every commerce event of an idle session is in the outbox or skipped with a "
                                  "reason, and never both."),
    dg.AssetCheckSpec("payloads_complete", asset="klaviyo_payloads", blocking=True,
                      description="Every outbox payload carries its metric's key properties, and a numeric value "
                                  "where money is involved."),
]


@dg.asset(
    deps=["resolved_events"],
    pool=WAREHOUSE_POOL,
    group_name="klaviyo",
    kinds={"duckdb"},
    check_specs=mapping_checks,
    description="Klaviyo events to send (table klaviyo_outbox) and the commerce events not sent, with the reason "
                "(klaviyo_skipped).",
)
def klaviyo_payloads(upstack: UpstackResource):
    settings = upstack.settings()
    now = datetime.now(timezone.utc)
    run = map_events(settings, now=now)
    state = overview(settings, now=now)
    yield dg.MaterializeResult(metadata=payload_metadata(run.outbox_rows, run.skipped, state))
    yield dg.AssetCheckResult(
        check_name="every_commerce_event_decided",
        passed=state.undecided_idle_events == 0 and state.decided_twice == 0,
        metadata={"undecided_idle_events": state.undecided_idle_events, "decided_twice": state.decided_twice,
                  "held_back_active_sessions": state.held_back},
    )
    yield dg.AssetCheckResult(
        check_name="payloads_complete",
        passed=state.rows_missing_key_properties == 0 and state.money_rows_without_numeric_value == 0,
        metadata={"rows_missing_key_properties": state.rows_missing_key_properties,
                  "money_rows_without_numeric_value": state.money_rows_without_numeric_value},
    )


def payload_metadata(outbox_rows: int, skipped: int, state: MappingOverview) -> dict:
    per_metric = ", ".join(f"{metric} {count:,}" for metric, count in state.outbox_by_metric.items()) or "none"
    per_reason = ", ".join(f"{reason} {count:,}" for reason, count in state.skipped_by_reason.items()) or "none"
    return {
        "summary": dg.MetadataValue.text(
            f"{outbox_rows:,} Klaviyo events queued, {skipped:,} commerce events skipped this run; "
            f"{state.held_back:,} wait for their session to go idle. Outbox: {per_metric}. Skipped: {per_reason}"),
        "dagster/row_count": sum(state.outbox_by_metric.values()),
        "outbox_rows_this_run": outbox_rows,
        "skipped_this_run": skipped,
        "outbox_by_metric": dg.MetadataValue.json(state.outbox_by_metric),
        "skipped_by_reason": dg.MetadataValue.json(state.skipped_by_reason),
        "held_back": state.held_back,
        "raw_events_by_name": dg.MetadataValue.json(state.raw_events_by_name),
    }
