"""Identity resolution: who is behind each commerce event (identity_links -> identities -> resolved_events)."""

import dagster as dg

from dagster_project.metadata import markdown_table, percent, plural
from dagster_project.resources import WAREHOUSE_POOL, UpstackResource
from upstack_pipeline.identity import IdentityOverview, overview, resolve_identities

identity_checks = [
    dg.AssetCheckSpec("shared_device_guard_respected", asset="resolved_events", blocking=True,
                      description="No event is named from the history of a browser that has shown more emails "
                                  "than max_emails_per_browser."),
    dg.AssetCheckSpec("one_email_per_identity", asset="resolved_events", blocking=True,
                      description="No upstack_id carries two emails: a person never absorbs another's email."),
]


@dg.multi_asset(
    specs=[
        dg.AssetSpec("identity_links", deps=["raw_events", "customers"], group_name="identity", kinds={"duckdb"},
                     description="Edges between identifiers seen together (cookie, session, email, phone, "
                                 "customer id, _kx, ad click ids), with first/last seen and counts."),
        dg.AssetSpec("identities", deps=["identity_links"], group_name="identity", kinds={"duckdb"},
                     description="People, one per email (or per Klaviyo _kx never tied to one), with a stable "
                                 "upstack_id."),
        dg.AssetSpec("resolved_events", deps=["identities"], group_name="identity", kinds={"duckdb"},
                     description="Every commerce event with the person behind it, how we know (match_method) and "
                                 "whether Klaviyo knew natively."),
    ],
    check_specs=identity_checks,
    pool=WAREHOUSE_POOL,
)
def identity_resolution(upstack: UpstackResource):
    """One transaction builds all three tables, so they never disagree with each other."""
    settings = upstack.settings()
    run = resolve_identities(settings, now=upstack.now())
    state = overview(settings)
    yield dg.MaterializeResult(asset_key="identity_links", metadata={
        "summary": dg.MetadataValue.text(
            f"{plural(run.new_observations, 'identifier')} observed this run; "
            f"{plural(run.rejected_values, 'value')} rejected "
            "(placeholders, blocked or malformed)"),
        "new_observations": run.new_observations,
        "rejected_values_this_run": run.rejected_values,
        "most_rejected_values": dg.MetadataValue.md(markdown_table(state.rejected_values)),
    })
    flags = ", ".join(f"{flag} {count:,}" for flag, count in state.flags_by_kind.items()) or "none"
    yield dg.MaterializeResult(asset_key="identities", metadata={
        "summary": dg.MetadataValue.text(f"{plural(state.identities, 'person', 'people')}; guard flags: {flags}"),
        "dagster/row_count": state.identities,
        "flags": dg.MetadataValue.json(state.flags_by_kind),
        "largest_shared_browsers": dg.MetadataValue.md(markdown_table(state.largest_shared_browsers)),
    })
    yield dg.MaterializeResult(asset_key="resolved_events", metadata=resolved_events_metadata(run.events_resolved, state))
    yield dg.AssetCheckResult(
        asset_key="resolved_events", check_name="shared_device_guard_respected",
        passed=state.history_attributions_over_guard == 0,
        metadata={"events_over_guard": state.history_attributions_over_guard},
    )
    yield dg.AssetCheckResult(
        asset_key="resolved_events", check_name="one_email_per_identity",
        passed=state.identities_with_several_emails == 0,
        metadata={"identities_with_several_emails": state.identities_with_several_emails},
    )


def resolved_events_metadata(events_resolved_this_run: int, state: IdentityOverview) -> dict:
    share = state.resolved_events / state.commerce_events if state.commerce_events else 0.0
    return {
        "summary": dg.MetadataValue.text(
            f"{state.resolved_events:,} of {plural(state.commerce_events, 'commerce event')} resolved ({share:.1%}); "
            f"{state.extra_cart_sessions:,} cart sessions Klaviyo could not identify natively, "
            f"{state.native_cart_sessions:,} it could (lift {state.lift:.1%})"
        ),
        "dagster/row_count": state.commerce_events,
        "events_resolved_this_run": events_resolved_this_run,
        "resolved_pct": percent(share),
        "resolved_by_match_method": dg.MetadataValue.json(state.by_match_method),
        "unresolved_by_reason": dg.MetadataValue.json(state.unresolved_by_reason),
        "native_cart_sessions": state.native_cart_sessions,
        "extra_cart_sessions": state.extra_cart_sessions,
        "lift_pct": percent(state.lift),
    }
