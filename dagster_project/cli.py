"""`upstack`: the command line. Every command runs the same code as the Dagster UI, schedule and sensor."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import dagster as dg

from dagster_project.definitions import run_sync, sync_instance
from upstack_pipeline.evaluation import evaluate, format_evaluation
from upstack_pipeline.klaviyo.client import KlaviyoAuthError, KlaviyoClient, check_key
from upstack_pipeline.settings import Settings
from upstack_pipeline.simulate import simulate

# The demo's key for its own local emulator; it opens nothing anywhere else.
DEMO_KEY = "pk_demo_local_emulator_only"


def summarize(result: dg.ExecuteInProcessResult, seconds: float, instance_label: str) -> str:
    """What the run did, asset by asset (each asset's `summary` metadata), then its checks."""
    outcome = "succeeded" if result.success else "FAILED"
    lines = [f"upstack sync: run {result.run_id[:8]} {outcome} in {seconds:.1f} s (Dagster instance: {instance_label})"]
    for event in result.get_asset_materialization_events():
        summary = event.materialization.metadata.get("summary")
        lines.append(f"  {event.asset_key.to_user_string():<16} {summary.value if summary else 'materialized'}")
    checks = result.get_asset_check_evaluations()
    failed = [check for check in checks if not check.passed]
    lines.append(f"  {'checks':<16} {len(checks) - len(failed)} of {len(checks)} passed")
    for check in failed:
        lines.append(f"    {check.severity.value} {check.asset_key.to_user_string()}:{check.check_name}: "
                     f"{check.description or 'failed'}")
    for failure in result.get_step_failure_events():
        error = failure.step_failure_data.error
        while error is not None and error.cause is not None:  # Dagster wraps the exception that says what to do
            error = error.cause
        lines.append(f"  step {failure.step_key} failed: {error.message.strip() if error else 'unknown error'}")
    return "\n".join(lines)


def command_sync(settings: Settings) -> int:
    instance = sync_instance(settings)
    label = str(settings.dagster_home) if settings.dagster_home else "in-memory, set DAGSTER_HOME to keep history"
    started = time.monotonic()
    with instance:
        result = run_sync(settings, instance)
    print(summarize(result, time.monotonic() - started, label))
    failed_errors = [check for check in result.get_asset_check_evaluations()
                     if not check.passed and check.severity == dg.AssetCheckSeverity.ERROR]
    return 0 if result.success and not failed_errors else 1


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
    from upstack_pipeline.klaviyo.emulator import KlaviyoEmulator  # the `emulator` extra: Klaviyo's SDK models

    with KlaviyoEmulator(api_key=DEMO_KEY) as emulator:
        # The assets read Klaviyo's address and key from the environment at run time, as in production.
        os.environ.update(KLAVIYO_BASE_URL=emulator.base_url, KLAVIYO_API_KEY=DEMO_KEY)
        status = command_sync(demo_settings)
        accepted = emulator.accepted_by_metric()
    print(f"\nThe local Klaviyo emulator at {emulator.base_url} accepted "
          + (", ".join(f"{count:,} {metric}" for metric, count in sorted(accepted.items())) or "no events") + ".")
    if status == 0:
        print()
        command_evaluate(demo_settings, landing / "truth")
    print(
        f"\nThe warehouse is {demo_settings.warehouse_path}; its tables are described in the README. Try:\n"
        f"  .venv/bin/python -c \"import duckdb; duckdb.connect('{demo_settings.warehouse_path}', read_only=True)"
        f".sql('select reason, count(*) from quarantined_events group by all').show()\""
    )
    return status


def command_check_key(settings: Settings) -> int:
    """Does the configured key work, with the scopes delivery needs? Never prints the key."""
    if not settings.klaviyo_api_key:
        print("KLAVIYO_API_KEY is not set. Create a private key in Klaviyo (Settings > API keys) with Events: Write, "
              "Profiles: Write" + (" and Lists: Write" if settings.destination.list_id else "") + ", then export it.")
        return 1
    with KlaviyoClient(settings.klaviyo_base_url, settings.klaviyo_api_key, max_attempts=3) as client:
        try:
            verdicts = check_key(client, needs_list=settings.destination.list_id is not None)
        except KlaviyoAuthError as error:
            print(f"no: {error}")
            return 1
    for scope, granted in verdicts.items():
        print(f"{scope:<16} {'yes' if granted else 'NO: add this scope to the key in Klaviyo'}")
    return 0 if all(verdicts.values()) else 1


def command_evaluate(settings: Settings, truth_dir: Path) -> int:
    print(format_evaluation(evaluate(settings.warehouse_path, truth_dir)))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="upstack", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    simulate_parser = commands.add_parser("simulate", help="write realistic storefront traffic to a landing folder")
    simulate_parser.add_argument("out_dir", help="landing folder to create (events/, customers/, truth/)")
    simulate_parser.add_argument("--visitors", type=int, default=3000)
    simulate_parser.add_argument("--days", type=int, default=14)
    simulate_parser.add_argument("--seed", type=int, default=7)
    simulate_parser.add_argument("--end", type=datetime.fromisoformat, default=None,
                                 help="when the traffic ends, ISO 8601 with offset (default: this hour)")

    commands.add_parser("sync", help="run the whole pipeline once on UPSTACK_LANDING_DIR / UPSTACK_WAREHOUSE")

    evaluate_parser = commands.add_parser(
        "evaluate", help="score identity resolution in UPSTACK_WAREHOUSE against a simulation's ground truth")
    evaluate_parser.add_argument("--truth", default=None,
                                 help="the simulation's truth/ folder (default: UPSTACK_LANDING_DIR/truth)")

    klaviyo_parser = commands.add_parser("klaviyo", help="Klaviyo account tools")
    klaviyo_commands = klaviyo_parser.add_subparsers(dest="klaviyo_command", required=True)
    klaviyo_commands.add_parser("check-key", help="check KLAVIYO_API_KEY and its scopes (never prints the key)")

    emulator_parser = commands.add_parser("klaviyo-emulator", help="serve the local Klaviyo emulator")
    emulator_parser.add_argument("--port", type=int, default=8787)

    demo_parser = commands.add_parser("demo", help="simulate traffic into a fresh folder and sync it")
    demo_parser.add_argument("--dir", default="data/demo")
    demo_parser.add_argument("--visitors", type=int, default=3000)
    demo_parser.add_argument("--days", type=int, default=14)
    demo_parser.add_argument("--seed", type=int, default=7)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "simulate":
            return command_simulate(args)
        if args.command == "klaviyo-emulator":
            from upstack_pipeline.klaviyo.emulator import main as emulator_main  # the `emulator` extra

            return emulator_main(["--port", str(args.port)])
        settings = Settings.from_env()
        if args.command == "sync":
            return command_sync(settings)
        if args.command == "klaviyo":
            return command_check_key(settings)
        if args.command == "evaluate":
            return command_evaluate(settings, Path(args.truth) if args.truth else settings.landing_dir / "truth")
        return command_demo(args, settings)
    except (ValueError, OSError) as error:
        print(f"upstack {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
