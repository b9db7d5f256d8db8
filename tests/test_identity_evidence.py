"""sql/resolved_events.sql reads only the observations of the cookies in the targets' clusters (issue 14, item 2): the
evidence it gathers that way must be exactly what the whole history, filtered on each observation's cluster, gives.
Checked on every hourly run over the arrivals of tests/test_identity_chunks.py (simulated traffic, a customers
export, clustered browsers, a supernode quarantined by a later load), in the run's own transaction; no mocks."""

from __future__ import annotations

import duckdb
import pytest

from test_identity_chunks import CLOCK, arrivals, land
from upstack_pipeline.identity import resolve_identities
from upstack_pipeline.settings import Settings

EVIDENCE = "select event_id, anonymous_id, cluster_id, email, kx, source, source_rank from evidence"
# The evidence as the whole history gives it: every observation, kept when its cluster is a target's.
FROM_THE_WHOLE_HISTORY = """
select observation.event_id, observation.anonymous_id,
       coalesce(cookie_cluster.browser_cluster_id, observation.anonymous_id),
       case when observation.id_type = 'email' then observation.id_value
            when observation.id_type <> 'kx' then translation.email end,
       case when observation.id_type = 'kx' then observation.id_value end,
       case when observation.id_type in ('email', 'email_hash') then 'typed'
            when observation.id_type in ('phone', 'phone_hash') then 'phone'
            when observation.id_type = 'customer_id' then if(translation.only_from_customer_file, 'customer_file',
                                                             'login')
            else 'kx' end,
       case when observation.id_type in ('email', 'email_hash') then 0 when observation.id_type = 'customer_id' then 1
            when observation.id_type in ('phone', 'phone_hash') then 2 else 3 end
from usable_identity_observations as observation
left join cookie_cluster using (anonymous_id)
left join email_translations as translation
    on translation.id_type = observation.id_type and translation.id_value = observation.id_value
where observation.id_type in ('email', 'email_hash', 'phone', 'phone_hash', 'customer_id', 'kx')
    and coalesce(cookie_cluster.browser_cluster_id, observation.anonymous_id) in (select cluster_id from targets)
    and (observation.id_type in ('email', 'kx') or translation.email is not null)
union all
select observation.event_id, observation.anonymous_id,
       coalesce(cookie_cluster.browser_cluster_id, observation.anonymous_id), null, null, 'quarantined', 0
from identity_observations as observation
semi join identity_rejected_values as quarantined
    on quarantined.reason = 'many_browsers' and quarantined.id_type = observation.id_type
    and quarantined.value = observation.id_value
left join cookie_cluster using (anonymous_id)
where observation.id_type in ('email', 'email_hash')
    and coalesce(cookie_cluster.browser_cluster_id, observation.anonymous_id) in (select cluster_id from targets)
"""


@pytest.mark.slow  # a simulated world, synced run after run
def test_the_evidence_read_from_the_targets_cookies_is_what_the_whole_history_gives(tmp_path):
    settings = Settings(landing_dir=tmp_path / "landing", warehouse_path=tmp_path / "warehouse.duckdb")
    settings.events_dir.mkdir(parents=True)
    settings.customers_dir.mkdir(parents=True)
    seen = {"runs": 0, "rows": 0, "clustered": 0, "quarantined": 0, "customer_file": 0}

    def compare(connection: duckdb.DuckDBPyConnection, step: str) -> None:
        if step != "resolved_events":
            return
        evidence = sorted(connection.execute(EVIDENCE).fetchall(), key=repr)
        assert evidence == sorted(connection.execute(FROM_THE_WHOLE_HISTORY).fetchall(), key=repr)
        seen["runs"] += 1
        seen["rows"] += len(evidence)
        seen["clustered"] += sum(anonymous_id != cluster_id for _, anonymous_id, cluster_id, *_ in evidence)
        seen["quarantined"] += sum(row[5] == "quarantined" for row in evidence)
        seen["customer_file"] += sum(row[5] == "customer_file" for row in evidence)

    arriving = arrivals(tmp_path)
    for name, what in arriving:
        land(settings, name, what)
        resolve_identities(settings, now=CLOCK, after_step=compare)

    # The comparison saw what could go wrong: observations of a cluster's other cookies, quarantined values and
    # logins only the customers export names, on every run.
    assert seen["runs"] == len(arriving)
    assert all(seen[kind] > 0 for kind in ("rows", "clustered", "quarantined", "customer_file")), seen
