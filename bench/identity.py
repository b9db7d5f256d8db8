"""Does an hourly identity run cost in proportion to the hour, not the history?

Simulates a history (default 3,000 visitors over 60 days), ingests all of it but the last six hours and resolves it
in one run (the full rebuild); then ingests each of the last six hours and resolves again, one run per hour, as
the hourly schedule would. Reports each hourly run's time as a share of the full run's, beside the share of the
events it brought: both measured in the same process, since absolute seconds on a shared machine mean little.

    .venv/bin/python bench/identity.py [--visitors 3000] [--days 60]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from upstack_pipeline.events import ingest_events
from upstack_pipeline.identity import resolve_identities
from upstack_pipeline.settings import Settings
from upstack_pipeline.sandbox.simulate import simulate
from upstack_pipeline.warehouse import Warehouse

HOURS = 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visitors", type=int, default=3000)
    parser.add_argument("--days", type=int, default=60)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        simulate(root / "all", visitors=args.visitors, days=args.days, seed=7,
                 end=datetime(2026, 11, 28, tzinfo=timezone.utc))
        hour_folders = sorted((root / "all" / "events").glob("dt=*/hour=*"))
        landing = root / "landing"
        (landing / "events").mkdir(parents=True)
        for folder in hour_folders[:-HOURS]:
            shutil.copytree(folder, landing / "events" / folder.parent.name / folder.name)
        settings = Settings(landing_dir=landing, warehouse_path=root / "warehouse.duckdb")
        now = datetime(2026, 11, 28, 1, tzinfo=timezone.utc)

        history_events = ingest_events(settings, now=now).ingested_rows
        started = time.perf_counter()
        resolve_identities(settings, now=now)
        full = time.perf_counter() - started
        print(f"history: {history_events:,} events; full identity run {full:.2f} s")

        for folder in hour_folders[-HOURS:]:
            shutil.copytree(folder, landing / "events" / folder.parent.name / folder.name)
            hour_events = ingest_events(settings, now=now).ingested_rows
            started = time.perf_counter()
            run = resolve_identities(settings, now=now)
            hourly = time.perf_counter() - started
            print(f"{folder.parent.name}/{folder.name}: {hour_events:>5,} new events "
                  f"({hour_events / history_events:6.2%} of history), {run.events_resolved:>5,} events resolved, "
                  f"{hourly:.2f} s ({hourly / full:6.1%} of the full run)")
        with Warehouse(settings.warehouse_path).connect() as connection:
            total = connection.execute("select count(*) from raw_events").fetchone()[0]
        print(f"total {total:,} events")


if __name__ == "__main__":
    main()
