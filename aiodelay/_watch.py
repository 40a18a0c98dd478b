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
from typing import TYPE_CHECKING

from aiohttp import web

from ._errors import ConnectionLost

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

    from ._lifetime import Connection  # what the Watch reports to (typing only)

__all__ = (
    "Watch",
    "closing_reason",
    "install_watch",
    "installed_watch",
    "response_completed",
    "same_message",
)


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
        self.listener: Connection | None = None
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
    """Put a :class:`Watch` (with no ``listener`` yet) between ``transport`` and aiohttp."""
    installed = Watch(request.protocol)
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
