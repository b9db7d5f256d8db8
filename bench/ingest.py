"""How ingestion compares with DuckDB reading the same files on its own.

Writes N realistic events as hourly gzip NDJSON files, then times, in the same process and run:
  baseline: DuckDB `create table as select * from read_json(files)` (parse + type, no checks, no bookkeeping)
  ours:     `upstack_pipeline.events.ingest_events` into a fresh warehouse (contract checks, quarantine,
            duplicate removal, file ledger)
and reports ours as a multiple of the baseline, since absolute seconds on a shared 2-core machine mean little.
`--retries N` adds N pixel retries re-serialised (half with other spacing, half with keys sorted too), each in
the file after its first sighting, to time the retry-versus-conflict comparison; all must count as duplicates.

`--landing DIR` takes an existing landing folder instead (e.g. bench/scale.py's simulation, whose events are in
day folders `events/dt=YYYY-MM-DD/...`) and times what a store's syncs do: the baseline over every day but the
last, ours over the same days (full), then the last day's files added (one more day), then again with nothing
new; the increment, net of nothing new, is set against its share of the events, in seconds and in CPU seconds.
The CPU seconds include, after each ingestion, the checkpoint the next stage's connection makes (it writes a table
of its own, raw_events untouched): a DuckDB checkpoint vacuums every table, so a merge of raw_events' row groups
that ingestion's own checkpoint skipped is paid there, by the same sync, and must count. raw_events' last row
groups are printed after each step.
Files are hard-linked (or copied) into a scratch landing folder, so DIR is never written. `--repeat N` runs it all
N times, each with a fresh warehouse and its own baseline, since one run on a shared machine is noise.

    .venv/bin/python bench/ingest.py [--events 1000000] [--files 24] [--retries 0]
    .venv/bin/python bench/ingest.py --landing DIR [--repeat 2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb

from upstack_pipeline.events import ingest_events
from upstack_pipeline.settings import Settings

NAMES = ["PageView", "ViewContent", "ViewContent", "AddToCart", "InitiateCheckout", "Purchase"]


def write_landing(root: Path, events: int, files: int, seed: int = 1, retries: int = 0) -> list[Path]:
    rng = random.Random(seed)
    start = datetime(2026, 11, 27, tzinfo=timezone.utc)
    per_file = events // files
    paths, previous = [], []
    for index in range(files):
        lines = []
        for number in range(retries // (files - 1) + (index <= retries % (files - 1)) if index else 0):
            lines.append(json.dumps(json.loads(rng.choice(previous)), separators=(",", ":"), sort_keys=number % 2 == 1))
        for number in range(per_file):
            event_id = f"{index:03d}-{number:07d}"
            lines.append(json.dumps({
                "event_id": event_id,
                "event_name": rng.choice(NAMES),
                "event_time": (start + timedelta(hours=index, seconds=number % 3600)).isoformat(),
                "shop": "acme.myshopify.com",
                "anonymous_id": f"anon-{rng.randrange(200_000):06d}",
                "session_id": f"sess-{rng.randrange(1_000_000):07d}",
                "event_source_url": f"https://acme.myshopify.com/products/p{rng.randrange(60)}?utm_source=klaviyo",
                "user_data": {"email": f"shopper{rng.randrange(50_000)}@gmail.com" if rng.random() < 0.1 else None,
                              "klaviyo_identified": rng.random() < 0.3,
                              "client_ip_address": f"10.{rng.randrange(256)}.{rng.randrange(256)}.1",
                              "client_user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X)"},
                "custom_data": {"value": 29.5, "currency": "USD",
                                "items": [{"id": f"p{rng.randrange(60)}", "name": "Mug", "price": 29.5,
                                           "quantity": 1, "sku": "MUG-1"}]},
                "consent": {"analytics": True, "marketing": True, "sale_of_data": False},
            }))
        previous = lines[-per_file:]
        path = root / "events" / f"dt=2026-11-27/hour={index:02d}" / "part-0000.ndjson.gz"
        path.parent.mkdir(parents=True)
        path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=6))
        paths.append(path)
    return paths


def read_json_seconds(database: Path, paths: list[Path]) -> float:
    """DuckDB on its own: every file parsed and typed into a table (bad lines skipped, as the simulator writes some)."""
    database.unlink(missing_ok=True)
    started = time.perf_counter()
    with duckdb.connect(str(database)) as connection:
        connection.execute("create table raw as select * from read_json(?, format = 'newline_delimited', "
                           "ignore_errors = true)", [[str(path) for path in paths]])
    seconds = time.perf_counter() - started
    database.unlink(missing_ok=True)
    return seconds


def link_tree(files: list[Path], source: Path, target: Path) -> None:
    for path in files:
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:  # another file system
            shutil.copy2(path, destination)


def timed_ingest(settings: Settings) -> tuple[float, float, int]:
    """(seconds, CPU seconds of every thread of this process, lines read)."""
    started, cpu = time.perf_counter(), time.process_time()
    report = ingest_events(settings, now=datetime.now(timezone.utc))
    return time.perf_counter() - started, time.process_time() - cpu, report.lines


def later_checkpoint_cpu(settings: Settings) -> float:
    """CPU seconds of the next stage's checkpoint: a connection that writes a table of its own and closes."""
    with settings.warehouse().connect() as connection:
        connection.execute("create or replace table bench_next_stage as select now() as at")
        cpu = time.process_time()
    return time.process_time() - cpu


def last_row_groups(settings: Settings, count: int = 4) -> list[int]:
    """The rows of raw_events' last row groups: partly filled ones are what a checkpoint's vacuum merges."""
    with settings.warehouse().connect(read_only=True) as connection:
        rows = connection.execute("""
            select sum(count) from pragma_storage_info('raw_events')
            where column_id = 0 and column_path = '[0]' group by row_group_id order by row_group_id
        """).fetchall()
    return [row for (row,) in rows[-count:]]


def existing_landing(landing: Path, repeat: int) -> None:
    """Full sync, one more day, nothing new, each against read_json of the full sync's files in the same run."""
    days = sorted(folder for folder in (landing / "events").iterdir() if folder.is_dir())
    if len(days) < 2:
        raise SystemExit(f"{landing}/events needs at least two day folders: the last one is the increment")
    event_files = {day: sorted(path for path in day.rglob("*") if path.is_file() and not path.name.startswith((".", "_")))
                   for day in days}
    full_files = [path for day in days[:-1] for path in event_files[day]]
    print(f"{landing}: {len(full_files)} files in {len(days) - 1} day folders, then {days[-1].name} "
          f"({len(event_files[days[-1]])} files)")
    for run in range(1, repeat + 1):
        with tempfile.TemporaryDirectory(prefix="upstack-ingest-") as scratch:
            root = Path(scratch)
            baseline = read_json_seconds(root / "baseline.duckdb", full_files)
            link_tree(full_files, landing, root / "landing")
            settings = Settings(landing_dir=root / "landing", warehouse_path=root / "warehouse.duckdb")
            full, full_cpu, full_lines = timed_ingest(settings)
            full_later, full_groups = later_checkpoint_cpu(settings), last_row_groups(settings)
            link_tree(event_files[days[-1]], landing, root / "landing")
            day, day_cpu, day_lines = timed_ingest(settings)
            day_groups = last_row_groups(settings)
            day_later, day_later_groups = later_checkpoint_cpu(settings), last_row_groups(settings)
            nothing, nothing_cpu, nothing_lines = timed_ingest(settings)
            nothing_later = later_checkpoint_cpu(settings)
            assert nothing_lines == 0, nothing_lines
        full_cpu, day_cpu, nothing_cpu = full_cpu + full_later, day_cpu + day_later, nothing_cpu + nothing_later
        share, cost, cpu_cost = day_lines / full_lines, (day - nothing) / full, (day_cpu - nothing_cpu) / full_cpu
        print(f"run {run}: read_json {baseline:5.2f} s | full {full:5.2f} s = {full / baseline:.2f}x "
              f"({full_lines:,} lines) | one more day {day:5.2f} s = {day / baseline:.2f}x ({day_lines:,} lines) | "
              f"nothing new {nothing:5.2f} s = {nothing / baseline:.2f}x | increment net of nothing new: "
              f"{cost:.1%} of the full ingestion for {share:.1%} of its lines = {cost / share:.1f}x its share",
              flush=True)
        # CPU seconds are less disturbed by other processes on a shared machine than seconds are, so they show a
        # fixed cost of the increment even when the clock is noisy (they do not show lost parallelism).
        print(f"       CPU: full {full_cpu:5.2f} s | one more day {day_cpu:5.2f} s | nothing new {nothing_cpu:5.2f} s | "
              f"increment net of nothing new: {cpu_cost:.1%} of the full ingestion's CPU = "
              f"{cpu_cost / share:.1f}x its share", flush=True)
        print(f"       of which the next stage's checkpoint: after full {full_later:4.2f} s | one more day "
              f"{day_later:4.2f} s | nothing new {nothing_later:4.2f} s; raw_events' last row groups: full "
              f"{full_groups}, one more day {day_groups}, after the next stage {day_later_groups}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--retries", type=int, default=0)
    parser.add_argument("--landing", type=Path, help="time an existing landing folder (see above)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if args.landing:
        existing_landing(args.landing, args.repeat)
        return

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        paths = write_landing(root / "landing", args.events, args.files, retries=args.retries)
        events = args.events // args.files * args.files

        started = time.perf_counter()
        with duckdb.connect(str(root / "baseline.duckdb")) as connection:
            connection.execute("create table raw as select * from read_json(?, format = 'newline_delimited')",
                               [[str(path) for path in paths]])
        baseline = time.perf_counter() - started

        settings = Settings(landing_dir=root / "landing", warehouse_path=root / "warehouse.duckdb")
        started = time.perf_counter()
        report = ingest_events(settings, now=datetime.now(timezone.utc))
        ours = time.perf_counter() - started
        assert report.ingested_rows == events, report
        assert (report.duplicate_rows, report.quarantined_rows) == (args.retries, 0), report

    print(f"events: {events:,} in {args.files} gzip NDJSON files, plus {args.retries:,} re-serialised retries")
    print(f"DuckDB read_json into a table (baseline): {baseline:6.2f} s  {events / baseline:>12,.0f} events/s")
    print(f"upstack ingest_events:                     {ours:6.2f} s  {events / ours:>12,.0f} events/s")
    print(f"ingestion takes {ours / baseline:.1f}x the baseline")


if __name__ == "__main__":
    main()
