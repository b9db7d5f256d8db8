"""Many shops, one deployment (issue 15), as it runs: the daemon on PostgreSQL syncing three shops of a shops file.

Each shop has its own landing folder, warehouse and Klaviyo account (an emulator of its own, with its own key, read
from the variable the shops file names). One shop's key is wrong and another's warehouse file is broken: only their
runs fail, the third shop's events arrive once, in its own account. A shop added to the file later is picked up by
the running daemon. The processes and their teardown are tests/test_daemon_end_to_end.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import yaml

from postgres import PostgresDatabase, postgres_database, postgres_server  # noqa: F401  (fixtures)
from test_daemon_end_to_end import BIN, PROJECT_ROOT, Service, clicked, kill_stragglers
from conftest import write_events
from upstack_pipeline.sandbox.klaviyo_emulator import KlaviyoEmulator

pytestmark = pytest.mark.slow  # a real dagster-daemon on PostgreSQL, several runs

METRIC = "Viewed Product from Upstack"
DEADLINE = 150  # seconds for the daemon to load, tick, and run the shops (they share two cores)


class Shops:
    """The shops file, each shop's folders and emulator, and the daemon; `close()` stops what it started."""

    def __init__(self, root: Path, database: PostgresDatabase):
        self.root = root
        self.home = root / "dagster_home"
        self.home.mkdir()
        shutil.copy(PROJECT_ROOT / "deploy" / "dagster.yaml", self.home)
        self.file = root / "shops.yaml"
        self.entries: dict[str, dict] = {}
        self.declared: list[str] = []
        self.emulators: dict[str, KlaviyoEmulator] = {}
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith(("UPSTACK_", "KLAVIYO_", "DAGSTER_"))}
        self.env.update(DAGSTER_HOME=str(self.home), UPSTACK_SHOPS_FILE=str(self.file), PYTHONUNBUFFERED="1",
                        **database.dagster_env())
        self.daemon: Service | None = None
        self._instance: dg.DagsterInstance | None = None

    def add(self, name: str, *, key_given: str | None = None, declare: bool = True) -> None:
        """A shop with its own emulator; `key_given` puts another key than the account's in its variable. Without
        `declare`, only its folders, account and key variable: a shop about to open, not yet in the file."""
        key = f"pk_{name.replace('-', '_')}_emulator_account_0000"
        emulator = KlaviyoEmulator(api_key=key, rate_limits=None).start()
        self.emulators[name] = emulator
        for kind in ("events", "customers"):
            (self.root / name / "landing" / kind).mkdir(parents=True)
        variable = f"KLAVIYO_API_KEY_{name.upper().replace('-', '_')}"
        self.env[variable] = key_given or key
        self.entries[name] = {"landing_dir": f"{name}/landing", "warehouse": f"{name}/warehouse.duckdb",
                              "klaviyo_api_key_env": variable, "klaviyo_base_url": emulator.base_url}
        if declare:
            self.declare(name)

    def declare(self, name: str) -> None:
        """Writes the shops file with `name` in it, beside it and renamed in: the daemon never reads half a file."""
        staged = self.root / "shops.yaml.new"
        declared = [shop for shop in self.entries if shop == name or shop in self.declared]
        self.declared = declared
        staged.write_text(yaml.safe_dump({"shops": {shop: self.entries[shop] for shop in declared}}))
        os.replace(staged, self.file)

    def land(self, shop: str, events: list[dict]) -> None:
        staged = write_events(self.root / f"{shop}-staged.ndjson", events)
        os.replace(staged, self.root / shop / "landing" / "events" / f"{shop}.ndjson")

    def warehouse(self, shop: str, sql: str) -> list[tuple]:
        with duckdb.connect(str(self.root / shop / "warehouse.duckdb"), read_only=True) as connection:
            return connection.execute(sql).fetchall()

    def start_daemon(self) -> None:
        self.daemon = Service("daemon", [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], self.env,
                              self.root)

    @property
    def instance(self) -> dg.DagsterInstance:
        if self._instance is None:
            self._instance = dg.DagsterInstance.from_config(str(self.home))
        return self._instance

    def finished_runs(self, shop: str) -> list[dg.DagsterRun]:
        runs = self.instance.get_runs(filters=dg.RunsFilter(tags={"upstack/shop": shop}))
        return [run for run in runs if run.is_finished]

    def wait_until(self, what: str, predicate, timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.daemon.process.poll() is not None:
                pytest.fail(f"the daemon exited while waiting for {what}:\n{self.daemon.output()[-6000:]}")
            if time.monotonic() > deadline:
                runs = [(run.tags.get("upstack/shop"), run.status.value) for run in self.instance.get_runs()]
                pytest.fail(f"timed out waiting for {what}; runs: {runs}\n{self.daemon.output()[-6000:]}")
            time.sleep(0.5)

    def close(self) -> None:
        if self.daemon is not None and not self.daemon.stopped:
            self.daemon.stop()
        if self._instance is not None:
            self._instance.dispose()
        kill_stragglers(self.home)
        for emulator in self.emulators.values():
            emulator.stop()


@pytest.fixture
def shops(tmp_path: Path, postgres_database: PostgresDatabase, monkeypatch):
    for key, value in postgres_database.dagster_env().items():
        monkeypatch.setenv(key, value)  # for this process's own DagsterInstance.from_config
    shops = Shops(tmp_path, postgres_database)
    try:
        yield shops
    finally:
        shops.close()


def checks(instance: dg.DagsterInstance, run: dg.DagsterRun) -> dict[str, bool]:
    return {event.dagster_event.event_specific_data.check_name: event.dagster_event.event_specific_data.passed
            for event in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)}


def test_three_shops_sync_side_by_side_each_into_its_own_account_and_one_shops_trouble_stays_its_own(shops):
    shops.add("north")
    shops.add("south", key_given="pk_south_a_key_from_another_account_00")  # Klaviyo answers 401
    shops.add("east")
    (shops.root / "east" / "warehouse.duckdb").write_bytes(b"not a DuckDB file")  # a broken warehouse file
    # A shop about to open: its key is in the deployment's secrets (the daemon's environment) before it is declared.
    shops.add("west", declare=False)
    for shop in ("north", "south", "east"):
        shops.land(shop, [clicked(f"{shop}-click-{n}", f"{shop}-browser-{n}", f"KX{shop}{n}") for n in range(3)])

    shops.start_daemon()
    shops.wait_until("a finished run of every shop",
                     lambda: all(shops.finished_runs(shop) for shop in ("north", "south", "east")))

    [north] = shops.finished_runs("north")
    assert north.status == dg.DagsterRunStatus.SUCCESS and all(checks(shops.instance, north).values())
    assert north.tags["dagster/partition"] == "north"
    assert shops.emulators["north"].accepted_by_metric() == {METRIC: 3}
    assert shops.emulators["north"].duplicate_events == 0
    assert shops.warehouse("north", "select count(*) from raw_events") == [(3,)]

    # The wrong key: Klaviyo refused it, the run says so (an ERROR check), its events wait in its own outbox.
    south = shops.finished_runs("south")[0]
    assert checks(shops.instance, south)["destination_healthy"] is False
    assert shops.emulators["south"].accepted_by_metric() == {}
    assert shops.warehouse("south", "select status, count(*) from klaviyo_outbox group by status") == [("pending", 3)]

    # The broken warehouse: that shop's run fails; its events went nowhere.
    assert {run.status for run in shops.finished_runs("east")} == {dg.DagsterRunStatus.FAILURE}
    assert shops.emulators["east"].accepted_by_metric() == {}

    # The shops ran side by side: each run overlapped another (the queue allows one run per shop, not one in all).
    records = [shops.instance.get_run_record_by_id(run.run_id)
               for run in (north, south, shops.finished_runs("east")[-1])]
    assert any(a.start_time < b.end_time and b.start_time < a.end_time
               for a in records for b in records if a is not b)
    # A run's config names its shop's key variable; no key is in any run's config or tags.
    assert north.run_config["resources"]["klaviyo"]["config"]["api_key_env"] == "KLAVIYO_API_KEY_NORTH"
    for run in shops.instance.get_runs():
        assert "pk_" not in json.dumps(run.run_config) + json.dumps(run.tags)

    # A shop added to the file while the daemon runs: a partition and a run at the sensor's next ticks.
    shops.declare("west")
    shops.land("west", [clicked("west-click", "west-browser", "KXwest")])
    shops.wait_until("the new shop's run", lambda: shops.finished_runs("west"))
    [west] = shops.finished_runs("west")
    assert west.status == dg.DagsterRunStatus.SUCCESS
    assert shops.emulators["west"].accepted_by_metric() == {METRIC: 1}
    assert sorted(shops.instance.get_dynamic_partitions("shops")) == ["east", "north", "south", "west"]
    # Nothing reached another shop's account.
    assert shops.emulators["north"].accepted_by_metric() == {METRIC: 3}
