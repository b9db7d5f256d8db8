"""The resources carry the whole configuration of a run, shown in the UI as run config, and never the key."""

import dataclasses
import json
import subprocess
import sys
from datetime import timedelta

import dagster as dg
import pytest

from conftest import query
from dagster_project.definitions import load_definitions
from dagster_project.resources import (
    AlertsResource,
    IdentityResource,
    KlaviyoResource,
    MappingResource,
    UpstackResource,
    WarehouseResource,
    pipeline_resources,
    resource_config,
    run_config_for,
)
from upstack_pipeline.settings import AlertSettings, DestinationSettings, IdentitySettings, Settings

KEY = "pk_resource_test_key_00000000"


def unusual_settings(tmp_path) -> Settings:
    """Every setting off its default, so a field the resources drop or mistranslate shows."""
    return Settings(
        landing_dir=tmp_path / "landing", warehouse_path=tmp_path / "w.duckdb",
        warehouse_lock_wait=timedelta(seconds=42), duckdb_memory_limit="512MB",
        duckdb_temp_directory=tmp_path / "spill", klaviyo_base_url="http://127.0.0.1:9", klaviyo_api_key=KEY,
        klaviyo_revision="2026-07-15", klaviyo_requests_per_second=3, klaviyo_requests_per_minute=40,
        max_clock_skew=timedelta(hours=5), ingest_batch_bytes=1234,
        identity=IdentitySettings(
            max_emails_per_browser=5, max_browsers_per_cluster=6, click_handoff_window=timedelta(minutes=7),
            cookie_lifetime=timedelta(days=8), max_browsers_per_identifier=9, supernode_window=timedelta(days=10),
            blocked_emails=("x@y.com",), probabilistic_matching=True, probabilistic_window=timedelta(minutes=11)),
        destination=DestinationSettings(
            send_mode="all", metric_name_template="{metric} via Bob's", enabled_events=("AddToCart",),
            create_profiles=False, update_profiles=False, list_id="L1", respect_consent=False,
            max_event_age=timedelta(hours=12), hold_back=timedelta(minutes=13), max_pending_age=timedelta(minutes=14),
            max_dead_letter_share=0.5),
        alerts=AlertSettings(min_delivery_success=0.25, max_quiet_time=timedelta(hours=3), max_lift_drop=0.75,
                             min_expected_sessions_to_judge_lift=9),
    )


def changed_fields(settings) -> set[str]:
    defaults = type(settings)()
    return {field.name for field in dataclasses.fields(settings)
            if getattr(settings, field.name) != getattr(defaults, field.name)}


def test_every_setting_has_a_config_field_and_survives_the_round_trip(tmp_path):
    settings = unusual_settings(tmp_path)
    # The fixture really moves every field of the stages' settings, so the round trip below checks each one.
    assert changed_fields(settings.identity) == {field.name for field in dataclasses.fields(IdentitySettings)}
    assert changed_fields(settings.destination) == {field.name for field in dataclasses.fields(DestinationSettings)}
    assert changed_fields(settings.alerts) == {field.name for field in dataclasses.fields(AlertSettings)}

    config = resource_config(settings)
    upstack = UpstackResource(
        warehouse=WarehouseResource(**config["warehouse"]),
        klaviyo=KlaviyoResource(api_key=KEY, **config["klaviyo"]),
        identity=IdentityResource(**config["identity"]),
        mapping=MappingResource(**config["mapping"]),
        alerts=AlertsResource(**config["alerts"]),
        **config["upstack"],
    )

    assert upstack.settings() == settings
    assert KEY not in json.dumps(config)


def test_a_run_uses_and_shows_its_settings_and_never_the_key(tmp_path):
    settings = dataclasses.replace(unusual_settings(tmp_path), klaviyo_api_key=KEY)
    seen = {}

    @dg.asset
    def probe(upstack: UpstackResource):
        seen["settings"] = upstack.settings()

    definitions = dg.Definitions(assets=[probe], resources=pipeline_resources(settings, api_key=KEY))
    with dg.instance_for_test() as instance:
        result = dg.materialize([probe], instance=instance, resources=definitions.resources,
                                run_config=run_config_for(settings))
        run = instance.get_run_by_id(result.run_id)
        records = instance.all_logs(result.run_id)

    assert seen["settings"] == settings
    shown = run.run_config["resources"]
    assert shown["klaviyo"]["config"]["base_url"] == "http://127.0.0.1:9"
    assert shown["mapping"]["config"]["send_mode"] == "all"
    assert "api_key" not in shown["klaviyo"]["config"]
    assert KEY not in json.dumps(run.run_config) + json.dumps(run.tags) + "".join(str(r) for r in records)


def test_schedule_and_sensor_runs_carry_the_settings_as_run_config(settings):
    settings = dataclasses.replace(settings, klaviyo_api_key=KEY,
                                   destination=DestinationSettings(send_mode="all"))
    (settings.events_dir / "a.ndjson").write_text("{}\n")
    definitions = load_definitions(pipeline_resources(settings, api_key=KEY))
    with dg.instance_for_test() as instance:
        with dg.build_schedule_context(instance=instance, resources=definitions.resources,
                                       repository_def=definitions.get_repository_def()) as context:
            scheduled = definitions.resolve_schedule_def("hourly_sync").evaluate_tick(context).run_requests
        with dg.build_sensor_context(instance=instance, resources=definitions.resources) as context:
            sensed = definitions.resolve_sensor_def("landing_files_sensor")(context).run_requests

    for request in (*scheduled, *sensed):
        assert request.partition_key == "default"
        assert request.run_config["resources"] == run_config_for(settings)["resources"]
        assert KEY not in json.dumps(request.run_config) + json.dumps(request.tags)


def test_the_ui_shows_the_keys_variable_not_its_value(monkeypatch, tmp_path):
    monkeypatch.setenv("KLAVIYO_API_KEY", KEY)
    monkeypatch.setenv("UPSTACK_SEND_MODE", "all")
    resources = load_definitions().resources

    assert resources["klaviyo"].data["api_key"] is None  # read in each run, from the variable the config names
    assert resources["klaviyo"].data["api_key_env"] == "KLAVIYO_API_KEY"
    assert resources["mapping"].data["send_mode"] == "all"


def test_without_a_key_the_klaviyo_resource_holds_none_and_delivery_waits(monkeypatch):
    monkeypatch.delenv("KLAVIYO_API_KEY", raising=False)
    resources = load_definitions().resources
    assert resources["klaviyo"].data["api_key"] is None and resources["klaviyo"].data["api_key_env"] == ""


@pytest.mark.parametrize("field, value, message", [
    ("send_mode", "sometimes", "must be 'backup' or 'all'"),
    ("metric_name_template", "Added", "must contain {metric}"),
])
def test_a_bad_setting_given_at_launch_fails_the_run_saying_what_is_wrong(settings, field, value, message):
    run_config = run_config_for(settings)
    run_config["resources"]["mapping"]["config"][field] = value

    @dg.asset
    def probe(upstack: UpstackResource):
        upstack.settings()

    result = dg.materialize([probe], resources=pipeline_resources(settings, api_key=None), run_config=run_config,
                            raise_on_error=False)

    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert message in str(failure.cause or failure)


def test_the_memory_limit_and_spill_folder_reach_duckdb_and_a_typo_is_refused_at_start_up(tmp_path):
    settings = Settings.from_env({"UPSTACK_WAREHOUSE": str(tmp_path / "w.duckdb"),
                                  "UPSTACK_DUCKDB_MEMORY_LIMIT": "256MB",
                                  "UPSTACK_DUCKDB_TEMP_DIR": str(tmp_path / "spill")})
    with settings.warehouse().connect() as connection:
        limit, spill = connection.execute(
            "select current_setting('memory_limit'), current_setting('temp_directory')").fetchall()[0]
    assert limit == "244.1 MiB" and spill == str(tmp_path / "spill")
    with pytest.raises(ValueError, match="UPSTACK_DUCKDB_MEMORY_LIMIT must be an amount of memory"):
        Settings.from_env({"UPSTACK_DUCKDB_MEMORY_LIMIT": "lots"})


def test_duckdb_keeps_the_blocks_it_frees_up_to_its_memory_limit_and_a_limit_too_big_for_that_still_opens(tmp_path):
    pools = {}
    for limit in ("256MB", "100TB"):  # 100 TB: more than 80% of any machine here, which is all the pool may reserve
        settings = Settings.from_env({"UPSTACK_WAREHOUSE": str(tmp_path / f"{limit}.duckdb"),
                                      "UPSTACK_DUCKDB_MEMORY_LIMIT": limit})
        with settings.warehouse().connect() as connection:
            pools[limit] = connection.execute("select current_setting('block_allocator_memory')").fetchone()[0]
            connection.execute("create table probe as select range as n from range(100000)")
            assert connection.execute("select sum(n) from probe").fetchone()[0] == 4999950000
    # The limit, 244.1 MiB as DuckDB shows it, in whole 256 KiB blocks.
    assert pools == {"256MB": "244.0 MiB", "100TB": "0 bytes"}


def test_a_run_holds_the_warehouse_open_so_its_steps_share_one_duckdb_instance_and_checkpoint_once(settings):
    wal = settings.warehouse_path.with_name(settings.warehouse_path.name + ".wal")
    seen = {}

    @dg.asset
    def first(upstack: UpstackResource):
        with upstack.settings().warehouse().connect() as connection:
            connection.execute("create table probe as select 42 as answer")

    @dg.asset(deps=[first])
    def second(upstack: UpstackResource):
        # first's close did not checkpoint: its table is still only in the write-ahead log, and this step's
        # connection, joining the same instance, reads it there.
        seen["wal_bytes"] = wal.stat().st_size if wal.exists() else 0
        with upstack.settings().warehouse().connect() as connection:
            seen["answer"] = connection.execute("select answer from probe").fetchone()[0]

    result = dg.materialize([first, second], resources=pipeline_resources(settings, api_key=None),
                            run_config=run_config_for(settings))

    assert result.success
    assert seen["answer"] == 42 and seen["wal_bytes"] > 0
    # The run's end closed the instance, which checkpointed: the table is in the file, the log is empty.
    assert not wal.exists() or wal.stat().st_size == 0
    assert query(settings, "select answer from probe") == [(42,)]


def test_a_run_that_finds_the_warehouse_locked_by_another_process_fails_at_its_start_saying_so(settings):
    settings = dataclasses.replace(settings, warehouse_lock_wait=timedelta(seconds=0.5))
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time\n"
                               "connection = duckdb.connect(sys.argv[1]); print('holding', flush=True); time.sleep(120)",
                               str(settings.warehouse_path)], stdout=subprocess.PIPE, text=True)
    ran = []

    @dg.asset
    def probe(upstack: UpstackResource):
        ran.append(True)

    try:
        assert holder.stdout.readline().strip() == "holding"
        result = dg.materialize([probe], resources=pipeline_resources(settings, api_key=None),
                                run_config=run_config_for(settings), raise_on_error=False)
    finally:
        holder.kill()
        holder.wait()

    # The hold waited its lock timeout once and failed the run: no step ran to wait the whole timeout again.
    assert not result.success and ran == []
    failures = [event for event in result.all_events if event.is_failure]
    assert any("stayed locked by another process" in str(event.event_specific_data.error) for event in failures)


def test_the_schedule_and_sensor_ticks_never_open_the_warehouse(tmp_path, monkeypatch):
    """Their ticks build the resource the runs hold the warehouse with; a tick during a run must not wait for it."""
    warehouse = tmp_path / "w.duckdb"
    (tmp_path / "landing" / "events").mkdir(parents=True)
    monkeypatch.setenv("UPSTACK_WAREHOUSE", str(warehouse))
    monkeypatch.setenv("UPSTACK_LANDING_DIR", str(tmp_path / "landing"))
    monkeypatch.delenv("UPSTACK_SHOPS_FILE", raising=False)
    definitions = load_definitions()

    with dg.instance_for_test() as instance:
        with dg.build_schedule_context(instance=instance, resources=definitions.resources,
                                       repository_def=definitions.get_repository_def()) as context:
            scheduled = definitions.resolve_schedule_def("hourly_sync").evaluate_tick(context).run_requests
        (tmp_path / "landing" / "events" / "a.ndjson").write_text("{}\n")
        with dg.build_sensor_context(instance=instance, resources=definitions.resources) as context:
            sensed = definitions.resolve_sensor_def("landing_files_sensor")(context).run_requests

    assert scheduled and sensed  # both ticks ran through, the resource built, and asked for a run
    assert not warehouse.exists()
