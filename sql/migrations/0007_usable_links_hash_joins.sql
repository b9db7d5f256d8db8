-- Version 7 (issue 14): usable_identity_links tests each end of a link against the quarantine in a NOT EXISTS of
-- its own. One NOT EXISTS with an OR of the two ends is not an equality DuckDB can hash, so it compared every link
-- with every quarantined value (a nested-loop join): minutes on a backfill whose supernodes number tens of
-- thousands. The rows are the same.

create or replace view usable_identity_links as
select * from identity_links as link
where not exists (select 1 from identity_rejected_values as quarantined
                  where quarantined.reason = 'many_browsers'
                      and quarantined.id_type = link.left_type and quarantined.value = link.left_value)
    and not exists (select 1 from identity_rejected_values as quarantined
                    where quarantined.reason = 'many_browsers'
                        and quarantined.id_type = link.right_type and quarantined.value = link.right_value);
