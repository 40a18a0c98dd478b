"""Deadlines that travel (``aiodelay/_core/budget.py``): a budget read from upstream
(``setup(app, budget_headers=...)``), sent downstream (``budget_trace``), asked for
(``time_left``). Servers are real sockets on 127.0.0.1 (the ``serve`` fixture, aiohttp's
default ``handler_cancellation=False``).

The bounds on times below are what the API promises (a 250 ms budget answers after 250 ms,
not after the handler's 5 s), with room for a loaded machine."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

import aiodelay
import aiodelay.prometheus
from aiodelay._core import budget, middleware
from aiodelay._core.budget import (
    ENVOY,
    GRPC,
    MAX_BUDGET,
    header_value,
    parse_grpc_timeout,
    parse_milliseconds,
)
from aiodelay._core.deadlines import DeadlineQueue
from aiodelay.testing import RawClient
from tests.conftest import HandlerRun, Serve, until

BOTH = (GRPC, ENVOY)


def _app(*routes: web.RouteDef, **config: Any) -> web.Application:
    app = web.Application()
    aiodelay.setup(app, **config)
    app.add_routes(routes)
    return app


async def _get(client: RawClient, path: str, *headers: tuple[str, str]) -> tuple[int, bytes, float]:
    """GET path on the connection with ``headers``: (status, body, seconds it took)."""
    head = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers)
    start = time.monotonic()
    await client.send(b"GET %s HTTP/1.1\r\nHost: test\r\n%s\r\n" % (path.encode(), head))
    status, body = await client.read_response()
    return status, body, time.monotonic() - start


class _Outcomes:
    """An observer that keeps the outcomes, with an event per outcome."""

    def __init__(self) -> None:
        self.outcomes: list[aiodelay.Outcome] = []
        self.ended = asyncio.Event()

    def request_started(self, request: web.BaseRequest) -> None:
        pass

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        pass

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        self.outcomes.append(outcome)
        self.ended.set()

    async def wait(self, count: int) -> list[aiodelay.Outcome]:
        await until(
            self.ended,
            lambda: len(self.outcomes) >= count,
            lambda: f"{len(self.outcomes)} outcomes, not {count}: {self.outcomes}",
        )
        return self.outcomes


@pytest.fixture
def said_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh memory of the headers whose ignored values were logged (once per process)."""
    monkeypatch.setattr(budget, "_said_ignored", set())


# -- parsing: table-driven ---------------------------------------------------------------------

# (value, seconds): every unit of gRPC's grpc-timeout, and its eight digits at most.
GRPC_VALID = [
    ("1H", 3600.0),
    ("2M", 120.0),
    ("3S", 3.0),
    ("250m", 0.25),
    ("100u", 1e-4),
    ("500n", 5e-7),
    ("0m", 0.0),
    ("0S", 0.0),
    ("99999999n", 99999999e-9),  # eight digits, the most gRPC allows
    ("99999999m", 99999.999),
    ("00000001S", 1.0),  # eight digits, leading zeros and all
    (" 5m", 0.005),  # decided: surrounding whitespace is HTTP's, not the value's (RFC 9110 OWS)
    ("5m\t", 0.005),
]

# Values that are not a grpc-timeout: ignored, never an error.
GRPC_INVALID = [
    "",
    " ",
    "abc",
    "-5m",  # negative
    "+5m",
    "5",  # no unit
    "m",  # no digits
    "5x",  # no such unit
    "5h",  # units are case-sensitive: H is hours, h nothing
    "5s",
    "5 m",
    "1.5S",  # whole numbers only
    "1e3m",
    "123456789m",  # nine digits
    "000000001S",  # nine digits, even leading zeros
    "5m5m",
    "5mm",
    "\u0665m",  # an Arabic-Indic five: a Unicode digit, not an ASCII one
    "\uff15m",  # a fullwidth five
]

ENVOY_VALID = [("250", 0.25), ("0", 0.0), ("1", 0.001), ("999999999999", 999999999.999)]
ENVOY_INVALID = [
    "",
    "abc",
    "-250",
    "250ms",
    "2.5",
    "1e3",
    "1234567890123",
    "\u0662\u0665\u0660",  # Arabic-Indic digits: Unicode, not ASCII
    " ",
]


@pytest.mark.parametrize(("value", "seconds"), GRPC_VALID)
def test_parse_grpc_timeout_reads_every_unit(value: str, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds, rel=1e-12, abs=0)


@pytest.mark.parametrize("value", GRPC_INVALID)
def test_parse_grpc_timeout_refuses_what_is_not_one(value: str) -> None:
    assert parse_grpc_timeout(value) is None


@pytest.mark.parametrize(("value", "seconds"), ENVOY_VALID)
def test_parse_milliseconds_reads_whole_milliseconds(value: str, seconds: float) -> None:
    assert parse_milliseconds(value) == pytest.approx(seconds, rel=1e-12, abs=0)


@pytest.mark.parametrize("value", ENVOY_INVALID)
def test_parse_milliseconds_refuses_what_is_not_one(value: str) -> None:
    assert parse_milliseconds(value) is None


@pytest.mark.parametrize(
    ("name", "seconds", "sent"),
    [
        (GRPC, 0.25, "250m"),
        (GRPC, 0.0004, "0m"),  # under a millisecond: spent
        (GRPC, -1.0, "0m"),  # never negative
        (GRPC, -1e306, "0m"),  # (a margin that large made int() of -inf ms, which raised)
        (GRPC, -math.inf, "0m"),
        (GRPC, 99_999.999, "99999999m"),  # eight digits of milliseconds
        (GRPC, 100_000.0, "100000S"),  # then seconds
        (GRPC, 1e12, "99999999S"),  # and never more than eight digits
        (ENVOY, 0.25, "250"),
        (ENVOY, -1.0, "0"),
    ],
)
def test_header_value_says_the_time_as_the_header_does(
    name: str, seconds: float, sent: str
) -> None:
    assert header_value(name, seconds) == sent
    parse = parse_grpc_timeout if name == GRPC else parse_milliseconds
    assert parse(sent) is not None  # what is sent is read back by aiodelay downstream


# -- setup(budget_headers=...) -----------------------------------------------------------------


def test_the_same_time_in_both_headers_is_the_same_number() -> None:
    """A request with both headers names its budget's header by the smaller number: a time
    written in both must not differ in its last bit (239 * 1e-3 is not 239 / 1000)."""
    for milliseconds in range(1, 5000):
        assert parse_grpc_timeout(f"{milliseconds}m") == parse_milliseconds(str(milliseconds))
    assert parse_grpc_timeout("250000u") == parse_grpc_timeout("250m") == 0.25


def test_setup_refuses_a_bare_string_with_one_line() -> None:
    with pytest.raises(TypeError, match=r"^budget_headers takes a tuple of header names") as info:
        aiodelay.setup(web.Application(), budget_headers="grpc-timeout")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("names", [("x-request-deadline",), (GRPC, "timeout"), (GRPC, 5)])
def test_setup_refuses_unknown_header_names_with_one_line(names: tuple[Any, ...]) -> None:
    app = web.Application()
    with pytest.raises(ValueError, match="is not a budget header aiodelay reads") as info:
        aiodelay.setup(app, budget_headers=names)
    assert "\n" not in str(info.value)
    assert "'grpc-timeout'" in str(info.value)  # says which it knows
    assert not app.middlewares  # and installed nothing


def test_setup_refuses_a_non_iterable() -> None:
    with pytest.raises(TypeError, match="budget_headers takes a tuple"):
        aiodelay.setup(web.Application(), budget_headers=5)  # type: ignore[arg-type]


def test_header_names_are_taken_in_any_case_once() -> None:
    mw = aiodelay.middleware(budget_headers=["Grpc-Timeout", "grpc-timeout", ENVOY.upper()])
    assert mw.budget_headers == (GRPC, ENVOY)


# -- a budget from upstream --------------------------------------------------------------------


@pytest.mark.both_loops
@pytest.mark.parametrize(("header", "value"), [(GRPC, "250m"), (ENVOY, "250")])
async def test_a_plain_clients_budget_is_honoured(
    serve: Serve, caplog: pytest.LogCaptureFixture, header: str, value: str
) -> None:
    caplog.set_level(logging.INFO, logger="aiodelay")
    probe = HandlerRun()
    finish: list[asyncio.Future[None]] = []

    async def slow(request: web.Request) -> web.Response:
        finish.append(aiodelay.notify_finish(request))
        await probe.run(request, asyncio.sleep(5))
        return web.Response(text="too late")

    app = _app(web.get("/slow", slow), budget_headers=BOTH)
    outcomes = _Outcomes()
    aiodelay.add_observer(app, outcomes)
    served = await serve(app)
    client = await served.connect()
    status, body, took = await _get(client, "/slow", (header, value))
    assert status == 504
    assert (
        body == f"504: the request exceeded its 0.250s deadline (the budget in {header})\n".encode()
    )
    assert 0.24 <= took < 1.0  # 0.25 s, not the handler's 5 s (uvloop's clock is coarse)
    assert probe.cancelled
    exc = finish[0].exception()
    assert isinstance(exc, aiodelay.DeadlineExceeded)
    assert (exc.seconds, exc.status, exc.upstream) == (0.25, 504, header)
    [outcome] = await outcomes.wait(1)
    assert (outcome.kind, outcome.budget_from) == ("timed_out", header)
    stats = aiodelay.stats(served.app)
    assert (stats.timed_out, stats.completed, stats.budgets_ignored) == (1, 0, 0)
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    assert line == (
        f"GET /slow from 127.0.0.1 exceeded its 0.250s deadline (the budget in {header}): "
        "cancelled, answered 504"
    )


@pytest.mark.both_loops
async def test_a_request_without_a_budget_runs_as_its_route_says(serve: Serve) -> None:
    async def quick(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)  # longer than the budgets of the other tests
        return web.Response(text="done")

    app = _app(web.get("/", quick), budget_headers=BOTH)
    outcomes = _Outcomes()
    aiodelay.add_observer(app, outcomes)
    served = await serve(app)
    client = await served.connect()
    assert (await _get(client, "/"))[:2] == (200, b"done")
    [outcome] = await outcomes.wait(1)
    assert (outcome.kind, outcome.budget_from) == ("completed", None)


@pytest.mark.both_loops
@pytest.mark.parametrize(
    "value",
    [
        "",
        "abc",
        "-5m",
        "5",
        "5x",
        "1.5S",
        "123456789m",
        "99999999H",
        "99999999M",
        "25H",
        "250m, 100m",  # one line of several values
    ],
)
async def test_an_ignored_grpc_timeout_leaves_the_routes_deadline(
    serve: Serve, caplog: pytest.LogCaptureFixture, said_once: None, value: str
) -> None:
    """Malformed, negative, too many digits, or over a day (MAX_BUDGET): ignored, counted,
    logged once at DEBUG; the route's own deadline (0.3 s) applies."""
    caplog.set_level(logging.DEBUG, logger="aiodelay")
    started = HandlerRun()

    @aiodelay.deadline(0.3)
    async def slow(request: web.Request) -> web.Response:
        await started.run(request, asyncio.sleep(5))
        return web.Response()

    app = _app(web.get("/", slow), budget_headers=BOTH)
    outcomes = _Outcomes()
    aiodelay.add_observer(app, outcomes)
    served = await serve(app)
    client = await served.connect()
    status, body, took = await _get(client, "/", (GRPC, value))
    assert (status, body) == (504, b"504: the request exceeded its 0.300s deadline\n")
    assert 0.29 <= took < 1.0
    [outcome] = await outcomes.wait(1)
    assert outcome.budget_from is None
    assert aiodelay.stats(served.app).budgets_ignored == 1
    said = [r for r in caplog.records if r.levelno == logging.DEBUG and "ignored" in r.message]
    assert [r.getMessage() for r in said] == [
        f"ignored the budget grpc-timeout: {value!r} (malformed, negative or over 86400s; "
        "said once per header)"
    ]


@pytest.mark.both_loops
async def test_ignored_budgets_are_counted_each_and_logged_once_per_header(
    serve: Serve, caplog: pytest.LogCaptureFixture, said_once: None
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiodelay")

    async def quick(request: web.Request) -> web.Response:
        return web.Response(text="done")

    served = await serve(_app(web.get("/", quick), budget_headers=BOTH))
    client = await served.connect()
    for header, value in [(GRPC, "5x"), (GRPC, "-1m"), (ENVOY, "-250"), (ENVOY, "9" * 13)]:
        assert (await _get(client, "/", (header, value)))[:2] == (200, b"done")
    assert aiodelay.stats(served.app).budgets_ignored == 4
    said = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    assert [line.split(":")[0] for line in said] == [
        "ignored the budget grpc-timeout",
        f"ignored the budget {ENVOY}",
    ]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "aiodelay")


async def test_an_ignored_value_is_logged_cut_to_64_characters(
    serve: Serve, caplog: pytest.LogCaptureFixture, said_once: None
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiodelay")

    async def quick(request: web.Request) -> web.Response:
        return web.Response(text="done")

    served = await serve(_app(web.get("/", quick), budget_headers=(GRPC,)))
    client = await served.connect()
    assert (await _get(client, "/", (GRPC, "x" * 4000)))[:2] == (200, b"done")
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    assert repr("x" * 64) in line
    assert "x" * 65 not in line


@pytest.mark.both_loops
@pytest.mark.parametrize(("header", "value"), [(GRPC, "0m"), (GRPC, "0n"), (ENVOY, "0")])
async def test_a_budget_spent_on_arrival_is_answered_at_once_without_the_handler(
    serve: Serve, caplog: pytest.LogCaptureFixture, header: str, value: str
) -> None:
    caplog.set_level(logging.INFO, logger="aiodelay")
    ran: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        ran.append(request.path)
        return web.Response(text="ran")

    @aiodelay.deadline(5, status=503)
    async def own(request: web.Request) -> web.Response:
        ran.append(request.path)
        return web.Response(text="ran")

    app = _app(web.get("/", handler), web.get("/own", own), budget_headers=BOTH)
    outcomes = _Outcomes()
    aiodelay.add_observer(app, outcomes)
    served = await serve(app)
    client = await served.connect()
    status, body, took = await _get(client, "/", (header, value))
    assert (status, body) == (
        504,
        f"504: the request exceeded its 0s deadline (the budget in {header})\n".encode(),
    )
    assert took < 0.2
    status, body, _ = await _get(client, "/own", (header, value))
    assert status == 503  # the route's deadline's status
    assert ran == []  # neither handler ever started
    kinds = [(o.kind, o.budget_from) for o in await outcomes.wait(2)]
    assert kinds == [("timed_out", header)] * 2
    stats = aiodelay.stats(served.app)
    assert (stats.timed_out, stats.completed, stats.in_flight) == (2, 0, 0)
    lines = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    assert lines[0] == (
        f"GET / from 127.0.0.1 exceeded its 0s deadline (the budget in {header}): "
        "cancelled, answered 504"
    )


async def test_a_budget_in_unicode_digits_is_ignored(serve: Serve) -> None:
    """An Arabic-Indic zero is a digit to Python (re's \\d, int()), not to gRPC or Envoy."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ran")

    served = await serve(_app(web.get("/", handler), budget_headers=BOTH))
    client = await served.connect()
    zero = "\u0660".encode()
    for header, value in [(GRPC, zero + b"m"), (ENVOY, zero)]:
        await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n%s: %s\r\n\r\n" % (header.encode(), value))
        assert await client.read_response() == (200, b"ran")
    assert aiodelay.stats(served.app).budgets_ignored == 2


@pytest.mark.both_loops
async def test_a_spent_budget_with_a_body_leaves_the_connection_good(serve: Serve) -> None:
    """The body of a request answered at once is not read by a handler; the next request on
    the connection (pipelined behind it) is served as usual."""
    bodies: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response(text="ran")

    served = await serve(_app(web.post("/", handler), budget_headers=BOTH))
    client = await served.connect()
    await client.send(
        b"POST / HTTP/1.1\r\nHost: t\r\ngrpc-timeout: 0m\r\nContent-Length: 5\r\n\r\nhello"
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert (await client.read_response())[0] == 504
    assert await client.read_response() == (200, b"ran")
    assert bodies == [b"abc"]
    stats = aiodelay.stats(served.app)
    assert (stats.timed_out, stats.completed) == (1, 1)


@pytest.mark.both_loops
async def test_a_budget_only_shortens(serve: Serve) -> None:
    """Route deadline 0.3 s, budget 10 s: 0.3 s, and the deadline is the route's own."""

    @aiodelay.deadline(0.3)
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    app = _app(web.get("/", slow), budget_headers=BOTH)
    outcomes = _Outcomes()
    aiodelay.add_observer(app, outcomes)
    served = await serve(app)
    client = await served.connect()
    status, body, took = await _get(client, "/", (GRPC, "10S"), (ENVOY, "10000"))
    assert (status, body) == (504, b"504: the request exceeded its 0.300s deadline\n")
    assert 0.29 <= took < 1.0
    [outcome] = await outcomes.wait(1)
    assert outcome.budget_from is None


@pytest.mark.both_loops
async def test_an_app_default_deadline_is_shortened_by_a_budget(serve: Serve) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    served = await serve(_app(web.get("/", slow), deadline=3, budget_headers=BOTH))
    client = await served.connect()
    status, body, took = await _get(client, "/", (ENVOY, "200"))
    assert (status, body) == (
        504,
        f"504: the request exceeded its 0.200s deadline (the budget in {ENVOY})\n".encode(),
    )
    assert took < 1.0


@pytest.mark.both_loops
async def test_a_routes_own_status_answers_a_smaller_budget(serve: Serve) -> None:
    @aiodelay.deadline(5, status=503)
    async def own(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response()

    served = await serve(_app(web.get("/", own), budget_headers=BOTH))
    client = await served.connect()
    status, body, took = await _get(client, "/", (GRPC, "200m"))
    assert (status, body) == (
        503,
        b"503: the request exceeded its 0.200s deadline (the budget in grpc-timeout)\n",
    )
    assert took < 1.0


@pytest.mark.both_loops
async def test_several_headers_and_values_the_smallest_wins(serve: Serve) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    served = await serve(_app(web.get("/", slow), budget_headers=BOTH))
    client = await served.connect()
    # Two grpc-timeout lines and one Envoy header: the Envoy one is the smallest.
    status, body, took = await _get(
        client, "/", (GRPC, "3S"), (ENVOY, "150"), (GRPC, "2S"), (ENVOY, "junk")
    )
    assert (status, body) == (
        504,
        f"504: the request exceeded its 0.150s deadline (the budget in {ENVOY})\n".encode(),
    )
    assert took < 1.0
    # A second grpc-timeout line smaller than the first.
    status, body, _ = await _get(client, "/", (GRPC, "3S"), (GRPC, "100m"), (ENVOY, "2000"))
    assert body == b"504: the request exceeded its 0.100s deadline (the budget in grpc-timeout)\n"
    assert aiodelay.stats(served.app).budgets_ignored == 1  # the junk one


@pytest.mark.both_loops
async def test_only_the_apps_budget_headers_are_read(serve: Serve) -> None:
    async def quick(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.Response(text="done")

    served = await serve(_app(web.get("/", quick), budget_headers=(ENVOY,)))
    client = await served.connect()
    assert (await _get(client, "/", (GRPC, "50m")))[:2] == (200, b"done")
    assert aiodelay.stats(served.app).budgets_ignored == 0


@pytest.mark.both_loops
async def test_an_app_without_budget_headers_reads_no_budget(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path of an app that did not opt in never looks at the headers."""

    def never(*args: object) -> None:
        raise AssertionError("budget_of called for an app without budget_headers")

    monkeypatch.setattr(middleware, "budget_of", never)

    @aiodelay.deadline(2)
    async def timed(request: web.Request) -> web.Response:
        await asyncio.sleep(0.1)
        return web.Response(text="timed")

    async def plain(request: web.Request) -> web.Response:
        await asyncio.sleep(0.1)
        return web.Response(text="plain")

    served = await serve(_app(web.get("/timed", timed), web.get("/plain", plain)))
    client = await served.connect()
    assert (await _get(client, "/timed", (GRPC, "10m")))[:2] == (200, b"timed")
    assert (await _get(client, "/plain", (GRPC, "10m")))[:2] == (200, b"plain")
    served2 = await serve(_app(web.get("/plain", plain), deadline=2))
    client2 = await served2.connect()
    assert (await _get(client2, "/plain", (ENVOY, "10")))[:2] == (200, b"plain")


@pytest.mark.both_loops
async def test_a_completed_request_says_its_deadline_was_the_budgets(serve: Serve) -> None:
    async def quick(request: web.Request) -> web.Response:
        return web.Response(text="done")

    app = _app(web.get("/", quick), budget_headers=BOTH)
    outcomes = _Outcomes()
    aiodelay.add_observer(app, outcomes)
    served = await serve(app)
    client = await served.connect()
    assert (await _get(client, "/", (ENVOY, "5000")))[:2] == (200, b"done")
    [outcome] = await outcomes.wait(1)
    assert (outcome.kind, outcome.budget_from) == ("completed", ENVOY)


async def test_prometheus_counts_budgets_under_the_same_labels(serve: Serve) -> None:
    """No header value becomes a label: a budget's time-out is a time-out of its route."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    app = _app(web.get("/items/{id}", slow), budget_headers=BOTH)
    registry = CollectorRegistry()
    aiodelay.prometheus.setup(app, registry=registry)
    outcomes = _Outcomes()
    aiodelay.add_observer(app, outcomes)
    served = await serve(app)
    client = await served.connect()
    assert (await _get(client, "/items/1", (GRPC, "50m")))[0] == 504
    assert (await _get(client, "/items/2", (ENVOY, "0")))[0] == 504
    assert (await _get(client, "/items/3", (GRPC, "junk"), (ENVOY, "30")))[0] == 504
    await outcomes.wait(3)
    samples = [
        (sample.name, sample.labels, sample.value)
        for family in registry.collect()
        if family.name == "aiodelay_requests"
        for sample in family.samples
        if sample.name == "aiodelay_requests_total"
    ]
    assert samples == [
        ("aiodelay_requests_total", {"route": "/items/{id}", "outcome": "timed_out"}, 3.0)
    ]


@pytest.mark.both_loops
async def test_a_budget_timer_goes_with_its_request(serve: Serve) -> None:
    """A request that ends long before its budget (an hour) leaves no timer behind: one left
    per request would hold the loop's timers and their queues for up to a day each."""

    async def quick(request: web.Request) -> web.Response:
        return web.Response(text="done")

    served = await serve(_app(web.get("/", quick), budget_headers=BOTH))
    client = await served.connect()
    for _ in range(50):
        assert (await _get(client, "/", (GRPC, "1H")))[:2] == (200, b"done")
    gc.collect()
    left = [o for o in gc.get_objects() if isinstance(o, DeadlineQueue) and o.seconds == 3600]
    # (The connection holds its last request's state, and its budget, until its next one.)
    assert len(left) <= 1


# -- the routes that take no budget ------------------------------------------------------------


@pytest.mark.both_loops
async def test_shielded_and_deadline_none_routes_take_no_budget(serve: Serve) -> None:
    @aiodelay.shielded
    async def charge(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(text="charged")

    @aiodelay.deadline(None)
    async def exempt(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(text="exempt")

    @aiodelay.shielded
    @aiodelay.deadline(2)
    async def bounded(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    served = await serve(
        _app(
            web.get("/charge", charge),
            web.get("/exempt", exempt),
            web.get("/bounded", bounded),
            deadline=1,
            budget_headers=BOTH,
        )
    )
    client = await served.connect()
    assert (await _get(client, "/charge", (GRPC, "50m")))[:2] == (200, b"charged")
    assert (await _get(client, "/exempt", (GRPC, "50m")))[:2] == (200, b"exempt")
    assert (await _get(client, "/charge", (GRPC, "0m")))[:2] == (200, b"charged")
    # A shielded route with a deadline of its own takes a budget like any deadline.
    status, _, took = await _get(client, "/bounded", (GRPC, "100m"))
    assert status == 504
    assert took < 1.0
    assert aiodelay.stats(served.app).timed_out == 1


@pytest.mark.both_loops
async def test_a_websocket_upgrade_takes_no_budget(serve: Serve) -> None:
    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse()
        await socket_.prepare(request)
        async for message in socket_:
            await socket_.send_str(message.data)
        return socket_

    served = await serve(_app(web.get("/ws", ws), budget_headers=BOTH))
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"http://127.0.0.1:{served.port}/ws", headers={GRPC: "100m", ENVOY: "0"}
        ) as connection,
    ):
        started = time.monotonic()
        while time.monotonic() - started < 0.3:  # past the budget (bounded by time)
            await connection.send_str("ping")
            assert (await connection.receive_str()) == "ping"
    assert aiodelay.stats(served.app).timed_out == 0


# -- time_left ---------------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_time_left(serve: Serve) -> None:
    seen: dict[str, Any] = {}
    kept: list[web.Request] = []
    done = asyncio.Event()

    async def plain(request: web.Request) -> web.Response:
        seen["plain"] = aiodelay.time_left(request)
        kept.append(request)
        return web.Response()

    async def budgeted(request: web.Request) -> web.Response:
        first = aiodelay.time_left(request)
        await asyncio.sleep(0.05)
        second = aiodelay.time_left(request)
        seen["budgeted"] = (first, second)
        return web.Response()

    @aiodelay.deadline(0.1)
    async def passes(request: web.Request) -> web.Response:
        kept.append(request)
        seen["before"] = aiodelay.time_left(request)
        try:
            await aiodelay.shield(asyncio.sleep(0.3))  # the deadline passes in here
        finally:
            seen["in shield, after"] = aiodelay.time_left(request)
            done.set()
        return web.Response()

    @aiodelay.deadline(0.1)
    async def looks_inside(request: web.Request) -> web.Response:
        async def section() -> None:
            await asyncio.sleep(0.2)
            seen["inside"] = aiodelay.time_left(request)

        await aiodelay.shield(section())
        return web.Response()

    served = await serve(
        _app(
            web.get("/plain", plain),
            web.get("/budgeted", budgeted),
            web.get("/passes", passes),
            web.get("/inside", looks_inside),
            budget_headers=BOTH,
        )
    )
    client = await served.connect()
    await _get(client, "/plain")
    assert seen["plain"] is None  # no deadline
    assert aiodelay.time_left(kept[0]) is None  # and none after its end
    await _get(client, "/budgeted", (GRPC, "2S"))
    first, second = seen["budgeted"]
    assert 1.5 < first <= 2.0
    assert second < first - 0.04  # it goes down
    assert (await _get(client, "/passes"))[0] == 504
    await asyncio.wait_for(done.wait(), 5)
    assert 0 < seen["before"] <= 0.1
    assert seen["in shield, after"] == 0.0
    assert aiodelay.time_left(kept[-1]) == 0.0  # ended because its deadline passed
    assert (await _get(client, "/inside"))[0] == 504
    assert seen["inside"] == 0.0  # passed while the section ran


@pytest.mark.both_loops
async def test_time_left_is_none_after_a_request_with_a_budget_ended(serve: Serve) -> None:
    kept: list[web.Request] = []

    async def quick(request: web.Request) -> web.Response:
        kept.append(request)
        return web.Response()

    served = await serve(_app(web.get("/", quick), budget_headers=BOTH))
    client = await served.connect()
    assert (await _get(client, "/", (GRPC, "5S")))[0] == 200
    assert aiodelay.time_left(kept[0]) is None


async def test_time_left_without_aiodelay_names_the_fix(serve: Serve) -> None:
    said: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        try:
            aiodelay.time_left(request)
        except RuntimeError as exc:
            said.append(str(exc))
        return web.Response()

    app = web.Application()  # no aiodelay
    app.router.add_get("/", handler)
    served = await serve(app)
    client = await served.connect()
    assert (await _get(client, "/"))[0] == 200
    [message] = said
    assert "aiodelay.setup" in message
    assert "\n" not in message


# -- budget_trace: the budget sent downstream ---------------------------------------------------


class _Downstream:
    """A plain aiohttp server (no aiodelay) that records the headers of each request."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.app = web.Application()
        self.app.router.add_get("/", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append({k.lower(): v for k, v in request.headers.items() if k.lower() in BOTH})
        return web.Response(text="downstream")


async def _downstream(serve: Serve) -> tuple[_Downstream, str]:
    down = _Downstream()
    served = await serve(down.app)
    return down, f"http://127.0.0.1:{served.port}/"


def _caller(url: str, trace: aiohttp.TraceConfig) -> Callable[[], Coroutine[Any, Any, None]]:
    """A call of ``url`` through a session with ``trace``, its body read."""

    async def call() -> None:
        async with aiohttp.ClientSession(trace_configs=[trace]) as s, s.get(url) as r:
            await r.read()

    return call


def _ms(header: str, value: str) -> int:
    seconds = (parse_grpc_timeout if header == GRPC else parse_milliseconds)(value)
    assert seconds is not None
    return round(seconds * 1000)


@pytest.mark.both_loops
async def test_budget_trace_sends_the_time_left_minus_the_margin(serve: Serve) -> None:
    down, url = await _downstream(serve)
    left: list[float] = []

    async def calls(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession(trace_configs=[aiodelay.budget_trace(margin=0.1)]) as s:
            before = aiodelay.time_left(request)
            async with s.get(url) as response:
                assert await response.text() == "downstream"
            after = aiodelay.time_left(request)
        assert before is not None
        assert after is not None
        left.extend((before, after))
        return web.Response(text="up")

    served = await serve(_app(web.get("/", calls), budget_headers=BOTH))
    client = await served.connect()
    assert (await _get(client, "/", (ENVOY, "2000")))[:2] == (200, b"up")
    [sent] = down.headers
    assert set(sent) == {GRPC, ENVOY}  # each of the app's budget_headers
    assert sent[GRPC].endswith("m")
    before, after = left
    for header in BOTH:
        ms = _ms(header, sent[header])
        assert (after - 0.1) * 1000 - 1 <= ms <= (before - 0.1) * 1000  # the margin taken off
        assert ms < 1900


@pytest.mark.both_loops
async def test_budget_trace_sends_grpc_timeout_for_a_route_deadline_by_default(
    serve: Serve,
) -> None:
    down, url = await _downstream(serve)
    trace = aiodelay.budget_trace()

    async def via(request: web.Request) -> web.Response:
        await _caller(url, trace)()  # from a coroutine the handler awaits, not itself
        return web.Response(text="up")

    served = await serve(_app(web.get("/", via), deadline=3))
    client = await served.connect()
    assert (await _get(client, "/"))[0] == 200
    [sent] = down.headers
    assert list(sent) == [GRPC]
    assert 2500 < _ms(GRPC, sent[GRPC]) <= 2990  # 3 s less the default margin (0.01 s)


@pytest.mark.both_loops
async def test_budget_trace_sends_the_budget_from_a_shield_section(serve: Serve) -> None:
    down, url = await _downstream(serve)
    trace = aiodelay.budget_trace()

    call = _caller(url, trace)

    async def shielded_call(request: web.Request) -> web.Response:
        await aiodelay.shield(call())
        return web.Response(text="up")

    served = await serve(_app(web.get("/", shielded_call), budget_headers=(ENVOY,)))
    client = await served.connect()
    assert (await _get(client, "/", (ENVOY, "2000")))[0] == 200
    [sent] = down.headers
    assert 1500 < int(sent[ENVOY]) <= 1990


@pytest.mark.both_loops
async def test_budget_trace_leaves_calls_without_a_deadline_alone(serve: Serve) -> None:
    down, url = await _downstream(serve)
    trace = aiodelay.budget_trace()

    call = _caller(url, trace)

    async def plain(request: web.Request) -> web.Response:
        await call()
        return web.Response(text="up")

    @aiodelay.deadline(None)
    async def exempt(request: web.Request) -> web.Response:
        await call()
        return web.Response(text="up")

    async def in_a_task(request: web.Request) -> web.Response:
        await asyncio.create_task(call())  # not the handler's task: no header (documented)
        await aiodelay.spawn(request, call())  # nor one of aiodelay's
        return web.Response(text="up")

    served = await serve(
        _app(
            web.get("/plain", plain),
            web.get("/exempt", exempt),
            budget_headers=BOTH,
        )
    )
    timed = await serve(_app(web.get("/task", in_a_task), deadline=3))
    client = await served.connect()
    assert (await _get(client, "/plain"))[0] == 200  # no deadline, no budget
    assert (await _get(client, "/exempt", (GRPC, "2S")))[0] == 200  # takes no budget
    client = await timed.connect()
    assert (await _get(client, "/task"))[0] == 200
    await call()  # outside any request
    assert down.headers == [{}, {}, {}, {}, {}]


@pytest.mark.both_loops
async def test_budget_trace_lets_a_smaller_budget_the_caller_set_stand(serve: Serve) -> None:
    """A header the call sets itself, smaller than the request's budget, is kept: a budget
    only shortens, also on the way out."""
    down, url = await _downstream(serve)
    trace = aiodelay.budget_trace()

    async def calls(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession(trace_configs=[trace]) as s:
            for headers in ({GRPC: "100m"}, {GRPC: "1H"}, {GRPC: "junk"}):
                async with s.get(url, headers=headers) as r:
                    await r.read()
        return web.Response(text="up")

    served = await serve(_app(web.get("/", calls), deadline=3))
    client = await served.connect()
    assert (await _get(client, "/"))[0] == 200
    small, large, junk = (d[GRPC] for d in down.headers)
    assert small == "100m"
    assert 2500 < _ms(GRPC, large) <= 3000
    assert 2500 < _ms(GRPC, junk) <= 3000


@pytest.mark.both_loops
async def test_a_sub_app_with_its_own_setup_reads_and_sends_its_own_budget_headers(
    serve: Serve,
) -> None:
    """The innermost setup decides for its routes, as its default deadline does: the sub-app
    reads and sends Envoy's header, the app grpc-timeout."""
    down, url = await _downstream(serve)
    trace = aiodelay.budget_trace(margin=0)

    async def calls(request: web.Request) -> web.Response:
        await _caller(url, trace)()
        return web.Response(text="called")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    sub = _app(web.get("/calls", calls), web.get("/slow", slow), budget_headers=(ENVOY,))
    app = _app(web.get("/calls", calls), budget_headers=(GRPC,))
    app.add_subapp("/sub", sub)
    served = await serve(app)
    client = await served.connect()
    assert (await _get(client, "/sub/calls", (ENVOY, "1500")))[:2] == (200, b"called")
    assert (await _get(client, "/calls", (GRPC, "1500m")))[:2] == (200, b"called")
    assert (await _get(client, "/calls", (ENVOY, "1500")))[:2] == (200, b"called")
    sub_sent, app_sent, not_read = down.headers
    assert list(sub_sent) == [ENVOY]
    assert 1000 < int(sub_sent[ENVOY]) <= 1500
    assert list(app_sent) == [GRPC]
    assert 1000 < _ms(GRPC, app_sent[GRPC]) <= 1500
    assert not_read == {}  # the app does not read Envoy's header
    _, body, took = await _get(client, "/sub/slow", (ENVOY, "100"), (GRPC, "50m"))
    assert (
        body == f"504: the request exceeded its 0.100s deadline (the budget in {ENVOY})\n".encode()
    )
    assert took < 1.0


@pytest.mark.both_loops
async def test_a_sub_app_reads_a_budget_where_the_app_reads_none(serve: Serve) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    async def quick(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.Response(text="done")

    sub = _app(web.get("/slow", slow), budget_headers=(GRPC,))
    app = _app(web.get("/quick", quick))
    app.add_subapp("/sub", sub)
    served = await serve(app)
    client = await served.connect()
    status, _, took = await _get(client, "/sub/slow", (GRPC, "100m"))
    assert status == 504
    assert took < 1.0
    assert (await _get(client, "/quick", (GRPC, "100m")))[:2] == (200, b"done")


@pytest.mark.both_loops
async def test_the_downstream_call_ends_with_the_budget(serve: Serve) -> None:
    """A downstream with aiodelay takes the budget, less the margin: it stops first, answers
    504, and the upstream passes that on before its own 0.3 s deadline."""
    down_probe = HandlerRun()

    async def slow(request: web.Request) -> web.Response:
        await down_probe.run(request, asyncio.sleep(5))
        return web.Response()

    downstream = await serve(_app(web.get("/", slow), budget_headers=(GRPC,)))
    url = f"http://127.0.0.1:{downstream.port}/"
    trace = aiodelay.budget_trace(margin=0.05)

    @aiodelay.deadline(0.3)
    async def calls(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession(trace_configs=[trace]) as s, s.get(url) as r:
            return web.Response(status=r.status, text=f"downstream said {r.status}")

    upstream = await serve(_app(web.get("/", calls)))
    client = await upstream.connect()
    status, body, took = await _get(client, "/")
    assert (status, body) == (504, b"downstream said 504")
    assert 0.2 <= took < 1.0
    await down_probe.wait_ended()
    assert down_probe.cancelled
    assert aiodelay.stats(downstream.app).timed_out == 1
    assert aiodelay.stats(upstream.app).timed_out == 0


@pytest.mark.parametrize("margin", [-0.01, math.nan, math.inf, True, "0.1", None])
def test_budget_trace_refuses_a_margin_that_is_not_seconds(margin: Any) -> None:
    with pytest.raises(ValueError, match=r"budget_trace\(margin=\.\.\.\) takes seconds >= 0"):
        aiodelay.budget_trace(margin=margin)


def test_budget_trace_is_a_frozen_trace_config() -> None:
    trace = aiodelay.budget_trace(margin=0)
    assert isinstance(trace, aiohttp.TraceConfig)
    with pytest.raises(RuntimeError):
        trace.on_request_start.append(lambda *a: None)  # type: ignore[arg-type]


def test_max_budget_is_a_day() -> None:
    assert MAX_BUDGET == 86400.0


@pytest.mark.both_loops
async def test_budget_trace_in_an_app_that_reads_budgets_reaches_the_handlers_tasks(
    serve: Serve,
) -> None:
    """Fanning out with asyncio.gather (which runs each call in a task of its own), a task the
    handler starts, one aiodelay.spawn() starts: in an app that reads budgets, their calls
    carry the budget too (they copy the handler's context); once the request has ended, a
    call of a task that outlived it carries none."""
    down, url = await _downstream(serve)
    trace = aiodelay.budget_trace()
    later = asyncio.Event()
    after_the_end: list[asyncio.Task[None]] = []

    call = _caller(url, trace)

    async def late_call() -> None:
        await later.wait()
        await call()

    async def fan_out(request: web.Request) -> web.Response:
        await asyncio.gather(call(), call())
        await asyncio.create_task(call())
        await aiodelay.spawn(request, call())
        after_the_end.append(asyncio.create_task(late_call()))
        return web.Response(text="up")

    served = await serve(_app(web.get("/", fan_out), budget_headers=(GRPC,)))
    client = await served.connect()
    assert (await _get(client, "/", (GRPC, "2S")))[0] == 200
    assert len(down.headers) == 4
    for sent in down.headers:
        assert 1500 <= int(sent[GRPC].rstrip("m")) <= 1990, down.headers
    later.set()
    await asyncio.wait_for(after_the_end[0], 5)
    assert down.headers[4] == {}


@pytest.mark.both_loops
async def test_a_grace_route_without_a_deadline_of_its_own_takes_no_budget(
    serve: Serve,
) -> None:
    """A client that hangs up lets a grace route's work finish its grace: a budget it sends
    does not cut that work sooner. With a deadline of the route's own, it shortens that."""

    @aiodelay.grace(1.5)
    async def fill(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)  # its work: five times the budget the client sends
        return web.Response(text="filled")

    @aiodelay.grace(1.5)
    @aiodelay.deadline(5)
    async def bounded(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="too late")

    app = _app(web.get("/fill", fill), web.get("/bounded", bounded), budget_headers=BOTH)
    served = await serve(app)
    client = await served.connect()
    assert (await _get(client, "/fill", (GRPC, "10m")))[:2] == (200, b"filled")
    status, _, took = await _get(client, "/bounded", (GRPC, "100m"))
    assert status == 504
    assert took < 2
    assert aiodelay.stats(app).timed_out == 1


async def test_time_left_answers_none_where_aiodelay_runs_degraded(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiodelay._core import aiohttp_internals, degraded

    monkeypatch.setattr(aiohttp_internals, "MISSING", ("RequestHandler._messages",))
    monkeypatch.setattr(degraded, "_warned", False)
    seen: list[float | None] = []

    @aiodelay.deadline(2)
    async def report(request: web.Request) -> web.Response:
        seen.append(aiodelay.time_left(request))
        return web.Response(text="up")

    served = await serve(_app(web.get("/", report), budget_headers=BOTH))
    client = await served.connect()
    assert (await _get(client, "/", (GRPC, "1S")))[:2] == (200, b"up")
    assert seen == [None]


async def test_ignored_budgets_are_counted_in_each_app_on_the_way(serve: Serve) -> None:
    async def report(request: web.Request) -> web.Response:
        return web.Response(text="up")

    sub = _app(web.get("/report", report), budget_headers=BOTH)
    app = web.Application()
    aiodelay.setup(app)
    app.add_subapp("/sub", sub)
    served = await serve(app)
    client = await served.connect()
    assert (await _get(client, "/sub/report", (GRPC, "soon")))[:2] == (200, b"up")
    assert (aiodelay.stats(app).budgets_ignored, aiodelay.stats(sub).budgets_ignored) == (1, 1)


@pytest.mark.both_loops
async def test_a_call_in_a_task_the_handler_started_ends_with_the_budget(serve: Serve) -> None:
    """A task the handler starts and does not await: its call carries the budget, and ends
    when the budget does (its task is cancelled then), as the handler's own call would, also
    where the downstream does not read budgets (here: plain aiohttp, answering after 5 s)."""
    ended: asyncio.Future[tuple[bool, float]] = asyncio.get_running_loop().create_future()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    down = web.Application()
    down.router.add_get("/", slow)
    url = f"http://127.0.0.1:{(await serve(down)).port}/"
    trace = aiodelay.budget_trace()

    async def call() -> None:
        started = time.monotonic()
        try:
            await _caller(url, trace)()
        except asyncio.CancelledError:
            ended.set_result((True, time.monotonic() - started))
            raise
        ended.set_result((False, time.monotonic() - started))

    async def handler(request: web.Request) -> web.Response:
        request.app[TASKS].append(asyncio.create_task(call()))  # not awaited
        await asyncio.Event().wait()  # until the deadline
        return web.Response()

    app = _app(web.get("/", handler), budget_headers=(GRPC,))
    app[TASKS] = []
    served = await serve(app)
    client = await served.connect()
    assert (await _get(client, "/", (GRPC, "300m")))[0] == 504
    cancelled, took = await asyncio.wait_for(ended, 5)
    assert cancelled
    assert took < 1.5, took  # at the budget's end (0.3 s), not the downstream's 5 s


TASKS = web.AppKey("tasks", list)
