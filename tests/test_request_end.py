"""How a request's end is recorded when things happen close together: a deadline and a client
leaving, a reset in the turn a handler's result is ready, a file sent with ``sendfile()``, a
shielded handler tripping over its gone client, and what is asked after the end. Real sockets
on 127.0.0.1, servers started with ``handler_cancellation=False``.

What each test checks is what the public API and its documentation promise: the counters of
``aiodelay.stats``, the observers' calls and outcome, the INFO line of the ``aiodelay`` logger,
and aiohttp's access log line (499 with 0 bytes when nothing went out).
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

import aiodelay
from tests.conftest import Lines, RawClient, Serve, ServeLogged, until

_AIOHTTP = tuple(int(part) for part in aiohttp.__version__.split(".")[:2])

# What each test checks must hold on asyncio's own loop and on uvloop alike.
pytestmark = pytest.mark.both_loops

# -- helpers: an observer (the INFO lines and the access log: tests/conftest.py) -------------


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
        for _ in range(1000):  # aiohttp lets go of the closed transport a few turns later
            if self.request.transport is None:
                break
            await asyncio.sleep(0)
        assert self.request.transport is None
        self.release.set()


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
    assert outcome.lost.reason == drop


# -- a sub-app's observer, for a client that left before the handler started ----------------


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
        for _ in range(1000):  # aiohttp lets go of the transport a turn or two later
            if request.transport is None:
                break
            await asyncio.sleep(0)
        assert request.transport is None
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


# -- asked after the end, with nothing asked while the request ran ----------------------------


async def test_notify_finish_asked_after_the_end_fails_with_the_handlers_error(
    serve: Serve,
) -> None:
    """A handler raised; nothing asked aiodelay about the request while it ran. Asked after
    the end, notify_finish fails with what the handler raised, as it does when asked before."""
    kept: list[web.Request] = []

    async def broken(request: web.Request) -> web.Response:
        kept.append(request)
        raise RuntimeError("boom")

    served = await serve(_app(web.get("/broken", broken)))
    client = await served.get("/broken")
    assert (await asyncio.wait_for(client.read_response(), 5))[0] == 500
    assert aiodelay.stats(served.app).completed == 1  # its client did not leave: ended
    [request] = kept
    with pytest.raises(RuntimeError, match=r"^boom$"):
        await asyncio.wait_for(aiodelay.notify_finish(request), 5)


async def test_a_download_cut_short_is_disconnected_when_asked_after_the_end(
    serve: Serve, lines: Lines
) -> None:
    """The handler returned a large response and its client reset the connection while aiohttp
    wrote it; nothing asked aiodelay about the request while it ran. Asked after the end:
    notify_finish fails with ConnectionLost, and is_disconnected is True."""
    kept: list[web.Request] = []

    async def download(request: web.Request) -> web.Response:
        kept.append(request)
        return web.Response(body=b"x" * 16_000_000)

    served = await serve(_app(web.get("/big", download)))
    client = await served.connect()
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    await client.get("/big")
    await client.read_until(b"HTTP/1.1 200 OK\r\n")
    client.drop("RST")
    await lines.wait_for("cut short")
    assert aiodelay.stats(served.app).truncated == 1
    [request] = kept
    assert aiodelay.is_disconnected(request)
    with pytest.raises(aiodelay.ConnectionLost):
        await asyncio.wait_for(aiodelay.notify_finish(request), 5)
    assert aiodelay.is_disconnected(request)


# -- a file sent with sendfile(), reset by its client -----------------------------------------


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


# -- what aiodelay says about shield() in another task, and about a tiny deadline ----------


async def test_shield_in_a_task_the_handler_started_says_to_await_it_in_the_handlers_task(
    serve: Serve,
) -> None:
    """aiodelay is installed; shield() awaited in a plain task the handler started cannot
    protect that task: the RuntimeError says so, not that aiodelay is not installed."""
    errors: list[RuntimeError] = []

    async def section() -> None:
        await aiodelay.shield(asyncio.sleep(0))

    async def handler(request: web.Request) -> web.Response:
        try:
            await asyncio.create_task(section())
        except RuntimeError as exc:
            errors.append(exc)
        return web.Response(text="ok")

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    assert await asyncio.wait_for(client.read_response(), 5) == (200, b"ok")
    [error] = errors
    assert "not installed" not in str(error)
    assert "handler's own task" in str(error)


@pytest.mark.parametrize(("seconds", "said"), [(1e-300, "1e-300s"), (0.00012345, "0.000123s")])
async def test_a_deadline_under_a_millisecond_is_said_with_its_significant_digits(
    serve: Serve, lines: Lines, seconds: float, said: str
) -> None:
    """A deadline of less than 0.001 s is not "0.000s": the 504 body and the INFO line give
    it with three significant digits."""

    @aiodelay.deadline(seconds)
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="too late")

    served = await serve(_app(web.get("/x", slow)))
    client = await served.get("/x")
    status, body = await asyncio.wait_for(client.read_response(), 5)
    assert (status, body) == (504, f"504: the request exceeded its {said} deadline\n".encode())
    line = (await lines.wait_for("deadline"))[0]
    assert line == f"GET /x from 127.0.0.1 exceeded its {said} deadline: cancelled, answered 504"
    assert lines.lines == [line]
