"""One Dagster partition per shop: what every run of a shop carries, however it is started.

The shops are `upstack_pipeline.shops.load_shops()`: the file UPSTACK_SHOPS_FILE names, or without it the one shop
`default` that today's variables describe. Each is a key of the dynamic partitions `shops`, which the landing
sensor keeps equal to the file. A shop's run carries
- its settings as run config (its landing folder, warehouse, Klaviyo address, mapping), the key's variable by name;
- the tag `upstack/shop`, which the instance limits to one run per value: one writer per warehouse file, while
  other shops run beside it up to `max_concurrent_runs` (deploy/dagster.yaml);
- the tag `upstack/klaviyo-account` when it sends, limited the same way: Klaviyo's rate limits are per account, so
  shops sharing one take turns and each run's pacer has the account's whole allowance.
The sensor, the schedule and `upstack sync` build their runs with `shop_run_request` / `shop_tags`; a run launched
from the UI gets the same from the job's partitioned config.
"""

import os
from datetime import datetime
from typing import Any

import dagster as dg

from dagster_project.resources import UpstackResource, run_config_for
from upstack_pipeline.shops import (
    DEFAULT_SHOP, SHOPS_FILE_VARIABLE, Shop, UnknownShopError, load_shops, shop_named,
)

SHOP_PARTITIONS = dg.DynamicPartitionsDefinition(name="shops")
SHOP_TAG = "upstack/shop"
ACCOUNT_TAG = "upstack/klaviyo-account"
# Dagster's console logger prints every DEBUG event of a run; an operator watching `make dev` needs INFO.
RUN_LOGS = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def configured_shops(upstack: UpstackResource) -> tuple[Shop, ...]:
    """The shops file's shops, or the one shop the resources describe (the environment's, or a test's)."""
    if shops_file_in_use():
        return load_shops()
    settings = upstack.settings()
    return (Shop(name=DEFAULT_SHOP, settings=settings, klaviyo_api_key_env=upstack.klaviyo.api_key_env or None,
                 klaviyo_account=upstack.klaviyo.api_key_env or None),)


def shops_file_in_use() -> bool:
    return bool(os.environ.get(SHOPS_FILE_VARIABLE))


def shop_run_config(shop: Shop, as_of: datetime | None = None) -> dict[str, Any]:
    return {**RUN_LOGS, **run_config_for(shop.settings, as_of, api_key_env=shop.klaviyo_api_key_env)}


def shop_tags(shop: Shop) -> dict[str, str]:
    tags = {SHOP_TAG: shop.name}
    if shop.settings.klaviyo_api_key and shop.klaviyo_account:
        tags[ACCOUNT_TAG] = shop.klaviyo_account
    return tags


def shop_run_request(shop: Shop, **request: Any) -> dg.RunRequest:
    return dg.RunRequest(partition_key=shop.name, run_config=shop_run_config(shop),
                         tags={**shop_tags(shop), **request.pop("tags", {})}, **request)


def _shop(partition_key: str) -> Shop:
    try:
        return shop_named(load_shops(), partition_key)
    except UnknownShopError as error:
        raise dg.DagsterInvariantViolationError(
            f"Partition {partition_key!r} of {shops_file_label()}: {error}; the partition goes at the landing "
            "sensor's next tick.") from None


def shops_file_label() -> str:
    return os.environ.get(SHOPS_FILE_VARIABLE) or "the environment (no UPSTACK_SHOPS_FILE: one shop, 'default')"


# What a run launched from the UI (the Launchpad, a backfill) for one shop runs with: read from the shops file at
# launch, so an edited file needs no restart.
shop_partitioned_config = dg.PartitionedConfig(
    SHOP_PARTITIONS,
    run_config_for_partition_key_fn=lambda key: shop_run_config(_shop(key)),
    tags_for_partition_key_fn=lambda key: shop_tags(_shop(key)),
)
