"""Replaying simulated traffic as it would arrive: history first, then one day per sync, as the schedule runs.

A resolver judged on all its traffic at once is judged on something no store runs: in production files land
hour by hour and every sync sees only what has arrived, decides sessions once they go idle, and must revise earlier
answers when later files change them (an email typed later, a value that turns out to be a placeholder). The
evaluation therefore replays a simulation: the landing files of every day before the last `live_days` arrive
together (a store's first sync after installing the pixel), then each remaining day arrives and is synced on its
own, with the clock at the first hourly run after that day.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import TypeVar

from upstack_pipeline.customers import ingest_customers
from upstack_pipeline.events import ingest_events
from upstack_pipeline.identity import resolve_identities
from upstack_pipeline.klaviyo.delivery import deliver
from upstack_pipeline.klaviyo.mapping import map_events
from upstack_pipeline.settings import Settings

T = TypeVar("T")

# The schedule runs on the hour: the first run after a day's last file.
SYNC_DELAY = timedelta(hours=1)


@dataclass(frozen=True)
class ReplayStep:
    first_day: date
    last_day: date
    event_files: int  # files that arrived for this sync
    now: datetime     # the clock the sync ran with

    @property
    def label(self) -> str:
        if self.first_day == self.last_day:
            return self.last_day.isoformat()
        return f"{self.first_day.isoformat()} to {self.last_day.isoformat()}"


def replay(simulation_dir: Path, landing_dir: Path, sync: Callable[[datetime], T], *,
           live_days: int = 14) -> Iterator[tuple[ReplayStep, T]]:
    """Copies a simulation's landing files (written by `upstack simulate` into `simulation_dir`) into `landing_dir`
    day by day, calling `sync(now)` after each arrival, and yields each step with what `sync` returned.

    `landing_dir` must not hold events yet: the replay is the only writer. The customers export arrives with the
    history. Files are copied, so the simulation can be replayed again.
    """
    simulation_dir, landing_dir = Path(simulation_dir), Path(landing_dir)
    days = _days(simulation_dir / "events")
    if not days:
        raise ValueError(f"No simulated events under {simulation_dir / 'events'}: run `upstack simulate` first.")
    if (landing_dir / "events").exists() and any(path.is_file() for path in (landing_dir / "events").rglob("*")):
        raise ValueError(f"{landing_dir / 'events'} already holds files: replay into an empty landing folder.")
    if (simulation_dir / "customers").is_dir():
        shutil.copytree(simulation_dir / "customers", landing_dir / "customers", dirs_exist_ok=True)
    (landing_dir / "events").mkdir(parents=True, exist_ok=True)
    history = max(1, len(days) - live_days)
    arrivals = [days[:history]] + [[day] for day in days[history:]]
    for batch in arrivals:
        files = 0
        for day, folder in batch:
            shutil.copytree(folder, landing_dir / "events" / folder.name, dirs_exist_ok=True)
            files += sum(1 for path in folder.rglob("*") if path.is_file())
        last_day = batch[-1][0]
        now = datetime.combine(last_day + timedelta(days=1), time(), timezone.utc) + SYNC_DELAY
        yield ReplayStep(batch[0][0], last_day, files, now), sync(now)


def _days(events_dir: Path) -> list[tuple[date, Path]]:
    """The simulator's day folders (`events/dt=YYYY-MM-DD/`), in order."""
    if not events_dir.is_dir():
        return []
    return sorted((date.fromisoformat(folder.name.removeprefix("dt=")), folder)
                  for folder in events_dir.iterdir() if folder.is_dir() and folder.name.startswith("dt="))


def pipeline(settings: Settings) -> Callable[[datetime], None]:
    """The pipeline's stages in the order of the Dagster job's asset graph, without Dagster's start-up cost per
    run (a sweep runs hundreds of syncs). Delivery goes to `settings`' Klaviyo, e.g. a local emulator; without a
    key the outbox keeps every event, as in production."""
    def sync(now: datetime) -> None:
        ingest_customers(settings, now=now)
        ingest_events(settings, now=now)
        resolve_identities(settings, now=now)
        map_events(settings, now=now)
        deliver(settings, now=now)
    return sync
