-- The clusters whose shared-device guard count (sql/shared_device_guard_check.sql) this run may have changed, as
-- that check partitions them (a cookie's cluster, or the cookie itself outside any). A count changes only with the
-- cluster's email observations (new ones, those of a value whose quarantine changed, those of a cookie that joined
-- or left it) or with its history-named events (each event resolved again counts under its old cluster and its
-- new one). A cookie's own id is taken too: the events it named alone before it joined a cluster keep that id.
-- Taken from what the run wrote, not from which events sql/resolved_events.sql chose to resolve again, so a
-- cluster whose evidence changed is counted again even if that choice missed it.
-- Reads: browser_clusters, new_observations (temp), supernode_cookies (temp), reclustered_cookies (temp),
--   targets (temp), replaced_resolutions (temp)
-- Leaves: guard_clusters (temp)

create or replace temp table guard_clusters as
with touched_cookies as (
    select anonymous_id from new_observations where id_type = 'email'
    union
    select anonymous_id from supernode_cookies
    union
    select anonymous_id from reclustered_cookies
)
select distinct cluster_id from (
    select anonymous_id as cluster_id from touched_cookies
    union all
    select browser_cluster_id from browser_clusters semi join touched_cookies using (anonymous_id)
    union all
    select old_cluster_id from reclustered_cookies
    union all
    select cluster_id from targets
    union all
    select browser_cluster_id from replaced_resolutions
)
where cluster_id is not null;
