"""What one ingestion batch writes besides the events (its ledger rows, in one statement), retries of events kept
many batches before, and the fixed costs an hourly run must not pay (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from conftest import NOW, make_event, query, write_lines
from upstack_pipeline.events import ingest_events

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
