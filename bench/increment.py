"""Do identity, mapping and analytics cost in proportion to what is new (issue 14, item 2)?

Over a simulation's landing folder (bench/scale.py's `--dir`, or any folder with events/dt=.../hour=.../ files and
an optional customers/ folder), times in one process, with no Dagster and no ingestion inside the timings, what
the sync's identity_resolution, klaviyo_mapping and analytics steps run (the library call, the overview and the
table metadata each step records):
  full:     every day but the last (ingested once, before any trial, into a warehouse copied for each trial);
  day:      the last day's files ingested (not timed), then the three steps again;
  nothing:  the three steps again with nothing new.
Prints each step's seconds per phase (the median of `--trials`, with the spread), the day's cost net of the
nothing-new run as a share of the full run's against the day's share of the events (the acceptance: at most 2x),
and with `--profile` the seconds of each identity SQL file. `--digest FILE` writes a digest of resolved_events,
identities, klaviyo_outbox, klaviyo_skipped and every published analytics table after each phase, to compare
two versions of the code on the same folder (run it with PYTHONPATH set to the other version's checkout);
`--digest-without-stamps` leaves the run stamps out (resolved_events.resolved_at, identities.updated_at), for two
versions that rewrite different rows with the same content.

    .venv/bin/python bench/increment.py /tmp/scale-1203/simulation [--trials 3] [--profile] [--digest FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb

from dagster_project.defs.analytics import ANALYTICS_VIEWS
from dagster_project.defs.identity import IDENTITY_TABLES
from dagster_project.defs.klaviyo import MAPPING_TABLES
from dagster_project.metadata import table_metadata, view_metadata
from upstack_pipeline import analytics, identity
from upstack_pipeline.customers import ingest_customers
from upstack_pipeline.events import ingest_events
from upstack_pipeline.klaviyo import mapping
from upstack_pipeline.settings import Settings

STEPS = ("identity", "mapping", "analytics")
# Digested after each phase: what a change to these steps must leave exactly as it was.
DIGESTED = ("resolved_events", "identities", "klaviyo_outbox", "klaviyo_skipped", "identity_links",
            "identity_observations", "identity_rejected_values", "browser_clusters", "identity_flags")


# Each step of a sync reads the clock when it starts (dagster_project.resources.UpstackResource.now): mapping after
# identity, analytics after mapping. With one clock for the three, mapping, which takes the rows identity stamped at or
# after its own last run's time, would look again the next run at every row this run's identity wrote.
# (A replay's sync, run `as_of` a past moment, does give its steps one clock: the next run's mapping then
# reads those rows again and finds them mapped, the same outcome at a higher cost.)
STEP_APART = timedelta(seconds=1)


def run_steps(settings: Settings, now: datetime, profile: dict[str, float] | None) -> dict[str, float]:
    """The three steps as the Dagster steps run them, each timed, each with its own clock (STEP_APART)."""
    seconds = {}
    started = time.perf_counter()
    last = [started]

    def after_step(connection: duckdb.DuckDBPyConnection, step: str) -> None:
        moment = time.perf_counter()
        if profile is not None:
            profile[step] = profile.get(step, 0.0) + moment - last[0]
        last[0] = moment

    identity.resolve_identities(settings, now=now, after_step=after_step if profile is not None else None)
    if profile is not None:
        profile["(commit)"] = profile.get("(commit)", 0.0) + time.perf_counter() - last[0]
        overview_started = time.perf_counter()
    identity.overview(settings)
    table_metadata(settings.warehouse(), IDENTITY_TABLES)
    if profile is not None:
        profile["(overview)"] = profile.get("(overview)", 0.0) + time.perf_counter() - overview_started
    seconds["identity"] = time.perf_counter() - started

    started = time.perf_counter()
    mapping.map_events(settings, now=now + STEP_APART)
    mapping.overview(settings, now=now + STEP_APART)
    table_metadata(settings.warehouse(), MAPPING_TABLES)
    seconds["mapping"] = time.perf_counter() - started

    started = time.perf_counter()
    state = analytics.refresh(settings, now=now + 2 * STEP_APART)
    view_metadata(settings.warehouse(), ANALYTICS_VIEWS, state.rows)
    seconds["analytics"] = time.perf_counter() - started
    return seconds


# What --digest-without-stamps leaves out: the time of the run that last wrote a row, not what the row says.
STAMPS = {"resolved_events": "resolved_at", "identities": "updated_at"}


def digest(settings: Settings, *, without_stamps: bool = False) -> dict[str, str]:
    """Order-free digests: the rows as text, hashed, the hashes sorted and hashed again."""
    def table_digest(connection: duckdb.DuckDBPyConnection, table: str) -> str:
        return connection.execute(f"""
            select count(*) || ':' || coalesce(md5(string_agg(row_hash, '' order by row_hash)), '')
            from (select md5(cast(t as varchar)) as row_hash from {table} as t)""").fetchone()[0]

    with settings.warehouse().connect() as connection:
        found = {table: table_digest(connection, table) for table in DIGESTED}
        if without_stamps:
            for table, stamp in STAMPS.items():
                found[table] = table_digest(connection, f"(select * exclude ({stamp}) from {table})")
    published = analytics.analytics_path(settings.warehouse_path)
    with duckdb.connect(str(published), read_only=True) as connection:
        for (table,) in connection.execute("select table_name from duckdb_tables() order by 1").fetchall():
            found[f"analytics.{table}"] = table_digest(connection, table)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("simulation", type=Path)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="seconds of each identity SQL file, per phase")
    parser.add_argument("--digest", type=Path, help="write the tables' digests after each phase (first trial)")
    parser.add_argument("--digest-without-stamps", action="store_true",
                        help="digest without resolved_events.resolved_at and identities.updated_at: for versions that "
                             "rewrite different rows with the same content")
    parser.add_argument("--keep", type=Path, help="build the base warehouse here and reuse it if it is there")
    args = parser.parse_args()

    days = sorted((args.simulation / "events").glob("dt=*"))
    # As bench/scale.py's syncs see it: the afternoon after the simulation's last day, every session idle.
    now = datetime.fromisoformat(days[-1].name[3:]).replace(tzinfo=timezone.utc) + timedelta(days=1, hours=18)
    with tempfile.TemporaryDirectory(dir=args.keep.parent if args.keep else None) as scratch:
        root = args.keep or Path(scratch)
        landing = root / "landing"
        base = root / "base.duckdb"
        if not base.exists():
            shutil.rmtree(landing, ignore_errors=True)
            for day in days[:-1]:
                shutil.copytree(day, landing / "events" / day.name, copy_function=_link)
            if (args.simulation / "customers").exists():
                shutil.copytree(args.simulation / "customers", landing / "customers", copy_function=_link)
            settings = Settings(landing_dir=landing, warehouse_path=base)
            ingest_customers(settings, now=now)
            ingest_events(settings, now=now)
        shutil.rmtree(landing / "events" / days[-1].name, ignore_errors=True)
        with duckdb.connect(str(base), read_only=True) as connection:
            full_events = connection.execute("select count(*) from raw_events").fetchone()[0]

        phases = ("full", "day", "nothing")
        times: dict[str, dict[str, list[float]]] = {phase: {step: [] for step in STEPS} for phase in phases}
        profiles: dict[str, dict[str, float]] = {phase: {} for phase in phases}
        digests: dict[str, dict[str, str]] = {}
        day_events = 0
        for trial in range(args.trials):
            warehouse = root / "trial.duckdb"
            for stale in root.glob("trial*"):
                stale.unlink()
            shutil.copyfile(base, warehouse)
            settings = Settings(landing_dir=landing, warehouse_path=warehouse)
            with settings.warehouse().connect():
                pass  # this release's migrations, if the base is older, before anything is timed
            for phase in phases:
                if phase == "day":
                    shutil.copytree(days[-1], landing / "events" / days[-1].name, copy_function=_link)
                    day_events = ingest_events(settings, now=now).ingested_rows
                # An hour apart, as hourly syncs are: a step that keeps its last run's time tells what came since.
                phase_now = now + timedelta(hours=phases.index(phase))
                seconds = run_steps(settings, phase_now, profiles[phase] if args.profile and trial == 0 else None)
                for step in STEPS:
                    times[phase][step].append(seconds[step])
                if args.digest and trial == 0:
                    digests[phase] = digest(settings, without_stamps=args.digest_without_stamps)
            shutil.rmtree(landing / "events" / days[-1].name)
        if args.digest:
            args.digest.write_text(json.dumps(digests, indent=1, sort_keys=True))

    share = day_events / (full_events + day_events)
    print(f"full: {full_events:,} events; one more day: {day_events:,} events ({share:.1%} of the total); "
          f"{args.trials} trials, median seconds (min-max)")
    print("| step | full | one more day | nothing new | day net of nothing, share of full | x its event share |")
    print("|---|---|---|---|---|---|")
    totals = {phase: 0.0 for phase in phases}
    for step in STEPS:
        medians = {phase: statistics.median(times[phase][step]) for phase in phases}
        for phase in phases:
            totals[phase] += medians[phase]
        net = (medians["day"] - medians["nothing"]) / medians["full"]
        cells = " | ".join(f"{medians[phase]:.2f} ({min(times[phase][step]):.2f}-{max(times[phase][step]):.2f})"
                           for phase in phases)
        print(f"| {step} | {cells} | {net:.1%} | {net / share:.2f} |")
    net = (totals["day"] - totals["nothing"]) / totals["full"]
    print(f"| all three | {totals['full']:.2f} | {totals['day']:.2f} | {totals['nothing']:.2f} | {net:.1%} | "
          f"{net / share:.2f} |")
    if args.profile:
        print("\nidentity, seconds per SQL file (first trial):")
        for step in profiles["full"]:
            print(f"  {step:32} " + "  ".join(f"{phase} {profiles[phase].get(step, 0.0):6.2f}" for phase in phases))


def _link(source: str, target: str) -> None:
    """Hard links: the trial's landing folder costs no copy, and the ingestion sees ordinary files."""
    Path(target).hardlink_to(source)


if __name__ == "__main__":
    main()
