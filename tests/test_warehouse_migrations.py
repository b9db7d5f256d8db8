"""Upgrades keep the data: a warehouse of the first release, with rows in every table, is upgraded in place when this
release opens it, keeps every row, ends with the schema of a new warehouse and syncs; a warehouse of a newer release
is refused untouched; a failed or killed upgrade leaves the file as the older release left it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest

from conftest import NOW, make_event, query, upstack_id, write_events
from upstack_pipeline.events import ingest_events
from upstack_pipeline.warehouse import (
    MIGRATIONS, SCHEMA_VERSION, VERSION_TABLE, Migration, Warehouse, WarehouseError, WarehouseMigrationError,
    WarehouseOutOfMemoryError, WarehouseTooNewError, schema_version,
)

RELEASE_1_SCHEMA = Path(__file__).parent / "fixtures" / "warehouse_release_1.sql"
DAY0 = NOW - timedelta(days=3)  # when the first release synced; well within a cookie's lifetime of today
JANE_ID = upstack_id("email", "jane@gmail.com")
KIM_ID = upstack_id("kx", "KX-KIM")
JANE_CART_AT = (DAY0 - timedelta(minutes=20)).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
KIM_VIEW_AT = (DAY0 - timedelta(minutes=40)).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")

MUG = {"ProductID": "p1", "SKU": "MUG-1", "ProductName": "Mug", "Quantity": 2.0, "ItemPrice": 12.0, "RowTotal": 24.0,
       "ProductURL": "https://acme.myshopify.com/products/mug", "ImageURL": "https://cdn.shopify.com/mug.jpg",
       "ProductCategories": ["Kitchen"], "Brand": "Acme", "Variant": "Blue"}
JANE_PROFILE = {"email": "jane@gmail.com", "first_name": "Jane", "last_name": "Doe",
                "location": {"city": "Austin", "region": "TX"},
                "properties": {"upstack_id": JANE_ID, "upstack_match_method": "typed_in_event",
                               "upstack_first_seen": JANE_CART_AT[:19] + "+00:00"}}
JANE_CART = {"properties": {"AddedItemProductName": "Mug", "AddedItemProductID": "p1", "AddedItemSKU": "MUG-1",
                            "AddedItemPrice": 12.0, "AddedItemQuantity": 2.0,
                            "AddedItemImageURL": "https://cdn.shopify.com/mug.jpg",
                            "AddedItemURL": "https://acme.myshopify.com/products/mug",
                            "AddedItemCategories": ["Kitchen"], "ProductName": "Mug", "ProductID": "p1", "Price": 12.0,
                            "Quantity": 2.0, "CartValue": 24.0, "ItemNames": ["Mug"], "Items": [MUG],
                            "upstack_match_method": "typed_in_event"},
             "time": JANE_CART_AT, "value": 24.0, "value_currency": "USD",
             "unique_id": "jane-cart",
             "metric": {"data": {"type": "metric", "attributes": {"name": "Added to Cart from Upstack"}}}}
KIM_PROFILE = {"_kx": "KX-KIM", "properties": {"upstack_id": KIM_ID, "upstack_match_method": "klaviyo_click",
                                               "upstack_first_seen": KIM_VIEW_AT[:19] + "+00:00"}}
KIM_VIEW = {"properties": {"ProductName": "Teapot", "ProductID": "p2", "Categories": [],
                           "URL": "https://acme.myshopify.com/products/teapot?_kx=KX-KIM", "Price": 30.0,
                           "upstack_match_method": "klaviyo_click"},
            "time": KIM_VIEW_AT, "value": 30.0, "value_currency": "USD",
            "unique_id": "kim-view",
            "metric": {"data": {"type": "metric", "attributes": {"name": "Viewed Product from Upstack"}}}}

# What the first release could have written after two syncs: Jane typed her email on cookie anon-jane (an
# Instagram in-app browser handed her ad click to it) and her cart was sent; Kim came from a Klaviyo email, and
# Klaviyo refused that event; an anonymous visitor's view was skipped. Times are relative to variable day0.
RELEASE_1_ROWS = f"""
insert into pipeline_state values ('identity', 2, getvariable('day0') + interval 2 hour);

insert into ingested_files values
    ('events/dt=2026-11-28/part-0000.ndjson', 'events', 4120, getvariable('day0'),
     'a3f1c9e2b4d6f8a0c2e4f6a8b0d2e4f6a8c0e2f4a6b8d0f2a4c6e8f0a2b4c6d8', 'ingested', null, 5, 3, 1, 1,
     getvariable('day0') + interval 5 minute, 1),
    ('customers/customers-2026-11-28.csv', 'customers', 212, getvariable('day0') + interval 1 hour,
     'b4e2d0c8a6f4e2d0c8b6a4f2e0d8c6b4a2f0e8d6c4b2a0f8e6d4c2b0a8f6e4d2', 'ingested', null, 2, 1, 0, 1,
     getvariable('day0') + interval 65 minute, 2);

insert into changed_files values
    ('events/dt=2026-11-28/part-0000.ndjson', 'a3f1c9e2b4d6f8a0c2e4f6a8b0d2e4f6a8c0e2f4a6b8d0f2a4c6e8f0a2b4c6d8',
     'c5d3e1f9b7a5c3e1d9f7b5a3c1e9d7f5b3a1c9e7d5f3b1a9c7e5d3f1b9a7c5e3', 4377, getvariable('day0') + interval 2 hour);

insert into raw_events values
    ('jane-cart', 'AddToCart', getvariable('day0') - interval 20 minute, 'acme.myshopify.com', 'anon-jane',
     'sess-jane', 'https://acme.myshopify.com/products/mug', 'https://l.instagram.com/',
     {{'email': 'Jane@Gmail.com ', 'phone': null, 'em': null, 'ph': null, 'external_id': null, 'first_name': 'Jane',
      'last_name': 'Doe', 'city': 'Austin', 'region': 'TX', 'zip': '78701', 'country': 'US', 'kx': null,
      'klaviyo_identified': false, 'fbp': 'fb.1.1764300000.123', 'fbc': 'fb.1.1764300000.IwAR1', 'gclid': null,
      'ttclid': null, 'msclkid': null, 'client_ip_address': '203.0.113.7',
      'client_user_agent': 'Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X)'}},
     {{'value': 24.0, 'currency': 'USD', 'order_id': null, 'checkout_url': null, 'discount_codes': ['WELCOME'],
      'search_term': null, 'items': [{{'id': 'p1', 'name': 'Mug', 'price': 12.0, 'quantity': 2.0, 'sku': 'MUG-1',
      'variant': 'Blue', 'brand': 'Acme', 'category': 'Kitchen', 'url': 'https://acme.myshopify.com/products/mug',
      'image_url': 'https://cdn.shopify.com/mug.jpg'}}]}},
     {{'analytics': true, 'marketing': true, 'sale_of_data': false}},
     '{{"event_id":"jane-cart","event_name":"AddToCart"}}', 'events/dt=2026-11-28/part-0000.ndjson', 1,
     getvariable('day0') + interval 5 minute, 1),
    ('kim-view', 'ViewContent', getvariable('day0') - interval 40 minute, 'acme.myshopify.com', 'anon-kim',
     'sess-kim', 'https://acme.myshopify.com/products/teapot?_kx=KX-KIM', null,
     {{'email': null, 'phone': null, 'em': null, 'ph': null, 'external_id': null, 'first_name': null,
      'last_name': null, 'city': null, 'region': null, 'zip': null, 'country': null, 'kx': 'KX-KIM',
      'klaviyo_identified': false, 'fbp': null, 'fbc': null, 'gclid': null, 'ttclid': null, 'msclkid': null,
      'client_ip_address': '198.51.100.4', 'client_user_agent': 'Mozilla/5.0 (Macintosh)'}},
     {{'value': null, 'currency': 'USD', 'order_id': null, 'checkout_url': null, 'discount_codes': null,
      'search_term': null, 'items': [{{'id': 'p2', 'name': 'Teapot', 'price': 30.0, 'quantity': null, 'sku': null,
      'variant': null, 'brand': null, 'category': null, 'url': null, 'image_url': null}}]}},
     null, '{{"event_id":"kim-view","event_name":"ViewContent"}}', 'events/dt=2026-11-28/part-0000.ndjson', 3,
     getvariable('day0') + interval 5 minute, 1),
    ('anon-view', 'ViewContent', getvariable('day0') - interval 10 minute, 'acme.myshopify.com', 'anon-nobody',
     'sess-nobody', 'https://acme.myshopify.com/products/mug', null, null,
     {{'value': 12.0, 'currency': 'USD', 'order_id': null, 'checkout_url': null, 'discount_codes': null,
      'search_term': null, 'items': [{{'id': 'p1', 'name': 'Mug', 'price': 12.0, 'quantity': null, 'sku': 'MUG-1',
      'variant': null, 'brand': null, 'category': null, 'url': null, 'image_url': null}}]}},
     null, '{{"event_id":"anon-view","event_name":"ViewContent"}}', 'events/dt=2026-11-28/part-0000.ndjson', 4,
     getvariable('day0') + interval 5 minute, 1);

insert into quarantined_events values
    ('events/dt=2026-11-28/part-0000.ndjson', 2, '{{"event_id": "e-broken", "event_name": "AddToCart"',
     'not_json', 'unexpected end of input at character 44', null, getvariable('day0') + interval 5 minute),
    ('events/dt=2026-11-28/part-0000.ndjson', 5, '{{"event_id":"jane-cart","event_name":"AddToCart","x":1}}',
     'conflicting_duplicate', 'event_id', 'jane-cart', getvariable('day0') + interval 5 minute);

insert into customers values
    ('1001', 'jane@gmail.com', '+15125550123', 'Jane', 'Doe', 'Austin', 'TX', 'US', true,
     'customers/customers-2026-11-28.csv', 1, getvariable('day0') + interval 65 minute, 2);

insert into quarantined_customers values
    ('customers/customers-2026-11-28.csv', 2, ',someone@example.com,,,,,,,', 'missing_field', 'customer_id',
     getvariable('day0') + interval 65 minute);

insert into identity_observations values
    ('jane-cart', getvariable('day0') - interval 20 minute, 'acme.myshopify.com', 'anon-jane', 'sess-jane', 'email',
     'jane@gmail.com', 'Jane', 'Doe', 'Austin', 'TX', 1),
    ('jane-cart', getvariable('day0') - interval 20 minute, 'acme.myshopify.com', 'anon-jane', 'sess-jane',
     'fbclid', 'IwAR1', 'Jane', 'Doe', 'Austin', 'TX', 1),
    ('kim-view', getvariable('day0') - interval 40 minute, 'acme.myshopify.com', 'anon-kim', 'sess-kim', 'kx',
     'KX-KIM', null, null, null, null, 1);

insert into identity_rejected_values values
    ('email', 'test@test.com', 'placeholder', 2, getvariable('day0') - interval 50 minute,
     getvariable('day0') - interval 45 minute);

insert into identity_links values
    ('anonymous_id', 'anon-jane', 'email', 'jane@gmail.com', getvariable('day0') - interval 20 minute,
     getvariable('day0') - interval 20 minute, 1, 'jane-cart'),
    ('anonymous_id', 'anon-jane', 'fbclid', 'IwAR1', getvariable('day0') - interval 20 minute,
     getvariable('day0') - interval 20 minute, 1, 'jane-cart'),
    ('session_id', 'sess-jane', 'anonymous_id', 'anon-jane', getvariable('day0') - interval 20 minute,
     getvariable('day0') - interval 20 minute, 1, 'jane-cart'),
    ('session_id', 'sess-kim', 'anonymous_id', 'anon-kim', getvariable('day0') - interval 40 minute,
     getvariable('day0') - interval 40 minute, 1, 'kim-view'),
    ('anonymous_id', 'anon-kim', 'kx', 'KX-KIM', getvariable('day0') - interval 40 minute,
     getvariable('day0') - interval 40 minute, 1, 'kim-view'),
    ('session_id', 'sess-nobody', 'anonymous_id', 'anon-nobody', getvariable('day0') - interval 10 minute,
     getvariable('day0') - interval 10 minute, 1, 'anon-view'),
    ('customer_id', '1001', 'email', 'jane@gmail.com', getvariable('day0') + interval 65 minute,
     getvariable('day0') + interval 65 minute, 1, 'customers:customers/customers-2026-11-28.csv');

insert into browser_links values
    ('anon-jane', 'anon-jane-ig', 'click_id_handoff', 'IwAR1', getvariable('day0') - interval 25 minute);

insert into browser_clusters values
    ('anon-jane', 'anon-jane', 'click_id_handoff'),
    ('anon-jane-ig', 'anon-jane', 'click_id_handoff');

insert into identity_flags values
    ('shared_device', 'anon-tablet', '3 emails on one browser: its history names nobody',
     getvariable('day0') + interval 2 hour);

insert into identities values
    ('{JANE_ID}', 'email', 'jane@gmail.com', null, ['+15125550123'], ['1001'], 'Jane', 'Doe', 'Austin', 'TX',
     getvariable('day0') - interval 20 minute, getvariable('day0') - interval 20 minute, 1,
     getvariable('day0') + interval 2 hour),
    ('{KIM_ID}', 'kx', null, 'KX-KIM', [], [], null, null, null, null, getvariable('day0') - interval 40 minute,
     getvariable('day0') - interval 40 minute, 1, getvariable('day0') + interval 2 hour);

insert into resolved_events values
    ('jane-cart', 'AddToCart', getvariable('day0') - interval 20 minute, 'acme.myshopify.com', 'anon-jane',
     'sess-jane', 'anon-jane', '{JANE_ID}', 'jane@gmail.com', null, '+15125550123', 'typed_in_event', 'jane-cart',
     null, false, null, true, getvariable('day0') + interval 2 hour),
    ('kim-view', 'ViewContent', getvariable('day0') - interval 40 minute, 'acme.myshopify.com', 'anon-kim',
     'sess-kim', 'anon-kim', '{KIM_ID}', null, 'KX-KIM', null, 'klaviyo_click', 'kim-view', null, false, null, null,
     getvariable('day0') + interval 2 hour),
    ('anon-view', 'ViewContent', getvariable('day0') - interval 10 minute, 'acme.myshopify.com', 'anon-nobody',
     'sess-nobody', 'anon-nobody', null, null, null, null, null, null, 'no_evidence', false, null, null,
     getvariable('day0') + interval 2 hour);

insert into klaviyo_outbox values
    ('jane-cart', 'jane-cart', 'AddToCart', 'Added to Cart from Upstack', 'email:jane@gmail.com',
     '{json.dumps(JANE_PROFILE)}', '{json.dumps(JANE_CART)}', false, 'delivered', getvariable('day0') + interval 2 hour,
     getvariable('day0') + interval 2 hour, getvariable('day0') + interval 2 hour),
    ('kim-view', 'kim-view', 'ViewContent', 'Viewed Product from Upstack', 'kx:KX-KIM',
     '{json.dumps(KIM_PROFILE)}', '{json.dumps(KIM_VIEW)}', false, 'dead_letter',
     getvariable('day0') + interval 2 hour, getvariable('day0') + interval 2 hour, null);

insert into klaviyo_skipped values
    ('anon-view', 'ViewContent', 'unresolved', 'no_evidence', getvariable('day0') + interval 2 hour);

insert into klaviyo_deliveries values
    (getvariable('day0') + interval 2 hour, '/api/event-bulk-create-jobs', 202, 2, 1843, 184.5, null),
    (getvariable('day0') + interval 2 hour, '/api/event-bulk-create-jobs', null, 2, 1843, 10000.0, 'timed out');

insert into klaviyo_dead_letters values
    ('kim-view', 'kim-view', 'Viewed Product from Upstack', 400, 'profile: _kx is not a valid exchange id',
     getvariable('day0') + interval 2 hour);
"""


def create_release_1_warehouse(path: Path) -> None:
    """A warehouse file exactly as the first release created it (no version table), with rows in every table."""
    with duckdb.connect(str(path)) as connection:
        connection.execute("set TimeZone = 'UTC'")
        connection.execute(RELEASE_1_SCHEMA.read_text())
        connection.execute("set variable day0 = ?", [DAY0])
        connection.execute(RELEASE_1_ROWS)


def user_tables(connection: duckdb.DuckDBPyConnection) -> dict[str, list[str]]:
    """Each table of the open file, with its columns in order."""
    rows = connection.execute("""
        select table_name, list(column_name order by column_index)
        from duckdb_columns() join duckdb_tables() using (database_name, schema_name, table_name)
        where database_name = current_database() and schema_name = 'main'
        group by table_name""").fetchall()
    return dict(rows)


def contents(connection: duckdb.DuckDBPyConnection, tables: dict[str, list[str]]) -> dict[str, list[tuple]]:
    """Every row of each table, in the given columns, in a stable order."""
    return {table: connection.execute(f"select {', '.join(columns)} from {table} order by all").fetchall()
            for table, columns in tables.items()}


def schema(connection: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    """What makes two warehouses the same shape: tables and views with their columns in order (type, nullability,
    default), the constraints, and the view and macro definitions."""
    return {
        "columns": connection.execute("""
            select table_name, column_index, column_name, data_type, is_nullable, column_default
            from duckdb_columns() where database_name = current_database() and schema_name = 'main'
            order by table_name, column_index""").fetchall(),
        "constraints": connection.execute("""
            select table_name, constraint_type, constraint_column_names, expression
            from duckdb_constraints() where database_name = current_database() and schema_name = 'main'
            order by all""").fetchall(),
        "views": connection.execute("""
            select view_name, sql from duckdb_views()
            where database_name = current_database() and schema_name = 'main' and not internal
            order by all""").fetchall(),
        "macros": connection.execute("""
            select function_name, parameters, macro_definition from duckdb_functions()
            where database_name = current_database() and schema_name = 'main' and not internal
                and function_type = 'macro'
            order by all""").fetchall(),
    }


def fresh_schema(tmp_path: Path) -> dict[str, list[tuple]]:
    with Warehouse(tmp_path / "fresh" / "warehouse.duckdb").connect() as connection:
        return schema(connection)


def history(connection: duckdb.DuckDBPyConnection) -> list[tuple]:
    return connection.execute(f"select version, description from {VERSION_TABLE} order by version").fetchall()


@pytest.mark.slow  # an upgrade followed by a whole sync
def test_a_first_release_warehouse_is_upgraded_in_place_keeps_every_row_and_syncs(settings, sync, tmp_path):
    create_release_1_warehouse(settings.warehouse_path)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        release_1_tables = user_tables(connection)
        before = contents(connection, release_1_tables)
    assert [table for table, rows in before.items() if not rows] == []  # the fixture fills every table

    with Warehouse(settings.warehouse_path).connect() as connection:
        after = contents(connection, release_1_tables)
        upgraded_schema = schema(connection)
        assert schema_version(connection) == SCHEMA_VERSION
        assert history(connection) == [
            (1, "found without a version: taken as the first release's schema"),
            *[(migration.version, migration.name) for migration in MIGRATIONS],
        ]
    for table in release_1_tables:
        assert after[table] == before[table], f"{table} changed in the upgrade"
    assert upgraded_schema == fresh_schema(tmp_path)

    # The next sync reads the history the first release wrote: Jane's cookie is back, in a new session, without
    # typing her email; the email seen on that cookie three days ago names her.
    write_events(settings.events_dir / "dt=2026-12-01" / "part-0000.ndjson", [make_event(
        "jane-back", anonymous_id="anon-jane", session_id="sess-jane-2",
        event_source_url="https://acme.myshopify.com/products/mug",
        user_data={"klaviyo_identified": False, "client_ip_address": "203.0.113.7"})])
    sync()

    assert query(settings, """select email, match_method, evidence_event_id, upstack_id from resolved_events
                              where event_id = 'jane-back'""") == [("jane@gmail.com", "cookie_history", "jane-cart",
                                                                    JANE_ID)]
    assert query(settings, "select profile_key, status from klaviyo_outbox where event_id = 'jane-back'") == [
        ("email:jane@gmail.com", "pending")]
    assert query(settings, "select upstack_id from identities where email = 'jane@gmail.com'") == [(JANE_ID,)]
    assert query(settings, "select count(*), max(load_id) from raw_events") == [(4, 3)]
    assert query(settings, "select max(version) from warehouse_schema_version") == [(SCHEMA_VERSION,)]


def test_cart_events_queued_without_a_cart_link_are_mapped_again_after_the_upgrade(settings):
    """Release 1 queued carts without CheckoutURL: one not yet sent is withdrawn and queued again with its link.
    (Delivered ones stay as they were, and the completeness check looks only at what is still to send: the test
    above syncs after the upgrade.)"""
    from upstack_pipeline.klaviyo.mapping import map_events, overview

    create_release_1_warehouse(settings.warehouse_path)
    with duckdb.connect(str(settings.warehouse_path)) as connection:
        connection.execute("update klaviyo_outbox set status = 'pending', claimed_at = null, delivered_at = null "
                           "where event_id = 'jane-cart'")
    with Warehouse(settings.warehouse_path).connect():
        pass
    assert query(settings, "select count(*) from klaviyo_outbox where event_id = 'jane-cart'") == [(0,)]

    everything = replace(settings, destination=replace(settings.destination, send_mode="all"))
    map_events(everything, now=NOW)

    assert overview(everything, now=NOW).rows_missing_key_properties == 0
    [(link, source)] = query(settings, "select event->>'$.properties.CheckoutURL', "
                                       "event->>'$.properties.upstack_checkout_url_source' from klaviyo_outbox "
                                       "where event_id = 'jane-cart'")
    assert (link, source) == ("https://acme.myshopify.com/cart", "cart_page")


def test_the_upgrade_hashes_every_event_id_the_older_release_kept_so_its_retries_are_still_found(settings):
    create_release_1_warehouse(settings.warehouse_path)
    with Warehouse(settings.warehouse_path).connect() as connection:
        hashes = connection.execute("select id_hash, load_id from raw_event_id_hashes order by all").fetchall()
        kept = connection.execute("select event_id_hash(event_id), load_id from raw_events order by all").fetchall()
    assert len(hashes) == 3 and hashes == kept

    # The first release kept jane-cart as a stub line: the pixel sending the event again is a duplicate of it (with
    # another payload, so quarantined as one), not a second row.
    write_events(settings.events_dir / "dt=2026-12-01" / "part-0000.ndjson", [make_event("jane-cart")])
    report = ingest_events(settings, now=NOW)

    assert (report.ingested_rows, report.quarantined_rows) == (0, 1)
    assert query(settings, "select count(*) from raw_events where event_id = 'jane-cart'") == [(1,)]
    assert query(settings, "select reason from quarantined_events where event_id = 'jane-cart' "
                           "and source_file like 'events/dt=2026-12-01/%'") == [("conflicting_duplicate",)]


@pytest.mark.parametrize("built_by", ["3a63024", "d016ccf"])
def test_warehouses_of_the_unreleased_commits_before_versioning_upgrade_too(built_by, tmp_path):
    """Between the first release and versioning, commits changed the schema in place: 3a63024 added
    identity_rejected_values.browsers, d016ccf the usable_* views too (what migration 0002 does, less the version)."""
    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as connection:
        connection.execute(RELEASE_1_SCHEMA.read_text())
        if built_by == "3a63024":
            connection.execute("alter table identity_rejected_values add column if not exists browsers bigint")
        else:
            connection.execute(next(migration.sql for migration in MIGRATIONS if migration.version == 2))

    with Warehouse(path).connect() as connection:
        assert schema_version(connection) == SCHEMA_VERSION
        assert schema(connection) == fresh_schema(tmp_path)


def test_a_new_warehouse_is_created_at_the_latest_version_and_reopening_it_writes_nothing(tmp_path):
    path = tmp_path / "data" / "warehouse.duckdb"
    with Warehouse(path).connect() as connection:
        assert history(connection) == [(SCHEMA_VERSION, "new warehouse")]
    created = path.read_bytes()

    with Warehouse(path).connect() as connection:
        assert schema_version(connection) == SCHEMA_VERSION
    assert path.read_bytes() == created, "opening a current warehouse again wrote to it"


# The values runs look history rows up by, stored uncompressed (sql/warehouse.sql says why).
LOOKUP_VALUES = {"raw_events": ["event_id"], "resolved_events": ["event_id"], "klaviyo_skipped": ["event_id"],
                 "identity_links": ["left_value", "right_value"]}


def stored_compressions(connection: duckdb.DuckDBPyConnection, table: str) -> dict[str, set[str]]:
    """Each string column of `table` with the compressions its written segments use."""
    rows = connection.execute(f"""
        select column_name, list(distinct compression) from pragma_storage_info('{table}')
        where segment_type = 'VARCHAR' group by column_name""").fetchall()
    return {column: set(compressions) for column, compressions in rows}


def test_the_values_runs_look_rows_up_by_are_stored_uncompressed_in_new_and_upgraded_warehouses(tmp_path):
    def definitions(connection: duckdb.DuckDBPyConnection) -> dict[str, str]:
        return dict(connection.execute("select table_name, sql from duckdb_tables() where table_name in ?",
                                       [list(LOOKUP_VALUES)]).fetchall())

    with Warehouse(tmp_path / "new.duckdb").connect() as connection:
        new = definitions(connection)
    for table, columns in LOOKUP_VALUES.items():
        for column in columns:
            assert f"{column} VARCHAR USING COMPRESSION Uncompressed NOT NULL" in new[table], new[table]

    old = tmp_path / "release-1.duckdb"
    create_release_1_warehouse(old)
    in_order = {table: f"select * from {table} order by rowid" for table in LOOKUP_VALUES}
    with duckdb.connect(str(old), read_only=True) as connection:
        before = {table: connection.execute(sql).fetchall() for table, sql in in_order.items()}
        assert all(before.values())  # the fixture has rows in each table
        assert not any("Uncompressed" in stored_compressions(connection, table)[column]
                       for table, columns in LOOKUP_VALUES.items() for column in columns)
    with Warehouse(old).connect() as connection:
        assert definitions(connection) == new  # every column's compression as a new warehouse has it
        connection.execute("checkpoint")
        stored = {table: stored_compressions(connection, table) for table in LOOKUP_VALUES}
        # The same rows in the same order: rowid order is what "earlier" means for raw_events' load_id watermark.
        assert {table: connection.execute(sql).fetchall() for table, sql in in_order.items()} == before
    for table, columns in stored.items():
        for column, compressions in columns.items():
            # Only the lookup values: the other string columns keep DuckDB's own choice.
            assert (compressions == {"Uncompressed"}) == (column in LOOKUP_VALUES[table]), (table, column)


def test_a_warehouse_of_a_newer_release_is_refused_untouched(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    with Warehouse(path).connect():
        pass
    with duckdb.connect(str(path)) as connection:
        connection.execute(f"insert into {VERSION_TABLE} values (?, now(), '{SCHEMA_VERSION + 1:04d}_future.sql')",
                           [SCHEMA_VERSION + 1])
    written = path.read_bytes()

    for read_only in (False, True):
        with pytest.raises(WarehouseTooNewError) as refused:
            with Warehouse(path).connect(read_only=read_only):
                pass
        assert str(refused.value) == (
            f"The warehouse {path} has schema version {SCHEMA_VERSION + 1}, but this release of upstack-flows knows "
            f"versions up to {SCHEMA_VERSION}: a newer release has upgraded it, and this one could misread it or "
            "damage it, so it leaves the file untouched. Upgrade upstack-flows to the release that wrote it (or a "
            "later one), or set UPSTACK_WAREHOUSE to another warehouse file.")
    assert isinstance(refused.value, WarehouseError)  # what the CLI prints in one line
    assert path.read_bytes() == written


def test_a_read_only_connection_reads_an_older_warehouse_without_upgrading_it(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    create_release_1_warehouse(path)
    written = path.read_bytes()

    with Warehouse(path).connect(read_only=True) as connection:
        assert schema_version(connection) == 1
        assert connection.execute("select count(*) from raw_events").fetchone() == (3,)
    assert path.read_bytes() == written


# A migration that fails halfway: its first statement works, its second does not.
BROKEN = Migration(SCHEMA_VERSION + 1, f"{SCHEMA_VERSION + 1:04d}_broken.sql",
                   "alter table raw_events add column mood varchar; select error('failed halfway');")


def assert_as_the_first_release_left_it(path: Path, rows: dict[str, list[tuple]]) -> None:
    with duckdb.connect(str(path), read_only=True) as connection:
        assert schema_version(connection) == 1
        tables = user_tables(connection)
        assert VERSION_TABLE not in tables
        assert "browsers" not in tables["identity_rejected_values"]  # 0002 rolled back with the rest
        assert "mood" not in tables["raw_events"]
        assert contents(connection, tables) == rows


def release_1_rows(path: Path) -> dict[str, list[tuple]]:
    with duckdb.connect(str(path), read_only=True) as connection:
        return contents(connection, user_tables(connection))


def test_a_failed_upgrade_leaves_the_warehouse_as_the_older_release_left_it(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    create_release_1_warehouse(path)
    rows = release_1_rows(path)

    with pytest.raises(WarehouseMigrationError) as failed:
        with Warehouse(path, migrations=[*MIGRATIONS, BROKEN]).connect():
            pass
    assert f"failed in sql/migrations/{BROKEN.name}" in str(failed.value)
    assert "the file is still at version 1" in str(failed.value)
    assert_as_the_first_release_left_it(path, rows)

    with Warehouse(path).connect() as connection:  # this release's own migrations still apply
        assert schema_version(connection) == SCHEMA_VERSION


# Runs an upgrade whose last migration is the first statement of BROKEN, and kills the process (os._exit: no
# rollback, no close) when that migration's version row is about to be written, inside the upgrade's transaction.
KILLED_UPGRADE = """
import os, sys
from upstack_pipeline import warehouse

record = warehouse.Warehouse._record

def record_or_die(connection, version, description):
    if description == sys.argv[3]:
        os._exit(37)
    record(connection, version, description)

warehouse.Warehouse._record = staticmethod(record_or_die)
last = warehouse.Migration(int(sys.argv[2]), sys.argv[3], sys.argv[4])
with warehouse.Warehouse(sys.argv[1], migrations=[*warehouse.MIGRATIONS, last]).connect():
    pass
"""


def test_a_killed_upgrade_leaves_the_warehouse_as_the_older_release_left_it(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    create_release_1_warehouse(path)
    rows = release_1_rows(path)

    killed = subprocess.run([sys.executable, "-c", KILLED_UPGRADE, str(path), str(BROKEN.version), BROKEN.name,
                             "alter table raw_events add column mood varchar"],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == 37, killed.stderr

    assert_as_the_first_release_left_it(path, rows)


def test_an_upgrade_that_runs_out_of_memory_names_the_memory_settings_not_a_bug(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    create_release_1_warehouse(path)
    rows = release_1_rows(path)
    # One string of 200 MB: DuckDB cannot spill an aggregate's single value to disk.
    greedy = Migration(SCHEMA_VERSION + 1, f"{SCHEMA_VERSION + 1:04d}_greedy.sql",
                       "create table greedy as select string_agg(repeat('x', 1000), '') as s from range(200000);")

    with pytest.raises(WarehouseOutOfMemoryError, match="raise UPSTACK_DUCKDB_MEMORY_LIMIT") as failed:
        with Warehouse(path, memory_limit="30MB", migrations=[*MIGRATIONS, greedy]).connect():
            pass
    assert "bug" not in str(failed.value)
    assert_as_the_first_release_left_it(path, rows)
