"""Everything aiodelay knows about how aiohttp's server is built, and how it sees a peer leave.

This is the only module that touches aiohttp's protocol object or private attributes, so a new
aiohttp release is a one-file change. The rest of the core asks it through the functions below.

aiohttp offers no disconnect hook (``Request.wait_for_disconnection()`` was removed in 3.10.2 as
racy), but asyncio's transport API is public: ``transport.set_protocol()`` lets us stand between
the transport and aiohttp's ``RequestHandler``. The :class:`Watch` we put there passes every call
straight through and looks only at the two that mean the peer is gone: ``eof_received`` (FIN)
and ``connection_lost`` (RST, or the end after a FIN). It is installed on the first request of a
connection and reused for the following keep-alive requests; it tells its :class:`Listener`
about the request in flight (``Watch.state``), whatever that is to the listener.

While aiohttp has paused reading (a request body larger than its buffer that the handler does
not read yet, or a full pipelining queue), ``eof_received`` cannot come: the kernel holds the FIN
behind the unread bytes. The kernel knows, though: on Linux, ``EPOLLRDHUP`` reports a peer's FIN
(and ``EPOLLERR``/``EPOLLHUP`` a reset) whatever is still unread. ``Hangups`` (``hangups.py``) is
one small ``select.epoll`` per event loop, itself one readable fd of the loop, that holds only
those events and only for the connections whose request may pause reading (:meth:`Watch.hold`,
released when the request ends). Requests without a body, on a connection that is reading,
never touch it.

What cannot be seen: a peer that vanishes without sending FIN or RST (a pulled cable, a
suspended laptop) looks alive until TCP gives up; a FIN that cannot reach the server's kernel
because the receive window is full (the client's kernel still holds the data in front of it;
only an RST can get through); and, on platforms without epoll, anything behind paused reading,
which is seen only when reading resumes or a write fails.

(The module is longer than the others: it is, on purpose, all of aiodelay's knowledge of
aiohttp's internals, so that a new aiohttp release is a change to this one file.)

Every internal used here is listed once, in :func:`missing_internals`, which looks for each on
the aiohttp at hand when this module is imported (``MISSING``). On the aiohttp releases CI
tests, nothing is missing; on one that lacks something, ``setup()`` warns once and aiodelay
runs degraded (``degraded.py``) rather than fail on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import socket
from collections.abc import Callable, Sized
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import (
    abc,
    hdrs,
    http_parser,
    http_writer,
    streams,
    web,
    web_protocol,
    web_server,
    web_urldispatcher,
)
from aiohttp.abc import AbstractAccessLogger

from .errors import ConnectionLost, Reason
from .hangups import CAN_HOLD, hangups_of
from .teardown import after_cancelled

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

__all__ = (
    "AIOHTTP_VERSION",
    "EMPTY_PAYLOAD",
    "MISSING",
    "SOCKET_TRANSPORT",
    "STATE",
    "Listener",
    "Watch",
    "abort_connection",
    "access_logged",
    "as_sent",
    "busy",
    "bytes_written",
    "close_after",
    "close_unread",
    "close_waiting",
    "fail_as_aiohttp",
    "gone_before_watched",
    "how_peer_left",
    "install_watch",
    "log_bytes_sent",
    "missing_internals",
    "note_departures",
    "peer_gone",
    "response_written",
    "route_of",
    "says_close",
    "server_of",
    "state_of",
    "status_line_sent",
    "take_over_pre_shutdown",
    "turn_on_handler_cancellation",
    "worth_reading",
    "writer_of",
)

AIOHTTP_VERSION: str = getattr(aiohttp, "__version__", "unknown")


def _has(owner: object, name: str) -> bool:
    """``owner`` (a class) has ``name``: a method, a slot, a class default, or an attribute
    that its ``__init__`` (or a base class's) sets."""
    if hasattr(owner, name):
        return True
    for cls in getattr(owner, "__mro__", ()):
        code = getattr(vars(cls).get("__init__"), "__code__", None)
        if code is not None and name in code.co_names:
            return True
    return False


def missing_internals() -> tuple[str, ...]:
    """What this module relies on and the aiohttp at hand lacks, as ``"Class.attribute"``
    names; empty on every aiohttp release CI tests (3.10 to 3.14).

    The one list of aiohttp's internals that aiodelay touches: what is looked for is each
    class's shape (its methods, slots, class defaults and the attributes its ``__init__``
    sets), without making a server. Not promised: an attribute that is there but means
    something else in a future release is not found out here (CI's test of each release and
    of the newest pre-release is what covers that).
    """
    # Not listed: what is read with a default, where a release lacks it
    # (RequestHandler.access_logger and ._logging_enabled, StreamWriter._headers_written).
    wanted: list[tuple[str, object, tuple[str, ...]]] = [
        # The Watch: a connection's protocol, and the server that made it.
        (
            "RequestHandler",
            getattr(web_protocol, "RequestHandler", None),
            (
                "data_received",
                "eof_received",
                "connection_lost",
                "pause_writing",
                "resume_writing",
                "force_close",
                "log_exception",
                "transport",
                "_messages",
                "_manager",
                "_close",
                "_force_close",
                "_payload_parser",
                # A graceful shutdown that loses no request (take_over_pre_shutdown).
                "close",
                "_current_request",
                "_waiter",
                "_request_count",
                "_task_handler",
            ),
        ),
        (
            "Server",
            getattr(web_server, "Server", None),
            (
                "handler_cancellation",
                "connection_lost",
                "pre_shutdown",
                "shutdown",
                "connections",
            ),
        ),
        # A request: where its state is kept, its body, its route, its message.
        (
            "BaseRequest",
            web.BaseRequest,
            ("_payload_writer", "_protocol", "_payload", "_message", "protocol", "transport"),
        ),
        ("Request", web.Request, ("_match_info",)),
        (
            "UrlMappingMatchInfo",
            getattr(web_urldispatcher, "UrlMappingMatchInfo", None),
            ("_route",),
        ),
        ("RawRequestMessage", getattr(http_parser, "RawRequestMessage", None), ("upgrade",)),
        # What went on the wire, and what aiohttp's access log is told.
        ("StreamWriter", getattr(abc, "AbstractStreamWriter", None), ("output_size",)),
        ("StreamWriter", getattr(http_writer, "StreamWriter", None), ("_eof", "write_headers")),
        (
            "StreamResponse",
            web.StreamResponse,
            ("_body_length", "_eof_sent", "_req", "_payload_writer", "force_close"),
        ),
        ("streams", streams, ("EMPTY_PAYLOAD",)),
    ]
    missing: list[str] = []
    for where, owner, names in wanted:
        if owner is None:
            missing.append(where)
            continue
        missing.extend(f"{where}.{name}" for name in names if not _has(owner, name))
    # A request's state is kept on its message's writer (STATE, below): the writer must take an
    # attribute of aiodelay's (a class with __slots__ and no __dict__ would not).
    writer = getattr(http_writer, "StreamWriter", None)
    if writer is not None and not getattr(writer, "__dictoffset__", 0):
        missing.append("StreamWriter.__dict__")
    return tuple(missing)


#: What the aiohttp at hand lacks of :func:`missing_internals`; empty when aiodelay knows it.
MISSING: tuple[str, ...] = missing_internals()


def turn_on_handler_cancellation(request: web.BaseRequest) -> bool | None:
    """Turn on aiohttp's own ``handler_cancellation`` on the server that handles ``request``
    (what degraded mode falls back on): True if it is on now, None if this aiohttp does not
    let it be reached (pass ``handler_cancellation=True`` to ``web.AppRunner`` or
    ``web.run_app`` instead)."""
    manager = getattr(request.protocol, "_manager", None)
    if manager is None or not hasattr(manager, "handler_cancellation"):
        return None
    manager.handler_cancellation = True
    return True


class Listener(Protocol):
    """What a :class:`Watch` tells about the request in flight on its connection (its
    ``state``, which the listener gave it); called only while there is one."""

    def running(self, state: Any) -> bool:
        """The request's handler is running now."""

    def client_left(self, state: Any, lost: ConnectionLost, websocket: bool) -> bool:
        """The peer left (called once per connection; ``websocket``: a WebSocket handshake was
        accepted on it). True if the handler is cancelled now (it sees the CancelledError at
        the next turn of the loop)."""

    def closed(self, state: Any) -> None:
        """The connection is closed (called once, last)."""


class Watch(asyncio.Protocol):
    """A transparent protocol between a transport and aiohttp's ``RequestHandler``.

    ``data_received`` is the handler's own bound method, stored on the instance, so the
    transport calls it with no extra frame in between.
    """

    __slots__ = (
        "_held",
        "_hung_up",
        "_proto",
        "data_received",
        "listener",
        "lost",
        "queued",
        "remote",
        "state",
        "transport",
    )

    def __init__(
        self, proto: RequestHandler, transport: asyncio.Transport, listener: Listener
    ) -> None:
        self._proto = proto
        self.transport = transport
        #: The fd this connection is held under in its loop's Hangups, or -1.
        self._held = -1
        #: The kernel reported the peer gone while aiohttp was not reading.
        self._hung_up = False
        self.data_received = proto.data_received  # type: ignore[method-assign]
        #: aiohttp's queue of pipelined requests read but not yet handled (the same deque for
        #: the connection's life): while it is not empty, aiohttp may stop reading when it
        #: fills up.
        self.queued: Sized = proto._messages
        self.listener = listener
        #: The request in flight, or the last one (its response may still be being written),
        #: as the listener knows it; None before the first. Let go when the connection closes.
        self.state: Any = None
        #: Set once the peer is known to be gone.
        self.lost: ConnectionLost | None = None
        #: ``request.remote`` of the connection's requests as aiohttp makes them (its peer's
        #: address), once per connection: what ``Outcome.client`` says where nothing else
        #: could have changed it.
        self.remote = _remote(transport.get_extra_info("peername"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._proto.connection_made(transport)  # pragma: no cover - installed after this

    def pause_writing(self) -> None:
        self._proto.pause_writing()

    def resume_writing(self) -> None:
        self._proto.resume_writing()

    def eof_received(self) -> bool | None:
        keep_open: bool | None = self._proto.eof_received()  # type: ignore[func-returns-value]
        if not keep_open and self._lose(ConnectionLost("FIN")):
            # aiohttp answers a FIN by closing, and the handler is being cancelled. The close
            # waits two turns of the loop, by when the handler has seen its cancellation (a
            # storm of drops cancels every handler before closing any socket). Reading stops
            # now. Not over TLS, whose transport cannot stay open after EOF.
            transport = self._proto.transport
            if transport is not None and transport.get_extra_info("sslcontext") is None:
                after_cancelled(_close_read, transport)
                return True
        return keep_open

    def connection_lost(self, exc: BaseException | None) -> None:
        self._hung_up = False  # closed already
        if self._held >= 0:
            self.release()  # while the socket is still open: its fd may be reused once closed
        proto = self._proto
        stopping = False
        if self.lost is not None:
            pass  # seen already (a FIN, mostly): nothing new to report
        elif exc is None:
            # An orderly close. Without a FIN seen first, it is aiohttp closing the connection
            # (after a write failed, or at shutdown: the kernel tells whether the peer had
            # closed or reset it first), or a TLS peer's close_notify (Python 3.10's SSL
            # transport reports that without eof_received).
            reason = _how_peer_left(proto.transport)
            if reason is None:
                reason = "closed" if proto._force_close or proto._close else "FIN"
            self._lose(ConnectionLost(reason))
        else:
            lost = ConnectionLost("RST")
            lost.__cause__ = lost._error = exc
            stopping = self._lose(lost)
        manager = proto._manager
        state = self.state
        # aiodelay decides what a disconnect does to the request it watches; without this,
        # aiohttp (handler_cancellation=True) would cancel a shielded handler too.
        decided = bool(
            manager
            and manager.handler_cancellation
            and state is not None
            and self.listener.running(state)
            and not self.is_websocket()  # there aiodelay leaves the ending to aiohttp
        )
        # aiohttp's own teardown of the connection: with its handler_cancellation off for the
        # call if aiodelay decided (_aiohttp_lost), else aiohttp's connection_lost itself.
        if stopping:
            # The handler is being cancelled for an RST: aiohttp's teardown waits two turns of
            # the loop, by when the handler has seen its cancellation (in a storm of resets,
            # every handler has), as after a FIN. (The transport's error goes with the Watch's
            # ``lost``: no bound method or tuple made per drop, no slot per connection.)
            after_cancelled(_aiohttp_lost_after_reset if decided else _lost_after_reset, self)
        elif decided:
            _aiohttp_lost(proto, exc)
        else:
            proto.connection_lost(exc)
        if state is not None:
            self.state = None  # the state refers to this Watch: no cycle left behind
            self.listener.closed(state)

    def hold(self, request: web.BaseRequest) -> None:
        """Ask the kernel about the peer while ``request`` runs, if aiohttp may pause reading
        for it: its body has not all arrived, or pipelined requests wait behind it (their
        queue may fill up), or reading is paused already. Released by :meth:`release` (at the
        request's end) or when the peer is gone."""
        if self._held >= 0 or not CAN_HOLD:
            return
        transport = request.transport
        if transport is None or (
            request._payload.is_eof() and not self.queued and transport.is_reading()
        ):
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        hangups = hangups_of(asyncio.get_running_loop())
        if hangups is not None:
            self._held = hangups.hold(sock.fileno(), self)

    def release(self) -> None:
        """Stop asking the kernel about this connection's peer (the request ended).

        If the kernel said the peer is gone, the connection is aborted now: nothing more can
        be sent to it or read from it, and aiohttp, which has not read that far, would first
        drain the unread body (for up to its lingering time) or, over TLS, wait for a
        close_notify that never comes.
        """
        fd = self._held
        if fd >= 0:
            self._held = -1
            hangups = hangups_of(asyncio.get_running_loop())
            if hangups is not None:
                hangups.release(fd)
        if self._hung_up:
            self._hung_up = False
            transport = self._proto.transport
            if transport is not None:
                transport.abort()

    def hung_up(self, reset: bool) -> None:
        """The kernel says the peer closed (FIN) or reset (RST) the connection, maybe behind
        data nobody read yet. aiohttp learns it when it reads or writes again."""
        self._held = -1
        self._hung_up = True
        self._lose(ConnectionLost("RST" if reset else "FIN"))

    def is_websocket(self) -> bool:
        """True once a WebSocket handshake was accepted on this connection: aiohttp then tells
        the handler itself that the peer left (its receive loop ends)."""
        return self._proto._payload_parser is not None

    def _lose(self, lost: ConnectionLost) -> bool:
        """Report the peer gone; True if the handler is being cancelled for it now."""
        if self.lost is not None:
            return False
        self.lost = lost
        state = self.state
        if state is None:
            return False
        websocket = self._proto._payload_parser is not None  # (is_websocket(), on the drop path)
        return self.listener.client_left(state, lost, websocket)


def _remote(peername: Any) -> str | None:
    """``BaseRequest.remote`` of a request whose transport's peer is ``peername``."""
    if peername is None:
        return None
    if isinstance(peername, (list, tuple)):
        return str(peername[0])
    return str(peername)


def _aiohttp_lost(proto: RequestHandler, exc: BaseException | None) -> None:
    """aiohttp's ``connection_lost`` where aiodelay decides what becomes of the request in
    flight: aiohttp's ``handler_cancellation`` is off for the call."""
    manager = proto._manager
    if manager is None or not manager.handler_cancellation:
        proto.connection_lost(exc)
        return
    manager.handler_cancellation = False
    try:
        proto.connection_lost(exc)
    finally:
        manager.handler_cancellation = True


def _lost_after_reset(watch: Watch) -> None:
    """aiohttp's ``connection_lost`` of a reset connection, with the transport's error
    (deferred by :meth:`Watch.connection_lost`)."""
    watch._proto.connection_lost(_reset_error(watch))


def _aiohttp_lost_after_reset(watch: Watch) -> None:
    """The same, where aiodelay decided what becomes of the request (:func:`_aiohttp_lost`)."""
    _aiohttp_lost(watch._proto, _reset_error(watch))


def _reset_error(watch: Watch) -> BaseException | None:
    lost = watch.lost
    return None if lost is None else lost._error


def _close_read(transport: asyncio.Transport) -> None:
    """Close a transport whose peer's FIN was read (asyncio has stopped reading it): with
    nothing left to send, an abort, which closes it as ``close()`` would then (asyncio's
    selector transports: the same FIN, the same ``connection_lost(None)`` a turn later) but
    does not ask the selector to stop watching a reader and a writer that are not watched any
    more: each of those asks raises and catches two KeyErrors whose messages are formatted
    (some 2 us per ask). With bytes still to send, ``close()``, which sends them first. Nothing
    for a transport closing already (a handler or a middleware closed it meanwhile): asyncio's
    ``abort()`` of one whose buffer drained since raises."""
    if transport.is_closing():
        return
    if transport.get_write_buffer_size():
        transport.close()
    else:
        transport.abort()


# Linux's TCP states (include/net/tcp_states.h), the first byte of TCP_INFO.
_TCP_CLOSE = 7  # the peer reset the connection
_TCP_CLOSE_WAIT = 8  # the peer closed its side (FIN)
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)


def _how_peer_left(transport: asyncio.BaseTransport | None) -> Reason | None:
    """How the peer left, as the kernel says (Linux: the socket's TCP state): ``"RST"``,
    ``"FIN"``, or None if it has not, or the kernel cannot tell us."""
    sock = None if transport is None or _TCP_INFO is None else transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        tcp_state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0]
    except (OSError, ValueError, AttributeError):  # closed already, or no TCP socket
        return None
    if tcp_state == _TCP_CLOSE:
        return "RST"
    if tcp_state == _TCP_CLOSE_WAIT:
        return "FIN"
    return None


def how_peer_left(request: web.BaseRequest) -> ConnectionLost:
    """How the request's client left, for a response that aiohttp could not write whole:
    as the kernel says (Linux), else ``"closed"``."""
    transport = request.transport
    return ConnectionLost(_how_peer_left(transport) or "closed")


def peer_gone(request: web.BaseRequest) -> ConnectionLost | None:
    """How the request's client left, if its connection is gone or closing, else None.

    Covers the moment between a transport failing (an RST read, a failed write) and asyncio
    calling ``connection_lost`` one turn of the loop later: the transport says it is closing,
    and anything written to it now is dropped.
    """
    transport = request.transport
    if transport is None:
        return ConnectionLost("closed")
    if not transport.is_closing():
        return None
    return ConnectionLost(_how_peer_left(transport) or "RST")


class _AccessLog(AbstractAccessLogger):
    """aiohttp's access logger of one connection, with the true byte count of a response
    whose write failed: aiohttp logs 0 for it; this logs what was handed to the transport
    (when the failure was seen first, :func:`log_bytes_sent` set that already)."""

    __slots__ = ("_inner",)

    def __init__(self, inner: AbstractAccessLogger) -> None:
        super().__init__(getattr(inner, "logger", None), getattr(inner, "log_format", ""))  # type: ignore[arg-type]
        self._inner = inner

    @property
    def enabled(self) -> bool:
        return self._inner.enabled

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if (
            not response._body_length
            and not response_written(request)
            and not isinstance(response, web.WebSocketResponse)  # aiohttp logs 0 for those
        ):
            response._body_length = bytes_written(request)
        self._inner.log(request, response, time)


_BEFORE = "the connection was closed before the handler started"
#: The key, in a RequestHandler's dict of cached values (``_cache``; aiohttp 3.10 has none), of
#: how the peer left a connection that closed before aiodelay watched it; None from the moment
#: it is watched (:func:`install_watch`): then its Watch sees how the peer leaves.
_LEFT = "aiodelay_left"


def note_departures(manager: web.Server) -> None:
    """From now on, when a connection of aiohttp's server ``manager`` closes before aiodelay
    watched it, note on its RequestHandler how its peer left (aiohttp tells its server first,
    while the socket is still open): a request read on it may still be on its way to aiodelay
    (a middleware before aiodelay's holds it, or its task has not started yet), and once the
    connection is gone neither the kernel nor aiohttp can say. Called once a server is known
    (the first connection an installation watches on it); a second call does nothing."""
    if "connection_lost" in vars(manager):
        return
    aiohttps = manager.connection_lost

    def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
        cache: dict[str, Any] | None = getattr(handler, "_cache", None)
        if cache is not None and _LEFT not in cache:  # (not watched: no question of its Watch)
            transport = handler.transport
            if transport is not None:
                cache[_LEFT] = "RST" if exc is not None else _how_peer_left(transport) or "closed"
        aiohttps(handler, exc)

    manager.connection_lost = connection_lost  # type: ignore[method-assign]


def gone_before_watched(request: web.BaseRequest) -> ConnectionLost:
    """How the client of ``request`` left, for a request whose connection was gone before the
    request reached aiodelay: as noted when the connection closed, else ``"closed"`` (a
    connection that closed before aiodelay watched any connection of its server, or aiohttp
    3.10, whose RequestHandler has no room for the note)."""
    cache: dict[str, Any] | None = getattr(request.protocol, "_cache", None)
    reason: Reason = (cache.get(_LEFT) if cache else None) or "closed"
    return ConnectionLost(reason, _BEFORE)


def install_watch(
    request: web.BaseRequest, transport: asyncio.BaseTransport, listener: Listener
) -> Watch:
    """Put a :class:`Watch` (with no ``state`` yet) between ``transport`` and aiohttp.

    Also on a transport that is already closing (its peer left before the request reached
    aiodelay): asyncio calls ``connection_lost`` on the protocol current at that time, so the
    Watch still stands between it and aiohttp, and a shielded handler is not cancelled by
    aiohttp's ``handler_cancellation``. Its ``lost`` is then already set.
    """
    proto = request.protocol
    installed = Watch(proto, transport, listener)  # type: ignore[arg-type]
    if transport.is_closing():
        installed.lost = ConnectionLost(_how_peer_left(transport) or "closed", _BEFORE)
    cache: dict[str, Any] | None = getattr(proto, "_cache", None)
    if cache is not None:
        # Watched: note_departures's wrapper, at the close, needs to ask nothing (a dict set
        # once per connection, where asking the transport for its protocol is a frame).
        cache[_LEFT] = None
    access_log = getattr(proto, "access_logger", None)
    if access_log is not None and getattr(proto, "_logging_enabled", True):
        proto.access_logger = _AccessLog(access_log)
    transport.set_protocol(installed)
    return installed


# A request's state is kept on aiohttp's writer of its HTTP message, which ``request.clone()``
# hands to every clone: one home, whichever request object asks. (The request's own mapping
# would do too, but its first key costs a dict table of 160 bytes per request.)
#: An attribute named so on the writer keeps ``state`` for the request and every clone of it
#: (the middleware sets it by name, ``request._payload_writer._aiodelay_state``, for its cost).
STATE = "_aiodelay_state"
writer_of = operator.attrgetter("_payload_writer")


def state_of(request: web.BaseRequest) -> Any:
    """What was kept for the request (or a clone of it) as above, or None."""
    return getattr(writer_of(request), STATE, None)


#: asyncio's TCP (and Unix socket) transport, whose ``get_protocol()`` and ``is_closing()``
#: return its ``_protocol`` and ``_closing``: where a transport is of this very class, the
#: middleware reads those two directly (a Python frame each saved on every request); any
#: other (TLS, uvloop's) is asked. None if a Python release has no such class.
SOCKET_TRANSPORT: type | None = getattr(
    getattr(asyncio, "selector_events", None), "_SelectorSocketTransport", None
)

#: The request's body stream (``request._payload``, which the middleware reads) of a request
#: without a body.
EMPTY_PAYLOAD = getattr(streams, "EMPTY_PAYLOAD", None)  # (None: MISSING names it)

#: ``route_of(request)``: ``request.match_info.route`` of a ``web.Request`` (a C attribute
#: getter: those are two Python properties, paid by every request whose plan is asked for).
route_of = operator.attrgetter("_match_info._route")

#: ``response_written(request)``: True once aiohttp has handed the whole response of
#: ``request`` to the transport (whichever response object it was: the message's writer
#: knows). A C attribute getter: no Python frame where every observed request asks.
response_written: Callable[[web.BaseRequest], bool] = operator.attrgetter("_payload_writer._eof")


def bytes_written(request: web.BaseRequest) -> int:
    """The bytes of ``request``'s response handed to the transport so far, status line and
    headers included (what aiohttp's access log counts). A file that aiohttp sends with
    ``sendfile()`` is not counted: the kernel sends it, and aiohttp does not add it up."""
    return int(request._payload_writer.output_size)


def fail_as_aiohttp(request: web.BaseRequest, exc: BaseException) -> None:
    """What aiohttp does when writing a response raises an error of its own (not a
    ``ConnectionError``): it logs it, "Unhandled exception", and force-closes the connection
    (its own write of the response, next, then fails, and the connection ends)."""
    protocol = request.protocol
    protocol.log_exception("Unhandled exception", exc_info=exc)
    protocol.force_close()


def server_of(request: web.BaseRequest) -> web.Server | None:
    """The aiohttp server (``web.Server``, one per runner) that ``request`` came through."""
    manager: web.Server | None = request.protocol._manager
    return manager


def take_over_pre_shutdown(
    server: web.Server,
    begin: Callable[[], None],
    ended: Callable[[web.Server], None],
    *,
    drain: bool,
) -> None:
    """Shut ``server``'s connections down so that no request a client sent is lost: in place
    of aiohttp's ``Server.pre_shutdown`` (the runner calls it once it stopped accepting, before
    the app's ``on_shutdown`` hooks), call ``begin()``, then close each connection with a
    request in flight after its response, which says so (:func:`close_after`), if its head has
    not gone out yet. ``drain``: leave the others reading, until :func:`close_waiting` (an
    ``on_shutdown`` hook calls it, after waiting while :func:`worth_reading`); else close them
    now. ``ended(server)`` once aiohttp's ``Server.shutdown`` is over (its connections are
    closed, their handlers ended).

    aiohttp's own ``pre_shutdown`` stops reading on every connection at once and closes an idle
    one only later, once the ``on_shutdown`` hooks have run: a request sent on it meanwhile is
    read and dropped, and so is the first request of a connection accepted just before (a
    proxy connects to send a request). Then it answers each request in flight as on a
    connection that stays open, and closes that connection (it declined to change this:
    https://github.com/aio-libs/aiohttp/issues/2298): a keep-alive client, such as nginx's
    pool of upstream connections, sends its next request on it and gets a reset. nginx
    answers such a POST with 502 (it retries only idempotent requests on another connection).
    """

    def pre_shutdown() -> None:
        begin()
        for proto in server.connections:
            request = proto._current_request
            if request is not None and not _head_written(request):
                close_after(request)
            # else: a request read but not started yet is closed after by the middleware; a
            # response whose head went out as on a connection that stays open is followed by
            # its client's next request, which the drain serves (read, not dropped).
        if not drain:
            close_waiting(server)

    server.pre_shutdown = pre_shutdown  # type: ignore[method-assign]
    shutdown = server.shutdown

    async def shutdown_then_say(timeout: float | None = None) -> None:
        try:
            await shutdown(timeout)
        finally:
            ended(server)

    server.shutdown = shutdown_then_say  # type: ignore[method-assign]


def _waiting(proto: RequestHandler) -> bool:
    """Whether the connection waits for its next request (none read, none in flight)."""
    return proto._waiter is not None and not proto._messages


def busy(server: web.Server) -> bool:
    """Whether ``server`` has a request in flight (or read and not yet handled)."""
    return any(proto._request_count and not _waiting(proto) for proto in server.connections)


def worth_reading(server: web.Server, *, idle: bool) -> list[asyncio.Task[None]]:
    """While a client may still send a request on a connection of ``server`` that is being shut
    down, what to wait for: the tasks of its connections (each ends when its connection
    closes); empty once no client may. A client may send one on a connection that has not
    brought its first request yet (a client connects to send one), and, with ``idle`` (the
    clients were busy when the shutdown began: nginx sends its next request on any connection
    of its pool), on any connection: one waiting for its next request, or one whose response
    went out as on a connection that stays open just before the shutdown began."""
    tasks = [proto._task_handler for proto in server.connections if proto._task_handler]
    if idle or any(not proto._request_count for proto in server.connections):
        return tasks
    return []


def close_waiting(server: web.Server) -> None:
    """End the shutdown's wait for requests on ``server``'s connections: close those that wait
    for one now (so that the client learns it at once), the others after their response (as
    aiohttp's ``pre_shutdown`` would have). Not promised: a client may send a request at the
    moment its idle connection closes (HTTP/1.1 has no way to prevent it; nginx retries an
    idempotent one on another connection)."""
    for proto in server.connections:
        if _waiting(proto):
            proto.force_close()
        else:
            proto.close()


def _head_written(request: web.BaseRequest) -> bool:
    """Whether the status line and headers of ``request``'s response were written (sent, or
    buffered to go with the body: aiohttp 3.11 and later)."""
    return getattr(request._payload_writer, "_headers_buf", None) is not None or (
        status_line_sent(request)
    )


def close_after(request: web.BaseRequest) -> None:
    """Close ``request``'s connection after its response, which says so: no further request is
    read on it, and the response carries ``Connection: close`` (see :func:`says_close`)."""
    request.protocol.close()
    says_close(request)


def says_close(request: web.BaseRequest) -> None:
    """Make ``request``'s response carry ``Connection: close`` (the one aiohttp's writer of
    the request, shared by its clones, writes next: the handler's to make, not prepared yet)."""
    writer = request._payload_writer
    if "write_headers" in vars(writer):
        return  # done already
    write_headers = writer.write_headers

    async def closing(status_line: str, headers: Any) -> None:
        # (but a protocol switch, a WebSocket handshake: it needs "Connection: upgrade")
        if "upgrade" not in headers.get(hdrs.CONNECTION, "").lower():
            headers[hdrs.CONNECTION] = "close"
        await write_headers(status_line, headers)

    writer.write_headers = closing  # type: ignore[method-assign]


def abort_connection(request: web.BaseRequest) -> None:
    """Close the request's connection at once: a response that has started ends incomplete
    (no final chunk, fewer bytes than its Content-Length), not cleanly."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def close_unread(request: web.BaseRequest) -> None:
    """The request's connection ends with this request (its client left, or its response was
    cut): if its body was not read to the end, abort the connection now.

    Else aiohttp, before closing, reads the rest of the body for up to its lingering time (10
    seconds by default), and a connection that is closed or aborted meanwhile does not end
    that read (aiohttp's ``connection_lost`` fails only the body of a request whose handler
    still runs): the connection's task would wait out the whole lingering time. An abort,
    not a close: nothing more is to be sent, and a socket closed with unread data sends an
    RST anyway (TCP's rule); over TLS, a close would first wait for the peer's close_notify."""
    payload = request._payload
    if payload is not EMPTY_PAYLOAD and not payload.is_eof():  # (a drop asks no method)
        abort_connection(request)
        request.protocol.force_close()  # (marks it closed for aiohttp: no lingering)


def access_logged(request: web.BaseRequest) -> bool:
    """Whether aiohttp may write an access log line for the request (True where it cannot be
    told)."""
    enabled: bool = getattr(request.protocol, "_logging_enabled", True)
    return enabled


def status_line_sent(request: web.BaseRequest) -> bool:
    """Whether the status line of the request's response has gone to the transport."""
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
    the middle of a stream held it), or one attribute deep in them (a wrapper object that
    holds it). None if it is not there."""
    writer = request._payload_writer

    def mine(value: object) -> bool:
        return isinstance(value, web.StreamResponse) and value._payload_writer is writer

    for value in candidates:
        if mine(value):
            return value  # type: ignore[return-value]
    # The first frame is the middleware's own, still running: reading its f_locals would keep
    # the exception (and through it every frame) in a reference cycle. The frames after it
    # have ended; reading f_locals stores a snapshot of their locals on them (before Python
    # 3.13), so each is cleared once read: the exception ends here, nobody reads them again.
    tb = tb.tb_next if tb is not None else None
    found: web.StreamResponse | None = None
    while tb is not None:
        frame = tb.tb_frame
        if found is None:
            for value in frame.f_locals.values():
                if mine(value):
                    found = value
                    break
                for attribute in getattr(value, "__dict__", {}).values():
                    if mine(attribute):
                        found = attribute
                        break
                if found is not None:
                    break
        with contextlib.suppress(RuntimeError):  # a frame that still runs is left alone
            frame.clear()
        tb = tb.tb_next
    return found


def as_sent(
    request: web.BaseRequest,
    *candidates: object,
    exc: BaseException | None = None,
    shared: bool = False,
) -> web.StreamResponse:
    """A response for aiohttp to log, not to send, for a request whose client left: the status
    line that went on the wire and the bytes handed to the transport, or 499 (nginx's "client
    closed request") with 0 bytes if no status line went out.

    ``candidates`` and ``exc``'s traceback are where the response the handler prepared may be
    found (see :func:`_prepared`). Not promised: if it is not found there (a handler that keeps
    its response deeper in other objects), the status is not known, and the line says 499
    with the bytes that went out. ``shared``: nothing but aiohttp sees the response (no
    middleware outside aiodelay's), so the 499 of a request that sent nothing may be one
    object for all.
    """
    if not status_line_sent(request):
        return _NOTHING_SENT if shared else _logged(499, "Client Closed Request", 0)
    prepared = _prepared(request, candidates, None if exc is None else exc.__traceback__)
    if prepared is None:
        return _logged(499, "Client Closed Request", bytes_written(request))
    return _logged(prepared.status, prepared.reason, bytes_written(request))


def _logged(status: int, reason: str, sent: int) -> web.StreamResponse:
    logged = web.StreamResponse(status=status, reason=reason)
    logged.force_close()
    # aiohttp's finish_response() calls prepare() and write_eof(), which do nothing once
    # _eof_sent is set, then logs status and body_length; nothing of it changes the response.
    logged._eof_sent = True
    logged._body_length = sent
    return logged


#: What every request that sent nothing is logged as: one object, shared (aiohttp only reads
#: it), so that a storm of drops does not build a response per drop.
try:
    _NOTHING_SENT = _logged(499, "Client Closed Request", 0)
except AttributeError:  # a StreamResponse without them (MISSING names them): never used then
    _NOTHING_SENT = web.StreamResponse(status=499)


def log_bytes_sent(response: web.StreamResponse) -> int:
    """The bytes of ``response`` handed to the transport, also what aiohttp's access log is to
    show for it: the count of when this was first called (its client had left; a write
    after that is counted by aiohttp but never handed over), or of aiohttp's log line, if
    that came first."""
    if not response._body_length:
        request = response._req
        if request is not None and response._payload_writer is request._payload_writer:
            response._body_length = bytes_written(request)
    return response._body_length
