"""How identity resolution fares when the world's rates move: `upstack evaluate --sweep`.

A store's traffic is not the simulator's default world: more or fewer iPhones, shoppers who return sooner or later,
more or fewer clicks from Klaviyo emails, more shared tablets, more made-up addresses. The sweep simulates the
default world and, one rate at a time, a lower and a higher value of each (`SWEEP`), replays each world one day
per sync as the schedule would (`upstack_pipeline.sandbox.replay`), delivering into a local Klaviyo emulator (so what
was delivered before a later file changed the answer stays delivered), and scores it against the truth, ours
beside the baseline. The README's table is its output; it tells a store which way its numbers move and which settings to
revisit when its traffic differs.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from upstack_pipeline.sandbox.evaluation import Evaluation, evaluate
from upstack_pipeline.sandbox.klaviyo_emulator import KlaviyoEmulator
from upstack_pipeline.sandbox.replay import pipeline, replay
from upstack_pipeline.settings import Settings
from upstack_pipeline.sandbox.simulate import WorldRates, simulate

# The key of the local Klaviyo emulator each world delivers into; it opens nothing anywhere else.
SWEEP_KEY = "pk_sweep_local_emulator_only"

# Each rate of simulated-world.md that moves the results, with a value either side of the default (WorldRates).
SWEEP: Mapping[str, tuple[float, ...]] = {
    "safari_share": (0.3, 0.7),
    "return_gap_days": (10.0, 45.0),
    "kx_share": (0.1, 0.3),
    "shared_device_share": (0.1, 0.5),
    "placeholder_share": (0.02, 0.1),
    "forward_share": (0.0, 0.1),
}


@dataclass(frozen=True)
class SweepRow:
    rate: str | None  # None: the default world
    value: float | None
    evaluation: Evaluation

    @property
    def world(self) -> str:
        return "default" if self.rate is None else f"{self.rate} = {self.value:g}"


def sweep(work_dir: Path, *, visitors: int, days: int, seed: int, live_days: int, end: datetime | None = None,
          grid: Mapping[str, tuple[float, ...]] = SWEEP, settings: Settings = Settings()) -> Iterator[SweepRow]:
    """Yields the default world's score, then one per rate and value of `grid`, each world simulated with the same
    seed and replayed into a warehouse of its own under `work_dir` (replaced if it exists)."""
    worlds = [(None, None)] + [(rate, value) for rate, values in grid.items() for value in values]
    for rate, value in worlds:
        rates = WorldRates() if rate is None else replace(WorldRates(), **{rate: value})
        root = Path(work_dir) / ("default" if rate is None else f"{rate}-{value:g}")
        if root.exists():
            shutil.rmtree(root)
        simulate(root / "simulation", visitors=visitors, days=days, seed=seed, end=end, rates=rates)
        with KlaviyoEmulator(api_key=SWEEP_KEY) as emulator:
            world_settings = replace(
                settings.with_paths(landing_dir=root / "landing", warehouse_path=root / "warehouse.duckdb"),
                klaviyo_base_url=emulator.base_url, klaviyo_api_key=SWEEP_KEY)
            for _ in replay(root / "simulation", world_settings.landing_dir, pipeline(world_settings),
                            live_days=live_days):
                pass
        yield SweepRow(rate, value, evaluate(world_settings.warehouse_path, root / "simulation" / "truth"))


def format_sweep(rows: list[SweepRow]) -> str:
    """A Markdown table, ours beside the baseline in each cell."""
    lines = [
        "| world | wrong-person sent, ours (avoidable) / floor | baseline (avoidable) | sent precision, ours / "
        "baseline | reachable carts reached, ours / baseline | right-person lift, ours / baseline |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        score, ours, baseline = row.evaluation, row.evaluation.ours, row.evaluation.baseline
        lines.append(
            f"| {row.world} "
            f"| {ours.sent_wrong_person:,} ({ours.sent_avoidable_wrong_person:,}) / {score.sent_floor:,} "
            f"| {baseline.sent_wrong_person:,} ({baseline.sent_avoidable_wrong_person:,}) "
            f"| {_share(ours.sent_precision, ours.sent)} / {_share(baseline.sent_precision, baseline.sent)} "
            f"| {_share(ours.recall, ours.reachable_sessions)} of {ours.reachable_sessions:,} "
            f"/ {_share(baseline.recall, baseline.reachable_sessions)} "
            f"| {_share(ours.right_person_lift, ours.native_sessions)} / "
            f"{_share(baseline.right_person_lift, baseline.native_sessions)} |"
        )
    return "\n".join(lines)


def _share(value: float, out_of: int) -> str:
    """A percentage, or a dash where there was nothing to take a share of."""
    return f"{value:.1%}" if out_of else "-"
