"""`upstack sync`, `upstack sql --all-shops` and `upstack report --all-shops` on a shops file of real shops: each
shop synced into its own warehouse, a summary each, one shop's trouble its own, and the agency's numbers summed
from every shop's analysts' copy."""

from __future__ import annotations

import pytest
import yaml

from conftest import make_event, write_events
from dagster_project.cli import main
from upstack_pipeline.all_shops import all_shops_connection

pytestmark = pytest.mark.slow  # several whole syncs


def cart(event_id: str, browser: str, *, native: bool) -> dict:
    """An abandoned cart an hour ago: Klaviyo identifies it itself when `native`, else only Upstack (its _kx)."""
    return make_event(event_id, anonymous_id=browser, session_id=f"session-{browser}",
                      event_source_url=f"https://acme.myshopify.com/products/mug?_kx=KX{browser}",
                      user_data={"email": f"{browser}@gmail.com" if native else None, "klaviyo_identified": native})


@pytest.fixture
def shops_file(tmp_path, monkeypatch):
    """Two shops with their own folders and no Klaviyo key (their events wait in their outboxes)."""
    for name, (native, upstack_only) in {"north": (2, 1), "south": (1, 2)}.items():
        events = [cart(f"{name}-n{n}", f"{name}-native-{n}", native=True) for n in range(native)]
        events += [cart(f"{name}-u{n}", f"{name}-upstack-{n}", native=False) for n in range(upstack_only)]
        write_events(tmp_path / name / "landing" / "events" / "carts.ndjson", events)
        (tmp_path / name / "landing" / "customers").mkdir()
    path = tmp_path / "shops.yaml"
    path.write_text(yaml.safe_dump({"shops": {
        name: {"landing_dir": f"{name}/landing", "warehouse": f"{name}/warehouse.duckdb", "send_mode": "all"}
        for name in ("north", "south")}}))
    for variable in ("UPSTACK_LANDING_DIR", "UPSTACK_WAREHOUSE", "KLAVIYO_API_KEY", "DAGSTER_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("UPSTACK_SHOPS_FILE", str(path))
    return path


def test_sync_runs_every_shop_into_its_own_warehouse_and_the_agency_reads_them_summed(shops_file, tmp_path, capsys):
    assert main(["sync"]) == 0
    printed = capsys.readouterr().out
    assert "shop north: upstack sync: run" in printed and "shop south: upstack sync: run" in printed

    warehouses = {name: tmp_path / name / "warehouse.duckdb" for name in ("north", "south")}
    with all_shops_connection(warehouses) as connection:
        per_shop = dict(connection.execute("""
            select shop, (sum(klaviyo_native_sessions), sum(upstack_identified_sessions))
            from shops_daily_lift where metric = 'Added to Cart' group by shop""").fetchall())
        summed = connection.execute("""
            select sum(klaviyo_native_sessions), sum(upstack_identified_sessions), sum(abandoned_sessions)
            from daily_lift where metric = 'Added to Cart'""").fetchone()
        [weekly] = connection.execute("select count(distinct shop) from shop_weekly").fetchone()
    assert per_shop == {"north": (2, 1), "south": (1, 2)}  # each shop's carts in its own warehouse only
    assert summed == (3, 3, 6)
    assert weekly == 2

    assert main(["sql", "--all-shops", "select shop, sum(abandoned_sessions) as carts from shops_daily_lift "
                                       "group by shop order by shop"]) == 0
    table = capsys.readouterr().out
    assert "north" in table and "south" in table

    # The one-shop commands ask which shop.
    assert main(["sql", "select count(*) from daily_lift"]) == 2
    assert "declares 2 shops: name one with --shop (north, south)" in capsys.readouterr().err
    assert main(["sql", "--shop", "south", "select sum(upstack_identified_sessions) as upstack_only "
                                           "from daily_lift"]) == 0
    assert "upstack_only" in capsys.readouterr().out

    out = tmp_path / "agency.html"
    assert main(["report", "--all-shops", str(out)]) == 0
    page = out.read_text()
    assert '<section id="shops">' in page and "north" in page and "south" in page


def test_one_shop_can_be_synced_alone_and_one_shops_broken_warehouse_fails_only_it(shops_file, tmp_path, capsys):
    assert main(["sync", "--shop", "south"]) == 0
    assert "shop south" in capsys.readouterr().out
    assert not (tmp_path / "north" / "warehouse.duckdb").exists()

    assert main(["sync", "--shop", "west"]) == 2
    assert "--shop west: there is no such shop; the shops are north, south" in capsys.readouterr().err

    (tmp_path / "north" / "warehouse.duckdb").write_bytes(b"not a DuckDB file")
    write_events(tmp_path / "south" / "landing" / "events" / "more.ndjson",
                 [cart("south-late", "south-late", native=False)])
    assert main(["sync"]) != 0  # north failed
    printed = capsys.readouterr()
    assert "shop north: upstack sync: " in printed.err and "is not a DuckDB warehouse" in printed.err
    assert "shop south: upstack sync: run" in printed.out and "succeeded" in printed.out

    with pytest.raises(ValueError, match="no analysts' copy yet for north"):
        all_shops_connection({name: tmp_path / name / "warehouse.duckdb" for name in ("north", "south")})


def test_without_a_shops_file_sync_prints_what_it_always_printed(settings, monkeypatch, capsys):
    for variable in ("UPSTACK_SHOPS_FILE", "KLAVIYO_API_KEY", "DAGSTER_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("UPSTACK_LANDING_DIR", str(settings.landing_dir))
    monkeypatch.setenv("UPSTACK_WAREHOUSE", str(settings.warehouse_path))
    write_events(settings.events_dir / "a.ndjson", [cart("a", "a", native=False)])
    assert main(["sync"]) == 0
    assert capsys.readouterr().out.startswith("upstack sync: run ")  # no shop prefix: the summary as it was
