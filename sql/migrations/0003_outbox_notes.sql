-- Version 3 (issue 11): klaviyo_outbox.notes says what the mapping changed to fit Klaviyo's limits (a profile string
-- too long for Klaviyo is dropped with a note, and the event still goes); and cart events not yet sent, queued by a
-- release that gave them no CheckoutURL, are withdrawn so the next run maps them again with a link back to the cart.

alter table klaviyo_outbox add column notes varchar;

delete from klaviyo_outbox
where status in ('pending', 'claimed')
    and event_name in ('AddToCart', 'InitiateCheckout')
    and json_extract(event, '$.properties.CheckoutURL') is null;
