"""The `upstack` command as a person runs it: real processes, real files, a real Dagster instance on disk."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from conftest import klaviyo_click, make_event, query, write_events
from upstack_pipeline.settings import Settings

pytestmark = pytest.mark.slow  # every test runs the whole `upstack` command in a process

PROJECT_ROOT = Path(__file__).resolve().parent.parent
README = PROJECT_ROOT / "README.md"


def upstack(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dagster_project.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=PROJECT_ROOT)


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("UPSTACK_", "KLAVIYO_", "DAGSTER_"))}
    env.update({"UPSTACK_LANDING_DIR": str(settings.landing_dir), "UPSTACK_WAREHOUSE": str(settings.warehouse_path),
                **extra})
    return env


def count(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return int(match.group(1).replace(",", ""))


def test_demo_simulates_replays_day_by_day_and_prints_a_summary_that_adds_up(tmp_path):
    demo = Settings(landing_dir=tmp_path / "landing", warehouse_path=tmp_path / "warehouse.duckdb")
    # A fixed end: the same world whatever today's date (a small world ending this hour may send nothing).
    completed = upstack("demo", "--dir", str(tmp_path / "demo"), "--visitors", "1000", "--days", "21",
                        "--live-days", "2", "--end", "2026-11-28T00:00:00+00:00", env=environment(demo))

    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    assert "succeeded" in out and "FAILED" not in out
    simulated, bad = count(r"([\d,]+) events in", out), count(r"([\d,]+) bad lines", out)
    # The history (the first days together), then one sync per remaining day, each line saying what it took in.
    syncs = re.findall(r"sync ok: +([\d,]+) events \(([\d,]+) quarantined\) from [\d,]+ files?, +([\d,]+) delivered",
                       out)
    assert len(syncs) == 3
    assert sum(int(events.replace(",", "")) for events, _, _ in syncs) == simulated
    assert sum(int(quarantined.replace(",", "")) for _, quarantined, _ in syncs) == bad
    checks_passed, checks = re.search(r"checks +(\d+) of (\d+) passed", out).groups()
    assert checks_passed == checks
    accepted = re.search(r"emulator at \S+ accepted (.*)\.", out).group(1)
    assert sum(int(delivered.replace(",", "")) for _, _, delivered in syncs) == sum(
        int(number.replace(",", "")) for number in re.findall(r"([\d,]+) [A-Z]", accepted))
    assert "Identity resolution vs ground truth" in out
    # The history's first sync sends days-old events: the summary says how many went as backfill, and why.
    [(backfill,)] = query(demo, "select count(*) from klaviyo_outbox where status = 'delivered' and backfill")
    assert backfill > 0 and f"{backfill:,} of the " in out and "without firing flows" in out
    assert not re.search(r"\b1 (events|requests|files)\b", out)

    # `upstack trace` on a demo shopper whose cart only Upstack could name: every link from landing line to answer.
    [(email, event_id, source_file, line, method, evidence, request_id)] = query(demo, """
        select email, event_id, source_file, line_number, match_method, evidence_event_id, request_id
        from shopper_journey where event_name = 'AddToCart' and outbox_status = 'delivered' and not klaviyo_native
        order by event_time limit 1""")
    story = upstack("trace", email, env=environment(demo))
    assert story.returncode == 0, story.stderr
    told = story.stdout
    assert f"Trace of {email}: found as an email" in told and f"email {email}" in told
    assert re.search(rf"<-> email {re.escape(email)}\n +first seen .* via event \S+ \(\S+ line \d+\)", told)
    block = told.split(f"AddToCart {event_id}", 1)[1].split("\n  20", 1)[0]  # that event, up to the next one
    assert f"landed:    {source_file} line {line}" in block
    assert f"resolved:  {email} by {method}, evidence {evidence}" in block
    assert "decision:  outbox, delivered: Klaviyo accepted it" in block and "payload:   Added to Cart" in block
    assert f"request:   {request_id}: HTTP 202" in block
    assert upstack("trace", "nobody@nowhere.org", env=environment(demo)).returncode == 1


def test_sync_records_its_run_in_the_dagster_instance_at_dagster_home(settings, tmp_path):
    write_events(settings.events_dir / "a.ndjson", [make_event("e1")])
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home)

    completed = upstack("sync", env=environment(settings, DAGSTER_HOME=str(home)))

    assert completed.returncode == 0, completed.stderr
    assert str(home) in completed.stdout
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert [(run.job_name, run.status) for run in runs] == [("upstack_sync", dg.DagsterRunStatus.SUCCESS)]
        materialization = instance.get_latest_materialization_event(dg.AssetKey("raw_events"))
        assert materialization.asset_materialization.metadata["rows_ingested"].value == 1


def test_sync_that_cannot_write_the_warehouse_fails_with_a_message_and_exit_status(settings):
    settings.warehouse_path.mkdir()  # a folder where the DuckDB file should be
    write_events(settings.events_dir / "a.ndjson", [make_event("e1")])

    completed = upstack("sync", env=environment(settings))

    assert completed.returncode == 1
    assert "FAILED" in completed.stdout and "step ingestion failed" in completed.stdout


def test_concurrent_syncs_both_succeed_without_losing_or_doubling_rows(settings):
    for hour in range(20):
        write_events(settings.events_dir / f"h{hour:02d}.ndjson.gz",
                     [make_event(f"e{hour}-{n}") for n in range(2_000)])
    env = environment(settings)

    processes = [subprocess.Popen([sys.executable, "-m", "dagster_project.cli", "sync"], env=env, cwd=PROJECT_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]

    assert [process.returncode for process in processes] == [0, 0], [out for pair in outputs for out in pair]
    assert "conflicting lock" not in "".join(out + err for out, err in outputs).lower()
    ingested = [count(r"raw_events +([\d,]+) new rows", out) for out, _ in outputs]
    assert sorted(ingested) == [0, 40_000] or sum(ingested) == 40_000
    assert query(settings, "select count(*), count(distinct event_id) from raw_events") == [(40_000, 40_000)]
    assert query(settings, "select count(*) from ingested_files") == [(20,)]


def kill_a_sync_after_batches(settings: Settings, env: dict[str, str], batches: int) -> None:
    """Lands 12,000 events in 12 files and runs `upstack sync`, one file per transaction, which SIGKILLs itself
    right after committing its `batches`-th batch (the test hook in upstack_pipeline/faults.py)."""
    for hour in range(12):
        write_events(settings.events_dir / f"h{hour:02d}.ndjson.gz",
                     [make_event(f"e{hour}-{n}") for n in range(1_000)])
    killed = upstack("sync", env={**env, "UPSTACK_INGEST_BATCH_BYTES": "1",
                                  "UPSTACK_TEST_STOP_AFTER": f"events-batch:{batches}"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    # Exactly the committed batches, the first files in path order, and nothing of the batch after them.
    assert query(settings, "select list(path order by path), sum(ingested_rows) from ingested_files") == [
        ([f"events/h{hour:02d}.ndjson.gz" for hour in range(batches)], 1_000 * batches)]
    assert query(settings, "select count(*) from raw_events") == [(1_000 * batches,)]


@pytest.mark.parametrize("batches", [1, 2, 11])
def test_a_sync_killed_while_writing_then_rerun_loses_nothing_and_doubles_nothing(settings, batches):
    env = environment(settings)
    kill_a_sync_after_batches(settings, env, batches)

    rerun = upstack("sync", env=env)

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert count(r"raw_events .* from ([\d,]+) files?", rerun.stdout) == 12 - batches
    assert query(settings, "select count(*), count(distinct event_id) from raw_events") == [(12_000, 12_000)]
    assert query(settings, "select count(*), sum(ingested_rows) from ingested_files") == [(12, 12_000)]


def test_a_sync_killed_with_dagster_home_set_does_not_block_the_next_one(settings, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home)
    env = environment(settings, DAGSTER_HOME=str(home))
    kill_a_sync_after_batches(settings, env, batches=1)

    rerun = upstack("sync", env=env, timeout=120)

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert query(settings, "select count(*) from raw_events") == [(12_000,)]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        statuses = sorted(run.status.value for run in instance.get_runs())
        assert statuses == ["FAILURE", "SUCCESS"]


KEY = "pk_cli_test_emulator_only_000"


def test_sync_delivers_to_klaviyo_and_never_shows_the_key(settings, tmp_path):
    from upstack_pipeline.sandbox.klaviyo_emulator import KlaviyoEmulator

    write_events(settings.events_dir / "a.ndjson", [klaviyo_click()])
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home)
    with KlaviyoEmulator(api_key=KEY) as emulator:
        env = environment(settings, KLAVIYO_API_KEY=KEY, KLAVIYO_BASE_URL=emulator.base_url, DAGSTER_HOME=str(home))
        completed = upstack("sync", env=env)
        accepted = emulator.accepted_by_metric()

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert accepted == {"Viewed Product from Upstack": 1}
    assert KEY not in completed.stdout + completed.stderr
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_runs()[0]
        # Every event the run logged (its materializations' metadata among them), not only the materializations.
        entries = instance.all_logs(run.run_id)
        assert any(entry.dagster_event_type == dg.DagsterEventType.ASSET_MATERIALIZATION for entry in entries)
        assert KEY not in json.dumps([str(entry) for entry in entries])
        assert KEY not in json.dumps(run.run_config) + json.dumps(run.tags)
    assert KEY not in json.dumps(query(settings, "select * from klaviyo_deliveries"), default=str)


def test_a_rejected_key_fails_the_sync_with_what_to_do(settings):
    from upstack_pipeline.sandbox.klaviyo_emulator import KlaviyoEmulator

    write_events(settings.events_dir / "a.ndjson", [klaviyo_click()])
    with KlaviyoEmulator(api_key="pk_some_other_key_0000000") as emulator:
        completed = upstack("sync", env=environment(settings, KLAVIYO_API_KEY=KEY, KLAVIYO_BASE_URL=emulator.base_url))

    assert completed.returncode == 1
    assert "destination_healthy" in completed.stdout and "Set KLAVIYO_API_KEY" in completed.stdout
    assert query(settings, "select status from klaviyo_outbox") == [("pending",)]


def test_check_key_says_yes_or_no_per_scope_without_printing_the_key(settings):
    from upstack_pipeline.sandbox.klaviyo_emulator import KlaviyoEmulator

    with KlaviyoEmulator(api_key=KEY, scopes=frozenset({"events:write", "profiles:write"})) as emulator:
        env = environment(settings, KLAVIYO_API_KEY=KEY, KLAVIYO_BASE_URL=emulator.base_url)
        without_list = upstack("klaviyo", "check-key", env=env)
        with_list = upstack("klaviyo", "check-key", env={**env, "KLAVIYO_LIST_ID": "L1"})

    assert without_list.returncode == 0
    assert re.search(r"events:write +yes", without_list.stdout) and re.search(r"profiles:write +yes",
                                                                               without_list.stdout)
    assert with_list.returncode == 1 and re.search(r"lists:write +NO", with_list.stdout)
    assert KEY not in without_list.stdout + with_list.stdout + without_list.stderr + with_list.stderr


def test_the_product_leaves_the_sandbox_alone():
    """The pipeline and the `upstack` command start without the simulator, evaluation or the emulator; only the
    sandbox imports the sandbox."""
    import ast

    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, dagster_project.cli, dagster_project.definitions; "
                               "print(sorted(name for name in sys.modules if 'sandbox' in name))"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, check=True).stdout
    assert loaded.strip() == "[]"

    package = PROJECT_ROOT / "upstack_pipeline"
    for path in package.rglob("*.py"):
        if "sandbox" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any("sandbox" in name for name in names), f"{path} imports the sandbox"


def test_without_the_emulator_extra_the_commands_that_need_it_say_what_to_install(settings, tmp_path):
    """Klaviyo's SDK models are blocked from import, as on an install without the `emulator` extra."""
    blocked = ("import sys; sys.modules['openapi_client'] = None; from dagster_project.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    for command in (["klaviyo-emulator"], ["demo", "--dir", str(tmp_path / "demo")]):
        completed = subprocess.run([sys.executable, "-c", blocked, *command], env=environment(settings),
                                   capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
        assert completed.returncode == 2, completed.stderr
        assert re.fullmatch(rf"upstack {command[0]}: the local Klaviyo emulator validates with Klaviyo's SDK "
                            r"\(klaviyo-api\): install the project's `emulator` extra, e.g\. pip install -e "
                            r"'\.\[emulator\]'\n", completed.stderr), completed.stderr
    assert not (tmp_path / "demo").exists()  # refused before it wrote anything


def test_sql_answers_from_the_analysts_copy_while_the_warehouse_is_held_and_says_what_to_do(settings):
    env = environment(settings)
    missing = upstack("sql", "select 1", env=env)
    assert missing.returncode == 2 and "run `upstack sync`" in missing.stderr

    write_events(settings.events_dir / "a.ndjson", [make_event("e1")])
    assert upstack("sync", env=env).returncode == 0
    import duckdb

    with duckdb.connect(str(settings.warehouse_path)):  # a notebook holding the warehouse for writing
        answered = upstack("sql", "select metric, abandoned_sessions from daily_lift", env=env, timeout=60)
    assert answered.returncode == 0, answered.stderr
    assert "Added to Cart" in answered.stdout and "abandoned_sessions" in answered.stdout

    wrong = upstack("sql", "select nothing from nowhere", env=env)
    assert wrong.returncode == 2 and "nowhere" in wrong.stderr and "README" in wrong.stderr
    whole = upstack("sql", "--warehouse", "select count(*) as events from raw_events", env=env)
    assert whole.returncode == 0 and "events" in whole.stdout

    # Every example query of the README runs with what the project installs.
    examples = re.findall(r"^\.venv/bin/upstack (sql .+)$", README.read_text(), flags=re.MULTILINE)
    assert len(examples) >= 5
    for example in examples:
        ran = upstack(*shlex.split(example), env=env)
        assert ran.returncode == 0, (example, ran.stderr)

    page = settings.landing_dir.parent / "report" / "week.html"
    written = upstack("report", "--days", "7", str(page), env=env)
    assert written.returncode == 0 and str(page) in written.stdout
    assert "<svg" in page.read_text() or "data:image/svg+xml" in page.read_text()
