"""Test hook: a process that kills itself at a named point, so a test kills a run at an exact place, not a guess.

`UPSTACK_TEST_STOP_AFTER=<point>:<n>` makes the process SIGKILL itself right after it passes `<point>` for the
n-th time. The points, each passed right after its transaction commits:

- `events-batch`, `customers-batch`: a batch of landing files ingested (`upstack_pipeline/ingestion.py`);
- `delivery-request`: a Klaviyo request settled in the outbox (`upstack_pipeline/klaviyo/delivery.py`).

So `events-batch:2` leaves exactly two batches of event files in the warehouse and nothing after them. SIGKILL
runs no `finally`, no atexit and no flush: what is left is what a real kill (OOM killer, `kill -9`, a lost
machine) leaves. The tests that use it are in tests/test_cli.py, tests/test_ingestion.py and
tests/test_klaviyo_delivery.py.

Read here, from the environment, not through `Settings` (settings.py reads all configuration): this is not a
setting of the product but a fault injected into a run, it must reach ingestion's and delivery's inner loops in a
subprocess (`upstack sync`) without a parameter threaded through every call on the way, and it must stay out of
the operator's configuration. Unset, as it always is outside the tests, `reached` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

STOP_AFTER = "UPSTACK_TEST_STOP_AFTER"

_passes: Counter[str] = Counter()


def reached(point: str) -> None:
    """Counts one pass of `point`; SIGKILLs this process if UPSTACK_TEST_STOP_AFTER names this pass."""
    target = os.environ.get(STOP_AFTER)
    if not target:
        return
    _passes[point] += 1
    if target == f"{point}:{_passes[point]}":
        os.kill(os.getpid(), signal.SIGKILL)
