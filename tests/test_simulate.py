"""The simulator is the yardstick for identity resolution, so its files must be exactly what it claims.

Real files in tmp_path, no mocks. A few small runs (hundreds of visitors) keep the module fast.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from upstack_pipeline.simulate import SimulationSummary, simulate

END = datetime(2026, 11, 28, 12, tzinfo=timezone.utc)
DAYS = 3
VISITORS = 600
SEED = 7
SHOP = "acme.myshopify.com"
EVENT_PATH = re.compile(r"^events/dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/part-0000\.ndjson\.gz$")
ALLOWED_DOMAINS = {"gmail.com", "yahoo.com", "icloud.com", "outlook.com", "hotmail.com", "proton.me"}
COMMERCE = {"ViewContent", "AddToCart", "InitiateCheckout", "Purchase"}
SCENARIOS = ("normal", "shared_tablet", "forwarded_email", "in_app_handoff", "cookie_reset", "placeholder_email",
             "staff_test", "shared_ad_link")

# ---------------------------------------------------------------------------------------------------------------
# A small checker for raw-event.schema.json (required fields, types, lengths, date-time) plus the time sanity
# rule of SPEC 3.1 (far-future times are bad lines). Every optional property in the schema is nullable.
# ---------------------------------------------------------------------------------------------------------------

REQUIRED = ("event_id", "event_name", "event_time", "shop", "anonymous_id", "session_id")
TOP_LEVEL = {"event_id": "string", "event_name": "string", "event_time": "string", "shop": "string",
             "anonymous_id": "string", "session_id": "string", "event_source_url": "string?",
             "referrer": "string?", "user_data": "object?", "custom_data": "object?", "consent": "object?"}
USER_DATA = {name: "string?" for name in (
    "email", "phone", "em", "ph", "external_id", "first_name", "last_name", "city", "region", "zip", "country",
    "kx", "fbp", "fbc", "gclid", "ttclid", "msclkid", "client_ip_address", "client_user_agent")}
USER_DATA["klaviyo_identified"] = "boolean?"
CUSTOM_DATA = {"value": "number?", "currency": "string?", "order_id": "string?", "checkout_url": "string?",
               "discount_codes": "array?", "search_term": "string?", "items": "array?"}
ITEM = {"id": "string?", "name": "string?", "price": "number?", "quantity": "number?", "sku": "string?",
        "variant": "string?", "brand": "string?", "category": "string?", "url": "string?", "image_url": "string?"}
CONSENT = {"analytics": "boolean?", "marketing": "boolean?", "sale_of_data": "boolean?"}
LENGTHS = {"event_id": (1, 200), "event_name": (1, 100), "shop": (1, None), "anonymous_id": (1, None),
           "session_id": (1, None)}


def _has_type(value: object, kind: str) -> bool:
    if kind.endswith("?"):
        if value is None:
            return True
        kind = kind[:-1]
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "array": list, "object": dict}[kind])


def _check_properties(obj: dict, spec: dict, path: str) -> list[str]:
    return [f"type:{path}{name}" for name, kind in spec.items() if name in obj and not _has_type(obj[name], kind)]


def contract_problems(line: str, end: datetime) -> list[str]:
    """Empty list when the line is a valid raw event; otherwise the reasons, e.g. ["missing:event_id"]."""
    try:
        event = json.loads(line)
    except ValueError:
        return ["not_json"]
    if not isinstance(event, dict):
        return ["not_object"]
    problems = [f"missing:{name}" for name in REQUIRED if name not in event]
    problems += _check_properties(event, TOP_LEVEL, "")
    for name, (low, high) in LENGTHS.items():
        value = event.get(name)
        if isinstance(value, str) and (len(value) < low or (high is not None and len(value) > high)):
            problems.append(f"length:{name}")
    for name, spec in (("user_data", USER_DATA), ("custom_data", CUSTOM_DATA), ("consent", CONSENT)):
        if isinstance(event.get(name), dict):
            problems += _check_properties(event[name], spec, f"{name}.")
    custom = event.get("custom_data") if isinstance(event.get("custom_data"), dict) else {}
    for item in custom.get("items") or []:
        problems += ["type:custom_data.items[]"] if not isinstance(item, dict) else \
            _check_properties(item, ITEM, "custom_data.items[].")
    for code in custom.get("discount_codes") or []:
        if not isinstance(code, str):
            problems.append("type:custom_data.discount_codes[]")
    if isinstance(event.get("event_time"), str):
        moment = parse_time(event["event_time"])
        if moment is None:
            problems.append("time:unparseable")
        elif moment > end + timedelta(days=1):
            problems.append("time:future")
    return problems


def parse_time(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if "T" in text and moment.tzinfo is not None else None


# The reason a checker reports for each kind of broken line the simulator promises.
BAD_KIND_REASONS = {
    "truncated": lambda reasons: "not_json" in reasons,
    "array": lambda reasons: "not_object" in reasons,
    "missing_field": lambda reasons: any(r.startswith("missing:") for r in reasons),
    "wrong_type": lambda reasons: any(r.startswith("type:") for r in reasons),
    "bad_time": lambda reasons: "time:unparseable" in reasons,
    "future_time": lambda reasons: "time:future" in reasons,
    "empty_name": lambda reasons: "length:event_name" in reasons,
}

# ---------------------------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------------------------


class Run:
    """Everything one simulation wrote, parsed once."""

    def __init__(self, summary: SimulationSummary) -> None:
        self.summary = summary
        self.root = summary.out_dir
        self.event_files = sorted(p for p in (self.root / "events").rglob("*") if p.is_file())
        self.lines: list[tuple[Path, str]] = []
        for path in self.event_files:
            text = gzip.decompress(path.read_bytes()).decode("utf-8")
            assert text.endswith("\n")
            self.lines += [(path, line) for line in text[:-1].split("\n")]
        self.bad: list[tuple[Path, str, list[str]]] = []
        self.valid: dict[str, dict] = {}  # event_id -> event, first occurrence
        self.valid_line: dict[str, tuple[Path, str]] = {}
        self.duplicates: list[tuple[Path, str, str]] = []  # (file, line, event_id)
        for path, line in self.lines:
            problems = contract_problems(line, END)
            if problems:
                self.bad.append((path, line, problems))
                continue
            event = json.loads(line)
            if event["event_id"] in self.valid:
                self.duplicates.append((path, line, event["event_id"]))
            else:
                self.valid[event["event_id"]] = event
                self.valid_line[event["event_id"]] = (path, line)
        self.truth = read_csv(self.root / "truth" / "events.csv")
        self.people = read_csv(self.root / "truth" / "people.csv")
        self.customers = read_csv(self.root / "customers" / "customers.csv")
        self.person = {row["person_id"]: row for row in self.people}

    def rows(self, scenario: str) -> list[tuple[dict, dict]]:
        return [(self.valid[row["event_id"]], row) for row in self.truth if row["scenario"] == scenario]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle))


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("sim") / "landing"
    return Run(simulate(out, visitors=VISITORS, days=DAYS, seed=SEED, end=END, shop=SHOP))


# ---------------------------------------------------------------------------------------------------------------
# Determinism and layout
# ---------------------------------------------------------------------------------------------------------------


def test_same_arguments_give_identical_bytes(run: Run, tmp_path: Path) -> None:
    again = simulate(tmp_path / "again", visitors=VISITORS, days=DAYS, seed=SEED, end=END, shop=SHOP)
    first, second = all_files(run.root), all_files(again.out_dir)
    assert list(first) == list(second)
    for name in first:
        assert first[name] == second[name], name
    assert again == SimulationSummary(**{**run.summary.__dict__, "out_dir": again.out_dir})


def test_different_seed_gives_different_traffic(run: Run, tmp_path: Path) -> None:
    other = simulate(tmp_path / "other", visitors=VISITORS, days=DAYS, seed=SEED + 1, end=END, shop=SHOP)
    first, second = all_files(run.root), all_files(other.out_dir)
    assert first["truth/events.csv"] != second["truth/events.csv"]
    assert first["truth/people.csv"] != second["truth/people.csv"]
    shared = [name for name in first if name.startswith("events/") and name in second]
    assert shared and all(first[name] != second[name] for name in shared)


def test_layout_is_one_atomic_gzip_file_per_hour(run: Run) -> None:
    start = END - timedelta(days=DAYS)
    assert run.event_files, "no event files"
    assert len(run.event_files) == run.summary.event_files
    assert not [p for p in run.root.rglob(".*")], "temporary files left behind"
    hours = set()
    for path in run.event_files:
        match = EVENT_PATH.match(path.relative_to(run.root).as_posix())
        assert match, path
        hour = datetime.fromisoformat(f"{match[1]}T{match[2]}:00+00:00")
        assert start <= hour < END
        hours.add(hour)
        assert path.read_bytes()[4:8] == b"\0\0\0\0", "gzip mtime must be 0 for deterministic output"
    assert len(hours) == len(run.event_files)
    assert len(hours) >= DAYS * 24 - 6  # traffic in (nearly) every hour
    assert csv_header(run.root / "truth" / "events.csv") == [
        "event_id", "person_id", "email", "browser_id", "session_id", "scenario"]
    assert csv_header(run.root / "truth" / "people.csv") == [
        "person_id", "email", "phone", "customer_id", "kx", "household_id"]
    assert csv_header(run.root / "customers" / "customers.csv") == [
        "customer_id", "email", "phone", "first_name", "last_name", "city", "region", "country",
        "accepts_marketing"]


# ---------------------------------------------------------------------------------------------------------------
# The contract, the noise and the counts
# ---------------------------------------------------------------------------------------------------------------


def test_every_line_is_a_valid_event_or_a_deliberate_bad_line(run: Run) -> None:
    assert len(run.lines) == run.summary.event_lines
    assert len(run.bad) == run.summary.bad_lines
    assert len(run.valid) == run.summary.events
    assert len(run.valid) + len(run.duplicates) + len(run.bad) == len(run.lines)
    assert 0.0005 < len(run.bad) / len(run.lines) < 0.006


def test_each_kind_of_bad_line_is_present(run: Run) -> None:
    for kind, matches in BAD_KIND_REASONS.items():
        assert any(matches(reasons) for _, _, reasons in run.bad), f"no bad line of kind {kind}"
    truth_ids = {row["event_id"] for row in run.truth}
    for _, line, _ in run.bad:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("event_id"), str):
            assert event["event_id"] not in truth_ids, "a bad line must not be in the truth"


def test_duplicates_are_exact_resends(run: Run) -> None:
    assert run.duplicates, "expected pixel retries"
    assert len(run.duplicates) == run.summary.duplicate_lines
    assert 0.003 < len(run.duplicates) / len(run.valid) < 0.03
    later_file = 0
    for path, line, event_id in run.duplicates:
        first_path, first_line = run.valid_line[event_id]
        assert line == first_line
        later_file += path != first_path
    assert later_file >= 1, "some retries should arrive in the next hour's file"
    counts = Counter(event_id for _, _, event_id in run.duplicates)
    assert max(counts.values()) == 1


def test_valid_events_fall_in_the_window_and_in_their_hour(run: Run) -> None:
    """Duplicates may arrive in a later hour; their originals must sit in the hour of their event_time."""
    start = END - timedelta(days=DAYS)
    offsets = Counter()
    for event_id, event in run.valid.items():
        moment = parse_time(event["event_time"])
        assert start <= moment < END, event["event_time"]
        path, _ = run.valid_line[event_id]
        assert path.parent.name == f"hour={moment.astimezone(timezone.utc):%H}"
        assert path.parent.parent.name == f"dt={moment.astimezone(timezone.utc):%Y-%m-%d}"
        assert event["shop"] == SHOP
        offsets[event["event_time"][-6:] if not event["event_time"].endswith("Z") else "Z"] += 1
    assert offsets["Z"] and offsets["+00:00"] and len(offsets) >= 4, offsets


def test_truth_covers_every_valid_event_exactly_once(run: Run) -> None:
    ids = [row["event_id"] for row in run.truth]
    assert len(ids) == len(set(ids)) == run.summary.events
    assert set(ids) == set(run.valid)
    for row in run.truth:
        person = run.person[row["person_id"]]
        assert row["email"] == person["email"]
        assert row["scenario"] in SCENARIOS
        event = run.valid[row["event_id"]]
        assert event["session_id"] == row["session_id"]


def test_summary_counts_match_files(run: Run) -> None:
    summary = run.summary
    assert summary.people == len(run.people) == VISITORS
    assert summary.customers == len(run.customers)
    assert summary.event_lines == summary.events + summary.duplicate_lines + summary.bad_lines


# ---------------------------------------------------------------------------------------------------------------
# Realism
# ---------------------------------------------------------------------------------------------------------------


def test_people_and_customers_look_real(run: Run) -> None:
    emails = [row["email"] for row in run.people]
    assert len(set(emails)) == len(emails)
    assert {email.split("@")[1] for email in emails} <= ALLOWED_DOMAINS
    phones = [row["phone"] for row in run.people if row["phone"]]
    assert len(phones) > 0.7 * len(emails)
    assert all(re.fullmatch(r"\+1\d{10}", phone) for phone in phones)
    assert len({row["kx"] for row in run.people}) == len(emails)
    assert 0.25 < len(run.customers) / len(run.people) < 0.45
    account = {row["customer_id"]: row for row in run.people if row["customer_id"]}
    for customer in run.customers:
        assert account[customer["customer_id"]]["email"] == customer["email"]
        assert customer["accepts_marketing"] in ("true", "false")


def test_identity_signals_are_well_formed(run: Run) -> None:
    typed = [e["user_data"] for e in run.valid.values() if "@" in (e["user_data"].get("email") or "")]
    assert typed
    for user in typed:
        assert user["em"] == hashlib.sha256(user["email"].strip().lower().encode()).hexdigest()
    assert any(u["email"] != u["email"].strip() for u in typed), "some emails are typed with spaces"
    assert any(u["email"] != u["email"].lower() for u in typed), "some emails are typed with capitals"
    names = Counter(e["event_name"] for e in run.valid.values())
    for name in ("PageView", "ViewContent", "AddToCart", "InitiateCheckout", "AddShippingInfo", "AddPaymentInfo",
                 "Purchase", "Identify"):
        assert names[name], name
    assert names["ViewContent"] > names["AddToCart"] > names["InitiateCheckout"] > names["Purchase"]
    purchases = [e for e in run.valid.values() if e["event_name"] == "Purchase"]
    assert all(e["custom_data"]["order_id"] and e["custom_data"]["items"] for e in purchases)
    logged_in = [e for e in run.valid.values() if e["user_data"].get("external_id")]
    assert logged_in and {e["user_data"]["external_id"] for e in logged_in} <= {
        row["customer_id"] for row in run.customers}
    for event in run.valid.values():
        url = event["event_source_url"] or ""
        if "_kx=" in url:
            assert event["user_data"]["kx"] == re.search(r"_kx=([^&]+)", url)[1]
        if "fbclid=" in url:
            assert event["user_data"]["fbc"].endswith("." + re.search(r"fbclid=([^&]+)", url)[1])


def test_every_scenario_appears(run: Run) -> None:
    seen = Counter(row["scenario"] for row in run.truth)
    for scenario in SCENARIOS:
        assert seen[scenario] > 0, f"scenario {scenario} missing"
    assert seen["normal"] > 0.8 * len(run.truth)


def test_adversarial_scenarios_behave_as_named(run: Run) -> None:
    tablet_people, tablet_emails = defaultdict(set), defaultdict(set)
    for event, row in run.rows("shared_tablet"):
        tablet_people[row["browser_id"]].add(row["person_id"])
        if event["user_data"].get("email"):
            tablet_emails[row["browser_id"]].add(event["user_data"]["email"].strip().lower())
    assert any(len(people) >= 2 and len(tablet_emails[b]) >= 2 for b, people in tablet_people.items())

    forwarded = [(e, r) for e, r in run.rows("forwarded_email") if e["user_data"].get("kx")]
    assert forwarded and all(e["user_data"]["kx"] != run.person[r["person_id"]]["kx"] for e, r in forwarded)

    handoff = defaultdict(set)
    for event, row in run.rows("in_app_handoff"):
        click = re.search(r"(?:fbclid|ttclid)=([^&]+)", event["event_source_url"] or "")
        if click:
            handoff[click[1]].add((row["person_id"], row["browser_id"]))
    assert any(len(pairs) == 2 and len({p for p, _ in pairs}) == 1 for pairs in handoff.values())

    shared = defaultdict(set)
    for event, row in run.rows("shared_ad_link"):
        shared[event["user_data"].get("gclid")].add(row["person_id"])
    assert any(click and len(people) == 2 for click, people in shared.items())

    placeholders = {e["user_data"].get("email") for e, _ in run.rows("placeholder_email")
                    if e["event_name"] == "Identify"}
    assert placeholders & {"test@test.com", "undefined", "", "none@none.com"}

    staff = [e for e, _ in run.rows("staff_test") if e["user_data"].get("email")]
    assert staff and all(e["user_data"]["email"].strip().lower() == f"support@{SHOP}" for e in staff)

    anonymous = defaultdict(set)
    for row in run.truth:
        anonymous[row["browser_id"]].add(run.valid[row["event_id"]]["anonymous_id"])
    reset_browsers = {row["browser_id"] for row in run.truth if row["scenario"] == "cookie_reset"}
    assert reset_browsers and all(len(anonymous[b]) >= 2 for b in reset_browsers)


def test_klaviyo_native_identification_is_partial(run: Run) -> None:
    commerce = [e for e in run.valid.values() if e["event_name"] in COMMERCE]
    identified = sum(1 for e in commerce if e["user_data"].get("klaviyo_identified") is True)
    assert 0.10 < identified / len(commerce) < 0.80
    assert any(e["consent"]["marketing"] is False for e in run.valid.values()), "some shoppers decline marketing"


# ---------------------------------------------------------------------------------------------------------------
# Guards
# ---------------------------------------------------------------------------------------------------------------


def test_refuses_an_events_folder_that_already_has_files(run: Run, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already contains files"):
        simulate(run.root, visitors=20, days=1, seed=1, end=END)
    landing = tmp_path / "landing"
    (landing / "events" / "dt=2026-01-01").mkdir(parents=True)
    (landing / "events" / "dt=2026-01-01" / "old.ndjson").write_text("{}\n")
    with pytest.raises(ValueError, match="already contains files"):
        simulate(landing, visitors=20, days=1, seed=1, end=END)
    (landing / "events" / "dt=2026-01-01" / "old.ndjson").unlink()  # empty folders are fine
    summary = simulate(landing, visitors=20, days=1, seed=1, end=END)
    assert summary.events > 0 and summary.people == 20


def test_rejects_a_naive_end_and_empty_worlds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        simulate(tmp_path / "a", visitors=10, days=1, seed=1, end=datetime(2026, 11, 28))
    with pytest.raises(ValueError):
        simulate(tmp_path / "b", visitors=0, days=1, seed=1, end=END)
    with pytest.raises(ValueError):
        simulate(tmp_path / "c", visitors=10, days=0, seed=1, end=END)


def test_tiny_runs_and_non_utc_end_work(tmp_path: Path) -> None:
    eastern = timezone(timedelta(hours=-5))
    summary = simulate(tmp_path / "tiny", visitors=1, days=1, seed=3, end=datetime(2026, 11, 28, 7, tzinfo=eastern))
    assert summary.people == 1 and summary.events >= 1
    assert summary.event_lines == summary.events + summary.duplicate_lines + summary.bad_lines
