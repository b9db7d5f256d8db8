-- Decides every commerce event in resolved_events that is not decided yet and whose session has been idle for
-- hold_back: a payload in klaviyo_outbox, or a reason in klaviyo_skipped (SPEC 5). Events of sessions still
-- active wait for a later run, so an email typed later in the session can still change the answer.
--
-- In proportion to what is new: with `incremental`, only the events identity wrote since the last run (new ones and
-- those resolved to another answer: resolved_at at or after `last_run`, that run's now) and those that run held
-- back (events of sessions active within hold_back of it) are looked at; every other event was decided, or left
-- alone, by an earlier run on the same resolution. upstack_pipeline/klaviyo/mapping.py says when that holds;
-- otherwise every event is looked at.
--
-- Variables: now, incremental, last_run, event_id_hashes_cover (upstack_pipeline.warehouse), send_mode, metric_names
-- (a map from the pixel's event name to our metric's), order_line_metric_name, enabled_events, create_profiles,
-- update_profiles, respect_consent, max_event_age, hold_back, and Klaviyo's limits from
-- upstack_pipeline/klaviyo/limits.py (max_string_bytes, max_profile_strings_bytes, max_properties,
-- max_metric_name_chars, earliest_event_time, latest_event_time, profile_identifiers).
--
-- Leaves `mapped` behind: the rows beyond a cheap bound of Klaviyo's limits (`needs_review`) are not inserted
-- here; upstack_pipeline/klaviyo/mapping.py judges them with the exact checks the emulator runs.

-- Shopify's variant id of a pixel line item: the product link's `?variant=` (Shopify's storefront links carry
-- it), or a ProductVariant GID in `variant` or `id`. A bare number in `variant` is not taken: it is as likely a
-- variant title (a shoe size, "42") as an id, and a wrong id makes a link to a broken cart.
create or replace temp macro shopify_variant_id(item) as coalesce(
    nullif(regexp_extract(item.url, '[?&]variant=([0-9]+)', 1), ''),
    nullif(regexp_extract(item.variant, '^gid://shopify/ProductVariant/([0-9]+)$', 1), ''),
    nullif(regexp_extract(item.id, '^gid://shopify/ProductVariant/([0-9]+)$', 1), ''));

-- A quantity a cart permalink can carry: a whole number of at least one that fits Shopify's 32-bit Int.
create or replace temp macro cart_quantity(item) as
    case when coalesce(item.quantity, 1) between 1 and 2147483647
              and coalesce(item.quantity, 1) = floor(coalesce(item.quantity, 1))
         then coalesce(item.quantity, 1)::bigint end;

-- `<variant id>:<quantity>,...`, the path of a Shopify cart permalink: a variant on two lines adds up.
create or replace temp macro cart_permalink_path(variant_ids, quantities) as array_to_string(
    [variant_id || ':' || list_sum(list_filter(quantities, lambda quantity, i: variant_ids[i] = variant_id))::bigint
     for variant_id in list_filter(variant_ids, lambda variant_id, i: list_position(variant_ids, variant_id) = i)],
    ',');

-- The shop's host name, from `shop` (acme.myshopify.com, with or without a scheme), else from the page's address.
create or replace temp macro shop_host(shop, page) as coalesce(
    nullif(regexp_extract(lower(trim(shop)), '^(?:https?://)?([a-z0-9-]+(?:\.[a-z0-9-]+)+)/?$', 1), ''),
    nullif(regexp_extract(lower(page), '^https?://([a-z0-9-]+(?:\.[a-z0-9-]+)+)(?:[:/?#]|$)', 1), ''));

-- The events whose resolution may differ from the one they were decided on.
create or replace temp view touched as
select * from resolved_events
where not getvariable('incremental') or resolved_at >= getvariable('last_run');

-- A decision follows the latest resolution until the event is delivered: an email typed later (in a file that
-- arrived late) or a translation that turned ambiguous withdraws a pending row, and an event skipped only for
-- want of an identity, or because Klaviyo knew it, is decided again when that changes.
create or replace temp table withdrawn as
select outbox.event_id
from klaviyo_outbox as outbox
join touched as resolved using (event_id)
where outbox.status = 'pending'
    and (outbox.profile_key is distinct from case when resolved.email is not null then 'email:' || resolved.email
                                                   when resolved.kx is not null then 'kx:' || resolved.kx end
         or (getvariable('send_mode') = 'backup' and resolved.klaviyo_native));

delete from klaviyo_outbox where event_id in (select event_id from withdrawn);

-- The events the last run held back, not touched since: those of the sessions it found active (last_seen only
-- grows). Their row ids first, from narrow columns, then their rows by row id: only the row groups holding them
-- are read whole (by event id, every event id of the history is read and compared).
create or replace temp table held_back as
select rowid as held_rowid
from resolved_events
semi join (
    select left_value as session_id from identity_links
    where left_type = 'session_id' and last_seen > getvariable('last_run') - getvariable('hold_back')
) as waiting using (session_id)
where getvariable('incremental') and resolved_at < getvariable('last_run');

-- The skips of the events looked at, found in one scan of klaviyo_skipped's event ids (each scan reads those of
-- the whole history): those decided again are deleted by row id, and the others keep their events decided.
create or replace temp table considered_skips as
select rowid as skipped_rowid, event_id, reason
from klaviyo_skipped
where event_id in (
    select event_id from touched
    union all
    select event_id from resolved_events where rowid in (select held_rowid from held_back)
);

-- One join on (event_id, reason) reads resolved_events once; a subquery per reason read it twice.
create or replace temp table skips_decided_again as
select skipped_rowid
from considered_skips
semi join (
    select event_id, 'unresolved' as reason from touched where match_method is not null
    union all
    select event_id, 'native_identified' from touched where not klaviyo_native
) as decided_again using (event_id, reason);

delete from klaviyo_skipped where rowid in (select skipped_rowid from skips_decided_again);

create or replace temp table undecided as
with considered as (
    select * from touched
    union all
    select * from resolved_events where rowid in (select held_rowid from held_back)
)
select considered.*
from considered
anti join klaviyo_outbox as sent on sent.event_id = considered.event_id
anti join (select event_id from considered_skips anti join skips_decided_again using (skipped_rowid)) as skipped
    on skipped.event_id = considered.event_id;

-- The undecided events of idle sessions, and the reasons not to send that the resolution alone gives.
create or replace temp table candidates as
with session_activity as (
    select link.left_value as session_id, max(link.last_seen) as last_seen
    from identity_links as link
    semi join undecided on undecided.session_id = link.left_value
    where link.left_type = 'session_id'
    group by link.left_value
)
select
    undecided.*,
    case
        when not list_contains(getvariable('enabled_events'), event_name) then 'disabled_event'
        when getvariable('respect_consent') and consent_marketing = false then 'no_consent'
        when match_method is null then 'unresolved'
        when getvariable('send_mode') = 'backup' and klaviyo_native then 'native_identified'
        when not getvariable('create_profiles') and kx is null then 'profile_creation_disabled'
    end as skip_reason
from undecided
join session_activity using (session_id)
where session_activity.last_seen <= getvariable('now') - getvariable('hold_back');

insert into klaviyo_skipped
select
    event_id,
    event_name,
    skip_reason,
    case skip_reason
        when 'unresolved' then unresolved_reason
        when 'native_identified' then klaviyo_native_reason
    end,
    getvariable('now')
from candidates
where skip_reason is not null;

-- The others, with what the payload is built from: raw_events is read for these few events only (most commerce
-- events are skipped above), and they are sent unless their payload would be invalid. Their raw rows' ids first,
-- then the rows by row id: joined on event_id, every row of the history was read with its wide custom_data (0.9 s
-- of an hourly run at 19 million events, for 620 rows). The ids are found as ingestion finds a batch's retries
-- (sql/line_verdicts.sql): in the loads raw_event_id_hashes names for the events' hashes, whose row groups
-- raw_events' zone maps on load_id pick out, not in every event id of the history (0.6 s a run at 19 million); in
-- all of them when the hashes do not cover raw_events (rows added to it by hand since the last ingestion).
create or replace temp table candidate_raw_rows as
with sendable as materialized (
    select event_id from candidates where skip_reason is null
),
sendable_loads as (
    select distinct load_id from raw_event_id_hashes
    semi join (select event_id_hash(event_id) as id_hash from sendable) as sent using (id_hash)
)
select raw_events.rowid as raw_rowid
from raw_events
semi join sendable using (event_id)
where not getvariable('event_id_hashes_cover') or load_id in (select load_id from sendable_loads);

create or replace temp table decisions as
select
    *,
    case
        when event_name = 'ViewContent' and (custom_data.items[1].id is null or custom_data.items[1].name is null)
            then 'invalid'
        when event_name = 'AddToCart' and (custom_data.items[1].id is null or items_value is null) then 'invalid'
        when event_name = 'InitiateCheckout' and items_value is null then 'invalid'
        when event_name in ('AddToCart', 'InitiateCheckout') and cart_link is null then 'invalid'
        when event_name = 'Purchase' and (custom_data.order_id is null or custom_data.value is null
            or len(list_filter(custom_data.items, lambda item: item.id is null or item.price is null)) > 0)
            then 'invalid'
    end as skip_reason
from (
    select
        *,
        -- value, else the items' total, but only when every item has a price: a partial sum would understate it
        coalesce(custom_data.value, case when len(custom_data.items) > 0
                 and len(list_filter(custom_data.items, lambda item: item.price is null)) = 0
            then list_sum([item.price * coalesce(item.quantity, 1) for item in custom_data.items]) end) as items_value,
        -- The cart email's button (Klaviyo's CheckoutURL), for cart events: the pixel's checkout link once a
        -- checkout exists; else a cart permalink, which rebuilds the whole cart on any device, when every line
        -- names its variant and a whole quantity; else the shop's cart page.
        case
            when event_name not in ('AddToCart', 'InitiateCheckout') then null
            -- only a link to the shop itself: an email must not send shoppers wherever a pixel line says
            when regexp_full_match(custom_data.checkout_url, 'https?://[^\s/?#]+[/?#][^\s]*')
                and shop_host(null, custom_data.checkout_url) in (shop_host, shop_host(null, event_source_url))
                then {'url': custom_data.checkout_url, 'source': 'pixel_checkout_url'}
            when shop_host is not null and len(custom_data.items) > 0
                and len(list_filter(custom_data.items,
                                    lambda item: shopify_variant_id(item) is null or cart_quantity(item) is null)) = 0
                then {'url': 'https://' || shop_host || '/cart/' || cart_permalink_path(
                          [shopify_variant_id(item) for item in custom_data.items],
                          [cart_quantity(item) for item in custom_data.items]),
                      'source': 'cart_permalink'}
            when shop_host is not null then {'url': 'https://' || shop_host || '/cart', 'source': 'cart_page'}
        end as cart_link
    from (
        select
            candidates.* exclude (skip_reason),
            raw.custom_data,
            raw.event_source_url,
            shop_host(raw.shop, raw.event_source_url) as shop_host,
            identity.first_name,
            identity.last_name,
            identity.city,
            identity.region,
            identity.first_seen as identity_first_seen,
            identity.customer_ids[1] as customer_id
        from candidates
        join (
            select event_id, custom_data, event_source_url, shop
            from raw_events
            where rowid in (select raw_rowid from candidate_raw_rows)
        ) as raw using (event_id)
        left join identities as identity using (upstack_id)
        where candidates.skip_reason is null
    )
);

insert into klaviyo_skipped
select
    event_id,
    event_name,
    skip_reason,
    case event_name
        when 'Purchase' then 'a Purchase needs custom_data.order_id, custom_data.value and an id and price per item'
        when 'ViewContent' then 'a product view needs custom_data.items[0] with an id and a name'
        else case when cart_link is not null and event_name = 'InitiateCheckout'
                then 'a checkout needs custom_data.value or items that all have a price'
            when cart_link is not null
                then 'an add to cart needs custom_data.items[0] with an id, and a value or priced items'
            else 'a cart event needs a link back to the cart: custom_data.checkout_url, or a shop (or page '
                 'address) naming the shop''s domain'
        end
    end,
    getvariable('now')
from decisions
where skip_reason is not null;

-- Klaviyo's recommended property names (its ecommerce integration guide), built once per event.
create or replace temp table mapped as
with sendable as (
    select
        *,
        items_value as money,
        [{'ProductID': item.id, 'SKU': item.sku, 'ProductName': item.name, 'Quantity': item.quantity,
          'ItemPrice': item.price, 'RowTotal': item.price * coalesce(item.quantity, 1), 'ProductURL': item.url,
          'ImageURL': item.image_url, 'ProductCategories': list_filter([item.category], lambda c: c is not null),
          'Brand': item.brand,
          'Variant': item.variant} for item in coalesce(custom_data.items, [])] as klaviyo_items,
        [item.name for item in coalesce(custom_data.items, []) if item.name is not null] as item_names,
        list_sort(list_distinct([item.category for item in coalesce(custom_data.items, [])
                                 if item.category is not null])) as categories,
        event_time < getvariable('now') - getvariable('max_event_age') as backfill,
        case when email is not null then 'email:' || email else 'kx:' || kx end as profile_key
    from decisions
    where skip_reason is null
),
profiles as (
    select
        *,
        json_merge_patch('{}', to_json({
            'email': email,
            '_kx': if(email is null, kx, null),
            'first_name': if(getvariable('update_profiles'), first_name, null),
            'last_name': if(getvariable('update_profiles'), last_name, null),
            'location': if(getvariable('update_profiles') and (city is not null or region is not null),
                           {'city': city, 'region': region}, null),
            'properties': {'upstack_id': upstack_id, 'upstack_match_method': match_method,
                           'upstack_first_seen': strftime(identity_first_seen, '%Y-%m-%dT%H:%M:%S+00:00')}
        })) as profile
    from sendable
),
klaviyo_events as (
    select
        event_id, event_name, profile_key, profile, backfill, event_time,
        getvariable('metric_names')[event_name] as metric_name,
        event_id as unique_id,
        case event_name when 'ViewContent' then custom_data.items[1].price else money end as value,
        custom_data.currency as currency,
        case event_name
            when 'ViewContent' then to_json({
                'ProductName': custom_data.items[1].name, 'ProductID': custom_data.items[1].id,
                'SKU': custom_data.items[1].sku,
                'Categories': list_filter([custom_data.items[1].category], lambda c: c is not null),
                'ImageURL': custom_data.items[1].image_url,
                'URL': coalesce(custom_data.items[1].url, event_source_url), 'Brand': custom_data.items[1].brand,
                'Price': custom_data.items[1].price, 'upstack_match_method': match_method})
            when 'AddToCart' then to_json({
                'AddedItemProductName': custom_data.items[1].name, 'AddedItemProductID': custom_data.items[1].id,
                'AddedItemSKU': custom_data.items[1].sku, 'AddedItemPrice': custom_data.items[1].price,
                'AddedItemQuantity': custom_data.items[1].quantity, 'AddedItemImageURL': custom_data.items[1].image_url,
                'AddedItemURL': custom_data.items[1].url,
                'AddedItemCategories': list_filter([custom_data.items[1].category], lambda c: c is not null),
                'ProductName': custom_data.items[1].name, 'ProductID': custom_data.items[1].id,
                'Price': custom_data.items[1].price, 'Quantity': custom_data.items[1].quantity,
                'CartValue': money, 'ItemNames': item_names, 'Items': klaviyo_items,
                'CheckoutURL': cart_link.url, 'upstack_checkout_url_source': cart_link.source,
                'upstack_match_method': match_method})
            when 'InitiateCheckout' then to_json({
                'CartValue': money, 'ItemCount': list_sum([coalesce(item.quantity, 1) for item in custom_data.items]),
                'ItemNames': item_names, 'Items': klaviyo_items, 'Categories': categories,
                'CheckoutURL': cart_link.url, 'upstack_checkout_url_source': cart_link.source,
                'upstack_match_method': match_method})
            when 'Purchase' then to_json({
                'OrderID': custom_data.order_id, 'Revenue': money, 'ItemNames': item_names, 'Items': klaviyo_items,
                'Categories': categories, 'DiscountCodes': coalesce(custom_data.discount_codes, []),
                'ItemCount': list_sum([coalesce(item.quantity, 1) for item in custom_data.items]),
                'upstack_match_method': match_method})
        end as properties
    from profiles

    union all                                   -- Placed Order: one Ordered Product per line
    select
        event_id, event_name, profile_key, profile, backfill, event_time,
        getvariable('order_line_metric_name'),
        event_id || ':' || line.position,
        line.item.price * coalesce(line.item.quantity, 1),
        custom_data.currency,
        to_json({'OrderID': custom_data.order_id, 'ProductID': line.item.id, 'SKU': line.item.sku,
                 'ProductName': line.item.name, 'Quantity': line.item.quantity, 'Price': line.item.price,
                 'ProductURL': line.item.url, 'ImageURL': line.item.image_url,
                 'Categories': list_filter([line.item.category], lambda c: c is not null), 'Brand': line.item.brand,
                 'Variant': line.item.variant,
                 'upstack_match_method': match_method})
    from (
        select *, unnest(list_zip(custom_data.items, range(len(custom_data.items)))) as line_pair
        from profiles where event_name = 'Purchase'
    ), lateral (select {'item': line_pair[1], 'position': line_pair[2]} as line)
)
select
    *,
    -- A cheap bound that every row breaking one of Klaviyo's limits crosses (a string can be no longer than the
    -- document holding it, a '$' key or a NaN leaves its mark in the text), so the exact checks run on few rows.
    bool_or(
        strlen(event) > getvariable('max_string_bytes')
        or strlen(profile) > getvariable('max_profile_strings_bytes')
        or len(json_keys(event, '$.properties')) > getvariable('max_properties')
        or length(metric_name) > getvariable('max_metric_name_chars') or trim(coalesce(metric_name, '')) = ''
        or event_time < getvariable('earliest_event_time') or event_time >= getvariable('latest_event_time')
        or contains(event, '"$') or contains(profile, '"$') or contains(event, 'Infinity') or contains(event, 'NaN')
        or not regexp_full_match(coalesce(event->>'$.value_currency', 'USD'), '[A-Z]{3}')
        -- an identifier without a letter or digit may be all whitespace, which DuckDB's trim does not all remove
        or len(list_filter(getvariable('profile_identifiers'), lambda identifier:
               regexp_matches(json_extract_string(profile, '$.' || identifier), '\w'))) = 0
    ) over (partition by event_id) as needs_review
from (
    select
        unique_id, event_id, event_name, metric_name, profile_key, profile, event_time,
        json_merge_patch('{}', to_json({
            'properties': properties,
            'time': strftime(event_time, '%Y-%m-%dT%H:%M:%S.%g+00:00'),
            'value': value,
            'value_currency': if(value is null, null, upper(trim(currency))),
            'unique_id': unique_id,
            'backfill': if(backfill, true, null),
            'metric': {'data': {'type': 'metric', 'attributes': {'name': metric_name}}}
        })) as event,
        backfill
    from klaviyo_events
);

insert into klaviyo_outbox (unique_id, event_id, event_name, metric_name, profile_key, profile, event, backfill,
                            status, created_at)
select unique_id, event_id, event_name, metric_name, profile_key, profile, event, backfill, 'pending',
       getvariable('now')
from mapped
where not needs_review
on conflict do nothing;
