-- Version 2: supernode quarantine (commits 3a63024 and d016ccf). identity_rejected_values also lists values seen on
-- more browsers than one person uses (reason many_browsers) with how many showed them, and identity resolution
-- reads observations and links through views that leave those values out (sql/identity_rejected_values.sql).
--
-- Idempotent, unlike later migrations need to be: warehouses of the unreleased commits after the first release
-- already have the column (3a63024 added it with this same statement) or the views too (d016ccf), and no version.

alter table identity_rejected_values add column if not exists browsers bigint;

create or replace view usable_identity_observations as
select * from identity_observations as observation
where not exists (select 1 from identity_rejected_values as quarantined
                  where quarantined.reason = 'many_browsers'
                      and quarantined.id_type = observation.id_type and quarantined.value = observation.id_value);

create or replace view usable_identity_links as
select * from identity_links as link
where not exists (select 1 from identity_rejected_values as quarantined
                  where quarantined.reason = 'many_browsers'
                      and ((quarantined.id_type = link.left_type and quarantined.value = link.left_value)
                           or (quarantined.id_type = link.right_type and quarantined.value = link.right_value)));
