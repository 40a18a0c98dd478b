"""Shared test helpers: the ``serve`` fixture (the shipped :mod:`aiodelay.testing` harness,
serving apps exactly as the test made them), what a test handler did, and waits on events.

Servers are started the way production starts them, ``web.AppRunner(app,
handler_cancellation=False)``; aiohttp's ``TestServer`` forces ``handler_cancellation=True``
and would make every disconnect test pass with or without aiodelay. Raw connections are
:class:`aiodelay.testing.RawClient`.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import pytest
import trustme
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import RequestHandler

import aiodelay
from aiodelay.testing import DropHow, LiveServer, RawClient
from aiodelay.testing._server import live_servers

#: An upload this large, unread, makes aiohttp pause reading: 1 KiB more than what it buffers
#: before it pauses (twice its ``read_bufsize``: 128 KiB, or 512 KiB on aiohttp 3.14; the
#: test's server runs on this same aiohttp). Not more: what aiohttp does not take must fit in
#: the server's kernel, whose receive buffer grows only while it is read; what does not fit
#: stays in the client's send queue with the FIN behind it, and that FIN never reaches the
#: server. 1 KiB fits the smallest receive buffer Linux allows.
PAUSING_UPLOAD = (
    2 * inspect.signature(RequestHandler.__init__).parameters["read_bufsize"].default + 1024
)

#: How a raw client leaves (``RawClient.drop``).
Drop = DropHow
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


class Served:
    """A server of the ``serve`` fixture: the shipped :class:`LiveServer` (``server``), and
    the client context that trusts its certificate if it speaks TLS."""

    def __init__(self, server: LiveServer, tls: ssl.SSLContext | None) -> None:
        self.server = server
        self.app = server.app
        self.runner = server.runner
        self.port = server.port
        self.ssl = tls
        self.clients = server.clients

    async def connect(self) -> RawClient:
        """A new connection, aborted when the test ends."""
        return await self.server.connect(tls=self.ssl)

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
    """Start apps on free ports of 127.0.0.1 with the shipped harness, as they are: aiodelay
    is not installed on them (a test installs it, or serves plain aiohttp as a control), nor
    an observer added unless a test calls ``served.server.drop()``. Stopped in reverse order
    at teardown; the connections of ``connect()`` are aborted first."""
    async with live_servers() as start:

        async def go(
            app: web.Application,
            *,
            handler_cancellation: bool = False,
            tls: bool = False,
            access_log: Any = None,
            shutdown_timeout: float = 2,  # a test that leaves a handler running fails, not hangs
        ) -> Served:
            server = await start(
                app,
                setup_aiodelay=False,
                handler_cancellation=handler_cancellation,
                ssl_context=certs.server if tls else None,
                access_log=access_log,
                shutdown_timeout=shutdown_timeout,
            )
            return Served(server, certs.client if tls else None)

        yield go


class HandlerRun:
    """One run of a test handler, recorded: started, ended, and how (cancelled, completed,
    its ``finally`` ran). The handler awaits its work through :meth:`run`."""

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


class RecordingObserver:
    """An observer (aiodelay.add_observer) that keeps what it is told: the events in order,
    the outcomes, and an event set at each end."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.outcomes: list[aiodelay.Outcome] = []
        self.ended = asyncio.Event()

    def request_started(self, request: web.BaseRequest) -> None:
        self.events.append(f"started {request.path}")

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        self.events.append(f"lost {lost.reason}")

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        self.events.append(f"ended {outcome.kind}")
        self.outcomes.append(outcome)
        self.ended.set()

    async def wait_ends(self, count: int) -> None:
        """Until ``count`` requests ended (the client may read a response before that)."""
        await until(
            self.ended,
            lambda: len(self.outcomes) >= count,
            lambda: f"{len(self.outcomes)} of {count} requests ended: {self.events}",
        )


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


class Logged:
    """A server whose access log is recorded (the ``serve_logged`` fixture)."""

    def __init__(self, server: LiveServer, entries: list[str]) -> None:
        self.server = server
        self.app = server.app
        self.port = server.port
        self.entries = entries
        self.clients = server.clients

    async def connect(self) -> RawClient:
        return await self.server.connect()

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
    _AccessLog.entries = []
    _AccessLog.logged = asyncio.Event()
    async with live_servers() as start:

        async def go(app: web.Application, *, handler_cancellation: bool = False) -> Logged:
            server = await start(
                app,
                setup_aiodelay=False,
                handler_cancellation=handler_cancellation,
                access_log_class=_AccessLog,
                access_log=logging.getLogger("tests.access"),
                shutdown_timeout=1,
            )
            return Logged(server, _AccessLog.entries)

        yield go


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
