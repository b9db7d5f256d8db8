"""The one place that reads the environment.

Everything else (the Dagster resources, the command line, the tests) receives a `Settings` object, so a run is
fully described by one value and tests never need to patch `os.environ`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Mapping

KLAVIYO_PRODUCTION_URL = "https://a.klaviyo.com"


@dataclass(frozen=True)
class Settings:
    landing_dir: Path = Path("data/landing")
    warehouse_path: Path = Path("data/warehouse.duckdb")
    klaviyo_base_url: str = KLAVIYO_PRODUCTION_URL
    # Where Dagster keeps run history; None = `upstack sync` runs against a throwaway in-memory instance.
    dagster_home: Path | None = None
    # repr=False: a Settings object may end up in a log line or a traceback; the key must not.
    klaviyo_api_key: str | None = field(default=None, repr=False)
    # Events stamped further ahead of the ingestion clock than this are quarantined as `future_time`:
    # a pixel on a device with a wrong clock must not schedule flows days ahead.
    max_clock_skew: timedelta = timedelta(days=1)
    # Landing files are ingested in transactions of about this many bytes on disk, bounding memory on backfills.
    ingest_batch_bytes: int = 64 * 1024 * 1024

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            landing_dir=Path(env.get("UPSTACK_LANDING_DIR") or defaults.landing_dir),
            warehouse_path=Path(env.get("UPSTACK_WAREHOUSE") or defaults.warehouse_path),
            klaviyo_base_url=(env.get("KLAVIYO_BASE_URL") or defaults.klaviyo_base_url).rstrip("/"),
            klaviyo_api_key=env.get("KLAVIYO_API_KEY") or None,
            dagster_home=Path(env["DAGSTER_HOME"]) if env.get("DAGSTER_HOME") else None,
            ingest_batch_bytes=int(env.get("UPSTACK_INGEST_BATCH_BYTES") or defaults.ingest_batch_bytes),
        )

    @property
    def events_dir(self) -> Path:
        return self.landing_dir / "events"

    @property
    def customers_dir(self) -> Path:
        return self.landing_dir / "customers"

    def with_paths(self, *, landing_dir: Path | None = None, warehouse_path: Path | None = None) -> "Settings":
        return replace(
            self,
            landing_dir=landing_dir or self.landing_dir,
            warehouse_path=warehouse_path or self.warehouse_path,
        )
