"""Where a small increment's time goes, statement by statement (issue 14: what keeps a 1% day over 2x its share).

bench/scale.py says how much one more day costs over a sync with nothing new; this says where. Over a simulation
bench/scale.py kept (`--dir DIR`, its `simulation/` folder), it syncs every day but the last once, keeping that
warehouse in DIR/statements/full-<digest of the pipeline's code> (reused while the simulation is the same; the
snapshots of versions a run does not measure are removed). Then each trial copies the snapshot, adds the
increment (the last day's first `--increment-hours` hours, or with `--increment-lines N` the first N lines of its
first file: what any run with something new pays, whatever its size) and runs two syncs as bench/scale.py runs
them, each a new process delivering to the local Klaviyo emulator: the increment, then one with nothing new.

Inside each sync every statement sent through execute() is timed, and every commit and close, with the page faults
the process took meanwhile (a sync is a new process: each page of memory it touches the first time, DuckDB's cache
of the blocks it reads included, costs a fault), and put down to the step that ran it (the Dagster asset) and to its
SQL file (`sql/<name>.sql #k`, its k-th statement) or the library function that sent it. Prints, per step, the
statements' count, seconds and faults in each sync and the step's time outside them (Python, Dagster, and DuckDB
work not sent through execute()), then the statements whose time the increment adds most (the difference of the
medians over `--trials`), summed over the statements of the same text.

`--against CHECKOUT` measures another checkout's pipeline in the same trials, each trial running this checkout's pair
and then the other's (the machine drifts between trials, so versions are compared alternated), and ends with a table
of both: the whole syncs, their difference and each step's seconds in statements.

`--reads` runs one more pair under strace (slow: its timings are not reported) and puts the warehouse blocks each
sync read down to the table columns that held them when it started (DuckDB's `pragma_storage_info`), in MB: how
much of the history a run reads to find its few rows.

    .venv/bin/python bench/scale.py --scale 3 --dir /tmp/scale3          # once: keeps the simulation
    .venv/bin/python bench/statements.py --dir /tmp/scale3 [--increment-hours 3 | --increment-lines 20]
                                         [--trials 3] [--top 30] [--against OTHER_CHECKOUT] [--reads] [--rebuild]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import duckdb

import scale

DUCKDB_HEADER_BYTES = 3 * 4096  # a DuckDB file's main header and its two database headers, before block 0


# ---- inside a sync: every statement timed --------------------------------------------------------------------------


def measured_checkout() -> Path:
    """The checkout whose pipeline the syncs run: this one, or the one PYTHONPATH names (to measure another version)."""
    import upstack_pipeline

    return Path(upstack_pipeline.__file__).resolve().parent.parent


def normalized(sql: str) -> str:
    """A statement's text without comments and runs of white space: the key statements are counted under."""
    return " ".join(re.sub(r"--[^\n]*", " ", sql).split()).rstrip(";").strip()


def sql_file_statements(directory: Path | None = None) -> dict[str, str]:
    """Each statement of the pipeline's SQL files, normalized, -> `<file>.sql #k` (k from 1; a statement found in
    several files is named after the first)."""
    found = {}
    for path in sorted((directory or measured_checkout() / "sql").glob("*.sql")):
        for number, statement in enumerate(duckdb.extract_statements(path.read_text()), start=1):
            found.setdefault(normalized(statement.query), f"{path.name} #{number}")
    return found


def caller() -> tuple[str, str]:
    """(the Dagster step, the project's function) that sent the statement being run: the outermost frame of a module
    of dagster_project.defs (the asset's function; `<module>` while Dagster loads the definitions), and the innermost
    of the project's packages (upstack_pipeline's named without the package)."""
    step = function = ""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not function and module.startswith(("upstack_pipeline.", "dagster_project.")):
            function = f"{module.removeprefix('upstack_pipeline.')}.{frame.f_code.co_name}"
        if module.startswith("dagster_project.defs."):
            step = frame.f_code.co_name
        frame = frame.f_back
    if step == "<module>":
        return "(loading the definitions)", function
    return step or "(outside the steps)", function


class StatementLog:
    """Every statement run on the connections `connect` opened: text, seconds, page faults, step, function."""

    def __init__(self, sql_files: dict[str, str]):
        self.sql_files = sql_files
        self.rows: list[dict] = []

    def timed(self, run, sql: str):
        step, function = caller()
        faults, started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        try:
            return run()
        finally:
            text = normalized(sql)
            self.rows.append({"step": step, "source": self.sql_files.get(text, function), "text": text[:160],
                              "seconds": time.perf_counter() - started,
                              "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults})


class TimedConnection:
    """A DuckDB connection whose execute() times each statement: a string of several is run one statement at a time
    (as DuckDB runs them, its parameters bound to the last), so that each SQL file's statements are told apart. Its
    commits and closes are timed too; everything else is the connection's own, untimed (relations from sql(),
    register(), begin())."""

    def __init__(self, connection: duckdb.DuckDBPyConnection, log: StatementLog):
        self._connection, self._log = connection, log

    def __getattr__(self, name: str):
        return getattr(self._connection, name)

    def __enter__(self) -> "TimedConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cursor(self) -> "TimedConnection":
        return TimedConnection(self._connection.cursor(), self._log)

    def close(self) -> None:
        self._log.timed(self._connection.close, "(closing a connection: the checkpoint, if it is the warehouse's last)")

    def commit(self) -> "TimedConnection":
        self._log.timed(self._connection.commit, "(commit)")
        return self

    def execute(self, sql, parameters=None) -> "TimedConnection":
        if not isinstance(sql, str):
            self._log.timed(lambda: self._connection.execute(sql, parameters), str(sql))
            return self
        statements = duckdb.extract_statements(sql)
        for number, statement in enumerate(statements):
            if parameters is not None and number == len(statements) - 1:  # DuckDB binds them to the last one
                self._log.timed(lambda: self._connection.execute(statement.query, parameters), statement.query)
            else:
                self._log.timed(lambda: self._connection.execute(statement), statement.query)
        return self


def sync_child(sync_out: Path, log_out: Path) -> int:
    """bench/scale.py's sync child with duckdb.connect returning TimedConnections; the log written to log_out."""
    log = StatementLog(sql_file_statements())
    connect = duckdb.connect
    duckdb.connect = lambda *args, **kwargs: TimedConnection(connect(*args, **kwargs), log)
    try:
        return scale.sync_child(sync_out)
    finally:
        log_out.write_text(json.dumps(log.rows))


# ---- the trials ----------------------------------------------------------------------------------------------------


def code_digest(checkout: Path) -> str:
    """A digest of a checkout's pipeline: its SQL and Python. Identity's and mapping's records of their last run name
    their SQL, so a warehouse another version wrote makes the next run start over (every translation, every event),
    which is not the increment measured."""
    digest = hashlib.sha256()
    for path in sorted([*(checkout / "sql").rglob("*.sql"), *(checkout / "upstack_pipeline").rglob("*.py"),
                        *(checkout / "dagster_project").rglob("*.py")]):
        digest.update(str(path.relative_to(checkout)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def snapshot(root: Path, simulation: Path, rebuild: bool, checkout: Path, pythonpath: str | None) -> Path:
    """DIR/statements/full-<code>: the landing folder of every day but the last and the warehouse the checkout's sync
    left, built again when the simulation differs from what built it (one per version of the pipeline's code)."""
    full = root / f"full-{code_digest(checkout)[:12]}"
    record = full.with_name(full.name + ".json")
    wanted = json.dumps({"simulation": json.loads((simulation.parent / "simulation.json").read_text()),
                         "checkout": str(checkout)})
    if not rebuild and full.is_dir() and record.is_file() and record.read_text() == wanted:
        scale.log(f"reusing the full sync in {full}")
        return full
    shutil.rmtree(full, ignore_errors=True)
    record.unlink(missing_ok=True)
    days, _ = scale.split_days(simulation, None)
    scale.land(simulation, days, full / "landing", customers=True)
    scale.log(f"full sync of {len(days)} days into {full}")
    seconds, _, _ = sync(full, "full", [scale.SCRIPT, "--sync-child", str(full / "sync-full.json")],
                         pythonpath=pythonpath)
    scale.log(f"full sync: {seconds:.1f} s")
    record.write_text(wanted)
    return full


def sync(root: Path, label: str, child: list[str], prefix: tuple[str, ...] = (),
         pythonpath: str | None = None) -> tuple[float, int, str]:
    """A sync in a process of its own against a fresh emulator; with `pythonpath`, another checkout's pipeline."""
    with scale.Emulator(root / f"emulator-{label}.log") as base_url:
        env = scale.sync_environment(root / "landing", root / "warehouse.duckdb", base_url)
        if pythonpath is not None:
            env["PYTHONPATH"] = pythonpath
        return scale.run_measured([*prefix, sys.executable, *child], env=env)


def prune_snapshots(root: Path, kept: list[Path]) -> None:
    """Removes the snapshots of versions this run does not measure: each holds a whole warehouse."""
    for folder in root.glob("full-*"):
        if folder.is_dir() and folder not in kept:
            shutil.rmtree(folder)
            folder.with_name(folder.name + ".json").unlink(missing_ok=True)


def add_increment(trial: Path, simulation: Path, hours: int | None, lines: int | None) -> None:
    """The last day's first `hours` hours, or the first `lines` lines of its first file, into the trial's landing."""
    if lines is None:
        scale.land(simulation, scale.split_days(simulation, hours)[1], trial / "landing")
        return
    _, (first_hour,) = scale.split_days(simulation, 1)
    first = sorted(first_hour.glob("[!.]*.ndjson.gz"))[0]
    with gzip.open(first, "rt") as source:
        head = [line for _, line in zip(range(lines), source)]
    target = trial / "landing" / "events" / first.relative_to(simulation / "events")
    target.parent.mkdir(parents=True)
    with gzip.open(target, "wt") as out:
        out.writelines(head)


def trial_pair(full: Path, simulation: Path, args: argparse.Namespace, scratch: Path,
               prefix: tuple[str, ...] = (), layouts: dict | None = None,
               pythonpath: str | None = None) -> dict[str, dict]:
    """One trial: the increment's sync and then the nothing-new sync on a fresh copy of the snapshot, each with
    its statement log (with `prefix`, e.g. strace, before each process; with `layouts`, the warehouse's blocks
    as each sync found them; with `pythonpath`, another checkout's pipeline)."""
    trial = scratch / "trial"
    shutil.rmtree(trial, ignore_errors=True)
    shutil.copytree(full, trial)
    add_increment(trial, simulation, args.increment_hours, args.increment_lines)
    os.sync()  # the copy on disk before the syncs, as a store's warehouse is
    logs = {}
    for label in ("increment", "nothing new"):
        out = trial / f"statements-{label.replace(' ', '-')}.json"
        if layouts is not None:
            layouts[label] = block_owners(trial / "warehouse.duckdb")
        seconds, _, _ = sync(trial, label, [os.path.abspath(__file__), "--child", str(trial / "sync.json"), str(out)],
                             prefix, pythonpath)
        steps = json.loads((trial / "sync.json").read_text())["steps"]
        logs[label] = {"statements": json.loads(out.read_text()), "steps": steps, "seconds": seconds}
    return logs


# ---- the report ----------------------------------------------------------------------------------------------------


def step_totals(run: dict) -> dict[str, dict[str, float]]:
    """Per step: its statements' count, seconds and faults, and its seconds (Dagster's) outside them."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"statements": 0, "seconds": 0.0, "faults": 0})
    for row in run["statements"]:
        total = totals[row["step"]]
        total["statements"] += 1
        total["seconds"] += row["seconds"]
        total["faults"] += row["faults"]
    for step, seconds in run["steps"].items():
        totals[step]["outside"] = seconds - totals[step]["seconds"]
    return dict(totals)


def by_statement(run: dict) -> dict[tuple[str, str, str], float]:
    """(step, source, text) -> seconds, summed over the statements of the same text."""
    found: dict[tuple[str, str, str], float] = defaultdict(float)
    for row in run["statements"]:
        found[(row["step"], row["source"], row["text"])] += row["seconds"]
    return found


def added_by_statement(trials: list[dict[str, dict]]) -> list[tuple[float, float, float, tuple[str, str, str]]]:
    """(what the increment adds: the difference of the two medians, the increment's median seconds, the
    nothing-new sync's, key), most added first."""
    increments = [by_statement(trial["increment"]) for trial in trials]
    nothings = [by_statement(trial["nothing new"]) for trial in trials]
    keys = set().union(*increments, *nothings)
    rows = []
    for key in keys:
        with_increment = statistics.median(found.get(key, 0.0) for found in increments)
        without = statistics.median(found.get(key, 0.0) for found in nothings)
        rows.append((with_increment - without, with_increment, without, key))
    return sorted(rows, key=lambda row: -row[0])


def report(trials: list[dict[str, dict]], top: int) -> str:
    lines = ["| step | statements | seconds in statements | page faults in them | seconds outside them |",
             "| --- | --- | --- | --- | --- |"]
    totals = [{label: step_totals(trial[label]) for label in trial} for trial in trials]
    steps = list(dict.fromkeys(step for found in totals for run in found.values() for step in run))

    def cells(label: str, step: str, field: str, form: str) -> str:
        values = [found[label].get(step, {}).get(field) for found in totals]
        values = [value for value in values if value is not None]
        return form.format(statistics.median(values)) if values else "-"

    for step in steps:
        lines.append(f"| `{step}` | " + " | ".join(
            " / ".join(cells(label, step, field, form) for label in ("increment", "nothing new"))
            for field, form in (("statements", "{:.0f}"), ("seconds", "{:.3f}"), ("faults", "{:,.0f}"),
                                ("outside", "{:.3f}"))) + " |")
    whole = [statistics.median(trial[label]["seconds"] for trial in trials) for label in ("increment", "nothing new")]
    lines += [f"| whole sync, process start to exit | | {whole[0]:.3f} / {whole[1]:.3f} | | |",
              "", "Each cell: with the increment / with nothing new (medians over the trials).", "",
              f"The {top} statements the increment adds most time to (seconds, medians over the trials):", "",
              "| added | increment | nothing new | step | source | statement |",
              "| --- | --- | --- | --- | --- | --- |"]
    for added, with_increment, without, (step, source, text) in added_by_statement(trials)[:top]:
        lines.append(f"| {added:.3f} | {with_increment:.3f} | {without:.3f} | `{step}` | {source} | "
                     f"`{text[:90].replace('|', '/')}` |")
    return "\n".join(lines)


def comparison(versions: dict[str, list[dict[str, dict]]]) -> str:
    """Per version (trials alternated between them): the increment's whole sync, the nothing-new one, their
    difference, and each step's seconds in statements with the increment, medians over the trials."""
    steps = list(dict.fromkeys(step for trials in versions.values() for trial in trials
                               for step in trial["increment"]["steps"]))
    lines = ["| version | increment | nothing new | net | " + " | ".join(f"`{step}`" for step in steps) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in steps) + " |"]
    for label, trials in versions.items():
        whole = [statistics.median(trial[run]["seconds"] for trial in trials) for run in ("increment", "nothing new")]
        net = statistics.median(trial["increment"]["seconds"] - trial["nothing new"]["seconds"] for trial in trials)
        in_steps = [statistics.median(step_totals(trial["increment"]).get(step, {}).get("seconds", 0.0)
                                      for trial in trials) for step in steps]
        lines.append(f"| {label} | {whole[0]:.3f} | {whole[1]:.3f} | {net:.3f} | "
                     + " | ".join(f"{seconds:.3f}" for seconds in in_steps) + " |")
    return "\n".join(lines)


# ---- what a sync reads of the warehouse ----------------------------------------------------------------------------


def block_owners(warehouse: Path) -> dict:
    """The file's block size, and each block id -> the `table.column`s with a segment in it (several small segments
    may share a block; a segment may span more blocks than its first)."""
    owners: dict[int, set[str]] = defaultdict(set)
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        block_size = connection.execute("select block_size from pragma_database_size()").fetchone()[0]
        for (table,) in connection.execute("select table_name from duckdb_tables()").fetchall():
            for column, block, more in connection.execute(
                    f"select column_name, block_id, additional_block_ids from pragma_storage_info('{table}') "
                    "where block_id >= 0").fetchall():
                for owned in (block, *(more or ())):
                    owners[owned].add(f"{table}.{column}")
    return {"block_size": block_size, "owners": owners}


# A read as `strace -y` prints it: the descriptor with its path, the buffer, the size asked, the offset.
READ = re.compile(r"^pread64\(\d+<([^>]+)>,.*,\s*(\d+),\s*(\d+)\)\s+=\s+(\d+)")
NOT_A_SEGMENT = "(no column's segment when the sync started: metadata, indexes, or written by the sync)"


def blocks_read(trace: str, warehouse_name: str, block_size: int) -> list[int]:
    """The blocks of the warehouse file each pread of a trace read (one entry per block per read). The trace is one
    thread's (`strace -ff -y`: each line whole, each descriptor with its file's path), or several's joined."""
    found = []
    for line in trace.splitlines():
        if (read := READ.match(line)) and Path(read.group(1)).name == warehouse_name:
            offset, size = int(read.group(3)), int(read.group(2))
            if offset >= DUCKDB_HEADER_BYTES:
                first = (offset - DUCKDB_HEADER_BYTES) // block_size
                last = (offset + size - 1 - DUCKDB_HEADER_BYTES) // block_size
                found.extend(range(first, last + 1))
    return found


def reads_by_column(blocks: list[int], owners: dict[int, set[str]], block_size: int) -> dict[str, float]:
    """MB read per `table.column`: a block shared by several columns counts for each (so these do not add up to
    what was read); a block that held no column's segment when the sync started, as NOT_A_SEGMENT; a block a
    checkpoint of the sync freed and wrote again, as the column that held it before."""
    found: dict[str, float] = defaultdict(float)
    for block in blocks:
        for column in owners.get(block, {NOT_A_SEGMENT}):
            found[column] += block_size / 2**20
    return dict(found)


def reads_report(full: Path, simulation: Path, args: argparse.Namespace, scratch: Path) -> str:
    if shutil.which("strace") is None:
        return "`--reads` needs strace (Debian: apt-get install strace)."
    traces = scratch / "traces"
    shutil.rmtree(traces, ignore_errors=True)
    traces.mkdir()
    wrapper = scratch / "strace-each.sh"  # a folder per process, named in the order they ran; a file per thread
    wrapper.write_text(f'#!/bin/sh\nfolder="{traces}/$(date +%s%N)"\nmkdir "$folder"\n'
                       'exec strace -ff -y -o "$folder/thread" -e trace=pread64 "$@"\n')
    wrapper.chmod(0o755)
    layouts: dict[str, dict] = {}
    trial_pair(full, simulation, args, scratch, prefix=(str(wrapper),), layouts=layouts)
    reads = []
    for folder, layout in zip(sorted(traces.iterdir()), (layouts["increment"], layouts["nothing new"])):
        trace = "\n".join(path.read_text(errors="replace") for path in sorted(folder.iterdir()))
        blocks = blocks_read(trace, "warehouse.duckdb", layout["block_size"])
        reads.append((len(blocks) * layout["block_size"] / 2**20,
                      reads_by_column(blocks, layout["owners"], layout["block_size"])))
    (total, increment), (total_nothing, nothing) = reads
    lines = [f"Warehouse reads: {total:.0f} MB with the increment, {total_nothing:.0f} MB with nothing new. The "
             "columns read most more with the increment (a block two columns share counts for both):", "",
             "| column | MB added | MB with the increment | MB with nothing new |", "| --- | --- | --- | --- |"]
    for column in sorted(increment, key=lambda name: nothing.get(name, 0) - increment[name])[:args.top]:
        lines.append(f"| {column} | {increment[column] - nothing.get(column, 0):.1f} | {increment[column]:.1f} | "
                     f"{nothing.get(column, 0):.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="the folder bench/scale.py --dir kept (its simulation/)")
    increment = parser.add_mutually_exclusive_group()
    increment.add_argument("--increment-hours", type=int, default=3, help="the last day's first N hours (3)")
    increment.add_argument("--increment-lines", type=int, help="the first N lines of the last day's first file")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--reads", action="store_true", help="also what each sync read of the warehouse (strace)")
    parser.add_argument("--rebuild", action="store_true", help="sync the full snapshot again")
    parser.add_argument("--against", type=Path, help="another checkout, measured in the same trials, alternated")
    parser.add_argument("--child", type=Path, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return sync_child(*args.child)
    if args.dir is None or not (args.dir / "simulation" / "events").is_dir():
        parser.error("--dir must be a folder bench/scale.py --dir kept: run bench/scale.py --dir DIR first")
    if args.trials < 1 or not 1 <= args.increment_hours <= 24 or (args.increment_lines or 1) < 1:
        parser.error("--trials and --increment-lines must be at least 1, --increment-hours 1 to 24")
    if args.against is not None and not (args.against / "upstack_pipeline").is_dir():
        parser.error(f"--against must be a checkout of upstack-flows (with upstack_pipeline/): {args.against}")
    if args.increment_lines is not None:
        args.increment_hours = None
    simulation = args.dir / "simulation"
    this_checkout = measured_checkout()
    versions = {str(this_checkout): (this_checkout, None)}
    if args.against is not None:
        versions[str(args.against.resolve())] = (args.against.resolve(), str(args.against.resolve()))
    root = args.dir / "statements"
    snapshots = {label: snapshot(root, simulation, args.rebuild, checkout, pythonpath)
                 for label, (checkout, pythonpath) in versions.items()}
    prune_snapshots(root, list(snapshots.values()))
    with tempfile.TemporaryDirectory(prefix="upstack-statements-", dir=args.dir) as scratch:
        trials: dict[str, list[dict[str, dict]]] = {label: [] for label in versions}
        for number in range(1, args.trials + 1):
            for label, (_, pythonpath) in versions.items():  # alternated: the machine drifts between trials
                trials[label].append(trial_pair(snapshots[label], simulation, args, Path(scratch),
                                                pythonpath=pythonpath))
                scale.log(f"trial {number}, {label}: " + ", ".join(
                    f"{run} {trial['seconds']:.2f} s, {sum(row['seconds'] for row in trial['statements']):.2f} s "
                    "in statements" for run, trial in trials[label][-1].items()))
        increment_label = (f"the last day's first {args.increment_hours} hours" if args.increment_lines is None
                           else f"the first {args.increment_lines} lines of the last day's first file")
        for label in versions:
            heading = f" ({label})" if args.against is not None else ""
            print(f"Statements of a sync with {increment_label}, and of the sync with nothing new after it "
                  f"({args.trials} trials){heading}:\n")
            print(report(trials[label], args.top) + "\n")
        if args.against is not None:
            print("Each version's syncs, alternated (seconds, medians over the trials; the steps' seconds in "
                  "statements with the increment):\n")
            print(comparison(trials) + "\n")
        if args.reads:
            print(reads_report(snapshots[str(this_checkout)], simulation, args, Path(scratch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
