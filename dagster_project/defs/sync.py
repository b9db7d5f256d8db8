"""What runs the pipeline: one job over the whole asset graph, started hourly and whenever new files land.

Both triggers run the same job, and the job itself decides what is new (the ingested_files ledger), so a run
started by either one does the same, complete work. Each run carries the resources' configuration as its run config,
so its page in the UI says what it ran with.
"""


import hashlib
import json

import dagster as dg

from dagster_project.definitions import SYNC_JOB_NAME
from dagster_project.resources import UpstackResource, run_config_for
from upstack_pipeline.landing import ArrivalCursor, LandingFolderError, arrivals, check_landing_folder

upstack_sync = dg.define_asset_job(
    SYNC_JOB_NAME,
    selection=dg.AssetSelection.all(),
    # One process per run: steps share the warehouse file one after another, and a run starts in well under a
    # second instead of paying a process start per step.
    executor_def=dg.in_process_executor,
    # Dagster's console logger prints every DEBUG event of a run; an operator watching `make dev` needs INFO.
    # The Launchpad shows this and lets a run ask for DEBUG.
    config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
    description="The whole pipeline: ingest new landing files, then every stage downstream of them.",
)


@dg.schedule(
    job=upstack_sync,
    cron_schedule="0 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Catches anything the landing sensor missed and keeps downstream stages current.",
)
def hourly_sync(upstack: UpstackResource):
    return dg.RunRequest(run_config=run_config_for(upstack.settings()))


@dg.sensor(
    job=upstack_sync,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests a sync when files appear (or change) in the landing folder.",
)
def landing_files_sensor(context: dg.SensorEvaluationContext, upstack: UpstackResource):
    settings = upstack.settings()
    landing_dir = settings.landing_dir
    try:
        check_landing_folder(landing_dir)
    except LandingFolderError as error:
        return dg.SkipReason(f"Cannot watch the landing folder: {error}")
    arrived, cursor = arrivals(landing_dir, ArrivalCursor.parse(context.cursor))
    if not arrived:
        # The cursor still moves on: files older than the grace period are dropped from it.
        return dg.SensorResult(skip_reason=f"No new files in {landing_dir}.", cursor=cursor.dumps())
    batch_key = hashlib.sha256(json.dumps(sorted(arrived.items())).encode()).hexdigest()[:16]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"landing-{batch_key}", run_config=run_config_for(settings),
                                    tags={"upstack/new_files": str(len(arrived))})],
        cursor=cursor.dumps(),
    )
