"""Scoring identity resolution against ground truth: tiny hand-made worlds whose every metric is known exactly, a
real DuckDB warehouse file, and one end-to-end run on simulated traffic."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest

from upstack_pipeline.sandbox.evaluation import Evaluation, ResolutionScore, evaluate, format_evaluation
from upstack_pipeline.events import ingest_events
from upstack_pipeline.settings import Settings
from upstack_pipeline.sandbox.simulate import simulate
from upstack_pipeline.warehouse import Warehouse

COMMERCE = ("ViewContent", "AddToCart", "InitiateCheckout", "Purchase")
UTC = timezone.utc


def at(day: int, hour: int, minute: int) -> datetime:
    return datetime(2026, 11, 25 + day, hour, minute, tzinfo=UTC)


@dataclass(frozen=True)
class Person:
    person_id: str
    email: str
    customer_id: str = ""
    kx: str = ""


@dataclass(frozen=True)
class Event:
    """One pixel event, who really did it, and what our resolver said about it (commerce events only)."""

    event_id: str
    person: Person
    name: str
    time: datetime
    anonymous_id: str
    session_id: str
    email: str | None = None          # user_data.email as the pixel captured it
    external_id: str | None = None
    kx: str | None = None
    ours_email: str | None = None     # resolved_events.email
    ours_kx: str | None = None        # resolved_events.kx
    native: bool = False              # resolved_events.klaviyo_native
    sent: str | None = None           # klaviyo_outbox status when ours sent it (with ours_email, else ours_kx)
    declined: bool = False            # consent.marketing is false


def build_world(root: Path, people: list[Person], events: list[Event]) -> tuple[Path, Path]:
    """Writes truth/people.csv, truth/events.csv and a warehouse with raw_events (the real schema) and
    resolved_events (one row per commerce event). Pixel order is the list order."""
    truth = root / "truth"
    truth.mkdir(parents=True)
    with (truth / "people.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["person_id", "email", "phone", "customer_id", "kx", "household_id"])
        for person in people:
            writer.writerow([person.person_id, person.email, "", person.customer_id, person.kx, "H1"])
    with (truth / "events.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["event_id", "person_id", "email", "browser_id", "session_id", "scenario"])
        for event in events:
            writer.writerow([event.event_id, event.person.person_id, event.person.email, event.anonymous_id,
                             event.session_id, "normal"])

    warehouse = root / "warehouse.duckdb"
    with Warehouse(warehouse).connect() as connection:
        connection.executemany(
            """insert into raw_events (event_id, event_name, event_time, shop, anonymous_id, session_id, user_data,
                                       consent, raw_json, source_file, line_number, ingested_at, load_id)
               values (?, ?, ?, 'acme.myshopify.com', ?, ?, ?, ?, ?, 'events/dt=2026-11-26/part-0000.ndjson', ?, ?,
                       1)""",
            [[event.event_id, event.name, event.time, event.anonymous_id, event.session_id,
              {"email": event.email, "external_id": event.external_id, "kx": event.kx},
              {"analytics": None, "marketing": False, "sale_of_data": None} if event.declined else None,
              json.dumps({"event_id": event.event_id}), line, at(5, 0, 0)]
             for line, event in enumerate(events, start=1)],
        )
        outbox = [[event.event_id, event.event_id, event.name,
                   f"email:{event.ours_email}" if event.ours_email else f"kx:{event.ours_kx}", event.sent, at(5, 0, 0)]
                  for event in events if event.sent]
        if outbox:
            connection.executemany(
                """insert into klaviyo_outbox (unique_id, event_id, event_name, metric_name, profile_key, profile,
                                               event, backfill, status, created_at)
                   values (?, ?, ?, 'Added to Cart from Upstack', ?, '{}', '{}', false, ?, ?)""", outbox)
        # Only the columns the evaluation relies on, whatever the resolver's own schema in warehouse.sql holds.
        connection.execute("drop table if exists resolved_events")
        connection.execute("""
            create table resolved_events (
                event_id varchar, event_name varchar, event_time timestamptz, anonymous_id varchar,
                session_id varchar, email varchar, kx varchar, match_method varchar, klaviyo_native boolean)""")
        connection.executemany(
            "insert into resolved_events values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [[event.event_id, event.name, event.time, event.anonymous_id, event.session_id, event.ours_email,
              event.ours_kx, "test" if event.ours_email or event.ours_kx else None, event.native]
             for event in events if event.name in COMMERCE],
        )
    return warehouse, truth


ALICE = Person("P1", "alice@mail.com", customer_id="C1", kx="KX_A")
BOB = Person("P2", "bob@mail.com", kx="KX_B")          # Alice's household: they share the tablet
CAROL = Person("P3", "carol@mail.com", customer_id="C3", kx="KX_C")
DAN = Person("P4", "dan@mail.com", kx="KX_D")
ERIN = Person("P5", "erin@mail.com", kx="KX_E")


def family_world() -> list[Event]:
    """Every metric of ours and of the baseline is worked out by hand in test_each_metric_has_its_exact_value."""
    return [
        # S1, the family tablet, day 1: Alice types her email at checkout and buys; her earlier events are stitched.
        Event("a1", ALICE, "ViewContent", at(1, 10, 0), "tablet", "S1", ours_email="alice@mail.com", native=True),
        Event("a2", ALICE, "AddToCart", at(1, 10, 1), "tablet", "S1", ours_email="alice@mail.com", native=True),
        Event("a3", ALICE, "InitiateCheckout", at(1, 10, 2), "tablet", "S1", email=" Alice@Mail.com ",
              ours_email="alice@mail.com", native=True),
        # A stray wrong kx does not matter when the email is right.
        Event("a4", ALICE, "Purchase", at(1, 10, 3), "tablet", "S1", email="alice@mail.com",
              ours_email="alice@mail.com", ours_kx="KX_B", native=True),
        # S2, day 2: Bob on the tablet, never identifies, abandons: the floor. Ours names Alice once (unavoidable)
        # and sends it.
        Event("b1", BOB, "ViewContent", at(2, 9, 0), "tablet", "S2", ours_email="alice@mail.com", sent="delivered"),
        Event("b2", BOB, "AddToCart", at(2, 9, 1), "tablet", "S2"),
        # S7, day 3: Bob on the tablet again, types his own email later in the session: not the floor.
        Event("b3", BOB, "ViewContent", at(3, 9, 0), "tablet", "S7", ours_email="bob@mail.com", native=True),
        Event("b4", BOB, "InitiateCheckout", at(3, 9, 1), "tablet", "S7", email="bob@mail.com",
              ours_email="BOB@mail.com ", native=True),
        # S6, Bob's phone: the cart comes before the email (not tied before), checkout abandoned; native.
        Event("b5", BOB, "AddToCart", at(1, 12, 0), "bob-phone", "S6", ours_email="bob@mail.com", native=True),
        Event("b6", BOB, "InitiateCheckout", at(1, 12, 1), "bob-phone", "S6", email="bob@mail.com",
              ours_email="bob@mail.com", native=True),
        # S3, Carol logs in, browses, abandons. Ours gets the cart (tied, extra) but puts Bob on a view (avoidable),
        # and sends both.
        Event("c0", CAROL, "Identify", at(1, 8, 0), "carol-phone", "S3", external_id="C3"),
        Event("c1", CAROL, "ViewContent", at(1, 8, 1), "carol-phone", "S3", external_id="C3",
              ours_email="bob@mail.com", sent="pending"),
        Event("c2", CAROL, "AddToCart", at(1, 8, 2), "carol-phone", "S3", external_id="C3",
              ours_email="carol@mail.com", sent="delivered"),
        # S4, Dan types a placeholder into a form, then a blank; Klaviyo knows him natively. Ours attaches a wrong
        # kx once (avoidable); the baseline attaches the placeholder twice (avoidable: it is nobody's signal).
        Event("d0", DAN, "Identify", at(1, 7, 0), "dan-laptop", "S4", email="test@test.com"),
        Event("d1", DAN, "ViewContent", at(1, 7, 1), "dan-laptop", "S4", email="   ", ours_kx="KX_A", native=True),
        Event("d2", DAN, "AddToCart", at(1, 7, 2), "dan-laptop", "S4"),
        # S5, Erin lands from her Klaviyo email (_kx) and abandons; ours resolves her to the Klaviyo id only.
        Event("e0", ERIN, "PageView", at(1, 6, 0), "erin-phone", "S5", kx="KX_E"),
        Event("e1", ERIN, "AddToCart", at(1, 6, 1), "erin-phone", "S5", ours_kx="KX_E", native=True),
        # S8, Alice logged in on her desktop: her id rides on the cart itself, nothing earlier (not tied before).
        Event("a8", ALICE, "AddToCart", at(2, 15, 0), "alice-desktop", "S8", external_id="C1",
              ours_email="alice@mail.com", sent="pending"),
    ]


@pytest.fixture
def family(tmp_path: Path) -> Evaluation:
    warehouse, truth = build_world(tmp_path, [ALICE, BOB, CAROL, DAN, ERIN], family_world())
    return evaluate(warehouse, truth)


def test_each_metric_has_its_exact_value(family: Evaluation):
    # 16 commerce events: a1-a4, b1-b6, c1, c2, d1, d2, e1, a8.
    assert family.commerce_events == 16
    # Floor: b1, b2 (the latest signal on the tablet is Alice's, Bob gives none in S2). Not b3/b4: Bob types his
    # email in S7. Not d1/d2: the placeholder maps to nobody. Both are sendable (not native, marketing allowed).
    assert (family.floor, family.sent_floor) == (2, 2)
    # Abandoned-cart sessions: S2, S6, S3, S4, S5, S8 (S1 bought). Native: S6 (b5, b6), S4 (d1), S5 (e1).
    assert family.abandoned_sessions == 6
    # Reachable: S3 (c2, tied by Carol's login c0) and S5 (e1, tied by Erin's _kx e0); not S2 (Bob's signals are
    # later or elsewhere), S6 (the email comes after the cart), S4 (placeholder), S8 (only the cart's own id).
    # Ours: resolved = all but b2, d2; wrong = b1 (floor), c1 (Bob's email on Carol), d1 (Alice's kx on Dan).
    # Sent: b1 (floor), c1 (avoidable), c2, a8 (d1 is native: Klaviyo's, not ours to send). Reached: S3 (c2 sent to
    # Carol), S5 (native). Extra = S3 (c2) and S8 (a8); S2's cart is unresolved.
    assert family.ours == ResolutionScore(
        resolved=14, correct=11, wrong_person=3, avoidable_wrong_person=2,
        sent=4, sent_wrong_person=2, sent_avoidable_wrong_person=1,
        reachable_sessions=2, reached_sessions=2, native_sessions=3, extra_sessions=2,
    )
    # Baseline: a1, a2, b5 come before any email on their cookie, c*, e1, a8 have none; a3, a4, b4, b6 are right
    # (the event's own typed email counts); b1, b2 get Alice (floor); b3 gets Alice although Bob types his email a
    # minute later (avoidable); d1, d2 get test@test.com (the blank on d1 does not replace it; avoidable).
    # Sendable among them: b1, b2 (floor) and d2 (avoidable). It reaches S5 only, natively.
    assert family.baseline == ResolutionScore(
        resolved=9, correct=4, wrong_person=5, avoidable_wrong_person=3,
        sent=3, sent_wrong_person=3, sent_avoidable_wrong_person=1,
        reachable_sessions=2, reached_sessions=1, native_sessions=3, extra_sessions=0,
    )
    assert family.ours.precision == pytest.approx(11 / 14)
    assert family.ours.sent_precision == pytest.approx(2 / 4)
    assert family.ours.recall == 1.0
    assert family.ours.right_person_lift == pytest.approx(2 / 3)
    assert family.baseline.precision == pytest.approx(4 / 9)
    assert (family.baseline.sent_precision, family.baseline.recall,
            family.baseline.right_person_lift) == (0.0, 0.5, 0.0)


def test_the_table_shows_both_methods_and_the_floor(family: Evaluation):
    text = format_evaluation(family)
    lines = text.splitlines()
    ours = next(line for line in lines if line.startswith("ours"))
    baseline = next(line for line in lines if line.startswith("baseline"))
    for expected in ("78.6%", "of 14", "3 (2)", "50.0%", "of 4", "2 (1)", "100.0%", "2/2", "66.7%", "2/3"):
        assert expected in ours
    for expected in ("44.4%", "of 9", "5 (3)", "0.0%", "of 3", "3 (1)", "50.0%", "1/2", "0/3"):
        assert expected in baseline
    assert lines[0] == "The warehouse has no view daily_lift yet: `upstack sync` creates it."
    assert "16 commerce events, 6 abandoned-cart sessions" in lines[1]
    assert any(line.startswith("floor: 2 wrong-person events (2 of them sendable)") for line in lines)
    assert all(column in lines[2] for column in ("resolved: precision", "sent: precision", "wrong (avoidable)",
                                                 "reachable reached", "right-person lift"))


FRANK = Person("P6", "frank@mail.com", customer_id="F1", kx="KX_F")


def test_tied_before_means_an_earlier_time_or_earlier_in_the_same_session_never_the_event_itself(tmp_path: Path):
    noon = at(1, 12, 0)
    events = [
        # Same instant, same session, earlier in pixel order: tied.
        Event("f1", FRANK, "Identify", noon, "f", "S1", email="frank@mail.com"),
        Event("f2", FRANK, "AddToCart", noon, "f", "S1", ours_email="frank@mail.com", sent="delivered"),
        # The cart carries the id itself, nothing earlier: not tied.
        Event("g1", FRANK, "AddToCart", noon, "g", "S2", external_id="F1", ours_email="frank@mail.com",
              sent="delivered"),
        # Same instant on the same cookie but another session: not tied.
        Event("h0", FRANK, "PageView", noon, "h", "S3x", kx="KX_F"),
        Event("h1", FRANK, "AddToCart", noon, "h", "S3", ours_kx="KX_F", sent="pending"),
    ]
    warehouse, truth = build_world(tmp_path, [FRANK], events)

    evaluation = evaluate(warehouse, truth)

    assert (evaluation.ours.reachable_sessions, evaluation.ours.reached_sessions) == (1, 1)
    assert (evaluation.baseline.reachable_sessions, evaluation.baseline.reached_sessions) == (1, 1)  # f1's email
    # No session is native: the lift's denominator is 0 and the ratio reads 0, the counts tell the story.
    assert (evaluation.ours.native_sessions, evaluation.ours.extra_sessions,
            evaluation.ours.right_person_lift) == (0, 3, 0.0)
    assert (evaluation.floor, evaluation.ours.wrong_person) == (0, 0)


def test_a_refused_event_reached_nobody_and_a_declined_shopper_is_not_reachable(tmp_path: Path):
    noon = at(1, 12, 0)
    events = [
        # Tied by an earlier login, sent, but Klaviyo refused it (a dead letter): not reached.
        Event("f0", FRANK, "Identify", noon, "f", "S0", external_id="F1"),
        Event("f1", FRANK, "AddToCart", at(2, 12, 0), "f", "S1", ours_email="frank@mail.com", sent="dead_letter"),
        # Tied too, but Frank declined marketing on this cart: no backup flow may reach it, so it is not reachable.
        Event("f2", FRANK, "AddToCart", at(3, 12, 0), "f", "S2", ours_email="frank@mail.com", declined=True),
    ]
    warehouse, truth = build_world(tmp_path, [FRANK], events)

    evaluation = evaluate(warehouse, truth)

    assert (evaluation.ours.sent, evaluation.ours.reachable_sessions, evaluation.ours.reached_sessions) == (0, 1, 0)
    assert evaluation.ours.resolved == 2
    # The baseline never sends to a shopper who declined, nor anything without a typed email.
    assert evaluation.baseline.sent == 0


def test_only_naming_the_person_behind_the_last_signal_is_the_floor(tmp_path: Path):
    events = [
        Event("a0", ALICE, "Identify", at(1, 9, 0), "tablet", "S1", email="alice@mail.com"),
        # Bob, anonymous on the tablet after Alice: naming Alice is the floor; naming a placeholder is avoidable.
        Event("b1", BOB, "ViewContent", at(2, 9, 0), "tablet", "S2", ours_email="alice@mail.com", sent="delivered"),
        Event("b2", BOB, "AddToCart", at(2, 9, 1), "tablet", "S2", ours_email="qwerty@qwerty.com", sent="pending"),
    ]
    warehouse, truth = build_world(tmp_path, [ALICE, BOB], events)

    evaluation = evaluate(warehouse, truth)

    assert evaluation.floor == 2
    assert (evaluation.ours.wrong_person, evaluation.ours.avoidable_wrong_person) == (2, 1)
    assert (evaluation.ours.sent_wrong_person, evaluation.ours.sent_avoidable_wrong_person) == (2, 1)


def test_missing_inputs_say_what_to_do(tmp_path: Path):
    warehouse, truth = build_world(tmp_path, [FRANK], [Event("f1", FRANK, "AddToCart", at(1, 9, 0), "f", "S1")])

    with pytest.raises(ValueError, match="upstack simulate"):
        evaluate(warehouse, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="upstack sync"):
        evaluate(tmp_path / "missing.duckdb", truth)

    with duckdb.connect(str(warehouse)) as connection:
        connection.execute("delete from resolved_events")
    with pytest.raises(ValueError, match="resolved_events .* is empty .* run `upstack sync` first"):
        evaluate(warehouse, truth)

    with duckdb.connect(str(warehouse)) as connection:
        connection.execute("drop table resolved_events")
    with pytest.raises(ValueError, match="no resolved_events table: run `upstack sync` first"):
        evaluate(warehouse, truth)


END = datetime(2026, 11, 28, tzinfo=UTC)


def test_simulated_traffic_scored_with_the_baseline_as_resolver_matches_the_baseline(tmp_path: Path):
    landing = tmp_path / "landing"
    simulate(landing, visitors=300, days=14, seed=11, end=END)
    settings = Settings(landing_dir=landing, warehouse_path=tmp_path / "warehouse.duckdb")
    ingest_events(settings, now=END + timedelta(hours=1))
    # The baseline rule written independently (a correlated subquery, not the evaluation's ASOF join).
    with duckdb.connect(str(settings.warehouse_path)) as connection:
        connection.execute("set TimeZone = 'UTC'")
        connection.execute("""
            create or replace table resolved_events as
            select r.event_id, r.event_name, r.event_time, r.anonymous_id, r.session_id, typed.email,
                   null::varchar as kx,
                   case when typed.email is not null then 'cookie_last_email' end as match_method,
                   coalesce(r.user_data.klaviyo_identified, false) as klaviyo_native
            from raw_events r
            left join lateral (
                select lower(trim(e.user_data.email)) as email
                from raw_events e
                where e.anonymous_id = r.anonymous_id and e.event_time <= r.event_time
                  and trim(e.user_data.email) <> ''
                order by e.event_time desc, e.source_file desc, e.line_number desc
                limit 1
            ) typed on true
            where r.event_name in ('ViewContent', 'AddToCart', 'InitiateCheckout', 'Purchase')""")
        (commerce,) = connection.execute("select count(*) from resolved_events").fetchone()
        # ...which sends what it resolves among the events Klaviyo could not identify, to shoppers who allow it.
        connection.execute("""
            insert into klaviyo_outbox (unique_id, event_id, event_name, metric_name, profile_key, profile, event,
                                        backfill, status, created_at)
            select re.event_id, re.event_id, re.event_name, 'm', 'email:' || re.email, '{}', '{}', false, 'pending',
                   now()
            from resolved_events re join raw_events r using (event_id)
            where re.email is not null and not re.klaviyo_native and r.consent.marketing is distinct from false""")

    evaluation = evaluate(settings.warehouse_path, landing / "truth")

    assert evaluation.ours == evaluation.baseline
    assert evaluation.commerce_events == commerce > 0
    score = evaluation.baseline
    assert 0 < score.correct <= score.resolved <= commerce
    assert 0 <= score.avoidable_wrong_person <= score.wrong_person == score.resolved - score.correct
    assert 0 < score.sent <= score.resolved and 0 <= score.sent_avoidable_wrong_person <= score.sent_wrong_person
    assert 0 <= score.reached_sessions <= score.reachable_sessions and score.reachable_sessions > 0
    assert score.native_sessions > 0
    assert "baseline" in format_evaluation(evaluation)
