"""The single code location, `upstack_flows`, for `dagster dev -w workspace.yaml`, `dg dev` and `upstack sync`."""

import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import dagster as dg

from dagster_project.resources import pipeline_resources, run_config_for
from upstack_pipeline.settings import Settings
from upstack_pipeline.shops import DEFAULT_KEY_VARIABLE, DEFAULT_SHOP, Shop

SYNC_JOB_NAME = "upstack_sync"
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def load_definitions(resources: Mapping[str, Any] | None = None) -> dg.Definitions:
    """The assets, checks, job, schedule and sensor of `defs/`, with `resources`: by default configured from the
    environment, as the UI, the schedule and the sensor run them."""
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent).with_resources(
        resources or environment_resources())


def environment_resources() -> dict[str, Any]:
    """The default shop's settings from today's variables. With a shops file, each run's config replaces them with
    its shop's (dagster_project/shops.py); the key is read in the run from the variable its config names."""
    settings = Settings.from_env()
    key_variable = DEFAULT_KEY_VARIABLE if settings.klaviyo_api_key else None
    return pipeline_resources(settings, api_key=None, api_key_env=key_variable)


@dg.definitions
def defs() -> dg.Definitions:
    return load_definitions()


def run_sync(shop: Shop | Settings, instance: dg.DagsterInstance, *,
             as_of: datetime | None = None) -> dg.ExecuteInProcessResult:
    """One run of the whole asset graph for one shop in this process, as the schedule runs it, recorded in
    `instance`, with the shop's settings (and, for a replay of past traffic, the clock `as_of`) as its run config;
    the Klaviyo key is bound to the resource, never put in the run config. A bare `Settings` is the shop `default`."""
    from dagster_project.shops import SHOP_PARTITIONS, shop_tags

    if isinstance(shop, Settings):
        shop = Shop(name=DEFAULT_SHOP, settings=shop)
    release_abandoned_cli_runs(instance)
    if not instance.has_dynamic_partition(SHOP_PARTITIONS.name, shop.name):
        instance.add_dynamic_partitions(SHOP_PARTITIONS.name, [shop.name])
    settings = shop.settings
    definitions = load_definitions(pipeline_resources(settings, api_key=settings.klaviyo_api_key))
    return definitions.resolve_job_def(SYNC_JOB_NAME).execute_in_process(
        instance=instance,
        partition_key=shop.name,
        # As run config, not bound resources alone: the UI shows each run's settings.
        run_config={**QUIET_LOGS, **run_config_for(settings, as_of)},
        raise_on_error=False,
        tags={**shop_tags(shop), "upstack/trigger": "cli", "upstack/host": socket.gethostname(),
              "upstack/pid": str(os.getpid())},
    )


def release_abandoned_cli_runs(instance: dg.DagsterInstance) -> None:
    """Marks failed the CLI runs whose process died here.

    An in-process run killed mid-step (SIGKILL, a reboot) stays STARTED for ever, and its `upstack/shop` tag would
    keep that shop's one run slot taken, so no queued run of the shop would start again. No daemon watches
    in-process runs, so the next `upstack sync` on the same host cleans up after them.
    """
    started = instance.get_runs(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING],
        tags={"upstack/trigger": "cli", "upstack/host": socket.gethostname()},
    ))
    for run in started:
        if not _process_alive(int(run.tags.get("upstack/pid", "0"))):
            instance.report_run_failed(run, message="The upstack sync process running it is gone (killed?).")


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sync_instance(settings: Settings) -> dg.DagsterInstance:
    """The instance at DAGSTER_HOME, so CLI runs appear in the UI beside scheduled ones; else a throwaway one.

    A DAGSTER_HOME that is not a folder is refused in one line rather than created: a typo would otherwise start
    a second, empty history that the UI never shows."""
    home = settings.dagster_home
    if home is None:
        return dg.DagsterInstance.ephemeral()
    if not home.is_dir():
        raise ValueError(f"DAGSTER_HOME is {str(home)!r}, which is not a folder. Create it (mkdir -p {home}) or "
                         "point DAGSTER_HOME at the folder the Dagster UI uses (`make dev` uses dagster_home/ in "
                         "this repository); unset it to run without keeping history.")
    return dg.DagsterInstance.from_config(str(home.absolute()))
