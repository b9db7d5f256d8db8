"""The backup flows a merchant builds in Klaviyo, as a guide rendered from the settings that decide them.

The guide lives in code, not only in the README, because its facts are the pipeline's: the metric names come from
UPSTACK_METRIC_TEMPLATE, the waits from the hold-back, and the UTM convention is what the recovered-revenue SQL
will match in the pixel's landing URLs. The README's section is this rendering with default settings (a test
keeps them equal) and `upstack klaviyo flows` prints it for the configured ones.

What the guide says about Klaviyo's interface (profile filters checked at entry and before every email, "zero
times since starting this flow", Received Email filtered by Flow, Smart Sending's 16-hour default, per-message UTM
parameters) follows Klaviyo's help centre and integrators' setup guides; where an option's exact label is uncertain
it is described, not quoted.
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass
from datetime import timedelta

from upstack_pipeline.settings import PIXEL_TO_KLAVIYO_METRIC, DestinationSettings

# UTM convention of the backup flows' links. Recovered revenue is to be counted from the pixel's landing URLs
# (`event_source_url`): a session that lands with utm_campaign starting with BACKUP_UTM_CAMPAIGN_PREFIX came from a
# backup email. Source and medium are the values Klaviyo's own defaults give email, lower-cased, so the store's
# analytics still file these visits under email; the campaign is what tells a backup email from a native one.
UTM_SOURCE = "klaviyo"
UTM_MEDIUM = "email"
# Hyphens only: `_` and `%` are LIKE wildcards, so SQL can match `utm_campaign LIKE prefix || '%'` unescaped.
BACKUP_UTM_CAMPAIGN_PREFIX = "upstack-backup-"

# The longest a session's events wait for the next run once the hold-back has passed: the hourly_sync schedule
# (dagster_project/defs/sync.py; a test keeps the two equal). The landing sensor often runs sooner.
SYNC_INTERVAL = timedelta(hours=1)

# How far back the waterfall looks for the native flow's email: longer than an abandonment series usually runs,
# so a shopper the native flow reached gets none of the backup's emails, not only its first.
WATERFALL_DAYS = 7

# The metric that starts each native flow in a Shopify store, by Klaviyo's standard name (the `{metric}` of
# UPSTACK_METRIC_TEMPLATE). Shopify's integration calls the checkout event Checkout Started.
NATIVE_METRIC = {
    "Viewed Product": "Viewed Product",
    "Added to Cart": "Added to Cart",
    "Started Checkout": "Checkout Started",
    "Placed Order": "Placed Order",
}
# Recorded by Klaviyo's own onsite script (a gear icon in Klaviyo's metric list), not by Shopify: named as Klaviyo's.
KLAVIYO_ONSITE_METRICS = ("Viewed Product",)


@dataclass(frozen=True)
class BackupFlow:
    native_flow: str
    # Klaviyo's standard name of the trigger; ours is DestinationSettings.metric_names[metric].
    metric: str
    # What the shopper does next that hands them to a later flow (each exits this one), by standard name.
    next_steps: tuple[str, ...]

    @property
    def utm_campaign(self) -> str:
        return backup_utm_campaign(self.native_flow)


BACKUP_FLOWS = (
    BackupFlow("Browse Abandonment", "Viewed Product", ("Added to Cart", "Started Checkout")),
    BackupFlow("Abandoned Cart", "Added to Cart", ("Started Checkout",)),
    BackupFlow("Abandoned Checkout", "Started Checkout", ()),
)


def backup_utm_campaign(native_flow: str) -> str:
    """The utm_campaign of a backup flow's links: the prefix and the native flow's name as a slug, so the value is
    the same however the flow is spelt in Klaviyo, needs no escaping in a URL and reads in a report."""
    slug = re.sub(r"[^a-z0-9]+", "-", native_flow.lower()).strip("-")
    if not slug:
        raise ValueError(f"a backup flow's utm_campaign needs a flow name with a letter or digit (got {native_flow!r})")
    return BACKUP_UTM_CAMPAIGN_PREFIX + slug


def backup_wait(native_wait: timedelta, hold_back: timedelta) -> timedelta:
    """The backup flow's first wait. Our event reaches Klaviyo at least `hold_back` after the shopper's action, so
    waiting that much less sends the backup email no earlier than the native one, by which time the waterfall
    filter can see whether the native flow emailed the shopper; never below zero."""
    return max(native_wait - hold_back, timedelta(0))


def pipeline_lag(destination: DestinationSettings) -> tuple[timedelta, timedelta]:
    """How long after a shopper's last action in a session their backup event reaches Klaviyo: the hold-back, and
    at most one schedule interval more."""
    return destination.hold_back, destination.hold_back + SYNC_INTERVAL


def render_backup_flows_guide(destination: DestinationSettings) -> str:
    """The guide as Markdown, for a marketer building the flows in Klaviyo's UI."""
    ours = destination.metric_names
    sent = {PIXEL_TO_KLAVIYO_METRIC[event] for event in destination.enabled_events}
    fastest, slowest = pipeline_lag(destination)
    # "In the last N days" must reach back past the lag, or what the shopper did before our event arrived is seen
    # by neither condition.
    lag_days = max(1, math.ceil(slowest / timedelta(days=1)))
    flows = [flow for flow in BACKUP_FLOWS if flow.metric in sent]
    unsent = [flow for flow in BACKUP_FLOWS if flow.metric not in sent]

    def code(name: str) -> str:
        return f"`{name}`"

    shopify_order = code(NATIVE_METRIC["Placed Order"])
    blocks = [
        "Klaviyo's native abandonment flows reach only the shoppers Klaviyo identifies itself. upstack sends the "
        "others' actions to Klaviyo through its API, and a backup flow beside each native flow emails them. Events "
        "sent through the API make metrics of their own, apart from Shopify's even where the words match: "
        f"{code(ours['Placed Order'])} is not Shopify's {shopify_order}. Start backup flows on ours; stop "
        "them on Shopify's (the metrics with the Shopify icon). Each of ours shows up in Klaviyo once upstack has "
        "sent its first event.",
    ]
    if destination.send_mode == "backup":
        blocks.append(
            "Send mode `backup`: upstack sends only what Klaviyo could not tie to a shopper itself. A buyer types "
            f"their email at checkout, so hardly any order becomes {code(ours['Placed Order'])}: a backup flow "
            "that exits on ours keeps emailing people who bought.")
    else:
        blocks.append(
            "Send mode `all`: upstack also sends what Klaviyo saw itself, so a shopper Klaviyo identified starts "
            "both the native and the backup flow; the waterfall filter and the waits below keep them to one "
            f"email. {code(ours['Placed Order'])} still records only the orders the pixel saw: a backup flow "
            "exits on Shopify's, which records every order.")

    def names(metrics: list[str]) -> str:
        return " and ".join(", ".join(code(name) for name in metrics).rsplit(", ", 1))

    per_flow = []
    for flow in flows:
        origin = "Klaviyo's own" if flow.metric in KLAVIYO_ONSITE_METRICS else "Shopify's"
        later_ours = [ours[step] for step in flow.next_steps if step in sent]
        later = (f"Shopify's {names([NATIVE_METRIC[step] for step in flow.next_steps])}"
                 + (f", and ours, {names(later_ours)}" if later_ours else "")) if flow.next_steps else "none"
        per_flow.append(
            f"- **{flow.native_flow}** (native trigger: {origin} {code(NATIVE_METRIC[flow.metric])}). "
            f"Trigger: {code(ours[flow.metric])}. Next steps: {later}. utm_campaign: {code(flow.utm_campaign)}.")
    blocks.append(
        "**For each native flow**, clone it, make our metric the clone's trigger, name the clone after the native "
        "flow with \"(Upstack backup)\", and set it up as below.\n" + "\n".join(per_flow))
    if unsent:
        blocks.append("Not sent (UPSTACK_ENABLED_EVENTS), so no backup flow: "
                      + ", ".join(f"{flow.native_flow} ({code(ours[flow.metric])})" for flow in unsent) + ".")

    days = f"{lag_days} day" + ("s" if lag_days > 1 else "")
    blocks.append(
        "**Profile filters** (flow filters in older accounts: Klaviyo checks them when someone enters and before "
        "every email), joined by AND. Each exit condition goes in twice: zero times since starting this flow, and "
        f"zero times in the last {days}. Our event reaches Klaviyo up to {_duration(slowest)} after the shopper "
        "acted, so what they did in between happened before they started this flow.\n"
        f"- **Bought**: Shopify's {shopify_order}, zero times since starting this flow and zero times in "
        f"the last {days}.\n"
        "- **Moved on**: each next step above, the same two ways (the later flow takes over).\n"
        f"- **Waterfall**: {code('Received Email')} zero times in the last {WATERFALL_DAYS} days where Flow equals "
        "the native flow: whoever the native flow emailed gets no backup.\n"
        "- Keep the clone's other filters (e.g. has not been in this flow in the last N days).")

    examples = [timedelta(hours=4), timedelta(hours=1), timedelta(minutes=20)]
    blocks.append(
        "**Waits**: the backup flow's first wait is the native flow's first wait minus "
        f"{_duration(destination.hold_back)}, never below zero ("
        + "; ".join(_unbroken(f"{_duration(wait)} -> {_duration(backup_wait(wait, destination.hold_back))}")
                    for wait in examples)
        + "); later waits stay as they are. A session's events wait until it has been idle "
        f"{_duration(destination.hold_back)}, so an email typed later in it (which Klaviyo then sees itself) can "
        "still call the backup off, and the next scheduled sync (at most "
        f"{_duration(SYNC_INTERVAL)} later) sends them: our event arrives {_duration(fastest)} to "
        f"{_duration(slowest)} after the "
        "shopper's last action. The backup email goes when the native one would have, or up to "
        f"{_duration(slowest - fastest)} later, never before, and the waterfall filter sees the native email. Keep "
        "Smart Sending on in the backup emails: it skips anyone emailed within the account's window (16 hours by "
        "default), a second guard against two emails (a campaign counts too, and a skipped email is not resent). "
        f"Events older than {_duration(destination.max_event_age)} are sent as backfill and start no flow.")

    blocks.append(
        "**UTM tags**: recovered revenue can be counted from the landing URLs the pixel records only if every link "
        "of a backup flow names it. In each email of a backup flow, turn UTM tracking on and set for that message: "
        f"utm_source {code(UTM_SOURCE)}, utm_medium {code(UTM_MEDIUM)}, utm_campaign as above "
        f"({code(BACKUP_UTM_CAMPAIGN_PREFIX)} and the native flow's name). Klaviyo's account default puts the flow "
        "message's name in utm_campaign, which cannot tell a backup email from a native one.")

    blocks.append(
        f"**Orders**: build no flow on {code(ours['Placed Order'])} or {code(ours['Ordered Product'])}, and filter "
        f"none on them: post-purchase flows on Shopify's {shopify_order} already reach every buyer. Ours are "
        "for reporting: what the shoppers Klaviyo could not identify bought.")
    blocks.append(
        "**Check the clone's content**: its dynamic blocks, trigger filters and splits read the native event's "
        "properties; ours are listed under \"Klaviyo mapping\" in the README (`Items`, `CheckoutURL`, `value`, "
        "...).")
    blocks.append(
        f"**Optional mirror**: add to each native flow {code('Received Email')} zero times in the last "
        f"{WATERFALL_DAYS} days where Flow equals its backup flow, for a shopper Klaviyo identifies only after the "
        "backup emailed them.")
    return "\n\n".join(_wrap_block(block) for block in blocks)


README_LINE = ("`upstack klaviyo flows` prints this section for your configured metric names "
               "(`UPSTACK_METRIC_TEMPLATE`) and settings.")


def readme_section(destination: DestinationSettings | None = None) -> str:
    """The body of the README's "Backup flows in Klaviyo" section: the guide with default settings."""
    return README_LINE + "\n\n" + render_backup_flows_guide(destination or DestinationSettings())


def _duration(span: timedelta) -> str:
    """"1 hour 30 minutes", kept on one line when the guide is wrapped."""
    minutes = round(span.total_seconds() / 60)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{hours} hour" + ("s" if hours != 1 else "")] if hours else []
    if minutes or not hours:
        parts.append(f"{minutes} minute" + ("s" if minutes != 1 else ""))
    return _unbroken(" ".join(parts))


def _unbroken(text: str) -> str:
    """Keeps a phrase on one line when its block is wrapped."""
    return text.replace(" ", "\0")


def _wrap_block(block: str, width: int = 120) -> str:
    """Wraps each line of a block (list items with a hanging indent) without breaking inside a `code` span, so a
    metric name stays on one line however long the template makes it."""
    wrapped = []
    for line in block.split("\n"):
        protected = re.sub(r"`[^`]*`", lambda match: match.group(0).replace(" ", "\0"), line)
        indent = "  " if line.startswith("- ") else ""
        text = textwrap.fill(protected, width=width, subsequent_indent=indent, break_long_words=False,
                             break_on_hyphens=False)
        wrapped.append(text.replace("\0", " "))
    return "\n".join(wrapped)
