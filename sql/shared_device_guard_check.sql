-- Events named from a browser's history although that browser had shown more than max_emails_per_browser
-- distinct emails within cookie_lifetime before the event, per browser cluster (a cookie outside any cluster is
-- its own). Counted independently of sql/resolved_events.sql, straight from the observations, so a mistake there
-- cannot hide here. Must be 0 everywhere.
--
-- A cluster's count depends on its cookies' usable email observations and its history-named events alone, so a
-- run counts again only the clusters in guard_clusters (sql/shared_device_guard_scope.sql: those whose inputs it
-- changed) and keeps the others' counts (upstack_pipeline.identity keeps the clusters over 0 in pipeline_state);
-- under variable guard_recount (other guards or SQL than the counts kept were taken under) it counts every cluster
-- that has a history-named event, the only ones that can be over 0.
-- Reads: browser_clusters, usable_identity_observations, resolved_events, guard_clusters (temp)
-- Variables: guard_recount, cookie_lifetime, max_emails_per_browser
-- Leaves: guard_counted (temp), guard_breaches (temp)

create or replace temp table guard_counted as
select cluster_id from guard_clusters
union
select browser_cluster_id from resolved_events
where getvariable('guard_recount') and match_method in ('cookie_history', 'click_id_handoff', 'probabilistic_ip_ua');

create or replace temp table guard_breaches as
with history_named as (
    select browser_cluster_id as cluster_id, event_time
    from resolved_events
    semi join guard_counted as counted on counted.cluster_id = resolved_events.browser_cluster_id
    where match_method in ('cookie_history', 'click_id_handoff', 'probabilistic_ip_ua')
),
cluster_cookies as (                            -- the cookies whose observations make each cluster that has one
    select cluster.anonymous_id, cluster.browser_cluster_id as cluster_id
    from browser_clusters as cluster
    semi join history_named on history_named.cluster_id = cluster.browser_cluster_id
    union all
    select distinct cluster_id, cluster_id from history_named
    anti join browser_clusters as cluster on cluster.anonymous_id = history_named.cluster_id
),
cluster_emails as (
    select
        cookie.cluster_id,
        observation.event_time,
        count(distinct observation.id_value) over (
            partition by cookie.cluster_id
            order by observation.event_time
            range between getvariable('cookie_lifetime') preceding and current row
        ) as emails_so_far
    from usable_identity_observations as observation
    join cluster_cookies as cookie using (anonymous_id)
    where observation.id_type = 'email'
)
select history_named.cluster_id, count(*) as events
from history_named
asof join cluster_emails
    on cluster_emails.cluster_id = history_named.cluster_id and cluster_emails.event_time < history_named.event_time
where cluster_emails.emails_so_far > getvariable('max_emails_per_browser')
    and cluster_emails.event_time >= history_named.event_time - getvariable('cookie_lifetime')
group by history_named.cluster_id;
