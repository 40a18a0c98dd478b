"""What aiodelay costs in memory per request held open, compared with bare aiohttp.

Each app runs in a process of its own (a plain ``web.AppRunner(app)`` on a free port of
127.0.0.1); its ``/hold`` handler waits on an event that this script releases at the end.
For each app the script

1. warms the server up (holds and releases a few requests),
2. takes a baseline with no request held (``/stats``: the server's RSS from
   ``/proc/self/status`` after ``gc.collect()``, and tracemalloc's traced bytes),
3. opens ``--requests`` connections (default 5,000), each sending ``GET /hold``, and waits
   until the server reports them all inside the handler,
4. measures again, releases the requests, reads every response and closes.

It prints (held - baseline) / requests for each app and the difference aiodelay - bare.
RSS is measured in a server without tracemalloc, traced bytes in a second server run with
tracemalloc started (which costs memory of its own, so it would spoil the RSS); from that
second run the script also lists the source lines where aiodelay's extra bytes are
allocated. Target: aiodelay adds at most 1 KB per held request.

With ``--aiodelay-path [LABEL=]DIR`` a third app, ``aiodelay@LABEL``, is served with the aiodelay
of another checkout, DIR (first on the server's PYTHONPATH): two versions of the code in one run.

Run (from the repository root, in the project's virtualenv)::

    python benchmarks/memory.py                    # 5,000 held requests, about 30 s
    python benchmarks/memory.py --requests 2000 --uvloop --top 15
    python benchmarks/memory.py --aiodelay-path /tmp/base   # and aiodelay@base
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

from _serve import (
    ServerProcess,
    add_checkout_option,
    base_kind,
    checkout_env,
    checkout_kinds,
    describe_checkouts,
    raise_fd_limit,
    read_rss,
    run_server,
)
from aiohttp import ClientSession, web

import aiodelay

KINDS = ("bare", "aiodelay")
#: Warm-up requests held and released before the baseline (few: the heap they grow stays).
WARMUP = 20
#: Connections being opened at once (the server's listen backlog is aiohttp's 128).
CONNECTING = 100

_RELEASED = b"released"


class Holder:
    """The server side: requests wait in ``/hold`` until ``/release``."""

    def __init__(self) -> None:
        self.held = 0
        self.release = asyncio.Event()
        self.baseline: tracemalloc.Snapshot | None = None

    async def hold(self, request: web.Request) -> web.Response:
        release = self.release
        self.held += 1
        try:
            await release.wait()
        finally:
            self.held -= 1
        return web.Response(body=_RELEASED)

    async def do_release(self, request: web.Request) -> web.Response:
        self.release.set()
        self.release = asyncio.Event()
        return web.Response(text="ok")

    async def stats(self, request: web.Request) -> web.Response:
        gc.collect()
        result: dict[str, Any] = {"held": self.held, "rss": read_rss(), "traced": None}
        if tracemalloc.is_tracing():
            result["traced"] = tracemalloc.get_traced_memory()[0]
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            if "baseline" in request.query:
                self.baseline = snapshot
            elif self.baseline is not None:
                result["growth"] = {
                    f"{_short(stat.traceback[0].filename)}:{stat.traceback[0].lineno}": [
                        stat.size_diff,
                        stat.count_diff,
                    ]
                    for stat in snapshot.compare_to(self.baseline, "lineno")
                    if stat.size_diff
                }
        return web.json_response(result)


def _short(filename: str) -> str:
    """A source file's name from its package on: ``aiohttp/web_protocol.py``."""
    for marker in ("site-packages/", "/lib/python3"):
        if marker in filename:
            tail = filename.rsplit(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" else tail
    if "/aiodelay/" in filename:
        return "aiodelay/" + filename.rsplit("/aiodelay/", 1)[1]
    return filename


def make_app(kind: str) -> web.Application:
    holder = Holder()
    app = web.Application()
    app.router.add_get("/hold", holder.hold)
    app.router.add_get("/release", holder.do_release)
    app.router.add_get("/stats", holder.stats)
    if kind == "aiodelay":
        aiodelay.setup(app)
    return app


# -- the client side -----------------------------------------------------------------------


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_held(port: int, count: int) -> list[Conn]:
    """``count`` connections, each with a ``GET /hold`` sent."""
    gate = asyncio.Semaphore(CONNECTING)
    request = b"GET /hold HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    async def one() -> Conn:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
            return reader, writer

    return await asyncio.gather(*(one() for _ in range(count)))


async def finish_held(conns: list[Conn]) -> None:
    """Read each released response to its end and close the connection."""

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = await reader.readexactly(len(_RELEASED))
        assert body == _RELEASED, body
        writer.close()
        await writer.wait_closed()

    await asyncio.gather(*(one(reader, writer) for reader, writer in conns))


async def get_stats(session: ClientSession, url: str, *, baseline: bool = False) -> Any:
    async with session.get(url + "/stats", params={"baseline": "1"} if baseline else {}) as resp:
        resp.raise_for_status()
        return await resp.json()


async def wait_held(session: ClientSession, url: str, count: int, timeout: float) -> Any:
    """Poll ``/stats`` until ``count`` requests are inside the handler; return those stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await get_stats(session, url)
        if stats["held"] >= count:
            return stats
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {stats['held']} of {count} requests held after {timeout}s")
        await asyncio.sleep(0.05)


async def hold_and_release(url: str, port: int, count: int, timeout: float) -> Any:
    async with ClientSession() as session:
        conns = await asyncio.wait_for(open_held(port, count), timeout)
        stats = await wait_held(session, url, count, timeout)
        async with session.get(url + "/release") as resp:
            resp.raise_for_status()
        await asyncio.wait_for(finish_held(conns), timeout)
        return stats


async def measure_one(url: str, port: int, count: int, timeout: float) -> tuple[Any, Any]:
    """(baseline stats, stats with ``count`` requests held) of one server."""
    await hold_and_release(url, port, WARMUP, timeout)
    async with ClientSession() as session:
        await wait_held(session, url, 0, timeout)  # every warm-up handler has returned
        baseline = await get_stats(session, url, baseline=True)
    held = await hold_and_release(url, port, count, timeout)
    return baseline, held


def measure(args: argparse.Namespace) -> int:
    count: int = args.requests
    limit = raise_fd_limit(count + 512)
    if limit < count + 512:
        print(f"open-files limit is {limit}: too low for {count} connections", file=sys.stderr)
        return 1
    loop_name = "uvloop" if args.uvloop else "asyncio"
    print(f"{count} requests held at once, {loop_name} loop, python {sys.version.split()[0]}")
    for line in describe_checkouts(args.aiodelay_path):
        print(line)
    kinds = checkout_kinds(KINDS, args.aiodelay_path, ("aiodelay",))
    per_request: dict[tuple[str, str], float] = {}
    growth: dict[str, dict[str, list[int]]] = {}
    for metric in ("rss", "traced"):
        for kind in kinds:
            argv = [__file__, "--serve", base_kind(kind), "--requests", str(count)]
            if args.uvloop:
                argv.append("--uvloop")
            if metric == "traced":
                argv.append("--tracemalloc")
            with ServerProcess(argv, env=checkout_env(kind, args.aiodelay_path)) as server:
                baseline, held = asyncio.run(
                    measure_one(server.url, server.port, count, args.timeout)
                )
            grown = held[metric] - baseline[metric]
            per_request[kind, metric] = grown / count
            growth[kind] = held.get("growth", {})
            print(
                f"{kind:13s} {metric:6s}: {baseline[metric] / 1e6:8.2f} MB idle, "
                f"{held[metric] / 1e6:8.2f} MB held, {grown / count:8.0f} B per held request",
                flush=True,
            )
    print()
    for metric, what in (("rss", "RSS"), ("traced", "tracemalloc")):
        for kind in kinds[1:]:
            extra = per_request[kind, metric] - per_request["bare", metric]
            verdict = "met" if extra <= 1024 else "MISSED"
            print(
                f"{what:12s} bare {per_request['bare', metric]:7.0f} B, "
                f"{kind} {per_request[kind, metric]:7.0f} B per held request: "
                f"{kind} adds {extra:6.0f} B (target <= 1024 B: {verdict})"
            )
    if args.top:
        for kind in kinds[1:]:
            print_extra_lines(growth["bare"], growth[kind], count, args.top, kind)
    return 0


def print_extra_lines(
    bare: dict[str, list[int]],
    delayed: dict[str, list[int]],
    count: int,
    top: int,
    kind: str = "aiodelay",
) -> None:
    """The source lines whose allocations grew more with aiodelay than without, per request."""
    extra = []
    for line in bare.keys() | delayed.keys():
        size_b, count_b = bare.get(line, (0, 0))
        size_d, count_d = delayed.get(line, (0, 0))
        extra.append((size_d - size_b, count_d - count_b, line))
    extra.sort(reverse=True)
    total = sum(size for size, _, _ in extra)
    print(
        f"\nwhere {kind}'s extra {total / count:.0f} B per held request are allocated "
        f"(tracemalloc growth with {kind} minus without, by line; top {top}):"
    )
    print(f"{'B/request':>10s} {'blocks/request':>15s}  line")
    for size, blocks, line in extra[:top]:
        print(f"{size / count:10.0f} {blocks / count:15.2f}  {line}")
    fewer = [item for item in extra if item[0] < 0][-3:]
    for size, blocks, line in reversed(fewer):
        print(f"{size / count:10.0f} {blocks / count:15.2f}  {line}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="memory per held request: bare aiohttp vs aiodelay (RSS and tracemalloc)"
    )
    parser.add_argument(
        "--requests", type=int, default=5000, help="requests held at once (default 5000)"
    )
    parser.add_argument("--uvloop", action="store_true", help="serve with uvloop's event loop")
    parser.add_argument(
        "--top", type=int, default=15, help="source lines to list by growth (default 15; 0: none)"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds allowed per phase (default 60)"
    )
    add_checkout_option(parser)
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 15000:
        parser.error("--requests must be between 1 and 15000")
    if args.top < 0 or args.timeout <= 0:
        parser.error("--top must be at least 0 and --timeout positive")
    if args.serve:
        kind: str = args.serve
        raise_fd_limit(args.requests + 512)
        if args.tracemalloc:
            tracemalloc.start()
        run_server(lambda: make_app(kind), use_uvloop=args.uvloop, cpu=None)
        return 0
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
