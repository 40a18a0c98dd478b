"""aiodelay on an aiohttp that lacks an internal it relies on: one warning, then a server that
degrades (aiohttp's own handler_cancellation, aiodelay's policies, stats and log) instead of
failing on every request. The missing internal is simulated: on every aiohttp CI tests, none is
missing, which the first test holds."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import web, web_protocol

import aiodelay
from aiodelay._core import aiohttp_internals, degraded, middleware
from tests.conftest import Drop, HandlerRun, Lines, Serve

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

    await until_counted(app)
    counted = aiodelay.stats(app)
    assert (counted.completed, counted.cancelled, counted.shielded_ran_on) == (3, 1, 1)
    assert (counted.disconnected, counted.in_flight) == (2, 0)


async def until_counted(app: web.Application) -> None:
    """The shielded handler is counted by its task's done callback, one turn after it ends."""
    for _ in range(10):
        if aiodelay.stats(app).in_flight == 0:
            return
        await asyncio.sleep(0)


def _protocols(runner: web.AppRunner) -> list[object]:
    server = runner.server
    assert server is not None
    return [handler.transport.get_protocol() for handler in server.connections if handler.transport]
