"""The Dagster layer: definitions, the sync job with its checks, the landing sensor, the schedule, the pool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest

from conftest import klaviyo_click, make_event, materialization, query, write_events, write_lines
from dagster_project.definitions import SYNC_JOB_NAME, load_definitions, run_sync
from dagster_project.defs.sync import hourly_sync, landing_files_sensor
from dagster_project.resources import pipeline_resources
from dagster_project.shops import ACCOUNT_TAG, SHOP_PARTITIONS, SHOP_TAG
from upstack_pipeline.landing import ArrivalCursor, arrivals
from upstack_pipeline.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_definitions_load():
    definitions = load_definitions()
    dg.Definitions.validate_loadable(definitions)
    assert {key.to_user_string() for key in definitions.resolve_all_asset_keys()} >= {"raw_events", "customers"}


@pytest.mark.slow  # runs `dg check defs` and `dagster definitions validate` as processes
@pytest.mark.parametrize("command", [
    ["dagster", "definitions", "validate", "-w", "workspace.yaml"],
    ["dg", "check", "defs"],
])
def test_both_entry_points_validate_the_same_code_location(command, tmp_path):
    completed = subprocess.run(
        [str(BIN / command[0]), *command[1:]], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=180,
        env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "DAGSTER_HOME": str(tmp_path),
             "VIRTUAL_ENV": str(BIN.parent)},
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


@pytest.mark.slow  # whole Dagster syncs
def test_sync_materializes_both_tables_with_operator_metadata_and_passing_checks(settings, sync):
    write_events(settings.events_dir / "dt=2026-11-28" / "a.ndjson.gz", [make_event("e1"), make_event("e2")])
    write_lines(settings.events_dir / "dt=2026-11-28" / "b.ndjson", ['{"event_id": "e1"', '"just a string"'])
    (settings.customers_dir / "customers.csv").write_text("customer_id,email\n1,jane@gmail.com\n")

    result = sync()

    events = materialization(result, "raw_events")
    assert events["dagster/row_count"] == 2
    assert (events["files_read"], events["rows_ingested"], events["rows_quarantined"]) == (2, 2, 2)
    assert events["quarantined_by_reason"] == {"not_json": 1, "not_an_object": 1}
    assert "e2" in events["preview"] and "not_json" in events["quarantine_preview"]
    assert materialization(result, "customers")["dagster/row_count"] == 1
    checks = {check.check_name: check.passed for check in result.get_asset_check_evaluations()}
    assert checks == {**dict.fromkeys({"landing_files_unchanged", "landing_files_readable", "event_ids_unique",
                                       "shared_device_guard_respected",
                                       "every_commerce_event_decided", "payloads_complete", "no_stale_pending_rows",
                                       "dead_letter_share", "delivery_success_rate", "pixel_events_arriving",
                                       "lift_steady"}, True),
                      "destination_healthy": False}  # no KLAVIYO_API_KEY here: a warning, not an error
    assert "KLAVIYO_API_KEY is not set" in materialization(result, "klaviyo_deliveries")["summary"]
    # Shares are percentages with two decimals (readable, and still numbers the Plots tab draws); counts are ints.
    resolved, lift = materialization(result, "resolved_events"), materialization(result, "daily_lift")
    assert {key for metadata in (resolved, lift) for key in metadata if key.endswith(("share", "lift"))} == set()
    for value in (lift["lift_pct"], lift["lift_pct_7d"], resolved["resolved_pct"]):
        assert isinstance(value, float) and value == round(value, 2) and value <= 100
    assert resolved["resolved_pct"] == 100.0  # both events name jane@gmail.com
    assert "lift_pct" not in resolved  # one lift, daily_lift's
    assert all(isinstance(events[key], int) for key in ("files_read", "rows_ingested", "rows_quarantined"))

    rerun = materialization(sync(), "raw_events")
    assert (rerun["files_read"], rerun["rows_ingested"], rerun["dagster/row_count"]) == (0, 0, 2)


@pytest.mark.slow  # whole Dagster syncs
def test_landing_checks_warn_about_changed_and_unreadable_files(settings, sync):
    path = write_events(settings.events_dir / "a.ndjson", [make_event("e1")])
    sync()
    write_events(path, [make_event("e1"), make_event("e2")])
    (settings.events_dir / "b.parquet").write_bytes(b"not parquet")

    result = sync()

    failed = {check.check_name: check.severity for check in result.get_asset_check_evaluations() if not check.passed}
    assert failed == {"landing_files_unchanged": dg.AssetCheckSeverity.WARN,
                      "landing_files_readable": dg.AssetCheckSeverity.WARN,
                      "destination_healthy": dg.AssetCheckSeverity.WARN}  # no KLAVIYO_API_KEY in tests
    assert query(settings, "select count(*) from raw_events") == [(1,)]


def test_landing_sensor_requests_one_run_per_batch_of_new_files_and_none_for_old_ones(settings):
    resources = pipeline_resources(settings, api_key=None)
    with dg.instance_for_test() as instance:
        def tick(cursor):
            with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
                return landing_files_sensor(context)

        assert tick(None).skip_reason is not None

        write_events(settings.events_dir / "h14.ndjson.gz", [make_event("e1")])
        (settings.customers_dir / "customers.csv").write_text("customer_id\n1\n")
        first = tick(None)
        assert len(first.run_requests) == 1  # targets the sensor's job, upstack_sync
        assert first.run_requests[0].tags["upstack/new_files"] == "2"

        assert tick(first.cursor).skip_reason.skip_message.startswith("No new files")

        write_events(settings.events_dir / "h15.ndjson.gz", [make_event("e2")])
        write_events(settings.events_dir / ".h16.ndjson.gz", [make_event("e3")])  # still being written
        second = tick(first.cursor)
        assert len(second.run_requests) == 1
        assert second.run_requests[0].tags["upstack/new_files"] == "1"
        assert second.run_requests[0].run_key != first.run_requests[0].run_key


def test_the_sensor_cursor_is_a_high_water_mark_with_recent_arrivals_not_every_file_ever_seen(settings):
    for hour in range(30):
        write_events(settings.events_dir / f"h{hour:02d}.ndjson", [make_event(f"e{hour}")])
    arrived, cursor = arrivals(settings.landing_dir, ArrivalCursor.parse(None))
    assert len(arrived) == 30 and len(cursor.recent) == 30  # all arrived within the grace period

    # Once they are older than the grace period (none here, to see it), the cursor forgets them.
    arrived, cursor = arrivals(settings.landing_dir, cursor, grace=timedelta(0))
    assert arrived == {} and cursor.recent == {}
    write_events(settings.events_dir / "h30.ndjson", [make_event("e30")])
    write_events(settings.events_dir / "h00.ndjson", [make_event("e0"), make_event("e0b")])  # rewritten
    arrived, cursor = arrivals(settings.landing_dir, ArrivalCursor.parse(cursor.dumps()), grace=timedelta(0))
    assert sorted(arrived) == ["events/h00.ndjson", "events/h30.ndjson"]
    assert len(cursor.dumps()) < 200

    # A cursor kept by an older release (every path) starts afresh: one extra run, nothing missed.
    legacy = json.dumps({f"events/h{hour:02d}.ndjson": "1:1" for hour in range(31)})
    assert len(arrivals(settings.landing_dir, ArrivalCursor.parse(legacy))[0]) == 31


def test_a_missing_landing_folder_is_the_sensors_skip_reason_with_the_variable_to_fix(tmp_path):
    settings = Settings(landing_dir=tmp_path / "nowhere", warehouse_path=tmp_path / "warehouse.duckdb")
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance,
                                     resources=pipeline_resources(settings, api_key=None)) as context:
            result = landing_files_sensor(context)
    assert not result.run_requests
    skipped = result.skip_reason
    assert "the landing folder does not exist" in skipped.skip_message and "UPSTACK_LANDING_DIR" in skipped.skip_message


def test_sensor_and_schedule_start_running_and_target_the_sync_job():
    definitions = load_definitions()
    assert definitions.resolve_sensor_def("landing_files_sensor").default_status == dg.DefaultSensorStatus.RUNNING
    schedule = definitions.resolve_schedule_def("hourly_sync")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert (schedule.cron_schedule, schedule.job_name) == ("0 * * * *", SYNC_JOB_NAME)
    assert hourly_sync.job_name == landing_files_sensor.job_name == SYNC_JOB_NAME


def test_one_run_per_shop_and_per_klaviyo_account_at_a_time_and_shops_side_by_side(tmp_path):
    import yaml

    job = load_definitions().resolve_job_def(SYNC_JOB_NAME)
    assert {node.definition.pool for node in job.graph.nodes} == {None}  # no global one-writer pool any more
    assert job.partitions_def == SHOP_PARTITIONS

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        queue = instance.get_concurrency_config().run_queue_config
    limits = {limit["key"]: limit for limit in queue.tag_concurrency_limits}
    for tag in (SHOP_TAG, ACCOUNT_TAG):
        assert limits[tag] == {"key": tag, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
    assert queue.max_concurrent_runs >= 2
    # The production instance (PostgreSQL, its variables unset here) limits runs the same way.
    deployed = yaml.safe_load((PROJECT_ROOT / "deploy" / "dagster.yaml").read_text())["concurrency"]["runs"]
    assert deployed["tag_concurrency_limits"] == queue.tag_concurrency_limits


@pytest.mark.slow  # whole Dagster syncs
def test_a_broken_payload_fails_the_blocking_mapping_check_and_the_run(settings, sync):
    import duckdb

    write_events(settings.events_dir / "a.ndjson", [klaviyo_click()])
    sync()
    assert query(settings, "select count(*) from klaviyo_outbox") == [(1,)]
    with duckdb.connect(str(settings.warehouse_path)) as connection:  # a mapping bug: the product id is lost
        connection.execute("update klaviyo_outbox set event = json_merge_patch(event, "
                           "'{\"properties\": {\"ProductID\": null}}')")

    result = run_sync(settings, dg.DagsterInstance.ephemeral())

    assert not result.success
    failed = {check.check_name for check in result.get_asset_check_evaluations() if not check.passed}
    assert failed == {"payloads_complete"}


def test_summaries_say_one_of_a_thing_in_the_singular():
    import polars as pl

    from dagster_project.defs.identity import resolved_events_metadata
    from dagster_project.defs.klaviyo import delivery_metadata, payload_metadata
    from dagster_project.metadata import ingestion_summary
    from upstack_pipeline.analytics import LiftTotals
    from upstack_pipeline.identity import IdentityOverview
    from upstack_pipeline.ingestion import IngestReport, TableOverview
    from upstack_pipeline.klaviyo.delivery import DeliveryRun
    from upstack_pipeline.klaviyo.mapping import MappingOverview, MappingRun

    one_each = [
        ingestion_summary(IngestReport("events", files_read=1, ingested_rows=1, duplicate_rows=1,
                                       changed_files=["a"], ignored_files=["b"]),
                          TableOverview(1, 0, {}, pl.DataFrame(), pl.DataFrame())),
        delivery_metadata(DeliveryRun(configured=True, delivered=1, requests=1, delivered_backfill=1))["summary"],
        payload_metadata(MappingRun(1, 1, 1, 0), MappingOverview({"Viewed Product from Upstack": 1}, {"unresolved": 1},
                                                                 1, {}, 0, 0, 0, 0, {}))["summary"],
        resolved_events_metadata(1, IdentityOverview(1, 1, {}, {}, 1, pl.DataFrame(), {}, pl.DataFrame(),
                                                     0))["summary"],
        LiftTotals("Added to Cart", 1, 1, 1, 1, 0, 1.0, 1, 1.0).sentence(),
    ]
    text = " | ".join(str(getattr(summary, "value", summary)) for summary in one_each)
    assert "1 new row from 1 file " in text and "1 pixel retry skipped" in text
    assert "1 event delivered in 1 request" in text
    assert "1 Klaviyo event queued, 1 commerce event skipped" in text and "1 of 1 commerce event resolved" in text
    assert "1 abandoned Added to Cart session only" in text
    assert not re.search(r"\b1 (\w+ )?(rows|files|retries|events|requests|sessions)\b", text), text
