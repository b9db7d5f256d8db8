-- Rebuilds raw_event_id_hashes from raw_events, whole. Ingestion runs it when the two tables' rows differ in number,
-- before judging a batch against the history: the hashes must cover every raw_events row, or a retry of a row they
-- miss would be written again. Only rows written into raw_events by hand (or a table restored from a copy) get
-- there; ingestion itself writes each batch's hashes with its rows (sql/raw_events.sql).

delete from raw_event_id_hashes;

insert into raw_event_id_hashes select event_id_hash(event_id), load_id from raw_events;
