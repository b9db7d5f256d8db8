"""The backup-flow guide: the README says what the code renders, the command prints it for the configured names,
and the UTM convention the recovered-revenue SQL will match is stable and URL-safe."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import pytest

from upstack_pipeline.klaviyo.flows import (
    BACKUP_FLOWS,
    BACKUP_UTM_CAMPAIGN_PREFIX,
    SYNC_INTERVAL,
    UTM_MEDIUM,
    UTM_SOURCE,
    backup_utm_campaign,
    backup_wait,
    readme_section,
    render_backup_flows_guide,
)
from upstack_pipeline.settings import DestinationSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Backup flows in Klaviyo"
REGENERATE = (".venv/bin/python -c 'from upstack_pipeline.klaviyo.flows import readme_section; "
              "print(readme_section())'")


def readme_backup_section() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text()
    match = re.search(rf"^{re.escape(SECTION)}\n(.*?)(?=^## )", readme, flags=re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no {SECTION!r} section followed by another section"
    return match.group(1).strip("\n")


def items(guide: str) -> list[str]:
    """The guide's paragraphs and list items, each on one line (wrapped lines joined back)."""
    found = []
    for block in guide.strip().split("\n\n"):
        for item in re.split(r"\n(?=- )", block):
            found.append(" ".join(item.split()))
    return found


def upstack(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("UPSTACK_", "KLAVIYO_", "DAGSTER_"))}
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "dagster_project.cli", *args], env=environment, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_the_readme_section_is_the_guide_rendered_with_default_settings():
    assert readme_backup_section() == readme_section(), (
        f"README.md's {SECTION!r} section and upstack_pipeline/klaviyo/flows.py disagree. Change the guide in "
        f"flows.py, then replace the section's body with the output of:\n  {REGENERATE}")
    assert readme_section().startswith("`upstack klaviyo flows`")


def test_the_section_sits_right_before_delivery():
    headings = re.findall(r"^## .*$", (PROJECT_ROOT / "README.md").read_text(), flags=re.MULTILINE)
    assert headings[headings.index(SECTION) + 1] == "## Delivery"


@pytest.mark.slow  # runs the whole `upstack` command in a process
def test_the_command_prints_the_configured_names_and_exits_on_shopifys_placed_order():
    completed = upstack("klaviyo", "flows", UPSTACK_METRIC_TEMPLATE="{metric} (Upstack backup)")

    assert completed.returncode == 0, completed.stderr
    guide = completed.stdout
    assert guide.strip() == render_backup_flows_guide(
        DestinationSettings(metric_name_template="{metric} (Upstack backup)")).strip()
    assert "from Upstack" not in guide
    lines = items(guide)
    for native, ours in [("Browse Abandonment", "Viewed Product (Upstack backup)"),
                         ("Abandoned Cart", "Added to Cart (Upstack backup)"),
                         ("Abandoned Checkout", "Started Checkout (Upstack backup)")]:
        [flow] = [line for line in lines if line.startswith(f"- **{native}**")]
        assert f"Trigger: `{ours}`." in flow
    [bought] = [line for line in lines if line.startswith("- **Bought**")]
    assert "Shopify's `Placed Order`" in bought and "Upstack" not in bought
    # Ours is named only to say what not to do with it.
    ours = [line for line in lines if "`Placed Order (Upstack backup)`" in line]
    assert ours and all(re.search(r"\b(not|no)\b", line) for line in ours), ours


@pytest.mark.slow  # runs the whole `upstack` command in a process
def test_the_command_refuses_a_template_without_metric_in_one_line():
    completed = upstack("klaviyo", "flows", UPSTACK_METRIC_TEMPLATE="Upstack")

    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr.count("\n") == 1 and "UPSTACK_METRIC_TEMPLATE" in completed.stderr


def test_waits_and_lag_follow_the_hold_back():
    assert backup_wait(timedelta(hours=4), timedelta(minutes=30)) == timedelta(hours=3, minutes=30)
    assert backup_wait(timedelta(minutes=20), timedelta(minutes=30)) == timedelta(0)
    guide = " ".join(render_backup_flows_guide(DestinationSettings(hold_back=timedelta(minutes=45))).split())
    assert "first wait minus 45 minutes" in guide
    assert "4 hours -> 3 hours 15 minutes" in guide
    assert "up to 1 hour 45 minutes after the shopper acted" in guide


def test_the_lag_assumes_the_hourly_schedule():
    from dagster_project.defs.sync import hourly_sync

    assert (hourly_sync.cron_schedule, SYNC_INTERVAL) == ("0 * * * *", timedelta(hours=1))


def test_send_mode_and_enabled_events_change_what_the_guide_says():
    everything = " ".join(render_backup_flows_guide(DestinationSettings(send_mode="all")).split())
    assert "Send mode `all`" in everything and "Send mode `backup`" not in everything

    no_browsing = items(render_backup_flows_guide(DestinationSettings(
        enabled_events=("AddToCart", "Purchase"))))
    assert not any(line.startswith("- **Browse Abandonment**") for line in no_browsing)
    assert any(line.startswith("Not sent") and "Browse Abandonment" in line and "Abandoned Checkout" in line
               for line in no_browsing)
    [cart] = [line for line in no_browsing if line.startswith("- **Abandoned Cart**")]
    # Our checkout metric is never sent, so it is no exit condition; Shopify's still is.
    assert "`Checkout Started`" in cart and "Started Checkout from Upstack" not in cart


def test_every_backup_flow_names_its_utm_campaign_in_the_guide():
    guide = " ".join(readme_section().split())
    for flow in BACKUP_FLOWS:
        assert f"utm_campaign: `{flow.utm_campaign}`" in guide
    assert f"utm_source `{UTM_SOURCE}`, utm_medium `{UTM_MEDIUM}`" in guide


def test_the_utm_campaign_is_stable_and_url_safe():
    assert backup_utm_campaign("Abandoned Cart") == "upstack-backup-abandoned-cart"
    assert backup_utm_campaign("  abandoned   CART!! ") == "upstack-backup-abandoned-cart"
    assert [flow.utm_campaign for flow in BACKUP_FLOWS] == [
        "upstack-backup-browse-abandonment", "upstack-backup-abandoned-cart", "upstack-backup-abandoned-checkout"]
    for name in ["Abandoned Cart", "Browse Abandonment (EU) / Été", "Checkout #2 & more?", "a_b%c+d"]:
        value = backup_utm_campaign(name)
        assert re.fullmatch(r"upstack-backup-[a-z0-9]+(-[a-z0-9]+)*", value), value
        assert quote(value, safe="") == value
        landing = "https://shop.example/cart?" + urlencode({"utm_campaign": value})
        assert parse_qs(urlsplit(landing).query)["utm_campaign"] == [value]
    # The prefix is matched with SQL LIKE: it must hold none of LIKE's wildcards.
    assert not set(BACKUP_UTM_CAMPAIGN_PREFIX) & {"_", "%"}
    with pytest.raises(ValueError):
        backup_utm_campaign("!!!")
