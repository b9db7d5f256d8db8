"""The Dagster catalog is the warehouse's: every table an analyst queries is an asset named after it, described and
with its columns as the warehouse has them, and the lineage follows the order the SQL runs in."""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
import pytest

from conftest import klaviyo_click, make_event, query, write_events
from dagster_project.definitions import load_definitions
from upstack_pipeline.analytics import VIEWS, readme_views, view_docs
from upstack_pipeline.warehouse import Warehouse, table_docs

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_tables() -> list[str]:
    """The tables the README's "The warehouse" section lists (first column of its table)."""
    section = README.read_text().split("\n## The warehouse\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return [name for cell in rows for name in re.findall(r"`(\w+)`", cell)]


@pytest.fixture(scope="module")
def assets() -> dict[str, dg.AssetSpec]:
    definitions = load_definitions()
    graph = definitions.resolve_asset_graph()
    return {key.to_user_string(): graph.get(key) for key in graph.get_all_asset_keys()}


def columns_of(metadata) -> list[tuple]:
    schema = metadata["dagster/column_schema"]
    schema = getattr(schema, "schema", schema)  # a TableSchemaMetadataValue, or its value
    return [(column.name, column.type, column.constraints.nullable, column.description) for column in schema.columns]


def test_every_table_the_readme_lists_is_an_asset_named_after_it_with_its_columns_and_a_description(assets):
    listed = readme_tables()
    assert len(listed) >= 19 and "klaviyo_outbox" in listed and "identity_flags" in listed
    missing = [table for table in listed if table not in assets]
    assert not missing, f"README tables without an asset: {missing}"
    for table in listed:
        node = assets[table]
        assert node.metadata["dagster/table_name"].value == f"main.{table}"
        assert columns_of(node.metadata), table
        assert node.description, f"{table}: no comment above its create table in sql/warehouse.sql"
        assert "table" in node.kinds and "duckdb" in node.kinds


def test_the_assets_are_the_tables_of_a_warehouse_and_nothing_else(assets, tmp_path):
    with Warehouse(tmp_path / "warehouse.duckdb").connect() as connection:
        tables = {name for (name,) in connection.execute(
            "select table_name from duckdb_tables() where database_name = current_database() and schema_name = 'main'"
        ).fetchall()}
        views = {name for (name,) in connection.execute(
            "select view_name from duckdb_views() where not internal and schema_name = 'main'").fetchall()}
    # The analysts' views are the pipeline's: a sync creates them (sql/<view>.sql), each an asset too.
    assert set(assets) == tables | set(VIEWS)
    assert views == {"usable_identity_observations", "usable_identity_links"}  # internal to identity resolution
    # Every user table is in the README, so a new table cannot reach the warehouse undocumented.
    assert tables == set(readme_tables())


def test_columns_and_descriptions_come_from_the_ddl_and_its_comments(assets):
    docs = table_docs()
    reason = {column.name: column for column in docs["quarantined_events"].columns}["reason"]
    assert reason.description.startswith("not_json | invalid_utf8") and "conflicting_duplicate" in reason.description
    load_id = {column.name: column for column in docs["raw_events"].columns}["load_id"]
    assert load_id.description.startswith("Numbers ingestion transactions in commit order")
    assert [column.name for column in docs["klaviyo_outbox"].columns][:3] == ["unique_id", "event_id", "event_name"]
    assert docs["warehouse_schema_version"].description.startswith("One row per step")
    first_event_id = ("first_event_id", "VARCHAR", False, "'customers:<file>' for links from the customers export")
    assert first_event_id in columns_of(assets["identity_links"].metadata)


@pytest.mark.slow  # a whole Dagster sync
def test_a_sync_materializes_every_table_with_the_columns_and_rows_the_warehouse_has(settings, sync, assets):
    write_events(settings.events_dir / "a.ndjson", [make_event("e1"), klaviyo_click()])
    (settings.customers_dir / "customers.csv").write_text("customer_id,email\n1,jane@gmail.com\n")

    result = sync()

    materialized = {event.asset_key.to_user_string(): event.materialization.metadata
                    for event in result.get_asset_materialization_events()}
    assert set(materialized) == set(assets)
    for table, metadata in materialized.items():
        real = query(settings, "select column_name, data_type, is_nullable from duckdb_columns() "
                               "where schema_name = 'main' and table_name = ? order by column_index", [table])
        spec = columns_of(assets[table].metadata)
        assert [column[:3] for column in spec] == real, f"{table}: its asset's columns are not the table's"
        assert columns_of(metadata) == spec, table
        assert metadata["dagster/row_count"].value == query(settings, f"select count(*) from {table}")[0][0]
        assert metadata["dagster/table_name"].value == f"main.{table}"


def test_lineage_follows_the_order_the_sql_runs_in():
    definitions = load_definitions()
    graph = definitions.resolve_asset_graph()

    def upstream(table: str) -> set[str]:
        return {key.to_user_string() for key in graph.upstream_key_iterator(dg.AssetKey(table))}

    # resolved_events.sql runs before identities.sql, which reads it (and then fills in its phones).
    assert "resolved_events" in upstream("identities") and "identities" not in upstream("resolved_events")
    assert {"raw_events", "identity_links", "browser_clusters"} <= upstream("resolved_events")
    assert {"resolved_events", "identities"} <= upstream("klaviyo_outbox") <= upstream("klaviyo_deliveries")
    # One step per stage, writing its tables in one go.
    steps: dict[str, set[str]] = {}
    for key in graph.get_all_asset_keys():
        steps.setdefault(graph.get(key).assets_def.op.name, set()).add(key.to_user_string())
    assert steps == {
        "ingestion": {"warehouse_schema_version", "ingested_files", "changed_files", "raw_events",
                      "raw_event_id_hashes", "quarantined_events", "customers", "quarantined_customers"},
        "identity_resolution": {"identity_observations", "identity_rejected_values", "identity_links",
                                "browser_links", "email_translations", "browser_clusters", "resolved_events",
                                "identities", "identity_flags", "pipeline_state"},
        "klaviyo_mapping": {"klaviyo_outbox", "klaviyo_skipped", "commerce_metrics"},
        "klaviyo_delivery": {"klaviyo_deliveries", "klaviyo_dead_letters"},
        "analytics": set(VIEWS),
    }


def test_each_view_is_an_asset_with_its_documented_columns_and_the_readme_lists_them(assets):
    assert readme_views() in README.read_text()
    for view, doc in view_docs().items():
        node = assets[view]
        assert "view" in node.kinds and node.description == doc.description
        undocumented = [column for column in columns_of(node.metadata) if not column[3]]
        assert not undocumented, f"{view}: columns without a line in the header of sql/{view}.sql: {undocumented}"
