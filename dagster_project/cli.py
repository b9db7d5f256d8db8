"""`upstack`: the command line. Every command runs the same code as the Dagster UI, schedule and sensor."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import dagster as dg

from dagster_project.definitions import run_sync, sync_instance
from upstack_pipeline.settings import Settings
from upstack_pipeline.simulate import simulate

def summarize(result: dg.ExecuteInProcessResult, seconds: float, instance_label: str) -> str:
    outcome = "succeeded" if result.success else "FAILED"
    lines = [f"upstack sync: run {result.run_id[:8]} {outcome} in {seconds:.1f} s (Dagster instance: {instance_label})"]
    for event in result.get_asset_materialization_events():
        metadata = {key: value.value for key, value in event.materialization.metadata.items()}
        lines.append(f"  {event.asset_key.to_user_string():<12} " + _describe_ingestion(metadata))
    for check in result.get_asset_check_evaluations():
        status = "passed" if check.passed else f"FAILED ({check.severity.value.lower()})"
        lines.append(f"  check {check.asset_key.to_user_string()}:{check.check_name} {status}")
    for failure in result.get_step_failure_events():
        error = failure.step_failure_data.error
        lines.append(f"  step {failure.step_key} failed: {error.message.strip() if error else 'unknown error'}")
    return "\n".join(lines)


def _describe_ingestion(metadata: dict) -> str:
    reasons = ", ".join(f"{reason} {count}" for reason, count in (metadata.get("quarantined_by_reason") or {}).items())
    parts = [
        f"files read {metadata.get('files_read', 0):,}",
        f"rows ingested {metadata.get('rows_ingested', 0):,}",
        f"duplicates skipped {metadata.get('duplicates_skipped', 0):,}",
        f"quarantined {metadata.get('rows_quarantined', 0):,}" + (f" ({reasons})" if reasons else ""),
        f"table rows {metadata.get('dagster/row_count', 0):,}",
    ]
    if metadata.get("unreadable_files"):
        parts.append(f"unreadable files {len(metadata['unreadable_files'])}")
    if metadata.get("changed_files"):
        parts.append(f"changed files {len(metadata['changed_files'])}")
    return " · ".join(parts)


def command_sync(settings: Settings) -> int:
    instance = sync_instance(settings)
    label = str(settings.dagster_home) if settings.dagster_home else "in-memory, set DAGSTER_HOME to keep history"
    started = time.monotonic()
    with instance:
        result = run_sync(settings, instance)
    print(summarize(result, time.monotonic() - started, label))
    return 0 if result.success else 1


def command_simulate(args: argparse.Namespace) -> int:
    summary = simulate(Path(args.out_dir), visitors=args.visitors, days=args.days, seed=args.seed, end=args.end)
    print(
        f"upstack simulate: {summary.people:,} people, {summary.events:,} events in {summary.event_files:,} files "
        f"({summary.duplicate_lines:,} pixel retries, {summary.bad_lines:,} bad lines), "
        f"{summary.customers:,} customers -> {summary.out_dir}"
    )
    return 0


def command_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Fresh simulated traffic in a folder of its own, then one sync over it."""
    demo_dir = Path(args.dir)
    if demo_dir.exists():
        shutil.rmtree(demo_dir)
    landing = demo_dir / "landing"
    summary = simulate(landing, visitors=args.visitors, days=args.days, seed=args.seed)
    print(
        f"Simulated {summary.people:,} shoppers over {args.days} days: {summary.events:,} events in "
        f"{summary.event_files:,} files, with {summary.duplicate_lines:,} pixel retries and {summary.bad_lines:,} "
        f"bad lines mixed in.\n"
    )
    demo_settings = settings.with_paths(landing_dir=landing, warehouse_path=demo_dir / "warehouse.duckdb")
    status = command_sync(demo_settings)
    print(f"\nWarehouse: {demo_settings.warehouse_path} (open it with duckdb to explore; tables are listed in the README)")
    return status


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="upstack", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    simulate_parser = commands.add_parser("simulate", help="write realistic storefront traffic to a landing folder")
    simulate_parser.add_argument("out_dir", help="landing folder to create (events/, customers/, truth/)")
    simulate_parser.add_argument("--visitors", type=int, default=3000)
    simulate_parser.add_argument("--days", type=int, default=3)
    simulate_parser.add_argument("--seed", type=int, default=7)
    simulate_parser.add_argument("--end", type=datetime.fromisoformat, default=None,
                                 help="when the traffic ends, ISO 8601 with offset (default: this hour)")

    commands.add_parser("sync", help="run the whole pipeline once on UPSTACK_LANDING_DIR / UPSTACK_WAREHOUSE")

    demo_parser = commands.add_parser("demo", help="simulate traffic into a fresh folder and sync it")
    demo_parser.add_argument("--dir", default="data/demo")
    demo_parser.add_argument("--visitors", type=int, default=3000)
    demo_parser.add_argument("--days", type=int, default=3)
    demo_parser.add_argument("--seed", type=int, default=7)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "simulate":
            return command_simulate(args)
        settings = Settings.from_env()
        if args.command == "sync":
            return command_sync(settings)
        return command_demo(args, settings)
    except (ValueError, OSError) as error:
        print(f"upstack {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
