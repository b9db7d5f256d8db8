-- Events named from a browser's history although that browser had shown more than $max_emails distinct emails
-- within $cookie_lifetime before the event. Counted independently of sql/resolved_events.sql, straight from the
-- observations, so a mistake there cannot hide here. Must be 0.
with cluster_emails as (
    select
        coalesce(cluster.browser_cluster_id, observation.anonymous_id) as cluster_id,
        observation.event_time,
        count(distinct observation.id_value) over (
            partition by coalesce(cluster.browser_cluster_id, observation.anonymous_id)
            order by observation.event_time
            range between $cookie_lifetime preceding and current row
        ) as emails_so_far
    from usable_identity_observations as observation
    left join browser_clusters as cluster using (anonymous_id)
    where observation.id_type = 'email'
),
history_named as (
    select browser_cluster_id as cluster_id, event_time
    from resolved_events
    where match_method in ('cookie_history', 'click_id_handoff', 'probabilistic_ip_ua')
)
select count(*)
from history_named
asof join cluster_emails
    on cluster_emails.cluster_id = history_named.cluster_id and cluster_emails.event_time < history_named.event_time
where cluster_emails.emails_so_far > $max_emails
    and cluster_emails.event_time >= history_named.event_time - $cookie_lifetime;
