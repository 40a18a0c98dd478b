"""How a disconnect is seen.

This is the only module that knows how aiohttp's server is built: everything that touches its
protocol object or private attributes lives here, so a new aiohttp release is a one-file change.

aiohttp offers no disconnect hook (``Request.wait_for_disconnection()`` was removed in 3.10.2 as
racy), but asyncio's transport API is public: ``transport.set_protocol()`` lets us stand between
the transport and aiohttp's ``RequestHandler``. The :class:`Watch` we put there passes every call
straight through and looks only at the two that mean the peer is gone: ``eof_received`` (FIN)
and ``connection_lost`` (RST, or the end after a FIN). It is installed on the first request of a
connection and reused for the following keep-alive requests.

What cannot be seen: a peer that vanishes without sending FIN or RST (a pulled cable, a
suspended laptop) looks alive until TCP gives up; and while aiohttp has paused reading (a request
body larger than its buffer that the handler does not read, or a full pipelining queue), the
kernel holds the FIN or RST unread, so it is seen only when reading resumes or a write fails.
"""

from __future__ import annotations

import asyncio
import gc
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from ._errors import ConnectionLost

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

__all__ = (
    "Listener",
    "Watch",
    "bytes_written",
    "closing_reason",
    "install_watch",
    "installed_watch",
    "log_length",
    "response_completed",
    "same_message",
    "sent_as",
)


class Listener(Protocol):
    """What a :class:`Watch` reports to (aiodelay's per-connection state)."""

    def busy(self) -> bool:
        """A request's handler is running on the connection now."""

    def disconnected(self, lost: ConnectionLost) -> None:
        """The peer left (called once per connection)."""

    def closed(self) -> None:
        """The connection is closed (called once, last)."""


class Watch(asyncio.Protocol):
    """A transparent protocol between a transport and aiohttp's ``RequestHandler``.

    ``data_received`` is the handler's own bound method, stored on the instance, so the
    transport calls it with no extra frame in between.
    """

    __slots__ = ("_proto", "data_received", "listener", "lost")

    def __init__(self, proto: RequestHandler) -> None:
        self._proto = proto
        self.data_received = proto.data_received  # type: ignore[method-assign]
        #: Told about the peer leaving; set by the middleware right after installing.
        self.listener: Listener | None = None
        #: Set once the peer is known to be gone.
        self.lost: ConnectionLost | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._proto.connection_made(transport)  # pragma: no cover - installed after this

    def pause_writing(self) -> None:
        self._proto.pause_writing()

    def resume_writing(self) -> None:
        self._proto.resume_writing()

    def eof_received(self) -> bool | None:
        keep_open: bool | None = self._proto.eof_received()  # type: ignore[func-returns-value]
        if not keep_open:
            # aiohttp answers a FIN by closing: the client can no longer get a response.
            self._lose(ConnectionLost("FIN"))
        return keep_open

    def connection_lost(self, exc: BaseException | None) -> None:
        proto = self._proto
        if exc is None:
            # An orderly close. Without a FIN seen first it is either aiohttp closing the
            # connection itself, or a TLS peer's close_notify (Python 3.10's SSL transport
            # reports that without eof_received).
            self._lose(ConnectionLost("closed" if proto._force_close or proto._close else "FIN"))
        else:
            lost = ConnectionLost("RST")
            lost.__cause__ = exc
            self._lose(lost)
        manager = proto._manager
        listener = self.listener
        if (
            listener is not None
            and listener.busy()
            and manager
            and manager.handler_cancellation
            and not self.is_websocket()  # there aiodelay leaves the ending to aiohttp
        ):
            # aiodelay decides what a disconnect does to the request it watches; without
            # this, aiohttp (handler_cancellation=True) would cancel a shielded handler too.
            manager.handler_cancellation = False
            try:
                proto.connection_lost(exc)
            finally:
                manager.handler_cancellation = True
        else:
            proto.connection_lost(exc)
        if listener is not None:
            self.listener = None  # the Connection refers to this Watch: no cycle left behind
            listener.closed()

    def is_websocket(self) -> bool:
        """True once a WebSocket handshake was accepted on this connection: aiohttp then tells
        the handler itself that the peer left (its receive loop ends)."""
        return self._proto._payload_parser is not None

    def _lose(self, lost: ConnectionLost) -> None:
        if self.lost is not None:
            return
        self.lost = lost
        if self.listener is not None:
            self.listener.disconnected(lost)


def install_watch(request: web.BaseRequest, transport: asyncio.BaseTransport) -> Watch:
    """Put a :class:`Watch` (with no ``listener`` yet) between ``transport`` and aiohttp.

    Also on a transport that is already closing (its peer left before the request reached
    aiodelay): asyncio calls ``connection_lost`` on the protocol current at that time, so the
    Watch still stands between it and aiohttp, and a shielded handler is not cancelled by
    aiohttp's ``handler_cancellation``. Its ``lost`` is then already set.
    """
    installed = Watch(request.protocol)
    if transport.is_closing():
        installed.lost = ConnectionLost(
            "closed", "the connection was closed before the handler started"
        )
    transport.set_protocol(installed)
    return installed


def installed_watch(request: web.BaseRequest) -> Watch | None:
    """The request's connection's :class:`Watch`, if it has one and is still open."""
    transport = request.transport
    if transport is None:
        return None
    current = transport.get_protocol()
    return current if type(current) is Watch else None


def same_message(a: web.BaseRequest, b: web.BaseRequest) -> bool:
    """Whether two request objects are the same HTTP request (``request.clone()`` makes a
    new object; aiohttp gives each message its own writer, which a clone shares)."""
    return a is b or a._payload_writer is b._payload_writer


def closing_reason(request: web.BaseRequest) -> ConnectionLost | None:
    """A ConnectionLost if the request's transport is gone or closing, else None.

    Covers the moment between a transport failing (RST) and asyncio calling
    ``connection_lost`` one loop iteration later, when a write already fails.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        return ConnectionLost("RST")
    return None


def response_completed(response: web.StreamResponse) -> bool:
    """True once ``write_eof()`` has finished for the response (aiohttp has no public flag)."""
    return bool(response._eof_sent)


def bytes_written(request: web.BaseRequest) -> int:
    """The bytes of ``request``'s response handed to the transport so far, status line and
    headers included (what aiohttp's access log counts). A file that aiohttp sends with
    ``sendfile()`` is not counted: the kernel sends it, and aiohttp does not add it up."""
    return int(request._payload_writer.output_size)


def _status_line_sent(request: web.BaseRequest) -> bool:
    writer = request._payload_writer
    sent: bool | None = getattr(writer, "_headers_written", None)
    if sent is None:  # aiohttp < 3.11 writes the status line and headers at prepare()
        return bool(writer.output_size)
    return sent


def _prepared(
    request: web.BaseRequest, candidates: tuple[object, ...], tb: TracebackType | None
) -> web.StreamResponse | None:
    """The response that ``request``'s handler prepared: among ``candidates``, else among the
    local variables of the frames an exception went through (where a handler cancelled in
    the middle of a stream held it), else among the writer's referrers (slow, rare)."""
    writer = request._payload_writer

    def mine(value: object) -> bool:
        return isinstance(value, web.StreamResponse) and value._payload_writer is writer

    for value in candidates:
        if mine(value):
            return value  # type: ignore[return-value]
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if mine(value):
                return value  # type: ignore[no-any-return]
        tb = tb.tb_next
    for value in gc.get_referrers(writer):
        if mine(value):
            return value  # type: ignore[no-any-return]
        if isinstance(value, dict):  # an instance's __dict__ that holds the writer
            for owner in gc.get_referrers(value):
                if mine(owner):
                    return owner  # type: ignore[no-any-return]
    return None


def sent_as(
    request: web.BaseRequest,
    *candidates: object,
    exc: BaseException | None = None,
) -> web.StreamResponse:
    """A response for aiohttp to log, not to send, for a request whose client left: the status
    line that went on the wire and the bytes handed to the transport, or 499 (nginx's "client
    closed request") with 0 bytes if no status line went out.

    ``candidates`` and ``exc``'s traceback are where the response the handler prepared may be
    found (see :func:`_prepared`).
    """
    status, reason, sent = 499, "Client Closed Request", 0
    if _status_line_sent(request):
        prepared = _prepared(request, candidates, None if exc is None else exc.__traceback__)
        if prepared is not None:
            status, reason, sent = prepared.status, prepared.reason, bytes_written(request)
    logged = web.StreamResponse(status=status, reason=reason)
    logged.force_close()
    # aiohttp's finish_response() calls prepare() and write_eof(), which do nothing once
    # _eof_sent is set, then logs status and body_length.
    logged._eof_sent = True
    logged._body_length = sent
    return logged


def log_length(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Make aiohttp's access log show what was written of ``response``, which it is writing
    now for ``request`` (it logs 0 for a response whose write failed)."""
    response._body_length = bytes_written(request)
