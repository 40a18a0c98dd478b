"""A live server for tests: an app served like production on ``127.0.0.1``, with
:meth:`LiveServer.drop` as the client that leaves and :meth:`LiveServer.connect` as raw
connections."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Literal, Protocol

from aiohttp import web
from yarl import URL

import aiodelay
from aiodelay._core import aiohttp_internals

from ._client import HOST, RawClient
from ._outcome import DropHow, DropOutcome
from ._probe import Observer, Probe, describe_moment, request_head

_HOWS = ("FIN", "RST", "half-close")
_WAITS = ("ended", "seen")


class LiveServer:
    """An app served on ``127.0.0.1`` by a real ``web.AppRunner``.

    Made by the ``aiodelay_server`` fixture; closed when the test ends. Any HTTP client
    can talk to ``url``; :meth:`drop` is the client that leaves, :meth:`connect` a raw
    connection to write and drop by hand.
    """

    def __init__(
        self, app: web.Application, runner: web.AppRunner, port: int, *, tls: bool = False
    ) -> None:
        self.app = app
        self.runner = runner
        self.host = HOST
        self.port = port
        self.url = URL.build(scheme="https" if tls else "http", host=HOST, port=port)
        #: The connections :meth:`connect` opened, aborted when the server closes.
        self.clients: list[RawClient] = []
        self._tls = tls
        self._observer: Observer | None = None
        self._remove_observer: Callable[[], None] | None = None
        self._probes: list[Probe] = []

    def make_url(self, path: str) -> URL:
        return self.url.join(URL(path))

    async def connect(self, *, tls: ssl.SSLContext | None = None) -> RawClient:
        """A new raw connection to the server, aborted when the test ends (if the test has
        not closed it). ``tls`` is the client's context for a server started with
        ``ssl_context``: one that trusts the server's certificate."""
        if self._tls and tls is None:
            raise ValueError("this server speaks TLS: pass tls=, a client context it trusts")
        client = await RawClient.connect(self.port, tls)
        self.clients.append(client)
        return client

    def _observed(self) -> Observer:
        """aiodelay's observer of the app, added on the first :meth:`drop`: a test that
        does not drop keeps the app exactly as it was served (an observed request takes
        another path through aiodelay: the middleware writes its response)."""
        if self._observer is None:
            try:
                aiodelay.stats(self.app)
            except RuntimeError:
                raise RuntimeError(
                    "drop() needs aiodelay on the app: serve it with setup_aiodelay=True "
                    "(the default), or call aiodelay.setup(app) first"
                ) from None
            missing = aiohttp_internals.MISSING
            if missing:
                raise RuntimeError(
                    "drop() cannot follow requests while aiodelay runs degraded on this "
                    f"aiohttp (it lacks {', '.join(missing)}): observers are not called then"
                )
            self._observer = Observer()
            self._remove_observer = aiodelay.add_observer(self.app, self._observer)
        return self._observer

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
        ended), ``after_seconds=S`` (S seconds after the handler started; if the handler
        ends sooner, once its response has arrived, so that the outcome's ``status`` and
        ``received`` show it: the 504 of a deadline, say). How: ``how`` (see :data:`DropHow`).

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
        moment = describe_moment(data, after_request_bytes, after_response_bytes, after_seconds)
        if how not in _HOWS:
            raise ValueError(f"how must be one of {', '.join(map(repr, _HOWS))}, got {how!r}")
        if wait not in _WAITS:
            raise ValueError(f"wait must be one of {', '.join(map(repr, _WAITS))}, got {wait!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        if self._tls:
            raise ValueError("drop() speaks plain HTTP: use connect(tls=...) on a TLS server")
        observer = self._observed()

        probe = Probe(method, path, how, moment)
        self._probes.append(probe)
        sent = data if after_request_bytes is None else data[:after_request_bytes]
        head = request_head(method, path, self.port, data, headers)
        await probe.open(self.port, observer, head)
        await probe.send(sent)
        await probe.wait_started(timeout)
        if after_response_bytes is not None:
            await probe.wait_body(after_response_bytes, timeout)
        elif after_seconds is not None:
            await probe.wait_answered(after_seconds)
        await probe.drop()
        if wait == "ended":
            return await probe.wait_ended(timeout)
        return await probe.wait_seen(timeout)

    async def close(self) -> None:
        """Abort the connections :meth:`connect` opened, close those :meth:`drop` left
        open, then stop the server (unless the test stopped its runner already)."""
        for client in self.clients:  # held while aborted: a writer freed first warns
            client.writer.transport.abort()
        self.clients.clear()
        while self._probes:
            await self._probes.pop().aclose()
        if self._remove_observer is not None:
            self._remove_observer()
        if self.runner.server is not None:  # not stopped by the test itself
            await self.runner.cleanup()


class AiodelayServer(Protocol):
    """The type of the ``aiodelay_server`` fixture, for annotating tests.

    ``await aiodelay_server(app)`` serves ``app`` and returns its :class:`LiveServer`:
    ``handler_cancellation`` and ``shutdown_timeout`` (and any other ``runner_kwargs``, e.g.
    ``access_log``) go to ``web.AppRunner``; ``setup_aiodelay=False`` leaves an app without
    aiodelay as it is; ``ssl_context`` serves over TLS.
    """

    def __call__(
        self,
        app: web.Application,
        *,
        handler_cancellation: bool = False,
        shutdown_timeout: float = 1.0,
        setup_aiodelay: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        **runner_kwargs: Any,
    ) -> Awaitable[LiveServer]: ...


@contextlib.asynccontextmanager
async def live_servers() -> AsyncIterator[AiodelayServer]:
    """The body of the ``aiodelay_server`` fixture: yields the factory, and on exit closes
    the servers it started, in reverse order."""
    servers: list[LiveServer] = []

    async def start(
        app: web.Application,
        *,
        handler_cancellation: bool = False,
        shutdown_timeout: float = 1.0,
        setup_aiodelay: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        **runner_kwargs: Any,
    ) -> LiveServer:
        if setup_aiodelay:
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
            sock.bind((HOST, 0))  # our own socket: the port is known without a race
            await web.SockSite(runner, sock, ssl_context=ssl_context).start()
            server = LiveServer(app, runner, sock.getsockname()[1], tls=ssl_context is not None)
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        servers.append(server)
        return server

    try:
        yield start
    finally:
        while servers:
            await servers.pop().close()
