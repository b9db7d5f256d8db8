"""`upstack`: the command line. Every command runs the same code as the Dagster UI, schedule and sensor."""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import dagster as dg
import duckdb

from dagster_project.definitions import run_sync, sync_instance
from dagster_project.metadata import plural
from upstack_pipeline.analytics import analytics_path
from upstack_pipeline.klaviyo.client import (
    KlaviyoAddressError,
    KlaviyoAuthError,
    KlaviyoDestinationError,
    KlaviyoRateLimitedError,
    KlaviyoRevisionError,
    KlaviyoUnavailableError,
    check_key,
)
from upstack_pipeline.klaviyo.flows import render_backup_flows_guide
from upstack_pipeline.landing import check_landing_folder
from upstack_pipeline.settings import Settings
from upstack_pipeline.shops import DEFAULT_SHOP, Shop, UnknownShopError, load_shops, shop_named
from upstack_pipeline.warehouse import WarehouseError

if TYPE_CHECKING:
    from upstack_pipeline.sandbox.replay import ReplayStep

# The demo's key for its own local emulator; it opens nothing anywhere else.
DEMO_KEY = "pk_demo_local_emulator_only"
# The sweep's worlds end at a fixed moment, so its table is the same on every machine and every day.
SWEEP_END = datetime(2026, 12, 1, tzinfo=timezone.utc)


def summarize(result: dg.ExecuteInProcessResult, seconds: float, instance_label: str) -> str:
    """What the run did, by the tables whose materialization carries a `summary` (one or two per step), then its
    checks. The first line says whether it worked and, if not, what failed first."""
    problems = failures(result)
    outcome = "succeeded" if not problems else f"FAILED ({problems[0]})"
    lines = [f"upstack sync: run {result.run_id[:8]} {outcome} in {seconds:.1f} s (Dagster instance: {instance_label})"]
    summaries = [(event.asset_key.to_user_string(), event.materialization.metadata["summary"].value)
                 for event in result.get_asset_materialization_events()
                 if "summary" in event.materialization.metadata]
    width = max(len(table) for table, _ in [*summaries, ("checks", "")])
    lines += [f"  {table:<{width}} {summary}" for table, summary in summaries]
    checks = result.get_asset_check_evaluations()
    failed = [check for check in checks if not check.passed]
    lines.append(f"  {'checks':<{width}} {len(checks) - len(failed)} of {len(checks)} passed")
    for check in failed:
        lines.append(f"    {check.severity.value} {check.asset_key.to_user_string()}:{check.check_name}: "
                     f"{check.description or 'failed'}")
    for failure in result.get_step_failure_events():
        lines.append(f"  step {failure.step_key} failed: {step_error(failure)}")
    return "\n".join(lines)


def failures(result: dg.ExecuteInProcessResult) -> list[str]:
    """What makes the run a failure, in one short phrase each: failed steps, then failed checks of severity
    ERROR (a rejected key, an unreachable Klaviyo). Empty when the run worked."""
    problems = [f"step {failure.step_key}: {first_sentence(step_error(failure))}"
                for failure in result.get_step_failure_events()]
    problems += [f"{check.asset_key.to_user_string()}:{check.check_name}: {first_sentence(check.description or '')}"
                 for check in result.get_asset_check_evaluations()
                 if not check.passed and check.severity == dg.AssetCheckSeverity.ERROR]
    if not result.success and not problems:
        problems.append("the run did not finish")
    return problems


def step_error(failure: dg.DagsterEvent) -> str:
    error = failure.step_failure_data.error
    while error is not None and error.cause is not None:  # Dagster wraps the exception that says what to do
        error = error.cause
    return error.message.strip() if error else "unknown error"


def first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".")


def command_sync(shops: tuple[Shop, ...], only: str | None = None) -> int:
    """Each shop in turn (the daemon runs them side by side), a summary each; 1 when any shop's run failed. A shop
    whose folder or warehouse cannot be used is reported and skipped, so the others still sync."""
    if only is not None:
        shops = (named_shop(shops, only),)
    statuses = []
    instance = sync_instance(shops[0].settings)
    with instance:
        for shop in shops:
            label = "" if shop.name == DEFAULT_SHOP and len(shops) == 1 else f"shop {shop.name}: "
            try:
                check_before_a_run(shop.settings)
            except (ValueError, OSError, WarehouseError) as error:
                print(f"{label}upstack sync: {error}", file=sys.stderr)
                statuses.append(2)
                continue
            started = time.monotonic()
            result = run_sync(shop, instance)
            print(label + summarize(result, time.monotonic() - started, instance_label(shop.settings)))
            statuses.append(sync_status(result))
    return max(statuses)


def check_before_a_run(settings: Settings) -> None:
    """The setup mistakes a run would only find inside a step (and report with a stack trace), found first."""
    check_landing_folder(settings.landing_dir)
    if settings.warehouse_path.is_file():
        with settings.warehouse().connect(read_only=True):
            pass  # opening refuses a warehouse written by a newer release


def instance_label(settings: Settings) -> str:
    return str(settings.dagster_home) if settings.dagster_home else "in-memory, set DAGSTER_HOME to keep history"


def sync_status(result: dg.ExecuteInProcessResult) -> int:
    """1 when the run failed or a check of ERROR severity did (a rejected Klaviyo key, say), else 0."""
    return 1 if failures(result) else 0


def simulate_parser() -> argparse.ArgumentParser:
    """`upstack simulate`'s own options: built only when the command runs, since its flags come from the
    simulator (the sandbox), which the other commands never import."""
    from upstack_pipeline.sandbox.simulate import WorldRates

    simulate = argparse.ArgumentParser(prog="upstack simulate",
                                       description="write realistic storefront traffic to a landing folder")
    simulate.add_argument("out_dir", help="landing folder to create (events/, customers/, truth/)")
    simulate.add_argument("--visitors", type=int, default=3000)
    simulate.add_argument("--days", type=int, default=60)
    simulate.add_argument("--seed", type=int, default=7)
    simulate.add_argument("--end", type=datetime.fromisoformat, default=None,
                          help="when the traffic ends, ISO 8601 with offset (default: this hour)")
    world = simulate.add_argument_group("the world's rates (README: the simulated world)")
    for rate in fields(WorldRates):
        world.add_argument(f"--{rate.name.replace('_', '-')}", dest=rate.name, type=float, default=rate.default,
                           help=f"{rate.metadata['help']}; default {rate.default}".replace("%", "%%"))
    return simulate


def klaviyo_emulator():
    """The sandbox's local Klaviyo emulator, once it is known to have what it validates with: Klaviyo's SDK
    models, from the `emulator` extra. Without it, one line saying what to install, before anything starts."""
    from upstack_pipeline.sandbox import klaviyo_emulator as emulator

    try:
        emulator.sdk_models()
    except RuntimeError as error:
        raise ValueError(str(error)) from None
    return emulator


def command_simulate(arguments: list[str]) -> int:
    from upstack_pipeline.sandbox.simulate import WorldRates, simulate

    args = simulate_parser().parse_args(arguments)
    rates = WorldRates(**{rate.name: getattr(args, rate.name) for rate in fields(WorldRates)})
    summary = simulate(Path(args.out_dir), visitors=args.visitors, days=args.days, seed=args.seed, end=args.end,
                       rates=rates)
    print(
        f"upstack simulate: {summary.people:,} people, {summary.events:,} events in "
        f"{plural(summary.event_files, 'file')} "
        f"({summary.duplicate_lines:,} pixel retries, {summary.bad_lines:,} bad lines), "
        f"{summary.customers:,} customers -> {summary.out_dir}"
    )
    return 0


def command_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Fresh simulated traffic, replayed into the pipeline as it would have arrived (the history in one sync, then
    one sync per day), delivered into a local Klaviyo emulator, then scored.

    The replay lands in UPSTACK_LANDING_DIR and UPSTACK_WAREHOUSE and records its runs in DAGSTER_HOME, where the
    Dagster UI (`make dev`) looks, so the UI opens on what the demo did."""
    from upstack_pipeline.sandbox.replay import replay
    from upstack_pipeline.sandbox.simulate import simulate

    emulator_module = klaviyo_emulator()
    instance = sync_instance(settings)
    refuse_beside_a_running_daemon(instance)
    start_demo_over(Path(args.dir), settings.landing_dir, settings.warehouse_path)
    simulation = Path(args.dir) / "simulation"
    summary = simulate(simulation, visitors=args.visitors, days=args.days, seed=args.seed, end=args.end)
    print(
        f"Simulated {summary.people:,} shoppers over {args.days} days: {summary.events:,} events in "
        f"{plural(summary.event_files, 'file')}, with {summary.duplicate_lines:,} pixel retries and "
        f"{summary.bad_lines:,} "
        f"bad lines mixed in.\nReplaying them as they would have landed: everything before the last "
        f"{args.live_days} days in one sync, then one sync per day, each at the hour after its day ends.\n"
    )
    with emulator_module.KlaviyoEmulator(api_key=DEMO_KEY) as emulator:
        # The emulator is the Klaviyo resource's configuration, as a real account would be: its address in each
        # run's config, its key bound to the resource.
        demo_settings = replace(settings, klaviyo_base_url=emulator.base_url, klaviyo_api_key=DEMO_KEY)

        def timed_sync(now: datetime) -> tuple[dg.ExecuteInProcessResult, float]:
            started = time.monotonic()
            return run_sync(demo_settings, instance, as_of=now), time.monotonic() - started

        with instance:
            for step, (result, seconds) in replay(simulation, settings.landing_dir, timed_sync,
                                                  live_days=args.live_days):
                print(replay_line(step, result))
                if failures(result):
                    break
        print(f"\nThe last sync in full:\n{summarize(result, seconds, instance_label(settings))}")
        accepted = emulator.accepted_by_metric()
        backfill = sum(1 for event in emulator.accepted_events() if event["attributes"].get("backfill"))
    status = sync_status(result)
    print(f"\nThe local Klaviyo emulator at {emulator.base_url} accepted "
          + (", ".join(f"{count:,} {metric}" for metric, count in sorted(accepted.items())) or "no events") + ".")
    if backfill:
        print(f"{backfill:,} of the {sum(accepted.values()):,} went as backfill: they were older than "
              f"{settings.destination.max_event_age.total_seconds() / 3600:.0f} h when sent (mostly the history's "
              "first sync), so Klaviyo records them on the profile without firing flows.")
    if status == 0:
        print()
        command_evaluate(settings, simulation / "truth")
    print(
        f"\nThe warehouse is {settings.warehouse_path}, its analysts' copy {analytics_path(settings.warehouse_path)}; "
        "the views and tables are described in the README. Try:\n"
        "  .venv/bin/upstack sql \"select * from daily_lift order by day desc, metric limit 9\"\n"
        "  .venv/bin/upstack trace <an email from the simulation>"
    )
    if settings.dagster_home:
        print(f"The runs are recorded in {settings.dagster_home}: `make dev` opens the Dagster UI on them "
              "(http://127.0.0.1:3000).")
    return status


def refuse_beside_a_running_daemon(instance: dg.DagsterInstance) -> None:
    """The demo replays past days into the landing folder and warehouse that `make dev` watches: its sensor and
    schedule would run syncs on today's clock in between, changing what the demo shows."""
    now = time.time()
    if any(now - heartbeat.timestamp < 60 for heartbeat in instance.get_daemon_heartbeats().values()):
        raise ValueError("the Dagster daemon of DAGSTER_HOME is running (is `make dev` open?): stop it before the "
                         "demo, which replays past days into the landing folder and warehouse that it watches, "
                         "then start it again to see the demo's runs.")


# Marks a landing folder the demo wrote, naming the warehouse it wrote beside it: only those does it replace.
DEMO_MARKER = ".upstack-demo"


def start_demo_over(demo_dir: Path, landing_dir: Path, warehouse_path: Path) -> None:
    """Removes the previous demo's simulation, landing folder and warehouse, and refuses to touch data it did not
    write: the demo uses the configured paths, which may be a real shop's."""
    marker = landing_dir / DEMO_MARKER
    ours = marker.read_text().strip() if marker.is_file() else None
    foreign = [path for path, taken in (
        (landing_dir, landing_dir.is_dir() and any(landing_dir.iterdir()) and ours is None),
        (warehouse_path, warehouse_path.exists() and ours != str(warehouse_path.absolute())),
    ) if taken]
    if foreign:
        raise ValueError(
            f"{' and '.join(map(str, foreign))} {'hold' if len(foreign) > 1 else 'holds'} data the demo did not "
            "write, and the demo starts by replacing "
            "its landing folder (UPSTACK_LANDING_DIR) and warehouse (UPSTACK_WAREHOUSE). Point those variables "
            "at other paths for the demo, or move that data away.")
    for folder in (demo_dir, landing_dir):
        shutil.rmtree(folder, ignore_errors=True)
    for path in (warehouse_path, warehouse_path.with_name(warehouse_path.name + ".wal")):
        path.unlink(missing_ok=True)
    landing_dir.mkdir(parents=True)
    marker.write_text(str(warehouse_path.absolute()) + "\n")


def replay_line(step: ReplayStep, result: dg.ExecuteInProcessResult) -> str:
    """One line per replayed sync: what arrived, what was delivered."""
    values = {(event.asset_key.to_user_string(), key): value.value
              for event in result.get_asset_materialization_events()
              for key, value in event.materialization.metadata.items()}
    outcome = "FAILED" if failures(result) else "ok"
    return (f"  {step.label:<24} sync {outcome}: {values.get(('raw_events', 'rows_ingested'), 0):>7,} events "
            f"({values.get(('raw_events', 'rows_quarantined'), 0):,} quarantined) "
            f"from {plural(step.event_files, 'file')}, "
            f"{values.get(('klaviyo_deliveries', 'delivered'), 0):>5,} delivered to Klaviyo")


# What stopped the check, as `upstack klaviyo check-key` names it.
CHECK_KEY_VERDICTS = {
    KlaviyoUnavailableError: "unreachable",
    KlaviyoAddressError: "not Klaviyo's API",
    KlaviyoAuthError: "key rejected",
    KlaviyoRevisionError: "revision refused",
    KlaviyoRateLimitedError: "rate limited",
}


def command_check_key(settings: Settings) -> int:
    """Does the configured key work, with the scopes delivery needs? Tells apart what can be wrong: Klaviyo not
    reached, the key rejected, the API revision refused, a scope missing. Never prints the key."""
    if not settings.klaviyo_api_key:
        print("KLAVIYO_API_KEY is not set. Create a private key in Klaviyo (Settings > API keys) with Events: Write, "
              "Profiles: Write" + (" and Lists: Write" if settings.destination.list_id else "") + ", then export it.")
        return 1
    print(f"Checking KLAVIYO_API_KEY against {settings.klaviyo_base_url} (KLAVIYO_BASE_URL)")
    with settings.klaviyo_client(max_attempts=3) as client:
        try:
            verdicts = check_key(client, needs_list=settings.destination.list_id is not None)
        except KlaviyoDestinationError as error:
            print(f"{CHECK_KEY_VERDICTS[type(error)]}: {error}")
            return 1
    for scope, granted in verdicts.items():
        verdict = "yes" if granted else "NO: the key lacks this scope; add it in Klaviyo (Settings > API keys)"
        print(f"{scope:<16} {verdict}")
    return 0 if all(verdicts.values()) else 1


def command_evaluate(settings: Settings, truth_dir: Path) -> int:
    from upstack_pipeline.sandbox.evaluation import evaluate, format_evaluation

    print(format_evaluation(evaluate(settings.warehouse_path, truth_dir)))
    return 0


def command_sql(args: argparse.Namespace, settings: Settings) -> int:
    """The README's queries with what the project installs. The analysts' copy by default: a sync never waits on
    it, and a query never waits on a sync."""
    if args.warehouse and args.all_shops:
        raise ValueError("--warehouse and --all-shops do not go together: --all-shops reads every shop's analysts' "
                         "copy")
    if args.all_shops:
        from upstack_pipeline.all_shops import all_shops_connection

        opened = all_shops_connection(_warehouses())
    elif args.warehouse:
        opened = settings.warehouse().connect(read_only=True)
    else:
        path = analytics_path(settings.warehouse_path)
        if not path.is_file():
            raise ValueError(f"no analysts' copy at {path} yet: run `upstack sync`, which publishes it after every "
                             "run (or pass --warehouse to query the warehouse itself)")
        opened = duckdb.connect(str(path), read_only=True)
    with opened as connection:
        connection.execute("set TimeZone = 'UTC'")
        try:
            result = connection.sql(args.query)
        except duckdb.Error as error:
            raise ValueError(f"{error} (the views and tables are described in the README)") from None
        if result is None:
            return 0
        result.show(max_rows=args.max_rows, max_width=shutil.get_terminal_size((160, 40)).columns)
    return 0


def command_report(args: argparse.Namespace, settings: Settings) -> int:
    # Draws with matplotlib: loaded only for this command.
    from upstack_pipeline.report import write_all_shops_report, write_report

    if args.all_shops:
        written = write_all_shops_report(_warehouses(), Path(args.out), days=args.days)
    else:
        written = write_report(settings.warehouse_path, Path(args.out), days=args.days)
    print(f"Wrote {written}: open it in any browser, it needs no network.")
    return 0


def _warehouses() -> dict[str, Path]:
    """Every shop's warehouse file, by shop name (the shops file's, or the one of UPSTACK_WAREHOUSE)."""
    return {shop.name: shop.settings.warehouse_path for shop in load_shops()}


def command_trace(needle: str, settings: Settings) -> int:
    from upstack_pipeline.trace import format_trace, trace

    if not settings.warehouse_path.is_file():
        raise ValueError(f"no warehouse at {settings.warehouse_path} (UPSTACK_WAREHOUSE): run `upstack sync` first")
    found = trace(settings, needle)
    print(format_trace(found))
    return 0 if found.found_as else 1


def command_sweep(args: argparse.Namespace, settings: Settings) -> int:
    """The default world, then each rate of SWEEP lower and higher, each replayed and scored (README's table)."""
    from upstack_pipeline.sandbox.sweep import SWEEP, format_sweep, sweep

    worlds = 1 + sum(len(values) for values in SWEEP.values())
    print(f"Simulating {worlds} worlds of {args.visitors:,} shoppers over {args.days} days under {args.dir}, each "
          f"replayed one day per sync for its last {args.live_days} days.", file=sys.stderr)
    rows = []
    started = time.monotonic()
    for row in sweep(Path(args.dir), visitors=args.visitors, days=args.days, seed=args.seed,
                     live_days=args.live_days, end=SWEEP_END, settings=settings):
        rows.append(row)
        print(f"  {len(rows)}/{worlds} {row.world} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    print(format_sweep(rows))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="upstack", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    # Listed here; its options are the simulator's own (simulate_parser), read by `main` when the command runs.
    commands.add_parser("simulate", help="write realistic storefront traffic to a landing folder (options: "
                                         "upstack simulate -h)", add_help=False)

    sync_parser = commands.add_parser(
        "sync", help="run the whole pipeline once for every shop of UPSTACK_SHOPS_FILE (without one: the shop "
                     "UPSTACK_LANDING_DIR / UPSTACK_WAREHOUSE describe)")
    sync_parser.add_argument("--shop", default=None, help="sync only this shop of the shops file")

    evaluate_parser = commands.add_parser(
        "evaluate", help="score identity resolution in UPSTACK_WAREHOUSE against a simulation's ground truth")
    evaluate_parser.add_argument("--truth", default=None,
                                 help="the simulation's truth/ folder (default: UPSTACK_LANDING_DIR/truth)")
    evaluate_parser.add_argument("--sweep", action="store_true",
                                 help="instead, simulate worlds across the key rates (Safari share, return gaps, _kx "
                                      "share, shared devices, placeholders, forwards), replay each and print a table")
    evaluate_parser.add_argument("--dir", default="data/sweep", help="--sweep: where the worlds are written")
    evaluate_parser.add_argument("--visitors", type=int, default=3000, help="--sweep: shoppers per world")
    evaluate_parser.add_argument("--days", type=int, default=60, help="--sweep: days per world")
    evaluate_parser.add_argument("--live-days", type=int, default=14,
                                 help="--sweep: the last days, synced one at a time")
    evaluate_parser.add_argument("--seed", type=int, default=7, help="--sweep: the worlds' seed")

    sql_parser = commands.add_parser(
        "sql", help="run a SQL query on the analysts' copy of the warehouse (the views and their rows; it never "
                    "blocks a sync) and print the result")
    sql_parser.add_argument("query", help="e.g. \"select * from daily_lift order by day desc limit 7\"")
    sql_parser.add_argument("--warehouse", action="store_true",
                            help="query the warehouse itself, read-only (every table, waits while a sync writes)")
    sql_parser.add_argument("--all-shops", action="store_true",
                            help="query every shop's analysts' copy at once: the same views summed over the shops, "
                                 "shop_weekly, and shops_<view> with a shop column (UPSTACK_SHOPS_FILE)")
    sql_parser.add_argument("--max-rows", type=int, default=40, help="rows to print (default 40)")

    report_parser = commands.add_parser(
        "report", help="write a self-contained HTML page (no network needed) of the last days: lift, the funnel, "
                       "match methods, recovered revenue and delivery health, for people who never open Dagster")
    report_parser.add_argument("out", help="the page to write, e.g. report.html")
    report_parser.add_argument("--days", type=int, default=28, help="UTC days up to today (default 28)")
    report_parser.add_argument("--all-shops", action="store_true",
                               help="every shop of UPSTACK_SHOPS_FILE on one page: their sum, and the shops compared")

    trace_parser = commands.add_parser(
        "trace", help="the story of a shopper or an event: landing file and line, identity ties, the Klaviyo "
                      "payload, the request and Klaviyo's answer, or why it was not sent")
    trace_parser.add_argument("needle", help="an email, anonymous_id, event_id or upstack_id")

    klaviyo_parser = commands.add_parser("klaviyo", help="Klaviyo account tools")
    klaviyo_commands = klaviyo_parser.add_subparsers(dest="klaviyo_command", required=True)
    klaviyo_commands.add_parser("check-key", help="check KLAVIYO_API_KEY and its scopes (never prints the key)")
    klaviyo_commands.add_parser("flows", help="print how to set up the backup flows in Klaviyo for the configured "
                                              "metric names (no key, no network)")

    emulator_parser = commands.add_parser("klaviyo-emulator", help="serve the local Klaviyo emulator")
    emulator_parser.add_argument("--port", type=int, default=8787)

    demo_parser = commands.add_parser(
        "demo", help="simulate traffic into a fresh folder, replay it day by day into the pipeline and a local "
                     "Klaviyo emulator, and score it")
    demo_parser.add_argument("--dir", default="data/demo")
    demo_parser.add_argument("--visitors", type=int, default=3000)
    demo_parser.add_argument("--days", type=int, default=60)
    demo_parser.add_argument("--live-days", type=int, default=14,
                             help="the last days, synced one at a time (the earlier ones arrive together)")
    demo_parser.add_argument("--seed", type=int, default=7)
    demo_parser.add_argument("--end", type=datetime.fromisoformat, default=None,
                             help="when the traffic ends, ISO 8601 with offset (default: this hour); the same "
                                  "end and seed give the same demo")
    for command in (sql_parser, report_parser, trace_parser, evaluate_parser, klaviyo_parser):
        command.add_argument("--shop", default=None,
                             help="with UPSTACK_SHOPS_FILE: the shop whose warehouse and account to use")
    return top


def shop_settings(name: str | None) -> Settings:
    """The settings of the shop a command is about: the one shop without a shops file (or with a one-shop file),
    else the one `--shop` names."""
    shops = load_shops()
    if name is None and len(shops) == 1:
        return shops[0].settings
    if name is None:
        raise ValueError(f"UPSTACK_SHOPS_FILE declares {len(shops)} shops: name one with --shop "
                         f"({', '.join(shop.name for shop in shops)})")
    return named_shop(shops, name).settings


def named_shop(shops: tuple[Shop, ...], name: str) -> Shop:
    try:
        return shop_named(shops, name)
    except UnknownShopError as error:
        raise ValueError(f"--shop {name}: {error}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `simulate` parses its own options: they come from the simulator, which no other command imports.
    args = parser().parse_args(argv[:1] if argv[:1] == ["simulate"] else argv)
    try:
        if args.command == "simulate":
            return command_simulate(argv[1:])
        if args.command == "klaviyo-emulator":
            return klaviyo_emulator().main(["--port", str(args.port)])
        if args.command == "sync":
            return command_sync(load_shops(), args.shop)
        # The demo is its own shop; --all-shops reads every shop's.
        one_shop = args.command != "demo" and not getattr(args, "all_shops", False)
        settings = shop_settings(args.shop) if one_shop else Settings.from_env()
        if args.command == "klaviyo":
            if args.klaviyo_command == "flows":
                print(render_backup_flows_guide(settings.destination))
                return 0
            return command_check_key(settings)
        if args.command == "sql":
            return command_sql(args, settings)
        if args.command == "report":
            return command_report(args, settings)
        if args.command == "trace":
            return command_trace(args.needle, settings)
        if args.command == "evaluate":
            if args.sweep:
                return command_sweep(args, settings)
            return command_evaluate(settings, Path(args.truth) if args.truth else settings.landing_dir / "truth")
        return command_demo(args, settings)
    except (ValueError, OSError, WarehouseError) as error:
        # A person's mistake (a path, a setting), a busy file or a warehouse from a newer release: one line that
        # says what to fix, no traceback.
        print(f"upstack {args.command}: {error}", file=sys.stderr)
        return 2


@contextmanager
def frozen_until_exit() -> Iterator[None]:
    """For a block that is the rest of its process's life (the `upstack` command, bench/scale.py's sync): what the
    process imported before it (Dagster, DuckDB, polars: some 140,000 objects the garbage collector tracks) lives
    until the exit, yet each of the collector's full passes walks it all, and so does the interpreter's last pass at
    exit. Frozen (`gc.freeze`), the collector leaves those objects alone; frozen again when the block ends, what it
    built is left to the exit too. When this was written, a sync with nothing new took 0.6 s less (bench/scale.py).
    The price: an object kept alive only by a reference cycle at the end is never finalized, so whatever must be
    closed (the warehouse's connections, the Dagster instance) is closed by its `with` block, never left to a
    finalizer. Tests that run a command inside the test's process call `main` instead: there, frozen objects would
    never be collected."""
    gc.freeze()
    yield
    gc.freeze()


def run() -> None:
    """The `upstack` command (and `python -m dagster_project.cli`): `main` in a process of its own, which exits
    when it returns."""
    with frozen_until_exit():
        status = main()
    sys.exit(status)


if __name__ == "__main__":
    run()
