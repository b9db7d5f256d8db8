"""Identity resolution measured against the simulator's ground truth (the README's "What the simulator measures").

Real pixel data never says who did an event, so the resolver can only be judged on simulated traffic, where
`truth/events.csv` names the person behind every event and `truth/people.csv` their email, Shopify customer id and
Klaviyo exchange id (`kx`). This module compares `resolved_events` with that truth and, for scale, with the naive
rule every shop could run tomorrow: "cookie -> last email typed on that cookie" (the baseline).

The product's promise (SPEC section 1) is "more identified abandoners, and never the wrong person's email", so the
numbers are about those two things, first for every commerce event (ViewContent, AddToCart, InitiateCheckout,
Purchase) a method resolves, then for the ones it *sends*: what a backup flow receives.

* **Precision** = correct / resolved. An event is *resolved* when it carries an email or a `kx`. It is *correct*
  when its email (trimmed, lower-cased) is the true shopper's email, or, when it carries no email, its `kx` is the
  true shopper's `kx`: the email is what Klaviyo will act on, so a right `kx` never excuses a wrong email. A
  resolved event that is not correct is a *wrong-person* event.
* **Sent**: ours sends what reached `klaviyo_outbox` (with the profile it was sent with; rows Klaviyo refused
  reached nobody). Only *sendable* events can reach a backup flow at all: Klaviyo could not identify them natively
  and the shopper did not decline marketing; the baseline sends what it resolves among those. A wrong-person event
  sent is a flow email about one person's cart in another person's inbox.
* **Floor**: some wrong-person events no deterministic method can avoid. When Bob picks up the family tablet on
  which Alice typed her email yesterday and browses without ever identifying himself, everything the pixel saw
  says "Alice". An event of person P is in the floor when the latest identity signal on its cookie strictly before
  it belongs to other people only, and P gave no signal of their own anywhere in the event's session (so stitching
  back from later in the session cannot find P either). Only values that map to a known person are signals (a
  placeholder email or the store's support address maps to nobody and is skipped). Naming one of the people
  behind that latest signal is the unavoidable error; naming anyone else there (a placeholder, say) is not.
  Wrong-person events outside the floor are *avoidable*; a good resolver has none. `sent_floor` counts the
  floor's sendable events.
* **Reachable abandoned sessions**: most abandoned carts belong to people the pixel never saw identify, and no
  method can name them; dividing by all carts would measure the traffic, not the resolver. An abandoned-cart
  session (a truth session with an AddToCart and no Purchase) is *reachable* when one of its AddToCart events was
  deterministically tied to the true shopper *before* it, whose shopper did not decline marketing: the same
  anonymous_id carried, at an earlier event_time (or at the same instant, earlier in the same session in pixel
  order), the shopper's email, Shopify customer id (`external_id`) or `kx`. It is *reached* when Klaviyo
  identifies the session natively or the method sends one of its carts to the right person. Recall = reached /
  reachable.
* **Right-person lift**: the product's lift (view `daily_lift`, printed first) counted against the truth, so
  that a method that sends carts to the wrong people gains nothing by it. *Native* abandoned sessions are those
  where Klaviyo could already identify some event (`klaviyo_native` in resolved_events); *extra* sessions are not
  native and had a cart sent to the right person. Right-person lift = extra / native. The native set always comes
  from resolved_events, so ours and the baseline share one denominator and compare.

The baseline is scored with exactly the same rules: for every commerce event, the email is lower(trim()) of the
latest non-blank `user_data.email` on the same anonymous_id at or before the event (its own row included; rows at
the same instant are ordered by source file and line), with no validation and no guards, and it never sets `kx`.

All of it is SQL (sql/evaluation.sql) run on a read-only connection, so it can run next to a sync and never writes
to the warehouse; this module only checks the inputs, runs it and formats the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb

from upstack_pipeline.analytics import LiftTotals, lift_totals
from upstack_pipeline.warehouse import Warehouse, read_sql

__all__ = ["Evaluation", "ResolutionScore", "evaluate", "format_evaluation"]

REQUIRED_RESOLVED_COLUMNS = ("event_id", "email", "kx", "klaviyo_native")


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


@dataclass(frozen=True)
class ResolutionScore:
    """How one method (ours or the baseline) did; counts, so a reader can see how much evidence a rate rests on."""

    resolved: int                     # commerce events given an email or a kx
    correct: int                      # ... whose email (or, without email, kx) is the true shopper's
    wrong_person: int                 # resolved - correct
    avoidable_wrong_person: int       # wrong-person events outside the floor
    sent: int                         # commerce events sent to Klaviyo (ours: the outbox; baseline: sendable)
    sent_wrong_person: int            # ... to someone other than the shopper
    sent_avoidable_wrong_person: int  # ... outside the floor: should be 0
    reachable_sessions: int           # abandoned-cart sessions with a cart tied to the shopper before
    reached_sessions: int             # ... Klaviyo-native, or a cart sent to the right person
    native_sessions: int              # abandoned-cart sessions Klaviyo identifies natively (same for both methods)
    extra_sessions: int               # abandoned-cart sessions not native with a cart sent to the right person

    @property
    def precision(self) -> float:
        return _ratio(self.correct, self.resolved)

    @property
    def sent_precision(self) -> float:
        return _ratio(self.sent - self.sent_wrong_person, self.sent)

    @property
    def recall(self) -> float:
        return _ratio(self.reached_sessions, self.reachable_sessions)

    @property
    def right_person_lift(self) -> float:
        return _ratio(self.extra_sessions, self.native_sessions)


@dataclass(frozen=True)
class Evaluation:
    ours: ResolutionScore
    baseline: ResolutionScore
    floor: int               # wrong-person events no deterministic method can avoid (see the module docstring)
    sent_floor: int          # ... among the sendable events
    commerce_events: int     # commerce events in raw_events that the truth describes
    abandoned_sessions: int  # truth sessions with an AddToCart and no Purchase
    lift: LiftTotals | None  # the product's lift, from the warehouse alone (view daily_lift; None before a sync)


def evaluate(warehouse_path: Path, truth_dir: Path) -> Evaluation:
    """Scores `resolved_events` and the cookie -> last-typed-email baseline against the simulator's truth.

    `truth_dir` is the `truth/` folder written by `upstack simulate` (events.csv and people.csv). The warehouse is
    opened read-only. Raises ValueError, saying what to do, when an input is missing.
    """
    warehouse_path, truth_dir = Path(warehouse_path), Path(truth_dir)
    truth_events, truth_people = truth_dir / "events.csv", truth_dir / "people.csv"
    missing = [str(path) for path in (truth_events, truth_people) if not path.is_file()]
    if missing:
        raise ValueError(
            f"Ground truth not found: {', '.join(missing)}. Point truth_dir at the truth/ folder that "
            "`upstack simulate` wrote next to the landing files it generated."
        )
    if not warehouse_path.is_file():
        raise ValueError(
            f"No warehouse at {warehouse_path}. Ingest and resolve the simulated landing folder first: "
            "run `upstack sync` with UPSTACK_LANDING_DIR and UPSTACK_WAREHOUSE set."
        )
    with Warehouse(warehouse_path).connect(read_only=True) as connection:
        _check_tables(connection, warehouse_path)
        connection.execute("set variable eval_truth_events = ?", [str(truth_events)])
        connection.execute("set variable eval_truth_people = ?", [str(truth_people)])
        cursor = connection.execute(read_sql("evaluation"))
        columns = [description[0] for description in cursor.description]
        rows = {row[0]: dict(zip(columns, row)) for row in cursor.fetchall()}
        lift = lift_totals(connection) if _has_relation(connection, "daily_lift") else None
    totals = rows["ours"]
    return Evaluation(
        ours=_score(rows["ours"]), baseline=_score(rows["baseline"]), lift=lift,
        **{name: int(totals[name]) for name in ("floor", "sent_floor", "commerce_events", "abandoned_sessions")},
    )


def _has_relation(connection: duckdb.DuckDBPyConnection, name: str) -> bool:
    return connection.execute("select count(*) from information_schema.tables where table_name = ?",
                              [name]).fetchall()[0][0] > 0


def _check_tables(connection: duckdb.DuckDBPyConnection, warehouse_path: Path) -> None:
    """Fails with what to do, rather than with a binder error, when the warehouse is not ready to be scored."""
    def columns_of(table: str) -> set[str]:
        return {name for (name,) in connection.execute(
            "select column_name from information_schema.columns "
            "where table_name = ? and table_catalog <> 'temp'", [table]).fetchall()}

    if not columns_of("raw_events"):
        raise ValueError(f"{warehouse_path} has no raw_events table: run `upstack sync` first.")
    resolved_columns = columns_of("resolved_events")
    if not resolved_columns:
        raise ValueError(
            f"{warehouse_path} has no resolved_events table: run `upstack sync` first, so that identity "
            "resolution fills it."
        )
    missing = [column for column in REQUIRED_RESOLVED_COLUMNS if column not in resolved_columns]
    if missing:
        raise ValueError(
            f"resolved_events in {warehouse_path} lacks the column(s) {', '.join(missing)}: it was written by an "
            "older version; run `upstack sync` again."
        )
    (rows, duplicates) = connection.execute(
        "select count(*), count(*) - count(distinct event_id) from resolved_events").fetchone()
    (commerce,) = connection.execute(
        "select count(*) from raw_events "
        "where event_name in ('ViewContent', 'AddToCart', 'InitiateCheckout', 'Purchase')").fetchone()
    if rows == 0 and commerce > 0:
        # The schema creates the table on ingestion, so an empty one means resolution has not run yet; scoring it
        # would report "nothing resolved" as if that were the resolver's result.
        raise ValueError(
            f"resolved_events in {warehouse_path} is empty while raw_events holds {commerce} commerce events: "
            "identity resolution has not run; run `upstack sync` first."
        )
    if duplicates:
        raise ValueError(
            f"resolved_events in {warehouse_path} has {duplicates} duplicate event_id row(s); it must hold one row "
            "per commerce event, and scoring duplicates would inflate every count."
        )


def _score(row: dict) -> ResolutionScore:
    return ResolutionScore(**{name: int(row[name]) for name in ResolutionScore.__dataclass_fields__})


def format_evaluation(evaluation: Evaluation) -> str:
    """A short table for a person: per method, what it resolved and what it sent (precision, wrong-person events and
    how many were avoidable), the reachable abandoned sessions it reached, and its right-person lift; then the
    floor. The product's own lift comes first."""
    lines = [
        f"The warehouse's {evaluation.lift.sentence()} (view daily_lift)" if evaluation.lift else
        "The warehouse has no view daily_lift yet: `upstack sync` creates it.",
        f"Identity resolution vs ground truth: {evaluation.commerce_events:,} commerce events, "
        f"{evaluation.abandoned_sessions:,} abandoned-cart sessions",
        f"{'':<9}{'resolved: precision':>23} {'wrong (avoidable)':>18}  {'sent: precision':>19} "
        f"{'wrong (avoidable)':>18}  {'reachable reached':>19}  {'right-person lift':>17}",
    ]
    for name, score in (("ours", evaluation.ours), ("baseline", evaluation.baseline)):
        lines.append(
            f"{name:<9}"
            f"{_percent(score.precision):>7} {f'of {score.resolved:,}':>15} "
            f"{f'{score.wrong_person:,} ({score.avoidable_wrong_person:,})':>18}  "
            f"{_percent(score.sent_precision):>7} {f'of {score.sent:,}':>11} "
            f"{f'{score.sent_wrong_person:,} ({score.sent_avoidable_wrong_person:,})':>18}  "
            f"{_percent(score.recall):>7} {f'{score.reached_sessions:,}/{score.reachable_sessions:,}':>11}  "
            f"{_percent(score.right_person_lift):>8} {f'{score.extra_sessions:,}/{score.native_sessions:,}':>8}"
        )
    lines += [
        f"floor: {evaluation.floor:,} wrong-person events ({evaluation.sent_floor:,} of them sendable) no "
        "deterministic method can avoid (another person's identity on the cookie, none of the shopper's own in the "
        "session)",
        "sent: to a backup flow (not Klaviyo-native, marketing allowed); reachable: abandoned carts tied to the "
        "shopper before, reached natively or sent to the right person; right-person lift: the lift counting only "
        "sessions sent to the right person (extra sessions / Klaviyo-native sessions)",
    ]
    return "\n".join(lines)


def _percent(value: float) -> str:
    return f"{value:.1%}"
