"""Shared test helpers: real servers on 127.0.0.1 and raw clients that drop for real.

Servers are started the way production starts them, ``web.AppRunner(app,
handler_cancellation=False)``; aiohttp's ``TestServer`` forces ``handler_cancellation=True``
and would make every disconnect test pass with or without aiodelay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import pytest
import trustme
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

import aiodelay

Drop = Literal["FIN", "RST", "half-close"]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _positive(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of times, 1 or more, got {text!r}"
        )
    return count


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("aiodelay").addoption(
        "--repeat-drops",
        type=_positive,
        default=1,
        metavar="N",
        help="run the drop tests that take a `repetition` argument N times each "
        "(default 1; 200 to check that a drop is seen every time)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes ``repetition`` runs ``--repeat-drops`` times."""
    if "repetition" in metafunc.fixturenames:
        metafunc.parametrize("repetition", range(metafunc.config.getoption("repeat_drops")))


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, LoopFactory]:
    """Tests marked ``both_loops`` run on asyncio's own loop and on uvloop."""
    if item.get_closest_marker("both_loops") is None:
        return {"asyncio": asyncio.new_event_loop}
    import uvloop

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@dataclass
class Served:
    app: web.Application
    runner: web.AppRunner
    port: int
    ssl: ssl.SSLContext | None = None
    clients: list[RawClient] = field(default_factory=list)

    async def connect(self) -> RawClient:
        client = await RawClient.connect(self.port, self.ssl)
        self.clients.append(client)
        return client

    async def get(self, path: str = "/") -> RawClient:
        """A new connection with ``GET path`` sent on it."""
        client = await self.connect()
        await client.get(path)
        return client


class Serve(Protocol):
    async def __call__(
        self,
        app: web.Application,
        *,
        handler_cancellation: bool = False,
        tls: bool = False,
        access_log: Any = None,
        shutdown_timeout: float = 2,
    ) -> Served: ...


@dataclass
class Certs:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="session")
def certs() -> Certs:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Certs(server, client)


@pytest.fixture
async def serve(certs: Certs) -> AsyncIterator[Serve]:
    """Start apps on free ports of 127.0.0.1; stopped in reverse order at teardown."""
    runners: list[web.AppRunner] = []
    served: list[Served] = []

    async def go(
        app: web.Application,
        *,
        handler_cancellation: bool = False,
        tls: bool = False,
        access_log: Any = None,
        shutdown_timeout: float = 2,  # a test that leaves a handler running fails, not hangs
    ) -> Served:
        runner = web.AppRunner(
            app,
            handler_cancellation=handler_cancellation,
            access_log=access_log,
            shutdown_timeout=shutdown_timeout,
        )
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=certs.server if tls else None)
        await site.start()
        port = runner.addresses[0][1]
        served.append(Served(app, runner, port, certs.client if tls else None))
        return served[-1]

    yield go
    for each in served:
        for client in each.clients:
            client.writer.transport.abort()
    for runner in reversed(runners):
        if runner.server is not None:  # not stopped by the test itself
            await runner.cleanup()


@dataclass
class RawClient:
    """One real TCP (or TLS) connection, written and dropped by hand."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: bytearray = field(default_factory=bytearray)

    @classmethod
    async def connect(cls, port: int, tls: ssl.SSLContext | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def get(self, path: str = "/", *, close: bool = False) -> None:
        conn = b"Connection: close\r\n" if close else b""
        await self.send(b"GET %s HTTP/1.1\r\nHost: test\r\n%s\r\n" % (path.encode(), conn))

    async def read_response(self) -> tuple[int, bytes]:
        """Read one complete Content-Length response: (status, body)."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        return status, body

    async def read_until(self, marker: bytes) -> bytes:
        while marker not in self.received:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError(f"closed before {marker!r} arrived")
            self.received += chunk
        return bytes(self.received)

    def drop(self, how: Drop) -> None:
        """Leave: a FIN (orderly close), an RST (SO_LINGER 0, then close), or a half-close
        (shutdown(SHUT_WR): a FIN, while still reading).

        Closing a socket that has unread data sends an RST, not a FIN (TCP's rule): to send a
        FIN while the server is still writing, half-close.
        """
        if how == "half-close":
            self.writer.write_eof()
        elif how == "RST":
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # With TLS, close the socket right away so no close_notify goes out first.
            transport = self.writer.transport
            transport.abort()
        else:
            self.writer.close()

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


class Probe:
    """What a test handler did: started, ended, and how."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.ended = asyncio.Event()
        self.gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.cancelled = False
        self.completed = False
        self.finally_ran = False
        self.request: web.BaseRequest | None = None

    async def run(self, request: web.BaseRequest, work: Awaitable[Any]) -> Any:
        """Run the handler's ``work``, recording how it ends."""
        self.request = request
        self.started.set()
        try:
            result = await work
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        else:
            self.completed = True
            return result
        finally:
            self.finally_ran = True
            self.ended.set()

    async def wait_started(self) -> None:
        await asyncio.wait_for(self.started.wait(), 5)

    async def wait_ended(self) -> None:
        await asyncio.wait_for(self.ended.wait(), 5)


async def until(event: asyncio.Event, done: Callable[[], bool], what: Callable[[], str]) -> None:
    """Wait (5 s at most) until ``done()``, checked each time ``event`` is set; an
    AssertionError saying ``what()`` if it does not come."""

    async def reached() -> None:
        while not done():
            event.clear()
            await event.wait()

    try:
        await asyncio.wait_for(reached(), 5)
    except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
        raise AssertionError(what()) from None


class Lines(logging.Handler):
    """The ``aiodelay`` logger's lines (the ``lines`` fixture), with an event per line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self.changed.set()

    async def wait_for(self, pattern: str, count: int = 1) -> list[str]:
        """The lines that match ``pattern``, once ``count`` of them are logged."""

        def found() -> list[str]:
            return [line for line in self.lines if re.search(pattern, line)]

        await until(
            self.changed,
            lambda: len(found()) >= count,
            lambda: f"no {count} lines matching {pattern!r} in {self.lines}",
        )
        return found()


@pytest.fixture
def lines() -> Iterator[Lines]:
    """The ``aiodelay`` logger's lines, at INFO, while the test runs."""
    handler = Lines()
    logger = logging.getLogger("aiodelay")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


class _AccessLog(AbstractAccessLogger):
    """aiohttp's access log, as "METHOD path status bytes" lines."""

    entries: ClassVar[list[str]] = []
    logged: ClassVar[asyncio.Event | None] = None

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.entries.append(
            f"{request.method} {request.path} {response.status} {response.body_length}"
        )
        if self.logged is not None:
            self.logged.set()


@dataclass
class Logged:
    """A server whose access log is recorded (the ``serve_logged`` fixture)."""

    app: web.Application
    port: int
    entries: list[str] = field(default_factory=list)
    clients: list[RawClient] = field(default_factory=list)

    async def connect(self) -> RawClient:
        client = await RawClient.connect(self.port)
        self.clients.append(client)
        return client

    async def wait_for(self, count: int = 1) -> list[str]:
        """The access log lines, once there are ``count``."""
        event = _AccessLog.logged
        assert event is not None
        await until(
            event, lambda: len(self.entries) >= count, lambda: f"not {count} in {self.entries}"
        )
        return self.entries

    async def entry(self, path: str) -> str:
        """The access log line of ``path``, once aiohttp wrote it."""
        event = _AccessLog.logged
        assert event is not None

        def found() -> list[str]:
            return [e for e in self.entries if e.split()[1] == path]

        await until(event, lambda: bool(found()), lambda: f"no {path} in {self.entries}")
        [line] = found()
        return line


class ServeLogged(Protocol):
    async def __call__(
        self, app: web.Application, *, handler_cancellation: bool = False
    ) -> Logged: ...


@pytest.fixture
async def serve_logged() -> AsyncIterator[ServeLogged]:
    """Like ``serve``, with aiohttp's access log recorded."""
    runners: list[web.AppRunner] = []
    served: list[Logged] = []
    _AccessLog.entries = []
    _AccessLog.logged = asyncio.Event()

    async def go(app: web.Application, *, handler_cancellation: bool = False) -> Logged:
        runner = web.AppRunner(
            app,
            handler_cancellation=handler_cancellation,
            access_log_class=_AccessLog,
            access_log=logging.getLogger("tests.access"),
            shutdown_timeout=1,
        )
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        served.append(Logged(app, runner.addresses[0][1], _AccessLog.entries))
        return served[-1]

    yield go
    for each in served:
        for client in each.clients:
            client.writer.transport.abort()
    for runner in reversed(runners):
        await runner.cleanup()


class Held:
    """A handler (:meth:`handle`) that waits until its client leaves. ``on_cancel(request)``
    runs in its ``except CancelledError`` block; the CancelledError goes on if that returns
    None, its response is returned otherwise."""

    def __init__(
        self,
        on_cancel: Callable[[web.Request], Awaitable[web.StreamResponse | None]] | None = None,
    ) -> None:
        self.on_cancel = on_cancel
        self.requests: list[web.Request] = []
        self.started, self.ended = asyncio.Event(), asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        self.started.set()
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            answer = None if self.on_cancel is None else await self.on_cancel(request)
            if answer is None:
                raise
            return answer
        finally:
            self.ended.set()
        raise AssertionError("unreachable: the future above is never set")  # pragma: no cover

    async def start(self, served: Served, path: str = "/") -> RawClient:
        """A new connection with ``GET path`` on it, once the handler has started."""
        client = await served.get(path)
        await asyncio.wait_for(self.started.wait(), 5)
        return client

    async def wait_ended(self) -> None:
        await asyncio.wait_for(self.ended.wait(), 5)


async def connection_gone(request: web.BaseRequest) -> None:
    """Let the loop turn until aiohttp has run its connection_lost for the request's
    connection (a few turns after the drop: aiodelay defers it past the cancellation)."""
    for _ in range(1000):
        if request.transport is None:
            return
        await asyncio.sleep(0)
    raise AssertionError("the connection was not torn down")


async def recorded(app: web.Application) -> None:
    """Let the loop turn until no request is in flight any more: the middleware records the
    end a few turns after the handler's own ``finally`` ran."""
    for _ in range(1000):
        if not aiodelay.stats(app).in_flight:
            return
        await asyncio.sleep(0)
    raise AssertionError("the request was not recorded")
