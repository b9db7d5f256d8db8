"""Raw storefront events: the input contract (SPEC 3.1) and how a landing file becomes `raw_events` rows.

The contract is `schemas/raw-event.schema.json`: what this module checks a line against and the structure a line
is read into are derived from it here, at import, so the schema is the one place a field is added. A line that
breaks the contract is quarantined with a reason; it never stops a run. The checks themselves run in DuckDB
(`sql/line_verdicts.sql`) over a whole batch of lines at once; `tests/test_event_contract.py` holds the schema,
these checks, the `raw_events` table and the README's field list together.
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import duckdb
import polars as pl
from isal import igzip, igzip_lib

from upstack_pipeline.ingestion import IngestReport, UnreadableFileError, ingest_new_files
from upstack_pipeline.landing import LandingFile, check_landing_folder, ignored_files
from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import event_id_hashes_cover, read_sql, set_variables

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "raw-event.schema.json"
SCHEMA: dict = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))

STRING = ("VARCHAR",)
NUMBER = ("BIGINT", "UBIGINT", "DOUBLE")
# JSON Schema type -> the JSON types DuckDB's json_type reports for a value of it (the contract adds MISSING, key
# absent, for a field that is not required); READ_TYPES: the DuckDB type a scalar of it is read into.
JSON_TYPES = {"string": STRING, "number": NUMBER, "boolean": ("BOOLEAN",), "object": ("OBJECT",), "array": ("ARRAY",),
              "null": ("NULL",)}
READ_TYPES = {"string": "VARCHAR", "number": "DOUBLE", "boolean": "BOOLEAN"}


def _kinds(spec: dict) -> list[str]:
    kinds = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
    if unknown := set(kinds) - set(JSON_TYPES):
        raise ValueError(f"{SCHEMA_PATH.name}: type {sorted(unknown)} has no counterpart in upstack_pipeline.events")
    return kinds


def field_contract(spec: dict, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Field path -> the JSON types it may have, for the object `spec` and the objects nested in it (not the
    elements of its arrays): depth first, the required fields first, the others in the schema's order. The order
    matters: the first broken field of a line is the one its quarantine names, and a missing required field is the
    most telling one."""
    properties, required = spec["properties"], spec.get("required", [])
    if prefix and required:  # a nested field is absent whenever its parent is: line_verdicts.sql has no rule for it
        raise ValueError(f"{SCHEMA_PATH.name}: {prefix}: only top-level fields can be required")
    contract = {}
    for name in [*required, *(name for name in properties if name not in required)]:
        child = properties[name]
        accepted = tuple(json_type for kind in _kinds(child) for json_type in JSON_TYPES[kind])
        contract[prefix + name] = accepted + (() if name in required else ("MISSING",))
        if "properties" in child:
            contract.update(field_contract(child, f"{prefix}{name}."))
    return contract


def read_structure(spec: dict) -> str | list | dict:
    """The DuckDB type a value of `spec` is read into, in json_transform's notation ({"field": type}, [type])."""
    kinds = [kind for kind in _kinds(spec) if kind != "null"]
    if len(kinds) != 1:
        raise ValueError(f"{SCHEMA_PATH.name}: a value of types {kinds} has no one DuckDB type to be read into")
    if kinds[0] == "object":
        return {name: read_structure(child) for name, child in spec["properties"].items()}
    if kinds[0] == "array":
        return [read_structure(spec["items"])]
    return READ_TYPES[kinds[0]]


# The contract as sql/line_verdicts.sql checks it. Required fields: present, not null, not blank, and within their
# maxLength (which the schema sets for each); sql/line_verdicts.sql reads event_id and event_time among them.
REQUIRED_FIELDS: tuple[str, ...] = tuple(SCHEMA["required"])
MAX_LENGTHS: dict[str, int] = {name: SCHEMA["properties"][name]["maxLength"] for name in REQUIRED_FIELDS}
if not {"event_id", "event_time"} <= set(REQUIRED_FIELDS):
    raise ValueError(f"{SCHEMA_PATH.name}: event_id and event_time must be required")
# Field -> JSON types it may have (as DuckDB's json_type names them; MISSING = key absent).
EVENT_CONTRACT: dict[str, tuple[str, ...]] = field_contract(SCHEMA)
# Each element of custom_data.items must be an object with these fields.
ITEM_CONTRACT: dict[str, tuple[str, ...]] = field_contract(
    SCHEMA["properties"]["custom_data"]["properties"]["items"]["items"])
# How many of custom_data.items sql/line_verdicts.sql types in the line's own parse; the items past them are
# parsed apart. Most events carry one product (a product view, an add to cart), and a cart of several costs what it
# always did.
LEADING_ITEMS = 1


def leading_item_checks(leading: int) -> dict[str, list]:
    """The checks of the first `leading` items, each item's element check and then its fields' (the order the
    quarantine names the first broken one in), as sql/line_verdicts.sql's parameters: each check's name, path and
    accepted types, and the position of its item's element check; the paths end with the first item past them."""
    checks: dict[str, list] = {"leading_item_names": [], "leading_item_paths": [], "leading_item_types": [],
                               "leading_item_elements": []}
    for index in range(leading):
        element = len(checks["leading_item_names"]) + 1
        item = f"custom_data.items[{index}]"
        for name, types in [(item, ("OBJECT",))] + [(f"{item}.{field}", types)
                                                    for field, types in ITEM_CONTRACT.items()]:
            checks["leading_item_names"].append(name)
            checks["leading_item_paths"].append(_json_path(name))
            checks["leading_item_types"].append(list(types))
            checks["leading_item_elements"].append(element)
    checks["leading_item_paths"].append(_json_path(f"custom_data.items[{leading}]"))
    return checks


# What sql/raw_events.sql reads an accepted line into: a struct of the schema's fields (event_time is typed by
# sql/line_verdicts.sql instead), inserted into raw_events by name.
READ_STRUCTURE: dict = read_structure(SCHEMA)


def _json_path(dotted: str) -> str:
    return "$." + dotted


class EventFiles:
    """Event landing files (NDJSON, gzip NDJSON, Parquet) for the shared ingestion in `upstack_pipeline.ingestion`."""

    kind = "events"
    statement_settings = ("preserve_insertion_order", "disabled_optimizers")  # line_verdicts', sql/raw_events.sql's

    def __init__(self, max_clock_skew: timedelta):
        self.max_clock_skew = max_clock_skew

    def read_lines(self, landing_file: LandingFile, data: bytes) -> pl.DataFrame:
        if landing_file.format == "parquet":
            return read_parquet_rows(data)
        return read_ndjson_lines(data, compressed=landing_file.absolute.name.endswith(".gz"))

    def write_batch(self, connection: duckdb.DuckDBPyConnection, now: datetime) -> None:
        if not event_id_hashes_cover(connection):  # the batch is judged against every kept event id
            connection.execute(read_sql("raw_event_id_hashes"))
        # line_verdicts and raw_events.sql read the lines in parts (upstack_pipeline.ingestion.staged_lines), which
        # DuckDB only reads side by side when the rows need not keep their order: nothing reads either table in it.
        connection.execute("set preserve_insertion_order = false")
        connection.execute(read_sql("line_verdicts"), self.verdict_parameters(now))
        set_variables(connection, {"event_structure": json.dumps(READ_STRUCTURE)})
        connection.execute(read_sql("raw_events"))
        connection.execute("reset preserve_insertion_order")

    def verdict_parameters(self, now: datetime) -> dict[str, object]:
        """The parameters sql/line_verdicts.sql takes (its header says what each is), from the event contract, the
        ingestion clock `now` and the clock skew allowed."""
        return {
            "required_fields": list(REQUIRED_FIELDS),
            "extracted_paths": ["$.custom_data.items", "$.custom_data.discount_codes"]
            + [_json_path(name) for name in REQUIRED_FIELDS],
            "max_lengths": [MAX_LENGTHS[name] for name in REQUIRED_FIELDS],
            "field_names": list(EVENT_CONTRACT),
            "field_paths": ["$"] + [_json_path(name) for name in EVENT_CONTRACT],
            "field_types": [list(types) for types in EVENT_CONTRACT.values()],
            "item_names": list(ITEM_CONTRACT),
            "item_paths": ["$"] + [_json_path(name) for name in ITEM_CONTRACT],
            "item_types": [list(types) for types in ITEM_CONTRACT.values()],
            "leading_items": LEADING_ITEMS,
            **leading_item_checks(LEADING_ITEMS),
            "now": now,
            "max_skew": self.max_clock_skew,
        }


def read_ndjson_lines(data: bytes, *, compressed: bool) -> pl.DataFrame:
    """Every line with its 1-based number.

    Gzip is inflated by ISA-L (python-isal's igzip, the gzip module's drop-in, about twice as fast), which checks
    the stream's length and CRC as the gzip module does: a truncated upload is then an unreadable file, not a file
    silently missing its tail. A file with invalid UTF-8 is re-read with the bad bytes replaced, and only the lines
    that held them are flagged, so one bad byte quarantines one line, not the file.
    """
    if compressed:
        if not data:
            raise UnreadableFileError("empty file where gzip was expected (an interrupted upload?)")
        try:
            data = igzip.decompress(data)
        except (OSError, EOFError, igzip_lib.IsalError) as error:  # IsalError: a damaged body (no OSError)
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


def ingest_events(
    settings: Settings, *, now: datetime, log: Callable[[str], None] = lambda message: None
) -> IngestReport:
    """Ingests every event file not read yet into raw_events / quarantined_events; the report also names the
    landing folder's files that no reader takes. A missing landing folder raises LandingFolderError."""
    check_landing_folder(settings.landing_dir)
    report = ingest_new_files(
        settings.warehouse(), settings.landing_dir, EventFiles(settings.max_clock_skew),
        now=now, batch_bytes=settings.ingest_batch_bytes, log=log,
    )
    report.ignored_files = ignored_files(settings.landing_dir)
    return report
