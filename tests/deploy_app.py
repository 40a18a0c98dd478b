"""The app that ``tests/test_deployment.py`` runs under gunicorn, behind nginx.

It is the deployment guide's app (``docs/deployment.md``) with a witness added: every worker
writes what happened in it to its stderr, one line per event, ``deploy-app {json}``, with its
pid and the time (``time.monotonic()``, the same clock in every process on Linux, so the test
can subtract its own readings). The events are ``ready`` (the worker's app started),
``started`` (a handler runs; the client address the handler sees), ``cancelled`` (the handler
got ``CancelledError``), ``finish`` (how its ``aiodelay.notify_finish`` future resolved),
and ``ended`` (aiodelay's observer: the outcome, the reason and the client it names).
aiodelay's own log lines and the access lines are not the witness's: the guide's
``gunicorn.conf.py`` puts them in gunicorn's log, where the test looks for them. Each line is
one ``write()`` of less than ``PIPE_BUF`` bytes, so the lines of the two workers never
interleave in the pipe.

``/hold/{id}`` holds the request until the client leaves or the server stops. ``/stream/{id}``
sends a first chunk of a chunked response, then holds the same way. ``/download/{id}?size=N``
(and ``/stream/download/{id}``, for nginx's unbuffered location) writes N bytes as fast as
they are taken; ``/work/{id}?seconds=S`` answers after S seconds. The id is in the path so
that aiodelay's INFO line (which names the path) says which request it is about.

``POST /write/{id}?seconds=S`` reads its body and answers after S seconds, and ``GET
/read/{id}?seconds=S`` answers after S seconds: the reload test's load (neither reports an
event; there are thousands). ``serve_plain`` serves those two routes on plain aiohttp, without
aiodelay: the reload test's control.

``serve_metrics`` is ``serve`` with ``aiodelay.prometheus.setup(app)`` (``GET /metrics``),
run with ``PROMETHEUS_MULTIPROC_DIR`` set and the hooks of
``examples/deployment/prometheus_hooks.py``. Its
metrics observer is added before the witness, so a worker's ``ended`` line comes after the
request was counted in the directory's files.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp_remotes import XForwardedRelaxed

import aiodelay
import aiodelay.prometheus

# gunicorn --graceful-timeout GRACEFUL_TIMEOUT: the arbiter SIGKILLs the workers that still run
# GRACEFUL_TIMEOUT seconds after it sent them SIGTERM. A worker notices SIGTERM within 1 s and
# aiohttp waits up to 2 * SHUTDOWN_TIMEOUT before it cancels a handler that does not end by
# itself: 1 + 2 * 0.5 = 2 s here, well before the SIGKILL at 5 s.
GRACEFUL_TIMEOUT = 5
SHUTDOWN_TIMEOUT = 0.5


def report(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.monotonic(), **fields})
    sys.stderr.write(f"deploy-app {line}\n")
    sys.stderr.flush()


class _Witness:
    """aiodelay's observer: how each request ended, as the worker saw it."""

    def request_started(self, request: web.BaseRequest) -> None:
        pass

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        pass

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        report(
            "ended",
            id=request.path.rpartition("/")[2],
            kind=outcome.kind,
            reason=outcome.lost.reason if outcome.lost is not None else None,
            client=outcome.client,
            lost_at=outcome.lost_at,
            ended_at=outcome.ended_at,
        )


def _watch_finish(request: web.Request, rid: str) -> None:
    def done(future: asyncio.Future[None]) -> None:
        error = None if future.cancelled() else future.exception()
        reason = error.reason if isinstance(error, aiodelay.ConnectionLost) else None
        report("finish", id=rid, error=type(error).__name__ if error else None, reason=reason)

    aiodelay.notify_finish(request).add_done_callback(done)


async def _hold_on(rid: str) -> None:
    try:
        await asyncio.get_running_loop().create_future()  # until cancelled
    except asyncio.CancelledError:
        report("cancelled", id=rid)
        raise


async def hold(request: web.Request) -> web.StreamResponse:
    rid = request.match_info["id"]
    _watch_finish(request, rid)
    report("started", id=rid, remote=request.remote)
    await _hold_on(rid)
    raise AssertionError("unreachable: _hold_on only ends by cancellation")


async def stream(request: web.Request) -> web.StreamResponse:
    rid = request.match_info["id"]
    _watch_finish(request, rid)
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b"first chunk\n")
    report("started", id=rid, remote=request.remote)
    await _hold_on(rid)
    raise AssertionError("unreachable: _hold_on only ends by cancellation")


async def download(request: web.Request) -> web.StreamResponse:
    """``size`` bytes (a query parameter), written in 64 KiB chunks as fast as they are taken."""
    rid = request.match_info["id"]
    _watch_finish(request, rid)
    size = int(request.query["size"])
    response = web.StreamResponse()
    response.content_length = size
    await response.prepare(request)
    report("started", id=rid, remote=request.remote)
    chunk = bytes(65536)
    for _ in range(size // len(chunk)):
        await response.write(chunk)
    await response.write(bytes(size % len(chunk)))
    await response.write_eof()
    return response


async def work(request: web.Request) -> web.Response:
    """Work that takes ``seconds`` (a query parameter), then answers."""
    rid = request.match_info["id"]
    _watch_finish(request, rid)
    report("started", id=rid, remote=request.remote)
    try:
        await asyncio.sleep(float(request.query["seconds"]))
    except asyncio.CancelledError:
        report("cancelled", id=rid)
        raise
    return web.Response(text="done")


async def write(request: web.Request) -> web.Response:
    """A write: the body read, then ``seconds`` (a query parameter) of work."""
    body = await request.read()
    await asyncio.sleep(float(request.query["seconds"]))
    return web.Response(text=f"wrote {len(body)}")


async def read(request: web.Request) -> web.Response:
    """A read: ``seconds`` (a query parameter) of work, then the answer."""
    await asyncio.sleep(float(request.query["seconds"]))
    return web.Response(text="read")


LOAD_ROUTES = [web.post("/write/{id}", write), web.get("/read/{id}", read)]


async def _ready(app: web.Application) -> None:
    report("ready")


async def create_app(*, metrics: bool = False) -> web.Application:
    """The app (an async factory, as gunicorn's aiohttp worker needs); ``metrics``: with
    aiodelay's Prometheus metrics at ``/metrics``."""
    app = web.Application()
    aiodelay.setup(app)  # outermost: it sees the client through the middleware below
    await XForwardedRelaxed().setup(app)
    if metrics:
        aiodelay.prometheus.setup(app)  # its observer first: counted, then reported
    aiodelay.add_observer(app, _Witness())
    app.on_startup.append(_ready)
    app.add_routes(
        [
            web.get("/hold/{id}", hold),
            web.get("/stream/{id}", stream),
            web.get("/download/{id}", download),
            # The same download through nginx's /stream/ location (proxy_buffering off).
            web.get("/stream/download/{id}", download),
            web.get("/work/{id}", work),
            *LOAD_ROUTES,
        ]
    )
    return app


async def serve_plain() -> web.AppRunner:
    """The reload test's control: the load's routes on aiohttp alone (no aiodelay), in the
    same runner as ``serve()``."""
    app = web.Application()
    app.on_startup.append(_ready)
    app.add_routes(LOAD_ROUTES)
    return _runner(app)


async def serve() -> web.AppRunner:
    """What gunicorn runs: the app in a runner whose ``shutdown_timeout`` fits in gunicorn's
    ``--graceful-timeout`` (given an app, the worker would use 95% of it, and aiohttp waits
    that twice: the arbiter's SIGKILL would come first)."""
    return _runner(await create_app())


async def serve_metrics() -> web.AppRunner:
    """``serve()``, with ``aiodelay.prometheus.setup(app)``."""
    return _runner(await create_app(metrics=True))


def _runner(app: web.Application) -> web.AppRunner:
    return web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT)
