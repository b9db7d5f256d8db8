"""A batch's rows are written once, compressed, into the database file by its commit's checkpoint: not first into the
WAL (uncompressed, for a later checkpoint to write again), which cost a small run, an hour's or a day's, about a sixth
of its ingestion (upstack_pipeline.ingestion.WRITTEN_ONCE)."""

from __future__ import annotations

import json
import signal

from conftest import ingest_killed_after_batch, make_event, query, write_lines


def test_a_run_killed_after_its_first_batch_left_that_batch_in_the_database_file_and_nothing_in_the_wal(settings):
    for hour in range(2):
        write_lines(settings.events_dir / f"h{hour}.ndjson",
                    [json.dumps(make_event(f"h{hour}-{n}")) for n in range(3000)])  # about 2 MB each

    # Killed right after the first commit: no close, so no checkpoint of the connection's own; what the batch's
    # commit did not put into the database file is still in the WAL.
    killed = ingest_killed_after_batch(settings, 1)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    wal = settings.warehouse_path.with_name(settings.warehouse_path.name + ".wal")
    assert (wal.stat().st_size if wal.exists() else 0) < 100_000  # the batch's lines alone are 2 MB
    assert query(settings, "select list(path), sum(ingested_rows) from ingested_files") == [(["events/h0.ndjson"], 3000)]
    assert query(settings, "select count(*), count(distinct event_id) from raw_events") == [(3000, 3000)]
