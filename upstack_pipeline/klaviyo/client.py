"""A small Klaviyo API client: paced under Klaviyo's rate limits, retrying only what is safe to retry.

Klaviyo's bulk endpoints allow 10 requests a second and 150 a minute per account, in fixed windows. The client
keeps a sliding log of its own requests, each counted from the moment it leaves until a window's length after its
answer (`RatePacer`), which keeps any window Klaviyo draws under the limit too, and spends the allowance: a second's
10 leave at once (the burst), the first minute's 150 in about 15 seconds plus the answers' time. It still honours
a 429's Retry-After (another process may share the account). 429, 5xx, timeouts and dropped connections are
retried with jittered exponential backoff: every event carries a unique_id, so a request that did arrive before the
connection dropped is harmless to send again. Other 4xx are the request's fault and are never retried.
The API key is sent in a header and never logged, returned or stored.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import httpx

from upstack_pipeline.klaviyo.limits import encode_body

REVISION = "2026-10-15"
# Klaviyo's limits for the bulk endpoints, per account (see the module docstring).
REQUESTS_PER_SECOND = 10
REQUESTS_PER_MINUTE = 150
RETRIABLE_STATUSES = {429, 500, 502, 503, 504}


class KlaviyoDestinationError(RuntimeError):
    """Delivery cannot go on this run: the message says what a person should check. Pending rows stay pending."""


class KlaviyoAuthError(KlaviyoDestinationError):
    """Klaviyo refused the key (401) or its scopes (403): nothing more can be sent until a person fixes it."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class KlaviyoRevisionError(KlaviyoDestinationError):
    """Klaviyo refused the API revision this release speaks: every request would fail the same way."""


class KlaviyoAddressError(KlaviyoDestinationError):
    """KLAVIYO_BASE_URL answers, but not as Klaviyo's API does (404, 405, a page that is not JSON): a typo, a
    proxy or a website. Dead-lettering events on such answers would lose them, so delivery stops instead."""


class KlaviyoRateLimitedError(KlaviyoDestinationError):
    """Klaviyo kept answering 429 after every retry: another client is spending the account's allowance."""


class KlaviyoUnavailableError(KlaviyoDestinationError):
    """No answer from Klaviyo after every attempt (refused, DNS, TLS, timeouts), or a server error every time.

    Sending the rest of the outbox would only repeat the wait, so the run stops and says where it looked."""


@dataclass
class Attempt:
    """One HTTP request as sent, for klaviyo_deliveries (never the key)."""

    endpoint: str
    status: int | None
    events: int
    bytes: int
    latency_ms: float
    error: str | None
    # The request this attempt belongs to, shared by its retries: what an outbox row names as the request that
    # settled it, so its story reads from the event to every try and Klaviyo's last answer.
    request_id: str
    sent_at: float  # when the request left (the epoch's seconds)


@dataclass
class Outcome:
    """The last answer to a request after retries."""

    status: int | None
    body: dict | None
    attempts: int
    request_id: str


def allowance_seconds(requests: int, per_second: int = REQUESTS_PER_SECOND,
                      per_minute: int = REQUESTS_PER_MINUTE) -> float:
    """The least time Klaviyo's limits take to admit `requests` (the floor a delivery is measured against): a
    minute for each full minute's allowance before the last request's minute, then `per_second` a second."""
    minutes, rest = divmod(requests - 1, per_minute)
    return 60 * minutes + (rest + 1) / per_second


class Trip:
    """One request's trip, as the pacer counts it: it left, and (once answered) when its answer came."""

    __slots__ = ("answered_at",)

    def __init__(self):
        self.answered_at: float | None = None  # None: still in flight


class RatePacer:
    """At most `per_second` requests in any second and `per_minute` in any minute, as Klaviyo counts them, and no
    wait beyond that: a turn is given the moment both windows have room, so a burst leaves at once.

    Klaviyo counts a request when it arrives, a moment this process never sees: somewhere between the request
    leaving and its answer coming back. So a request counts in a window from the moment it leaves until a window's
    length after its answer came (`answered`). Then no window Klaviyo can draw holds more of this pacer's requests
    than the limit, however long their trips took: a slow network, a new connection's handshake or a busy machine
    delays the next send, never causes a 429. (Counting from departures with a margin did not hold: on a busy
    machine trips differed by more than any margin the delivery target left room for.) The price is the answers'
    time: a burst every second plus the time its answers take, a minute's allowance every minute plus one answer's.
    A request that got no answer (a timeout, a connection dropped once it was sent) counts from when it gave up;
    should it still arrive later, Klaviyo may answer a 429, honoured as any other (Retry-After), as are those caused
    by another process spending the same account.

    `clock` and `sleep` are the time it paces by (a test passes a simulated one). Threads share a pacer."""

    def __init__(self, per_second: int, per_minute: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.per_second = per_second  # delivery keeps as many requests in flight
        self.windows = ((1.0, per_second), (60.0, per_minute))
        self.trips: list[Trip] = []
        self.clock = clock
        self.sleep = sleep
        self.lock = threading.Lock()
        self.answer_came = threading.Condition(self.lock)
        self.blocked_until = 0.0

    def wait_turn(self) -> Trip:
        """Waits for room in both windows and returns the request's trip: pass it to `answered` however the
        request ends (an answer, a timeout, an error), or its window never ends."""
        with self.answer_came:
            while True:
                now = self.clock()
                delay = self._delay(now)
                if delay <= 0:
                    trip = Trip()
                    self.trips.append(trip)
                    return trip
                if delay == math.inf:
                    self.answer_came.wait()  # only an answer in flight can make room
                    continue
                self.answer_came.release()
                try:
                    self.sleep(delay)
                finally:
                    self.answer_came.acquire()

    def answered(self, trip: Trip) -> None:
        with self.answer_came:
            trip.answered_at = self.clock()
            self.answer_came.notify_all()

    def block_for(self, seconds: float) -> None:
        with self.lock:
            self.blocked_until = max(self.blocked_until, self.clock() + seconds)

    def _delay(self, now: float) -> float:
        """Seconds until both windows have room (infinite while that waits on answers in flight)."""
        longest = max(span for span, _ in self.windows)
        self.trips = [trip for trip in self.trips if trip.answered_at is None or trip.answered_at + longest > now]
        delay = self.blocked_until - now
        for span, limit in self.windows:
            # When each trip counted in this window stops counting: a window's length after its answer.
            ends = sorted(math.inf if trip.answered_at is None else trip.answered_at + span for trip in self.trips)
            ends = [end for end in ends if end > now]
            if len(ends) >= limit:
                delay = max(delay, ends[len(ends) - limit] - now)  # once all but limit - 1 have stopped
        return delay


class KlaviyoClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        revision: str = REVISION,
        per_second: int = REQUESTS_PER_SECOND,
        per_minute: int = REQUESTS_PER_MINUTE,
        max_attempts: int = 8,
        connect_attempts: int = 3,
        timeout_seconds: float = 30.0,
        backoff_seconds: float = 0.5,
        on_attempt: Callable[[Attempt], None] = lambda attempt: None,
    ):
        self.http = httpx.Client(
            base_url=base_url,
            timeout=timeout_seconds,
            headers={
                "Authorization": f"Klaviyo-API-Key {api_key}",
                "revision": revision,
                "Accept": "application/vnd.api+json",
                "Content-Type": "application/vnd.api+json",
            },
        )
        self.pacer = RatePacer(per_second, per_minute)
        self.max_attempts = max_attempts
        # A request that never left (connection refused, DNS, TLS) is a wrong address, a firewall or an outage,
        # not a blip that a minute of backoff cures: give up sooner than on a timeout or a 5xx.
        self.connect_attempts = min(connect_attempts, max_attempts)
        self.base_url = base_url
        self.revision = revision
        self.backoff_seconds = backoff_seconds
        self.on_attempt = on_attempt
        self.random = random.Random()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "KlaviyoClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def post(self, path: str, body: dict | bytes, *, events: int = 0) -> Outcome:
        """`body`: the JSON:API document, or its bytes as `encode_body` would make them (delivery builds its bulk
        bodies in SQL, from JSON the mapping stored)."""
        payload = body if isinstance(body, bytes) else encode_body(body)
        return self._send("POST", path, payload, events)

    def get(self, path: str) -> Outcome:
        return self._send("GET", path, None, 0)

    def import_profiles(self, body: dict, *, poll_seconds: float = 1.0, timeout_seconds: float = 600.0) -> list[dict]:
        """Bulk Import Profiles: creates the job, waits for it to finish, returns its import errors."""
        created = self.post("/api/profile-bulk-import-jobs", body, events=0)
        if created.status is None or created.status >= 300:
            raise RuntimeError(f"Klaviyo did not accept the profile import: {_error_summary(created.status, created.body)}")
        job_id = created.body["data"]["id"]
        deadline = time.monotonic() + timeout_seconds
        while True:
            job = self.get(f"/api/profile-bulk-import-jobs/{job_id}")
            status = ((job.body or {}).get("data") or {}).get("attributes", {}).get("status")
            if status in ("complete", "cancelled", "failed") or time.monotonic() > deadline:
                break
            time.sleep(poll_seconds)
        errors = self.get(f"/api/profile-bulk-import-jobs/{job_id}/import-errors")
        return list((errors.body or {}).get("data") or [])

    def _send(self, method: str, path: str, payload: bytes | None, events: int) -> Outcome:
        request_id = uuid.uuid4().hex
        attempt = 0
        while True:
            attempt += 1
            trip = self.pacer.wait_turn()
            started, sent_at = time.monotonic(), time.time()
            status, body, error, retry_after, never_sent, not_json = None, None, None, None, False, False
            try:
                response = self.http.request(method, path, content=payload)
                status = response.status_code
                retry_after = response.headers.get("Retry-After")
                self._respect_rate_limit_headers(response.headers)
                body = response.json() if response.content else None
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                never_sent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol))
            except ValueError:
                body, not_json = None, True  # Klaviyo answers errors in JSON:API; something else answered
            finally:
                self.pacer.answered(trip)  # however the request ended: its window must close
            self.on_attempt(Attempt(path, status, events, len(payload or b""), (time.monotonic() - started) * 1000,
                                    error or _error_summary(status, body), request_id, sent_at))
            if status in (401, 403):
                raise KlaviyoAuthError(_auth_advice(status, body), status)
            if status == 400 and _names_parameter(body, "revision"):
                raise KlaviyoRevisionError(
                    f"Klaviyo refused API revision {self.revision} ({_error_summary(status, body)}). This release of "
                    f"upstack-flows writes its payloads for revision {REVISION}: if KLAVIYO_BASE_URL is Klaviyo's "
                    "own address, use that revision (the klaviyo resource's `revision`) or upgrade upstack-flows; "
                    "else check what serves KLAVIYO_BASE_URL.")
            if status in (404, 405) or (not_json and status is not None and 400 <= status < 429):
                raise KlaviyoAddressError(
                    f"{self.base_url} does not answer as Klaviyo's API does: {method} {path} got HTTP {status}"
                    f"{' and a body that is not JSON' if not_json else ''}. Check KLAVIYO_BASE_URL (Klaviyo's "
                    "is https://a.klaviyo.com, with no path). Nothing was lost: the outbox keeps every event.")
            if status is not None and status not in RETRIABLE_STATUSES:
                return Outcome(status, body, attempt, request_id)
            if attempt >= (self.connect_attempts if never_sent else self.max_attempts):
                if status is None or status >= 500:
                    raise KlaviyoUnavailableError(self._unavailable_advice(attempt, error, status, body))
                return Outcome(status, body, attempt, request_id)  # still rate limited: the rows wait for the next run
            self._back_off(attempt, retry_after)

    def _unavailable_advice(self, attempts: int, error: str | None, status: int | None, body: dict | None) -> str:
        if status is None:
            return (f"Could not reach Klaviyo at {self.base_url} ({attempts} attempts, last: {error}). Check "
                    "KLAVIYO_BASE_URL, this machine's network, proxy and firewall (outbound HTTPS to a.klaviyo.com), "
                    "and status.klaviyo.com. Nothing was lost: the outbox keeps every event for the next run.")
        return (f"Klaviyo at {self.base_url} answered {_error_summary(status, body)} to all {attempts} attempts. "
                "Check status.klaviyo.com; if KLAVIYO_BASE_URL is not Klaviyo's own address, check what serves it. "
                "Nothing was lost: the outbox keeps every event for the next run.")

    def _respect_rate_limit_headers(self, headers: httpx.Headers) -> None:
        """Another client on the same account spends the same allowance: when Klaviyo says none is left in the
        window, nobody here sends until it resets."""
        remaining, reset = headers.get("RateLimit-Remaining"), headers.get("RateLimit-Reset")
        if remaining is not None and reset is not None and remaining.isdigit() and reset.isdigit() \
                and int(remaining) == 0:
            self.pacer.block_for(float(reset))

    def _back_off(self, attempt: int, retry_after: str | None) -> None:
        if retry_after is not None:
            seconds = float(retry_after) + self.random.uniform(0, 0.25)
            self.pacer.block_for(seconds)  # every thread waits: the account, not this request, is over the limit
            return
        time.sleep(self.backoff_seconds * 2 ** (attempt - 1) * self.random.uniform(0.5, 1.5))


def _error_summary(status: int | None, body: dict | None) -> str | None:
    if status is None or status < 400:
        return None
    errors = (body or {}).get("errors") or []
    details = "; ".join(str(error.get("detail") or error.get("title")) for error in errors[:3])
    return f"HTTP {status}" + (f": {details}" if details else "")


def _names_parameter(body: dict | None, parameter: str) -> bool:
    errors = (body or {}).get("errors") or []
    return any((error.get("source") or {}).get("parameter") == parameter for error in errors)


def _auth_advice(status: int, body: dict | None) -> str:
    detail = _error_summary(status, body)
    if status == 401:
        return (f"Klaviyo rejected the API key ({detail}). Set KLAVIYO_API_KEY to a valid private key "
                "(Klaviyo > Settings > API keys) and run `upstack klaviyo check-key`.")
    return (f"The API key lacks a scope this delivery needs ({detail}). Give it Events: Write, Profiles: Write "
            "and, with a list, Lists: Write, then run `upstack klaviyo check-key`.")


# Each scope, probed by a request that needs it and changes nothing: Klaviyo checks the key and its scopes
# before the body, so a 4xx about the body proves the scope, and 401/403 disproves it.
SCOPE_PROBES = {
    "events:write": ("/api/events", {}),
    "profiles:write": ("/api/profile-bulk-import-jobs", {}),
    "lists:write": ("/api/profile-bulk-import-jobs", {"data": {
        "type": "profile-bulk-import-job", "attributes": {"profiles": {"data": []}},
        "relationships": {"lists": {"data": [{"type": "list", "id": "upstack-scope-probe"}]}}}}),
}


def probe(client: KlaviyoClient) -> None:
    """One request that changes nothing and reaches what delivery needs (the address, the key, events:write, the
    revision): raises the KlaviyoDestinationError a delivery would have met."""
    client.post(*SCOPE_PROBES["events:write"])


def check_key(client: KlaviyoClient, *, needs_list: bool) -> dict[str, bool]:
    """Scope -> whether the key has it, for the scopes delivery needs (lists:write only with a list).

    Raises what stops every scope alike, so a person is told the real cause: KlaviyoUnavailableError (nothing
    answered), KlaviyoAddressError (something else answered), KlaviyoAuthError with status 401 (the key itself),
    KlaviyoRevisionError (the API revision), KlaviyoRateLimitedError.
    """
    verdicts = {}
    for scope, (path, body) in SCOPE_PROBES.items():
        if scope == "lists:write" and not needs_list:
            continue
        try:
            outcome = client.post(path, body)
        except KlaviyoAuthError as error:
            if error.status == 401:
                raise
            verdicts[scope] = False
            continue
        if outcome.status == 429:
            raise KlaviyoRateLimitedError("Klaviyo kept answering 429: another client is spending this account's "
                                          "allowance. Run the check again in a minute.")
        verdicts[scope] = True  # any other answer came after Klaviyo checked the key and its scopes
    return verdicts
