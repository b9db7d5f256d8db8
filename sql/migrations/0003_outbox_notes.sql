-- Version 3: klaviyo_outbox.notes says what the mapping changed to fit Klaviyo's limits (issue 11: a profile
-- string too long for Klaviyo is dropped with a note, and the event still goes).

alter table klaviyo_outbox add column notes varchar;
