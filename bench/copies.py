"""K copies of a simulation, each an independent store's worth of shoppers (bench/backfill.py's landing folder).

A copy must behave in the pipeline exactly like the source, only with other people: every value that identifies a
person, a browser, a click or an order is rewritten per copy, and rewritten the same way on every line, so that the
copies share no identifier (no click id in 31 browsers, no customer id with 31 emails) and the identity result of
K copies is K times the source's. What each identifier becomes in copy K (prefix P = `cK-`, number N = 100 + K):

- event_id, anonymous_id, session_id, the checkout token in `/checkouts/cn/<token>`: P + value;
- email: P + the address (after any leading spaces the shopper typed, so it normalises to P + the normalised
  address); `em`: the SHA-256 of that normalised prefixed address when the source holds the address in plain
  anywhere (a line or the customers export), else the SHA-256 of P + the old hash;
- phone: the E.164 number with N put before its country code (`+1 704 555 0173` -> `+10117045550173`), so its last
  ten digits, which the placeholder rule reads, stay; `ph`: the SHA-256 of the new number, or of P + the old hash;
- external_id (Shopify customer id) and order_id: N + the id, still digits;
- `_kx`, fbclid, gclid, ttclid, msclkid (as user_data fields and as URL parameters in any URL of the line), and the
  click id part of fbc and the random part of fbp: P + value.

A value the pipeline rejects (a placeholder, an invalid address or phone, a blocked address, an empty parameter)
stays as it is: prefixed, `undefined` would turn into a wrong address with another rejection reason, and `0` into a
valid customer id. Which values those are is asked of the pipeline's own macros (sql/identifier_normalization.sql)
in DuckDB, so the rules are not repeated here. The one shared value per rejected identifier is what every store sees
too; it counts once per copy in identity_rejected_values.times_seen.

Fast because each source file is parsed once (the spans of its identifiers between literal bytes); a copy is then a
dictionary lookup per identifier and one bytes join, and gzip level 1 in threads (zlib lets go of the GIL).
IP addresses and user agents stay shared: they only link browsers with probabilistic matching, off by default.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import duckdb
import polars as pl

from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import read_sql, set_variables

MAX_COPIES = 900  # N = 100 + K stays three digits, so no copy's ids can be read as another's

# A JSON string's content: no quote, no backslash unless it escapes, and never past the line's end (a truncated line
# must not take the next line's opening quote for its closing one).
_STRING = rb'((?:[^"\\\n]|\\[^\n])*)'
_IDENTIFIERS = re.compile(
    rb'"(?:event_id|anonymous_id|session_id)":"(?=[^"])'  # group 0 only: insert P
    rb'|/checkouts/cn/(?=[A-Za-z0-9])'
    rb'|"(email|em|phone|ph|external_id|kx|gclid|ttclid|msclkid|fbc|fbp|order_id)":"' + _STRING + rb'"'
    rb'|[?&](?:_kx|fbclid|gclid|ttclid|msclkid)=([^&#"\\\n]*)'
)
# How each field's value is rewritten (see the module's docstring).
_KIND = {b"email": "email", b"em": "email_hash", b"phone": "phone", b"ph": "phone_hash", b"external_id": "number",
         b"order_id": "number", b"kx": "token", b"gclid": "token", b"ttclid": "token", b"msclkid": "token",
         b"fbc": "fb_cookie", b"fbp": "fb_cookie"}
_INSERT = ("insert", b"")  # the key of an event, browser, session id or checkout token: P goes in front
_FB_COOKIE = re.compile(rb"^(fb\.\d+\.\d+\.)(.+)$", re.S)  # fb.1.<ms>.<fbclid> (fbc) or fb.1.<ms>.<random> (fbp)
_SHOP = re.compile(rb'"shop":"' + _STRING + rb'"')


def _parse(data: bytes) -> tuple[list[bytes], list[tuple[str, bytes]]]:
    """The file as literal pieces with an identifier between each two: (kind, raw JSON string content)."""
    literals, keys, position = [], [], 0
    for match in _IDENTIFIERS.finditer(data):
        field, value, parameter = match.group(1, 2, 3)
        if field is not None:
            start, end = match.span(2)
            key = (_KIND[field], value)
        elif parameter is not None:
            start, end = match.span(3)
            key = ("token", parameter)
        else:
            start = end = match.end()
            key = _INSERT
        literals.append(data[position:start])
        keys.append(key)
        position = end
    literals.append(data[position:])
    return literals, keys


def _text(raw: bytes) -> str:
    return json.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode()


class Rewriter:
    """What each identifier of the source becomes in each copy; built from every value of the source at once."""

    def __init__(self, keys: set[tuple[str, bytes]], shops: set[str], settings: Settings):
        fb_ids = {_FB_COOKIE.match(raw) for kind, raw in keys if kind == "fb_cookie"}
        tokens = {raw for kind, raw in keys if kind in ("token", "number")} | {m.group(2) for m in fb_ids if m}
        values = pl.DataFrame(
            [(kind, raw, _text(raw)) for kind, raw in
             {("token", raw) for raw in tokens} | {key for key in keys if key[0] in ("email", "phone")}
             | {(kind, raw) for kind, raw in keys if kind in ("email_hash", "phone_hash")}],
            schema={"kind": pl.String, "raw": pl.Binary, "text": pl.String}, orient="row")
        connection = duckdb.connect()
        set_variables(connection, {"blocked_emails": [entry.lower() for entry in settings.identity.blocked_emails]})
        connection.execute(read_sql("identifier_normalization"))
        connection.register("source_values", values)
        connection.register("shops", pl.DataFrame({"shop": sorted(shops) or [""]}))
        judged = connection.execute("""
            with normalised as (
                select kind, raw, case kind when 'email' then normalized_email(text)
                                            when 'phone' then e164_phone(text)
                                            when 'token' then trim(text)
                                            else lower(trim(text)) end as value
                from source_values)
            select kind, raw, value, case kind
                    when 'email' then (select bool_or(email_rejection(value, shop) is not null) from shops)
                    when 'phone' then phone_rejection(value) is not null
                    when 'token' then token_rejection(value) is not null
                    else hash_rejection(value) is not null end as rejected
            from normalised""").fetchall()
        connection.close()
        # (kind, raw) -> the normalised value, None when the pipeline rejects it
        self.accepted = {(kind, raw): None if rejected else value for kind, raw, value, rejected in judged}
        # A hash the source also holds in plain: its plain value (normalised), so the copy's hash is of the copy's.
        self.plain_of = {("email_hash", _sha256(value)): value for (kind, _), value in self.accepted.items()
                         if kind == "email" and value is not None}
        self.plain_of.update({("phone_hash", _sha256(value)): value for (kind, _), value in self.accepted.items()
                              if kind == "phone" and value is not None})

    def table(self, keys: set[tuple[str, bytes]], copy: int) -> dict[tuple[str, bytes], bytes]:
        """Each key's bytes in copy `copy`."""
        prefix, number = f"c{copy:03d}-", str(100 + copy)
        rewrite: dict[str, Callable[[bytes], bytes]] = {
            "insert": lambda raw: prefix.encode(),
            "email": lambda raw: self._after_spaces(raw, prefix) if self.accepted[("email", raw)] else raw,
            "phone": lambda raw: ("+" + number + value[1:]).encode()
            if (value := self.accepted[("phone", raw)]) else raw,
            "number": lambda raw: (number + value).encode() if (value := self.accepted[("token", raw)]) else raw,
            "token": lambda raw: self._after_spaces(raw, prefix) if self.accepted[("token", raw)] else raw,
            "fb_cookie": lambda raw: self._fb_cookie(raw, prefix),
            "email_hash": lambda raw: self._hash("email_hash", raw, lambda plain: prefix + plain, prefix),
            "phone_hash": lambda raw: self._hash("phone_hash", raw, lambda plain: "+" + number + plain[1:], prefix),
        }
        return {key: rewrite[key[0]](key[1]) for key in keys}

    @staticmethod
    def _after_spaces(raw: bytes, prefix: str) -> bytes:
        """The prefix after the leading spaces `trim` takes off, so the normalised value is prefix + the old one."""
        spaces = len(raw) - len(raw.lstrip(b" "))
        return raw[:spaces] + prefix.encode() + raw[spaces:]

    def _fb_cookie(self, raw: bytes, prefix: str) -> bytes:
        match = _FB_COOKIE.match(raw)
        if match is None or not self.accepted[("token", match.group(2))]:
            return raw
        return match.group(1) + self._after_spaces(match.group(2), prefix)

    def _hash(self, kind: str, raw: bytes, copied: Callable[[str], str], prefix: str) -> bytes:
        value = self.accepted[(kind, raw)]
        if value is None:
            return raw
        plain = self.plain_of.get((kind, value))
        return _sha256(copied(plain) if plain is not None else prefix + value).encode()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _customers(source: Path) -> list[tuple[Path, list[dict[str, str]]]]:
    return [(path, list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))))
            for path in sorted((source / "customers").rglob("*.csv"))]


def _customer_keys(row: dict[str, str]) -> dict[str, tuple[str, bytes]]:
    """The identifying columns of an export row as the keys the events use for the same values."""
    return {column: (kind, json.dumps(row[column], ensure_ascii=False)[1:-1].encode())
            for column, kind in (("customer_id", "number"), ("email", "email"), ("phone", "phone"))
            if row.get(column)}


def build_copies(source: Path, landing: Path, copies: int, log: Callable[[str], None]) -> int:
    """The copies' event files under landing/events/copy=K/... (gzip level 1: written fast, read like any other)
    and their customers exports under landing/customers/copy=K/; returns the number of event lines written."""
    if not 1 <= copies <= MAX_COPIES:
        raise SystemExit(f"--copies must be between 1 and {MAX_COPIES} (got {copies})")
    files = sorted((source / "events").rglob("*.ndjson.gz"))
    if not files:
        raise SystemExit(f"no events (*.ndjson.gz) under {source / 'events'}")
    exports = _customers(source)
    keys: set[tuple[str, bytes]] = set()
    shops: set[str] = set()
    for path in files:
        data = gzip.decompress(path.read_bytes())
        keys.update(_parse(data)[1])
        shops.update(_text(raw) for raw in set(_SHOP.findall(data)))
    for _, rows in exports:
        for row in rows:
            keys.update(_customer_keys(row).values())
    rewriter = Rewriter(keys, shops, Settings())
    log(f"{len(keys):,} distinct identifier values in {len(files)} files")

    lines = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        for number, path in enumerate(files):
            data = gzip.decompress(path.read_bytes())
            literals, file_keys = _parse(data)
            pieces: list[bytes] = [b""] * (2 * len(literals) - 1)
            pieces[0::2] = literals
            distinct = set(file_keys)
            writes = []
            for copy in range(copies):
                pieces[1::2] = map(rewriter.table(distinct, copy).__getitem__, file_keys)
                target = landing / "events" / f"copy={copy:03d}" / path.relative_to(source / "events")
                writes.append(pool.submit(_write_gzip, target, b"".join(pieces)))
            for write in writes:
                write.result()
            lines += data.count(b"\n") * copies
            if (number + 1) % 100 == 0 or number + 1 == len(files):
                log(f"{number + 1} of {len(files)} source files copied {copies} times ({lines:,} lines)")

    for path, rows in exports:
        identifying = [_customer_keys(row) for row in rows]
        distinct = {key for keys_of_row in identifying for key in keys_of_row.values()}
        for copy in range(copies):
            table = rewriter.table(distinct, copy)
            copied_rows = [{**row, **{column: _text(table[key]) for column, key in keys_of_row.items()}}
                           for row, keys_of_row in zip(rows, identifying)]
            target = landing / "customers" / f"copy={copy:03d}" / path.relative_to(source / "customers")
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
                writer.writeheader()
                writer.writerows(copied_rows)
    return lines


def _write_gzip(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(gzip.compress(data, compresslevel=1, mtime=0))
