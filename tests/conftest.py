"""Shared fixtures: real landing folders on disk, a real DuckDB file, Dagster's own in-process execution."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from dagster_project.definitions import run_sync
from upstack_pipeline.settings import Settings

NOW = datetime.now(timezone.utc)


def make_event(event_id: str, **overrides) -> dict:
    """A valid AddToCart event; keyword arguments replace top-level fields."""
    event = {
        "event_id": event_id,
        "event_name": "AddToCart",
        "event_time": (NOW - timedelta(hours=1)).isoformat(),
        "shop": "acme.myshopify.com",
        "anonymous_id": "anon-1",
        "session_id": "sess-1",
        "event_source_url": "https://acme.myshopify.com/products/mug?_kx=abc",
        "user_data": {"email": "jane@gmail.com", "klaviyo_identified": False, "client_ip_address": "10.0.0.1"},
        "custom_data": {
            "value": 24.0, "currency": "USD",
            "items": [{"id": "p1", "name": "Mug", "price": 12.0, "quantity": 2, "sku": "MUG-1"}],
            "discount_codes": ["WELCOME"],
        },
        "consent": {"analytics": True, "marketing": True, "sale_of_data": False},
    }
    event.update(overrides)
    return event


def klaviyo_click(event_id: str = "view") -> dict:
    """A product view an hour ago, landed from a Klaviyo email (_kx), which Klaviyo's cookie did not identify:
    the smallest event that goes all the way to the outbox in backup mode."""
    return make_event(event_id, event_name="ViewContent", anonymous_id="a", session_id="s",
                      event_source_url="https://acme.myshopify.com/?_kx=KX1", user_data={"klaviyo_identified": False},
                      custom_data={"items": [{"id": "p1", "name": "Mug", "price": 9.0}]})


def write_lines(path: Path, lines: list[str]) -> Path:
    """Writes lines as NDJSON, gzip-compressed when the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_events(path: Path, events: list[dict]) -> Path:
    return write_lines(path, [json.dumps(event) for event in events])


def ingest_killed_after_batch(settings: Settings, batch: int) -> subprocess.CompletedProcess:
    """`ingest_events` in a child process, one file per transaction, that SIGKILLs itself right after the given
    batch's commit (the test hook, upstack_pipeline/faults.py): no close, no cleanup, as a killed run leaves it."""
    script = ("import sys; from datetime import datetime; from upstack_pipeline.settings import Settings;"
              "from upstack_pipeline.events import ingest_events;"
              "ingest_events(Settings.from_env(), now=datetime.fromisoformat(sys.argv[1]))")
    env = {key: value for key, value in os.environ.items() if not key.startswith("UPSTACK_")}
    env.update(UPSTACK_LANDING_DIR=str(settings.landing_dir), UPSTACK_WAREHOUSE=str(settings.warehouse_path),
               UPSTACK_INGEST_BATCH_BYTES="1", UPSTACK_TEST_STOP_AFTER=f"events-batch:{batch}")
    return subprocess.run([sys.executable, "-c", script, NOW.isoformat()], env=env, capture_output=True, text=True,
                          timeout=120)


def simulated_store(settings: Settings, tmp_path: Path, *, visitors: int, days: int, seed: int,
                    end: datetime) -> tuple[Settings, list[Path]]:
    """A simulated store whose days land one at a time: settings over a landing folder holding only its customers
    export (ingested), sending every event (send_mode all), and the simulated day folders, oldest first, for the
    test to copy into the landing folder's events/ as each day arrives."""
    from upstack_pipeline.customers import ingest_customers
    from upstack_pipeline.sandbox.simulate import simulate

    simulate(tmp_path / "sim", visitors=visitors, days=days, seed=seed, end=end)
    landing = tmp_path / "arriving"
    shutil.copytree(tmp_path / "sim" / "customers", landing / "customers")
    world = replace(settings, landing_dir=landing, destination=replace(settings.destination, send_mode="all"))
    ingest_customers(world, now=end)
    return world, sorted((tmp_path / "sim" / "events").glob("dt=*"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    landing = tmp_path / "landing"
    (landing / "events").mkdir(parents=True)
    (landing / "customers").mkdir(parents=True)
    return Settings(landing_dir=landing, warehouse_path=tmp_path / "warehouse.duckdb")


@pytest.fixture
def sync(settings: Settings):
    """Runs the whole upstack_sync job in-process, as `upstack sync` does, against a test instance."""
    instance_context = dg.instance_for_test()
    instance = instance_context.__enter__()

    def run() -> dg.ExecuteInProcessResult:
        result = run_sync(settings, instance)
        assert result.success, [failure.step_failure_data.error for failure in result.get_step_failure_events()]
        return result

    yield run
    instance_context.__exit__(None, None, None)


def upstack_id(anchor_type: str, anchor: str) -> str:
    """sql/identifier_normalization.sql's upstack_id macro."""
    return "up_" + hashlib.sha256(f"{anchor_type}:{anchor}".encode()).hexdigest()[:20]


def query(settings: Settings, sql: str, parameters: list | None = None) -> list[tuple]:
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        connection.execute("set TimeZone = 'UTC'")
        return connection.execute(sql, parameters).fetchall()


def materialization(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    events = [event for event in result.get_asset_materialization_events()
              if event.asset_key == dg.AssetKey(asset)]
    assert len(events) == 1
    return {key: value.value for key, value in events[0].materialization.metadata.items()}
