"""The drop servers: the held-request server of every kind that ``storm.py``,
``single_drop.py`` and ``held_memory.py`` drop requests on, run as a child process.

    python benchmarks/_dropserver.py KIND --count N [--cpu C] [--uvloop] [--tracemalloc]

(the parent side, :class:`_drops.DropServer`, starts it so; nobody needs to by hand).
``drop_instructions.py`` serves the same apps (:func:`make_runner`) in its own process. Every
kind serves ``GET /hold/<i>`` on a free port of 127.0.0.1 with the same listen backlog and no
access log; the handler records ``time.monotonic()`` when it starts and when it sees its
client leave (its ``CancelledError``, Twisted: the ``notifyFinish()`` errback), and waits for
ever in between:

- ``aiohttp``: aiohttp with ``handler_cancellation=True`` and no aiodelay (aiohttp cancels
  the handler in the transport's ``connection_lost``);
- ``aiohttp-mw``: the same with one empty pass-through ``@web.middleware``: what any
  middleware costs a drop (aiohttp then also adds its own ``_fix_request_current_app``
  middleware): the floor for aiodelay, which is a middleware;
- ``aiodelay``: ``aiodelay.setup(app)`` on a default server (``handler_cancellation=False``),
  the ``aiodelay`` logger's INFO off;
- ``aiohttp-log``: ``aiohttp``'s server whose handler writes one log line per drop, in the
  same format and to the same place as ``aiodelay-log``'s: what a log line costs by itself;
- ``aiodelay-log``: ``aiodelay`` with its INFO line on (the CLI's format), written to the
  server's stderr, which the parent redirects to a file or /dev/null; each line is
  formatted, written and flushed, as a server's log would be;
- ``twisted``: Twisted Web on its default reactor, a leaf ``Resource`` returning
  ``NOT_DONE_YET`` whose ``request.notifyFinish()`` errback records the moment (Twisted is
  in the ``bench`` extra: ``pip install -e '.[bench]'``).

The server says ``PORT <n> <event loop>`` on its stdout, then answers the parent's commands,
a line each on its stdin (:class:`Recorder`), and stops when its stdin closes or after
``MAX_SERVER_SECONDS``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from _serve import pin_to_cpu, raise_fd_limit, read_rss

if TYPE_CHECKING:
    from aiohttp.web import AppRunner

KINDS = ("aiohttp", "aiohttp-mw", "aiodelay", "aiohttp-log", "aiodelay-log", "twisted")
#: Kinds whose server writes a log line per drop to its stderr.
LOGGING = ("aiohttp-log", "aiodelay-log")
#: The kinds that --aiodelay-path serves again with another checkout's aiodelay.
AIODELAY = ("aiodelay", "aiodelay-log")
#: The listen backlog of every server (aiohttp's default is 128, Twisted's 50): a backlog
#: that overflows while the storm's connections are opened makes the client retry SYNs after
#: a second, which only slows the setup, but it is set alike for all.
BACKLOG = 1024
#: A server stops by itself after this long, whatever happens to its parent.
MAX_SERVER_SECONDS = 900.0
#: The format of the log kinds' line per drop (the CLI's).
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"
#: Requests held and dropped (with the storm's close) before a server's idle RSS is read.
WARMUP = 50


def files_needed(count: int) -> int:
    """Open files a server (or the client) needs for ``count`` held requests and a warm-up."""
    return count + WARMUP + 256


class Collections:
    """The garbage collections of this process, per generation, counted with ``gc.callbacks``
    since the last :meth:`take`: how many ran, the CPU time they took (the thread's: a
    collection during which other processes ran costs no more) and the longest pause (wall
    clock). An explicit ``gc.collect()`` counts too."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = 0.0
        self._began = (0.0, 0.0)
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        now = (time.thread_time(), time.perf_counter())
        if phase == "start":
            self._began = now
            return
        generation = info["generation"]
        self.counts[generation] += 1
        self.seconds[generation] += now[0] - self._began[0]
        self.longest = max(self.longest, now[1] - self._began[1])

    def take(self) -> dict[str, Any]:
        """What was counted since the last call, which starts counting afresh."""
        taken = {"counts": self.counts, "seconds": self.seconds, "longest": self.longest}
        self.counts, self.seconds, self.longest = [0, 0, 0], [0.0, 0.0, 0.0], 0.0
        return taken


class Recorder:
    """The server's record: when each ``/hold/<i>`` handler started and saw its client leave.

    It also answers the harness's commands, one line each on the server's stdin:
    ``ARM n`` (say ``STARTED`` when n more handlers have started and ``CANCELLED`` when n
    more have seen their client leave), ``MEM`` (RSS and traced bytes after
    ``gc.collect()``; ``MEM raw``: without it), ``GC`` (the garbage collections since the
    last ``GC``, as JSON: :class:`Collections`), ``REPORT`` (the record as JSON, then
    forgotten) and ``COUNT``.
    """

    def __init__(self, emit: Callable[[str], None], extra: Callable[[], dict[str, Any]]) -> None:
        self.emit = emit
        self.extra = extra
        self.started: dict[int, float] = {}
        self.cancelled: dict[int, float] = {}
        self.n_started = 0
        self.n_cancelled = 0
        self.want_started = -1
        self.want_cancelled = -1
        self.collections = Collections()

    def start(self, i: int, now: float) -> None:
        self.started[i] = now
        self.n_started += 1
        if self.n_started == self.want_started:
            self.emit(f"STARTED {self.n_started}")

    def cancel(self, i: int, now: float) -> None:
        self.cancelled[i] = now
        self.n_cancelled += 1
        if self.n_cancelled == self.want_cancelled:
            self.emit(f"CANCELLED {self.n_cancelled}")

    def command(self, line: str) -> None:
        word, _, arg = line.strip().partition(" ")
        if word == "ARM":
            self.want_started = self.n_started + int(arg)
            self.want_cancelled = self.n_cancelled + int(arg)
            self.emit("ARMED")
        elif word == "MEM":
            if arg != "raw":
                gc.collect()
            traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else -1
            self.emit(f"MEM {read_rss()} {traced}")
        elif word == "REPORT":
            report = {"started": self.started, "cancelled": self.cancelled, **self.extra()}
            self.started, self.cancelled = {}, {}
            self.emit("REPORT " + json.dumps(report))
        elif word == "GC":
            self.emit("GC " + json.dumps(self.collections.take()))
        elif word == "COUNT":
            self.emit(f"COUNT {self.n_started} {self.n_cancelled}")
        else:
            self.emit(f"ERROR unknown command {line.strip()!r}")


def drop_logger(kind: str, stream: TextIO, log_format: str = LOG_FORMAT) -> logging.Logger:
    """Set up logging for ``kind``: the ``aiodelay`` logger's INFO off, but for the log kinds,
    whose line per drop goes to ``stream`` (each line formatted, written and flushed, as a
    server's log would be); the logger the handler of ``aiohttp-log`` writes its line to."""
    logging.getLogger("aiodelay").setLevel(logging.WARNING)
    # aiohttp-log's handler writes a line like aiodelay's INFO line, through the same handler.
    drop_log = logging.getLogger("aiodelay" if kind == "aiodelay-log" else "storm")
    if kind in LOGGING:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(log_format, "%H:%M:%S"))
        drop_log.addHandler(handler)
        drop_log.setLevel(logging.INFO)
        drop_log.propagate = False
    return drop_log


def make_runner(kind: str, recorder: Recorder, drop_log: logging.Logger) -> AppRunner:
    """The ``AppRunner`` (not set up yet) of the server of ``kind`` (any but ``twisted``),
    whose ``/hold/<i>`` handlers report to ``recorder``; to be set up in the running loop."""
    from aiohttp import web

    import aiodelay

    app = web.Application()

    async def hold(request: web.Request) -> web.StreamResponse:
        i = int(request.match_info["i"])
        started = time.monotonic()
        recorder.start(i, started)
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            now = time.monotonic()
            recorder.cancel(i, now)
            if kind == "aiohttp-log":
                drop_log.info(
                    "%s %s from %s interrupted by a disconnect after %.3fs: %s",
                    request.method,
                    request.path,
                    request.remote,
                    now - started,
                    "cancelled",
                )
            raise
        raise AssertionError("unreachable: the future above is never set")

    app.router.add_get("/hold/{i}", hold)
    if kind == "aiohttp-mw":

        @web.middleware
        async def passthrough(
            request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]
        ) -> web.StreamResponse:
            response: web.StreamResponse = await handler(request)
            return response

        app.middlewares.append(passthrough)
    if not kind.startswith("aiodelay"):
        return web.AppRunner(app, handler_cancellation=True)
    aiodelay.setup(app)
    recorder.extra = lambda: {"aiodelay_cancelled": aiodelay.stats(app).cancelled}
    return web.AppRunner(app)


def serve_aiohttp(kind: str, *, use_uvloop: bool, log_format: str) -> None:
    """The body of a ``--serve`` child of every kind but ``twisted``."""
    from aiohttp import web

    drop_log = drop_logger(kind, sys.stderr, log_format)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def emit(line: str) -> None:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

        recorder = Recorder(emit, dict)
        runner = make_runner(kind, recorder, drop_log)

        pending = b""

        def on_stdin() -> None:
            nonlocal pending
            data = os.read(0, 65536)
            if not data:
                stop.set()
                return
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                recorder.command(line.decode())

        loop.add_reader(0, on_stdin)
        deadline = loop.call_later(MAX_SERVER_SECONDS, stop.set)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0, backlog=BACKLOG)
            await site.start()
            port = runner.addresses[0][1]
            emit(f"PORT {port} {'uvloop' if use_uvloop else type(loop).__name__}")
            await stop.wait()
        finally:
            deadline.cancel()
            loop.remove_reader(0)
            await runner.cleanup()

    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def serve_twisted() -> None:
    """The body of a ``--serve twisted`` child."""
    from twisted.internet import reactor as _reactor
    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver
    from twisted.python.failure import Failure
    from twisted.web import resource, server

    reactor: Any = _reactor

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            recorder.command(line.decode())

        def connectionLost(self, reason: Failure | None = None) -> None:
            if reactor.running:
                reactor.stop()

    control = Control()
    send_line: Callable[[bytes], None] = control.sendLine
    recorder = Recorder(lambda line: send_line(line.encode()), dict)

    class Hold(resource.Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> int:
            i = int(request.postpath[0])
            recorder.start(i, time.monotonic())

            def lost(reason: Failure) -> None:
                now = time.monotonic()
                recorder.cancel(i, now)

            request.notifyFinish().addErrback(lost)
            return server.NOT_DONE_YET

    # Twisted's constructors are untyped, and mypy knows no zope.interface.
    root = resource.Resource()  # type: ignore[no-untyped-call]
    root.putChild(b"hold", Hold())  # type: ignore[no-untyped-call, arg-type]
    site = server.Site(root)  # type: ignore[no-untyped-call] # no logPath: no access log
    stdio.StandardIO(control)  # type: ignore[no-untyped-call]
    port = reactor.listenTCP(0, site, backlog=BACKLOG, interface="127.0.0.1")
    send_line(f"PORT {port.getHost().port} {type(reactor).__name__}".encode())
    reactor.callLater(MAX_SERVER_SECONDS, reactor.stop)
    reactor.run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a drop server (a child of storm.py and co.)")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--count", type=int, required=True, help="requests it will hold")
    parser.add_argument("--cpu", type=int, help="the CPU to pin it to")
    parser.add_argument("--uvloop", action="store_true", help="aiohttp kinds on uvloop")
    parser.add_argument("--tracemalloc", action="store_true", help="trace allocations")
    args = parser.parse_args(argv)
    pin_to_cpu(args.cpu)
    raise_fd_limit(files_needed(args.count))
    if args.tracemalloc:
        tracemalloc.start()
    if args.kind == "twisted":
        serve_twisted()
    else:
        serve_aiohttp(args.kind, use_uvloop=args.uvloop, log_format=LOG_FORMAT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
