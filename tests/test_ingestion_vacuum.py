"""Small ingestion runs do not pay for rewriting earlier runs' rows: a DuckDB checkpoint's vacuum merges a table's
partly filled row groups whenever they fit in fewer, whichever stage's connection checkpoints, so the merge of
raw_events' tail is held until it is worth its cost (upstack_pipeline.ingestion.decide_vacuum), then done once."""

from __future__ import annotations

import json

import pytest

from conftest import NOW, make_event, query, write_lines
from upstack_pipeline.customers import ingest_customers
from upstack_pipeline.events import ingest_events
from upstack_pipeline.ingestion import (
    TAIL_VACUUM_GROUPS,
    TAIL_VACUUM_ROWS,
    RawEventsTail,
    _measured_tail,
    _tail_bound,
    _threads,
    stream_sizes,
)
from upstack_pipeline.warehouse import ROW_GROUP_ROWS, VACUUM_STAGE

ROW_GROUPS = """
    select sum(count), min(block_id) from pragma_storage_info('{table}')
    where column_id = 0 and column_path = '[0]' group by row_group_id order by row_group_id"""


def hourly_run(settings, hour: int, events: int, retries: int = 0) -> None:
    """One run's file of new events (then `retries` of its first ones sent again, at its end), ingested, then the
    next stage's checkpoint (a table of its own written)."""
    lines = [json.dumps(make_event(f"h{hour}-{n}")) for n in range(events)]
    write_lines(settings.events_dir / f"hour-{hour:03d}.ndjson", lines + lines[:retries])
    ingest_events(settings, now=NOW)
    with settings.warehouse().connect() as connection:
        connection.execute("create or replace table next_stage as select ? as hour", [hour])


def duckdb_threads(settings) -> int:
    """How many streams ingestion splits a batch's lines into: one per thread of a warehouse connection."""
    with settings.warehouse().connect() as connection:
        return _threads(connection)


def row_groups(settings, table: str = "raw_events") -> list[tuple[int, int]]:
    """(rows, first block) of each row group: a row group rewritten by a merge is written to other blocks."""
    return query(settings, ROW_GROUPS.format(table=table))


def test_an_hourly_run_and_the_next_stage_leave_earlier_runs_row_groups_as_they_were(settings):
    hourly_run(settings, 0, 2000)
    first = row_groups(settings)
    hourly_run(settings, 1, 2000)
    second = row_groups(settings)
    hourly_run(settings, 2, 2000)

    assert [rows for rows, _ in first] == [2000]
    assert row_groups(settings)[:2] == second == [*first, second[1]]  # not merged, not rewritten
    assert [rows for rows, _ in row_groups(settings)] == [2000, 2000, 2000]
    assert query(settings, "select fingerprint from pipeline_state where stage = ?", [VACUUM_STAGE]) == [("hold",)]


@pytest.mark.slow  # ingests whole row groups of events (ROW_GROUP_ROWS), seconds a test
def test_a_batch_is_written_in_row_groups_of_the_warehouse_s_size_each_stream_leaving_one_partly_filled(settings):
    """Row groups of ROW_GROUP_ROWS (a read-write connection attaches the file so: DuckDB's would be four times as
    large), so that a batch of a row group or more is merged at its commit, written as its statements went; each
    of the batch's streams (one per thread) leaves at most one partly filled row group."""
    hourly_run(settings, 0, 2 * ROW_GROUP_ROWS + 1000)

    sizes = [rows for rows, _ in row_groups(settings)]
    threads = duckdb_threads(settings)
    assert sum(sizes) == 2 * ROW_GROUP_ROWS + 1000
    assert max(sizes) == ROW_GROUP_ROWS
    assert len([rows for rows in sizes if rows < ROW_GROUP_ROWS]) <= threads


@pytest.mark.slow  # ingests whole row groups of events (ROW_GROUP_ROWS), seconds a test
def test_the_tail_is_merged_once_it_has_enough_row_groups_and_other_tables_deleted_rows_are_reclaimed_then(settings):
    with settings.warehouse().connect() as connection:  # another stage's table, half of it deleted while held
        connection.execute(f"create table other_stage as select range as i from range({2 * ROW_GROUP_ROWS + 4240})")
    hourly_run(settings, 0, 300)
    with settings.warehouse().connect() as connection:
        connection.execute("delete from other_stage where i % 2 = 0")
    for hour in range(1, TAIL_VACUUM_GROUPS - 1):
        hourly_run(settings, hour, 300)
    assert [rows for rows, _ in row_groups(settings)] == [300] * (TAIL_VACUUM_GROUPS - 1)
    assert len(row_groups(settings, "other_stage")) == 3  # two full row groups and 4,240 rows, their deletes kept

    hourly_run(settings, TAIL_VACUUM_GROUPS - 1, 300)  # the run that makes TAIL_VACUUM_GROUPS row groups
    assert query(settings, "select fingerprint from pipeline_state where stage = ?", [VACUUM_STAGE]) == [("vacuum",)]
    assert [rows for rows, _ in row_groups(settings)] == [300 * TAIL_VACUUM_GROUPS]
    assert [rows for rows, _ in row_groups(settings, "other_stage")] == [ROW_GROUP_ROWS, 4_240]  # the first two merged

    hourly_run(settings, TAIL_VACUUM_GROUPS, 300)  # held again: the merged row group stays as it is
    assert [rows for rows, _ in row_groups(settings)] == [300 * TAIL_VACUUM_GROUPS, 300]
    # The merging run recorded what a merge leaves (one row group), and the run after it bounded the tail from that
    # without measuring it (measured: two row groups, the 300 rows after it included).
    recorded = last_measurement(settings)
    assert (recorded["rows"], recorded["row_groups"]) == (300 * TAIL_VACUUM_GROUPS, 1)
    assert query(settings, "select count(*), count(distinct event_id) from raw_events") == [
        (300 * (TAIL_VACUUM_GROUPS + 1), 300 * (TAIL_VACUUM_GROUPS + 1))]


@pytest.mark.slow  # ingests whole row groups of events (ROW_GROUP_ROWS), seconds a test
def test_a_run_whose_streams_each_fill_a_row_group_bounds_the_tail_by_their_last_row_groups_unmeasured(settings):
    """A day's run of a big store: each of its streams writes full row groups, then at most one partly filled, so
    the earlier rows are behind full row groups and the tail is at most a partly filled row group per stream."""
    hourly_run(settings, 0, 2000)
    first = last_measurement(settings)
    threads = duckdb_threads(settings)
    hourly_run(settings, 1, threads * ROW_GROUP_ROWS + 1000)  # every stream a row group and 1000 / threads rows

    assert query(settings, "select fingerprint from pipeline_state where stage = ?", [VACUUM_STAGE]) == [("hold",)]
    # Not measured: the runs after bound the tail from the same record (with TAIL_VACUUM_GROUPS threads or more,
    # the streams' last row groups alone reach a threshold, and it is).
    assert (last_measurement(settings) == first) == (threads < TAIL_VACUUM_GROUPS)
    with settings.warehouse().connect() as connection:
        bound = _tail_bound(connection, RawEventsTail(**first))
        measured = _measured_tail(connection)
    assert (bound.rows, bound.row_groups) == (1000, threads)
    assert measured.rows <= bound.rows and measured.row_groups <= bound.row_groups


@pytest.mark.slow  # ingests whole row groups of events (ROW_GROUP_ROWS), seconds a test
def test_a_bound_past_a_threshold_after_a_run_whose_streams_fill_row_groups_is_measured_before_merging(settings):
    """How full such a run's last row groups are, its rows do not say: bounded at nearly full, they may hold a few
    rows, and the small run that takes the bound past a threshold measures the tail instead of merging it. (The
    bound's row groups, one per stream and one per run, stay under TAIL_VACUUM_GROUPS below 22 threads.)"""
    hourly_run(settings, 0, 2000)
    threads = duckdb_threads(settings)
    assert threads + 2 < TAIL_VACUUM_GROUPS, "this test's runs are sized for fewer threads"
    hourly_run(settings, 1, threads * ROW_GROUP_ROWS + ROW_GROUP_ROWS)  # bounded at a row group's worth of rows
    hourly_run(settings, 2, ROW_GROUP_ROWS - 720)  # one row group more: held on the bound
    assert last_measurement(settings)["load_id"] == 1
    hourly_run(settings, 3, 1000)  # past two row groups' worth on the bound

    assert query(settings, "select fingerprint from pipeline_state where stage = ?", [VACUUM_STAGE]) == [("hold",)]
    recorded = last_measurement(settings)
    assert recorded["load_id"] == 4  # measured: the streams' last row groups and the two runs after them
    assert recorded["rows"] < TAIL_VACUUM_ROWS


@pytest.mark.slow  # ingests whole row groups of events (ROW_GROUP_ROWS), seconds a test
def test_a_run_whose_retries_leave_a_stream_short_of_a_row_group_is_not_bounded_by_its_streams(settings):
    """A stream's rows are its lines less the run's rejected lines that fall in it: 600 retries at the end of the
    file leave the last stream 500 rows short of a row group, however many lines each stream has, so the tail is
    not bounded by the streams' last row groups (that bound would be negative here): past a threshold, it is
    measured."""
    hourly_run(settings, 0, 2000)
    first = last_measurement(settings)
    threads = duckdb_threads(settings)
    assert threads >= 2, "a run larger than a row group whose streams do not fill one needs two streams"
    hourly_run(settings, 1, threads * (ROW_GROUP_ROWS + 100) - 600, retries=600)

    with settings.warehouse().connect() as connection:
        assert _tail_bound(connection, RawEventsTail(**first)) is None
    assert last_measurement(settings)["load_id"] == 2
    assert query(settings, "select sum(duplicate_rows) from ingested_files") == [(600,)]


@pytest.mark.slow  # ingests whole row groups of events (ROW_GROUP_ROWS), seconds a test
def test_a_run_larger_than_a_row_group_whose_streams_do_not_fill_one_measures_before_merging(settings):
    """(On one thread, a run larger than a row group fills its one stream's: there is no such run.)"""
    hourly_run(settings, 0, 2000)
    threads = duckdb_threads(settings)
    assert threads >= 2, "a run larger than a row group whose streams do not fill one needs two streams"
    hourly_run(settings, 1, threads * (ROW_GROUP_ROWS - 500))  # bounded by all its rows: past the threshold

    assert query(settings, "select fingerprint from pipeline_state where stage = ?", [VACUUM_STAGE]) == [("hold",)]
    recorded = last_measurement(settings)
    assert recorded["load_id"] == 2  # measured now: full row groups, then fewer rows than the bound's
    assert recorded["rows"] < 2000 + threads * (ROW_GROUP_ROWS - 500) - ROW_GROUP_ROWS


@pytest.mark.slow  # ingests whole row groups of events (ROW_GROUP_ROWS), seconds a test
def test_a_first_sync_after_the_customers_export_measures_the_tail_so_the_next_small_run_need_not(settings):
    """The customers export's run comes first and records raw_events empty. A first sync whose streams each fill two
    row groups was bounded from that record at nearly two row groups' worth per two streams, and the next run, a
    small one, took the bound past the threshold and measured the whole table. The first sync measures instead,
    reading only the row groups it wrote, and the next run bounds the tail from that."""
    settings.customers_dir.mkdir(parents=True, exist_ok=True)
    (settings.customers_dir / "customers.csv").write_text("customer_id,email\n1,jane@gmail.com\n")
    ingest_customers(settings, now=NOW)
    assert last_measurement(settings)["table_rows"] == 0
    threads = duckdb_threads(settings)
    assert threads + 2 < TAIL_VACUUM_GROUPS, "this test's runs are sized for fewer threads"
    first_sync = threads * 2 * ROW_GROUP_ROWS
    hourly_run(settings, 0, first_sync)

    measured = last_measurement(settings)
    assert (measured["load_id"], measured["table_rows"]) == (2, first_sync)
    assert measured["rows"] < ROW_GROUP_ROWS  # each stream's rows fill whole row groups
    hourly_run(settings, 1, 300)
    assert last_measurement(settings) == measured  # bounded from it, not measured again
    assert query(settings, "select fingerprint from pipeline_state where stage = ?", [VACUUM_STAGE]) == [("hold",)]


def last_measurement(settings) -> dict:
    """The tail of raw_events the last decision recorded (pipeline_state.overview for VACUUM_STAGE)."""
    [(memo,)] = query(settings, "select overview from pipeline_state where stage = ?", [VACUUM_STAGE])
    return json.loads(memo)


def test_runs_after_a_hold_bound_the_tail_from_the_ledger_and_measure_again_when_raw_events_changed_otherwise(
        settings):
    hourly_run(settings, 0, 2000)
    first = last_measurement(settings)
    assert (first["rows"], first["row_groups"], first["load_id"], first["table_rows"]) == (2000, 1, 1, 2000)

    for hour in (1, 2, 3):  # 8,000 rows in at most 7 row groups: under both thresholds, not measured again
        hourly_run(settings, hour, 2000)
        assert last_measurement(settings) == first
    assert query(settings, "select fingerprint from pipeline_state where stage = ?", [VACUUM_STAGE]) == [("hold",)]

    with settings.warehouse().connect() as connection:  # rows the ledger does not know of (an analyst's copy)
        connection.execute("insert into raw_events select * replace (event_id || '-copy' as event_id) "
                           "from raw_events")
    hourly_run(settings, 4, 2000)
    again = last_measurement(settings)
    assert (again["load_id"], again["table_rows"]) == (5, 2 * 8000 + 2000)
    assert (again["rows"], again["row_groups"]) == (18_000, len(row_groups(settings)))  # no full row group yet


def test_a_batch_is_split_into_one_stream_per_thread_of_equal_size_but_the_last():
    assert stream_sizes(10, 3) == [4, 4, 2]
    assert stream_sizes(9, 3) == [3, 3, 3]
    assert stream_sizes(2, 4) == [1, 1]
    assert stream_sizes(7, 1) == [7]
    assert stream_sizes(0, 2) == [0]
