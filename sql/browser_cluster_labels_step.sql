-- One step of min-label propagation over usable_browser_links; returns the number of labels it lowered.
-- Reads: usable_browser_links (temp), cluster_labels (temp)
-- Writes: cluster_labels (temp)
update cluster_labels set label = lowest.label
from (
    select edge.node, min(neighbour.label) as label
    from (
        select anonymous_id as node, other_anonymous_id as neighbour from usable_browser_links
        union all
        select other_anonymous_id, anonymous_id from usable_browser_links
    ) as edge
    join cluster_labels as neighbour on neighbour.anonymous_id = edge.neighbour
    group by edge.node
) as lowest
where cluster_labels.anonymous_id = lowest.node and lowest.label < cluster_labels.label;
