"""The optional Shopify customers export (SPEC 3.2): links a Shopify customer id to an email and fills profiles."""

from __future__ import annotations

import io
from datetime import datetime
from typing import Callable

import duckdb
import polars as pl

from upstack_pipeline.ingestion import IngestReport, UnreadableFileError, ingest_new_files
from upstack_pipeline.landing import LandingFile
from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import read_sql

CUSTOMER_COLUMNS = (
    "customer_id", "email", "phone", "first_name", "last_name", "city", "region", "country", "accepts_marketing",
)


class CustomerFiles:
    """Customer landing files (CSV with a header, or Parquet) for `upstack_pipeline.ingestion`."""

    kind = "customers"
    statement_settings = ()

    def read_lines(self, landing_file: LandingFile, data: bytes) -> pl.DataFrame:
        try:
            if landing_file.format == "parquet":
                frame, first_line = pl.read_parquet(io.BytesIO(data)), 1
            else:
                # Every column as text: ids and phones must keep their leading zeros and '+'.
                frame, first_line = pl.read_csv(io.BytesIO(data), infer_schema=False), 2
        except Exception as error:
            raise UnreadableFileError(f"{type(error).__name__}: {error}") from error
        known = [name for name in CUSTOMER_COLUMNS if name in frame.columns]
        if "customer_id" not in known:
            raise UnreadableFileError(
                f"no customer_id column (columns found: {', '.join(frame.columns) or 'none'}); "
                f"a customers export needs {', '.join(CUSTOMER_COLUMNS)}"
            )
        try:
            rows = frame.select(pl.col(name).cast(pl.String) for name in known) \
                .select(pl.struct(pl.all()).struct.json_encode()).to_series()
        except Exception as error:
            raise UnreadableFileError(f"columns that are not text or numbers: {error}") from error
        return pl.DataFrame({
            "line_number": pl.int_range(first_line, first_line + frame.height, eager=True),
            "raw_line": rows,
            "invalid_utf8": pl.repeat(False, frame.height, eager=True),
        })

    def write_batch(self, connection: duckdb.DuckDBPyConnection, now: datetime) -> None:
        connection.execute(read_sql("customers"))


def ingest_customers(
    settings: Settings, *, now: datetime, log: Callable[[str], None] = lambda message: None
) -> IngestReport:
    """Ingests every customers export not read yet into customers / quarantined_customers."""
    return ingest_new_files(
        settings.warehouse(), settings.landing_dir, CustomerFiles(),
        now=now, batch_bytes=settings.ingest_batch_bytes, log=log,
    )
