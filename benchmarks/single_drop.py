"""One drop at a time across two processes: client close -> handler saw it, per server kind.

The servers are the storm's (``_dropserver.py``: ``aiohttp``, ``aiohttp-mw``, ``aiodelay``,
the ``-log`` kinds, ``twisted``, and ``KIND@LABEL`` with ``--aiodelay-path``), each in a
process of its own pinned to one CPU, the client (this process) pinned to another. For each
kind, ``--rounds`` rounds per close (default 300; the closes alternate, so that both see the
same conditions), after 20 rounds of warm-up: the client connects and sends
``GET /hold/<i>``; once the handler has started (no response byte is sent, as in the storm)
the client takes ``time.monotonic()`` and closes, plainly (a FIN) or with ``SO_LINGER`` 0 (an
RST); the handler takes ``time.monotonic()`` in its ``except CancelledError`` (Twisted: the
``notifyFinish()`` errback), CLOCK_MONOTONIC being one clock for the whole machine on Linux.
A pause of 2 ms after each drop lets the server finish closing that connection.

This is ``latency.py``'s measure (one process, one loop, aiodelay and aiohttp's own switch
only) across processes and for every kind of the storm: a drop here may find the server's
loop asleep, so it is longer. ``storm.py --rounds N`` prints this same table after its
storms.

Run (from the repository root, in the project's virtualenv, with ``.[bench]`` for Twisted)::

    python benchmarks/single_drop.py                          # 300 rounds per close, all kinds
    python benchmarks/single_drop.py --rounds 100 --closes FIN --kinds aiohttp,aiodelay
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Sequence

from _drops import (
    DropServer,
    add_closes_option,
    add_server_options,
    begin,
    close_all,
    drop_kinds,
    request_line,
)
from _report import ms

#: Warm-up rounds before the timed single drops.
WARMUP = 20
#: Pause after each single drop, so that the server has finished closing that connection.
PAUSE = 0.002


def run_single(
    kind: str, closes: Sequence[str], rounds: int, args: argparse.Namespace, cpu: int | None
) -> dict[str, list[float]]:
    """One request held and dropped at a time, ``rounds`` rounds per close kind (which
    alternate, so that both see the same conditions); the sorted latencies per close."""
    result: dict[str, list[float]] = {close: [] for close in closes}
    with DropServer(kind, args, cpu, count=1) as server:
        closed_at: dict[int, tuple[str, float]] = {}
        total = WARMUP + rounds * len(closes)
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
            if i >= WARMUP:
                closed_at[i] = (close, at)
            time.sleep(PAUSE)
        cancelled = server.report()["cancelled"]
    for i, (close, at) in closed_at.items():
        result[close].append(cancelled[str(i)] - at)
    return {close: sorted(values) for close, values in result.items()}


def print_singles(
    kinds: Sequence[str],
    closes: Sequence[str],
    rounds: int,
    args: argparse.Namespace,
    cpu: int | None,
) -> None:
    """Measure each kind (:func:`run_single`) and print the table, a row per kind and close."""
    print(f"\nsingle drop, one at a time ({rounds} rounds per close, ms)")
    print(f"{'':20s}{'p50':>9s}{'p90':>9s}{'p99':>9s}{'max':>9s}")
    for kind in kinds:
        singles = run_single(kind, closes, rounds, args, cpu)
        for close in closes:
            print(f"{kind:13s} {close:5s} {ms(singles[close], (50, 90, 99, 100))}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="one drop at a time, client and server in two processes, per server kind"
    )
    parser.add_argument(
        "--rounds", type=int, default=300, help="single drops per close (default 300)"
    )
    add_closes_option(parser)
    add_server_options(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 100_000:
        parser.error("--rounds must be between 1 and 100000")
    if not 0 < args.timeout <= 600:
        parser.error("--timeout must be more than 0 and at most 600 seconds")
    try:
        kinds = drop_kinds(args)
        server_cpu = begin(__file__, args, 1)
        loop_name = "uvloop" if args.uvloop else "asyncio"
        print(
            f"settings: {args.rounds} single drops per close, closes {','.join(args.closes)}, "
            f"aiohttp kinds on {loop_name}, warm-up {WARMUP} rounds, timeout {args.timeout:g} s"
        )
        print_singles(kinds, args.closes, args.rounds, args, server_cpu)
    except RuntimeError as exc:
        print(f"single_drop.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
