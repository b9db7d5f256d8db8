"""A big store's backfill (issue 14, item 4): tens of millions of events in one `upstack sync`, peak memory bounded.

Builds the landing folder from a simulation bench/scale.py kept (`--source`, its `simulation/` folder): K copies of
its events and its customers export, each copy a store's worth of other shoppers (bench/copies.py: every id of a
person, browser, click or order rewritten per copy, so the copies share none and behave like the source). Then one
`upstack sync` over all of it, in a process of its own with UPSTACK_DUCKDB_MEMORY_LIMIT (default 4GB) and no Klaviyo
key (the backfill's events go as Klaviyo backfill anyway; delivery is bench/delivery.py's business), timed from
start to exit, its peak resident set taken from `wait4`, and each step's seconds. While it runs, the child's
resident set and the size of DuckDB's temp directory are sampled every second (kept in memory.tsv), so each step's
peak of both is reported too: the steps run one after another in the one process, each placed on the samples by its
seconds, counted back from the end of the run.

    .venv/bin/python bench/scale.py --dir /tmp/scale        # once: keeps /tmp/scale/simulation
    .venv/bin/python bench/backfill.py --source /tmp/scale/simulation [--copies 31] [--memory-limit 4GB]

`--check` also syncs one copy alone first and compares the identity result (identities, resolved events per
match_method, outbox rows, quarantined supernode values, ...): K copies must give exactly K times one copy's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import copies
import duckdb
from scale import SCRIPT as SCALE_SCRIPT  # the sync child: `upstack sync` and each step's seconds
from scale import remove_warehouse, run_measured

from upstack_pipeline.settings import Settings

# A landing folder built by another version of bench/copies.py is built again, not reused.
COPIES_VERSION = hashlib.sha256(Path(copies.__file__).read_bytes()).hexdigest()[:16]


def log(message: str) -> None:
    print(f"[backfill {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Sampler(threading.Thread):
    """Every second: seconds since start, this process's children's resident set (the sync child's) and the bytes
    in the spill folder."""

    def __init__(self, spill: Path):
        super().__init__(daemon=True)
        self.spill, self.samples, self.started, self.done = spill, [], time.monotonic(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.samples.append((time.monotonic() - self.started, children_rss(), spilled_bytes(self.spill)))

    def step_peaks(self, steps: dict[str, float], seconds: float) -> dict[str, tuple[int, int]]:
        """Each step's peak resident set and spill, the steps laid end to end back from the end of the run."""
        peaks, end = {}, seconds
        for step, step_seconds in reversed(steps.items()):
            inside = [(rss, spilled) for at, rss, spilled in self.samples if end - step_seconds - 1 <= at <= end + 1]
            peaks[step] = (max((rss for rss, _ in inside), default=0), max((spill for _, spill in inside), default=0))
            end -= step_seconds
        return peaks


def spilled_bytes(folder: Path) -> int:
    """Bytes in DuckDB's temp directory, which DuckDB removes when a step's connection closes and whose files come
    and go while they are counted (os.walk skips a folder that is gone)."""
    total = 0
    for directory, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                continue
    return total


def children_rss() -> int:
    """Bytes resident in this process's children, from /proc (Linux)."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:  # the process ended while being read
            continue
        if int(fields["PPid"]) == os.getpid() and "VmRSS" in fields:
            total += int(fields["VmRSS"].split()[0]) * 1024
    return total


def landing_folder(root: Path, source: Path, count: int) -> tuple[Path, int]:
    """root/landing with `count` copies of source, built unless a rerun with --dir finds it built; its lines."""
    landing, built = root / "landing", root / "landing.json"  # landing.json: what the landing folder holds
    wanted = {"source": str(source.absolute()), "copies": count, "builder": COPIES_VERSION}
    if built.is_file() and json.loads(built.read_text())["built"] == wanted:
        log(f"reusing the landing folder in {landing}")
        return landing, json.loads(built.read_text())["lines"]
    shutil.rmtree(landing, ignore_errors=True)
    started = time.perf_counter()
    lines = copies.build_copies(source, landing, count, log)
    built.write_text(json.dumps({"built": wanted, "lines": lines}))
    log(f"{count} copies, {lines:,} lines in {time.perf_counter() - started:.0f} s")
    return landing, lines


def sync(root: Path, landing: Path, args: argparse.Namespace) -> dict:
    """One measured `upstack sync` of landing into root/warehouse.duckdb, spilling to root/spill."""
    warehouse = root / "warehouse.duckdb"
    remove_warehouse(warehouse)
    log(f"syncing {landing} with a {args.memory_limit} DuckDB memory limit")
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("UPSTACK_", "KLAVIYO_")) and name != "DAGSTER_HOME"}
    env.update(UPSTACK_LANDING_DIR=str(landing), UPSTACK_WAREHOUSE=str(warehouse),
               UPSTACK_DUCKDB_MEMORY_LIMIT=args.memory_limit, UPSTACK_DUCKDB_TEMP_DIR=str(root / "spill"))
    if args.identity_chunk_rows:
        env.update(UPSTACK_IDENTITY_CHUNK_ROWS=str(args.identity_chunk_rows))
    out = root / "sync.json"
    shutil.rmtree(root / "spill", ignore_errors=True)
    sampler = Sampler(root / "spill")
    sampler.start()
    seconds, peak, output = run_measured([sys.executable, SCALE_SCRIPT, "--sync-child", str(out)], env=env)
    sampler.done.set()
    steps = json.loads(out.read_text())["steps"]
    (root / "memory.tsv").write_text("seconds\trss_bytes\tspill_bytes\n" + "".join(
        f"{at:.1f}\t{rss}\t{spilled}\n" for at, rss, spilled in sampler.samples))
    return {"seconds": seconds, "peak": peak, "output": output, "steps": steps,
            "step_peaks": sampler.step_peaks(steps, seconds),
            "spilled": max((spilled for _, _, spilled in sampler.samples), default=0),
            "size": sum(path.stat().st_size for path in root.glob("warehouse.duckdb*"))}


# What the copies must multiply exactly: each a count over the warehouse the sync left.
IDENTITY_RESULT = """
select 'raw_events' as measure, count(*) as n from raw_events
union all select 'quarantined_events', count(*) from quarantined_events
union all select 'customers', count(*) from customers
union all select 'identity_observations', count(*) from identity_observations
union all select 'identity_links', count(*) from identity_links
union all select 'browser_links', count(*) from browser_links
union all select 'identities', count(*) from identities
union all select 'identities anchored on ' || anchor_type, count(*) from identities group by anchor_type
union all select 'resolved_events ' || coalesce(match_method, 'unresolved: ' || unresolved_reason), count(*)
    from resolved_events group by all
union all select 'klaviyo_outbox', count(*) from klaviyo_outbox
union all select 'klaviyo_skipped ' || reason, count(*) from klaviyo_skipped group by reason
union all select 'identity_flags ' || flag, count(*) from identity_flags group by flag
union all select 'quarantined supernode values (' || id_type || ')', count(*) from identity_rejected_values
    where reason = 'many_browsers' group by id_type
union all select 'rejected values seen (' || reason || ')', sum(times_seen) from identity_rejected_values
    where reason <> 'many_browsers' group by reason
"""


def identity_result(warehouse: Path) -> dict[str, int]:
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        return dict(sorted(connection.execute(IDENTITY_RESULT).fetchall()))


def compare(one: dict[str, int], many: dict[str, int], count: int) -> bool:
    """Prints each measure for one copy and for K; whether K copies gave exactly K times one copy's everywhere."""
    print(f"\n| measure | 1 copy | {count} copies | {count} x 1 copy | equal |\n| --- | --- | --- | --- | --- |")
    equal = True
    for measure in sorted(one.keys() | many.keys()):
        expected, got = one.get(measure, 0) * count, many.get(measure, 0)
        equal &= expected == got
        verdict = "yes" if expected == got else "NO"
        print(f"| {measure} | {one.get(measure, 0):,} | {got:,} | {expected:,} | {verdict} |")
    print(f"\n{count} copies {'give exactly' if equal else 'do NOT give'} {count} times one copy's identity result.")
    return equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a simulation folder bench/scale.py kept (events/, customers/)")
    parser.add_argument("--copies", type=int, default=31, help="31 copies of bench/scale.py's default: 20 million")
    parser.add_argument("--memory-limit", default="4GB", help="UPSTACK_DUCKDB_MEMORY_LIMIT for the sync")
    parser.add_argument("--identity-chunk-rows", type=int, default=None,
                        help="UPSTACK_IDENTITY_CHUNK_ROWS for the sync (default: the setting's default)")
    parser.add_argument("--check", action="store_true",
                        help="sync one copy alone first: K copies must give exactly K times its identity result")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    source = Path(args.source)
    try:
        if args.check:
            (root / "one").mkdir(parents=True, exist_ok=True)
            one = sync(root / "one", landing_folder(root / "one", source, 1)[0], args)
            one_result = identity_result(root / "one" / "warehouse.duckdb")
        landing, lines = landing_folder(root, source, args.copies)
        run = sync(root, landing, args)
        if args.check:
            result = identity_result(root / "warehouse.duckdb")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    chunk_rows = args.identity_chunk_rows or Settings().identity_chunk_rows
    print(f"Backfill: {lines:,} landing lines ({args.copies} copies of {args.source}) in one `upstack sync`, "
          f"DuckDB memory limit {args.memory_limit}, identity in chunks of {chunk_rows:,} rows, "
          f"{os.cpu_count()} cores.\n")
    print(run["output"].strip().splitlines()[0])
    print(f"\n| measure | value |\n| --- | --- |\n| whole sync, process start to exit | {run['seconds']:,.0f} s |")
    for step, step_seconds in run["steps"].items():
        rss, spilled = run["step_peaks"][step]
        print(f"| step `{step}` | {step_seconds:,.0f} s, peak {rss / 2**30:.2f} GiB resident, "
              f"{spilled / 2**30:.2f} GiB spilled |")
    print(f"| peak memory, max RSS | {run['peak'] / 2**30:.2f} GiB |")
    print(f"| peak spill to DuckDB's temp directory | {run['spilled'] / 2**30:.2f} GiB |")
    print(f"| events per second | {lines / run['seconds']:,.0f} |")
    print(f"| warehouse files | {run['size'] / 2**30:.2f} GiB |")
    if args.check:
        print(f"\nOne copy alone: {one['seconds']:,.0f} s, peak {one['peak'] / 2**30:.2f} GiB.")
        if not compare(one_result, result, args.copies):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
