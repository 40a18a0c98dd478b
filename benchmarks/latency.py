"""How fast a disconnect reaches the handler: client close -> handler's CancelledError.

One process, one event loop, a server on a free port of 127.0.0.1 (a plain
``web.AppRunner(app)``, aiohttp's defaults, with ``aiodelay.setup(app)``). Each of
``--count`` rounds (default 1,000):

1. a client connects and sends ``GET /wait``; the handler sends the headers and one byte of
   a two-byte body, then waits for ever;
2. the client reads all of that (so that its close is a clean FIN, not an RST for unread
   data), takes ``time.perf_counter()`` and closes its socket: plainly (the kernel sends a
   FIN at once) or with ``SO_LINGER`` 0 (an RST);
3. the handler's ``except CancelledError`` takes ``time.perf_counter()``.

The latency is the difference: the event loop waking up, the transport reading the FIN
(or failing with the RST), aiodelay's watch seeing it, and the cancelled handler task
running. The script prints p50/p90/p99/max for FIN and RST. For reference it also measures
aiohttp's own ``handler_cancellation=True`` (no aiodelay), which cancels on the transport's
``connection_lost``. Target: aiodelay's p50 at most 0.3 ms.

Run (from the repository root, in the project's virtualenv)::

    python benchmarks/latency.py                  # 1,000 rounds each, a few seconds
    python benchmarks/latency.py --uvloop --count 5000
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import sys
import time
from collections.abc import Sequence

from _report import ms, percentile
from aiohttp import web

import aiodelay

KINDS = ("aiodelay", "aiohttp-cancel")
CLOSES = ("FIN", "RST")
#: Longest a round may wait for the handler's cancellation before the script gives up.
ROUND_TIMEOUT = 5.0

_REQUEST = b"GET /wait HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
#: --paused: an upload of which 800 kB were sent and none read, so that aiohttp has stopped
#: reading the socket when the client leaves (only the kernel's report can show it then).
_UNREAD = 800 * 1024
_PAUSED_REQUEST = (
    b"POST /wait HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % (4 * _UNREAD)
    + b"u" * _UNREAD
)


class HeldHandler:
    """The handler's side: tells when it started waiting and when it was cancelled."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.cancelled_at = 0.0

    async def wait(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 2  # the client waits for the first byte, the 2nd never comes
        await response.prepare(request)
        await response.write(b"x")
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            self.cancelled_at = time.perf_counter()
            self.cancelled.set()
            raise
        raise AssertionError("unreachable: the future above is never set")


async def one_round(port: int, probe: HeldHandler, close: str, paused: bool = False) -> float:
    """One connect, wait, close; the latency in seconds."""
    loop = asyncio.get_running_loop()
    probe.cancelled.clear()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, _PAUSED_REQUEST if paused else _REQUEST)
        received = b""
        while not (b"\r\n\r\n" in received and received.endswith(b"x")):
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise RuntimeError(f"the server closed first; got {received!r}")
            received += chunk
        if close == "RST":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except BaseException:
        sock.close()
        raise
    closed_at = time.perf_counter()
    sock.close()
    await asyncio.wait_for(probe.cancelled.wait(), ROUND_TIMEOUT)
    return probe.cancelled_at - closed_at


async def measure_kind(kind: str, count: int, paused: bool = False) -> dict[str, list[float]]:
    probe = HeldHandler()
    app = web.Application()
    app.router.add_route("*", "/wait", probe.wait)
    if kind == "aiodelay":
        aiodelay.setup(app)
        runner = web.AppRunner(app)
    else:
        runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    latencies: dict[str, list[float]] = {close: [] for close in CLOSES}
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        for _ in range(20):  # warm-up
            await one_round(port, probe, "FIN", paused)
        for i in range(count * len(CLOSES)):
            close = CLOSES[i % len(CLOSES)]  # alternate, so that both see the same conditions
            latencies[close].append(await one_round(port, probe, close, paused))
            # Let the server finish closing this connection before the next one starts.
            await asyncio.sleep(0.001)
        if kind == "aiodelay":
            cancelled = aiodelay.stats(app).cancelled
            expected = count * len(CLOSES) + 20
            if cancelled != expected:
                raise RuntimeError(f"aiodelay counted {cancelled} cancellations, not {expected}")
    finally:
        await runner.cleanup()
    return latencies


async def measure(
    kinds: Sequence[str], count: int, paused: bool = False
) -> dict[str, dict[str, list[float]]]:
    return {kind: await measure_kind(kind, count, paused) for kind in kinds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="disconnect detection latency: client close -> handler cancelled"
    )
    parser.add_argument(
        "--count", type=int, default=1000, help="rounds per close kind (default 1000)"
    )
    parser.add_argument("--uvloop", action="store_true", help="run with uvloop's event loop")
    parser.add_argument(
        "--paused",
        action="store_true",
        help="the client leaves behind 800 kB of an upload the handler has not read (aiohttp "
        "has paused reading; aiohttp alone never sees it, so it is not measured)",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip aiohttp's own handler_cancellation=True (without aiodelay)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 100_000:
        parser.error("--count must be between 1 and 100000")
    kinds = KINDS[:1] if args.no_reference or args.paused else KINDS
    if args.uvloop:
        import uvloop

        results = uvloop.run(measure(kinds, args.count, args.paused))
    else:
        results = asyncio.run(measure(kinds, args.count, args.paused))
    loop_name = "uvloop" if args.uvloop else "asyncio"
    what = ", behind 800 kB of unread upload" if args.paused else ""
    print(f"{args.count} rounds per close{what}, {loop_name} loop, python {sys.version.split()[0]}")
    print(f"{'':24s}{'p50':>9s}{'p90':>9s}{'p99':>9s}{'max':>9s}   (ms)")
    for kind in kinds:
        for close in CLOSES:
            values = sorted(results[kind][close])
            print(f"{kind:15s} {close:8s}{ms(values, (50, 90, 99, 100))}")
    print()
    for close in CLOSES:
        p50 = percentile(sorted(results["aiodelay"][close]), 50) * 1e3
        verdict = "met" if p50 <= 0.3 else "MISSED"
        print(f"aiodelay {close} p50 {p50:.3f} ms (target <= 0.3 ms: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
