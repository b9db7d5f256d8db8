"""Many shops on one machine (issue 15): total throughput with 1, 2 and 3 shops syncing side by side.

Simulates three shops (default 20,000 people over 14 days each, other seeds, so three different stores), declares
them in one shops file, then for K = 1, 2, 3 starts K `upstack sync --shop NAME` processes at once on fresh
warehouses, as the daemon launches one run per shop (the run queue allows one per shop, several shops at a time),
and times the wall clock from the first start to the last exit. Throughput is the events ingested by all K shops
per second; each K is reported as a ratio to one shop, measured in the same run. No Klaviyo key: the shops' events
wait in their outboxes, so the figures are the pipeline's own work (Klaviyo's limits are per account and pace
delivery on their own).

    .venv/bin/python bench/shops.py [--people 20000] [--days 14] [--repeat 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from scale import remove_warehouse

SHOPS = ("north", "south", "east")


def log(message: str) -> None:
    print(f"[shops {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def simulate_shops(root: Path, people: int, days: int) -> dict[str, int]:
    """Each shop's landing folder under root/<shop>/landing (kept for a rerun with the same parameters); its
    events."""
    from upstack_pipeline.sandbox.simulate import simulate

    end = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    wanted = {"people": people, "days": days, "end": end.isoformat()}
    record = root / "shops.json"
    if record.is_file() and json.loads(record.read_text()).get("world") == wanted:
        log(f"reusing the simulated shops in {root}")
        return json.loads(record.read_text())["events"]
    events = {}
    for seed, shop in enumerate(SHOPS, start=1):
        shutil.rmtree(root / shop, ignore_errors=True)
        summary = simulate(root / shop / "landing", visitors=people, days=days, seed=seed, end=end,
                           shop=f"{shop}.myshopify.com")
        events[shop] = summary.events
        log(f"simulated {shop}: {summary.events:,} events")
    record.write_text(json.dumps({"world": wanted, "events": events}))
    return events


def sync_at_once(root: Path, shops: tuple[str, ...]) -> float:
    """Seconds from starting one `upstack sync --shop` process per shop to the last one's exit."""
    for shop in SHOPS:
        remove_warehouse(root / shop / "warehouse.duckdb")
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("UPSTACK_", "KLAVIYO_")) and name != "DAGSTER_HOME"}
    env["UPSTACK_SHOPS_FILE"] = str(root / "shops.yaml")
    upstack = str(Path(sys.executable).parent / "upstack")
    started = time.perf_counter()
    processes = [subprocess.Popen([upstack, "sync", "--shop", shop], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for shop in shops]
    outputs = [process.communicate()[0] for process in processes]
    seconds = time.perf_counter() - started
    for shop, process, output in zip(shops, processes, outputs):
        if process.returncode != 0:
            raise SystemExit(f"upstack sync --shop {shop} exited {process.returncode}:\n{output[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each K; the fastest counts")
    parser.add_argument("--dir", default=None, help="keep the simulated shops here for the next run")
    args = parser.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-shops-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        events = simulate_shops(root, args.people, args.days)
        (root / "shops.yaml").write_text("shops:\n" + "".join(
            f"  {shop}:\n    landing_dir: {shop}/landing\n    warehouse: {shop}/warehouse.duckdb\n" for shop in SHOPS))
        rows = []
        for count in (1, 2, 3):
            shops = SHOPS[:count]
            seconds = min(sync_at_once(root, shops) for _ in range(args.repeat))
            rows.append((count, sum(events[shop] for shop in shops), seconds))
            log(f"{count} shop(s): {seconds:.1f} s")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    base = rows[0][1] / rows[0][2]
    print(f"Shops side by side: {args.people:,} people over {args.days} days per shop, one `upstack sync --shop` "
          f"process per shop, all started at once, fresh warehouses; {os.cpu_count()} cores; fastest of "
          f"{args.repeat}.\n")
    print("| shops at once | events | seconds, first start to last exit | events per second | "
          "throughput against one shop |")
    print("| --- | --- | --- | --- | --- |")
    for count, total, seconds in rows:
        print(f"| {count} | {total:,} | {seconds:.1f} | {total / seconds:,.0f} | {total / seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
