"""A storm of drops: aiodelay, aiohttp's own switch and Twisted side by side, in one run.

For each server kind

- ``aiohttp``: aiohttp with ``handler_cancellation=True`` and no aiodelay (aiohttp cancels
  the handler in the transport's ``connection_lost``);
- ``aiohttp-mw``: the same with one empty pass-through ``@web.middleware``: what any
  middleware costs a drop (aiohttp then also adds its own ``_fix_request_current_app``
  middleware): the floor for aiodelay, which is a middleware;
- ``aiodelay``: ``aiodelay.setup(app)`` on a default server (``handler_cancellation=False``),
  the ``aiodelay`` logger's INFO off;
- ``aiohttp-log``: ``aiohttp``'s server whose handler writes one log line per drop, in the
  same format and to the same place as ``aiodelay-log``'s: what a log line costs by itself;
- ``aiodelay-log``: ``aiodelay`` with its INFO line on (the CLI's format), written to the server's
  stderr, which the harness redirects to a file (``--log-to devnull``: to /dev/null); each
  line is formatted, written and flushed, as a server's log would be;
- ``twisted``: Twisted Web on its default reactor, a leaf ``Resource`` returning
  ``NOT_DONE_YET`` whose ``request.notifyFinish()`` errback records the moment (skipped with
  a note when Twisted is not installed: ``pip install -e '.[bench]'``),
- ``aiodelay@LABEL`` and ``aiodelay-log@LABEL``, with ``--aiodelay-path [LABEL=]DIR``: the two
  aiodelay kinds (those of them in ``--kinds``) served with the aiodelay of another checkout,
  DIR (first on the server's PYTHONPATH), to compare two versions of the code in one run,

the script measures, each kind's server in a process of its own pinned to one CPU and the
client (this process) pinned to another:

1. **Storm**: ``--count`` clients (default 5,000) each connect and send ``GET /hold/<i>``;
   the handler records ``time.monotonic()`` at its start and waits for ever. When the N-th
   handler has started, the server says so on its stdout; the server's RSS is read (after
   ``gc.collect()`` in the server; with ``--no-collect`` without one: a real server meets a
   storm uncollected, and a collection its held requests made due may then land in the
   storm); then the client closes every socket in one tight loop, taking
   ``time.monotonic()`` just before each ``close()``: a FIN, or with ``SO_LINGER`` 0 an RST
   (a server per storm). The handler's ``except CancelledError`` (Twisted: the
   errback) takes ``time.monotonic()`` too; CLOCK_MONOTONIC is one clock for the whole
   machine on Linux, so latency_i = cancelled_i - closed_i across the two processes. The
   script prints p50/p90/p99/max per kind and each kind's p99 over aiohttp's, and the
   garbage collections of each generation that ran in the server from just before the
   first close until it was idle again (counted with ``gc.callbacks``), with their CPU time
   and longest pause. Two storms of each close (``--storms``):

   - ``paced``: the server runs while the client closes; each latency counts from the
     request's own close. The storm goes at the client's pace, which varies (below);
   - ``burst``: the server process is stopped (SIGSTOP) while the client closes and let go
     on (SIGCONT) after the last close, so that every kind finds all N drops waiting at
     the same instant; each latency counts from that instant.
2. **Memory per held request**: (server RSS with N held - RSS idle) / N from the storms,
   and with ``--tracemalloc`` also traced bytes, from servers of their own (tracemalloc
   slows a server down, so it never runs in a timed storm).
3. **Single drop**: ``--rounds`` rounds per close kind of one request held and dropped at a
   time (the approach of ``latency.py``, across processes: the request is held without any
   response byte sent, as in the storm).

What keeps the comparison fair, and what the script prints so that a reader can judge it:

- every kind is served the same way: 127.0.0.1, the same listen backlog, no access log, the
  same handler shape (record, wait, record on cancellation) and the same warm-up;
- the client's closing is not instantaneous: a ``close()`` costs 7 to 35 us here (it also
  delivers the FIN through the loopback), so 5,000 closes spread over 40 to 150 ms, and a
  paced storm is gentler for a server whose client happened to close slower. Each storm
  prints how long the client took; the burst storms do not depend on it;
- this machine may be shared: each storm prints the server's CPU time per drop (what a
  drop cost it, little disturbed by other processes) and how long the server waited for
  its CPU while other processes ran (``/proc/PID/schedstat``; a storm in which that passes
  a tenth of its time gets a note), and the load average is printed at the start and the
  end; ``--repeat`` runs the storms several times, rotating the order of the kinds, and
  the summary gives medians across repeats. (A lower nice value for the server did not
  make it wait less on this machine, so the script does not offer one.)

Every wait has a timeout (``--timeout``), every server stops by itself when its stdin
closes or after 15 minutes, and every loop is bounded.

Run (from the repository root, in the project's virtualenv, with ``.[bench]`` for Twisted)::

    python benchmarks/storm.py                      # 5,000 per storm, all kinds, ~1.5 min
    python benchmarks/storm.py --count 1000 --closes FIN --kinds aiohttp,aiodelay
    python benchmarks/storm.py --uvloop --repeat 3 --tracemalloc
    python benchmarks/storm.py --count 5000 --no-collect --repeat 3 --rounds 0
    python benchmarks/storm.py --kinds aiohttp,aiodelay --aiodelay-path /tmp/base
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import platform
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from _report import describe_machine, git, ms, percentile, version
from _serve import (
    add_checkout_option,
    base_kind,
    checkout_env,
    checkout_kinds,
    describe_checkouts,
    pin_to_cpu,
    raise_fd_limit,
    read_rss,
    two_cpus,
)

KINDS = ("aiohttp", "aiohttp-mw", "aiodelay", "aiohttp-log", "aiodelay-log", "twisted")
#: Kinds whose server writes a log line per drop to its stderr.
LOGGING = ("aiohttp-log", "aiodelay-log")
#: The kinds that --aiodelay-path serves again with another checkout's aiodelay.
AIODELAY = ("aiodelay", "aiodelay-log")
CLOSES = ("FIN", "RST")
MODES = ("paced", "burst")
#: The event loop (reactor) each kind's server said it runs, for the report.
LOOPS: dict[str, str] = {}
#: The listen backlog of every server (aiohttp's default is 128, Twisted's 50): a backlog
#: that overflows while the storm's connections are opened makes the client retry SYNs after
#: a second, which only slows the setup, but it is set alike for all.
BACKLOG = 1024
#: Requests held and dropped (with the storm's close) before a server's idle RSS is read.
WARMUP = 50
#: Warm-up rounds before the timed single drops.
SINGLE_WARMUP = 20
#: Connections being opened at once by the client.
CONNECTING = 100
#: A server stops by itself after this long, whatever happens to this script.
MAX_SERVER_SECONDS = 900.0
#: Pause after each single drop, so that the server has finished closing that connection.
SINGLE_PAUSE = 0.002


# -- the server side -----------------------------------------------------------------------


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


def serve_aiohttp(kind: str, *, use_uvloop: bool, log_format: str) -> None:
    """The body of a ``--serve`` child of every kind but ``twisted``."""
    from aiohttp import web

    import aiodelay

    delay_logger = logging.getLogger("aiodelay")
    delay_logger.setLevel(logging.WARNING)
    # aiohttp-log's handler writes a line like aiodelay's INFO line, through the same handler.
    drop_log = logging.getLogger("aiodelay" if kind == "aiodelay-log" else "storm")
    if kind in LOGGING:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(log_format, "%H:%M:%S"))
        drop_log.addHandler(handler)
        drop_log.setLevel(logging.INFO)
        drop_log.propagate = False

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def emit(line: str) -> None:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

        app = web.Application()

        def extra() -> dict[str, Any]:
            if not kind.startswith("aiodelay"):
                return {}
            return {"aiodelay_cancelled": aiodelay.stats(app).cancelled}

        recorder = Recorder(emit, extra)

        async def hold(request: web.Request) -> web.StreamResponse:
            i = int(request.match_info["i"])
            started = time.monotonic()
            recorder.start(i, started)
            try:
                await loop.create_future()
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
            runner = web.AppRunner(app, handler_cancellation=True)
        else:
            aiodelay.setup(app)
            runner = web.AppRunner(app)

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


# -- the harness: a server process and its control lines ------------------------------------


class Server:
    """A ``--serve KIND`` child: its port, and its stdin/stdout as a line channel."""

    def __init__(self, kind: str, args: argparse.Namespace, cpu: int | None, **opts: Any) -> None:
        self.kind = kind
        self.timeout: float = args.timeout
        argv = [sys.executable, __file__, "--serve", base_kind(kind), "--count", str(args.count)]
        if cpu is not None:
            argv += ["--cpu", str(cpu)]
        if args.uvloop:
            argv.append("--uvloop")
        if opts.get("tracemalloc"):
            argv.append("--tracemalloc")
        self.argv = argv
        self.env = checkout_env(kind, args.aiodelay_path)
        self.log_to: str = args.log_to
        self.port = 0
        self.loop_name = ""
        self._buffer = b""
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> Server:
        if base_kind(self.kind) in LOGGING and self.log_to == "devnull":
            self._stderr = open(os.devnull, "wb")
        else:
            self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=self.env,
        )
        try:
            _, port, self.loop_name = self.expect("PORT").split()
            self.port = int(port)
            LOOPS[self.kind] = self.loop_name
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def send(self, line: str) -> None:
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()

    def expect(self, word: str, timeout: float | None = None) -> str:
        """The server's next line, which must start with ``word``."""
        assert self._proc is not None
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                raise RuntimeError(f"{self.kind} server: no {word} line within the timeout")
            data = os.read(fd, 1 << 20)
            if not data:
                raise RuntimeError(f"{self.kind} server exited: {self.stderr_tail()}")
            self._buffer += data
        raw, self._buffer = self._buffer.split(b"\n", 1)
        line = raw.decode()
        if not line.startswith(word):
            raise RuntimeError(f"{self.kind} server said {line[:200]!r}, not {word}")
        return line

    def command(self, line: str) -> str:
        self.send(line)
        return self.expect(line.split()[0])

    def arm(self, n: int) -> None:
        self.command(f"ARM {n}")

    def memory(self, collect: bool = True) -> tuple[int, int]:
        _, rss, traced = self.command("MEM" if collect else "MEM raw").split()
        return int(rss), int(traced)

    def collections(self) -> dict[str, Any]:
        """The server's garbage collections since the last call (see :class:`Collections`)."""
        taken: dict[str, Any] = json.loads(self.command("GC").split(" ", 1)[1])
        return taken

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self.command("REPORT").split(" ", 1)[1])
        return report

    def count(self) -> str:
        return self.command("COUNT")

    def stderr_text(self) -> str:
        """What the server wrote to stderr so far ("" when that went to /dev/null)."""
        stderr = self._stderr
        if stderr is None or not hasattr(stderr, "seek") or stderr.name == os.devnull:
            return ""
        stderr.flush()
        stderr.seek(0)
        text: str = stderr.read().decode(errors="replace")
        stderr.seek(0, os.SEEK_END)
        return text

    def stderr_tail(self) -> str:
        tail = self.stderr_text().strip().splitlines()[-5:]
        return " | ".join(tail) or "(nothing on stderr)"

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):  # never leave a server stopped by paused()
                os.kill(proc.pid, signal.SIGCONT)
            assert proc.stdin is not None
            assert proc.stdout is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


# -- the client side -----------------------------------------------------------------------


def request_line(i: int) -> bytes:
    return f"GET /hold/{i} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


async def open_held(port: int, ids: Sequence[int]) -> list[socket.socket]:
    """One connection per id, in the order of ``ids``, each with its ``GET /hold/<id>`` sent."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECTING)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in ids]

    async def one(sock: socket.socket, i: int) -> None:
        sock.setblocking(False)
        async with gate:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, request_line(i))

    try:
        await asyncio.gather(*(one(sock, i) for sock, i in zip(socks, ids, strict=True)))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def hold(server: Server, ids: Sequence[int], timeout: float) -> list[socket.socket]:
    """Connections to ``server`` whose handlers have all started (in the order of ``ids``)."""
    server.arm(len(ids))

    async def opened() -> list[socket.socket]:
        return await asyncio.wait_for(open_held(server.port, ids), timeout)

    socks = asyncio.run(opened())
    try:
        server.expect("STARTED")
    except RuntimeError as exc:
        for sock in socks:
            sock.close()
        raise RuntimeError(f"{exc} ({server.count()} of {len(ids)})") from None
    return socks


def close_all(socks: Sequence[socket.socket], close: str) -> tuple[list[float], float]:
    """Close every socket in one tight loop; each one's ``time.monotonic()`` just before its
    ``close()``, and the moment the loop ended."""
    if close == "RST":
        linger = struct.pack("ii", 1, 0)
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    closed_at = [0.0] * len(socks)
    monotonic = time.monotonic
    was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle would pause the storm for the client alone
    try:
        for index, sock in enumerate(socks):
            closed_at[index] = monotonic()
            sock.close()
        ended = monotonic()
    finally:
        if was_enabled:
            gc.enable()
    return closed_at, ended


def latencies(
    report: dict[str, Any], ids: Sequence[int], closed_at: Sequence[float]
) -> list[float]:
    started, cancelled = report["started"], report["cancelled"]
    missing = [i for i in ids if str(i) not in started or str(i) not in cancelled]
    if missing:
        raise RuntimeError(f"{len(missing)} requests without a start or a cancellation")
    return [cancelled[str(i)] - closed for i, closed in zip(ids, closed_at, strict=True)]


def sched(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds waiting for one) of a process's main thread so far."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as schedstat:
            run, wait = schedstat.read().split()[:2]
        return int(run) / 1e9, int(wait) / 1e9
    except (OSError, ValueError):
        return math.nan, math.nan


def settle(pid: int, timeout: float) -> tuple[float, float]:
    """:func:`sched` once the server has gone idle: it neither ran nor waited to run for
    20 ms (it has finished tearing the connections down), or after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = sched(pid)
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = sched(pid)
        if now[0] - last[0] < 2e-4 and now[1] - last[1] < 2e-4:
            return now
        last = now
    return last


@dataclass
class Storm:
    """What one storm measured."""

    kind: str
    close: str
    mode: str  # paced or burst
    latencies: list[float]
    closing: float  # seconds the client took to close all its sockets
    drained: float  # first close (burst: the server's resumption) -> last cancellation, s
    cpu: float  # server CPU seconds from just before the first close until it was idle again
    waited: float  # seconds the server waited for its CPU meanwhile (other processes ran)
    rss_per_request: float
    load: float  # 1-minute load average right after the storm
    # The server's garbage collections from just before the first close until it was idle
    # again: how many of each generation, their CPU seconds, the longest pause (wall clock).
    gc_counts: list[int] = field(default_factory=lambda: [0, 0, 0])
    gc_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    gc_longest: float = 0.0
    notes: list[str] = field(default_factory=list)


def process_state(pid: int) -> str:
    """The state letter of ``/proc/PID/stat`` (``T``: stopped)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def paused(pid: int, timeout: float) -> Iterator[list[float]]:
    """The server process stopped (SIGSTOP) for the body; yields a list that holds, after
    the body, the ``time.monotonic()`` just before it was let go on (SIGCONT)."""
    resumed: list[float] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout
        while process_state(pid) not in "Tt":
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {pid} did not stop on SIGSTOP")
            time.sleep(0.001)
        yield resumed
    finally:
        resumed.append(time.monotonic())
        os.kill(pid, signal.SIGCONT)


def run_storm(kind: str, close: str, mode: str, args: argparse.Namespace, cpu: int | None) -> Storm:
    count: int = args.count
    with Server(kind, args, cpu) as server:
        warm = range(count, count + WARMUP)
        close_all(hold(server, warm, args.timeout), close)
        server.expect("CANCELLED")
        server.report()
        collect = not args.no_collect
        rss_idle, _ = server.memory(collect)
        ids = range(count)
        socks = hold(server, ids, args.timeout)
        rss_held, _ = server.memory(collect)
        server.collections()  # counted from here
        if mode == "paced":
            cpu_before, wait_before = sched(server.pid)
            closed_at, ended = close_all(socks, close)
            start = closed_at[0]
        else:
            with paused(server.pid, args.timeout) as resumed:
                closed_at, ended = close_all(socks, close)
                cpu_before, wait_before = sched(server.pid)
            start = resumed[0]
        server.expect("CANCELLED")
        cpu_after, wait_after = settle(server.pid, min(args.timeout, 5.0))
        collections = server.collections()
        report = server.report()
        # burst: every close is in the kernel before the server runs again; each request's
        # latency is from that moment.
        lat = latencies(report, ids, closed_at if mode == "paced" else [start] * count)
        last_cancel = max(report["cancelled"][str(i)] for i in ids)
        storm = Storm(
            kind=kind,
            close=close,
            mode=mode,
            latencies=sorted(lat),
            closing=ended - closed_at[0],
            drained=last_cancel - start,
            cpu=cpu_after - cpu_before,
            waited=wait_after - wait_before,
            rss_per_request=(rss_held - rss_idle) / count,
            load=os.getloadavg()[0],
            gc_counts=collections["counts"],
            gc_seconds=collections["seconds"],
            gc_longest=collections["longest"],
        )
        if storm.waited > 0.1 * storm.drained:
            share = storm.waited / storm.drained
            storm.notes.append(
                f"the server waited for its CPU {share:.0%} of the storm's time: other processes "
                "took it"
            )
        expected = count + WARMUP
        if "aiodelay_cancelled" in report and report["aiodelay_cancelled"] != expected:
            storm.notes.append(
                f"aiodelay counted {report['aiodelay_cancelled']} cancellations, not {expected}"
            )
        text = server.stderr_text()
        if base_kind(kind) in LOGGING:
            if server.log_to == "devnull":
                storm.notes.append("log lines went to /dev/null (not counted)")
            else:
                lines = text.count("interrupted by")
                storm.notes.append(f"{lines} log lines ({len(text.encode()) / 1e6:.2f} MB) written")
                if lines != expected:
                    storm.notes.append(f"expected {expected} log lines")
        elif text.strip():
            storm.notes.append("server stderr: " + server.stderr_tail())
    return storm


def run_tracemalloc(kind: str, args: argparse.Namespace, cpu: int | None) -> float:
    """Traced bytes per held request, in a server of its own with tracemalloc on."""
    count: int = args.count
    with Server(kind, args, cpu, tracemalloc=True) as server:
        if server.memory()[1] < 0:
            raise RuntimeError(f"{kind} server: tracemalloc is not tracing")
        close_all(hold(server, range(count, count + WARMUP), args.timeout), "FIN")
        server.expect("CANCELLED")
        server.report()
        idle = server.memory()[1]
        socks = hold(server, range(count), args.timeout)
        held = server.memory()[1]
        close_all(socks, "FIN")
        server.expect("CANCELLED")
    return (held - idle) / count


def run_single(
    kind: str, closes: Sequence[str], args: argparse.Namespace, cpu: int | None
) -> dict[str, list[float]]:
    """One request held and dropped at a time, ``args.rounds`` rounds per close kind (which
    alternate, so that both see the same conditions)."""
    result: dict[str, list[float]] = {close: [] for close in closes}
    with Server(kind, args, cpu) as server:
        closed_at: dict[int, tuple[str, float]] = {}
        total = SINGLE_WARMUP + args.rounds * len(closes)
        for i in range(total):
            close = closes[i % len(closes)]
            server.arm(1)
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=args.timeout)
            try:
                sock.sendall(request_line(i))
                server.expect("STARTED")
            except BaseException:
                sock.close()
                raise
            (at,), _ = close_all([sock], close)
            server.expect("CANCELLED")
            if i >= SINGLE_WARMUP:
                closed_at[i] = (close, at)
            time.sleep(SINGLE_PAUSE)
        cancelled = server.report()["cancelled"]
    for i, (close, at) in closed_at.items():
        result[close].append(cancelled[str(i)] - at)
    return {close: sorted(values) for close, values in result.items()}


# -- reporting -----------------------------------------------------------------------------


def machine() -> list[str]:
    """The machine and the versions, for the report's header."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [
        f"machine: {describe_machine()}, Python {platform.python_version()}",
        f"versions: aiohttp {version('aiohttp')}, aiodelay {version('aiodelay')} "
        f"(git {git(here, 'rev-parse', '--short', 'HEAD')}), uvloop {version('uvloop')}, "
        f"Twisted {version('twisted')}",
    ]


def print_storms(
    storms: list[Storm], kinds: Sequence[str], closes: Sequence[str], modes: Sequence[str]
) -> None:
    print(
        "\nstorm: client close (burst: the server let go on) -> handler saw it (ms); p99 ratio "
        "to aiohttp's; medians across repeats when --repeat > 1"
    )
    print(f"{'':26s}{'p50':>9s}{'p90':>9s}{'p99':>9s}{'max':>9s}  {'p99/aiohttp':>11s}  runs")
    groups = [(mode, close) for mode in modes for close in closes]
    for mode, close in groups:
        base = None
        for kind in kinds:
            runs = [s for s in storms if (s.kind, s.close, s.mode) == (kind, close, mode)]
            if not runs:
                continue
            cells = "".join(
                f"{statistics.median(percentile(s.latencies, pct) for s in runs) * 1e3:9.3f}"
                for pct in (50, 90, 99, 100)
            )
            p99 = statistics.median(percentile(s.latencies, 99) for s in runs)
            if kind == "aiohttp":
                base = p99
            ratio = f"{p99 / base:10.2f}x" if base else f"{'':11s}"
            each = ", ".join(f"{percentile(s.latencies, 99) * 1e3:.1f}" for s in runs)
            print(f"{kind:13s} {mode:6s} {close:4s}{cells}  {ratio}  p99s {each}")
    print(
        "\nwhat a drop cost the server (CPU time from the first close until idle, per drop; "
        "little disturbed by other processes), the part of it in garbage collections, and the "
        "storms' conditions (medians)"
    )
    print(f"{'':26s}{'cpu us/drop':>12s}{'vs aiohttp':>11s}{'gc us/drop':>11s}"
          f"{'client closing ms':>19s}{'server waited ms':>18s}")  # fmt: skip
    for mode, close in groups:
        base = None
        for kind in kinds:
            runs = [s for s in storms if (s.kind, s.close, s.mode) == (kind, close, mode)]
            if not runs:
                continue
            per_drop = statistics.median(s.cpu / len(s.latencies) for s in runs)
            if kind == "aiohttp":
                base = per_drop
            ratio = f"{per_drop / base:10.2f}x" if base else f"{'':11s}"
            in_gc = statistics.median(sum(s.gc_seconds) / len(s.latencies) for s in runs)
            closing = statistics.median(s.closing for s in runs)
            waited = statistics.median(s.waited for s in runs)
            print(
                f"{kind:13s} {mode:6s} {close:4s}{per_drop * 1e6:12.1f}{ratio}{in_gc * 1e6:11.1f}"
                f"{closing * 1e3:19.1f}{waited * 1e3:18.1f}"
            )
    print_collections(storms, kinds, groups)
    print("\nmemory per held request (RSS, from the storms' servers; KB = 1000 B)")
    base_rss = None
    for kind in kinds:
        values = [s.rss_per_request for s in storms if s.kind == kind]
        if not values:
            continue
        mean = statistics.fmean(values)
        if kind == "aiohttp":
            base_rss = mean
        diff = f"  {(mean - base_rss) / 1e3:+6.2f} KB vs aiohttp" if base_rss is not None else ""
        each = ", ".join(f"{v / 1e3:.2f}" for v in values)
        print(f"{kind:13s} {mean / 1e3:6.2f} KB{diff}   (storms: {each})")


def gc_text(counts: Sequence[float]) -> str:
    """Collections per generation as ``gen0/gen1/gen2``."""
    return "/".join(f"{count:g}" for count in counts)


def print_collections(
    storms: list[Storm], kinds: Sequence[str], groups: Sequence[tuple[str, str]]
) -> None:
    print(
        "\ngarbage collections in the server during the storm (from just before the first close "
        "until idle; medians), per generation 0/1/2, the CPU time they took and the longest "
        "pause (wall clock)"
    )
    print(f"{'':26s}{'gen 0/1/2':>12s}{'cpu ms':>9s}{'longest ms':>12s}  runs")
    for mode, close in groups:
        for kind in kinds:
            runs = [s for s in storms if (s.kind, s.close, s.mode) == (kind, close, mode)]
            if not runs:
                continue
            counts = [statistics.median(s.gc_counts[gen] for s in runs) for gen in range(3)]
            total = statistics.median(sum(s.gc_seconds) for s in runs)
            longest = statistics.median(s.gc_longest for s in runs)
            each = ", ".join(gc_text(s.gc_counts) for s in runs)
            print(
                f"{kind:13s} {mode:6s} {close:4s}{gc_text(counts):>12s}{total * 1e3:9.1f}"
                f"{longest * 1e3:12.1f}  {each}"
            )


def print_storm(storm: Storm) -> None:
    lat = storm.latencies
    count = len(lat)
    print(
        f"{storm.kind:13s} {storm.mode:6s} {storm.close:4s}{ms(lat, (50, 90, 99, 100))}"
        f"  closing {storm.closing * 1e3:6.1f} ms ({storm.closing / count * 1e6:5.1f} us/close)"
        f"  drained {storm.drained * 1e3:6.1f} ms  server cpu {storm.cpu / count * 1e6:5.1f} "
        f"us/drop, waited {storm.waited * 1e3:6.1f} ms  rss {storm.rss_per_request / 1e3:5.2f} "
        f"KB/req  load {storm.load:.2f}  gc {gc_text(storm.gc_counts)} "
        f"({sum(storm.gc_seconds) * 1e3:.1f} ms cpu, longest {storm.gc_longest * 1e3:.1f})",
        flush=True,
    )
    for note in storm.notes:
        print(f"{'':26s}note: {note}", flush=True)


def measure(args: argparse.Namespace) -> int:
    # aiohttp first: the others' ratios are to it (the order of the storms rotates anyway).
    kinds = checkout_kinds(
        [kind for kind in KINDS if kind in args.kinds], args.aiodelay_path, AIODELAY
    )
    closes: list[str] = args.closes
    modes: list[str] = args.storms
    if "twisted" in kinds and version("twisted") == "not installed":
        print("note: Twisted is not installed, skipping the twisted kind "
              "(pip install -e '.[bench]')")  # fmt: skip
        kinds = [kind for kind in kinds if kind != "twisted"]
    if not kinds:
        print("nothing to measure")
        return 1
    limit = raise_fd_limit(args.count + WARMUP + 256)
    if limit < args.count + WARMUP + 256:
        print(f"open-files limit is {limit}: too low for {args.count} connections")
        return 1
    cpus = two_cpus()
    server_cpu, client_cpu = cpus if cpus else (None, None)
    about_machine = machine()  # before pinning: the CPUs this run may use
    pin_to_cpu(client_cpu)

    print("command: python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]))
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for line in about_machine + describe_checkouts(args.aiodelay_path):
        print(line)
    loads = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at start: {loads} (1, 5, 15 min)")
    pinning = f"servers on CPU {server_cpu}, client on CPU {client_cpu}" if cpus else "none"
    print(f"pinning: {pinning}")
    loop_name = "uvloop" if args.uvloop else "asyncio"
    print(
        f"settings: {args.count} requests per storm, storms {','.join(modes)}, closes "
        f"{','.join(closes)}, "
        f"repeat {args.repeat}, {args.rounds} single drops per close, aiohttp kinds on "
        f"{loop_name}, listen backlog {BACKLOG}, warm-up {WARMUP} held+dropped, timeout "
        f"{args.timeout:g} s"
    )
    collected = "none (--no-collect)" if args.no_collect else "gc.collect() before each storm"
    print(f"servers' collection before a storm: {collected}")
    log_sink = "a file" if args.log_to == "file" else "/dev/null"
    print(f"log kinds: a line per drop to the server's stderr, redirected to {log_sink}")

    print(
        f"\n{'storms':26s}{'p50':>9s}{'p90':>9s}{'p99':>9s}{'max':>9s}  (ms, client close -> "
        "handler saw it)"
    )
    storms: list[Storm] = []
    for repeat in range(args.repeat):
        order = kinds[repeat % len(kinds) :] + kinds[: repeat % len(kinds)]
        for mode in modes:
            for close in closes:
                for kind in order:
                    storm = run_storm(kind, close, mode, args, server_cpu)
                    storms.append(storm)
                    print_storm(storm)
    print_storms(storms, kinds, closes, modes)

    if args.tracemalloc:
        print("\nmemory per held request (tracemalloc, servers of their own)")
        base = None
        for kind in kinds:
            per = run_tracemalloc(kind, args, server_cpu)
            if kind == "aiohttp":
                base = per
            diff = f"  {(per - base) / 1e3:+6.2f} KB vs aiohttp" if base is not None else ""
            print(f"{kind:13s} {per / 1e3:6.2f} KB{diff}", flush=True)

    if args.rounds:
        print(f"\nsingle drop, one at a time ({args.rounds} rounds per close, ms)")
        print(f"{'':20s}{'p50':>9s}{'p90':>9s}{'p99':>9s}{'max':>9s}")
        for kind in kinds:
            singles = run_single(kind, closes, args, server_cpu)
            for close in closes:
                print(f"{kind:13s} {close:5s} {ms(singles[close], (50, 90, 99, 100))}", flush=True)

    loads = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average at the end: {loads}")
    print("servers' event loops: " + ", ".join(f"{kind} {loop}" for kind, loop in LOOPS.items()))
    return 0


def comma_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        items = [item.strip() for item in value.split(",") if item.strip()]
        wrong = [item for item in items if item not in choices]
        if wrong or not items or len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of distinct {', '.join(choices)}; got {value!r}"
            )
        return items

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="a storm of drops: aiohttp's handler_cancellation, aiodelay and Twisted"
    )
    parser.add_argument(
        "--count", type=int, default=5000, help="requests held per storm (default 5000)"
    )
    parser.add_argument(
        "--kinds",
        type=comma_list(KINDS),
        default=list(KINDS),
        help=f"servers to compare (default {','.join(KINDS)})",
    )
    parser.add_argument(
        "--closes",
        type=comma_list(CLOSES),
        default=list(CLOSES),
        help="how clients leave: FIN (close), RST (SO_LINGER 0) (default FIN,RST)",
    )
    parser.add_argument(
        "--storms",
        type=comma_list(MODES),
        default=list(MODES),
        help="paced: latency from each client's own close while the server runs; burst: the "
        "server is stopped while the client closes, latency from when it runs again "
        "(default paced,burst)",
    )
    parser.add_argument("--uvloop", action="store_true", help="aiohttp servers on uvloop")
    parser.add_argument(
        "--rounds", type=int, default=300, help="single drops per close (default 300; 0: none)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="storms per kind and close (default 1)"
    )
    parser.add_argument(
        "--tracemalloc", action="store_true", help="also measure traced bytes per held request"
    )
    parser.add_argument(
        "--log-to",
        choices=("file", "devnull"),
        default="file",
        help="where the log kinds' servers' stderr goes (default: a temporary file)",
    )
    parser.add_argument(
        "--no-collect",
        action="store_true",
        help="no gc.collect() in the servers before a storm, as in a real server (the RSS "
        "per held request is then read without one too)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds allowed per wait (default 60)"
    )
    add_checkout_option(parser)
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 15000:
        parser.error("--count must be between 1 and 15000")
    if not 0 <= args.rounds <= 100_000:
        parser.error("--rounds must be between 0 and 100000")
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be between 1 and 20")
    if not 0 < args.timeout <= 600:
        parser.error("--timeout must be more than 0 and at most 600 seconds")
    if args.serve:
        pin_to_cpu(args.cpu)
        raise_fd_limit(args.count + WARMUP + 256)
        if args.tracemalloc:
            tracemalloc.start()
        if args.serve == "twisted":
            serve_twisted()
        else:
            serve_aiohttp(
                args.serve, use_uvloop=args.uvloop, log_format="%(asctime)s %(name)s: %(message)s"
            )
        return 0
    try:
        return measure(args)
    except RuntimeError as exc:
        print(f"storm.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
