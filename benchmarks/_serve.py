"""Shared plumbing of the benchmark scripts: run an app in a process of its own.

A script re-runs itself with ``--serve KIND``: that child builds the app, serves it on a free
port of 127.0.0.1 with a plain ``web.AppRunner(app)`` (aiohttp's defaults), prints
``PORT <n>`` on stdout and serves until its stdin closes (the parent stops it, or died). It
also stops by itself after ``max_seconds``, so no server outlives a benchmark.
"""

from __future__ import annotations

import asyncio
import os
import resource
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from types import TracebackType

from aiohttp import web

__all__ = (
    "ServerProcess",
    "cpu_seconds",
    "pin_to_cpu",
    "raise_fd_limit",
    "read_rss",
    "run_server",
    "two_cpus",
)

#: A server child stops by itself after this long, whatever happens to its parent.
MAX_SERVER_SECONDS = 1800.0


def two_cpus() -> tuple[int, int] | None:
    """Two distinct CPUs this process may use (server, load generator), or None."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return cpus[0], cpus[1]


def pin_to_cpu(cpu: int | None) -> None:
    """Pin this process to ``cpu`` (no-op for None or where the OS cannot)."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def raise_fd_limit(needed: int) -> int:
    """Raise the soft open-files limit to at least ``needed`` if the hard limit allows it.

    Returns the soft limit in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def read_rss(pid: int | str = "self") -> int:
    """Resident set size of a process in bytes, from ``/proc/PID/status`` (VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """CPU time a process has run so far, in seconds.

    From ``/proc/PID/schedstat`` (nanoseconds, the main thread: a server's event loop) where
    the kernel has it, else from the clock ticks of ``/proc/PID/stat`` (all threads).
    """
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as schedstat:
            return int(schedstat.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def run_server(
    make_app: Callable[[], web.Application],
    *,
    use_uvloop: bool,
    cpu: int | None,
    max_seconds: float = MAX_SERVER_SECONDS,
) -> None:
    """Serve ``make_app()`` until stdin closes; the body of a ``--serve`` child."""
    pin_to_cpu(cpu)
    main = _serve(make_app, max_seconds)
    if use_uvloop:
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


async def _serve(make_app: Callable[[], web.Application], max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stdin = sys.stdin.fileno()
    # Readable stdin means EOF here: the parent never writes, it only closes the pipe.
    loop.add_reader(stdin, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    deadline = loop.call_later(max_seconds, stop.set)
    runner = web.AppRunner(make_app())
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(f"PORT {port}", flush=True)
        await stop.wait()
    finally:
        deadline.cancel()
        loop.remove_reader(stdin)
        await runner.cleanup()


class ServerProcess:
    """A ``--serve`` child of a benchmark script, as a context manager.

    ``argv`` is the child's command line after the interpreter; on entry this waits for the
    child's ``PORT`` line (at most ``timeout`` seconds), on exit it closes the child's stdin
    and waits for it to stop (killing it if it does not within ``timeout``).
    """

    def __init__(self, argv: Sequence[str], *, timeout: float = 15.0) -> None:
        self.argv = [sys.executable, *argv]
        self.timeout = timeout
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "the server is not running"
        return self._proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self._proc = proc
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
            line = proc.stdout.readline() if ready else ""
            if not line.startswith("PORT "):
                raise RuntimeError(f"server {self.argv[1:]} did not start: {line!r}")
            self.port = int(line.split()[1])
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

    def _stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
