"""Turning library reports into asset metadata an operator can read in the Dagster UI, and the warehouse's tables
into assets an analyst finds in its catalog."""

from __future__ import annotations

from functools import cache
from typing import Iterable, Sequence

import dagster as dg
import polars as pl

from dagster_project.shops import SHOP_PARTITIONS
from upstack_pipeline.analytics import view_docs
from upstack_pipeline.ingestion import IngestReport, TableOverview
from upstack_pipeline.landing import accepted_names
from upstack_pipeline.warehouse import ColumnDoc, TableDoc, Warehouse, table_docs

# Schema-qualified, as an analyst writes it in any DuckDB session on the warehouse file, whatever the file's name.
SCHEMA = "main"


@cache
def warehouse_tables() -> dict[str, TableDoc]:
    """Every table of the warehouse, described by the comments of its DDL (sql/warehouse.sql): the one home of
    what a table and its columns mean."""
    return table_docs()


@cache
def analytics_views() -> dict[str, TableDoc]:
    """The analysts' views, described by their files' headers (sql/<view>.sql)."""
    return view_docs()


def table_spec(table: str, *, group: str, deps: Iterable[str] = (), doc: TableDoc | None = None,
               kind: str = "table") -> dg.AssetSpec:
    """The asset of a warehouse table (or view): named after it, described and with its columns as its DDL has
    them, so the UI's catalog finds it by name and shows its columns before it is ever materialized. Partitioned by
    shop: each shop's table lives in its own warehouse file."""
    doc = doc or warehouse_tables()[table]
    return dg.AssetSpec(table, deps=list(deps), group_name=group, kinds={"duckdb", kind},
                        description=doc.description, metadata=table_identity(table, doc.columns),
                        partitions_def=SHOP_PARTITIONS)


def table_specs(tables: dict[str, Sequence[str]], *, group: str) -> list[dg.AssetSpec]:
    """The assets of a step's tables, from {table: the tables it depends on}. (Kept as names at module level: the
    defs loader would take a module's own list of specs for assets of their own.)"""
    return [table_spec(table, group=group, deps=deps) for table, deps in tables.items()]


def view_specs(views: dict[str, Sequence[str]], *, group: str) -> list[dg.AssetSpec]:
    return [table_spec(view, group=group, deps=deps, doc=analytics_views()[view], kind="view")
            for view, deps in views.items()]


def table_identity(table: str, columns: Sequence[ColumnDoc]) -> dict[str, dg.MetadataValue]:
    return {
        "dagster/table_name": dg.MetadataValue.text(f"{SCHEMA}.{table}"),
        "dagster/column_schema": dg.MetadataValue.table_schema(dg.TableSchema(columns=[
            dg.TableColumn(column.name, column.type, description=column.description,
                           constraints=dg.TableColumnConstraints(nullable=column.nullable))
            for column in columns
        ])),
    }


def table_metadata(warehouse: Warehouse, tables: Iterable[str], docs: dict[str, TableDoc] | None = None,
                   counts: dict[str, int] | None = None) -> dict[str, dict[str, dg.MetadataValue]]:
    """Each table's (or view's) row count and columns as they are in the warehouse file now (a file upgraded by
    migrations included), with the descriptions of the DDL: what every materialization of a table records.
    `counts`, when the caller has them, saves recounting (a view computes its whole query to count)."""
    tables = list(tables)
    docs = docs or warehouse_tables()
    with warehouse.connect() as connection:
        found = connection.execute("""
            select table_name, column_name, data_type, is_nullable from duckdb_columns()
            where database_name = current_database() and schema_name = ? and table_name in ?
            order by table_name, column_index""", [SCHEMA, tables]).fetchall()
        counts = counts or {table: connection.execute(f"select count(*) from {SCHEMA}.{table}").fetchone()[0]
                            for table in tables}
    metadata = {}
    for table in tables:
        described = {column.name: column.description for column in docs[table].columns}
        columns = [ColumnDoc(name, data_type, nullable, described.get(name))
                   for found_table, name, data_type, nullable in found if found_table == table]
        metadata[table] = {**table_identity(table, columns), "dagster/row_count": dg.MetadataValue.int(counts[table])}
    return metadata


def view_metadata(warehouse: Warehouse, views: Iterable[str],
                  counts: dict[str, int]) -> dict[str, dict[str, dg.MetadataValue]]:
    return table_metadata(warehouse, views, analytics_views(), counts)


def percent(share: float) -> dg.FloatMetadataValue:
    """A share as a percentage with two decimals (0.0097 -> 0.97): readable in the UI, still a number that the
    Plots tab can draw. Keys holding one end in `_pct`."""
    return dg.MetadataValue.float(round(share * 100, 2))


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 request`, `2 requests`, `1,000 events`; `nouns` where adding an s is wrong (`1 person`, `2 people`)."""
    return f"{count:,} " + (noun if count == 1 else nouns or noun + "s")


def markdown_table(frame: pl.DataFrame, max_cell: int = 80) -> str:
    if frame.is_empty():
        return "_none_"

    def cell(value: object) -> str:
        text = "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= max_cell else text[: max_cell - 1] + "…"

    header = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(cell(value) for value in row) + " |" for row in frame.iter_rows()]
    return "\n".join([header, rule, *rows])


def ingestion_summary(report: IngestReport, table: TableOverview) -> str:
    """One line for a person: what this run added, and what it set aside and why."""
    parts = [f"{plural(report.ingested_rows, 'new row')} from {plural(report.files_read, 'file')} "
             f"(table now {table.total_rows:,})"]
    if report.duplicate_rows:
        parts.append(f"{plural(report.duplicate_rows, 'pixel retry', 'pixel retries')} skipped")
    if report.quarantined_rows:
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in table.quarantined_this_run_by_reason.items())
        parts.append(f"{report.quarantined_rows:,} quarantined ({reasons})")
    if report.unreadable_files:
        parts.append(plural(len(report.unreadable_files), "unreadable file"))
    if report.changed_files:
        parts.append(f"{plural(len(report.changed_files), 'file')} changed after ingestion (not re-read)")
    if report.ignored_files:
        outside = [path for path in report.ignored_files if "/" not in path]
        misnamed = [path for path in report.ignored_files if "/" in path]
        why = [f"outside events/ and customers/: {_first_few(outside)}" if outside else "",
               f"named as no reader takes ({accepted_names()}): {_first_few(misnamed)}" if misnamed else ""]
        parts.append(f"{plural(len(report.ignored_files), 'file')} not read, "
                     + "; ".join(reason for reason in why if reason))
    return "; ".join(parts)


def _first_few(paths: list[str], shown: int = 5) -> str:
    return ", ".join(paths[:shown]) + (", ..." if len(paths) > shown else "")


def ingestion_metadata(report: IngestReport, table: TableOverview) -> dict[str, dg.MetadataValue]:
    return {
        "summary": dg.MetadataValue.text(ingestion_summary(report, table)),
        "dagster/row_count": dg.MetadataValue.int(table.total_rows),
        "files_read": dg.MetadataValue.int(report.files_read),
        "rows_ingested": dg.MetadataValue.int(report.ingested_rows),
        "duplicates_skipped": dg.MetadataValue.int(report.duplicate_rows),
        "rows_quarantined": dg.MetadataValue.int(report.quarantined_rows),
        "quarantined_by_reason": dg.MetadataValue.json(table.quarantined_this_run_by_reason),
        "quarantined_total": dg.MetadataValue.int(table.total_quarantined),
        "unreadable_files": dg.MetadataValue.json(report.unreadable_files),
        "changed_files": dg.MetadataValue.json(report.changed_files),
        "ignored_files": dg.MetadataValue.json(report.ignored_files),
        "preview": dg.MetadataValue.md(markdown_table(table.recent_rows)),
        "quarantine_preview": dg.MetadataValue.md(markdown_table(table.quarantined_this_run)),
    }
