"""schemas/raw-event.schema.json, the landing folder's event contract given to whoever writes the pixel's files, is
valid and is the contract the simulator and the tests write. The pipeline derives its checks from it, and
tests/test_event_contract.py holds the pipeline, the raw_events table and the README to it."""

from __future__ import annotations

import csv
import gzip
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from conftest import make_event
from upstack_pipeline.sandbox.simulate import simulate

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "raw-event.schema.json"


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def test_the_schema_is_valid_json_schema(schema):
    Draft202012Validator.check_schema(schema)


@pytest.mark.slow  # simulates a world and validates every line
def test_the_schema_refuses_exactly_the_simulators_broken_lines(schema, tmp_path):
    """The simulator breaks about 0.2% of lines on purpose, seven ways; the schema refuses all of them but the
    events 30 days ahead (a time the pipeline's sanity rule refuses, which the schema cannot express), and accepts
    every other line, and the events the tests write."""
    validator = Draft202012Validator(schema, format_checker=FormatChecker())
    end = datetime(2026, 11, 28, 12, tzinfo=timezone.utc)
    summary = simulate(tmp_path, visitors=1000, days=21, seed=3, end=end)
    lines = [line for path in sorted((tmp_path / "events").rglob("*.ndjson.gz"))
             for line in gzip.decompress(path.read_bytes()).decode().split("\n") if line]
    with open(tmp_path / "truth" / "events.csv", newline="", encoding="utf-8") as handle:
        real_events = {row["event_id"] for row in csv.DictReader(handle)}  # a broken line's event is lost
    refused, future = 0, 0
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            refused += 1
            continue
        if next(validator.iter_errors(event), None) is not None:
            refused += 1
        elif datetime.fromisoformat(event["event_time"]) > end + timedelta(days=1):
            future += 1
        else:
            assert event["event_id"] in real_events, line
    assert summary.bad_lines >= 7 and future >= 1
    assert refused + future == summary.bad_lines, (refused, future)
    assert not list(validator.iter_errors(make_event("e1")))
    # The format checker is on: a time without an offset is refused.
    assert list(validator.iter_errors(make_event("e2", event_time="2026-11-28T12:00:00")))
