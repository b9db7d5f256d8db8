"""Access to the DuckDB warehouse: short connections, the schema, and the SQL kept in `sql/`.

DuckDB lets one process hold the file for writing at a time. Dagster serialises our own steps with a pool, but a
notebook, a second `upstack sync` or the UI's launched run can still hold the lock for a moment, so opening a
connection waits for the lock (with backoff) instead of failing the run on the first collision.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


class WarehouseBusyError(RuntimeError):
    """Another process kept the warehouse file locked for longer than we were willing to wait."""


def read_sql(name: str) -> str:
    """The text of `sql/<name>.sql`."""
    return (SQL_DIR / f"{name}.sql").read_text()


def _is_lock_conflict(error: duckdb.Error) -> bool:
    return "lock" in str(error).lower()


class Warehouse:
    def __init__(self, path: Path, *, lock_timeout_seconds: float = 600.0):
        self.path = Path(path)
        self.lock_timeout_seconds = lock_timeout_seconds

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection in UTC whose schema is current; closed (and the file lock released) on exit."""
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = self._open(read_only)
        try:
            connection.execute("set TimeZone = 'UTC'")
            if not read_only:
                connection.execute(read_sql("warehouse"))
            yield connection
        finally:
            connection.close()

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout_seconds
        delay = 0.05
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except (duckdb.IOException, duckdb.ConnectionException) as error:
                if not _is_lock_conflict(error) or time.monotonic() >= deadline:
                    if _is_lock_conflict(error):
                        raise WarehouseBusyError(
                            f"The warehouse {self.path} stayed locked by another process for "
                            f"{self.lock_timeout_seconds:.0f} s. Close notebooks or DuckDB shells that have it "
                            "open for writing, or wait for the running sync to finish, then run again."
                        ) from error
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)


def set_variables(connection: duckdb.DuckDBPyConnection, variables: dict) -> None:
    """DuckDB session variables for the SQL files of a stage (read there with getvariable): unlike prepared
    parameters they reach every statement of a multi-statement file."""
    for name, value in variables.items():
        connection.execute(f"set variable {name} = ?", [value])
