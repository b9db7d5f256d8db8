"""bench/copies.py (bench/backfill.py's landing folder) still builds copies that share no identifier, so the backfill
benchmark cannot rot: it judges identifiers with the pipeline's own SQL on a bare DuckDB connection, which a change
to that SQL can break without any other test noticing."""

from __future__ import annotations

import gzip
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from upstack_pipeline.sandbox.simulate import simulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import copies  # noqa: E402  (bench/ is scripts, not a package)


def _events(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.rglob("*.ndjson.gz"))
            for line in gzip.decompress(path.read_bytes()).splitlines() if line.strip().startswith(b"{")]


def test_two_copies_hold_the_source_twice_with_no_identifier_shared(tmp_path):
    source = tmp_path / "simulation"
    simulate(source, visitors=60, days=2, seed=7, end=datetime(2026, 11, 1, tzinfo=timezone.utc))
    landing = tmp_path / "landing"

    lines = copies.build_copies(source, landing, 2, log=lambda message: None)

    original = _events(source / "events")
    copied = [_events(landing / "events" / f"copy={copy:03d}") for copy in range(2)]
    source_lines = sum(gzip.decompress(path.read_bytes()).count(b"\n")
                       for path in (source / "events").rglob("*.ndjson.gz"))
    assert lines == 2 * source_lines and len(copied[0]) == len(copied[1]) == len(original) > 0
    for number, events in enumerate(copied):
        assert all(event["event_id"] == f"c{number:03d}-{kept['event_id']}" for event, kept in zip(events, original))
    for field in ("event_id", "anonymous_id", "session_id"):
        assert not {event[field] for event in copied[0]} & {event[field] for event in copied[1]}
    # An email is rewritten per copy unless the pipeline rejects it (a placeholder stays what every store sees).
    emails = [{event["user_data"].get("email") for event in events if isinstance(event.get("user_data"), dict)}
              - {None} for events in [original, *copied]]
    shared = emails[1] & emails[2]
    assert shared <= emails[0]
    for number in range(2):
        rewritten = emails[number + 1] - shared
        assert rewritten and all(email.strip().startswith(f"c{number:03d}-") for email in rewritten)
    assert (landing / "customers" / "copy=001").is_dir()
