"""bench/scale.py's verdicts on issue 14's targets, from runs made up here: each target is judged by the figure printed
beside it, several runs by their median, and a 429 is never judged away. (tests/test_bench_scale.py runs the
benchmark itself, slowly.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DELIVERY_NOTE = " (the issue's full sync sends 83 requests: bench/delivery.py --events 83000)"


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("bench_scale", PROJECT_ROOT / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sync(seconds: float, delivery_seconds: float, events: int, requests: int = 1, throttled: int = 0,
         spread: float = 0.0) -> dict:
    """A sync as bench/scale.py's measured_sync records it."""
    return {"seconds": seconds, "steps": {"ingestion": seconds / 2, "klaviyo_delivery": delivery_seconds},
            "counts": {"raw_events.rows_ingested": events},
            "delivery": {"requests": requests, "accepted": requests - throttled, "throttled": throttled,
                         "events": 1000 * requests, "spread": spread}}


def run(full_less_delivery: float, day_net: float, *, baseline: float = 10.0, requests: int = 83,
        spread: float = 8.8, throttled: int = 0) -> dict:
    """A run whose full sync, less its 2 s of delivery, takes `full_less_delivery` seconds, and whose day (40 of the
    full sync's 1,000 events) takes `day_net` seconds more than the sync with nothing new."""
    return {"baseline": baseline, "baselines": [{"seconds": baseline, "peak": 1}] * 2, "syncs": [
        sync(full_less_delivery + 2.0, 2.0, 1000, requests, throttled, spread),
        sync(3.0 + day_net, 0.5, 40),
        sync(3.0, 0.5, 0),
    ]}


def lines(scale, runs: list[dict]) -> list[str]:
    return scale.acceptance(runs, "one more day").splitlines()


def test_one_run_meeting_every_target_says_so_with_the_figures_it_was_judged_by(scale):
    # 29 s less delivery over a 10 s read_json; 2 s net for 4% of the events: 6.5% of a 31 s sync (6.9% of its 29 s
    # less delivery); 83 requests in 8.8 s, whose floor is 8 s (eight bursts of ten a second after the first).
    assert lines(scale, [run(29.0, 2.0)]) == [
        "Issue 14's targets in this run:",
        "- the full sync less delivery, at most 3x `read_json`: 2.90x: met",
        "- one more day net of nothing new, at most 2x its share of the events: 1.61x (1.72x without delivery): met",
        "- the full sync's delivery within 1.2x the limits' floor, no 429: 1.10x for its 83 requests, 0 answered 429: "
        "met" + DELIVERY_NOTE,
    ]


@pytest.mark.parametrize(("seconds", "printed", "judged"), [(30.04, "3.00x", "met"), (30.06, "3.01x", "not met")])
def test_a_figure_at_the_limit_is_judged_as_printed(scale, seconds, printed, judged):
    assert lines(scale, [run(seconds, 2.0)])[1].endswith(f": {printed}: {judged}")


def test_a_429_fails_the_delivery_target_even_at_the_floor_and_even_in_one_burst(scale):
    assert lines(scale, [run(29.0, 2.0, spread=8.0, throttled=1)])[3] == (
        "- the full sync's delivery within 1.2x the limits' floor, no 429: 1.00x for its 83 requests, 1 answered 429: "
        "not met" + DELIVERY_NOTE)
    assert lines(scale, [run(29.0, 2.0, requests=10, spread=0.1, throttled=1)])[3] == (
        "- the full sync's delivery within 1.2x the limits' floor, no 429: its 10 requests fit in one burst (the floor "
        "is 0 s, no ratio), 1 answered 429: not met" + DELIVERY_NOTE)
    assert lines(scale, [run(29.0, 2.0, requests=10, spread=0.1)])[3] == (
        "- the full sync's delivery within 1.2x the limits' floor, no 429: its 10 requests fit in one burst (the floor "
        "is 0 s, no ratio), 0 answered 429" + DELIVERY_NOTE)


def test_several_runs_are_judged_by_their_median_and_show_their_range(scale):
    # The full syncs: 2.8x, 3.4x and 3.2x (their median not met); the days: 1.33x, -0.28x and 1.47x (a noisy day may
    # come out below the sync with nothing new: its range must still read as one).
    runs = [run(28.0, 1.6), run(34.0, -0.4), run(32.0, 2.0)]
    assert lines(scale, runs)[:3] == [
        "Issue 14's targets over these 3 runs (the median, then the range):",
        "- the full sync less delivery, at most 3x `read_json`: 3.20x, from 2.80x to 3.40x: not met",
        "- one more day net of nothing new, at most 2x its share of the events: 1.33x, from -0.28x to 1.47x "
        "(1.43x, from -0.29x to 1.56x without delivery): met",
    ]


def test_the_table_shows_the_run_at_the_median_full_sync_and_of_two_the_lower(scale):
    runs = [run(28.0, 1.6), run(34.0, -0.4), run(32.0, 2.0)]
    assert scale.median_run(runs) is runs[2]
    assert scale.median_run(runs[:2]) is runs[0]
    assert scale.median_run(runs[1:2]) is runs[1]
