"""The one place that reads the environment.

Everything else (the Dagster resources, the command line, the tests) receives a `Settings` object, so a run is
fully described by one value and tests never need to patch `os.environ`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

import duckdb

from upstack_pipeline.klaviyo.client import REQUESTS_PER_MINUTE, REQUESTS_PER_SECOND, REVISION, KlaviyoClient
from upstack_pipeline.klaviyo.limits import MAX_METRIC_NAME_CHARS
from upstack_pipeline.warehouse import Warehouse

KLAVIYO_PRODUCTION_URL = "https://a.klaviyo.com"

# Never identifiers (SPEC 4): exact addresses, "@domain" for a whole domain, "local@" for a local part at any
# domain. The shop's own domain is always blocked as well. UPSTACK_BLOCKED_EMAILS adds entries (comma-separated).
DEFAULT_BLOCKED_EMAILS = (
    "test@test.com", "@example.com", "@example.org", "@example.net", "@test.com", "@mailinator.com",
    "test@", "none@", "noemail@", "no-reply@", "noreply@", "donotreply@", "support@", "admin@", "postmaster@",
)


@dataclass(frozen=True)
class IdentitySettings:
    """The guards of identity resolution (the README's "Identity resolution"); precision comes first."""

    # A browser cluster or click id seen with more distinct emails than this is a shared device: it links no
    # email through its history (an email typed in the same session still counts).
    max_emails_per_browser: int = 2
    # Browsers joined by click ids and shared sessions form a cluster; a cluster larger than this is flagged and
    # left unmerged, since real people rarely hand one click across more browsers.
    max_browsers_per_cluster: int = 4
    # An ad click id seen on two browsers within this window is one person switching browser (in-app -> Safari).
    click_handoff_window: timedelta = timedelta(minutes=30)
    # How long an email, login or Klaviyo click (_kx) seen on a browser keeps naming its later sessions: as long
    # as the pixel's server-set cookie can live (browsers cap any cookie at 400 days). Outliving Klaviyo's own
    # 7-day Safari cookie is the product's edge; what ends a tie is a conflicting identity or the shared-device
    # rule, not age (a 30-day window was measured to lose returning shoppers and buy no precision).
    cookie_lifetime: timedelta = timedelta(days=400)
    # Supernodes (the README's "Identity resolution"): an email, phone, customer id or _kx seen on more browsers
    # (cookies) within `supernode_window` than one person identifies on (a phone, a computer, a tablet) is not one
    # person's: a placeholder whatever its spelling (asdf@asdf.com), a front-desk phone, a _kx posted to a group.
    # It is quarantined, never used again, and whatever it named is resolved again. A season rather than a month:
    # a placeholder that a few strangers a month type adds up past a person's browsers within it, and a person's
    # browsers over a season (new devices, cleared cookies aside) are still the same few. Measured in the README.
    max_browsers_per_identifier: int = 3
    supernode_window: timedelta = timedelta(days=90)
    blocked_emails: tuple[str, ...] = DEFAULT_BLOCKED_EMAILS
    # Same IP and user agent within minutes after a cookie reset: probabilistic, so off unless asked for, and
    # its matches carry their own match_method so delivery can leave them out.
    probabilistic_matching: bool = False
    probabilistic_window: timedelta = timedelta(minutes=10)


PIXEL_TO_KLAVIYO_METRIC = {
    "ViewContent": "Viewed Product",
    "AddToCart": "Added to Cart",
    "InitiateCheckout": "Started Checkout",
    "Purchase": "Placed Order",
}
# Each Placed Order also becomes one event per order line, as Klaviyo's own Shopify integration records them.
ORDER_LINE_METRIC = "Ordered Product"


@dataclass(frozen=True)
class DestinationSettings:
    """How resolved events go to one Klaviyo account (SPEC 5). Environment: UPSTACK_SEND_MODE, ..."""

    # backup: only events Klaviyo could not identify natively (the backup flows' audience); all: every one.
    send_mode: str = "backup"
    # "{metric}" is Klaviyo's standard name (Added to Cart, ...): the default keeps ours apart from Klaviyo's own.
    metric_name_template: str = "{metric} from Upstack"
    enabled_events: tuple[str, ...] = tuple(PIXEL_TO_KLAVIYO_METRIC)
    # create_profiles: send events for people Klaviyo may not have yet (it creates the profile); with it off,
    # only people identified through Klaviyo's own _kx are sent. update_profiles: send names and location too;
    # with it off, the profile carries its identifier and our upstack_* properties only.
    create_profiles: bool = True
    update_profiles: bool = True
    list_id: str | None = None
    # consent.marketing == false is never sent.
    respect_consent: bool = True
    # Older events are still recorded, with Klaviyo's backfill flag, so they do not fire flows long after the fact.
    max_event_age: timedelta = timedelta(hours=24)
    # A session's events wait until it has been idle this long: an email typed later in the session (which
    # Klaviyo then sees natively) can still veto a backup send.
    hold_back: timedelta = timedelta(minutes=30)
    # Delivery health: an outbox row still pending after this long means delivery is stuck; more than this share
    # of a run's events refused by Klaviyo means the mapping or the account needs a look.
    max_pending_age: timedelta = timedelta(hours=2)
    max_dead_letter_share: float = 0.01

    def __post_init__(self):
        checked_send_mode(self.send_mode)
        checked_metric_template(self.metric_name_template)
        checked_enabled_events(self.enabled_events)

    @property
    def metric_names(self) -> dict[str, str]:
        """Our Klaviyo metric per standard one, e.g. 'Added to Cart' -> 'Added to Cart from Upstack'."""
        return metric_names(self.metric_name_template)


def metric_names(template: str) -> dict[str, str]:
    standard = [*PIXEL_TO_KLAVIYO_METRIC.values(), ORDER_LINE_METRIC]
    return {name: template.replace("{metric}", name) for name in standard}


@dataclass(frozen=True)
class AlertSettings:
    """When the analytics checks warn (README "Alerts"): each says what to look at."""

    # Of the events Klaviyo answered for in the last day, at least this share accepted.
    min_delivery_success: float = 0.95
    # A storefront that sent no commerce event for this long has lost its pixel (or its landing folder).
    max_quiet_time: timedelta = timedelta(hours=6)
    # Yesterday's lift below the trailing week's by more than this share of it...
    max_lift_drop: float = 0.5
    # ...judged only when the trailing week's lift, applied to yesterday's natively identified abandoned carts,
    # expects at least this many sessions only Upstack reached: a count is Poisson-like, so fewer expected and
    # yesterday's count falls by half by chance (10 expected: about 3 days in 100).
    min_expected_sessions_to_judge_lift: int = 10


@dataclass(frozen=True)
class Settings:
    landing_dir: Path = Path("data/landing")
    warehouse_path: Path = Path("data/warehouse.duckdb")
    # How long opening the warehouse waits for another process (a notebook, a second sync) to let go of the file.
    warehouse_lock_wait: timedelta = timedelta(minutes=10)
    # What DuckDB may hold in memory ('4GB'), and where it spills the rest: a backfill's peak is then set by these
    # and the batch size, not by the history. None: DuckDB's defaults (80% of RAM; `<warehouse>.tmp`).
    duckdb_memory_limit: str | None = None
    duckdb_temp_directory: Path | None = None
    klaviyo_base_url: str = KLAVIYO_PRODUCTION_URL
    # The API revision the payloads are written for, and Klaviyo's rate limits per account: settings so that an
    # emulator or a test can narrow them, not knobs to turn against Klaviyo's own API.
    klaviyo_revision: str = REVISION
    klaviyo_requests_per_second: int = REQUESTS_PER_SECOND
    klaviyo_requests_per_minute: int = REQUESTS_PER_MINUTE
    # Where Dagster keeps run history; None = `upstack sync` runs against a throwaway in-memory instance.
    dagster_home: Path | None = None
    # repr=False: a Settings object may end up in a log line or a traceback; the key must not.
    klaviyo_api_key: str | None = field(default=None, repr=False)
    # Events stamped further ahead of the ingestion clock than this are quarantined as `future_time`:
    # a pixel on a device with a wrong clock must not schedule flows days ahead.
    max_clock_skew: timedelta = timedelta(days=1)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    destination: DestinationSettings = field(default_factory=DestinationSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    # Landing files are ingested in transactions of about this many bytes on disk, bounding memory on backfills.
    # Large enough that a backfill's batch holds well over four row groups of lines (about 800,000 lines of
    # pixel events in 128 MiB of gzip): DuckDB 2.0 writes an insert's rows on every core only once about four row
    # groups of them (491,520 rows) are pending, and below that builds and compresses them on one thread at the
    # insert's end. Measured on 1.87 million lines: 64 MiB batches held 400,000-460,000 lines each and took 22.3-
    # 23.5 s to ingest; 128 MiB ones 18.6-18.8 s, at a peak of 3.7 GB instead of 2.2 GB.
    ingest_batch_bytes: int = 128 * 1024 * 1024
    # Identity resolves the new loads in transactions of about this many ingested rows (whole loads, at least one
    # each): a backfill's identity memory is then set by this and duckdb_memory_limit, not by the backfill's size.
    identity_chunk_rows: int = 1_000_000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            landing_dir=Path(env.get("UPSTACK_LANDING_DIR") or defaults.landing_dir),
            warehouse_path=Path(env.get("UPSTACK_WAREHOUSE") or defaults.warehouse_path),
            klaviyo_base_url=checked_base_url(env.get("KLAVIYO_BASE_URL") or defaults.klaviyo_base_url),
            klaviyo_api_key=env.get("KLAVIYO_API_KEY") or None,
            dagster_home=Path(env["DAGSTER_HOME"]) if env.get("DAGSTER_HOME") else None,
            ingest_batch_bytes=_positive_int(env, "UPSTACK_INGEST_BATCH_BYTES", defaults.ingest_batch_bytes,
                                             unit="bytes"),
            identity_chunk_rows=_positive_int(env, "UPSTACK_IDENTITY_CHUNK_ROWS", defaults.identity_chunk_rows,
                                              unit="rows"),
            duckdb_memory_limit=checked_memory_limit(env.get("UPSTACK_DUCKDB_MEMORY_LIMIT") or None),
            duckdb_temp_directory=Path(env["UPSTACK_DUCKDB_TEMP_DIR"]) if env.get("UPSTACK_DUCKDB_TEMP_DIR") else None,
            identity=replace(
                defaults.identity,
                blocked_emails=defaults.identity.blocked_emails + tuple(
                    entry.strip().lower() for entry in env.get("UPSTACK_BLOCKED_EMAILS", "").split(",")
                    if entry.strip()
                ),
                probabilistic_matching=_flag(env, "UPSTACK_PROBABILISTIC_MATCHING", False),
                cookie_lifetime=_days(env, "UPSTACK_COOKIE_LIFETIME_DAYS", defaults.identity.cookie_lifetime),
                max_emails_per_browser=_positive_int(env, "UPSTACK_MAX_EMAILS_PER_BROWSER",
                                                     defaults.identity.max_emails_per_browser, unit="emails"),
                max_browsers_per_identifier=_positive_int(env, "UPSTACK_MAX_BROWSERS_PER_IDENTIFIER",
                                                          defaults.identity.max_browsers_per_identifier,
                                                          unit="browsers"),
                supernode_window=_days(env, "UPSTACK_SUPERNODE_WINDOW_DAYS", defaults.identity.supernode_window),
            ),
            destination=DestinationSettings(
                send_mode=env.get("UPSTACK_SEND_MODE") or defaults.destination.send_mode,
                metric_name_template=env.get("UPSTACK_METRIC_TEMPLATE") or defaults.destination.metric_name_template,
                enabled_events=tuple(name.strip() for name in env["UPSTACK_ENABLED_EVENTS"].split(",") if name.strip())
                if env.get("UPSTACK_ENABLED_EVENTS") else defaults.destination.enabled_events,
                create_profiles=_flag(env, "UPSTACK_CREATE_PROFILES", defaults.destination.create_profiles),
                update_profiles=_flag(env, "UPSTACK_UPDATE_PROFILES", defaults.destination.update_profiles),
                list_id=env.get("KLAVIYO_LIST_ID") or None,
                respect_consent=_flag(env, "UPSTACK_RESPECT_CONSENT", defaults.destination.respect_consent),
            ),
            alerts=AlertSettings(
                min_delivery_success=_share(env, "UPSTACK_ALERT_MIN_DELIVERY_SUCCESS",
                                            defaults.alerts.min_delivery_success),
                max_quiet_time=timedelta(hours=_positive_int(env, "UPSTACK_ALERT_QUIET_HOURS",
                                                             int(defaults.alerts.max_quiet_time / timedelta(hours=1)),
                                                             unit="hours")),
                max_lift_drop=_share(env, "UPSTACK_ALERT_MAX_LIFT_DROP", defaults.alerts.max_lift_drop),
            ),
        )

    @property
    def events_dir(self) -> Path:
        return self.landing_dir / "events"

    @property
    def customers_dir(self) -> Path:
        return self.landing_dir / "customers"

    def warehouse(self) -> Warehouse:
        return Warehouse(self.warehouse_path, lock_timeout_seconds=self.warehouse_lock_wait.total_seconds(),
                         memory_limit=self.duckdb_memory_limit, temp_directory=self.duckdb_temp_directory)

    def klaviyo_client(self, **options) -> KlaviyoClient:
        """A client for the configured account; `options` are KlaviyoClient's (attempts, timeouts)."""
        return KlaviyoClient(self.klaviyo_base_url, self.klaviyo_api_key, revision=self.klaviyo_revision,
                             per_second=self.klaviyo_requests_per_second,
                             per_minute=self.klaviyo_requests_per_minute, **options)

    def with_paths(self, *, landing_dir: Path | None = None, warehouse_path: Path | None = None) -> "Settings":
        return replace(
            self,
            landing_dir=landing_dir or self.landing_dir,
            warehouse_path=warehouse_path or self.warehouse_path,
        )


# The checks below take the value and the name to blame, so that the environment and the shops file
# (upstack_pipeline.shops) refuse a value by the same rules, each naming where the value came from.

def checked_send_mode(value: str, name: str = "UPSTACK_SEND_MODE") -> str:
    if value not in ("backup", "all"):
        raise ValueError(f"{name} must be 'backup' or 'all' (got {value!r})")
    return value


def checked_enabled_events(events: tuple[str, ...], name: str = "UPSTACK_ENABLED_EVENTS") -> tuple[str, ...]:
    unknown = set(events) - set(PIXEL_TO_KLAVIYO_METRIC)
    if unknown:
        raise ValueError(f"{name} has events we do not map: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(PIXEL_TO_KLAVIYO_METRIC)})")
    return events


def checked_metric_template(template: str, name: str = "UPSTACK_METRIC_TEMPLATE") -> str:
    """Refused at start-up, in one line, rather than met later as events Klaviyo refuses or flows that mix ours
    with Shopify's: the name goes to Klaviyo as data, so any character is fine, but not any name."""
    def refuse(problem: str) -> ValueError:
        return ValueError(f"{name} {problem} (got {template!r}; the default is '{{metric}} from Upstack')")

    if "{metric}" not in template:
        raise refuse("must contain {metric}, the place of Klaviyo's standard name")
    if any(not character.isprintable() for character in template):
        raise refuse("must be one line of printable characters")
    names = metric_names(template)
    too_long = [metric for metric in names.values() if len(metric) > MAX_METRIC_NAME_CHARS]
    if too_long:
        raise refuse(f"gives a metric name of {len(max(too_long, key=len))} characters; Klaviyo takes fewer than "
                     f"{MAX_METRIC_NAME_CHARS + 1}")
    # Substituting into one template keeps five distinct standard names distinct; what is left to refuse is a
    # name that is one of Klaviyo's own.
    standard = [metric for metric, ours in names.items() if ours.strip() == metric]
    if standard:
        raise refuse(f"gives {standard[0]!r}, the name of a metric Klaviyo's own tracking and Shopify integration "
                     "record: flow filters could not tell ours from theirs; add words around {metric}")
    return template


def checked_memory_limit(raw: str | None) -> str | None:
    """DuckDB's own reading of the value, tried at start-up: a typo is named here, not met by the first step."""
    if raw is None:
        return None
    try:
        duckdb.connect(config={"memory_limit": raw.strip()}).close()
    except duckdb.Error as error:
        raise ValueError(f"UPSTACK_DUCKDB_MEMORY_LIMIT must be an amount of memory such as 4GB or 512MB (got "
                         f"{raw!r}: {error})") from None
    return raw.strip()


def checked_base_url(raw: str, name: str = "KLAVIYO_BASE_URL") -> str:
    """A mistyped address is named at start-up, not met later as a connection error that blames the network."""
    try:
        parts = urlsplit(raw.strip())
        parts.port  # reading the port is what checks it
    except ValueError as error:
        raise ValueError(f"{name} is not a URL ({error}): got {raw!r}; Klaviyo's is "
                         f"{KLAVIYO_PRODUCTION_URL}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name} must start with https:// (or http:// for a local emulator) and name a "
                         f"host: got {raw!r}; Klaviyo's is {KLAVIYO_PRODUCTION_URL}")
    return raw.strip().rstrip("/")


def checked_positive_int(raw: str | None, name: str, default: int, *, unit: str) -> int:
    """`raw` as the whole number it spells; `default` when it is empty."""
    if not raw:
        return default
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a whole number of {unit}, e.g. {default} (got {raw!r})")
    return int(raw)


def checked_share(raw: str | None, name: str, default: float) -> float:
    if not raw:
        return default
    try:
        share = float(raw)
    except ValueError:
        share = -1.0
    if not 0 <= share <= 1:
        raise ValueError(f"{name} must be a share between 0 and 1, e.g. {default} (got {raw!r})")
    return share


def checked_flag(raw: str | None, name: str, default: bool) -> bool:
    raw = (raw or "").strip().lower()
    if not raw:
        return default
    if raw not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"{name} must be true or false (got {raw!r})")
    return raw in ("1", "true", "yes")


def _positive_int(env: Mapping[str, str], name: str, default: int, *, unit: str) -> int:
    return checked_positive_int(env.get(name), name, default, unit=unit)


def _share(env: Mapping[str, str], name: str, default: float) -> float:
    return checked_share(env.get(name), name, default)


def _days(env: Mapping[str, str], name: str, default: timedelta) -> timedelta:
    return timedelta(days=_positive_int(env, name, default.days, unit="days"))


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    return checked_flag(env.get(name), name, default)
