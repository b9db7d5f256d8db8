"""What analysts and marketers read, kept by the pipeline after every sync: the views, the lift, the analysts' copy,
and the alert checks (README "Lift", "Views" and "Alerts")."""

import dagster as dg

from dagster_project.metadata import percent, view_metadata, view_specs
from dagster_project.resources import UpstackResource
from upstack_pipeline.analytics import AnalyticsOverview, refresh
from upstack_pipeline.settings import AlertSettings

# The tables each view reads (recovered_orders also feeds daily_lift; the *_sessions views are summed by the view
# they are named after).
ANALYTICS_VIEWS = {
    "recovered_orders": ["raw_events", "resolved_events", "commerce_metrics"],
    "daily_lift_sessions": ["resolved_events", "raw_events", "klaviyo_outbox", "commerce_metrics"],
    "daily_lift": ["daily_lift_sessions", "recovered_orders", "commerce_metrics"],
    "delivery_funnel_sessions": ["raw_events", "klaviyo_skipped", "klaviyo_outbox", "commerce_metrics",
                                 "klaviyo_deliveries", "klaviyo_dead_letters"],
    "delivery_funnel": ["delivery_funnel_sessions", "quarantined_events", "commerce_metrics"],
    "match_rates_sessions": ["resolved_events"],
    "match_rates": ["match_rates_sessions"],
    "shopper_journey": ["raw_events", "resolved_events", "klaviyo_outbox", "klaviyo_skipped",
                        "klaviyo_deliveries", "klaviyo_dead_letters"],
}

alert_checks = [
    dg.AssetCheckSpec("delivery_success_rate", asset="delivery_funnel",
                      description="Of the events Klaviyo answered for in the last day, at least "
                                  "alerts.min_delivery_success were accepted."),
    dg.AssetCheckSpec("pixel_events_arriving", asset="delivery_funnel",
                      description="The storefront sent events within the last alerts.max_quiet_time_hours."),
    dg.AssetCheckSpec("lift_steady", asset="daily_lift",
                      description="Yesterday's lift is not below the trailing week's by more than "
                                  "alerts.max_lift_drop of it."),
]


@dg.multi_asset(
    specs=view_specs(ANALYTICS_VIEWS, group="analytics"),
    check_specs=alert_checks,
    description="Recreates the analysts' views, measures the lift, and publishes the views' rows to the analysts' "
                "copy of the warehouse (<warehouse>.analytics.duckdb), which never blocks a sync.",
)
def analytics(upstack: UpstackResource):
    settings = upstack.settings()
    state = refresh(settings, now=upstack.now())
    views = view_metadata(settings.warehouse(), ANALYTICS_VIEWS, state.rows)
    specific = {
        "daily_lift": lift_metadata(state),
        "match_rates": {
            "klaviyo_match_rate_pct_7d": percent(state.match_rate(state.klaviyo_identified_visitors_last_7_days)),
            "combined_match_rate_pct_7d": percent(state.match_rate(state.identified_visitors_last_7_days)),
            "visitors_7d": state.visitors_last_7_days,
        },
        "delivery_funnel": {
            "delivered_last_day": state.delivered_last_day, "refused_last_day": state.refused_last_day,
            "oldest_pending_minutes": dg.MetadataValue.float(round(state.oldest_pending_minutes, 1)),
            "analysts_copy": dg.MetadataValue.path(str(state.published)),
        },
        "recovered_orders": {"recovered_orders": state.lift.recovered_orders,
                             "recovered_revenue": dg.MetadataValue.float(round(state.lift.recovered_revenue, 2))},
    }
    for view, metadata in views.items():
        yield dg.MaterializeResult(asset_key=view, metadata={**metadata, **specific.get(view, {})})
    yield from alert_results(state, settings.alerts)


def lift_metadata(state: AnalyticsOverview) -> dict:
    lift = state.lift
    return {
        "summary": dg.MetadataValue.text(
            f"{lift.sentence()}; last 7 days {state.lift_last_7_days.lift:.1%}; "
            f"{lift.recovered_orders:,} orders ({lift.recovered_revenue:,.2f}) recovered through the backup flows"),
        "lift_pct": percent(lift.lift),
        "lift_pct_7d": percent(state.lift_last_7_days.lift),
        "upstack_delivered_sessions": lift.upstack_delivered_sessions,
        "klaviyo_native_sessions": lift.klaviyo_native_sessions,
        "cart_value_reached": dg.MetadataValue.float(round(lift.cart_value_reached, 2)),
        "recovered_revenue": dg.MetadataValue.float(round(lift.recovered_revenue, 2)),
    }


def alert_results(state: AnalyticsOverview, alerts: AlertSettings):
    success = state.delivery_success
    low = success is not None and success < alerts.min_delivery_success
    yield dg.AssetCheckResult(
        asset_key="delivery_funnel", check_name="delivery_success_rate", passed=not low,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"delivery_success_pct": percent(success or 0.0), "refused_last_day": state.refused_last_day},
        description=f"Klaviyo refused {state.refused_last_day:,} of "
                    f"{state.refused_last_day + state.delivered_last_day:,}"
                    " events in the last day: its reasons are in table klaviyo_dead_letters (detail), by metric in "
                    "view delivery_funnel." if low else None,
    )
    quiet_hours = alerts.max_quiet_time.total_seconds() / 3600
    yield dg.AssetCheckResult(
        asset_key="delivery_funnel", check_name="pixel_events_arriving",
        passed=state.pixel_events_in_quiet_window > 0, severity=dg.AssetCheckSeverity.WARN,
        metadata={"events_in_window": state.pixel_events_in_quiet_window},
        description=None if state.pixel_events_in_quiet_window else
        f"No storefront event in the last {quiet_hours:g} hours: check that the pixel still writes to the landing "
        "folder (UPSTACK_LANDING_DIR), the table ingested_files for the latest file, and quarantined_events.",
    )
    before, after = state.lift_trailing_week, state.lift_yesterday
    expected = before.lift * after.klaviyo_native_sessions
    judged = expected >= alerts.min_expected_sessions_to_judge_lift
    dropped = judged and after.lift < (1 - alerts.max_lift_drop) * before.lift
    yield dg.AssetCheckResult(
        asset_key="daily_lift", check_name="lift_steady", passed=not dropped, severity=dg.AssetCheckSeverity.WARN,
        metadata={"lift_pct_yesterday": percent(after.lift), "lift_pct_trailing_week": percent(before.lift),
                  "expected_sessions_yesterday": dg.MetadataValue.float(round(expected, 1)), "judged": judged},
        description=f"Yesterday's lift {after.lift:.1%} is down from {before.lift:.1%} over the week before: see "
                    "view match_rates (did a match method stop?) and delivery_funnel (skipped, refused)."
        if dropped else None,
    )
