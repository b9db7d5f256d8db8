"""A big store's backfill (issue 14, item 4): tens of millions of events in one `upstack sync`, peak memory bounded.

Builds the landing folder from a simulation bench/scale.py kept (`--source`, its `simulation/` folder): K copies of
its events, each copy a store's worth of other shoppers (event, browser and session ids and emails get the copy's
prefix, so nothing is a duplicate of another copy; the _kx links stay shared, as a forwarded email's would), plus its
customers export. Then one `upstack sync` over all of it, in a process of its own with UPSTACK_DUCKDB_MEMORY_LIMIT
(default 4GB) and no Klaviyo key (the backfill's events go as Klaviyo backfill anyway; delivery is bench/delivery.py's
business), timed from start to exit, its peak resident set taken from `wait4`, and each step's seconds.

    .venv/bin/python bench/scale.py --dir /tmp/scale        # once: keeps /tmp/scale/simulation
    .venv/bin/python bench/backfill.py --source /tmp/scale/simulation [--copies 31] [--memory-limit 4GB]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

from scale import SCRIPT as SCALE_SCRIPT  # the sync child: `upstack sync` and each step's seconds
from scale import run_measured

# The fields whose values make one shopper another: each copy prefixes them.
PREFIXED = (b'"event_id":"', b'"anonymous_id":"', b'"session_id":"', b'"email":"')


def log(message: str) -> None:
    print(f"[backfill {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_landing(source: Path, landing: Path, copies: int) -> int:
    """The copies' event files under landing/events/copy=K/..., gzip level 1 (written fast; read like any other)."""
    files = sorted((source / "events").rglob("*.ndjson.gz"))
    lines = 0
    for copy in range(copies):
        prefix = f"c{copy:03d}-".encode()
        for path in files:
            data = gzip.decompress(path.read_bytes())
            for field in PREFIXED:
                data = data.replace(field, field + prefix)
            target = landing / "events" / f"copy={copy:03d}" / path.relative_to(source / "events")
            target.parent.mkdir(parents=True, exist_ok=True)
            compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: the gzip container
            target.write_bytes(compressor.compress(data) + compressor.flush())
            lines += data.count(b"\n")
        log(f"copy {copy + 1} of {copies} written ({lines:,} lines so far)")
    shutil.copytree(source / "customers", landing / "customers")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a simulation folder bench/scale.py kept (events/, customers/)")
    parser.add_argument("--copies", type=int, default=31, help="31 copies of bench/scale.py's default: 20 million")
    parser.add_argument("--memory-limit", default="4GB", help="UPSTACK_DUCKDB_MEMORY_LIMIT for the sync")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    try:
        landing, warehouse = root / "landing", root / "warehouse.duckdb"
        for suffix in ("", ".wal", ".analytics.duckdb"):
            Path(f"{warehouse}{suffix}").unlink(missing_ok=True)
        built = root / "landing.json"  # what the landing folder holds, so a rerun with --dir reuses it
        wanted = {"source": str(Path(args.source).absolute()), "copies": args.copies}
        if built.is_file() and json.loads(built.read_text())["built"] == wanted:
            lines = json.loads(built.read_text())["lines"]
            log(f"reusing the landing folder in {landing}")
        else:
            shutil.rmtree(landing, ignore_errors=True)
            started = time.perf_counter()
            lines = build_landing(Path(args.source), landing, args.copies)
            built.write_text(json.dumps({"built": wanted, "lines": lines}))
            log(f"{lines:,} lines in {time.perf_counter() - started:.0f} s")
        log(f"syncing with a {args.memory_limit} DuckDB memory limit")
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("UPSTACK_", "KLAVIYO_")) and name != "DAGSTER_HOME"}
        env.update(UPSTACK_LANDING_DIR=str(landing), UPSTACK_WAREHOUSE=str(warehouse),
                   UPSTACK_DUCKDB_MEMORY_LIMIT=args.memory_limit, UPSTACK_DUCKDB_TEMP_DIR=str(root / "spill"))
        out = root / "sync.json"
        seconds, peak, output = run_measured([sys.executable, SCALE_SCRIPT, "--sync-child", str(out)], env=env)
        steps = json.loads(out.read_text())["steps"]
        size = sum(path.stat().st_size for path in root.glob("warehouse.duckdb*"))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"Backfill: {lines:,} landing lines ({args.copies} copies of {args.source}) in one `upstack sync`, "
          f"DuckDB memory limit {args.memory_limit}, {os.cpu_count()} cores.\n")
    print(output.strip().splitlines()[0])
    print(f"\n| measure | value |\n| --- | --- |\n| whole sync, process start to exit | {seconds:,.0f} s |")
    for step, step_seconds in steps.items():
        print(f"| step `{step}` | {step_seconds:,.0f} s |")
    print(f"| peak memory, max RSS | {peak / 2**30:.2f} GiB |")
    print(f"| events per second | {lines / seconds:,.0f} |")
    print(f"| warehouse files | {size / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
