"""The identity SQL files hand their results on in temp tables that no schema names, so each file's header says what
it reads and what it leaves (the convention is in the docstring of upstack_pipeline/identity.py). A header that
drifts from its SQL misleads whoever next reorders or changes a step, so every header is held to its SQL and to a
real run, step by step: three hourly runs over a warehouse the project's own ingestion builds, no mocks.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace
from datetime import timedelta

import duckdb
import pytest

from conftest import NOW, make_event, write_events
from upstack_pipeline.customers import ingest_customers
from upstack_pipeline.events import ingest_events
from upstack_pipeline.identity import LABEL_STEP, STEPS, resolve_identities
from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import read_sql

KEYS = ("Reads", "Variables", "Writes", "Leaves")
VERBS = {"Reads": "reads", "Variables": "reads the variable", "Writes": "writes", "Leaves": "leaves"}
# The kinds a key may list; "table" is a warehouse table or view, named bare.
ALLOWED = {"Reads": {"table", "temp", "macro"}, "Variables": {"variable"}, "Writes": {"table", "temp"},
           "Leaves": {"temp", "macro", "variable"}}
Item = tuple[str, str]  # (name, kind)
Header = dict[str, frozenset[Item]]

# ------------------------------------------------------------------------------------------- the header convention

HEADER_LINE = re.compile(r"-- (Reads|Variables|Writes|Leaves): (.+)")
CONTINUATION = re.compile(r"--   +(\S.*)")
ITEM = re.compile(r"(\w+)(?: \((temp|macro|variable)\))?")


def parse_header(sql: str) -> Header:
    """The header lines that end the file's first comment block; ValueError says what is malformed."""
    block = list(itertools.takewhile(lambda line: line.startswith("--"), sql.splitlines()))
    start = next((n for n, line in enumerate(block) if HEADER_LINE.fullmatch(line)), None)
    if start is None:
        raise ValueError("no header: its first comment block has no '-- Reads:', '-- Leaves:', ... line")
    texts: dict[str, str] = {}
    for line in block[start:]:
        if match := HEADER_LINE.fullmatch(line):
            key = match[1]
            if key in texts or any(KEYS.index(key) < KEYS.index(seen) for seen in texts):
                raise ValueError(f"{key} line repeated or out of order (the order is {', '.join(KEYS)})")
            texts[key] = match[2]
        elif match := CONTINUATION.fullmatch(line):
            texts[key] += " " + match[1]
        else:
            raise ValueError(f"the header must end the first comment block, not be followed by {line!r}")
    header = {}
    for key in KEYS:
        items = set()
        for text in filter(None, (part.strip() for part in texts.get(key, "").split(","))):
            match = ITEM.fullmatch(text)
            kind = match and (match[2] or ("variable" if key == "Variables" else "table"))
            if not match or kind not in ALLOWED[key] or (key == "Variables" and match[2]):
                raise ValueError(f"{key}: {text!r} is not one of {', '.join(sorted(ALLOWED[key]))}, written "
                                 "'name' (a table, view or, on the Variables line, a variable) or 'name (kind)'")
            items.add((match[1], kind))
        header[key] = frozenset(items)
    return header


# ----------------------------------------------------------------------------------- what the SQL does, by reading it

@dataclass(frozen=True)
class Names:
    """What a real run had: the names the SQL is matched against, so an alias or a CTE is never taken for a table."""

    relations: frozenset[str]  # warehouse tables and views
    temp_tables: frozenset[str]
    macros: frozenset[str]


NO_NAMES = Names(frozenset(), frozenset(), frozenset())
LITERAL_OR_COMMENT = re.compile(r"'(?:[^']|'')*'|--[^\n]*")


def what_the_sql_does(sql: str, names: Names) -> Header:
    """What the SQL reads, writes and creates, read off its statements: enough for these files, not a SQL parser."""
    with_literals = LITERAL_OR_COMMENT.sub(lambda m: m[0] if m[0].startswith("'") else " ", sql).lower()
    code = LITERAL_OR_COMMENT.sub(lambda m: "''" if m[0].startswith("'") else " ", sql).lower()

    def word_before(position: int) -> str:
        return (code[:position].split() or [""])[-1]

    variables_set = set(re.findall(r"\bset\s+variable\s+(\w+)", code))
    created = {(name, "temp" if what == "table" else "macro") for what, name in re.findall(
        r"\bcreate\s+(?:or\s+replace\s+)?temp(?:orary)?\s+(table|macro)\s+(\w+)", code)}
    own = {name for name, _ in created}
    ctes = set(re.findall(r"(?:\bwith|,)\s*(\w+)\s+as\s*\(", code))

    reads = set()
    for match in re.finditer(r"\b(from|join)\s+(\w+)(?!\w|\s*[.(])", code):
        name = match[2]
        if (match[1] == "from" and word_before(match.start()) in ("delete", "distinct")) or name in own | ctes:
            continue
        if name in names.temp_tables:
            reads.add((name, "temp"))
        elif name in names.relations:
            reads.add((name, "table"))
    reads |= {(name, "macro") for name in names.macros - own if re.search(rf"\b{name}\s*\(", code)}

    writes = set()
    for match in re.finditer(r"\b(insert\s+(?:or\s+replace\s+)?into|update|delete\s+from)\s+(\w+)", code):
        name = match[2]
        if (match[1] == "update" and word_before(match.start()) == "do") or name in own:
            continue
        writes.add((name, "temp" if name in names.temp_tables else "table"))

    return {
        "Reads": frozenset(reads),
        "Variables": frozenset((name, "variable") for name in
                               set(re.findall(r"\bgetvariable\(\s*'(\w+)'\s*\)", with_literals)) - variables_set),
        "Writes": frozenset(writes),
        "Leaves": frozenset(created | {(name, "variable") for name in variables_set}),
    }


def header_problems(steps: list[tuple[str, str]], names: Names, initial_variables: set[str]) -> list[str]:
    """What is wrong with the headers of `steps` (name, SQL), run in that order: empty when each header states exactly
    what its SQL does, and a step needs only what the run starts with or an earlier step left."""
    problems = []
    left: set[Item] = {(name, "variable") for name in initial_variables}
    for step, sql in steps:
        try:
            header = parse_header(sql)
        except ValueError as error:
            problems.append(f"{step}: {error}")
            continue
        does = what_the_sql_does(sql, names)
        for key in KEYS:
            problems += [f"{step} {VERBS[key]} {name} ({kind}), which its {key} line leaves out"
                         for name, kind in sorted(does[key] - header[key])]
            problems += [f"{step}: its {key} line names {name} ({kind}), which its SQL never {VERBS[key]}"
                         for name, kind in sorted(header[key] - does[key])]
        needed = {item for item in header["Reads"] | header["Writes"] if item[1] != "table"} | header["Variables"]
        problems += [f"{step} needs {name} ({kind}), which no earlier step leaves"
                     for name, kind in sorted(needed - left)]
        problems += [f"{step} leaves {name} ({kind}), which an earlier step already left"
                     for name, kind in sorted(header["Leaves"] & left)]
        left |= header["Leaves"]
    return problems


# --------------------------------------------------------------------------------- what a step did, in a real run

@dataclass(frozen=True)
class Snapshot:
    """The connection's state between two steps; tables as (rows, sum of row hashes), so a change shows."""

    tables: dict[str, tuple]
    views: frozenset[str]
    temp_tables: dict[str, tuple]
    macros: frozenset[str]
    variables: frozenset[str]


def snapshot(connection: duckdb.DuckDBPyConnection) -> Snapshot:
    tables, temp_tables = {}, {}
    for database, schema, name, temporary in connection.execute("""
            select database_name, schema_name, table_name, temporary from duckdb_tables()
            where temporary or database_name = current_database()""").fetchall():
        fingerprint = connection.execute(
            f'select count(*), sum(hash(fingerprinted)) from "{database}"."{schema}"."{name}" as fingerprinted'
        ).fetchone()
        (temp_tables if temporary else tables)[name] = fingerprint
    views = connection.execute(
        "select view_name from duckdb_views() where not internal and database_name = current_database()").fetchall()
    macros = connection.execute("select function_name from duckdb_functions() "
                                "where database_name = 'temp' and function_type in ('macro', 'table_macro')").fetchall()
    variables = connection.execute("select name from duckdb_variables()").fetchall()
    return Snapshot(tables, frozenset(row[0] for row in views), temp_tables,
                    frozenset(row[0] for row in macros), frozenset(row[0] for row in variables))


@dataclass(frozen=True)
class Run:
    before: Snapshot  # before the first step; the connection is new, so it has no temp tables or macros yet
    after: list[tuple[str, Snapshot]]  # after each step, in order


def changed(before: dict[str, tuple], after: dict[str, tuple]) -> set[str]:
    return {name for name in before if name in after and after[name] != before[name]}


def run_problems(run: Run, headers: dict[str, Header]) -> list[str]:
    """What a real run did that the headers do not say: temp tables, macros or variables a step left or did not
    leave, something a step needed that was not there yet, a table a step changed without saying it writes it."""
    problems = []
    before = run.before
    for step, after in run.after:
        header = headers[step]

        def declared(key: str, kind: str) -> set[str]:
            return {name for name, item_kind in header[key] if item_kind == kind}

        for kind, was, now in (("temp", set(before.temp_tables), set(after.temp_tables)),
                               ("macro", before.macros, after.macros),
                               ("variable", before.variables, after.variables)):
            problems += [f"{step} left {name} ({kind}), which its Leaves line leaves out"
                         for name in sorted(now - was - declared("Leaves", kind))]
            problems += [f"{step}: its Leaves line names {name} ({kind}), which the run did not leave"
                         for name in sorted(declared("Leaves", kind) - (now - was))]
        for kind, there in (("temp", set(before.temp_tables)), ("macro", before.macros)):
            problems += [f"{step} needs {name} ({kind}), which was not there before it ran"
                         for name in sorted((declared("Reads", kind) | declared("Writes", kind)) - there)]
        problems += [f"{step} reads the variable {name}, which was not set before it ran"
                     for name in sorted(declared("Variables", "variable") - before.variables)]
        problems += [f"{step} changed {name} ({kind}), which its Writes line leaves out"
                     for kind, was, now in (("table", before.tables, after.tables),
                                            ("temp", before.temp_tables, after.temp_tables))
                     for name in sorted(changed(was, now) - declared("Writes", kind))]
        before = after
    return problems


# ------------------------------------------------------------------------------------------------------ the world

BASE = (NOW - timedelta(days=10)).replace(second=0, microsecond=0)
SHOP_URL = "https://acme.myshopify.com"


def ev(event_id: str, name: str, day: float, cookie: str, session: str, user: dict | None = None,
       url: str = SHOP_URL + "/products/mug") -> dict:
    return make_event(event_id, event_name=name, event_time=(BASE + timedelta(days=day)).isoformat(),
                      anonymous_id=cookie, session_id=session, event_source_url=url,
                      user_data={"klaviyo_identified": False, **(user or {})})


def minutes(n: float) -> float:
    return n / 1440


# Every step has something to do: each writes every table its header names in one of the runs (a test checks).
FIRST_HOUR = [
    # A laptop where Jane types her email and phone and logs in.
    ev("jane-view", "ViewContent", 0, "jane-laptop", "j1"),
    ev("jane-checkout", "InitiateCheckout", minutes(5), "jane-laptop", "j1",
       {"email": "jane@gmail.com", "phone": "(212) 555-0101", "external_id": "cust-1"}),
    # Her ad click, handed from Instagram's in-app browser to Safari: one browser cluster.
    ev("ig-view", "ViewContent", 1, "jane-instagram", "ig1", {"email": "jane@gmail.com"},
       url=f"{SHOP_URL}/?fbclid=IwAR-handoff"),
    ev("safari-cart", "AddToCart", 1 + minutes(4), "jane-safari", "sf1", url=f"{SHOP_URL}/?fbclid=IwAR-handoff"),
    # One click id opened on three browsers: a shared link.
    *[ev(f"group-{n}", "AddToCart", 2 + minutes(n), f"group-{n}", f"g{n}", url=f"{SHOP_URL}/?gclid=POSTED")
      for n in range(3)],
    # A forwarded link on two browsers that each carry their own email: not joined.
    ev("ann-view", "ViewContent", 3, "ann-laptop", "an1", {"email": "ann@gmail.com"},
       url=f"{SHOP_URL}/?ttclid=FORWARDED"),
    ev("bob-view", "ViewContent", 3 + minutes(5), "bob-phone", "bo1", {"email": "bob@yahoo.com"},
       url=f"{SHOP_URL}/?ttclid=FORWARDED"),
    # A family Mac without an email, one session with Alice's phone and one click with Carl's tablet: not merged.
    ev("alice-view", "ViewContent", 4, "alice-phone", "shared-session", {"email": "alice@gmail.com"}),
    ev("mac-view", "ViewContent", 4 + minutes(1), "family-mac", "shared-session"),
    ev("mac-click", "ViewContent", 4 + minutes(30), "family-mac", "m2", url=f"{SHOP_URL}/?msclkid=BRIDGE"),
    ev("carl-cart", "AddToCart", 4 + minutes(33), "carl-tablet", "c1", {"email": "carl@gmail.com"},
       url=f"{SHOP_URL}/?msclkid=BRIDGE"),
    # A tablet with three typists: a shared device.
    ev("mum", "InitiateCheckout", 5, "tablet", "t1", {"email": "mum@gmail.com"}),
    ev("teen", "InitiateCheckout", 5 + minutes(60), "tablet", "t2", {"email": "teen@gmail.com"}),
    ev("dad", "InitiateCheckout", 6, "tablet", "t3", {"email": "dad@gmail.com"}),
    ev("tablet-cart", "AddToCart", 7, "tablet", "t4"),
    # A made-up address on three browsers (as many as one person may use), and a malformed one.
    *[ev(f"asdf-{n}", "AddToCart", 8 + minutes(n), f"typist-{n}", f"ty{n}", {"email": "asdf@asdf.com"})
      for n in range(3)],
    ev("typo", "ViewContent", 8 + minutes(10), "typo", "typo", {"email": "not an email"}),
    # A Klaviyo email click, and a login whose email only the customers export gives.
    ev("kx-view", "ViewContent", 9, "kx-phone", "k1", url=f"{SHOP_URL}/?_kx=KX-ZOE"),
    ev("kx-cart", "AddToCart", 9 + minutes(1), "kx-phone", "k1"),
    ev("lena-cart", "AddToCart", 9 + minutes(30), "lena-laptop", "l1", {"external_id": "cust-2"}),
]
CUSTOMERS = "customer_id,email,first_name,city\ncust-2,Lena.Ruiz@Gmail.com,Lena,Austin\n"
SECOND_HOUR = [
    # The made-up address on a fourth browser: quarantined, and the person it anchored taken back.
    ev("asdf-3", "AddToCart", 9 + minutes(40), "typist-3", "ty3", {"email": "asdf@asdf.com"}),
    ev("jane-back", "AddToCart", 9 + minutes(50), "jane-safari", "sf2"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Run]:
    """Three hourly runs (the first sync, an hour with new events, an hour with none), watched step by step."""
    root = tmp_path_factory.mktemp("identity_steps")
    settings = Settings(landing_dir=root / "landing", warehouse_path=root / "warehouse.duckdb")
    settings.events_dir.mkdir(parents=True)
    settings.customers_dir.mkdir(parents=True)
    (settings.customers_dir / "customers.csv").write_text(CUSTOMERS)
    runs = []
    for hour, events in enumerate((FIRST_HOUR, SECOND_HOUR, [])):
        now = NOW + timedelta(hours=hour)
        if events:
            write_events(settings.events_dir / f"hour-{hour}.ndjson", events)
        ingest_events(settings, now=now)
        ingest_customers(settings, now=now)
        with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
            start = replace(snapshot(connection), temp_tables={}, macros=frozenset(), variables=frozenset())
        after: list[tuple[str, Snapshot]] = []
        resolve_identities(settings, now=now, after_step=lambda connection, step: after.append(
            (step, snapshot(connection))))
        # The variables resolve_identities sets before the first step: those there after it, but for any its SQL sets.
        first_step, first = after[0]
        set_by_first = {name for name, kind in what_the_sql_does(read_sql(first_step), NO_NAMES)["Leaves"]
                        if kind == "variable"}
        runs.append(Run(replace(start, variables=first.variables - set_by_first), after))
    return runs


@pytest.fixture(scope="module")
def names(runs: list[Run]) -> Names:
    last = [run.after[-1][1] for run in runs]
    return Names(relations=frozenset(last[0].tables) | last[0].views,
                 temp_tables=frozenset().union(*(snapshot.temp_tables for snapshot in last)),
                 macros=frozenset().union(*(snapshot.macros for snapshot in last)))


@pytest.fixture(scope="module")
def initial_variables(runs: list[Run]) -> set[str]:
    return set(runs[0].before.variables)


def real_steps() -> list[tuple[str, str]]:
    return [(step, read_sql(step)) for step in STEPS]


# ------------------------------------------------------------------------------------------------------- the tests

def test_every_step_is_run_once_in_the_declared_order_the_label_step_once_converged(runs):
    for run in runs:
        assert [step for step, _ in run.after] == list(STEPS)
    assert STEPS.count(LABEL_STEP) == 1


def test_every_header_states_exactly_what_its_sql_reads_writes_and_leaves_in_an_order_that_works(
        names, initial_variables):
    assert header_problems(real_steps(), names, initial_variables) == []


def test_every_step_of_a_real_run_leaves_needs_and_changes_only_what_its_header_says(runs):
    headers = {step: parse_header(sql) for step, sql in real_steps()}
    for run in runs:
        assert run_problems(run, headers) == []


def test_every_table_a_header_says_its_step_writes_is_written_by_it_in_one_of_the_runs(runs):
    """Otherwise the run above would check a Writes line against a step that had nothing to do."""
    for step, sql in real_steps():
        written = set()
        for run in runs:
            befores = [run.before] + [snapshot for _, snapshot in run.after]
            for (done, after), before in zip(run.after, befores):
                if done == step:
                    written |= {(name, "table") for name in changed(before.tables, after.tables)}
                    written |= {(name, "temp") for name in changed(before.temp_tables, after.temp_tables)}
        assert written == parse_header(sql)["Writes"], step


# A wrong header fails: each case alters one real file's text (never the file) and names the problem it must cause.
ALTERED = [
    ("browser_links", "-- Reads: raw_events, identity_links, new_observations (temp)",
     "-- Reads: raw_events, identity_links",
     "browser_links reads new_observations (temp), which its Reads line leaves out"),
    ("identities", "-- Leaves: touched_anchors (temp), anchor_links (temp)",
     "-- Leaves: touched_anchors (temp), anchor_links (temp), people (temp)",
     "identities: its Leaves line names people (temp), which its SQL never leaves"),
    ("browser_clusters", "-- Variables: probabilistic_matching, now",
     "-- Variables: max_browsers_per_cluster, probabilistic_matching, now",
     "browser_clusters: its Variables line names max_browsers_per_cluster (variable), which its SQL never reads "
     "the variable"),
    ("identity_links", "-- Writes: identity_links\n", "",
     "identity_links writes identity_links (table), which its Writes line leaves out"),
    ("email_translations", "-- Leaves: retranslated (temp), translation_changes (temp), linked_cookie_emails (temp)",
     "-- Leaves: retranslated, translation_changes (temp), linked_cookie_emails (temp)",
     "email_translations: Leaves: 'retranslated' is not one of macro, temp, variable"),
    ("resolved_events", "-- Variables: after_load_id,", "-- variables: after_load_id,",
     "resolved_events: the header must end the first comment block"),
]


@pytest.mark.parametrize(("step", "old", "new", "problem"), ALTERED, ids=[case[0] for case in ALTERED])
def test_a_header_that_does_not_match_its_sql_fails(names, initial_variables, step, old, new, problem):
    steps = real_steps()
    position = STEPS.index(step)
    name, sql = steps[position]
    assert sql.count(old) == 1
    steps[position] = (name, sql.replace(old, new))
    assert any(found.startswith(problem) for found in header_problems(steps, names, initial_variables)), problem


def test_a_step_moved_before_the_step_that_leaves_what_it_reads_fails(names, initial_variables):
    steps = real_steps()
    finish, resolved = STEPS.index("browser_clusters_finish"), STEPS.index("resolved_events")
    steps[finish], steps[resolved] = steps[resolved], steps[finish]
    assert "resolved_events needs reclustered_cookies (temp), which no earlier step leaves" in header_problems(
        steps, names, initial_variables)


def test_a_run_that_changes_a_table_its_header_does_not_name_fails(runs):
    headers = {step: parse_header(sql) for step, sql in real_steps()}
    headers["identity_links"] = {**headers["identity_links"], "Writes": frozenset()}
    headers["resolved_events"] = {**headers["resolved_events"],
                                  "Leaves": headers["resolved_events"]["Leaves"] - {("targets", "temp")}}
    problems = run_problems(runs[0], headers)
    assert "identity_links changed identity_links (table), which its Writes line leaves out" in problems
    assert "resolved_events left targets (temp), which its Leaves line leaves out" in problems
