"""Every shop's numbers at once, for an agency (issue 15): the shops' analysts' copies attached read-only.

Each sync publishes its shop's views to `<warehouse>.analytics.duckdb` (upstack_pipeline.analytics), so reading
every shop never waits on, nor blocks, any shop's sync. `all_shops_connection` attaches those copies to an
in-memory DuckDB and leaves the one-shop view names summed over the shops (sql/all_shops.sql), plus `shop_weekly`
and, per published table T, `shops_T` with a `shop` column: `upstack sql --all-shops` queries them and
`upstack report --all-shops` draws them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import duckdb

from upstack_pipeline.analytics import PUBLISHED_VIEWS, analytics_path
from upstack_pipeline.warehouse import read_sql

TABLES = (*PUBLISHED_VIEWS, "commerce_metrics", "published")


def all_shops_connection(warehouses: Mapping[str, Path]) -> duckdb.DuckDBPyConnection:
    """An in-memory connection over the analysts' copies of `warehouses` (shop name -> warehouse file).

    Raises ValueError naming the shops whose copy does not exist yet: `upstack sync --shop NAME` publishes it."""
    missing = [shop for shop, warehouse in warehouses.items() if not analytics_path(Path(warehouse)).is_file()]
    if missing:
        raise ValueError(f"no analysts' copy yet for {', '.join(missing)}: run `upstack sync` (or "
                         f"`upstack sync --shop {missing[0]}`), which publishes it after every run")
    connection = duckdb.connect()
    connection.execute("set TimeZone = 'UTC'")
    for index, (shop, warehouse) in enumerate(warehouses.items()):
        connection.execute(f"attach ? as shop_{index} (read_only)", [str(analytics_path(Path(warehouse)))])
    for table in TABLES:
        parts = " union all by name ".join(
            f"select ? as shop, * from shop_{index}.{table}" for index in range(len(warehouses)))
        # Parameters are not allowed in a view's text: the shop names go in as quoted literals.
        parts = parts.replace("?", "{}").format(*(_literal(shop) for shop in warehouses))
        connection.execute(f"create temp view shops_{table} as {parts}")
    connection.execute(read_sql("all_shops"))
    return connection


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
