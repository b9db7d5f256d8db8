"""The resources: the run's whole configuration, shown in the UI, with the Klaviyo key kept out of it.

Six resources, as an operator thinks of them: `warehouse` (the DuckDB file), `klaviyo` (the account the events go
to), `identity`, `mapping` and `alerts` (the settings of those stages), and `upstack` (the landing folder and the
clock), which holds the other five and is what the assets receive. Every run carries their configuration as run
config (`run_config_for`), so a run's page in the UI says what it ran with. The Klaviyo key never appears in run
config, tags or metadata: a deployment's run config names the variable that holds it (`api_key_env`: one per shop,
see dagster_project/shops.py) and the run reads it from its own environment; `upstack sync` and the demo bind the
key they hold to the resource instead.

The settings themselves are `upstack_pipeline.settings.Settings`: the library knows nothing of Dagster, and the
config classes here mirror its dataclasses field by field (a duration is a number with its unit in the name, e.g.
`hold_back_minutes`), which `tests/test_resources.py` holds them to.

No `from __future__ import annotations` here: Dagster finds a resource's dependencies (`UpstackResource.warehouse`)
from its annotations at run time.
"""

import dataclasses
import os
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

import dagster as dg
from pydantic import Field

from upstack_pipeline.settings import (
    AlertSettings,
    DestinationSettings,
    IdentitySettings,
    Settings,
    checked_base_url,
    checked_memory_limit,
)
from upstack_pipeline.warehouse import WarehouseBusyError

DURATION_UNITS = {"days": timedelta(days=1), "hours": timedelta(hours=1), "minutes": timedelta(minutes=1),
                  "seconds": timedelta(seconds=1)}


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB warehouse file every stage reads and writes."""

    path: str = Field(description="The DuckDB file (UPSTACK_WAREHOUSE).")
    lock_wait_seconds: float = Field(description="How long opening the file waits for another process (a notebook, "
                                                 "a second sync) to release DuckDB's write lock.")
    memory_limit: str = Field(default="", description="What DuckDB may hold in memory, e.g. 4GB "
                                                      "(UPSTACK_DUCKDB_MEMORY_LIMIT); empty: 80% of RAM.")
    temp_directory: str = Field(default="", description="Where DuckDB spills what does not fit "
                                                        "(UPSTACK_DUCKDB_TEMP_DIR); empty: <warehouse>.tmp.")


class KlaviyoResource(dg.ConfigurableResource):
    """The Klaviyo account the events go to. The key is bound from the environment, never set in run config."""

    api_key: Optional[str] = Field(default=None, description="Bound by `upstack sync` and the demo, which hold the "
                                   "key themselves; in a deployment empty, and api_key_env names the variable.")
    api_key_env: str = Field(default="", description="The environment variable holding the key (KLAVIYO_API_KEY, or "
                             "the shops file's klaviyo_api_key_env), read in the run's own process; empty and no "
                             "api_key: nothing is sent and the outbox keeps every event.")
    base_url: str = Field(description="Klaviyo's API (https://a.klaviyo.com) or a local emulator (KLAVIYO_BASE_URL).")
    revision: str = Field(description="The API revision the payloads are written for.")
    requests_per_second: int = Field(description="Klaviyo's rate limit per account for the bulk endpoints.")
    requests_per_minute: int = Field(description="Klaviyo's rate limit per account for the bulk endpoints.")


class IdentityResource(dg.ConfigurableResource):
    """`IdentitySettings`: the guards of identity resolution (the README's "Identity resolution")."""

    max_emails_per_browser: int
    max_browsers_per_cluster: int
    click_handoff_window_minutes: float
    cookie_lifetime_days: float
    max_browsers_per_identifier: int
    supernode_window_days: float
    blocked_emails: list[str]
    probabilistic_matching: bool
    probabilistic_window_minutes: float


class MappingResource(dg.ConfigurableResource):
    """`DestinationSettings`: which events become which Klaviyo events, and delivery's health limits."""

    send_mode: str
    metric_name_template: str
    enabled_events: list[str]
    create_profiles: bool
    update_profiles: bool
    list_id: Optional[str] = None
    respect_consent: bool
    max_event_age_hours: float
    hold_back_minutes: float
    max_pending_age_minutes: float
    max_dead_letter_share: float


class AlertsResource(dg.ConfigurableResource):
    """`AlertSettings`: when the analytics checks warn (the README's "Alerts")."""

    min_delivery_success: float
    max_quiet_time_hours: float
    max_lift_drop: float
    min_expected_sessions_to_judge_lift: int


class UpstackResource(dg.ConfigurableResource):
    """What the assets receive: the settings of every stage, and the resources they reach."""

    warehouse: WarehouseResource
    klaviyo: KlaviyoResource
    identity: IdentityResource
    mapping: MappingResource
    alerts: AlertsResource
    landing_dir: str = Field(description="The landing folder: events/ and customers/ (UPSTACK_LANDING_DIR).")
    # A replay of past traffic (the demo) runs as if it were this moment, ISO 8601 with an offset, so sessions go
    # idle and events age as they did then. Empty: the wall clock.
    as_of: str = Field(default="", description="Run as if it were this moment (ISO 8601); empty: now.")
    ingest_batch_bytes: int = Field(description="Landing files are ingested in transactions of about this size.")
    identity_chunk_rows: int = Field(description="Identity resolves new loads in transactions of about this many "
                                                 "rows (UPSTACK_IDENTITY_CHUNK_ROWS).")
    max_clock_skew_hours: float = Field(description="Events stamped further ahead than this are quarantined.")

    @contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext) -> Iterator["UpstackResource"]:
        """The warehouse held open for the whole run (Warehouse.held_open): the run's steps, one after another in
        its process (the in-process executor), share one DuckDB instance instead of each opening and
        checkpointing the file. A run that cannot hold it (a bad setting, a file that is no warehouse) runs
        without: its first step fails on the same error and says so, as a step, in the run's page. Only a lock
        that stayed taken fails here: a step would wait the whole lock timeout again. The schedule's and the
        sensor's ticks build this resource too, outside any run: they never open the warehouse."""
        with ExitStack() as hold:
            try:
                if context.run is not None:
                    hold.enter_context(self.settings().warehouse().held_open())
            except WarehouseBusyError:
                raise
            except Exception:  # noqa: BLE001 - reported by the first step, which meets it again
                pass
            yield self

    def now(self) -> datetime:
        return datetime.fromisoformat(self.as_of) if self.as_of else datetime.now(timezone.utc)

    def settings(self) -> Settings:
        return Settings(
            landing_dir=Path(self.landing_dir),
            warehouse_path=Path(self.warehouse.path),
            warehouse_lock_wait=timedelta(seconds=self.warehouse.lock_wait_seconds),
            duckdb_memory_limit=checked_memory_limit(self.warehouse.memory_limit or None),
            duckdb_temp_directory=Path(self.warehouse.temp_directory) if self.warehouse.temp_directory else None,
            klaviyo_base_url=checked_base_url(self.klaviyo.base_url),
            klaviyo_api_key=self.klaviyo.api_key or _key_from(self.klaviyo.api_key_env),
            klaviyo_revision=self.klaviyo.revision,
            klaviyo_requests_per_second=self.klaviyo.requests_per_second,
            klaviyo_requests_per_minute=self.klaviyo.requests_per_minute,
            max_clock_skew=timedelta(hours=self.max_clock_skew_hours),
            ingest_batch_bytes=self.ingest_batch_bytes,
            identity_chunk_rows=self.identity_chunk_rows,
            identity=from_config(self.identity, IdentitySettings),
            destination=from_config(self.mapping, DestinationSettings),
            alerts=from_config(self.alerts, AlertSettings),
        )


def _key_from(variable: str) -> Optional[str]:
    if not variable:
        return None
    key = os.environ.get(variable, "").strip()
    if not key:
        raise ValueError(f"{variable} is not set in this run's environment, and it holds this shop's Klaviyo key "
                         "(klaviyo_api_key_env in the shops file, or KLAVIYO_API_KEY). Set it where the runs start "
                         "(the daemon's or the run worker's environment, a Kubernetes Secret), or remove "
                         "klaviyo_api_key_env to run without sending.")
    return key


def resource_config(settings: Settings, as_of: datetime | None = None, *,
                    api_key_env: str | None = None) -> dict[str, dict[str, Any]]:
    """Each resource's configuration for `settings`, without the key: at most the name of its variable."""
    return {
        "warehouse": {"path": str(settings.warehouse_path),
                      "lock_wait_seconds": settings.warehouse_lock_wait.total_seconds(),
                      "memory_limit": settings.duckdb_memory_limit or "",
                      "temp_directory": str(settings.duckdb_temp_directory or "")},
        "klaviyo": {"base_url": settings.klaviyo_base_url, "revision": settings.klaviyo_revision,
                    "api_key_env": api_key_env or "",
                    "requests_per_second": settings.klaviyo_requests_per_second,
                    "requests_per_minute": settings.klaviyo_requests_per_minute},
        "identity": to_config(settings.identity, IdentityResource),
        "mapping": to_config(settings.destination, MappingResource),
        "alerts": to_config(settings.alerts, AlertsResource),
        "upstack": {"landing_dir": str(settings.landing_dir), "as_of": as_of.isoformat() if as_of else "",
                    "ingest_batch_bytes": settings.ingest_batch_bytes,
                    "identity_chunk_rows": settings.identity_chunk_rows,
                    "max_clock_skew_hours": settings.max_clock_skew / DURATION_UNITS["hours"]},
    }


def run_config_for(settings: Settings, as_of: datetime | None = None, *,
                   api_key_env: str | None = None) -> dict[str, Any]:
    """The run config that makes a run use `settings`: what the UI shows on the run's page."""
    return {"resources": {name: {"config": config}
                          for name, config in resource_config(settings, as_of, api_key_env=api_key_env).items()}}


def pipeline_resources(settings: Settings, *, api_key: str | None, api_key_env: str | None = None) -> dict[str, Any]:
    """The resources, configured from `settings` with each value overridable per run. The key is either bound here
    (the emulator's key in the demo, the key `upstack sync` read) or, in a deployment, read in each run from the
    variable its run config names (`api_key_env`), so one code location serves shops with keys of their own."""
    config = resource_config(settings, api_key_env=api_key_env)
    dependencies = {
        "warehouse": WarehouseResource.configure_at_launch(**config["warehouse"]),
        "klaviyo": KlaviyoResource.configure_at_launch(api_key=api_key, **config["klaviyo"]),
        "identity": IdentityResource.configure_at_launch(**config["identity"]),
        "mapping": MappingResource.configure_at_launch(**config["mapping"]),
        "alerts": AlertsResource.configure_at_launch(**config["alerts"]),
    }
    return {"upstack": UpstackResource.configure_at_launch(**dependencies, **config["upstack"]), **dependencies}


def to_config(settings: Any, config_class: type[dg.ConfigurableResource]) -> dict[str, Any]:
    """A settings dataclass as `config_class` spells it: durations as numbers of the unit in the field's name,
    tuples as lists."""
    values = {}
    for name in config_class.model_fields:
        if hasattr(settings, name):
            value = getattr(settings, name)
            values[name] = list(value) if isinstance(value, tuple) else value
        else:
            base, unit = name.rsplit("_", 1)
            values[name] = getattr(settings, base) / DURATION_UNITS[unit]
    return values


def from_config(config: dg.ConfigurableResource, settings_class: type) -> Any:
    """The inverse of `to_config`."""
    fields = {field.name for field in dataclasses.fields(settings_class)}
    values = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if name in fields:
            values[name] = tuple(value) if isinstance(value, list) else value
        else:
            base, unit = name.rsplit("_", 1)
            values[base] = value * DURATION_UNITS[unit]
    return settings_class(**values)
