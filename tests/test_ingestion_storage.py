"""How raw_events keeps what ingestion writes (raw_json in zstd, new and upgraded warehouses alike), and retries
judged against the kept line wherever it is: in the same batch, or in raw_events from an earlier batch."""

from __future__ import annotations

import json
from dataclasses import replace

import duckdb

from conftest import NOW, make_event, query, write_lines
from test_warehouse_migrations import create_release_1_warehouse
from upstack_pipeline.events import ingest_events
from upstack_pipeline.warehouse import Warehouse


def raw_events_ddl(connection: duckdb.DuckDBPyConnection) -> str:
    return connection.execute("select sql from duckdb_tables() where table_name = 'raw_events'").fetchone()[0]


def test_raw_json_is_stored_with_zstd_in_a_new_warehouse_and_in_an_upgraded_one_that_keeps_its_rows(tmp_path):
    with Warehouse(tmp_path / "new.duckdb").connect() as connection:
        assert "raw_json JSON USING COMPRESSION ZSTD NOT NULL" in raw_events_ddl(connection)

    old = tmp_path / "release-1.duckdb"
    create_release_1_warehouse(old)
    with duckdb.connect(str(old), read_only=True) as connection:
        assert "ZSTD" not in raw_events_ddl(connection)
        before = connection.execute("select * from raw_events order by rowid").fetchall()
    with Warehouse(old).connect() as connection:
        assert "raw_json JSON USING COMPRESSION ZSTD NOT NULL" in raw_events_ddl(connection)
        assert connection.execute("select * from raw_events order by rowid").fetchall() == before
    assert before  # the fixture has rows to keep


def test_ingested_lines_are_written_with_zstd(settings):
    write_lines(settings.events_dir / "a.ndjson", [json.dumps(make_event(f"e{n}")) for n in range(3000)])

    ingest_events(settings, now=NOW)

    assert query(settings, """
        select distinct compression from pragma_storage_info('raw_events')
        where column_name = 'raw_json' and segment_type <> 'VALIDITY'""") == [("ZSTD",)]


def test_retries_are_judged_against_the_kept_line_in_the_same_batch_and_in_an_earlier_one(settings):
    first = make_event("early", user_data={"email": "jane@gmail.com", "klaviyo_identified": False})
    write_lines(settings.events_dir / "a.ndjson", [json.dumps(first)])
    late = make_event("late")
    write_lines(settings.events_dir / "b.ndjson", [
        json.dumps(first),                                                               # 1: retry, earlier batch
        json.dumps(first, sort_keys=True, separators=(",", ":")),                        # 2: same value, other text
        json.dumps(make_event("early", user_data={"email": "joe@gmail.com", "klaviyo_identified": False})),  # 3
        json.dumps(late),                                                                # 4: first sighting
        json.dumps(late, indent=None, separators=(", ", ": "), sort_keys=True),          # 5: retry, this batch
        json.dumps(make_event("late", event_name="Purchase")),                           # 6: conflict, this batch
    ])

    # One file per transaction: a.ndjson's event is in raw_events when b.ndjson's batch is judged.
    report = ingest_events(replace(settings, ingest_batch_bytes=1), now=NOW)

    assert (report.ingested_rows, report.duplicate_rows, report.quarantined_rows) == (2, 3, 2)
    assert query(settings, "select line_number, detail from quarantined_events order by line_number") == [
        (3, "event_id early was already ingested with a different user_data.email; the first one was kept"),
        (6, "event_id late was already ingested with a different event_name; the first one was kept")]
    assert query(settings, "select event_id, source_file, line_number from raw_events order by event_id") == [
        ("early", "events/a.ndjson", 1), ("late", "events/b.ndjson", 4)]
