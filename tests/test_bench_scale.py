"""bench/scale.py (issue 14's scale benchmark) still runs end to end and prints its whole table, so it cannot rot.

Runs `bench/scale.py --quick` (2,000 people over 5 days) as a process: a real simulation, DuckDB's `read_json`, three
`upstack sync` processes against the local Klaviyo emulator at Klaviyo's real limits. Checks the shape and sanity
of the numbers, never their size: at this size they measure process start more than the pipeline.
"""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # simulates a world and runs three whole syncs in processes of their own

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STEPS = ["ingestion", "identity_resolution", "klaviyo_mapping", "klaviyo_delivery", "analytics"]
TIMED_ROWS = [
    "DuckDB `read_json` of the full sync's files (baseline)",
    *(f"step `{step}`" for step in STEPS),
    "outside the steps (process start, imports, Dagster)",
    "whole sync, process start to exit",
    "whole sync less the `klaviyo_delivery` step",
]
OTHER_ROWS = [
    "the increment: one more day net of nothing new, as a share of the full sync",
    "Klaviyo requests",
    "Klaviyo: first to last request, against the limits' floor (10/s, 150/min)",
    "peak memory, max RSS",
]
SECONDS_AND_RATIO = re.compile(r"^(\d+\.\d) s, (\d+\.\d+)x$")


def markdown_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and line.endswith(" |") and not line.startswith("| ---"):
            label, *cells = [cell.strip() for cell in line[1:-1].split(" | ")]
            rows[label] = cells
    return rows


def test_quick_scale_bench_prints_every_row_with_sane_ratios(tmp_path):
    completed = subprocess.run([sys.executable, "bench/scale.py", "--quick", "--dir", str(tmp_path)],
                               capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    rows = markdown_rows(completed.stdout)
    header = rows.pop("step")
    assert len(header) == 3 and header[0].startswith("full sync: 4 days, "), header
    for label in OTHER_ROWS[:-1]:
        assert label in rows, f"no row {label!r} in:\n{completed.stdout}"
    memory = [label for label in rows if label.startswith(OTHER_ROWS[-1])]
    assert len(memory) == 1, completed.stdout
    assert set(rows) == {*TIMED_ROWS, *OTHER_ROWS[:-1], *memory}, completed.stdout

    baseline = SECONDS_AND_RATIO.match(rows[TIMED_ROWS[0]][0])
    assert baseline and float(baseline.group(1)) > 0 and baseline.group(2) == "1.0", rows[TIMED_ROWS[0]]
    for label in TIMED_ROWS[1:]:
        for cell in rows[label]:
            match = SECONDS_AND_RATIO.match(cell)
            assert match, f"{label}: {cell!r}"
            assert float(match.group(2)) > 0, f"{label}: {cell!r}"  # the seconds may round to 0.0, never this
    for cell in rows["whole sync, process start to exit"]:
        assert float(cell.split(" s")[0]) > 1, cell  # Python, Dagster and DuckDB start, at least

    # The increment's event share is positive; its cost share, at this size, is within process-start noise and
    # may come out at either sign, so only its form is checked.
    increment = rows[OTHER_ROWS[0]][1]
    match = re.fullmatch(r"-?\d+\.\d+ s = -?\d+\.\d% of the full sync for (\d+\.\d)% of its events: "
                         r"-?\d+\.\d+x its share \(-?\d+\.\d+x without delivery\)", increment)
    assert match and float(match.group(1)) > 0, increment

    # Every sync reached the emulator (the full sync with its events; the others at least with the key probe),
    # and nothing was throttled: delivery keeps within Klaviyo's limits.
    for cell in rows["Klaviyo requests"]:
        sent = re.match(r"(\d+) sent: (\d+) accepted \((\d[\d,]*) events\), (\d+) answered 429", cell)
        assert sent and int(sent.group(1)) >= 1 and sent.group(4) == "0", cell
    assert int(re.match(r"\d+ sent: (\d+) accepted", rows["Klaviyo requests"][0]).group(1)) >= 1
    for cell in rows[OTHER_ROWS[2]]:
        assert re.match(r"\d+\.\d s(; the floor is 0 s| against a floor of \d+ s: \d+\.\d+x)", cell), cell

    # Issue 14's targets, each judged by the figure the table shows for it.
    targets = re.search(
        r"^Issue 14's targets in this run:\n"
        r"- the full sync less delivery, at most 3x `read_json`: (\d+\.\d\d)x: (met|not met)\n"
        r"- one more day net of nothing new, at most 2x its share of the events: (-?\d+\.\d\d)x "
        r"\(-?\d+\.\d\dx without delivery\): (met|not met)\n"
        r"- the full sync's delivery within 1\.2x the limits' floor, no 429: (.+)$",
        completed.stdout, flags=re.MULTILINE)
    assert targets, completed.stdout
    full_ratio = float(SECONDS_AND_RATIO.match(rows["whole sync less the `klaviyo_delivery` step"][0]).group(2))
    assert abs(float(targets.group(1)) - full_ratio) <= 0.051, (targets.group(1), full_ratio)
    assert targets.group(2) == ("met" if float(targets.group(1)) <= 3 else "not met")
    share = re.search(r": (-?\d+\.\d+)x its share", increment)
    assert abs(float(targets.group(3)) - float(share.group(1))) <= 0.051, (targets.group(3), increment)
    assert targets.group(4) == ("met" if float(targets.group(3)) <= 2 else "not met")
    # The quick simulation's full sync sends its last day, mostly in one burst (no floor to measure against); no 429.
    delivery = targets.group(5)
    assert re.fullmatch(r"(its \d+ requests fit in one burst \(the floor is 0 s, no ratio\), 0 answered 429|"
                        r"\d+\.\d\dx for its \d+ requests, 0 answered 429: (met|not met)) "
                        r"\(the issue's full sync sends 83 requests: bench/delivery\.py --events 83000\)",
                        delivery), delivery

    read_json_peak = re.search(r"read_json`: (\d+\.\d\d) GiB", memory[0])
    assert read_json_peak and float(read_json_peak.group(1)) > 0, memory[0]
    for cell in rows[memory[0]]:
        peak = re.fullmatch(r"(\d+\.\d\d) GiB, (\d+\.\d+)x", cell)
        assert peak and float(peak.group(1)) > 0 and float(peak.group(2)) > 0, cell


def test_an_increment_of_the_last_days_first_hours_takes_those_hours_alone(tmp_path):
    """`--increment-hours 2`: the increment is the last day's first two hour folders, named so in the table (issue
    14's held-out day is 1% of its events, a quarter of the benchmark's day)."""
    completed = subprocess.run([sys.executable, "bench/scale.py", "--quick", "--increment-hours", "2",
                                "--dir", str(tmp_path)], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    rows = markdown_rows(completed.stdout)
    increment = re.fullmatch(r"the last day's first 2 hours: 2 files, (\d[\d,]*) events", rows["step"][1])
    assert increment, rows["step"]
    last_day = sorted((tmp_path / "simulation" / "events").glob("dt=*"))[-1]
    lines = 0
    for hour in sorted(last_day.glob("hour=*"))[:2]:
        for path in hour.rglob("*.ndjson.gz"):
            with gzip.open(path) as file:
                lines += sum(1 for _ in file)
    assert 0 < int(increment.group(1).replace(",", "")) <= lines  # those hours' events, not the whole day's
    assert "the increment: the last day's first 2 hours net of nothing new, as a share of the full sync" in rows
