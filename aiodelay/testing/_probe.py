"""The client that leaves: one real connection per :meth:`LiveServer.drop`, matched to the
request aiodelay's middleware sees, and dropped at the chosen moment.

It works on the socket itself, not on asyncio's streams as :class:`RawClient` does: to leave
by FIN while the server is still writing, it reads what has arrived and closes in one step
of the loop (a socket closed with unread data sends an RST, and the server could write more
between two steps), which a transport cannot do (it closes its socket a turn later).

Every wait is on an event (aiodelay's own request lifecycle, or bytes arriving on the
socket), bounded by a timeout; a wait that runs out fails the test with a message saying what
was awaited and what had happened so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Mapping
from typing import Any, NoReturn

import pytest
from aiohttp import web
from multidict import CIMultiDict

import aiodelay

from ._client import HOST, reset_on_close
from ._outcome import DropHow, DropOutcome
from ._response import ResponseReader


class Observer:
    """Matches aiodelay's request events to the probes, by the client's port."""

    def __init__(self) -> None:
        self.by_port: dict[int, Probe] = {}
        self.by_request: dict[int, Probe] = {}

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

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        probe = self.by_request.pop(id(request), None)
        if probe is not None and not probe.ended.done():
            probe.ended.set_result(outcome)


class Probe:
    """One connection that :meth:`LiveServer.drop` opens, watches and drops."""

    def __init__(self, method: str, path: str, how: DropHow, moment: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.method = method
        self.path = path
        self.how = how
        self.moment = moment
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.response = ResponseReader(method)
        self.started: asyncio.Future[web.BaseRequest] = self.loop.create_future()
        self.ended: asyncio.Future[aiodelay.Outcome] = self.loop.create_future()
        #: aiodelay saw the client leave while the handler ran.
        self.seen: asyncio.Future[aiodelay.ConnectionLost] = self.loop.create_future()
        self.progress: asyncio.Future[None] = self.loop.create_future()
        self.reader: asyncio.Task[None] | None = None
        self.request: web.BaseRequest | None = None
        self.dropped_at: float | None = None
        self.lost: aiodelay.ConnectionLost | None = None

    async def open(self, port: int, observer: Observer, head: bytes) -> None:
        await self.loop.sock_connect(self.sock, (HOST, port))
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

    async def wait_answered(self, seconds: float) -> None:
        """Until ``seconds`` have passed; sooner once the handler has ended and its response
        has arrived in full (or the server closed the connection): the handler's end comes
        before its response is written, and a drop then would lose the answer."""
        loop_deadline = self.loop.time() + seconds
        await asyncio.wait({self.ended}, timeout=seconds)
        response = self.response
        while self.ended.done() and not (response.done or response.eof):
            remaining = loop_deadline - self.loop.time()
            if remaining <= 0:
                return
            self.progress = self.loop.create_future()
            await asyncio.wait({self.progress}, timeout=remaining)

    async def drop(self) -> None:
        await self._stop_reading()
        self._drain()
        if self.how == "half-close":
            with contextlib.suppress(OSError):  # the server may have closed already
                self.sock.shutdown(socket.SHUT_WR)
        else:
            if self.how == "RST":
                reset_on_close(self.sock)
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


def describe_moment(
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


def request_head(
    method: str, path: str, port: int, data: bytes, headers: Mapping[str, str] | None
) -> bytes:
    fields: CIMultiDict[str] = CIMultiDict(Host=f"{HOST}:{port}")
    if data or method.upper() in ("POST", "PUT", "PATCH"):
        fields["Content-Length"] = str(len(data))
    fields.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
