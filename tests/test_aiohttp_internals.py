"""Seeing the client leave (``aiodelay/_core/aiohttp_internals.py``, and ``hangups.py`` behind
paused reading): FIN and RST, in every server configuration aiodelay supports.

Each case: a handler blocks at an await, the client drops the connection for real, and the
test waits for the handler to end. Without aiodelay the handler would wait forever (see
``test_control_without_aiodelay_handler_runs_on``).
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from aiohttp import web, web_protocol
from aiohttp.typedefs import Handler

import aiodelay
from aiodelay._core.aiohttp_internals import _close_read
from aiodelay.testing import RawClient
from tests.conftest import PAUSING_UPLOAD, Drop, HandlerRun, Serve, Served

# Where the handler is when the client leaves, and how the client gets it there:
# (name, route, handler work, client steps before the drop)
Work = Callable[[web.Request, HandlerRun], Awaitable[Any]]
Steps = Callable[[RawClient], Awaitable[None]]


async def _await_gate(request: web.Request, probe: HandlerRun) -> Any:
    return await probe.gate


async def _mid_stream(request: web.Request, probe: HandlerRun) -> Any:
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"first line\n")
    return await probe.gate


async def _reading_body(request: web.Request, probe: HandlerRun) -> Any:
    return await request.read()


async def _plain_get(client: RawClient) -> None:
    await client.get("/")


async def _second_on_keep_alive(client: RawClient) -> None:
    await client.get("/fast")
    assert await client.read_response() == (200, b"fast")
    await client.get("/")


async def _until_first_line(client: RawClient) -> None:
    await client.get("/")
    await client.read_until(b"first line\n")


async def _partial_upload(client: RawClient) -> None:
    await client.send(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)


KINDS: list[tuple[str, Work, Steps]] = [
    ("awaiting", _await_gate, _plain_get),
    ("keep-alive-2nd", _await_gate, _second_on_keep_alive),
    ("mid-stream", _mid_stream, _until_first_line),
    ("reading-body", _reading_body, _partial_upload),
]

# How the server runs: (name, handler_cancellation, tls)
SERVERS = [
    ("default", False, False),
    ("handler_cancellation", True, False),
    ("tls", False, True),
]


def _app(work: Work, probe: HandlerRun, finish: list[asyncio.Future[None]]) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        finish.append(aiodelay.notify_finish(request))
        result = await probe.run(request, work(request, probe))
        assert isinstance(result, web.StreamResponse)
        return result

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_route("*", "/", handler)
    app.router.add_get("/fast", fast)
    return app


@pytest.mark.both_loops
@pytest.mark.parametrize("drop", ["FIN", "RST"])
@pytest.mark.parametrize(
    ("server", "handler_cancellation", "tls"), SERVERS, ids=[s[0] for s in SERVERS]
)
@pytest.mark.parametrize(("kind", "work", "steps"), KINDS, ids=[k[0] for k in KINDS])
async def test_handler_cancelled_when_client_leaves(
    serve: Serve,
    kind: str,
    work: Work,
    steps: Steps,
    server: str,
    handler_cancellation: bool,
    tls: bool,
    drop: Drop,
) -> None:
    probe = HandlerRun()
    finish: list[asyncio.Future[None]] = []
    served = await serve(
        _app(work, probe, finish), handler_cancellation=handler_cancellation, tls=tls
    )
    client = await served.connect()
    await steps(client)
    await probe.wait_started()

    client.drop(drop)
    await probe.wait_ended()

    assert probe.cancelled
    assert probe.finally_ran
    exc = finish[-1].exception()
    assert isinstance(exc, aiodelay.ConnectionLost)
    # A TLS client's orderly close sends close_notify then FIN; both read as the peer leaving.
    assert exc.reason == drop
    assert aiodelay.stats(served.app).cancelled == 1


# While aiohttp has paused reading, the FIN or RST waits in the kernel behind unread bytes:
# only the kernel's own report (epoll's EPOLLRDHUP, Linux) shows it. How the client gets
# aiohttp to pause: (name, client steps)
_UNREAD = PAUSING_UPLOAD


async def _unread_upload(client: RawClient) -> None:
    await client.send(
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % (4 * _UNREAD)
        + b"x" * _UNREAD
    )


async def _full_pipeline(client: RawClient) -> None:
    # aiohttp queues at most 32 pipelined requests, then stops reading.
    await client.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n" * 200)


PAUSING: list[tuple[str, Steps]] = [
    ("unread-upload", _unread_upload),
    ("full-pipeline", _full_pipeline),
]


@pytest.mark.skipif(not hasattr(select, "epoll"), reason="seen through epoll: Linux only")
@pytest.mark.both_loops
@pytest.mark.parametrize("drop", ["FIN", "RST"])
@pytest.mark.parametrize(
    ("server", "handler_cancellation", "tls"), SERVERS, ids=[s[0] for s in SERVERS]
)
@pytest.mark.parametrize(("kind", "steps"), PAUSING, ids=[k[0] for k in PAUSING])
async def test_handler_cancelled_when_client_leaves_while_reading_is_paused(
    serve: Serve,
    kind: str,
    steps: Steps,
    server: str,
    handler_cancellation: bool,
    tls: bool,
    drop: Drop,
) -> None:
    if kind == "full-pipeline" and not hasattr(web_protocol, "MAX_MSG_QUEUE_SIZE"):
        pytest.skip("this aiohttp reads pipelined requests without pausing: no blind spot")
    probe = HandlerRun()
    finish: list[asyncio.Future[None]] = []
    served = await serve(
        _app(_await_gate, probe, finish), handler_cancellation=handler_cancellation, tls=tls
    )
    client = await served.connect()
    await steps(client)
    await probe.wait_started()
    await _ping(served)  # the server has read what it will read
    assert probe.request is not None
    assert probe.request.transport is not None
    assert not probe.request.transport.is_reading()  # paused: no eof_received can come

    if tls and drop == "FIN":
        # A TLS client closing its stream sends close_notify and waits for the server's before
        # its FIN; a server that reads nothing never answers. Browsers just close: a FIN.
        raw = client.writer.get_extra_info("socket")
        with socket.fromfd(raw.fileno(), raw.family, raw.type) as dup:  # uvloop's has no shutdown
            dup.shutdown(socket.SHUT_WR)
    else:
        client.drop(drop)
    await probe.wait_ended()

    assert probe.cancelled
    exc = finish[0].exception()
    assert isinstance(exc, aiodelay.ConnectionLost)
    assert exc.reason == drop
    assert aiodelay.stats(served.app).cancelled == 1


async def _ping(served: Served) -> None:
    """A full round trip on a new connection: the server has read everything sent before."""
    client = await served.connect()
    await client.get("/fast", close=True)
    assert await client.read_response() == (200, b"fast")
    await client.aclose()


@pytest.mark.parametrize("drop", ["FIN", "RST"])
async def test_control_without_aiodelay_handler_runs_on(serve: Serve, drop: Drop) -> None:
    """The problem aiodelay solves: aiohttp's default server never tells the handler."""
    probe = HandlerRun()
    seen_gone: list[bool] = []

    async def handler(request: web.Request) -> web.Response:
        await probe.run(request, probe.gate)
        seen_gone.append(request.transport is None)
        return web.Response(text="nobody reads this")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    app = web.Application()
    app.router.add_get("/", handler)
    app.router.add_get("/fast", fast)
    served = await serve(app)
    client = await served.get("/")
    await probe.wait_started()
    client.drop(drop)
    await _ping(served)

    assert not probe.ended.is_set()
    probe.gate.set_result(None)
    await probe.wait_ended()
    assert probe.completed
    assert seen_gone == [True]  # the server had seen the close, and the handler ran on anyway


async def test_handler_not_started_when_connection_already_closed(serve: Serve) -> None:
    """A request whose connection is closing before aiodelay sees it is not worked on."""
    called: list[str] = []

    @web.middleware
    async def close_first(request: web.Request, handler: Handler) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return await handler(request)

    async def handler(request: web.Request) -> web.Response:
        called.append("handler")
        return web.Response()

    app = web.Application(middlewares=[close_first, aiodelay.middleware()])
    app.router.add_get("/", handler)
    served = await serve(app)
    client = await served.get("/")
    assert await client.reader.read() == b""  # closed without a response

    assert called == []
    stats = aiodelay.stats(served.app)
    assert (stats.in_flight, stats.disconnected, stats.cancelled) == (0, 1, 1)


async def test_a_fin_stuck_behind_a_full_receive_window_is_no_worse_than_plain_aiohttp(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """What remains physically unseeable: the handler does not read a 32 MB upload, aiohttp
    stops reading, the server's receive window fills up, and the client's FIN cannot even reach
    the server's kernel (the client's kernel holds it behind the unsent data). Nobody on the
    server can see it; the handler runs on and its response is dropped quietly, as without
    aiodelay. (An upload just over what aiohttp buffers fits the window, and that FIN is seen:
    see ``test_handler_cancelled_when_client_leaves_while_reading_is_paused``.)"""
    caplog.set_level(logging.WARNING)
    probe = HandlerRun()

    async def handler(request: web.Request) -> web.Response:
        await probe.run(request, probe.gate)
        return web.Response(text="nobody reads this")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_post("/", handler)
    app.router.add_get("/fast", fast)
    served = await serve(app)
    client = await served.connect()
    size = 32 * 1024 * 1024  # far more than aiohttp buffers before it pauses reading
    await client.send(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % size)
    await probe.wait_started()
    client.writer.write(b"x" * size)
    client.drop("half-close")  # the FIN goes out after the body, which the server won't read
    await _ping(served)

    assert not probe.ended.is_set()  # not seen
    probe.gate.set_result(None)
    await probe.wait_ended()
    assert probe.completed
    client.writer.transport.abort()
    await _ping(served)
    assert aiodelay.stats(served.app).in_flight == 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


class _KeepsOpenAfterEof(asyncio.Protocol):
    """A server protocol that stays open after its peer's FIN, as the Watch has asyncio do."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.made: asyncio.Future[asyncio.Transport] = loop.create_future()
        self.eof = asyncio.Event()
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.set_result(cast(asyncio.Transport, transport))  # (uvloop's is not registered)

    def eof_received(self) -> bool:
        self.eof.set()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


@pytest.mark.both_loops
@pytest.mark.parametrize("buffered", [False, True], ids=["nothing-buffered", "buffered"])
async def test_the_close_after_a_fin_sends_what_is_buffered_then_a_fin(buffered: bool) -> None:
    """The teardown after a FIN (``_close_read``): with nothing left to send, it closes at
    once as ``close()`` would (the client reads the end of the stream, not a reset; the
    protocol hears ``connection_lost(None)``); with bytes still waiting in the transport,
    they all reach the client before the end of the stream."""

    loop = asyncio.get_running_loop()
    proto = _KeepsOpenAfterEof()
    server = await loop.create_server(lambda: proto, "127.0.0.1", 0)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server's writes back up
        client.setblocking(False)
        await loop.sock_connect(client, server.sockets[0].getsockname())
        transport = await asyncio.wait_for(proto.made, 5)
        client.shutdown(socket.SHUT_WR)  # a FIN, and the client reads on
        await asyncio.wait_for(proto.eof.wait(), 5)
        payload = b"x" * (8 << 20) if buffered else b""
        transport.write(payload)
        assert (transport.get_write_buffer_size() > 0) is buffered
        _close_read(transport)

        async def read_to_the_end() -> bytes:
            received = bytearray()
            while chunk := await loop.sock_recv(client, 1 << 16):  # ends at the FIN
                received += chunk
            return bytes(received)

        assert await asyncio.wait_for(read_to_the_end(), 10) == payload
        assert await asyncio.wait_for(proto.lost, 5) is None
    finally:
        client.close()
        server.close()
        await server.wait_closed()


async def test_the_close_after_a_fin_ignores_a_transport_that_closed_meanwhile() -> None:
    """The close after a FIN leaves alone a transport closed meanwhile: on asyncio's selector
    transport, one closed with bytes still buffered that then drained (``connection_lost``
    called by ``_write_ready``) would raise AttributeError from ``abort()`` (logged by the
    teardown as an ERROR)."""
    loop = asyncio.get_running_loop()
    proto = _KeepsOpenAfterEof()
    server = await loop.create_server(lambda: proto, "127.0.0.1", 0)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.setblocking(False)
        await loop.sock_connect(client, server.sockets[0].getsockname())
        transport = await asyncio.wait_for(proto.made, 5)
        client.shutdown(socket.SHUT_WR)  # the client's FIN; it reads on
        await asyncio.wait_for(proto.eof.wait(), 5)
        transport.write(b"x" * (8 << 20))
        assert transport.get_write_buffer_size() > 0
        transport.close()  # (aiohttp's force_close(), a handler's own close...)
        while await loop.sock_recv(client, 1 << 16):
            pass
        assert await asyncio.wait_for(proto.lost, 5) is None
        _close_read(transport)  # the deferred teardown, two turns after the FIN
    finally:
        client.close()
        server.close()
        await server.wait_closed()


@pytest.mark.both_loops
async def test_the_socket_transport_the_middleware_reads_directly_says_what_its_methods_say() -> (
    None
):
    """asyncio's socket transport, whose ``_protocol`` and ``_closing`` the middleware reads
    for ``get_protocol()`` and ``is_closing()``: the same answers while it is open, when its
    peer's FIN arrives, and once it is closed (uvloop's is another class: asked, not read)."""
    from aiodelay._core.aiohttp_internals import SOCKET_TRANSPORT

    loop = asyncio.get_running_loop()
    lost: asyncio.Future[None] = loop.create_future()
    seen: list[tuple[str, object, object, bool, bool]] = []

    def look(when: str, transport: Any) -> None:
        seen.append(
            (
                when,
                transport._protocol,
                transport.get_protocol(),
                transport._closing,
                transport.is_closing(),
            )
        )

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            if transport.__class__ is SOCKET_TRANSPORT:
                look("open", transport)

        def eof_received(self) -> None:
            if self.transport.__class__ is SOCKET_TRANSPORT:
                look("FIN", self.transport)
            # (returning None: the transport closes itself)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.transport.__class__ is SOCKET_TRANSPORT:
                look("closed", self.transport)
            lost.set_result(None)

    server = await loop.create_server(Accept, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write_eof()
        await lost
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    if type(loop).__module__.startswith("uvloop"):
        assert seen == []
    else:
        assert [when for when, *_ in seen] == ["open", "FIN", "closed"]
        for _, protocol, asked, closing, closing_asked in seen:
            assert protocol is asked
            assert closing is closing_asked
        assert [closing for *_, closing in seen] == [False, False, True]
