"""Sustained delivery against the local Klaviyo emulator at Klaviyo's real limits, as a share of the ceiling.

Klaviyo's bulk endpoints allow 150 requests a minute per account, and a request carries at most 1,000 events: the
ceiling is 150,000 events a minute. This fills an outbox with N synthetic events (many profiles, realistic
payloads), delivers it to the emulator with its rate limits on, and reports events per minute over the whole run
(claiming, sending, settling) divided by that ceiling (target: at least 95%). Run it for several minutes' worth:
the first window's burst flatters a short run.

It also reports the run against the limits' floor: the requests, the seconds from the first request sent to the
last answer, the least time 10 requests a second and 150 a minute take to admit that many (the first 150 at 10 a
second, then 150 a minute), their ratio (issue 14: at most 1.2x), and how many answers were 429; before that line,
the whole step's seconds against the same floor (what issue 14 counts: the time before the first request and after
the last answer too) and the machine's load. A short run, e.g. `--events 83000` (a full sync's 83 requests),
measures the burst; `--repeat N` runs it N times, each with a fresh outbox and emulator, for the spread.
`--answer-seconds S` has the emulator answer each request S seconds after it arrived, as a distant Klaviyo would:
the client counts a request until a second after its answer (`RatePacer`), so slow answers slow the bursts.

    .venv/bin/python bench/delivery.py [--events 450000] [--repeat 1] [--answer-seconds 0]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from upstack_pipeline.klaviyo.client import KlaviyoClient, allowance_seconds
from upstack_pipeline.klaviyo.delivery import deliver
from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import Warehouse

CEILING_EVENTS_PER_MINUTE = 150 * 1000
KEY = "pk_bench_local_emulator_only"


def fill_outbox(warehouse: Warehouse, events: int, now: datetime) -> None:
    with warehouse.connect() as connection:
        connection.execute("""
            insert into klaviyo_outbox (unique_id, event_id, event_name, metric_name, profile_key, profile, event,
                                        backfill, status, created_at)
            select
                'bench-' || i as unique_id, 'bench-' || i, 'AddToCart', 'Added to Cart from Upstack',
                'email:shopper' || (i % 20000) || '@gmail.com',
                json_object('email', 'shopper' || (i % 20000) || '@gmail.com', 'first_name', 'Sam',
                            'properties', json_object('upstack_id', 'up_' || (i % 20000))),
                json_object('properties', json_object('ProductName', 'Canvas Tote', 'ProductID', 'p' || (i % 60),
                                                      'CartValue', 38.0, 'ItemNames', ['Canvas Tote'],
                                                      'upstack_match_method', 'cookie_history'),
                            'time', strftime(?::timestamptz, '%Y-%m-%dT%H:%M:%S+00:00'), 'value', 38.0,
                            'value_currency', 'USD', 'unique_id', 'bench-' || i,
                            'metric', json_object('data', json_object('type', 'metric', 'attributes',
                                                                      json_object('name', 'Added to Cart from Upstack')))),
                false, 'pending', ?
            from range(?) as numbers(i)
        """, [now, now, events])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=450_000)
    parser.add_argument("--repeat", type=int, default=1, help="runs, each with a fresh outbox and emulator")
    parser.add_argument("--answer-seconds", type=float, default=0.0,
                        help="the emulator answers each request this much later, as a distant Klaviyo would")
    args = parser.parse_args()
    ratios = [run_once(args.events, args.answer_seconds) for _ in range(args.repeat)]
    if args.repeat > 1:
        print(f"over {args.repeat} runs, the whole step against the floor: "
              + ", ".join(f"{step:.2f}x" for step, _ in ratios)
              + f" (median {statistics.median(step for step, _ in ratios):.2f}x); 429s: "
              + ", ".join(str(throttled) for _, throttled in ratios))


def run_once(events: int, answer_seconds: float = 0.0) -> tuple[float, int]:
    """One delivery of `events` fresh outbox rows to a fresh emulator answering `answer_seconds` late; prints its
    report and returns the whole step against the floor and the 429 count."""
    now = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(landing_dir=Path(scratch), warehouse_path=Path(scratch) / "warehouse.duckdb",
                            klaviyo_api_key=KEY)
        fill_outbox(Warehouse(settings.warehouse_path), events, now)
        # The emulator in a process of its own, as Klaviyo is: in this one it would compete for the GIL.
        emulator = subprocess.Popen(
            [sys.executable, "-m", "upstack_pipeline.sandbox.klaviyo_emulator", "--port", "0", "--api-key", KEY,
             "--answer-seconds", str(answer_seconds)],
            stdout=subprocess.PIPE, text=True)
        try:
            base_url = emulator.stdout.readline().strip()
            with KlaviyoClient(base_url, KEY) as client:
                run = deliver(settings, now=now, client=client)
        finally:
            emulator.send_signal(signal.SIGTERM)
            summary = emulator.communicate(timeout=60)[0]
    print(summary.strip())
    print(f"{run.delivered:,} events delivered in {run.requests:,} requests, {run.retried:,} retried, "
          f"over {run.seconds:.1f} s")
    start = min(attempt.sent_at for attempt in run.attempts)
    per_minute = [sum(attempt.events for attempt in run.attempts
                      if attempt.status == 202 and start + 60 * minute <= attempt.sent_at < start + 60 * (minute + 1))
                  for minute in range(int(run.seconds // 60))]
    print("events accepted in each full minute of the run: " + ", ".join(f"{events:,}" for events in per_minute)
          + " (the steady state: each should be close to 150,000)")
    print(f"{run.events_per_minute:,.0f} events/min over the whole run = "
          f"{run.events_per_minute / CEILING_EVENTS_PER_MINUTE:.1%} of Klaviyo's ceiling "
          "(150 requests/min x 1,000 events)")
    last_answer = max(attempt.sent_at + attempt.latency_ms / 1000 for attempt in run.attempts)
    floor = allowance_seconds(run.requests)
    throttled = sum(1 for attempt in run.attempts if attempt.status == 429)
    print(f"the whole step (claiming, building the bodies, sending, settling) in {run.seconds:.1f} s: "
          f"{run.seconds / floor:.2f}x the floor; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{run.requests:,} requests in {last_answer - start:.1f} s; the floor is {floor:.1f} s: "
          f"{(last_answer - start) / floor:.2f}x; {throttled:,} answered 429")
    return run.seconds / floor, throttled


if __name__ == "__main__":
    main()
