"""The production instance, deploy/dagster.yaml, on a real PostgreSQL: `upstack sync` records everything there."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from conftest import make_event, write_events
from postgres import PostgresDatabase, postgres_database, postgres_server  # noqa: F401  (pytest fixtures)
from upstack_pipeline.settings import Settings

pytestmark = pytest.mark.slow  # a real PostgreSQL server and `upstack sync` processes

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def run(*command: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), env=env, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT)


def upstack_sync(env: dict[str, str]) -> subprocess.CompletedProcess:
    completed = run(sys.executable, "-m", "dagster_project.cli", "sync", env=env)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


@pytest.fixture
def env(settings: Settings, tmp_path: Path, postgres_database: PostgresDatabase, monkeypatch) -> dict[str, str]:
    """A landing folder of three events, and a DAGSTER_HOME holding only deploy/dagster.yaml, on the test database.

    The DAGSTER_PG_* variables are set in this process too, for the tests' own `DagsterInstance.from_config`.
    """
    for key, value in postgres_database.dagster_env().items():
        monkeypatch.setenv(key, value)
    write_events(settings.events_dir / "a.ndjson", [make_event(f"e{n}") for n in range(3)])
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "deploy" / "dagster.yaml", home)
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("UPSTACK_", "KLAVIYO_", "DAGSTER_"))}
    environment.update(UPSTACK_LANDING_DIR=str(settings.landing_dir), UPSTACK_WAREHOUSE=str(settings.warehouse_path),
                       DAGSTER_HOME=str(home), **postgres_database.dagster_env())
    return environment


def sql(database: PostgresDatabase, statement: str) -> list[tuple]:
    with database.connect() as connection, connection.cursor() as cursor:
        cursor.execute(statement)
        rows = cursor.fetchall()
    connection.close()
    return rows


def rows_ingested(instance: dg.DagsterInstance, run_id: str) -> int:
    [materialization] = [event.asset_materialization for event in
                         instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
                         if event.asset_materialization.asset_key == dg.AssetKey("raw_events")]
    return materialization.metadata["rows_ingested"].value


def test_sync_records_its_run_materializations_and_checks_in_postgres(env, postgres_database):
    completed = upstack_sync(env)

    home = env["DAGSTER_HOME"]
    assert home in completed.stdout
    passed, evaluated = map(int, re.search(r"checks +(\d+) of (\d+) passed", completed.stdout).groups())
    with dg.DagsterInstance.from_config(home) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        [run_record] = instance.get_runs()
        assert (run_record.job_name, run_record.status) == ("upstack_sync", dg.DagsterRunStatus.SUCCESS)
        latest = instance.get_latest_materialization_event(dg.AssetKey("raw_events"))
        assert latest.run_id == run_record.run_id
        assert latest.asset_materialization.metadata["rows_ingested"].value == 3
        checks = [event.dagster_event.event_specific_data for event in
                  instance.all_logs(run_record.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)]
        # The evaluations the command printed are the ones stored (no Klaviyo key here: destination_healthy warns).
        assert (sum(check.passed for check in checks), len(checks)) == (passed, evaluated) and evaluated > 0
        # The run is the default shop's: its partition, and the tag the run queue allows once per shop.
        assert (run_record.tags["dagster/partition"], run_record.tags["upstack/shop"]) == ("default", "default")
        assert instance.get_dynamic_partitions("shops") == ["default"]

    # Straight from the database: nothing above came from anywhere else.
    assert sql(postgres_database, "select count(*), min(status) from runs") == [(1, "SUCCESS")]
    [(materialized_assets,)] = sql(postgres_database, "select count(distinct asset_key) from event_logs "
                                                      "where dagster_event_type = 'ASSET_MATERIALIZATION'")
    assert materialized_assets >= 3
    assert sql(postgres_database, "select count(*) from asset_check_executions") == [(evaluated,)]
    assert not (Path(home) / "history").exists()  # no SQLite run history beside dagster.yaml


def test_a_second_sync_is_recorded_too_and_ingests_nothing_new(env, postgres_database):
    upstack_sync(env)
    upstack_sync(env)

    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        second, first = instance.get_runs()  # newest first
        assert [second.status, first.status] == [dg.DagsterRunStatus.SUCCESS] * 2
        assert [rows_ingested(instance, first.run_id), rows_ingested(instance, second.run_id)] == [3, 0]
    assert sql(postgres_database, "select count(*) from runs where status = 'SUCCESS'") == [(2,)]


def test_dagster_instance_migrate_and_info_work_on_the_postgres_instance(env, postgres_database):
    upstack_sync(env)
    dagster = (sys.executable, "-m", "dagster", "instance")

    migrated = run(*dagster, "migrate", env=env)
    info = run(*dagster, "info", env=env)

    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert info.returncode == 0, info.stdout + info.stderr
    for storage in ("PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"):
        assert storage in info.stdout
    assert postgres_database.password not in info.stdout + migrated.stdout + migrated.stderr
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        assert [run_record.status for run_record in instance.get_runs()] == [dg.DagsterRunStatus.SUCCESS]
        # The rest of deploy/dagster.yaml, as the daemon will read it.
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config.max_concurrent_runs == 4
        assert {limit["key"] for limit in concurrency.run_queue_config.tag_concurrency_limits} == {
            "upstack/shop", "upstack/klaviyo-account"}
        assert (instance.run_retries_enabled, instance.run_retries_max_retries) == (True, 2)
        assert instance.run_monitoring_enabled
