"""Many shops, one deployment: the shops file (issue 15).

`UPSTACK_SHOPS_FILE` names a YAML file with one entry per shop:

    shops:
      north-store:                                  # the shop's name: its Dagster partition key
        landing_dir: /data/north/landing            # required
        warehouse: /data/north/warehouse.duckdb     # required
        klaviyo_api_key_env: KLAVIYO_API_KEY_NORTH  # optional: the NAME of the variable holding the key
        klaviyo_account: brand-eu                   # optional: see "One pacer per Klaviyo account" below
        klaviyo_base_url: https://a.klaviyo.com     # optional
        send_mode: all                              # optional: any mapping setting, listed below

Without the file, today's variables describe one shop named `default` (`Settings.from_env`), so a single-shop
deployment changes nothing.

What a shop may set. Its paths (relative ones are read from the shops file's folder, so the file and its data can
move together), its Klaviyo key variable, account label and address, and the mapping settings
(`DestinationSettings`), each under the name the run config's `mapping` resource gives it: `send_mode`,
`metric_name_template`, `enabled_events` (a YAML list), `create_profiles`, `update_profiles`, `list_id`,
`respect_consent`, `max_dead_letter_share`, and the durations as a whole number of the unit their name ends with:
`max_event_age_hours`, `hold_back_minutes`, `max_pending_age_minutes`. Each value is refused by the same rule as
its environment variable. A mapping setting a shop leaves out is the environment's (UPSTACK_SEND_MODE, ...), and
everything else (the identity guards, DuckDB's memory, the alerts, the batch size, DAGSTER_HOME) is the
environment's for every shop. UPSTACK_LANDING_DIR and UPSTACK_WAREHOUSE are not read when the file is: every
shop names its own. A shared UPSTACK_DUCKDB_TEMP_DIR is safe, as DuckDB names its spill files by process.

Keys. The file names the variable that holds a shop's key, never the key: the file can then be committed and
shown, and the key stays where secrets are kept (a Kubernetes Secret, the process environment). The key is read
from that variable here, at start-up, and lives only in `Shop.settings` (never in a repr, a message, run config,
tags or metadata). A shop without `klaviyo_api_key_env` has no key: its events wait in its outbox, as with no
KLAVIYO_API_KEY today. It does not fall back to KLAVIYO_API_KEY, which would send one shop's shoppers to another
account on a forgotten line. A value that looks like a Klaviyo private key is refused wherever it appears in the
file, without being repeated.

One pacer per Klaviyo account. Klaviyo's rate limits (10 requests a second, 150 a minute on the bulk endpoints)
are per account, and each run paces its own requests in process (`KlaviyoClient`'s `RatePacer`). `Shop.klaviyo_account`
is a label, equal for shops that share an account: by default the name of the key variable (shops naming the same
variable share a key, so an account), or the shop's `klaviyo_account:` entry for shops whose keys differ but belong
to one account (a private key belongs to one account; two keys of one account need the same label). Every shop's
run carries its label as the run tag `upstack/klaviyo-account`, and the instance limits that tag to one run at a
time per unique value. So runs of shops sharing an account never overlap, and each run's in-process pacer has the
account to itself: together they share one pacer's allowance, one run after the other. Shops with their own
accounts have their own labels and run side by side, neither slowing the other. Two variables holding the same key
under different labels are refused at start-up, since their runs would overlap and exceed the account's limits.
A shop without a key sends nothing and has no label.

Start-up refuses a broken file once, with every problem found (`ShopsFileError`), each line naming the file, the
shop and the key, and what to do.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from upstack_pipeline.settings import (
    Settings,
    checked_base_url,
    checked_enabled_events,
    checked_flag,
    checked_metric_template,
    checked_positive_int,
    checked_send_mode,
    checked_share,
)

SHOPS_FILE_VARIABLE = "UPSTACK_SHOPS_FILE"
DEFAULT_SHOP = "default"
DEFAULT_KEY_VARIABLE = "KLAVIYO_API_KEY"

# A shop's name is its Dagster partition key, a run tag value, a Kubernetes label value and part of file names:
# lower-case letters, digits, '-' and '_', beginning and ending with a letter or digit, at most 63 characters (the
# Kubernetes label limit), is safe in all four and reads the same on every file system.
SHOP_NAME = re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?")
# An account label is a run tag value (Kubernetes label value rules: letters, digits, '-', '_', '.').
ACCOUNT_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Klaviyo's private keys: "pk_" and a long run of letters and digits.
PRIVATE_KEY = re.compile(r"pk_\w{16,}")


@dataclass(frozen=True)
class Shop:
    """One shop: its partition key, its full settings (with its key, which Settings keeps out of its repr) and
    the label of its Klaviyo account (the module docstring: "One pacer per Klaviyo account")."""

    name: str
    settings: Settings
    klaviyo_api_key_env: str | None = None
    klaviyo_account: str | None = None


class ShopsFileError(ValueError):
    """The shops file cannot be used: every problem found, one per line, so one edit fixes them all."""

    def __init__(self, problems: list[str]):
        self.problems = tuple(problems)
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        super().__init__(f"{SHOPS_FILE_VARIABLE}: {count} to fix before any shop runs:\n"
                         + "\n".join(f"- {problem}" for problem in problems))


class UnknownShopError(LookupError):
    """A name that is not a shop's: asked for with `--shop`, or a partition whose shop left the file."""

    def __init__(self, name: str, shops: tuple[Shop, ...]):
        self.name = name
        super().__init__(f"there is no such shop; the shops are {', '.join(shop.name for shop in shops)}")


def shop_named(shops: tuple[Shop, ...], name: str) -> Shop:
    for shop in shops:
        if shop.name == name:
            return shop
    raise UnknownShopError(name, shops)


def load_shops(environ: Mapping[str, str] | None = None) -> tuple[Shop, ...]:
    """Every shop, in the file's order; without a shops file, the one shop the environment describes."""
    env = os.environ if environ is None else environ
    base = Settings.from_env(env)
    if not env.get(SHOPS_FILE_VARIABLE):
        key_variable = DEFAULT_KEY_VARIABLE if base.klaviyo_api_key else None
        return (Shop(DEFAULT_SHOP, base, klaviyo_api_key_env=key_variable, klaviyo_account=key_variable),)
    return _ShopsFile(Path(env[SHOPS_FILE_VARIABLE]).absolute(), base, env).load()


def _text(value: Any, name: str) -> str:
    # A number is taken as its digits (a list id can be all digits); a YAML true, a list or a mapping is not text.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{name} must be text (got {value!r})")
    return str(value)


def _events(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(event, str) for event in value):
        raise ValueError(f"{name} must be a YAML list of event names, e.g. [AddToCart, Purchase] (got {value!r})")
    return checked_enabled_events(tuple(value), name)


def _as_text(check: Callable[[str, str, Any], Any]) -> Callable[[Any, str, Any], Any]:
    """An environment variable's check, given the YAML value as the text a variable would hold (true -> 'True')."""
    return lambda value, name, default: check(str(value), name, default)


def _duration(unit: str) -> Callable[[Any, str, timedelta], timedelta]:
    one = timedelta(**{unit: 1})

    def parse(value: Any, name: str, default: timedelta) -> timedelta:
        return one * checked_positive_int(str(value), name, int(default / one), unit=unit)
    return parse


# key in the file -> (DestinationSettings field, parse(value, key, the environment's value)).
DESTINATION_KEYS: dict[str, tuple[str, Callable[[Any, str, Any], Any]]] = {
    "send_mode": ("send_mode", lambda value, name, _: checked_send_mode(value, name)),
    "metric_name_template": ("metric_name_template",
                             lambda value, name, _: checked_metric_template(_text(value, name), name)),
    "enabled_events": ("enabled_events", lambda value, name, _: _events(value, name)),
    "create_profiles": ("create_profiles", _as_text(checked_flag)),
    "update_profiles": ("update_profiles", _as_text(checked_flag)),
    "list_id": ("list_id", lambda value, name, _: _text(value, name)),
    "respect_consent": ("respect_consent", _as_text(checked_flag)),
    "max_event_age_hours": ("max_event_age", _duration("hours")),
    "hold_back_minutes": ("hold_back", _duration("minutes")),
    "max_pending_age_minutes": ("max_pending_age", _duration("minutes")),
    "max_dead_letter_share": ("max_dead_letter_share", _as_text(checked_share)),
}
REQUIRED_KEYS = ("landing_dir", "warehouse")
SHOP_KEYS = (*REQUIRED_KEYS, "klaviyo_api_key_env", "klaviyo_account", "klaviyo_base_url", *DESTINATION_KEYS)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load keeps the last of two entries with one name: a shop written twice would lose its first half
    silently. This loader refuses the second, naming both lines."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` then an override is one entry, not two
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = lines.get(key)
        except TypeError:  # an unhashable key: construct_mapping below refuses it in its own words
            continue
        line = key_node.start_mark.line + 1
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is written twice (lines {first} and {line}): keep one", key_node.start_mark)
        lines[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _suggestion(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


class _ShopsFile:
    """One reading of the file: every problem is collected, then refused together."""

    def __init__(self, path: Path, base: Settings, env: Mapping[str, str]):
        self.path, self.base, self.env = path, base, env
        self.problems: list[str] = []
        self.claims: dict[tuple[str, Any], tuple[str, str]] = {}

    def problem(self, text: str, shop: str | None = None) -> None:
        self.problems.append(f"{self.path}: " + (f"shop {shop!r}: " if shop is not None else "") + text)

    def load(self) -> tuple[Shop, ...]:
        entries = self.entries()
        shops = []
        for name, entry in entries.items():
            shop = self.shop(name, entry)
            if shop is not None:
                shops.append(shop)
        if self.problems:
            raise ShopsFileError(self.problems)
        return tuple(shops)

    def entries(self) -> dict[Any, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            self.problem(f"cannot be read ({reason}): fix {SHOPS_FILE_VARIABLE}, or unset it to run the one shop "
                         "the environment describes")
            return {}
        try:
            document = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.MarkedYAMLError as error:
            # Built from the parts, never str(error): that quotes the line, and a line may hold a pasted key.
            mark = error.problem_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            context = f" ({error.context})" if error.context else ""
            self.problem(f"is not valid YAML: {error.problem}{context}{where}")
            return {}
        except yaml.YAMLError as error:
            self.problem(f"is not valid YAML: {type(error).__name__}")
            return {}
        example = "`shops: {north-store: {landing_dir: north/landing, warehouse: north/warehouse.duckdb}}`"
        if not isinstance(document, dict) or "shops" not in document:
            self.problem(f"must hold a `shops:` mapping of shop names to their settings, e.g. {example}")
            return {}
        for key in document:
            if key != "shops":
                self.problem(f"unknown top-level key {key!r}: {_suggestion(str(key), ('shops',))}"
                             "the file holds only `shops:`")
        if not isinstance(document["shops"], dict) or not document["shops"]:
            self.problem(f"`shops:` must map each shop's name to its settings, e.g. {example}")
            return {}
        return document["shops"]

    def shop(self, name: Any, entry: Any) -> Shop | None:
        """The shop, or None with its problems recorded."""
        problems_before = len(self.problems)
        if not isinstance(name, str):
            self.problem(f"the shop name {name!r} is read by YAML as a {type(name).__name__}: quote it, "
                         f"e.g. '{name}'")
            return None
        if not SHOP_NAME.fullmatch(name):
            self.problem("is not a usable shop name: use lower-case letters, digits, '-' and '_', beginning and "
                         "ending with a letter or digit, at most 63 characters (the name is a Dagster partition "
                         "key, a run tag value, a Kubernetes label and part of file names)", name)
        if not isinstance(entry, dict):
            self.problem(f"must be a mapping of its settings, at least {' and '.join(REQUIRED_KEYS)}", name)
            return None
        values = {}
        for key, value in entry.items():
            if isinstance(value, str) and PRIVATE_KEY.search(value):
                self.problem(f"{key}: holds what looks like a Klaviyo private key. The file never holds a key: put "
                             "it in an environment variable, name the variable in klaviyo_api_key_env, and rotate "
                             "the key in Klaviyo, since it has been written in this file", name)
            elif key not in SHOP_KEYS:
                self.problem(f"unknown key {key!r}: {_suggestion(str(key), SHOP_KEYS)}known keys: "
                             f"{', '.join(SHOP_KEYS)}", name)
            elif value is None or value == "":
                self.problem(f"{key} is empty: give it a value, or remove the line to use the default", name)
            else:
                values[key] = value
        for key in REQUIRED_KEYS:
            if key not in entry:
                self.problem(f"{key} is missing: every shop names its own (its own folder and file, so shops never "
                             "share one)", name)

        settings = self.base
        destination = {}
        for key, value in values.items():
            try:
                if key in DESTINATION_KEYS:
                    field_name, parse = DESTINATION_KEYS[key]
                    destination[field_name] = parse(value, key, getattr(self.base.destination, field_name))
                elif key == "landing_dir":
                    settings = replace(settings, landing_dir=self.resolved(_text(value, key)))
                    # Each file in it would be ingested into both warehouses and sent to both accounts.
                    self.claim_path(name, key, settings.landing_dir, "landing folder")
                elif key == "warehouse":
                    settings = replace(settings, warehouse_path=self.resolved(_text(value, key)))
                    # DuckDB takes one writer per file: the shops' runs would wait on each other, and their data mix.
                    self.claim_path(name, key, settings.warehouse_path, "warehouse file")
                elif key == "klaviyo_base_url":
                    settings = replace(settings, klaviyo_base_url=checked_base_url(_text(value, key), key))
            except ValueError as error:
                self.problem(str(error), name)

        key_variable = self.key_variable(name, values.get("klaviyo_api_key_env"))
        account = self.account(name, values.get("klaviyo_account"), "klaviyo_api_key_env" in values, key_variable)
        if key_variable and account:
            # One account's key under two labels would let the shops' runs overlap past the account's limits.
            other = self.claim("key", self.env[key_variable], name, account)
            if other:
                self.problem(f"{key_variable} holds the same key as shop {other[0]!r}'s variable, so the same "
                             f"account, but the shops' account labels differ ({account!r} here, {other[1]!r} "
                             "there): name one variable in both shops, or give both the same klaviyo_account, so "
                             "their runs take turns under the account's rate limits", name)
        if len(self.problems) > problems_before:
            return None
        return Shop(
            name,
            replace(settings, klaviyo_api_key=self.env[key_variable] if key_variable else None,
                    destination=replace(self.base.destination, **destination)),
            klaviyo_api_key_env=key_variable,
            klaviyo_account=account,
        )

    def key_variable(self, shop: str, value: Any) -> str | None:
        """The variable that holds the shop's key, checked to be set; its value is never repeated."""
        if value is None:
            return None
        if not isinstance(value, str) or not VARIABLE_NAME.fullmatch(value):
            self.problem("klaviyo_api_key_env must be the name of an environment variable (letters, digits and "
                         "'_'), the variable that holds the key, never the key itself", shop)
            return None
        if not self.env.get(value):
            self.problem(f"klaviyo_api_key_env names {value}, which is {'empty' if value in self.env else 'not set'}"
                         f": set {value} to the shop's Klaviyo private key where the deployment keeps secrets, "
                         "or remove klaviyo_api_key_env to keep the shop's events in its outbox", shop)
            return None
        return value

    def account(self, shop: str, value: Any, key_named: bool, key_variable: str | None) -> str | None:
        if value is None:
            return key_variable
        if not key_named:
            self.problem("klaviyo_account labels the account of the shop's key: add klaviyo_api_key_env, or "
                         "remove klaviyo_account", shop)
            return None
        if not isinstance(value, str) or not ACCOUNT_LABEL.fullmatch(value):
            self.problem(f"klaviyo_account {value!r} is not a usable label: letters, digits, '-', '_' and '.', "
                         "beginning and ending with a letter or digit, at most 63 characters (it is a run tag "
                         "value)", shop)
            return None
        return value

    def claim_path(self, shop: str, key: str, path: Path, what: str) -> None:
        other = self.claim(key, path, shop, shop)
        if other:
            self.problem(f"{key} {path} is also used by shop {other[0]!r}: give each shop its own {what}", shop)

    def resolved(self, raw: str) -> Path:
        return (self.path.parent / raw).resolve()

    def claim(self, what: str, thing: Any, shop: str, holder: str) -> tuple[str, str] | None:
        """The shop and holder that claimed `thing` first, when that holder is not `holder`."""
        first = self.claims.setdefault((what, thing), (shop, holder))
        return first if first[1] != holder else None
