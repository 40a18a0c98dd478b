"""pytest fixtures that drop real connections, so you can test what your handlers do when the
client leaves.

Loaded automatically once aiodelay is installed (entry point ``pytest11: aiodelay``); it needs
pytest-asyncio, whose event loop it uses. aiohttp's own ``TestServer`` (behind
``aiohttp_client``) forces ``handler_cancellation=True``, so a disconnect test built on it
passes with or without aiodelay. :func:`aiodelay_server` starts the app the way production
does, on a real socket, and :meth:`LiveServer.drop` sends a request over another real socket
and drops it at a chosen moment::

    async def test_report_is_cancelled(aiodelay_server: AiodelayServer) -> None:
        server = await aiodelay_server(create_app())
        outcome = await server.drop("GET", "/report")
        assert outcome.cancelled

Every wait is on an event (aiodelay's own request lifecycle, or bytes arriving on the socket),
bounded by ``timeout``; a wait that runs out fails the test with a message saying what was
awaited and what had happened so far.

Kept in one module, like pytest-aiohttp's plugin: the fixture, the types to annotate tests
with, and the minimal HTTP/1.1 client that makes a precise drop possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, Protocol

import pytest
import pytest_asyncio
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

import aiodelay
from aiodelay._account import add_observer
from aiodelay._observe import Outcome

# The fixture itself is not exported: importing it into a conftest would register it twice.
__all__ = ("AiodelayServer", "DropHow", "DropKind", "DropOutcome", "LiveServer")

#: How the client drops the connection:
#: ``"FIN"`` closes the socket (what a browser closing a tab does);
#: ``"RST"`` resets it (``SO_LINGER`` 0, then close: a crashed or impatient client);
#: ``"half-close"`` only shuts down the sending side (``shutdown(SHUT_WR)``), the client could
#: still read; aiohttp answers a half-close by closing, so aiodelay reports it as ``"FIN"``.
DropHow = Literal["FIN", "RST", "half-close"]

#: What became of the handler: aiodelay's own verdict (``completed``, ``cancelled``,
#: ``ran_on``, ``failed``, see ``DropOutcome``), or ``running`` if it had not ended yet.
DropKind = Literal["completed", "cancelled", "ran_on", "truncated", "failed", "running"]

_HOWS = ("FIN", "RST", "half-close")
_WAITS = ("ended", "seen")
_HOST = "127.0.0.1"


@dataclass(frozen=True, repr=False)
class DropOutcome:
    """What happened to one request that :meth:`LiveServer.drop` dropped.

    ``kind`` is one of:

    - ``"cancelled"``: aiodelay saw the client leave and cancelled the handler;
    - ``"ran_on"``: aiodelay saw the client leave and the handler ran to its end anyway
      (``@aiodelay.shielded``, the ``"shield"`` policy, or a handler that swallowed the
      cancellation);
    - ``"completed"``: the handler finished before aiodelay saw the client leave (it was
      faster than the drop, or the drop could not be seen);
    - ``"failed"``: the handler raised, or was cancelled by something else than the drop;
    - ``"running"``: the handler had not ended when ``drop()`` returned (only with
      ``wait="seen"``); :meth:`wait_ended` waits for the rest.

    ``lost`` is aiodelay's :class:`~aiodelay.ConnectionLost` (``reason`` ``"FIN"``, ``"RST"``,
    ...) once it saw the client leave, else ``None``. ``status`` and ``received`` are the
    response status and the response body bytes (de-chunked) the client had received before
    it dropped the connection. ``ended_after`` is the time from the drop to the handler's end,
    ``None`` if it is still running or ended before the drop; for a cancelled handler that is
    the time from the drop to the cancellation (also as ``cancelled_after``).
    ``record`` is the core's raw record (``None`` while running): its times are
    ``time.monotonic()`` values, like ``dropped_at``.
    """

    method: str
    path: str
    how: DropHow
    moment: str
    kind: DropKind
    lost: aiodelay.ConnectionLost | None
    status: int | None
    received: bytes
    dropped_at: float
    record: Outcome | None
    _probe: _Probe = field(compare=False)

    @property
    def cancelled(self) -> bool:
        return self.kind == "cancelled"

    @property
    def ran_on(self) -> bool:
        return self.kind == "ran_on"

    @property
    def completed(self) -> bool:
        return self.kind == "completed"

    @property
    def running(self) -> bool:
        return self.kind == "running"

    @property
    def reason(self) -> str | None:
        """``lost.reason`` (``"FIN"``, ``"RST"``, ...), or ``None`` if it was not seen."""
        return None if self.lost is None else self.lost.reason

    @property
    def ended_after(self) -> float | None:
        if self.record is None or self.record.ended_at < self.dropped_at:
            return None
        return self.record.ended_at - self.dropped_at

    @property
    def cancelled_after(self) -> float | None:
        return self.ended_after if self.cancelled else None

    async def wait_ended(self, *, timeout: float = 5.0) -> DropOutcome:
        """Wait for the handler to end; a new outcome. Fails the test after ``timeout``."""
        __tracebackhide__ = True
        return await self._probe.wait_ended(timeout)

    def __repr__(self) -> str:
        parts = [f"{self.method} {self.path} dropped by {self.how} {self.moment}: {self.kind}"]
        if self.lost is not None:
            parts.append(f"aiodelay saw {self.lost.reason}")
        elif self.record is not None and self.record.ended_at < self.dropped_at:
            parts.append("the handler had ended before the drop")
        elif self.kind != "failed":
            parts.append("aiodelay did not see the client leave")
        parts.append(f"status {self.status}" if self.status else "no response head")
        parts.append(f"{len(self.received)} body bytes received")
        if self.ended_after is not None:
            parts.append(f"ended {self.ended_after * 1000:.1f} ms after the drop")
        return f"<DropOutcome {', '.join(parts)}>"

    __str__ = __repr__


class LiveServer:
    """An app served on ``127.0.0.1`` by a real ``web.AppRunner``, observed by aiodelay.

    Made by the :func:`aiodelay_server` fixture; closed when the test ends. Any HTTP client
    can talk to :attr:`url`; :meth:`drop` is the client that leaves.
    """

    def __init__(self, app: web.Application, runner: web.AppRunner, port: int) -> None:
        self.app = app
        self.runner = runner
        self.host = _HOST
        self.port = port
        self.url = URL.build(scheme="http", host=_HOST, port=port)
        self._observer = _Observer()
        self._remove_observer = add_observer(app, self._observer)
        self._probes: list[_Probe] = []

    def make_url(self, path: str) -> URL:
        return self.url.join(URL(path))

    async def drop(
        self,
        method: str,
        path: str,
        *,
        data: bytes = b"",
        headers: Mapping[str, str] | None = None,
        how: DropHow = "FIN",
        after_request_bytes: int | None = None,
        after_response_bytes: int | None = None,
        after_seconds: float | None = None,
        wait: Literal["ended", "seen"] = "ended",
        timeout: float = 5.0,
    ) -> DropOutcome:
        """Send ``method path`` (with body ``data``) on a new connection and drop it.

        When: by default as soon as the handler has started (aiodelay's middleware saw the
        request). At most one of ``after_request_bytes=N`` (only the first N bytes of ``data``
        are sent: the drop happens mid-upload, once the handler started),
        ``after_response_bytes=N`` (once N response body bytes arrived, or the response
        ended), ``after_seconds=S`` (S seconds after the handler started, or when it ended
        if sooner). How: ``how`` (see :data:`DropHow`).

        Then, with ``wait="ended"``, it returns once the handler has ended; with
        ``wait="seen"``, as soon as aiodelay has seen the client leave (or the handler
        ended), so a handler that runs on is reported ``"running"``. A cancellable handler
        is usually still ``"running"`` at that instant too: its cancellation is delivered
        at its next step.

        Each wait is bounded by ``timeout`` seconds and fails the test when it runs out: the
        handler did not start, the response bytes did not come, the handler did not end, or
        aiodelay did not see the drop. Not promised: what the handler did with a request body
        it had not read yet, and which bytes of a response the server wrote after the drop.
        """
        __tracebackhide__ = True  # a failed wait points at the test's line, not at ours
        moment = _moment(data, after_request_bytes, after_response_bytes, after_seconds)
        if how not in _HOWS:
            raise ValueError(f"how must be one of {', '.join(map(repr, _HOWS))}, got {how!r}")
        if wait not in _WAITS:
            raise ValueError(f"wait must be one of {', '.join(map(repr, _WAITS))}, got {wait!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")

        probe = _Probe(method, path, how, moment)
        self._probes.append(probe)
        sent = data if after_request_bytes is None else data[:after_request_bytes]
        await probe.open(self.port, self._observer, _head(method, path, self.port, data, headers))
        await probe.send(sent)
        await probe.wait_started(timeout)
        if after_response_bytes is not None:
            await probe.wait_body(after_response_bytes, timeout)
        elif after_seconds is not None:
            await asyncio.wait({probe.ended}, timeout=after_seconds)
        await probe.drop()
        if wait == "ended":
            return await probe.wait_ended(timeout)
        return await probe.wait_seen(timeout)

    async def close(self) -> None:
        """Close the connections :meth:`drop` left open, then stop the server."""
        while self._probes:
            await self._probes.pop().aclose()
        self._remove_observer()
        await self.runner.cleanup()


class AiodelayServer(Protocol):
    """The type of the :func:`aiodelay_server` fixture, for annotating tests."""

    def __call__(
        self,
        app: web.Application,
        *,
        handler_cancellation: bool = False,
        shutdown_timeout: float = 1.0,
        **runner_kwargs: Any,
    ) -> Awaitable[LiveServer]: ...


@pytest_asyncio.fixture
async def aiodelay_server() -> AsyncIterator[AiodelayServer]:
    """Factory: ``await aiodelay_server(app)`` serves ``app`` and returns a :class:`LiveServer`.

    Served like production: ``web.AppRunner(app, handler_cancellation=False, **runner_kwargs)``
    (pass ``handler_cancellation=True`` to test that setting) on a free port of ``127.0.0.1``.
    ``aiodelay.setup(app)`` is applied if aiodelay is not installed on ``app`` yet; to test
    another policy, call ``aiodelay.setup(app, policy=...)`` yourself first.
    ``shutdown_timeout`` is how long teardown lets running handlers finish before aiohttp
    cancels them (aiohttp's own default of 60 s would stall a test that left one running).
    Servers are closed in reverse order when the test ends.
    """
    servers: list[LiveServer] = []

    async def start(
        app: web.Application,
        *,
        handler_cancellation: bool = False,
        shutdown_timeout: float = 1.0,
        **runner_kwargs: Any,
    ) -> LiveServer:
        try:
            aiodelay.stats(app)
        except RuntimeError:  # aiodelay is not installed on app
            aiodelay.setup(app)
        runner = web.AppRunner(
            app,
            handler_cancellation=handler_cancellation,
            shutdown_timeout=shutdown_timeout,
            **runner_kwargs,
        )
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((_HOST, 0))  # our own socket: the port is known without a race
            await web.SockSite(runner, sock).start()
            server = LiveServer(app, runner, sock.getsockname()[1])
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        servers.append(server)
        return server

    yield start

    while servers:
        await servers.pop().close()


# -- the client that leaves -------------------------------------------------------------------


class _Observer:
    """Matches aiodelay's request events to the probes, by the client's port."""

    def __init__(self) -> None:
        self.by_port: dict[int, _Probe] = {}
        self.by_request: dict[int, _Probe] = {}

    def request_started(self, request: web.BaseRequest) -> None:
        transport = request.transport
        peer = None if transport is None else transport.get_extra_info("peername")
        if not isinstance(peer, tuple):
            return
        probe = self.by_port.pop(peer[1], None)
        if probe is not None:
            self.by_request[id(request)] = probe
            if not probe.started.done():
                probe.started.set_result(request)

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        probe = self.by_request.get(id(request))
        if probe is not None and not probe.seen.done():
            probe.seen.set_result(lost)

    def request_ended(self, request: web.BaseRequest, outcome: Outcome) -> None:
        probe = self.by_request.pop(id(request), None)
        if probe is not None and not probe.ended.done():
            probe.ended.set_result(outcome)


class _Probe:
    """One connection that :meth:`LiveServer.drop` opens, watches and drops."""

    def __init__(self, method: str, path: str, how: DropHow, moment: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.method = method
        self.path = path
        self.how = how
        self.moment = moment
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.response = _Response(method)
        self.started: asyncio.Future[web.BaseRequest] = self.loop.create_future()
        self.ended: asyncio.Future[Outcome] = self.loop.create_future()
        #: aiodelay saw the client leave while the handler ran.
        self.seen: asyncio.Future[aiodelay.ConnectionLost] = self.loop.create_future()
        self.progress: asyncio.Future[None] = self.loop.create_future()
        self.reader: asyncio.Task[None] | None = None
        self.request: web.BaseRequest | None = None
        self.dropped_at: float | None = None
        self.lost: aiodelay.ConnectionLost | None = None

    async def open(self, port: int, observer: _Observer, head: bytes) -> None:
        await self.loop.sock_connect(self.sock, (_HOST, port))
        observer.by_port[self.sock.getsockname()[1]] = self
        await self.loop.sock_sendall(self.sock, head)
        self.reader = self.loop.create_task(self._read())

    async def send(self, data: bytes) -> None:
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _read(self) -> None:
        while not self.response.eof:
            try:
                data = await self.loop.sock_recv(self.sock, 65536)
            except OSError:
                data = b""
            self.response.feed(data)
            if not self.progress.done():
                self.progress.set_result(None)

    async def wait_started(self, timeout: float) -> None:
        __tracebackhide__ = True
        waiting: set[asyncio.Future[Any]] = {self.started}
        if self.reader is not None:
            waiting.add(self.reader)  # its end: the server closed the connection
        await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self.started.done():
            self.request = self.started.result()
            return
        closed = self.reader is not None and self.reader.done()
        why = "the server closed the connection" if closed else f"{timeout}s passed"
        await self._fail(f"the handler did not start: {why}")

    async def wait_body(self, size: int, timeout: float) -> None:
        __tracebackhide__ = True
        loop_deadline = self.loop.time() + timeout
        response = self.response
        # Not the handler's end: a handler that returned has its response written after.
        while len(response.body) < size and not (response.done or response.eof):
            self.progress = self.loop.create_future()
            remaining = loop_deadline - self.loop.time()
            done, _ = await asyncio.wait({self.progress}, timeout=max(remaining, 0))
            if not done:
                await self._fail(f"{size} response body bytes did not arrive within {timeout}s")

    async def drop(self) -> None:
        await self._stop_reading()
        self._drain()
        if self.how == "half-close":
            with contextlib.suppress(OSError):  # the server may have closed already
                self.sock.shutdown(socket.SHUT_WR)
        else:
            if self.how == "RST":
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await self.aclose()
        self.dropped_at = time.monotonic()

    def _drain(self) -> None:
        # Read what already arrived: it was received before the drop, and a socket closed
        # with unread data sends RST instead of FIN.
        while not self.response.eof:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            self.response.feed(data)

    async def wait_ended(self, timeout: float) -> DropOutcome:
        __tracebackhide__ = True
        await asyncio.wait({self.ended}, timeout=timeout)
        if not self.ended.done():
            seen = self.request is not None and aiodelay.is_disconnected(self.request)
            await self._fail(
                f"the handler was still running {timeout}s after the drop "
                f"(aiodelay {'saw' if seen else 'did not see'} the client leave). "
                "To assert that it runs on, pass wait='seen' and check outcome.running"
            )
        await self.aclose()
        return self.outcome()

    async def wait_seen(self, timeout: float) -> DropOutcome:
        __tracebackhide__ = True
        waiting: set[asyncio.Future[Any]] = {self.ended, self.seen}
        await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self.seen.done():
            self.lost = self.seen.result()
        elif not self.ended.done():
            await self._fail(f"aiodelay did not see the client leave within {timeout}s")
        return self.outcome()

    def outcome(self) -> DropOutcome:
        assert self.dropped_at is not None
        record = self.ended.result() if self.ended.done() else None
        return DropOutcome(
            method=self.method,
            path=self.path,
            how=self.how,
            moment=self.moment,
            kind="running" if record is None else record.kind,
            lost=self.lost if record is None else record.lost,
            status=self.response.status,
            received=bytes(self.response.body),
            dropped_at=self.dropped_at,
            record=record,
            _probe=self,
        )

    async def _stop_reading(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.wait({reader})  # its sock_recv is unregistered before the close

    async def aclose(self) -> None:
        await self._stop_reading()
        self.sock.close()  # idempotent

    async def _fail(self, message: str) -> NoReturn:
        __tracebackhide__ = True
        await self.aclose()
        response = self.response
        got = f"status {response.status}" if response.status else "no response head"
        error = f" ({response.error})" if response.error else ""
        pytest.fail(
            f"{self.method} {self.path} (drop by {self.how} {self.moment}): {message}; "
            f"the client had received {got} and body {bytes(response.body[:200])!r}{error}"
        )


def _moment(
    data: bytes,
    after_request_bytes: int | None,
    after_response_bytes: int | None,
    after_seconds: float | None,
) -> str:
    """Validate the drop's moment and describe it."""
    given = [
        name
        for name, value in (
            ("after_request_bytes", after_request_bytes),
            ("after_response_bytes", after_response_bytes),
            ("after_seconds", after_seconds),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise TypeError(f"pass at most one of {', '.join(given)}")
    if after_request_bytes is not None:
        if not 0 <= after_request_bytes <= len(data):
            raise ValueError(
                f"after_request_bytes must be between 0 and len(data) = {len(data)}, "
                f"got {after_request_bytes!r}"
            )
        return f"after {after_request_bytes} of {len(data)} request body bytes"
    if after_response_bytes is not None:
        if after_response_bytes < 0:
            raise ValueError(f"after_response_bytes must be >= 0, got {after_response_bytes!r}")
        return f"after {after_response_bytes} response body bytes"
    if after_seconds is not None:
        if after_seconds < 0:
            raise ValueError(f"after_seconds must be >= 0, got {after_seconds!r}")
        return f"{after_seconds}s after the handler started"
    return "when the handler started"


def _head(
    method: str, path: str, port: int, data: bytes, headers: Mapping[str, str] | None
) -> bytes:
    fields: CIMultiDict[str] = CIMultiDict(Host=f"{_HOST}:{port}")
    if data or method.upper() in ("POST", "PUT", "PATCH"):
        fields["Content-Length"] = str(len(data))
    fields.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Response:
    """Just enough HTTP/1.1 response parsing to count body bytes as they arrive:
    ``Content-Length``, ``chunked`` (extensions and trailers ignored), or until close."""

    def __init__(self, method: str) -> None:
        self._no_body = method.upper() == "HEAD"
        self._buf = bytearray()
        self.status: int | None = None
        self.body = bytearray()
        self.done = False  # the whole response arrived
        self.eof = False  # the server closed its side (or reset)
        self.error: str | None = None
        self._left: int | None = None  # Content-Length still to come; None: until close
        self._chunked = False
        self._chunk: int | None = None  # chunk bytes still to come, -1: its CRLF, None: size

    def feed(self, data: bytes) -> None:
        if not data:
            self.eof = True
            if self.status is not None and self._left is None and not self._chunked:
                self.done = True
            return
        self._buf += data
        try:
            while not self.done and self._step():
                pass
        except ValueError as exc:  # not HTTP/1.1 as we know it: stop reading, say why
            self.error = f"malformed response: {exc}"
            self.eof = True

    def _step(self) -> bool:
        if self.status is None:
            return self._parse_head()
        if not self._chunked:
            take = len(self._buf) if self._left is None else min(self._left, len(self._buf))
            self.body += self._buf[:take]
            del self._buf[:take]
            if self._left is not None:
                self._left -= take
                self.done = self._left == 0
            return False
        if self._chunk is None:
            end = self._buf.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(self._buf[:end]).split(b";")[0], 16)
            del self._buf[: end + 2]
            self._chunk = size
            self.done = size == 0
            return True
        if self._chunk == -1:
            if len(self._buf) < 2:
                return False
            del self._buf[:2]
            self._chunk = None
            return True
        take = min(self._chunk, len(self._buf))
        self.body += self._buf[:take]
        del self._buf[:take]
        self._chunk -= take
        if self._chunk:
            return False
        self._chunk = -1
        return True

    def _parse_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        status = int(lines[0].split(" ", 2)[1])
        if 100 <= status < 200:
            return True  # an interim response (100 Continue): the real one follows
        self.status = status
        fields = CIMultiDict(
            (name, value.strip()) for name, _, value in (line.partition(":") for line in lines[1:])
        )
        if self._no_body or status in (204, 304):
            self.done = True
        elif "chunked" in fields.get("Transfer-Encoding", "").lower():
            self._chunked = True
        elif "Content-Length" in fields:
            self._left = int(fields["Content-Length"].strip())
            self.done = self._left == 0
        return True
