"""Ingestion through the plain library: real files in every format, a real DuckDB warehouse."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import signal
from dataclasses import replace
from datetime import timedelta

import polars as pl
import pytest

from conftest import NOW, ingest_killed_after_batch, make_event, query, write_events, write_lines
from upstack_pipeline.customers import ingest_customers
from upstack_pipeline.events import ingest_events
from upstack_pipeline.warehouse import WarehouseOutOfMemoryError


def ingest(settings):
    return ingest_events(settings, now=NOW)


def test_each_event_file_format_is_ingested_with_typed_columns(settings):
    events_dir = settings.events_dir / "dt=2026-11-28" / "hour=14"
    write_events(events_dir / "part-0001.ndjson", [make_event("plain")])
    write_events(events_dir / "part-0002.ndjson.gz", [make_event("gzipped")])
    pl.DataFrame([make_event("parquet", event_time="2026-11-28T09:00:00-05:00")]).write_parquet(
        events_dir / "part-0003.parquet")

    report = ingest(settings)

    assert (report.files_read, report.ingested_rows, report.quarantined_rows) == (3, 3, 0)
    rows = query(settings, """
        select event_id, source_file, line_number, event_time, user_data.email, custom_data.value,
               custom_data.items[1].quantity, custom_data.discount_codes, consent.marketing,
               raw_json->>'$.event_id'
        from raw_events order by event_id""")
    assert [row[0] for row in rows] == ["gzipped", "parquet", "plain"]
    assert rows[0][1] == "events/dt=2026-11-28/hour=14/part-0002.ndjson.gz"
    assert all(row[2] == 1 for row in rows)
    assert rows[1][3].isoformat() == "2026-11-28T14:00:00+00:00"  # the offset is honoured
    assert rows[2][4:] == ("jane@gmail.com", 24.0, 2.0, ["WELCOME"], True, "plain")


def test_every_kind_of_bad_line_is_quarantined_and_the_good_lines_of_the_same_file_are_kept(settings):
    far_future = (NOW + timedelta(days=30)).isoformat()
    no_event_id = make_event("x")
    del no_event_id["event_id"]
    no_time = make_event("no-time")
    del no_time["event_time"]
    lines = [
        json.dumps(make_event("good-1")),                                                      # 1
        '{"event_id": "truncated", "event_name": "AddTo',                                      # 2
        json.dumps([make_event("in-an-array")]),                                               # 3
        json.dumps(no_event_id),                                                               # 4
        json.dumps(make_event(12345)),                                                         # 5
        json.dumps(make_event("words-for-time", event_time="yesterday")),                      # 6
        json.dumps(make_event("no-offset", event_time="2026-11-28T14:00:00")),                 # 7
        json.dumps(make_event("from-the-future", event_time=far_future)),                      # 8
        "",                                                                                    # 9: blank, ignored
        json.dumps(make_event("string-value", custom_data={"value": "24.00"})),                # 10
        json.dumps(make_event("bad-item", custom_data={"items": [{"id": "p1", "price": "12"}]})),  # 11
        json.dumps(make_event("empty-name", event_name="")),                                   # 12
        json.dumps(make_event("flag-as-text", user_data={"klaviyo_identified": "yes"})),       # 13
        json.dumps(make_event("ancient", event_time="1999-12-31T23:00:00Z")),                  # 14
        json.dumps(make_event("null-session", session_id=None)),                               # 15
        json.dumps(make_event("good-2")),                                                      # 16
        json.dumps(no_time),                                                                   # 17
    ]
    path = write_lines(settings.events_dir / "mixed.ndjson", lines)
    with open(path, "ab") as handle:
        handle.write(json.dumps(make_event("bad-bytes")).encode().replace(b"jane", b"j\xffne") + b"\n")  # 18

    report = ingest(settings)

    assert report.ingested_rows == 2
    assert query(settings, "select event_id from raw_events order by event_id") == [("good-1",), ("good-2",)]
    quarantined = query(settings, """
        select line_number, reason, detail, event_id from quarantined_events order by line_number""")
    assert [(line, reason) for line, reason, _, _ in quarantined] == [
        (2, "not_json"),
        (3, "not_an_object"),
        (4, "missing_field"),
        (5, "wrong_type"),
        (6, "unparseable_time"),
        (7, "unparseable_time"),
        (8, "future_time"),
        (10, "wrong_type"),
        (11, "wrong_type"),
        (12, "missing_field"),
        (13, "wrong_type"),
        (14, "time_before_2000"),
        (15, "missing_field"),
        (17, "missing_field"),
        (18, "invalid_utf8"),
    ]
    details = {line: detail for line, _, detail, _ in quarantined}
    assert "event_id" in details[4] and "event_id" in details[5]
    assert "custom_data.value" in details[10]
    assert "custom_data.items[0].price" in details[11]
    assert "user_data.klaviyo_identified" in details[13]
    assert "session_id" in details[15] and "event_time" in details[17]
    assert quarantined[5][3] == "no-offset"  # the event_id is kept when readable, to find the event upstream
    raw_texts = query(settings, "select raw_text from quarantined_events where line_number = 2")
    assert raw_texts == [(lines[1],)]
    assert query(settings, "select lines, ingested_rows, quarantined_rows from ingested_files") == [(17, 2, 15)]


def test_a_second_run_reads_nothing_and_a_new_file_is_read_alone(settings):
    write_events(settings.events_dir / "a.ndjson.gz", [make_event("a1"), make_event("a2")])
    assert ingest(settings).ingested_rows == 2

    again = ingest(settings)
    assert (again.files_read, again.lines, again.ingested_rows) == (0, 0, 0)

    write_events(settings.events_dir / "b.ndjson.gz", [make_event("b1")])
    later = ingest(settings)
    assert (later.files_read, later.ingested_rows) == (1, 1)
    assert query(settings, "select count(*) from raw_events") == [(3,)]


def test_pixel_retries_are_kept_once_within_and_across_files_and_runs(settings):
    write_events(settings.events_dir / "h14.ndjson", [make_event("e1"), make_event("e2"), make_event("e1")])
    write_events(settings.events_dir / "h15.ndjson", [make_event("e2"), make_event("e3")])
    first = ingest(settings)
    write_events(settings.events_dir / "h16.ndjson", [make_event("e3"), make_event("e4")])
    second = ingest(settings)

    assert (first.ingested_rows, first.duplicate_rows) == (3, 2)
    assert (second.ingested_rows, second.duplicate_rows) == (1, 1)
    assert query(settings, "select event_id, source_file, line_number from raw_events order by event_id") == [
        ("e1", "events/h14.ndjson", 1), ("e2", "events/h14.ndjson", 2),
        ("e3", "events/h15.ndjson", 2), ("e4", "events/h16.ndjson", 2)]
    assert query(settings, "select path, duplicate_rows from ingested_files order by path") == [
        ("events/h14.ndjson", 1), ("events/h15.ndjson", 1), ("events/h16.ndjson", 1)]


def test_every_kept_row_has_its_event_ids_hash_and_a_retry_runs_later_is_found_through_it(settings):
    write_events(settings.events_dir / "h14.ndjson", [make_event("e1"), make_event("e2")])
    ingest(settings)
    write_events(settings.events_dir / "h15.ndjson", [make_event("x1")])
    ingest(settings)
    write_events(settings.events_dir / "h16.ndjson", [make_event("e1"), make_event("e5")])

    third = ingest(settings)

    assert (third.ingested_rows, third.duplicate_rows) == (1, 1)
    assert query(settings, "select count(*) from raw_events where event_id = 'e1'") == [(1,)]
    # One hash per kept row, with the row's load: the key is MD5's, computed here without DuckDB.
    kept = query(settings, "select event_id, load_id from raw_events")
    assert sorted(query(settings, "select id_hash, load_id from raw_event_id_hashes")) == sorted(
        (md5_key(event_id), load_id) for event_id, load_id in kept)


def test_rows_written_into_raw_events_by_hand_get_their_hashes_before_a_batch_is_judged(settings):
    """raw_event_id_hashes only knows the rows ingestion wrote: a row an analyst restored into raw_events is hashed by
    the next ingestion before it judges its batch, so a retry of that row is not written a second time."""
    write_events(settings.events_dir / "h14.ndjson", [make_event("e1")])
    ingest(settings)
    with settings.warehouse().connect() as connection:
        connection.execute("""insert into raw_events select * replace ('restored' as event_id,
                              replace(raw_json::varchar, '"e1"', '"restored"')::json as raw_json)
                              from raw_events""")
    retry = query(settings, "select raw_json::varchar from raw_events where event_id = 'restored'")[0][0]
    write_lines(settings.events_dir / "h15.ndjson", [retry, json.dumps(make_event("e2"))])

    report = ingest(settings)

    assert (report.ingested_rows, report.duplicate_rows, report.quarantined_rows) == (1, 1, 0)
    assert query(settings, "select event_id, count(*) from raw_events group by all order by all") == [
        ("e1", 1), ("e2", 1), ("restored", 1)]
    assert sorted(query(settings, "select id_hash from raw_event_id_hashes")) == sorted(
        (md5_key(event_id),) for (event_id,) in query(settings, "select event_id from raw_events"))


def md5_key(event_id: str) -> int:
    """The warehouse's event_id_hash: the upper half of the MD5 digest read as DuckDB's md5_number reads it
    (little-endian). A stored key computed otherwise would never match again."""
    return int.from_bytes(hashlib.md5(event_id.encode()).digest()[8:], "little")


def test_a_file_changed_after_ingestion_is_reported_not_reread(settings):
    path = write_events(settings.events_dir / "a.ndjson", [make_event("a1")])
    ingest(settings)
    write_events(path, [make_event("a1"), make_event("sneaked-in")])

    report = ingest(settings)

    assert report.changed_files == ["events/a.ndjson"]
    assert report.ingested_rows == 0
    assert query(settings, "select count(*) from raw_events") == [(1,)]
    assert query(settings, "select path from changed_files") == [("events/a.ndjson",)]
    # Reported on every run while it stays changed, recorded once.
    assert ingest(settings).changed_files == ["events/a.ndjson"]
    assert query(settings, "select path from changed_files") == [("events/a.ndjson",)]


def test_a_touched_but_identical_file_is_not_a_change(settings):
    paths = [write_events(settings.events_dir / f"{name}.ndjson", [make_event(name)]) for name in ("a", "b", "c")]
    ingest(settings)
    for seconds, path in enumerate(paths[:2]):  # as a landing folder copied back from a backup
        os.utime(path, (1_900_000_000 + seconds, 1_900_000_000 + seconds))

    report = ingest(settings)

    assert report.changed_files == [] and report.files_read == 0
    assert query(settings, "select count(*) from changed_files") == [(0,)]
    # The ledger takes the new times, so the next run neither hashes nor reads them again.
    assert query(settings, "select path, epoch_us(modified_at) from ingested_files order by path") == [
        ("events/a.ndjson", 1_900_000_000 * 10**6), ("events/b.ndjson", 1_900_000_001 * 10**6),
        ("events/c.ndjson", paths[2].stat().st_mtime_ns // 1000)]


def test_unreadable_files_are_recorded_and_do_not_stop_the_others(settings):
    whole = gzip.compress("\n".join(json.dumps(make_event(f"t{i}")) for i in range(500)).encode())
    (settings.events_dir / "truncated.ndjson.gz").write_bytes(whole[: len(whole) // 2])
    (settings.events_dir / "broken.parquet").write_bytes(b"PAR1 not really")
    write_events(settings.events_dir / "fine.ndjson", [make_event("ok")])

    report = ingest(settings)

    assert set(report.unreadable_files) == {"events/truncated.ndjson.gz", "events/broken.parquet"}
    assert report.ingested_rows == 1
    assert query(settings, "select path, status from ingested_files where status = 'unreadable' order by path") == [
        ("events/broken.parquet", "unreadable"), ("events/truncated.ndjson.gz", "unreadable")]
    assert ingest(settings).unreadable_files == {}  # recorded once, not retried every run


def test_a_gzip_file_damaged_inside_is_recorded_unreadable_not_a_crash(settings):
    # Bytes flipped mid-stream (a bad disk, a broken copy): the header and the length are intact, the inflater fails.
    whole = gzip.compress("\n".join(json.dumps(make_event(f"d{i}")) for i in range(500)).encode())
    (settings.events_dir / "damaged.ndjson.gz").write_bytes(
        whole[:200] + bytes(byte ^ 0xFF for byte in whole[200:260]) + whole[260:])
    write_events(settings.events_dir / "fine.ndjson", [make_event("ok")])

    report = ingest(settings)

    assert list(report.unreadable_files) == ["events/damaged.ndjson.gz"]
    assert "corrupt or truncated gzip" in report.unreadable_files["events/damaged.ndjson.gz"]
    assert query(settings, "select event_id from raw_events") == [("ok",)]
    assert query(settings, "select status from ingested_files where path = 'events/damaged.ndjson.gz'") == [
        ("unreadable",)]


def test_files_still_being_written_and_other_formats_are_left_alone(settings):
    write_events(settings.events_dir / ".part-0001.ndjson.gz", [make_event("half-written")])
    write_events(settings.events_dir / "_tmp" / "part-0001.ndjson", [make_event("staging")])
    (settings.events_dir / "README.txt").write_text("not data")
    write_events(settings.events_dir / "deep" / "er" / "part.jsonl", [make_event("nested")])

    report = ingest(settings)

    assert report.files_read == 1
    assert query(settings, "select event_id from raw_events") == [("nested",)]


@pytest.mark.slow  # 150,000 lines
def test_line_numbers_stay_exact_deep_into_a_large_file(settings):
    lines = [json.dumps(make_event(f"e{i}")) for i in range(150_000)]
    lines[123_456] = "oops"
    lines[140_000] = ""
    write_lines(settings.events_dir / "big.ndjson.gz", lines)

    report = ingest(settings)

    assert report.ingested_rows == 149_998
    assert query(settings, "select line_number, reason from quarantined_events") == [(123_457, "not_json")]
    assert query(settings, "select line_number from raw_events where event_id in ('e140001', 'e149999') "
                           "order by line_number") == [(140_002,), (150_000,)]


def test_customers_exports_load_as_csv_and_parquet_and_the_newest_export_wins(settings):
    (settings.customers_dir / "2026-11-01.csv").write_text(
        "customer_id,email,phone,first_name,last_name,city,region,country,accepts_marketing\n"
        "0071,jane@gmail.com,+14155550134,Jane,Doe,Austin,TX,US,yes\n"
        ",nobody@gmail.com,,,,,,,no\n"
        "0072,joe@yahoo.com,,Joe,Roe,Boston,MA,US,false\n")
    pl.DataFrame({"customer_id": ["0071"], "email": ["jane.doe@gmail.com"], "accepts_marketing": ["no"]}) \
        .write_parquet(settings.customers_dir / "2026-11-15.parquet")

    report = ingest_customers(settings, now=NOW)

    assert (report.files_read, report.ingested_rows, report.quarantined_rows) == (2, 3, 1)
    assert query(settings, "select customer_id, email, phone, accepts_marketing from customers order by 1") == [
        ("0071", "jane.doe@gmail.com", None, False), ("0072", "joe@yahoo.com", None, False)]
    assert query(settings, "select line_number, reason from quarantined_customers") == [(3, "missing_field")]


def test_a_customers_file_without_customer_ids_is_reported_unreadable(settings):
    (settings.customers_dir / "wrong.csv").write_text("id,mail\n1,a@b.com\n")

    report = ingest_customers(settings, now=NOW)

    assert "customer_id" in report.unreadable_files["customers/wrong.csv"]


@pytest.mark.parametrize("batch_bytes", [1, 1 << 30])
def test_batching_does_not_change_the_outcome(settings, batch_bytes):
    for hour in range(5):
        write_events(settings.events_dir / f"h{hour}.ndjson", [make_event(f"e{hour}"), make_event(f"e{hour + 1}")])

    report = ingest_events(replace(settings, ingest_batch_bytes=batch_bytes), now=NOW)

    assert (report.ingested_rows, report.duplicate_rows) == (6, 4)
    assert query(settings, "select count(*), count(distinct event_id) from raw_events") == [(6, 6)]
    # load_id numbers each transaction in commit order: what downstream stages use as their watermark.
    transactions = 5 if batch_bytes == 1 else 1
    assert query(settings, "select list(distinct load_id order by load_id) from ingested_files") == [
        (list(range(1, transactions + 1)),)]


def test_an_ingestion_killed_after_its_second_batch_keeps_exactly_two_files_and_the_rerun_reads_the_rest(settings):
    for hour in range(5):
        write_events(settings.events_dir / f"h{hour}.ndjson", [make_event(f"e{hour}-{n}") for n in range(3)])

    killed = ingest_killed_after_batch(settings, 2)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert query(settings, "select list(path order by path), sum(ingested_rows) from ingested_files") == [
        (["events/h0.ndjson", "events/h1.ndjson"], 6)]
    assert query(settings, "select count(*) from raw_events") == [(6,)]
    report = ingest(settings)
    assert (report.files_read, report.ingested_rows, report.duplicate_rows) == (3, 9, 0)
    assert query(settings, "select count(*), count(distinct event_id) from raw_events") == [(15, 15)]


def test_contract_edge_cases_are_quarantined_without_stopping_the_file(settings):
    lines = [
        json.dumps(make_event("codes-as-text", custom_data={"discount_codes": "WELCOME10"})),  # 1
        json.dumps(make_event("items-as-text", custom_data={"items": "mug"})),                 # 2
        json.dumps(make_event("x" * 201)),                                                     # 3
        json.dumps(make_event("silly-offset", event_time="2026-11-28T14:00:00+99:00")),        # 4
        "\t ",                                                                                 # 5: blank
        json.dumps(make_event("tab-id", anonymous_id="\t")),                                   # 6
        json.dumps(make_event("fine")),                                                        # 7
    ]
    path = write_lines(settings.events_dir / "edge.ndjson", lines)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a byte order mark before line 1

    report = ingest(settings)

    assert query(settings, "select line_number, reason from quarantined_events order by 1") == [
        (1, "wrong_type"), (2, "wrong_type"), (3, "too_long"), (4, "unparseable_time"), (6, "missing_field")]
    assert report.ingested_rows == 1 and report.lines == 6


def test_a_different_payload_under_a_kept_event_id_is_quarantined_not_dropped(settings):
    write_events(settings.events_dir / "a.ndjson", [make_event("e1", event_name="PageView")])
    ingest(settings)
    write_events(settings.events_dir / "b.ndjson", [make_event("e1", event_name="PageView"),
                                                    make_event("e1", event_name="Purchase")])

    report = ingest(settings)

    assert (report.duplicate_rows, report.quarantined_rows) == (1, 1)
    assert query(settings, "select line_number, reason from quarantined_events") == [(2, "conflicting_duplicate")]
    assert query(settings, "select event_name from raw_events") == [("PageView",)]


def test_empty_gzip_and_unencodable_parquet_are_unreadable_not_fatal(settings):
    (settings.events_dir / "empty.ndjson.gz").write_bytes(b"")
    pl.DataFrame({"event_id": ["p1"], "blob": [b"\x00\x01"]}).write_parquet(settings.events_dir / "binary.parquet")
    write_events(settings.events_dir / "fine.ndjson", [make_event("ok")])

    report = ingest(settings)

    assert report.ingested_rows == 1
    assert set(report.unreadable_files) >= {"events/empty.ndjson.gz"}
    assert query(settings, "select count(*) from ingested_files") == [(3,)]


def test_the_ledger_hash_is_the_hash_of_the_bytes_ingested(settings):
    import hashlib

    path = write_events(settings.events_dir / "a.ndjson", [make_event("a1")])
    ingest(settings)

    assert query(settings, "select size_bytes, content_sha256 from ingested_files") == [
        (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())]


def test_an_older_customers_export_arriving_later_does_not_overwrite_a_newer_one(settings):
    (settings.customers_dir / "export-2026-11-02.csv").write_text("customer_id,email\n7,new@gmail.com\n")
    ingest_customers(settings, now=NOW)
    (settings.customers_dir / "export-2026-11-01.csv").write_text("customer_id,email\n7,old@gmail.com\n")
    ingest_customers(settings, now=NOW)

    assert query(settings, "select email from customers") == [("new@gmail.com",)]


def reversed_keys(value):
    """The same JSON value with every object's keys in reverse order, nested ones too."""
    if isinstance(value, dict):
        return {key: reversed_keys(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reversed_keys(item) for item in value]
    return value


def reserialised(event: dict) -> str:
    """A pixel retry as another serialiser writes it: keys reversed at every level, other spacing, raw UTF-8."""
    return json.dumps(reversed_keys(event), separators=(" ,  ", " :\t"), ensure_ascii=False)


def differing_field(detail: str) -> str:
    """The field a conflicting_duplicate detail names (the whole detail when it names none, to fail visibly)."""
    match = re.fullmatch(r"event_id \S+ was already ingested with a different (\S+); the first one was kept", detail)
    return match.group(1) if match else detail


def conflicts(settings) -> list[tuple]:
    return query(settings, """
        select source_file, line_number, reason, detail from quarantined_events order by source_file, line_number""")


def test_a_retry_with_other_spacing_and_key_order_is_a_retry_within_a_file_and_across_files(settings):
    event = make_event("e1", user_data={"email": "zoë@gmail.com", "first_name": "Zoë", "klaviyo_identified": False})
    first_line = json.dumps(event)  # ASCII-escaped: "zo\u00eb@gmail.com"
    assert reserialised(event) != first_line and "zoë" in reserialised(event)
    assert list(json.loads(reserialised(event))) == list(reversed(list(event)))
    write_lines(settings.events_dir / "a.ndjson", [first_line, reserialised(event)])
    write_lines(settings.events_dir / "b.ndjson", [json.dumps(event, sort_keys=True, separators=(",", ":"))])
    first = ingest(settings)
    only_spacing = json.dumps(event, separators=(" , ", ":  "), ensure_ascii=False)  # same key order
    write_lines(settings.events_dir / "c.ndjson", [reserialised(event), only_spacing])
    second = ingest(settings)

    assert (first.ingested_rows, first.duplicate_rows, first.quarantined_rows) == (1, 2, 0)
    assert (second.ingested_rows, second.duplicate_rows, second.quarantined_rows) == (0, 2, 0)
    assert conflicts(settings) == []
    assert query(settings, "select raw_json::varchar, source_file, line_number from raw_events") == [
        (first_line, "events/a.ndjson", 1)]


def test_numbers_are_equal_by_value_so_1_and_1_0_are_the_same_retry(settings):
    event = make_event("e1", custom_data={"value": 24.0, "items": [{"id": "p1", "price": 12.0, "quantity": 2}]})
    spelled_otherwise = (json.dumps(event).replace('"value": 24.0', '"value": 24')
                         .replace('"price": 12.0', '"price": 1.2e1').replace('"quantity": 2', '"quantity": 2.0'))
    assert '"value": 24,' in spelled_otherwise and "1.2e1" in spelled_otherwise
    assert '"quantity": 2.0' in spelled_otherwise
    write_lines(settings.events_dir / "a.ndjson", [json.dumps(event), spelled_otherwise])
    write_lines(settings.events_dir / "b.ndjson", [json.dumps(event).replace('"value": 24.0', '"value": 24.5')])

    report = ingest(settings)

    assert (report.ingested_rows, report.duplicate_rows, report.quarantined_rows) == (1, 1, 1)
    assert conflicts(settings) == [(
        "events/b.ndjson", 1, "conflicting_duplicate",
        "event_id e1 was already ingested with a different custom_data.value; the first one was kept")]


def test_a_changed_nested_value_is_a_conflicting_duplicate_naming_the_field_within_and_across_files(settings):
    event = make_event("e1")
    changed_email = make_event("e1", user_data={**event["user_data"], "email": "john@gmail.com"})
    write_lines(settings.events_dir / "a.ndjson", [json.dumps(event), reserialised(changed_email)])
    ingest(settings)
    changed_price = json.loads(json.dumps(event))
    changed_price["custom_data"]["items"][0]["price"] = 13.0
    write_lines(settings.events_dir / "b.ndjson", [reserialised(event), reserialised(changed_price)])

    report = ingest(settings)

    assert (report.ingested_rows, report.duplicate_rows, report.quarantined_rows) == (0, 1, 1)
    assert [(path, line, reason) for path, line, reason, _ in conflicts(settings)] == [
        ("events/a.ndjson", 2, "conflicting_duplicate"), ("events/b.ndjson", 2, "conflicting_duplicate")]
    assert [detail for *_, detail in conflicts(settings)] == [
        "event_id e1 was already ingested with a different user_data.email; the first one was kept",
        "event_id e1 was already ingested with a different custom_data.items[0].price; the first one was kept"]
    assert query(settings, "select user_data.email, custom_data.items[1].price from raw_events") == [
        ("jane@gmail.com", 12.0)]


def test_arrays_keep_their_order_and_a_changed_element_is_named_by_its_index(settings):
    event = make_event("e1", custom_data={"discount_codes": ["WELCOME", "VIP"],
                                          "items": [{"id": "p1", "price": 12.0}, {"id": "p2", "price": 5.0}]})
    swapped_codes = make_event("e1", custom_data={**event["custom_data"], "discount_codes": ["VIP", "WELCOME"]})
    second_item = make_event("e1", custom_data={**event["custom_data"],
                                                "items": [{"id": "p1", "price": 12.0}, {"id": "p3", "price": 5.0}]})
    extra_item = make_event("e1", custom_data={**event["custom_data"],
                                               "items": event["custom_data"]["items"] + [{"id": "p4"}]})
    write_events(settings.events_dir / "a.ndjson", [event, swapped_codes, second_item, extra_item])

    ingest(settings)

    assert [(line, reason, differing_field(detail)) for _, line, reason, detail in conflicts(settings)] == [
        (2, "conflicting_duplicate", "custom_data.discount_codes[0]"),
        (3, "conflicting_duplicate", "custom_data.items[1].id"),
        (4, "conflicting_duplicate", "custom_data.items[2]")]


def test_the_first_differing_field_is_first_in_the_kept_events_order_and_unknown_absent_or_added_keys_count(
        settings):
    event = make_event("e1", referrer="https://google.com/", page={"tags": ["sale"]})  # page: not in the contract

    def retry(**changes):
        return make_event("e1", **{"referrer": "https://google.com/", "page": {"tags": ["sale"]}, **changes})

    write_lines(settings.events_dir / "a.ndjson", [
        json.dumps(event),
        reserialised(retry(event_name="Purchase", custom_data={**event["custom_data"], "value": 99.0})),
        reserialised(retry(user_data={k: v for k, v in event["user_data"].items() if k != "email"})),
        json.dumps(retry(user_data={**event["user_data"], "phone": "+15555550100"})),
        json.dumps(retry(referrer=None)),
        json.dumps(retry(page={"tags": {"0": "sale"}})),
        json.dumps(retry(page={"tags": ["sale"], "layout": "grid"})),
    ])

    report = ingest(settings)

    assert (report.ingested_rows, report.quarantined_rows) == (1, 6)
    # Reversed, the retry on line 2 shows custom_data.value before event_name; the kept event's order decides.
    assert [(line, reason, differing_field(detail)) for _, line, reason, detail in conflicts(settings)] == [
        (2, "conflicting_duplicate", "event_name"),
        (3, "conflicting_duplicate", "user_data.email"),
        (4, "conflicting_duplicate", "user_data.phone"),
        (5, "conflicting_duplicate", "referrer"),
        (6, "conflicting_duplicate", "page.tags"),
        (7, "conflicting_duplicate", "page.layout")]


def test_a_batch_that_runs_out_of_memory_rolls_back_says_what_to_change_and_leaves_duckdbs_settings(settings):
    """A failed statement aborts the batch's transaction: the error must be DuckDB's own (not the next statement's
    'transaction is aborted'), and the settings a batch changes, which are the database's, must be back for the
    process's other connections."""
    write_lines(settings.events_dir / "big.ndjson",
                [json.dumps(make_event(f"e{i}", url="https://shop.example/" + "x" * 2000)) for i in range(20_000)])
    tight = replace(settings, duckdb_memory_limit="30MB")  # 40 MB of lines in one batch

    with tight.warehouse().connect() as bystander:  # the same database instance as the ingestion's connection
        defaults = bystander.execute(SETTINGS_OF_A_BATCH).fetchall()
        with pytest.raises(WarehouseOutOfMemoryError, match="raise UPSTACK_DUCKDB_MEMORY_LIMIT"):
            ingest(tight)
        assert bystander.execute(SETTINGS_OF_A_BATCH).fetchall() == defaults
        assert bystander.execute("select (select count(*) from raw_events), (select count(*) from ingested_files), "
                                 "(select count(*) from quarantined_events)").fetchall() == [(0, 0, 0)]

    assert ingest(settings).ingested_rows == 20_000


SETTINGS_OF_A_BATCH = ("select current_setting('checkpoint_threshold'), current_setting('preserve_insertion_order'), "
                       "current_setting('disabled_optimizers')")
