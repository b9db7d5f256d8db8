-- Rebuilds browser_clusters from browser_links (a small table: only cookies linked to another cookie).
-- Guards: a link between two cookies that each carry a different email is ignored (two people, whatever a
-- weak identifier says), and a cluster larger than max_browsers_per_cluster is flagged and not merged.
-- Connected components by min-label propagation: upstack_pipeline.identity repeats
-- sql/browser_cluster_labels_step.sql until no label changes, then sql/browser_clusters_finish.sql writes the
-- clusters.
-- Reads: browser_links, linked_cookie_emails (temp)
-- Variables: probabilistic_matching, now
-- Writes: identity_flags
-- Leaves: usable_browser_links (temp), cluster_labels (temp)

create or replace temp table usable_browser_links as
with cookie_emails as (
    select anonymous_id, list(distinct email) as emails from linked_cookie_emails group by anonymous_id
)
select browser_links.*,
       one.emails is not null and other.emails is not null
           and len(list_intersect(one.emails, other.emails)) = 0 as conflicting
from browser_links
left join cookie_emails as one on one.anonymous_id = browser_links.anonymous_id
left join cookie_emails as other on other.anonymous_id = browser_links.other_anonymous_id
where getvariable('probabilistic_matching') or linked_by <> 'ip_user_agent';

insert into identity_flags
select 'conflicting_emails', anonymous_id || ' ~ ' || other_anonymous_id,
       'not joined: each cookie carries a different email (' || linked_by || ')', getvariable('now')
from usable_browser_links where conflicting
on conflict do nothing;

delete from usable_browser_links where conflicting;

create or replace temp table cluster_labels as
select anonymous_id, anonymous_id as label from usable_browser_links
union
select other_anonymous_id, other_anonymous_id from usable_browser_links;
