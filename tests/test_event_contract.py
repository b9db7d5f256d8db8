"""One event contract: schemas/raw-event.schema.json. `upstack_pipeline.events` derives the checks and the structure
lines are read into from it; the `raw_events` table (sql/warehouse.sql and its migrations) and the README's field
list are written out, so these tests walk the schema and fail when a field is added, removed or retyped in one place
and not in the others."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator

import pytest

from conftest import NOW, query, write_lines
from upstack_pipeline import events
from upstack_pipeline.events import ingest_events
from upstack_pipeline.warehouse import Warehouse

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_COLUMNS = {"raw_json": "JSON", "source_file": "VARCHAR", "line_number": "BIGINT",
                    "ingested_at": "TIMESTAMP WITH TIME ZONE", "load_id": "BIGINT"}
JSON_KINDS = {bool: "boolean", int: "number", float: "number", str: "string", dict: "object", list: "array",
              type(None): "null"}
WRONG_VALUES = (7, "text", True, {}, [])  # a value of another type than the schema's, whatever it is


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((ROOT / "schemas" / "raw-event.schema.json").read_text(encoding="utf-8"))


def kinds(spec: dict) -> list[str]:
    return spec["type"] if isinstance(spec["type"], list) else [spec["type"]]


def value_kind(spec: dict) -> str:
    [kind] = [kind for kind in kinds(spec) if kind != "null"]
    return kind


def render(keys: tuple) -> str:
    """('custom_data', 'items', 0, 'price') -> custom_data.items[0].price, as quarantine details name fields."""
    text = ""
    for key in keys:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else key)
    return text


def walk(spec: dict, keys: tuple = ()) -> Iterator[tuple[tuple, dict, bool]]:
    """(keys, spec, required) of every field of the schema and of every array element, depth first."""
    for name, child in spec.get("properties", {}).items():
        yield keys + (name,), child, name in spec.get("required", [])
        yield from walk(child, keys + (name,))
    if "items" in spec:
        yield keys + (0,), spec["items"], True
        yield from walk(spec["items"], keys + (0,))


def sample(spec: dict, keys: tuple = ()):
    """A value for `spec` with every field filled in, each string naming its own path."""
    kind = value_kind(spec)
    if kind == "object":
        return {name: sample(child, keys + (name,)) for name, child in spec["properties"].items()}
    if kind == "array":
        return [sample(spec["items"], keys + (0,))]
    if kind == "string":
        return (NOW - timedelta(hours=1)).isoformat() if spec.get("format") == "date-time" else f"v-{render(keys)}"
    return {"number": 2.5, "boolean": True}[kind]


def table_type(spec: dict):
    """The raw_events type of a field, in json_transform's notation."""
    kind = value_kind(spec)
    if kind == "object":
        return {name: table_type(child) for name, child in spec["properties"].items()}
    if kind == "array":
        return [table_type(spec["items"])]
    if kind == "string" and spec.get("format") == "date-time":
        return "TIMESTAMP WITH TIME ZONE"
    return {"string": "VARCHAR", "number": "DOUBLE", "boolean": "BOOLEAN"}[kind]


def notation(duckdb_type):
    """A DuckDB type in json_transform's notation: {"field": type} for a STRUCT, [type] for a list."""
    if duckdb_type.id == "struct":
        return {name: notation(child) for name, child in duckdb_type.children}
    if duckdb_type.id == "list":
        return [notation(duckdb_type.child)]
    return str(duckdb_type)


def with_value(event: dict, keys: tuple, value=..., *, remove: bool = False) -> dict:
    event = copy.deepcopy(event)
    container = event
    for key in keys[:-1]:
        container = container[key]
    if remove:
        del container[keys[-1]]
    else:
        container[keys[-1]] = value
    return event


def test_raw_events_has_one_column_of_the_schemas_type_per_field(schema, tmp_path):
    """Also nested: DuckDB drops a struct field the table lacks without a word, so a field missing here is lost."""
    with Warehouse(tmp_path / "warehouse.duckdb").connect() as connection:
        relation = connection.sql("from raw_events")
        columns = {name: notation(duckdb_type) for name, duckdb_type in zip(relation.columns, relation.types)}
        not_null = {name for (name,) in connection.execute(
            "select column_name from duckdb_columns() where table_name = 'raw_events' and not is_nullable").fetchall()}
    fields = {name: table_type(spec) for name, spec in schema["properties"].items()}
    assert columns == {**fields, **PIPELINE_COLUMNS}
    assert not_null == set(schema["required"]) | set(PIPELINE_COLUMNS)


def test_lines_are_read_into_the_table_types_and_the_checks_are_the_schemas(schema):
    expected = {name: table_type(spec) for name, spec in schema["properties"].items()}
    read = {**events.READ_STRUCTURE}
    for name, spec in schema["properties"].items():
        if spec.get("format") == "date-time":  # a time is read as text and parsed by sql/line_verdicts.sql
            assert read[name] == "VARCHAR"
            read[name] = "TIMESTAMP WITH TIME ZONE"
    assert read == expected
    fields = [render(keys) for keys, _, _ in walk(schema) if 0 not in keys]
    items = [render(keys[3:]) for keys, _, _ in walk(schema) if keys[:3] == ("custom_data", "items", 0) and keys[3:]]
    assert sorted(events.EVENT_CONTRACT) == sorted(fields)
    assert sorted(events.ITEM_CONTRACT) == sorted(items)
    assert list(events.REQUIRED_FIELDS) == schema["required"] == list(events.EVENT_CONTRACT)[:len(schema["required"])]


def test_an_event_with_every_field_of_the_schema_lands_whole_in_raw_events(schema, settings):
    event = sample(schema)
    write_lines(settings.events_dir / "full.ndjson", [json.dumps(event)])

    report = ingest_events(settings, now=NOW)

    assert (report.ingested_rows, report.quarantined_rows) == (1, 0)
    names = list(schema["properties"])
    [row] = query(settings, f"select {', '.join(names)} from raw_events")
    stored = dict(zip(names, row))
    event["event_time"] = datetime.fromisoformat(event["event_time"])
    assert stored == event


def test_every_field_of_the_schema_is_checked_as_the_schema_says(schema, settings):
    """For each field (and array element): a value of another type, null, absence, an empty string where a value
    is required, one character over its maxLength; the pipeline quarantines exactly what the schema refuses (blank
    and over-long required fields as missing_field and too_long), naming the field, and keeps the rest."""
    base = sample(schema)
    cases: list[tuple[dict, str | None, str]] = []  # event, expected reason (None: kept), field

    def case(keys: tuple, value=..., *, remove: bool = False, reason: str | None) -> None:
        event = with_value(base, keys, value, remove=remove)
        if keys != ("event_id",):
            event["event_id"] = f"line-{len(cases) + 1}"
        cases.append((event, reason, render(keys)))

    for keys, spec, required in walk(schema):
        accepted = kinds(spec)
        wrong = next(value for value in WRONG_VALUES if JSON_KINDS[type(value)] not in accepted)
        case(keys, wrong, reason="wrong_type")
        case(keys, None, reason=None if "null" in accepted else "missing_field" if required and len(keys) == 1
             else "wrong_type")
        if not isinstance(keys[-1], int):
            case(keys, remove=True, reason="missing_field" if required else None)
        if spec.get("minLength"):
            case(keys, "", reason="missing_field")
        if "maxLength" in spec:
            case(keys, "x" * (spec["maxLength"] + 1), reason="too_long")
            if keys != ("event_id",) and "format" not in spec:
                case(keys, "x" * spec["maxLength"], reason=None)
    write_lines(settings.events_dir / "cases.ndjson", [json.dumps(event) for event, _, _ in cases])

    ingest_events(settings, now=NOW)

    quarantined = {line: (reason, detail) for line, reason, detail in query(
        settings, "select line_number, reason, detail from quarantined_events")}
    kept = {event_id for (event_id,) in query(settings, "select event_id from raw_events")}
    detail_starts = {"wrong_type": "{} is a JSON", "missing_field": "required field {} is", "too_long": "{} is longer"}
    for line, (event, reason, field) in enumerate(cases, start=1):
        if reason is None:
            assert event["event_id"] in kept and line not in quarantined, (field, event)
        else:
            assert quarantined.get(line, (None,))[0] == reason, (field, reason, quarantined.get(line))
            assert quarantined[line][1].startswith(detail_starts[reason].format(field)), quarantined[line]


def test_every_item_of_a_cart_is_checked_alike_and_the_first_broken_one_is_named(schema, settings):
    """sql/line_verdicts.sql types the leading items (events.LEADING_ITEMS) in the line's own parse and the items past
    them apart: a broken field or element is found and named the same at any position, a cart's first broken item
    is the one named, and a broken field of the event itself is named before any item."""
    base = sample(schema)
    item = base["custom_data"]["items"][0]
    cases: list[tuple[dict, str | None]] = []  # event, expected detail start (None: kept)

    def case(items: list, expected: str | None, **fields) -> None:
        event = with_value(base, ("custom_data", "items"), items)
        event["custom_data"].update(fields)
        event["event_id"] = f"line-{len(cases) + 1}"
        cases.append((event, expected))

    case([], None)
    for size in range(1, events.LEADING_ITEMS + 3):
        case([item] * size, None)
        for position in range(size):
            def cart(broken) -> list:
                return [broken if index == position else item for index in range(size)]
            case(cart(None), f"custom_data.items[{position}] is a JSON null")
            case(cart("text"), f"custom_data.items[{position}] is a JSON varchar")
            for field, types in events.ITEM_CONTRACT.items():
                wrong = next(value for value in WRONG_VALUES
                             if not set(events.JSON_TYPES[JSON_KINDS[type(value)]]) & set(types))
                case(cart({**item, field: wrong}), f"custom_data.items[{position}].{field} is a JSON")
                case(cart({key: value for key, value in item.items() if key != field}), None)
                case(cart({**item, field: None}), None)
            case(cart({**item, "price": "text"}) + [{**item, "price": "text"}],
                 f"custom_data.items[{position}].price is a JSON varchar")
            case(cart({**item, "price": "text"}), "custom_data.value is a JSON varchar", value="text")
    write_lines(settings.events_dir / "carts.ndjson", [json.dumps(event) for event, _ in cases])

    ingest_events(settings, now=NOW)

    quarantined = dict(query(settings, "select line_number, detail from quarantined_events"))
    for line, (event, expected) in enumerate(cases, start=1):
        if expected is None:
            assert line not in quarantined, (event["custom_data"], quarantined[line])
        else:
            assert quarantined.get(line, "").startswith(expected), (expected, quarantined.get(line))


def readme_field_list() -> list[str]:
    """The sub-list of the `events/` bullet in the README's "Landing folder contract"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Landing folder contract", 1)[1].split("\n## ", 1)[0]
    bullet = section.split("\n- `events/`", 1)[1].split("\n- ", 1)[0]
    return [line for line in bullet.split("\n") if line.startswith(("  - ", "    "))]


def test_the_readme_names_every_field_of_the_schema_and_no_other(schema):
    field_names = [keys[-1] for keys, _, _ in walk(schema) if not isinstance(keys[-1], int)]
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", name) for name in field_names)
    lines = readme_field_list()
    named = [name for name in re.findall(r"`([^`]+)`", "\n".join(lines)) if re.fullmatch(r"[a-z][a-z0-9_]*", name)]
    assert Counter(named) == Counter(field_names)
    second_bullet = next(i for i, line in enumerate(lines[1:], 1) if line.startswith("  - "))
    required_bullet = " ".join(lines[:second_bullet])
    assert required_bullet.startswith("  - required")
    assert re.findall(r"`([^`]+)`", required_bullet) == schema["required"]
