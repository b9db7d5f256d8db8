"""Raw storefront events: the input contract (SPEC 3.1) and how a landing file becomes `raw_events` rows.

The contract mirrors `raw-event.schema.json`. A line that breaks it is quarantined with a reason; it never stops
a run. The checks themselves run in DuckDB (`sql/line_verdicts.sql`) over a whole batch of lines at once.
"""

from __future__ import annotations

import gzip
import io
from datetime import datetime, timedelta
from typing import Callable

import duckdb
import polars as pl

from upstack_pipeline.ingestion import IngestReport, UnreadableFileError, ingest_new_files
from upstack_pipeline.landing import LandingFile, check_landing_folder, ignored_files
from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import Warehouse, read_sql

STRING = ("VARCHAR",)
NUMBER = ("BIGINT", "UBIGINT", "DOUBLE")
OPTIONAL = ("NULL", "MISSING")

REQUIRED_FIELDS = ("event_id", "event_name", "event_time", "shop", "anonymous_id", "session_id")
# maxLength in raw-event.schema.json where it sets one; generous elsewhere (a cookie id is not a novel).
MAX_LENGTHS = {"event_id": 200, "event_name": 100, "event_time": 64, "shop": 255, "anonymous_id": 200,
               "session_id": 200}

# Field -> JSON types it may have (as DuckDB's json_type names them; MISSING = key absent). Required fields come
# first: the first broken field of a line is its reason, and a missing required field is the most telling one.
EVENT_CONTRACT: dict[str, tuple[str, ...]] = {
    **{name: STRING for name in REQUIRED_FIELDS},
    "event_source_url": STRING + OPTIONAL,
    "referrer": STRING + OPTIONAL,
    "user_data": ("OBJECT",) + OPTIONAL,
    **{f"user_data.{name}": STRING + OPTIONAL for name in (
        "email", "phone", "em", "ph", "external_id", "first_name", "last_name", "city", "region", "zip",
        "country", "kx", "fbp", "fbc", "gclid", "ttclid", "msclkid", "client_ip_address", "client_user_agent")},
    "user_data.klaviyo_identified": ("BOOLEAN",) + OPTIONAL,
    "custom_data": ("OBJECT",) + OPTIONAL,
    "custom_data.value": NUMBER + OPTIONAL,
    **{f"custom_data.{name}": STRING + OPTIONAL for name in ("currency", "order_id", "checkout_url", "search_term")},
    "custom_data.discount_codes": ("ARRAY",) + OPTIONAL,
    "custom_data.items": ("ARRAY",) + OPTIONAL,
    "consent": ("OBJECT",) + OPTIONAL,
    **{f"consent.{name}": ("BOOLEAN",) + OPTIONAL for name in ("analytics", "marketing", "sale_of_data")},
}

# Each element of custom_data.items must be an object with these fields.
ITEM_CONTRACT: dict[str, tuple[str, ...]] = {
    **{name: STRING + OPTIONAL for name in (
        "id", "name", "sku", "variant", "brand", "category", "url", "image_url")},
    "price": NUMBER + OPTIONAL,
    "quantity": NUMBER + OPTIONAL,
}


def _json_path(dotted: str) -> str:
    return "$." + dotted


class EventFiles:
    """Event landing files (NDJSON, gzip NDJSON, Parquet) for the shared ingestion in `upstack_pipeline.ingestion`."""

    kind = "events"

    def __init__(self, max_clock_skew: timedelta):
        self.max_clock_skew = max_clock_skew

    def read_lines(self, landing_file: LandingFile, data: bytes) -> pl.DataFrame:
        if landing_file.format == "parquet":
            return read_parquet_rows(data)
        return read_ndjson_lines(data, compressed=landing_file.absolute.name.endswith(".gz"))

    def write_batch(self, connection: duckdb.DuckDBPyConnection, now: datetime) -> None:
        connection.execute(read_sql("line_verdicts"), {
            "required_fields": list(REQUIRED_FIELDS),
            "max_lengths": [MAX_LENGTHS[name] for name in REQUIRED_FIELDS],
            "field_names": list(EVENT_CONTRACT),
            "field_paths": ["$"] + [_json_path(name) for name in EVENT_CONTRACT],
            "field_types": [list(types) for types in EVENT_CONTRACT.values()],
            "item_names": list(ITEM_CONTRACT),
            "item_paths": ["$"] + [_json_path(name) for name in ITEM_CONTRACT],
            "item_types": [list(types) for types in ITEM_CONTRACT.values()],
            "now": now,
            "max_skew": self.max_clock_skew,
        })
        connection.execute(read_sql("raw_events"))


def read_ndjson_lines(data: bytes, *, compressed: bool) -> pl.DataFrame:
    """Every line with its 1-based number.

    Gzip is inflated by Python's gzip module, which checks the stream's length and CRC: a truncated upload is
    then an unreadable file, not a file silently missing its tail. A file with invalid UTF-8 is re-read with
    the bad bytes replaced, and only the lines that held them are flagged, so one bad byte quarantines one
    line, not the file.
    """
    if compressed:
        if not data:
            raise UnreadableFileError("empty file where gzip was expected (an interrupted upload?)")
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise UnreadableFileError(f"corrupt or truncated gzip: {error}") from error
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is not part of the first event
    try:
        lines = pl.scan_lines(data, name="raw_line").collect()
        return lines.with_row_index("line_number", offset=1).with_columns(invalid_utf8=pl.lit(False))
    except pl.exceptions.ComputeError as error:
        if "utf8" not in str(error).lower().replace("-", ""):
            raise UnreadableFileError(str(error)) from error
    repaired = data.decode("utf-8", errors="replace").encode()
    lines = pl.scan_lines(repaired, name="raw_line").collect()
    return lines.with_row_index("line_number", offset=1).with_columns(
        invalid_utf8=pl.col("raw_line").str.contains("\ufffd", literal=True)
    )


def read_parquet_rows(data: bytes) -> pl.DataFrame:
    """Each row as a JSON object, so Parquet events pass the same contract checks as NDJSON lines."""
    try:
        frame = pl.read_parquet(io.BytesIO(data))
        rows = frame.select(pl.struct(pl.all()).struct.json_encode()).to_series()
    except BaseException as error:  # polars panics (a BaseException) on some column types it cannot encode
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise UnreadableFileError(f"{type(error).__name__}: {error}") from error
    return pl.DataFrame({
        "line_number": pl.int_range(1, frame.height + 1, eager=True),
        "raw_line": rows,
        "invalid_utf8": pl.repeat(False, frame.height, eager=True),
    })


def ingest_events(settings: Settings, *, now: datetime, log: Callable[[str], None] = lambda message: None) -> IngestReport:
    """Ingests every event file not read yet into raw_events / quarantined_events; the report also names the
    landing folder's files that no reader takes. A missing landing folder raises LandingFolderError."""
    check_landing_folder(settings.landing_dir)
    report = ingest_new_files(
        Warehouse(settings.warehouse_path), settings.landing_dir, EventFiles(settings.max_clock_skew),
        now=now, batch_bytes=settings.ingest_batch_bytes, log=log,
    )
    report.ignored_files = ignored_files(settings.landing_dir)
    return report
