"""bench/statements.py (where a small increment's time goes) names each statement by its SQL file and step, and puts
the warehouse blocks a sync read down to the right columns; and it still runs end to end, so it cannot rot."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "bench"))
import scale  # noqa: E402  (bench/ is scripts, not a package)
import statements  # noqa: E402

STEPS = ["ingestion", "identity_resolution", "klaviyo_mapping", "klaviyo_delivery", "analytics"]


def test_a_string_of_statements_is_timed_one_statement_at_a_time_and_named_by_its_sql_file():
    log = statements.StatementLog({statements.normalized("select 42 as answer"): "answer.sql #2"})
    connection = statements.TimedConnection(duckdb.connect(), log)
    connection.execute("create table t as select range as n from range(5); -- a comment\n"
                       "insert into t values (5)")
    assert connection.execute("select count(*) from t").fetchone() == (6,)
    assert connection.cursor().execute("select ?::int + 1", [1]).fetchone() == (2,)
    assert connection.execute("-- the file's comment\nselect 42\n  as answer;").fetchone() == (42,)
    assert connection.execute("set threads = 1; select $n * 2", {"n": 21}).fetchone() == (42,)
    connection.close()

    assert [row["text"] for row in log.rows] == [
        "create table t as select range as n from range(5)", "insert into t values (5)", "select count(*) from t",
        "select ?::int + 1", "select 42 as answer", "set threads = 1", "select $n * 2",
        "(closing a connection: the checkpoint, if it is the warehouse's last)"]
    assert log.rows[4]["source"] == "answer.sql #2"
    # Sent from this test, not from one of the pipeline's steps.
    assert {row["step"] for row in log.rows} == {"(outside the steps)"}


def test_each_statement_of_the_sql_files_is_known_by_its_file_and_place():
    named = statements.sql_file_statements()
    verdicts = duckdb.extract_statements((PROJECT_ROOT / "sql" / "line_verdicts.sql").read_text())
    assert named[statements.normalized(verdicts[0].query)] == "line_verdicts.sql #1"
    resolved = duckdb.extract_statements((PROJECT_ROOT / "sql" / "resolved_events.sql").read_text())
    assert named[statements.normalized(resolved[-1].query)] == f"resolved_events.sql #{len(resolved)}"


def test_the_blocks_a_sync_read_are_put_down_to_the_columns_that_held_them(tmp_path):
    warehouse = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(warehouse)) as connection:
        connection.execute("create table wide as select md5(range::varchar) || md5((range + 1)::varchar) as key, "
                           "range as n from range(200000)")
        connection.execute("checkpoint")
    layout = statements.block_owners(warehouse)
    key_blocks = sorted(block for block, owners in layout["owners"].items() if owners == {"wide.key"})
    assert len(key_blocks) > 2 and layout["block_size"] == 262144

    offset = statements.DUCKDB_HEADER_BYTES + key_blocks[1] * layout["block_size"]
    trace = "\n".join([  # one thread's, as `strace -ff -y -e trace=pread64` writes it
        f'pread64(7<{warehouse}>, "\\1\\2"..., 262144, {offset}) = 262144',
        f'pread64(8<{tmp_path}/other.duckdb>, "\\1\\2"..., 262144, {offset}) = 262144',  # not the warehouse
        f'pread64(7<{warehouse}>, "\\1\\2"..., 4096, 0) = 4096',  # its header: no block
        f'pread64(7<{warehouse}>, "\\1\\2"..., 524288, {offset}) = 524288',  # two blocks in one read
    ])
    blocks = statements.blocks_read(trace, "warehouse.duckdb", layout["block_size"])
    assert blocks == [key_blocks[1], key_blocks[1], key_blocks[1] + 1]
    assert statements.reads_by_column(blocks[:1], layout["owners"], layout["block_size"]) == {"wide.key": 0.25}
    assert statements.reads_by_column([10**6], layout["owners"], layout["block_size"]) == {
        statements.NOT_A_SEGMENT: 0.25}


@pytest.mark.slow  # a simulated world and five whole syncs in processes of their own
def test_twenty_new_lines_show_what_a_run_with_something_new_pays_in_each_version_compared(tmp_path):
    scale.simulation(tmp_path, people=300, days=3, seed=14)
    other = tmp_path / "other-checkout"  # the same code elsewhere: run from there through PYTHONPATH
    for folder in ("upstack_pipeline", "dagster_project", "sql", "schemas"):
        shutil.copytree(PROJECT_ROOT / folder, other / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "pyproject.toml", other)  # Dagster finds its project by it
    completed = subprocess.run([sys.executable, "bench/statements.py", "--dir", str(tmp_path), "--trials", "1",
                                "--increment-lines", "20", "--top", "1000", "--against", str(other)],
                               capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    ours, theirs = completed.stdout.split(f"trials) ({other}):")
    assert f"trials) ({PROJECT_ROOT}):" in ours
    # The other checkout's syncs ran its own modules: their statements are put down to its steps too.
    assert re.search(r"^\| `identity_resolution` \| [1-9]\d* / [1-9]\d* \|", theirs, re.MULTILINE), theirs
    comparison = re.findall(r"^\| (\S+) \| (\d+\.\d{3}) \| (\d+\.\d{3}) \| (-?\d+\.\d{3}) \|", theirs, re.MULTILINE)
    assert [label for label, *_ in comparison] == [str(PROJECT_ROOT), str(other)], theirs
    assert all(float(increment) > 0 and float(nothing) > 0 for _, increment, nothing, _ in comparison)
    # Same code, so one snapshot serves both.
    assert len(list((tmp_path / "statements").glob("full-*/warehouse.duckdb"))) == 1
    rows = {match.group(1): match.group(2).split(" | ")
            for match in re.finditer(r"^\| `([^`]+)` \| (.*) \|$", ours, re.MULTILINE)}
    assert set(STEPS) <= set(rows), completed.stdout
    counts = {step: [int(count) for count in rows[step][0].split(" / ")] for step in STEPS}
    # Identity runs its SQL for 20 new lines, and stops after its fingerprint check with nothing new.
    assert counts["identity_resolution"][0] > counts["identity_resolution"][1] > 0, counts
    added = re.findall(r"^\| (-?\d+\.\d{3}) \| \d+\.\d{3} \| \d+\.\d{3} \| `([^`]+)` \| ([^|]*) \|",
                       ours, re.MULTILINE)
    assert len(added) > 100, completed.stdout  # every statement either sync ran
    assert any(source.strip() == "line_verdicts.sql #1" and step == "ingestion" for _, step, source in added), added
