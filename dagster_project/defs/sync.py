"""What runs the pipeline: one job over the whole asset graph, run per shop, hourly and whenever new files land.

Both triggers run the same job, and the job itself decides what is new (each warehouse's ingested_files ledger),
so a run started by either one does the same, complete work. Every run is one shop's (a partition of `shops`, see
dagster_project/shops.py) and carries that shop's configuration as its run config and tags.
"""

import hashlib
import json

import dagster as dg

from dagster_project.definitions import SYNC_JOB_NAME
from dagster_project.resources import UpstackResource
from dagster_project.shops import (
    SHOP_PARTITIONS,
    configured_shops,
    shop_partitioned_config,
    shop_run_request,
    shops_file_label,
)
from upstack_pipeline.landing import ArrivalCursor, LandingFolderError, arrivals, check_landing_folder
from upstack_pipeline.shops import DEFAULT_SHOP, ShopsFileError

upstack_sync = dg.define_asset_job(
    SYNC_JOB_NAME,
    selection=dg.AssetSelection.all(),
    # One process per run: steps share the shop's warehouse file one after another, and a run starts in well
    # under a second instead of paying a process start per step.
    executor_def=dg.in_process_executor,
    config=shop_partitioned_config,
    description="The whole pipeline for one shop: ingest its new landing files, then every stage downstream.",
)


@dg.schedule(
    job=upstack_sync,
    cron_schedule="0 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every shop, hourly: catches anything the landing sensor missed and keeps downstream stages current.",
)
def hourly_sync(context: dg.ScheduleEvaluationContext, upstack: UpstackResource):
    try:
        shops = configured_shops(upstack)
    except ShopsFileError as error:
        return dg.SkipReason(f"The shops file is not usable, so no shop runs until it is fixed: {error}")
    # A shop added to the file since the sensor's last tick gets its partition here, so it is not skipped.
    known = set(context.instance.get_dynamic_partitions(SHOP_PARTITIONS.name))
    missing = [shop.name for shop in shops if shop.name not in known]
    if missing:
        context.instance.add_dynamic_partitions(SHOP_PARTITIONS.name, missing)
    return [shop_run_request(shop) for shop in shops]


@dg.sensor(
    job=upstack_sync,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Keeps one partition per shop of the shops file, and requests a shop's sync when files appear (or "
                "change) in its landing folder.",
)
def landing_files_sensor(context: dg.SensorEvaluationContext, upstack: UpstackResource):
    try:
        shops = configured_shops(upstack)
    except ShopsFileError as error:
        # Partitions and cursors stay as they were: a typo in the file must not forget what was seen.
        return dg.SkipReason(f"The shops file is not usable; shops are watched again once it is fixed: {error}")
    cursors = _shop_cursors(context.cursor)
    known = set(context.instance.get_dynamic_partitions(SHOP_PARTITIONS.name))
    names = [shop.name for shop in shops]
    partition_requests = []
    if set(names) - known:
        partition_requests.append(SHOP_PARTITIONS.build_add_request(sorted(set(names) - known)))
    if known - set(names):
        partition_requests.append(SHOP_PARTITIONS.build_delete_request(sorted(known - set(names))))

    run_requests, quiet = [], []
    for shop in shops:
        landing_dir = shop.settings.landing_dir
        try:
            check_landing_folder(landing_dir)
        except LandingFolderError as error:
            quiet.append(f"Cannot watch shop {shop.name}'s landing folder: {error}")
            continue
        arrived, cursor = arrivals(landing_dir, ArrivalCursor.parse(cursors.get(shop.name)))
        # The cursor still moves on when nothing arrived: files older than the grace period are dropped from it.
        cursors[shop.name] = cursor.dumps()
        if not arrived:
            quiet.append(f"No new files in {landing_dir}." if len(shops) == 1
                         else f"No new files for shop {shop.name} ({landing_dir}).")
            continue
        batch_key = hashlib.sha256(json.dumps(sorted(arrived.items())).encode()).hexdigest()[:16]
        run_requests.append(shop_run_request(shop, run_key=f"{_run_key_prefix(shop.name)}landing-{batch_key}",
                                             tags={"upstack/new_files": str(len(arrived))}))
    cursors = {name: cursors[name] for name in names if name in cursors}
    return dg.SensorResult(
        run_requests=run_requests,
        skip_reason=None if run_requests else " ".join(quiet) or f"No shops in {shops_file_label()}.",
        cursor=json.dumps({"shops": cursors}, separators=(",", ":"), sort_keys=True),
        dynamic_partitions_requests=partition_requests,
    )


def _shop_cursors(text: str | None) -> dict[str, str]:
    """Each shop's ArrivalCursor. A cursor from before shops (one ArrivalCursor) is the default shop's."""
    try:
        stored = json.loads(text) if text else {}
    except ValueError:
        return {}
    if isinstance(stored, dict) and isinstance(stored.get("shops"), dict):
        return dict(stored["shops"])
    return {DEFAULT_SHOP: text} if text else {}


def _run_key_prefix(shop: str) -> str:
    """The default shop keeps the run keys of the release before shops, so an upgrade does not rerun a batch."""
    return "" if shop == DEFAULT_SHOP else f"{shop}-"
