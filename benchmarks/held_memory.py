"""Traced bytes per held request on the storm's servers (tracemalloc), per server kind.

The servers are the storm's (``_dropserver.py``: ``aiohttp``, ``aiohttp-mw``, ``aiodelay``,
the ``-log`` kinds, ``twisted``, and ``KIND@LABEL`` with ``--aiodelay-path``), each started
with tracemalloc on, in a process of its own of which nothing is timed (tracemalloc slows a
server down, so it never runs in a timed storm). For each kind: 50 requests held and dropped
(a warm-up), the traced bytes after ``gc.collect()``, ``--count`` requests held (default
5,000), the traced bytes again; it prints (held - idle) / count and the difference to
``aiohttp``'s.

The RSS per held request of the same servers is read in the storms themselves (``storm.py``
prints it under "memory per held request (RSS, ...)"); ``storm.py --tracemalloc`` prints this
table after its storms. ``memory.py`` measures the same two quantities for bare aiohttp and
aiodelay with a handler that answers when released, and lists the source lines of aiodelay's
extra bytes.

Run (from the repository root, in the project's virtualenv, with ``.[bench]`` for Twisted)::

    python benchmarks/held_memory.py                       # 5,000 held, all kinds
    python benchmarks/held_memory.py --count 2000 --kinds aiohttp,aiodelay --uvloop
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from _drops import DropServer, add_server_options, begin, check_options, close_all, drop_kinds, hold
from _dropserver import WARMUP


def run_tracemalloc(kind: str, args: argparse.Namespace, cpu: int | None) -> float:
    """Traced bytes per held request, in a server of its own with tracemalloc on."""
    count: int = args.count
    with DropServer(kind, args, cpu, count=count, tracemalloc=True) as server:
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


def print_traced(kinds: Sequence[str], args: argparse.Namespace, cpu: int | None) -> None:
    """Measure each kind (:func:`run_tracemalloc`) and print a row per kind."""
    print("\nmemory per held request (tracemalloc, servers of their own)")
    base = None
    for kind in kinds:
        per = run_tracemalloc(kind, args, cpu)
        if kind == "aiohttp":
            base = per
        diff = f"  {(per - base) / 1e3:+6.2f} KB vs aiohttp" if base is not None else ""
        print(f"{kind:13s} {per / 1e3:6.2f} KB{diff}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="traced bytes per held request on the storm's servers, per server kind"
    )
    parser.add_argument(
        "--count", type=int, default=5000, help="requests held at once (default 5000)"
    )
    add_server_options(parser)
    args = parser.parse_args(argv)
    check_options(parser, args)
    try:
        kinds = drop_kinds(args)
        server_cpu = begin(__file__, args, args.count)
        loop_name = "uvloop" if args.uvloop else "asyncio"
        print(
            f"settings: {args.count} requests held, aiohttp kinds on {loop_name}, warm-up "
            f"{WARMUP} held+dropped, timeout {args.timeout:g} s"
        )
        print_traced(kinds, args, server_cpu)
    except RuntimeError as exc:
        print(f"held_memory.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
