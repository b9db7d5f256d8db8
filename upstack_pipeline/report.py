"""`upstack report`: one self-contained HTML page for a marketer who never opens Dagster.

It reads only the analysts' copy (`<warehouse>.analytics.duckdb`, written by `analytics.publish_for_analysts` after
each sync), read-only: building a report never waits for a sync, and a sync never waits for a report.

The lift on the page is `analytics.lift_totals` run on the copy's `daily_lift` rows, the same function the sync
summary, the asset metadata and `upstack evaluate` call, so the page cannot disagree with them.

The charts are drawn here by matplotlib as SVG and embedded as `data:` images: the page holds no script, loads no
font, style sheet or image from anywhere, and its Content-Security-Policy forbids the browser to try, so it opens
the same offline, from a mail attachment or from a shared drive. An SVG shown as an image cannot fetch anything or
run anything either. Each chart has a table of the same numbers beneath it, for reading exact values (and for
screen readers).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import duckdb
import matplotlib
import matplotlib.ticker
from matplotlib.figure import Figure

from upstack_pipeline.analytics import HEADLINE_METRIC, LiftTotals, analytics_path, lift_totals

DEFAULT_DAYS = 28
TABLES = ("daily_lift", "delivery_funnel", "match_rates", "recovered_orders", "commerce_metrics", "published")

# One colour per meaning, the same in every chart.
GREY, KLAVIYO, UPSTACK, GREEN, RED, AMBER = "#9aa0a6", "#3b6fb6", "#e8833a", "#3a9a5b", "#d64545", "#e0b43c"
_METHOD_COLOURS = ["#e8833a", "#f2b36f", "#b35c1e", "#c9a227", "#8c6bb1", "#d4729c", "#6aa8a0", "#a0522d"]
# What a marketer calls each way of naming a shopper (match_rates.identified_by).
METHOD_LABELS = {
    "klaviyo_native": "Klaviyo by itself",
    "typed_in_event": "Upstack: email typed in the event",
    "same_session": "Upstack: email earlier in the visit",
    "login": "Upstack: customer login",
    "customer_file": "Upstack: customer file",
    "klaviyo_click": "Upstack: Klaviyo email click",
    "cookie_history": "Upstack: the browser's earlier visits",
    "click_id_handoff": "Upstack: ad click across browsers",
    "probabilistic_ip_ua": "Upstack: same network and device",
    "unidentified": "Nobody",
}
# delivery_funnel's columns in funnel order, as the page names them; indented ones are parts of the one above.
FUNNEL_STAGES = (
    ("pixel_events", "Pixel events received", False),
    ("quarantined", "kept out (unreadable or invalid)", True),
    ("ingested", "Ingested", False),
    ("waiting", "waiting (visit still open)", True),
    ("unresolved", "skipped: nobody could be named", True),
    ("klaviyo_native", "skipped: Klaviyo knows the shopper", True),
    ("no_consent", "skipped: no marketing consent", True),
    ("other_skipped", "skipped: other reason", True),
    ("sent", "Sent to Klaviyo", False),
    ("delivered", "accepted by Klaviyo", True),
    ("pending", "pending", True),
    ("refused", "refused by Klaviyo", True),
)
_EVENT_ORDER = ("ViewContent", "AddToCart", "InitiateCheckout", "Purchase")


def write_report(warehouse_path: Path, out: Path, *, days: int = DEFAULT_DAYS, now: datetime | None = None) -> Path:
    """Writes the report of the last `days` UTC days (today included) of the analysts' copy beside
    `warehouse_path` to `out`, whole or not at all (written aside, then renamed), and returns `out`."""
    page = build_report(analytics_path(Path(warehouse_path)), days=days, now=now or datetime.now(timezone.utc))
    return _write(page, Path(out))


def _write(page: str, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    writing = out.with_name(f".{out.name}.writing")
    writing.write_text(page, encoding="utf-8")
    os.replace(writing, out)
    return out


def write_all_shops_report(warehouses: Mapping[str, Path], out: Path, *, days: int = DEFAULT_DAYS,
                           now: datetime | None = None) -> Path:
    """`write_report` for an agency: every shop of `warehouses` (name -> warehouse file) summed, and a section
    comparing the shops (upstack_pipeline.all_shops)."""
    from upstack_pipeline.all_shops import all_shops_connection

    now = now or datetime.now(timezone.utc)
    with all_shops_connection(warehouses) as connection:
        page = _build(connection, days=days, now=now, source=f"{len(warehouses)} shops' analysts' copies",
                      shops=len(warehouses))
    return _write(page, Path(out))


def build_report(analytics_copy: Path, *, days: int, now: datetime) -> str:
    """The whole HTML page for the last `days` UTC days up to `now`'s day (a naive `now` is taken as UTC).

    Raises ValueError when the copy does not exist (no sync has published it yet) or lacks a table (an older
    release wrote it): both are fixed by running `upstack sync`."""
    analytics_copy = Path(analytics_copy)
    if not analytics_copy.is_file():
        raise ValueError(f"no analysts' copy at {analytics_copy}: run `upstack sync` first (each sync publishes it)")
    with duckdb.connect(str(analytics_copy), read_only=True) as connection:
        present = {name for (name,) in connection.execute("select table_name from duckdb_tables()").fetchall()}
        if missing := [table for table in TABLES if table not in present]:
            raise ValueError(f"the analysts' copy {analytics_copy} has no {', '.join(missing)}: it was written by an "
                             "older release; run `upstack sync` to publish it again")
        return _build(connection, days=days, now=now, source=analytics_copy.name)


def _build(connection: duckdb.DuckDBPyConnection, *, days: int, now: datetime, source: str, shops: int = 0) -> str:
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    now = now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)
    until = now.date()
    window = [until - timedelta(days=offset) for offset in range(days - 1, -1, -1)]
    connection.execute("set TimeZone = 'UTC'")
    return _page(_read(connection, window, source=source, shops=shops), now=now)


@dataclass(frozen=True)
class _Data:
    source: str  # the analysts' copy's file name
    window: list[date]
    published_at: datetime | None
    latest_day: date | None  # the copy's latest day with any storefront event, in or out of the window
    lift: LiftTotals
    lift_days: list[tuple]  # day, abandoned, native, upstack delivered, lift_pct, cart value reached
    funnel_days: list[tuple]  # day, then delivery_funnel's counts in FUNNEL_STAGES order, summed over metrics
    funnel_by_metric: dict[str, dict[str, int]]
    match_rows: list[tuple]  # day, identified_by, visitors, share_pct
    recovered: list[tuple]  # day, metric, utm_campaign, currency, orders, revenue
    backup_flows: list[tuple[str, str]]  # metric, utm_campaign
    # The all-shops page only: shop, abandoned carts, native, only Upstack delivered, lift_pct, orders, revenue.
    shops: list[tuple] = field(default_factory=list)

    @property
    def since(self) -> date:
        return self.window[0]

    @property
    def until(self) -> date:
        return self.window[-1]

    @property
    def currency(self) -> str:
        """The shop's currency, as its recovered orders give it; empty when they give none, or several."""
        currencies = {row[3] for row in self.recovered if row[3]}
        return currencies.pop() if len(currencies) == 1 else ""

    def revenue(self) -> str:
        """The recovered revenue, one sum per currency (a shop selling in several currencies gets several)."""
        by_currency: dict[str, float] = defaultdict(float)
        for *_, currency, _, value in self.recovered:
            by_currency[currency] += value
        return " + ".join(_money(value, currency) for currency, value in sorted(by_currency.items())) or _money(0, "")


def _read(connection: duckdb.DuckDBPyConnection, window: list[date], *, source: str, shops: int = 0) -> _Data:
    span = {"since": window[0], "until": window[-1]}
    in_span = "day between $since and $until"
    stages = ", ".join(f"coalesce(sum({column}), 0)::bigint" for column, _, _ in FUNNEL_STAGES)
    published = connection.execute("select max(published_at) from published").fetchone()[0]
    latest = connection.execute("""
        select max(day) from (select max(day) as day from delivery_funnel union all select max(day) from daily_lift
                              union all select max(day) from match_rates)""").fetchone()[0]
    metric_order = {event: index for index, event in enumerate(_EVENT_ORDER)}
    metrics = sorted(connection.execute("select event_name, klaviyo_metric, backup_utm_campaign "
                                        "from commerce_metrics").fetchall(),
                     key=lambda row: (metric_order.get(row[0], len(metric_order)), row[0]))
    funnel_by_metric: dict[str, dict[str, int]] = {}
    for metric, *counts in connection.execute(
            f"select metric, {stages} from delivery_funnel where {in_span} group by metric", span).fetchall():
        funnel_by_metric[metric] = dict(zip((column for column, _, _ in FUNNEL_STAGES), counts))
    known = [klaviyo_metric for _, klaviyo_metric, _ in metrics]
    funnel_by_metric = dict(sorted(funnel_by_metric.items(),
                                   key=lambda item: (known.index(item[0]) if item[0] in known else len(known),
                                                     item[0])))
    return _Data(
        source=source,
        window=window,
        published_at=published,
        latest_day=latest,
        lift=lift_totals(connection, since=window[0], until=window[-1]),
        lift_days=connection.execute(f"""
            select day, abandoned_sessions, klaviyo_native_sessions, upstack_delivered_sessions, lift_pct,
                   cart_value_reached
            from daily_lift where metric = $metric and {in_span} order by day""",
                                     {**span, "metric": HEADLINE_METRIC}).fetchall(),
        funnel_days=connection.execute(
            f"select day, {stages} from delivery_funnel where {in_span} group by day order by day", span).fetchall(),
        funnel_by_metric=funnel_by_metric,
        match_rows=connection.execute(f"""
            select day, identified_by, visitors, share_pct from match_rates where {in_span}
            order by day, identified_by""", span).fetchall(),
        recovered=connection.execute(f"""
            select day, metric, utm_campaign, coalesce(currency, ''), count(*), coalesce(sum(value), 0)
            from recovered_orders where {in_span} group by all order by day, metric""", span).fetchall(),
        backup_flows=[(klaviyo_metric, campaign) for _, klaviyo_metric, campaign in metrics if campaign],
        shops=connection.execute(f"""
            select shop, sum(abandoned_sessions), sum(klaviyo_native_sessions), sum(upstack_delivered_sessions),
                   round(100 * sum(upstack_delivered_sessions) / nullif(sum(klaviyo_native_sessions), 0), 2),
                   sum(recovered_orders), sum(recovered_revenue)
            from shops_daily_lift where metric = $metric and {in_span}
            group by shop order by shop""", {**span, "metric": HEADLINE_METRIC}).fetchall() if shops else [],
    )


# ---------------------------------------------------------------------------------------------------------- page


def _page(data: _Data, *, now: datetime) -> str:
    days = len(data.window)
    span = f"{_long_day(data.since)} to {_long_day(data.until)}" if days > 1 else _long_day(data.until)
    published = (f"Data published {_moment(data.published_at)} by the last <code>upstack sync</code> that changed it"
                 if data.published_at else "Never published by a sync")
    header = f"""
<header>
  <h1>Abandoned-cart recovery</h1>
  <p class="span">Last {days} day{'s' if days != 1 else ''}: {span} (UTC days, today's so far included)</p>
  <p class="meta">{published}; page built {_moment(now)}.</p>
</header>"""
    if not (data.lift_days or data.funnel_days or data.match_rows or data.recovered):
        if data.latest_day is None:
            why = ("The warehouse holds no storefront events yet. Once the pixel's files land and "
                   "<code>upstack sync</code> runs, this page fills in.")
        else:
            why = (f"No storefront events in these {days} days: the latest is from {_long_day(data.latest_day)}. "
                   f"Ask for more days (<code>upstack report --days N</code>), or check that the pixel's files "
                   f"still arrive.")
        body = f'<section class="empty"><h2>Nothing to report yet</h2><p>{why}</p></section>'
    else:
        body = "\n".join((_headline(data), *([_shops_section(data)] if data.shops else []), _lift_section(data),
                          _sessions_section(data), _recovered_section(data), _match_section(data),
                          _funnel_section(data), _health_section(data), _glossary()))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>Abandoned-cart recovery, {html.escape(span)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
{header}
{body}
<footer>Upstack report, from <code>{html.escape(data.source)}</code>. Every number comes from the views the
pipeline publishes after each sync (<code>daily_lift</code>, <code>delivery_funnel</code>, <code>match_rates</code>,
<code>recovered_orders</code>); <code>upstack sql</code> queries them.</footer>
</main>
</body>
</html>
"""


def _headline(data: _Data) -> str:
    lift = data.lift
    orders = sum(row[4] for row in data.recovered)
    delivered = sum(row[1 + _stage("delivered")] for row in data.funnel_days)
    refused = sum(row[1 + _stage("refused")] for row in data.funnel_days)
    pending = sum(row[1 + _stage("pending")] for row in data.funnel_days)
    answered = delivered + refused
    accepted = f"{delivered / answered:.1%}" if answered else "–"
    cards = [
        ("Lift", f"{lift.lift:.1%}",
         f"{_n(lift.upstack_delivered_sessions)} abandoned cart{_s(lift.upstack_delivered_sessions)} reached only "
         f"by Upstack's backup flow, per {_n(lift.klaviyo_native_sessions)} Klaviyo's own flow reaches"),
        ("Recovered revenue", data.revenue(),
         f"{_n(orders)} order{_s(orders)} placed after a click in a backup flow's email"),
        ("Upstack-only carts", _n(lift.upstack_delivered_sessions),
         f"worth {_money(lift.cart_value_reached, data.currency)}, of {_n(lift.abandoned_sessions)} abandoned "
         f"cart{_s(lift.abandoned_sessions)}"),
        ("Accepted by Klaviyo", accepted,
         f"{_n(delivered)} of {_n(answered)} event{_s(answered)} Klaviyo answered for; {_n(pending)} pending"),
    ]
    items = "\n".join(f'<div class="card"><h3>{title}</h3><p class="big">{html.escape(value)}</p>'
                      f'<p>{html.escape(note)}</p></div>' for title, value, note in cards)
    return f"""<section class="headline">
<div class="cards">
{items}
</div>
<p class="sentence">The warehouse's <strong>{html.escape(lift.sentence())}</strong>, over these days.</p>
</section>"""


def _lift_section(data: _Data) -> str:
    positions = _positions(data)
    lift = {row[0]: row[4] for row in data.lift_days}
    figure, axes = _figure()
    values = [lift.get(day) for day in data.window]
    axes.bar([positions[day] for day in data.window if lift.get(day) is not None],
             [value for value in values if value is not None], color=UPSTACK, width=0.7, label="lift that day")
    if data.lift.klaviyo_native_sessions:
        axes.axhline(100 * data.lift.lift, color=KLAVIYO, linestyle="--", linewidth=1.2,
                     label=f"{len(data.window)}-day lift {data.lift.lift:.1%}")
    axes.set_ylabel("lift (%)")
    axes.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(decimals=0))
    axes.set_ylim(bottom=0)
    _day_axis(axes, data)
    _legend(axes)
    rows = [(_short_day(day), _n(abandoned), _n(native), _n(delivered), _pct(pct))
            for day, abandoned, native, delivered, pct, _ in reversed(data.lift_days)]
    return _section(
        "Daily lift", "lift",
        "Of each day's abandoned carts, those only Upstack's backup flow reached, per hundred that Klaviyo's own "
        "abandoned-cart flow reaches. A day with no cart Klaviyo reaches by itself has no lift.",
        _svg(figure, "Bar chart of the lift per day, in percent"),
        ("day", "abandoned carts", "Klaviyo reaches itself", "only Upstack reached", "lift"), rows)


def _shops_section(data: _Data) -> str:
    figure, axes = _figure()
    positions = range(len(data.shops))
    axes.bar([p - 0.2 for p in positions], [row[2] for row in data.shops], width=0.4, color=KLAVIYO,
             label="Klaviyo reaches itself")
    axes.bar([p + 0.2 for p in positions], [row[3] for row in data.shops], width=0.4, color=UPSTACK,
             label="only Upstack reached")
    axes.set_xticks(list(positions), [row[0] for row in data.shops])
    axes.set_ylabel("abandoned carts")
    _integer_axis(axes)
    _legend(axes)
    rows = [(shop, _n(abandoned), _n(native), _n(delivered), _pct(pct), _n(orders), _money(revenue, ""))
            for shop, abandoned, native, delivered, pct, orders, revenue in data.shops]
    return _section(
        "Shops", "shops",
        "Each shop's abandoned carts over these days: those Klaviyo's own flow reaches, and those only Upstack's "
        "backup flow reached. The rest of this page sums every shop.",
        _svg(figure, "Bar chart of abandoned carts per shop, reached by Klaviyo and only by Upstack"),
        ("shop", "abandoned carts", "Klaviyo reaches itself", "only Upstack reached", "lift", "recovered orders",
         "recovered revenue"), rows, text_columns=1)


def _sessions_section(data: _Data) -> str:
    positions = _positions(data)
    by_day = {row[0]: row for row in data.lift_days}
    series = (("abandoned carts", 1, GREY), ("Klaviyo reaches itself", 2, KLAVIYO),
              ("only Upstack reached", 3, UPSTACK))
    figure, axes = _figure()
    for offset, (label, column, colour) in zip((-0.27, 0, 0.27), series):
        axes.bar([positions[day] + offset for day in data.window],
                 [by_day[day][column] if day in by_day else 0 for day in data.window],
                 width=0.27, color=colour, label=label)
    axes.set_ylabel("abandoned carts (visits)")
    _integer_axis(axes)
    _day_axis(axes, data)
    _legend(axes)
    rows = [(_short_day(day), _n(abandoned), _n(native), _n(delivered), _money(value, data.currency))
            for day, abandoned, native, delivered, _, value in reversed(data.lift_days)]
    return _section(
        "Abandoned carts and who reached them", "sessions",
        "Visits that added to cart and did not buy (Added to Cart), per day: those Klaviyo identifies by itself "
        "(its cookie, an email typed in the visit), and those only Upstack could name whose cart Klaviyo accepted "
        "from it.",
        _svg(figure, "Grouped bar chart per day: abandoned carts, those Klaviyo reaches itself, those only "
                     "Upstack reached"),
        ("day", "abandoned carts", "Klaviyo reaches itself", "only Upstack reached", "their cart value"), rows)


def _recovered_section(data: _Data) -> str:
    title, anchor = "Recovered orders and revenue", "recovered"
    flows = "; ".join(f"{html.escape(_flow(metric))}: <code>utm_campaign={html.escape(campaign)}</code>"
                      for metric, campaign in data.backup_flows)
    text = ("Orders placed in a visit that landed from a link in a backup flow's email, by the day of the order "
            f"and the flow. The flows are known by their links' campaign ({flows or 'none configured'}).")
    if not data.recovered:
        return _note_section(title, anchor, text, "No order came back through a backup flow's link in these days.")
    positions = _positions(data)
    revenue: dict[str, dict[date, float]] = defaultdict(lambda: defaultdict(float))
    for day, metric, _, _, _, value in data.recovered:
        revenue[_flow(metric)][day] += value
    figure, axes = _figure()
    bottom = [0.0] * len(data.window)
    for flow, colour in zip(sorted(revenue), (UPSTACK, "#b35c1e", "#f2b36f", AMBER)):
        heights = [revenue[flow].get(day, 0.0) for day in data.window]
        axes.bar([positions[day] for day in data.window], heights, bottom=bottom, width=0.7, color=colour,
                 label=flow)
        bottom = [below + height for below, height in zip(bottom, heights)]
    currencies = {row[3] for row in data.recovered}
    axes.set_ylabel(f"revenue ({data.currency})" if data.currency else
                    "revenue (several currencies)" if len(currencies) > 1 else "revenue")
    axes.set_ylim(bottom=0)
    _day_axis(axes, data)
    _legend(axes)
    rows = [(_short_day(day), _flow(metric), campaign, _n(orders), _money(value, currency))
            for day, metric, campaign, currency, orders, value in reversed(data.recovered)]
    return _section(title, anchor, text, _svg(figure, "Stacked bar chart of recovered revenue per day and flow"),
                    ("day", "flow", "utm_campaign", "orders", "revenue"), rows, text_columns=3)


def _match_section(data: _Data) -> str:
    title, anchor = "Who could name the shoppers", "match-rates"
    text = ("Each day's visitors with a commerce event (a browser cookie counts once a day): the share Klaviyo "
            "identifies by itself, the share only Upstack could name (by how it knew them), and the share nobody "
            "could. Klaviyo's own match rate is its share; with Upstack it is every share but Nobody's.")
    if not data.match_rows:
        return _note_section(title, anchor, text, "No visitor with a commerce event in these days.")
    positions = _positions(data)
    methods = sorted({row[1] for row in data.match_rows}, key=_method_order)
    share = {(day, method): pct for day, method, _, pct in data.match_rows}
    colours = iter(_METHOD_COLOURS)
    figure, axes = _figure(legend_right=True)
    bottom = [0.0] * len(data.window)
    for method in methods:
        colour = KLAVIYO if method == "klaviyo_native" else "#d9dce0" if method == "unidentified" else next(
            colours, GREY)
        heights = [share.get((day, method)) or 0.0 for day in data.window]
        axes.bar([positions[day] for day in data.window], heights, bottom=bottom, width=0.7, color=colour,
                 label=METHOD_LABELS.get(method, f"Upstack: {method}"))
        bottom = [below + height for below, height in zip(bottom, heights)]
    axes.set_ylabel("share of the day's visitors (%)")
    axes.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(decimals=0))
    axes.set_ylim(0, 100)
    _day_axis(axes, data)
    _legend(axes, right=True)
    visitors: dict[date, dict[str, tuple[int, float]]] = defaultdict(dict)
    for day, method, count, pct in data.match_rows:
        visitors[day][method] = (count, pct)
    rows = [(_short_day(day), _n(sum(count for count, _ in visitors[day].values())),
             *(f"{_n(visitors[day][method][0])} ({_pct(visitors[day][method][1])})" if method in visitors[day]
               else "–" for method in methods)) for day in sorted(visitors, reverse=True)]
    return _section(title, anchor, text, _svg(figure, "Stacked bar chart of the share of visitors per day by who "
                                                      "could identify them"),
                    ("day", "visitors", *(METHOD_LABELS.get(method, method) for method in methods)), rows)


def _funnel_section(data: _Data) -> str:
    title, anchor = "Where the storefront's events went", "funnel"
    text = ("Every commerce event the pixel sent in these days, from the storefront to Klaviyo: each is in exactly "
            "one of the indented lines under Pixel events received. Totals over the days, all metrics together; "
            "the table splits them by metric.")
    if not data.funnel_by_metric:
        return _note_section(title, anchor, text, "No commerce event in these days.")
    totals = {column: sum(counts[column] for counts in data.funnel_by_metric.values())
              for column, _, _ in FUNNEL_STAGES}
    colours = {"pixel_events": GREY, "ingested": GREY, "sent": GREY, "quarantined": RED, "waiting": AMBER,
               "unresolved": "#c4c8cc", "klaviyo_native": KLAVIYO, "no_consent": "#c4c8cc",
               "other_skipped": "#c4c8cc", "delivered": GREEN, "pending": AMBER, "refused": RED}
    figure, axes = _figure(height=3.8)
    labels = [("    " if indented else "") + label for _, label, indented in FUNNEL_STAGES]
    values = [totals[column] for column, _, _ in FUNNEL_STAGES]
    bars = axes.barh(range(len(values)), values, color=[colours[column] for column, _, _ in FUNNEL_STAGES],
                     height=0.7)
    axes.bar_label(bars, labels=[_n(value) for value in values], padding=3, fontsize=9)
    axes.set_yticks(range(len(values)), labels)
    for tick, (_, _, indented) in zip(axes.get_yticklabels(), FUNNEL_STAGES):
        tick.set_fontweight("normal" if indented else "bold")
        tick.set_color("#5f6368" if indented else "#202124")
    axes.invert_yaxis()
    axes.set_xlabel(f"commerce events, {_short_day(data.since)} to {_short_day(data.until)}")
    axes.set_xlim(0, max(values) * 1.12 or 1)
    _integer_axis(axes, "x")
    axes.grid(axis="y", visible=False)
    axes.grid(axis="x", color="#e6e8eb")
    metrics = list(data.funnel_by_metric)
    rows = [(("\u2003" if indented else "") + label, *(_n(data.funnel_by_metric[metric][column]) for metric in metrics),
             _n(totals[column])) for column, label, indented in FUNNEL_STAGES]
    return _section(title, anchor, text, _svg(figure, "Horizontal bar chart of the delivery funnel's totals"),
                    ("stage", *metrics, "all"), rows, scroll=False)


def _health_section(data: _Data) -> str:
    title, anchor = "Delivery health", "health"
    text = ("Events Upstack sent that Klaviyo accepted or refused, by the day of the event. Refusals are kept "
            "(<code>klaviyo_dead_letters</code>) with Klaviyo's reason; pending events go on the next sync.")
    delivered_at, refused_at, pending_at = (1 + _stage(column) for column in ("delivered", "refused", "pending"))
    days = [row for row in data.funnel_days if row[delivered_at] or row[refused_at] or row[pending_at]]
    if not days:
        return _note_section(title, anchor, text, "Upstack sent nothing to Klaviyo for these days.")
    positions = _positions(data)
    by_day = {row[0]: row for row in data.funnel_days}
    figure, axes = _figure()
    delivered = [by_day[day][delivered_at] if day in by_day else 0 for day in data.window]
    refused = [by_day[day][refused_at] if day in by_day else 0 for day in data.window]
    x = [positions[day] for day in data.window]
    axes.bar(x, delivered, width=0.7, color=GREEN, label="accepted by Klaviyo")
    axes.bar(x, refused, bottom=delivered, width=0.7, color=RED, label="refused by Klaviyo")
    axes.set_ylabel("events sent")
    _integer_axis(axes)
    _day_axis(axes, data)
    _legend(axes)
    rows = []
    for row in reversed(days):
        answered = row[delivered_at] + row[refused_at]
        rows.append((_short_day(row[0]), _n(row[delivered_at]), _n(row[refused_at]), _n(row[pending_at]),
                     f"{row[delivered_at] / answered:.1%}" if answered else "–"))
    return _section(title, anchor, text, _svg(figure, "Stacked bar chart per day of events accepted and refused "
                                                      "by Klaviyo"),
                    ("day", "accepted", "refused", "pending", "accepted share"), rows)


def _glossary() -> str:
    return """<section class="glossary">
<h2>How to read it</h2>
<dl>
<dt>Abandoned cart</dt><dd>A visit with an Added to Cart event and no order; counted on the day of its first
cart event (UTC).</dd>
<dt>Klaviyo reaches itself</dt><dd>Klaviyo could name the shopper without Upstack: its own cookie, or an email typed
in the visit. Klaviyo's abandoned-cart flow emails them.</dd>
<dt>Only Upstack reached</dt><dd>Klaviyo could not name the shopper, Upstack could, and Klaviyo accepted the cart
from Upstack (events older than a day are recorded on the profile without starting a flow).</dd>
<dt>Lift</dt><dd>Only-Upstack carts per hundred that Klaviyo reaches itself: how many more abandoned carts get an
email because of Upstack.</dd>
<dt>Recovered order</dt><dd>An order placed in a visit that landed from a backup flow's email link.</dd>
</dl>
</section>"""


# --------------------------------------------------------------------------------------------------------- charts


def _figure(*, height: float = 3.0, legend_right: bool = False) -> tuple[Figure, object]:
    """A figure outside pyplot: no global state, no window, safe in any process."""
    figure = Figure(figsize=(10, height), dpi=96, layout="constrained")
    axes = figure.add_subplot()
    axes.spines[["top", "right"]].set_visible(False)
    axes.spines[["left", "bottom"]].set_color("#8a9099")
    axes.tick_params(colors="#3c4043", labelsize=9)
    axes.grid(axis="y", color="#e6e8eb")
    axes.set_axisbelow(True)
    return figure, axes


def _positions(data: _Data) -> dict[date, int]:
    return {day: index for index, day in enumerate(data.window)}


def _day_axis(axes, data: _Data) -> None:
    """One slot per UTC day of the window, the latest always labelled, at most about twelve labels."""
    count = len(data.window)
    step = max(1, math.ceil(count / 12))
    ticks = list(range(count - 1, -1, -step))[::-1]
    axes.set_xticks(ticks, [_short_day(data.window[index]) for index in ticks])
    axes.set_xlim(-0.6, count - 0.4)
    first, last = data.since.year, data.until.year
    axes.set_xlabel(f"UTC day, {first}" if first == last else f"UTC day, {first}–{last}")


def _integer_axis(axes, which: str = "y") -> None:
    axis = axes.yaxis if which == "y" else axes.xaxis
    axis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))
    if which == "y":  # from zero, with room above the tallest bar (a whole count at least)
        axes.set_ylim(0, max(axes.dataLim.y1 * 1.08, 1.08))


def _legend(axes, *, right: bool = False) -> None:
    if right:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    else:
        axes.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=4, frameon=False, fontsize=9,
                    borderaxespad=0.2)


def _svg(figure: Figure, alt: str) -> str:
    """The figure as an SVG `data:` image. Text is drawn as paths (the page needs no font), ids and the output are
    the same on every run (fixed hash salt, no date)."""
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "upstack-report"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    width, height = (round(size * figure.dpi) for size in figure.get_size_inches())
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<img class="chart" src="data:image/svg+xml;base64,{encoded}" width="{width}" height="{height}" '
            f'alt="{html.escape(alt)}">')


# ---------------------------------------------------------------------------------------------------------- parts


def _section(title: str, anchor: str, text: str, chart: str, headers: tuple[str, ...], rows: list[tuple],
             *, scroll: bool = True, text_columns: int = 1) -> str:
    """A chart, with a table of the same numbers beneath it (scrolling past ten rows or so, unless not `scroll`);
    its first `text_columns` columns are words, aligned left, the others numbers, aligned right."""
    head = "".join(f"<th>{html.escape(header)}</th>" for header in headers)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
                     for row in rows)
    return f"""<section id="{anchor}">
<h2>{html.escape(title)}</h2>
<p>{text}</p>
<figure>{chart}</figure>
<div class="table{'' if scroll else ' whole'} text-{text_columns}"><table>
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
</table></div>
</section>"""


def _note_section(title: str, anchor: str, text: str, note: str) -> str:
    return f"""<section id="{anchor}">
<h2>{html.escape(title)}</h2>
<p>{text}</p>
<p class="none">{html.escape(note)}</p>
</section>"""


def _stage(column: str) -> int:
    return [name for name, _, _ in FUNNEL_STAGES].index(column)


def _method_order(method: str) -> tuple[int, str]:
    return (0 if method == "klaviyo_native" else 2 if method == "unidentified" else 1, method)


def _flow(metric: str) -> str:
    return f"{metric} backup flow"


def _n(value: float) -> str:
    return f"{int(value):,}"


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}%"


def _money(value: float, currency: str) -> str:
    return f"{currency} {value:,.2f}" if currency else f"{value:,.2f}"


def _short_day(day: date) -> str:
    return f"{day:%b} {day.day}"


def _long_day(day: date) -> str:
    return f"{day:%a} {day:%b} {day.day}, {day.year}"


def _moment(moment: datetime) -> str:
    return f"{moment.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC"


_CSS = """
:root { color-scheme: light; --ink: #202124; --soft: #5f6368; --line: #e3e5e8; --paper: #ffffff; --wash: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--wash); color: var(--ink);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 24px 40px; }
header h1 { margin: 0 0 4px; font-size: 28px; }
header p { margin: 0; color: var(--soft); }
header .span { font-size: 17px; color: var(--ink); }
section { background: var(--paper); border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px;
          margin-top: 20px; }
h2 { margin: 0 0 6px; font-size: 20px; }
section > p { margin: 0 0 10px; color: var(--soft); max-width: 80ch; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(210px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; }
.card h3 { margin: 0; font-size: 13px; font-weight: 600; text-transform: uppercase; letter-spacing: .04em;
           color: var(--soft); }
.card .big { margin: 2px 0 4px; font-size: 30px; font-weight: 700; color: var(--ink); }
.card p { margin: 0; font-size: 13px; color: var(--soft); }
.sentence { margin: 14px 0 0; color: var(--ink); }
figure { margin: 8px 0; }
img.chart { display: block; width: 100%; height: auto; }
.table { max-height: 260px; overflow: auto; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; text-align: right; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { white-space: normal; vertical-align: bottom; }
.table.whole { max-height: none; }
.text-1 :is(th, td):first-child, .text-3 :is(th, td):nth-child(-n+3) { text-align: left; }
th { position: sticky; top: 0; background: var(--wash); font-weight: 600; }
.none { font-style: italic; }
.empty p { color: var(--ink); }
dl { margin: 0; display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; }
dt { font-weight: 600; }
dd { margin: 0; color: var(--soft); }
code { font-size: 0.92em; background: var(--wash); padding: 0 3px; border-radius: 3px; }
footer { margin-top: 20px; font-size: 13px; color: var(--soft); }
@media print { body { background: none; } .table { max-height: none; overflow: visible; }
               section { break-inside: avoid; } }
"""
