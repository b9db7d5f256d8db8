"""A big store's backfill (issue 14, item 4): tens of millions of events in one `upstack sync`, peak memory bounded.

Builds the landing folder from a simulation bench/scale.py kept (`--source`, its `simulation/` folder): K copies of
its events, each copy a store's worth of other shoppers (event, browser and session ids and emails get the copy's
prefix, so nothing is a duplicate of another copy; the _kx links stay shared, as a forwarded email's would), plus its
customers export. Then one `upstack sync` over all of it, in a process of its own with UPSTACK_DUCKDB_MEMORY_LIMIT
(default 4GB) and no Klaviyo key (the backfill's events go as Klaviyo backfill anyway; delivery is bench/delivery.py's
business), timed from start to exit, its peak resident set taken from `wait4`, and each step's seconds. While it
runs, the child's resident set and the size of DuckDB's temp directory are sampled every second (kept in
memory.tsv), so each step's peak of both is reported too: the steps run one after another in the one process, each
placed on the samples by its seconds, counted back from the end of the run.

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
import threading
import time
import zlib
from pathlib import Path

from scale import SCRIPT as SCALE_SCRIPT  # the sync child: `upstack sync` and each step's seconds
from scale import run_measured

from upstack_pipeline.settings import Settings

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


class Sampler(threading.Thread):
    """Every second: seconds since start, this process's children's resident set (the sync child's) and the bytes
    in the spill folder."""

    def __init__(self, spill: Path):
        super().__init__(daemon=True)
        self.spill, self.samples, self.started, self.done = spill, [], time.monotonic(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            spilled = sum(path.stat().st_size for path in self.spill.rglob("*") if path.is_file()) \
                if self.spill.is_dir() else 0
            self.samples.append((time.monotonic() - self.started, children_rss(), spilled))

    def step_peaks(self, steps: dict[str, float], seconds: float) -> dict[str, tuple[int, int]]:
        """Each step's peak resident set and spill, the steps laid end to end back from the end of the run."""
        peaks, end = {}, seconds
        for step, step_seconds in reversed(steps.items()):
            inside = [(rss, spilled) for at, rss, spilled in self.samples if end - step_seconds - 1 <= at <= end + 1]
            peaks[step] = (max((rss for rss, _ in inside), default=0), max((spill for _, spill in inside), default=0))
            end -= step_seconds
        return peaks


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a simulation folder bench/scale.py kept (events/, customers/)")
    parser.add_argument("--copies", type=int, default=31, help="31 copies of bench/scale.py's default: 20 million")
    parser.add_argument("--memory-limit", default="4GB", help="UPSTACK_DUCKDB_MEMORY_LIMIT for the sync")
    parser.add_argument("--identity-chunk-rows", type=int, default=None,
                        help="UPSTACK_IDENTITY_CHUNK_ROWS for the sync (default: the setting's default)")
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
        if args.identity_chunk_rows:
            env.update(UPSTACK_IDENTITY_CHUNK_ROWS=str(args.identity_chunk_rows))
        out = root / "sync.json"
        shutil.rmtree(root / "spill", ignore_errors=True)
        sampler = Sampler(root / "spill")
        sampler.start()
        seconds, peak, output = run_measured([sys.executable, SCALE_SCRIPT, "--sync-child", str(out)], env=env)
        sampler.done.set()
        steps = json.loads(out.read_text())["steps"]
        step_peaks = sampler.step_peaks(steps, seconds)
        (root / "memory.tsv").write_text("seconds\trss_bytes\tspill_bytes\n" + "".join(
            f"{at:.1f}\t{rss}\t{spilled}\n" for at, rss, spilled in sampler.samples))
        size = sum(path.stat().st_size for path in root.glob("warehouse.duckdb*"))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    chunk_rows = args.identity_chunk_rows or Settings().identity_chunk_rows
    print(f"Backfill: {lines:,} landing lines ({args.copies} copies of {args.source}) in one `upstack sync`, "
          f"DuckDB memory limit {args.memory_limit}, identity in chunks of {chunk_rows:,} rows, "
          f"{os.cpu_count()} cores.\n")
    print(output.strip().splitlines()[0])
    print(f"\n| measure | value |\n| --- | --- |\n| whole sync, process start to exit | {seconds:,.0f} s |")
    for step, step_seconds in steps.items():
        rss, spilled = step_peaks[step]
        print(f"| step `{step}` | {step_seconds:,.0f} s, peak {rss / 2**30:.2f} GiB resident, "
              f"{spilled / 2**30:.2f} GiB spilled |")
    print(f"| peak memory, max RSS | {peak / 2**30:.2f} GiB |")
    spilled = max((spilled for _, _, spilled in sampler.samples), default=0)
    print(f"| peak spill to DuckDB's temp directory | {spilled / 2**30:.2f} GiB |")
    print(f"| events per second | {lines / seconds:,.0f} |")
    print(f"| warehouse files | {size / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
