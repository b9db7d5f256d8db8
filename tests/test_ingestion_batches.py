"""What one ingestion batch writes besides the events (its ledger rows, in one statement), retries of events kept
many batches before, and the fixed costs an hourly run must not pay (issue 14)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from conftest import NOW, make_event, query, write_lines
from upstack_pipeline.events import EventFiles, ingest_events, read_ndjson_lines
from upstack_pipeline.ingestion import staged_lines, staged_rows
from upstack_pipeline.warehouse import read_sql

REPO = Path(__file__).resolve().parent.parent


def test_a_batch_records_each_of_its_files_in_the_ledger_with_its_own_counts(settings):
    write_lines(settings.events_dir / "a.ndjson", [json.dumps(make_event("a1")), json.dumps(make_event("a1")), "{"])
    (settings.events_dir / "empty.ndjson").write_bytes(b"")
    (settings.events_dir / "broken.ndjson.gz").write_bytes(b"not gzip at all")
    write_lines(settings.events_dir / "b.ndjson", [json.dumps(make_event("b1")), json.dumps(make_event("b2"))])

    report = ingest_events(settings, now=NOW)  # one batch: the default batch size holds all four

    assert query(settings, """
        select path, status, lines, ingested_rows, duplicate_rows, quarantined_rows, load_id, ingested_at = ?
        from ingested_files order by path""", [NOW]) == [
        ("events/a.ndjson", "ingested", 3, 1, 1, 1, 1, True),
        ("events/b.ndjson", "ingested", 2, 2, 0, 0, 1, True),
        ("events/broken.ndjson.gz", "unreadable", 0, 0, 0, 0, 1, True),
        ("events/empty.ndjson", "ingested", 0, 0, 0, 0, 1, True),
    ]
    assert (report.files_read, report.lines, report.ingested_rows, report.duplicate_rows,
            report.quarantined_rows) == (3, 5, 3, 1, 1)
    assert list(report.unreadable_files) == ["events/broken.ndjson.gz"]
    # The ledger's modified time is the file's to the microsecond: the next run neither re-reads nor re-hashes.
    modified = {path: datetime.fromtimestamp(path.stat().st_mtime_ns // 10**9, tz=timezone.utc).replace(
        microsecond=path.stat().st_mtime_ns // 1000 % 10**6) for path in settings.events_dir.iterdir()}
    assert dict(query(settings, "select path, modified_at from ingested_files")) == {
        f"events/{path.name}": at for path, at in modified.items()}
    again = ingest_events(settings, now=NOW)
    assert (again.files_read, again.lines, again.changed_files) == (0, 0, [])
    assert query(settings, "select count(*) from changed_files") == [(0,)]


def test_a_retry_is_judged_against_an_event_kept_several_batches_before(settings):
    kept = make_event("kept", user_data={"email": "jane@gmail.com", "klaviyo_identified": False})
    write_lines(settings.events_dir / "1.ndjson", [json.dumps(kept), json.dumps(make_event("other"))])
    for number in (2, 3):
        write_lines(settings.events_dir / f"{number}.ndjson",
                    [json.dumps(make_event(f"filler-{number}-{line}")) for line in range(50)])
    write_lines(settings.events_dir / "4.ndjson", [
        json.dumps(kept, sort_keys=True, separators=(",", ":")),                         # the same event: a retry
        json.dumps(make_event("other", event_name="Purchase")),                          # another payload
    ])

    report = ingest_events(replace(settings, ingest_batch_bytes=1), now=NOW)  # one file per batch

    assert (report.ingested_rows, report.duplicate_rows, report.quarantined_rows) == (102, 1, 1)
    assert query(settings, "select line_number, reason, detail from quarantined_events") == [
        (2, "conflicting_duplicate",
         "event_id other was already ingested with a different event_name; the first one was kept")]
    assert query(settings, "select source_file from raw_events where event_id in ('kept', 'other')") == [
        ("events/1.ndjson",), ("events/1.ndjson",)]


def test_ingesting_does_not_import_pyarrow(settings):
    """Staged lines reach DuckDB through the Arrow C stream interface: pyarrow's import is a fixed cost (about
    0.2 s) that every hourly run would pay for nothing."""
    write_lines(settings.events_dir / "a.ndjson", [json.dumps(make_event("a1"))])
    script = (
        "import sys; from datetime import datetime, timezone; from pathlib import Path\n"
        "from upstack_pipeline.events import ingest_events; from upstack_pipeline.settings import Settings\n"
        f"report = ingest_events(Settings(landing_dir=Path({str(settings.landing_dir)!r}), "
        f"warehouse_path=Path({str(settings.warehouse_path)!r})), now=datetime.now(timezone.utc))\n"
        "print(report.ingested_rows, 'pyarrow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["1", "False"]


def test_a_few_lines_read_raw_events_only_in_the_loads_that_kept_their_event_ids(settings, tmp_path):
    """Judging a batch reads the history's event ids only in the loads raw_event_id_hashes names for its ids: none
    for new events. Left to DuckDB's join order, a batch of a few lines read every event id of the history."""
    def event_id(name: str) -> str:  # spread as a pixel's are, so no row group's min and max leave one out
        return hashlib.sha256(name.encode()).hexdigest()

    loads = 6
    for load in range(1, loads + 1):  # one file a batch: each load its own row group
        write_lines(settings.events_dir / f"{load}.ndjson",
                    [json.dumps(make_event(event_id(f"load-{load}-{line}"))) for line in range(40)])
    ingest_events(replace(settings, ingest_batch_bytes=1), now=NOW)
    assert query(settings, "select count(distinct row_group_id) from pragma_storage_info('raw_events')") == [(loads,)]

    def raw_events_row_groups_read(names: list[str]) -> int:
        lines = "\n".join(json.dumps(make_event(event_id(name))) for name in names).encode()
        staged = staged_rows(read_ndjson_lines(lines, compressed=False), "events/new.ndjson")
        profile = tmp_path / "line_verdicts.json"
        with settings.warehouse().connect() as connection, staged_lines(connection, staged):
            connection.execute(f"pragma enable_profiling = 'json'; set profiling_output = '{profile}'")
            try:
                connection.execute(read_sql("line_verdicts"),
                                   EventFiles(settings.max_clock_skew).verdict_parameters(NOW))
            finally:
                connection.execute("pragma disable_profiling; reset disabled_optimizers")
            kept = connection.execute("select event_id from line_verdicts where kept_rowid is not null").fetchall()
        assert kept == [(event_id(name),) for name in names if name.startswith("load-")]

        def scans(node: dict) -> list[dict]:
            own = [node] if node.get("extra_info", {}).get("Table", "").endswith(".raw_events") else []
            return own + [scan for child in node.get("children", []) for scan in scans(child)]

        statement = json.loads(profile.read_text())
        assert statement["query"]["sql"].lstrip().startswith("create or replace temp table line_verdicts")
        [raw_events_scan] = [scan for node in statement["operator"] for scan in scans(node)]
        return raw_events_scan["row_groups_scanned"]

    # New events: no load to look in (DuckDB may start the scan, a row group, before it finds that out).
    assert raw_events_row_groups_read(["new-1", "new-2", "new-3"]) <= 1
    assert raw_events_row_groups_read(["new-4", "load-3-7"]) == 1  # a retry of the third load's: its row group
