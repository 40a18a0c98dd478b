"""aiodelay on an aiohttp that lacks an internal it relies on: one warning, then a server that
degrades (aiohttp's own handler_cancellation, aiodelay's policies, stats and log) instead of
failing on every request. The missing internal is simulated: on every aiohttp CI tests, none is
missing, which the first test holds."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import http_writer, web, web_protocol, web_server

import aiodelay
from aiodelay._core import aiohttp_internals, degraded, middleware
from aiodelay.pytest_plugin import AiodelayServer
from tests.conftest import Drop, HandlerRun, Lines, Serve, recorded

#: What the simulated aiohttp lacks: the queue of pipelined requests of a connection.
LACKING = ("RequestHandler._messages",)


def test_every_internal_is_there_on_this_aiohttp() -> None:
    # Run by CI on each aiohttp release of the supported range: a release that renames one
    # of them fails here, by name, before any deployment meets it.
    assert aiohttp_internals.missing_internals() == ()


def test_a_missing_internal_is_named() -> None:
    class Handler:  # a RequestHandler without most of what aiodelay relies on
        def data_received(self, data: bytes) -> None: ...

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(web_protocol, "RequestHandler", Handler)
        missing = aiohttp_internals.missing_internals()
    assert "RequestHandler._messages" in missing
    assert "RequestHandler.eof_received" in missing
    assert "RequestHandler.data_received" not in missing


def test_a_writer_that_takes_no_attribute_and_a_server_without_connection_lost_are_named() -> None:
    class Writer:  # where aiodelay keeps a request's state: it must take an attribute
        __slots__ = ("_eof",)

    class Server:  # aiodelay wraps its connection_lost (how a peer left, before the request)
        handler_cancellation = False

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(http_writer, "StreamWriter", Writer)
        mp.setattr(web_server, "Server", Server)
        missing = aiohttp_internals.missing_internals()
    assert "StreamWriter.__dict__" in missing
    assert "Server.connection_lost" in missing
    assert "Server.handler_cancellation" not in missing


@pytest.fixture
def lacking(monkeypatch: pytest.MonkeyPatch) -> None:
    """This aiohttp lacks ``LACKING`` (as aiodelay sees it), and nothing was said about it yet."""
    monkeypatch.setattr(aiohttp_internals, "MISSING", LACKING)
    monkeypatch.setattr(degraded, "_warned", False)


def test_one_warning_names_the_version_and_what_is_missing(
    lacking: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="aiodelay"):
        aiodelay.setup(web.Application())
        aiodelay.setup(web.Application(), policy="shield")
        aiodelay.middleware()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert f"aiohttp {aiohttp.__version__}" in message
    assert "RequestHandler._messages" in message
    assert "\n" not in message


def test_no_warning_on_an_aiohttp_aiodelay_knows(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aiodelay"):
        mw = aiodelay.middleware()
    assert type(mw) is middleware.Middleware
    assert not caplog.records


def _app(probe: HandlerRun, kept: HandlerRun, release: asyncio.Event) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def slow(request: web.Request) -> web.Response:
        assert not aiodelay.is_disconnected(request)
        with pytest.raises(RuntimeError, match="degraded on aiohttp"):
            aiodelay.notify_finish(request)
        await probe.run(request, asyncio.Event().wait())
        raise AssertionError("never set")

    @aiodelay.shielded
    async def write(request: web.Request) -> web.Response:
        await kept.run(request, release.wait())
        return web.Response(text="written")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/", hello)
    app.router.add_get("/slow", slow)
    app.router.add_get("/write", write)
    return app


@pytest.mark.both_loops
@pytest.mark.parametrize("how", ["FIN", "RST"])
async def test_a_degraded_server_answers_and_stops_a_handler_whose_client_left(
    lacking: None, serve: Serve, lines: Lines, how: Drop
) -> None:
    probe, kept, release = HandlerRun(), HandlerRun(), asyncio.Event()
    app = _app(probe, kept, release)
    served = await serve(app)  # aiohttp's default server: handler_cancellation=False

    # Answered, over and over on one connection, without a Watch on it.
    client = await served.connect()
    for _ in range(3):
        await client.get("/")
        assert await client.read_response() == (200, b"hello")
    server = served.runner.server
    assert server is not None
    assert server.handler_cancellation  # turned on by aiodelay at the first request
    protocols = _protocols(served.runner)
    assert protocols
    assert all(isinstance(p, web_protocol.RequestHandler) for p in protocols)

    # A cancellable handler whose client leaves is stopped (by aiohttp's handler_cancellation,
    # which aiodelay turned on), counted and logged.
    dropped = await served.get("/slow")
    await probe.wait_started()
    dropped.drop(how)
    await probe.wait_ended()
    assert probe.cancelled
    await lines.wait_for(r"GET /slow from 127\.0\.0\.1 interrupted by a disconnect .*: cancelled")

    # A shielded one runs to its end, the request's task cancelled around it.
    left = await served.get("/write")
    await kept.wait_started()
    left.drop(how)
    await lines.wait_for(r"GET /write .*: shielded, runs on")
    release.set()
    await kept.wait_ended()
    assert kept.completed
    assert not kept.cancelled

    await recorded(app)  # (by the shielded task's done callback)
    counted = aiodelay.stats(app)
    assert (counted.completed, counted.cancelled, counted.shielded_ran_on) == (3, 1, 1)
    assert (counted.disconnected, counted.in_flight) == (2, 0)


def _protocols(runner: web.AppRunner) -> list[object]:
    server = runner.server
    assert server is not None
    return [handler.transport.get_protocol() for handler in server.connections if handler.transport]


@pytest.mark.parametrize("how", ["FIN", "RST"])
async def test_degraded_with_aiodelay_on_a_sub_app_too_handles_a_request_once(
    lacking: None, serve: Serve, lines: Lines, how: Drop
) -> None:
    """As when not degraded: the outer middleware handles a request into the sub-app, under the
    sub-app's policy, logs it once and counts it in both."""
    kept, release = HandlerRun(), asyncio.Event()

    async def write(request: web.Request) -> web.Response:  # no mark: the sub-app's policy
        await kept.run(request, release.wait())
        return web.Response(text="written")

    sub = web.Application()
    aiodelay.setup(sub, policy="shield")
    sub.router.add_get("/write", write)
    app = web.Application()
    aiodelay.setup(app)  # cancel
    app.add_subapp("/sub", sub)
    served = await serve(app)
    left = await served.get("/sub/write")
    await kept.wait_started()
    left.drop(how)
    await lines.wait_for(r"GET /sub/write .*: shielded, runs on")
    release.set()
    await kept.wait_ended()
    assert kept.completed
    await recorded(app)  # (by the shielded task's done callback)
    for each in (app, sub):
        counted = aiodelay.stats(each)
        assert (counted.cancelled, counted.shielded_ran_on, counted.in_flight) == (0, 1, 0)
    assert len([line for line in lines.lines if "/sub/write" in line]) == 1, lines.lines


async def test_degraded_says_so_when_it_cannot_turn_on_aiohttps_cancellation(
    lacking: None, serve: Serve, lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where aiohttp's server cannot be reached through the request, nothing would see a
    client leave: a second WARNING, at the first request, says what to pass instead."""
    monkeypatch.setattr(degraded, "turn_on_handler_cancellation", lambda request: None)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/", hello)
    served = await serve(app)
    client = await served.connect()
    for _ in range(2):
        await client.get("/")
        assert await client.read_response() == (200, b"hello")
    [line] = [line for line in lines.lines if "cannot reach aiohttp's server" in line]
    assert "handler_cancellation=True" in line


async def test_the_plugins_drop_says_at_once_that_it_cannot_follow_a_degraded_server(
    lacking: None, aiodelay_server: AiodelayServer
) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    server = await aiodelay_server(app)
    with pytest.raises(RuntimeError, match="runs degraded on this aiohttp"):
        await server.drop("GET", "/")
