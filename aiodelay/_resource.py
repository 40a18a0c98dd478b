"""Twisted-style resources: ``render_<METHOD>`` methods and ``NOT_DONE_YET``.

A :class:`Resource` subclass defines ``render_GET``, ``render_POST``, ... and is served through its
``render`` coroutine (``app.router.add_get("/x", MyResource().render)``, or as the ``resource`` of a
``.rpy`` script).  A render method receives a :class:`ResourceRequest` and returns the response:

- ``bytes`` (status 200 unless set, ``Content-Type: text/html`` unless set), or ``str`` (sent as
  UTF-8), or an aiohttp ``StreamResponse``, or an awaitable of one of those;
- or :data:`NOT_DONE_YET`, and produces the response later from plain callbacks with
  ``request.write()`` / ``request.finish()``, as Twisted's ``Request`` does.

Everything the aiodelay middleware does applies, so ``aiodelay.setup(app)`` must have been called:
with the cancel policy a pending response is cancelled when the peer leaves,
``request.notify_finish()`` fails with :class:`aiodelay.ConnectionLost` and the log line is written.

When the peer leaves, the route's policy decides what happens to the work, as for any handler:

- ``cancel``: the request ends at once.  Timers from ``request.call_later`` are cancelled, and
  ``request.on_connection_lost`` errbacks are called, so that Twisted's idiom (an errback that
  cancels the pending callback) stops the rest; callbacks scheduled otherwise keep running unless
  an errback cancels them, as in Twisted.
- ``shield``: the work runs on to its end.  A ``NOT_DONE_YET`` request stays in flight until
  ``finish()`` (its ``write()`` calls are dropped), ``request.call_later`` timers keep running,
  and ``on_connection_lost`` errbacks are held back until the render's work is done, so the
  same Twisted idiom does not stop it; the errback is then told the response was not delivered.
  ``request.notify_finish()`` futures fail as soon as the peer leaves, under either policy.

Not promised: the response is not sent while a callback runs, only once the event loop gets control
(``write()`` buffers); a render method that blocks, blocks the whole server.  Under ``shield`` a
``NOT_DONE_YET`` request that never calls ``finish()`` stays in flight until the server stops.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, final

from aiohttp import web
from multidict import CIMultiDict

from ._core.errors import ConnectionLost
from ._core.policy import Policy
from ._core.requests import call_later, is_disconnected, notify_finish, request_policy

if TYPE_CHECKING:
    from typing_extensions import TypeVarTuple, Unpack

    _Ts = TypeVarTuple("_Ts")

__all__ = ("NOT_DONE_YET", "Resource", "ResourceRequest")

logger = logging.getLogger("aiodelay")


class _NotDoneYet(enum.Enum):
    # An enum member, not Twisted's integer 1: it cannot be confused with a body and type
    # checkers can narrow on it (``Literal[NOT_DONE_YET]``).
    NOT_DONE_YET = "NOT_DONE_YET"

    def __repr__(self) -> str:
        return "aiodelay.NOT_DONE_YET"

    __str__ = __repr__


NOT_DONE_YET: Final = _NotDoneYet.NOT_DONE_YET
"""Returned by a render method that will finish the response later through ``request.finish()``."""

Body: TypeAlias = "bytes | str | web.StreamResponse"
RenderResult: TypeAlias = "Body | Awaitable[Body] | Literal[_NotDoneYet.NOT_DONE_YET]"


@final
class ResourceRequest:
    """The request a render method receives: Twisted's response methods on an aiohttp request.

    Every attribute of the aiohttp request stays available (``request.match_info``,
    ``request.query``, ``await request.post()``, ``request["key"]``, ...); ``request.request`` is
    the aiohttp ``web.Request`` itself, to pass to functions such as ``aiodelay.call_later``.

    ``write()`` and ``finish()`` are plain functions that may be called from any callback on the
    event loop's thread.  After the peer left, both are silent no-ops (Twisted raises from
    ``finish()`` there and floods logs, klein#11).  ``write()`` after ``finish()`` and a second
    ``finish()`` raise ``RuntimeError``: those are bugs in the caller, not races with the peer.
    """

    __slots__ = (
        "_ended",
        "_finished",
        "_gone",
        "_headers",
        "_held_back",
        "_pending",
        "_started",
        "_status",
        "_waiter",
        "request",
    )

    request: web.Request

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self._status = 200
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._pending: deque[bytes] = deque()
        self._started = False  # write() was called: status and headers are fixed
        self._finished = False
        self._gone = False  # the peer left or the response was abandoned
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False  # the render's work is done (Resource.render returned or raised)
        #: Errbacks held back under the shield policy until the render's work is done.
        self._held_back: list[Callable[[], None]] = []

    def __getattr__(self, name: str) -> Any:
        # Only called for names this class does not define: those of the aiohttp request.
        if name == "request":  # not set yet: do not recurse
            raise AttributeError(name)
        return getattr(self.request, name)

    def __getitem__(self, key: Any) -> Any:
        return self.request[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.request[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self.request

    def __iter__(self) -> Iterator[Any]:
        return iter(self.request)

    def __repr__(self) -> str:
        return f"<ResourceRequest {self.request.method} {self.request.path}>"

    def set_response_code(self, code: int) -> None:
        """Set the status; only before the first ``write()``."""
        if isinstance(code, bool) or not isinstance(code, int):
            raise TypeError(f"status code must be an int, got {type(code).__name__}")
        if not 100 <= code <= 599:
            raise ValueError(f"status code must be in 100..599, got {code}")
        self._check_not_started("set_response_code")
        self._status = code

    def set_header(self, name: str, value: str) -> None:
        """Set (replace) a response header; only before the first ``write()``."""
        self._check_not_started("set_header")
        self._headers[name] = value

    def write(self, data: bytes) -> None:
        """Queue ``data`` to be sent, in order; the first call fixes status and headers.

        Returns at once: the bytes go out when the event loop next runs the response.
        A no-op once the peer has left.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"write() takes bytes, got {type(data).__name__}; encode it first")
        if self._finished:
            raise RuntimeError("write() called after finish()")
        if self._is_gone():
            return
        self._started = True
        self._pending.append(bytes(data))
        self._wake()

    def finish(self) -> None:
        """End the response.  Once the peer has left it sends nothing (and a second call is
        a no-op), but still ends the request's work under the shield policy; otherwise a
        second call raises."""
        if self._is_gone():
            self._finished = True
            self._wake()
            return
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        self._wake()

    def notify_finish(self) -> asyncio.Future[None]:
        """``aiodelay.notify_finish(request)``: a new future for the end of this response.

        It resolves to ``None`` once the response was fully written, and fails with
        :class:`aiodelay.ConnectionLost` if the peer left first or the server stopped the request.
        """
        return notify_finish(self.request)

    def on_connection_lost(
        self, callback: Callable[[ConnectionLost, Unpack[_Ts]], object], *args: Unpack[_Ts]
    ) -> asyncio.Future[None]:
        """Call ``callback(err, *args)`` if the response cannot be finished: the errback form.

        Twisted's ``request.notifyFinish().addErrback(self._responseFailed, call)`` becomes
        ``request.on_connection_lost(self._response_failed, call)``.  ``err`` is the
        :class:`aiodelay.ConnectionLost` (``err.reason``: ``"FIN"``, ``"RST"``, ``"shutdown"``,
        ...).  The callback is not called when the response completes, nor when the handler
        raises (aiohttp logs that).  Under the shield policy it is called only once the render's
        work is done (``finish()``, or the render method's result is ready): shielded work is
        not stopped by the peer leaving, not even by the errback that would stop it under
        ``cancel``.  An exception raised by the callback is logged on the ``aiodelay`` logger.
        Returns the ``notify_finish()`` future the callback is attached to.
        """
        future = self.notify_finish()

        def _done(future: asyncio.Future[None]) -> None:
            if future.cancelled():
                return
            err = future.exception()
            if not isinstance(err, ConnectionLost):  # completed, or the handler raised
                return

            def call() -> None:
                try:
                    callback(err, *args)
                except Exception:
                    logger.exception("connection-lost callback %r failed", callback)

            if not self._ended and self._shielded():
                self._held_back.append(call)
            else:
                call()

        future.add_done_callback(_done)
        return future

    def call_later(
        self, delay: float, callback: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]
    ) -> asyncio.TimerHandle:
        """``aiodelay.call_later(request, ...)``: a timer owned by this request.

        It is cancelled if still pending when the request ends (under the cancel policy, as soon
        as the peer leaves), so a callback that re-arms it stops with the response.
        """
        return call_later(self.request, delay, callback, *args)

    def _shielded(self) -> bool:
        """The request runs under the shield policy (its route's mark, or the app's)."""
        return request_policy(self.request) is Policy.SHIELD

    def _end(self) -> None:
        """The render's work is done: call the errbacks the shield policy held back."""
        self._ended = True
        held_back, self._held_back = self._held_back, []
        for call in held_back:
            call()

    def _check_not_started(self, what: str) -> None:
        if self._started or self._finished:
            raise RuntimeError(f"{what}() called after the response was started by write()")

    def _is_gone(self) -> bool:
        if not self._gone and is_disconnected(self.request):
            self._gone = True
        return self._gone

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _body_response(self, body: bytes | str) -> web.Response:
        if self._started:
            raise RuntimeError("a render method returned a body after request.write()")
        headers = CIMultiDict(self._headers)
        if isinstance(body, str):
            body = body.encode()
            headers.setdefault("Content-Type", "text/html; charset=utf-8")
        headers.setdefault("Content-Type", "text/html")
        return web.Response(body=body, status=self._status, headers=headers)

    async def _produce(self) -> web.StreamResponse:
        """Send what write()/finish() queue; in the handler's task, which a disconnect cancels.

        Under the shield policy the peer leaving does not end it: it waits for ``finish()``,
        as a shielded handler runs to its end, and only then raises the ``ConnectionLost``.
        """
        loop = asyncio.get_running_loop()
        lost = self.notify_finish()
        lost.add_done_callback(lambda _: self._wake())
        shielded = self._shielded()
        response: web.StreamResponse | None = None
        send_body = self.request.method != "HEAD"
        try:
            while True:
                failure = lost.exception() if lost.done() and not lost.cancelled() else None
                if failure is not None:
                    self._gone = True  # nothing can be sent any more
                    self._pending.clear()
                    if self._finished or not shielded:
                        raise failure
                elif self._pending and not self._gone:
                    chunk = self._pending.popleft()
                    try:
                        if response is None:
                            response = await self._prepare()
                        if send_body:
                            await response.write(chunk)
                    except ConnectionError:
                        if not shielded:
                            raise
                        self._gone = True  # the peer left: the work still runs to finish()
                        self._pending.clear()
                    continue  # the peer may have left, or more was queued, meanwhile
                elif self._finished:
                    if response is None:
                        response = await self._prepare()
                    await response.write_eof()
                    return response
                self._waiter = loop.create_future()
                await self._waiter
        except BaseException:
            self._gone = True  # cancelled or failed: later write()/finish() calls are no-ops
            raise

    async def _prepare(self) -> web.StreamResponse:
        response = web.StreamResponse(status=self._status, headers=self._headers)
        if "Content-Type" not in self._headers:
            response.content_type = "text/html"
        await response.prepare(self.request)
        return response


class Resource:
    """A Twisted-style resource: subclass it and define ``render_GET``, ``render_POST``, ...

    ``await resource.render(request)`` dispatches on the method: ``render_<METHOD>`` is called with
    a :class:`~aiodelay.ResourceRequest`; ``HEAD`` falls back to ``render_GET`` and
    sends no body; a method without a render method gets ``405 Method Not Allowed`` with an
    ``Allow`` header.
    Register ``resource.render`` (a coroutine function) as the aiohttp handler.
    """

    async def render(self, request: web.Request) -> web.StreamResponse:
        """Handle ``request`` with the matching ``render_<METHOD>``; see the class docstring."""
        method = request.method.upper()
        render = self._render_method(method)
        if render is None:
            raise web.HTTPMethodNotAllowed(method, self.allowed_methods())
        wrapped = ResourceRequest(request)
        try:
            result = render(wrapped)
            if inspect.isawaitable(result):
                result = await result
            if result is NOT_DONE_YET:
                return await wrapped._produce()
        finally:
            wrapped._end()
        if isinstance(result, web.StreamResponse):
            return result
        if isinstance(result, (bytes, str)):
            return wrapped._body_response(result)
        raise TypeError(
            f"{type(self).__name__}.render_{method} returned {type(result).__name__}; expected "
            "bytes, str, a StreamResponse, an awaitable of one, or NOT_DONE_YET"
        )

    def allowed_methods(self) -> list[str]:
        """The methods this resource renders, for the ``Allow`` header (``HEAD`` with ``GET``)."""
        methods = {
            name.removeprefix("render_")
            for name in dir(self)
            if name.startswith("render_") and name[len("render_") :].isupper()
        }
        if "GET" in methods:
            methods.add("HEAD")
        return sorted(methods)

    def _render_method(self, method: str) -> Callable[[ResourceRequest], RenderResult] | None:
        render: Callable[[ResourceRequest], RenderResult] | None = getattr(
            self, f"render_{method}", None
        )
        if render is None and method == "HEAD":
            render = getattr(self, "render_GET", None)
        return render if callable(render) else None
