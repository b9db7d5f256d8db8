"""Identity resolution keeps the identifiers that translate into one email in table email_translations, and counts
again each run only those the run may have changed (sql/email_translations.sql): whatever the runs, the table is
what counting every identifier over the whole history gives. Real files, ingestion and DuckDB; no mocks."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from conftest import NOW, query, write_events
from test_identity import at, ev, run

JANE = [ev("jane-checkout", "InitiateCheckout", at(0, 5), "jane-laptop", "j1",
           {"email": "jane@gmail.com", "phone": "(212) 555-0101", "external_id": "cust-jane"})]


def typists(first: int, last: int) -> list[dict]:
    """Shoppers on browsers of their own who type the same made-up address; the first also gives a phone and logs in,
    so a phone and a customer id are linked to it and to nothing else."""
    return [ev(f"popup-{n}", "Identify", at(n), f"stranger-{n}", f"p{n}",
               {"email": "asdf@asdf.com", **({"phone": "(212) 555-0199", "external_id": "cust-asdf"} if n == 0 else {})})
            for n in range(first, last)]


def translations(settings) -> list[tuple]:
    return query(settings, "select id_type, id_value, email from email_translations order by all")


def test_an_email_quarantined_by_a_later_run_takes_back_the_translations_into_it(settings, tmp_path):
    run(settings, JANE + typists(0, 3), "run1.ndjson", now=NOW - timedelta(days=1))  # three browsers: one person
    assert translations(settings) == [
        ("customer_id", "cust-asdf", "asdf@asdf.com"), ("customer_id", "cust-jane", "jane@gmail.com"),
        ("phone", "+12125550101", "jane@gmail.com"), ("phone", "+12125550199", "asdf@asdf.com")]

    run(settings, typists(3, 4), "run2.ndjson", now=NOW)  # a fourth: a supernode, whose links are never used
    assert query(settings, "select value from identity_rejected_values where reason = 'many_browsers'") == [
        ("asdf@asdf.com",)]
    kept = translations(settings)
    assert kept == [("customer_id", "cust-jane", "jane@gmail.com"), ("phone", "+12125550101", "jane@gmail.com")]

    whole = replace(settings, landing_dir=tmp_path / "whole", warehouse_path=tmp_path / "whole.duckdb")
    whole.events_dir.mkdir(parents=True)
    whole.customers_dir.mkdir(parents=True)
    write_events(whole.events_dir / "all.ndjson", JANE + typists(0, 4))
    run(whole, now=NOW)
    assert query(settings, "select * from email_translations order by all") == query(
        whole, "select * from email_translations order by all")
