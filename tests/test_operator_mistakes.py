"""The mistakes people make, run as they make them: the `upstack` command in a real process, with its message and
exit status. No mistake may end in a traceback, a "succeeded" beside a failure, or a quiet exit 0."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import klaviyo_click, make_event, query, write_events
from dagster_project.cli import DEMO_KEY
from test_cli import PROJECT_ROOT, environment, upstack
from upstack_pipeline.sandbox.klaviyo_emulator import KlaviyoEmulator
from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import SCHEMA_VERSION, Warehouse

pytestmark = pytest.mark.slow  # every mistake is made through the whole `upstack` command in a process

KEY = "pk_mistakes_emulator_only_0000"


@dataclass(frozen=True)
class Mistake:
    """What the person did (`arrange` returns the command and its environment), and what they must be told."""

    arrange: Callable[[Settings, Path, ExitStack], tuple[list[str], dict[str, str]]]
    exit_status: int
    # Where the message must be: the first line of standard output, or standard error (one line).
    first_line: str | None = None
    stderr: str | None = None
    stdout: str | None = None


def nothing_listens(stack: ExitStack) -> str:
    with KlaviyoEmulator(api_key=KEY) as emulator:
        return emulator.base_url  # its port is closed once it stops


def emulator(stack: ExitStack, **options) -> str:
    return stack.enter_context(KlaviyoEmulator(**{"api_key": KEY, **options})).base_url


def with_a_pending_event(settings: Settings) -> None:
    write_events(settings.events_dir / "a.ndjson", [klaviyo_click()])


def sync_against(base_url_of: Callable[[ExitStack], str], key: str = KEY):
    def arrange(settings, tmp_path, stack):
        with_a_pending_event(settings)
        return ["sync"], environment(settings, KLAVIYO_API_KEY=key, KLAVIYO_BASE_URL=base_url_of(stack))
    return arrange


def check_key_against(base_url_of: Callable[[ExitStack], str], key: str = KEY, **extra: str):
    def arrange(settings, tmp_path, stack):
        return ["klaviyo", "check-key"], environment(settings, KLAVIYO_API_KEY=key,
                                                     KLAVIYO_BASE_URL=base_url_of(stack), **extra)
    return arrange


def sync_with(**variables: Callable[[Settings, Path], str]):
    def arrange(settings, tmp_path, stack):
        write_events(settings.events_dir / "a.ndjson", [make_event("e1")])
        return ["sync"], environment(settings, **{name: value(settings, tmp_path) for name, value in variables.items()})
    return arrange


def landing_with_stray_files(settings, tmp_path, stack):
    write_events(settings.events_dir / "a.ndjson", [make_event("e1")])
    write_events(settings.events_dir / "b.json", [make_event("e2")])
    write_events(settings.landing_dir / "c.ndjson", [make_event("e3")])
    (settings.customers_dir / "customers.xlsx").write_bytes(b"PK")
    return ["sync"], environment(settings)


def warehouse_from_a_newer_release(settings, tmp_path, stack):
    with Warehouse(settings.warehouse_path).connect() as connection:
        connection.execute("insert into warehouse_schema_version values (?, now(), 'a later release')",
                           [SCHEMA_VERSION + 1])
    return ["sync"], environment(settings)


def demo_beside_a_running_daemon(settings, tmp_path, stack):
    """`make dev` open while `make demo` starts: the daemon's heartbeat is in the shared instance."""
    import dagster as dg
    from dagster._daemon.types import DaemonHeartbeat

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_daemon_heartbeat(DaemonHeartbeat(time.time(), "SENSOR", "make-dev"))
    return ["demo", "--dir", str(tmp_path / "demo")], environment(settings, DAGSTER_HOME=str(home))


MISTAKES = {
    "klaviyo_base_url_where_nothing_listens": Mistake(
        sync_against(nothing_listens), 1,
        first_line=r"^upstack sync: run \w+ FAILED \(klaviyo_deliveries:destination_healthy: Could not reach Klaviyo "
                   r"at http://127\.0\.0\.1:\d+ \(3 attempts, last: ConnectError",
        stdout=r"ERROR klaviyo_deliveries:destination_healthy: .*Check KLAVIYO_BASE_URL"),
    "check_key_where_nothing_listens": Mistake(
        check_key_against(nothing_listens), 1,
        stdout=r"unreachable: Could not reach Klaviyo at http://127\.0\.0\.1:\d+ .*Check KLAVIYO_BASE_URL"),
    "a_rejected_key": Mistake(
        sync_against(lambda stack: emulator(stack, api_key="pk_another_accounts_key_000")), 1,
        first_line=r"FAILED \(klaviyo_deliveries:destination_healthy: Klaviyo rejected the API key",
        stdout=r"Set KLAVIYO_API_KEY to a valid private key"),
    "check_key_with_a_rejected_key": Mistake(
        check_key_against(lambda stack: emulator(stack, api_key="pk_another_accounts_key_000")), 1,
        stdout=r"key rejected: Klaviyo rejected the API key \(HTTP 401"),
    "check_key_with_a_revision_klaviyo_refuses": Mistake(
        check_key_against(lambda stack: emulator(stack, newest_revision="2026-07-15")), 1,
        stdout=r"revision refused: Klaviyo refused API revision 2026-10-15 .*Revision 2026-10-15 is not available"),
    "check_key_against_an_address_that_is_not_klaviyos_api": Mistake(
        check_key_against(lambda stack: emulator(stack) + "/v1"), 1,
        stdout=r"not Klaviyo's API: http://127\.0\.0\.1:\d+/v1 does not answer as Klaviyo's API does: POST /api/events "
               r"got HTTP 404"),
    "klaviyo_base_url_that_is_not_a_url": Mistake(
        check_key_against(lambda stack: "a.klaviyo.com"), 2,
        stderr=r"^upstack klaviyo: KLAVIYO_BASE_URL must start with https:// .* got 'a\.klaviyo\.com'"),
    "the_demo_while_make_dev_runs": Mistake(
        demo_beside_a_running_daemon, 2,
        stderr=r"^upstack demo: the Dagster daemon of DAGSTER_HOME is running \(is `make dev` open\?\): stop it"),
    "check_key_without_a_scope": Mistake(
        check_key_against(lambda stack: emulator(stack, scopes=frozenset({"profiles:write"}))), 1,
        stdout=r"events:write +NO: the key lacks this scope"),
    "upstack_landing_dir_mistyped": Mistake(
        sync_with(UPSTACK_LANDING_DIR=lambda settings, tmp_path: str(tmp_path / "landnig")), 2,
        stderr=r"^upstack sync: the landing folder does not exist: UPSTACK_LANDING_DIR is '.*/landnig' .*"
               r"Set UPSTACK_LANDING_DIR to the folder"),
    "upstack_landing_dir_without_events": Mistake(
        sync_with(UPSTACK_LANDING_DIR=lambda settings, tmp_path: str(settings.events_dir)), 2,
        stderr=r"^upstack sync: the landing folder has no events/ folder: UPSTACK_LANDING_DIR is '.*/events'"),
    "dagster_home_that_does_not_exist": Mistake(
        sync_with(DAGSTER_HOME=lambda settings, tmp_path: str(tmp_path / "no" / "such" / "home")), 2,
        stderr=r"^upstack sync: DAGSTER_HOME is '.*/no/such/home', which is not a folder\. Create it"),
    "a_warehouse_from_a_newer_release": Mistake(
        warehouse_from_a_newer_release, 2,
        stderr=r"^upstack sync: The warehouse .*warehouse\.duckdb has schema version \d+, but this release of "
               r"upstack-flows knows versions up to \d+.*Upgrade upstack-flows"),
    "a_metric_template_over_klaviyos_length": Mistake(
        sync_with(UPSTACK_METRIC_TEMPLATE=lambda settings, tmp_path: "{metric} recovered by " + "x" * 120), 2,
        stderr=r"^upstack sync: UPSTACK_METRIC_TEMPLATE gives a metric name of 150 characters; Klaviyo takes fewer "
               r"than 128"),
    "files_named_as_no_reader_takes": Mistake(
        landing_with_stray_files, 0,
        first_line=r"^upstack sync: run \w+ succeeded",
        stdout=r"3 files not read, outside events/ and customers/: c\.ndjson; named as no reader takes "
               r"\(events/ \*\.ndjson\.gz.*\): customers/customers\.xlsx, events/b\.json"),
}


@pytest.mark.parametrize("name", MISTAKES)
def test_each_mistake_is_named_with_what_to_do_and_the_right_exit_status(name, settings, tmp_path):
    mistake = MISTAKES[name]
    with ExitStack() as stack:
        args, env = mistake.arrange(settings, tmp_path, stack)
        completed = upstack(*args, env=env, timeout=120)

    out, err = completed.stdout, completed.stderr
    assert completed.returncode == mistake.exit_status, out + err
    assert "Traceback" not in out + err
    if mistake.first_line:
        assert re.search(mistake.first_line, out.splitlines()[0]), out
    if mistake.stdout:
        assert re.search(mistake.stdout, out, re.MULTILINE), out
    if mistake.stderr:
        assert len(err.strip().splitlines()) == 1, err
        assert re.search(mistake.stderr, err), err
    if completed.returncode != 0:
        assert "succeeded" not in out


def test_events_wait_in_the_outbox_while_klaviyo_is_unreachable_and_go_once_it_is_back(settings, tmp_path):
    with_a_pending_event(settings)
    with ExitStack() as stack:
        unreachable = upstack("sync", env=environment(settings, KLAVIYO_API_KEY=KEY,
                                                      KLAVIYO_BASE_URL=nothing_listens(stack)))
        assert unreachable.returncode == 1
        assert query(settings, "select status from klaviyo_outbox") == [("pending",)]

        klaviyo = stack.enter_context(KlaviyoEmulator(api_key=KEY))
        back = upstack("sync", env=environment(settings, KLAVIYO_API_KEY=KEY, KLAVIYO_BASE_URL=klaviyo.base_url))

        assert back.returncode == 0, back.stdout + back.stderr
        assert klaviyo.accepted_by_metric() == {"Viewed Product from Upstack": 1}
    assert query(settings, "select status from klaviyo_outbox") == [("delivered",)]


def test_a_metric_template_with_an_apostrophe_runs_end_to_end_and_a_bad_one_writes_nothing(settings):
    with_a_pending_event(settings)
    refused = upstack("sync", env=environment(settings, UPSTACK_METRIC_TEMPLATE="Bob's {metric"))
    assert refused.returncode == 2 and "UPSTACK_METRIC_TEMPLATE must contain {metric}" in refused.stderr
    assert not settings.warehouse_path.exists()

    with KlaviyoEmulator(api_key=KEY) as klaviyo:
        synced = upstack("sync", env=environment(settings, KLAVIYO_API_KEY=KEY, KLAVIYO_BASE_URL=klaviyo.base_url,
                                                 UPSTACK_METRIC_TEMPLATE="{metric} from Bob's «shop»"))
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert klaviyo.accepted_by_metric() == {"Viewed Product from Bob's «shop»": 1}
        again = upstack("sync", env=environment(settings, KLAVIYO_API_KEY=KEY, KLAVIYO_BASE_URL=klaviyo.base_url,
                                                UPSTACK_METRIC_TEMPLATE="{metric} from Bob's «shop»"))
        assert again.returncode == 0, again.stdout + again.stderr  # the run after it works too


def test_after_the_demo_the_dagster_ui_opens_on_its_runs_landing_folder_and_warehouse(tmp_path):
    """`make demo` and `make dev` share DAGSTER_HOME, and the UI's resource reads the same landing folder and
    warehouse as the demo wrote."""
    import dagster as dg

    from dagster_project.definitions import load_definitions

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home)
    settings = Settings(landing_dir=tmp_path / "landing", warehouse_path=tmp_path / "warehouse.duckdb")
    env = environment(settings, DAGSTER_HOME=str(home))
    demo = upstack("demo", "--dir", str(tmp_path / "demo"), "--visitors", "200", "--days", "3", "--live-days", "1",
                   env=env)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "make dev" in demo.stdout

    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 2 and {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}
        # The demo reached its emulator through the klaviyo resource's configuration, shown on each run, key aside.
        for run in runs:
            klaviyo = run.run_config["resources"]["klaviyo"]["config"]
            assert klaviyo["base_url"].startswith("http://127.0.0.1:") and "api_key" not in klaviyo
            assert DEMO_KEY not in json.dumps(run.run_config) + json.dumps(run.tags)
        assert instance.get_latest_materialization_event(dg.AssetKey("klaviyo_deliveries")) is not None
        latest = instance.get_latest_materialization_event(dg.AssetKey("raw_events")).asset_materialization
        assert latest.metadata["dagster/row_count"].value == query(settings, "select count(*) from raw_events")[0][0]
    # What the UI's code location resolves its resource to, under the environment `make dev` gives it.
    with pytest.MonkeyPatch.context() as patch:
        for name in ("UPSTACK_LANDING_DIR", "UPSTACK_WAREHOUSE"):
            patch.setenv(name, env[name])
        resources = load_definitions().resources
    assert (Path(resources["upstack"].data["landing_dir"]), Path(resources["warehouse"].data["path"])) == (
        settings.landing_dir, settings.warehouse_path)
    homes = {target: re.findall(r"DAGSTER_HOME=(\S+) ", subprocess.run(
        ["make", "-n", target], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout)
        for target in ("demo", "dev")}
    assert homes["demo"] == homes["dev"] == [str(PROJECT_ROOT / "dagster_home")]


def test_the_demo_refuses_to_replace_data_it_did_not_write(tmp_path):
    settings = Settings(landing_dir=tmp_path / "shop-landing", warehouse_path=tmp_path / "shop.duckdb")
    write_events(settings.events_dir / "real.ndjson", [make_event("real")])

    completed = upstack("demo", "--dir", str(tmp_path / "demo"), env=environment(settings))

    assert completed.returncode == 2
    assert re.search(r"^upstack demo: .*shop-landing holds data the demo did not write", completed.stderr)
    assert (settings.events_dir / "real.ndjson").exists()
