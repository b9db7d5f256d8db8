"""A local Klaviyo emulator: a real HTTP server on 127.0.0.1 that answers the way Klaviyo's API does.

Why it exists: the demo, the delivery tests and the delivery benchmark need a Klaviyo that checks what we send as
strictly as Klaviyo does, enforces Klaviyo's rate limits, and fails in the ways a network and a busy service fail
(5xx, answers lost after the work was done, slow answers, 429s), deterministically, without an account or a
network. It serves the endpoints delivery uses:

- `POST /api/event-bulk-create-jobs` (Bulk Create Events, `EventsBulkCreateJob`): 202, no body.
- `POST /api/events` (Create Event, `EventCreateQueryV2`): 202, no body.
- `POST /api/profile-bulk-import-jobs` (Bulk Import Profiles, `ProfileImportJobCreateQuery`): 202,
  `PostProfileImportJobResponse` (a `profile-bulk-import-job` with status `queued`).
- `GET /api/profile-bulk-import-jobs/{job_id}`: 200, `GetProfileImportJobResponseCompoundDocument` (`complete`).
- `GET /api/profile-bulk-import-jobs/{id}/import-errors`: 200, `GetImportErrorResponseCollection`.
- `GET /api/accounts`: 200, `GetAccountResponseCollection` with one account.

Shapes and status codes follow Klaviyo's OpenAPI spec (revision 2026-07-15; the tests check the answers against the
part of it in `tests/contract/`) and its guide "Rate limits, status codes, and errors". What a request goes
through, in order:

1. route (404 unknown path, 405 wrong method);
2. `Authorization: Klaviyo-API-Key <key>` (401), then the `revision` header (400);
3. rate limits: fixed burst (1 s) and steady (60 s) windows per account, shared by every endpoint here (429 with
   `Retry-After`; the faults' forced 429s come here too); a request counts at the moment it arrived (its headers),
   as at Klaviyo's edge, not when this process got round to it after reading its body;
4. fault: a 503 before anything is processed;
5. the endpoint's scope (403; `X:write` grants `X:read`, as Klaviyo's "Full Access" does); Klaviyo checks key and
   scopes before it reads the body, which lets a client probe a scope with an empty body;
6. the body: JSON (400, 415 for a non-JSON content type), the SDK's request model (400, pointer to the field), the
   prose limits of `upstack_pipeline.klaviyo.limits` (400, pointer to the event or profile);
7. processing (events deduplicated on profile identifier + metric + unique_id, as Klaviyo documents), then the
   faults that come after processing: the connection closed without an answer, or a slow answer.

With rate limits on, every answer except a 429 carries `RateLimit-Limit`, `RateLimit-Remaining` and
`RateLimit-Reset` for the steady window; a 429 carries `Retry-After` instead (Klaviyo's guide: those headers "are not
returned when you actually hit a HTTP 429"). A window starts at the first request after the previous one ended, so
a client that paces by its own send times at exactly the limit can still meet a 429 when arrival times jitter.

The API key is kept only to compare with: it is never logged, never put in `requests()`, never echoed.
Needs Klaviyo's SDK (`klaviyo-api`, importable as `openapi_client`) for its request models. The HTTP is Starlette's
and uvicorn's (both already installed with dagster-webserver), so clients meet a real server's keep-alive and
chunked bodies, not a hand-written parser's idea of them.

    python -m upstack_pipeline.sandbox.klaviyo_emulator --port 8787 [--api-key K] [--no-rate-limits]
        [--check-processes N]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import hmac
import json
import math
import multiprocessing
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import traceback
import typing
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Callable

import anyio
import pydantic
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from upstack_pipeline.klaviyo import limits

JSON_API = "application/vnd.api+json"
DEFAULT_SCOPES = frozenset({"events:write", "profiles:write", "lists:write", "accounts:read"})
# Bulk Import Profiles: "Accepts up to 10,000 profiles per request. The maximum allowed payload size is 5MB."
MAX_PROFILES_PER_IMPORT = 10_000
# The request bodies Klaviyo takes are at most 5 MB; anything far larger is refused before it is parsed.
MAX_RAW_BODY_BYTES = 4 * limits.MAX_BULK_REQUEST_BYTES
_REVISION = re.compile(r"\d{4}-\d{2}-\d{2}(\.[A-Za-z0-9_-]+)?")
_BULK_EVENTS = "/data/attributes/events-bulk-create/data"
BULK_EVENTS_PATH = "/api/event-bulk-create-jobs"
# Identifiers by which the emulator recognises "the same profile", in the order the project's brief gives.
_EVENT_PROFILE_KEYS = ("email", "_kx", "phone_number", "external_id", "anonymous_id")
_IMPORT_PROFILE_KEYS = ("email", "_kx", "phone_number", "external_id")
# Every method reaches the emulator's own routing (see KlaviyoEmulator._serve).
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# How long stop() lets answers in flight finish before uvicorn cancels them.
_STOP_GRACE_SECONDS = 2


@dataclass
class Faults:
    """Failures to inject, each a share of the requests that pass authentication and the rate limits.

    Deterministic for a given seed and request order (one `random.Random(seed)`, three draws per request).
    """

    server_error_rate: float = 0.0  # answered 503 before processing: nothing stored
    drop_after_processing_rate: float = 0.0  # processed and stored, then the connection closed without an answer
    slow_rate: float = 0.0  # answered after `slow_seconds` more
    slow_seconds: float = 0.0
    force_429_every: int = 0  # every Nth request gets a 429 on top of the real limits (0 = off)
    seed: int = 0


@dataclass
class RateLimits:
    """Klaviyo's per-account fixed windows for the bulk endpoints (tier M: 10/s burst, 150/min steady)."""

    per_second: int = 10
    per_minute: int = 150


class ApiError(Exception):
    """A JSON:API error answer, raised anywhere in a request's handling and rendered by the dispatcher."""

    def __init__(self, status: int, errors: list[dict], headers: dict[str, str] | None = None,
                 fault: str | None = None):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.errors = errors
        self.headers = headers or {}
        self.fault = fault  # the injected fault that caused it, for requests()


def api_error(status: int, code: str, title: str, detail: str, pointer: str = "/data",
              parameter: str | None = None) -> dict:
    """One error object as Klaviyo returns it: {id, status, code, title, detail, source: {pointer}}."""
    source: dict[str, str] = {"pointer": pointer}
    if parameter:
        source["parameter"] = parameter
    return {"id": str(uuid.uuid4()), "status": status, "code": code, "title": title, "detail": detail,
            "source": source}


def _invalid(errors: list[tuple[str, str]]) -> ApiError:
    """A 400 listing (detail, pointer) pairs, one JSON:API error each."""
    return ApiError(400, [api_error(400, "invalid", "Invalid input.", detail, pointer) for detail, pointer in errors])


@dataclass
class _Route:
    method: str
    pattern: re.Pattern
    handler: Callable[["_Request"], "_Reply"]
    scope: str
    # The handler parses and checks the raw body itself (in another process when the emulator has them).
    reads_raw: bool = False


@dataclass
class _Request:
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]  # lower-case names
    raw: bytes
    body: Any = None
    events: int | None = None  # set by a handler that parsed the body elsewhere (`_count_events` otherwise)


@dataclass
class _Reply:
    status: int
    body: dict | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Admission:
    """Steps 1-5 of a request (see the module docstring), taken from its headers: where it goes, or why not."""

    received_at: float
    route: _Route | None = None
    params: dict[str, str] = field(default_factory=dict)
    refusal: Exception | None = None  # an ApiError to answer, or a bug in the emulator
    drop: bool = False
    delay: float = 0.0


@dataclass
class _Outcome:
    """What the HTTP layer does: answer `reply` after `delay` seconds, or close the connection (`drop`)."""

    reply: _Reply
    drop: bool = False
    delay: float = 0.0


class _Window:
    """One fixed window: at most `limit` requests from its start (the first request after the last one ended)."""

    def __init__(self, seconds: float, limit: int):
        self.seconds, self.limit = seconds, limit
        self.start: float | None = None
        self.count = 0

    def roll(self, now: float) -> None:
        if self.start is not None and now >= self.start + self.seconds:
            self.start, self.count = None, 0

    def reset_in(self, now: float) -> float:
        return self.seconds if self.start is None else self.start + self.seconds - now


class _FixedWindows:
    """Klaviyo's rate limiting: "a fixed-window rate limiting algorithm with two distinct windows: burst (1-second
    window) and steady (1-minute window)", per account. A refused request does not count against the windows.
    Not thread-safe: the emulator calls it under its lock."""

    def __init__(self, rate_limits: RateLimits, clock: Callable[[], float] = time.monotonic):
        self.burst = _Window(1.0, rate_limits.per_second)
        self.steady = _Window(60.0, rate_limits.per_minute)
        self.clock = clock

    def admit(self, now: float | None = None) -> float | None:
        """Counts the request that arrived `now` (by default, now) and returns None, or returns the seconds until a
        full window resets."""
        now = self.clock() if now is None else now
        windows = (self.burst, self.steady)
        for window in windows:
            window.roll(now)
        full = [window for window in windows if window.count >= window.limit]
        if full:
            return max(window.reset_in(now) for window in full)
        for window in windows:
            if window.start is None:
                window.start = now
            window.count += 1
        return None

    def headers(self) -> dict[str, str]:
        """The steady window's state, as Klaviyo reports it on every answer that is not a 429."""
        now = self.clock()
        self.steady.roll(now)
        return {"RateLimit-Limit": str(self.steady.limit),
                "RateLimit-Remaining": str(max(0, self.steady.limit - self.steady.count)),
                "RateLimit-Reset": str(max(0, math.ceil(self.steady.reset_in(now))))}


class KlaviyoEmulator:
    """Klaviyo's API on 127.0.0.1 for tests, the demo and the delivery benchmark; see the module docstring.

    Use as a context manager (or `start()` / `stop()`); read back what it accepted with `accepted_events()`,
    `accepted_by_metric()`, `duplicate_events`, `accepted_profiles()` and `requests()`. All shared state is
    guarded by one lock, and nothing slow (validation, sleeping, socket I/O) happens while holding it: uvicorn
    serves on an event loop in a daemon thread, and the checks run in one worker thread of their own (see `_serve`).
    """

    def __init__(
        self,
        *,
        api_key: str,
        scopes: frozenset[str] = DEFAULT_SCOPES,
        rate_limits: RateLimits | None = RateLimits(),
        faults: Faults = Faults(),
        host: str = "127.0.0.1",
        port: int = 0,
        newest_revision: str | None = None,
        check_processes: int = 0,
    ):
        """`newest_revision`: refuse later revisions (400 on the `revision` parameter), as Klaviyo refuses one
        it does not serve: an old emulator, or an account behind a client that speaks a newer API.

        `check_processes`: Bulk Create Events bodies are parsed and checked in this many processes of their own
        (0: in a thread of this one). Checking a 1,000-event body with the SDK's models and the prose limits takes
        this machine 60-250 ms of one core, while Klaviyo takes ten such requests a second: in one process the
        checks, not the rate limits, would set the pace (the benchmarks' emulator uses a process per core)."""
        if not api_key:
            raise ValueError("the emulator needs an API key to expect")
        self._authorization = f"Klaviyo-API-Key {api_key}".encode()
        self.scopes = frozenset(scopes)
        self.rate_limits = rate_limits
        self.faults = faults
        self.host, self.port = host, port
        self.newest_revision = newest_revision
        self._lock = threading.Lock()
        self.check_processes = check_processes
        self._checks = anyio.CapacityLimiter(max(1, check_processes))
        self._pool: ProcessPoolExecutor | None = None
        self._limiter = _FixedWindows(rate_limits) if rate_limits is not None else None
        self._random = _SeededRandom(faults.seed)
        self._gate_count = 0  # requests that reached the rate limits (force_429_every counts these)
        # Accepted events, stored compactly (a benchmark keeps hundreds of thousands): (profile JSON, event JSON);
        # the profile's JSON is shared by the events of one profile entry.
        self._events: list[tuple[str, str]] = []
        self._event_keys: set[bytes] = set()  # digests of (profile identifier, metric, unique_id)
        self._by_metric: Counter[str] = Counter()
        self._duplicates = 0
        self._profiles: dict[str, dict] = {}  # imported profiles by identifier: {"profile": attributes, "lists"}
        self._jobs: dict[str, dict] = {}
        self._requests: list[dict] = []
        self._rejected_unique_ids: set[str] = set()
        self._routes = [
            _Route("POST", re.compile(r"/api/event-bulk-create-jobs/?"), self._create_event_bulk_job, "events:write",
                   reads_raw=True),
            _Route("POST", re.compile(r"/api/events/?"), self._create_event, "events:write"),
            _Route("POST", re.compile(r"/api/profile-bulk-import-jobs/?"), self._create_profile_import_job,
                   "profiles:write"),
            _Route("GET", re.compile(r"/api/profile-bulk-import-jobs/(?P<job_id>[^/]+)/?"),
                   self._get_profile_import_job, "profiles:read"),
            _Route("GET", re.compile(r"/api/profile-bulk-import-jobs/(?P<job_id>[^/]+)/import-errors/?"),
                   self._get_import_errors, "profiles:read"),
            _Route("GET", re.compile(r"/api/accounts/?"), self._get_accounts, "accounts:read"),
        ]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> "KlaviyoEmulator":
        """Binds here, so a port in use fails in the caller (and port 0 is resolved before `base_url` is set), then
        serves in a daemon thread and returns once uvicorn accepts. Loads the SDK's models first, so a missing SDK
        fails here too. The check processes start here too, and are ready before it returns."""
        sdk_models()
        if self.check_processes:
            # Spawned, not forked: the caller (a test, the demo) may run threads, which a fork would copy mid-step.
            self._pool = ProcessPoolExecutor(self.check_processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_ready_to_check)
            for started in [self._pool.submit(int) for _ in range(self.check_processes)]:
                started.result()
        listener = socket.create_server((self.host, self.port))
        host, self.port = listener.getsockname()[:2]
        self.base_url = f"http://{host}:{self.port}"
        app = Starlette(routes=[Route("/{path:path}", self._serve, methods=_METHODS)])
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,  # leave the process's logging as it is; errors still reach stderr
            log_level="warning",  # no line per start and stop: they would flood the tests' and demo's output
            access_log=False,
            proxy_headers=False,  # a request's client is its connection, which a drop closes
            timeout_keep_alive=120,  # clients pool connections; closing one under a client races its next request
            timeout_graceful_shutdown=_STOP_GRACE_SECONDS,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [listener]},
                                        name=f"klaviyo-emulator-{self.port}", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                listener.close()
                self._server = self._thread = None
                raise RuntimeError("the Klaviyo emulator's server did not start; see the error above")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Closes the listener and the idle keep-alive connections, and lets answers in flight finish (for at most
        `_STOP_GRACE_SECONDS`), so no request is served after stop()."""
        if self._server is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=_STOP_GRACE_SECONDS + 3)  # a check still running in the pool outlasts the grace
        self._server = self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "KlaviyoEmulator":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---- read back (thread-safe copies) ---------------------------------------------------------------------

    def accepted_events(self) -> list[dict]:
        """Every stored event once: {"profile": attributes, "metric", "unique_id", "attributes": event attributes}."""
        with self._lock:
            stored = list(self._events)
        accepted = []
        for profile_json, event_json in stored:
            attributes = json.loads(event_json)
            accepted.append({"profile": json.loads(profile_json), "metric": _metric_name(attributes),
                             "unique_id": attributes.get("unique_id"), "attributes": attributes})
        return accepted

    def accepted_by_metric(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_metric)

    @property
    def duplicate_events(self) -> int:
        """Events received again with the same (profile identifier, metric, unique_id), and not stored again."""
        with self._lock:
            return self._duplicates

    def accepted_profiles(self) -> list[dict]:
        """Profiles imported through Bulk Import Profiles, merged per identifier: {"profile": attributes, "lists"}."""
        with self._lock:
            return json.loads(json.dumps(list(self._profiles.values())))

    def requests(self) -> list[dict]:
        """One entry per HTTP request: method, path (no query), status (None if dropped), events, at, fault."""
        with self._lock:
            return [dict(entry) for entry in self._requests]

    def reject_unique_ids(self, ids: set[str]) -> None:
        """From now on, answer 400 to any request holding one of these unique_ids, naming each such event."""
        with self._lock:
            self._rejected_unique_ids |= set(ids)

    # ---- HTTP -------------------------------------------------------------------------------------------------

    async def _serve(self, request: Request) -> Response:
        """The app's one endpoint: the routing is `_dispatch`'s, so 404 and 405 are JSON:API errors counted in
        `requests()`, and a trailing slash is optional, as at Klaviyo (Starlette would redirect). The checks run in
        a worker thread so that validating a large body holds up neither other connections nor a slow answer; in one
        thread when they run in this process, because they hold the GIL: more threads would not check faster, only
        take turns with the event loop, which would then see requests' headers late (and a burst that keeps the
        limits meet a 429). With check processes, one thread per process, each waiting for its process.

        Steps 1-5 need only the headers and take microseconds: they run here, on the event loop, so that the rate
        limits and the faults' draws meet requests in the order their bodies came in, whichever thread then checks
        which body first."""
        arrived = self._limiter.clock() if self._limiter is not None else None
        try:
            raw = await _read_body(request)
        except ApiError as error:
            return _response(_Reply(error.status, {"errors": error.errors}))
        method, path, headers = request.method, request.scope["path"], dict(request.headers)
        admission = self._admit(method, path, headers, arrived)
        outcome = await anyio.to_thread.run_sync(self._dispatch, method, path, headers, raw, admission,
                                                 limiter=self._checks)
        if outcome.drop:
            return _NoAnswer(self._server)
        if outcome.delay > 0:
            await asyncio.sleep(outcome.delay)
        return _response(outcome.reply)

    # ---- dispatch ---------------------------------------------------------------------------------------------

    def _admit(self, method: str, path: str, headers: dict[str, str], arrived: float | None) -> _Admission:
        """Steps 1-5 of the module docstring; `arrived`: when the request's headers came, on the rate limiter's
        clock."""
        admission = _Admission(received_at=time.time())
        try:
            admission.route, admission.params = self._route(method, path)
            self._authenticate(headers)
            self._check_revision(headers)
            self._pass_rate_limits(arrived)
            server_error, admission.drop, slow = self._draw_faults()
            admission.delay = self.faults.slow_seconds if slow else 0.0
            if server_error:
                admission.drop = False  # answered, with a 503
                raise ApiError(503, [api_error(503, "service_unavailable", "Service unavailable.",
                                               "The service is temporarily unavailable; retry later.")],
                               fault="server_error")
            self._require_scope(admission.route.scope)
        except Exception as error:  # answered by `_dispatch`, as a refusal or as the emulator's own bug
            admission.refusal = error
        return admission

    def _dispatch(self, method: str, path: str, headers: dict[str, str], raw: bytes,
                  admission: _Admission) -> _Outcome:
        """Takes an admitted request through steps 6 and 7 of the module docstring and records it."""
        received_at, drop, delay = admission.received_at, admission.drop, admission.delay
        fault, body, request = None, None, None
        try:
            if admission.refusal is not None:
                raise admission.refusal
            request = _Request(method, path, admission.params, headers, raw)
            if method == "POST" and not admission.route.reads_raw:
                request.body = body = _json_body(headers, raw)
            reply = admission.route.handler(request)
        except ApiError as error:
            reply = _Reply(error.status, {"errors": error.errors}, dict(error.headers))
            fault = error.fault
        except Exception:  # a bug here must not pass for a dropped connection, which clients retry quietly
            traceback.print_exc()
            reply = _Reply(500, {"errors": [api_error(500, "error", "A server error occurred.",
                                                      "The emulator failed; see its standard error.")]})
            fault = "emulator_bug"
        if drop:
            fault = "dropped"
        elif delay:
            fault = fault or "slow"
        if reply.status != 429 and self._limiter is not None:
            with self._lock:
                reply.headers.update(self._limiter.headers())
        entry = {"method": method, "path": path, "status": None if drop else reply.status,
                 "events": request.events if request is not None and request.events is not None
                 else _count_events(path, raw, body), "at": received_at, "fault": fault}
        with self._lock:
            self._requests.append(entry)
        return _Outcome(reply, drop=drop, delay=delay)

    def _route(self, method: str, path: str) -> tuple[_Route, dict[str, str]]:
        allowed = []
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match:
                if route.method == method:
                    return route, match.groupdict()
                allowed.append(route.method)
        if allowed:
            raise ApiError(405, [api_error(405, "method_not_allowed", "Method not allowed.",
                                           f'Method "{method}" not allowed.')], {"Allow": ", ".join(allowed)})
        raise ApiError(404, [api_error(404, "not_found", "Not found.", f"No endpoint at {path}.")])

    def _authenticate(self, headers: dict[str, str]) -> None:
        """401 unless the Authorization header is exactly `Klaviyo-API-Key <key>` (compared in constant time)."""
        sent = headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(sent, self._authorization):
            title = "Incorrect authentication credentials." if sent else "Authentication credentials were not provided."
            raise ApiError(401, [api_error(401, "not_authenticated", title,
                                           "Missing or invalid private key; send `Authorization: "
                                           "Klaviyo-API-Key <your private key>`.")])

    def _check_revision(self, headers: dict[str, str]) -> None:
        revision = headers.get("revision")
        if not revision:
            raise ApiError(400, [api_error(400, "invalid", "Invalid input.", "The `revision` header is required "
                                           "(format YYYY-MM-DD[.suffix]).", parameter="revision")])
        if not _REVISION.fullmatch(revision):
            raise ApiError(400, [api_error(400, "invalid", "Invalid input.", f"Invalid revision {revision!r} "
                                           "(format YYYY-MM-DD[.suffix]).", parameter="revision")])
        if self.newest_revision and revision[:10] > self.newest_revision:
            raise ApiError(400, [api_error(400, "invalid", "Invalid input.", f"Revision {revision} is not "
                                           f"available; the newest is {self.newest_revision}.",
                                           parameter="revision")])

    def _pass_rate_limits(self, arrived: float | None) -> None:
        """429 when the account is over a window, or when a forced 429 is due."""
        with self._lock:
            self._gate_count += 1
            every = self.faults.force_429_every
            if every > 0 and self._gate_count % every == 0:
                wait, fault = 1.0, "forced_429"
            else:
                wait = self._limiter.admit(arrived) if self._limiter is not None else None
                fault = None
        if wait is None:
            return
        seconds = max(1, math.ceil(wait))
        raise ApiError(429, [api_error(429, "throttled", "Request was throttled.",
                                       f"Request was throttled. Expected available in {seconds} second"
                                       f"{'' if seconds == 1 else 's'}.")], {"Retry-After": str(seconds)}, fault)

    def _draw_faults(self) -> tuple[bool, bool, bool]:
        """(server error, drop after processing, slow): always three draws, so one fault's rate does not shift
        the others' sequence."""
        draws = self._random.draws(3)
        return (draws[0] < self.faults.server_error_rate, draws[1] < self.faults.drop_after_processing_rate,
                draws[2] < self.faults.slow_rate)

    def _has_scope(self, scope: str) -> bool:
        resource, _, access = scope.partition(":")
        return scope in self.scopes or (access == "read" and f"{resource}:write" in self.scopes)

    def _require_scope(self, scope: str) -> None:
        if not self._has_scope(scope):
            raise ApiError(403, [api_error(403, "permission_denied", "You do not have permission to perform this "
                                           "action.", f"This API key is missing a required scope: {scope}.")])

    # ---- endpoints --------------------------------------------------------------------------------------------

    def _create_event_bulk_job(self, request: _Request) -> _Reply:
        """Bulk Create Events: all events or none (Klaviyo refuses the whole request on any invalid event)."""
        with self._lock:
            rejected = frozenset(self._rejected_unique_ids)
        arguments = (request.headers.get("content-type", ""), request.raw, rejected)
        check = (self._pool.submit(_check_event_bulk_body, *arguments).result() if self._pool is not None
                 else _check_event_bulk_body(*arguments))
        request.events = check.events
        if check.refusal is not None:
            raise ApiError(*check.refusal)
        self._store_events(check.prepared)
        return _Reply(202)

    def _create_event(self, request: _Request) -> _Reply:
        """Create Event: one event; `only the first processed event will be recorded` per unique_id."""
        body = request.body
        _validate_with_sdk("EventCreateQueryV2", body)
        attributes = dict(body["data"]["attributes"])
        profile = attributes.pop("profile")["data"]
        profile_attributes = profile.get("attributes") or {}
        errors = [(message, "/data/attributes") for message in limits.event_violations(
            attributes, profile_attributes, now=datetime.now(timezone.utc), profile_id=profile.get("id"))]
        with self._lock:
            rejected = attributes.get("unique_id") in self._rejected_unique_ids
        if rejected:
            errors.append((f"unique_id {attributes.get('unique_id')}: this event was refused (the emulator was told "
                           "to refuse its unique_id).", "/data/attributes/unique_id"))
        if errors:
            raise _invalid(errors)
        identifier = _profile_identifier(profile_attributes, profile.get("id"), _EVENT_PROFILE_KEYS)
        self._store_events(_prepared_events([(identifier, _compact(profile_attributes), attributes)],
                                            datetime.now(timezone.utc)))
        return _Reply(202)

    def _create_profile_import_job(self, request: _Request) -> _Reply:
        """Bulk Import Profiles: a job, answered `queued`; profiles without an identifier become import errors."""
        body = request.body
        list_ids = _list_ids(body)
        if list_ids:
            self._require_scope("lists:write")  # Klaviyo needs it only to add the profiles to a list
        _validate_with_sdk("ProfileImportJobCreateQuery", body)
        profiles = body["data"]["attributes"]["profiles"]["data"]
        size = len(limits.encode_body(body))
        errors = []
        if not profiles:
            errors.append(("profiles.data is empty: a job needs at least one profile",
                           "/data/attributes/profiles/data"))
        if len(profiles) > MAX_PROFILES_PER_IMPORT:
            errors.append((f"request has {len(profiles):,} profiles (max {MAX_PROFILES_PER_IMPORT:,})",
                           "/data/attributes/profiles/data"))
        if size > limits.MAX_BULK_REQUEST_BYTES:
            errors.append((f"request body is {size:,} bytes as JSON (max {limits.MAX_BULK_REQUEST_BYTES:,} = 5 MB)",
                           "/data"))
        if errors:
            raise _invalid(errors)
        upserts, import_errors = [], []
        for index, profile in enumerate(profiles):
            attributes = json.loads(_compact(profile.get("attributes") or {}))  # a copy the caller cannot change
            identifier = _profile_identifier(attributes, profile.get("id"), _IMPORT_PROFILE_KEYS)
            if identifier is None:
                import_errors.append({
                    "type": "import-error", "id": uuid.uuid4().hex,
                    "attributes": {"code": "invalid", "title": "Invalid input.",
                                   "detail": "A profile needs an identifier: email, phone_number, external_id or _kx.",
                                   "source": {"pointer": f"/data/attributes/profiles/data/{index}"},
                                   "original_payload": json.loads(_compact(profile))}})
            else:
                upserts.append((identifier, {key: value for key, value in attributes.items() if value is not None}))
        job_id = uuid.uuid4().hex
        with self._lock:
            for identifier, attributes in upserts:  # an upsert: later values win, lists accumulate
                stored = self._profiles.setdefault(identifier, {"profile": {}, "lists": []})
                stored["profile"].update(attributes)
                stored["lists"] = sorted(set(stored["lists"]) | set(list_ids))
            self._jobs[job_id] = {"created_at": _timestamp(), "total": len(profiles), "errors": import_errors,
                                  "lists": list_ids}
        return _Reply(202, self._job_document(job_id, status="queued"))

    def _get_profile_import_job(self, request: _Request) -> _Reply:
        """The job, processed: Klaviyo's import runs in the background; the emulator's is done when created."""
        self._job_or_404(request.params["job_id"])
        return _Reply(200, self._job_document(request.params["job_id"], status="complete"))

    def _get_import_errors(self, request: _Request) -> _Reply:
        job_id = request.params["job_id"]
        job = self._job_or_404(job_id)
        link = f"{self.base_url}/api/profile-bulk-import-jobs/{job_id}/import-errors/"
        return _Reply(200, {"data": json.loads(json.dumps(job["errors"])),
                            "links": {"self": link}})

    def _get_accounts(self, request: _Request) -> _Reply:
        """The key's one account, as Get Accounts documents ("This will return 1 account object within the array")."""
        account_id = "EMULAT"
        return _Reply(200, {"data": [{
            "type": "account", "id": account_id,
            "attributes": {
                "test_account": True,
                "contact_information": {
                    "default_sender_name": "Upstack Emulator", "default_sender_email": "emulator@example.com",
                    "website_url": "https://example.com", "organization_name": "Upstack Emulator",
                    "street_address": {"address1": "1 Example Street", "address2": None, "city": "Boston",
                                       "region": "MA", "country": "US", "zip": "02110"}},
                "industry": "Software / SaaS", "timezone": "UTC", "preferred_currency": "USD",
                "public_api_key": "EmUl8r", "locale": "en-US"},
            "links": {"self": f"{self.base_url}/api/accounts/{account_id}/"}}],
            "links": {"self": f"{self.base_url}/api/accounts/"}})

    # ---- state --------------------------------------------------------------------------------------------------

    def _store_events(self, prepared: list[tuple[bytes, str, str, str]]) -> None:
        """Stores each event of `_prepared_events` unless its (profile identifier, metric, unique_id) was stored
        before."""
        with self._lock:
            for key, metric, profile_json, event_json in prepared:
                if key in self._event_keys:
                    self._duplicates += 1
                    continue
                self._event_keys.add(key)
                self._events.append((profile_json, event_json))
                self._by_metric[metric] += 1

    def _job_or_404(self, job_id: str) -> dict:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, [api_error(404, "not_found", "Not found.",
                                           f"No profile-bulk-import-job with id {job_id!r}.")])
        return job

    def _job_document(self, job_id: str, *, status: str) -> dict:
        """A `profile-bulk-import-job` resource (PostProfileImportJobResponse / GetProfileImportJobResponse...)."""
        job = self._job_or_404(job_id)
        failed = len(job["errors"])
        done = status == "complete"
        link = f"{self.base_url}/api/profile-bulk-import-jobs/{job_id}/"
        return {"data": {
            "type": "profile-bulk-import-job", "id": job_id,
            "attributes": {"status": status, "created_at": job["created_at"], "total_count": job["total"],
                           "completed_count": job["total"] - failed if done else 0,
                           "failed_count": failed if done else 0,
                           "completed_at": job["created_at"] if done else None, "expires_at": None,
                           "started_at": job["created_at"] if done else None},
            "relationships": {"lists": {"data": [{"type": "list", "id": list_id} for list_id in job["lists"]]}},
            "links": {"self": link}}, "links": {"self": link}}


class _SeededRandom:
    """`random.Random(seed)` behind a lock: the fault sequence depends only on the seed and the request order."""

    def __init__(self, seed: int):
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def draws(self, count: int) -> list[float]:
        with self._lock:
            return [self._random.random() for _ in range(count)]


async def _read_body(request: Request) -> bytes:
    """The whole body, refused past `MAX_RAW_BODY_BYTES` before it is all read; gzip-encoded bodies decoded."""
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_RAW_BODY_BYTES:
            raise ApiError(413, [api_error(413, "request_too_large", "Request entity too large.",
                                           "The body is larger than Klaviyo takes (5 MB).")])
        chunks.append(chunk)
    raw = b"".join(chunks)
    if request.headers.get("content-encoding", "").lower() == "gzip":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            raise ApiError(400, [api_error(400, "invalid", "Invalid input.", "The body is not valid gzip.")])
    return raw


def _response(reply: _Reply) -> Response:
    payload = json.dumps(reply.body).encode() if reply.body is not None else b""
    return Response(payload, reply.status, reply.headers, JSON_API if payload else None)


class _NoAnswer(Response):
    """The request was processed, and its answer is lost: the client sees its connection close with no answer.

    ASGI has no message for that. uvicorn answers 500 for an app that raises or returns before answering, unless the
    connection is already gone, and once an answer has started its status line is on the wire. So this closes the
    request's own connection (uvicorn's, found by its client address) and waits until uvicorn has seen it close; the
    app then returns and nothing is written.
    """

    def __init__(self, server: uvicorn.Server):
        super().__init__()
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for connection in list(self.server.server_state.connections):
            if connection.client == scope["client"]:
                connection.transport.close()
        while (await receive())["type"] != "http.disconnect":
            pass


# ---- body checks ------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def sdk_models() -> dict[str, type]:
    """Klaviyo's own request models (pydantic v2), from its Python SDK `klaviyo-api`."""
    try:
        from openapi_client.models.event_create_query_v2 import EventCreateQueryV2
        from openapi_client.models.events_bulk_create_job import EventsBulkCreateJob
        from openapi_client.models.profile_import_job_create_query import ProfileImportJobCreateQuery
    except ImportError as exc:
        raise RuntimeError("the local Klaviyo emulator validates with Klaviyo's SDK (klaviyo-api): install the "
                           "project's `emulator` extra, e.g. pip install -e '.[emulator]'") from exc
    return {"EventsBulkCreateJob": EventsBulkCreateJob, "EventCreateQueryV2": EventCreateQueryV2,
            "ProfileImportJobCreateQuery": ProfileImportJobCreateQuery}


def _validate_with_sdk(model_name: str, body: Any) -> None:
    """400 unless the SDK's request model accepts the body, the way the SDK itself parses it (`from_dict`).

    pydantic's errors become JSON:API errors whose pointer is the offending field. The SDK drops keys it does not
    know (a misspelt `unique-id` would vanish and with it the dedupe), so a non-null key the model does not keep is
    refused too, as Klaviyo does. One pass of pydantic's validator over the whole body finds both (see
    `_keeping_only_known_keys`): the SDK's own `from_dict` then `to_dict` cost ten times as much in Python, and
    the emulator must check a 1,000-event body in well under Klaviyo's 100 ms between requests.
    """
    if not isinstance(body, dict):
        raise _invalid([(f"the body must be a JSON object ({model_name})", "/")])
    try:
        _keeping_only_known_keys(sdk_models()[model_name]).model_validate(body)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        wrong = [error for error in errors if error["type"] != "extra_forbidden"]
        if wrong:
            raise _invalid(_located_errors(body, wrong)) from None
        # What the SDK drops is what to_dict() leaves out: unknown keys, and nulls (which lose nothing).
        dropped = [error for error in errors if error["input"] is not None]
        if dropped:
            raise _invalid([(f"'{error['loc'][-1]}' is not a valid field here ({model_name})",
                             _pointer(body, error["loc"], missing=False)) for error in dropped]) from None


@lru_cache(maxsize=None)
def _keeping_only_known_keys(model: type) -> type:
    """The SDK model (its fields, types and validators, by subclassing) with unknown keys refused instead of
    dropped, and fields read by their JSON name only, as `from_dict` reads them (`_kx`, never `kx`); its nested
    models likewise. Where `from_dict` would read "" or {} as an empty list (it iterates them), this refuses them.
    """
    annotations, fields = {}, {}
    for name, info in model.model_fields.items():
        annotation = _with_models_keeping_only_known_keys(info.annotation)
        if annotation is not info.annotation:
            annotations[name] = annotation
            fields[name] = pydantic.Field(default=... if info.is_required() else info.default, alias=info.alias)
    config = pydantic.ConfigDict(extra="forbid", populate_by_name=False, validate_by_name=False,
                                 validate_by_alias=True)
    return type(model.__name__, (model,), {"__module__": model.__module__, "__annotations__": annotations,
                                           "model_config": config, **fields})


def _with_models_keeping_only_known_keys(annotation: Any) -> Any:
    """`annotation` with each pydantic model in it (bare, in a list, in an Optional) replaced as above."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return _keeping_only_known_keys(annotation)
    arguments = typing.get_args(annotation)
    replaced = tuple(_with_models_keeping_only_known_keys(argument) for argument in arguments)
    if all(new is old for new, old in zip(replaced, arguments)):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return typing.Union[replaced]
    if origin is list:
        return list[replaced[0]]
    raise TypeError(f"the emulator cannot read an SDK field typed {annotation!r}")


def _located_errors(body: dict, errors: list[dict]) -> list[tuple[str, str]]:
    # One error per field: a union (`value` is float | int) reports each branch at the same place.
    messages: dict[str, list[str]] = {}
    for error in errors:
        pointer = _pointer(body, error["loc"], missing=error["type"] == "missing")
        if error["msg"] not in messages.setdefault(pointer, []):
            messages[pointer].append(error["msg"])
    return [(f"{pointer}: {' or '.join(texts)}", pointer) for pointer, texts in messages.items()]


def _pointer(body: Any, loc: tuple, *, missing: bool) -> str:
    """A JSON pointer into `body` for pydantic's `loc`, without the union branch names pydantic appends."""
    parts, node = [], body
    for index, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif missing and index == len(loc) - 1:
            pass
        else:
            break
        parts.append(str(part).replace("~", "~0").replace("/", "~1"))
    return "/" + "/".join(parts)


_LIMITS_SUBJECT = re.compile(r"(profiles|events)\[(\d+)\]")


def _bulk_pointer(message: str, positions: list[tuple[int, int]]) -> str:
    """The pointer for a `limits.bulk_violations` message: the event or profile entry it names, else the list."""
    match = _LIMITS_SUBJECT.match(message)
    if match and match.group(1) == "events" and int(match.group(2)) < len(positions):
        i, j = positions[int(match.group(2))]
        return f"{_BULK_EVENTS}/{i}/attributes/events/data/{j}/attributes"
    if match and match.group(1) == "profiles":
        return f"{_BULK_EVENTS}/{match.group(2)}/attributes/profile/data/attributes"
    return _BULK_EVENTS


@dataclass
class _BulkCheck:
    """What checking a Bulk Create Events body found: its events (for `requests()`), and either why it is refused
    (an ApiError's status and errors) or its events as `_prepared_events` makes them, ready to store."""

    events: int
    refusal: tuple[int, list[dict]] | None
    prepared: list[tuple[bytes, str, str, str]]


def _ready_to_check() -> None:
    """A check process's start: the SDK's models and the validator built from them, before the first body; and a
    lower priority than the server's, whose event loop stamps each request's arrival for the rate limits: on a busy
    machine a check that kept it from the CPU would stamp requests late, some later than the next second's, and
    meet a client that keeps the limits with a 429."""
    os.nice(5)
    _keeping_only_known_keys(sdk_models()["EventsBulkCreateJob"])


def _check_event_bulk_body(content_type: str, raw: bytes, rejected: frozenset[str]) -> _BulkCheck:
    """Steps 6 and the pure part of 7 for Bulk Create Events, from the raw body alone, so that it can run in a
    process of its own: JSON, the SDK's model, the prose limits, the unique_ids the emulator was told to refuse."""
    body = None
    try:
        body = _json_body({"content-type": content_type}, raw)
        _validate_with_sdk("EventsBulkCreateJob", body)
        entries = body["data"]["attributes"]["events-bulk-create"]["data"]
        # Where each event sits: k (its index across the request, as limits counts) -> (entry i, event j).
        positions = [(i, j) for i, entry in enumerate(entries)
                     for j in range(len(entry["attributes"]["events"]["data"]))]
        errors = [(message, _bulk_pointer(message, positions))
                  for message in limits.bulk_violations(body, now=datetime.now(timezone.utc), size=len(raw))]
        for k, (i, j) in enumerate(positions):
            unique_id = entries[i]["attributes"]["events"]["data"][j]["attributes"].get("unique_id")
            if unique_id in rejected:
                errors.append((f"events[{k}] (unique_id {unique_id}): this event was refused (the emulator was told "
                               "to refuse its unique_id).", f"{_BULK_EVENTS}/{i}/attributes/events/data/{j}"
                                                            "/attributes/unique_id"))
        if errors:
            raise _invalid(errors)
    except ApiError as error:
        return _BulkCheck(_count_events(BULK_EVENTS_PATH, raw, body), (error.status, error.errors), [])
    received = datetime.now(timezone.utc)
    batch = []
    for entry in entries:
        profile = entry["attributes"]["profile"]["data"]
        profile_attributes = profile.get("attributes") or {}
        identifier = _profile_identifier(profile_attributes, profile.get("id"), _EVENT_PROFILE_KEYS)
        profile_json = _compact(profile_attributes)
        for event in entry["attributes"]["events"]["data"]:
            batch.append((identifier, profile_json, event["attributes"]))
    return _BulkCheck(len(positions), None, _prepared_events(batch, received))


def _prepared_events(batch: list[tuple[str | None, str, dict]],
                     received: datetime) -> list[tuple[bytes, str, str, str]]:
    """(dedupe key, metric, profile JSON, event JSON) for each (profile identifier, profile JSON, event attributes).

    Klaviyo: "If the unique_id is repeated for the same profile and metric, only the first processed event will
    be recorded. If this is not present, this will use the time to the second."
    """
    prepared = []
    for identifier, profile_json, attributes in batch:
        metric = _metric_name(attributes)
        unique_id = attributes.get("unique_id")
        if unique_id is None:
            unique_id = "time:" + _to_the_second(attributes.get("time"), received)
        # repr of a tuple of strings (or None) tells any two apart, at a third of json.dumps's cost.
        key = hashlib.blake2b(repr((identifier, metric, unique_id)).encode(), digest_size=16).digest()
        prepared.append((key, metric, profile_json, _compact(attributes)))
    return prepared


def _json_body(headers: dict[str, str], raw: bytes) -> Any:
    content_type = headers.get("content-type", "")
    if raw and content_type and "json" not in content_type.lower():
        raise ApiError(415, [api_error(415, "unsupported_media_type", "Unsupported media type.",
                                       f'Unsupported media type "{content_type}" in request; send {JSON_API}.')])
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, [api_error(400, "parse_error", "Malformed request.",
                                       f"The body is not valid JSON: {exc}", "/")]) from None


def _list_ids(body: Any) -> list[str]:
    """The lists a profile import adds its profiles to (read before validation: the scope check comes first)."""
    data = limits.dig(body, "data", "relationships", "lists", "data")
    if not isinstance(data, list):
        return []
    return [item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)]


# ---- small helpers ----------------------------------------------------------------------------------------------


def _profile_identifier(attributes: dict, profile_id: Any, keys: tuple[str, ...]) -> str | None:
    """'kind:value' for the first identifier present (emails compared case-insensitively), else the Klaviyo id."""
    for key in keys:
        value = attributes.get(key)
        if isinstance(value, str) and value.strip():
            return f"{key}:{value.strip().lower() if key == 'email' else value.strip()}"
    if isinstance(profile_id, str) and profile_id.strip():
        return f"id:{profile_id.strip()}"
    return None


def _metric_name(attributes: dict) -> str | None:
    return limits.dig(attributes, "metric", "data", "attributes", "name")


def _to_the_second(raw: Any, received: datetime) -> str:
    try:
        moment = datetime.fromisoformat(raw) if isinstance(raw, str) else received
    except ValueError:
        moment = received
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).replace(microsecond=0).isoformat()


def _count_events(path: str, raw: bytes, body: Any = None) -> int:
    """Events in a request's body, for `requests()` (0 when the body is not an events body); `body` is `raw`
    parsed, when the request got that far (parsing 5 MB again would cost more than the count)."""
    if not path.startswith(("/api/event-bulk-create-jobs", "/api/events")) or not raw:
        return 0
    if body is None:
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return 0
    if path.startswith("/api/events"):
        return 1 if isinstance(body, dict) and isinstance(body.get("data"), dict) else 0
    entries = limits.dig(body, "data", "attributes", limits.BULK_EVENTS_KEY, "data")
    if not isinstance(entries, list):
        return 0
    return sum(len(events) for events in (limits.dig(entry, "attributes", "events", "data") for entry in entries)
               if isinstance(events, list))


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _timestamp() -> str:
    return datetime.now(timezone.utc).isoformat()


# ---- command line -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Serves until SIGINT or SIGTERM; prints the base URL on stdout (the only line there)."""
    parser = argparse.ArgumentParser(prog="python -m upstack_pipeline.sandbox.klaviyo_emulator",
                                     description="Serve a local Klaviyo API emulator on 127.0.0.1.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="the key to expect (default: $KLAVIYO_API_KEY)")
    parser.add_argument("--no-rate-limits", action="store_true", help="serve without Klaviyo's rate limits")
    parser.add_argument("--check-processes", type=int, default=os.cpu_count() or 1,
                        help="processes that check Bulk Create Events bodies (default: one per core; 0: in this one)")
    parser.add_argument("--answer-seconds", type=float, default=0.0,
                        help="answer every request this much later, once it arrived and was counted (as a distant "
                             "Klaviyo would): what the client's pacing costs at real answer times")
    args = parser.parse_args(argv)
    api_key = args.api_key or os.environ.get("KLAVIYO_API_KEY")
    if not api_key:
        print("klaviyo emulator: pass --api-key or set KLAVIYO_API_KEY (the key clients must send)", file=sys.stderr)
        return 2

    stopping = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stopping.set())
    rate_limits = None if args.no_rate_limits else RateLimits()
    try:
        faults = Faults(slow_rate=1.0, slow_seconds=args.answer_seconds) if args.answer_seconds > 0 else Faults()
        with KlaviyoEmulator(api_key=api_key, rate_limits=rate_limits, host=args.host, port=args.port,
                             check_processes=args.check_processes, faults=faults) as emulator:
            print(emulator.base_url, flush=True)
            limits_text = (f"{rate_limits.per_second}/s, {rate_limits.per_minute}/min" if rate_limits
                           else "no rate limits")
            if args.answer_seconds > 0:
                limits_text += f"; answering {args.answer_seconds:g} s late"
            print(f"Klaviyo emulator serving at {emulator.base_url} ({limits_text}); Ctrl-C stops it.",
                  file=sys.stderr, flush=True)
            while not stopping.wait(0.5):
                pass
            accepted = emulator.accepted_by_metric()
            print(f"Klaviyo emulator stopped: accepted {sum(accepted.values()):,} events "
                  f"({emulator.duplicate_events:,} duplicates ignored) in {len(emulator.requests()):,} requests.",
                  file=sys.stderr)
    except OSError as error:
        print(f"klaviyo emulator: {error}", file=sys.stderr)
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
