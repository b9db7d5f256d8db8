"""The single code location, `upstack_flows`, for `dagster dev -w workspace.yaml`, `dg dev` and `upstack sync`."""

from pathlib import Path

import dagster as dg

from dagster_project.resources import UpstackResource
from upstack_pipeline.settings import Settings

SYNC_JOB_NAME = "upstack_sync"
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def load_definitions() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)


@dg.definitions
def defs() -> dg.Definitions:
    return load_definitions()


def run_sync(settings: Settings, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    """One run of the whole asset graph in this process, as the schedule runs it, recorded in `instance`."""
    job = load_definitions().resolve_job_def(SYNC_JOB_NAME)
    return job.execute_in_process(
        instance=instance,
        resources={"upstack": UpstackResource.from_settings(settings)},
        run_config=QUIET_LOGS,
        raise_on_error=False,
        tags={"upstack/trigger": "cli"},
    )


def sync_instance(settings: Settings) -> dg.DagsterInstance:
    """The instance at DAGSTER_HOME, so CLI runs appear in the UI beside scheduled ones; else a throwaway one."""
    if settings.dagster_home is not None:
        return dg.DagsterInstance.from_config(str(settings.dagster_home))
    return dg.DagsterInstance.ephemeral()
