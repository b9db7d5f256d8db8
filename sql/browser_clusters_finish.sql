-- Turns converged cluster_labels into browser_clusters, leaving oversize clusters unmerged (and flagged), and
-- records in temp table reclustered_cookies every cookie whose cluster changed: their events must be resolved
-- again.
-- Reads: browser_clusters, cluster_labels (temp), linked_cookie_emails (temp), usable_browser_links (temp)
-- Variables: max_browsers_per_cluster, now
-- Writes: browser_clusters, identity_flags
-- Leaves: cluster_emails (temp), new_browser_clusters (temp), reclustered_cookies (temp)

-- A cookie with no email can bridge two that carry different ones (Alice ~ family Mac ~ Bob): the pairwise guard
-- in sql/browser_clusters.sql cannot see that, so a cluster holding two emails is not merged either.
create or replace temp table cluster_emails as
select labels.label, count(distinct cookie.email) as emails
from cluster_labels as labels
join linked_cookie_emails as cookie using (anonymous_id)
group by labels.label;

create or replace temp table new_browser_clusters as
with sized as (
    select anonymous_id, label, count(*) over (partition by label) as size from cluster_labels
),
how_linked as (
    select labels.label, string_agg(distinct links.linked_by, ',' order by links.linked_by) as linked_by
    from usable_browser_links as links
    join cluster_labels as labels on labels.anonymous_id = links.anonymous_id
    group by labels.label
)
select sized.anonymous_id, 'bc_' || sized.label as browser_cluster_id, how_linked.linked_by
from sized join how_linked using (label)
left join cluster_emails using (label)
where sized.size <= getvariable('max_browsers_per_cluster') and coalesce(cluster_emails.emails, 0) <= 1;

insert into identity_flags
select 'conflicting_emails', 'bc_' || label, emails || ' emails among cookies joined only through others; left unmerged',
       getvariable('now')
from cluster_emails
where emails > 1
on conflict (flag, subject) do update set detail = excluded.detail, flagged_at = excluded.flagged_at;

insert into identity_flags
select 'oversize_cluster', 'bc_' || label, count(*) || ' cookies linked; left unmerged', getvariable('now')
from cluster_labels
group by label
having count(*) > getvariable('max_browsers_per_cluster')
on conflict (flag, subject) do update set detail = excluded.detail, flagged_at = excluded.flagged_at;

create or replace temp table reclustered_cookies as
select coalesce(new.anonymous_id, old.anonymous_id) as anonymous_id,
       old.browser_cluster_id as old_cluster_id, new.browser_cluster_id as new_cluster_id
from browser_clusters as old
full join new_browser_clusters as new using (anonymous_id)
where old.browser_cluster_id is distinct from new.browser_cluster_id;

-- Only the rows that changed are written: a run changes few clusters, and rewriting the table whole (delete all,
-- insert all) sent every row through the write-ahead log and the next checkpoint on every run with anything new.
delete from browser_clusters
where anonymous_id in (
    select anonymous_id from browser_clusters
    anti join new_browser_clusters using (anonymous_id, browser_cluster_id, linked_by)
);

insert into browser_clusters
select * from new_browser_clusters
anti join browser_clusters using (anonymous_id, browser_cluster_id, linked_by);
