"""The landing checks judge what the run ingested, against the whole table, without reading every event_id of
history on every hourly run (issue 14)."""

from __future__ import annotations

from datetime import timedelta

import duckdb

from conftest import NOW, make_event, write_events
from upstack_pipeline.events import ingest_events
from upstack_pipeline.ingestion import landing_health


def test_a_run_that_repeats_a_kept_event_id_is_caught_by_that_run(settings):
    write_events(settings.events_dir / "a.ndjson", [make_event("e1"), make_event("e2")])
    ingest_events(settings, now=NOW)
    assert landing_health(settings.warehouse(), now=NOW).repeated_event_ids == 0

    later = NOW + timedelta(hours=1)
    write_events(settings.events_dir / "b.ndjson", [make_event("e3")])
    ingest_events(settings, now=later)
    # A broken ledger (simulated: the row written again) makes a repeat in this run.
    with duckdb.connect(str(settings.warehouse_path)) as connection:
        connection.execute("insert into raw_events select * replace (? as ingested_at) from raw_events "
                           "where event_id = 'e1'", [later])
    assert landing_health(settings.warehouse(), now=later).repeated_event_ids == 1
    # Runs that did not write it are not blamed for it.
    assert landing_health(settings.warehouse(), now=NOW).repeated_event_ids == 0
