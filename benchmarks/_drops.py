"""The client side of the drop servers (``_dropserver.py``), shared by ``storm.py``,
``single_drop.py`` and ``held_memory.py``.

- :class:`DropServer`: a drop server of one kind in a process of its own (a
  :class:`_serve.ServerProcess`), with its control commands as methods;
- :func:`hold` and :func:`close_all`: hold requests on a server until their handlers have all
  started, then close their sockets in one tight loop (a FIN, or with ``SO_LINGER`` 0 an RST);
- the options the three scripts share (:func:`add_server_options`), the kinds they serve
  (:func:`drop_kinds`), and the header of their reports (:func:`header`).

The client runs in the script's own process, pinned to one CPU, the servers on another.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import _dropserver
from _dropserver import AIODELAY, KINDS, LOGGING, files_needed
from _report import describe_machine, git, version
from _serve import (
    ServerProcess,
    add_checkout_option,
    base_kind,
    checkout_env,
    checkout_kinds,
    describe_checkouts,
    pin_to_cpu,
    raise_fd_limit,
    two_cpus,
)

CLOSES = ("FIN", "RST")
#: Connections being opened at once by the client.
CONNECTING = 100
#: The event loop (reactor) each kind's server said it runs, for the report.
LOOPS: dict[str, str] = {}


# -- a drop server and its commands ---------------------------------------------------------


class DropServer(ServerProcess):
    """A ``_dropserver.py KIND`` child for ``kind`` (``KIND@LABEL``: with another checkout's
    aiodelay) as ``args`` (from :func:`add_server_options`) say, pinned to ``cpu``, ready to
    hold ``count`` requests.

    Its stderr is kept in a temporary file (the log kinds' lines, an error), or with
    ``--log-to devnull`` the log kinds' goes to /dev/null.
    """

    def __init__(
        self,
        kind: str,
        args: argparse.Namespace,
        cpu: int | None,
        *,
        count: int,
        tracemalloc: bool = False,
    ) -> None:
        argv = [_dropserver.__file__, base_kind(kind), "--count", str(count)]
        if cpu is not None:
            argv += ["--cpu", str(cpu)]
        if args.uvloop:
            argv.append("--uvloop")
        if tracemalloc:
            argv.append("--tracemalloc")
        self.kind = kind
        self.log_to: str = args.log_to
        devnull = base_kind(kind) in LOGGING and self.log_to == "devnull"
        super().__init__(
            argv,
            timeout=args.timeout,
            env=checkout_env(kind, args.aiodelay_path),
            stderr="devnull" if devnull else "capture",
            name=kind,
        )

    def __enter__(self) -> DropServer:
        super().__enter__()
        LOOPS[self.kind] = self.said[0]
        return self

    def arm(self, n: int) -> None:
        """Have the server say ``STARTED`` when ``n`` more handlers have started, and
        ``CANCELLED`` when ``n`` more have seen their client leave."""
        self.command(f"ARM {n}")

    def memory(self, collect: bool = True) -> tuple[int, int]:
        """The server's RSS and traced bytes (-1: not tracing), after ``gc.collect()`` if
        ``collect``."""
        _, rss, traced = self.command("MEM" if collect else "MEM raw").split()
        return int(rss), int(traced)

    def collections(self) -> dict[str, Any]:
        """The server's garbage collections since the last call (``_dropserver.Collections``)."""
        taken: dict[str, Any] = json.loads(self.command("GC").split(" ", 1)[1])
        return taken

    def report(self) -> dict[str, Any]:
        """When each handler started and saw its client leave, since the last report."""
        report: dict[str, Any] = json.loads(self.command("REPORT").split(" ", 1)[1])
        return report

    def count(self) -> str:
        return self.command("COUNT")


# -- holding requests and dropping them -----------------------------------------------------


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


def hold(server: DropServer, ids: Sequence[int], timeout: float) -> list[socket.socket]:
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


# -- the scripts' options and report header -------------------------------------------------


def comma_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of distinct ``choices``."""

    def parse(value: str) -> list[str]:
        items = [item.strip() for item in value.split(",") if item.strip()]
        wrong = [item for item in items if item not in choices]
        if wrong or not items or len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of distinct {', '.join(choices)}; got {value!r}"
            )
        return items

    return parse


def add_closes_option(parser: argparse.ArgumentParser) -> None:
    """``--closes``: FIN, RST or both, into ``args.closes``."""
    parser.add_argument(
        "--closes",
        type=comma_list(CLOSES),
        default=list(CLOSES),
        help="how clients leave: FIN (close), RST (SO_LINGER 0) (default FIN,RST)",
    )


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The options that say which drop servers to start and how: ``--kinds``, ``--uvloop``,
    ``--log-to``, ``--timeout`` and ``--aiodelay-path`` (checked by :func:`check_options`)."""
    parser.add_argument(
        "--kinds",
        type=comma_list(KINDS),
        default=list(KINDS),
        help=f"servers to compare (default {','.join(KINDS)})",
    )
    parser.add_argument("--uvloop", action="store_true", help="aiohttp servers on uvloop")
    parser.add_argument(
        "--log-to",
        choices=("file", "devnull"),
        default="file",
        help="where the log kinds' servers' stderr goes (default: a temporary file)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds allowed per wait (default 60)"
    )
    add_checkout_option(parser)


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """End in ``parser.error`` if ``--count`` or ``--timeout`` is out of range."""
    if not 1 <= args.count <= 15000:
        parser.error("--count must be between 1 and 15000")
    if not 0 < args.timeout <= 600:
        parser.error("--timeout must be more than 0 and at most 600 seconds")


def drop_kinds(args: argparse.Namespace) -> list[str]:
    """The kinds of ``--kinds`` in the order of ``KINDS`` (aiohttp first: the others' ratios
    are to it), then their ``KIND@LABEL`` for ``--aiodelay-path``; without ``twisted``, with a
    note, if Twisted is not installed (``RuntimeError`` if that leaves none)."""
    kinds = checkout_kinds(
        [kind for kind in KINDS if kind in args.kinds], args.aiodelay_path, AIODELAY
    )
    if "twisted" in kinds and version("twisted") == "not installed":
        print("note: Twisted is not installed, skipping the twisted kind "
              "(pip install -e '.[bench]')")  # fmt: skip
        kinds = [kind for kind in kinds if kind != "twisted"]
    if not kinds:
        raise RuntimeError("nothing to measure")
    return kinds


def begin(script: str, args: argparse.Namespace, count: int) -> int | None:
    """The start of a run of ``script`` that holds up to ``count`` requests at once: raise the
    open-files limit, pin this process (the client) to a CPU, print the report's header;
    return the CPU for the servers (None: not pinned)."""
    needed = files_needed(count)
    limit = raise_fd_limit(needed)
    if limit < needed:
        raise RuntimeError(f"open-files limit is {limit}: too low for {count} connections")
    cpus = two_cpus()
    about_machine = versions()  # before pinning: the CPUs this run may use
    pin_to_cpu(cpus[1] if cpus else None)
    for line in header(script, args, about_machine, cpus):
        print(line)
    return cpus[0] if cpus else None


def versions() -> list[str]:
    """The machine and the versions, for a report's header (before pinning: it counts the
    CPUs the run may use)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [
        f"machine: {describe_machine()}, Python {sys.version.split()[0]}",
        f"versions: aiohttp {version('aiohttp')}, aiodelay {version('aiodelay')} "
        f"(git {git(here, 'rev-parse', '--short', 'HEAD')}), uvloop {version('uvloop')}, "
        f"Twisted {version('twisted')}",
    ]


def header(
    script: str,
    args: argparse.Namespace,
    about_machine: Sequence[str],
    cpus: tuple[int, int] | None,
) -> list[str]:
    """The command, date, machine, checkouts, load and pinning of a run of ``script``."""
    loads = " ".join(f"{x:.2f}" for x in os.getloadavg())
    pinning = f"servers on CPU {cpus[0]}, client on CPU {cpus[1]}" if cpus else "none"
    return [
        "command: python " + " ".join([os.path.relpath(script), *sys.argv[1:]]),
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        *about_machine,
        *describe_checkouts(args.aiodelay_path),
        f"load average at start: {loads} (1, 5, 15 min)",
        f"pinning: {pinning}",
    ]
