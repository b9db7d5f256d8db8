from datetime import timedelta
from pathlib import Path

import pytest

from upstack_pipeline.settings import KLAVIYO_PRODUCTION_URL, Settings


def test_defaults_match_the_documented_ones():
    settings = Settings.from_env({})
    assert settings.landing_dir == Path("data/landing")
    assert settings.warehouse_path == Path("data/warehouse.duckdb")
    assert settings.klaviyo_base_url == KLAVIYO_PRODUCTION_URL == "https://a.klaviyo.com"
    assert settings.klaviyo_api_key is None and settings.dagster_home is None
    assert settings.max_clock_skew == timedelta(days=1)


def test_environment_overrides_and_the_key_never_shows_in_repr():
    settings = Settings.from_env({
        "UPSTACK_LANDING_DIR": "/srv/landing", "UPSTACK_WAREHOUSE": "/srv/wh.duckdb",
        "KLAVIYO_BASE_URL": "http://127.0.0.1:8123/", "KLAVIYO_API_KEY": "pk_secret_value",
        "DAGSTER_HOME": "/srv/dagster", "UPSTACK_INGEST_BATCH_BYTES": "1000",
    })
    assert (settings.events_dir, settings.customers_dir) == (Path("/srv/landing/events"), Path("/srv/landing/customers"))
    assert settings.warehouse_path == Path("/srv/wh.duckdb")
    assert settings.klaviyo_base_url == "http://127.0.0.1:8123"
    assert settings.klaviyo_api_key == "pk_secret_value"
    assert settings.dagster_home == Path("/srv/dagster")
    assert settings.ingest_batch_bytes == 1000
    assert "pk_secret_value" not in repr(settings)


def test_empty_variables_fall_back_to_defaults():
    assert Settings.from_env({"UPSTACK_LANDING_DIR": "", "KLAVIYO_API_KEY": ""}) == Settings()


def test_a_malformed_number_names_the_variable():
    with pytest.raises(ValueError, match="UPSTACK_INGEST_BATCH_BYTES"):
        Settings.from_env({"UPSTACK_INGEST_BATCH_BYTES": "64MB"})


def test_identity_guards_default_to_the_evidence_and_can_be_set_from_the_environment():
    defaults = Settings.from_env({}).identity
    # A tie lasts as long as the pixel's server-set cookie can (browsers cap cookies at 400 days), not 30 days.
    assert defaults.cookie_lifetime == timedelta(days=400)
    assert (defaults.max_browsers_per_identifier, defaults.supernode_window) == (3, timedelta(days=90))
    assert defaults.max_emails_per_browser == 2

    identity = Settings.from_env({
        "UPSTACK_COOKIE_LIFETIME_DAYS": "180", "UPSTACK_MAX_BROWSERS_PER_IDENTIFIER": "6",
        "UPSTACK_SUPERNODE_WINDOW_DAYS": "7", "UPSTACK_MAX_EMAILS_PER_BROWSER": "1",
    }).identity
    assert identity.cookie_lifetime == timedelta(days=180)
    assert (identity.max_browsers_per_identifier, identity.supernode_window) == (6, timedelta(days=7))
    assert identity.max_emails_per_browser == 1
    with pytest.raises(ValueError, match="UPSTACK_COOKIE_LIFETIME_DAYS must be a whole number of days"):
        Settings.from_env({"UPSTACK_COOKIE_LIFETIME_DAYS": "1y"})


@pytest.mark.parametrize("template, problem", [
    ("Upstack", r"UPSTACK_METRIC_TEMPLATE must contain \{metric\}"),
    ("{metric}", r"UPSTACK_METRIC_TEMPLATE gives 'Viewed Product', the name of a metric Klaviyo's own tracking"),
    ("{metric} from\nUpstack", r"UPSTACK_METRIC_TEMPLATE must be one line of printable characters"),
    ("{metric} " + "é" * 111, r"UPSTACK_METRIC_TEMPLATE gives a metric name of 128 characters; Klaviyo takes "
                              r"fewer than 128"),
])
def test_a_metric_template_klaviyo_or_the_flows_could_not_use_is_refused_in_one_line_naming_the_variable(
        template, problem):
    with pytest.raises(ValueError, match=problem) as refused:
        Settings.from_env({"UPSTACK_METRIC_TEMPLATE": template})
    assert "\n" not in str(refused.value).replace(repr(template), "")


def test_the_longest_metric_name_klaviyo_takes_is_accepted():
    # "Started Checkout" and "Ordered Product" are the longest standard names (16 and 15 characters)
    names = Settings.from_env({"UPSTACK_METRIC_TEMPLATE": "{metric} " + "é" * 110}).destination.metric_names
    assert max(len(name) for name in names.values()) == 127
