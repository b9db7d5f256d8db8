"""The shared-device guard's check (sql/shared_device_guard_check.sql) is counted per run on the clusters the run
changed, and the clusters over 0 kept in pipeline_state (issue 14, item 2: overview numbers maintained per run
instead of recounted). What is kept must be, cluster by cluster, what counting the whole history gives, on every
hourly run over the arrivals of tests/test_identity_chunks.py (simulated traffic, clustered browsers, a supernode
quarantined by a later load). The check is 0 whenever resolution is right, so a cluster over 0 is made by counting
with a guard of 0 emails in the check alone: every event named from a history holding an email is over it."""

from __future__ import annotations

import json
from dataclasses import replace

import duckdb
import pytest

from conftest import query
from test_identity_chunks import CLOCK, arrivals, land
from upstack_pipeline.identity import GUARD_STAGE, overview, resolve_identities
from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import read_sql, set_variables

# Seconds: simulated traffic synced run after run; the module's other tests read the warehouse those runs leave.
pytestmark = pytest.mark.slow


def kept(settings: Settings) -> dict[str, int]:
    return json.loads(query(settings, "select overview from pipeline_state where stage = ?", [GUARD_STAGE])[0][0])


def whole_history(settings: Settings, max_emails: int) -> dict[str, int]:
    """The check over every cluster, on a connection of its own."""
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        set_variables(connection, {"guard_recount": True, "cookie_lifetime": settings.identity.cookie_lifetime,
                                   "max_emails_per_browser": max_emails})
        connection.execute("create temp table guard_clusters (cluster_id varchar)")
        connection.execute(read_sql("shared_device_guard_check"))
        return dict(connection.execute("select cluster_id, events from guard_breaches").fetchall())


def no_email_allowed(connection: duckdb.DuckDBPyConnection, step: str) -> None:
    if step == "shared_device_guard_scope":
        connection.execute("set variable max_emails_per_browser = 0")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Settings, list]:
    root = tmp_path_factory.mktemp("guard")
    settings = Settings(landing_dir=root / "landing", warehouse_path=root / "warehouse.duckdb")
    settings.events_dir.mkdir(parents=True)
    settings.customers_dir.mkdir(parents=True)
    return settings, arrivals(root)


def test_the_counts_kept_per_run_are_the_whole_historys_cluster_by_cluster(world):
    settings, arriving = world
    seen: list[dict[str, int]] = []
    for name, what in arriving:
        land(settings, name, what)
        resolve_identities(settings, now=CLOCK, after_step=no_email_allowed)
        seen.append(kept(settings))
        assert seen[-1] == whole_history(settings, max_emails=0), name
    # Clusters over 0 appeared, grew and changed from run to run: the runs after the first kept and updated counts.
    assert len({json.dumps(counts, sort_keys=True) for counts in seen}) > 3
    assert max(len(counts) for counts in seen) > 5
    # With the guard as resolution applies it, nothing is over it.
    assert whole_history(settings, max_emails=settings.identity.max_emails_per_browser) == {}


def test_other_guards_count_the_whole_history_again(world):
    settings, _ = world  # after the test above: counts kept under the settings' guards
    strict = replace(settings, identity=replace(settings.identity, max_emails_per_browser=0))
    over = sum(whole_history(settings, max_emails=0).values())
    assert over > 0
    # Asked under guards no run has used, the overview counts; a run under them counts every cluster again.
    assert overview(strict).history_attributions_over_guard == over
    resolve_identities(strict, now=CLOCK)
    assert kept(strict) == whole_history(strict, max_emails=0)
    assert overview(strict).history_attributions_over_guard == sum(kept(strict).values())


def test_a_run_that_dies_keeps_the_counts_of_the_last_run_that_committed(world):
    settings, _ = world
    before = query(settings, "select * from pipeline_state where stage = ?", [GUARD_STAGE])

    def die(connection: duckdb.DuckDBPyConnection, step: str) -> None:
        no_email_allowed(connection, step)
        if step == "identities":
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        resolve_identities(replace(settings, identity=replace(settings.identity, max_emails_per_browser=1)),
                           now=CLOCK, after_step=die)
    assert query(settings, "select * from pipeline_state where stage = ?", [GUARD_STAGE]) == before
