"""How a request's end is decided, counted, logged and told (``aiodelay/_core/outcome.py``):
what aiodelay records about a request (the counters, the INFO line, aiohttp's access log, the
observers' outcome) matches what happened on the wire, also when things happen close together
(a deadline and a client leaving, a reset in the turn a handler's result is ready, a file sent
with ``sendfile()``, a shielded handler tripping over its gone client). Real sockets on
127.0.0.1, servers started with ``handler_cancellation=False`` unless a test says otherwise.

After every request has ended, ``disconnected == cancelled + shielded_ran_on + truncated +
failed``: the tests of the counters check that too. aiohttp's access log says 499 with 0 bytes
when nothing went out.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web, web_protocol
from aiohttp.typedefs import Handler

import aiodelay
from aiodelay.testing import RawClient
from tests.conftest import HandlerRun, Lines, Serve, ServeLogged, connection_gone, until


def _adds_up(stats: aiodelay.Stats) -> bool:
    ended = stats.cancelled + stats.shielded_ran_on + stats.truncated + stats.failed
    return stats.disconnected == ended


async def _fire_and_close(port: int, path: str, times: int) -> None:
    """POSTs with an empty body, each on its own connection closed right after sending."""
    for _ in range(times):
        client = await RawClient.connect(port)
        await client.send(
            b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n" % path.encode()
        )
        client.drop("FIN")


class _Ran:
    """Counts handlers that ran to their end; ``wait(n)`` waits for the n-th."""

    def __init__(self) -> None:
        self.started = 0
        self.ended = 0
        self.changed = asyncio.Event()

    async def work(self) -> web.Response:
        self.started += 1
        await asyncio.sleep(0.02)  # the charge's own work: a point a cancellation could hit
        self.ended += 1
        self.changed.set()
        return web.Response(text="charged")

    async def wait(self, count: int) -> None:
        async def reached() -> None:
            while self.ended < count:
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(reached(), 5)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            raise AssertionError(
                f"{self.ended} of {count} handlers ran to their end ({self.started} started)"
            ) from None


class _Ended:
    """An observer: an event per ended request."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.changed = asyncio.Event()

    def request_started(self, request: web.BaseRequest) -> None:
        pass

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        pass

    def request_ended(self, request: web.BaseRequest, outcome: Any) -> None:
        self.kinds.append(outcome.kind)
        self.changed.set()

    async def wait(self, count: int) -> list[str]:
        async def enough() -> None:
            while len(self.kinds) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(enough(), 5)
        return self.kinds


_AIOHTTP = tuple(int(part) for part in aiohttp.__version__.split(".")[:2])


class _Observer:
    """An observer that records the calls it gets, in order, and each request's outcome."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.outcomes: dict[str, aiodelay.Outcome] = {}
        self.changed = asyncio.Event()
        #: Set in ``request_lost``, in the transport's callback that reported the loss.
        self.left = asyncio.Event()

    def request_started(self, request: web.BaseRequest) -> None:
        self._heard("started", request.path)

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        self._heard("lost", request.path)
        self.left.set()

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        self.outcomes[request.path] = outcome
        self._heard("ended", request.path)

    def _heard(self, call: str, path: str) -> None:
        self.calls.append((call, path))
        self.changed.set()

    async def heard(self, call: str, path: str) -> None:
        """Wait until ``call`` ("started", "lost", "ended") was heard for ``path``."""
        await until(
            self.changed,
            lambda: (call, path) in self.calls,
            lambda: f"no {call} {path} in {self.calls}",
        )

    async def ended(self, path: str) -> aiodelay.Outcome:
        """The outcome of the request for ``path``, once it ended."""
        await self.heard("ended", path)
        return self.outcomes[path]


def _app(*routes: web.RouteDef) -> web.Application:
    app = web.Application()
    aiodelay.setup(app)
    app.add_routes(routes)
    return app


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST (SO_LINGER 0), as RawClient.drop("RST") does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- the sub-app's policy and stats ---------------------------------------------------------


def _main_and_sub(ran: _Ran) -> tuple[web.Application, web.Application]:
    async def charge(request: web.Request) -> web.Response:
        return await ran.work()

    app = web.Application()
    aiodelay.setup(app)  # cancel
    sub = web.Application()
    aiodelay.setup(sub, policy="shield")
    sub.router.add_post("/charge", charge)
    app.add_subapp("/sub", sub)
    return app, sub


async def test_sub_app_policy_applies_to_a_client_that_left_before_the_handler(
    serve: Serve,
) -> None:
    """Fire-and-close POSTs into a shielded sub-app: every handler runs to its end, whether
    aiodelay saw the client leave before the handler started or while it ran."""
    from aiodelay import add_observer

    ran = _Ran()
    app, sub = _main_and_sub(ran)
    ended = _Ended()
    add_observer(app, ended)
    served = await serve(app)
    await _fire_and_close(served.port, "/sub/charge", 20)
    await ran.wait(20)
    kinds = await ended.wait(20)
    assert set(kinds) <= {"ran_on", "completed"}
    for each in (app, sub):
        stats = aiodelay.stats(each)
        assert stats.in_flight == 0
        assert stats.completed + stats.disconnected == 20
        assert stats.cancelled == 0
        assert _adds_up(stats)


async def test_sub_app_policy_applies_when_the_connection_closed_before_aiodelay(
    serve: Serve,
) -> None:
    """The same, made certain: a middleware in front of aiodelay closes the connection."""
    ran = _Ran()

    @web.middleware
    async def close_first(request: web.Request, handler: Handler) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return await handler(request)

    async def charge(request: web.Request) -> web.Response:
        return await ran.work()

    app = web.Application(middlewares=[close_first, aiodelay.middleware()])
    sub = web.Application()
    aiodelay.setup(sub, policy="shield")
    sub.router.add_post("/charge", charge)
    app.add_subapp("/sub", sub)
    served = await serve(app)
    client = await served.connect()
    await client.send(b"POST /sub/charge HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    await ran.wait(1)
    for each in (app, sub):
        stats = aiodelay.stats(each)
        assert (stats.disconnected, stats.shielded_ran_on, stats.cancelled) == (1, 1, 0)


async def test_stats_of_a_sub_app_count_its_requests_and_the_main_app_counts_all(
    serve: Serve,
) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/", hello)
    sub = web.Application()
    aiodelay.setup(sub)
    sub.router.add_get("/", hello)
    app.add_subapp("/sub/", sub)
    served = await serve(app)
    client = await served.connect()
    for path in ("/", "/sub/", "/sub/", "/"):
        await client.get(path)
        assert await client.read_response() == (200, b"hi")
    assert aiodelay.stats(sub).completed == 2
    assert aiodelay.stats(app).completed == 4


# -- handler_cancellation=True ----------------------------------------------------------------


async def test_shielded_handler_runs_on_under_handler_cancellation_when_client_left_first(
    serve: Serve, lines: Lines
) -> None:
    ran = _Ran()

    @aiodelay.shielded
    async def charge(request: web.Request) -> web.Response:
        return await ran.work()

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_post("/charge", charge)
    served = await serve(app, handler_cancellation=True)
    await _fire_and_close(served.port, "/charge", 20)
    await ran.wait(20)
    assert ran.started == 20
    await lines.wait_for("interrupted", count=aiodelay.stats(app).disconnected)
    stats = aiodelay.stats(app)
    assert stats.cancelled == 0
    assert stats.failed == 0
    assert _adds_up(stats)
    assert not [line for line in lines.lines if "stopped" in line]


@pytest.mark.parametrize(
    ("handler_cancellation", "kind", "said"),
    [
        (False, "ran_on", r"ran on \(WebSocket: aiohttp ended it\)"),
        (True, "cancelled", r"cancelled \(a WebSocket, by aiohttp's handler_cancellation\)"),
    ],
)
async def test_a_websocket_whose_client_left_is_counted_and_logged_by_what_happened(
    serve: Serve, lines: Lines, handler_cancellation: bool, kind: str, said: str
) -> None:
    probe = HandlerRun()

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse()
        await socket_.prepare(request)

        async def receive() -> None:
            async for _ in socket_:
                pass

        await probe.run(request, receive())
        return socket_

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/ws", ws)
    served = await serve(app, handler_cancellation=handler_cancellation)
    async with aiohttp.ClientSession() as session:
        connection = await session.ws_connect(f"http://127.0.0.1:{served.port}/ws")
        await probe.wait_started()
        transport = connection._response.connection.transport  # type: ignore[union-attr]
        assert transport is not None
        transport.close()
        await probe.wait_ended()
        [line] = await lines.wait_for("interrupted")
    assert re.search(said, line), line
    stats = aiodelay.stats(app)
    assert stats.disconnected == 1
    assert (stats.cancelled, stats.shielded_ran_on) == ((1, 0) if kind == "cancelled" else (0, 1))
    assert _adds_up(stats)


# -- a client that leaves while aiohttp writes the response ---------------------------------

_BIG = 16 * 1024 * 1024


@pytest.mark.parametrize("body", ["bytes", "file"])
async def test_a_client_that_leaves_during_the_response_body_is_truncated_not_completed(
    serve_logged: ServeLogged,
    lines: Lines,
    tmp_path: Path,
    body: str,
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * _BIG)

    async def download(request: web.Request) -> web.StreamResponse:
        if body == "file":
            return web.FileResponse(big)
        return web.Response(body=b"x" * _BIG)

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/big", download)
    logged = await serve_logged(app)
    client = await RawClient.connect(logged.port)
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    await client.get("/big")
    await client.read_until(b"x" * 1024)
    # Closing with unread response bytes sends an RST (TCP's rule), as a browser or curl
    # stopping a download does.
    client.drop("RST")
    [line] = await lines.wait_for("cut short")
    assert line.startswith("GET /big from 127.0.0.1 interrupted by ")
    [entry] = await logged.wait_for()
    status, sent = entry.split()[2:]
    assert status == "200"
    stats = aiodelay.stats(app)
    assert (stats.completed, stats.disconnected, stats.truncated) == (0, 1, 1)
    assert _adds_up(stats)
    if body == "bytes":  # a file goes out with sendfile(), which aiohttp does not count
        # What aiohttp handed to the transport: here the whole body at once.
        assert 1024 < int(sent) <= _BIG + 200
        assert re.search(r"\(\d+ bytes handed to the transport\)", line)


async def test_a_complete_response_followed_by_a_close_is_completed(
    serve: Serve, lines: Lines
) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/", hello)
    served = await serve(app)
    client = await served.get("/")
    assert await client.read_response() == (200, b"hi")
    client.drop("RST")
    # The next request on another connection is the event that the first one was settled by.
    other = await served.get("/")
    assert await other.read_response() == (200, b"hi")
    assert aiodelay.stats(app).completed == 2
    assert aiodelay.stats(app).disconnected == 0
    assert lines.lines == []


async def test_an_observed_request_whose_client_leaves_during_the_body_ends_truncated(
    aiodelay_server: Any,
) -> None:
    async def download(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * _BIG)

    app = web.Application()
    app.router.add_get("/big", download)
    server = await aiodelay_server(app)
    outcome = await server.drop("GET", "/big", after_response_bytes=65536, how="RST")
    assert outcome.truncated, outcome
    assert aiodelay.stats(app).truncated == 1


# -- the access log shows what went on the wire ----------------------------------------------


async def test_access_log_of_a_stream_cancelled_midway_shows_its_status_and_bytes(
    serve_logged: ServeLogged,
) -> None:
    probe = HandlerRun()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"y" * 6144)

        async def hold() -> None:
            await asyncio.Future()

        await probe.run(request, hold())
        return response

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/stream", stream)
    logged = await serve_logged(app)
    client = await RawClient.connect(logged.port)
    await client.get("/stream")
    await client.read_until(b"y" * 6144)
    await probe.wait_started()
    client.drop("RST")
    await probe.wait_ended()
    [entry] = await logged.wait_for()
    _, _, status, sent = entry.split()
    assert status == "200"
    assert int(sent) > 6144  # the body, and the status line and headers before it
    assert probe.cancelled


async def test_access_log_of_a_shielded_request_whose_client_left_says_499(
    serve_logged: ServeLogged,
) -> None:
    probe = HandlerRun()

    @aiodelay.shielded
    async def charge(request: web.Request) -> web.Response:
        await probe.run(request, probe.gate)
        return web.Response(text="charged")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_post("/charge", charge)
    logged = await serve_logged(app)
    client = await RawClient.connect(logged.port)
    await client.send(b"POST /charge HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    await probe.wait_started()
    client.drop("FIN")
    # The Watch saw the client leave once notify_finish fails.
    assert probe.request is not None
    with pytest.raises(aiodelay.ConnectionLost):
        await asyncio.wait_for(aiodelay.notify_finish(probe.request), 5)
    probe.gate.set_result(None)
    await probe.wait_ended()
    assert await logged.wait_for() == ["POST /charge 499 0"]
    assert aiodelay.stats(app).shielded_ran_on == 1


async def test_access_log_of_a_cancelled_request_with_nothing_sent_says_499(
    serve_logged: ServeLogged,
) -> None:
    probe = HandlerRun()

    async def slow(request: web.Request) -> web.Response:
        await probe.run(request, probe.gate)
        return web.Response()

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/slow", slow)
    logged = await serve_logged(app)
    client = await RawClient.connect(logged.port)
    await client.get("/slow")
    await probe.wait_started()
    client.drop("FIN")
    await probe.wait_ended()
    assert await logged.wait_for() == ["GET /slow 499 0"]


# -- regressions found in review: a complete response is completed, shutdown is shutdown --------


@pytest.mark.parametrize("observed", [False, True])
async def test_a_client_that_half_closes_and_reads_everything_is_completed(
    serve: Serve, lines: Lines, observed: bool
) -> None:
    """aiohttp answers a FIN by closing, and a close sends what the transport still holds: a
    client that half-closed and read on got the whole response."""
    from aiodelay import add_observer

    body = b"x" * (8 * 1024 * 1024)

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=body)

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/big", big)
    ended = _Ended()
    if observed:
        add_observer(app, ended)
    served = await serve(app)
    client = await served.get("/big")
    await client.read_until(b"x" * 1024)
    client.drop("half-close")
    received = bytes(client.received) + await client.reader.read()  # to the server's close
    assert received.endswith(body)
    if observed:
        assert await ended.wait(1) == ["completed"]
    # Otherwise: the server closed the socket in connection_lost, whose settling callback ran
    # before the client could read that close.
    stats = aiodelay.stats(app)
    assert (stats.completed, stats.disconnected, stats.truncated) == (1, 0, 0)
    assert lines.lines == []


async def test_a_response_an_outer_middleware_replaced_is_completed_when_sent(
    serve: Serve, lines: Lines
) -> None:
    """aiodelay watches the handler's response; aiohttp sends what the outer middleware
    returned instead. What counts is what went out."""

    @web.middleware
    async def wrap(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        assert isinstance(response, web.Response)
        return web.Response(text=f"wrapped: {response.text}")

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application(middlewares=[wrap, aiodelay.middleware()])
    app.router.add_get("/", hello)
    served = await serve(app)
    client = await served.get("/")
    assert await client.read_response() == (200, b"wrapped: hello")
    client.drop("half-close")
    assert await client.reader.read() == b""  # the server saw the FIN and closed
    stats = aiodelay.stats(app)
    assert (stats.completed, stats.disconnected, stats.truncated) == (1, 0, 0)
    assert lines.lines == []


@pytest.mark.parametrize("asked", [False, True])
async def test_a_request_stopped_by_the_shutdown_is_counted_and_logged_as_such(
    serve: Serve, lines: Lines, asked: bool
) -> None:
    probe = HandlerRun()
    finish: list[asyncio.Future[None]] = []

    async def slow(request: web.Request) -> web.Response:
        if asked:
            finish.append(aiodelay.notify_finish(request))
        await probe.run(request, probe.gate)
        return web.Response()

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/slow", slow)
    served = await serve(app, shutdown_timeout=0.05)
    await served.get("/slow")
    await probe.wait_started()
    await served.runner.cleanup()
    assert probe.cancelled
    stats = aiodelay.stats(app)
    assert (stats.completed, stats.disconnected, stats.failed) == (0, 1, 1)
    [line] = await lines.wait_for("interrupted")
    assert "interrupted by shutdown" in line
    assert line.endswith("stopped by the server's shutdown")
    if asked:
        exc = finish[0].exception()
        assert isinstance(exc, aiodelay.ConnectionLost)
        assert exc.reason == "shutdown"


# -- a deadline passes in a shield() section, then the client leaves --------------------------


class _InAShieldSection:
    """A handler's ``shield()`` section that lasts until its client left after the request's
    deadline had passed."""

    def __init__(self) -> None:
        self.request: web.Request | None = None
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self, request: web.Request) -> None:
        self.request = request
        self.started.set()
        await aiodelay.shield(self.release.wait())

    async def leave_after_the_deadline(self, client: RawClient) -> None:
        await asyncio.wait_for(self.started.wait(), 5)
        assert self.request is not None
        with pytest.raises(aiodelay.DeadlineExceeded):
            await asyncio.wait_for(aiodelay.notify_finish(self.request), 5)  # it passed
        client.drop("FIN")
        await connection_gone(self.request)  # aiohttp lets go of the closed transport
        self.release.set()


@pytest.mark.both_loops
async def test_deadline_then_client_leaving_in_a_shield_section_logs_499(
    serve_logged: ServeLogged, lines: Lines
) -> None:
    """Nothing went out: the access log says 499 with 0 bytes, not the 504 that was never
    sent; the request still counts and is logged as timed out (the deadline came first)."""

    held = _InAShieldSection()

    @aiodelay.deadline(0.1)
    async def slow(request: web.Request) -> web.Response:
        await held.run(request)
        return web.Response(text="done")

    served = await serve_logged(_app(web.get("/x", slow)))
    client = await served.connect()
    await client.get("/x")
    await held.leave_after_the_deadline(client)
    assert await served.entry("/x") == "GET /x 499 0"
    line = (await lines.wait_for(r"deadline"))[0]
    assert line.startswith("GET /x from 127.0.0.1 exceeded its 0.100s deadline: "), line
    assert "answered 504" not in line
    assert "client left" in line
    stats = aiodelay.stats(served.app)
    assert (stats.timed_out, stats.completed, stats.disconnected) == (1, 0, 0)


@pytest.mark.both_loops
async def test_deadline_then_client_leaving_before_a_late_answer_logs_499(
    serve_logged: ServeLogged, lines: Lines
) -> None:
    """The handler catches the deadline's cancellation and answers itself, for a client that
    is gone: nothing went out, so the access log says 499 with 0 bytes, not 200."""

    held = _InAShieldSection()

    @aiodelay.deadline(0.1)
    async def stubborn(request: web.Request) -> web.Response:
        try:
            await held.run(request)
        except asyncio.CancelledError:
            return web.Response(text="late")
        return web.Response(text="done")

    served = await serve_logged(_app(web.get("/x", stubborn)))
    client = await served.connect()
    await client.get("/x")
    await held.leave_after_the_deadline(client)
    assert await served.entry("/x") == "GET /x 499 0"
    line = (await lines.wait_for(r"deadline"))[0]
    assert line.startswith("GET /x from 127.0.0.1 exceeded its 0.100s deadline: "), line
    assert aiodelay.stats(served.app).timed_out == 1


# -- a reset read in the turn in which the handler's result is ready --------------------------


@pytest.mark.both_loops
async def test_a_reset_in_the_turn_the_result_is_ready_is_not_a_response_cut_short(
    serve_logged: ServeLogged,
) -> None:
    """/a's result becomes ready while the loop is blocked (in /b), and /a's client resets
    meanwhile: the loop reads the RST in the same turn as it runs /a's result. Nothing of /a's
    response reached its client: it is not "truncated" and its access log line says 499 0."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    a_waits = asyncio.Event()
    blocking, reset = threading.Event(), threading.Event()

    async def a(request: web.Request) -> web.Response:
        a_waits.set()
        await ready
        return web.Response(text="a")

    async def b(request: web.Request) -> web.Response:
        loop.call_soon(ready.set_result, None)
        blocking.set()
        # The scenario: a handler that blocks the loop, here until /a's client has reset.
        reset.wait(5)  # (a threading.Event: blocking the loop on purpose)
        return web.Response(text="b")

    app = _app(web.get("/a", a), web.get("/b", b))
    observer = _Observer()
    aiodelay.add_observer(app, observer)
    served = await serve_logged(app)
    a_client = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", served.port), 5)
    await asyncio.to_thread(a_client.sendall, b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")

    def reset_while_blocked() -> None:
        # The loop is blocked in /b: only another thread can reset /a's connection now. On
        # 127.0.0.1 the RST has reached the server's socket when close() returns.
        if blocking.wait(5):
            _reset(a_client)
            reset.set()

    resetter = threading.Thread(target=reset_while_blocked)
    resetter.start()
    try:
        await asyncio.wait_for(a_waits.wait(), 5)
        b_client = await served.connect()
        await b_client.get("/b")
        assert await asyncio.wait_for(b_client.read_response(), 5) == (200, b"b")
        outcome = await observer.ended("/a")
    finally:
        blocking.set()
        reset.set()
        await asyncio.to_thread(resetter.join, 5)
        if a_client.fileno() >= 0:
            a_client.close()
    assert outcome.kind != "truncated", outcome
    assert outcome.lost is not None
    assert outcome.lost.reason == "RST"
    assert outcome.kind in ("cancelled", "ran_on"), outcome
    assert await served.entry("/a") == "GET /a 499 0"


# -- a client gone before aiodelay saw its request --------------------------------------------


@pytest.mark.parametrize("drop", ["FIN", "RST"])
async def test_a_client_gone_before_aiodelay_saw_its_request_is_told_as_it_left(
    serve: Serve, drop: str
) -> None:
    """A middleware before ``aiodelay.middleware()`` reads the request's body first; the
    client sends part of it and leaves, so its connection is gone (aiohttp let go of the
    transport) before aiodelay sees the request, and the kernel can no longer be asked. The
    request is still told with the reason the client left by, not ``"closed"``, which says the
    server closed the connection. (One request is served first: aiodelay learns of the
    server from a connection it watches.)"""
    observer = _Observer()
    reading = asyncio.Event()
    transports: list[object] = []

    @web.middleware
    async def read_first(request: web.Request, handler: Handler) -> web.StreamResponse:
        reading.set()
        try:
            await request.read()
        except ConnectionError:
            transports.append(request.transport)
        return await handler(request)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[read_first, aiodelay.middleware()])
    app.router.add_get("/ok", ok)
    app.router.add_post("/upload", ok)
    aiodelay.add_observer(app, observer)
    served = await serve(app)
    first = await served.get("/ok")
    assert await first.read_response() == (200, b"ok")
    client = await served.connect()
    await client.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
    await asyncio.wait_for(reading.wait(), 5)
    client.drop("RST" if drop == "RST" else "FIN")
    outcome = await observer.ended("/upload")
    assert transports == [None]  # (gone when aiodelay saw the request)
    assert outcome.kind == "cancelled"
    assert outcome.lost is not None
    # aiohttp 3.10's RequestHandler has no room for the note (no ``_cache``): there, as
    # documented, the request is told "closed".
    told = drop if hasattr(web_protocol.RequestHandler, "_cache") else "closed"
    assert outcome.lost.reason == told


# -- a sub-app's observer, for a client that left before the handler started ----------------


@pytest.mark.both_loops
@pytest.mark.parametrize("policy", ["cancel", "shield"])
@pytest.mark.parametrize("left", ["before aiodelay saw the request", "in a middleware"])
async def test_a_sub_apps_observer_hears_the_start_before_the_loss(
    serve: Serve, policy: str, left: str
) -> None:
    """aiodelay on the app and on a sub-app; the client of a request into the sub-app leaves
    before the handler starts: the connection is closed before the request reaches aiodelay
    (a middleware in front of it closes it), or the client leaves while a middleware of the
    app, inside aiodelay, holds the request. The sub-app's observer, like the app's, hears the
    request start, then the client leave, then the end, in that order."""
    sub_observer = _Observer()
    main_observer = _Observer()

    @web.middleware
    async def close_first(request: web.Request, handler: Handler) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return await handler(request)

    @web.middleware
    async def hold(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Until the client left (cancelled here under "cancel"); on then, before the
        # connection is closed.
        await main_observer.left.wait()
        return await handler(request)

    async def charge(request: web.Request) -> web.Response:
        return web.Response(text="charged")

    if left == "in a middleware":
        app = web.Application(middlewares=[hold])
        aiodelay.setup(app)  # outermost, in front of `hold`
    else:
        app = web.Application(middlewares=[close_first, aiodelay.middleware()])
    sub = web.Application()
    aiodelay.setup(sub, policy=policy)
    sub.router.add_post("/charge", charge)
    app.add_subapp("/s/", sub)
    aiodelay.add_observer(app, main_observer)
    aiodelay.add_observer(sub, sub_observer)
    served = await serve(app)
    client = await served.connect()
    await client.send(b"POST /s/charge HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    if left == "in a middleware":
        await main_observer.heard("started", "/s/charge")
        client.drop("FIN")
    await main_observer.ended("/s/charge")
    await sub_observer.ended("/s/charge")
    expected = [("started", "/s/charge"), ("lost", "/s/charge"), ("ended", "/s/charge")]
    assert main_observer.calls == expected
    assert sub_observer.calls == expected


@pytest.mark.both_loops
async def test_a_request_into_a_sub_app_whose_connection_closed_is_recorded_once(
    serve: Serve,
) -> None:
    """aiodelay on the app and on a sub-app (shielded); a middleware of the app holds the
    request until its client left and its connection is closed, so the sub-app's aiodelay
    sees no connection at all: the request is still the app's, counted and told once, and
    its shielded handler runs to its end."""
    sub_observer = _Observer()
    main_observer = _Observer()

    @web.middleware
    async def hold(request: web.Request, handler: Handler) -> web.StreamResponse:
        await main_observer.left.wait()
        await connection_gone(request)  # aiohttp lets go of the transport a turn or two later
        return await handler(request)

    ran: list[str] = []

    async def charge(request: web.Request) -> web.Response:
        ran.append(request.path)
        return web.Response(text="charged")

    app = web.Application(middlewares=[hold])
    aiodelay.setup(app)
    sub = web.Application()
    aiodelay.setup(sub, policy="shield")
    sub.router.add_post("/charge", charge)
    app.add_subapp("/s/", sub)
    aiodelay.add_observer(app, main_observer)
    aiodelay.add_observer(sub, sub_observer)
    served = await serve(app)
    client = await served.connect()
    await client.send(b"POST /s/charge HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    await main_observer.heard("started", "/s/charge")
    client.drop("FIN")
    await main_observer.ended("/s/charge")
    await sub_observer.ended("/s/charge")
    assert ran == ["/s/charge"]
    expected = [("started", "/s/charge"), ("lost", "/s/charge"), ("ended", "/s/charge")]
    assert main_observer.calls == expected
    assert sub_observer.calls == expected
    for each in (app, sub):
        stats = aiodelay.stats(each)
        assert (stats.disconnected, stats.shielded_ran_on, stats.cancelled) == (1, 1, 0)


# -- a file sent with sendfile(), reset by its client -----------------------------------------


@pytest.mark.both_loops
async def test_a_file_download_reset_by_its_client_is_truncated_by_rst_with_matching_bytes(
    serve_logged: ServeLogged, lines: Lines, tmp_path: Path
) -> None:
    """A FileResponse (aiohttp sends it with sendfile()) whose client resets the connection
    after reading the head: truncated, by an RST; the access log line says 200 and the same
    number of bytes as the INFO line says were handed to the transport."""
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (32 * 1024 * 1024))

    async def download(request: web.Request) -> web.FileResponse:
        return web.FileResponse(big)

    app = _app(web.get("/big.bin", download))
    observer = _Observer()
    aiodelay.add_observer(app, observer)
    served = await serve_logged(app)
    client = await served.connect()
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    await client.get("/big.bin")
    await client.read_until(b"\r\n\r\n")
    client.drop("RST")
    outcome = await observer.ended("/big.bin")
    line = (await lines.wait_for("cut short"))[0]
    entry = await served.entry("/big.bin")
    assert outcome.kind == "truncated", outcome
    assert outcome.lost is not None
    if _AIOHTTP < (3, 11) and asyncio.get_running_loop().__module__.startswith("asyncio"):
        # aiohttp 3.10 reads on after sendfile() met the reset (and took its error): the read
        # sees only the end of the stream, as after a FIN, and asks nothing more.
        assert outcome.lost.reason in ("RST", "FIN"), outcome
    else:
        assert outcome.lost.reason == "RST", outcome
    handed = re.search(r"\((\d+) bytes handed to the transport\)", line)
    assert handed is not None, line
    assert entry == f"GET /big.bin 200 {handed[1]}", (entry, line)


# -- a shielded handler that trips over its gone client ---------------------------------------


async def _shielded_failure(
    serve: Serve, handler: Callable[[web.Request], Awaitable[web.StreamResponse]], path: str
) -> tuple[web.Application, _Observer, RawClient]:
    app = _app(web.route("*", path, aiodelay.shielded(handler)))
    observer = _Observer()
    aiodelay.add_observer(app, observer)
    served = await serve(app)
    return app, observer, await served.connect()


@pytest.mark.both_loops
async def test_a_shielded_handler_whose_write_fails_after_its_client_left_counts_as_failed(
    serve: Serve,
) -> None:
    """A shielded handler streams; its client resets; the handler's next writes fail with
    ConnectionResetError, which it lets propagate: it did not run on to its end, it failed."""
    raised: list[BaseException] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"y" * 1024)
        with pytest.raises(aiodelay.ConnectionLost):
            await asyncio.wait_for(aiodelay.notify_finish(request), 5)  # the client left
        try:
            for _ in range(1000):
                await response.write(b"y" * 65536)
        except ConnectionResetError as exc:
            raised.append(exc)
            raise
        return response

    app, observer, client = await _shielded_failure(serve, stream, "/stream")
    await client.get("/stream")
    await client.read_until(b"y" * 1024)
    client.drop("RST")
    outcome = await observer.ended("/stream")
    assert raised, "the handler's writes never failed"
    assert outcome.kind == "failed", outcome
    stats = aiodelay.stats(app)
    assert (stats.disconnected, stats.failed, stats.shielded_ran_on) == (1, 1, 0)


@pytest.mark.both_loops
async def test_a_shielded_handler_whose_body_read_fails_after_its_client_left_counts_as_failed(
    serve: Serve,
) -> None:
    """A shielded handler reads an upload; its client resets half-way: ``request.read()``
    raises ConnectionResetError, which the handler lets propagate: it failed."""
    reading = asyncio.Event()
    raised: list[BaseException] = []

    async def upload(request: web.Request) -> web.Response:
        reading.set()
        try:
            body = await request.read()
        except ConnectionResetError as exc:
            raised.append(exc)
            raise
        return web.Response(text=f"{len(body)} bytes")

    app, observer, client = await _shielded_failure(serve, upload, "/upload")
    await client.send(
        b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n" + b"z" * 1000
    )
    await asyncio.wait_for(reading.wait(), 5)
    client.drop("RST")
    outcome = await observer.ended("/upload")
    assert raised, "the handler's read did not fail"
    assert outcome.kind == "failed", outcome
    stats = aiodelay.stats(app)
    assert (stats.disconnected, stats.failed, stats.shielded_ran_on) == (1, 1, 0)
