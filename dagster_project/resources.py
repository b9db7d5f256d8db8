"""Dagster's view of the project settings.

Assets receive paths through this resource (shown in the UI, overridable per run or in tests); anything secret,
such as the Klaviyo key, stays in the environment and is read through `Settings` at run time, so it never lands
in run configuration or metadata.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import Warehouse

# DuckDB takes one writer at a time: every asset that writes the warehouse runs in this pool, limited to one
# slot in the shipped instance configuration (dagster_home/dagster.yaml).
WAREHOUSE_POOL = "duckdb_warehouse"


class UpstackResource(dg.ConfigurableResource):
    """Where the landing folder and the DuckDB warehouse are, and the run's clock."""

    landing_dir: str
    warehouse_path: str
    # A replay of past traffic (the demo) runs as if it were this moment, ISO 8601 with an offset, so sessions go
    # idle and events age as they did then. Empty: the wall clock.
    as_of: str = ""

    @classmethod
    def from_settings(cls, settings: Settings, *, as_of: datetime | None = None) -> "UpstackResource":
        return cls(**cls.config_for(settings, as_of))

    @staticmethod
    def config_for(settings: Settings, as_of: datetime | None = None) -> dict[str, str]:
        """The resource's configuration for `settings`, as a run's run config carries it."""
        return {"landing_dir": str(settings.landing_dir), "warehouse_path": str(settings.warehouse_path),
                "as_of": as_of.isoformat() if as_of else ""}

    def now(self) -> datetime:
        return datetime.fromisoformat(self.as_of) if self.as_of else datetime.now(timezone.utc)

    def settings(self) -> Settings:
        return Settings.from_env().with_paths(
            landing_dir=Path(self.landing_dir), warehouse_path=Path(self.warehouse_path)
        )

    def warehouse(self) -> Warehouse:
        return Warehouse(Path(self.warehouse_path))
