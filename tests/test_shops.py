"""The shops file: many shops described in one YAML file, each checked at start-up, keys only in variables."""

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest

from dagster_project.resources import MappingResource
from upstack_pipeline.settings import DestinationSettings, Settings
from upstack_pipeline.shops import DESTINATION_KEYS, SHOPS_FILE_VARIABLE, Shop, ShopsFileError, load_shops

NORTH_KEY = "pk_north_0000000000000000000000"
SOUTH_KEY = "pk_south_1111111111111111111111"
EU_KEY = "pk_eu_second_key_22222222222222"


def shops_file(tmp_path: Path, text: str, **env: str) -> dict[str, str]:
    """Writes the file; the environment that names it, with the given variables."""
    path = tmp_path / "config" / "shops.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return {SHOPS_FILE_VARIABLE: str(path), **env}


def refused(env: dict[str, str]) -> ShopsFileError:
    with pytest.raises(ShopsFileError) as error:
        load_shops(env)
    return error.value


def test_without_a_shops_file_the_environment_is_one_shop_named_default():
    env = {"UPSTACK_LANDING_DIR": "/srv/landing", "UPSTACK_WAREHOUSE": "/srv/w.duckdb", "KLAVIYO_API_KEY": NORTH_KEY,
           "UPSTACK_SEND_MODE": "all", "UPSTACK_SHOPS_FILE": ""}
    assert load_shops(env) == (Shop("default", Settings.from_env(env), klaviyo_api_key_env="KLAVIYO_API_KEY",
                                    klaviyo_account="KLAVIYO_API_KEY"),)
    # Without a key nothing is sent, so there is no account to pace.
    assert load_shops({}) == (Shop("default", Settings(), klaviyo_api_key_env=None, klaviyo_account=None),)


THREE_SHOPS = """
shops:
  north-store:
    landing_dir: {data}/north/landing
    warehouse: {data}/north/warehouse.duckdb
    klaviyo_api_key_env: KLAVIYO_API_KEY_NORTH
    klaviyo_base_url: http://127.0.0.1:8123/
    send_mode: all
    metric_name_template: "{{metric}} (North)"
    enabled_events: [AddToCart, Purchase]
    create_profiles: false
    update_profiles: no
    respect_consent: true
    list_id: 123456
    max_event_age_hours: 48
    hold_back_minutes: 45
    max_pending_age_minutes: 90
    max_dead_letter_share: 0.05
  south_2:
    landing_dir: south/landing
    warehouse: ../south.duckdb
    klaviyo_api_key_env: KLAVIYO_API_KEY_SOUTH
  east:
    landing_dir: east
    warehouse: east/warehouse.duckdb
"""


def test_three_shops_each_with_its_paths_key_and_overrides_on_the_environments_defaults(tmp_path):
    env = shops_file(tmp_path, THREE_SHOPS.format(data=tmp_path / "data"),
                     KLAVIYO_API_KEY_NORTH=NORTH_KEY, KLAVIYO_API_KEY_SOUTH=SOUTH_KEY,
                     # The environment's: every shop's unless the file says otherwise...
                     UPSTACK_SEND_MODE="all", UPSTACK_CREATE_PROFILES="false", UPSTACK_MAX_EMAILS_PER_BROWSER="1",
                     KLAVIYO_BASE_URL="http://127.0.0.1:9000",
                     # ...but paths and the key are each shop's own.
                     UPSTACK_LANDING_DIR="/elsewhere", UPSTACK_WAREHOUSE="/elsewhere.duckdb",
                     KLAVIYO_API_KEY=EU_KEY)
    base = Settings.from_env(env)
    north, south, east = load_shops(env)
    config = tmp_path / "config"

    assert north == Shop("north-store", dataclasses.replace(
        base, landing_dir=tmp_path / "data/north/landing", warehouse_path=tmp_path / "data/north/warehouse.duckdb",
        klaviyo_api_key=NORTH_KEY, klaviyo_base_url="http://127.0.0.1:8123",
        destination=DestinationSettings(
            send_mode="all", metric_name_template="{metric} (North)", enabled_events=("AddToCart", "Purchase"),
            create_profiles=False, update_profiles=False, respect_consent=True, list_id="123456",
            max_event_age=timedelta(hours=48), hold_back=timedelta(minutes=45), max_pending_age=timedelta(minutes=90),
            max_dead_letter_share=0.05)),
        klaviyo_api_key_env="KLAVIYO_API_KEY_NORTH", klaviyo_account="KLAVIYO_API_KEY_NORTH")
    # Relative paths are read from the shops file's folder, wherever the process runs.
    assert south == Shop("south_2", dataclasses.replace(
        base, landing_dir=config / "south/landing", warehouse_path=tmp_path / "south.duckdb",
        klaviyo_api_key=SOUTH_KEY),
        klaviyo_api_key_env="KLAVIYO_API_KEY_SOUTH", klaviyo_account="KLAVIYO_API_KEY_SOUTH")
    assert south.settings.destination.send_mode == "all" and not south.settings.destination.create_profiles
    assert south.settings.identity.max_emails_per_browser == 1
    # No key named: its events wait in its outbox; KLAVIYO_API_KEY is never borrowed for another shop.
    assert east == Shop("east", dataclasses.replace(base, landing_dir=config / "east",
                                                    warehouse_path=config / "east/warehouse.duckdb",
                                                    klaviyo_api_key=None))
    assert east.klaviyo_account is None


def test_shops_naming_one_key_variable_or_one_account_label_share_an_account_and_the_others_do_not(tmp_path):
    env = shops_file(tmp_path, """
shops:
  brand-us:    {landing_dir: us, warehouse: us.duckdb, klaviyo_api_key_env: KEY_BRAND}
  brand-ca:    {landing_dir: ca, warehouse: ca.duckdb, klaviyo_api_key_env: KEY_BRAND}
  brand-eu:    {landing_dir: eu, warehouse: eu.duckdb, klaviyo_api_key_env: KEY_EU, klaviyo_account: brand-eu}
  brand-eu-2:  {landing_dir: eu2, warehouse: eu2.duckdb, klaviyo_api_key_env: KEY_EU_2, klaviyo_account: brand-eu}
  other-brand: {landing_dir: other, warehouse: other.duckdb, klaviyo_api_key_env: KEY_OTHER}
""", KEY_BRAND=NORTH_KEY, KEY_EU=EU_KEY, KEY_EU_2=EU_KEY + "x", KEY_OTHER=SOUTH_KEY)
    accounts = {shop.name: shop.klaviyo_account for shop in load_shops(env)}
    assert accounts == {"brand-us": "KEY_BRAND", "brand-ca": "KEY_BRAND", "brand-eu": "brand-eu",
                        "brand-eu-2": "brand-eu", "other-brand": "KEY_OTHER"}


def test_yaml_anchors_give_shops_shared_settings_that_each_may_override(tmp_path):
    env = shops_file(tmp_path, """
shops:
  a:
    <<: &common {send_mode: all, hold_back_minutes: 10}
    landing_dir: a
    warehouse: a.duckdb
  b:
    <<: *common
    hold_back_minutes: 20
    landing_dir: b
    warehouse: b.duckdb
""")
    a, b = load_shops(env)
    assert (a.settings.destination.send_mode, a.settings.destination.hold_back) == ("all", timedelta(minutes=10))
    assert (b.settings.destination.send_mode, b.settings.destination.hold_back) == ("all", timedelta(minutes=20))


def test_one_file_with_many_problems_names_every_one_with_the_file_the_shop_and_what_to_do(tmp_path):
    env = shops_file(tmp_path, """
shops:
  North Store:
    landing_dir: north
    warehouse: north.duckdb
    sendmode: all
  south:
    landing_dir: south
    warehouse: shared/../north.duckdb
    klaviyo_api_key_env: KLAVIYO_API_KEY_SOUTH
    send_mode: sometimes
    hold_back_minutes: 1.5
    enabled_events: [AddToCart, Refund]
    create_profiles: maybe
    klaviyo_base_url: a.klaviyo.com
  east:
    landing_dir: south/
    klaviyo_api_key_env: KLAVIYO_API_KEY_EAST
    klaviyo_account: not a label
  west:
    landing_dir: west
    warehouse: west.duckdb
    klaviyo_account: west
""", KLAVIYO_API_KEY_EAST="")
    error = refused(env)
    path = tmp_path / "config" / "shops.yaml"
    expected = [
        ("'North Store'", "is not a usable shop name", "Dagster partition key"),
        ("'North Store'", "unknown key 'sendmode': did you mean 'send_mode'?"),
        ("'south'", f"warehouse {tmp_path / 'config/north.duckdb'} is also used by shop 'North Store'"),
        ("'south'", "send_mode must be 'backup' or 'all' (got 'sometimes')"),
        ("'south'", "hold_back_minutes must be a whole number of minutes, e.g. 30 (got '1.5')"),
        ("'south'", "enabled_events has events we do not map: Refund"),
        ("'south'", "create_profiles must be true or false (got 'maybe')"),
        ("'south'", "klaviyo_base_url must start with https://"),
        ("'south'", "klaviyo_api_key_env names KLAVIYO_API_KEY_SOUTH, which is not set: set KLAVIYO_API_KEY_SOUTH"),
        ("'east'", "warehouse is missing"),
        ("'east'", f"landing_dir {tmp_path / 'config/south'} is also used by shop 'south'"),
        ("'east'", "klaviyo_api_key_env names KLAVIYO_API_KEY_EAST, which is empty"),
        ("'east'", "klaviyo_account 'not a label' is not a usable label"),
        ("'west'", "klaviyo_account labels the account of the shop's key: add klaviyo_api_key_env"),
    ]
    assert len(error.problems) == len(expected)
    for line, (shop, *parts) in zip(sorted(error.problems), sorted(expected)):
        assert line.startswith(f"{path}: shop {shop}: ") and all(part in line for part in parts), line
    # One line per problem in the message, so a log shows each whole.
    assert str(error).splitlines()[1:] == [f"- {line}" for line in error.problems]
    assert str(error).startswith("UPSTACK_SHOPS_FILE: 14 problems to fix before any shop runs")


@pytest.mark.parametrize("text, problem", [
    (None, "cannot be read (No such file or directory): fix UPSTACK_SHOPS_FILE, or unset it"),
    ("shops:\n  north: {landing_dir: n\n", "is not valid YAML: expected ',' or '}', but got '<stream end>' "
                                           "(while parsing a flow mapping) at line 3, column 1"),
    ("shops:\n  north:\n    landing_dir: n\n\tbad: tab\n", "is not valid YAML: found character '\\t' that cannot "
                                                           "start any token (while scanning for the next token) "
                                                           "at line 4, column 1"),
    ("", "must hold a `shops:` mapping of shop names to their settings"),
    ("- north\n", "must hold a `shops:` mapping of shop names to their settings"),
    ("shops:\n", "`shops:` must map each shop's name to its settings"),
    ("shops: [north]\n", "`shops:` must map each shop's name to its settings"),
    ("shop:\n  north: {landing_dir: n, warehouse: n.duckdb}\n", "must hold a `shops:` mapping"),
    ("shops:\n  north: {landing_dir: n, warehouse: n.duckdb}\nShops: {}\n",
     "unknown top-level key 'Shops': did you mean 'shops'? the file holds only `shops:`"),
    ("shops:\n  north: {landing_dir: n, warehouse: n.duckdb}\n  north: {landing_dir: m, warehouse: m.duckdb}\n",
     "is not valid YAML: 'north' is written twice (lines 2 and 3): keep one at line 3, column 3"),
    ("shops:\n  2024: {landing_dir: n, warehouse: n.duckdb}\n", "the shop name 2024 is read by YAML as a int: "
                                                                "quote it"),
    ("shops:\n  north:\n", "shop 'north': must be a mapping of its settings, at least landing_dir and warehouse"),
    ("shops:\n  north: {landing_dir: '', warehouse: n.duckdb}\n", "shop 'north': landing_dir is empty"),
    ("shops:\n  north: {landing_dir: n, warehouse: n.duckdb, max_dead_letter_share: 2}\n",
     "shop 'north': max_dead_letter_share must be a share between 0 and 1, e.g. 0.01 (got '2')"),
    ("shops:\n  north: {landing_dir: n, warehouse: n.duckdb, enabled_events: AddToCart}\n",
     "shop 'north': enabled_events must be a YAML list of event names"),
    ("shops:\n  north: {landing_dir: n, warehouse: n.duckdb, metric_name_template: Upstack}\n",
     "shop 'north': metric_name_template must contain {metric}"),
    ("shops:\n  north: {landing_dir: [n], warehouse: n.duckdb}\n", "shop 'north': landing_dir must be text"),
    ("shops:\n  -north: {landing_dir: n, warehouse: n.duckdb}\n", "shop '-north': is not a usable shop name"),
    ("shops:\n  " + "n" * 64 + ": {landing_dir: n, warehouse: n.duckdb}\n", "is not a usable shop name"),
])
def test_each_problem_is_refused_naming_the_file_and_what_to_do(tmp_path, text, problem):
    env = shops_file(tmp_path, text or "")
    if text is None:
        Path(env[SHOPS_FILE_VARIABLE]).unlink()
    error = refused(env)
    assert len(error.problems) == 1
    assert error.problems[0].startswith(f"{env[SHOPS_FILE_VARIABLE]}: ")
    assert problem in error.problems[0]


def test_a_shop_name_of_63_characters_is_usable(tmp_path):
    name = "a" + "-_0" * 20 + "yz"
    env = shops_file(tmp_path, f"shops:\n  {name}: {{landing_dir: n, warehouse: n.duckdb}}\n")
    assert [shop.name for shop in load_shops(env)] == [name] and len(name) == 63


def test_one_key_under_two_account_labels_is_refused_without_repeating_it(tmp_path):
    env = shops_file(tmp_path, """
shops:
  north: {landing_dir: n, warehouse: n.duckdb, klaviyo_api_key_env: KEY_A}
  south: {landing_dir: s, warehouse: s.duckdb, klaviyo_api_key_env: KEY_B}
""", KEY_A=NORTH_KEY, KEY_B=NORTH_KEY)
    error = refused(env)
    assert error.problems == (
        f"{env[SHOPS_FILE_VARIABLE]}: shop 'south': KEY_B holds the same key as shop 'north''s variable, so the "
        "same account, but the shops' account labels differ ('KEY_B' here, 'KEY_A' there): name one variable in "
        "both shops, or give both the same klaviyo_account, so their runs take turns under the account's rate "
        "limits",)
    assert NORTH_KEY not in str(error)


def test_the_key_never_appears_in_a_shop_or_an_error(tmp_path):
    env = shops_file(tmp_path, THREE_SHOPS.format(data=tmp_path),
                     KLAVIYO_API_KEY_NORTH=NORTH_KEY, KLAVIYO_API_KEY_SOUTH=SOUTH_KEY)
    shops = load_shops(env)
    assert [shop.settings.klaviyo_api_key for shop in shops] == [NORTH_KEY, SOUTH_KEY, None]
    assert NORTH_KEY not in repr(shops) and SOUTH_KEY not in repr(shops) and NORTH_KEY not in str(shops)

    # A key pasted into the file, where a variable's name belongs or anywhere else, is refused and not repeated.
    env = shops_file(tmp_path, f"""
shops:
  north: {{landing_dir: n, warehouse: n.duckdb, klaviyo_api_key_env: {NORTH_KEY}}}
  south: {{landing_dir: s, warehouse: s.duckdb, klaviyo_api_key: {SOUTH_KEY}, send_mode: bad}}
  east: {{landing_dir: e, warehouse: e.duckdb, klaviyo_api_key_env: "{EU_KEY} "}}
""", KLAVIYO_API_KEY_NORTH=NORTH_KEY)
    error = refused(env)
    assert [(line.split(": ")[1], line.split(": ")[2].split()[0]) for line in error.problems] == [
        ("shop 'north'", "klaviyo_api_key_env"), ("shop 'south'", "klaviyo_api_key"), ("shop 'south'", "send_mode"),
        ("shop 'east'", "klaviyo_api_key_env")]
    assert "rotate the key" in error.problems[0] and "rotate the key" in error.problems[1]
    assert all(key not in str(error) and key not in repr(error) for key in (NORTH_KEY, SOUTH_KEY, EU_KEY))

    # Not YAML on the line that holds a key: the error gives the place, not the line.
    env = shops_file(tmp_path, f"shops:\n  north: {{landing_dir: n, warehouse: [{SOUTH_KEY}}}\n")
    error = refused(env)
    assert "at line 2" in str(error) and SOUTH_KEY not in str(error)


def test_the_mapping_settings_are_every_destination_setting_under_the_run_configs_names():
    # One spelling for an operator: a shop's `hold_back_minutes` is the run config's `mapping.hold_back_minutes`.
    assert set(DESTINATION_KEYS) == set(MappingResource.model_fields)
    assert {field for field, _ in DESTINATION_KEYS.values()} == {
        field.name for field in dataclasses.fields(DestinationSettings)}


def test_a_run_launched_from_the_ui_gets_its_shops_config_and_a_removed_shop_says_what_happened(tmp_path, monkeypatch):
    import dagster as dg

    from dagster_project.shops import ACCOUNT_TAG, SHOP_TAG, shop_partitioned_config

    env = shops_file(tmp_path, """
shops:
  north: {landing_dir: north, warehouse: north.duckdb, klaviyo_api_key_env: KEY_NORTH}
  south: {landing_dir: south, warehouse: south.duckdb}
""", KEY_NORTH=NORTH_KEY)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    config = shop_partitioned_config.get_run_config_for_partition_key("north")
    tags = shop_partitioned_config.get_tags_for_partition_key("north")
    resources = config["resources"]
    assert resources["warehouse"]["config"]["path"] == str(tmp_path / "config" / "north.duckdb")
    assert resources["upstack"]["config"]["landing_dir"] == str(tmp_path / "config" / "north")
    assert resources["klaviyo"]["config"]["api_key_env"] == "KEY_NORTH"
    assert tags[SHOP_TAG] == "north" and tags[ACCOUNT_TAG] == "KEY_NORTH"
    assert NORTH_KEY not in repr(config) + repr(tags)

    with pytest.raises(dg.DagsterInvariantViolationError) as error:
        shop_partitioned_config.get_run_config_for_partition_key("west")
    assert "Partition 'west'" in str(error.value)
    assert "there is no such shop; the shops are north, south" in str(error.value)
    assert env[SHOPS_FILE_VARIABLE] in str(error.value)
