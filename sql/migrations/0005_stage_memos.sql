-- Version 5 (issue 14): a stage whose input has not changed skips its work. pipeline_state.fingerprint holds what
-- the stage's last run depended on beyond the load_id (the identity settings; the analytics sources), and
-- pipeline_state.overview the numbers its overview last computed, reused until a run changes something.

alter table pipeline_state add column fingerprint varchar;
alter table pipeline_state add column overview json;
