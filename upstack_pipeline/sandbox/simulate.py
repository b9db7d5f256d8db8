"""Deterministic storefront traffic with ground truth, to measure identity resolution.

Identity resolution can only be judged against the truth, and real pixel data never comes with it. This module
invents a small world, lets it shop for weeks, and writes what a store's first-party pixel would have captured
(the landing files of SPEC section 3) next to what really happened (who did each event). The world is the one the
README describes in "What the simulator measures": a world without the phenomena the product exists for would
measure nothing. Its rates are `WorldRates`, each a setting of `upstack simulate`; the defaults are sourced
or marked as assumptions there, and a sweep moves them.

The model, in the order it is built:

* **Catalogue**: about 60 sellable variants of 20 products of a lifestyle store. It is fixed (not seeded): a store's
  catalogue does not change between test runs. Popularity is Zipf-like, so a few products dominate.
* **People** live in households (one person for most, two to four for some, sharing a city, a home IP address and
  often a last name). Each has a unique, real-looking email, usually a phone (stored in E.164, typed in many
  formats), a Klaviyo exchange id (`kx`, constant per person), consent flags and, for about one in seven, a
  Shopify customer account; about one in five is on the store's Klaviyo list. One or two people are store staff.
* **Devices and browsers**: every person has 1-3 devices (phone, desktop, tablet) and every device 1-2 browsers
  (Safari on iOS or macOS, Chrome on Android or desktop, the Instagram or TikTok in-app browser). Some households
  share a tablet. A browser keeps the pixel's `anonymous_id` cookie, which the shop's server sets, so no browser
  caps it inside the window: it is lost only when the shopper clears cookies (a monthly rate), in a private
  window (a cookie for that session alone) or on another device or browser.
* **Klaviyo's own cookie** (`__kla_id`) fills `user_data.klaviyo_identified`. Klaviyo learns who a browser is from
  a Klaviyo email click (`_kx`), a typed checkout email, a form or a login. klaviyo.js writes its cookie from the
  page, so Safari and iPhone in-app browsers (`itp`) keep it 7 days after the last visit, 24 hours after a
  landing from a decorated link (`_kx`, an ad click id); elsewhere it lasts 2 years. A returning Safari shopper
  is therefore known to our cookie and forgotten by Klaviyo's: the gap the pipeline exists to close.
* **Visits** are long-tailed in time: most people come once; the rest come back after gaps drawn from a
  log-normal distribution (median `return_gap_days`, a tail past 90 days), sometimes twice the same day. A
  session uses one browser and runs PageView -> 1-5 ViewContent -> maybe AddToCart -> maybe the checkout funnel
  (InitiateCheckout, AddShippingInfo, AddPaymentInfo) -> maybe Purchase, seconds to minutes apart. Its landing page
  carries the traffic source: a Klaviyo email click (`_kx`, on `kx_share` of a subscriber's visits), an ad click
  (`fbclid`, `gclid`, `ttclid`), organic search, a referral or nothing.
* **Identity signals** appear where a real shop produces them: the email typed in checkout (sometimes with stray
  spaces or capitals), phone, name and address from the shipping step, a login (`Identify` with the customer id,
  after which `external_id` rides on the session), a newsletter form (`Identify` with the email only), `_kx` and
  ad click ids on the landing session.
* **What goes wrong in real traffic** happens several times per run, because it is where a resolver merges the
  wrong people: shared household devices, forwarded Klaviyo emails (one person's `_kx` in another's browser, now
  and then posted to a group), placeholder addresses typed into pop-ups by many unrelated shoppers (a few on any
  block list, most not), an ad click handed over from an in-app browser to Safari, an ad link shared between two
  people, staff test orders with the store's support address, private windows and cleared cookies.
* **Backup flows** email what Klaviyo's own flows cannot: a cart or a started checkout left in a session Klaviyo
  did not identify, by a shopper who allows marketing and had identified on that cookie before. The flow is the one
  `BACKUP_FLOWS` names for the furthest step (Abandoned Cart, Abandoned Checkout); a share of the emails
  (`backup_email_click_rate`) bring the shopper back hours to two days later through the email's link, with their
  `_kx` and the flow's utm_campaign (`backup_utm_campaign`), and a share of those visits
  (`backup_return_purchase_rate`) buy the cart. Klaviyo's own emails (`_kx` landings above) never carry that
  campaign. `truth/backup_emails.csv` lists every email sent, the visit it brought and that visit's order, so
  recovered-revenue reporting can be checked against exactly those orders.
* **Transport noise**: about 1% of events are re-sent by the pixel as identical lines (sometimes an hour later, in
  the next file) and about 0.2% of lines are broken in one of seven ways (see `BAD_LINE_KINDS`).

Conventions a reader of the files needs: on `AddToCart`, `custom_data.items[0]` is the line just added and the rest
is the cart before it, `value` is the cart value after the add. The `fbc` cookie value embeds the time the cookie was
written in that browser, so in an in-app handoff the two browsers share the `fbclid` (and the landing URL) but not
the exact `fbc` string.

Everything is drawn from `random.Random(seed)` in a fixed order (what the backup flows decide from a second
generator derived from the seed, so they add visits without reshuffling the world before the first of them) and all
times are integer milliseconds, so the same arguments give byte-identical files. Sessions, planned ones and those
the emails bring, are generated in start-time order and each hour's file is written as soon as no later session can
add to it, so memory stays bounded by a few hours of traffic.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import heapq
import itertools
import json
import math
import os
import random
import time
import unicodedata
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from collections.abc import Callable, Iterable
from pathlib import Path

from upstack_pipeline.klaviyo.flows import BACKUP_FLOWS, SYNC_INTERVAL, UTM_MEDIUM, UTM_SOURCE, BackupFlow

__all__ = ["SimulationSummary", "WorldRates", "simulate"]

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
# klaviyo.js writes __kla_id from the page. WebKit caps such cookies at 7 days (ITP 2.1), 24 hours on a landing
# from a decorated link (ITP 2.2): Safari and, on an iPhone, in-app browsers. Elsewhere (Chrome, Android's in-app
# WebViews) Klaviyo's cookie lasts 2 years (Klaviyo help centre on its cookie).
KLAVIYO_COOKIE_ITP_TTL = 7 * DAY
KLAVIYO_COOKIE_DECORATED_TTL = DAY
KLAVIYO_COOKIE_TTL = 730 * DAY
MONTH = 30 * DAY

SCENARIOS = (
    "normal",
    "shared_tablet",
    "forwarded_email",
    "in_app_handoff",
    "cookie_reset",
    "private_browsing",
    "placeholder_email",
    "staff_test",
    "shared_ad_link",
)


def _rate(default: float, help: str) -> float:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class WorldRates:
    """The rates of the simulated world (the README's "What the simulator measures"), each a flag of `upstack
    simulate`. "(A)" marks an assumption to sweep and report against, not a fact; the README says where each default
    comes from and how the results move with it."""

    safari_share: float = _rate(0.5, "phones that are iPhones, so Safari and WebKit in-app browsers: 40-60% of a "
                                     "Shopify store's mobile sessions (A)")
    returning_share: float = _rate(0.25, "prospects (neither customers nor subscribers, who always come back) who "
                                         "return after a first visit (A)")
    return_gap_days: float = _rate(21.0, "median days between a returning shopper's visits: 2-4 weeks, log-normal "
                                         "with a tail past 90 days (A)")
    kx_share: float = _rate(0.2, "a subscriber's visits that land from a Klaviyo email or SMS with _kx: 10-30% (A)")
    cookie_clear_rate: float = _rate(0.035, "browsers whose cookies are cleared in a month: 2-5% (A)")
    private_share: float = _rate(0.05, "sessions in a private window, a cookie for that session only: 3-8% (A)")
    shared_device_share: float = _rate(0.25, "households of two or more that share a tablet, each member shopping "
                                             "on it now and then (A)")
    forward_share: float = _rate(0.03, "Klaviyo email clicks made by someone other than the recipient: forwarded "
                                       "or shared links, now and then posted to a group (A)")
    placeholder_share: float = _rate(0.04, "first visits that answer the newsletter pop-up with a made-up address "
                                           "(A)")
    handoff_share: float = _rate(0.15, "in-app ad visits (Instagram, TikTok) continued in the phone's own browser "
                                       "(A)")
    backup_email_click_rate: float = _rate(
        0.09, "shoppers emailed by a backup abandoned-cart or abandoned-checkout flow who click its email and land on "
              "the store: Klaviyo measured a 9.5% click rate over 9.3 million abandoned-cart deliveries and gives "
              "7-12% for its flows, Omnisend 5.7% (A)")
    backup_return_purchase_rate: float = _rate(
        0.25, "of those clicks, the visits that buy the cart there and then: Omnisend's 2.4% orders per "
              "abandoned-cart email over its 5.7% clicks, about 40%, credits also orders by openers and on later "
              "visits, so the click's own visit is fewer, 20-30% (A)")

    def __post_init__(self) -> None:
        for rate in fields(self):
            value = getattr(self, rate.name)
            if rate.name == "return_gap_days":
                if not value > 0:
                    raise ValueError(f"return_gap_days must be positive (got {value})")
            elif not 0 <= value <= 1:
                raise ValueError(f"{rate.name} is a share between 0 and 1 (got {value})")


BAD_LINE_KINDS = (
    "truncated",  # not JSON: the collector cut the line
    "array",  # a JSON array instead of an object
    "missing_field",  # a required field is absent
    "wrong_type",  # event_id a number, or custom_data.value a string
    "bad_time",  # event_time not a timestamp
    "future_time",  # event_time 30 days ahead (a device clock or a replay bug)
    "empty_name",  # event_name ""
)

# What shoppers type into a pop-up to get the discount without giving an address, and what broken themes send.
# A few are on any block list; most are not, and only how many unrelated browsers type them gives them away. Each
# world draws its own handful, so no list fitted to one world catches the next.
PLACEHOLDER_EMAILS = (
    "test@test.com", "undefined", "", "none@none.com", "asdf@asdf.com", "a@a.com", "no@no.com", "abc@abc.com",
    "x@x.com", "email@email.com", "qwerty@qwerty.com", "fake@fake.com", "me@me.com", "123@123.com",
    "nope@nope.com", "sdfg@gmail.com", "aaa@aaa.com", "nothanks@gmail.com", "mail@mail.com", "xx@xx.xx",
)
PLACEHOLDERS_PER_WORLD = 5

# Visits (A): a returning shopper comes back once more after each visit with this probability, the same day
# (comparing, or finishing on another device) in this share of returns, else after a log-normal gap whose
# median is WorldRates.return_gap_days and whose spread puts about 7% of gaps past 90 days at a 3-week median.
KEEPS_RETURNING = 0.8
SAME_DAY_RETURN = 0.25
RETURN_GAP_SPREAD = 1.0

# Backup flows (the README's "Backup flows in Klaviyo"): an abandoned cart Klaviyo could not tie to a shopper, but
# the pixel's cookie could, is emailed by the backup flow named for its metric. The shopper's furthest step names
# the flow: a started checkout exits the cart flow ("moved on"), so it gets the checkout flow's email instead.
BACKUP_FLOW_OF = {flow.metric: flow for flow in BACKUP_FLOWS}
BACKUP_TRIGGERS = (("InitiateCheckout", BACKUP_FLOW_OF["Started Checkout"]),
                   ("AddToCart", BACKUP_FLOW_OF["Added to Cart"]))
# The first email goes when the native flow's would (Klaviyo's standard abandonment flows wait about 4 hours, the
# guide's first example), up to one sync later; the series' next email a day after (A). Most clicks come within
# hours of an email's arrival, and the link is followed no later than two days after the cart (A).
BACKUP_FIRST_WAIT = 4 * HOUR
BACKUP_SECOND_EMAIL = DAY
BACKUP_CLICKS_ON_FIRST = 0.7
BACKUP_CLICK_DELAY_MEDIAN = HOUR
BACKUP_RETURN_WITHIN = 2 * DAY
# Klaviyo's Smart Sending default: a profile emailed within this window is skipped, and the skipped email not resent.
SMART_SENDING = 16 * HOUR
# Emails are read where the inbox is: some clicks open on another of the shopper's devices (A).
BACKUP_OTHER_DEVICE = 0.2
BACKUP_LANDS_ON_CART = 0.5  # the email's "return to cart" button, else a product block's link (A)

REQUIRED_FIELDS = ("event_id", "event_name", "event_time", "shop", "anonymous_id", "session_id")

RETRY_RATE = 0.01
BAD_LINE_RATE = 0.002

# ---------------------------------------------------------------------------------------------------------------
# Reference data
# ---------------------------------------------------------------------------------------------------------------

EMAIL_DOMAINS = ("gmail.com", "icloud.com", "yahoo.com", "outlook.com", "hotmail.com", "proton.me")
EMAIL_DOMAIN_WEIGHTS = (46, 19, 12, 10, 9, 4)

FIRST_NAMES = (
    "Olivia", "Emma", "Ava", "Sophia", "Isabella", "Mia", "Amelia", "Harper", "Evelyn", "Abigail", "Emily",
    "Elizabeth", "Sofia", "Avery", "Ella", "Scarlett", "Grace", "Chloe", "Victoria", "Riley", "Aria", "Lily",
    "Zoë", "Nora", "Hannah", "Layla", "Priya", "Mei", "Aaliyah", "Camila", "Renée", "Maya", "Leah", "Naomi",
    "Liam", "Noah", "William", "James", "Oliver", "Benjamin", "Elijah", "Lucas", "Mason", "Logan", "Alexander",
    "Ethan", "Jacob", "Michael", "Daniel", "Henry", "Jackson", "Sebastian", "Aiden", "Matthew", "Samuel", "David",
    "Joseph", "Carter", "Owen", "Wyatt", "John", "Jack", "Luke", "Jayden", "Dylan", "Levi", "Isaac", "Gabriel",
    "José", "Mateo", "Arjun", "Wei", "Kwame", "Andre", "Marcus", "Tyler", "Ryan", "Nathan", "Caleb", "Julian",
)
LAST_NAMES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee",
    "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson", "Walker", "Young",
    "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green", "Adams", "Nelson", "Baker",
    "Hall", "Rivera", "Campbell", "Mitchell", "Carter", "Roberts", "Patel", "Kim", "Chen", "O'Brien", "Murphy",
    "Cook", "Rogers", "Morgan", "Peterson", "Cooper", "Reed", "Bailey", "Bell", "Gomez", "Kelly", "Howard", "Ward",
    "Cox", "Diaz", "Richardson", "Wood", "Watson", "Brooks", "Bennett", "Gray", "James", "Reyes", "Cruz", "Hughes",
    "Price", "Myers", "Long", "Foster", "Sanders", "Ross", "Morales", "Powell", "Sullivan", "Russell", "Ortiz",
)


@dataclass(frozen=True)
class City:
    name: str
    region: str
    country: str
    postal_prefix: str
    utc_offset_minutes: int  # standard time; the simulation ignores daylight saving
    area_codes: tuple[str, ...]
    weight: int


CITIES = (
    City("New York", "NY", "US", "100", -300, ("212", "646", "917"), 9),
    City("Brooklyn", "NY", "US", "112", -300, ("718", "347"), 6),
    City("Los Angeles", "CA", "US", "900", -480, ("213", "323", "310"), 9),
    City("San Francisco", "CA", "US", "941", -480, ("415", "628"), 5),
    City("San Diego", "CA", "US", "921", -480, ("619", "858"), 4),
    City("Seattle", "WA", "US", "981", -480, ("206",), 4),
    City("Portland", "OR", "US", "972", -480, ("503", "971"), 3),
    City("Phoenix", "AZ", "US", "850", -420, ("602", "480"), 4),
    City("Denver", "CO", "US", "802", -420, ("303", "720"), 4),
    City("Salt Lake City", "UT", "US", "841", -420, ("801",), 2),
    City("Austin", "TX", "US", "787", -360, ("512", "737"), 4),
    City("Dallas", "TX", "US", "752", -360, ("214", "972"), 5),
    City("Houston", "TX", "US", "770", -360, ("713", "832"), 5),
    City("Chicago", "IL", "US", "606", -360, ("312", "773"), 7),
    City("Minneapolis", "MN", "US", "554", -360, ("612",), 3),
    City("Nashville", "TN", "US", "372", -360, ("615",), 3),
    City("New Orleans", "LA", "US", "701", -360, ("504",), 2),
    City("Atlanta", "GA", "US", "303", -300, ("404", "470"), 5),
    City("Miami", "FL", "US", "331", -300, ("305", "786"), 5),
    City("Tampa", "FL", "US", "336", -300, ("813",), 3),
    City("Charlotte", "NC", "US", "282", -300, ("704", "980"), 3),
    City("Raleigh", "NC", "US", "276", -300, ("919",), 2),
    City("Washington", "DC", "US", "200", -300, ("202",), 3),
    City("Philadelphia", "PA", "US", "191", -300, ("215", "267"), 4),
    City("Pittsburgh", "PA", "US", "152", -300, ("412",), 2),
    City("Boston", "MA", "US", "021", -300, ("617", "857"), 4),
    City("Columbus", "OH", "US", "432", -300, ("614",), 2),
    City("Detroit", "MI", "US", "482", -300, ("313",), 2),
    City("Honolulu", "HI", "US", "968", -600, ("808",), 1),
    City("Toronto", "ON", "CA", "M5V", -300, ("416", "647"), 3),
    City("Vancouver", "BC", "CA", "V6B", -480, ("604", "778"), 2),
)
CITY_CUM_WEIGHTS = tuple(itertools.accumulate(c.weight for c in CITIES))

# Local hour of day -> relative traffic: quiet nights, a lunch bump and an evening peak.
DIURNAL = (1.0, 0.6, 0.4, 0.3, 0.3, 0.5, 1.0, 2.0, 3.0, 3.5, 4.0, 4.5,
           5.0, 5.0, 4.5, 4.5, 5.0, 5.5, 6.5, 8.0, 8.5, 7.5, 5.0, 2.5)
DIURNAL_CUM = tuple(itertools.accumulate(DIURNAL))

# (product title, category, brand, price, variants): 20 products x 3 variants = 60 catalogue entries.
PRODUCTS = (
    ("Everyday Crew Tee", "Apparel > T-Shirts", "North Loop", 28.0, ("Black / M", "Heather Grey / L", "Sage / S")),
    ("Heavyweight Hoodie", "Apparel > Hoodies", "North Loop", 72.0, ("Charcoal / M", "Oatmeal / L", "Navy / XL")),
    ("Relaxed Jogger", "Apparel > Pants", "North Loop", 64.0, ("Black / S", "Olive / M", "Grey / L")),
    ("Packable Rain Jacket", "Apparel > Outerwear", "Summit Supply", 128.0, ("Yellow / M", "Black / L", "Teal / S")),
    ("Merino Beanie", "Accessories > Hats", "Field & Pine", 34.0, ("Charcoal", "Rust", "Navy")),
    ("Canvas Tote", "Accessories > Bags", "Field & Pine", 38.0, ("Natural", "Black", "Forest")),
    ("Leather Card Wallet", "Accessories > Wallets", "Field & Pine", 48.0, ("Tan", "Black", "Oxblood")),
    ("Trail Socks 3-Pack", "Accessories > Socks", "Summit Supply", 24.0, ("S/M", "L/XL", "Kids")),
    ("Stoneware Mug", "Home > Kitchen", "Kiln & Co", 24.0, ("Speckled White", "Moss", "Slate")),
    ("Soy Candle", "Home > Candles", "Kiln & Co", 32.0, ("Cedar", "Fig", "Sea Salt")),
    ("Waffle Throw Blanket", "Home > Bedding", "Kiln & Co", 89.0, ("Ivory", "Clay", "Sage")),
    ("Bamboo Sheet Set", "Home > Bedding", "Kiln & Co", 149.0, ("Queen / White", "King / Oat", "Full / Sage")),
    ("Linen Pillow Cover", "Home > Decor", "Kiln & Co", 29.0, ("Flax", "Rust", "Indigo")),
    ("Ceramic Planter", "Home > Decor", "Kiln & Co", 42.0, ("Small", "Medium", "Large")),
    ("Daily Face Serum", "Beauty > Skincare", "Lumen Botanics", 46.0, ("30 ml", "50 ml", "Travel 10 ml")),
    ("Whipped Body Butter", "Beauty > Body", "Lumen Botanics", 26.0, ("Vanilla", "Unscented", "Grapefruit")),
    ("Mineral Sunscreen SPF 30", "Beauty > Skincare", "Lumen Botanics", 32.0, ("50 ml", "100 ml", "Tinted 50 ml")),
    ("Insulated Water Bottle", "Outdoor > Drinkware", "Summit Supply", 36.0,
     ("Glacier / 20 oz", "Forest / 32 oz", "Sand / 20 oz")),
    ("Cork Yoga Mat", "Outdoor > Fitness", "Summit Supply", 68.0, ("Standard", "Long", "Travel")),
    ("Trail Daypack 18L", "Outdoor > Bags", "Summit Supply", 96.0, ("Black", "Moss", "Ember")),
)

HOME_IP_BLOCKS = ("24.5", "67.180", "73.162", "98.207", "76.102", "108.28", "174.63", "71.229", "69.181", "99.33",
                  "68.4", "47.150", "107.77", "75.183", "50.35", "66.31")
CARRIER_NAT_BLOCKS = ("172.58", "172.56", "174.205", "107.115", "166.198")  # many phones share these addresses
PRIVATE_RELAY_BLOCKS = ("172.225", "104.28", "146.75")

IOS_VERSIONS = ("17_6_1", "18_1_1", "18_3_2", "18_5")
MAC_SAFARI_VERSIONS = ("17.6", "18.1", "18.3", "18.5")
CHROME_MAJORS = ("131", "133", "135", "137")
ANDROID_MODELS = (("14", "Pixel 8", "shiba"), ("15", "Pixel 9 Pro", "caiman"), ("14", "SM-S921U", "e1q"),
                  ("13", "SM-A536U", "a53x"), ("14", "moto g 5G - 2024", "fogona"))
IPHONE_MODELS = ("iPhone14,5", "iPhone15,2", "iPhone15,4", "iPhone16,1", "iPhone17,3")

KLAVIYO_CAMPAIGNS = ("Weekend Edit", "New Arrivals", "Back in Stock", "Browse Abandonment", "Cart Reminder",
                     "Fall Restock", "Members Early Access", "Gift Guide")
AD_CAMPAIGNS = ("prospecting_broad", "retargeting_7d", "lookalike_purchasers", "brand_search", "shopping_pmax",
                "ugc_creators")
DISCOUNTS = (("WELCOME10", 0.10), ("FREESHIP", 0.0), ("VIP15", 0.15))


# ---------------------------------------------------------------------------------------------------------------
# Public result
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulationSummary:
    out_dir: Path
    people: int
    events: int  # distinct valid events written (excluding duplicates and bad lines)
    event_lines: int  # all lines written to event files
    duplicate_lines: int  # pixel retries (exact re-sends of an already written event_id)
    bad_lines: int
    event_files: int
    customers: int


# ---------------------------------------------------------------------------------------------------------------
# Entities
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Product:
    """One sellable variant; `item` is its pixel line-item, prebuilt because it is serialised millions of times."""

    id: str
    name: str
    price: float
    sku: str
    variant: str
    brand: str
    category: str
    url: str
    image_url: str
    item: dict = field(repr=False, compare=False, hash=False)


@dataclass(slots=True, eq=False)
class Browser:
    """Mutable because cookies live and die as the simulation runs."""

    browser_id: str
    kind: str
    user_agent: str
    itp: bool  # WebKit (Safari, in-app on iOS): script cookies (Klaviyo's) capped at 7 days, 24 h if decorated
    device: Device
    anonymous_id: str | None = None
    fbp: str | None = None
    last_seen: int | None = None
    klaviyo_known: bool = False  # Klaviyo's cookie in this browser names the person
    klaviyo_expires: int = 0  # when Klaviyo's cookie dies unless a visit rewrites it
    busy_until: int = 0
    seen_in_window: bool = False


@dataclass(slots=True, eq=False)
class Device:
    device_id: str
    kind: str  # iphone, android, desktop, tablet
    home_ip: str
    ipv6_prefix: str | None
    private_relay: bool
    browsers: list[Browser] = field(default_factory=list)
    network_ip: str | None = None  # the phone's current network, kept for half an hour
    network_until: int = 0


@dataclass(slots=True, eq=False)
class Person:
    person_id: str
    household_id: str
    first_name: str
    last_name: str
    email: str
    phone: str | None  # E.164
    city: City
    postal_code: str
    customer_id: str | None
    kx: str
    subscribed: bool  # on the Klaviyo list, so receives emails to click
    consent: dict
    returning: bool  # comes back after the first visit
    staff: bool = False
    devices: list[Device] = field(default_factory=list)
    browser_cum_weights: list[float] = field(default_factory=list)
    session_browsers: list[Browser] = field(default_factory=list)


@dataclass(slots=True)
class SessionPlan:
    """What a session will be, decided up front so sessions can be generated in time order."""

    start: int
    seq: int
    person: Person
    browser: Browser
    scenario: str = "normal"
    channel: str = "direct"
    click_id: str | None = None  # fbclid, gclid or ttclid depending on channel
    kx: str | None = None  # the _kx on the landing URL (not necessarily the visitor's own)
    short: bool = False  # a glance: landing and one product, no cart
    private: bool = False  # a private window: a cookie of its own, forgotten when the session ends
    return_visit: bool = False  # the shopper has been here before: returning shoppers buy more (A)
    signup_email: str | None = None  # typed into a newsletter form (real or placeholder)
    checkout: str = "random"  # random | email (at least until the email is typed) | purchase
    checkout_email: str | None = None  # typed at checkout instead of the person's email (staff tests)
    landing_url: str | None = None  # fixed up front when two sessions must open the very same link
    landing_product: Product | None = None
    backup: _BackupClick | None = None  # the shopper follows a backup flow's email back to their cart


@dataclass
class _World:
    shop: str
    catalogue: list[Product]
    catalogue_cum_weights: list[float]
    people: list[Person]
    households: dict[str, list[Person]]
    carrier_nat_pool: list[str]
    placeholders: list[str]  # the made-up addresses this world's shoppers type, most popular first


# ---------------------------------------------------------------------------------------------------------------
# Random identifiers
# ---------------------------------------------------------------------------------------------------------------

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_URLSAFE = _ALNUM + "_-"
_BASE36 = "abcdefghijklmnopqrstuvwxyz0123456789"


class _Ids:
    """Opaque ids drawn from the run's generator, so a seed reproduces every cookie and click id."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def uuid(self) -> str:
        h = "%032x" % self.rng.getrandbits(128)
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"

    def token(self, n: int, alphabet: str = _ALNUM) -> str:
        return "".join(self.rng.choices(alphabet, k=n))

    def kx(self) -> str:
        return f"{self.token(43)}.{self.token(6)}"

    def fbclid(self) -> str:
        return "IwAR" + self.token(58, _URLSAFE)

    def gclid(self) -> str:
        return "Cj0KCQiA" + self.token(72, _URLSAFE)

    def ttclid(self) -> str:
        return "E_C_P_" + self.token(44, _URLSAFE)

    def fbp(self, at_ms: int) -> str:
        return f"fb.1.{at_ms}.{self.rng.randint(1_000_000_000, 2_147_483_647)}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _format_time(ms: int, style: int, offset_minutes: int) -> str:
    """Pixels disagree on formats; the instant is what matters, so the same moment appears as Z, +00:00 or local."""
    if style == 2:
        shifted = ms + offset_minutes * MINUTE
        sign = "-" if offset_minutes < 0 else "+"
        suffix = f"{sign}{abs(offset_minutes) // 60:02d}:{abs(offset_minutes) % 60:02d}"
    else:
        shifted = ms
        suffix = "Z" if style == 0 else "+00:00"
    seconds, millis = divmod(shifted, 1000)
    t = time.gmtime(seconds)
    return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
            f".{millis:03d}{suffix}")


# ---------------------------------------------------------------------------------------------------------------
# Building the world
# ---------------------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    out = "".join(ch.lower() if ch.isalnum() else "-" for ch in _ascii(text))
    return "-".join(part for part in out.split("-") if part)


def _build_catalogue(shop: str) -> list[Product]:
    """Fixed, not seeded: the same store sells the same things in every run."""
    catalogue = []
    for p_index, (title, category, brand, price, variants) in enumerate(PRODUCTS):
        product_id = str(8_031_245_000_000 + p_index * 7_919)
        handle = _slug(title)
        for v_index, variant in enumerate(variants):
            variant_id = 44_872_310_000_000 + p_index * 131 + v_index
            sku = f"{brand[:2].upper()}-{p_index + 1:03d}-{_slug(variant)[:10].upper()}"
            url = f"https://{shop}/products/{handle}?variant={variant_id}"
            image = f"https://cdn.shopify.com/s/files/1/0712/4839/2214/files/{handle}-{_slug(variant)}.jpg"
            item = {"id": product_id, "name": title, "price": price, "quantity": 1, "sku": sku, "variant": variant,
                    "brand": brand, "category": category, "url": url, "image_url": image}
            catalogue.append(Product(product_id, title, price, sku, variant, brand, category, url, image, item))
    return catalogue


class _WorldBuilder:
    """Builds people, households, devices and browsers; everything random comes from the run's generator."""

    def __init__(self, rng: random.Random, ids: _Ids, shop: str, window_start: int, rates: WorldRates) -> None:
        self.rng = rng
        self.ids = ids
        self.shop = shop
        self.window_start = window_start
        self.rates = rates
        self.emails: set[str] = set()
        self.phones: set[str] = set()
        self.browser_count = 0
        self.device_count = 0

    def build(self, visitors: int) -> _World:
        catalogue = _build_catalogue(self.shop)
        weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(catalogue))]
        order = list(range(len(catalogue)))
        self.rng.shuffle(order)  # which products are popular is the only seeded thing about the catalogue
        cum, acc = [0.0] * len(catalogue), 0.0
        for position, index in enumerate(order):
            cum[index] = weights[position]
        for i, w in enumerate(cum):
            acc += w
            cum[i] = acc
        nat_pool = [self._ip(self.rng.choice(CARRIER_NAT_BLOCKS)) for _ in range(max(8, visitors // 400))]

        staff_count = 0 if visitors < 10 else (1 if visitors < 1000 else 2)
        people: list[Person] = []
        households: dict[str, list[Person]] = {}
        while len(people) < visitors:
            size = 1 if staff_count > len(people) else self.rng.choices((1, 2, 3, 4), (70, 20, 8, 2))[0]
            size = min(size, visitors - len(people))
            household_id = f"H{len(households) + 1:06d}"
            members = self._household(household_id, size, len(people), staff=len(people) < staff_count)
            households[household_id] = members
            people.extend(members)
        placeholders = self.rng.sample(PLACEHOLDER_EMAILS, PLACEHOLDERS_PER_WORLD)
        return _World(self.shop, catalogue, cum, people, households, nat_pool, placeholders)

    def _ip(self, block: str) -> str:
        return f"{block}.{self.rng.randint(0, 255)}.{self.rng.randint(1, 254)}"

    def _household(self, household_id: str, size: int, offset: int, staff: bool) -> list[Person]:
        rng = self.rng
        city = CITIES[rng.choices(range(len(CITIES)), cum_weights=CITY_CUM_WEIGHTS)[0]]
        postal = self._postal_code(city)
        home_ip = self._ip(rng.choice(HOME_IP_BLOCKS))
        family_name = rng.choice(LAST_NAMES)
        members = []
        for i in range(size):
            last = family_name if (i == 0 or rng.random() < 0.7) else rng.choice(LAST_NAMES)
            person = self._person(f"P{offset + i + 1:06d}", household_id, rng.choice(FIRST_NAMES), last, city,
                                  postal, staff)
            self._devices(person, home_ip)
            members.append(person)
        return members

    def _postal_code(self, city: City) -> str:
        if city.country == "CA":
            return f"{city.postal_prefix} {self.rng.randint(1, 9)}{self.rng.choice('ABCEGHJKLMNPRSTVXY')}" \
                   f"{self.rng.randint(1, 9)}"
        return f"{city.postal_prefix}{self.rng.randint(1, 99):02d}"

    def _person(self, person_id: str, household_id: str, first: str, last: str, city: City, postal: str,
                staff: bool) -> Person:
        rng = self.rng
        has_account = not staff and rng.random() < 0.15
        subscribed = not staff and rng.random() < (0.6 if has_account else 0.15)
        marketing = rng.random() >= 0.05
        consent = {"analytics": rng.random() >= 0.03, "marketing": marketing, "sale_of_data": rng.random() >= 0.08}
        # the store's own audience (customers, subscribers who get its emails) comes back; of the rest, some do
        returning = has_account or subscribed or rng.random() < self.rates.returning_share
        customer_id = str(7_412_000_000_000 + int(person_id[1:]) * 1_000 + rng.randint(0, 999)) \
            if has_account else None
        return Person(person_id, household_id, first, last, self._email(first, last), self._phone(city),
                      city, postal, customer_id, self.ids.kx(), subscribed, consent, returning, staff)

    def _email(self, first: str, last: str) -> str:
        """Name-based with a short random tail: real-looking, unique, and unlikely to be someone's real inbox."""
        rng = self.rng
        f, l = _slug(first).replace("-", ""), _slug(last).replace("-", "")
        while True:
            tail = rng.choice(("", str(rng.randint(1, 99)), str(rng.randint(1960, 2006)))) + self.ids.token(3, _BASE36)
            local = rng.choice((f"{f}.{l}", f"{f}{l}", f"{f[0]}{l}", f"{f}_{l}", f"{f}{l[0]}", f"{l}.{f}")) + tail
            email = f"{local}@{rng.choices(EMAIL_DOMAINS, EMAIL_DOMAIN_WEIGHTS)[0]}"
            if email not in self.emails:
                self.emails.add(email)
                return email

    def _phone(self, city: City) -> str | None:
        """Fictional 555-01xx numbers first (NANP reserves them), so generated shoppers cannot be texted."""
        rng = self.rng
        if rng.random() < 0.15:
            return None
        for attempt in range(20):
            area = rng.choice(city.area_codes) if attempt < 10 else \
                f"{rng.randint(2, 9)}{rng.randint(0, 8)}{rng.randint(0, 9)}"
            number = f"+1{area}55501{rng.randint(0, 99):02d}"
            if number not in self.phones:
                self.phones.add(number)
                return number
        while True:  # only very large runs get here
            number = f"+1{rng.choice(city.area_codes)}{rng.randint(200, 999)}{rng.randint(0, 9999):04d}"
            if number not in self.phones and number[5:8] != "555":
                self.phones.add(number)
                return number

    def _devices(self, person: Person, home_ip: str) -> None:
        rng = self.rng
        kinds = []
        if person.staff:
            kinds = ["desktop"]
        else:
            if rng.random() < 0.95:
                kinds.append("iphone" if rng.random() < self.rates.safari_share else "android")
            if not kinds or rng.random() < 0.5:
                kinds.append("desktop")
            if len(kinds) < 3 and rng.random() < 0.12:
                kinds.append("tablet")
        for kind in kinds:
            device = self.new_device(kind, home_ip)
            if kind == "iphone":
                self.add_browser(device, "safari_ios")
                self._maybe_in_app(device)
            elif kind == "android":
                self.add_browser(device, "chrome_android")
                self._maybe_in_app(device)
            elif kind == "tablet":
                self.add_browser(device, "safari_ipad")
            else:
                mac = rng.random() < 0.4
                self.add_browser(device, "safari_mac" if mac and rng.random() < 0.6 else "chrome_desktop", mac=mac)
                if rng.random() < 0.15:
                    other = "chrome_desktop" if device.browsers[0].kind == "safari_mac" else \
                        ("safari_mac" if mac else "chrome_desktop")
                    self.add_browser(device, other, mac=mac)
            person.devices.append(device)
        self.refresh_browser_weights(person)

    def _maybe_in_app(self, device: Device) -> None:
        roll = self.rng.random()
        if roll < 0.35:
            self.add_browser(device, "instagram_inapp")
        elif roll < 0.50:
            self.add_browser(device, "tiktok_inapp")

    def new_device(self, kind: str, home_ip: str) -> Device:
        self.device_count += 1
        rng = self.rng
        ipv6 = None
        if kind in ("iphone", "android") and rng.random() < 0.3:
            ipv6 = f"2600:{rng.randint(0x380, 0x38f):x}:{rng.getrandbits(16):x}:{rng.getrandbits(16):x}"
        relay = kind == "iphone" and rng.random() < 0.2
        return Device(f"D{self.device_count:07d}", kind, home_ip, ipv6, relay)

    def add_browser(self, device: Device, kind: str, mac: bool = False) -> Browser:
        """Most browsers visited before the window: they carry the pixel's cookie from then."""
        self.browser_count += 1
        rng = self.rng
        # WebKit caps script cookies: Safari, and in-app browsers on an iPhone (WKWebView); Android's are WebViews.
        itp = kind in ("safari_ios", "safari_ipad", "safari_mac") or (
            kind.endswith("_inapp") and device.kind == "iphone")
        browser = Browser(f"B{self.browser_count:07d}", kind, self._user_agent(kind, mac, device.kind == "iphone"),
                          itp, device)
        if rng.random() < 0.6:
            browser.last_seen = self.window_start - rng.randint(HOUR, 40 * DAY)
            browser.anonymous_id = self.ids.uuid()
            browser.fbp = self.ids.fbp(browser.last_seen - rng.randint(0, 20 * DAY))
        device.browsers.append(browser)
        return browser

    def _user_agent(self, kind: str, mac: bool, iphone: bool) -> str:
        rng = self.rng
        ios = rng.choice(IOS_VERSIONS)
        ios_dot = ".".join(ios.split("_")[:2])
        chrome = rng.choice(CHROME_MAJORS)
        android, model, codename = rng.choice(ANDROID_MODELS)
        if kind == "safari_ios":
            return (f"Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 "
                    f"(KHTML, like Gecko) Version/{ios_dot} Mobile/15E148 Safari/604.1")
        if kind in ("safari_ipad", "safari_mac"):  # iPadOS Safari asks for the desktop site by default
            return (f"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                    f"Version/{rng.choice(MAC_SAFARI_VERSIONS)} Safari/605.1.15")
        if kind == "chrome_android":
            return (f"Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
                    f"Chrome/{chrome}.0.0.0 Mobile Safari/537.36")
        if kind == "chrome_desktop":
            platform = "Macintosh; Intel Mac OS X 10_15_7" if mac else "Windows NT 10.0; Win64; x64"
            return (f"Mozilla/5.0 ({platform}) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{chrome}.0.0.0 "
                    f"Safari/537.36")
        on_ios = iphone
        if kind == "instagram_inapp":
            if on_ios:
                return (f"Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 "
                        f"(KHTML, like Gecko) Mobile/15E148 Instagram 365.0.0.29.87 ({rng.choice(IPHONE_MODELS)}; "
                        f"iOS {ios}; en_US; en; scale=3.00; 1179x2556; 689103244)")
            return (f"Mozilla/5.0 (Linux; Android {android}; {model} Build/AP2A.240905.003; wv) AppleWebKit/537.36 "
                    f"(KHTML, like Gecko) Version/4.0 Chrome/{chrome}.0.6943.49 Mobile Safari/537.36 "
                    f"Instagram 365.0.0.40.94 Android ({int(android) + 20}/{android}; 420dpi; 1080x2400; "
                    f"{model}; {codename}; en_US; 689103251)")
        if on_ios:
            return (f"Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 "
                    f"(KHTML, like Gecko) Mobile/15E148 musical_ly_38.2.0 JsSdk/2.0 NetType/WIFI "
                    f"Channel/App Store ByteLocale/en Region/US WKWebView/1 BytedanceWebview/d8a21c6")
        return (f"Mozilla/5.0 (Linux; Android {android}; {model} Build/AP2A.240905.003; wv) AppleWebKit/537.36 "
                f"(KHTML, like Gecko) Version/4.0 Chrome/{chrome}.0.6943.49 Mobile Safari/537.36 trill_380203 "
                f"JsSdk/1.0 NetType/WIFI Channel/googleplay AppName/trill app_version/38.2.3 ByteLocale/en")

    @staticmethod
    def refresh_browser_weights(person: Person) -> None:
        """Phones dominate; in-app browsers only open from social apps, so they get little weight."""
        weight = {"safari_ios": 5.0, "chrome_android": 5.0, "chrome_desktop": 3.0, "safari_mac": 3.0,
                  "safari_ipad": 1.5, "instagram_inapp": 1.2, "tiktok_inapp": 0.8}
        browsers, cum, acc = [], [], 0.0
        for device in person.devices:
            for position, browser in enumerate(device.browsers):
                acc += weight[browser.kind] * (0.35 if position and device.kind == "desktop" else 1.0)
                browsers.append(browser)
                cum.append(acc)
        person.session_browsers = browsers
        person.browser_cum_weights = cum


def _seed_klaviyo_cookies(rng: random.Random, world: _World) -> None:
    """Klaviyo may already know a browser from before the window (a past click, checkout or form)."""
    for person in world.people:
        if person.staff:
            continue
        known_rate = 0.55 if (person.subscribed or person.customer_id) else 0.08
        for device in person.devices:
            for browser in device.browsers:
                if browser.last_seen is not None and rng.random() < known_rate:
                    browser.klaviyo_known = True
                    browser.klaviyo_expires = browser.last_seen + (KLAVIYO_COOKIE_ITP_TTL if browser.itp
                                                                   else KLAVIYO_COOKIE_TTL)


# ---------------------------------------------------------------------------------------------------------------
# Planning sessions
# ---------------------------------------------------------------------------------------------------------------


class _Planner:
    """Decides every session (who, where, when, how they arrive) before any event exists."""

    def __init__(self, rng: random.Random, ids: _Ids, builder: _WorldBuilder, world: _World, start: int,
                 end: int) -> None:
        self.rng = rng
        self.ids = ids
        self.builder = builder
        self.rates = builder.rates
        self.world = world
        self.start = start
        self.end = end
        self.plans: list[SessionPlan] = []
        # shared household tablets -> the members who have used it so far
        self.shared_tablets: dict[Device, set[str]] = {}

    def plan(self) -> list[SessionPlan]:
        shoppers = [p for p in self.world.people if not p.staff]
        self._shared_tablets()
        for person in shoppers:
            for visit, start in enumerate(self._visit_times(person)):
                self._visit(person, start, first=visit == 0, shoppers=shoppers)
        self._shared_ad_links(shoppers, max(3, round(len(self.world.people) * 0.003)))
        self._staff_tests()
        self.plans.sort(key=lambda plan: (plan.start, plan.seq))
        return self.plans

    def _visit_times(self, person: Person) -> list[int]:
        """The first visit anywhere in the window; a returning shopper comes back after long-tailed gaps, now and
        then twice the same day (comparing, or finishing on another device)."""
        rng = self.rng
        times = [self._local_time(person)]
        while person.returning:
            if rng.random() < SAME_DAY_RETURN:
                moment = times[-1] + HOUR + int(rng.lognormvariate(math.log(2 * HOUR), 1.0))
            else:
                gap = rng.lognormvariate(math.log(self.rates.return_gap_days * DAY), RETURN_GAP_SPREAD)
                moment = self._local_time_on(person, times[-1] + int(gap))
            if moment >= self.end:
                break
            times.append(moment)
            if rng.random() >= KEEPS_RETURNING:
                break
        return times

    def _visit(self, person: Person, start: int, first: bool, shoppers: list[Person]) -> None:
        rng, rates = self.rng, self.rates
        browser = self._pick_browser(person)
        channel = self._channel(person, browser)
        extra: dict = {"return_visit": not first}
        if browser.device in self.shared_tablets:
            extra["scenario"] = "shared_tablet"
            members_seen = self.shared_tablets[browser.device]
            if person.person_id not in members_seen:
                members_seen.add(person.person_id)
                # a member's first session on the family tablet often reveals them: a checkout or the pop-up
                roll = rng.random()
                if roll < 0.35:
                    extra["checkout"] = "email"
                elif roll < 0.6:
                    extra["signup_email"] = person.email
        elif first and not person.subscribed:  # the newsletter pop-up greets a first visit
            roll = rng.random()
            if roll < rates.placeholder_share:
                extra.update(scenario="placeholder_email", signup_email=self._placeholder())
            elif roll < rates.placeholder_share + 0.05:
                extra["signup_email"] = person.email
        in_app = browser.kind.endswith("_inapp")
        if not in_app and rng.random() < rates.private_share:
            extra["private"] = True
        if in_app and channel.endswith("_ad") and rng.random() < rates.handoff_share:
            self._in_app_handoff(person, browser, start, channel)
            return
        plan = self._add(person, browser, start, channel=channel, **extra)
        if channel == "klaviyo" and rng.random() < rates.forward_share:
            self._forwarded_email(person, plan, shoppers)

    def _placeholder(self) -> str:
        placeholders = self.world.placeholders
        return self.rng.choices(placeholders, [1 / (rank + 1) for rank in range(len(placeholders))])[0]

    def _add(self, person: Person, browser: Browser, start: int, **kwargs) -> SessionPlan:
        plan = SessionPlan(start, len(self.plans), person, browser, **kwargs)
        self.plans.append(plan)
        return plan

    def _local_time(self, person: Person, hours: Iterable[int] | None = None) -> int:
        """A moment in the window at a plausible local hour for the person, wrapped into the window."""
        rng = self.rng
        span = self.end - self.start
        day = rng.randrange(max(1, span // DAY))
        if hours is None:
            hour = rng.choices(range(24), cum_weights=DIURNAL_CUM)[0]
        else:
            hour = rng.choice(list(hours))
        local = day * DAY + hour * HOUR + rng.randrange(HOUR)
        return self.start + (local - person.city.utc_offset_minutes * MINUTE) % span

    def _local_time_on(self, person: Person, moment: int) -> int:
        """A plausible local hour of the person's day that contains `moment` (not wrapped: it may fall past the end)."""
        offset = person.city.utc_offset_minutes * MINUTE
        midnight = (moment + offset) // DAY * DAY - offset
        hour = self.rng.choices(range(24), cum_weights=DIURNAL_CUM)[0]
        return midnight + hour * HOUR + self.rng.randrange(HOUR)

    def _product(self) -> Product:
        return self.rng.choices(self.world.catalogue, cum_weights=self.world.catalogue_cum_weights)[0]

    def _pick_browser(self, person: Person) -> Browser:
        return person.session_browsers[
            self.rng.choices(range(len(person.session_browsers)), cum_weights=person.browser_cum_weights)[0]]

    def _channel(self, person: Person, browser: Browser) -> str:
        rng = self.rng
        if browser.kind == "instagram_inapp":
            return "instagram_ad" if rng.random() < 0.8 else "instagram_social"
        if browser.kind == "tiktok_inapp":
            return "tiktok_ad" if rng.random() < 0.75 else "tiktok_social"
        if person.subscribed and rng.random() < self.rates.kx_share:
            return "klaviyo"
        channels = ("direct", "organic", "google_ad", "facebook_ad", "tiktok_ad", "referral")
        weights = (28, 24, 11, 9, 3 if browser.device.kind != "desktop" else 0, 5)
        return rng.choices(channels, weights)[0]

    def _shared_tablets(self) -> None:
        """Some households share an iPad: it becomes one of each member's devices, used at their own times."""
        for members in self.world.households.values():
            if len(members) < 2 or members[0].staff or self.rng.random() >= self.rates.shared_device_share:
                continue
            device = self.builder.new_device("tablet", members[0].devices[0].home_ip)
            self.builder.add_browser(device, "safari_ipad")
            self.shared_tablets[device] = set()
            for person in members:
                person.devices.append(device)
                self.builder.refresh_browser_weights(person)

    def _forwarded_email(self, sender: Person, click: SessionPlan, shoppers: list[Person]) -> None:
        """Klaviyo documents it: a forwarded campaign identifies the reader as the original recipient. Now and then
        the link is posted to a group chat and opened by many."""
        family = [p for p in self.world.households[sender.household_id] if p is not sender]
        posted = self.rng.random() < 0.1
        readers = self.rng.sample(shoppers, min(len(shoppers), self.rng.randint(4, 12))) if posted else \
            [self.rng.choice(family) if family and self.rng.random() < 0.5 else self.rng.choice(shoppers)]
        for reader in readers:
            if reader is sender:
                continue
            browser = self._pick_browser(reader)
            if browser.kind.endswith("_inapp"):
                browser = reader.session_browsers[0]
            start = click.start + self.rng.randint(10 * MINUTE, 3 * DAY)
            if start < self.end:
                self._add(reader, browser, start, scenario="forwarded_email", channel="klaviyo", kx=sender.kx)

    def _in_app_handoff(self, person: Person, in_app: Browser, start: int, channel: str) -> None:
        """An ad opens in Instagram's browser, the shopper taps 'Open in Safari': same click, second browser."""
        product = self._product()
        url, click = _landing_url(self.rng, self.ids, self.world.shop, channel, product, person.kx, None)
        link = {"click_id": click, "landing_url": url, "landing_product": product}
        self._add(person, in_app, start, scenario="in_app_handoff", channel=channel, short=True, **link)
        self._add(person, in_app.device.browsers[0], start + self.rng.randint(1 * MINUTE, 6 * MINUTE),
                  scenario="in_app_handoff", channel=channel + "_handoff", **link)

    def _shared_ad_links(self, shoppers: list[Person], count: int) -> None:
        """A shopper texts a product link copied from a Google ad; the gclid travels with it."""
        if len(shoppers) < 2:
            return
        for _ in range(count):
            clicker, friend = self.rng.sample(shoppers, 2)
            product = self._product()
            url, gclid = _landing_url(self.rng, self.ids, self.world.shop, "google_ad", product, clicker.kx, None)
            link = {"click_id": gclid, "landing_url": url, "landing_product": product}
            delay = self.rng.randint(5 * MINUTE, max(5 * MINUTE, min(2 * DAY, (self.end - self.start) // 2)))
            start = self._local_time(clicker)
            if start + delay >= self.end:  # keep both visits inside the window
                start -= delay
            clicker_browser = self._pick_browser(clicker)
            if clicker_browser.kind.endswith("_inapp"):
                clicker_browser = clicker.session_browsers[0]
            friend_browser = friend.session_browsers[0]
            self._add(clicker, clicker_browser, start, scenario="shared_ad_link", channel="google_ad", **link)
            self._add(friend, friend_browser, start + delay, scenario="shared_ad_link", channel="shared_link", **link)

    def _staff_tests(self) -> None:
        """Staff place test orders from the office with the store's support address after each theme change."""
        support = f"support@{self.world.shop}"
        days = max(1, (self.end - self.start) // DAY)
        for person in (p for p in self.world.people if p.staff):
            browser = person.session_browsers[0]
            for _ in range(days):
                for _ in range(self.rng.randint(1, 2)):
                    self._add(person, browser, self._local_time(person, range(9, 18)), scenario="staff_test",
                              channel="direct", checkout="purchase", checkout_email=support)


# ---------------------------------------------------------------------------------------------------------------
# Generating events
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Hit:
    """One valid event and who truly did it."""

    t: int
    event: dict
    truth: tuple[str, str, str, str, str, str]


class _SessionRunner:
    """Turns a plan into events, updating the browser's cookies as a real browser would."""

    def __init__(self, rng: random.Random, ids: _Ids, world: _World, rates: WorldRates) -> None:
        self.rng = rng
        self.ids = ids
        self.world = world
        self.rates = rates
        self.shop = world.shop
        self.order_number = 6_112_004_000_000

    # -- cookies ------------------------------------------------------------------------------------------------

    def _open_cookie(self, browser: Browser, start: int) -> bool:
        """Returns True when this visit starts on a fresh cookie that replaced one seen earlier in the window.

        The pixel's cookie is set by the shop's server, so no browser caps it inside the window: it goes only
        when the shopper clears the browser's cookies (Klaviyo's go with it), at `cookie_clear_rate` a month.
        """
        if browser.anonymous_id is None:
            self._new_cookie(browser, start)
            return False
        months_away = (start - browser.last_seen) / MONTH if browser.last_seen is not None else 0.0
        if self.rng.random() < 1 - (1 - self.rates.cookie_clear_rate) ** months_away:
            self._new_cookie(browser, start)
            return browser.seen_in_window
        return False

    def _new_cookie(self, browser: Browser, at: int) -> None:
        browser.anonymous_id = self.ids.uuid()
        browser.fbp = self.ids.fbp(at)
        browser.klaviyo_known = False

    @staticmethod
    def klaviyo_page_view(browser: Browser, t: int, decorated: bool) -> bool:
        """klaviyo.js runs on every page: its cookie is gone if it expired, else rewritten with a new expiry.
        Returns whether the cookie names the person (`klaviyo_identified`)."""
        if t > browser.klaviyo_expires:
            browser.klaviyo_known = False
        if not browser.itp:
            browser.klaviyo_expires = t + KLAVIYO_COOKIE_TTL
        else:
            browser.klaviyo_expires = t + (KLAVIYO_COOKIE_DECORATED_TTL if decorated else KLAVIYO_COOKIE_ITP_TTL)
        return browser.klaviyo_known

    # -- the session --------------------------------------------------------------------------------------------

    def run(self, plan: SessionPlan) -> list[_Hit]:
        """A private window gets cookies of its own, gone when it closes; the browser's own are left as they were."""
        if not plan.private:
            return self._run(plan)
        browser = plan.browser
        kept = (browser.anonymous_id, browser.fbp, browser.klaviyo_known, browser.klaviyo_expires, browser.last_seen,
                browser.seen_in_window)
        browser.anonymous_id, browser.fbp = self.ids.uuid(), None
        browser.klaviyo_known, browser.klaviyo_expires = False, 0
        hits = self._run(plan)
        (browser.anonymous_id, browser.fbp, browser.klaviyo_known, browser.klaviyo_expires, browser.last_seen,
         browser.seen_in_window) = kept
        return hits

    def _run(self, plan: SessionPlan) -> list[_Hit]:
        rng, person, browser = self.rng, plan.person, plan.browser
        reset = not plan.private and self._open_cookie(browser, plan.start)
        scenario = "cookie_reset" if reset and plan.scenario == "normal" else plan.scenario
        if plan.private and scenario == "normal":
            scenario = "private_browsing"
        session = _Session(self, plan, scenario)
        t = plan.start

        landing_product, page, came_from = self._landing(plan, session)
        session.emit("PageView", t, page, came_from)
        if plan.kx:
            session.klaviyo_learns(t)
        if plan.backup is not None:
            self._backup_return(session, plan, t, landing_product, page, came_from)
            return session.hits
        if person.customer_id and not plan.short and browser.kind not in ("instagram_inapp", "tiktok_inapp") \
                and plan.scenario != "staff_test" and rng.random() < 0.15:
            t += rng.randint(10 * SECOND, 60 * SECOND)
            page, came_from = f"https://{self.shop}/account/login", page
            session.login(t, page, came_from)
        if not plan.short and rng.random() < 0.06:
            t += rng.randint(5 * SECOND, 40 * SECOND)
            term = rng.choice(landing_product.name.lower().split())
            page, came_from = f"https://{self.shop}/search?q={term}", page
            session.emit("Search", t, page, came_from, custom={"search_term": term})

        viewed = []
        views = 1 if plan.short else rng.choices((1, 2, 3, 4, 5), (22, 24, 22, 17, 15))[0]
        for index in range(views):
            product = landing_product if index == 0 else self._product()
            t += rng.randint(3 * SECOND, 150 * SECOND)
            if not page.startswith(product.url):  # a landing product page keeps its query string
                page, came_from = product.url, page
            session.emit("ViewContent", t, page, came_from, custom=self._money(product.price, [product.item]))
            viewed.append(product)
            if index == 0 and plan.signup_email is not None:
                t += rng.randint(10 * SECOND, 50 * SECOND)
                session.signup(t, page, came_from, plan.signup_email)
        if plan.short:
            return session.hits

        cart_rate = 0.4 if plan.return_visit or plan.channel == "klaviyo" else 0.28
        wants_checkout = plan.checkout != "random"
        if not wants_checkout and rng.random() >= cart_rate:
            return session.hits
        cart: list[dict] = []
        for _ in range(2 if rng.random() < 0.15 else 1):
            product = viewed[-1] if rng.random() < 0.75 else rng.choice(viewed)
            if not page.startswith(product.url):  # went back to an earlier product page to add it
                page, came_from = product.url, page
            quantity = rng.choices((1, 2, 3), (85, 12, 3))[0]
            line = product.item if quantity == 1 else {**product.item, "quantity": quantity}
            cart.insert(0, line)
            t += rng.randint(5 * SECOND, 60 * SECOND)
            session.emit("AddToCart", t, page, came_from, custom=self._money(self._total(cart), list(cart)))
        if not wants_checkout and rng.random() >= 0.40:
            return session.hits
        self._checkout(session, plan, t, cart, page)
        return session.hits

    def _checkout(self, session: _Session, plan: SessionPlan, t: int, cart: list[dict], page: str) -> None:
        rng = self.rng
        checkout_url = f"https://{self.shop}/checkouts/cn/{self.ids.token(26, _ALNUM[:26] + '0123456789')}"
        subtotal = self._total(cart)
        email = plan.checkout_email or plan.person.email
        if session.external_id or rng.random() < 0.45:  # logged in, Shop Pay or a remembered checkout
            session.type_email(email)
        t += rng.randint(10 * SECOND, 120 * SECOND)
        custom = {"value": subtotal, "currency": "USD", "items": cart, "checkout_url": checkout_url}
        session.emit("InitiateCheckout", t, checkout_url, page, custom=custom, checkout=True)

        force = plan.checkout != "random"
        if not force and rng.random() >= 0.85:
            return
        session.type_email(email)
        session.type_address()
        t += rng.randint(30 * SECOND, 180 * SECOND)
        steps = {"value": subtotal, "currency": "USD", "checkout_url": checkout_url}
        session.emit("AddShippingInfo", t, checkout_url, checkout_url, custom=steps, checkout=True)
        if plan.checkout != "purchase" and rng.random() >= 0.85:
            return
        t += rng.randint(20 * SECOND, 150 * SECOND)
        session.emit("AddPaymentInfo", t, checkout_url, checkout_url, custom=steps, checkout=True)
        if plan.checkout != "purchase" and rng.random() >= 0.69:
            return
        t += rng.randint(5 * SECOND, 40 * SECOND)
        self.order_number += rng.randint(1, 40)
        codes, value = self._discount(plan, subtotal)
        purchase = {"value": value, "currency": "USD", "items": cart, "order_id": str(self.order_number),
                    "discount_codes": codes, "checkout_url": checkout_url}
        session.emit("Purchase", t, f"{checkout_url}/thank-you", checkout_url, custom=purchase, checkout=True)

    def _backup_return(self, session: _Session, plan: SessionPlan, t: int, landing_product: Product, page: str,
                       came_from: str | None) -> None:
        """The email brings the shopper back to the cart they left: whether they buy it was decided with the
        click (`backup_return_purchase_rate`), so a visit that does not buy only looks around."""
        rng = self.rng
        if page.startswith(landing_product.url):
            t += rng.randint(3 * SECOND, 40 * SECOND)
            session.emit("ViewContent", t, page, came_from,
                         custom=self._money(landing_product.price, [landing_product.item]))
        if plan.checkout == "purchase":
            t += rng.randint(10 * SECOND, 90 * SECOND)
            self._checkout(session, plan, t, list(plan.backup.cart), page)
            return
        for _ in range(rng.choices((0, 1, 2), (40, 40, 20))[0]):
            product = self._product()
            t += rng.randint(5 * SECOND, 120 * SECOND)
            page, came_from = product.url, page
            session.emit("ViewContent", t, page, came_from, custom=self._money(product.price, [product.item]))

    def _discount(self, plan: SessionPlan, subtotal: float) -> tuple[list[str], float]:
        if plan.scenario == "staff_test":
            return ["STAFFTEST100"], 0.0
        shipping = 0.0 if subtotal >= 75 else 6.95
        roll = self.rng.random()
        if roll < 0.25:
            code, rate = DISCOUNTS[0] if roll < 0.15 else DISCOUNTS[1 if roll < 0.2 else 2]
            shipping = 0.0 if code == "FREESHIP" else shipping
            return [code], round(subtotal * (1 - rate) + shipping, 2)
        return [], round(subtotal + shipping, 2)

    # -- pieces -------------------------------------------------------------------------------------------------

    def _product(self) -> Product:
        return self.rng.choices(self.world.catalogue, cum_weights=self.world.catalogue_cum_weights)[0]

    @staticmethod
    def _money(value: float, items: list[dict]) -> dict:
        return {"value": value, "currency": "USD", "items": items}

    @staticmethod
    def _total(cart: list[dict]) -> float:
        return round(sum(line["price"] * line["quantity"] for line in cart), 2)

    def _landing(self, plan: SessionPlan, session: _Session) -> tuple[Product, str, str | None]:
        """The landing URL and referrer say how the shopper arrived; the ids in the URL also go into user_data."""
        rng, channel = self.rng, plan.channel
        product = plan.landing_product or self._product()
        url = plan.landing_url
        if url is None:
            url, plan.click_id = _landing_url(rng, self.ids, self.shop, channel, product, plan.kx or plan.person.kx,
                                              plan.click_id)
        in_app = plan.browser.kind.endswith("_inapp")
        session.decorated = any(f"{name}=" in url for name in DECORATIONS)
        if channel == "klaviyo":
            plan.kx = plan.kx or plan.person.kx
            session.base["kx"] = plan.kx
            referrer = rng.choice((None, None, "https://mail.google.com/", "https://outlook.live.com/"))
        elif channel in FACEBOOK_CHANNELS:
            session.base["fbc"] = f"fb.1.{plan.start}.{plan.click_id}"  # the _fbc cookie is written on landing
            referrer = None if in_app or channel.endswith("_handoff") else \
                ("https://l.facebook.com/" if channel == "facebook_ad" else "https://l.instagram.com/")
        elif channel in TIKTOK_CHANNELS:
            session.base["ttclid"] = plan.click_id
            referrer = None
        elif channel in GOOGLE_CHANNELS:
            session.base["gclid"] = plan.click_id
            referrer = "https://www.google.com/" if channel == "google_ad" else None  # a pasted link has none
        elif channel == "organic":
            referrer = rng.choice(("https://www.google.com/", "https://www.google.com/", "https://www.bing.com/",
                                   "https://duckduckgo.com/"))
        elif channel == "referral":
            referrer = rng.choice(("https://www.reddit.com/", "https://www.pinterest.com/",
                                   "https://thekitchn.com/best-mugs", "https://www.youtube.com/"))
        elif channel in ("instagram_social", "tiktok_social"):
            referrer = "https://www.instagram.com/" if channel == "instagram_social" else "https://www.tiktok.com/"
        else:
            referrer = None
        return product, url, referrer


FACEBOOK_CHANNELS = ("facebook_ad", "instagram_ad", "instagram_ad_handoff")
DECORATIONS = ("_kx", "fbclid", "gclid", "ttclid")  # query parameters that make a landing "decorated" for WebKit
TIKTOK_CHANNELS = ("tiktok_ad", "tiktok_ad_handoff")
GOOGLE_CHANNELS = ("google_ad", "shared_link")


def _landing_url(rng: random.Random, ids: _Ids, shop: str, channel: str, product: Product, kx: str,
                 click_id: str | None) -> tuple[str, str | None]:
    """Returns the landing URL and the click id in it (drawn here unless the click already exists)."""
    page = product.url if rng.random() < 0.7 else f"https://{shop}/collections/{_slug(product.category)}"
    sep = "&" if "?" in page else "?"
    if channel == "direct":
        return (f"https://{shop}/" if rng.random() < 0.6 else page), None
    if channel in ("organic", "referral"):
        return page, None
    if channel == "klaviyo":
        campaign = rng.choice(KLAVIYO_CAMPAIGNS).replace(" ", "%20")
        return f"{page}{sep}_kx={kx}&utm_source=klaviyo&utm_medium=email&utm_campaign={campaign}", None
    if channel in ("instagram_social", "tiktok_social"):
        source = "ig" if channel == "instagram_social" else "tiktok"
        return f"{page}{sep}utm_source={source}&utm_medium=social&utm_content=link_in_bio", None
    campaign = rng.choice(AD_CAMPAIGNS)
    if channel in FACEBOOK_CHANNELS:
        click_id = click_id or ids.fbclid()
        source = "facebook" if channel == "facebook_ad" else "instagram"
        return f"{page}{sep}utm_source={source}&utm_medium=paid&utm_campaign={campaign}&fbclid={click_id}", click_id
    if channel in TIKTOK_CHANNELS:
        click_id = click_id or ids.ttclid()
        return f"{page}{sep}utm_source=tiktok&utm_medium=paid&utm_campaign={campaign}&ttclid={click_id}", click_id
    click_id = click_id or ids.gclid()
    return f"{page}{sep}gclid={click_id}&utm_source=google&utm_medium=cpc&utm_campaign={campaign}", click_id


_EMAIL_AS_TYPED = ("as_is", "capitalised", "upper", "spaces")


class _Session:
    """Per-session state: the user_data every event shares and what the shopper has revealed so far."""

    __slots__ = ("runner", "plan", "scenario", "session_id", "base", "external_id", "typed_email",
                 "email_reported", "address", "hits", "time_offset", "truth_prefix", "decorated")

    def __init__(self, runner: _SessionRunner, plan: SessionPlan, scenario: str) -> None:
        self.runner = runner
        self.plan = plan
        self.scenario = scenario
        self.session_id = runner.ids.uuid()
        browser, person = plan.browser, plan.person
        self.base: dict = {"client_ip_address": self._ip(), "client_user_agent": browser.user_agent}
        if browser.fbp and person.consent["marketing"]:
            self.base["fbp"] = browser.fbp
        self.external_id: str | None = None
        self.typed_email: dict | None = None
        self.email_reported = False
        self.address: dict | None = None
        self.hits: list[_Hit] = []
        self.time_offset = person.city.utc_offset_minutes
        self.truth_prefix = (person.person_id, person.email, browser.browser_id, self.session_id, scenario)
        self.decorated = False  # landed from a link carrying _kx or an ad click id (set with the landing page)

    def _ip(self) -> str:
        """Phones move between home Wi-Fi, carrier NAT (shared by many) and IPv6, but keep one network for a while."""
        rng, device, start = self.runner.rng, self.plan.browser.device, self.plan.start
        if device.kind in ("desktop", "tablet"):
            return device.home_ip
        if device.private_relay and self.plan.browser.kind == "safari_ios":
            return f"{rng.choice(PRIVATE_RELAY_BLOCKS)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        if device.network_ip is not None and start <= device.network_until:
            ip = device.network_ip
        else:
            roll = rng.random()
            if roll < 0.55:
                ip = device.home_ip
            elif device.ipv6_prefix and roll < 0.75:
                ip = f"{device.ipv6_prefix}:{rng.getrandbits(16):x}:{rng.getrandbits(16):x}:" \
                     f"{rng.getrandbits(16):x}:{rng.getrandbits(16):x}"
            else:
                ip = rng.choice(self.runner.world.carrier_nat_pool)
        device.network_ip, device.network_until = ip, start + 30 * MINUTE
        return ip

    def emit(self, name: str, t: int, url: str | None, referrer: str | None, custom: dict | None = None,
             checkout: bool = False, extra: dict | None = None) -> dict:
        runner, browser = self.runner, self.plan.browser
        user = dict(self.base)
        if self.external_id:
            user["external_id"] = self.external_id
        if checkout and self.typed_email:
            user.update(self.typed_email)
            if self.address:
                user.update(self.address)
        if extra:
            user.update(extra)
        user["klaviyo_identified"] = runner.klaviyo_page_view(browser, t, self.decorated)
        roll = runner.rng.random()
        style = 0 if roll < 0.45 else (1 if roll < 0.8 else 2)
        event_id = runner.ids.uuid()
        event = {"event_id": event_id, "event_name": name, "event_time": _format_time(t, style, self.time_offset),
                 "shop": runner.shop, "anonymous_id": browser.anonymous_id, "session_id": self.session_id,
                 "event_source_url": url, "referrer": referrer, "user_data": user}
        if custom is not None:
            event["custom_data"] = custom
        event["consent"] = self.plan.person.consent
        self.hits.append(_Hit(t, event, (event_id, *self.truth_prefix)))
        if checkout and self.typed_email and not self.email_reported:
            self.email_reported = True  # Klaviyo's checkout sync learns the email from this event on
            self.klaviyo_learns(t)
        browser.last_seen = t
        browser.busy_until = t
        browser.seen_in_window = True
        return event

    def klaviyo_learns(self, t: int) -> None:
        self.plan.browser.klaviyo_known = True

    def _as_typed(self, email: str) -> str:
        style = self.runner.rng.choices(_EMAIL_AS_TYPED, (82, 8, 3, 7))[0]
        if style == "capitalised":
            return email[:1].upper() + email[1:]
        if style == "upper":
            return email.upper()
        if style == "spaces":
            return self.runner.rng.choice((f" {email}", f"{email} ", f"  {email} "))
        return email

    @staticmethod
    def _looks_like_email(value: str) -> bool:
        local, _, domain = value.strip().partition("@")
        return bool(local) and "." in domain

    def _email_fields(self, typed: str) -> dict:
        return {"email": typed, "em": _sha256(typed.strip().lower())}

    def login(self, t: int, page: str, came_from: str | None) -> None:
        person = self.plan.person
        self.emit("Identify", t, page, came_from, extra={**self._email_fields(self._as_typed(person.email)),
                                                         "external_id": person.customer_id})
        self.external_id = person.customer_id
        self.klaviyo_learns(t)

    def signup(self, t: int, page: str, came_from: str | None, email: str) -> None:
        typed = self._as_typed(email) if "@" in email else email  # theme bugs send "undefined" verbatim
        self.emit("Identify", t, page, came_from, extra=self._email_fields(typed))
        if self._looks_like_email(typed):
            self.klaviyo_learns(t)

    def type_email(self, email: str) -> None:
        if self.typed_email is None:
            self.typed_email = self._email_fields(self._as_typed(email))

    def type_address(self) -> None:
        if self.address is not None:
            return
        rng, person = self.runner.rng, self.plan.person
        first, last = person.first_name, person.last_name
        if rng.random() < 0.1:
            first, last = first.lower(), last.lower()
        address = {"first_name": first, "last_name": last, "city": person.city.name, "region": person.city.region,
                   "zip": person.postal_code, "country": person.city.country}
        if person.phone and rng.random() < 0.75:
            address["phone"] = _typed_phone(rng, person.phone)
            address["ph"] = _sha256(person.phone)
        self.address = address


def _typed_phone(rng: random.Random, e164: str) -> str:
    """Shoppers type phones every way imaginable; the pipeline must normalise them."""
    area, exchange, line = e164[2:5], e164[5:8], e164[8:]
    return rng.choice((f"({area}) {exchange}-{line}", f"+1 {area} {exchange} {line}", f"{area}{exchange}{line}",
                       f"{area}-{exchange}-{line}", f"1{area}{exchange}{line}", f"{area}.{exchange}.{line}",
                       e164))


# ---------------------------------------------------------------------------------------------------------------
# Backup flows
# ---------------------------------------------------------------------------------------------------------------

BACKUP_TRUTH_HEADER = ("abandoned_session_id", "person_id", "flow", "utm_campaign", "sent_at", "return_session_id",
                       "order_id", "order_value")


@dataclass(slots=True, eq=False)
class _BackupEmail:
    """A backup flow's email on its way: sent only if nothing calls it off before it is due."""

    person: Person
    browser: Browser  # where the cart was left
    flow: BackupFlow
    cart: list[dict]
    abandoned_session_id: str
    abandoned_at: int


@dataclass(slots=True, eq=False)
class _BackupClick:
    flow: BackupFlow
    cart: list[dict]
    abandoned_at: int
    truth: list  # the email's truth row, told the return session and its order once they happen


class _BackupFlows:
    """What recovered-revenue reporting measures: shoppers who come back, and sometimes buy, through a backup
    flow's email.

    The world emails exactly those the product exists for: a cart (or a started checkout) left in a session Klaviyo
    could not identify itself (no page of it known to Klaviyo's cookie, no email typed in it), by a shopper who
    allows marketing and had revealed themselves on that very cookie in an earlier session (their email, customer
    login or own `_kx` in a line the pixel delivered), which is what a deterministic resolver can use. Klaviyo's own
    flows answer the rest, and their links never carry the backup campaign. A flow's filters call an email off when
    the shopper has bought since (Shopify's Placed Order) and Smart Sending skips it when they had a backup email
    within its window. Decisions are drawn from a generator of their own, so a world whose click rate is 0 is the
    world without backup flows, line for line.
    """

    def __init__(self, seed: int, rates: WorldRates, shop: str, end: int) -> None:
        self.rng = random.Random(f"backup-flows/{seed}")
        self.rates = rates
        self.shop = shop
        self.end = end
        self.revealed: dict[str, set[str]] = {}  # anonymous_id -> people whose own identity the pixel saw on it
        self.last_purchase: dict[str, int] = {}
        self.last_email: dict[str, int] = {}
        self.truth: list[list] = []

    def after_session(self, plan: SessionPlan, hits: list[_Hit], delivered: list[_Hit]) -> _BackupEmail | None:
        """Learns what the session revealed and returns the backup email its abandoned cart earns, if any."""
        if not hits:
            return None
        person = plan.person
        anonymous_id = hits[0].event["anonymous_id"]
        email = None
        purchases = [hit.t for hit in hits if hit.event["event_name"] == "Purchase"]
        if purchases:
            self.last_purchase[person.person_id] = purchases[-1]
        elif (not person.staff and person.consent["marketing"]
              and person.person_id in self.revealed.get(anonymous_id, ())
              and not any(hit.event["user_data"].get("klaviyo_identified") or hit.event["user_data"].get("email")
                          for hit in hits)):
            email = self._email_for(person, plan.browser, delivered)
        for hit in delivered:
            if self._reveals(person, hit.event["user_data"]):
                self.revealed.setdefault(anonymous_id, set()).add(person.person_id)
                break
        return email

    @staticmethod
    def _reveals(person: Person, user: dict) -> bool:
        typed = user.get("email")
        return (user.get("kx") == person.kx
                or (person.customer_id is not None and user.get("external_id") == person.customer_id)
                or (typed is not None and typed.strip().lower() == person.email))

    def _email_for(self, person: Person, browser: Browser, delivered: list[_Hit]) -> _BackupEmail | None:
        """Only what reached the landing folder can reach Klaviyo as our metric, so only that starts a flow."""
        for name, flow in BACKUP_TRIGGERS:
            trigger = next((hit for hit in reversed(delivered) if hit.event["event_name"] == name), None)
            if trigger is not None:
                return _BackupEmail(person, browser, flow, list(trigger.event["custom_data"]["items"]),
                                    trigger.event["session_id"], delivered[-1].t)
        return None

    def due(self, email: _BackupEmail) -> int:
        return email.abandoned_at + BACKUP_FIRST_WAIT + self.rng.randrange(SYNC_INTERVAL // timedelta(milliseconds=1))

    def send(self, email: _BackupEmail, at: int, seq: int, catalogue: dict[str, Product]) -> SessionPlan | None:
        """The email goes out at `at`; returns the visit its click brings, if the shopper clicks."""
        person_id = email.person.person_id
        if self.last_purchase.get(person_id, -1) > email.abandoned_at:
            return None  # Bought: the flow's filter exits them
        if at - self.last_email.get(person_id, -SMART_SENDING) < SMART_SENDING:
            return None  # Smart Sending skips it, and Klaviyo does not send it later
        self.last_email[person_id] = at
        row = [email.abandoned_session_id, person_id, email.flow.native_flow, email.flow.utm_campaign,
               _format_time(at, 0, 0), "", "", ""]
        self.truth.append(row)
        rng = self.rng
        if rng.random() >= self.rates.backup_email_click_rate:
            return None
        base = at if rng.random() < BACKUP_CLICKS_ON_FIRST else at + BACKUP_SECOND_EMAIL
        click = self._awake(email.person, base + int(rng.lognormvariate(math.log(BACKUP_CLICK_DELAY_MEDIAN), 1.0)))
        # an hour's margin: a visit may wait for the browser's previous one to end (_make_room)
        click = min(click, email.abandoned_at + BACKUP_RETURN_WITHIN - HOUR - rng.randrange(HOUR))
        buys = rng.random() < self.rates.backup_return_purchase_rate
        browser = self._browser(email.person, email.browser)
        product = catalogue[email.cart[0]["sku"]]
        page = f"https://{self.shop}/cart" if rng.random() < BACKUP_LANDS_ON_CART else product.url
        if click >= self.end:
            return None
        sep = "&" if "?" in page else "?"
        url = (f"{page}{sep}utm_source={UTM_SOURCE}&utm_medium={UTM_MEDIUM}&utm_campaign={email.flow.utm_campaign}"
               f"&_kx={email.person.kx}")
        return SessionPlan(click, seq, email.person, browser, channel="klaviyo", kx=email.person.kx,
                           return_visit=True, checkout="purchase" if buys else "random", landing_url=url,
                           landing_product=product, backup=_BackupClick(email.flow, email.cart, email.abandoned_at,
                                                                        row))

    def _awake(self, person: Person, moment: int) -> int:
        """An email that arrives at night is read in the morning."""
        offset = person.city.utc_offset_minutes * MINUTE
        local_hour = (moment + offset) % DAY // HOUR
        if local_hour >= 6:
            return moment
        midnight = (moment + offset) // DAY * DAY - offset
        return midnight + self.rng.randint(6 * HOUR, 9 * HOUR)

    def _browser(self, person: Person, left_on: Browser) -> Browser:
        """The cart's browser, or for some another device's; a link always opens in a real browser, never in a
        social app's."""
        others = [browser for browser in person.session_browsers
                  if browser.device is not left_on.device and not browser.kind.endswith("_inapp")]
        if others and self.rng.random() < BACKUP_OTHER_DEVICE:
            return self.rng.choice(others)
        return left_on.device.browsers[0] if left_on.kind.endswith("_inapp") else left_on

    def still_wanted(self, plan: SessionPlan) -> bool:
        """Someone who bought since leaving the cart does not come back for it."""
        return self.last_purchase.get(plan.person.person_id, -1) <= plan.backup.abandoned_at

    def returned(self, plan: SessionPlan, delivered: list[_Hit]) -> None:
        """The truth names the visit once the pixel delivered a line of it, and its order once its Purchase."""
        if not delivered:
            return
        row = plan.backup.truth
        row[5] = delivered[0].event["session_id"]
        for hit in delivered:
            if hit.event["event_name"] == "Purchase":
                row[6], row[7] = hit.event["custom_data"]["order_id"], f"{hit.event['custom_data']['value']:.2f}"


# ---------------------------------------------------------------------------------------------------------------
# Writing files
# ---------------------------------------------------------------------------------------------------------------

_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class _HourlyFiles:
    """Buffers lines per UTC hour of arrival and writes an hour's file as soon as no later session can reach it.

    Sessions are generated in start order and nothing arrives before its session starts, so every hour before the
    current session's start hour is complete.
    """

    def __init__(self, events_dir: Path) -> None:
        self.events_dir = events_dir
        self.buffers: dict[int, list[tuple[int, int, str]]] = {}
        self.complete_before = -1  # hours below this are written
        self.seq = 0
        self.files = 0
        self.lines = 0

    def add(self, arrival: int, line: str) -> None:
        hour = arrival // HOUR
        if hour < self.complete_before:
            raise RuntimeError(f"internal error: a line arrived for hour {hour}, which is already written")
        self.buffers.setdefault(hour, []).append((arrival, self.seq, line))
        self.seq += 1

    def complete_hours_before(self, hour_limit: int) -> None:
        if hour_limit <= self.complete_before:
            return
        for hour in sorted(h for h in self.buffers if h < hour_limit):
            self._write(hour, self.buffers.pop(hour))
        self.complete_before = hour_limit

    def close(self) -> None:
        self.complete_hours_before(max(self.buffers, default=0) + 1)

    def _write(self, hour: int, rows: list[tuple[int, int, str]]) -> None:
        """Atomic: a sensor watching the folder must never read half a file, so write a dot-file and rename."""
        rows.sort()
        data = ("\n".join(row[2] for row in rows) + "\n").encode("utf-8")
        t = time.gmtime(hour * 3600)
        folder = self.events_dir / f"dt={t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}" / f"hour={t.tm_hour:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / ".part-0000.ndjson.gz.tmp"
        temporary.write_bytes(gzip.compress(data, compresslevel=6, mtime=0))
        os.replace(temporary, folder / "part-0000.ndjson.gz")
        self.files += 1
        self.lines += len(rows)


class _Transport:
    """Between the browser and the landing folder: pixel retries and broken lines happen here."""

    def __init__(self, rng: random.Random, files: _HourlyFiles, write_truth: Callable[[tuple], object],
                 end: int) -> None:
        self.rng = rng
        self.files = files
        self.write_truth = write_truth
        self.end = end
        self.events = 0
        self.duplicates = 0
        self.bad = 0

    def send(self, hit: _Hit) -> bool:
        """Whether the event reached the landing folder as a valid line."""
        if hit.t >= self.end:
            return False  # the window closes; this part of the session happens after the export
        if self.rng.random() < BAD_LINE_RATE:
            self.files.add(hit.t, self._broken(hit))
            self.bad += 1
            return False
        line = _JSON.encode(hit.event)
        self.files.add(hit.t, line)
        self.write_truth(hit.truth)
        self.events += 1
        if self.rng.random() < RETRY_RATE:
            self.files.add(self._retry_arrival(hit.t), line)
            self.duplicates += 1
        return True

    def _retry_arrival(self, t: int) -> int:
        """Most retries follow within seconds; some wait for the network and land in the next hour's file."""
        if self.rng.random() < 0.25:
            arrival = (t // HOUR + 1) * HOUR + self.rng.randint(5 * SECOND, 10 * MINUTE)
        else:
            arrival = t + self.rng.randint(1 * SECOND, 30 * SECOND)
        return arrival if arrival < self.end else t

    def _broken(self, hit: _Hit) -> str:
        """Each kind in turn, so even a small run shows all of them; the event itself is lost."""
        rng = self.rng
        kind = BAD_LINE_KINDS[self.bad % len(BAD_LINE_KINDS)]
        event = dict(hit.event)
        if kind == "truncated":
            line = _JSON.encode(event)
            return line[:rng.randint(len(line) // 4, len(line) - 2)]
        if kind == "array":
            return _JSON.encode([event])
        if kind == "missing_field":
            del event[rng.choice(REQUIRED_FIELDS)]
        elif kind == "wrong_type":
            custom = event.get("custom_data")
            if custom and custom.get("value") is not None and rng.random() < 0.5:
                event["custom_data"] = {**custom, "value": f"{custom['value']:.2f}"}
            else:
                event["event_id"] = rng.randint(10**9, 10**12)
        elif kind == "bad_time":
            event["event_time"] = "yesterday"
        elif kind == "future_time":
            event["event_time"] = _format_time(hit.t + 30 * DAY, 0, 0)
        else:
            event["event_name"] = ""
        return _JSON.encode(event)


def _write_csv_atomically(path: Path, header: Iterable[str], rows: Iterable[Iterable[object]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    count = 0
    with open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)
            count += 1
    os.replace(temporary, path)
    return count


def _customer_rows(people: list[Person]) -> Iterable[list[object]]:
    for p in people:
        if p.customer_id:
            accepts = "true" if (p.subscribed and p.consent["marketing"]) else "false"
            yield [p.customer_id, p.email, p.phone or "", p.first_name, p.last_name, p.city.name, p.city.region,
                   p.city.country, accepts]


def _people_rows(people: list[Person]) -> Iterable[list[object]]:
    for p in people:
        yield [p.person_id, p.email, p.phone or "", p.customer_id or "", p.kx, p.household_id]


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _resolve_end(end: datetime | None) -> datetime:
    if end is None:
        return datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    if end.tzinfo is None or end.utcoffset() is None:
        raise ValueError("end must be timezone-aware, e.g. datetime(2026, 11, 28, tzinfo=timezone.utc)")
    return end


def _refuse_non_empty(events_dir: Path) -> None:
    """A landing folder mixing two simulations would make the ground truth meaningless."""
    if events_dir.exists() and any(p.is_file() for p in events_dir.rglob("*")):
        raise ValueError(f"{events_dir} already contains files; simulate into an empty folder")


def simulate(out_dir: Path, *, visitors: int, days: int, seed: int, end: datetime | None = None,
             shop: str = "acme.myshopify.com", rates: WorldRates = WorldRates()) -> SimulationSummary:
    """Write `days` of storefront traffic from `visitors` people ending at `end`, with the ground truth.

    Layout under out_dir: events/dt=YYYY-MM-DD/hour=HH/part-0000.ndjson.gz, customers/customers.csv,
    truth/events.csv, truth/people.csv and truth/backup_emails.csv. The same arguments always produce
    byte-identical files.
    """
    if visitors < 1:
        raise ValueError("visitors must be at least 1")
    if days < 1:
        raise ValueError("days must be at least 1")
    out_dir = Path(out_dir)
    end_at = _resolve_end(end)
    events_dir = out_dir / "events"
    _refuse_non_empty(events_dir)
    events_dir.mkdir(parents=True, exist_ok=True)

    end_ms = (end_at - _EPOCH) // timedelta(milliseconds=1)
    start_ms = end_ms - days * DAY
    rng = random.Random(seed)
    ids = _Ids(rng)
    builder = _WorldBuilder(rng, ids, shop, start_ms, rates)
    world = builder.build(visitors)
    _seed_klaviyo_cookies(rng, world)
    plans = _Planner(rng, ids, builder, world, start_ms, end_ms).plan()

    truth_path = out_dir / "truth" / "events.csv"
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    truth_temporary = truth_path.with_name(f".{truth_path.name}.tmp")
    files = _HourlyFiles(events_dir)
    runner = _SessionRunner(rng, ids, world, rates)
    backup = _BackupFlows(seed, rates, shop, end_ms)
    by_sku = {product.sku: product for product in world.catalogue}
    # Emails and the visits they bring are due after the session that caused them, so they join the planned
    # sessions in one time order and every hour's file is still complete when written.
    due: list[tuple[int, int, _BackupEmail | SessionPlan]] = []
    seq = itertools.count(len(plans))
    planned = iter(plans)
    plan = next(planned, None)
    with open(truth_temporary, "w", newline="", encoding="utf-8") as handle:
        truth = csv.writer(handle, lineterminator="\n")
        truth.writerow(["event_id", "person_id", "email", "browser_id", "session_id", "scenario"])
        transport = _Transport(rng, files, truth.writerow, end_ms)
        while plan is not None or due:
            if due and (plan is None or due[0][:2] < (plan.start, plan.seq)):
                at, _, item = heapq.heappop(due)
                if isinstance(item, _BackupEmail):
                    click = backup.send(item, at, next(seq), by_sku)
                    if click is not None:
                        heapq.heappush(due, (click.start, click.seq, click))
                    continue
                current = item
                if not backup.still_wanted(current):
                    continue
            else:
                current, plan = plan, next(planned, None)
            files.complete_hours_before(current.start // HOUR)
            if not _make_room(rng, current, end_ms):
                continue
            hits = runner.run(current)
            delivered = [hit for hit in hits if transport.send(hit)]
            if current.backup is not None:
                backup.returned(current, delivered)
            email = backup.after_session(current, hits, delivered)
            if email is not None:
                at = backup.due(email)
                if at < end_ms:
                    heapq.heappush(due, (at, next(seq), email))
        files.close()
    os.replace(truth_temporary, truth_path)
    _write_csv_atomically(out_dir / "truth" / "backup_emails.csv", BACKUP_TRUTH_HEADER, backup.truth)

    customers = _write_csv_atomically(
        out_dir / "customers" / "customers.csv",
        ["customer_id", "email", "phone", "first_name", "last_name", "city", "region", "country",
         "accepts_marketing"],
        _customer_rows(world.people))
    people = _write_csv_atomically(out_dir / "truth" / "people.csv",
                                   ["person_id", "email", "phone", "customer_id", "kx", "household_id"],
                                   _people_rows(world.people))
    return SimulationSummary(
        out_dir=out_dir, people=people, events=transport.events,
        event_lines=transport.events + transport.duplicates + transport.bad,
        duplicate_lines=transport.duplicates, bad_lines=transport.bad, event_files=files.files,
        customers=customers)


def _make_room(rng: random.Random, plan: SessionPlan, end: int) -> bool:
    """One browser shows one session at a time: a visit planned during another one starts after it, or not at all."""
    busy = plan.browser.busy_until
    if plan.start > busy + MINUTE:
        return True
    start = busy + rng.randint(1 * MINUTE, 10 * MINUTE)
    if start - plan.start > 50 * MINUTE or start >= end:
        return False
    plan.start = start
    return True
