"""The deployment as it runs: `dagster-daemon` and `dagster-webserver` as real processes on deploy/dagster.yaml.

Each test starts a throwaway PostgreSQL database (tests/postgres.py), a Klaviyo emulator on 127.0.0.1, a landing
folder and a warehouse file, then the daemon (and the webserver where the test talks GraphQL) as subprocesses in
their own process groups with SIGINT restored (a background `dagster` that inherits an ignored SIGINT does not stop
on SIGTERM). Everything a test started is stopped in its teardown, even on failure: SIGTERM to each process group,
SIGKILL after a grace period, then SIGKILL to any process still carrying this test's DAGSTER_HOME (a run worker or
code server that outlived its parent).

The sensor ticks every 30 s; a daemon's first tick comes as soon as it has loaded the code location, so files are
landed before the daemon starts (they are still new to the sensor: its cursor is empty) and every wait is a poll
with a deadline.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import dagster as dg
import duckdb
import httpx
import pytest

from conftest import make_event, write_events
from postgres import PostgresDatabase, free_port, postgres_database, postgres_server  # noqa: F401  (fixtures)
from upstack_pipeline.sandbox.klaviyo_emulator import KlaviyoEmulator
from upstack_pipeline.settings import Settings

pytestmark = pytest.mark.slow  # real dagster-daemon and dagster-webserver processes on PostgreSQL

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEY = "pk_daemon_e2e_emulator_only_000"
SENSOR = "landing_files_sensor"
SENSOR_TAG = "dagster/sensor_name"
JOB = "upstack_sync"
LOCATION = "upstack_flows"
RUN_DEADLINE = 90  # seconds a run may take from landing a file (or starting a daemon) to SUCCESS
METRIC = "Viewed Product from Upstack"
# What DuckDB says when a second process wants a warehouse file another one holds.
DUCKDB_LOCK_ERROR = re.compile(r"Could not set lock|Conflicting lock", re.IGNORECASE)


def _restore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Service:
    """One long-running command in its own process group, its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(args, cwd=PROJECT_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_restore_sigint)

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)  # start_new_session: the group id is the leader's pid
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 20) -> None:
        """SIGTERM to the whole group (daemon, code server, run workers), SIGKILL if it is not gone in time."""
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # whatever of the group is left, leader exited or not
        self.process.wait(timeout=10)
        self._log.close()

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()

    @property
    def stopped(self) -> bool:
        return self._log.closed

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


@dataclass
class Stack:
    """The files, the services and the emulator of one test; `close()` stops everything it started."""

    settings: Settings
    home: Path
    env: dict[str, str]
    emulator: KlaviyoEmulator
    staging: Path
    log_dir: Path
    services: list[Service] = field(default_factory=list)
    webserver_url: str | None = None
    _instance: dg.DagsterInstance | None = None

    # ---- processes

    def start_daemon(self) -> Service:
        daemon = Service("daemon", [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], self.env,
                         self.log_dir)
        self.services.append(daemon)
        return daemon

    def start_webserver(self) -> Service:
        port = free_port()
        webserver = Service("webserver", [str(BIN / "dagster-webserver"), "-w", "workspace.yaml",
                                          "-h", "127.0.0.1", "-p", str(port)], self.env, self.log_dir)
        self.services.append(webserver)
        self.webserver_url = f"http://127.0.0.1:{port}"
        return webserver

    def logs(self) -> str:
        return "\n".join(f"----- {service.name} (exit {service.process.poll()})\n{service.output()[-6000:]}"
                         for service in self.services)

    def stop_services(self) -> None:
        for service in reversed(self.services):
            if not service.stopped:
                service.stop()

    def close(self) -> None:
        self.stop_services()
        if self._instance is not None:
            self._instance.dispose()
        kill_stragglers(self.home)
        self.emulator.stop()

    # ---- files

    def land(self, name: str, events: list[dict]) -> Path:
        """Writes beside the landing folder, then renames in: the sensor never sees half a file."""
        staged = write_events(self.staging / name, events)
        target = self.settings.events_dir / name
        os.replace(staged, target)
        return target

    def warehouse(self, sql: str) -> list[tuple]:
        with duckdb.connect(str(self.settings.warehouse_path), read_only=True) as connection:
            return connection.execute(sql).fetchall()

    # ---- Dagster

    @property
    def instance(self) -> dg.DagsterInstance:
        if self._instance is None:
            self._instance = dg.DagsterInstance.from_config(str(self.home))
        return self._instance

    def runs(self, **tags: str) -> list[dg.DagsterRun]:
        return list(self.instance.get_runs(filters=dg.RunsFilter(tags=tags) if tags else None))

    def sensor_runs(self) -> list[dg.DagsterRun]:
        return self.runs(**{SENSOR_TAG: SENSOR})

    def wait_for(self, what: str, predicate: Callable[[], object], timeout: float = RUN_DEADLINE,
                 interval: float = 0.25) -> object:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            for service in self.services:
                if not service.stopped and service.process.poll() is not None:
                    pytest.fail(f"{service.name} exited ({service.process.returncode}) while waiting for {what}\n"
                                f"{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.run_summary()}\n{self.logs()}")
            time.sleep(interval)

    def wait_for_runs(self, what: str, runs: Callable[[], list[dg.DagsterRun]], count: int,
                      timeout: float = RUN_DEADLINE) -> list[dg.DagsterRun]:
        """Waits until `runs()` has `count` finished runs; fails at once on a failed or canceled one."""

        def finished():
            current = runs()
            failed = [run for run in current if run.status in (dg.DagsterRunStatus.FAILURE,
                                                               dg.DagsterRunStatus.CANCELED)]
            if failed:
                pytest.fail(f"{what}: run {failed[0].run_id} {failed[0].status.value}\n"
                            f"{self.run_errors(failed[0].run_id)}\n{self.logs()}")
            done = [run for run in current if run.status == dg.DagsterRunStatus.SUCCESS]
            return done if len(done) >= count else None

        return self.wait_for(what, finished, timeout)

    def run_errors(self, run_id: str) -> str:
        return "\n".join(entry.user_message for entry in self.instance.all_logs(run_id)
                         if entry.level >= 40 or (entry.dagster_event and entry.dagster_event.is_failure))

    def run_summary(self) -> str:
        return "runs: " + ", ".join(f"{run.run_id[:8]} {run.status.value} {dict(run.tags)}" for run in self.runs())

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        answer = httpx.post(f"{self.webserver_url}/graphql", json={"query": query, "variables": variables or {}},
                            timeout=30)
        answer.raise_for_status()
        body = answer.json()
        assert "errors" not in body, body
        return body["data"]

    def wait_for_webserver(self, timeout: float = 60) -> None:
        def answers():
            try:
                return httpx.get(f"{self.webserver_url}/server_info", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_for("the webserver to answer", answers, timeout)


def kill_stragglers(home: Path) -> None:
    """SIGKILL, by pid, any process still running with this test's DAGSTER_HOME: only this test starts those."""
    marker = f"DAGSTER_HOME={home}\0".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes() + b"\0":
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def clicked(event_id: str, browser: str, kx: str) -> dict:
    """A Klaviyo email click Klaviyo did not identify natively, an hour ago (its session idle): a backup send."""
    return make_event(event_id, event_name="ViewContent", anonymous_id=browser, session_id=f"session-{browser}",
                      event_source_url=f"https://acme.myshopify.com/products/mug?_kx={kx}",
                      user_data={"klaviyo_identified": False},
                      custom_data={"items": [{"id": "p1", "name": "Mug", "price": 12.0}]})


@pytest.fixture
def stack(tmp_path: Path, postgres_database: PostgresDatabase, monkeypatch) -> Stack:
    for key, value in postgres_database.dagster_env().items():
        monkeypatch.setenv(key, value)  # for this process's own DagsterInstance.from_config
    landing = tmp_path / "landing"
    for kind in ("events", "customers"):
        (landing / kind).mkdir(parents=True)
    settings = Settings(landing_dir=landing, warehouse_path=tmp_path / "warehouse.duckdb")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "deploy" / "dagster.yaml", home)
    (tmp_path / "staging").mkdir()
    (tmp_path / "logs").mkdir()
    emulator = KlaviyoEmulator(api_key=KEY, rate_limits=None).start()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("UPSTACK_", "KLAVIYO_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(home), UPSTACK_LANDING_DIR=str(landing), UPSTACK_WAREHOUSE=str(settings.warehouse_path),
               KLAVIYO_API_KEY=KEY, KLAVIYO_BASE_URL=emulator.base_url, PYTHONUNBUFFERED="1",
               **postgres_database.dagster_env())
    stack = Stack(settings=settings, home=home, env=env, emulator=emulator, staging=tmp_path / "staging",
                  log_dir=tmp_path / "logs")
    try:
        yield stack
    finally:
        stack.close()


RUNS_QUERY = """
query SensorRuns($filter: RunsFilter) {
  runsOrError(filter: $filter) {
    __typename
    ... on Runs { results { runId status jobName tags { key value } } }
    ... on PythonError { message }
  }
}
"""

LAUNCH_RUN = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
  }
}
"""


def launch_sync(stack: Stack, *, trigger: str) -> str:
    """Launches upstack_sync through the webserver, queued as the schedule's runs are; returns the run id."""
    launched = stack.graphql(LAUNCH_RUN, {"params": {
        "selector": {"repositoryLocationName": LOCATION, "repositoryName": "__repository__", "jobName": JOB},
        "runConfigData": {},
        "executionMetadata": {"tags": [{"key": "upstack/trigger", "value": trigger},
                                       {"key": "dagster/partition", "value": "default"},
                                       {"key": "upstack/shop", "value": "default"}]},
    }})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def test_a_landed_file_is_picked_up_by_the_sensor_and_delivered_to_klaviyo(stack):
    stack.land("click-1.ndjson", [clicked("click-1", "browser-1", "KX1")])
    stack.start_webserver()
    stack.start_daemon()

    [run] = stack.wait_for_runs("the sensor's run", stack.sensor_runs, 1)

    stack.wait_for_webserver()
    runs = stack.graphql(RUNS_QUERY, {"filter": {"tags": [{"key": SENSOR_TAG, "value": SENSOR}]}})["runsOrError"]
    assert runs["__typename"] == "Runs", runs
    [seen] = runs["results"]
    assert (seen["runId"], seen["status"], seen["jobName"]) == (run.run_id, "SUCCESS", JOB)
    assert {"key": SENSOR_TAG, "value": SENSOR} in seen["tags"]
    assert {"key": "upstack/new_files", "value": "1"} in seen["tags"]
    assert stack.emulator.accepted_by_metric() == {METRIC: 1}
    assert stack.emulator.duplicate_events == 0


def test_a_killed_daemon_restarted_resumes_without_ingesting_a_file_twice(stack):
    stack.land("click-1.ndjson", [clicked("click-1", "browser-1", "KX1")])
    stack.start_webserver()
    first_daemon = stack.start_daemon()
    stack.wait_for_webserver()
    [first] = stack.wait_for_runs("the first file's run", stack.sensor_runs, 1)

    first_daemon.kill()  # SIGKILL to the whole group: no shutdown code runs
    stack.land("click-2.ndjson", [clicked("click-2", "browser-2", "KX2")])
    # A run requested while no daemon runs waits in the queue, which lives in PostgreSQL.
    queued_id = launch_sync(stack, trigger="while-daemon-down")
    assert stack.instance.get_run_by_id(queued_id).status == dg.DagsterRunStatus.QUEUED
    stack.start_daemon()
    done = stack.wait_for_runs("the second file's run", stack.sensor_runs, 2)
    stack.wait_for_runs("the queued run", lambda: [run for run in stack.runs() if run.run_id == queued_id], 1)

    stack.stop_services()
    assert stack.instance.get_run_by_id(queued_id).status == dg.DagsterRunStatus.SUCCESS
    sensor_runs = stack.sensor_runs()
    assert len(sensor_runs) == 2 and {run.status for run in sensor_runs} == {dg.DagsterRunStatus.SUCCESS}
    assert len({run.tags["dagster/run_key"] for run in sensor_runs}) == 2
    assert first.run_id in {run.run_id for run in sensor_runs}
    # The cursor survived the kill: the restarted sensor saw one new file, not both as new.
    assert sorted(run.tags["upstack/new_files"] for run in sensor_runs) == ["1", "1"]
    assert stack.warehouse("select path, count(*) from ingested_files group by path order by path") == [
        ("events/click-1.ndjson", 1), ("events/click-2.ndjson", 1)]
    assert stack.warehouse("select count(*), count(distinct event_id) from raw_events") == [(2, 2)]
    assert stack.emulator.accepted_by_metric() == {METRIC: 2}
    assert stack.emulator.duplicate_events == 0


def test_a_sensor_run_and_a_scheduled_style_run_of_one_shop_run_one_after_the_other_and_both_succeed(stack):
    events = [clicked(f"click-{n}", f"browser-{n}", f"KX{n}") for n in range(5)]
    stack.land("clicks.ndjson", events)
    stack.start_webserver()
    stack.start_daemon()
    stack.wait_for_webserver()

    # The moment the sensor has requested its run, launch the job the way the hourly schedule does (queued).
    [sensor_run] = stack.wait_for("the sensor to request a run", stack.sensor_runs, RUN_DEADLINE, interval=0.1)
    manual_id = launch_sync(stack, trigger="test-schedule")

    runs = stack.wait_for_runs("both runs", lambda: [run for run in stack.runs()
                                                     if run.run_id in (sensor_run.run_id, manual_id)], 2)
    stack.stop_services()

    assert {run.run_id for run in runs} == {sensor_run.run_id, manual_id}
    all_runs = stack.runs()
    assert {run.status for run in all_runs} == {dg.DagsterRunStatus.SUCCESS}, stack.run_summary()
    for run in all_runs:
        messages = "\n".join(entry.user_message or "" for entry in stack.instance.all_logs(run.run_id))
        assert not DUCKDB_LOCK_ERROR.search(messages), messages
    assert not DUCKDB_LOCK_ERROR.search(stack.logs()), stack.logs()
    # Requested together, run one after the other: the queue allows one run per shop (one writer per warehouse).
    records = {record.dagster_run.run_id: record for record in stack.instance.get_run_records()}
    first, second = sorted((records[sensor_run.run_id], records[manual_id]), key=lambda record: record.start_time)
    assert first.end_time <= second.start_time
    # One ingestion of the file between the two runs, every event once, every event delivered once.
    assert stack.warehouse("select path, count(*) from ingested_files group by path") == [("events/clicks.ndjson", 1)]
    assert stack.warehouse("select count(*), count(distinct event_id) from raw_events") == [(5, 5)]
    assert stack.emulator.accepted_by_metric() == {METRIC: 5}
    assert stack.emulator.duplicate_events == 0
    assert stack.warehouse("select count(*) from klaviyo_outbox where status <> 'delivered'") == [(0,)]
