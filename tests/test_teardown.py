"""A connection's teardown comes after its handler has seen its cancellation
(``aiodelay/_core/teardown.py``).

The connection's teardown (the close after a FIN, aiohttp's ``connection_lost`` after an RST)
waits two turns of the loop, by when the handlers have seen their cancellation, so that in a
storm every handler is cancelled before any of the connections is torn down."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct
import weakref
from typing import Any

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

import aiodelay
from tests.conftest import HandlerRun, Held, Serve, connection_gone, recorded

pytestmark = pytest.mark.both_loops


def _app(*routes: web.RouteDef) -> web.Application:
    app = web.Application()
    aiodelay.setup(app)
    app.add_routes(routes)
    return app


async def test_after_a_fin_the_connection_closes_even_if_the_handler_runs_on(
    serve: Serve,
) -> None:
    """The close after a FIN waits two turns of the loop, not for the handler: a handler that
    swallows its cancellation does not keep the connection open."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run_on(request: web.Request) -> web.Response:
        await gate  # runs on, ignoring the cancellation
        return web.Response(text="late")

    held = Held(run_on)
    served = await serve(_app(web.get("/", held.handle)))
    client = await held.start(served)
    client.drop("half-close")  # a FIN, while the client can still read
    assert await asyncio.wait_for(client.reader.read(), 5) == b""  # closed: nothing sent
    assert not held.ended.is_set()
    gate.set_result(None)
    await held.wait_ended()
    await recorded(served.app)
    stats = aiodelay.stats(served.app)
    assert (stats.disconnected, stats.shielded_ran_on) == (1, 1)


@pytest.mark.parametrize("close", ["FIN", "RST"])
async def test_in_a_storm_every_handler_is_cancelled_before_a_connection_is_torn_down(
    serve: Serve, close: str
) -> None:
    """Drops read in one turn of the loop: each handler sees its CancelledError while every
    request of the storm still has its transport (aiohttp's ``connection_lost``, and after a
    FIN the sockets' close, come after)."""
    n = 5
    requests: list[web.BaseRequest] = []
    seen: list[list[bool]] = []
    started = asyncio.Event()
    ended = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        requests.append(request)
        if len(requests) == n:
            started.set()
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            seen.append([each.transport is not None for each in requests])
            if len(seen) == n:
                ended.set()
            raise
        return web.Response()  # pragma: no cover - never reached

    served = await serve(_app(web.get("/", handler)))
    loop = asyncio.get_running_loop()
    socks = [socket.socket() for _ in range(n)]  # plain sockets: uvloop's cannot shutdown()
    try:
        for sock in socks:
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", served.port))
            await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        await asyncio.wait_for(started.wait(), 5)
        for sock in socks:  # one after the other, before the server's loop turns again
            if close == "FIN":
                sock.shutdown(socket.SHUT_WR)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        await asyncio.wait_for(ended.wait(), 5)
    finally:
        for sock in socks:
            sock.close()
    assert seen == [[True] * n] * n


async def test_under_handler_cancellation_a_handler_that_runs_on_is_not_cancelled_again(
    serve: Serve,
) -> None:
    """On a server with aiohttp's handler_cancellation=True, aiohttp's own teardown after an
    RST comes after aiodelay cancelled the handler; a handler that caught that cancellation
    and runs on is not cancelled a second time by aiohttp."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    outcome: list[str] = []

    async def run_on(request: web.Request) -> web.Response:
        try:
            await gate
        except asyncio.CancelledError:  # pragma: no cover - the failure being tested
            outcome.append("cancelled again")
            raise
        outcome.append("ran on")
        return web.Response()

    held = Held(run_on)
    served = await serve(_app(web.get("/", held.handle)), handler_cancellation=True)
    client = await held.start(served)
    client.drop("RST")
    await connection_gone(held.requests[0])
    assert held.requests[0].transport is None  # aiohttp has run its connection_lost
    assert outcome == []
    gate.set_result(None)
    await held.wait_ended()
    await recorded(served.app)
    assert outcome == ["ran on"]
    assert aiodelay.stats(served.app).shielded_ran_on == 1


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_after_an_rst_aiohttp_gets_the_transports_error_whatever_the_handler_did(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, handler_cancellation: bool
) -> None:
    """aiohttp's own connection_lost, deferred past the cancellation, gets the error the
    transport reported, also where the handler's code changed the cause of the ConnectionLost
    it was given (``raise ... from None`` does)."""
    got: list[BaseException | None] = []
    own = RequestHandler.connection_lost

    def recording(proto: RequestHandler, exc: BaseException | None) -> None:
        got.append(exc)
        own(proto, exc)

    monkeypatch.setattr(RequestHandler, "connection_lost", recording)
    finish: list[asyncio.Future[None]] = []
    held = Held()

    async def handle(request: web.Request) -> web.StreamResponse:
        finish.append(aiodelay.notify_finish(request))
        return await held.handle(request)

    served = await serve(_app(web.get("/", handle)), handler_cancellation=handler_cancellation)
    client = await held.start(served)
    client.drop("RST")
    with pytest.raises(aiodelay.ConnectionLost) as raised:
        await asyncio.wait_for(finish[0], 5)
    raised.value.__cause__ = None
    await connection_gone(held.requests[0])
    assert len(got) == 1
    assert isinstance(got[0], ConnectionResetError)


async def test_a_failing_teardown_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The teardowns that wait for the cancelled handlers run in one batch; one that raises
    is logged, and the others still run."""
    from aiodelay._core.teardown import after_cancelled

    ran: list[str] = []

    def fails(what: str) -> None:
        raise RuntimeError(what)

    done = asyncio.Event()
    after_cancelled(ran.append, "first")
    after_cancelled(fails, "boom")
    after_cancelled(ran.append, "third")
    after_cancelled(lambda _: done.set(), None)
    assert ran == []  # not in this turn
    with caplog.at_level(logging.ERROR, logger="aiodelay"):
        await asyncio.wait_for(done.wait(), 5)
    assert ran == ["first", "third"]
    [record] = [r for r in caplog.records if r.name == "aiodelay"]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


async def test_over_tls_a_fin_closes_at_once(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """A TLS transport cannot stay open after EOF (asyncio warns if asked to): there the
    close is not deferred, and the handler is cancelled all the same."""
    probe = HandlerRun()

    async def handler(request: web.Request) -> web.Response:
        await probe.run(request, probe.gate)
        return web.Response()

    served = await serve(_app(web.get("/", handler)), tls=True)
    client = await served.get("/")
    await probe.wait_started()
    with caplog.at_level(logging.WARNING):
        client.drop("FIN")
        await probe.wait_ended()
        await recorded(served.app)
    assert probe.cancelled
    assert [r.getMessage() for r in caplog.records if "eof_received" in r.getMessage()] == []
    assert aiodelay.stats(served.app).cancelled == 1


@pytest.mark.parametrize("pending", [False, True])
def test_the_teardown_batch_keeps_no_loop_alive(pending: bool) -> None:
    """Each loop's batch of teardowns is found through weak references to the loop and to it;
    the batch refers to the loop's transports (and so to the loop): neither a batch that ran
    nor one still pending when the loop is closed may keep the loop alive."""
    from aiodelay._core.teardown import after_cancelled

    async def one_teardown() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        after_cancelled(lambda loop: loop.time(), loop)  # refers to the loop, as a close does
        after_cancelled(lambda _: done.set(), None)
        if not pending:
            await asyncio.wait_for(done.wait(), 5)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(one_teardown())
        after_cancelled_ran = not pending
        assert after_cancelled_ran or loop._ready  # type: ignore[attr-defined]
    finally:
        loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None


async def test_each_turns_teardowns_come_after_that_turns_cancelled_handlers() -> None:
    """A drop read while the teardowns of an earlier turn wait makes a batch of its own: its
    handler sees the cancellation before its connection is torn down, as the first one's."""
    from aiodelay._core.teardown import after_cancelled

    loop = asyncio.get_running_loop()
    order: list[str] = []
    both = asyncio.Event()

    async def handler(name: str) -> None:
        try:
            await loop.create_future()
        except asyncio.CancelledError:
            order.append(f"{name} handler")

    def teardown(name: str) -> None:
        order.append(f"{name} teardown")
        if name == "B":
            both.set()

    handlers = {name: asyncio.create_task(handler(name)) for name in "AB"}
    await asyncio.sleep(0)  # both wait

    def drop(name: str) -> None:  # what a read of a drop does: cancel, defer the teardown
        handlers[name].cancel()
        after_cancelled(teardown, name)

    loop.call_soon(drop, "A")
    await asyncio.sleep(0)
    loop.call_soon(drop, "B")  # a turn later, while A's teardown waits
    await asyncio.wait_for(both.wait(), 5)
    assert order == ["A handler", "A teardown", "B handler", "B teardown"]


def test_an_interrupt_in_a_teardown_leaves_the_rest_for_the_next_turns() -> None:
    """A KeyboardInterrupt from one teardown stops the loop; the teardowns after it in the
    batch run when the loop runs again."""
    from aiodelay._core.teardown import after_cancelled

    ran: list[str] = []

    def interrupt(_: object) -> None:
        raise KeyboardInterrupt

    async def batch() -> None:
        after_cancelled(ran.append, "first")
        after_cancelled(interrupt, None)
        after_cancelled(ran.append, "third")
        await asyncio.get_running_loop().create_future()  # the interrupt ends this

    async def rest() -> None:
        for _ in range(10):
            if "third" in ran:
                return
            await asyncio.sleep(0)

    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(batch())
        assert ran == ["first"]
        loop.run_until_complete(rest())
        assert ran == ["first", "third"]
    finally:
        loop.close()


@pytest.mark.parametrize("logged", [False, True])
async def test_a_dropped_upload_leaves_no_task_lingering_over_its_body(
    serve: Serve, caplog: pytest.LogCaptureFixture, logged: bool
) -> None:
    """Clients send the start of an upload (192 KiB of 1 MB) and leave by FIN at once, most
    before their handler, which does not read the body, has started: aiohttp's task of each
    connection ends with the connection, not after aiohttp's lingering time (10 s) of
    waiting for the rest of a body that cannot come."""
    count = 50
    tasks: set[asyncio.Task[Any]] = set()
    all_ended = asyncio.Event()

    class Observer:
        def request_started(self, request: web.BaseRequest) -> None:
            tasks.add(request.task)  # aiohttp's task of the connection

        def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
            pass

        def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
            if len(tasks) == count:
                all_ended.set()

    async def upload(request: web.Request) -> web.Response:
        await asyncio.get_running_loop().create_future()  # until cancelled
        return web.Response()

    access_log = None
    if logged:
        caplog.set_level(logging.INFO, logger="tests.access.upload")  # (enabled: aiohttp logs)
        access_log = logging.getLogger("tests.access.upload")
    app = web.Application()
    aiodelay.setup(app)
    aiodelay.add_observer(app, Observer())
    app.router.add_post("/upload", upload)
    served = await serve(app, access_log=access_log)
    head = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n"

    async def upload_and_leave() -> None:
        client = await served.connect()
        await client.send(head + b"x" * (192 * 1024))
        client.drop("FIN")

    await asyncio.gather(*(upload_and_leave() for _ in range(count)))
    await asyncio.wait_for(all_ended.wait(), 5)
    _, lingering = await asyncio.wait(tasks, timeout=5)
    assert not lingering, f"{len(lingering)} of {count} connection tasks still run"
    assert aiodelay.stats(app).cancelled == count
