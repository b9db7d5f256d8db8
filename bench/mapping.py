"""What checking Klaviyo's limits costs the mapping, against checking every payload in Python.

The mapping (the `klaviyo_mapping` step) must never queue a payload Klaviyo would refuse. `sql/klaviyo_outbox.sql` marks
the rows past a cheap bound of the limits and only those are judged in Python (`limits.event_violations`). This
simulates traffic (default 3,000 visitors over 60 days), maps it in send mode `all` (the most rows), and reports,
measured in the same process: the mapping's time, the rows the bound sent to Python, and the time the exact check
would take over every row (the alternative the bound avoids), as a share of the mapping's.

    .venv/bin/python bench/mapping.py [--visitors 3000] [--days 60]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from upstack_pipeline.events import ingest_events
from upstack_pipeline.identity import resolve_identities
from upstack_pipeline.klaviyo import limits
from upstack_pipeline.klaviyo.mapping import map_events
from upstack_pipeline.settings import Settings
from upstack_pipeline.sandbox.simulate import simulate
from upstack_pipeline.warehouse import Warehouse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visitors", type=int, default=3000)
    parser.add_argument("--days", type=int, default=60)
    args = parser.parse_args()
    end = datetime(2026, 11, 28, tzinfo=timezone.utc)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        simulate(root / "landing", visitors=args.visitors, days=args.days, seed=7, end=end)
        settings = Settings(landing_dir=root / "landing", warehouse_path=root / "warehouse.duckdb")
        settings = replace(settings, destination=replace(settings.destination, send_mode="all"))
        ingest_events(settings, now=end)
        resolve_identities(settings, now=end)

        started = time.perf_counter()
        run = map_events(settings, now=end)
        mapping = time.perf_counter() - started

        with Warehouse(settings.warehouse_path).connect() as connection:
            rows = connection.execute("select profile, event from klaviyo_outbox").fetchall()
        started = time.perf_counter()
        refused = sum(bool(limits.event_violations(json.loads(event), json.loads(profile), now=end))
                      for profile, event in rows)
        every_row = time.perf_counter() - started

    print(f"{run.events_decided:,} events decided into {run.outbox_rows:,} outbox rows in {mapping:.2f} s; "
          f"{run.reviewed_for_limits} events past the SQL's bound were judged in Python")
    print(f"the exact check on every row in Python instead: {every_row:.2f} s = {every_row / mapping:.0%} of the "
          f"mapping ({refused} rows beyond a limit)")


if __name__ == "__main__":
    main()
