"""The single code location, `upstack_flows`, for `dagster dev -w workspace.yaml`, `dg dev` and `upstack sync`."""

import os
import socket
from datetime import datetime
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


def run_sync(settings: Settings, instance: dg.DagsterInstance, *,
             as_of: datetime | None = None) -> dg.ExecuteInProcessResult:
    """One run of the whole asset graph in this process, as the schedule runs it, recorded in `instance`.

    Paths (and, for a replay of past traffic, the clock `as_of`) come from the arguments; everything else the
    assets read from the environment at run time.
    """
    release_abandoned_cli_runs(instance)
    job = load_definitions().resolve_job_def(SYNC_JOB_NAME)
    return job.execute_in_process(
        instance=instance,
        # As run config, not a resource override: the job carries default run config (its log level), and the
        # UI shows each run's paths and clock.
        run_config={**QUIET_LOGS, "resources": {"upstack": {"config": UpstackResource.config_for(settings, as_of)}}},
        raise_on_error=False,
        tags={"upstack/trigger": "cli", "upstack/host": socket.gethostname(), "upstack/pid": str(os.getpid())},
    )


def release_abandoned_cli_runs(instance: dg.DagsterInstance) -> None:
    """Marks failed the CLI runs whose process died here, and frees their warehouse pool slot.

    An in-process run killed mid-step (SIGKILL, a reboot) stays STARTED for ever and keeps its slot of the
    one-slot `duckdb_warehouse` pool, so every later run would wait on it. No daemon watches in-process runs,
    so the next `upstack sync` on the same host cleans up after them.
    """
    started = instance.get_runs(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING],
        tags={"upstack/trigger": "cli", "upstack/host": socket.gethostname()},
    ))
    for run in started:
        if not _process_alive(int(run.tags.get("upstack/pid", "0"))):
            instance.report_run_failed(run, message="The upstack sync process running it is gone (killed?).")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)


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
